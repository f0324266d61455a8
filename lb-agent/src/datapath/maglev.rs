//! Maglev lookup tables (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! A table of `M` entries (M prime) maps a flow hash to a backend. Every
//! backend has a permutation of `0..M` derived from its address only, and
//! backends take turns claiming their next free preferred entry, so:
//! - every node computes the same table from the same backend set (the
//!   hash of a backend is of its address and port, never of a node-local
//!   id, and uses no random seed);
//! - each backend gets `M / N` entries, give or take one;
//! - removing one of N backends reassigns about `1/N` of the entries
//!   (mostly those the removed backend held).

use std::net::SocketAddrV4;

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut divisor = 2u32;
    while u64::from(divisor) * u64::from(divisor) <= u64::from(n) {
        if n.is_multiple_of(divisor) {
            return false;
        }
        divisor += 1;
    }
    true
}

/// A 64-bit hash of a backend's address and port that is the same on
/// every node and every build: FNV-1a over the bytes, with a seed byte so
/// the offset and skip hashes differ, then SplitMix64's finaliser to
/// spread FNV's weak low bits.
fn backend_hash(backend: &SocketAddrV4, seed: u8) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let port = backend.port().to_be_bytes();
    for byte in [seed]
        .iter()
        .chain(backend.ip().octets().iter())
        .chain(port.iter())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The Maglev table of size `size` (a prime) for `backends`: entry `i`
/// holds an index into `backends`. The order of `backends` does not
/// matter (they are sorted first; the result indexes the caller's slice).
/// Empty when there is no backend.
pub fn table(backends: &[SocketAddrV4], size: u32) -> Vec<u32> {
    debug_assert!(is_prime(size), "Maglev table size {size} is not prime");
    if backends.is_empty() {
        return Vec::new();
    }
    let m = u64::from(size);
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    order.dedup_by_key(|i| backends[*i]);
    let preferences: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let offset = backend_hash(&backends[i], 0) % m;
            let skip = backend_hash(&backends[i], 1) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut entries = vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (turn, &(offset, skip)) in preferences.iter().enumerate() {
            let mut candidate = (offset + next[turn] * skip) % m;
            while entries[candidate as usize] != u32::MAX {
                next[turn] += 1;
                candidate = (offset + next[turn] * skip) % m;
            }
            entries[candidate as usize] = order[turn] as u32;
            next[turn] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backends(n: u8) -> Vec<SocketAddrV4> {
        (1..=n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(198, 18, 7, i), 8080))
            .collect()
    }

    fn by_address(backends: &[SocketAddrV4], table: &[u32]) -> Vec<SocketAddrV4> {
        table.iter().map(|&i| backends[i as usize]).collect()
    }

    #[test]
    fn default_size_is_prime_and_primes_are_recognised() {
        assert!(is_prime(lb_common::config::defaults::MAGLEV_TABLE_SIZE));
        assert!(is_prime(65_537));
        assert!(!is_prime(16_383));
        assert!(!is_prime(1));
    }

    #[test]
    fn table_is_even() {
        for n in [1u8, 2, 3, 10, 100] {
            let list = backends(n);
            let table = table(&list, 16_381);
            let mut counts = vec![0u32; list.len()];
            for &i in &table {
                counts[i as usize] += 1;
            }
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            println!("{n} backends: entries per backend min {min} max {max}");
            // Maglev's round-robin filling: every backend within one entry.
            assert!(max - min <= 1, "{n} backends: min {min}, max {max}");
        }
    }

    #[test]
    fn order_of_backends_does_not_matter() {
        let list = backends(10);
        let mut reversed = list.clone();
        reversed.reverse();
        assert_eq!(
            by_address(&list, &table(&list, 16_381)),
            by_address(&reversed, &table(&reversed, 16_381))
        );
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth() {
        let list = backends(10);
        let before = by_address(&list, &table(&list, 16_381));
        for removed in 0..list.len() {
            let mut fewer = list.clone();
            fewer.remove(removed);
            let after = by_address(&fewer, &table(&fewer, 16_381));
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let share = moved as f64 / before.len() as f64;
            println!(
                "removing backend {removed}: {:.2} % of entries moved",
                share * 100.0
            );
            // The removed backend's tenth must move; Maglev adds little more.
            assert!((0.095..0.13).contains(&share), "moved {share}");
            // Every entry that moved away from a kept backend is counted.
            let owned = before.iter().filter(|b| **b == list[removed]).count();
            assert!(moved >= owned);
        }
    }

    #[test]
    fn adding_one_to_nine_moves_about_a_tenth() {
        let list = backends(10);
        let nine = &list[..9];
        let before = by_address(nine, &table(nine, 16_381));
        let after = by_address(&list, &table(&list, 16_381));
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let share = moved as f64 / before.len() as f64;
        assert!((0.095..0.13).contains(&share), "moved {share}");
    }
}

//! The Internet checksum (RFC 1071), from scratch: a plain sum of
//! big-endian 16-bit words, no incremental updates, nothing shared with the
//! datapath. Expected packets in the tests are checksummed only by this.

use std::net::Ipv4Addr;

/// One's-complement sum of `data` as big-endian 16-bit words (an odd last
/// byte is padded with zero), folded to 16 bits, not complemented.
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut sum: u64 = data
        .chunks(2)
        .map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum field for `parts` laid end to end (each part but the last
/// must have even length, as headers do).
pub fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let joined: Vec<u8> = parts.concat();
    !ones_complement_sum(&joined)
}

/// The IPv4 pseudo header that TCP and UDP checksums cover.
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: u16) -> [u8; 12] {
    let mut header = [0u8; 12];
    header[0..4].copy_from_slice(&src.octets());
    header[4..8].copy_from_slice(&dst.octets());
    header[9] = protocol;
    header[10..12].copy_from_slice(&l4_len.to_be_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of RFC 1071 section 3: bytes 00 01 f2 03 f4 f5 f6 f7
    /// sum to 0xddf2.
    #[test]
    fn rfc1071_example() {
        assert_eq!(
            ones_complement_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    /// A well-known IPv4 header (from Wikipedia's "IPv4 header checksum"):
    /// 4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7.
    #[test]
    fn ipv4_header_example() {
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&[&header]), 0xb861);
    }

    #[test]
    fn odd_length_is_zero_padded() {
        assert_eq!(ones_complement_sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }
}

//! Internet checksum arithmetic (RFC 1071, RFC 1624).
//!
//! All values are summed exactly as they sit in the packet (network byte
//! order read as native integers): one's-complement addition is byte-order
//! independent, so a sum computed this way and stored back natively lands
//! on the wire correctly.
//!
//! Rewrites of L4 checksums go through the context's helper (see
//! [`crate::context::PacketContext::replace_l4_csum`]) because only the
//! kernel knows whether the skb is CHECKSUM_PARTIAL. The IPv4 header
//! checksum is always complete, so it is updated here, without a helper call.

use aya_ebpf::helpers::generated::bpf_csum_diff;

/// Folds a one's-complement sum of 32-bit words into 16 bits.
#[inline(always)]
pub const fn fold(sum: u64) -> u16 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field after a 32-bit word covered by it changed from `from`
/// to `to` (RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`).
#[inline(always)]
pub const fn replace_u32(check: u16, from: u32, to: u32) -> u16 {
    !fold(!check as u64 + !from as u64 + to as u64)
}

/// The one's-complement sum of the IPv4 pseudo header (RFC 793 / RFC 768):
/// source, destination, protocol and L4 length, unfolded.
#[inline(always)]
pub const fn pseudo_header_sum(src: u32, dst: u32, proto: u8, l4_len: u16) -> u64 {
    src as u64 + dst as u64 + (proto as u16).to_be() as u64 + l4_len.to_be() as u64
}

/// Sums `len` bytes at `buf` from scratch with `bpf_csum_diff`, adding `seed`.
/// `len` must be a multiple of 4 and at most 512 (the helper's limits).
///
/// # Safety
/// `buf` must point to at least `len` initialized bytes on the BPF stack or
/// in a map value.
#[inline(always)]
pub unsafe fn sum_bytes(buf: *const u8, len: u32, seed: u32) -> Result<u64, i64> {
    // SAFETY: the caller guarantees `buf` covers `len` bytes; a zero-sized
    // `from` makes the helper compute a plain sum of `to`.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf as *mut u32, len, seed) };
    if sum < 0 { Err(sum) } else { Ok(sum as u64) }
}

//! Internet checksum arithmetic (RFC 1071, RFC 1624).
//!
//! All values are summed exactly as they sit in the packet (network byte
//! order read as native integers): one's-complement addition is byte-order
//! independent, so a sum computed this way and stored back natively lands
//! on the wire correctly.
//!
//! Address changes reach L4 checksums through the context's helper (see
//! [`crate::context::PacketContext::replace_l4_csum`]) because only the
//! kernel knows whether the skb is CHECKSUM_PARTIAL; how it changed the
//! field tells that state ([`classify_after_addr_update`]), and a port
//! change is then folded in here. The IPv4 header checksum is always
//! complete, so it is updated here, without a helper call; so is the L4
//! checksum of an XDP frame, which is always complete as well.

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

/// An L4 checksum field after a 32-bit word covered by it (an address, in
/// the pseudo header) changed from `from` to `to`. For UDP (`udp`), a
/// result of zero is written as 0xffff: zero means "no checksum".
#[inline(always)]
pub const fn replace_u32_l4(check: u16, from: u32, to: u32, udp: bool) -> u16 {
    let check = replace_u32(check, from, to);
    if udp && check == 0 { 0xffff } else { check }
}

/// The checksum field after a 16-bit word covered by it changed from
/// `from` to `to`. For UDP (`udp`), a result of zero is written as 0xffff:
/// zero means "no checksum".
#[inline(always)]
pub const fn replace_u16(check: u16, from: u16, to: u16, udp: bool) -> u16 {
    let check = !fold(!check as u64 + !from as u64 + to as u64);
    if udp && check == 0 { 0xffff } else { check }
}

/// One's-complement equality: 0x0000 and 0xffff both are zero.
#[inline(always)]
const fn eq_ones_complement(a: u16, b: u16) -> bool {
    a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
}

/// What an L4 checksum field holds, as told by how the kernel's L4
/// checksum helper updated it for an address change.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4CsumKind {
    /// UDP without checksum (field 0): nothing to maintain.
    Absent,
    /// The checksum of the whole segment (CHECKSUM_NONE, _UNNECESSARY or
    /// _COMPLETE): a port change must be folded into it.
    Full,
    /// Only the pseudo-header sum (CHECKSUM_PARTIAL: the NIC or
    /// `skb_checksum_help` sums the segment later): a port change must not
    /// touch it.
    PseudoHeader,
    /// Cannot tell (the address change does not move the sum).
    Unknown,
}

/// Classifies the L4 checksum field from its value `before` and `after`
/// `bpf_l4_csum_replace(.., BPF_F_PSEUDO_HDR | 4)` replaced address `from`
/// with `to`.
///
/// The helper is the only code that knows the skb's checksum state. For a
/// full checksum it computes `after = before - d`, for CHECKSUM_PARTIAL
/// `after = before + d`, with `d = to - from` in one's-complement
/// arithmetic (`inet_proto_csum_replace4`). The two differ unless `d` is
/// zero, so the result tells which state the packet is in, and a port
/// rewrite can then be done inline instead of through a second helper
/// call (about 20 ns). Comparisons are modulo 0xffff (both zeros equal), so
/// the classification does not depend on how the kernel represents zero.
#[inline(always)]
pub const fn classify_after_addr_update(
    before: u16,
    after: u16,
    from: u32,
    to: u32,
    udp: bool,
) -> L4CsumKind {
    if udp && before == 0 {
        return L4CsumKind::Absent;
    }
    let delta = fold(!from as u64 + to as u64);
    if eq_ones_complement(delta, 0) {
        return L4CsumKind::Unknown;
    }
    let full = fold(before as u64 + !delta as u64);
    let partial = fold(before as u64 + delta as u64);
    if eq_ones_complement(after, full) {
        L4CsumKind::Full
    } else if eq_ones_complement(after, partial) {
        L4CsumKind::PseudoHeader
    } else {
        L4CsumKind::Unknown
    }
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

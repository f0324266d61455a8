//! Address translation: DNAT of forward packets to the flow's backend and
//! reverse SNAT of replies to the frontend.
//!
//! Order matters for the verifier and for cost: the address, port and IPv4
//! checksum are written directly through bounds-checked pointers first
//! (the IPv4 checksum is always complete, so it is updated in software);
//! then the address change goes into the L4 checksum through the context's
//! helper, which invalidates packet pointers and is the only code that
//! knows whether the skb is CHECKSUM_PARTIAL. How the helper changed the
//! field tells that state (`csum::classify_after_addr_update`), so a port
//! change is then folded in inline, without a second helper call; only
//! when the state cannot be told does the port go through the helper too.
//! A port that does not change costs nothing.

use network_types::ip::Ipv4Hdr;

use crate::{
    context::{L4Field, PacketContext, ptr_at},
    csum::{self, L4CsumKind},
    error::Error,
    parse::{IP_OFF, Packet},
};

/// The two ports at the start of a TCP or UDP header.
#[repr(C)]
struct Ports {
    src: [u8; 2],
    dst: [u8; 2],
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Rewrites the destination to `addr:port` (network byte order).
#[inline(always)]
pub fn dnat<C: PacketContext>(ctx: &C, pkt: &Packet, addr: u32, port: u16) -> Result<(), Error> {
    rewrite(ctx, pkt, Side::Destination, addr, port)
}

/// Rewrites the source to `addr:port` (network byte order).
#[inline(always)]
pub fn snat<C: PacketContext>(ctx: &C, pkt: &Packet, addr: u32, port: u16) -> Result<(), Error> {
    rewrite(ctx, pkt, Side::Source, addr, port)
}

#[inline(always)]
fn rewrite<C: PacketContext>(
    ctx: &C,
    pkt: &Packet,
    side: Side,
    new_addr: u32,
    new_port: u16,
) -> Result<(), Error> {
    let (old_addr, old_port) = match side {
        Side::Source => (pkt.src_addr, pkt.src_port),
        Side::Destination => (pkt.dst_addr, pkt.dst_port),
    };
    let udp = !pkt.is_tcp();
    let csum_off = pkt.l4_csum_off();
    let ip: *mut Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(Error::RewriteFailed)?;
    let ports: *mut Ports = ptr_at(ctx, pkt.l4_off).ok_or(Error::RewriteFailed)?;
    let l4_csum: *mut [u8; 2] = ptr_at(ctx, csum_off).ok_or(Error::RewriteFailed)?;
    // SAFETY: the pointers were bounds-checked just above and no helper
    // has run since.
    let l4_csum_before = unsafe {
        let ip = &mut *ip;
        match side {
            Side::Source => ip.src_addr = new_addr.to_ne_bytes(),
            Side::Destination => ip.dst_addr = new_addr.to_ne_bytes(),
        }
        let check = csum::replace_u32(u16::from_ne_bytes(ip.check), old_addr, new_addr);
        ip.check = check.to_ne_bytes();
        if old_port != new_port {
            match side {
                Side::Source => (*ports).src = new_port.to_ne_bytes(),
                Side::Destination => (*ports).dst = new_port.to_ne_bytes(),
            }
        }
        u16::from_ne_bytes(*l4_csum)
    };

    ctx.replace_l4_csum(csum_off, old_addr, new_addr, L4Field::Addr, udp)
        .map_err(|_| Error::RewriteFailed)?;
    if old_port == new_port {
        return Ok(());
    }
    // The helper invalidated packet pointers: derive the field again.
    let l4_csum: *mut [u8; 2] = ptr_at(ctx, csum_off).ok_or(Error::RewriteFailed)?;
    // SAFETY: bounds-checked just above, no helper call since.
    let l4_csum_after = unsafe { u16::from_ne_bytes(*l4_csum) };
    match csum::classify_after_addr_update(l4_csum_before, l4_csum_after, old_addr, new_addr, udp) {
        L4CsumKind::Absent | L4CsumKind::PseudoHeader => Ok(()),
        L4CsumKind::Full => {
            let check = csum::replace_u16(l4_csum_after, old_port, new_port, udp);
            // SAFETY: as above.
            unsafe { *l4_csum = check.to_ne_bytes() };
            Ok(())
        }
        L4CsumKind::Unknown => ctx
            .replace_l4_csum(
                csum_off,
                u32::from(old_port),
                u32::from(new_port),
                L4Field::Port,
                udp,
            )
            .map_err(|_| Error::RewriteFailed),
    }
}

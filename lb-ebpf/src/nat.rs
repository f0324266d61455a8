//! Address translation: DNAT of forward packets to the flow's backend,
//! reverse SNAT of replies to the frontend, and both at once for
//! source-translated flows ([`translate`]).
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
//!
//! Where the L4 checksum is known to be complete (XDP,
//! `PacketContext::L4_CSUM_COMPLETE`), it is updated in software along
//! with the IPv4 checksum, and no helper runs at all.

use network_types::ip::Ipv4Hdr;

use crate::{
    context::{L4Field, PacketContext, ptr_at},
    csum::{self, L4CsumKind},
    error::Error,
    parse::{self, IP_OFF, Packet},
};

/// The two ports at the start of a TCP or UDP header.
#[repr(C)]
struct Ports {
    src: [u8; 2],
    dst: [u8; 2],
}

/// A packet's addresses and ports after translation, network byte order.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src_addr: u32,
    pub src_port: u16,
    pub dst_addr: u32,
    pub dst_port: u16,
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

/// Rewrites source and destination to `new` (a source-translated flow:
/// both change; each side that is unchanged costs nothing).
#[inline(always)]
pub fn translate<C: PacketContext>(ctx: &C, pkt: &Packet, new: &Tuple) -> Result<(), Error> {
    if new.src_addr != pkt.src_addr || new.src_port != pkt.src_port {
        rewrite(ctx, pkt, Side::Source, new.src_addr, new.src_port)?;
    }
    if new.dst_addr != pkt.dst_addr || new.dst_port != pkt.dst_port {
        rewrite(ctx, pkt, Side::Destination, new.dst_addr, new.dst_port)?;
    }
    Ok(())
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
    let csum_field_off = pkt.l4_csum_field();
    let ip: *mut Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(Error::RewriteFailed)?;
    let l4_off = parse::l4_off_of(ip);
    let csum_off = l4_off + csum_field_off;
    let ports: *mut Ports = ptr_at(ctx, l4_off).ok_or(Error::RewriteFailed)?;
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
        let l4_csum_before = u16::from_ne_bytes(*l4_csum);
        if C::L4_CSUM_COMPLETE {
            if !(udp && l4_csum_before == 0) {
                let mut check = csum::replace_u32_l4(l4_csum_before, old_addr, new_addr, udp);
                if old_port != new_port {
                    check = csum::replace_u16(check, old_port, new_port, udp);
                }
                *l4_csum = check.to_ne_bytes();
            }
            return Ok(());
        }
        l4_csum_before
    };

    ctx.replace_l4_csum(csum_off, old_addr, new_addr, L4Field::Addr, udp)
        .map_err(|_| Error::RewriteFailed)?;
    if old_port == new_port {
        return Ok(());
    }
    // The helper invalidated packet pointers: derive the field again.
    let ip: *const Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(Error::RewriteFailed)?;
    let csum_off = parse::l4_off_of(ip) + csum_field_off;
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

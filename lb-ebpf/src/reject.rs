//! Refusing a connection the way kube-proxy's REJECT rule does, but from
//! the datapath: the client's packet is rewritten in place into the answer
//! (TCP RST, or ICMP destination unreachable / port unreachable for UDP)
//! and sent back out of the interface it came in on.
//!
//! The answer comes from the frontend the client addressed, so the client's
//! socket matches it. Headers are rebuilt from scratch (IHL 5, TTL 64, IP id
//! 0, DF on the RST as Linux sends resets, DF clear on the ICMP error, MACs
//! swapped) and checksummed from scratch with `bpf_csum_diff`; no byte of
//! the original L4 header survives except in the ICMP quote.
//!
//! In XDP the answer goes out with `XDP_TX` (MACs swapped, as here); its
//! length changes through `bpf_xdp_adjust_tail`.
//!
//! The skb keeps the checksum state of the client's packet. For a
//! CHECKSUM_PARTIAL TCP segment the RST carries the pseudo-header sum
//! instead of the full checksum (see `tcp_reset`). The ICMP error needs no
//! such care: a PARTIAL UDP datagram's checksum offset (6) lands on the
//! last two bytes of the ICMP header's zero "unused" word, and finishing a
//! checksum over a message that already sums to zero writes 0 (or 0xffff)
//! there, which keeps the ICMP checksum valid.

use lb_common::proto;
use network_types::{
    bitfield::BitfieldU16, eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr,
};

use crate::{
    context::{Action, L4Field, PacketContext, ptr_at},
    csum::{self, L4CsumKind},
    error::Error,
    parse::{self, IP_OFF, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const TTL: u8 = 64;
/// IPv4 "don't fragment" bit in `frags`.
const IP_DF: u16 = 0x4000;
/// ICMP destination unreachable, code port unreachable.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// Longest quote of the offending datagram: its IP header with the longest
/// options, and the first 8 bytes of its payload (RFC 792).
const MAX_QUOTE_LEN: usize = 60 + 8;
/// Length of the two MAC addresses at the start of the Ethernet header.
const MACS_LEN: usize = 12;

/// Answers `pkt`, a new connection to a frontend that refuses it. A TCP RST
/// is never answered (RFC 793): it is dropped.
#[inline(always)]
pub fn refuse<C: PacketContext>(ctx: &C, pkt: &Packet) -> Result<Action, Error> {
    if pkt.is_tcp() {
        return reset(ctx, pkt);
    }
    icmp_port_unreachable(ctx, pkt)?;
    Ok(Action::Bounce)
}

/// Answers a TCP packet with a reset, as RFC 793 and `tcp_v4_send_reset`
/// do: a packet with ACK gets `RST, seq = its ack`; one without gets
/// `RST|ACK, seq 0, ack = its seq + payload + SYN + FIN`.
#[inline(always)]
pub fn reset<C: PacketContext>(ctx: &C, pkt: &Packet) -> Result<Action, Error> {
    if pkt.has_tcp_flag(TCP_RST) {
        return Ok(Action::Drop);
    }
    tcp_reset(ctx, pkt)?;
    Ok(Action::Bounce)
}

/// The swapped MAC addresses of the answer: destination = the sender.
#[inline(always)]
fn swapped_macs<C: PacketContext>(ctx: &C) -> Result<[u8; MACS_LEN], Error> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Error::RejectFailed)?;
    // SAFETY: `ptr_at` checked the Ethernet header.
    let eth = unsafe { &*eth };
    let mut macs = [0u8; MACS_LEN];
    macs[..6].copy_from_slice(&eth.src_addr);
    macs[6..].copy_from_slice(&eth.dst_addr);
    Ok(macs)
}

/// An IPv4 header without options from the frontend back to the client.
#[inline(always)]
fn answer_ip_header(pkt: &Packet, protocol: u8, total_len: u16, frags: u16) -> Ipv4Hdr {
    Ipv4Hdr {
        vihl: (4 << 4) | 5,
        tos: 0,
        tot_len: total_len.to_be_bytes(),
        id: [0; 2],
        frags: frags.to_be_bytes(),
        ttl: TTL,
        proto: protocol,
        check: [0; 2],
        src_addr: pkt.dst_addr.to_ne_bytes(),
        dst_addr: pkt.src_addr.to_ne_bytes(),
    }
}

/// The IPv4 header checksum of `ip`, from scratch.
#[inline(always)]
fn ip_header_checksum(ip: &Ipv4Hdr) -> Result<[u8; 2], Error> {
    // SAFETY: `ip` is a 20-byte header on the stack.
    let sum = unsafe { csum::sum_bytes((ip as *const Ipv4Hdr).cast(), Ipv4Hdr::LEN as u32, 0) }
        .map_err(|_| Error::RejectFailed)?;
    Ok((!csum::fold(sum)).to_ne_bytes())
}

/// Whether the skb carrying `pkt` (a TCP segment whose checksum field
/// holds `check`) is CHECKSUM_PARTIAL. BPF cannot read `ip_summed`; the
/// L4 checksum helper reveals it by how it folds an address change into
/// the field (see `csum::classify_after_addr_update`), so this feeds it a
/// made-up one. The field is rewritten from scratch afterwards. An XDP
/// frame's checksum is always complete.
#[inline(always)]
fn is_checksum_partial<C: PacketContext>(ctx: &C, pkt: &Packet, check: u16) -> Result<bool, Error> {
    if C::L4_CSUM_COMPLETE {
        return Ok(false);
    }
    const PROBE_FROM: u32 = 0;
    const PROBE_TO: u32 = 1;
    let csum_off = pkt.l4_csum_off();
    ctx.replace_l4_csum(csum_off, PROBE_FROM, PROBE_TO, L4Field::Addr, false)
        .map_err(|_| Error::RejectFailed)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(Error::RejectFailed)?;
    let field: *const [u8; 2] =
        ptr_at(ctx, parse::l4_off_of(ip) + pkt.l4_csum_field()).ok_or(Error::RejectFailed)?;
    // SAFETY: bounds-checked just above, no helper call since.
    let after = u16::from_ne_bytes(unsafe { *field });
    Ok(
        csum::classify_after_addr_update(check, after, PROBE_FROM, PROBE_TO, false)
            == L4CsumKind::PseudoHeader,
    )
}

#[repr(C, align(4))]
struct ResetHeaders {
    ip: Ipv4Hdr,
    tcp: TcpHdr,
}

#[inline(always)]
fn tcp_reset<C: PacketContext>(ctx: &C, pkt: &Packet) -> Result<(), Error> {
    let macs = swapped_macs(ctx)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(Error::RejectFailed)?;
    let tcp: *const TcpHdr = ptr_at(ctx, parse::l4_off_of(ip)).ok_or(Error::RejectFailed)?;
    // SAFETY: `ptr_at` checked the fixed TCP header; the data-offset byte is
    // inside it.
    let (their_seq, their_ack, doff, their_check) = unsafe {
        let tcp = &*tcp;
        let doff = u32::from(*(tcp as *const TcpHdr).cast::<u8>().add(12) >> 4) * 4;
        (
            u32::from_be_bytes(tcp.seq),
            u32::from_be_bytes(tcp.ack_seq),
            doff,
            u16::from_ne_bytes(tcp.check),
        )
    };
    let partial = is_checksum_partial(ctx, pkt, their_check)?;

    let (seq, ack, flags) = if pkt.has_tcp_flag(TCP_ACK) {
        (their_ack, 0, TCP_RST)
    } else {
        let payload_len = u32::from(pkt.l4_len).saturating_sub(doff);
        let mut ack = their_seq.wrapping_add(payload_len);
        if pkt.has_tcp_flag(TCP_SYN) {
            ack = ack.wrapping_add(1);
        }
        if pkt.has_tcp_flag(TCP_FIN) {
            ack = ack.wrapping_add(1);
        }
        (0, ack, TCP_RST | TCP_ACK)
    };

    let mut headers = ResetHeaders {
        ip: answer_ip_header(pkt, proto::TCP, (Ipv4Hdr::LEN + TcpHdr::LEN) as u16, IP_DF),
        tcp: TcpHdr {
            source: pkt.dst_port.to_ne_bytes(),
            dest: pkt.src_port.to_ne_bytes(),
            seq: seq.to_be_bytes(),
            ack_seq: ack.to_be_bytes(),
            _bitfield_align_1: [],
            // Data offset 5 (no options), then the flags byte.
            _bitfield_1: BitfieldU16::new([5 << 4, flags]),
            window: [0; 2],
            check: [0; 2],
            urg_ptr: [0; 2],
        },
    };
    headers.ip.check = ip_header_checksum(&headers.ip)?;
    let pseudo =
        csum::pseudo_header_sum(pkt.dst_addr, pkt.src_addr, proto::TCP, TcpHdr::LEN as u16);
    // SAFETY: `headers.tcp` is a 20-byte header on the stack.
    let sum = unsafe {
        csum::sum_bytes(
            (&headers.tcp as *const TcpHdr).cast(),
            TcpHdr::LEN as u32,
            0,
        )
    }
    .map_err(|_| Error::RejectFailed)?;
    // A CHECKSUM_PARTIAL skb stays one: its checksum field must hold the
    // pseudo-header sum, which whoever transmits it last completes over
    // the segment (csum_start and csum_offset still point at this field
    // when the client's IP header had no options).
    let check = if partial {
        csum::fold(pseudo)
    } else {
        !csum::fold(sum + pseudo)
    };
    headers.tcp.check = check.to_ne_bytes();

    ctx.set_len((EthHdr::LEN + size_of::<ResetHeaders>()) as u32)
        .map_err(|_| Error::RejectFailed)?;
    // SAFETY: both sources are initialized stack values of the given sizes.
    unsafe {
        ctx.store_bytes(0, macs.as_ptr(), MACS_LEN as u32)
            .map_err(|_| Error::RejectFailed)?;
        ctx.store_bytes(
            IP_OFF,
            (&headers as *const ResetHeaders).cast(),
            size_of::<ResetHeaders>() as u32,
        )
        .map_err(|_| Error::RejectFailed)?;
    }
    Ok(())
}

#[repr(C, align(4))]
struct IcmpError {
    ip: Ipv4Hdr,
    icmp: Icmpv4Hdr,
    /// The offending datagram's IP header and first 8 payload bytes.
    quote: [u8; MAX_QUOTE_LEN],
}

#[inline(always)]
fn icmp_port_unreachable<C: PacketContext>(ctx: &C, pkt: &Packet) -> Result<(), Error> {
    let macs = swapped_macs(ctx)?;
    // The IP header length is a multiple of 4 in 20..=60, so the quote and
    // the ICMP message are multiples of 4 as `bpf_csum_diff` needs. The
    // parser proved the range, but the verifier may have lost it on the way
    // (the compiler is free to compute the IHL in ways it tracks loosely):
    // `black_box` keeps the compiler from dropping this check, which gives
    // the verifier the bounds of the helper lengths below.
    let quote_len = core::hint::black_box(pkt.l4_off - IP_OFF + 8);
    if !(Ipv4Hdr::LEN + 8..=MAX_QUOTE_LEN).contains(&quote_len) {
        return Err(Error::RejectFailed);
    }

    let mut answer = IcmpError {
        ip: answer_ip_header(pkt, proto::ICMP, 0, 0),
        icmp: Icmpv4Hdr {
            type_: ICMP_DEST_UNREACH,
            code: ICMP_PORT_UNREACH,
            check: [0; 2],
            data: [0; 4],
        },
        quote: [0; MAX_QUOTE_LEN],
    };
    // SAFETY: `quote` has room for `quote_len` bytes (checked above); the
    // parser checked that the packet holds the IP header and 8 L4 bytes.
    unsafe { ctx.load_bytes(IP_OFF, answer.quote.as_mut_ptr(), quote_len as u32) }
        .map_err(|_| Error::RejectFailed)?;

    let icmp_len = Icmpv4Hdr::LEN + quote_len;
    answer.ip.tot_len = ((Ipv4Hdr::LEN + icmp_len) as u16).to_be_bytes();
    answer.ip.check = ip_header_checksum(&answer.ip)?;
    // SAFETY: the ICMP header and the quote are contiguous in `answer`
    // (`repr(C)`, no padding between 8-byte header and byte array) and
    // cover `icmp_len` bytes.
    let sum = unsafe {
        csum::sum_bytes(
            (&answer.icmp as *const Icmpv4Hdr).cast(),
            icmp_len as u32,
            0,
        )
    }
    .map_err(|_| Error::RejectFailed)?;
    answer.icmp.check = (!csum::fold(sum)).to_ne_bytes();

    let answer_len = Ipv4Hdr::LEN + icmp_len;
    ctx.set_len((EthHdr::LEN + answer_len) as u32)
        .map_err(|_| Error::RejectFailed)?;
    // SAFETY: both sources are initialized stack values covering the lengths.
    unsafe {
        ctx.store_bytes(0, macs.as_ptr(), MACS_LEN as u32)
            .map_err(|_| Error::RejectFailed)?;
        ctx.store_bytes(
            IP_OFF,
            (&answer as *const IcmpError).cast(),
            answer_len as u32,
        )
        .map_err(|_| Error::RejectFailed)?;
    }
    Ok(())
}

//! Ethernet / IPv4 / TCP / UDP parsing with the bounds checks the verifier
//! needs. The result is a copy of the few header fields the datapath uses,
//! plus offsets to re-derive pointers later.

use lb_common::proto;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    context::{PacketContext, ptr_at},
    error::Error,
};

/// Offset of the IPv4 header: the Ethernet header (no VLAN tag; pod veths
/// carry untagged frames).
pub const IP_OFF: usize = EthHdr::LEN;

/// Bytes the datapath reads directly: Ethernet, the longest IPv4 header,
/// a TCP header without options.
const MAX_PARSED_LEN: u32 = (EthHdr::LEN + 60 + TcpHdr::LEN) as u32;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offset of the flags byte in the TCP header (after data offset/reserved).
pub const TCP_FLAGS_OFF: usize = 13;
/// Offset of the data-offset byte in the TCP header.
pub const TCP_DOFF_OFF: usize = 12;
/// Offset of the checksum in the TCP header.
pub const TCP_CSUM_OFF: usize = 16;
/// Offset of the checksum in the UDP header.
pub const UDP_CSUM_OFF: usize = 6;

/// The IPv4 "more fragments" flag and fragment offset bits of `frags`.
const IP_FRAG_OFFSET_MASK: u16 = 0x1fff;

/// A TCP or UDP packet (or first fragment) the datapath may translate.
/// Addresses and ports are in network byte order, as on the wire.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the L4 header: Ethernet plus IHL * 4 (IP options allowed).
    pub l4_off: usize,
    /// IPv4 total length minus the IP header: L4 header and payload of this
    /// datagram (of this fragment, for a first fragment).
    pub l4_len: u16,
    pub proto: u8,
    /// TCP flags byte (`TCP_*`), 0 for UDP.
    pub tcp_flags: u8,
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Packet {
    #[inline(always)]
    pub const fn is_tcp(&self) -> bool {
        self.proto == proto::TCP
    }

    #[inline(always)]
    pub const fn has_tcp_flag(&self, flag: u8) -> bool {
        self.tcp_flags & flag != 0
    }

    /// Offset of the L4 checksum field in the L4 header.
    #[inline(always)]
    pub const fn l4_csum_field(&self) -> usize {
        if self.is_tcp() {
            TCP_CSUM_OFF
        } else {
            UDP_CSUM_OFF
        }
    }

    /// Offset of the L4 checksum field in the packet (for helper
    /// arguments; packet pointers go through [`l4_off_of`]).
    #[inline(always)]
    pub const fn l4_csum_off(&self) -> usize {
        self.l4_off + self.l4_csum_field()
    }
}

/// The offset of the L4 header, read from the IPv4 header at `ip` (which
/// the parser validated) rather than taken from [`Packet::l4_off`], for
/// packet pointer arithmetic: the compiler may keep `l4_off` on the stack
/// in a way the verifier loses its bounds for (a byte store into a zeroed
/// slot, read back as a word), while a value loaded from the packet and
/// masked right here is bounded (14..=74) for the verifier.
#[inline(always)]
pub fn l4_off_of(ip: *const Ipv4Hdr) -> usize {
    // SAFETY: the caller bounds-checked the fixed IPv4 header at `ip`.
    IP_OFF + usize::from(unsafe { (*ip).vihl } & 0x0f) * 4
}

/// What the parser found.
pub enum Parsed {
    /// TCP or UDP with a complete L4 header.
    L4(Packet),
    /// Not IPv4 (ARP, IPv6, ...).
    NotIpv4,
    /// An IPv4 fragment other than the first: it has no L4 header.
    Fragment,
    /// IPv4 carrying neither TCP nor UDP.
    OtherProtocol,
}

/// Parses the headers at the start of the packet. Truncated or inconsistent
/// headers are [`Error::Malformed`].
#[inline(always)]
pub fn parse<C: PacketContext>(ctx: &C) -> Result<Parsed, Error> {
    let packet_len = ctx.packet_len();
    // Headers of a packet built by a local socket are in the linear part;
    // pull only when they are not (GSO/GRO skbs with a short head).
    let linear = (ctx.data_end() - ctx.data()) as u32;
    if linear < MAX_PARSED_LEN && packet_len > linear {
        ctx.pull(packet_len.min(MAX_PARSED_LEN))
            .map_err(|_| Error::Malformed)?;
    }

    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Error::Malformed)?;
    // SAFETY: `ptr_at` checked that the header lies within the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Ok(Parsed::NotIpv4);
    }

    let ip: *const Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(Error::Malformed)?;
    // SAFETY: `ptr_at` checked that the fixed IPv4 header lies within the packet.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(Error::Malformed);
    }
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ihl < Ipv4Hdr::LEN {
        return Err(Error::Malformed);
    }
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if total_len < ihl || IP_OFF + total_len > packet_len as usize {
        return Err(Error::Malformed);
    }
    if u16::from_be_bytes(ip.frags) & IP_FRAG_OFFSET_MASK != 0 {
        return Ok(Parsed::Fragment);
    }
    let proto = ip.proto;
    let src_addr = u32::from_ne_bytes(ip.src_addr);
    let dst_addr = u32::from_ne_bytes(ip.dst_addr);
    let l4_off = IP_OFF + ihl;
    let l4_len = total_len - ihl;

    let (src_port, dst_port, tcp_flags) = match proto {
        proto::TCP => {
            if l4_len < TcpHdr::LEN {
                return Err(Error::Malformed);
            }
            let tcp: *const TcpHdr = ptr_at(ctx, l4_off).ok_or(Error::Malformed)?;
            // SAFETY: `ptr_at` checked that the fixed TCP header lies within
            // the packet; the bytes read are inside it.
            let (tcp, doff, flags) = unsafe {
                let bytes = tcp.cast::<u8>();
                (
                    &*tcp,
                    usize::from(*bytes.add(TCP_DOFF_OFF) >> 4) * 4,
                    *bytes.add(TCP_FLAGS_OFF),
                )
            };
            if doff < TcpHdr::LEN || doff > l4_len {
                return Err(Error::Malformed);
            }
            (
                u16::from_ne_bytes(tcp.source),
                u16::from_ne_bytes(tcp.dest),
                flags,
            )
        }
        proto::UDP => {
            if l4_len < UdpHdr::LEN {
                return Err(Error::Malformed);
            }
            let udp: *const UdpHdr = ptr_at(ctx, l4_off).ok_or(Error::Malformed)?;
            // SAFETY: `ptr_at` checked that the UDP header lies within the packet.
            let udp = unsafe { &*udp };
            (u16::from_ne_bytes(udp.src), u16::from_ne_bytes(udp.dst), 0)
        }
        _ => return Ok(Parsed::OtherProtocol),
    };

    Ok(Parsed::L4(Packet {
        l4_off,
        l4_len: l4_len as u16,
        proto,
        tcp_flags,
        src_addr,
        dst_addr,
        src_port,
        dst_port,
    }))
}

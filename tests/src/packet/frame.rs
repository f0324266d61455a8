//! Frames as plain data: build one, serialize it with every length and
//! checksum computed from scratch ([`super::checksum`]), derive the
//! expected translation of it by changing fields and serializing again.

use std::{fmt::Write as _, net::Ipv4Addr, net::SocketAddrV4};

use lb_common::proto;

use super::checksum::{internet_checksum, pseudo_header};

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;

/// Ethernet header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ethernet {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

/// IPv4 header fields. Lengths and the checksum are computed on
/// serialization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub tos: u8,
    pub id: u16,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Raw option bytes; padded with zero (end of options) to a multiple of 4.
    pub options: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Raw option bytes; padded with zero to a multiple of 4.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp {
    pub src_port: u16,
    pub dst_port: u16,
    /// Send a checksum (false: the field is 0, "no checksum").
    pub with_checksum: bool,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub kind: u8,
    pub code: u8,
    /// The four bytes after the checksum (id/sequence, unused, MTU...).
    pub rest: [u8; 4],
    pub payload: Vec<u8>,
}

/// What the IPv4 datagram carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(Tcp),
    Udp(Udp),
    Icmp(Icmp),
    /// Raw bytes (a non-first fragment, an unknown protocol).
    Raw(Vec<u8>),
}

/// An Ethernet frame carrying IPv4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub eth: Ethernet,
    pub ip: Ipv4,
    pub l4: L4,
    /// Keep only this many L4 bytes in the frame (a first fragment): the
    /// L4 checksum and length still describe the whole datagram.
    pub l4_keep: Option<usize>,
}

/// MAC of the client pod's eth0.
pub const POD_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// MAC of the host side of the pod's veth.
pub const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xfe];

impl Frame {
    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: L4) -> Self {
        Self {
            eth: Ethernet {
                dst: HOST_MAC,
                src: POD_MAC,
                ether_type: ETHERTYPE_IPV4,
            },
            ip: Ipv4 {
                tos: 0,
                id: 0x1234,
                dont_fragment: true,
                more_fragments: false,
                fragment_offset: 0,
                ttl: 64,
                protocol,
                src,
                dst,
                options: Vec::new(),
            },
            l4,
            l4_keep: None,
        }
    }

    /// A TCP segment with `flags` and a window, no options, no payload.
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self::ipv4(
            *src.ip(),
            *dst.ip(),
            proto::TCP,
            L4::Tcp(Tcp {
                src_port: src.port(),
                dst_port: dst.port(),
                seq: 0x1000_0000,
                ack: if flags & TCP_ACK != 0 { 0x2000_0000 } else { 0 },
                flags,
                window: 64240,
                options: Vec::new(),
                payload: Vec::new(),
            }),
        )
    }

    /// A UDP datagram with a checksum.
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self::ipv4(
            *src.ip(),
            *dst.ip(),
            proto::UDP,
            L4::Udp(Udp {
                src_port: src.port(),
                dst_port: dst.port(),
                with_checksum: true,
                payload: payload.to_vec(),
            }),
        )
    }

    /// An ICMP echo request.
    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self::ipv4(
            src,
            dst,
            proto::ICMP,
            L4::Icmp(Icmp {
                kind: ICMP_ECHO_REQUEST,
                code: 0,
                rest: [0x00, 0x2a, 0x00, 0x01],
                payload: b"ping".to_vec(),
            }),
        )
    }

    pub fn tcp_mut(&mut self) -> &mut Tcp {
        match &mut self.l4 {
            L4::Tcp(tcp) => tcp,
            other => panic!("not TCP: {other:?}"),
        }
    }

    pub fn udp_mut(&mut self) -> &mut Udp {
        match &mut self.l4 {
            L4::Udp(udp) => udp,
            other => panic!("not UDP: {other:?}"),
        }
    }

    /// Sets the TCP payload.
    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp(tcp) => tcp.payload = payload.to_vec(),
            L4::Udp(udp) => udp.payload = payload.to_vec(),
            L4::Icmp(icmp) => icmp.payload = payload.to_vec(),
            L4::Raw(raw) => *raw = payload.to_vec(),
        }
        self
    }

    /// Sets the TCP flags and sequence numbers.
    pub fn with_tcp(mut self, flags: u8, seq: u32, ack: u32) -> Self {
        let tcp = self.tcp_mut();
        tcp.flags = flags;
        tcp.seq = seq;
        tcp.ack = ack;
        self
    }

    /// Sets the Ethernet source and destination.
    pub fn with_macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.eth.src = src;
        self.eth.dst = dst;
        self
    }

    /// Sends UDP without a checksum (field 0).
    pub fn without_udp_checksum(mut self) -> Self {
        self.udp_mut().with_checksum = false;
        self
    }

    pub fn with_ip_options(mut self, options: &[u8]) -> Self {
        self.ip.options = options.to_vec();
        self
    }

    /// The same frame with the destination address and port replaced (what
    /// DNAT produces).
    pub fn with_dst(mut self, dst: SocketAddrV4) -> Self {
        self.ip.dst = *dst.ip();
        match &mut self.l4 {
            L4::Tcp(tcp) => tcp.dst_port = dst.port(),
            L4::Udp(udp) => udp.dst_port = dst.port(),
            other => panic!("no ports: {other:?}"),
        }
        self
    }

    /// The same frame with the source address and port replaced (what the
    /// reverse SNAT produces).
    pub fn with_src(mut self, src: SocketAddrV4) -> Self {
        self.ip.src = *src.ip();
        match &mut self.l4 {
            L4::Tcp(tcp) => tcp.src_port = src.port(),
            L4::Udp(udp) => udp.src_port = src.port(),
            other => panic!("no ports: {other:?}"),
        }
        self
    }

    /// The first fragment of this datagram, carrying `keep` L4 bytes (a
    /// multiple of 8): MF set, offset 0.
    pub fn first_fragment(mut self, keep: usize) -> Self {
        assert!(
            keep.is_multiple_of(8),
            "fragment payloads are multiples of 8 bytes"
        );
        self.ip.more_fragments = true;
        self.ip.dont_fragment = false;
        self.l4_keep = Some(keep);
        self
    }

    /// The L4 bytes with lengths and checksum computed from scratch over
    /// the whole datagram.
    pub fn l4_bytes(&self) -> Vec<u8> {
        let (src, dst) = (self.ip.src, self.ip.dst);
        match &self.l4 {
            L4::Tcp(tcp) => {
                let options = padded(&tcp.options);
                let header_len = 20 + options.len();
                let mut bytes = Vec::with_capacity(header_len + tcp.payload.len());
                bytes.extend_from_slice(&tcp.src_port.to_be_bytes());
                bytes.extend_from_slice(&tcp.dst_port.to_be_bytes());
                bytes.extend_from_slice(&tcp.seq.to_be_bytes());
                bytes.extend_from_slice(&tcp.ack.to_be_bytes());
                bytes.push(((header_len / 4) as u8) << 4);
                bytes.push(tcp.flags);
                bytes.extend_from_slice(&tcp.window.to_be_bytes());
                bytes.extend_from_slice(&[0, 0]); // checksum
                bytes.extend_from_slice(&[0, 0]); // urgent pointer
                bytes.extend_from_slice(&options);
                bytes.extend_from_slice(&tcp.payload);
                let pseudo = pseudo_header(src, dst, proto::TCP, bytes.len() as u16);
                let check = internet_checksum(&[&pseudo, &bytes]);
                bytes[16..18].copy_from_slice(&check.to_be_bytes());
                bytes
            }
            L4::Udp(udp) => {
                let len = (8 + udp.payload.len()) as u16;
                let mut bytes = Vec::with_capacity(usize::from(len));
                bytes.extend_from_slice(&udp.src_port.to_be_bytes());
                bytes.extend_from_slice(&udp.dst_port.to_be_bytes());
                bytes.extend_from_slice(&len.to_be_bytes());
                bytes.extend_from_slice(&[0, 0]);
                bytes.extend_from_slice(&udp.payload);
                if udp.with_checksum {
                    let pseudo = pseudo_header(src, dst, proto::UDP, len);
                    let check = match internet_checksum(&[&pseudo, &bytes]) {
                        // RFC 768: a computed zero is sent as all ones.
                        0 => 0xffff,
                        check => check,
                    };
                    bytes[6..8].copy_from_slice(&check.to_be_bytes());
                }
                bytes
            }
            L4::Icmp(icmp) => {
                let mut bytes = vec![icmp.kind, icmp.code, 0, 0];
                bytes.extend_from_slice(&icmp.rest);
                bytes.extend_from_slice(&icmp.payload);
                let check = internet_checksum(&[&bytes]);
                bytes[2..4].copy_from_slice(&check.to_be_bytes());
                bytes
            }
            L4::Raw(raw) => raw.clone(),
        }
    }

    /// The IPv4 header (with options) for `l4_len` bytes of payload.
    pub fn ip_header_bytes(&self, l4_len: usize) -> Vec<u8> {
        let options = padded(&self.ip.options);
        let header_len = 20 + options.len();
        let total_len = (header_len + l4_len) as u16;
        let mut frags = self.ip.fragment_offset & 0x1fff;
        if self.ip.dont_fragment {
            frags |= 0x4000;
        }
        if self.ip.more_fragments {
            frags |= 0x2000;
        }
        let mut header = Vec::with_capacity(header_len);
        header.push(0x40 | (header_len / 4) as u8);
        header.push(self.ip.tos);
        header.extend_from_slice(&total_len.to_be_bytes());
        header.extend_from_slice(&self.ip.id.to_be_bytes());
        header.extend_from_slice(&frags.to_be_bytes());
        header.push(self.ip.ttl);
        header.push(self.ip.protocol);
        header.extend_from_slice(&[0, 0]);
        header.extend_from_slice(&self.ip.src.octets());
        header.extend_from_slice(&self.ip.dst.octets());
        header.extend_from_slice(&options);
        let check = internet_checksum(&[&header]);
        header[10..12].copy_from_slice(&check.to_be_bytes());
        header
    }

    /// The frame on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut l4 = self.l4_bytes();
        if let Some(keep) = self.l4_keep {
            l4.truncate(keep);
        }
        let mut bytes = Vec::with_capacity(14 + 60 + l4.len());
        bytes.extend_from_slice(&self.eth.dst);
        bytes.extend_from_slice(&self.eth.src);
        bytes.extend_from_slice(&self.eth.ether_type.to_be_bytes());
        bytes.extend_from_slice(&self.ip_header_bytes(l4.len()));
        bytes.extend_from_slice(&l4);
        bytes
    }

    /// The answer a frontend gives to this TCP segment when it refuses the
    /// connection, per RFC 793: from the frontend, MACs swapped, a fresh
    /// IPv4 header (TTL 64, DF, id 0), `RST` with seq = the segment's ack
    /// if it had ACK, else `RST|ACK` acknowledging everything it carried.
    pub fn expected_reset(&self) -> Frame {
        let L4::Tcp(tcp) = &self.l4 else {
            panic!("not TCP: {:?}", self.l4)
        };
        let (seq, ack, flags) = if tcp.flags & TCP_ACK != 0 {
            (tcp.ack, 0, TCP_RST)
        } else {
            let consumed = tcp.payload.len() as u32
                + u32::from(tcp.flags & TCP_SYN != 0)
                + u32::from(tcp.flags & TCP_FIN != 0);
            (0, tcp.seq.wrapping_add(consumed), TCP_RST | TCP_ACK)
        };
        Frame {
            eth: self.swapped_ethernet(),
            ip: self.answer_ip(proto::TCP, true),
            l4: L4::Tcp(Tcp {
                src_port: tcp.dst_port,
                dst_port: tcp.src_port,
                seq,
                ack,
                flags,
                window: 0,
                options: Vec::new(),
                payload: Vec::new(),
            }),
            l4_keep: None,
        }
    }

    /// ICMP destination unreachable / port unreachable for this datagram,
    /// from its destination, quoting its IP header and 8 bytes of payload
    /// (RFC 792); TTL 64, DF clear, id 0.
    pub fn expected_port_unreachable(&self) -> Frame {
        let sent = self.to_bytes();
        let header_len = 20 + padded(&self.ip.options).len();
        let quote = sent[14..14 + header_len + 8].to_vec();
        Frame {
            eth: self.swapped_ethernet(),
            ip: self.answer_ip(proto::ICMP, false),
            l4: L4::Icmp(Icmp {
                kind: ICMP_DEST_UNREACH,
                code: ICMP_PORT_UNREACH,
                rest: [0; 4],
                payload: quote,
            }),
            l4_keep: None,
        }
    }

    fn swapped_ethernet(&self) -> Ethernet {
        Ethernet {
            dst: self.eth.src,
            src: self.eth.dst,
            ether_type: ETHERTYPE_IPV4,
        }
    }

    fn answer_ip(&self, protocol: u8, dont_fragment: bool) -> Ipv4 {
        Ipv4 {
            tos: 0,
            id: 0,
            dont_fragment,
            more_fragments: false,
            fragment_offset: 0,
            ttl: 64,
            protocol,
            src: self.ip.dst,
            dst: self.ip.src,
            options: Vec::new(),
        }
    }
}

fn padded(options: &[u8]) -> Vec<u8> {
    let mut options = options.to_vec();
    while !options.len().is_multiple_of(4) {
        options.push(0);
    }
    options
}

/// A one-line decoding of a frame, for failure messages; tolerant of
/// truncated input.
pub fn describe(bytes: &[u8]) -> String {
    let mut out = String::new();
    if bytes.len() < 14 {
        return format!("{} bytes, shorter than Ethernet", bytes.len());
    }
    let ether_type = u16::from_be_bytes([bytes[12], bytes[13]]);
    let _ = write!(
        out,
        "{} > {} type {ether_type:#06x}",
        mac(&bytes[6..12]),
        mac(&bytes[0..6])
    );
    if ether_type != ETHERTYPE_IPV4 || bytes.len() < 34 {
        return out;
    }
    let ip = &bytes[14..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let _ = write!(
        out,
        " | IPv4 ihl {header_len} len {} id {:#06x} frag {:#06x} ttl {} proto {} csum {:#06x} {src} > {dst}",
        u16::from_be_bytes([ip[2], ip[3]]),
        u16::from_be_bytes([ip[4], ip[5]]),
        u16::from_be_bytes([ip[6], ip[7]]),
        ip[8],
        ip[9],
        u16::from_be_bytes([ip[10], ip[11]]),
    );
    let Some(l4) = ip.get(header_len..) else {
        return out;
    };
    match ip[9] {
        proto::TCP if l4.len() >= 20 => {
            let _ = write!(
                out,
                " | TCP {} > {} seq {} ack {} flags {:#04x} csum {:#06x} payload {}",
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
                u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
                l4[13],
                u16::from_be_bytes([l4[16], l4[17]]),
                l4.len().saturating_sub(usize::from(l4[12] >> 4) * 4),
            );
        }
        proto::UDP if l4.len() >= 8 => {
            let _ = write!(
                out,
                " | UDP {} > {} len {} csum {:#06x}",
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
                u16::from_be_bytes([l4[4], l4[5]]),
                u16::from_be_bytes([l4[6], l4[7]]),
            );
        }
        proto::ICMP if l4.len() >= 8 => {
            let _ = write!(
                out,
                " | ICMP type {} code {} csum {:#06x} payload {}",
                l4[0],
                l4[1],
                u16::from_be_bytes([l4[2], l4[3]]),
                l4.len() - 8
            );
        }
        _ => {
            let _ = write!(out, " | {} L4 bytes", l4.len());
        }
    }
    out
}

fn mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Hex dump, 16 bytes a line, for failure messages.
pub fn hexdump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(line, chunk)| {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}  {}", line * 16, hex.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::checksum::ones_complement_sum;

    fn addr(text: &str) -> SocketAddrV4 {
        text.parse().unwrap()
    }

    /// A serialized frame verifies: IP header and L4 sum to 0xffff.
    #[test]
    fn serialized_checksums_verify() {
        let frame = Frame::tcp(addr("198.18.0.1:40000"), addr("198.19.0.10:80"), TCP_SYN)
            .with_ip_options(&[0x01, 0x01, 0x01, 0x01])
            .with_payload(b"hello");
        let bytes = frame.to_bytes();
        let header_len = usize::from(bytes[14] & 0x0f) * 4;
        assert_eq!(header_len, 24);
        assert_eq!(ones_complement_sum(&bytes[14..14 + header_len]), 0xffff);
        let l4 = &bytes[14 + header_len..];
        let pseudo = pseudo_header(frame.ip.src, frame.ip.dst, proto::TCP, l4.len() as u16);
        assert_eq!(ones_complement_sum(&[&pseudo[..], l4].concat()), 0xffff);
    }

    #[test]
    fn udp_without_checksum_has_zero_field() {
        let bytes = Frame::udp(addr("198.18.0.1:5000"), addr("198.19.0.10:53"), b"q")
            .without_udp_checksum()
            .to_bytes();
        assert_eq!(&bytes[40..42], &[0, 0]);
    }

    #[test]
    fn first_fragment_keeps_whole_datagram_checksum() {
        let whole = Frame::udp(addr("198.18.0.1:5000"), addr("198.19.0.10:53"), &[7u8; 40]);
        let fragment = whole.clone().first_fragment(16).to_bytes();
        let whole = whole.to_bytes();
        assert_eq!(fragment.len(), 14 + 20 + 16);
        // Same UDP header (length and checksum of the whole datagram).
        assert_eq!(&fragment[34..42], &whole[34..42]);
        // MF set, offset 0.
        assert_eq!(u16::from_be_bytes([fragment[20], fragment[21]]), 0x2000);
    }
}

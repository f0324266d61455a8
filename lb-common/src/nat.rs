//! Source translation (SNAT) of flows and the client ranges of
//! `loadBalancerSourceRanges`.
//!
//! A flow is source-translated when the backend could not otherwise send
//! its reply back through this node: an external client reaching a backend
//! on another node (`externalTrafficPolicy: Cluster`), or a pod reaching
//! its own Service and landing on itself (hairpin). Its conntrack entry
//! keeps the translated port ([`crate::conntrack::Flow::nat_port`]); this
//! map takes the backend's reply, addressed to that port, back to the flow.

use bytemuck::{Pod, Zeroable};

use crate::{aya_pod, conntrack::FlowKey};

/// Key of [`crate::names::MAP_SNAT`]: a reply as it arrives, from the
/// backend to the translated source. The translated address is implied
/// (the node's SNAT address, or the hairpin address for hairpin flows), so
/// one port is in use once per backend address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SnatKey {
    /// Backend address and port, network byte order.
    pub backend_addr: u32,
    pub backend_port: u16,
    /// Translated source port, network byte order.
    pub nat_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl SnatKey {
    pub const fn new(backend_addr: u32, backend_port: u16, nat_port: u16, proto: u8) -> Self {
        Self {
            backend_addr,
            backend_port,
            nat_port,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Value of [`crate::names::MAP_SNAT`]: the conntrack key of the flow the
/// translated port belongs to. An entry whose flow is gone, or whose flow
/// now has another port, is stale and may be reused.
pub type SnatValue = FlowKey;

/// Data of a key of [`crate::names::MAP_SOURCE_RANGES`], an LPM trie: the
/// prefix length of a key is `32 + n` for a client range `addr/n`, so the
/// service id always matches whole and the address by prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRange {
    /// Service id, big-endian, so the trie matches it first and whole.
    pub service_id_be: u32,
    /// Client address (range start), network byte order.
    pub addr: u32,
}

impl SourceRange {
    /// Bits of [`SourceRange::service_id_be`] that every key matches.
    pub const SERVICE_ID_BITS: u32 = 32;

    pub const fn new(service_id: u32, addr: u32) -> Self {
        Self {
            service_id_be: service_id.to_be(),
            addr,
        }
    }
}

aya_pod!(SnatKey, SourceRange);

/// Value of [`crate::names::MAP_SOURCE_RANGES`] for an allowed range.
pub const SOURCE_RANGE_ALLOWED: u8 = 1;

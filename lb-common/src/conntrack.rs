//! Connection tracking: one LRU entry per translated flow.
//!
//! The key is what both directions of a flow have in common: the client's
//! address and port, the protocol, and the service id. A forward packet
//! (client -> frontend) finds the service id through the frontend; a reply
//! (backend -> client) finds it through [`crate::backend::RevNat`]. One entry
//! per flow instead of Cilium's two halves the kernel memory per flow.
//!
//! A client that reaches the same service port through two of its frontends
//! from one source port at once (only possible with unconnected UDP
//! sockets) shares one entry; replies then carry the frontend it used last.

use bytemuck::{Pod, Zeroable};

use crate::aya_pod;

/// Key of [`crate::names::MAP_CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FlowKey {
    /// Client IPv4 address, network byte order.
    pub client_addr: u32,
    /// Client port, network byte order.
    pub client_port: u16,
    pub proto: u8,
    pub _pad: u8,
    /// Service id the flow was translated for.
    pub service_id: u32,
}

/// The backend has sent at least one packet of this flow.
pub const FLOW_F_REPLY_SEEN: u8 = 1 << 0;
/// TCP FIN seen from the client.
pub const FLOW_F_FIN_CLIENT: u8 = 1 << 1;
/// TCP FIN seen from the backend.
pub const FLOW_F_FIN_BACKEND: u8 = 1 << 2;
/// TCP RST seen in either direction.
pub const FLOW_F_RST: u8 = 1 << 3;
/// The flow's source is translated: forward packets leave with source
/// ([`crate::config::DatapathConfig::snat_addr`], [`Flow::nat_port`]) (or
/// the hairpin address with [`FLOW_F_HAIRPIN`]), and
/// [`crate::names::MAP_SNAT`] maps the backend's replies to that address
/// back to this flow.
pub const FLOW_F_SNAT: u8 = 1 << 4;
/// With [`FLOW_F_SNAT`]: the translated source is
/// [`crate::config::DatapathConfig::hairpin_addr`], because the client is
/// its own backend (a pod reaching its own Service and landing on itself).
pub const FLOW_F_HAIRPIN: u8 = 1 << 5;
/// The flow's frontend is external ([`crate::service::SERVICE_F_EXTERNAL`]):
/// its replies are forwarded by FIB lookup instead of the stack.
pub const FLOW_F_EXTERNAL: u8 = 1 << 6;

/// Value of [`crate::names::MAP_CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Flow {
    /// Backend the flow is pinned to: address and port, network byte order.
    pub backend_addr: u32,
    pub backend_port: u16,
    /// Frontend port the client used, network byte order (source port of replies).
    pub frontend_port: u16,
    /// Frontend address the client used (source address of replies).
    pub frontend_addr: u32,
    /// Id in [`crate::names::MAP_BACKENDS`], checked on every forward packet
    /// so a flow whose backend left every EndpointSlice is not forwarded.
    pub backend_id: u32,
    /// Last packet, in seconds of `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC).
    /// Written at most once a second per flow to keep the cache line shared.
    pub last_seen: u32,
    /// `FLOW_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// With [`FLOW_F_SNAT`]: the translated source port, network byte order.
    pub nat_port: u16,
}

aya_pod!(FlowKey, Flow);

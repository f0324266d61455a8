//! Service frontends and their backend slots.
//!
//! A *frontend* is one address, port and protocol that clients connect to
//! (a ClusterIP and service port; later a NodePort on a node address, a
//! load-balancer ingress IP, an external IP). Each frontend points at a
//! *service id*: one backend set of one Service port. All frontends of a
//! Service port that share the same backend view share one service id, and
//! the service id is what conntrack, reverse NAT and counters are keyed by
//! (Cilium calls it the reverse-NAT index).

use bytemuck::{Pod, Zeroable};

use crate::aya_pod;

/// Key of [`crate::names::MAP_SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// [`crate::proto::TCP`] or [`crate::proto::UDP`].
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    pub const fn new(addr: u32, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// The service has at least one slot but new connections must be refused
/// anyway (reserved for policies that reject, e.g. a Local policy with no
/// local endpoint). Not set by the ClusterIP path today.
pub const SERVICE_F_REJECT: u16 = 1 << 0;

/// New connections choose their backend from the service's Maglev table
/// ([`crate::names::MAP_MAGLEV`], table [`ServiceValue::maglev_table`])
/// instead of a random slot.
pub const SERVICE_F_MAGLEV: u16 = 1 << 1;

/// With no ready backend (`backend_count` 0), new connections are dropped
/// silently rather than refused: kube-proxy's DROP for a Service with
/// `internalTrafficPolicy: Local` and no endpoint on this node.
pub const SERVICE_F_DROP: u16 = 1 << 2;

/// Value of [`crate::names::MAP_SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    /// Service id: the backend set this frontend selects from (never 0).
    pub id: u32,
    /// Number of slots `0..backend_count` in [`crate::names::MAP_SLOTS`]
    /// that new connections choose from. 0 means no ready backend: new
    /// connections are refused (TCP RST, ICMP port unreachable), as
    /// kube-proxy's REJECT rule does.
    pub backend_count: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u16,
    /// With [`SERVICE_F_MAGLEV`]: the index of the service's table in
    /// [`crate::names::MAP_MAGLEV`] (entries `maglev_table * M ..
    /// (maglev_table + 1) * M`, M = the configured table size).
    pub maglev_table: u16,
    /// ClientIP session affinity timeout, seconds; 0 = no affinity.
    pub affinity_timeout: u32,
}

/// Key of [`crate::names::MAP_SLOTS`]: slot `slot` of service `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Value of [`crate::names::MAP_SLOTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Slot {
    /// Index into [`crate::names::MAP_BACKENDS`].
    pub backend_id: u32,
}

aya_pod!(ServiceKey, ServiceValue, SlotKey, Slot);

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

/// The frontend is reached from outside the cluster: a NodePort on a node
/// address, a load-balancer ingress IP or an external IP. Only these are
/// translated on the node's external interfaces (`lb_xdp_ext`,
/// `lb_tc_ext`); pods reach them through `lb_tc_pod` like any frontend.
/// A new flow that arrives on an external interface and goes to a backend
/// on another node ([`crate::backend::BACKEND_F_LOCAL`] clear) gets its
/// source translated to the node's address
/// ([`crate::config::DatapathConfig::snat_addr`]), so the reply comes back
/// through this node (`externalTrafficPolicy: Cluster`). Replies of such
/// flows are forwarded by a FIB lookup, not handed to the stack: their new
/// source may be a node address, which the stack drops as a martian.
pub const SERVICE_F_EXTERNAL: u16 = 1 << 3;

/// New connections are admitted only from the client ranges of the
/// service id in [`crate::names::MAP_SOURCE_RANGES`]
/// (`loadBalancerSourceRanges`, on the load-balancer ingress frontends);
/// others are dropped. Established flows are not re-checked.
pub const SERVICE_F_SOURCE_RANGES: u16 = 1 << 4;

/// An external frontend of a Service whose traffic policies differ
/// (`externalTrafficPolicy: Local`, `internalTrafficPolicy: Cluster`, or
/// the reverse): its id holds the external view of the backends. A packet
/// from a pod (`lb_tc_pod`) is balanced with the internal view instead, the
/// entry of the ClusterIP frontend ([`ServiceValue::internal_addr`],
/// [`ServiceValue::internal_port`]), as kube-proxy sends pod traffic to the
/// external addresses of a Local Service to every endpoint (Cilium's
/// two-scope services do the same).
pub const SERVICE_F_INTERNAL_VIEW: u16 = 1 << 5;

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
    /// With [`SERVICE_F_INTERNAL_VIEW`]: the ClusterIP frontend whose entry
    /// pods are balanced with (address and port, network byte order; the
    /// protocol is this frontend's).
    pub internal_addr: u32,
    pub internal_port: u16,
    pub _pad: u16,
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

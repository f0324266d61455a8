//! Backends (endpoints: a pod address and target port) and the reverse-NAT
//! index from a backend to the services that use it.

use bytemuck::{Pod, Zeroable};

use crate::aya_pod;

/// The entry holds a live backend. A zeroed entry (flags 0) is a free id.
pub const BACKEND_F_ACTIVE: u8 = 1 << 0;
/// The endpoint is listed but not ready for new connections (not ready,
/// or terminating). Established flows to it keep working; it is in no slot.
pub const BACKEND_F_NOT_READY: u8 = 1 << 1;
/// The endpoint runs on this node (its EndpointSlice `nodeName` is this
/// agent's node). A flow from an external interface to a backend without
/// this flag is source-translated ([`crate::service::SERVICE_F_EXTERNAL`]).
pub const BACKEND_F_LOCAL: u8 = 1 << 2;

/// Value of [`crate::names::MAP_BACKENDS`], an array indexed by backend id.
/// Id 0 is never used, so a zeroed `backend_id` always means "none".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    /// Pod IPv4 address, network byte order.
    pub addr: u32,
    /// Target port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
}

impl Backend {
    pub const fn is_active(&self) -> bool {
        self.flags & BACKEND_F_ACTIVE != 0
    }
}

/// Key of [`crate::names::MAP_REVNAT`]: a backend as seen in the source of a
/// reply packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendAddr {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl BackendAddr {
    pub const fn new(addr: u32, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// How many services one backend address can serve while replies are still
/// reverse-translated. The datapath tries each in turn (in practice one).
pub const MAX_REVNAT_SERVICES: usize = 8;

/// Value of [`crate::names::MAP_REVNAT`]: the ids of the services that have
/// this backend (in any condition), so a reply from it can find its flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RevNat {
    /// Number of valid entries at the front of `service_ids`.
    pub count: u32,
    pub service_ids: [u32; MAX_REVNAT_SERVICES],
}

aya_pod!(Backend, BackendAddr, RevNat);

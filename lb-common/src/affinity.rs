//! ClientIP session affinity: which backend a client of a service was last
//! sent to, in an LRU map ([`crate::names::MAP_AFFINITY`]), and which
//! backends are currently ready for a service
//! ([`crate::names::MAP_MEMBERS`]), so an affinity to a backend that left
//! the service (while it stays listed elsewhere) is not followed.

use bytemuck::{Pod, Zeroable};

use crate::aya_pod;

/// Key of [`crate::names::MAP_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityKey {
    pub service_id: u32,
    /// Client IPv4 address, network byte order.
    pub client_addr: u32,
}

/// Value of [`crate::names::MAP_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Affinity {
    /// Id in [`crate::names::MAP_BACKENDS`].
    pub backend_id: u32,
    /// Last new connection that used this affinity, in seconds of
    /// CLOCK_MONOTONIC (as `Flow::last_seen`).
    pub last_seen: u32,
}

/// Key of [`crate::names::MAP_MEMBERS`]: backend `backend_id` is a ready
/// backend of service `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct MemberKey {
    pub service_id: u32,
    pub backend_id: u32,
}

/// Value of [`crate::names::MAP_MEMBERS`]. Presence is what matters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Member {
    pub _reserved: u32,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECS: u32 = 10_800;
/// Kubernetes' upper bound of `timeoutSeconds`.
pub const MAX_TIMEOUT_SECS: u32 = 86_400;

aya_pod!(AffinityKey, Affinity, MemberKey, Member);

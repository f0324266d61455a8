//! Per-service and per-backend traffic counters: per-CPU arrays the
//! datapath adds to and the agent sums over CPUs.
//!
//! Indexed by `service_id % MAX_SERVICE_STATS` and `backend_id %
//! MAX_BACKEND_STATS` (powers of two, so the datapath masks instead of
//! dividing). The agent allocates service ids so that live services get
//! distinct entries while there are at most [`MAX_SERVICE_STATS`] of them,
//! and zeroes an entry when it hands out a new service or backend id;
//! backend ids are dense (lowest free first), so they alias only beyond
//! [`MAX_BACKEND_STATS`] backends.

use bytemuck::{Pod, Zeroable};

use crate::aya_pod;

/// Entries of [`crate::names::MAP_SERVICE_STATS`]: 104 bytes each per CPU.
pub const MAX_SERVICE_STATS: u32 = 16_384;
/// Entries of [`crate::names::MAP_BACKEND_STATS`]: 40 bytes each per CPU.
pub const MAX_BACKEND_STATS: u32 = 16_384;

const _: () = assert!(MAX_SERVICE_STATS.is_power_of_two() && MAX_BACKEND_STATS.is_power_of_two());

/// Why the datapath dropped or refused a packet of a service: index into
/// [`ServiceStats::drops`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A new connection refused (TCP RST / ICMP unreachable): no ready backend.
    NoBackend = 0,
    /// A TCP packet of a flow whose backend left the service, answered by RST.
    BackendGone = 1,
    /// The chosen slot or table entry named no live backend (update race).
    SlotMiss = 2,
    /// The flow could not be tracked.
    ConntrackFull = 3,
    /// A rewrite helper failed.
    RewriteFailed = 4,
    /// Building the RST / ICMP answer failed.
    RejectFailed = 5,
    /// A new connection from a client outside `loadBalancerSourceRanges`.
    SourceRange = 6,
    /// No translated source port or address for a flow that needs one.
    NoNat = 7,
    /// No route to forward a translated packet.
    NoRoute = 8,
}

pub const DROP_REASON_COUNT: usize = 9;

impl DropReason {
    pub const ALL: [DropReason; DROP_REASON_COUNT] = [
        DropReason::NoBackend,
        DropReason::BackendGone,
        DropReason::SlotMiss,
        DropReason::ConntrackFull,
        DropReason::RewriteFailed,
        DropReason::RejectFailed,
        DropReason::SourceRange,
        DropReason::NoNat,
        DropReason::NoRoute,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoBackend => "no_backend",
            DropReason::BackendGone => "backend_gone",
            DropReason::SlotMiss => "slot_miss",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::RejectFailed => "reject_failed",
            DropReason::SourceRange => "source_range",
            DropReason::NoNat => "no_nat",
            DropReason::NoRoute => "no_route",
        }
    }
}

/// Value of [`crate::names::MAP_SERVICE_STATS`] (one CPU's share).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceStats {
    /// Client packets translated to a backend, and their bytes (skb length).
    pub packets: u64,
    pub bytes: u64,
    /// Backend packets reverse-translated to the client, and their bytes.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows created (connections balanced).
    pub new_flows: u64,
    /// Packets dropped or refused, by [`DropReason`].
    pub drops: [u64; DROP_REASON_COUNT],
}

impl ServiceStats {
    /// Adds another CPU's share.
    pub fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
        self.new_flows += other.new_flows;
        for (sum, value) in self.drops.iter_mut().zip(other.drops) {
            *sum += value;
        }
    }
}

/// Value of [`crate::names::MAP_BACKEND_STATS`] (one CPU's share).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendStats {
    /// Client packets translated to this backend, and their bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Its packets reverse-translated, and their bytes.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows balanced to it.
    pub new_flows: u64,
}

impl BackendStats {
    /// Adds another CPU's share.
    pub fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
        self.new_flows += other.new_flows;
    }
}

aya_pod!(ServiceStats, BackendStats);

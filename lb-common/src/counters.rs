//! Datapath counters: a per-CPU array indexed by [`Counter`]. Every error
//! and every verdict that is not "translated" is counted here, never
//! silently swallowed.

/// Index into [`crate::names::MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets that were no service's business and passed untouched.
    Pass = 0,
    /// Forward packets of an established flow translated to their backend.
    Established = 1,
    /// First packets of new flows, translated to a newly chosen backend.
    NewFlow = 2,
    /// Replies reverse-translated to the frontend.
    Reply = 3,
    /// New connections refused because the service has no ready backend.
    NoBackend = 4,
    /// Packets too short or malformed to parse; passed to the stack.
    Malformed = 5,
    /// IPv4 fragments without an L4 header (not the first); passed.
    Fragment = 6,
    /// A slot or backend vanished between lookups (agent update race);
    /// the packet was dropped.
    SlotMiss = 7,
    /// Conntrack insertion failed; the packet was dropped.
    ConntrackFull = 8,
    /// Forward packets of a flow whose backend left the service: TCP gets
    /// a reset, UDP is re-balanced.
    BackendGone = 9,
    /// Building or sending a reject (RST / ICMP) failed; the packet was dropped.
    RejectFailed = 10,
    /// Packet rewrite (store or checksum helper) failed; the packet was dropped.
    RewriteFailed = 11,
    /// New flows from an external client refused by the service's
    /// `loadBalancerSourceRanges`; dropped.
    SourceRangeDenied = 12,
    /// A flow needed a translated source port and none of the ports tried
    /// was free; dropped.
    NoNatPort = 13,
    /// A flow needed source translation but no node address is configured
    /// (`DatapathConfig::snat_addr` 0); dropped.
    NoNatAddr = 14,
    /// XDP handed a packet to the TC program of the same interface
    /// untouched: it must leave through another interface, or the next
    /// hop's MAC address is not known yet (TC resolves it).
    XdpToTc = 15,
    /// Packets forwarded by FIB lookup (XDP_TX, or TC redirect).
    Forwarded = 16,
    /// The FIB lookup found no route (or a blackhole/unreachable one) for
    /// a packet that must be forwarded; dropped.
    NoRoute = 17,
}

/// Number of counters (size of the counter array).
pub const COUNTER_COUNT: u32 = 18;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Pass,
        Counter::Established,
        Counter::NewFlow,
        Counter::Reply,
        Counter::NoBackend,
        Counter::Malformed,
        Counter::Fragment,
        Counter::SlotMiss,
        Counter::ConntrackFull,
        Counter::BackendGone,
        Counter::RejectFailed,
        Counter::RewriteFailed,
        Counter::SourceRangeDenied,
        Counter::NoNatPort,
        Counter::NoNatAddr,
        Counter::XdpToTc,
        Counter::Forwarded,
        Counter::NoRoute,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Pass => "pass",
            Counter::Established => "established",
            Counter::NewFlow => "new_flow",
            Counter::Reply => "reply",
            Counter::NoBackend => "no_backend",
            Counter::Malformed => "malformed",
            Counter::Fragment => "fragment",
            Counter::SlotMiss => "slot_miss",
            Counter::ConntrackFull => "conntrack_full",
            Counter::BackendGone => "backend_gone",
            Counter::RejectFailed => "reject_failed",
            Counter::RewriteFailed => "rewrite_failed",
            Counter::SourceRangeDenied => "source_range_denied",
            Counter::NoNatPort => "no_nat_port",
            Counter::NoNatAddr => "no_nat_addr",
            Counter::XdpToTc => "xdp_to_tc",
            Counter::Forwarded => "forwarded",
            Counter::NoRoute => "no_route",
        }
    }
}

//! Runtime configuration the agent writes into [`crate::names::MAP_CONFIG`]
//! (an array with one entry) and the datapath reads on every packet.

use bytemuck::{Pod, Zeroable};

use crate::aya_pod;

/// Emit aya-log lines from the datapath. Off by default: one line costs
/// about 100 ns a packet.
pub const CONFIG_F_LOG: u32 = 1 << 0;
/// `lb_xdp_ext` never transmits a forwarded packet (`XDP_TX`): every packet
/// it would forward by FIB lookup is passed untouched (after its flow is
/// created, as for any packet XDP hands on) to `lb_tc_ext`, which forwards
/// it with `bpf_redirect_neigh`. For uplinks where `XDP_TX` frames are not
/// delivered promptly: on a veth, the kernel only wakes the peer to take
/// them if the peer has an XDP program of its own, which a node cannot
/// arrange for the other end of its uplink (kind nodes, containers). The
/// answers XDP would bounce to a client (RST, ICMP port unreachable) are
/// left to `lb_tc_ext` as well. Read only when a packet is about to be
/// forwarded or refused.
pub const CONFIG_F_XDP_NO_TX: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// Idle timeout of an established TCP flow, seconds.
    pub tcp_timeout: u32,
    /// Timeout of a TCP flow after FIN in both directions or RST, seconds.
    pub tcp_closing_timeout: u32,
    /// Idle timeout of a UDP flow, seconds.
    pub udp_timeout: u32,
    /// Entries per Maglev table in [`crate::names::MAP_MAGLEV`] (a prime);
    /// 0 means [`defaults::MAGLEV_TABLE_SIZE`]. The agent computes the
    /// tables with the same size it writes here.
    pub maglev_table_size: u32,
    /// This node's address that external flows to backends on other nodes
    /// are source-translated to (network byte order; the Node's first
    /// InternalIP, or the first address of the first external interface).
    /// 0: no address known; such flows are dropped (`Counter::NoNatAddr`).
    pub snat_addr: u32,
    /// Source address of hairpin flows (a pod landing on itself through its
    /// own Service), network byte order. Must be routed from pods to the
    /// node and belong to no pod; Cilium uses the same 169.254.42.1.
    pub hairpin_addr: u32,
    /// Source ports for translated flows, host byte order, inclusive.
    /// Above Linux's default ephemeral range (32768-60999), so they never
    /// collide with the node's own connections.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
}

impl DatapathConfig {
    /// Defaults as a kube-proxy node has them: 24 h for an established TCP
    /// flow (kube-proxy's `conntrack.tcpEstablishedTimeout`), 10 s once it
    /// closed (nf_conntrack's `tcp_timeout_time_wait` is 120 s; a flow the
    /// datapath saw close both ways needs no TIME_WAIT of its own), 30 s
    /// for UDP (nf_conntrack's `udp_timeout`).
    pub const DEFAULT: Self = Self {
        flags: 0,
        tcp_timeout: 86_400,
        tcp_closing_timeout: 10,
        udp_timeout: 30,
        maglev_table_size: defaults::MAGLEV_TABLE_SIZE,
        snat_addr: 0,
        // The octets in memory as on the wire: network byte order.
        hairpin_addr: u32::from_ne_bytes(defaults::HAIRPIN_ADDR),
        nat_port_min: defaults::NAT_PORT_MIN,
        nat_port_max: defaults::NAT_PORT_MAX,
    };
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

aya_pod!(DatapathConfig);

/// Default map capacities; each can be changed at load time
/// (`lb-agent run --max-*`).
pub mod defaults {
    /// Frontends (ClusterIP/NodePort/... address, port, protocol).
    pub const MAX_SERVICES: u32 = 65_536;
    /// Backend slots summed over all services.
    pub const MAX_SLOTS: u32 = 524_288;
    /// Distinct backends (address, port, protocol).
    pub const MAX_BACKENDS: u32 = 262_144;
    /// Tracked flows.
    pub const MAX_FLOWS: u32 = 524_288;
    /// Session affinities (service, client address), LRU.
    pub const MAX_AFFINITIES: u32 = 65_536;
    /// Services that can use Maglev at once (tables in `LB_MAGLEV`).
    pub const MAX_MAGLEV_TABLES: u32 = 64;
    /// Entries of one Maglev table: a prime, more than 100 times the
    /// backends of any one service (Cilium's and the Maglev paper's choice).
    pub const MAGLEV_TABLE_SIZE: u32 = 16_381;
    /// Source-translated flows ([`crate::names::MAP_SNAT`]), LRU.
    pub const MAX_SNAT_FLOWS: u32 = 262_144;
    /// Client ranges of `loadBalancerSourceRanges` over all services.
    pub const MAX_SOURCE_RANGES: u32 = 16_384;
    /// Hairpin source address (octets).
    pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];
    /// Source ports of translated flows, inclusive.
    pub const NAT_PORT_MIN: u16 = 61_000;
    pub const NAT_PORT_MAX: u16 = 65_535;
}

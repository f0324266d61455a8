//! Names of programs and maps, shared so the loader, the inspector and the
//! pins under the pin directory all agree. BPF object names are at most 15
//! bytes.

/// TC program for pod-facing interfaces (tcx ingress on the host side of a
/// pod's veth): translates service traffic from pods and replies to it.
pub const PROG_TC_POD: &str = "lb_tc_pod";
/// XDP program for the node's external interfaces (`--external`):
/// translates NodePort, load-balancer and external-IP frontends, their
/// source-translated replies, and replies to pods' flows whose backend is
/// on another node; forwards by FIB lookup (XDP_TX) where it can.
pub const PROG_XDP_EXTERNAL: &str = "lb_xdp_ext";
/// TC program at tcx ingress of the same external interfaces: does what
/// XDP handed on (another egress interface, an unresolved next hop) with
/// `bpf_redirect_neigh`, and everything when XDP could not be attached.
pub const PROG_TC_EXTERNAL: &str = "lb_tc_ext";

/// Frontends: (address, port, protocol) -> service.
pub const MAP_SERVICES: &str = "LB_SERVICES";
/// Per-service backend slots for random selection: (service id, slot) -> backend id.
pub const MAP_SLOTS: &str = "LB_SLOTS";
/// Backends by id: backend id -> (address, port, protocol, state).
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
/// Reverse NAT candidates: backend (address, port, protocol) -> service ids using it.
pub const MAP_REVNAT: &str = "LB_REVNAT";
/// Connection tracking: one entry per flow, LRU.
pub const MAP_CONNTRACK: &str = "LB_CONNTRACK";
/// Per-CPU datapath counters indexed by [`crate::counters::Counter`].
pub const MAP_COUNTERS: &str = "LB_COUNTERS";
/// ClientIP session affinity: (service id, client address) -> backend, LRU.
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
/// Ready backends of each service: (service id, backend id) -> present.
pub const MAP_MEMBERS: &str = "LB_MEMBERS";
/// Maglev lookup tables, one per Maglev service, concatenated: an array of
/// backend ids, `M` entries per table.
pub const MAP_MAGLEV: &str = "LB_MAGLEV";
/// Per-CPU counters per service: `service id % MAX_SERVICE_STATS` ->
/// [`crate::stats::ServiceStats`].
pub const MAP_SERVICE_STATS: &str = "LB_SVC_STATS";
/// Per-CPU counters per backend: `backend id % MAX_BACKEND_STATS` ->
/// [`crate::stats::BackendStats`].
pub const MAP_BACKEND_STATS: &str = "LB_BE_STATS";
/// Source-translated flows: (backend address, port, translated port,
/// protocol) -> conntrack key of the flow, LRU.
pub const MAP_SNAT: &str = "LB_SNAT";
/// `loadBalancerSourceRanges`: LPM trie of (service id, client range) -> allowed.
pub const MAP_SOURCE_RANGES: &str = "LB_SRC_RANGES";
/// Port filter: port (host order) -> `PORT_F_*` bits, an array of 65,536
/// bytes ([`crate::ports`]).
pub const MAP_PORTS: &str = "LB_PORTS";
/// Single-entry runtime configuration ([`crate::config::DatapathConfig`]).
pub const MAP_CONFIG: &str = "LB_CONFIG";

/// Every map, in the order `inspect` and the docs list them.
pub const ALL_MAPS: [&str; 15] = [
    MAP_SERVICES,
    MAP_SLOTS,
    MAP_BACKENDS,
    MAP_REVNAT,
    MAP_CONNTRACK,
    MAP_COUNTERS,
    MAP_CONFIG,
    MAP_AFFINITY,
    MAP_MEMBERS,
    MAP_MAGLEV,
    MAP_SERVICE_STATS,
    MAP_BACKEND_STATS,
    MAP_SNAT,
    MAP_SOURCE_RANGES,
    MAP_PORTS,
];

/// Default directory under bpffs where one agent instance pins its maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

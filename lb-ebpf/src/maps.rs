//! Every map of the datapath, in one place.
//!
//! Names are the contract with the agent (`lb_common::names`): each static
//! is named exactly like its `MAP_*` constant, and the agent pins each map
//! under that name after load. Key and value types come from `lb_common`;
//! the sizes here are the defaults, which the agent overrides at load time
//! with `EbpfLoader::set_max_entries`.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    affinity::{Affinity, AffinityKey, Member, MemberKey},
    backend::{Backend, BackendAddr, RevNat},
    config::{
        DatapathConfig,
        defaults::{
            MAGLEV_TABLE_SIZE, MAX_AFFINITIES, MAX_BACKENDS, MAX_FLOWS, MAX_MAGLEV_TABLES,
            MAX_SERVICES, MAX_SLOTS, MAX_SNAT_FLOWS, MAX_SOURCE_RANGES,
        },
    },
    conntrack::{Flow, FlowKey},
    counters::COUNTER_COUNT,
    nat::{SnatKey, SnatValue, SourceRange},
    ports::PORT_FILTER_SIZE,
    service::{ServiceKey, ServiceValue, Slot, SlotKey},
    stats::{BackendStats, MAX_BACKEND_STATS, MAX_SERVICE_STATS, ServiceStats},
};

/// Frontends: (address, port, protocol) -> service id, number of slots
/// for new connections, flags.
#[btf_map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> =
    HashMap::new();

/// Backend slots of each service: (service id, slot) -> backend id. Slots
/// `0..backend_count` hold the ready backends new connections choose from.
#[btf_map]
pub static LB_SLOTS: HashMap<SlotKey, Slot, { MAX_SLOTS as usize }> = HashMap::new();

/// Backends by id (id 0 unused): address, port, protocol, state flags.
/// A zeroed entry is a free id.
#[btf_map]
pub static LB_BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// Reverse NAT candidates: backend (address, port, protocol) -> ids of the
/// services that list it in any condition.
#[btf_map]
pub static LB_REVNAT: HashMap<BackendAddr, RevNat, { MAX_BACKENDS as usize }> = HashMap::new();

/// Connection tracking: (client address, client port, protocol, service
/// id) -> the flow's backend and frontend, last-seen time, TCP state. LRU,
/// so a full table evicts the idlest flow instead of refusing new ones.
///
/// One LRU list for all CPUs, deliberately. `BPF_F_NO_COMMON_LRU` (per-CPU
/// lists, as Katran's per-CPU LRU maps) measured about 40 ns cheaper per
/// new flow at XDP, but it splits the entries evenly among the possible
/// CPUs and a CPU that runs out evicts its own flows while others have
/// room: where one CPU creates most flows (a single-queue NIC, one busy
/// pod) the table would hold `max_entries / possible CPUs` flows, and an
/// evicted flow is a broken connection. `--max-flows` means what it says.
#[btf_map]
pub static LB_CONNTRACK: LruHashMap<FlowKey, Flow, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Per-CPU packet counters indexed by `lb_common::counters::Counter`.
#[btf_map]
pub static LB_COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

/// ClientIP session affinity: (service id, client address) -> backend and
/// the time of the last new connection that followed it. LRU, so a full
/// table forgets the idlest clients instead of refusing new ones.
#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, Affinity, { MAX_AFFINITIES as usize }> =
    LruHashMap::new();

/// Ready backends of each service: (service id, backend id) -> present.
/// One entry per slot, so it has the capacity of `LB_SLOTS`. Read only
/// when an affinity is followed.
#[btf_map]
pub static LB_MEMBERS: HashMap<MemberKey, Member, { MAX_SLOTS as usize }> = HashMap::new();

/// Maglev lookup tables, `M` backend ids per table, one table per
/// service using Maglev (`ServiceValue::maglev_table`).
#[btf_map]
pub static LB_MAGLEV: Array<u32, { (MAX_MAGLEV_TABLES * MAGLEV_TABLE_SIZE) as usize }> =
    Array::new();

/// Per-CPU traffic counters per service (`service id % MAX_SERVICE_STATS`).
#[btf_map]
pub static LB_SVC_STATS: PerCpuArray<ServiceStats, { MAX_SERVICE_STATS as usize }> =
    PerCpuArray::new();

/// Per-CPU traffic counters per backend (`backend id % MAX_BACKEND_STATS`).
#[btf_map]
pub static LB_BE_STATS: PerCpuArray<BackendStats, { MAX_BACKEND_STATS as usize }> =
    PerCpuArray::new();

/// Source-translated flows: (backend address, port, translated source
/// port, protocol) -> the conntrack key of the flow that owns the port, so
/// a backend's reply to the SNAT or hairpin address finds its flow. One
/// entry per flow with `FLOW_F_SNAT`, written by the datapath when the
/// flow is created and deleted when its TCP connection closes. LRU, so
/// entries of flows that expired are reclaimed under pressure; an entry
/// whose flow is gone is stale and reused by the next allocation of its
/// port (`snat`).
#[btf_map]
pub static LB_SNAT: LruHashMap<SnatKey, SnatValue, { MAX_SNAT_FLOWS as usize }> = LruHashMap::new();

/// `loadBalancerSourceRanges`: (service id, client range) -> allowed, an
/// LPM trie keyed by `32 + n` bits for a range `addr/n`, so the service id
/// matches whole. Written by the agent; read for new flows of services
/// with `SERVICE_F_SOURCE_RANGES`.
#[btf_map]
pub static LB_SRC_RANGES: LpmTrie<SourceRange, u8, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

/// Port filter: port (host byte order) -> `lb_common::ports::PORT_F_*`
/// bits, written by the agent before the frontends and backends that need
/// them. A port without the bit skips the `LB_SERVICES` (destination) or
/// `LB_REVNAT` (source) lookup.
#[btf_map]
pub static LB_PORTS: Array<u8, { PORT_FILTER_SIZE as usize }> = Array::new();

/// Runtime configuration (one entry): log switch, flow timeouts, SNAT
/// and hairpin addresses, translated port range.
#[btf_map]
pub static LB_CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Per-CPU cache of the coarse clock, keyed by the jiffies it was read at
/// (see `conntrack::Now::read`). Internal scratch: not part of the agent
/// contract, never pinned or written from userspace.
#[btf_map]
pub static LB_CLOCK: PerCpuArray<ClockCache, 1> = PerCpuArray::new();

/// Value of [`LB_CLOCK`].
#[repr(C)]
pub struct ClockCache {
    /// `bpf_jiffies64` when `ns` was read.
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns` at that time.
    pub ns: u64,
}

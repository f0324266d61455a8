//! Reading the pinned maps of a running agent (`lb-agent inspect`, and the
//! testbed's assertions). Read-only: nothing here writes a map.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use lb_common::affinity::{Affinity, AffinityKey};
use lb_common::backend::{BACKEND_F_LOCAL, BACKEND_F_NOT_READY, Backend, BackendAddr, RevNat};
use lb_common::conntrack::{
    FLOW_F_EXTERNAL, FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT, FLOW_F_HAIRPIN, FLOW_F_REPLY_SEEN,
    FLOW_F_RST, FLOW_F_SNAT, Flow, FlowKey,
};
use lb_common::counters::Counter;
use lb_common::names::{
    MAP_AFFINITY, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONNTRACK, MAP_COUNTERS, MAP_REVNAT,
    MAP_SERVICE_STATS, MAP_SERVICES, MAP_SLOTS, MAP_SNAT, MAP_SOURCE_RANGES,
};
use lb_common::nat::{SnatKey, SnatValue, SourceRange};
use lb_common::service::{
    SERVICE_F_DROP, SERVICE_F_EXTERNAL, SERVICE_F_MAGLEV, SERVICE_F_REJECT,
    SERVICE_F_SOURCE_RANGES, ServiceKey, ServiceValue, Slot, SlotKey,
};
use lb_common::stats::{BackendStats, DropReason, ServiceStats};

use crate::datapath::maps::{
    AyaMaps, OpenMapError, open_pinned, read_backend_stats, read_service_stats, read_source_ranges,
    typed,
};
use crate::datapath::writer::{MapReadError, SourceRangeKey, Writer};
use crate::model::ServicePortName;

/// One frontend and the backends of its service id.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceEntry {
    pub frontend: SocketAddrV4,
    /// "tcp" or "udp".
    pub proto: String,
    pub service_id: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u16,
    /// The bits of `flags` by name: `external` (a NodePort, load-balancer
    /// or external IP frontend), `source_ranges`, `maglev`, `drop`,
    /// `reject`.
    pub flag_names: Vec<String>,
    /// With `source_ranges`: the client ranges admitted (`LB_SRC_RANGES`
    /// entries of its service id; none admits nobody).
    pub source_ranges: Vec<String>,
    /// "random" or "maglev".
    pub selection: String,
    /// ClientIP affinity timeout, seconds (0: none).
    pub affinity_timeout: u32,
    /// Traffic counters of the service id (shared by its frontends).
    pub counters: ServiceCounters,
    /// Every backend listed for this service id (found via `LB_REVNAT`):
    /// the ready ones first, in slot order, then the others by address.
    pub backends: Vec<BackendEntry>,
}

/// Traffic counters of one service id, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceCounters {
    /// Client packets translated to a backend, and their bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Backend packets reverse-translated, and their bytes.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
    /// Drops and refusals by reason (`DropReason::name`), every reason listed.
    pub drops: BTreeMap<String, u64>,
}

impl From<&ServiceStats> for ServiceCounters {
    fn from(stats: &ServiceStats) -> Self {
        Self {
            packets: stats.packets,
            bytes: stats.bytes,
            reply_packets: stats.reply_packets,
            reply_bytes: stats.reply_bytes,
            new_flows: stats.new_flows,
            drops: DropReason::ALL
                .iter()
                .map(|reason| (reason.name().to_owned(), stats.drops[*reason as usize]))
                .collect(),
        }
    }
}

/// Traffic counters of one backend (over every service using it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackendCounters {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
}

impl From<&BackendStats> for BackendCounters {
    fn from(stats: &BackendStats) -> Self {
        Self {
            packets: stats.packets,
            bytes: stats.bytes,
            reply_packets: stats.reply_packets,
            reply_bytes: stats.reply_bytes,
            new_flows: stats.new_flows,
        }
    }
}

/// One service port's counters with its identity, for `/metrics`
/// (labels namespace, name, port name, protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortCounters {
    pub name: ServicePortName,
    pub service_id: u32,
    pub counters: ServiceCounters,
}

/// The counters of every service port a running agent's writer programmed
/// (the writer knows which Service each id belongs to).
pub fn service_port_counters(
    writer: &Writer<AyaMaps>,
) -> Result<Vec<ServicePortCounters>, MapReadError> {
    writer
        .service_ports()
        .map(|(name, service_id)| {
            Ok(ServicePortCounters {
                name: name.clone(),
                service_id,
                counters: ServiceCounters::from(&writer.maps().service_stats(service_id)?),
            })
        })
        .collect()
}

/// One session affinity.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AffinityEntry {
    pub service_id: u32,
    pub client: Ipv4Addr,
    pub backend_id: u32,
    /// The backend's address, if its id is still live.
    pub backend: Option<SocketAddrV4>,
    /// Seconds since the last new connection that followed it.
    pub idle_secs: u32,
}

/// One backend of a service.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendEntry {
    pub id: u32,
    pub addr: SocketAddrV4,
    /// In one of the service's slots: new connections may choose it.
    pub ready: bool,
    /// `BACKEND_F_*` bits of its `LB_BACKENDS` entry.
    pub backend_flags: u8,
    /// On this node (`BACKEND_F_LOCAL`).
    pub local: bool,
    /// Traffic counters of the backend (id 0: unknown, zero).
    pub counters: BackendCounters,
}

/// One tracked flow.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlowEntry {
    /// "tcp" or "udp".
    pub proto: String,
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub backend: SocketAddrV4,
    pub service_id: u32,
    pub backend_id: u32,
    /// Seconds since the flow's last packet (as the datapath records it:
    /// at most once a second).
    pub idle_secs: u32,
    /// `reply_seen`, `fin_client`, `fin_backend`, `rst`, `snat`,
    /// `hairpin`, `external`.
    pub flags: Vec<String>,
    /// With `snat`: the translated source port.
    pub nat_port: Option<u16>,
}

/// One source-translated flow's `LB_SNAT` entry: replies from `backend`
/// to the translated port belong to the flow of `client`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnatEntry {
    /// "tcp" or "udp".
    pub proto: String,
    pub backend: SocketAddrV4,
    pub nat_port: u16,
    pub client: SocketAddrV4,
    pub service_id: u32,
}

/// One `LB_SRC_RANGES` entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceRangeEntry {
    pub service_id: u32,
    /// `a.b.c.d/n`.
    pub range: String,
}

/// Reading the pinned maps failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Open(#[from] OpenMapError),
    #[error("reading {map}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{MAP_COUNTERS} has {actual} entries, expected at least {expected}")]
    CounterCount { actual: u32, expected: u32 },
    #[error("reading CLOCK_MONOTONIC")]
    Clock(#[source] io::Error),
    #[error(transparent)]
    Counters(#[from] MapReadError),
}

fn read_error(map: &'static str) -> impl FnOnce(MapError) -> InspectError {
    move |source| InspectError::Read { map, source }
}

fn socket(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr_be)), u16::from_be(port_be))
}

fn proto_name(proto: u8) -> String {
    lb_common::proto::name(proto).to_owned()
}

/// Reads every entry of a hash map, skipping keys deleted during the walk.
fn read_hash<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, InspectError> {
    let mut entries = BTreeMap::new();
    for entry in map.iter() {
        match entry {
            Ok((key, value)) => {
                entries.insert(key, value);
            }
            Err(MapError::KeyNotFound) => continue,
            Err(source) => return Err(read_error(name)(source)),
        }
    }
    Ok(entries)
}

/// The names of `SERVICE_F_*` bits.
pub fn service_flag_names(flags: u16) -> Vec<String> {
    [
        (SERVICE_F_EXTERNAL, "external"),
        (SERVICE_F_SOURCE_RANGES, "source_ranges"),
        (SERVICE_F_MAGLEV, "maglev"),
        (SERVICE_F_DROP, "drop"),
        (SERVICE_F_REJECT, "reject"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name.to_owned())
    .collect()
}

/// Every frontend with its backends, ordered by frontend.
pub fn services(pin_dir: &Path) -> Result<Vec<ServiceEntry>, InspectError> {
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        typed(open_pinned(pin_dir, MAP_SERVICES)?, MAP_SERVICES)?;
    let slots: HashMap<MapData, SlotKey, Slot> =
        typed(open_pinned(pin_dir, MAP_SLOTS)?, MAP_SLOTS)?;
    let backends: Array<MapData, Backend> =
        typed(open_pinned(pin_dir, MAP_BACKENDS)?, MAP_BACKENDS)?;
    let revnat: HashMap<MapData, BackendAddr, RevNat> =
        typed(open_pinned(pin_dir, MAP_REVNAT)?, MAP_REVNAT)?;
    let service_stats: PerCpuArray<MapData, ServiceStats> =
        typed(open_pinned(pin_dir, MAP_SERVICE_STATS)?, MAP_SERVICE_STATS)?;
    let backend_stats: PerCpuArray<MapData, BackendStats> =
        typed(open_pinned(pin_dir, MAP_BACKEND_STATS)?, MAP_BACKEND_STATS)?;
    let backend_counters = |id: u32| -> Result<BackendCounters, InspectError> {
        if id == 0 {
            return Ok(BackendCounters::default());
        }
        Ok(BackendCounters::from(&read_backend_stats(
            &backend_stats,
            id,
        )?))
    };

    let source_ranges: LpmTrie<MapData, SourceRange, u8> =
        typed(open_pinned(pin_dir, MAP_SOURCE_RANGES)?, MAP_SOURCE_RANGES)?;

    let services = read_hash(&services, MAP_SERVICES)?;
    let slots = read_hash(&slots, MAP_SLOTS)?;
    let revnat = read_hash(&revnat, MAP_REVNAT)?;
    let source_ranges = read_source_ranges(&source_ranges)?;
    let ranges_of = |service_id: u32| -> Vec<String> {
        source_ranges
            .iter()
            .filter(|key| key.service_id == service_id)
            .map(|key| key.range.to_string())
            .collect()
    };

    // Backend ids of the addresses `LB_REVNAT` lists. Ids are dense (the
    // agent reuses the lowest free one), so the walk stops early.
    let mut unresolved: BTreeSet<BackendAddr> = revnat.keys().copied().collect();
    let mut by_id: BTreeMap<u32, Backend> = BTreeMap::new();
    let mut id_of: BTreeMap<BackendAddr, u32> = BTreeMap::new();
    for id in 1..backends.len() {
        if unresolved.is_empty() {
            break;
        }
        let backend = backends.get(&id, 0).map_err(read_error(MAP_BACKENDS))?;
        if !backend.is_active() {
            continue;
        }
        let key = BackendAddr::new(backend.addr, backend.port, backend.proto);
        if unresolved.remove(&key) {
            id_of.insert(key, id);
        }
        by_id.insert(id, backend);
    }
    let mut backend = |id: u32| -> Result<Backend, InspectError> {
        if let Some(backend) = by_id.get(&id) {
            return Ok(*backend);
        }
        let backend = backends.get(&id, 0).map_err(read_error(MAP_BACKENDS))?;
        by_id.insert(id, backend);
        Ok(backend)
    };

    // Service id -> the backend addresses listing it, for one pass below.
    let mut listed_by: BTreeMap<u32, Vec<&BackendAddr>> = BTreeMap::new();
    for (addr, links) in &revnat {
        let count = (links.count as usize).min(links.service_ids.len());
        for id in &links.service_ids[..count] {
            listed_by.entry(*id).or_default().push(addr);
        }
    }

    let mut entries = Vec::with_capacity(services.len());
    for (key, value) in &services {
        let mut listed = Vec::new();
        let mut in_slots = BTreeSet::new();
        for slot in 0..value.backend_count {
            let Some(entry) = slots.get(&SlotKey {
                service_id: value.id,
                slot,
            }) else {
                continue;
            };
            let b = backend(entry.backend_id)?;
            in_slots.insert(entry.backend_id);
            listed.push(BackendEntry {
                id: entry.backend_id,
                addr: socket(b.addr, b.port),
                ready: true,
                backend_flags: b.flags,
                local: b.flags & BACKEND_F_LOCAL != 0,
                counters: backend_counters(entry.backend_id)?,
            });
        }
        let mut others: Vec<BackendEntry> = Vec::new();
        for addr in listed_by.get(&value.id).into_iter().flatten() {
            let id = id_of.get(*addr).copied().unwrap_or(0);
            if in_slots.contains(&id) {
                continue;
            }
            let flags = if id == 0 {
                BACKEND_F_NOT_READY
            } else {
                backend(id)?.flags
            };
            others.push(BackendEntry {
                id,
                addr: socket(addr.addr, addr.port),
                ready: false,
                backend_flags: flags,
                local: flags & BACKEND_F_LOCAL != 0,
                counters: backend_counters(id)?,
            });
        }
        others.sort_by_key(|entry| entry.addr);
        listed.extend(others);
        entries.push(ServiceEntry {
            frontend: socket(key.addr, key.port),
            proto: proto_name(key.proto),
            service_id: value.id,
            flags: value.flags,
            flag_names: service_flag_names(value.flags),
            source_ranges: if value.flags & SERVICE_F_SOURCE_RANGES != 0 {
                ranges_of(value.id)
            } else {
                Vec::new()
            },
            selection: if value.flags & SERVICE_F_MAGLEV != 0 {
                "maglev"
            } else {
                "random"
            }
            .to_owned(),
            affinity_timeout: value.affinity_timeout,
            counters: ServiceCounters::from(&read_service_stats(&service_stats, value.id)?),
            backends: listed,
        });
    }
    entries.sort_by(|a, b| (a.frontend, &a.proto).cmp(&(b.frontend, &b.proto)));
    Ok(entries)
}

/// Seconds of CLOCK_MONOTONIC, the clock of `bpf_ktime_get_coarse_ns`.
fn monotonic_secs() -> Result<u64, InspectError> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return Err(InspectError::Clock(io::Error::last_os_error()));
    }
    Ok(now.tv_sec as u64)
}

fn flow_flags(flags: u8) -> Vec<String> {
    [
        (FLOW_F_REPLY_SEEN, "reply_seen"),
        (FLOW_F_FIN_CLIENT, "fin_client"),
        (FLOW_F_FIN_BACKEND, "fin_backend"),
        (FLOW_F_RST, "rst"),
        (FLOW_F_SNAT, "snat"),
        (FLOW_F_HAIRPIN, "hairpin"),
        (FLOW_F_EXTERNAL, "external"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name.to_owned())
    .collect()
}

/// Every tracked flow, ordered by protocol, client and frontend.
pub fn conntrack(pin_dir: &Path) -> Result<Vec<FlowEntry>, InspectError> {
    let flows: HashMap<MapData, FlowKey, Flow> =
        typed(open_pinned(pin_dir, MAP_CONNTRACK)?, MAP_CONNTRACK)?;
    let flows = read_hash(&flows, MAP_CONNTRACK)?;
    let now = monotonic_secs()?;
    let mut entries: Vec<FlowEntry> = flows
        .iter()
        .map(|(key, flow)| FlowEntry {
            proto: proto_name(key.proto),
            client: socket(key.client_addr, key.client_port),
            frontend: socket(flow.frontend_addr, flow.frontend_port),
            backend: socket(flow.backend_addr, flow.backend_port),
            service_id: key.service_id,
            backend_id: flow.backend_id,
            idle_secs: u32::try_from(now.saturating_sub(u64::from(flow.last_seen)))
                .unwrap_or(u32::MAX),
            flags: flow_flags(flow.flags),
            nat_port: (flow.flags & FLOW_F_SNAT != 0).then(|| u16::from_be(flow.nat_port)),
        })
        .collect();
    entries.sort_by(|a, b| {
        (&a.proto, a.client, a.frontend, a.service_id).cmp(&(
            &b.proto,
            b.client,
            b.frontend,
            b.service_id,
        ))
    });
    Ok(entries)
}

/// Every source-translated flow's `LB_SNAT` entry, ordered by protocol,
/// backend and translated port.
pub fn snat(pin_dir: &Path) -> Result<Vec<SnatEntry>, InspectError> {
    let entries: HashMap<MapData, SnatKey, SnatValue> =
        typed(open_pinned(pin_dir, MAP_SNAT)?, MAP_SNAT)?;
    let mut entries: Vec<SnatEntry> = read_hash(&entries, MAP_SNAT)?
        .iter()
        .map(|(key, flow)| SnatEntry {
            proto: proto_name(key.proto),
            backend: socket(key.backend_addr, key.backend_port),
            nat_port: u16::from_be(key.nat_port),
            client: socket(flow.client_addr, flow.client_port),
            service_id: flow.service_id,
        })
        .collect();
    entries
        .sort_by(|a, b| (&a.proto, a.backend, a.nat_port).cmp(&(&b.proto, b.backend, b.nat_port)));
    Ok(entries)
}

/// Every `LB_SRC_RANGES` entry, ordered by service id and range.
pub fn source_ranges(pin_dir: &Path) -> Result<Vec<SourceRangeEntry>, InspectError> {
    let map: LpmTrie<MapData, SourceRange, u8> =
        typed(open_pinned(pin_dir, MAP_SOURCE_RANGES)?, MAP_SOURCE_RANGES)?;
    Ok(read_source_ranges(&map)?
        .into_iter()
        .map(|SourceRangeKey { service_id, range }| SourceRangeEntry {
            service_id,
            range: range.to_string(),
        })
        .collect())
}

/// Source-translated flows as a table.
pub fn snat_table(entries: &[SnatEntry]) -> Table {
    let mut table = table(&["PROTO", "BACKEND", "NAT PORT", "CLIENT", "SERVICE ID"]);
    for entry in entries {
        table.add_row(vec![
            Cell::new(&entry.proto),
            Cell::new(entry.backend),
            Cell::new(entry.nat_port).set_alignment(CellAlignment::Right),
            Cell::new(entry.client),
            Cell::new(entry.service_id).set_alignment(CellAlignment::Right),
        ]);
    }
    table
}

/// Source ranges as a table.
pub fn source_ranges_table(entries: &[SourceRangeEntry]) -> Table {
    let mut table = table(&["SERVICE ID", "CLIENT RANGE"]);
    for entry in entries {
        table.add_row(vec![
            Cell::new(entry.service_id).set_alignment(CellAlignment::Right),
            Cell::new(&entry.range),
        ]);
    }
    table
}

/// Every session affinity, ordered by service id and client.
pub fn affinity(pin_dir: &Path) -> Result<Vec<AffinityEntry>, InspectError> {
    let affinities: HashMap<MapData, AffinityKey, Affinity> =
        typed(open_pinned(pin_dir, MAP_AFFINITY)?, MAP_AFFINITY)?;
    let backends: Array<MapData, Backend> =
        typed(open_pinned(pin_dir, MAP_BACKENDS)?, MAP_BACKENDS)?;
    let affinities = read_hash(&affinities, MAP_AFFINITY)?;
    let now = monotonic_secs()?;
    affinities
        .iter()
        .map(|(key, affinity)| {
            let backend = match backends.get(&affinity.backend_id, 0) {
                Ok(backend) if backend.is_active() => Some(socket(backend.addr, backend.port)),
                Ok(_) | Err(MapError::OutOfBounds { .. }) => None,
                Err(source) => return Err(read_error(MAP_BACKENDS)(source)),
            };
            Ok(AffinityEntry {
                service_id: key.service_id,
                client: Ipv4Addr::from(u32::from_be(key.client_addr)),
                backend_id: affinity.backend_id,
                backend,
                idle_secs: u32::try_from(now.saturating_sub(u64::from(affinity.last_seen)))
                    .unwrap_or(u32::MAX),
            })
        })
        .collect()
}

/// Affinities as a table.
pub fn affinity_table(entries: &[AffinityEntry]) -> Table {
    let mut table = table(&["SERVICE ID", "CLIENT", "BACKEND ID", "BACKEND", "IDLE (s)"]);
    for entry in entries {
        table.add_row(vec![
            Cell::new(entry.service_id).set_alignment(CellAlignment::Right),
            Cell::new(entry.client),
            Cell::new(entry.backend_id).set_alignment(CellAlignment::Right),
            Cell::new(
                entry
                    .backend
                    .map_or_else(|| "(gone)".to_owned(), |addr| addr.to_string()),
            ),
            Cell::new(entry.idle_secs).set_alignment(CellAlignment::Right),
        ]);
    }
    table
}

/// Every datapath counter, summed over CPUs, in [`Counter`] order.
pub fn counters(pin_dir: &Path) -> Result<Vec<(String, u64)>, InspectError> {
    let counters: PerCpuArray<MapData, u64> =
        typed(open_pinned(pin_dir, MAP_COUNTERS)?, MAP_COUNTERS)?;
    let expected = lb_common::counters::COUNTER_COUNT;
    if counters.len() < expected {
        return Err(InspectError::CounterCount {
            actual: counters.len(),
            expected,
        });
    }
    Counter::ALL
        .into_iter()
        .map(|counter| {
            let per_cpu = counters
                .get(&(counter as u32), 0)
                .map_err(read_error(MAP_COUNTERS))?;
            Ok((counter.name().to_owned(), per_cpu.iter().sum()))
        })
        .collect()
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    table
}

/// Services as a table, one row per frontend, one line per backend.
pub fn services_table(entries: &[ServiceEntry]) -> Table {
    let mut table = table(&[
        "FRONTEND",
        "PROTO",
        "SERVICE ID",
        "FLAGS",
        "SELECTION",
        "AFFINITY (s)",
        "COUNTERS",
        "BACKENDS",
    ]);
    for entry in entries {
        let backends = if entry.backends.is_empty() {
            "(none)".to_owned()
        } else {
            entry
                .backends
                .iter()
                .map(|backend| {
                    let state = match (backend.ready, backend.local) {
                        (true, true) => "ready, local",
                        (true, false) => "ready",
                        (false, true) => "not ready, local",
                        (false, false) => "not ready",
                    };
                    let c = &backend.counters;
                    format!(
                        "{} #{} {state}: {} flows, {} pkts/{} B in, {} pkts/{} B out",
                        backend.addr,
                        backend.id,
                        c.new_flows,
                        c.packets,
                        c.bytes,
                        c.reply_packets,
                        c.reply_bytes
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let c = &entry.counters;
        let mut counters = vec![
            format!("{} flows", c.new_flows),
            format!("{} pkts/{} B in", c.packets, c.bytes),
            format!("{} pkts/{} B out", c.reply_packets, c.reply_bytes),
        ];
        counters.extend(
            c.drops
                .iter()
                .filter(|(_, count)| **count != 0)
                .map(|(reason, count)| format!("{count} {reason}")),
        );
        table.add_row(vec![
            Cell::new(entry.frontend),
            Cell::new(&entry.proto),
            Cell::new(entry.service_id).set_alignment(CellAlignment::Right),
            Cell::new(flags_cell(entry)),
            Cell::new(&entry.selection),
            Cell::new(entry.affinity_timeout).set_alignment(CellAlignment::Right),
            Cell::new(counters.join("\n")),
            Cell::new(backends),
        ]);
    }
    table
}

/// `flags` by name (or `-`), then the admitted ranges of a restricted one.
fn flags_cell(entry: &ServiceEntry) -> String {
    let mut lines = if entry.flag_names.is_empty() {
        vec!["-".to_owned()]
    } else {
        entry.flag_names.clone()
    };
    if entry.flags & SERVICE_F_SOURCE_RANGES != 0 {
        if entry.source_ranges.is_empty() {
            lines.push("  (no client admitted)".to_owned());
        } else {
            lines.extend(entry.source_ranges.iter().map(|range| format!("  {range}")));
        }
    }
    lines.join("\n")
}

/// Flows as a table.
pub fn conntrack_table(entries: &[FlowEntry]) -> Table {
    let mut table = table(&[
        "PROTO",
        "CLIENT",
        "FRONTEND",
        "BACKEND",
        "SERVICE ID",
        "BACKEND ID",
        "IDLE (s)",
        "FLAGS",
        "NAT PORT",
    ]);
    for entry in entries {
        table.add_row(vec![
            Cell::new(&entry.proto),
            Cell::new(entry.client),
            Cell::new(entry.frontend),
            Cell::new(entry.backend),
            Cell::new(entry.service_id).set_alignment(CellAlignment::Right),
            Cell::new(entry.backend_id).set_alignment(CellAlignment::Right),
            Cell::new(entry.idle_secs).set_alignment(CellAlignment::Right),
            Cell::new(entry.flags.join(",")),
            Cell::new(
                entry
                    .nat_port
                    .map_or_else(String::new, |port| port.to_string()),
            )
            .set_alignment(CellAlignment::Right),
        ]);
    }
    table
}

/// Counters as a table.
pub fn counters_table(entries: &[(String, u64)]) -> Table {
    let mut table = table(&["COUNTER", "PACKETS"]);
    for (name, value) in entries {
        table.add_row(vec![
            Cell::new(name),
            Cell::new(value).set_alignment(CellAlignment::Right),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::backend::BACKEND_F_ACTIVE;

    #[test]
    fn flow_flags_are_named() {
        assert!(flow_flags(0).is_empty());
        assert_eq!(
            flow_flags(FLOW_F_REPLY_SEEN | FLOW_F_RST),
            ["reply_seen", "rst"]
        );
        assert_eq!(
            flow_flags(FLOW_F_SNAT | FLOW_F_HAIRPIN | FLOW_F_EXTERNAL),
            ["snat", "hairpin", "external"]
        );
        assert_eq!(
            service_flag_names(SERVICE_F_MAGLEV | SERVICE_F_EXTERNAL | SERVICE_F_DROP),
            ["external", "maglev", "drop"]
        );
    }

    #[test]
    fn tables_render_every_entry() {
        let entry = ServiceEntry {
            frontend: "198.18.100.10:80".parse().unwrap(),
            proto: "tcp".into(),
            service_id: 3,
            flags: SERVICE_F_EXTERNAL | SERVICE_F_SOURCE_RANGES,
            flag_names: service_flag_names(SERVICE_F_EXTERNAL | SERVICE_F_SOURCE_RANGES),
            source_ranges: vec!["198.18.254.0/24".into()],
            selection: "random".into(),
            affinity_timeout: 0,
            counters: ServiceCounters::from(&ServiceStats {
                new_flows: 5,
                drops: [0, 2, 0, 0, 0, 0, 0, 0, 0],
                ..ServiceStats::default()
            }),
            backends: vec![
                BackendEntry {
                    id: 1,
                    addr: "198.18.0.10:8080".parse().unwrap(),
                    ready: true,
                    backend_flags: BACKEND_F_ACTIVE | BACKEND_F_LOCAL,
                    local: true,
                    counters: BackendCounters::default(),
                },
                BackendEntry {
                    id: 2,
                    addr: "198.18.0.11:8080".parse().unwrap(),
                    ready: false,
                    backend_flags: 3,
                    local: false,
                    counters: BackendCounters::default(),
                },
            ],
        };
        let text = services_table(&[entry]).to_string();
        assert!(text.contains("198.18.100.10:80"));
        assert!(text.contains("198.18.0.10:8080 #1 ready, local"));
        assert!(text.contains("external") && text.contains("source_ranges"));
        assert!(text.contains("  198.18.254.0/24"));
        assert!(text.contains("198.18.0.11:8080 #2 not ready"));
        assert!(text.contains("5 flows") && text.contains("2 backend_gone"));
        let text = snat_table(&[SnatEntry {
            proto: "tcp".into(),
            backend: "198.18.64.10:8080".parse().unwrap(),
            nat_port: 61_234,
            client: "198.18.254.101:40000".parse().unwrap(),
            service_id: 3,
        }])
        .to_string();
        assert!(text.contains("198.18.64.10:8080") && text.contains("61234"));
        assert!(text.contains("198.18.254.101:40000"));
        let text = source_ranges_table(&[SourceRangeEntry {
            service_id: 3,
            range: "198.18.254.0/24".into(),
        }])
        .to_string();
        assert!(text.contains("198.18.254.0/24"));
        let text = counters_table(&[("pass".into(), 7)]).to_string();
        assert!(text.contains("pass") && text.contains('7'));
    }
}

//! The only writer of the datapath's maps.
//!
//! [`Writer`] remembers what it programmed (a mirror of `LB_SERVICES`,
//! `LB_SLOTS`, `LB_BACKENDS`, `LB_REVNAT`, `LB_MEMBERS`, `LB_MAGLEV` and
//! `LB_SRC_RANGES`), computes the difference with a
//! new [`DesiredState`] and writes only that difference, in an order that
//! never refuses or drops a new connection to a service that keeps at least
//! one ready backend (see [`Writer::apply`]). An unchanged service costs no
//! write, and after a successful apply no work beyond comparing it with the
//! one last applied.
//!
//! Identities:
//! - A **service id** belongs to one [`ServicePortName`] for as long as it is
//!   desired. Ids come from a counter and are never reused: conntrack entries
//!   are keyed by service id, so a new service must never match an old flow.
//! - A **backend id** is an index into the `LB_BACKENDS` array, one per
//!   distinct (address, port, protocol), shared by every service that lists
//!   it. Freed ids are reused lowest first, which keeps the array dense.
//!
//! The writer is generic over [`MapOps`] so tests can run it against an
//! in-memory map set that records every write; [`super::maps::AyaMaps`] is
//! the real one. A failed write is logged with its call and key, counted,
//! and leaves the mirror as the map is: what was programmed before stays,
//! and the next apply retries.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddrV4;

use lb_common::affinity::MemberKey;
use lb_common::backend::{
    BACKEND_F_ACTIVE, BACKEND_F_LOCAL, BACKEND_F_NOT_READY, Backend, BackendAddr,
    MAX_REVNAT_SERVICES, RevNat,
};
use lb_common::names::{
    MAP_BACKEND_STATS, MAP_BACKENDS, MAP_MAGLEV, MAP_MEMBERS, MAP_PORTS, MAP_REVNAT,
    MAP_SERVICE_STATS, MAP_SERVICES, MAP_SLOTS, MAP_SOURCE_RANGES,
};
use lb_common::ports::{PORT_F_BACKEND, PORT_F_EXTERNAL_FRONTEND, PORT_F_FRONTEND};
use lb_common::service::{
    SERVICE_F_DROP, SERVICE_F_EXTERNAL, SERVICE_F_INTERNAL_VIEW, SERVICE_F_MAGLEV,
    SERVICE_F_SOURCE_RANGES, ServiceKey, ServiceValue, Slot, SlotKey,
};
use lb_common::stats::{MAX_BACKEND_STATS, MAX_SERVICE_STATS};
use tracing::{error, warn};

use super::maglev;
use crate::model::{
    DesiredState, Frontend, Ipv4Cidr, Protocol, Readiness, Selection, ServicePort, ServicePortName,
};

/// One write to one BPF map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapWrite {
    /// Insert or replace a frontend in `LB_SERVICES`.
    Service {
        key: ServiceKey,
        value: ServiceValue,
    },
    DeleteService {
        key: ServiceKey,
    },
    /// Insert or replace a slot in `LB_SLOTS`.
    Slot {
        key: SlotKey,
        value: Slot,
    },
    DeleteSlot {
        key: SlotKey,
    },
    /// Set an entry of the `LB_BACKENDS` array; an all-zero value frees it.
    Backend {
        id: u32,
        value: Backend,
    },
    /// Insert or replace an entry of `LB_REVNAT`.
    RevNat {
        key: BackendAddr,
        value: RevNat,
    },
    DeleteRevNat {
        key: BackendAddr,
    },
    /// Insert an entry of `LB_MEMBERS`: a ready backend of a service.
    Member {
        key: MemberKey,
    },
    DeleteMember {
        key: MemberKey,
    },
    /// Set entry `entry` of Maglev table `table` in `LB_MAGLEV`.
    Maglev {
        table: u16,
        entry: u32,
        backend_id: u32,
    },
    /// Insert an entry of `LB_SRC_RANGES`: clients in `key.range` may open
    /// connections through the load-balancer frontends of `key.service_id`.
    SourceRange {
        key: SourceRangeKey,
    },
    DeleteSourceRange {
        key: SourceRangeKey,
    },
    /// Zero entry `slot` of `LB_SVC_STATS` on every CPU (a new service id).
    ResetServiceStats {
        slot: u32,
    },
    /// Zero entry `slot` of `LB_BE_STATS` on every CPU (a new backend id).
    ResetBackendStats {
        slot: u32,
    },
    /// Set the `LB_PORTS` entry of `port` (host byte order) to `bits`
    /// (`PORT_F_*`; 0 clears it).
    Port {
        port: u16,
        bits: u8,
    },
}

impl MapWrite {
    /// The map this write goes to.
    pub const fn map(&self) -> &'static str {
        match self {
            MapWrite::Service { .. } | MapWrite::DeleteService { .. } => MAP_SERVICES,
            MapWrite::Slot { .. } | MapWrite::DeleteSlot { .. } => MAP_SLOTS,
            MapWrite::Backend { .. } => MAP_BACKENDS,
            MapWrite::RevNat { .. } | MapWrite::DeleteRevNat { .. } => MAP_REVNAT,
            MapWrite::Member { .. } | MapWrite::DeleteMember { .. } => MAP_MEMBERS,
            MapWrite::Maglev { .. } => MAP_MAGLEV,
            MapWrite::SourceRange { .. } | MapWrite::DeleteSourceRange { .. } => MAP_SOURCE_RANGES,
            MapWrite::ResetServiceStats { .. } => MAP_SERVICE_STATS,
            MapWrite::ResetBackendStats { .. } => MAP_BACKEND_STATS,
            MapWrite::Port { .. } => MAP_PORTS,
        }
    }

    /// The syscall command that carries the write out.
    pub const fn call(&self) -> &'static str {
        match self {
            MapWrite::DeleteService { .. }
            | MapWrite::DeleteSlot { .. }
            | MapWrite::DeleteRevNat { .. }
            | MapWrite::DeleteMember { .. }
            | MapWrite::DeleteSourceRange { .. } => "bpf_map_delete_elem",
            _ => "bpf_map_update_elem",
        }
    }
}

fn ipv4(addr_be: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from_be(addr_be))
}

/// `addr:port/proto` of a key or value stored in network byte order, as
/// the write log prints frontends and backends.
fn l4(addr: u32, port: u16, proto: u8) -> String {
    format!(
        "{}:{}/{}",
        ipv4(addr),
        u16::from_be(port),
        display_proto(proto)
    )
}

fn display_proto(proto: u8) -> &'static str {
    lb_common::proto::name(proto)
}

impl fmt::Display for MapWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({}, ", self.call(), self.map())?;
        match self {
            MapWrite::Service { key, value } => write!(
                f,
                "{} -> id {} count {} flags {:#x}",
                l4(key.addr, key.port, key.proto),
                value.id,
                value.backend_count,
                value.flags
            )?,
            MapWrite::DeleteService { key } => f.write_str(&l4(key.addr, key.port, key.proto))?,
            MapWrite::Slot { key, value } => write!(
                f,
                "service {} slot {} -> backend {}",
                key.service_id, key.slot, value.backend_id
            )?,
            MapWrite::DeleteSlot { key } => {
                write!(f, "service {} slot {}", key.service_id, key.slot)?
            }
            MapWrite::Backend { id, value } if value.is_active() => write!(
                f,
                "backend {id} -> {} flags {:#x}",
                l4(value.addr, value.port, value.proto),
                value.flags
            )?,
            MapWrite::Backend { id, .. } => write!(f, "backend {id} -> free")?,
            MapWrite::RevNat { key, value } => write!(
                f,
                "{} -> services {:?}",
                l4(key.addr, key.port, key.proto),
                &value.service_ids[..value.count as usize]
            )?,
            MapWrite::DeleteRevNat { key } => f.write_str(&l4(key.addr, key.port, key.proto))?,
            MapWrite::Member { key } | MapWrite::DeleteMember { key } => {
                write!(f, "service {} backend {}", key.service_id, key.backend_id)?
            }
            MapWrite::Maglev {
                table,
                entry,
                backend_id,
            } => write!(f, "table {table} entry {entry} -> backend {backend_id}")?,
            MapWrite::SourceRange { key } | MapWrite::DeleteSourceRange { key } => {
                write!(f, "service {} client {}", key.service_id, key.range)?
            }
            MapWrite::ResetServiceStats { slot } | MapWrite::ResetBackendStats { slot } => {
                write!(f, "entry {slot} -> 0")?
            }
            MapWrite::Port { port, bits } => write!(f, "port {port} -> {bits:#x}")?,
        }
        f.write_str(")")
    }
}

/// An entry of `LB_SRC_RANGES`: a client range of a service id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub service_id: u32,
    pub range: Ipv4Cidr,
}

impl SourceRangeKey {
    /// The LPM trie key: `32 + n` bits of (service id, range address).
    pub fn lpm(&self) -> (u32, lb_common::nat::SourceRange) {
        (
            lb_common::nat::SourceRange::SERVICE_ID_BITS + u32::from(self.range.prefix_len()),
            lb_common::nat::SourceRange::new(self.service_id, u32::from(self.range.addr()).to_be()),
        )
    }

    /// The entry an LPM trie key names; `None` for a key no writer writes
    /// (a prefix shorter than the service id).
    pub fn from_lpm(prefix_len: u32, data: lb_common::nat::SourceRange) -> Option<Self> {
        let bits = prefix_len.checked_sub(lb_common::nat::SourceRange::SERVICE_ID_BITS)?;
        let range = Ipv4Cidr::new(
            std::net::Ipv4Addr::from(u32::from_be(data.addr)),
            u8::try_from(bits).ok()?,
        )?;
        Some(Self {
            service_id: u32::from_be(data.service_id_be),
            range,
        })
    }
}

/// A map write the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("{call}({map}) failed")]
pub struct MapWriteError {
    pub call: &'static str,
    pub map: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Reading a map back failed.
#[derive(Debug, thiserror::Error)]
#[error("reading {map} failed")]
pub struct MapReadError {
    pub map: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The contents of the maps the agent writes (active backends only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<SlotKey, Slot>,
    pub backends: BTreeMap<u32, Backend>,
    pub revnat: BTreeMap<BackendAddr, RevNat>,
    pub members: BTreeSet<MemberKey>,
    /// Maglev tables by index; only tables a Maglev service uses are read
    /// back from the kernel.
    pub maglev: BTreeMap<u16, Vec<u32>>,
    pub source_ranges: BTreeSet<SourceRangeKey>,
    /// Non-zero entries of `LB_PORTS`: port (host byte order) -> bits.
    pub ports: BTreeMap<u16, u8>,
}

impl MapContents {
    /// Applies a successful write.
    pub fn apply(&mut self, write: &MapWrite) {
        match *write {
            MapWrite::Service { key, value } => {
                self.services.insert(key, value);
            }
            MapWrite::DeleteService { key } => {
                self.services.remove(&key);
            }
            MapWrite::Slot { key, value } => {
                self.slots.insert(key, value);
            }
            MapWrite::DeleteSlot { key } => {
                self.slots.remove(&key);
            }
            MapWrite::Backend { id, value } => {
                if value.is_active() {
                    self.backends.insert(id, value);
                } else {
                    self.backends.remove(&id);
                }
            }
            MapWrite::RevNat { key, value } => {
                self.revnat.insert(key, value);
            }
            MapWrite::DeleteRevNat { key } => {
                self.revnat.remove(&key);
            }
            MapWrite::Member { key } => {
                self.members.insert(key);
            }
            MapWrite::DeleteMember { key } => {
                self.members.remove(&key);
            }
            MapWrite::Maglev {
                table,
                entry,
                backend_id,
            } => {
                let entries = self.maglev.entry(table).or_default();
                let entry = entry as usize;
                if entries.len() <= entry {
                    entries.resize(entry + 1, 0);
                }
                entries[entry] = backend_id;
            }
            MapWrite::SourceRange { key } => {
                self.source_ranges.insert(key);
            }
            MapWrite::DeleteSourceRange { key } => {
                self.source_ranges.remove(&key);
            }
            MapWrite::Port { port, bits } => {
                if bits == 0 {
                    self.ports.remove(&port);
                } else {
                    self.ports.insert(port, bits);
                }
            }
            // Counters are not mirrored.
            MapWrite::ResetServiceStats { .. } | MapWrite::ResetBackendStats { .. } => {}
        }
    }

    /// The client ranges of one service id.
    fn service_source_ranges(&self, service_id: u32) -> impl Iterator<Item = &SourceRangeKey> {
        let first = SourceRangeKey {
            service_id,
            range: Ipv4Cidr::new(std::net::Ipv4Addr::UNSPECIFIED, 0).expect("valid"),
        };
        self.source_ranges
            .range(first..)
            .take_while(move |key| key.service_id == service_id)
    }

    /// Slots `0..` of a service, up to the first missing one.
    fn slot_run(&self, service_id: u32) -> Vec<u32> {
        (0..)
            .map_while(|slot| {
                self.slots
                    .get(&SlotKey { service_id, slot })
                    .map(|s| s.backend_id)
            })
            .collect()
    }
}

/// The operations the writer needs from the maps.
pub trait MapOps {
    /// Carries out one write.
    fn write(&mut self, write: &MapWrite) -> Result<(), MapWriteError>;
    /// Reads everything back (at start, to adopt a previous instance's maps).
    fn read_all(&self) -> Result<MapContents, MapReadError>;
    /// The highest service id among tracked flows (0 if none), so a new
    /// service id never matches a flow left by a previous instance.
    fn highest_flow_service_id(&self) -> Result<u32, MapReadError>;
    /// Number of entries of `LB_BACKENDS` (ids `1..capacity` are usable).
    fn backend_capacity(&self) -> u32;
    /// Number of entries of `LB_MAGLEV` (tables of the configured size).
    fn maglev_capacity(&self) -> u32;
}

/// What one [`Writer::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Successful map writes.
    pub writes: usize,
    /// Failed map writes (each was logged); the next apply retries.
    pub failures: usize,
    /// Frontends (`LB_SERVICES` entries) programmed after the apply.
    pub frontends: usize,
    /// Service ports (distinct service ids) programmed after the apply.
    pub service_ports: usize,
    /// Backends (`LB_BACKENDS` entries) programmed after the apply.
    pub backends: usize,
}

/// The key of a backend: address, target port and protocol, network order.
fn backend_key(addr: SocketAddrV4, proto: Protocol) -> BackendAddr {
    BackendAddr::new(
        u32::from(*addr.ip()).to_be(),
        addr.port().to_be(),
        proto.number(),
    )
}

fn revnat_value(ids: impl IntoIterator<Item = u32>) -> RevNat {
    let mut value = RevNat::default();
    for id in ids.into_iter().take(MAX_REVNAT_SERVICES) {
        value.service_ids[value.count as usize] = id;
        value.count += 1;
    }
    value
}

fn revnat_ids(value: &RevNat) -> &[u32] {
    &value.service_ids[..(value.count as usize).min(MAX_REVNAT_SERVICES)]
}

/// New slot contents for a service: `ready` backend ids (in preference
/// order) laid out so that a backend that stays keeps its slot when it can.
/// A removed backend's slot is taken by one from beyond the new end, or by a
/// new backend, so a change rewrites as few slots as possible.
fn slot_layout(old: &[u32], ready: &[u32]) -> Vec<u32> {
    let wanted: BTreeSet<u32> = ready.iter().copied().collect();
    let len = wanted.len();
    let mut layout: Vec<Option<u32>> = vec![None; len];
    let mut placed = BTreeSet::new();
    for (slot, id) in old.iter().take(len).enumerate() {
        if wanted.contains(id) && placed.insert(*id) {
            layout[slot] = Some(*id);
        }
    }
    let mut movers = old
        .iter()
        .skip(len)
        .chain(ready)
        .copied()
        .filter(|id| wanted.contains(id));
    for slot in layout.iter_mut().filter(|slot| slot.is_none()) {
        for id in movers.by_ref() {
            if placed.insert(id) {
                *slot = Some(id);
                break;
            }
        }
    }
    layout.into_iter().flatten().collect()
}

/// What the desired state asks of a backend, from the service ports that
/// list it.
fn wanted_backend(listers: &BTreeMap<ServicePortName, Listing>) -> WantedBackend {
    WantedBackend {
        ready_anywhere: listers.values().any(|listing| listing.readiness.is_ready()),
        local: listers.values().any(|listing| listing.local),
        services: listers.values().map(|listing| listing.id).collect(),
    }
}

/// How one service port lists a backend.
#[derive(Clone, Copy, Debug)]
struct Listing {
    /// The service port's id.
    id: u32,
    readiness: Readiness,
    /// The endpoint runs on this node.
    local: bool,
}

impl Listing {
    fn of(id: u32, port: &ServicePort, addr: &SocketAddrV4, readiness: Readiness) -> Self {
        Self {
            id,
            readiness,
            local: port.is_local(addr),
        }
    }
}

/// A backend the desired state lists, and who lists it.
#[derive(Default)]
struct WantedBackend {
    ready_anywhere: bool,
    /// On this node (`BACKEND_F_LOCAL`), as any listing says.
    local: bool,
    services: BTreeSet<u32>,
}

/// A backend whose `LB_BACKENDS` and `LB_REVNAT` entries are in place for
/// this apply, and the services whose replies it can reverse-translate.
struct UsableBackend {
    id: u32,
    /// The services that may name it in a slot in this apply: linked in
    /// `LB_REVNAT` now, and among its final links.
    revnat: BTreeSet<u32>,
    /// Its final `LB_REVNAT` links (written in step 4).
    links: BTreeSet<u32>,
    /// Its entry once no slot needs the old flags (written in step 4).
    final_value: Backend,
}

/// The `LB_PORTS` bits a frontend's port needs.
fn frontend_port_bits(value: &ServiceValue) -> u8 {
    if value.flags & SERVICE_F_EXTERNAL != 0 {
        PORT_F_FRONTEND | PORT_F_EXTERNAL_FRONTEND
    } else {
        PORT_F_FRONTEND
    }
}

/// The `LB_PORTS` entry (port in host byte order, bits) that must be in
/// place before `write` is made.
fn port_needed_by(write: &MapWrite) -> Option<(u16, u8)> {
    match write {
        MapWrite::Service { key, value } => {
            Some((u16::from_be(key.port), frontend_port_bits(value)))
        }
        MapWrite::RevNat { key, .. } => Some((u16::from_be(key.port), PORT_F_BACKEND)),
        _ => None,
    }
}

/// How many programmed entries need each bit of one port's `LB_PORTS`
/// entry: frontends (of which external ones) with the port, and backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PortUsers {
    frontends: u32,
    external_frontends: u32,
    backends: u32,
}

impl PortUsers {
    fn bits(&self) -> u8 {
        let mut bits = 0;
        if self.frontends > 0 {
            bits |= PORT_F_FRONTEND;
        }
        if self.external_frontends > 0 {
            bits |= PORT_F_EXTERNAL_FRONTEND;
        }
        if self.backends > 0 {
            bits |= PORT_F_BACKEND;
        }
        bits
    }

    /// Counts (`add`) or uncounts a frontend of `value`.
    fn frontend(&mut self, value: &ServiceValue, add: bool) {
        let step = |count: &mut u32| {
            *count = if add {
                *count + 1
            } else {
                count.saturating_sub(1)
            };
        };
        step(&mut self.frontends);
        if value.flags & SERVICE_F_EXTERNAL != 0 {
            step(&mut self.external_frontends);
        }
    }
}

/// [`PortUsers`] of every port the programmed frontends and backends use.
fn port_users_of(programmed: &MapContents) -> BTreeMap<u16, PortUsers> {
    let mut users: BTreeMap<u16, PortUsers> = BTreeMap::new();
    for (key, value) in &programmed.services {
        users
            .entry(u16::from_be(key.port))
            .or_default()
            .frontend(value, true);
    }
    for key in programmed.revnat.keys() {
        users.entry(u16::from_be(key.port)).or_default().backends += 1;
    }
    users
}

/// See the module documentation.
pub struct Writer<M: MapOps> {
    maps: M,
    programmed: MapContents,
    service_ids: BTreeMap<ServicePortName, u32>,
    /// Frontend -> service id found in maps left by a previous instance and
    /// not yet claimed: a service port with that frontend takes the id over,
    /// so its established flows survive an agent restart.
    inherited_ids: BTreeMap<ServiceKey, u32>,
    next_service_id: u32,
    backend_ids: BTreeMap<BackendAddr, u32>,
    free_backend_ids: BTreeSet<u32>,
    next_backend_id: u32,
    backend_capacity: u32,
    /// Backends listed by more services than `LB_REVNAT` holds, already warned about.
    revnat_overflow: BTreeSet<BackendAddr>,
    map_errors: u64,
    /// Selection of services that do not ask for one.
    default_selection: Selection,
    /// Entries per Maglev table (the datapath reads the same from `LB_CONFIG`).
    maglev_table_size: u32,
    /// Maglev table index of each service id that has one.
    maglev_tables: BTreeMap<u32, u16>,
    /// Services that wanted Maglev but found no free table, already warned about.
    maglev_overflow: BTreeSet<u32>,
    /// Service ids handed out by the current apply, whose counters start
    /// from zero.
    fresh_service_ids: BTreeSet<u32>,
    /// The current apply left a reverse-NAT link for the next one to add.
    links_deferred: bool,
    /// Number of `LB_SERVICES` entries per service id (kept by [`Self::write`]).
    frontends_per_id: BTreeMap<u32, usize>,
    /// The service ports of the last apply, to find what the next one changes.
    applied: BTreeMap<ServicePortName, ServicePort>,
    /// Per backend, the service ports of the last apply that list it.
    listers: BTreeMap<BackendAddr, BTreeMap<ServicePortName, Listing>>,
    /// The next apply must look at everything: nothing was applied yet, an
    /// apply failed somewhere, a setting changed, or a Maglev service
    /// waits for a table (see [`Writer::apply`]).
    full_next: bool,
    /// Per port, the programmed entries that need its `LB_PORTS` bits
    /// (kept by [`Self::write`]; ports nothing uses are absent).
    port_users: BTreeMap<u16, PortUsers>,
}

/// What an incremental apply looks at: the service ports that changed
/// since the last apply, and everything they can affect.
struct Scope {
    /// Service ports whose slots and frontends are recomputed: the changed
    /// ones and every one that lists a backend they list or listed.
    services: BTreeSet<ServicePortName>,
    /// Ids of `services` and of removed service ports, each with every
    /// frontend that can carry it (its old and new ones).
    ids: BTreeMap<u32, BTreeSet<ServiceKey>>,
    /// Backends listed by a changed or removed service port, before or now.
    backends: BTreeSet<BackendAddr>,
    /// Service ids that listed each of `backends` before this apply.
    old_listers: BTreeMap<BackendAddr, BTreeSet<u32>>,
    /// Frontends of changed or removed service ports before this apply.
    old_frontends: BTreeSet<(ServiceKey, Frontend)>,
}

impl<M: MapOps> Writer<M> {
    /// A writer for maps that were just created (empty).
    pub fn new(maps: M) -> Self {
        Self::with_contents(maps, MapContents::default(), 0)
    }

    /// A writer for maps a previous instance programmed (reused pins): it
    /// reads them back and adopts their service and backend ids, so
    /// established flows keep their service id and backend.
    pub fn adopt(maps: M) -> Result<Self, MapReadError> {
        let programmed = maps.read_all()?;
        let highest_flow_id = maps.highest_flow_service_id()?;
        Ok(Self::with_contents(maps, programmed, highest_flow_id))
    }

    fn with_contents(maps: M, programmed: MapContents, highest_flow_id: u32) -> Self {
        let backend_capacity = maps.backend_capacity();

        let mut backend_ids = BTreeMap::new();
        for (&id, backend) in &programmed.backends {
            // A duplicate (address, port, protocol) keeps its lowest id;
            // the others are unreferenced by the first apply and freed.
            backend_ids
                .entry(BackendAddr::new(backend.addr, backend.port, backend.proto))
                .or_insert(id);
        }
        let highest_backend_id = programmed.backends.keys().last().copied().unwrap_or(0);
        let free_backend_ids = (1..highest_backend_id)
            .filter(|id| !programmed.backends.contains_key(id))
            .collect();

        let maglev_tables = programmed
            .services
            .values()
            .filter(|value| value.flags & SERVICE_F_MAGLEV != 0)
            .map(|value| (value.id, value.maglev_table))
            .collect();
        let inherited_ids: BTreeMap<ServiceKey, u32> = programmed
            .services
            .iter()
            .map(|(key, value)| (*key, value.id))
            .collect();
        let highest_service_id = programmed
            .services
            .values()
            .map(|value| value.id)
            .chain(programmed.slots.keys().map(|key| key.service_id))
            .chain(
                programmed
                    .revnat
                    .values()
                    .flat_map(|value| revnat_ids(value).iter().copied()),
            )
            .chain([highest_flow_id])
            .max()
            .unwrap_or(0);

        let mut frontends_per_id = BTreeMap::new();
        for value in programmed.services.values() {
            *frontends_per_id.entry(value.id).or_default() += 1;
        }
        let port_users = port_users_of(&programmed);

        Self {
            maps,
            programmed,
            service_ids: BTreeMap::new(),
            inherited_ids,
            next_service_id: highest_service_id + 1,
            backend_ids,
            free_backend_ids,
            next_backend_id: highest_backend_id + 1,
            backend_capacity,
            revnat_overflow: BTreeSet::new(),
            map_errors: 0,
            default_selection: Selection::Random,
            maglev_table_size: lb_common::config::defaults::MAGLEV_TABLE_SIZE,
            maglev_tables,
            maglev_overflow: BTreeSet::new(),
            fresh_service_ids: BTreeSet::new(),
            links_deferred: false,
            frontends_per_id,
            applied: BTreeMap::new(),
            listers: BTreeMap::new(),
            full_next: true,
            port_users,
        }
    }

    /// Sets the selection of services that do not ask for one, and the
    /// size of Maglev tables (a prime; the size written to `LB_CONFIG`).
    /// Applies from the next [`Writer::apply`].
    pub fn set_selection(&mut self, default: Selection, maglev_table_size: u32) {
        assert!(
            maglev::is_prime(maglev_table_size),
            "Maglev table size {maglev_table_size} is not prime"
        );
        self.default_selection = default;
        self.full_next = true;
        if maglev_table_size != self.maglev_table_size {
            // Tables of the old size are rewritten in full.
            self.maglev_table_size = maglev_table_size;
            self.programmed.maglev.clear();
        }
    }

    /// The Maglev table index of a service id, if it uses one.
    pub fn maglev_table(&self, service_id: u32) -> Option<u16> {
        self.maglev_tables.get(&service_id).copied()
    }

    /// What the writer believes the maps hold.
    pub fn programmed(&self) -> &MapContents {
        &self.programmed
    }

    /// The service id of a service port, if it has one.
    pub fn service_id(&self, name: &ServicePortName) -> Option<u32> {
        self.service_ids.get(name).copied()
    }

    /// Failed map writes since the writer was created.
    pub fn map_errors(&self) -> u64 {
        self.map_errors
    }

    /// The maps it writes (for reading them back).
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Programs `desired`, writing only what differs from what is programmed.
    ///
    /// Write order (the rule that keeps every new connection to a service
    /// that keeps at least one ready backend working at every instant; each
    /// step only makes visible what the previous ones already wrote):
    ///
    /// 1. New or changed `LB_BACKENDS` entries, and `LB_REVNAT` additions
    ///    (old links are kept until step 4), so every backend a slot can
    ///    name exists and its replies can be reverse-translated.
    /// 2. Per service port (after its members and its new client ranges,
    ///    so a frontend that checks `loadBalancerSourceRanges` finds every
    ///    range it admits):
    ///    - new service: its slots first, then its `LB_SERVICES` entries,
    ///      each with the flags of its kind (`SERVICE_F_EXTERNAL`,
    ///      `SERVICE_F_SOURCE_RANGES`);
    ///    - growing: slots `[old..new)` (beyond the count, invisible), then
    ///      rewrites of changed slots `[0..old)` (each one atomic, naming a
    ///      live backend), then the count;
    ///    - shrinking: rewrites of slots `[0..new)`, then the count; the
    ///      slots `[new..old)` are deleted in step 3.
    ///
    ///    A service whose slot write failed keeps its old count, which
    ///    still names only written slots.
    /// 3. Deleted frontends: the `LB_SERVICES` entry first, then every slot
    ///    that no programmed count covers any more (a deleted service's, a
    ///    shrunk service's tail), members no slot names, and client ranges
    ///    no frontend asks for (after the frontend that checked them lost
    ///    its flag or went).
    /// 4. Last, stale `LB_REVNAT` links are removed, backends that turned
    ///    not ready get their flag (no slot names them any more), and
    ///    backends no longer listed and named by no slot are freed.
    ///
    /// A listed but not-ready backend keeps its `LB_BACKENDS` entry (with
    /// `BACKEND_F_NOT_READY`) and its `LB_REVNAT` links, and is in no slot.
    /// A backend any service port lists as local gets `BACKEND_F_LOCAL`
    /// (written in step 1: it only decides the source translation of new
    /// external flows).
    ///
    /// Cost: after an apply that wrote everything it meant to, the maps are
    /// a fixed point for every service port that does not change, so the
    /// next apply compares each service port with the one last applied and
    /// runs the steps above only for the changed and removed ones, the
    /// backends they list or listed, and the service ports sharing those
    /// backends (whose reverse-NAT links can change). It writes exactly
    /// what a full apply would, in the same order (a test compares both on
    /// random histories). The first apply, one after a failed write or a
    /// setting change, one after a Maglev service found no free table and
    /// one after a reverse-NAT link was deferred look at everything.
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        let mut report = ApplyReport::default();
        self.links_deferred = false;
        // Incremental unless the last apply left anything to retry: every
        // service port outside the scope is then exactly as programmed,
        // and a full apply would write nothing for it.
        let scope = if self.full_next {
            // Maps adopted from a previous instance (or an older one
            // without the port filter) get every bit their entries need
            // before anything else.
            self.fill_port_filter(&mut report);
            self.assign_service_ids(desired);
            self.remember_all(desired);
            None
        } else {
            Some(self.scope_changes(desired))
        };

        // What the desired state lists, per backend (in scope).
        let wanted: BTreeMap<BackendAddr, WantedBackend> = match &scope {
            None => self
                .listers
                .iter()
                .map(|(key, listers)| (*key, wanted_backend(listers)))
                .collect(),
            Some(scope) => scope
                .backends
                .iter()
                .filter_map(|key| Some((*key, wanted_backend(self.listers.get(key)?))))
                .collect(),
        };

        // Step 1: backends and reverse-NAT additions.
        let mut usable: BTreeMap<BackendAddr, UsableBackend> = BTreeMap::new();
        for (key, backend) in &wanted {
            if let Some(usable_backend) = self.program_backend(key, backend, &mut report) {
                usable.insert(*key, usable_backend);
            }
        }
        let services: Vec<(&ServicePortName, &ServicePort)> = match &scope {
            None => desired.services().collect(),
            Some(scope) => scope
                .services
                .iter()
                .filter_map(|name| Some((name, desired.service(name)?)))
                .collect(),
        };
        if let Some(scope) = &scope {
            // Backends of service ports in scope that no change touches:
            // as the last apply left them.
            for (name, port) in &services {
                for addr in port.backends.keys() {
                    let key = backend_key(*addr, name.proto);
                    if scope.backends.contains(&key) || usable.contains_key(&key) {
                        continue;
                    }
                    if let Some(backend) = self.settled_backend(&key) {
                        usable.insert(key, backend);
                    }
                }
            }
        }

        // Step 2: slots, then the counts that expose them.
        for (name, port) in services {
            let id = self.service_ids[name];
            self.program_service(id, name, port, &usable, &mut report);
        }

        // Step 3: deleted frontends, then slots no count covers. A
        // frontend that moved to another service port whose step 2 failed
        // still carries its old id, and that id's old count, slots and
        // table, which no longer hold: it goes too (the retry adds it).
        let stale = |value: &ServiceValue, owner: Option<&ServicePortName>| {
            owner.is_none_or(|owner| self.service_ids.get(owner) != Some(&value.id))
        };
        let stale_frontends: Vec<ServiceKey> = match &scope {
            None => {
                let desired_frontends: BTreeMap<ServiceKey, &ServicePortName> = desired
                    .frontends()
                    .map(|(frontend, owner)| (frontend.key(), owner))
                    .collect();
                self.programmed
                    .services
                    .iter()
                    .filter(|(key, value)| stale(value, desired_frontends.get(key).copied()))
                    .map(|(key, _)| *key)
                    .collect()
            }
            Some(scope) => scope
                .old_frontends
                .iter()
                .filter(|(key, frontend)| {
                    self.programmed
                        .services
                        .get(key)
                        .is_some_and(|value| stale(value, desired.owner(frontend)))
                })
                .map(|(key, _)| *key)
                .collect(),
        };
        for key in stale_frontends {
            self.write(MapWrite::DeleteService { key }, &mut report);
        }
        let counts: BTreeMap<u32, u32> = match &scope {
            None => {
                let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
                for value in self.programmed.services.values() {
                    let count = counts.entry(value.id).or_default();
                    *count = (*count).max(value.backend_count);
                }
                counts
            }
            Some(scope) => scope
                .ids
                .iter()
                .map(|(id, keys)| {
                    let count = keys
                        .iter()
                        .filter_map(|key| self.programmed.services.get(key))
                        .filter(|value| value.id == *id)
                        .map(|value| value.backend_count)
                        .max()
                        .unwrap_or(0);
                    (*id, count)
                })
                .collect(),
        };
        let count_of = |service_id: u32| counts.get(&service_id).copied().unwrap_or(0);
        let uncovered_slots: Vec<SlotKey> = self
            .slots_in(scope.as_ref())
            .filter(|(key, _)| key.slot >= count_of(key.service_id))
            .map(|(key, _)| *key)
            .collect();
        for key in uncovered_slots {
            self.write(MapWrite::DeleteSlot { key }, &mut report);
        }
        // Members no covered slot names (removed or not-ready backends,
        // deleted services), once nothing can choose them any more.
        let covered_members: BTreeSet<MemberKey> = self
            .slots_in(scope.as_ref())
            .filter(|(key, _)| key.slot < count_of(key.service_id))
            .map(|(key, slot)| MemberKey {
                service_id: key.service_id,
                backend_id: slot.backend_id,
            })
            .collect();
        let stale_members: Vec<MemberKey> = match &scope {
            None => self
                .programmed
                .members
                .difference(&covered_members)
                .copied()
                .collect(),
            Some(scope) => scope
                .ids
                .keys()
                .flat_map(|&service_id| {
                    self.programmed.members.range(
                        MemberKey {
                            service_id,
                            backend_id: 0,
                        }..=MemberKey {
                            service_id,
                            backend_id: u32::MAX,
                        },
                    )
                })
                .filter(|key| !covered_members.contains(key))
                .copied()
                .collect(),
        };
        for key in stale_members {
            self.write(MapWrite::DeleteMember { key }, &mut report);
        }
        for key in self.stale_source_ranges(desired, scope.as_ref()) {
            self.write(MapWrite::DeleteSourceRange { key }, &mut report);
        }
        // Tables no frontend uses any more are free for other services.
        let default_selection = self.default_selection;
        let wants_maglev =
            |port: &ServicePort| port.selection.unwrap_or(default_selection) == Selection::Maglev;
        let maglev_users = |value: &&ServiceValue| value.flags & SERVICE_F_MAGLEV != 0;
        match &scope {
            None => {
                let tables_in_use: BTreeSet<u16> = self
                    .programmed
                    .services
                    .values()
                    .filter(maglev_users)
                    .map(|value| value.maglev_table)
                    .collect();
                let wanting: BTreeSet<u32> = desired
                    .services()
                    .filter(|(_, port)| wants_maglev(port))
                    .map(|(name, _)| self.service_ids[name])
                    .collect();
                self.maglev_tables.retain(|service_id, table| {
                    wanting.contains(service_id) || tables_in_use.contains(table)
                });
                self.maglev_overflow.retain(|id| wanting.contains(id));
            }
            Some(scope) => {
                // A table belongs to one service id, and only the
                // frontends in scope can carry an id in scope.
                let tables_in_use: BTreeSet<u16> = scope
                    .ids
                    .values()
                    .flatten()
                    .filter_map(|key| self.programmed.services.get(key))
                    .filter(maglev_users)
                    .map(|value| value.maglev_table)
                    .collect();
                let wanting: BTreeSet<u32> = scope
                    .services
                    .iter()
                    .filter(|name| desired.service(name).is_some_and(wants_maglev))
                    .map(|name| self.service_ids[name])
                    .collect();
                self.maglev_tables.retain(|service_id, table| {
                    !scope.ids.contains_key(service_id)
                        || wanting.contains(service_id)
                        || tables_in_use.contains(table)
                });
                self.maglev_overflow
                    .retain(|id| !scope.ids.contains_key(id) || wanting.contains(id));
            }
        }

        // Step 4: stale reverse-NAT links, then unreferenced backends.
        let mut slot_users: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        match &scope {
            None => {
                for (key, slot) in &self.programmed.slots {
                    slot_users
                        .entry(slot.backend_id)
                        .or_default()
                        .insert(key.service_id);
                }
            }
            Some(scope) => {
                // Only the service ports that list a backend, now or
                // before, can have a slot naming it.
                for key in &scope.backends {
                    let Some(&backend_id) = self.backend_ids.get(key) else {
                        continue;
                    };
                    let listers = self
                        .listers
                        .get(key)
                        .into_iter()
                        .flat_map(|listers| listers.values().map(|listing| listing.id))
                        .chain(scope.old_listers.get(key).into_iter().flatten().copied());
                    for service_id in listers {
                        if self
                            .service_slots(service_id)
                            .any(|(_, slot)| slot.backend_id == backend_id)
                        {
                            slot_users.entry(backend_id).or_default().insert(service_id);
                        }
                    }
                }
            }
        }
        let revnat_keys: Vec<BackendAddr> = match &scope {
            None => self.programmed.revnat.keys().copied().collect(),
            Some(scope) => scope
                .backends
                .iter()
                .filter(|key| self.programmed.revnat.contains_key(key))
                .copied()
                .collect(),
        };
        for key in revnat_keys {
            if wanted.contains_key(&key) && !usable.contains_key(&key) {
                // Its update failed in step 1: leave it as it is.
                continue;
            }
            let mut ids: BTreeSet<u32> = usable
                .get(&key)
                .map(|backend| backend.links.clone())
                .unwrap_or_default();
            if let Some(users) = self.backend_ids.get(&key).and_then(|id| slot_users.get(id)) {
                // A slot still names it (a failed write): keep its link.
                ids.extend(users);
            }
            let current = self.programmed.revnat[&key];
            if ids.is_empty() {
                self.write(MapWrite::DeleteRevNat { key }, &mut report);
            } else {
                let value = revnat_value(ids);
                if value != current {
                    self.write(MapWrite::RevNat { key, value }, &mut report);
                }
            }
        }
        let flag_changes: Vec<MapWrite> = usable
            .values()
            .filter(|backend| {
                self.programmed.backends.get(&backend.id) != Some(&backend.final_value)
                    && !slot_users.contains_key(&backend.id)
            })
            .map(|backend| MapWrite::Backend {
                id: backend.id,
                value: backend.final_value,
            })
            .collect();
        for write in flag_changes {
            self.write(write, &mut report);
        }
        let programmed_backends: Vec<(u32, Backend)> = match &scope {
            None => self
                .programmed
                .backends
                .iter()
                .map(|(id, backend)| (*id, *backend))
                .collect(),
            Some(scope) => scope
                .backends
                .iter()
                .filter(|key| !wanted.contains_key(key))
                .filter_map(|key| self.backend_ids.get(key))
                .filter_map(|id| Some((*id, *self.programmed.backends.get(id)?)))
                .collect::<BTreeMap<u32, Backend>>()
                .into_iter()
                .collect(),
        };
        for (id, backend) in programmed_backends {
            let key = BackendAddr::new(backend.addr, backend.port, backend.proto);
            let canonical = self.backend_ids.get(&key) == Some(&id);
            if (canonical && wanted.contains_key(&key)) || slot_users.contains_key(&id) {
                continue;
            }
            if self.write(
                MapWrite::Backend {
                    id,
                    value: Backend::default(),
                },
                &mut report,
            ) {
                if canonical {
                    self.backend_ids.remove(&key);
                }
                self.release_backend_id(id);
            }
        }

        if scope.is_none() {
            // Bits nothing needs any more (adopted, or left by a failed
            // clear): cleared once their last user is gone, i.e. now.
            self.trim_port_filter(&mut report);
        }

        // A service waiting for a Maglev table retries on every apply, and
        // one waiting for a reverse-NAT link in the next.
        self.full_next =
            report.failures > 0 || !self.maglev_overflow.is_empty() || self.links_deferred;
        report.frontends = self.programmed.services.len();
        report.service_ports = self.frontends_per_id.len();
        report.backends = self.programmed.backends.len();
        report
    }

    /// Step 2 for one service port: its members, slots, Maglev table and
    /// frontends. Stops at the first failed write, leaving the service as
    /// it was programmed.
    fn program_service(
        &mut self,
        id: u32,
        name: &ServicePortName,
        port: &ServicePort,
        usable: &BTreeMap<BackendAddr, UsableBackend>,
        report: &mut ApplyReport,
    ) {
        let ready: Vec<u32> = port
            .ready_backends()
            .filter_map(|addr| usable.get(&backend_key(addr, name.proto)))
            .filter(|backend| backend.revnat.contains(&id))
            .map(|backend| backend.id)
            .collect();
        let old = self.programmed.slot_run(id);
        let new = slot_layout(&old, &ready);

        if self.fresh_service_ids.remove(&id) {
            // Before its frontends exist, so every count is its own.
            self.write(
                MapWrite::ResetServiceStats {
                    slot: id % MAX_SERVICE_STATS,
                },
                report,
            );
        }
        if port.frontends.is_empty() {
            // Unreachable (its frontends belong to other service ports):
            // slots no count would cover would only be deleted again.
            return;
        }
        // Members before anything names them, so an affinity to a
        // backend is followed as soon as new connections can reach it.
        for &backend_id in &new {
            let key = MemberKey {
                service_id: id,
                backend_id,
            };
            if !self.programmed.members.contains(&key)
                && !self.write(MapWrite::Member { key }, report)
            {
                return;
            }
        }

        // Client ranges before a frontend can check them: a frontend that
        // gains `SERVICE_F_SOURCE_RANGES` (or appears with it) finds every
        // range of its id. Ranges it loses go in step 3.
        for range in port.source_ranges.ranges() {
            let key = SourceRangeKey {
                service_id: id,
                range: *range,
            };
            if !self.programmed.source_ranges.contains(&key)
                && !self.write(MapWrite::SourceRange { key }, report)
            {
                return;
            }
        }

        let beyond_old = old.len()..new.len();
        let rewrites = (0..old.len().min(new.len())).filter(|&slot| old[slot] != new[slot]);
        for slot in beyond_old.chain(rewrites) {
            let key = SlotKey {
                service_id: id,
                slot: slot as u32,
            };
            let value = Slot {
                backend_id: new[slot],
            };
            if self.programmed.slots.get(&key) != Some(&value)
                && !self.write(MapWrite::Slot { key, value }, report)
            {
                return;
            }
        }
        let selection = port.selection.unwrap_or(self.default_selection);
        let mut value = ServiceValue {
            id,
            backend_count: new.len() as u32,
            affinity_timeout: port.affinity_timeout.unwrap_or(0),
            ..ServiceValue::default()
        };
        if port.drop_without_backend {
            value.flags |= SERVICE_F_DROP;
        }
        if selection == Selection::Maglev && !new.is_empty() {
            let ready_backends: Vec<(SocketAddrV4, u32)> = port
                .ready_backends()
                .filter_map(|addr| {
                    let backend = usable.get(&backend_key(addr, name.proto))?;
                    backend.revnat.contains(&id).then_some((addr, backend.id))
                })
                .collect();
            match self.program_maglev(id, name, &ready_backends, report) {
                Some(Some(table)) => {
                    value.flags |= SERVICE_F_MAGLEV;
                    value.maglev_table = table;
                }
                // No free table: random selection (warned).
                Some(None) => {}
                // A table write failed: keep the service as it is.
                None => return,
            }
        }
        for (frontend, kind) in port.frontends.iter() {
            let key = frontend.key();
            let mut value = ServiceValue {
                flags: value.flags | port.frontend_flags(kind),
                ..value
            };
            // Pods reaching an external frontend of a Service whose
            // policies differ are balanced with its ClusterIP's entry.
            if kind.is_external()
                && let Some(internal) = port.internal_view
            {
                let internal = internal.key();
                value.flags |= SERVICE_F_INTERNAL_VIEW;
                value.internal_addr = internal.addr;
                value.internal_port = internal.port;
            }
            if self.programmed.services.get(&key) != Some(&value) {
                self.write(MapWrite::Service { key, value }, report);
            }
        }
    }

    /// Step 3 for `LB_SRC_RANGES`: the programmed client ranges no desired
    /// service port with frontends asks for (of the ids in scope, or all).
    /// A range stays while a frontend of its id still carries
    /// `SERVICE_F_SOURCE_RANGES` that the desired state wants without it
    /// (its rewrite failed, or its removal did): deleting the range would
    /// refuse clients the Service admits.
    fn stale_source_ranges(
        &self,
        desired: &DesiredState,
        scope: Option<&Scope>,
    ) -> Vec<SourceRangeKey> {
        let wanted_of = |name: &ServicePortName| -> Option<(u32, &ServicePort)> {
            let port = desired.service(name)?;
            (!port.frontends.is_empty()).then(|| (self.service_ids[name], port))
        };
        let (wanted, ids): (BTreeMap<u32, &ServicePort>, BTreeSet<u32>) = match scope {
            None => (
                desired
                    .services()
                    .filter_map(|(name, _)| wanted_of(name))
                    .collect(),
                self.programmed
                    .source_ranges
                    .iter()
                    .map(|key| key.service_id)
                    .collect(),
            ),
            Some(scope) => (
                scope.services.iter().filter_map(wanted_of).collect(),
                scope.ids.keys().copied().collect(),
            ),
        };
        let still_flagged: BTreeSet<u32> = match scope {
            None => self
                .programmed
                .services
                .values()
                .filter(|value| value.flags & SERVICE_F_SOURCE_RANGES != 0)
                .map(|value| value.id)
                .collect(),
            Some(scope) => scope
                .ids
                .iter()
                .filter(|(id, keys)| {
                    keys.iter()
                        .filter_map(|key| self.programmed.services.get(key))
                        .any(|value| value.id == **id && value.flags & SERVICE_F_SOURCE_RANGES != 0)
                })
                .map(|(id, _)| *id)
                .collect(),
        };
        ids.into_iter()
            .flat_map(|id| self.programmed.service_source_ranges(id))
            .filter(|key| match wanted.get(&key.service_id) {
                Some(port) if port.source_ranges.is_restricted() => {
                    !port.source_ranges.ranges().any(|range| *range == key.range)
                }
                _ => !still_flagged.contains(&key.service_id),
            })
            .copied()
            .collect()
    }

    /// Programmed slots of the service ids in scope (all without a scope),
    /// in key order.
    fn slots_in<'a>(
        &'a self,
        scope: Option<&'a Scope>,
    ) -> Box<dyn Iterator<Item = (&'a SlotKey, &'a Slot)> + 'a> {
        match scope {
            None => Box::new(self.programmed.slots.iter()),
            Some(scope) => Box::new(scope.ids.keys().flat_map(|&id| self.service_slots(id))),
        }
    }

    /// Programmed slots of one service id, in slot order.
    fn service_slots(&self, service_id: u32) -> impl Iterator<Item = (&SlotKey, &Slot)> {
        self.programmed.slots.range(
            SlotKey {
                service_id,
                slot: 0,
            }..=SlotKey {
                service_id,
                slot: u32::MAX,
            },
        )
    }

    /// A backend no change of this apply touches, as the last apply
    /// programmed it (which a full apply would leave as it is).
    fn settled_backend(&self, key: &BackendAddr) -> Option<UsableBackend> {
        let id = *self.backend_ids.get(key)?;
        let final_value = *self.programmed.backends.get(&id)?;
        let listers: BTreeSet<u32> = self
            .listers
            .get(key)?
            .values()
            .map(|listing| listing.id)
            .collect();
        let links: BTreeSet<u32> = listers.into_iter().take(MAX_REVNAT_SERVICES).collect();
        Some(UsableBackend {
            id,
            revnat: links.clone(),
            links,
            final_value,
        })
    }

    /// Remembers every desired service port and who lists each backend,
    /// for the next apply to find what changed.
    fn remember_all(&mut self, desired: &DesiredState) {
        self.applied = desired
            .services()
            .map(|(name, port)| (name.clone(), port.clone()))
            .collect();
        self.listers.clear();
        for (name, port) in desired.services() {
            let id = self.service_ids[name];
            for (addr, readiness) in &port.backends {
                self.listers
                    .entry(backend_key(*addr, name.proto))
                    .or_default()
                    .insert(name.clone(), Listing::of(id, port, addr, *readiness));
            }
        }
    }

    /// Finds the service ports that changed since the last apply (by
    /// comparing each with the one last applied), gives new ones their id,
    /// drops removed ones' ids, updates what is remembered, and returns
    /// what this apply must look at.
    fn scope_changes(&mut self, desired: &DesiredState) -> Scope {
        // Both in name order: one merged walk.
        let mut changed: Vec<ServicePortName> = Vec::new();
        let mut removed: Vec<ServicePortName> = Vec::new();
        let mut applied = self.applied.iter().peekable();
        for (name, port) in desired.services() {
            while let Some((old_name, _)) = applied.next_if(|(old_name, _)| *old_name < name) {
                removed.push(old_name.clone());
            }
            match applied.next_if(|(old_name, _)| *old_name == name) {
                Some((_, old_port)) if old_port == port => {}
                _ => changed.push(name.clone()),
            }
        }
        removed.extend(applied.map(|(name, _)| name.clone()));

        // New ids in name order, while removed ones are still taken (as
        // `assign_service_ids` does).
        let mut taken = self.taken_stats_entries();
        for name in &changed {
            if !self.service_ids.contains_key(name) {
                let id = self.new_service_id(&mut taken);
                self.fresh_service_ids.insert(id);
                self.service_ids.insert(name.clone(), id);
            }
        }

        let mut scope = Scope {
            services: changed.iter().cloned().collect(),
            ids: BTreeMap::new(),
            backends: BTreeSet::new(),
            old_listers: BTreeMap::new(),
            old_frontends: BTreeSet::new(),
        };
        for name in changed.iter().chain(&removed) {
            let id = self.service_ids[name];
            let frontends = scope.ids.entry(id).or_default();
            if let Some(old) = self.applied.get(name) {
                for frontend in old.frontends.keys() {
                    frontends.insert(frontend.key());
                    scope.old_frontends.insert((frontend.key(), *frontend));
                }
                for addr in old.backends.keys() {
                    scope.backends.insert(backend_key(*addr, name.proto));
                }
            }
            if let Some(new) = desired.service(name) {
                for addr in new.backends.keys() {
                    scope.backends.insert(backend_key(*addr, name.proto));
                }
            }
        }
        for key in &scope.backends {
            let ids = self
                .listers
                .get(key)
                .into_iter()
                .flat_map(|listers| listers.values().map(|listing| listing.id))
                .collect();
            scope.old_listers.insert(*key, ids);
        }

        for name in changed.iter().chain(&removed) {
            if let Some(old) = self.applied.remove(name) {
                for addr in old.backends.keys() {
                    let key = backend_key(*addr, name.proto);
                    if let Some(listers) = self.listers.get_mut(&key) {
                        listers.remove(name);
                        if listers.is_empty() {
                            self.listers.remove(&key);
                        }
                    }
                }
            }
            if let Some(new) = desired.service(name) {
                let id = self.service_ids[name];
                for (addr, readiness) in &new.backends {
                    self.listers
                        .entry(backend_key(*addr, name.proto))
                        .or_default()
                        .insert(name.clone(), Listing::of(id, new, addr, *readiness));
                }
                self.applied.insert(name.clone(), new.clone());
            }
        }
        for name in &removed {
            self.service_ids.remove(name);
        }

        // Service ports sharing a backend with a change: its reverse-NAT
        // links or usability may change their slots.
        for key in &scope.backends {
            if let Some(listers) = self.listers.get(key) {
                scope.services.extend(listers.keys().cloned());
            }
        }
        for name in &scope.services {
            let id = self.service_ids[name];
            let frontends = scope.ids.entry(id).or_default();
            if let Some(port) = desired.service(name) {
                frontends.extend(port.frontends.keys().map(|frontend| frontend.key()));
            }
        }
        scope
    }

    /// Gives every desired service port its id: the one it has, else one a
    /// previous instance used for one of its frontends, else a new one.
    /// Ids of service ports no longer desired are dropped for good.
    fn assign_service_ids(&mut self, desired: &DesiredState) {
        let mut ids = BTreeMap::new();
        // Built once per apply and kept up to date, not once per new id:
        // 30,000 new services would otherwise cost 30,000 set builds.
        let mut taken = self.taken_stats_entries();
        for (name, port) in desired.services() {
            let id = match self.service_ids.get(name) {
                Some(id) => *id,
                None => {
                    let inherited = port
                        .frontends
                        .keys()
                        .find_map(|frontend| self.inherited_ids.get(&frontend.key()).copied());
                    let id = match inherited {
                        Some(id) => id,
                        None => {
                            let id = self.new_service_id(&mut taken);
                            self.fresh_service_ids.insert(id);
                            id
                        }
                    };
                    self.inherited_ids.retain(|_, inherited| *inherited != id);
                    id
                }
            };
            ids.insert(name.clone(), id);
        }
        // Only the first desired state can claim a previous instance's ids.
        self.inherited_ids.clear();
        self.service_ids = ids;
    }

    /// The counter entries (`id % MAX_SERVICE_STATS`) of the live service
    /// ids: kept from the last apply, or inherited from a previous instance.
    fn taken_stats_entries(&self) -> BTreeSet<u32> {
        self.service_ids
            .values()
            .chain(self.inherited_ids.values())
            .map(|id| id % MAX_SERVICE_STATS)
            .collect()
    }

    /// The next unused service id whose counter entry no live service
    /// uses (`taken`, which the new id joins), unless every entry is taken.
    fn new_service_id(&mut self, taken: &mut BTreeSet<u32>) -> u32 {
        let mut id = self.next_service_id;
        if (taken.len() as u32) < MAX_SERVICE_STATS {
            while taken.contains(&(id % MAX_SERVICE_STATS)) {
                id += 1;
            }
        }
        taken.insert(id % MAX_SERVICE_STATS);
        self.next_service_id = id + 1;
        id
    }

    /// The service ports programmed, with their service ids.
    pub fn service_ports(&self) -> impl Iterator<Item = (&ServicePortName, u32)> {
        self.service_ids.iter().map(|(name, id)| (name, *id))
    }

    /// Step 1 for one backend: its `LB_BACKENDS` entry and `LB_REVNAT`
    /// additions. `None` if it cannot be used by this apply.
    fn program_backend(
        &mut self,
        key: &BackendAddr,
        backend: &WantedBackend,
        report: &mut ApplyReport,
    ) -> Option<UsableBackend> {
        let (id, fresh) = match self.backend_ids.get(key) {
            Some(id) => (*id, false),
            None => match self.allocate_backend_id() {
                Some(id) => (id, true),
                None => {
                    report.failures += 1;
                    self.map_errors += 1;
                    error!(
                        "no free backend id for {} ({MAP_BACKENDS} holds {} entries; raise --max-backends)",
                        l4(key.addr, key.port, key.proto),
                        self.backend_capacity
                    );
                    return None;
                }
            },
        };
        let mut flags = BACKEND_F_ACTIVE;
        if !backend.ready_anywhere {
            flags |= BACKEND_F_NOT_READY;
        }
        if backend.local {
            flags |= BACKEND_F_LOCAL;
        }
        let final_value = Backend {
            addr: key.addr,
            port: key.port,
            proto: key.proto,
            flags,
        };
        // A backend that turns not ready keeps its ready flag until step 4,
        // when no slot names it any more: a slot never names a backend
        // flagged not ready.
        let programmed = self.programmed.backends.get(&id).copied();
        let turns_not_ready = programmed
            .is_some_and(|old| old.flags & BACKEND_F_NOT_READY == 0 && !backend.ready_anywhere);
        let value = if turns_not_ready {
            Backend {
                flags: flags & !BACKEND_F_NOT_READY,
                ..final_value
            }
        } else {
            final_value
        };
        if fresh {
            // A reused id starts counting from zero; if zeroing fails the
            // backend still works, with its predecessor's counts.
            self.write(
                MapWrite::ResetBackendStats {
                    slot: id % MAX_BACKEND_STATS,
                },
                report,
            );
        }
        if programmed != Some(value) && !self.write(MapWrite::Backend { id, value }, report) {
            if fresh {
                self.release_backend_id(id);
            }
            return None;
        }
        if fresh {
            self.backend_ids.insert(*key, id);
        }

        // The services whose replies from this backend can be
        // reverse-translated: the lowest ids if more than the entry holds.
        let revnat: BTreeSet<u32> = backend
            .services
            .iter()
            .copied()
            .take(MAX_REVNAT_SERVICES)
            .collect();
        if backend.services.len() > MAX_REVNAT_SERVICES {
            if self.revnat_overflow.insert(*key) {
                warn!(
                    "backend {} is listed by {} service ports; only {MAX_REVNAT_SERVICES} can use it (service ids {:?})",
                    l4(key.addr, key.port, key.proto),
                    backend.services.len(),
                    revnat
                );
            }
        } else {
            self.revnat_overflow.remove(key);
        }
        // Add the new links now; links to remove stay until step 4, as a
        // slot may still name the backend for them. A new link that does
        // not fit beside them waits for step 4 (its service does not name
        // the backend in this apply), and the next apply adds it.
        let current = self.programmed.revnat.get(key).copied();
        let current_ids = current.as_ref().map(revnat_ids).unwrap_or_default();
        let additions = revnat
            .iter()
            .copied()
            .filter(|id| !current_ids.contains(id));
        let union = if additions.clone().count() + current_ids.len() <= MAX_REVNAT_SERVICES {
            revnat_value(
                revnat.iter().copied().chain(
                    current_ids
                        .iter()
                        .copied()
                        .filter(|id| !revnat.contains(id)),
                ),
            )
        } else {
            revnat_value(current_ids.iter().copied().chain(additions))
        };
        let linked = revnat_ids(&union);
        let adds = revnat
            .iter()
            .any(|id| !current_ids.contains(id) && linked.contains(id));
        let usable_by: BTreeSet<u32> = revnat
            .iter()
            .copied()
            .filter(|id| linked.contains(id))
            .collect();
        if usable_by.len() < revnat.len() {
            self.links_deferred = true;
        }
        if adds
            && !self.write(
                MapWrite::RevNat {
                    key: *key,
                    value: union,
                },
                report,
            )
        {
            return None;
        }
        Some(UsableBackend {
            id,
            revnat: usable_by,
            links: revnat,
            final_value,
        })
    }

    /// Writes the Maglev table of service `id` for its ready backends
    /// (address, backend id); only entries that differ are written. Returns
    /// the table index, `Some(None)` when every table is taken, `None`
    /// when a write failed.
    fn program_maglev(
        &mut self,
        id: u32,
        name: &ServicePortName,
        ready_backends: &[(SocketAddrV4, u32)],
        report: &mut ApplyReport,
    ) -> Option<Option<u16>> {
        let size = self.maglev_table_size;
        let table = match self.maglev_tables.get(&id) {
            Some(table) => *table,
            None => {
                let capacity = (self.maps.maglev_capacity() / size).min(u32::from(u16::MAX) + 1);
                let taken: BTreeSet<u16> = self.maglev_tables.values().copied().collect();
                let free = (0..capacity)
                    .map(|table| table as u16)
                    .find(|table| !taken.contains(table));
                let Some(table) = free else {
                    if self.maglev_overflow.insert(id) {
                        warn!(
                            "{name}: every Maglev table is taken ({MAP_MAGLEV} holds {capacity} tables of {size} entries); choosing backends at random"
                        );
                    }
                    return Some(None);
                };
                self.maglev_tables.insert(id, table);
                table
            }
        };
        let addrs: Vec<SocketAddrV4> = ready_backends.iter().map(|(addr, _)| *addr).collect();
        let entries: Vec<u32> = maglev::table(&addrs, size)
            .into_iter()
            .map(|index| ready_backends[index as usize].1)
            .collect();
        let current = self
            .programmed
            .maglev
            .get(&table)
            .cloned()
            .unwrap_or_default();
        for (entry, &backend_id) in entries.iter().enumerate() {
            if current.get(entry) != Some(&backend_id)
                && !self.write(
                    MapWrite::Maglev {
                        table,
                        entry: entry as u32,
                        backend_id,
                    },
                    report,
                )
            {
                return None;
            }
        }
        Some(Some(table))
    }

    fn allocate_backend_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_backend_ids.pop_first() {
            return Some(id);
        }
        if self.next_backend_id >= self.backend_capacity {
            return None;
        }
        let id = self.next_backend_id;
        self.next_backend_id += 1;
        Some(id)
    }

    fn release_backend_id(&mut self, id: u32) {
        if id + 1 == self.next_backend_id {
            self.next_backend_id = id;
            // Fold trailing free ids back into the counter.
            while self.free_backend_ids.last() == Some(&(self.next_backend_id - 1)) {
                self.free_backend_ids.pop_last();
                self.next_backend_id -= 1;
            }
        } else {
            self.free_backend_ids.insert(id);
        }
    }

    /// Keeps [`Self::frontends_per_id`] for a successful write, before the
    /// mirror takes it.
    fn count_frontend_ids(&mut self, write: &MapWrite) {
        let (key, new_id) = match write {
            MapWrite::Service { key, value } => (key, Some(value.id)),
            MapWrite::DeleteService { key } => (key, None),
            _ => return,
        };
        if let Some(old) = self.programmed.services.get(key) {
            let count = self.frontends_per_id.entry(old.id).or_default();
            *count -= 1;
            if *count == 0 {
                self.frontends_per_id.remove(&old.id);
            }
        }
        if let Some(id) = new_id {
            *self.frontends_per_id.entry(id).or_default() += 1;
        }
    }

    /// Sets in `LB_PORTS` every bit a programmed entry needs.
    fn fill_port_filter(&mut self, report: &mut ApplyReport) {
        let missing: Vec<MapWrite> = self
            .port_users
            .iter()
            .filter_map(|(&port, users)| {
                let current = self.programmed.ports.get(&port).copied().unwrap_or(0);
                let bits = current | users.bits();
                (bits != current).then_some(MapWrite::Port { port, bits })
            })
            .collect();
        for write in missing {
            self.write_entry(write, report);
        }
    }

    /// Clears in `LB_PORTS` every bit no programmed entry needs.
    fn trim_port_filter(&mut self, report: &mut ApplyReport) {
        let extra: Vec<MapWrite> = self
            .programmed
            .ports
            .iter()
            .filter_map(|(&port, &current)| {
                let needed = self.port_users.get(&port).map_or(0, PortUsers::bits);
                (current & !needed != 0).then_some(MapWrite::Port {
                    port,
                    bits: current & needed,
                })
            })
            .collect();
        for write in extra {
            self.write_entry(write, report);
        }
    }

    /// Keeps [`Self::port_users`] for a successful write, before the
    /// mirror takes it.
    fn count_port_users(&mut self, write: &MapWrite) {
        match write {
            MapWrite::Service { key, value } => {
                let old = self.programmed.services.get(key).copied();
                let users = self.port_users.entry(u16::from_be(key.port)).or_default();
                users.frontend(value, true);
                if let Some(old) = old {
                    users.frontend(&old, false);
                }
            }
            MapWrite::DeleteService { key } => {
                if let Some(old) = self.programmed.services.get(key) {
                    self.port_users
                        .entry(u16::from_be(key.port))
                        .or_default()
                        .frontend(old, false);
                }
            }
            MapWrite::RevNat { key, .. } if !self.programmed.revnat.contains_key(key) => {
                self.port_users
                    .entry(u16::from_be(key.port))
                    .or_default()
                    .backends += 1;
            }
            MapWrite::DeleteRevNat { key } if self.programmed.revnat.contains_key(key) => {
                let users = self.port_users.entry(u16::from_be(key.port)).or_default();
                users.backends = users.backends.saturating_sub(1);
            }
            _ => {}
        }
    }

    /// The port (host byte order) whose `LB_PORTS` bits a successful
    /// `write` may have left unused.
    fn port_released_by(write: &MapWrite) -> Option<u16> {
        match write {
            MapWrite::Service { key, .. } | MapWrite::DeleteService { key } => {
                Some(u16::from_be(key.port))
            }
            MapWrite::DeleteRevNat { key } => Some(u16::from_be(key.port)),
            _ => None,
        }
    }

    /// Carries out one write, keeping the port filter (`LB_PORTS`) ahead
    /// of it: the bits a frontend or backend needs are set before it is
    /// written (if that fails, neither is written), and bits its removal
    /// leaves unused are cleared after it. On success mirrors it, on
    /// failure logs and counts it. Returns whether it succeeded.
    fn write(&mut self, write: MapWrite, report: &mut ApplyReport) -> bool {
        if let Some((port, bits)) = port_needed_by(&write) {
            let current = self.programmed.ports.get(&port).copied().unwrap_or(0);
            if current & bits != bits
                && !self.write_entry(
                    MapWrite::Port {
                        port,
                        bits: current | bits,
                    },
                    report,
                )
            {
                return false;
            }
        }
        if !self.write_entry(write, report) {
            return false;
        }
        if let Some(port) = Self::port_released_by(&write) {
            let current = self.programmed.ports.get(&port).copied().unwrap_or(0);
            let needed = match self.port_users.get(&port) {
                Some(users) if *users != PortUsers::default() => users.bits(),
                _ => {
                    self.port_users.remove(&port);
                    0
                }
            };
            if current & !needed != 0 {
                // A failure leaves a bit too many (a lookup, not a miss);
                // the next (full) apply clears it.
                self.write_entry(
                    MapWrite::Port {
                        port,
                        bits: current & needed,
                    },
                    report,
                );
            }
        }
        true
    }

    /// Carries out one write as it is; see [`Self::write`].
    fn write_entry(&mut self, write: MapWrite, report: &mut ApplyReport) -> bool {
        match self.maps.write(&write) {
            Ok(()) => {
                self.count_frontend_ids(&write);
                self.count_port_users(&write);
                self.programmed.apply(&write);
                report.writes += 1;
                true
            }
            Err(err) => {
                self.map_errors += 1;
                report.failures += 1;
                error!(
                    error = %err,
                    cause = %err.source,
                    "map write failed, keeping the previous entry: {write}"
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Frontend, FrontendKind, Readiness, ServicePort, SourceRanges, Traffic};
    use lb_common::backend::BACKEND_F_LOCAL;
    use lb_common::service::SERVICE_F_EXTERNAL;

    /// An in-memory map set that records every write, checks the
    /// datapath's invariants after each one, and can refuse writes.
    #[derive(Default)]
    struct FakeMaps {
        contents: MapContents,
        log: Vec<MapWrite>,
        backend_capacity: u32,
        /// Refuse inserting a new key once a map holds this many.
        slot_capacity: Option<usize>,
        service_capacity: Option<usize>,
        source_range_capacity: Option<usize>,
        /// Refuse every write to this map.
        broken_map: Option<&'static str>,
        highest_flow_service_id: u32,
        /// Entries of `LB_MAGLEV`; tests use tables of [`TEST_MAGLEV_SIZE`].
        maglev_capacity: u32,
        /// Skip the invariant checks (timing tests on large states).
        unchecked: bool,
    }

    /// A small prime table size, so invariants can check whole tables
    /// after every write.
    const TEST_MAGLEV_SIZE: u32 = 101;

    impl FakeMaps {
        fn new() -> Self {
            Self {
                backend_capacity: 64,
                maglev_capacity: 2 * TEST_MAGLEV_SIZE,
                ..Self::default()
            }
        }

        fn full(map: &'static str) -> MapWriteError {
            MapWriteError {
                call: "bpf_map_update_elem",
                map,
                source: Box::new(std::io::Error::from_raw_os_error(libc::E2BIG)),
            }
        }
    }

    impl MapOps for FakeMaps {
        fn write(&mut self, write: &MapWrite) -> Result<(), MapWriteError> {
            if self.broken_map == Some(write.map()) {
                return Err(Self::full(write.map()));
            }
            match write {
                MapWrite::SourceRange { key }
                    if !self.contents.source_ranges.contains(key)
                        && Some(self.contents.source_ranges.len())
                            == self.source_range_capacity =>
                {
                    return Err(Self::full(MAP_SOURCE_RANGES));
                }
                MapWrite::Slot { key, .. }
                    if !self.contents.slots.contains_key(key)
                        && Some(self.contents.slots.len()) == self.slot_capacity =>
                {
                    return Err(Self::full(MAP_SLOTS));
                }
                MapWrite::Service { key, .. }
                    if !self.contents.services.contains_key(key)
                        && Some(self.contents.services.len()) == self.service_capacity =>
                {
                    return Err(Self::full(MAP_SERVICES));
                }
                _ => {}
            }
            self.contents.apply(write);
            self.log.push(*write);
            if !self.unchecked {
                check_invariants(&self.contents, self.log.len());
            }
            Ok(())
        }

        fn read_all(&self) -> Result<MapContents, MapReadError> {
            Ok(self.contents.clone())
        }

        fn highest_flow_service_id(&self) -> Result<u32, MapReadError> {
            Ok(self.highest_flow_service_id)
        }

        fn backend_capacity(&self) -> u32 {
            self.backend_capacity
        }

        fn maglev_capacity(&self) -> u32 {
            self.maglev_capacity
        }
    }

    /// What the datapath relies on, at every instant: each slot a
    /// frontend's count covers exists and names a live backend whose
    /// reverse-NAT entry lists the service and which is a member of it;
    /// a Maglev service with backends has a whole table of such backends;
    /// every member is a live, ready backend.
    fn check_invariants(contents: &MapContents, after_write: usize) {
        let port_bits = |port: u16| {
            contents
                .ports
                .get(&u16::from_be(port))
                .copied()
                .unwrap_or(0)
        };
        for (key, value) in &contents.services {
            let bits = frontend_port_bits(value);
            assert_eq!(
                port_bits(key.port) & bits,
                bits,
                "after write {after_write}: the port filter hides frontend {key:?}"
            );
        }
        for key in contents.revnat.keys() {
            assert_ne!(
                port_bits(key.port) & PORT_F_BACKEND,
                0,
                "after write {after_write}: the port filter hides backend {key:?}"
            );
        }
        for member in &contents.members {
            let backend = contents.backends.get(&member.backend_id);
            assert!(
                backend.is_some_and(|b| b.flags & BACKEND_F_NOT_READY == 0),
                "after write {after_write}: member {member:?} is not a live ready backend"
            );
        }
        for (key, value) in &contents.services {
            assert_ne!(value.id, 0, "after write {after_write}: service id 0");
            if value.flags & SERVICE_F_MAGLEV != 0 && value.backend_count > 0 {
                let table = contents.maglev.get(&value.maglev_table);
                assert_eq!(
                    table.map(Vec::len),
                    Some(TEST_MAGLEV_SIZE as usize),
                    "after write {after_write}: {key:?} uses an incomplete Maglev table"
                );
                for backend_id in table.into_iter().flatten() {
                    assert!(
                        contents.members.contains(&MemberKey {
                            service_id: value.id,
                            backend_id: *backend_id,
                        }),
                        "after write {after_write}: table of {key:?} names non-member {backend_id}"
                    );
                }
            }
            for slot in 0..value.backend_count {
                let slot_key = SlotKey {
                    service_id: value.id,
                    slot,
                };
                let Some(entry) = contents.slots.get(&slot_key) else {
                    panic!("after write {after_write}: {key:?} counts unwritten slot {slot}");
                };
                let Some(backend) = contents.backends.get(&entry.backend_id) else {
                    panic!(
                        "after write {after_write}: slot {slot} of service {} names missing backend {}",
                        value.id, entry.backend_id
                    );
                };
                assert_eq!(
                    backend.flags & BACKEND_F_NOT_READY,
                    0,
                    "after write {after_write}: slot {slot} of service {} names a not-ready backend",
                    value.id
                );
                let revnat = contents
                    .revnat
                    .get(&BackendAddr::new(backend.addr, backend.port, backend.proto))
                    .unwrap_or_else(|| panic!("after write {after_write}: no revnat for backend"));
                assert!(
                    revnat_ids(revnat).contains(&value.id),
                    "after write {after_write}: revnat of backend {} lacks service {}",
                    entry.backend_id,
                    value.id
                );
                assert!(
                    contents.members.contains(&MemberKey {
                        service_id: value.id,
                        backend_id: entry.backend_id,
                    }),
                    "after write {after_write}: slot {slot} of service {} names a non-member",
                    value.id
                );
            }
        }
    }

    fn name(service: &str) -> ServicePortName {
        ServicePortName {
            namespace: "default".into(),
            name: service.into(),
            port_name: String::new(),
            proto: Protocol::Tcp,
            traffic: Traffic::Internal,
        }
    }

    fn frontend(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(198, 18, 100, last),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn pod(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, last), 8080)
    }

    /// A service for [`state`]: its name, frontend and (pod, ready) list.
    type TestService<'a> = (&'a str, Frontend, &'a [(u8, bool)]);

    /// A desired state from (service, frontend, [(pod, ready)]).
    fn state(services: &[TestService<'_>]) -> DesiredState {
        let mut state = DesiredState::new();
        for (service, frontend, pods) in services {
            let backends = pods
                .iter()
                .map(|(last, ready)| {
                    let readiness = if *ready {
                        Readiness::Ready
                    } else {
                        Readiness::NotReady
                    };
                    (pod(*last), readiness)
                })
                .collect();
            let conflicts = state.insert(
                name(service),
                ServicePort {
                    frontends: [*frontend].into(),
                    backends,
                    ..ServicePort::default()
                },
            );
            assert!(conflicts.is_empty());
        }
        state
    }

    fn writer() -> Writer<FakeMaps> {
        let mut writer = Writer::new(FakeMaps::new());
        writer.set_selection(Selection::Random, TEST_MAGLEV_SIZE);
        writer
    }

    fn backend_id(writer: &Writer<FakeMaps>, last: u8) -> u32 {
        writer.backend_ids[&backend_key(pod(last), Protocol::Tcp)]
    }

    /// The slots `0..count` of a frontend, as backend host octets.
    fn selectable(writer: &Writer<FakeMaps>, frontend: Frontend) -> Vec<u8> {
        let contents = &writer.maps.contents;
        let value = contents.services[&frontend.key()];
        (0..value.backend_count)
            .map(|slot| {
                let id = contents.slots[&SlotKey {
                    service_id: value.id,
                    slot,
                }]
                    .backend_id;
                ipv4(contents.backends[&id].addr).octets()[3]
            })
            .collect()
    }

    fn take_log(writer: &mut Writer<FakeMaps>) -> Vec<MapWrite> {
        std::mem::take(&mut writer.maps.log)
    }

    /// [`take_log`] without `LB_MEMBERS` writes (checked by the invariants
    /// and by `members_follow_readiness_per_service`) and counter resets
    /// (checked by `new_ids_start_with_zeroed_counters`).
    fn take_log_without_members(writer: &mut Writer<FakeMaps>) -> Vec<MapWrite> {
        take_log(writer)
            .into_iter()
            .filter(|w| {
                !matches!(
                    w,
                    MapWrite::Member { .. }
                        | MapWrite::DeleteMember { .. }
                        | MapWrite::ResetServiceStats { .. }
                        | MapWrite::ResetBackendStats { .. }
                )
            })
            .collect()
    }

    #[test]
    fn first_apply_writes_backends_then_slots_then_services() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let report = writer.apply(&state(&[("web", web, &[(10, true), (11, false)])]));
        assert_eq!(report.failures, 0);
        assert_eq!(report.frontends, 1);
        assert_eq!(report.backends, 2);

        let log = take_log(&mut writer);
        let kinds: Vec<&str> = log
            .iter()
            .map(|w| match w {
                MapWrite::Backend { .. } => "backend",
                MapWrite::RevNat { .. } => "revnat",
                MapWrite::Slot { .. } => "slot",
                MapWrite::Service { .. } => "service",
                MapWrite::Member { .. } => "member",
                MapWrite::ResetServiceStats { .. } | MapWrite::ResetBackendStats { .. } => "reset",
                MapWrite::Port { .. } => "port",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "reset", "backend", "port", "revnat", "reset", "backend", "revnat", "reset",
                "member", "slot", "port", "service"
            ]
        );
        assert_eq!(writer.programmed(), &writer.maps.contents);
        assert_eq!(selectable(&writer, web), [10]);

        // The not-ready backend is listed (flag, revnat) but in no slot.
        let not_ready = writer.maps.contents.backends[&backend_id(&writer, 11)];
        assert_eq!(not_ready.flags, BACKEND_F_ACTIVE | BACKEND_F_NOT_READY);
        let revnat = writer.maps.contents.revnat[&backend_key(pod(11), Protocol::Tcp)];
        assert_eq!(
            revnat_ids(&revnat),
            [writer.service_id(&name("web")).unwrap()]
        );
    }

    #[test]
    fn unchanged_state_costs_no_write() {
        let mut writer = writer();
        let desired = state(&[
            ("web", frontend(1, 80), &[(10, true), (11, true)]),
            ("db", frontend(2, 5432), &[(20, true), (21, false)]),
        ]);
        writer.apply(&desired);
        take_log(&mut writer);
        let report = writer.apply(&desired);
        assert_eq!(report.writes, 0);
        assert!(take_log(&mut writer).is_empty());
    }

    #[test]
    fn changing_one_service_leaves_the_others_untouched() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let db = frontend(2, 5432);
        writer.apply(&state(&[
            ("web", web, &[(10, true)]),
            ("db", db, &[(20, true), (21, true)]),
        ]));
        take_log(&mut writer);
        writer.apply(&state(&[
            ("web", web, &[(10, true), (12, true)]),
            ("db", db, &[(20, true), (21, true)]),
        ]));
        let db_id = writer.service_id(&name("db")).unwrap();
        for write in take_log(&mut writer) {
            match write {
                MapWrite::Service { key, .. } | MapWrite::DeleteService { key } => {
                    assert_ne!(key, db.key())
                }
                MapWrite::Slot { key, .. } | MapWrite::DeleteSlot { key } => {
                    assert_ne!(key.service_id, db_id)
                }
                _ => {}
            }
        }
    }

    #[test]
    fn growing_writes_new_slots_then_count() {
        let mut writer = writer();
        let web = frontend(1, 80);
        writer.apply(&state(&[("web", web, &[(10, true), (11, true)])]));
        take_log(&mut writer);
        writer.apply(&state(&[(
            "web",
            web,
            &[(10, true), (11, true), (12, true)],
        )]));
        let id = writer.service_id(&name("web")).unwrap();
        let b12 = backend_id(&writer, 12);
        let log = take_log_without_members(&mut writer);
        assert!(matches!(log[0], MapWrite::Backend { id, .. } if id == b12));
        assert!(matches!(log[1], MapWrite::RevNat { .. }));
        assert_eq!(
            log[2],
            MapWrite::Slot {
                key: SlotKey {
                    service_id: id,
                    slot: 2
                },
                value: Slot { backend_id: b12 }
            }
        );
        assert!(
            matches!(log[3], MapWrite::Service { value, .. } if value.backend_count == 3 && value.id == id)
        );
        assert_eq!(log.len(), 4);
        assert_eq!(selectable(&writer, web), [10, 11, 12]);
    }

    #[test]
    fn shrinking_rewrites_kept_slots_then_count_then_deletes_tail() {
        let mut writer = writer();
        let web = frontend(1, 80);
        writer.apply(&state(&[(
            "web",
            web,
            &[(10, true), (11, true), (12, true)],
        )]));
        take_log(&mut writer);
        let b10 = backend_id(&writer, 10);
        let b12 = backend_id(&writer, 12);
        let id = writer.service_id(&name("web")).unwrap();

        // 10 leaves: 12 moves from slot 2 into slot 0; slot 1 (11) stays.
        writer.apply(&state(&[("web", web, &[(11, true), (12, true)])]));
        let log = take_log_without_members(&mut writer);
        assert_eq!(
            log,
            [
                MapWrite::Slot {
                    key: SlotKey {
                        service_id: id,
                        slot: 0
                    },
                    value: Slot { backend_id: b12 }
                },
                MapWrite::Service {
                    key: web.key(),
                    value: ServiceValue {
                        id,
                        backend_count: 2,
                        ..ServiceValue::default()
                    }
                },
                MapWrite::DeleteSlot {
                    key: SlotKey {
                        service_id: id,
                        slot: 2
                    }
                },
                MapWrite::DeleteRevNat {
                    key: backend_key(pod(10), Protocol::Tcp)
                },
                MapWrite::Backend {
                    id: b10,
                    value: Backend::default()
                },
            ]
        );
        assert_eq!(selectable(&writer, web), [12, 11]);
    }

    #[test]
    fn a_service_that_keeps_a_backend_never_loses_its_frontend() {
        // Replace every backend of a service, step by step and at once, and
        // check after every single write that the frontend still exists
        // with at least one selectable backend.
        let web = frontend(1, 80);
        let steps: [&[(u8, bool)]; 5] = [
            &[(10, true), (11, true)],
            &[(12, true), (13, true), (14, true)],
            &[(14, true)],
            &[(14, false), (15, true), (16, true), (17, true)],
            &[(10, true)],
        ];
        let mut writer = writer();
        writer.apply(&state(&[("web", web, steps[0])]));
        for step in &steps[1..] {
            let mut replay = writer.maps.contents.clone();
            take_log(&mut writer);
            writer.apply(&state(&[("web", web, step)]));
            for write in take_log(&mut writer) {
                replay.apply(&write);
                let value = replay.services.get(&web.key()).expect("frontend vanished");
                assert!(value.backend_count > 0, "count 0 during {write}");
            }
        }
        assert_eq!(selectable(&writer, web), [10]);
    }

    #[test]
    fn deleted_service_loses_its_entry_before_its_slots() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let db = frontend(2, 5432);
        writer.apply(&state(&[
            ("web", web, &[(10, true)]),
            ("db", db, &[(20, true)]),
        ]));
        take_log(&mut writer);
        writer.apply(&state(&[("db", db, &[(20, true)])]));
        let log = take_log_without_members(&mut writer);
        assert_eq!(log[0], MapWrite::DeleteService { key: web.key() });
        // Its port, which no other frontend has, leaves the port filter
        // once the frontend is gone; the backends' port 8080 stays (db's).
        assert_eq!(log[1], MapWrite::Port { port: 80, bits: 0 });
        assert!(matches!(log[2], MapWrite::DeleteSlot { .. }));
        assert!(matches!(log[3], MapWrite::DeleteRevNat { .. }));
        assert!(matches!(log[4], MapWrite::Backend { value, .. } if !value.is_active()));
        assert_eq!(log.len(), 5);
    }

    #[test]
    fn ready_to_not_ready_keeps_backend_listed() {
        let mut writer = writer();
        let web = frontend(1, 80);
        writer.apply(&state(&[("web", web, &[(10, true), (11, true)])]));
        let b11 = backend_id(&writer, 11);
        writer.apply(&state(&[("web", web, &[(10, true), (11, false)])]));
        assert_eq!(selectable(&writer, web), [10]);
        let backend = writer.maps.contents.backends[&b11];
        assert_eq!(backend.flags, BACKEND_F_ACTIVE | BACKEND_F_NOT_READY);
        assert!(
            writer
                .maps
                .contents
                .revnat
                .contains_key(&backend_key(pod(11), Protocol::Tcp))
        );
        // No ready backend at all: count 0 (refuse), backends still listed.
        writer.apply(&state(&[("web", web, &[(10, false), (11, false)])]));
        assert_eq!(writer.maps.contents.services[&web.key()].backend_count, 0);
        assert!(writer.maps.contents.slots.is_empty());
        assert_eq!(writer.maps.contents.backends.len(), 2);
        assert_eq!(writer.maps.contents.revnat.len(), 2);
    }

    #[test]
    fn shared_backends_are_deduplicated_and_reference_counted() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let alt = frontend(2, 80);
        writer.apply(&state(&[
            ("web", web, &[(10, true)]),
            ("alt", alt, &[(10, true)]),
        ]));
        assert_eq!(writer.maps.contents.backends.len(), 1);
        let key = backend_key(pod(10), Protocol::Tcp);
        let web_id = writer.service_id(&name("web")).unwrap();
        let alt_id = writer.service_id(&name("alt")).unwrap();
        let mut both = vec![web_id, alt_id];
        both.sort();
        assert_eq!(revnat_ids(&writer.maps.contents.revnat[&key]), both);

        writer.apply(&state(&[("web", web, &[(10, true)])]));
        assert_eq!(writer.maps.contents.backends.len(), 1);
        assert_eq!(revnat_ids(&writer.maps.contents.revnat[&key]), [web_id]);

        writer.apply(&state(&[("web", web, &[])]));
        assert!(writer.maps.contents.backends.is_empty());
        assert!(writer.maps.contents.revnat.is_empty());
        assert_eq!(writer.maps.contents.services[&web.key()].backend_count, 0);
    }

    #[test]
    fn backend_ids_are_reused_lowest_first() {
        let mut writer = writer();
        let web = frontend(1, 80);
        writer.apply(&state(&[(
            "web",
            web,
            &[(10, true), (11, true), (12, true)],
        )]));
        assert_eq!(
            [10, 11, 12].map(|last| backend_id(&writer, last)),
            [1, 2, 3]
        );
        writer.apply(&state(&[("web", web, &[(10, true), (12, true)])]));
        writer.apply(&state(&[(
            "web",
            web,
            &[(10, true), (12, true), (13, true)],
        )]));
        assert_eq!(backend_id(&writer, 13), 2);
        writer.apply(&state(&[("web", web, &[(10, true)])]));
        writer.apply(&state(&[("web", web, &[(10, true), (14, true)])]));
        assert_eq!(backend_id(&writer, 14), 2);
    }

    #[test]
    fn service_ids_are_stable_and_never_reused() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let db = frontend(2, 5432);
        writer.apply(&state(&[("web", web, &[(10, true)])]));
        let web_id = writer.service_id(&name("web")).unwrap();
        writer.apply(&state(&[
            ("web", web, &[(10, true), (11, true)]),
            ("db", db, &[(20, true)]),
        ]));
        assert_eq!(writer.service_id(&name("web")), Some(web_id));
        let db_id = writer.service_id(&name("db")).unwrap();
        assert!(db_id > web_id);

        writer.apply(&state(&[("db", db, &[(20, true)])]));
        writer.apply(&state(&[
            ("web", web, &[(10, true)]),
            ("db", db, &[(20, true)]),
        ]));
        let new_web_id = writer.service_id(&name("web")).unwrap();
        assert!(new_web_id > db_id, "id {web_id} reused as {new_web_id}");
    }

    #[test]
    fn frontend_moving_to_another_service_is_rewritten_not_deleted() {
        let mut writer = writer();
        let vip = frontend(1, 80);
        writer.apply(&state(&[("old", vip, &[(10, true)])]));
        take_log(&mut writer);
        writer.apply(&state(&[("new", vip, &[(11, true)])]));
        let log = take_log(&mut writer);
        assert!(!log.contains(&MapWrite::DeleteService { key: vip.key() }));
        assert_eq!(selectable(&writer, vip), [11]);
        assert_eq!(
            writer.maps.contents.services[&vip.key()].id,
            writer.service_id(&name("new")).unwrap()
        );
    }

    #[test]
    fn full_slot_map_keeps_the_previous_state_and_retries() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let db = frontend(2, 5432);
        writer.apply(&state(&[("web", web, &[(10, true)])]));
        writer.maps.slot_capacity = Some(2);

        // db ("db" < "web": applied first) takes the last free slot, so
        // web's growth from 1 to 3 slots fails and web keeps its one.
        let desired = state(&[
            ("web", web, &[(10, true), (11, true), (12, true)]),
            ("db", db, &[(20, true)]),
        ]);
        let report = writer.apply(&desired);
        assert!(report.failures > 0);
        assert!(writer.map_errors() > 0);
        assert_eq!(selectable(&writer, db), [20]);
        assert_eq!(selectable(&writer, web), [10]);
        assert_eq!(writer.programmed(), &writer.maps.contents);

        // Room again: the next apply converges.
        writer.maps.slot_capacity = None;
        let report = writer.apply(&desired);
        assert_eq!(report.failures, 0);
        assert_eq!(selectable(&writer, web), [10, 11, 12]);
        assert_eq!(writer.apply(&desired).writes, 0);
    }

    #[test]
    fn full_service_map_leaves_no_dangling_slots() {
        let mut writer = writer();
        writer.maps.service_capacity = Some(1);
        let desired = state(&[
            ("a", frontend(1, 80), &[(10, true)]),
            ("b", frontend(2, 80), &[(11, true)]),
        ]);
        let report = writer.apply(&desired);
        assert_eq!(report.failures, 1);
        assert_eq!(writer.maps.contents.services.len(), 1);
        // b's slot was written before its frontend failed, then removed.
        assert_eq!(writer.maps.contents.slots.len(), 1);
        assert_eq!(writer.programmed(), &writer.maps.contents);
    }

    #[test]
    fn backend_id_space_exhaustion_is_an_error_not_a_panic() {
        let mut maps = FakeMaps::new();
        maps.backend_capacity = 3; // ids 1 and 2
        let mut writer = Writer::adopt(maps).unwrap();
        let web = frontend(1, 80);
        let report = writer.apply(&state(&[(
            "web",
            web,
            &[(10, true), (11, true), (12, true)],
        )]));
        assert_eq!(report.failures, 1);
        assert_eq!(selectable(&writer, web), [10, 11]);
    }

    #[test]
    fn a_new_writer_adopts_the_maps_of_a_previous_one() {
        let web = frontend(1, 80);
        let db = frontend(2, 5432);
        let desired = state(&[
            ("web", web, &[(10, true), (11, false)]),
            ("db", db, &[(20, true)]),
        ]);
        let mut first = writer();
        first.apply(&desired);
        let web_id = first.service_id(&name("web")).unwrap();
        let mut maps = std::mem::take(&mut first.maps);
        maps.backend_capacity = 64;
        maps.maglev_capacity = 2 * TEST_MAGLEV_SIZE;
        maps.log.clear();
        maps.highest_flow_service_id = 40;

        let mut second = Writer::adopt(maps).unwrap();
        second.set_selection(Selection::Random, TEST_MAGLEV_SIZE);
        let report = second.apply(&desired);
        assert_eq!(report.writes, 0, "{:?}", second.maps.log);
        assert_eq!(second.service_id(&name("web")), Some(web_id));

        // New ids start above everything seen, flows included.
        let more = state(&[
            ("web", web, &[(10, true), (11, false)]),
            ("db", db, &[(20, true)]),
            ("cache", frontend(3, 6379), &[(30, true)]),
        ]);
        second.apply(&more);
        assert_eq!(second.service_id(&name("cache")), Some(41));
        assert_eq!(second.backend_ids[&backend_key(pod(30), Protocol::Tcp)], 4);
    }

    #[test]
    fn adopted_garbage_is_cleaned_up() {
        let mut maps = FakeMaps::new();
        // A slot beyond its count and a backend nobody lists.
        let stale = ServiceKey::new(
            u32::from(Ipv4Addr::new(198, 18, 100, 9)).to_be(),
            80u16.to_be(),
            6,
        );
        maps.contents.backends.insert(
            5,
            Backend {
                addr: u32::from(Ipv4Addr::new(198, 18, 0, 99)).to_be(),
                port: 80u16.to_be(),
                proto: 6,
                flags: BACKEND_F_ACTIVE,
            },
        );
        maps.contents.revnat.insert(
            BackendAddr::new(
                u32::from(Ipv4Addr::new(198, 18, 0, 99)).to_be(),
                80u16.to_be(),
                6,
            ),
            revnat_value([7]),
        );
        maps.contents.slots.insert(
            SlotKey {
                service_id: 7,
                slot: 0,
            },
            Slot { backend_id: 5 },
        );
        maps.contents.members.insert(MemberKey {
            service_id: 7,
            backend_id: 5,
        });
        maps.contents.services.insert(
            stale,
            ServiceValue {
                id: 7,
                backend_count: 1,
                ..ServiceValue::default()
            },
        );
        let mut writer = Writer::adopt(maps).unwrap();
        writer.apply(&state(&[("web", frontend(1, 80), &[(10, true)])]));
        let contents = &writer.maps.contents;
        assert!(!contents.services.contains_key(&stale));
        assert_eq!(contents.slots.len(), 1);
        assert_eq!(contents.backends.len(), 1);
        assert_eq!(contents.revnat.len(), 1);
        assert_eq!(contents.members.len(), 1);
        // The new service did not take id 7; the freed backend id 5 is free again.
        assert_eq!(writer.service_id(&name("web")), Some(8));
        assert_eq!(writer.backend_ids[&backend_key(pod(10), Protocol::Tcp)], 1);
    }

    #[test]
    fn slot_layout_moves_as_little_as_possible() {
        assert_eq!(slot_layout(&[], &[1, 2, 3]), [1, 2, 3]);
        assert_eq!(slot_layout(&[1, 2, 3], &[1, 2, 3]), [1, 2, 3]);
        assert_eq!(slot_layout(&[1, 2, 3], &[2, 3]), [3, 2]);
        assert_eq!(slot_layout(&[1, 2, 3], &[1, 2, 3, 4]), [1, 2, 3, 4]);
        assert_eq!(slot_layout(&[1, 2, 3], &[0, 2, 3]), [0, 2, 3]);
        assert_eq!(slot_layout(&[1, 2, 3], &[]), Vec::<u32>::new());
        assert_eq!(slot_layout(&[5, 5, 6], &[5, 6]), [5, 6]);
    }

    #[test]
    fn revnat_holds_at_most_its_capacity() {
        let mut writer = writer();
        let services: Vec<(String, Frontend)> = (0..10)
            .map(|i| (format!("s{i:02}"), frontend(i + 1, 80)))
            .collect();
        let mut desired = DesiredState::new();
        for (service, vip) in &services {
            desired.insert(
                name(service),
                ServicePort {
                    frontends: [*vip].into(),
                    backends: BTreeMap::from([(pod(10), Readiness::Ready)]),
                    ..ServicePort::default()
                },
            );
        }
        let report = writer.apply(&desired);
        assert_eq!(report.failures, 0);
        let revnat = writer.maps.contents.revnat[&backend_key(pod(10), Protocol::Tcp)];
        assert_eq!(revnat.count as usize, MAX_REVNAT_SERVICES);
        // Services beyond the capacity do not select the backend (their
        // replies could not be translated back); the invariant check in
        // FakeMaps verified that for every write.
        let counts: Vec<u32> = services
            .iter()
            .map(|(_, vip)| writer.maps.contents.services[&vip.key()].backend_count)
            .collect();
        assert_eq!(
            counts.iter().filter(|c| **c == 1).count(),
            MAX_REVNAT_SERVICES
        );
    }

    /// [`state`] with one service's affinity and selection set.
    fn with_options(
        mut desired: DesiredState,
        service: &str,
        frontend: Frontend,
        affinity_timeout: Option<u32>,
        selection: Option<Selection>,
    ) -> DesiredState {
        let mut port = desired.service(&name(service)).unwrap().clone();
        port.affinity_timeout = affinity_timeout;
        port.selection = selection;
        port.frontends = [frontend].into();
        desired.insert(name(service), port);
        desired
    }

    #[test]
    fn members_follow_readiness_per_service() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let db = frontend(2, 5432);
        // Pod 10 backs both; ready for web, then gone from web only.
        writer.apply(&state(&[
            ("web", web, &[(10, true), (11, true)]),
            ("db", db, &[(10, true)]),
        ]));
        let web_id = writer.service_id(&name("web")).unwrap();
        let db_id = writer.service_id(&name("db")).unwrap();
        let (id10, id11) = (backend_id(&writer, 10), backend_id(&writer, 11));
        let member = |service_id, last| MemberKey {
            service_id,
            backend_id: if last == 10 { id10 } else { id11 },
        };
        let expected: BTreeSet<MemberKey> =
            [member(web_id, 10), member(web_id, 11), member(db_id, 10)].into();
        assert_eq!(writer.maps.contents.members, expected);

        writer.apply(&state(&[
            ("web", web, &[(11, true)]),
            ("db", db, &[(10, true)]),
        ]));
        let expected: BTreeSet<MemberKey> = [member(web_id, 11), member(db_id, 10)].into();
        assert_eq!(writer.maps.contents.members, expected);
        // Not ready in db: no member, although still listed.
        writer.apply(&state(&[
            ("web", web, &[(11, true)]),
            ("db", db, &[(10, false)]),
        ]));
        let expected: BTreeSet<MemberKey> = [member(web_id, 11)].into();
        assert_eq!(writer.maps.contents.members, expected);
        assert_eq!(writer.programmed(), &writer.maps.contents);
    }

    #[test]
    fn affinity_timeout_reaches_the_service_value() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let base = state(&[("web", web, &[(10, true)])]);
        writer.apply(&with_options(base.clone(), "web", web, Some(5), None));
        assert_eq!(
            writer.maps.contents.services[&web.key()].affinity_timeout,
            5
        );
        writer.apply(&base);
        assert_eq!(
            writer.maps.contents.services[&web.key()].affinity_timeout,
            0
        );
    }

    /// The Maglev table of a frontend, as backend host octets.
    fn maglev_table(writer: &Writer<FakeMaps>, frontend: Frontend) -> Vec<u8> {
        let contents = &writer.maps.contents;
        let value = contents.services[&frontend.key()];
        assert_ne!(value.flags & SERVICE_F_MAGLEV, 0);
        contents.maglev[&value.maglev_table]
            .iter()
            .map(|id| ipv4(contents.backends[id].addr).octets()[3])
            .collect()
    }

    #[test]
    fn maglev_tables_follow_the_backends_and_move_little() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let pods: Vec<(u8, bool)> = (10..20).map(|last| (last, true)).collect();
        let desired = state(&[("web", web, &pods)]);
        writer.apply(&with_options(
            desired,
            "web",
            web,
            None,
            Some(Selection::Maglev),
        ));
        let before = maglev_table(&writer, web);
        assert_eq!(before.len(), TEST_MAGLEV_SIZE as usize);

        // One of ten leaves: only its entries and a few more are rewritten,
        // before the backend is freed.
        take_log(&mut writer);
        let fewer = state(&[("web", web, &pods[1..])]);
        writer.apply(&with_options(
            fewer,
            "web",
            web,
            None,
            Some(Selection::Maglev),
        ));
        let after = maglev_table(&writer, web);
        assert!(!after.contains(&10));
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let log = take_log(&mut writer);
        let table_writes = log
            .iter()
            .filter(|w| matches!(w, MapWrite::Maglev { .. }))
            .count();
        assert_eq!(table_writes, moved);
        assert!(moved < TEST_MAGLEV_SIZE as usize / 5, "moved {moved}");
        let freed = log
            .iter()
            .position(|w| matches!(w, MapWrite::Backend { value, .. } if !value.is_active()))
            .expect("backend freed");
        let last_table_write = log
            .iter()
            .rposition(|w| matches!(w, MapWrite::Maglev { .. }))
            .unwrap();
        assert!(last_table_write < freed);
        assert_eq!(writer.programmed(), &writer.maps.contents);
    }

    #[test]
    fn selection_switches_and_tables_are_reused() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let db = frontend(2, 5432);
        let cache = frontend(3, 6379);
        let base = state(&[
            ("web", web, &[(10, true)]),
            ("db", db, &[(20, true)]),
            ("cache", cache, &[(30, true)]),
        ]);
        // The agent default: every service wants Maglev; two tables fit.
        writer.set_selection(Selection::Maglev, TEST_MAGLEV_SIZE);
        writer.apply(&base);
        let flagged = |writer: &Writer<FakeMaps>, f: Frontend| {
            writer.maps.contents.services[&f.key()].flags & SERVICE_F_MAGLEV != 0
        };
        assert!(flagged(&writer, cache));
        assert!(flagged(&writer, db));
        // Third in name order: no table left, random selection.
        assert!(!flagged(&writer, web));
        assert_eq!(writer.maps.contents.services[&web.key()].backend_count, 1);

        // db opts out by annotation: its table goes to web.
        writer.apply(&with_options(base, "db", db, None, Some(Selection::Random)));
        assert!(!flagged(&writer, db));
        writer.apply(&with_options(
            state(&[
                ("web", web, &[(10, true)]),
                ("db", db, &[(20, true)]),
                ("cache", cache, &[(30, true)]),
            ]),
            "db",
            db,
            None,
            Some(Selection::Random),
        ));
        assert!(flagged(&writer, web));
        assert_eq!(
            maglev_table(&writer, web),
            vec![10; TEST_MAGLEV_SIZE as usize]
        );
        assert_eq!(writer.programmed(), &writer.maps.contents);
    }

    #[test]
    fn new_ids_start_with_zeroed_counters() {
        let mut writer = writer();
        let web = frontend(1, 80);
        writer.apply(&state(&[("web", web, &[(10, true)])]));
        let web_id = writer.service_id(&name("web")).unwrap();
        let b10 = backend_id(&writer, 10);
        let resets: Vec<MapWrite> = take_log(&mut writer)
            .into_iter()
            .filter(|w| {
                matches!(
                    w,
                    MapWrite::ResetServiceStats { .. } | MapWrite::ResetBackendStats { .. }
                )
            })
            .collect();
        assert_eq!(
            resets,
            [
                MapWrite::ResetBackendStats { slot: b10 },
                MapWrite::ResetServiceStats { slot: web_id }
            ]
        );
        // Unchanged: no reset; a kept service and backend keep counting.
        writer.apply(&state(&[("web", web, &[(10, true)])]));
        assert!(take_log(&mut writer).is_empty());
    }

    #[test]
    fn live_services_get_distinct_counter_entries() {
        let mut writer = writer();
        let web = frontend(1, 80);
        writer.apply(&state(&[("web", web, &[(10, true)])]));
        let web_id = writer.service_id(&name("web")).unwrap();
        // Ids up to one full turn later would share web's entry.
        writer.next_service_id = web_id + MAX_SERVICE_STATS;
        writer.apply(&state(&[
            ("web", web, &[(10, true)]),
            ("db", frontend(2, 5432), &[(20, true)]),
        ]));
        let db_id = writer.service_id(&name("db")).unwrap();
        assert_eq!(db_id, web_id + MAX_SERVICE_STATS + 1);
        assert_ne!(db_id % MAX_SERVICE_STATS, web_id % MAX_SERVICE_STATS);
    }

    #[test]
    fn maglev_tables_agree_across_nodes_whatever_their_backend_ids() {
        let web = frontend(1, 80);
        let pods: Vec<(u8, bool)> = (10..20).map(|last| (last, true)).collect();
        let maglev = |desired| with_options(desired, "web", web, None, Some(Selection::Maglev));
        let mut node_a = writer();
        node_a.apply(&maglev(state(&[("web", web, &pods)])));
        // Node B saw other backends first: its ids for the same pods differ.
        let mut node_b = writer();
        let db = frontend(2, 5432);
        node_b.apply(&state(&[("db", db, &[(30, true), (31, true), (32, true)])]));
        node_b.apply(&maglev(state(&[
            ("web", web, &pods),
            ("db", db, &[(30, true), (31, true), (32, true)]),
        ])));
        assert_ne!(backend_id(&node_a, 10), backend_id(&node_b, 10));
        assert_eq!(maglev_table(&node_a, web), maglev_table(&node_b, web));
    }

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    /// `web` with a ClusterIP, a NodePort and a load-balancer frontend,
    /// backend 10, and `ranges`.
    fn external_web(ranges: SourceRanges) -> DesiredState {
        let mut desired = DesiredState::new();
        desired.insert(
            name("web"),
            ServicePort {
                frontends: [
                    (frontend(1, 80), FrontendKind::ClusterIp),
                    (frontend(2, 30080), FrontendKind::NodePort),
                    (frontend(3, 80), FrontendKind::LoadBalancer),
                ]
                .into(),
                backends: [(pod(10), Readiness::Ready)].into(),
                source_ranges: ranges,
                ..ServicePort::default()
            },
        );
        desired
    }

    #[test]
    fn frontends_of_one_id_get_their_kinds_flags() {
        let mut writer = writer();
        writer.apply(&external_web(SourceRanges::Only(
            [cidr("198.18.254.100/32")].into(),
        )));
        let services = &writer.maps.contents.services;
        let id = writer.service_id(&name("web")).unwrap();
        let flags = |f: Frontend| {
            let value = services[&f.key()];
            assert_eq!(value.id, id);
            assert_eq!(value.backend_count, 1);
            value.flags
        };
        assert_eq!(flags(frontend(1, 80)), 0);
        assert_eq!(flags(frontend(2, 30080)), SERVICE_F_EXTERNAL);
        assert_eq!(
            flags(frontend(3, 80)),
            SERVICE_F_EXTERNAL | SERVICE_F_SOURCE_RANGES
        );
        assert_eq!(
            writer.maps.contents.source_ranges,
            [SourceRangeKey {
                service_id: id,
                range: cidr("198.18.254.100/32")
            }]
            .into()
        );
    }

    #[test]
    fn external_frontends_of_a_split_service_name_the_internal_view() {
        // externalTrafficPolicy differs from internalTrafficPolicy: the
        // external frontends have their own id and point pods at the
        // ClusterIP's entry.
        let cluster_ip = frontend(1, 80);
        let external_name = ServicePortName {
            traffic: Traffic::External,
            ..name("web")
        };
        let mut desired = DesiredState::new();
        desired.insert(
            name("web"),
            ServicePort {
                frontends: [(cluster_ip, FrontendKind::ClusterIp)].into(),
                backends: [(pod(10), Readiness::Ready), (pod(11), Readiness::Ready)].into(),
                ..ServicePort::default()
            },
        );
        desired.insert(
            external_name.clone(),
            ServicePort {
                frontends: [(frontend(2, 30080), FrontendKind::NodePort)].into(),
                backends: [(pod(10), Readiness::Ready)].into(),
                drop_without_backend: true,
                internal_view: Some(cluster_ip),
                ..ServicePort::default()
            },
        );
        let mut writer = writer();
        writer.apply(&desired);
        let services = &writer.maps.contents.services;
        let internal = services[&cluster_ip.key()];
        assert_eq!(internal.id, writer.service_id(&name("web")).unwrap());
        assert_eq!(internal.backend_count, 2);
        assert_eq!(internal.flags & SERVICE_F_INTERNAL_VIEW, 0);
        let external = services[&frontend(2, 30080).key()];
        assert_eq!(external.id, writer.service_id(&external_name).unwrap());
        assert_ne!(external.id, internal.id);
        assert_eq!(external.backend_count, 1);
        assert_eq!(
            external.flags,
            SERVICE_F_EXTERNAL | SERVICE_F_DROP | SERVICE_F_INTERNAL_VIEW
        );
        assert_eq!(
            (external.internal_addr, external.internal_port),
            (cluster_ip.key().addr, cluster_ip.key().port)
        );
        assert_eq!(writer.programmed(), &writer.maps.contents);
    }

    #[test]
    fn the_port_filter_follows_frontends_and_backends() {
        let mut writer = writer();
        writer.apply(&external_web(SourceRanges::Any));
        let all = PORT_F_FRONTEND | PORT_F_EXTERNAL_FRONTEND;
        assert_eq!(
            writer.maps.contents.ports,
            [(80, all), (8080, PORT_F_BACKEND), (30080, all)].into()
        );
        take_log(&mut writer);

        // Only the ClusterIP frontend stays: port 80 keeps the bit of any
        // frontend and loses the external one, 30080 goes, each after the
        // frontend that needed it.
        writer.apply(&state(&[("web", frontend(1, 80), &[(10, true)])]));
        assert_eq!(
            writer.maps.contents.ports,
            [(80, PORT_F_FRONTEND), (8080, PORT_F_BACKEND)].into()
        );
        let log = take_log(&mut writer);
        let deleted = |key: ServiceKey| position(&log, |w| *w == MapWrite::DeleteService { key });
        let cleared = |port: u16, bits: u8| position(&log, |w| *w == MapWrite::Port { port, bits });
        assert!(deleted(frontend(2, 30080).key()) < cleared(30080, 0));
        assert!(deleted(frontend(3, 80).key()) < cleared(80, PORT_F_FRONTEND));

        // Nothing left: nothing passes the filter.
        writer.apply(&DesiredState::new());
        assert_eq!(writer.maps.contents.ports, BTreeMap::new());
        assert_eq!(writer.programmed(), &writer.maps.contents);
    }

    #[test]
    fn adopted_maps_without_port_bits_get_them_first() {
        let desired = state(&[("web", frontend(1, 80), &[(10, true)])]);
        let mut first = writer();
        first.apply(&desired);
        let mut maps = std::mem::take(&mut first.maps);
        maps.backend_capacity = 64;
        maps.maglev_capacity = 2 * TEST_MAGLEV_SIZE;
        // Pins of a version without the filter, plus a stale bit.
        maps.contents.ports = [(9999, PORT_F_BACKEND)].into();
        maps.log.clear();
        maps.unchecked = true;

        let mut second = Writer::adopt(maps).unwrap();
        second.set_selection(Selection::Random, TEST_MAGLEV_SIZE);
        let report = second.apply(&desired);
        assert_eq!(report.failures, 0);
        assert_eq!(
            take_log(&mut second),
            [
                MapWrite::Port {
                    port: 80,
                    bits: PORT_F_FRONTEND
                },
                MapWrite::Port {
                    port: 8080,
                    bits: PORT_F_BACKEND
                },
                MapWrite::Port {
                    port: 9999,
                    bits: 0
                },
            ]
        );
        check_invariants(&second.maps.contents, 0);
    }

    /// Positions of the first write matching each predicate in `log`.
    fn position(log: &[MapWrite], matches: impl Fn(&MapWrite) -> bool) -> usize {
        log.iter()
            .position(matches)
            .unwrap_or_else(|| panic!("no such write in {log:#?}"))
    }

    #[test]
    fn source_ranges_are_in_place_before_a_frontend_checks_them() {
        let mut writer = writer();
        let lb = frontend(3, 80).key();
        let only = |ranges: &[&str]| SourceRanges::Only(ranges.iter().map(|r| cidr(r)).collect());
        let lb_write = |flagged: bool| {
            move |w: &MapWrite| {
                matches!(w, MapWrite::Service { key, value } if *key == lb
                    && (value.flags & SERVICE_F_SOURCE_RANGES != 0) == flagged)
            }
        };
        let added = |range: &'static str| move |w: &MapWrite| matches!(w, MapWrite::SourceRange { key } if key.range == cidr(range));
        let deleted = |range: &'static str| move |w: &MapWrite| matches!(w, MapWrite::DeleteSourceRange { key } if key.range == cidr(range));

        // A new restricted Service: its range before its frontends.
        writer.apply(&external_web(only(&["198.18.254.0/24"])));
        let log = take_log(&mut writer);
        assert!(position(&log, added("198.18.254.0/24")) < position(&log, lb_write(true)));

        // Another range: added, then the old one deleted; the frontend
        // (flagged all along) is not rewritten.
        writer.apply(&external_web(only(&["198.18.255.0/24"])));
        let log = take_log(&mut writer);
        assert!(
            position(&log, added("198.18.255.0/24")) < position(&log, deleted("198.18.254.0/24"))
        );
        assert!(!log.iter().any(|w| matches!(w, MapWrite::Service { .. })));

        // Unrestricted: the flag goes first, then the range.
        writer.apply(&external_web(SourceRanges::Any));
        let log = take_log(&mut writer);
        assert!(position(&log, lb_write(false)) < position(&log, deleted("198.18.255.0/24")));
        assert!(writer.maps.contents.source_ranges.is_empty());

        // Fail closed: restricted to nobody is a flag and no range.
        writer.apply(&external_web(only(&[])));
        assert!(writer.maps.contents.services[&lb].flags & SERVICE_F_SOURCE_RANGES != 0);
        assert!(writer.maps.contents.source_ranges.is_empty());

        // Restricted again, then deleted: the frontend goes before its range.
        writer.apply(&external_web(only(&["198.18.254.0/24"])));
        take_log(&mut writer);
        writer.apply(&DesiredState::new());
        let log = take_log(&mut writer);
        assert!(
            position(
                &log,
                |w| matches!(w, MapWrite::DeleteService { key } if *key == lb)
            ) < position(&log, deleted("198.18.254.0/24"))
        );
        assert_eq!(writer.programmed(), &writer.maps.contents);
        assert_eq!(writer.maps.contents, MapContents::default());
    }

    #[test]
    fn a_range_stays_while_a_frontend_still_checks_it() {
        let mut writer = writer();
        let lb = frontend(3, 80).key();
        let ranges = SourceRanges::Only([cidr("198.18.254.0/24")].into());
        writer.apply(&external_web(ranges.clone()));
        // Clearing the flag fails: the range must stay, or the frontend
        // would refuse the clients it admitted.
        writer.maps.broken_map = Some(MAP_SERVICES);
        let report = writer.apply(&external_web(SourceRanges::Any));
        assert!(report.failures > 0);
        assert!(writer.maps.contents.services[&lb].flags & SERVICE_F_SOURCE_RANGES != 0);
        assert_eq!(writer.maps.contents.source_ranges.len(), 1);
        // The retry clears the flag, then the range.
        writer.maps.broken_map = None;
        let report = writer.apply(&external_web(SourceRanges::Any));
        assert_eq!(report.failures, 0);
        assert_eq!(writer.maps.contents.services[&lb].flags, SERVICE_F_EXTERNAL);
        assert!(writer.maps.contents.source_ranges.is_empty());
        // A range that cannot be written leaves the frontend unflagged
        // (unrestricted, as it was) rather than restricted without it.
        writer.maps.broken_map = Some(MAP_SOURCE_RANGES);
        assert!(writer.apply(&external_web(ranges)).failures > 0);
        assert_eq!(writer.maps.contents.services[&lb].flags, SERVICE_F_EXTERNAL);
        assert_eq!(writer.programmed(), &writer.maps.contents);
    }

    #[test]
    fn a_frontend_whose_new_owner_fails_does_not_keep_its_old_id() {
        let mut writer = writer();
        let shared = frontend(1, 80);
        writer.apply(&state(&[("a", shared, &[(10, true)])]));
        let a_id = writer.service_id(&name("a")).unwrap();
        assert_eq!(writer.maps.contents.services[&shared.key()].id, a_id);
        // The frontend moves from a to b, whose slots cannot be written:
        // it must not keep sending b's clients to a's backends.
        writer.maps.broken_map = Some(MAP_SLOTS);
        let moved = state(&[
            ("a", frontend(2, 80), &[(10, true)]),
            ("b", shared, &[(20, true)]),
        ]);
        assert!(writer.apply(&moved).failures > 0);
        assert!(!writer.maps.contents.services.contains_key(&shared.key()));
        writer.maps.broken_map = None;
        assert_eq!(writer.apply(&moved).failures, 0);
        let b_id = writer.service_id(&name("b")).unwrap();
        assert_eq!(writer.maps.contents.services[&shared.key()].id, b_id);
        assert_eq!(selectable(&writer, shared), [20]);
    }

    #[test]
    fn local_backends_are_flagged_by_address() {
        let mut writer = writer();
        let web = frontend(1, 80);
        let with_local = |local: &[u8]| {
            let mut desired = state(&[("web", web, &[(10, true), (11, true)])]);
            let mut port = desired.service(&name("web")).unwrap().clone();
            port.local_addresses = local.iter().map(|last| *pod(*last).ip()).collect();
            desired.insert(name("web"), port);
            desired
        };
        let flags = |writer: &Writer<FakeMaps>, last| {
            writer.maps.contents.backends[&backend_id(writer, last)].flags
        };
        writer.apply(&with_local(&[10]));
        assert_eq!(flags(&writer, 10), BACKEND_F_ACTIVE | BACKEND_F_LOCAL);
        assert_eq!(flags(&writer, 11), BACKEND_F_ACTIVE);
        // The endpoint moves: only the backend entries are rewritten.
        take_log(&mut writer);
        writer.apply(&with_local(&[11]));
        let log = take_log_without_members(&mut writer);
        assert_eq!(log.len(), 2, "{log:#?}");
        assert!(log.iter().all(|w| matches!(w, MapWrite::Backend { .. })));
        assert_eq!(flags(&writer, 10), BACKEND_F_ACTIVE);
        assert_eq!(flags(&writer, 11), BACKEND_F_ACTIVE | BACKEND_F_LOCAL);
        // A second service port listing it as local is enough (one
        // address, one locality).
        let mut desired = with_local(&[]);
        desired.insert(
            name("alt"),
            ServicePort {
                frontends: [frontend(2, 80)].into(),
                backends: [(pod(11), Readiness::Ready)].into(),
                local_addresses: [*pod(11).ip()].into(),
                ..ServicePort::default()
            },
        );
        writer.apply(&desired);
        assert_eq!(flags(&writer, 11), BACKEND_F_ACTIVE | BACKEND_F_LOCAL);
        assert_eq!(writer.programmed(), &writer.maps.contents);
    }

    #[test]
    fn lpm_keys_round_trip() {
        let key = SourceRangeKey {
            service_id: 0x0102_0304,
            range: cidr("198.18.254.0/24"),
        };
        let (prefix_len, data) = key.lpm();
        assert_eq!(prefix_len, 32 + 24);
        // The service id big-endian, then the address in network order:
        // the trie matches the id whole, then the range's prefix.
        assert_eq!(data.service_id_be.to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(data.addr.to_ne_bytes(), [198, 18, 254, 0]);
        assert_eq!(SourceRangeKey::from_lpm(prefix_len, data), Some(key));
        assert_eq!(SourceRangeKey::from_lpm(16, data), None);
    }

    /// A small deterministic generator (xorshift64*), so the randomized
    /// tests are reproducible without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A random service port: frontends and backends from small pools, so
    /// service ports share backends (beyond `LB_REVNAT`'s capacity at
    /// times), trade frontends, and collide on them.
    fn random_port(rng: &mut Rng, pods: u64) -> ServicePort {
        let kinds = [
            FrontendKind::ClusterIp,
            FrontendKind::NodePort,
            FrontendKind::ExternalIp,
            FrontendKind::LoadBalancer,
        ];
        let frontends = (0..1 + rng.below(2))
            .map(|_| {
                let kind = kinds[rng.below(4) as usize];
                (frontend(1 + rng.below(16) as u8, 80), kind)
            })
            .collect();
        let source_ranges = match rng.below(4) {
            0 => SourceRanges::Only(
                (0..rng.below(3))
                    .map(|_| {
                        Ipv4Cidr::new(Ipv4Addr::new(198, 18, 254, 0), 30 + rng.below(3) as u8)
                            .unwrap()
                    })
                    .collect(),
            ),
            _ => SourceRanges::Any,
        };
        let local_addresses = (0..rng.below(3))
            .map(|_| *pod(10 + rng.below(pods) as u8).ip())
            .collect();
        let backends = (0..rng.below(7))
            .map(|_| {
                let readiness = if rng.chance(75) {
                    Readiness::Ready
                } else {
                    Readiness::NotReady
                };
                (pod(10 + rng.below(pods) as u8), readiness)
            })
            .collect();
        let selection = match rng.below(8) {
            0 => Some(Selection::Maglev),
            1 | 2 => Some(Selection::Random),
            _ => None,
        };
        ServicePort {
            frontends,
            backends,
            affinity_timeout: rng.chance(20).then_some(60),
            selection,
            drop_without_backend: rng.chance(20),
            local_addresses,
            source_ranges,
            internal_view: None,
        }
    }

    fn desired_state(ports: &BTreeMap<String, ServicePort>) -> DesiredState {
        let mut desired = DesiredState::new();
        for (service, port) in ports {
            // Conflicting frontends stay with the first owner.
            desired.insert(name(service), port.clone());
        }
        desired
    }

    /// The incremental apply writes exactly what a full apply writes, in
    /// the same order, over a long random history of small changes (with
    /// Maglev table exhaustion along the way): two writers see the same
    /// states, one forced to look at everything on every apply. Once with
    /// few pods, so backends are shared beyond `LB_REVNAT`'s capacity;
    /// once with more pods and map-full failures now and then.
    #[test]
    fn incremental_apply_writes_what_a_full_apply_writes() {
        compare_with_full_applies(0x9e37_79b9_7f4a_7c15, 10, 0);
        compare_with_full_applies(0x5851_f42d_4c95_7f2d, 24, 5);
    }

    fn compare_with_full_applies(seed: u64, pods: u64, failure_percent: u64) {
        let mut rng = Rng(seed);
        let mut incremental = writer();
        let mut full = writer();
        // Three tables: enough most of the time, not always.
        incremental.maps.maglev_capacity = 3 * TEST_MAGLEV_SIZE;
        full.maps.maglev_capacity = 3 * TEST_MAGLEV_SIZE;
        let mut ports: BTreeMap<String, ServicePort> = BTreeMap::new();
        let mut incremental_applies = 0;
        for step in 0..2000 {
            // Change one to three service ports: add, remove, replace, or
            // flip one backend's readiness.
            for _ in 0..1 + rng.below(3) {
                let service = format!("svc{:02}", rng.below(20));
                match rng.below(10) {
                    0 => {
                        ports.remove(&service);
                    }
                    1..=3 => {
                        if let Some(port) = ports.get_mut(&service)
                            && let Some((_, readiness)) = port.backends.iter_mut().next()
                        {
                            *readiness = match readiness {
                                Readiness::Ready => Readiness::NotReady,
                                Readiness::NotReady => Readiness::Ready,
                            };
                        }
                    }
                    _ => {
                        ports.insert(service, random_port(&mut rng, pods));
                    }
                }
            }
            // Now and then a full slot map refuses new slots.
            let slot_capacity = rng
                .chance(failure_percent)
                .then(|| full.maps.contents.slots.len() + 1);
            incremental.maps.slot_capacity = slot_capacity;
            full.maps.slot_capacity = slot_capacity;
            // And a full source range map refuses new ranges.
            let source_range_capacity = rng
                .chance(failure_percent)
                .then_some(full.maps.contents.source_ranges.len());
            incremental.maps.source_range_capacity = source_range_capacity;
            full.maps.source_range_capacity = source_range_capacity;

            let desired = desired_state(&ports);
            if !incremental.full_next {
                incremental_applies += 1;
            }
            full.full_next = true;
            let incremental_report = incremental.apply(&desired);
            let full_report = full.apply(&desired);
            assert_eq!(
                take_log(&mut incremental),
                take_log(&mut full),
                "step {step}: writes differ"
            );
            assert_eq!(incremental_report, full_report, "step {step}");
            assert_eq!(incremental.maps.contents, full.maps.contents, "step {step}");
            assert_eq!(incremental.programmed, full.programmed, "step {step}");
            assert_eq!(incremental.programmed, incremental.maps.contents);
            assert_eq!(incremental.service_ids, full.service_ids, "step {step}");
            assert_eq!(incremental.backend_ids, full.backend_ids, "step {step}");
            assert_eq!(incremental.maglev_tables, full.maglev_tables, "step {step}");
        }
        // Most applies took the incremental path.
        println!("{incremental_applies} of 2000 applies were incremental");
        assert!(
            incremental_applies > 1000,
            "{incremental_applies} incremental applies"
        );
    }

    /// Writer apply time for one changed service port among many
    /// (`cargo +1.98.0 test --release -p lb-agent --lib apply_time -- --ignored --nocapture`).
    #[test]
    #[ignore = "timing report, run by hand in release"]
    fn apply_time_for_one_changed_service_port() {
        for services in [1_000u32, 10_000] {
            let endpoints = 10u32;
            let mut maps = FakeMaps::new();
            maps.backend_capacity = services * endpoints + 1;
            maps.unchecked = true;
            let mut writer = Writer::new(maps);
            writer.set_selection(Selection::Random, TEST_MAGLEV_SIZE);
            let service_name = |index: u32| name(&format!("svc{index:05}"));
            let port_of = |index: u32, ready_until: u32| ServicePort {
                frontends: [Frontend {
                    addr: Ipv4Addr::from(0xc612_0000 + index),
                    port: 80,
                    proto: Protocol::Tcp,
                }]
                .into(),
                backends: (0..endpoints)
                    .map(|endpoint| {
                        let addr = Ipv4Addr::from(0xc613_0000 + index * endpoints + endpoint);
                        let readiness = if endpoint < ready_until {
                            Readiness::Ready
                        } else {
                            Readiness::NotReady
                        };
                        (SocketAddrV4::new(addr, 8080), readiness)
                    })
                    .collect(),
                ..ServicePort::default()
            };
            let mut desired = DesiredState::new();
            for index in 0..services {
                desired.insert(service_name(index), port_of(index, endpoints));
            }
            writer.apply(&desired);

            let rounds = 50;
            let mut timings = [std::time::Duration::ZERO; 2];
            for round in 0..rounds {
                // One endpoint of one service turns not ready, then ready
                // again in the next round.
                let index = (round / 2 * 7919) % services;
                let ready_until = if round % 2 == 0 {
                    endpoints - 1
                } else {
                    endpoints
                };
                let mut changed = DesiredState::new();
                for (name, port) in desired.services() {
                    let port = if *name == service_name(index) {
                        port_of(index, ready_until)
                    } else {
                        port.clone()
                    };
                    changed.insert(name.clone(), port);
                }
                desired = changed;
                // Alternately incremental and full (as before incremental
                // applies existed).
                let full_path = (round / 2) % 2 == 1;
                writer.full_next = full_path;
                let started = std::time::Instant::now();
                let report = writer.apply(&desired);
                timings[usize::from(full_path)] += started.elapsed();
                assert_eq!(report.failures, 0);
                assert!(report.writes > 0);
            }
            let per_apply = |total: std::time::Duration| total / (rounds / 2);
            println!(
                "{services} service ports x {endpoints} endpoints, one changed: incremental apply {:?}, full apply {:?}",
                per_apply(timings[0]),
                per_apply(timings[1])
            );
        }
    }
}

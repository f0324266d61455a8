//! The real [`MapOps`]: the datapath's maps through aya.

use std::collections::BTreeSet;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use lb_common::affinity::{Member, MemberKey};
use lb_common::backend::{Backend, BackendAddr, RevNat};
use lb_common::config::defaults::MAGLEV_TABLE_SIZE;
use lb_common::conntrack::{Flow, FlowKey};
use lb_common::names::{
    MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONNTRACK, MAP_MAGLEV, MAP_MEMBERS, MAP_PORTS, MAP_REVNAT,
    MAP_SERVICE_STATS, MAP_SERVICES, MAP_SLOTS, MAP_SOURCE_RANGES,
};
use lb_common::nat::{SOURCE_RANGE_ALLOWED, SourceRange};
use lb_common::service::{SERVICE_F_MAGLEV, ServiceKey, ServiceValue, Slot, SlotKey};
use lb_common::stats::{BackendStats, MAX_BACKEND_STATS, MAX_SERVICE_STATS, ServiceStats};

use super::writer::{MapContents, MapOps, MapReadError, MapWrite, MapWriteError, SourceRangeKey};

/// Opening one of the datapath's maps failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenMapError {
    #[error("the datapath object has no map {0}")]
    Missing(&'static str),
    #[error("opening pinned map {}", path.display())]
    Pin {
        path: std::path::PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {map} has an unexpected type or key/value size (built from another lb-common?)")]
    Type {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// Opens the map pinned as `<pin_dir>/<name>`.
pub fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map, OpenMapError> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| OpenMapError::Pin { path, source })?;
    Map::from_map_data(data).map_err(|source| OpenMapError::Type { map: name, source })
}

/// Converts a generic map into the typed view `T`, naming the map on error.
pub fn typed<T>(map: Map, name: &'static str) -> Result<T, OpenMapError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(map).map_err(|source| OpenMapError::Type { map: name, source })
}

/// The maps the writer programs, plus conntrack (read once at start).
pub struct AyaMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: Array<MapData, Backend>,
    revnat: HashMap<MapData, BackendAddr, RevNat>,
    conntrack: HashMap<MapData, FlowKey, Flow>,
    members: HashMap<MapData, MemberKey, Member>,
    maglev: Array<MapData, u32>,
    /// Entries per Maglev table, to read tables back.
    maglev_table_size: u32,
    service_stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    /// The port filter: port (host byte order) -> `PORT_F_*` bits.
    ports: Array<MapData, u8>,
}

/// The `LB_SRC_RANGES` key of an entry.
pub fn source_range_key(key: &SourceRangeKey) -> Key<SourceRange> {
    let (prefix_len, data) = key.lpm();
    Key::new(prefix_len, data)
}

/// Every entry of an `LB_SRC_RANGES` map, skipping keys deleted during the
/// walk and keys no writer writes.
pub fn read_source_ranges<T: std::borrow::Borrow<MapData>>(
    map: &LpmTrie<T, SourceRange, u8>,
) -> Result<BTreeSet<SourceRangeKey>, MapReadError> {
    let mut entries = BTreeSet::new();
    for key in map.keys() {
        match key {
            Ok(key) => {
                if let Some(key) = SourceRangeKey::from_lpm(key.prefix_len(), key.data()) {
                    entries.insert(key);
                }
            }
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(read_error(MAP_SOURCE_RANGES, e)),
        }
    }
    Ok(entries)
}

impl AyaMaps {
    /// Builds from maps taken out of a loaded object (or opened from pins);
    /// `take` returns the map of that name.
    pub fn from_maps(
        mut take: impl FnMut(&'static str) -> Option<Map>,
    ) -> Result<Self, OpenMapError> {
        let mut open = |name: &'static str| take(name).ok_or(OpenMapError::Missing(name));
        Ok(Self {
            services: typed(open(MAP_SERVICES)?, MAP_SERVICES)?,
            slots: typed(open(MAP_SLOTS)?, MAP_SLOTS)?,
            backends: typed(open(MAP_BACKENDS)?, MAP_BACKENDS)?,
            revnat: typed(open(MAP_REVNAT)?, MAP_REVNAT)?,
            conntrack: typed(open(MAP_CONNTRACK)?, MAP_CONNTRACK)?,
            members: typed(open(MAP_MEMBERS)?, MAP_MEMBERS)?,
            maglev: typed(open(MAP_MAGLEV)?, MAP_MAGLEV)?,
            maglev_table_size: MAGLEV_TABLE_SIZE,
            service_stats: typed(open(MAP_SERVICE_STATS)?, MAP_SERVICE_STATS)?,
            backend_stats: typed(open(MAP_BACKEND_STATS)?, MAP_BACKEND_STATS)?,
            source_ranges: typed(open(MAP_SOURCE_RANGES)?, MAP_SOURCE_RANGES)?,
            ports: typed(open(MAP_PORTS)?, MAP_PORTS)?,
        })
    }

    /// The counters of service `service_id`, summed over CPUs.
    pub fn service_stats(&self, service_id: u32) -> Result<ServiceStats, MapReadError> {
        read_service_stats(&self.service_stats, service_id)
    }

    /// The counters of backend `backend_id`, summed over CPUs.
    pub fn backend_stats(&self, backend_id: u32) -> Result<BackendStats, MapReadError> {
        read_backend_stats(&self.backend_stats, backend_id)
    }

    /// Sets the Maglev table size the datapath was configured with (the
    /// default otherwise), so [`MapOps::read_all`] reads whole tables.
    pub fn with_maglev_table_size(mut self, size: u32) -> Self {
        self.maglev_table_size = size;
        self
    }

    /// Opens the maps pinned under `pin_dir` by a running agent.
    pub fn from_pins(pin_dir: &Path) -> Result<Self, OpenMapError> {
        let mut first_error = None;
        let maps = Self::from_maps(|name| match open_pinned(pin_dir, name) {
            Ok(map) => Some(map),
            Err(error) => {
                first_error.get_or_insert(error);
                None
            }
        });
        match (maps, first_error) {
            (Ok(maps), _) => Ok(maps),
            (Err(_), Some(error)) => Err(error),
            (Err(error), None) => Err(error),
        }
    }
}

/// Separate handles on the two per-CPU counter maps, for readers outside
/// the writer (the `/metrics` collector reads them at scrape time).
pub struct StatsMaps {
    service_stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
}

impl StatsMaps {
    /// Opens the counter maps pinned under `pin_dir`.
    pub fn from_pins(pin_dir: &Path) -> Result<Self, OpenMapError> {
        Ok(Self {
            service_stats: typed(open_pinned(pin_dir, MAP_SERVICE_STATS)?, MAP_SERVICE_STATS)?,
            backend_stats: typed(open_pinned(pin_dir, MAP_BACKEND_STATS)?, MAP_BACKEND_STATS)?,
        })
    }

    /// The counters of service `service_id`, summed over CPUs.
    pub fn service_stats(&self, service_id: u32) -> Result<ServiceStats, MapReadError> {
        read_service_stats(&self.service_stats, service_id)
    }

    /// The counters of backend `backend_id`, summed over CPUs.
    pub fn backend_stats(&self, backend_id: u32) -> Result<BackendStats, MapReadError> {
        read_backend_stats(&self.backend_stats, backend_id)
    }
}

/// The counters of service `service_id` in an `LB_SVC_STATS` map, summed
/// over CPUs.
pub fn read_service_stats<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, ServiceStats>,
    service_id: u32,
) -> Result<ServiceStats, MapReadError> {
    let values = map
        .get(&(service_id % MAX_SERVICE_STATS), 0)
        .map_err(|e| read_error(MAP_SERVICE_STATS, e))?;
    let mut sum = ServiceStats::default();
    for value in values.iter() {
        sum.add(value);
    }
    Ok(sum)
}

/// The counters of backend `backend_id` in an `LB_BE_STATS` map, summed
/// over CPUs.
pub fn read_backend_stats<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, BackendStats>,
    backend_id: u32,
) -> Result<BackendStats, MapReadError> {
    let values = map
        .get(&(backend_id % MAX_BACKEND_STATS), 0)
        .map_err(|e| read_error(MAP_BACKEND_STATS, e))?;
    let mut sum = BackendStats::default();
    for value in values.iter() {
        sum.add(value);
    }
    Ok(sum)
}

/// A value of zero for every possible CPU.
fn zeroed_per_cpu<T: aya::Pod + Default>() -> Result<PerCpuValues<T>, MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, error)| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: error,
        })
    })?;
    PerCpuValues::try_from(vec![T::default(); cpus.get() as usize]).map_err(|error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "PerCpuValues",
            io_error: error,
        })
    })
}

fn write_error(write: &MapWrite, source: MapError) -> MapWriteError {
    MapWriteError {
        call: write.call(),
        map: write.map(),
        source: Box::new(source),
    }
}

fn read_error(map: &'static str, source: MapError) -> MapReadError {
    MapReadError {
        map,
        source: Box::new(source),
    }
}

impl MapOps for AyaMaps {
    fn write(&mut self, write: &MapWrite) -> Result<(), MapWriteError> {
        match write {
            MapWrite::Service { key, value } => self.services.insert(key, value, 0),
            MapWrite::DeleteService { key } => self.services.remove(key),
            MapWrite::Slot { key, value } => self.slots.insert(key, value, 0),
            MapWrite::DeleteSlot { key } => self.slots.remove(key),
            MapWrite::Backend { id, value } => self.backends.set(*id, value, 0),
            MapWrite::RevNat { key, value } => self.revnat.insert(key, value, 0),
            MapWrite::DeleteRevNat { key } => self.revnat.remove(key),
            MapWrite::Member { key } => self.members.insert(key, &Member::default(), 0),
            MapWrite::DeleteMember { key } => self.members.remove(key),
            MapWrite::Maglev {
                table,
                entry,
                backend_id,
            } => self.maglev.set(
                u32::from(*table) * self.maglev_table_size + entry,
                backend_id,
                0,
            ),
            MapWrite::SourceRange { key } => {
                self.source_ranges
                    .insert(&source_range_key(key), &SOURCE_RANGE_ALLOWED, 0)
            }
            MapWrite::DeleteSourceRange { key } => {
                self.source_ranges.remove(&source_range_key(key))
            }
            MapWrite::ResetServiceStats { slot } => {
                zeroed_per_cpu().and_then(|zero| self.service_stats.set(*slot, zero, 0))
            }
            MapWrite::ResetBackendStats { slot } => {
                zeroed_per_cpu().and_then(|zero| self.backend_stats.set(*slot, zero, 0))
            }
            MapWrite::Port { port, bits } => self.ports.set(u32::from(*port), bits, 0),
        }
        .map_err(|source| write_error(write, source))
    }

    fn read_all(&self) -> Result<MapContents, MapReadError> {
        let mut contents = MapContents::default();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(|e| read_error(MAP_SERVICES, e))?;
            contents.services.insert(key, value);
        }
        for entry in self.slots.iter() {
            let (key, value) = entry.map_err(|e| read_error(MAP_SLOTS, e))?;
            contents.slots.insert(key, value);
        }
        for entry in self.revnat.iter() {
            let (key, value) = entry.map_err(|e| read_error(MAP_REVNAT, e))?;
            contents.revnat.insert(key, value);
        }
        // Id 0 is never used.
        for id in 1..self.backends.len() {
            let backend = self
                .backends
                .get(&id, 0)
                .map_err(|e| read_error(MAP_BACKENDS, e))?;
            if backend.is_active() {
                contents.backends.insert(id, backend);
            }
        }
        for key in self.members.keys() {
            let key = key.map_err(|e| read_error(MAP_MEMBERS, e))?;
            contents.members.insert(key);
        }
        let tables: BTreeSet<u16> = contents
            .services
            .values()
            .filter(|value| value.flags & SERVICE_F_MAGLEV != 0)
            .map(|value| value.maglev_table)
            .collect();
        for table in tables {
            let start = u32::from(table) * self.maglev_table_size;
            let entries = (start..start + self.maglev_table_size)
                .map(|index| self.maglev.get(&index, 0))
                .collect::<Result<Vec<u32>, _>>()
                .map_err(|e| read_error(MAP_MAGLEV, e))?;
            contents.maglev.insert(table, entries);
        }
        contents.source_ranges = read_source_ranges(&self.source_ranges)?;
        // 65,536 reads of one byte, once at start.
        for port in 0..self.ports.len() {
            let bits = self
                .ports
                .get(&port, 0)
                .map_err(|e| read_error(MAP_PORTS, e))?;
            if bits != 0 {
                contents.ports.insert(port as u16, bits);
            }
        }
        Ok(contents)
    }

    fn highest_flow_service_id(&self) -> Result<u32, MapReadError> {
        let mut highest = 0;
        for key in self.conntrack.keys() {
            match key {
                Ok(key) => highest = highest.max(key.service_id),
                // An LRU entry evicted between two steps of the walk.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(read_error(MAP_CONNTRACK, e)),
            }
        }
        Ok(highest)
    }

    fn backend_capacity(&self) -> u32 {
        self.backends.len()
    }

    fn maglev_capacity(&self) -> u32 {
        self.maglev.len()
    }
}

//! [`Datapath`] access to the session-affinity, Maglev and per-service /
//! per-backend counter maps.

use aya::maps::{Array, HashMap, MapError, PerCpuArray};
use lb_common::{
    affinity::{Affinity, AffinityKey, Member, MemberKey},
    config::defaults::MAGLEV_TABLE_SIZE,
    names,
    stats::{BackendStats, MAX_BACKEND_STATS, MAX_SERVICE_STATS, ServiceStats},
};

use super::{Datapath, Result, map_error};

/// Seconds of CLOCK_MONOTONIC, the clock `Affinity::last_seen` and
/// `Flow::last_seen` count in (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_secs() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    assert_eq!(ret, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE)");
    now.tv_sec as u32
}

impl Datapath {
    /// Marks `backend_id` a ready backend of `service_id` (`LB_MEMBERS`).
    pub fn set_member(&mut self, service_id: u32, backend_id: u32) -> Result<()> {
        let name = names::MAP_MEMBERS;
        self.hash_map_mut::<MemberKey, Member>(name)?
            .insert(
                &MemberKey {
                    service_id,
                    backend_id,
                },
                &Member::default(),
                0,
            )
            .map_err(map_error(name, "insert"))
    }

    /// The affinity of `client_addr` (network order) for `service_id`.
    pub fn affinity(&mut self, service_id: u32, client_addr: u32) -> Result<Option<Affinity>> {
        let name = names::MAP_AFFINITY;
        let map: HashMap<_, AffinityKey, Affinity> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_error(name, "open"))?;
        let key = AffinityKey {
            service_id,
            client_addr,
        };
        match map.get(&key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_error(name, "get")(source)),
        }
    }

    pub fn set_affinity(
        &mut self,
        service_id: u32,
        client_addr: u32,
        affinity: &Affinity,
    ) -> Result<()> {
        let name = names::MAP_AFFINITY;
        let mut map: HashMap<_, AffinityKey, Affinity> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_error(name, "open"))?;
        let key = AffinityKey {
            service_id,
            client_addr,
        };
        map.insert(&key, affinity, 0)
            .map_err(map_error(name, "insert"))
    }

    /// Writes Maglev table `table` (of the default size, which the
    /// default configuration uses).
    pub fn set_maglev_table(&mut self, table: u16, entries: &[u32]) -> Result<()> {
        assert_eq!(entries.len(), MAGLEV_TABLE_SIZE as usize);
        let name = names::MAP_MAGLEV;
        let mut map: Array<_, u32> =
            Array::try_from(self.map_mut(name)?).map_err(map_error(name, "open"))?;
        let start = u32::from(table) * MAGLEV_TABLE_SIZE;
        for (i, backend_id) in entries.iter().enumerate() {
            map.set(start + i as u32, backend_id, 0)
                .map_err(map_error(name, "set"))?;
        }
        Ok(())
    }

    /// The counters of service `service_id`, summed over CPUs.
    pub fn service_stats(&self, service_id: u32) -> Result<ServiceStats> {
        let name = names::MAP_SERVICE_STATS;
        let map: PerCpuArray<_, ServiceStats> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_error(name, "open"))?;
        let values = map
            .get(&(service_id % MAX_SERVICE_STATS), 0)
            .map_err(map_error(name, "get"))?;
        let mut sum = ServiceStats::default();
        for value in values.iter() {
            sum.add(value);
        }
        Ok(sum)
    }

    /// The counters of backend `backend_id`, summed over CPUs.
    pub fn backend_stats(&self, backend_id: u32) -> Result<BackendStats> {
        let name = names::MAP_BACKEND_STATS;
        let map: PerCpuArray<_, BackendStats> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_error(name, "open"))?;
        let values = map
            .get(&(backend_id % MAX_BACKEND_STATS), 0)
            .map_err(map_error(name, "get"))?;
        let mut sum = BackendStats::default();
        for value in values.iter() {
            sum.add(value);
        }
        Ok(sum)
    }
}

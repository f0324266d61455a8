//! The agent's Prometheus metrics (OpenMetrics text on `/metrics`), all
//! prefixed `lb_agent_`:
//!
//! | Metric | Type | Meaning |
//! |---|---|---|
//! | `service_ports` | gauge | service ports (service ids) programmed |
//! | `frontends` | gauge | frontends (`LB_SERVICES` entries) programmed |
//! | `backends` | gauge | backends (`LB_BACKENDS` entries) programmed |
//! | `map_entries{map}` | gauge | entries the agent wrote in each map |
//! | `map_capacity{map}` | gauge | each map's `max_entries` |
//! | `syncs_total` | counter | translations written to the maps |
//! | `sync_errors_total` | counter | map writes that failed (retried) |
//! | `map_writes_total` | counter | map writes that succeeded (a sync writes only the difference) |
//! | `sync_duration_seconds` | histogram | translating and writing one sync |
//! | `watch_errors_total{resource}` | counter | failed lists and watches (retried) |
//! | `lists_total{resource}` | counter | completed lists (initial and relists) |
//! | `network_programming_duration_seconds` | histogram | from an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` to its change being in the maps, as kube-proxy's metric of that name |

use std::time::Duration;

use lb_common::names::{MAP_BACKENDS, MAP_REVNAT, MAP_SERVICES, MAP_SLOTS};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::datapath::loader::Capacities;
use crate::datapath::writer::{ApplyReport, MapContents};
use crate::source::kube::WatchObserver;

type MapLabel = [(&'static str, &'static str); 1];

/// Every metric, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    service_ports: Gauge,
    frontends: Gauge,
    backends: Gauge,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    syncs: Counter,
    sync_errors: Counter,
    map_writes: Counter,
    sync_duration: Histogram,
    watch_errors: Family<MapLabel, Counter>,
    lists: Family<MapLabel, Counter>,
    programming_duration: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lb_agent");
        let service_ports = Gauge::default();
        let frontends = Gauge::default();
        let backends = Gauge::default();
        let map_entries = Family::<MapLabel, Gauge>::default();
        let map_capacity = Family::<MapLabel, Gauge>::default();
        let syncs = Counter::default();
        let sync_errors = Counter::default();
        let map_writes = Counter::default();
        // 100 us to ~13 s.
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let watch_errors = Family::<MapLabel, Counter>::default();
        let lists = Family::<MapLabel, Counter>::default();
        // 1 ms to ~131 s.
        let programming_duration = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register(
            "service_ports",
            "Service ports (service ids) programmed",
            service_ports.clone(),
        );
        registry.register(
            "frontends",
            "Frontends (LB_SERVICES entries) programmed",
            frontends.clone(),
        );
        registry.register(
            "backends",
            "Backends (LB_BACKENDS entries) programmed",
            backends.clone(),
        );
        registry.register(
            "map_entries",
            "Entries the agent wrote in each BPF map",
            map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Capacity (max_entries) of each BPF map",
            map_capacity.clone(),
        );
        registry.register(
            "syncs",
            "Translations of the desired state written to the maps",
            syncs.clone(),
        );
        registry.register(
            "sync_errors",
            "Map writes that failed (each is retried)",
            sync_errors.clone(),
        );
        registry.register(
            "map_writes",
            "Map writes that succeeded (each sync writes only the difference)",
            map_writes.clone(),
        );
        registry.register_with_unit(
            "sync_duration",
            "Time to translate the desired state and write its diff",
            Unit::Seconds,
            sync_duration.clone(),
        );
        registry.register(
            "watch_errors",
            "Failed lists and watches of the Kubernetes API (each is retried)",
            watch_errors.clone(),
        );
        registry.register(
            "lists",
            "Completed lists of the Kubernetes API (initial lists and relists)",
            lists.clone(),
        );
        registry.register_with_unit(
            "network_programming_duration",
            "From an EndpointSlice's last-change-trigger-time to its change being programmed",
            Unit::Seconds,
            programming_duration.clone(),
        );
        Self {
            registry,
            service_ports,
            frontends,
            backends,
            map_entries,
            map_capacity,
            syncs,
            sync_errors,
            map_writes,
            sync_duration,
            watch_errors,
            lists,
            programming_duration,
        }
    }

    /// Records the maps' capacities (once, after loading).
    pub fn set_capacities(&self, capacities: &Capacities) {
        for (map, capacity) in [
            (MAP_SERVICES, capacities.services),
            (MAP_SLOTS, capacities.slots),
            (MAP_BACKENDS, capacities.backends),
            (MAP_REVNAT, capacities.backends),
        ] {
            self.map_capacity
                .get_or_create(&[("map", map)])
                .set(i64::from(capacity));
        }
    }

    /// Records one sync: what it did and what the maps hold after it.
    pub fn record_sync(&self, report: &ApplyReport, programmed: &MapContents, took: Duration) {
        self.syncs.inc();
        self.sync_errors.inc_by(report.failures as u64);
        self.map_writes.inc_by(report.writes as u64);
        self.sync_duration.observe(took.as_secs_f64());
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.service_ports.set(count(report.service_ports));
        self.frontends.set(count(report.frontends));
        self.backends.set(count(report.backends));
        for (map, entries) in [
            (MAP_SERVICES, programmed.services.len()),
            (MAP_SLOTS, programmed.slots.len()),
            (MAP_BACKENDS, programmed.backends.len()),
            (MAP_REVNAT, programmed.revnat.len()),
        ] {
            self.map_entries
                .get_or_create(&[("map", map)])
                .set(count(entries));
        }
    }

    /// Records the time from a change's trigger to its programming.
    pub fn observe_programming(&self, latency: Duration) {
        self.programming_duration.observe(latency.as_secs_f64());
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("encoding metrics into a String");
        text
    }
}

impl WatchObserver for Metrics {
    fn watch_error(&self, resource: &'static str) {
        self.watch_errors
            .get_or_create(&[("resource", resource)])
            .inc();
    }

    fn list_completed(&self, resource: &'static str) {
        self.lists.get_or_create(&[("resource", resource)]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let metrics = Metrics::new();
        metrics.set_capacities(&Capacities::default());
        metrics.record_sync(
            &ApplyReport {
                writes: 5,
                failures: 1,
                frontends: 2,
                service_ports: 1,
                backends: 2,
            },
            &MapContents::default(),
            Duration::from_millis(3),
        );
        metrics.observe_programming(Duration::from_millis(20));
        metrics.watch_error("services");
        metrics.list_completed("services");
        let text = metrics.encode();
        for line in [
            "lb_agent_service_ports 1",
            "lb_agent_frontends 2",
            "lb_agent_backends 2",
            "lb_agent_map_entries{map=\"LB_SERVICES\"} 0",
            "lb_agent_syncs_total 1",
            "lb_agent_sync_errors_total 1",
            "lb_agent_map_writes_total 5",
            "lb_agent_sync_duration_seconds_count 1",
            "lb_agent_watch_errors_total{resource=\"services\"} 1",
            "lb_agent_lists_total{resource=\"services\"} 1",
            "lb_agent_network_programming_duration_seconds_count 1",
            "lb_agent_network_programming_duration_seconds_bucket{le=\"0.032\"} 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let capacity = format!(
            "lb_agent_map_capacity{{map=\"LB_SERVICES\"}} {}",
            Capacities::default().services
        );
        assert!(text.lines().any(|l| l == capacity), "{text}");
    }
}

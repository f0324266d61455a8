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
//!
//! The datapath's own counters are read from its per-CPU maps at scrape
//! time (summed over CPUs), by [`DatapathCounters`]. Service port series
//! carry the labels `namespace`, `name` (the Service's), `port` (the
//! Service port's name, empty for an unnamed port) and `protocol`; backend
//! series `address`, `port` (the backend's number) and `protocol`, and
//! count over every Service port that lists the backend. A Service port
//! whose external frontends have their own service id (its
//! `externalTrafficPolicy` differs from its `internalTrafficPolicy`) has
//! one series, the sum of both ids:
//!
//! | Metric | Type | Meaning |
//! |---|---|---|
//! | `service_packets_total{namespace,name,port,protocol,direction}` | counter | packets translated: `direction="to_backend"` client packets, `"to_client"` replies |
//! | `service_bytes_total{namespace,name,port,protocol,direction}` | counter | their bytes (skb length) |
//! | `service_new_flows_total{namespace,name,port,protocol}` | counter | connections balanced to a backend |
//! | `service_drops_total{namespace,name,port,protocol,reason}` | counter | packets dropped or refused, by [`DropReason::name`] |
//! | `backend_packets_total{address,port,protocol,direction}` | counter | packets to and from the backend |
//! | `backend_bytes_total{address,port,protocol,direction}` | counter | their bytes |
//! | `backend_new_flows_total{address,port,protocol}` | counter | connections balanced to the backend |
//!
//! A counter starts at 0 when its service port or backend is programmed
//! (its slot in the per-CPU map is zeroed when the id is handed out), and
//! only grows while it stays programmed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use lb_common::names::{MAP_BACKENDS, MAP_REVNAT, MAP_SERVICES, MAP_SLOTS, MAP_SOURCE_RANGES};
use lb_common::stats::{BackendStats, DropReason, ServiceStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tracing::warn;

use crate::agent::error_chain;
use crate::datapath::loader::Capacities;
use crate::datapath::maps::{AyaMaps, StatsMaps};
use crate::datapath::writer::{ApplyReport, MapContents, MapReadError, Writer};
use crate::model::ServicePortName;
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
    datapath: Arc<DatapathCounters>,
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
        let datapath = Arc::new(DatapathCounters::default());
        registry.register_collector(Box::new(Arc::clone(&datapath)));
        Self {
            registry,
            datapath,
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
            (MAP_SOURCE_RANGES, capacities.source_ranges),
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
            (MAP_SOURCE_RANGES, programmed.source_ranges.len()),
        ] {
            self.map_entries
                .get_or_create(&[("map", map)])
                .set(count(entries));
        }
    }

    /// Lets `/metrics` read the datapath's counter maps (once, after
    /// loading); until then the datapath counters are absent.
    pub fn set_stats_reader(&self, reader: impl StatsReader) {
        if self.datapath.reader.set(Box::new(reader)).is_err() {
            warn!("the datapath counter maps were already set; keeping the first");
        }
    }

    /// Records which Service port and backend each programmed id belongs
    /// to, for the labels of the datapath counters (after each apply).
    pub fn set_programmed_ids(&self, ids: ProgrammedIds) {
        let ids = Arc::new(ids);
        // A poisoned lock only means a scrape panicked: the value is whole.
        *self
            .datapath
            .ids
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ids;
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

/// Reads the datapath's per-CPU counters, summed over CPUs.
pub trait StatsReader: Send + Sync + 'static {
    fn service_stats(&self, service_id: u32) -> Result<ServiceStats, MapReadError>;
    fn backend_stats(&self, backend_id: u32) -> Result<BackendStats, MapReadError>;
}

impl StatsReader for StatsMaps {
    fn service_stats(&self, service_id: u32) -> Result<ServiceStats, MapReadError> {
        StatsMaps::service_stats(self, service_id)
    }

    fn backend_stats(&self, backend_id: u32) -> Result<BackendStats, MapReadError> {
        StatsMaps::backend_stats(self, backend_id)
    }
}

/// One programmed backend: its id and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedBackend {
    pub id: u32,
    pub addr: SocketAddrV4,
    /// "tcp" or "udp".
    pub protocol: &'static str,
}

/// The ids the writer handed out, with what they name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgrammedIds {
    pub service_ports: Vec<(ServicePortName, u32)>,
    pub backends: Vec<ProgrammedBackend>,
}

impl ProgrammedIds {
    /// What `writer` has programmed.
    pub fn of(writer: &Writer<AyaMaps>) -> Self {
        Self {
            service_ports: writer
                .service_ports()
                .map(|(name, id)| (name.clone(), id))
                .collect(),
            backends: writer
                .programmed()
                .backends
                .iter()
                .map(|(id, backend)| ProgrammedBackend {
                    id: *id,
                    addr: SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(backend.addr)),
                        u16::from_be(backend.port),
                    ),
                    protocol: lb_common::proto::name(backend.proto),
                })
                .collect(),
        }
    }
}

/// The collector of the datapath's per-Service and per-backend counters:
/// it reads the maps when `/metrics` is scraped, so the run loop only
/// swaps in [`ProgrammedIds`] after an apply.
#[derive(Default)]
pub struct DatapathCounters {
    reader: OnceLock<Box<dyn StatsReader>>,
    /// Replaced whole after each apply; a scrape clones the `Arc` and
    /// releases the lock before reading any map.
    ids: RwLock<Arc<ProgrammedIds>>,
}

impl std::fmt::Debug for DatapathCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCounters").finish_non_exhaustive()
    }
}

/// Encodes one counter metric with one series per `(labels, value)`.
fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstCounter::<u64>::new(0).metric_type())?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

const TO_BACKEND: &str = "to_backend";
const TO_CLIENT: &str = "to_client";
const SERVICE_RESET: &str = "a newly programmed Service port starts at 0";
const BACKEND_RESET: &str = "a newly programmed backend starts at 0";

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(reader) = self.reader.get() else {
            return Ok(());
        };
        let ids = Arc::clone(
            &self
                .ids
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // A failed read leaves that Service port's series out of this
        // scrape (and says so) rather than failing every metric. The ids
        // of one Service port (internal and external traffic) are summed.
        let mut by_port: BTreeMap<[(&str, &str); 4], Option<ServiceStats>> = BTreeMap::new();
        for (name, id) in &ids.service_ports {
            let labels = [
                ("namespace", name.namespace.as_str()),
                ("name", name.name.as_str()),
                ("port", name.port_name.as_str()),
                ("protocol", name.proto.name()),
            ];
            let sum = by_port
                .entry(labels)
                .or_insert_with(|| Some(ServiceStats::default()));
            match reader.service_stats(*id) {
                Ok(stats) => {
                    if let Some(sum) = sum {
                        sum.add(&stats);
                    }
                }
                Err(error) => {
                    warn!("/metrics: counters of {name}: {}", error_chain(&error));
                    *sum = None;
                }
            }
        }
        let services: Vec<([(&str, &str); 4], ServiceStats)> = by_port
            .into_iter()
            .filter_map(|(labels, stats)| Some((labels, stats?)))
            .collect();
        let backends: Vec<([(&str, String); 3], BackendStats)> = ids
            .backends
            .iter()
            .filter_map(|backend| match reader.backend_stats(backend.id) {
                Ok(stats) => Some((
                    [
                        ("address", backend.addr.ip().to_string()),
                        ("port", backend.addr.port().to_string()),
                        ("protocol", backend.protocol.to_owned()),
                    ],
                    stats,
                )),
                Err(error) => {
                    warn!(
                        "/metrics: counters of backend {}: {}",
                        backend.addr,
                        error_chain(&error)
                    );
                    None
                }
            })
            .collect();

        encode_counters(
            &mut encoder,
            "service_packets",
            &format!("Packets of a Service port translated, by direction ({SERVICE_RESET})"),
            services.iter().flat_map(|(labels, stats)| {
                [
                    ((&labels[..], [("direction", TO_BACKEND)]), stats.packets),
                    (
                        (&labels[..], [("direction", TO_CLIENT)]),
                        stats.reply_packets,
                    ),
                ]
            }),
        )?;
        encode_counters(
            &mut encoder,
            "service_bytes",
            &format!(
                "Bytes of a Service port's translated packets, by direction ({SERVICE_RESET})"
            ),
            services.iter().flat_map(|(labels, stats)| {
                [
                    ((&labels[..], [("direction", TO_BACKEND)]), stats.bytes),
                    ((&labels[..], [("direction", TO_CLIENT)]), stats.reply_bytes),
                ]
            }),
        )?;
        encode_counters(
            &mut encoder,
            "service_new_flows",
            &format!("Connections of a Service port balanced to a backend ({SERVICE_RESET})"),
            services
                .iter()
                .map(|(labels, stats)| (&labels[..], stats.new_flows)),
        )?;
        encode_counters(
            &mut encoder,
            "service_drops",
            &format!("Packets of a Service port dropped or refused, by reason ({SERVICE_RESET})"),
            services.iter().flat_map(|(labels, stats)| {
                DropReason::ALL.iter().map(move |reason| {
                    (
                        (&labels[..], [("reason", reason.name())]),
                        stats.drops[*reason as usize],
                    )
                })
            }),
        )?;
        encode_counters(
            &mut encoder,
            "backend_packets",
            &format!(
                "Packets to and from a backend over every Service port listing it, by direction ({BACKEND_RESET})"
            ),
            backends.iter().flat_map(|(labels, stats)| {
                [
                    ((&labels[..], [("direction", TO_BACKEND)]), stats.packets),
                    (
                        (&labels[..], [("direction", TO_CLIENT)]),
                        stats.reply_packets,
                    ),
                ]
            }),
        )?;
        encode_counters(
            &mut encoder,
            "backend_bytes",
            &format!(
                "Bytes to and from a backend over every Service port listing it, by direction ({BACKEND_RESET})"
            ),
            backends.iter().flat_map(|(labels, stats)| {
                [
                    ((&labels[..], [("direction", TO_BACKEND)]), stats.bytes),
                    ((&labels[..], [("direction", TO_CLIENT)]), stats.reply_bytes),
                ]
            }),
        )?;
        encode_counters(
            &mut encoder,
            "backend_new_flows",
            &format!("Connections balanced to a backend ({BACKEND_RESET})"),
            backends
                .iter()
                .map(|(labels, stats)| (&labels[..], stats.new_flows)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

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

    /// Counters a test sets: service id `n` and backend id `n` count `n`
    /// of everything; id 13 cannot be read.
    struct FakeStats;

    impl StatsReader for FakeStats {
        fn service_stats(&self, service_id: u32) -> Result<ServiceStats, MapReadError> {
            if service_id == 13 {
                return Err(MapReadError {
                    map: lb_common::names::MAP_SERVICE_STATS,
                    source: Box::new(aya::maps::MapError::OutOfBounds {
                        index: 13,
                        max_entries: 1,
                    }),
                });
            }
            let n = u64::from(service_id);
            let mut drops = [0; lb_common::stats::DROP_REASON_COUNT];
            drops[DropReason::NoBackend as usize] = n + 4;
            Ok(ServiceStats {
                packets: n,
                bytes: n * 100,
                reply_packets: n + 1,
                reply_bytes: n * 100 + 1,
                new_flows: n + 2,
                drops,
            })
        }

        fn backend_stats(&self, backend_id: u32) -> Result<BackendStats, MapReadError> {
            let n = u64::from(backend_id);
            Ok(BackendStats {
                packets: n,
                bytes: n * 10,
                reply_packets: n + 1,
                reply_bytes: n * 10 + 1,
                new_flows: n + 2,
            })
        }
    }

    fn port(namespace: &str, name: &str, port_name: &str, proto: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: namespace.into(),
            name: name.into(),
            port_name: port_name.into(),
            proto,
            traffic: crate::model::Traffic::Internal,
        }
    }

    #[test]
    fn datapath_counters_are_read_at_scrape_time() {
        let metrics = Metrics::new();
        let ids = ProgrammedIds {
            service_ports: vec![
                (port("default", "web", "http", Protocol::Tcp), 7),
                (port("kube-system", "dns", "", Protocol::Udp), 3),
                (port("default", "broken", "", Protocol::Tcp), 13),
                // The external traffic of web has its own id: summed.
                (
                    ServicePortName {
                        traffic: crate::model::Traffic::External,
                        ..port("default", "web", "http", Protocol::Tcp)
                    },
                    20,
                ),
                // One unreadable id leaves its Service port out whole.
                (
                    ServicePortName {
                        traffic: crate::model::Traffic::External,
                        ..port("default", "broken", "", Protocol::Tcp)
                    },
                    21,
                ),
            ],
            backends: vec![ProgrammedBackend {
                id: 2,
                addr: "198.18.0.10:8080".parse().unwrap(),
                protocol: "tcp",
            }],
        };
        // Ids without a reader: no datapath series at all.
        metrics.set_programmed_ids(ids.clone());
        assert!(!metrics.encode().contains("lb_agent_service_packets"));

        metrics.set_stats_reader(FakeStats);
        let text = metrics.encode();
        let web = r#"namespace="default",name="web",port="http",protocol="tcp""#;
        let dns = r#"namespace="kube-system",name="dns",port="",protocol="udp""#;
        let backend = r#"address="198.18.0.10",port="8080",protocol="tcp""#;
        for line in [
            "# TYPE lb_agent_service_packets counter".to_owned(),
            format!(r#"lb_agent_service_packets_total{{{web},direction="to_backend"}} 27"#),
            format!(r#"lb_agent_service_packets_total{{{web},direction="to_client"}} 29"#),
            format!(r#"lb_agent_service_bytes_total{{{web},direction="to_backend"}} 2700"#),
            format!(r#"lb_agent_service_bytes_total{{{web},direction="to_client"}} 2702"#),
            format!("lb_agent_service_new_flows_total{{{web}}} 31"),
            format!(r#"lb_agent_service_drops_total{{{web},reason="no_backend"}} 35"#),
            format!(r#"lb_agent_service_drops_total{{{web},reason="conntrack_full"}} 0"#),
            format!(r#"lb_agent_service_packets_total{{{dns},direction="to_backend"}} 3"#),
            format!("lb_agent_service_new_flows_total{{{dns}}} 5"),
            format!(r#"lb_agent_backend_packets_total{{{backend},direction="to_backend"}} 2"#),
            format!(r#"lb_agent_backend_packets_total{{{backend},direction="to_client"}} 3"#),
            format!(r#"lb_agent_backend_bytes_total{{{backend},direction="to_backend"}} 20"#),
            format!(r#"lb_agent_backend_bytes_total{{{backend},direction="to_client"}} 21"#),
            format!("lb_agent_backend_new_flows_total{{{backend}}} 4"),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Every reason is listed for every readable service port.
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("lb_agent_service_drops_total{"))
                .count(),
            2 * DropReason::ALL.len(),
            "{text}"
        );
        // The unreadable one is left out, the rest of the scrape stands.
        assert!(!text.contains(r#"name="broken""#), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");

        // The next apply's ids replace the labels.
        metrics.set_programmed_ids(ProgrammedIds::default());
        assert!(!metrics.encode().contains(r#"name="web""#));
    }
}

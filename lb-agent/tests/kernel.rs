//! Privileged tests against the real kernel: the real datapath object
//! through the loader, the real writer on real maps, read back through
//! `inspect`. Root and bpffs needed; no interface of the root namespace is
//! touched (the one attach test uses a veth pair inside its own netns).

mod common;

use std::net::SocketAddrV4;
use std::path::Path;

use aya::maps::{HashMap, MapData};
use common::{NetnsGuard, PinDirGuard, load_options, require_privileges};
use lb_agent::datapath::loader::{Datapath, LoadError};
use lb_agent::datapath::writer::{MapOps, Writer};
use lb_agent::inspect::{self, ServiceEntry};
use lb_agent::model::{Protocol, ServicePortName, Traffic};
use lb_agent::source::manifests::ManifestSource;
use lb_common::conntrack::{FLOW_F_REPLY_SEEN, Flow, FlowKey};
use lb_common::names::{ALL_MAPS, MAP_CONNTRACK};

fn fixtures() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/clusterip"
    ))
}

fn addr(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn web_http() -> ServicePortName {
    ServicePortName {
        namespace: "demo".into(),
        name: "web".into(),
        port_name: "http".into(),
        proto: Protocol::Tcp,
        traffic: Traffic::Internal,
    }
}

/// The fixtures' desired state.
fn fixture_state() -> lb_agent::model::DesiredState {
    let mut source = ManifestSource::new(fixtures());
    let outcome = source.scan().unwrap();
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    source.translate().state
}

fn find<'a>(services: &'a [ServiceEntry], frontend: &str, proto: &str) -> &'a ServiceEntry {
    services
        .iter()
        .find(|s| s.frontend == addr(frontend) && s.proto == proto)
        .unwrap_or_else(|| panic!("no {frontend}/{proto} in {services:#?}"))
}

/// Checks what `inspect` reads back against the fixtures.
fn check_fixture_services(pin_dir: &Path) -> Vec<ServiceEntry> {
    let services = inspect::services(pin_dir).unwrap();
    assert_eq!(services.len(), 3, "{services:#?}");

    let http = find(&services, "198.18.100.10:80", "tcp");
    let listed: Vec<(SocketAddrV4, bool)> =
        http.backends.iter().map(|b| (b.addr, b.ready)).collect();
    let (ready, not_ready) = listed.split_at(2);
    let mut ready: Vec<_> = ready.to_vec();
    ready.sort();
    assert_eq!(
        ready,
        [
            (addr("198.18.0.10:8080"), true),
            (addr("198.18.0.11:8080"), true)
        ]
    );
    assert_eq!(not_ready, [(addr("198.18.0.12:8080"), false)]);

    let dns = find(&services, "198.18.100.10:53", "udp");
    assert_eq!(dns.backends.len(), 2);
    assert!(
        dns.backends
            .iter()
            .all(|b| b.ready && b.addr.port() == 5353)
    );
    assert_ne!(dns.service_id, http.service_id);

    // A Service without endpoints is programmed with no slot: refused.
    let empty = find(&services, "198.18.100.20:443", "tcp");
    assert!(empty.backends.is_empty());
    services
}

#[test]
fn writer_programs_real_maps_and_inspect_reads_them_back() {
    require_privileges();
    let pins = PinDirGuard::new();
    let mut datapath = Datapath::load(&load_options(pins.path())).unwrap();
    assert!(datapath.reused_pins().is_empty());
    for name in ALL_MAPS {
        assert!(pins.path().join(name).exists(), "{name} not pinned");
    }

    let mut writer = Writer::new(datapath.take_maps().unwrap());
    let desired = fixture_state();
    let report = writer.apply(&desired);
    assert_eq!(report.failures, 0);
    assert_eq!(report.frontends, 3);
    assert_eq!(report.backends, 5);
    assert_eq!(
        writer.apply(&desired).writes,
        0,
        "unchanged state rewrote maps"
    );
    // What the kernel holds is what the writer believes it holds.
    assert_eq!(&writer.maps().read_all().unwrap(), writer.programmed());

    check_fixture_services(pins.path());
    assert!(inspect::conntrack(pins.path()).unwrap().is_empty());
    let counters = inspect::counters(pins.path()).unwrap();
    assert_eq!(counters.len(), lb_common::counters::COUNTER_COUNT as usize);
    assert_eq!(counters[0].0, "pass");
    assert!(counters.iter().all(|(_, value)| *value == 0));

    // A change: web loses 198.18.0.10 entirely.
    let mut source = ManifestSource::new(fixtures());
    source.scan().unwrap();
    let mut changed = lb_agent::model::DesiredState::new();
    for (name, port) in desired.services() {
        let mut port = port.clone();
        port.backends.retain(|addr, _| addr.ip().octets()[3] != 10);
        changed.insert(name.clone(), port);
    }
    assert_eq!(writer.apply(&changed).failures, 0);
    let services = inspect::services(pins.path()).unwrap();
    let http = find(&services, "198.18.100.10:80", "tcp");
    assert_eq!(http.backends.len(), 2);
    assert_eq!(http.backends[0].addr, addr("198.18.0.11:8080"));
    assert!(http.backends[0].ready);

    drop(writer);
    datapath.shutdown(false).unwrap();
    assert!(!pins.path().exists(), "pins left behind");
}

#[test]
fn kept_pins_are_reused_with_their_flows_and_ids() {
    require_privileges();
    let pins = PinDirGuard::new();
    let desired = fixture_state();

    let mut datapath = Datapath::load(&load_options(pins.path())).unwrap();
    let mut writer = Writer::new(datapath.take_maps().unwrap());
    writer.apply(&desired);
    let service_id = writer.service_id(&web_http()).unwrap();
    let before = inspect::services(pins.path()).unwrap();

    // A flow, as the datapath would have recorded it.
    let key = FlowKey {
        client_addr: u32::from(*addr("198.18.1.5:40000").ip()).to_be(),
        client_port: 40000u16.to_be(),
        proto: lb_common::proto::TCP,
        _pad: 0,
        service_id,
    };
    let backend = &find(&before, "198.18.100.10:80", "tcp").backends[0];
    let flow = Flow {
        backend_addr: u32::from(*backend.addr.ip()).to_be(),
        backend_port: backend.addr.port().to_be(),
        frontend_port: 80u16.to_be(),
        frontend_addr: u32::from(*addr("198.18.100.10:80").ip()).to_be(),
        backend_id: backend.id,
        last_seen: 0,
        flags: FLOW_F_REPLY_SEEN,
        _pad: 0,
        nat_port: 0,
    };
    {
        let data = MapData::from_pin(pins.path().join(MAP_CONNTRACK)).unwrap();
        let mut conntrack: HashMap<MapData, FlowKey, Flow> =
            HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
        conntrack.insert(&key, &flow, 0).unwrap();
    }
    drop(writer);
    datapath.shutdown(true).unwrap();
    assert!(
        pins.path().join(MAP_CONNTRACK).exists(),
        "--keep-pins removed pins"
    );

    // Restart: same maps, same ids, no write needed, the flow is still there.
    let mut datapath = Datapath::load(&load_options(pins.path())).unwrap();
    assert_eq!(datapath.reused_pins().len(), ALL_MAPS.len());
    let mut writer = Writer::adopt(datapath.take_maps().unwrap()).unwrap();
    let report = writer.apply(&desired);
    assert_eq!(report.writes, 0, "adopted maps were rewritten");
    assert_eq!(writer.service_id(&web_http()), Some(service_id));
    let after = inspect::services(pins.path()).unwrap();
    assert_eq!(
        serde_json::to_value(&before).unwrap(),
        serde_json::to_value(&after).unwrap()
    );
    let flows = inspect::conntrack(pins.path()).unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].client, addr("198.18.1.5:40000"));
    assert_eq!(flows[0].frontend, addr("198.18.100.10:80"));
    assert_eq!(flows[0].backend, backend.addr);
    assert_eq!(flows[0].service_id, service_id);
    assert_eq!(flows[0].flags, ["reply_seen"]);

    drop(writer);
    datapath.shutdown(false).unwrap();
    assert!(!pins.path().exists());
}

#[test]
fn incompatible_pins_are_refused_clearly() {
    require_privileges();
    let pins = PinDirGuard::new();
    let datapath = Datapath::load(&load_options(pins.path())).unwrap();
    datapath.shutdown(true).unwrap();

    let mut options = load_options(pins.path());
    options.capacities.flows *= 2;
    let error = Datapath::load(&options).unwrap_err();
    match &error {
        LoadError::IncompatiblePin { map, property, .. } => {
            assert_eq!(map, MAP_CONNTRACK);
            assert_eq!(*property, "max_entries");
        }
        other => panic!("unexpected error: {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains("--max-"), "{message}");
    // The refused load left the existing pins alone.
    for name in ALL_MAPS {
        assert!(pins.path().join(name).exists());
    }
}

#[test]
fn a_pin_dir_in_use_is_refused() {
    require_privileges();
    let pins = PinDirGuard::new();
    let first = Datapath::load(&load_options(pins.path())).unwrap();
    let error = Datapath::load(&load_options(pins.path())).unwrap_err();
    assert!(matches!(error, LoadError::PinDirInUse(_)), "{error:?}");
    assert!(error.to_string().contains("another lb-agent"));
    // The refused load touched nothing: the first instance's pins remain.
    for name in ALL_MAPS {
        assert!(pins.path().join(name).exists());
    }
    first.shutdown(false).unwrap();
    assert!(!pins.path().exists());
}

#[test]
fn pin_dir_outside_bpffs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let error = Datapath::load(&load_options(&dir.path().join("pins"))).unwrap_err();
    assert!(matches!(error, LoadError::NotBpffs(_)), "{error:?}");
    assert!(error.to_string().contains("mount -t bpf"));
    assert!(!dir.path().join("pins").exists());
}

#[test]
fn attaches_with_tcx_inside_a_test_namespace_and_detaches() {
    require_privileges();
    let pins = PinDirGuard::new();
    let netns = NetnsGuard::with_veth();
    let mut datapath = Datapath::load(&load_options(pins.path())).unwrap();

    let iface = netns.host_end.clone();
    netns.run_inside(|| datapath.attach(&iface)).unwrap();
    assert_eq!(netns.tcx_ingress_programs(&netns.host_end), ["lb_tc_pod"]);

    // An interface that does not exist (in this thread's namespace).
    let error = netns
        .run_inside(|| datapath.attach("lbt-missing"))
        .unwrap_err();
    assert!(error.to_string().contains("lbt-missing"), "{error}");

    datapath.shutdown(false).unwrap();
    assert!(netns.tcx_ingress_programs(&netns.host_end).is_empty());
    assert!(!pins.path().exists());
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local` and client
/// ranges, translated for node `here` with one node address.
fn external_translation(source_ranges: &str) -> lb_agent::translate::Translation {
    let service: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: shop, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.30
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  loadBalancerSourceRanges: [{source_ranges}]
  ports: [{{port: 80, nodePort: 30080, targetPort: 8080}}]
status: {{loadBalancer: {{ingress: [{{ip: 198.18.253.10}}]}}}}
"#
    ))
    .unwrap();
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_yaml::from_str(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-1, namespace: demo, labels: {kubernetes.io/service-name: shop}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.18.32.10], nodeName: here}
- {addresses: [198.18.64.10], nodeName: there}
"#,
    )
    .unwrap();
    let scope = lb_agent::translate::Scope {
        node_name: Some("here".into()),
        node_addresses: vec!["198.18.254.1".parse().unwrap()],
        ..Default::default()
    };
    lb_agent::translate::translate_in(&scope, [&service], [&slice])
}

#[test]
fn external_frontends_and_source_ranges_on_real_maps() {
    require_privileges();
    let pins = PinDirGuard::new();
    let mut datapath = Datapath::load(&load_options(pins.path())).unwrap();
    let mut writer = Writer::new(datapath.take_maps().unwrap());
    let translation = external_translation("198.18.254.100/32, 198.18.254.128/25");
    assert!(translation.notices.is_empty(), "{:?}", translation.notices);
    assert_eq!(translation.state.health_checks()[&32100].local_endpoints, 1);
    let report = writer.apply(&translation.state);
    assert_eq!(report.failures, 0);
    // ClusterIP (internal id) + NodePort and LB IP (external id).
    assert_eq!(report.frontends, 3);
    assert_eq!(report.service_ports, 2);
    // The LPM trie reads back as written.
    assert_eq!(&writer.maps().read_all().unwrap(), writer.programmed());

    let services = inspect::services(pins.path()).unwrap();
    let cluster_ip = find(&services, "198.18.100.30:80", "tcp");
    let node_port = find(&services, "198.18.254.1:30080", "tcp");
    let load_balancer = find(&services, "198.18.253.10:80", "tcp");
    assert!(cluster_ip.flag_names.is_empty(), "{cluster_ip:?}");
    assert_eq!(node_port.flag_names, ["external", "drop"]);
    assert_eq!(
        load_balancer.flag_names,
        ["external", "source_ranges", "drop"]
    );
    assert_eq!(
        load_balancer.source_ranges,
        ["198.18.254.100/32", "198.18.254.128/25"]
    );
    assert_eq!(node_port.service_id, load_balancer.service_id);
    assert_ne!(node_port.service_id, cluster_ip.service_id);
    // Local: only this node's endpoint is ready for the external id, and
    // it is flagged local; the other stays listed.
    let ready: Vec<_> = load_balancer
        .backends
        .iter()
        .map(|b| (b.addr, b.ready, b.local))
        .collect();
    assert_eq!(
        ready,
        [
            (addr("198.18.32.10:8080"), true, true),
            (addr("198.18.64.10:8080"), false, false)
        ]
    );
    assert_eq!(cluster_ip.backends.iter().filter(|b| b.ready).count(), 2);
    let ranges = inspect::source_ranges(pins.path()).unwrap();
    assert_eq!(ranges.len(), 2);
    assert!(
        ranges
            .iter()
            .all(|r| r.service_id == load_balancer.service_id)
    );
    assert!(inspect::snat(pins.path()).unwrap().is_empty());

    // A restart adopts the ranges as they are.
    drop(writer);
    datapath.shutdown(true).unwrap();
    let mut datapath = Datapath::load(&load_options(pins.path())).unwrap();
    let mut writer = Writer::adopt(datapath.take_maps().unwrap()).unwrap();
    assert_eq!(writer.apply(&translation.state).writes, 0);

    // One range fewer, then none (unrestricted).
    let narrower = external_translation("198.18.254.100/32");
    assert_eq!(writer.apply(&narrower.state).failures, 0);
    assert_eq!(inspect::source_ranges(pins.path()).unwrap().len(), 1);
    let open = external_translation("");
    assert_eq!(writer.apply(&open.state).failures, 0);
    assert!(inspect::source_ranges(pins.path()).unwrap().is_empty());
    let services = inspect::services(pins.path()).unwrap();
    assert_eq!(
        find(&services, "198.18.253.10:80", "tcp").flag_names,
        ["external", "drop"]
    );
    assert_eq!(&writer.maps().read_all().unwrap(), writer.programmed());

    drop(writer);
    datapath.shutdown(false).unwrap();
    assert!(!pins.path().exists());
}

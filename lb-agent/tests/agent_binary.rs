//! The `lb-agent` binary end to end, without traffic: started inside a test
//! network namespace (attached to a veth there), it programs the
//! manifests, follows changes on disk, reports bad input, and on SIGTERM
//! detaches and removes its pins. Root and bpffs needed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{AgentGuard, NetnsGuard, PinDirGuard, require_privileges};
use lb_agent::inspect;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clusterip");

/// `lb-agent run` on the manifests in `manifests`, attached to the test
/// veth, with small maps and JSON logs (into `logs/agent.log`), plus `extra`.
fn start_agent(
    netns: &NetnsGuard,
    manifests: &Path,
    pin_dir: &str,
    extra: &[&str],
    logs: &Path,
) -> AgentGuard {
    let mut args = vec![
        "run",
        "--manifests",
        manifests.to_str().unwrap(),
        "--attach",
        &netns.host_end,
        "--pin-dir",
        pin_dir,
        "--max-services",
        "64",
        "--max-backends",
        "64",
        "--max-slots",
        "256",
        "--max-flows",
        "1024",
        "--log-format",
        "json",
    ];
    args.extend_from_slice(extra);
    AgentGuard::start(netns, &args, logs.join("agent.log"))
}

fn copy_fixtures(to: &Path) {
    for entry in std::fs::read_dir(FIXTURES).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

/// Polls `inspect::services` until `predicate` holds; returns how long it took.
fn wait_for_services(
    pin_dir: &Path,
    timeout: Duration,
    predicate: impl Fn(&[inspect::ServiceEntry]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(services) = inspect::services(pin_dir)
            && predicate(&services)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "maps never reached the expected state"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

const EXTRA: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: extra, namespace: demo}
spec:
  clusterIP: 198.18.100.30
  ports: [{port: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: extra-1
  namespace: demo
  labels: {kubernetes.io/service-name: extra}
addressType: IPv4
ports: [{port: 9443}]
endpoints: [{addresses: [198.18.0.30]}]
"#;

#[test]
fn agent_follows_manifests_and_cleans_up_on_sigterm() {
    require_privileges();
    let pins = PinDirGuard::new();
    let netns = NetnsGuard::with_veth();
    let manifests = tempfile::tempdir().unwrap();
    copy_fixtures(manifests.path());
    let logs = tempfile::tempdir().unwrap();
    let pin_dir = pins.path().to_str().unwrap();

    let mut agent = start_agent(&netns, manifests.path(), pin_dir, &[], logs.path());

    // The start-up line, in JSON.
    let line = agent.wait_for_log(Duration::from_secs(30), |line| line.contains("programmed"));
    let record: serde_json::Value = serde_json::from_str(&line).expect("log line is not JSON");
    assert_eq!(record["level"], "INFO");
    assert_eq!(record["fields"]["frontends"], 3);
    assert_eq!(record["fields"]["backends"], 5);
    assert_eq!(netns.tcx_ingress_programs(&netns.host_end), ["lb_tc_pod"]);
    assert_eq!(inspect::services(pins.path()).unwrap().len(), 3);

    // A new file reaches the maps within a fraction of a second.
    std::fs::write(manifests.path().join("extra.yaml"), EXTRA).unwrap();
    let latency = wait_for_services(pins.path(), Duration::from_secs(5), |services| {
        services.iter().any(|s| {
            s.frontend == "198.18.100.30:8443".parse().unwrap()
                && s.backends.len() == 1
                && s.backends[0].addr == "198.18.0.30:9443".parse().unwrap()
        })
    });
    eprintln!("manifest write -> map entry: {latency:?}");
    assert!(latency < Duration::from_millis(500), "took {latency:?}");

    // A bad object: one error line naming file, object and field; the
    // last good version stays programmed.
    let broken = EXTRA.replace("ports: [{port: 8443}]", "ports: [{port: 0}]");
    std::fs::write(manifests.path().join("extra.yaml"), broken).unwrap();
    let line = agent.wait_for_log(Duration::from_secs(5), |line| line.contains("\"ERROR\""));
    assert!(line.contains("extra.yaml"), "{line}");
    assert!(line.contains("Service demo/extra"), "{line}");
    assert!(line.contains("spec.ports[0].port"), "{line}");
    std::thread::sleep(Duration::from_millis(300));
    let errors = agent
        .log_lines()
        .into_iter()
        .filter(|line| line.contains("\"ERROR\""))
        .count();
    assert_eq!(errors, 1, "{:#?}", agent.log_lines());
    let services = inspect::services(pins.path()).unwrap();
    assert!(
        services
            .iter()
            .any(|s| s.frontend == "198.18.100.30:8443".parse().unwrap())
    );

    // A deleted file withdraws its objects.
    std::fs::remove_file(manifests.path().join("extra.yaml")).unwrap();
    wait_for_services(pins.path(), Duration::from_secs(5), |services| {
        services.len() == 3
    });

    // SIGTERM: detach, unpin, exit 0.
    let status = agent.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!pins.path().exists(), "pins left behind");
    assert!(netns.tcx_ingress_programs(&netns.host_end).is_empty());
}

const SHOP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.40
  externalIPs: [198.18.253.20]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  loadBalancerSourceRanges: [198.18.254.100/32]
  ports: [{port: 80, nodePort: 30080, targetPort: 8080}]
status: {loadBalancer: {ingress: [{ip: 198.18.253.10}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: shop-1
  namespace: demo
  labels: {kubernetes.io/service-name: shop}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.18.32.10], nodeName: here}
- {addresses: [198.18.64.10], nodeName: there}
"#;

#[test]
fn agent_programs_load_balancer_and_external_ips_with_source_ranges() {
    require_privileges();
    let pins = PinDirGuard::new();
    let netns = NetnsGuard::with_veth();
    let manifests = tempfile::tempdir().unwrap();
    std::fs::write(manifests.path().join("shop.yaml"), SHOP).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let pin_dir = pins.path().to_str().unwrap();

    let mut agent = start_agent(
        &netns,
        manifests.path(),
        pin_dir,
        &["--node-name", "here"],
        logs.path(),
    );
    agent.wait_for_log(Duration::from_secs(30), |line| line.contains("programmed"));

    // ClusterIP on its own id (Cluster policy); the load-balancer IP and
    // the external IP on the Local id: only this node's endpoint ready.
    let lb: std::net::SocketAddrV4 = "198.18.253.10:80".parse().unwrap();
    let external: std::net::SocketAddrV4 = "198.18.253.20:80".parse().unwrap();
    let cluster_ip: std::net::SocketAddrV4 = "198.18.100.40:80".parse().unwrap();
    wait_for_services(pins.path(), Duration::from_secs(5), |services| {
        services.iter().any(|s| s.frontend == lb)
    });
    let services = inspect::services(pins.path()).unwrap();
    let find = |frontend| services.iter().find(|s| s.frontend == frontend).unwrap();
    assert_eq!(
        find(lb).flag_names,
        ["external", "source_ranges", "drop"],
        "{services:#?}"
    );
    assert_eq!(find(lb).source_ranges, ["198.18.254.100/32"]);
    assert_eq!(find(external).flag_names, ["external", "drop"]);
    assert!(find(cluster_ip).flag_names.is_empty());
    assert_eq!(find(lb).service_id, find(external).service_id);
    assert_ne!(find(lb).service_id, find(cluster_ip).service_id);
    let ready: Vec<_> = find(lb)
        .backends
        .iter()
        .filter(|b| b.ready)
        .map(|b| (b.addr, b.local))
        .collect();
    assert_eq!(ready, [("198.18.32.10:8080".parse().unwrap(), true)]);
    assert_eq!(
        find(cluster_ip).backends.iter().filter(|b| b.ready).count(),
        2
    );

    // A bad range: one warning naming the field, and the load-balancer
    // frontend admits nobody (still flagged, no range) until it is fixed.
    let broken = SHOP.replace("198.18.254.100/32", "198.18.254.100/33");
    std::fs::write(manifests.path().join("shop.yaml"), broken).unwrap();
    let line = agent.wait_for_log(Duration::from_secs(5), |line| {
        line.contains("loadBalancerSourceRanges[0]")
    });
    assert!(line.contains("\"WARN\""), "{line}");
    assert!(line.contains("Service demo/shop"), "{line}");
    wait_for_services(pins.path(), Duration::from_secs(5), |services| {
        services
            .iter()
            .any(|s| s.frontend == lb && s.source_ranges.is_empty())
    });
    let services = inspect::services(pins.path()).unwrap();
    let shop_lb = services.iter().find(|s| s.frontend == lb).unwrap();
    assert!(shop_lb.flag_names.contains(&"source_ranges".to_owned()));
    assert!(inspect::source_ranges(pins.path()).unwrap().is_empty());
    // The rest of the Service stays programmed.
    assert!(services.iter().any(|s| s.frontend == external));

    let status = agent.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!pins.path().exists(), "pins left behind");
}

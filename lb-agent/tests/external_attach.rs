//! The external path as the agent runs it, in a test network namespace
//! (a veth pair and a bridge created inside it; nothing touches
//! the root namespace): `lb_xdp_ext` in native mode on a veth and in
//! generic mode on a driver without native XDP, `lb_tc_ext` at tcx ingress,
//! both detached on shutdown; and the `lb-agent` binary with `--external`:
//! node addresses from the interface (and followed as they change), the
//! SNAT address in `LB_CONFIG`,
//! `--attach-veths` leaving the external interface to the external
//! programs, and a health-check node port following its Service. Root and
//! bpffs needed.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aya::maps::{Array, Map, MapData};
use aya::programs::XdpMode;
use common::{AgentGuard, NetnsGuard, PinDirGuard, ip, load_options, require_privileges};
use lb_agent::datapath::loader::{Datapath, LoadError};
use lb_common::config::DatapathConfig;
use lb_common::names::{MAP_CONFIG, PROG_TC_EXTERNAL, PROG_TC_POD};
use lb_common::service::SERVICE_F_EXTERNAL;

/// `IFLA_XDP_ATTACHED` values as `ip -j link` reports them (`xdp.mode`).
const XDP_ATTACHED_DRV: u64 = 1;
const XDP_ATTACHED_SKB: u64 = 2;

/// The XDP attachment mode of `iface` in `netns`, if a program is attached.
fn xdp_mode(netns: &NetnsGuard, iface: &str) -> Option<u64> {
    let output = Command::new("ip")
        .args(["-j", "-n", &netns.name, "link", "show", "dev", iface])
        .output()
        .expect("running ip(8)");
    assert!(output.status.success(), "{output:?}");
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    links[0]["xdp"]["mode"].as_u64()
}

/// `LB_CONFIG` as pinned under `pin_dir`.
fn pinned_config(pin_dir: &Path) -> DatapathConfig {
    let data = MapData::from_pin(pin_dir.join(MAP_CONFIG)).expect("opening the pinned LB_CONFIG");
    let array: Array<MapData, DatapathConfig> = Array::try_from(Map::Array(data)).unwrap();
    array.get(&0, 0).unwrap()
}

#[test]
fn external_programs_attach_native_or_generic_and_detach() {
    require_privileges();
    let netns = NetnsGuard::with_veth();
    // A bridge has no native XDP: generic mode it is.
    ip(&["-n", &netns.name, "link", "add", "lbt-br", "type", "bridge"]);
    ip(&["-n", &netns.name, "link", "set", "lbt-br", "up"]);
    let pins = PinDirGuard::new();
    let host = netns.host_end.clone();

    netns.run_inside(|| {
        let mut datapath = Datapath::load(&load_options(pins.path())).unwrap();
        assert_eq!(datapath.attach_external(&host).unwrap(), XdpMode::Driver);
        assert_eq!(datapath.attach_external("lbt-br").unwrap(), XdpMode::Skb);
        let error = datapath.attach_external(&host).unwrap_err();
        assert!(
            matches!(error, LoadError::AlreadyExternal { .. }),
            "{error:?}"
        );
        // A missing interface is no reason to try generic mode.
        let error = datapath.attach_external("lbt-nope").unwrap_err();
        match &error {
            LoadError::AttachXdp { source, .. } => assert!(
                matches!(
                    **source,
                    aya::programs::ProgramError::UnknownInterface { .. }
                ),
                "{error:?}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            datapath.external().collect::<Vec<_>>(),
            [(host.as_str(), XdpMode::Driver), ("lbt-br", XdpMode::Skb)]
        );
        assert_eq!(xdp_mode(&netns, &host), Some(XDP_ATTACHED_DRV));
        assert_eq!(xdp_mode(&netns, "lbt-br"), Some(XDP_ATTACHED_SKB));
        for iface in [host.as_str(), "lbt-br"] {
            assert_eq!(netns.tcx_ingress_programs(iface), [PROG_TC_EXTERNAL]);
        }

        // The SNAT address is written to LB_CONFIG when it changes.
        let snat = Ipv4Addr::new(198, 18, 254, 2);
        assert!(datapath.set_snat_addr(snat).unwrap());
        assert!(!datapath.set_snat_addr(snat).unwrap());
        let config = pinned_config(pins.path());
        assert_eq!(config.snat_addr.to_ne_bytes(), snat.octets());
        assert_eq!(config.tcp_timeout, DatapathConfig::DEFAULT.tcp_timeout);

        datapath.shutdown(false).unwrap();
    });
    for iface in [host.as_str(), "lbt-br"] {
        assert_eq!(xdp_mode(&netns, iface), None, "{iface}");
        assert!(netns.tcx_ingress_programs(iface).is_empty(), "{iface}");
    }
    assert!(!pins.path().exists());
}

/// `GET /healthz` to `127.0.0.1:port` inside `netns`: the status code and
/// the JSON body, or `None` while nothing answers (a connection the
/// listener accepted as it closed is reset, which counts as nothing).
fn health_check(netns: &NetnsGuard, port: u16) -> Option<(u16, serde_json::Value)> {
    netns.run_inside(|| {
        let mut stream = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.get(9..12)?.parse().ok()?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        Some((status, serde_json::from_str(body).ok()?))
    })
}

/// Polls `probe` until it returns `Some(wanted)`-like values, for up to
/// 10 s; the last value on timeout.
fn wait_until<T: std::fmt::Debug>(mut probe: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = probe();
        if done(&value) || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 2);
/// Added later, in another subnet (deleting a primary address deletes the
/// secondaries of its subnet).
const SECOND_NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 252, 2);
const NODE_PORT: u16 = 30080;
const HEALTH_PORT: u16 = 30999;

fn web_service(health_check_node_port: Option<u16>) -> String {
    let health = match health_check_node_port {
        Some(port) => format!("  healthCheckNodePort: {port}\n"),
        None => String::new(),
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 198.18.200.10
  externalTrafficPolicy: Local
{health}  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}, protocol: TCP}}
"
    )
}

fn web_endpoints(node: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
- addresses: [198.18.32.2]
  nodeName: {node}
  conditions: {{ready: true}}
"
    )
}

/// Writes `content` to `path` whole (a rename), so the agent never reads
/// half a file.
fn write_manifest(path: &Path, content: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, content).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

#[test]
fn agent_runs_the_external_path() {
    require_privileges();
    let netns = NetnsGuard::with_veth();
    let host = netns.host_end.clone();
    let pod = netns.peer_end.clone();
    ip(&[
        "-n",
        &netns.name,
        "addr",
        "add",
        &format!("{NODE_ADDR}/24"),
        "dev",
        &host,
    ]);
    // The health check is asked on 127.0.0.1.
    ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
    let pins = PinDirGuard::new();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write_manifest(&manifests.join("web.yaml"), &web_service(Some(HEALTH_PORT)));
    write_manifest(&manifests.join("web-1.yaml"), &web_endpoints("node-a"));

    let mut agent = AgentGuard::start(
        &netns,
        &[
            "run",
            "--manifests",
            manifests.to_str().unwrap(),
            "--node-name",
            "node-a",
            "--external",
            &host,
            "--attach-veths",
            "--pin-dir",
            pins.path().to_str().unwrap(),
            "--max-snat-flows",
            "1024",
            "--max-source-ranges",
            "64",
            "--max-flows",
            "1024",
        ],
        dir.path().join("agent.log"),
    );
    agent.wait_for_log(Duration::from_secs(30), |line| line.contains("programmed"));
    // The veth scan attaches the pod end within a second.
    let pod_programs = wait_until(
        || netns.tcx_ingress_programs(&pod),
        |programs| !programs.is_empty(),
    );

    // The external interface has the external programs only, though it is
    // a veth too; the pod's end has the pod program.
    assert_eq!(xdp_mode(&netns, &host), Some(XDP_ATTACHED_DRV));
    assert_eq!(netns.tcx_ingress_programs(&host), [PROG_TC_EXTERNAL]);
    assert_eq!(pod_programs, [PROG_TC_POD]);

    // The interface's address is the node's: the NodePort is a frontend
    // on it, and the SNAT address.
    let services = lb_agent::inspect::services(pins.path()).unwrap();
    let node_port = services
        .iter()
        .find(|entry| entry.frontend == SocketAddrV4::new(NODE_ADDR, NODE_PORT))
        .unwrap_or_else(|| panic!("no NodePort frontend on {NODE_ADDR}: {services:#?}"));
    assert_ne!(node_port.flags & SERVICE_F_EXTERNAL, 0, "{node_port:?}");
    assert_eq!(
        pinned_config(pins.path()).snat_addr.to_ne_bytes(),
        NODE_ADDR.octets()
    );

    // The health-check node port: one local endpoint, 200...
    let (status, body) = wait_until(
        || health_check(&netns, HEALTH_PORT),
        |response| response.is_some(),
    )
    .unwrap_or_else(|| panic!("nothing on port {HEALTH_PORT}; log:\n{}", agent.log()));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({
            "service": {"namespace": "shop", "name": "web"},
            "localEndpoints": 1,
            "serviceProxyHealthy": true,
        })
    );
    // ...none once the endpoint is on another node: 503...
    write_manifest(&manifests.join("web-1.yaml"), &web_endpoints("node-b"));
    let response = wait_until(
        || health_check(&netns, HEALTH_PORT),
        |response| matches!(response, Some((503, _))),
    );
    let (_, body) = response.expect("the health-check port closed");
    assert_eq!(body["localEndpoints"], 0);
    // ...and closed when the Service no longer has the port.
    write_manifest(&manifests.join("web.yaml"), &web_service(None));
    let response = wait_until(
        || health_check(&netns, HEALTH_PORT),
        |response| response.is_none(),
    );
    assert!(response.is_none(), "still served: {response:?}");

    // The interface's addresses are read again now and then: a new one gets
    // the NodePort, and when the first one goes, the SNAT address moves.
    let node_ports = || -> Vec<SocketAddrV4> {
        let mut frontends: Vec<SocketAddrV4> = lb_agent::inspect::services(pins.path())
            .unwrap()
            .into_iter()
            .map(|entry| entry.frontend)
            .filter(|frontend| frontend.port() == NODE_PORT)
            .collect();
        frontends.sort();
        frontends
    };
    ip(&[
        "-n",
        &netns.name,
        "addr",
        "add",
        &format!("{SECOND_NODE_ADDR}/24"),
        "dev",
        &host,
    ]);
    let both = [
        SocketAddrV4::new(SECOND_NODE_ADDR, NODE_PORT),
        SocketAddrV4::new(NODE_ADDR, NODE_PORT),
    ];
    assert_eq!(wait_until(node_ports, |frontends| *frontends == both), both);
    ip(&[
        "-n",
        &netns.name,
        "addr",
        "del",
        &format!("{NODE_ADDR}/24"),
        "dev",
        &host,
    ]);
    let second = [SocketAddrV4::new(SECOND_NODE_ADDR, NODE_PORT)];
    assert_eq!(
        wait_until(node_ports, |frontends| *frontends == second),
        second
    );
    assert_eq!(
        pinned_config(pins.path()).snat_addr.to_ne_bytes(),
        SECOND_NODE_ADDR.octets()
    );

    let status = agent.terminate();
    assert!(status.success(), "{status}; log:\n{}", agent.log());
    assert_eq!(xdp_mode(&netns, &host), None);
    assert!(netns.tcx_ingress_programs(&host).is_empty());
    assert!(netns.tcx_ingress_programs(&pod).is_empty());
    assert!(!pins.path().exists());
}

#[test]
fn agent_refuses_a_missing_external_interface() {
    require_privileges();
    let netns = NetnsGuard::with_veth();
    let pins = PinDirGuard::new();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentGuard::start(
        &netns,
        &[
            "run",
            "--manifests",
            dir.path().to_str().unwrap(),
            "--external",
            "lbt-nope",
            "--pin-dir",
            pins.path().to_str().unwrap(),
        ],
        dir.path().join("agent.log"),
    );
    let status = agent.wait_for_exit(Duration::from_secs(10));
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("--external lbt-nope: no such interface"),
        "{log}"
    );
    // Refused before anything was loaded or pinned.
    assert!(!pins.path().exists());
}

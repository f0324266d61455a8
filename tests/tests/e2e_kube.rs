//! The Kubernetes API source end to end: the agent in a node namespace
//! reaches a fake kube-apiserver (tests/src/fake_apiserver.rs) on that
//! namespace's loopback through a kubeconfig, as it would reach a cluster,
//! and programs the datapath on the pods' veths; real TCP between pod
//! namespaces checks the result.
//!
//! Each test builds its own testbed, API server and agent, so tests run in
//! parallel. Needs root, bpffs and the agent binary (`LB_AGENT_BIN`, or
//! target/debug/lb-agent).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_agent::datapath::maps::{open_pinned, typed};
use lb_agent::inspect::ServiceEntry;
use lb_common::names::MAP_SERVICES;
use lb_common::service::{ServiceKey, ServiceValue};
use lb_tests::agent::{Agent, tcx_ingress_programs};
use lb_tests::fake_apiserver::{FakeApiConfig, FakeApiServer, ResourceKind, Verb};
use lb_tests::fixture::{NODE, OneNode};
use lb_tests::manifests::Protocol;
use lb_tests::topology::{Pod, cluster_ip};
use lb_tests::traffic::tcp_request;
use serde_json::{Value, json};

const TCP_PORT: u16 = 80;
const TCP_TARGET: u16 = 8080;
const UDP_PORT: u16 = 53;
const UDP_TARGET: u16 = 5353;
/// Where the agent serves /healthz, /readyz and /metrics, on the node
/// namespace's loopback.
const HEALTH_ADDR: &str = "127.0.0.1:10256";

// ---------------------------------------------------------------------------
// Objects, as a controller would write them.

/// A Service with a TCP port `tcp` (80 -> 8080) and a UDP port `udp`
/// (53 -> 5353); `extra` is merged into the object (labels, spec fields).
fn service(name: &str, ip: Ipv4Addr, extra: Value) -> Service {
    let mut object = json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": ip.to_string(),
            "ports": [
                {"name": "tcp", "port": TCP_PORT, "targetPort": TCP_TARGET, "protocol": "TCP"},
                {"name": "udp", "port": UDP_PORT, "targetPort": UDP_TARGET, "protocol": "UDP"},
            ],
        },
    });
    merge(&mut object, extra);
    serde_json::from_value(object).expect("a valid Service")
}

/// One endpoint: `conditions` as the API has them, `node` its nodeName.
fn endpoint(addr: Ipv4Addr, ready: bool, serving: bool, terminating: bool, node: &str) -> Value {
    json!({
        "addresses": [addr.to_string()],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": node,
    })
}

fn ready(addr: Ipv4Addr) -> Value {
    endpoint(addr, true, true, false, NODE)
}

/// The slice `<service>-<suffix>` of `service`, with its ports and labels
/// (`extra_labels` merged in, as the EndpointSlice controller copies the
/// Service's).
fn slice(service: &str, suffix: &str, endpoints: Vec<Value>, extra: Value) -> EndpointSlice {
    let mut object = json!({
        "metadata": {
            "name": format!("{service}-{suffix}"),
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "tcp", "port": TCP_TARGET, "protocol": "TCP"},
            {"name": "udp", "port": UDP_TARGET, "protocol": "UDP"},
        ],
        "endpoints": endpoints,
    });
    merge(&mut object, extra);
    serde_json::from_value(object).expect("a valid EndpointSlice")
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (key, value) in from {
                merge(into.entry(key).or_insert(Value::Null), value);
            }
        }
        (into, from) => *into = from,
    }
}

fn tcp_frontend(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, TCP_PORT)
}

fn tcp_backend(pod: &Pod) -> SocketAddrV4 {
    SocketAddrV4::new(pod.addr(), TCP_TARGET)
}

// ---------------------------------------------------------------------------
// The cluster: one node with pods, the fake API server in the node's
// namespace, and the agent reading it.

/// Field order is teardown order: API server, testbed. A test holds its
/// agent in a variable declared after its `KubeNode`, so the agent stops
/// first.
struct KubeNode {
    api: FakeApiServer,
    kubeconfig: PathBuf,
    cluster: OneNode,
}

impl KubeNode {
    fn build(tag: &str, backends: usize) -> Self {
        let cluster = OneNode::build(tag, backends, &[TCP_TARGET], &[UDP_TARGET]).expect("testbed");
        let api = FakeApiServer::start_with(FakeApiConfig {
            netns: Some(cluster.node().ns().path()),
            ..FakeApiConfig::default()
        })
        .expect("fake API server in the node namespace");
        let kubeconfig = cluster.testbed().scratch().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let this_node: Node =
            serde_json::from_value(json!({"metadata": {"name": NODE}})).expect("a valid Node");
        api.create(&this_node).expect("create this node's Node");
        Self {
            api,
            kubeconfig,
            cluster,
        }
    }

    /// Starts `lb-agent run --kubeconfig K --node-name node --health-addr
    /// 127.0.0.1:10256` plus `extra` on the node.
    fn start_agent(&self, extra: &[&str]) -> Agent {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--kubeconfig"),
            self.kubeconfig.as_os_str(),
            OsStr::new("--node-name"),
            OsStr::new(NODE),
            OsStr::new("--health-addr"),
            OsStr::new(HEALTH_ADDR),
        ];
        args.extend(extra.iter().map(OsStr::new));
        self.start_agent_with(&args)
    }

    fn start_agent_with(&self, args: &[&OsStr]) -> Agent {
        let node = self.cluster.node();
        let pin_dir = self.cluster.testbed().pin_dir("agent").expect("pin dir");
        Agent::start_with(node, args, &node.pod_ifaces(), pin_dir).expect("agent started")
    }

    fn client(&self) -> &Pod {
        self.cluster.client()
    }

    fn backend(&self, n: usize) -> &Pod {
        self.cluster.backend(n)
    }

    /// `GET path` on the agent's health address: status code and body.
    fn http_get(&self, path: &str) -> (u16, String) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
        let response = self
            .cluster
            .node()
            .ns()
            .run(|| -> io::Result<String> {
                let mut stream = TcpStream::connect(HEALTH_ADDR)?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream.write_all(request.as_bytes())?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                Ok(response)
            })
            .expect("thread in the node namespace")
            .expect("HTTP GET on the health address");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// The value of an unlabelled (or exactly labelled) sample of /metrics.
    fn metric(&self, sample: &str) -> f64 {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in\n{body}"))
    }

    /// The `inspect services` entry of `ip`'s TCP port (Service `name`,
    /// port `tcp`) once its counters have settled, after checking that
    /// /metrics shows the same values with the Service's and the backends'
    /// labels.
    fn counters_on_metrics(&self, agent: &Agent, name: &str, ip: Ipv4Addr) -> ServiceEntry {
        let read = || {
            agent
                .service(tcp_frontend(ip), Protocol::Tcp)
                .expect("inspect services")
                .expect("the TCP frontend is programmed")
        };
        let counters = |entry: &ServiceEntry| {
            let backends: Vec<_> = entry.backends.iter().map(|b| b.counters.clone()).collect();
            (entry.counters.clone(), backends)
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        // Straggling packets of closed connections (last ACKs) may still
        // be counted: compare against a scrape between two equal reads.
        let (entry, body) = loop {
            let before = read();
            let (status, body) = self.http_get("/metrics");
            assert_eq!(status, 200, "{body}");
            if counters(&before) == counters(&read()) {
                break (before, body);
            }
            assert!(Instant::now() < deadline, "counters of {ip} never settled");
            std::thread::sleep(Duration::from_millis(100));
        };
        let sample = |name: &str| -> u64 {
            body.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or_else(|| panic!("no sample {name} in\n{body}"))
        };
        let service = format!(r#"namespace="default",name="{name}",port="tcp",protocol="tcp""#);
        let counters = &entry.counters;
        for (metric, value) in [
            (
                format!(r#"lb_agent_service_packets_total{{{service},direction="to_backend"}}"#),
                counters.packets,
            ),
            (
                format!(r#"lb_agent_service_packets_total{{{service},direction="to_client"}}"#),
                counters.reply_packets,
            ),
            (
                format!(r#"lb_agent_service_bytes_total{{{service},direction="to_backend"}}"#),
                counters.bytes,
            ),
            (
                format!(r#"lb_agent_service_bytes_total{{{service},direction="to_client"}}"#),
                counters.reply_bytes,
            ),
            (
                format!("lb_agent_service_new_flows_total{{{service}}}"),
                counters.new_flows,
            ),
        ] {
            assert_eq!(sample(&metric), value, "{metric}");
        }
        for (reason, value) in &counters.drops {
            let metric = format!(r#"lb_agent_service_drops_total{{{service},reason="{reason}"}}"#);
            assert_eq!(sample(&metric), *value, "{metric}");
        }
        for backend in &entry.backends {
            let labels = format!(
                r#"address="{}",port="{}",protocol="tcp""#,
                backend.addr.ip(),
                backend.addr.port()
            );
            for (metric, value) in [
                (
                    format!(r#"lb_agent_backend_packets_total{{{labels},direction="to_backend"}}"#),
                    backend.counters.packets,
                ),
                (
                    format!(r#"lb_agent_backend_packets_total{{{labels},direction="to_client"}}"#),
                    backend.counters.reply_packets,
                ),
                (
                    format!("lb_agent_backend_new_flows_total{{{labels}}}"),
                    backend.counters.new_flows,
                ),
            ] {
                assert_eq!(sample(&metric), value, "{metric}");
            }
        }
        entry
    }

    fn spread(&self, agent: &Agent, ip: Ipv4Addr, count: usize) -> BTreeSet<String> {
        self.client()
            .tcp_spread(tcp_frontend(ip), count)
            .unwrap_or_else(|error| panic!("connections to {ip}: {error}\n{}", agent.diagnostics()))
            .into_keys()
            .collect()
    }
}

fn wait_tcp_backends(agent: &Agent, ip: Ipv4Addr, expected: &[(SocketAddrV4, bool)]) {
    agent
        .wait_for_backends(tcp_frontend(ip), Protocol::Tcp, expected)
        .expect("backends programmed");
}

fn names(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|pod| pod.name().to_owned()).collect()
}

// ---------------------------------------------------------------------------

#[test]
fn initial_sync_then_every_event_type() {
    let node = KubeNode::build("kube-events", 3);
    let web_ip = cluster_ip(10);
    let web_slice = |endpoints| slice("web", "1", endpoints, json!({}));
    node.api
        .create(&service("web", web_ip, json!({})))
        .expect("create web");
    let (b1, b2) = (node.backend(1).addr(), node.backend(2).addr());
    node.api
        .create(&web_slice(vec![ready(b1), ready(b2)]))
        .expect("create web slice");
    // Objects kube-proxy does not proxy: another proxy's, and a headless
    // Service's slice.
    let foreign_ip = cluster_ip(11);
    let foreign_label =
        json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "other"}}});
    node.api
        .create(&service("foreign", foreign_ip, foreign_label.clone()))
        .unwrap();
    node.api
        .create(&slice("foreign", "1", vec![ready(b1)], foreign_label))
        .unwrap();

    let agent = node.start_agent(&[]);
    // Initial sync: programmed before the agent reported ready.
    assert_eq!(node.http_get("/readyz").0, 200);
    assert_eq!(node.http_get("/healthz").0, 200);
    wait_tcp_backends(
        &agent,
        web_ip,
        &[
            (tcp_backend(node.backend(1)), true),
            (tcp_backend(node.backend(2)), true),
        ],
    );
    assert_eq!(
        node.spread(&agent, web_ip, 30),
        names(&[node.backend(1), node.backend(2)])
    );
    // The datapath's counters of web on /metrics, as `inspect` reads them.
    let web = node.counters_on_metrics(&agent, "web", web_ip);
    assert_eq!(web.counters.new_flows, 30, "{:?}", web.counters);
    assert!(web.counters.packets >= 30 * 3, "{:?}", web.counters);
    assert!(web.counters.reply_packets >= 30 * 2, "{:?}", web.counters);
    assert!(web.counters.drops.values().all(|drops| *drops == 0));
    assert_eq!(
        web.backends
            .iter()
            .map(|backend| backend.counters.new_flows)
            .sum::<u64>(),
        30
    );
    assert!(
        agent
            .service(tcp_frontend(foreign_ip), Protocol::Tcp)
            .unwrap()
            .is_none(),
        "another proxy's Service was programmed"
    );
    // kube-proxy's selectors on the lists and watches.
    let selectors: Vec<String> = node
        .api
        .requests()
        .iter()
        .filter(|request| {
            request.is(ResourceKind::Service, Verb::List)
                || request.is(ResourceKind::EndpointSlice, Verb::List)
        })
        .filter_map(|request| request.param("labelSelector").map(str::to_owned))
        .collect();
    assert!(!selectors.is_empty());
    for selector in &selectors {
        assert_eq!(
            selector,
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
    }
    assert!(
        node.api
            .requests()
            .iter()
            .any(|request| request.is(ResourceKind::Node, Verb::List)
                && request.param("fieldSelector") == Some("metadata.name=node")),
        "this node's Node is watched"
    );

    // ADDED
    let db_ip = cluster_ip(12);
    node.api.create(&service("db", db_ip, json!({}))).unwrap();
    node.api
        .create(&slice(
            "db",
            "1",
            vec![ready(node.backend(3).addr())],
            json!({}),
        ))
        .unwrap();
    wait_tcp_backends(&agent, db_ip, &[(tcp_backend(node.backend(3)), true)]);
    assert_eq!(node.spread(&agent, db_ip, 5), names(&[node.backend(3)]));

    // MODIFIED: a third endpoint, and the second one not ready.
    let b3 = node.backend(3).addr();
    node.api
        .update(&web_slice(vec![
            ready(b1),
            endpoint(b2, false, false, false, NODE),
            ready(b3),
        ]))
        .unwrap();
    wait_tcp_backends(
        &agent,
        web_ip,
        &[
            (tcp_backend(node.backend(1)), true),
            (tcp_backend(node.backend(2)), false),
            (tcp_backend(node.backend(3)), true),
        ],
    );
    assert_eq!(
        node.spread(&agent, web_ip, 30),
        names(&[node.backend(1), node.backend(3)])
    );

    // DELETED slice: no endpoint left, connections are refused.
    node.api
        .delete::<EndpointSlice>("default", "web-1")
        .unwrap();
    wait_tcp_backends(&agent, web_ip, &[]);
    let refused = node.client().tcp_request(tcp_frontend(web_ip), "nobody");
    assert_eq!(
        refused.map_err(|error| error.kind()).err(),
        Some(io::ErrorKind::ConnectionRefused)
    );
    let refusals = node
        .counters_on_metrics(&agent, "web", web_ip)
        .counters
        .drops["no_backend"];
    assert!(refusals >= 1, "the refused connection was not counted");

    // DELETED Service: its frontends go.
    node.api.delete::<Service>("default", "db").unwrap();
    agent
        .wait_for_no_service(tcp_frontend(db_ip), Protocol::Tcp)
        .unwrap();

    assert_eq!(node.metric("lb_agent_service_ports"), 2.0);
    assert!(node.metric("lb_agent_syncs_total") >= 4.0);
    assert_eq!(node.metric("lb_agent_sync_errors_total"), 0.0);
    assert_eq!(
        node.metric("lb_agent_lists_total{resource=\"services\"}"),
        1.0
    );
}

/// A client keeps opening connections through the ClusterIP while the
/// watches break, expire (410) and the API server restarts; none fails,
/// and the relists rewrite nothing that did not change.
#[test]
fn broken_watch_gone_and_restart_lose_no_connection() {
    let node = KubeNode::build("kube-break", 3);
    let web_ip = cluster_ip(20);
    let pods = [node.backend(1), node.backend(2), node.backend(3)];
    let endpoints = |third_ready: bool| {
        vec![
            ready(pods[0].addr()),
            ready(pods[1].addr()),
            endpoint(pods[2].addr(), third_ready, third_ready, false, NODE),
        ]
    };
    node.api.create(&service("web", web_ip, json!({}))).unwrap();
    node.api
        .create(&slice("web", "1", endpoints(true), json!({})))
        .unwrap();
    let agent = node.start_agent(&[]);
    let all: Vec<(SocketAddrV4, bool)> = pods.iter().map(|pod| (tcp_backend(pod), true)).collect();
    wait_tcp_backends(&agent, web_ip, &all);

    let stop = AtomicBool::new(false);
    let (made, failures) = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            node.client()
                .run(|| {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let (mut made, mut failures) = (0usize, Vec::new());
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match tcp_request(tcp_frontend(web_ip), "keep going") {
                            Ok(_) => made += 1,
                            Err(error) => failures.push(error.to_string()),
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    (made, failures)
                })
                .expect("client thread")
        });
        let quiet_relist = |what: &str, disrupt: &dyn Fn() -> usize| {
            let lists_before = node.api.count_requests(ResourceKind::Service, Verb::List);
            let writes_before = node.metric("lb_agent_map_writes_total");
            let disrupted = disrupt();
            assert!(disrupted > 0, "{what}: no watch was open");
            assert!(
                node.api.wait_until(Duration::from_secs(20), |api| {
                    api.count_requests(ResourceKind::Service, Verb::List) > lists_before
                }),
                "{what}: the agent did not relist"
            );
            // Let the relist land, then check it wrote nothing.
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                node.metric("lb_agent_map_writes_total"),
                writes_before,
                "{what}: a relist of unchanged objects wrote to the maps"
            );
        };
        let change_while_down = |what: &str, third_ready: bool| {
            node.api
                .update(&slice("web", "1", endpoints(third_ready), json!({})))
                .unwrap();
            let mut expected = all.clone();
            expected[2].1 = third_ready;
            agent
                .wait_for_backends(tcp_frontend(web_ip), Protocol::Tcp, &expected)
                .unwrap_or_else(|error| panic!("{what}: {error}"));
        };

        // A watch broken mid-stream: kube resumes it (from its last
        // resourceVersion) and sees a change made meanwhile.
        assert!(node.api.break_watches() > 0);
        change_while_down("after a broken watch", false);
        // 410 Gone: the watcher relists; the relist changes nothing.
        quiet_relist("410 Gone", &|| node.api.expire_watches());
        change_while_down("after 410", true);
        // A restart of the API server (storage kept): connections refused
        // for a second, then a relist or a resumed watch.
        node.api.restart(Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(1500));
        change_while_down("after a restart", false);
        // History compacted, then the watches break: the Service watch
        // resumes from a resourceVersion older than the compaction, gets
        // 410 and relists.
        quiet_relist("break after compaction", &|| {
            node.api.compact();
            node.api.break_watches()
        });
        change_while_down("after a relist", true);

        stop.store(true, Ordering::Relaxed);
        client.join().expect("client thread")
    });
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {failures:?}\n{}",
        failures.len(),
        made + failures.len(),
        agent.log()
    );
    assert!(made > 50, "only {made} connections made");
    assert!(node.metric("lb_agent_watch_errors_total{resource=\"endpointslices\"}") >= 1.0);
}

/// KEP-1669: a terminating endpoint takes no new connection while another
/// is ready, keeps its open ones, and takes new ones when none is ready.
#[test]
fn terminating_endpoint() {
    let node = KubeNode::build("kube-term", 2);
    let web_ip = cluster_ip(30);
    let (p1, p2) = (node.backend(1), node.backend(2));
    let update = |endpoints| {
        node.api
            .apply(&slice("web", "1", endpoints, json!({})))
            .unwrap()
    };
    node.api.create(&service("web", web_ip, json!({}))).unwrap();
    update(vec![ready(p1.addr())]);
    let agent = node.start_agent(&[]);
    wait_tcp_backends(&agent, web_ip, &[(tcp_backend(p1), true)]);
    let mut session = node
        .client()
        .tcp_connect(tcp_frontend(web_ip))
        .expect("connect");
    assert_eq!(session.exchange("first").unwrap().reply.server, p1.name());

    // p1 terminates (still serving), p2 is ready: new connections go to p2,
    // the open one stays on p1.
    update(vec![
        endpoint(p1.addr(), false, true, true, NODE),
        ready(p2.addr()),
    ]);
    wait_tcp_backends(
        &agent,
        web_ip,
        &[(tcp_backend(p1), false), (tcp_backend(p2), true)],
    );
    assert_eq!(node.spread(&agent, web_ip, 20), names(&[p2]));
    assert_eq!(session.exchange("second").unwrap().reply.server, p1.name());

    // p2 stops serving: no ready endpoint, so the serving terminating one
    // takes new connections rather than refusing them.
    update(vec![
        endpoint(p1.addr(), false, true, true, NODE),
        endpoint(p2.addr(), false, false, false, NODE),
    ]);
    wait_tcp_backends(
        &agent,
        web_ip,
        &[(tcp_backend(p1), true), (tcp_backend(p2), false)],
    );
    assert_eq!(node.spread(&agent, web_ip, 10), names(&[p1]));
    assert_eq!(session.exchange("third").unwrap().reply.server, p1.name());
}

/// internalTrafficPolicy: Local keeps the endpoints on this node; with none
/// there, connections to the ClusterIP are dropped.
#[test]
fn internal_traffic_policy_local() {
    let node = KubeNode::build("kube-local", 2);
    let web_ip = cluster_ip(40);
    let (p1, p2) = (node.backend(1), node.backend(2));
    let on = |pod: &Pod, host: &str| endpoint(pod.addr(), true, true, false, host);
    node.api
        .create(&service(
            "web",
            web_ip,
            json!({"spec": {"internalTrafficPolicy": "Local"}}),
        ))
        .unwrap();
    node.api
        .create(&slice(
            "web",
            "1",
            vec![on(p1, NODE), on(p2, "elsewhere")],
            json!({}),
        ))
        .unwrap();
    let agent = node.start_agent(&[]);
    wait_tcp_backends(
        &agent,
        web_ip,
        &[(tcp_backend(p1), true), (tcp_backend(p2), false)],
    );
    assert_eq!(node.spread(&agent, web_ip, 20), names(&[p1]));

    // No local endpoint left.
    node.api
        .apply(&slice(
            "web",
            "1",
            vec![on(p1, "elsewhere"), on(p2, "elsewhere")],
            json!({}),
        ))
        .unwrap();
    wait_tcp_backends(
        &agent,
        web_ip,
        &[(tcp_backend(p1), false), (tcp_backend(p2), false)],
    );
    // Dropped, as kube-proxy drops it, rather than refused: the client's
    // SYN goes unanswered.
    let dropped = node
        .client()
        .tcp_request(tcp_frontend(web_ip), "nobody local")
        .map(|exchange| exchange.reply.server)
        .map_err(|error| error.kind());
    assert_eq!(
        dropped,
        Err(io::ErrorKind::TimedOut),
        "{}",
        agent.diagnostics()
    );
    let flags = agent
        .service(tcp_frontend(web_ip), Protocol::Tcp)
        .unwrap()
        .expect("still programmed")
        .flags;
    assert_eq!(
        flags & lb_common::service::SERVICE_F_DROP,
        lb_common::service::SERVICE_F_DROP
    );
}

/// This node's Node with `addresses` (type, address).
fn this_node(addresses: &[(&str, Ipv4Addr)]) -> Node {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(kind, addr)| json!({"type": kind, "address": addr.to_string()}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": NODE},
        "status": {"addresses": addresses},
    }))
    .expect("a valid Node")
}

/// With the Kubernetes source, NodePorts listen on the Node's InternalIP
/// and ExternalIP addresses (not its Hostname), and follow them when the
/// Node changes; a pod reaches its node's NodePort through the datapath.
#[test]
fn node_ports_follow_the_nodes_addresses() {
    let node = KubeNode::build("kube-nodeport", 2);
    let internal = Ipv4Addr::new(198, 18, 250, 1);
    let external = Ipv4Addr::new(198, 18, 250, 2);
    let moved = Ipv4Addr::new(198, 18, 250, 3);
    node.api
        .apply(&this_node(&[
            ("InternalIP", internal),
            ("ExternalIP", external),
            ("Hostname", Ipv4Addr::new(198, 18, 250, 9)),
        ]))
        .unwrap();
    let web_ip = cluster_ip(41);
    node.api
        .create(&service(
            "web",
            web_ip,
            json!({"spec": {"type": "NodePort", "ports": [
                {"name": "tcp", "port": TCP_PORT, "targetPort": TCP_TARGET, "protocol": "TCP", "nodePort": 30080},
                {"name": "udp", "port": UDP_PORT, "targetPort": UDP_TARGET, "protocol": "UDP", "nodePort": 30053},
            ]}}),
        ))
        .unwrap();
    let (p1, p2) = (node.backend(1), node.backend(2));
    node.api
        .create(&slice(
            "web",
            "1",
            vec![ready(p1.addr()), ready(p2.addr())],
            json!({}),
        ))
        .unwrap();
    let agent = node.start_agent(&[]);
    let expected = [(tcp_backend(p1), true), (tcp_backend(p2), true)];
    for addr in [internal, external] {
        agent
            .wait_for_backends(SocketAddrV4::new(addr, 30080), Protocol::Tcp, &expected)
            .unwrap_or_else(|error| panic!("{error}\n{}", agent.diagnostics()));
        agent
            .wait_for_service(
                SocketAddrV4::new(addr, 30080),
                Protocol::Tcp,
                "external",
                |entry| entry.flags & lb_common::service::SERVICE_F_EXTERNAL != 0,
            )
            .unwrap();
    }
    assert!(
        agent
            .service(
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 250, 9), 30080),
                Protocol::Tcp
            )
            .unwrap()
            .is_none(),
        "a Hostname address is no NodePort address"
    );
    let reached: BTreeSet<String> = node
        .client()
        .tcp_spread(SocketAddrV4::new(internal, 30080), 20)
        .unwrap_or_else(|error| panic!("NodePort from a pod: {error}\n{}", agent.diagnostics()))
        .into_keys()
        .collect();
    assert_eq!(reached, names(&[p1, p2]));

    // The Node's InternalIP changes: the NodePorts move with it.
    node.api
        .apply(&this_node(&[
            ("InternalIP", moved),
            ("ExternalIP", external),
        ]))
        .unwrap();
    agent
        .wait_for_backends(SocketAddrV4::new(moved, 30080), Protocol::Tcp, &expected)
        .unwrap_or_else(|error| panic!("{error}\n{}", agent.diagnostics()));
    agent
        .wait_for_no_service(SocketAddrV4::new(internal, 30080), Protocol::Tcp)
        .unwrap_or_else(|error| panic!("{error}\n{}", agent.diagnostics()));
    assert!(
        agent
            .service(SocketAddrV4::new(external, 30053), Protocol::Udp)
            .unwrap()
            .is_some()
    );
}

/// `--service-proxy-name lb`: only Services labelled for `lb` are served.
#[test]
fn service_proxy_name_label() {
    let node = KubeNode::build("kube-proxyname", 1);
    let label = |name: &str| json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": name}}});
    let backend = node.backend(1).addr();
    for (index, name, labels) in [
        (50, "plain", json!({})),
        (51, "ours", label("lb")),
        (52, "theirs", label("other")),
    ] {
        node.api
            .create(&service(name, cluster_ip(index), labels.clone()))
            .unwrap();
        node.api
            .create(&slice(name, "1", vec![ready(backend)], labels))
            .unwrap();
    }
    let agent = node.start_agent(&["--service-proxy-name", "lb"]);
    wait_tcp_backends(
        &agent,
        cluster_ip(51),
        &[(tcp_backend(node.backend(1)), true)],
    );
    let programmed: Vec<SocketAddrV4> = agent
        .services()
        .unwrap()
        .iter()
        .map(|entry| entry.frontend)
        .collect();
    assert_eq!(
        programmed
            .iter()
            .filter(|f| *f.ip() == cluster_ip(51))
            .count(),
        2
    );
    assert!(
        programmed.iter().all(|f| *f.ip() == cluster_ip(51)),
        "{programmed:?}"
    );
    assert!(
        node.api
            .requests()
            .iter()
            .any(|request| request.param("labelSelector")
                == Some(
                    "service.kubernetes.io/service-proxy-name=lb,!service.kubernetes.io/headless"
                ))
    );
    assert_eq!(
        node.spread(&agent, cluster_ip(51), 3),
        names(&[node.backend(1)])
    );
}

/// What `inspect services` shows, without the ids (which depend on the
/// order of writes): frontend, protocol, flags, and every backend with its
/// readiness and flags.
type MapView = Vec<(SocketAddrV4, String, u16, Vec<(SocketAddrV4, bool, u8)>)>;

fn map_view(agent: &Agent) -> MapView {
    let mut view: MapView = agent
        .services()
        .unwrap()
        .into_iter()
        .map(|entry| {
            let mut backends: Vec<_> = entry
                .backends
                .iter()
                .map(|backend| (backend.addr, backend.ready, backend.backend_flags))
                .collect();
            backends.sort();
            (entry.frontend, entry.proto, entry.flags, backends)
        })
        .collect();
    view.sort();
    view
}

/// As the DaemonSet runs it: `--attach-veths` instead of `--attach`. The
/// agent finds the pods' veths, attaches to veths created later, lets go
/// of deleted ones, and exits cleanly.
#[test]
fn attach_veths_follows_pods() {
    let node = KubeNode::build("kube-veths", 2);
    let web_ip = cluster_ip(70);
    node.api.create(&service("web", web_ip, json!({}))).unwrap();
    let endpoints = vec![ready(node.backend(1).addr()), ready(node.backend(2).addr())];
    node.api
        .create(&slice("web", "1", endpoints, json!({})))
        .unwrap();
    let args = [
        OsStr::new("--kubeconfig"),
        node.kubeconfig.as_os_str(),
        OsStr::new("--node-name"),
        OsStr::new(NODE),
        OsStr::new("--attach-veths"),
    ];
    let ns = node.cluster.node().ns();
    let pin_dir = node.cluster.testbed().pin_dir("agent").expect("pin dir");
    let agent = Agent::start_with(node.cluster.node(), &args, &[], pin_dir).expect("agent");
    let attached = |iface: &str| {
        tcx_ingress_programs(ns, iface)
            .is_ok_and(|programs| programs.iter().any(|p| p == lb_common::names::PROG_TC_POD))
    };
    let wait_attached = |iface: &str, want: bool| {
        lb_tests::wait::wait_until(
            Duration::from_secs(5),
            &format!("{iface} attached: {want}"),
            || attached(iface) == want,
        )
        .unwrap_or_else(|error| panic!("{error}\n{}", agent.log()));
    };
    for iface in node.cluster.node().pod_ifaces() {
        wait_attached(iface, true);
    }
    assert_eq!(
        node.spread(&agent, web_ip, 20),
        names(&[node.backend(1), node.backend(2)])
    );

    // A pod arrives: both ends of a new veth pair (inside the node
    // namespace) are attached within a second or so.
    ns.ip(&[
        "link", "add", "lbx-a", "type", "veth", "peer", "name", "lbx-b",
    ])
    .unwrap();
    wait_attached("lbx-a", true);
    wait_attached("lbx-b", true);
    // It goes: the agent lets go of its links.
    ns.ip(&["link", "del", "lbx-a"]).unwrap();
    lb_tests::wait::wait_until(Duration::from_secs(5), "the agent notices", || {
        let log = agent.log();
        ["lbx-a", "lbx-b"].iter().all(|iface| {
            log.lines()
                .any(|line| line.contains("veth gone") && line.contains(iface))
        })
    })
    .unwrap_or_else(|error| panic!("{error}\n{}", agent.log()));
    let status = agent.stop().expect("agent stopped");
    assert!(status.success(), "agent exit: {status}\n{}", agent.log());
    for iface in node.cluster.node().pod_ifaces() {
        assert!(!attached(iface), "{iface} still attached after exit");
    }
}

/// One translation, two sources: the same objects through `--manifests`
/// and through `--kubeconfig` program the same maps.
#[test]
fn kubeconfig_programs_the_same_maps_as_manifests() {
    let node = KubeNode::build("kube-same", 3);
    let [a, b, c] = [1, 2, 3].map(|n| node.backend(n).addr());
    let objects: Vec<(Service, Vec<EndpointSlice>)> = vec![
        // Two slices, an endpoint in both, one not ready.
        (
            service("web", cluster_ip(60), json!({})),
            vec![
                slice(
                    "web",
                    "1",
                    vec![ready(a), endpoint(b, false, false, false, NODE)],
                    json!({}),
                ),
                slice("web", "2", vec![ready(c), ready(a)], json!({})),
            ],
        ),
        // A named targetPort, resolved through the slice.
        (
            service(
                "named",
                cluster_ip(61),
                json!({"spec": {"ports": [{"name": "tcp", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}),
            ),
            vec![slice("named", "1", vec![ready(b)], json!({}))],
        ),
        // Only terminating endpoints: the fallback.
        (
            service("draining", cluster_ip(62), json!({})),
            vec![slice(
                "draining",
                "1",
                vec![
                    endpoint(a, false, true, true, NODE),
                    endpoint(b, false, false, true, NODE),
                ],
                json!({}),
            )],
        ),
        // internalTrafficPolicy Local.
        (
            service(
                "local",
                cluster_ip(63),
                json!({"spec": {"internalTrafficPolicy": "Local"}}),
            ),
            vec![slice(
                "local",
                "1",
                vec![ready(a), endpoint(c, true, true, false, "elsewhere")],
                json!({}),
            )],
        ),
        // Not ours, and no endpoints at all.
        (
            service(
                "foreign",
                cluster_ip(64),
                json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "other"}}}),
            ),
            vec![],
        ),
        (service("empty", cluster_ip(65), json!({})), vec![]),
    ];
    for (service, slices) in &objects {
        node.api.create(service).unwrap();
        for slice in slices {
            node.api.create(slice).unwrap();
        }
    }
    // The manifests are the objects exactly as the server stores them.
    let dir = node.cluster.manifests();
    let services: Vec<Value> = node
        .api
        .list::<Service>()
        .iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .collect();
    let slices: Vec<Value> = node
        .api
        .list::<EndpointSlice>()
        .iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .collect();
    dir.write("services.yaml", &services).unwrap();
    dir.write("slices.yaml", &slices).unwrap();

    let manifests_dir = dir.path().to_owned();
    let agent = node.start_agent_with(&[
        OsStr::new("--manifests"),
        manifests_dir.as_os_str(),
        OsStr::new("--node-name"),
        OsStr::new(NODE),
    ]);
    // Two ports for each Service but "named" (one) and "foreign" (none).
    const FRONTENDS: usize = 9;
    lb_tests::wait::wait_until(Duration::from_secs(10), "manifests programmed", || {
        agent.services().map(|s| s.len()).unwrap_or(0) == FRONTENDS
    })
    .unwrap();
    let from_manifests = map_view(&agent);
    let status = agent.stop().expect("agent stopped");
    assert!(status.success(), "agent exit: {status}\n{}", agent.log());
    drop(agent);

    let agent = node.start_agent(&[]);
    let from_kube = map_view(&agent);
    assert_eq!(from_kube, from_manifests);
    assert_eq!(from_kube.len(), FRONTENDS, "{from_kube:#?}");
}

const ENDPOINTS: u8 = 10;

/// Endpoint `n` of Service `service`: distinct addresses in
/// 198.18.128.0/17, a part of the addressing plan no testbed node uses (no
/// traffic goes to them).
fn synthetic_endpoint(service: u16, n: u8) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(198, 18, 128, 0));
    Ipv4Addr::from(base + u32::from(service) * u32::from(ENDPOINTS) + u32::from(n))
}

/// `svc-<index>` with its ClusterIP `cluster_ip(1000 + index)`.
fn synthetic_service(index: u16) -> Service {
    service(&format!("svc-{index}"), cluster_ip(1000 + index), json!({}))
}

/// The slice of `svc-<index>`: [`ENDPOINTS`] endpoints, the first
/// `ready_count` ready, and a `last-change-trigger-time` of now.
fn synthetic_slice(index: u16, ready_count: u8) -> EndpointSlice {
    let endpoints = (0..ENDPOINTS)
        .map(|n| {
            let ready = n < ready_count;
            endpoint(synthetic_endpoint(index, n), ready, ready, false, NODE)
        })
        .collect();
    let now = jiff::Timestamp::now().to_string();
    slice(
        &format!("svc-{index}"),
        "1",
        endpoints,
        json!({"metadata": {"annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now}}}),
    )
}

/// Changes the slice of `svc-0` `changes` times (its last endpoint ready,
/// not ready, ready...), each timed from just before the API write to the
/// moment the TCP frontend's backend count shows it in the pinned map
/// (polled every 200 us). Returns the latencies, sorted.
fn time_changes(node: &KubeNode, agent: &Agent, changes: u32) -> Vec<Duration> {
    let services_map: HashMap<MapData, ServiceKey, ServiceValue> = typed(
        open_pinned(agent.pin_dir(), MAP_SERVICES).unwrap(),
        MAP_SERVICES,
    )
    .unwrap();
    let ip = cluster_ip(1000);
    let key = ServiceKey::new(
        u32::from(ip).to_be(),
        TCP_PORT.to_be(),
        lb_common::proto::TCP,
    );
    let mut latencies = Vec::with_capacity(changes as usize);
    for change in 0..changes {
        let ready_count = if change % 2 == 0 {
            ENDPOINTS - 1
        } else {
            ENDPOINTS
        };
        let slice = synthetic_slice(0, ready_count);
        let start = Instant::now();
        node.api.apply(&slice).unwrap();
        loop {
            let value = services_map.get(&key, 0).expect("svc-0 programmed");
            if value.backend_count == u32::from(ready_count) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "change {change} not programmed within 10 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    latencies
}

fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    sorted[(sorted.len() * percent / 100).min(sorted.len() - 1)]
}

/// 1,000 changes of one EndpointSlice, each timed from the API write to
/// the map write: a single change reaches the maps well under 100 ms.
#[test]
fn change_latency_over_1000_changes() {
    let node = KubeNode::build("kube-latency", 1);
    node.api.create(&synthetic_service(0)).unwrap();
    node.api.create(&synthetic_slice(0, ENDPOINTS)).unwrap();
    let agent = node.start_agent(&[]);
    let latencies = time_changes(&node, &agent, 1000);
    let (median, p99) = (percentile(&latencies, 50), percentile(&latencies, 99));
    eprintln!(
        "watch event -> map write over 1,000 changes (1 Service): median {median:?}, \
         p99 {p99:?}, max {:?}",
        latencies.last().unwrap()
    );
    assert!(median < Duration::from_millis(100), "median {median:?}");
    // Every change carried a trigger time, observed once programmed.
    let observed = node.metric("lb_agent_network_programming_duration_seconds_count");
    assert!(
        observed >= 1000.0,
        "{observed} programming durations observed"
    );
}

/// 1,000 Services with 10 endpoints each, all in the initial list: one
/// programming of all of them; then changes at that scale.
#[test]
fn thousand_services_in_one_list() {
    const SERVICES: u16 = 1000;
    let node = KubeNode::build("kube-1000", 1);
    let services: Vec<Service> = (0..SERVICES).map(synthetic_service).collect();
    let slices: Vec<EndpointSlice> = (0..SERVICES)
        .map(|index| synthetic_slice(index, ENDPOINTS))
        .collect();
    node.api.apply_all(&services).unwrap();
    node.api.apply_all(&slices).unwrap();

    let started = Instant::now();
    let agent = node.start_agent(&[]);
    let ready_after = started.elapsed();
    assert_eq!(node.http_get("/readyz").0, 200);
    let log = agent.log();
    let programmed = log
        .lines()
        .find(|line| line.contains("programmed 2000 services (2000 frontends), 20000 backends"))
        .unwrap_or_else(|| panic!("no single programming of the whole list in\n{log}"));
    assert_eq!(agent.services().unwrap().len(), 2 * usize::from(SERVICES));
    eprintln!(
        "1,000 Services x 10 endpoints: agent ready {ready_after:?} after start; {programmed}"
    );

    let latencies = time_changes(&node, &agent, 100);
    eprintln!(
        "watch event -> map write over 100 changes (1,000 Services, 20,000 backends): \
         median {:?}, p99 {:?}",
        percentile(&latencies, 50),
        percentile(&latencies, 99)
    );
}

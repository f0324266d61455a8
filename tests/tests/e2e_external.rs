//! Services reached from outside the cluster, end to end: two nodes on one
//! network, each with its own agent (`--external eth0`: XDP and TC on the
//! node's network interface), pods on both, and external clients on the
//! same network speaking TCP and UDP to NodePorts, a load-balancer ingress
//! IP and an external IP.
//!
//! Each test builds its own testbed, so tests run in parallel. Needs root,
//! bpffs and the agent binary (`LB_AGENT_BIN`, or target/debug/lb-agent).

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use lb_common::counters::Counter;
use lb_common::service::{SERVICE_F_DROP, SERVICE_F_EXTERNAL, SERVICE_F_SOURCE_RANGES};
use lb_tests::agent::{Agent, XdpMode, xdp_program};
use lb_tests::fixture::{MultiNode, MultiNodeSpec, node_pod_name};
use lb_tests::manifests::{Protocol, Service, ServicePort, ServiceType, TrafficPolicy};
use lb_tests::topology::{NETWORK_IFACE, cluster_ip, external_ip};
use lb_tests::traffic::{CLIENT_TIMEOUT, HttpResponse};
use lb_tests::wait::{self, DEFAULT_TIMEOUT};

const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const TCP_NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const HEALTH_CHECK_NODE_PORT: u16 = 32100;

/// Connections (or datagrams from new sockets) per check that must reach
/// every one of two backends: a miss with uniform choice has probability
/// 2^-(n-1).
const SPREAD: usize = 24;

fn cluster(tag: &str) -> MultiNode {
    MultiNode::start(tag, MultiNodeSpec::default()).expect("cluster")
}

/// `name` with a TCP and a UDP port, both with node ports, of `type`.
fn service(name: &str, index: u16, service_type: ServiceType) -> Service {
    Service::new(
        name,
        cluster_ip(index),
        vec![
            ServicePort::tcp("tcp", TCP_PORT, TCP_TARGET).with_node_port(TCP_NODE_PORT),
            ServicePort::udp("udp", UDP_PORT, UDP_TARGET).with_node_port(UDP_NODE_PORT),
        ],
    )
    .with_type(service_type)
}

/// Waits until `agent` programs `frontend` as an external frontend whose
/// backends are exactly `backends` (all ready).
fn wait_external(
    agent: &Agent,
    frontend: SocketAddrV4,
    proto: Protocol,
    backends: &[SocketAddrV4],
) {
    let mut expected: Vec<SocketAddrV4> = backends.to_vec();
    expected.sort();
    agent
        .wait_for_service(
            frontend,
            proto,
            &format!("external, backends {expected:?}"),
            |entry| {
                let mut actual: Vec<SocketAddrV4> = entry
                    .backends
                    .iter()
                    .filter(|backend| backend.ready)
                    .map(|backend| backend.addr)
                    .collect();
                actual.sort();
                entry.flags & SERVICE_F_EXTERNAL != 0 && actual == expected
            },
        )
        .unwrap_or_else(|error| panic!("{error}\n{}", agent.diagnostics()));
}

fn names(pods: &[(usize, usize)]) -> BTreeSet<String> {
    pods.iter().map(|&(n, k)| node_pod_name(n, k)).collect()
}

/// The XDP program is on the node's network interface, as the kernel
/// reports it.
fn assert_xdp_attached(cluster: &MultiNode, n: usize) {
    let xdp = xdp_program(cluster.node(n).ns(), NETWORK_IFACE)
        .expect("query XDP")
        .unwrap_or_else(|| panic!("no XDP program on node {n}'s {NETWORK_IFACE}"));
    assert_eq!(xdp.program, lb_common::names::PROG_XDP_EXTERNAL, "{xdp:?}");
}

fn counter(agent: &Agent, counter: Counter) -> u64 {
    agent.counter(counter.name()).expect("read counters")
}

/// A connect (or a datagram's answer) that never comes: the error of a
/// client that gave up after [`CLIENT_TIMEOUT`], not a refusal.
fn assert_timed_out<T: std::fmt::Debug>(result: io::Result<T>, started: Instant, what: &str) {
    let error = result.expect_err(what);
    assert!(
        matches!(
            error.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ),
        "{what}: {error}"
    );
    assert!(
        started.elapsed() >= CLIENT_TIMEOUT - Duration::from_millis(100),
        "{what}: gave up after {:?}",
        started.elapsed()
    );
}

#[test]
fn node_port_with_cluster_policy_reaches_pods_on_both_nodes() {
    let cluster = cluster("npcluster");
    let web = service("web", 10, ServiceType::NodePort);
    let backends = [(1, 1), (2, 1)];
    cluster.write(&web, &backends).expect("write");
    let node1 = cluster.node(1);
    let tcp_frontend = SocketAddrV4::new(node1.addr(), TCP_NODE_PORT);
    let udp_frontend = SocketAddrV4::new(node1.addr(), UDP_NODE_PORT);
    let agent = cluster.agent(1);
    wait_external(
        agent,
        tcp_frontend,
        Protocol::Tcp,
        &[
            cluster.backend(1, 1, TCP_TARGET),
            cluster.backend(2, 1, TCP_TARGET),
        ],
    );
    wait_external(
        agent,
        udp_frontend,
        Protocol::Udp,
        &[
            cluster.backend(1, 1, UDP_TARGET),
            cluster.backend(2, 1, UDP_TARGET),
        ],
    );
    assert_xdp_attached(&cluster, 1);
    let forwarded_before = counter(agent, Counter::Forwarded);
    let client = cluster.external_client(1);

    let mut reached = BTreeSet::new();
    for n in 0..SPREAD {
        let exchange = client
            .tcp_request(tcp_frontend, &format!("tcp {n}"))
            .unwrap_or_else(|error| panic!("TCP {n} to {tcp_frontend}: {error}"));
        // The connected socket accepted the answer: it came from the
        // NodePort address.
        assert_eq!(exchange.peer, tcp_frontend);
        if exchange.reply.server == node_pod_name(2, 1) {
            // Another node's backend sees this node, so its reply comes
            // back here to be translated for the client.
            assert_eq!(
                *exchange.reply.client_seen.ip(),
                node1.addr(),
                "{exchange:?}"
            );
        } else {
            // A backend on the node that took the connection sees the
            // client itself.
            assert_eq!(exchange.reply.client_seen, exchange.local, "{exchange:?}");
        }
        reached.insert(exchange.reply.server);
    }
    assert_eq!(reached, names(&backends), "TCP backends reached");

    let mut reached = BTreeSet::new();
    for n in 0..SPREAD {
        // Connected: the kernel only accepts an answer from the NodePort.
        let exchange = client
            .udp_connected_request(udp_frontend, &format!("udp {n}"))
            .unwrap_or_else(|error| panic!("UDP {n} to {udp_frontend}: {error}"));
        assert_eq!(exchange.from, udp_frontend);
        if exchange.reply.server == node_pod_name(2, 1) {
            assert_eq!(
                *exchange.reply.client_seen.ip(),
                node1.addr(),
                "{exchange:?}"
            );
        } else {
            assert_eq!(
                *exchange.reply.client_seen.ip(),
                client.addr(),
                "{exchange:?}"
            );
        }
        reached.insert(exchange.reply.server);
    }
    assert_eq!(reached, names(&backends), "UDP backends reached");

    // The source-translated packets to node 2, and node 2's replies on
    // their way back to the client, left node 1 by FIB lookup.
    let forwarded = counter(agent, Counter::Forwarded) - forwarded_before;
    assert!(forwarded > 0, "nothing forwarded:\n{}", agent.diagnostics());

    // Node 2 serves the same NodePort on its own address.
    let node2_frontend = SocketAddrV4::new(cluster.node(2).addr(), TCP_NODE_PORT);
    let exchange = client
        .tcp_request(node2_frontend, "via node 2")
        .expect("TCP via node 2");
    assert_eq!(exchange.peer, node2_frontend);
}

#[test]
fn local_policy_keeps_the_client_address_and_drops_without_local_endpoints_but_not_for_pods() {
    let cluster = cluster("nplocal");
    let web = service("web", 11, ServiceType::NodePort)
        .with_external_traffic_policy(TrafficPolicy::Local);
    cluster.write(&web, &[(1, 1)]).expect("write");
    let node1_tcp = SocketAddrV4::new(cluster.node(1).addr(), TCP_NODE_PORT);
    let node1_udp = SocketAddrV4::new(cluster.node(1).addr(), UDP_NODE_PORT);
    let node2_tcp = SocketAddrV4::new(cluster.node(2).addr(), TCP_NODE_PORT);
    let node2_udp = SocketAddrV4::new(cluster.node(2).addr(), UDP_NODE_PORT);
    wait_external(
        cluster.agent(1),
        node1_tcp,
        Protocol::Tcp,
        &[cluster.backend(1, 1, TCP_TARGET)],
    );
    wait_external(
        cluster.agent(1),
        node1_udp,
        Protocol::Udp,
        &[cluster.backend(1, 1, UDP_TARGET)],
    );
    // Node 2 has no local endpoint: its NodePort drops.
    for (frontend, proto) in [(node2_tcp, Protocol::Tcp), (node2_udp, Protocol::Udp)] {
        cluster
            .agent(2)
            .wait_for_service(frontend, proto, "external, dropping", |entry| {
                entry.flags & SERVICE_F_EXTERNAL != 0 && entry.flags & SERVICE_F_DROP != 0
            })
            .unwrap_or_else(|error| panic!("{error}\n{}", cluster.agent(2).diagnostics()));
    }
    let client = cluster.external_client(1);

    for n in 0..4 {
        let exchange = client
            .tcp_request(node1_tcp, &format!("local {n}"))
            .expect("TCP to node 1");
        assert_eq!(exchange.peer, node1_tcp);
        assert_eq!(exchange.reply.server, node_pod_name(1, 1));
        assert_eq!(
            exchange.reply.client_seen, exchange.local,
            "Local policy: the backend sees the client"
        );
    }
    let exchange = client
        .udp_connected_request(node1_udp, "local")
        .expect("UDP to node 1");
    assert_eq!(exchange.reply.client_seen.ip(), &client.addr());

    let started = Instant::now();
    assert_timed_out(
        client.tcp_request(node2_tcp, "nobody local"),
        started,
        "TCP to node 2 without local endpoints",
    );
    let started = Instant::now();
    assert_timed_out(
        client.udp_connected_request(node2_udp, "nobody local"),
        started,
        "UDP to node 2 without local endpoints",
    );
    let received: usize = cluster
        .udp_servers()
        .iter()
        .filter(|server| server.pod() != node_pod_name(1, 1))
        .map(|server| server.received())
        .sum();
    assert_eq!(received, 0, "a pod other than the local endpoint got UDP");

    // A pod on node 2 reaching node 2's NodePort is balanced over every
    // endpoint, as kube-proxy sends pod traffic to a Local Service's
    // external addresses: the endpoint on node 1 answers, from the NodePort.
    let pod = cluster.pod(2, 2);
    for n in 0..3 {
        let exchange = pod
            .tcp_request(node2_tcp, &format!("pod to local {n}"))
            .expect("TCP from a pod to its node's NodePort of a Local Service");
        assert_eq!(exchange.peer, node2_tcp);
        assert_eq!(exchange.reply.server, node_pod_name(1, 1));
        assert_eq!(*exchange.reply.client_seen.ip(), pod.addr());
    }
    let exchange = pod
        .udp_connected_request(node2_udp, "pod to local")
        .expect("UDP from a pod to its node's NodePort of a Local Service");
    assert_eq!(exchange.from, node2_udp);
    assert_eq!(exchange.reply.server, node_pod_name(1, 1));
}

fn health(cluster: &MultiNode, n: usize) -> io::Result<HttpResponse> {
    let address = SocketAddrV4::new(cluster.node(n).addr(), HEALTH_CHECK_NODE_PORT);
    cluster.external_client(1).http_get(address, "/healthz")
}

/// Waits until node `n`'s health-check port answers `status` with
/// `localEndpoints: count`, and checks the rest of the body.
fn wait_health(cluster: &MultiNode, n: usize, status: u16, count: u64) {
    let body = wait::wait_for(
        DEFAULT_TIMEOUT,
        &format!("node {n} health check: {status} with {count} local endpoints"),
        || match health(cluster, n) {
            Ok(response) if response.status == status => {
                let body: serde_json::Value = serde_json::from_str(&response.body)
                    .map_err(|error| format!("{error}: {response:?}"))?;
                if body["localEndpoints"] == count {
                    Ok(body)
                } else {
                    Err(format!("{response:?}"))
                }
            }
            Ok(response) => Err(format!("{response:?}")),
            Err(error) => Err(error.to_string()),
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", cluster.agent(n).log()));
    assert_eq!(body["service"]["namespace"], "default", "{body}");
    assert_eq!(body["service"]["name"], "lb", "{body}");
    assert_eq!(body["serviceProxyHealthy"], true, "{body}");
}

#[test]
fn health_check_node_port_answers_200_with_the_count_and_503_without() {
    let cluster = cluster("health");
    let lb = service("lb", 12, ServiceType::LoadBalancer)
        .with_external_traffic_policy(TrafficPolicy::Local)
        .with_health_check_node_port(HEALTH_CHECK_NODE_PORT)
        .with_ingress(&[external_ip(12)]);
    cluster.write(&lb, &[(1, 1), (1, 2)]).expect("write");
    wait_health(&cluster, 1, 200, 2);
    wait_health(&cluster, 2, 503, 0);

    // An endpoint appears on node 2; one goes away on node 1.
    cluster.write(&lb, &[(1, 1), (2, 1)]).expect("rewrite");
    wait_health(&cluster, 1, 200, 1);
    wait_health(&cluster, 2, 200, 1);

    // The Service goes: so does the listener.
    cluster.remove(&lb).expect("remove");
    wait::wait_for(
        DEFAULT_TIMEOUT,
        "health-check port to close",
        || match health(&cluster, 1) {
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .expect("listener closed");
}

#[test]
fn load_balancer_ingress_ip_and_external_ip() {
    let cluster = cluster("lbip");
    let ingress = external_ip(1);
    let external = external_ip(2);
    let lb = service("lb", 13, ServiceType::LoadBalancer)
        .with_ingress(&[ingress])
        .with_external_ips(&[external]);
    let backends = [(1, 1), (2, 1)];
    cluster.write(&lb, &backends).expect("write");
    // The router in front of the cluster sends the ingress IP to node 1
    // and the external IP to node 2.
    cluster.route_external(ingress, 1).expect("route ingress");
    cluster
        .route_external(external, 2)
        .expect("route external IP");
    for (n, ip) in [(1, ingress), (2, external)] {
        wait_external(
            cluster.agent(n),
            SocketAddrV4::new(ip, TCP_PORT),
            Protocol::Tcp,
            &[
                cluster.backend(1, 1, TCP_TARGET),
                cluster.backend(2, 1, TCP_TARGET),
            ],
        );
        wait_external(
            cluster.agent(n),
            SocketAddrV4::new(ip, UDP_PORT),
            Protocol::Udp,
            &[
                cluster.backend(1, 1, UDP_TARGET),
                cluster.backend(2, 1, UDP_TARGET),
            ],
        );
    }
    let client = cluster.external_client(2);
    for (n, ip) in [(1, ingress), (2, external)] {
        let tcp_frontend = SocketAddrV4::new(ip, TCP_PORT);
        let udp_frontend = SocketAddrV4::new(ip, UDP_PORT);
        let node = cluster.node(n);
        let mut reached = BTreeSet::new();
        for k in 0..SPREAD {
            let exchange = client
                .tcp_request(tcp_frontend, &format!("tcp {k}"))
                .unwrap_or_else(|error| panic!("TCP {k} to {tcp_frontend}: {error}"));
            assert_eq!(exchange.peer, tcp_frontend);
            let local_backend = exchange.reply.server.starts_with(&format!("pod-{n}-"));
            if local_backend {
                assert_eq!(exchange.reply.client_seen, exchange.local, "{exchange:?}");
            } else {
                assert_eq!(
                    *exchange.reply.client_seen.ip(),
                    node.addr(),
                    "{exchange:?}"
                );
            }
            reached.insert(exchange.reply.server);
        }
        assert_eq!(reached, names(&backends), "TCP via {ip}");
        let mut reached = BTreeSet::new();
        for k in 0..SPREAD {
            let exchange = client
                .udp_connected_request(udp_frontend, &format!("udp {k}"))
                .unwrap_or_else(|error| panic!("UDP {k} to {udp_frontend}: {error}"));
            assert_eq!(exchange.from, udp_frontend);
            reached.insert(exchange.reply.server);
        }
        assert_eq!(reached, names(&backends), "UDP via {ip}");
    }

    // A pod reaches both addresses too, without any route to them: the
    // datapath on its node translates them like any other frontend.
    let pod = cluster.pod(1, 2);
    for ip in [ingress, external] {
        let frontend = SocketAddrV4::new(ip, TCP_PORT);
        let exchange = pod
            .tcp_request(frontend, "from a pod")
            .unwrap_or_else(|error| panic!("TCP from a pod to {frontend}: {error}"));
        assert_eq!(exchange.peer, frontend);
        assert_eq!(exchange.reply.client_seen, exchange.local, "{exchange:?}");
    }
}

#[test]
fn source_ranges_admit_one_client_and_refuse_another() {
    let cluster = cluster("ranges");
    let ingress = external_ip(3);
    let allowed = cluster.external_client(1);
    let refused = cluster.external_client(2);
    let lb = service("lb", 14, ServiceType::LoadBalancer)
        .with_ingress(&[ingress])
        .with_source_ranges(&[&format!("{}/32", allowed.addr())]);
    cluster.write(&lb, &[(1, 1)]).expect("write");
    cluster.route_external(ingress, 1).expect("route ingress");
    let tcp_frontend = SocketAddrV4::new(ingress, TCP_PORT);
    let udp_frontend = SocketAddrV4::new(ingress, UDP_PORT);
    let agent = cluster.agent(1);
    for (frontend, proto) in [(tcp_frontend, Protocol::Tcp), (udp_frontend, Protocol::Udp)] {
        agent
            .wait_for_service(frontend, proto, "external with source ranges", |entry| {
                entry.flags & SERVICE_F_EXTERNAL != 0
                    && entry.flags & SERVICE_F_SOURCE_RANGES != 0
                    && entry.backends.iter().any(|backend| backend.ready)
            })
            .unwrap_or_else(|error| panic!("{error}\n{}", agent.diagnostics()));
    }

    let ranges = agent.source_ranges().expect("inspect source ranges");
    let service_id = agent
        .service(tcp_frontend, Protocol::Tcp)
        .expect("inspect")
        .expect("programmed")
        .service_id;
    assert!(
        ranges.iter().any(|entry| entry.service_id == service_id
            && entry.range == format!("{}/32", allowed.addr())),
        "{ranges:?}"
    );

    let exchange = allowed
        .tcp_request(tcp_frontend, "in range")
        .expect("TCP from the allowed client");
    assert_eq!(exchange.peer, tcp_frontend);
    assert_eq!(exchange.reply.client_seen, exchange.local);
    let exchange = allowed
        .udp_connected_request(udp_frontend, "in range")
        .expect("UDP from the allowed client");
    assert_eq!(exchange.from, udp_frontend);

    let denied_before = counter(agent, Counter::SourceRangeDenied);
    let started = Instant::now();
    assert_timed_out(
        refused.tcp_request(tcp_frontend, "out of range"),
        started,
        "TCP from a client outside the ranges",
    );
    let started = Instant::now();
    assert_timed_out(
        refused.udp_connected_request(udp_frontend, "out of range"),
        started,
        "UDP from a client outside the ranges",
    );
    let denied = counter(agent, Counter::SourceRangeDenied) - denied_before;
    assert!(denied >= 2, "source_range_denied grew by {denied}");

    // The ranges guard the load-balancer address only: the NodePort of the
    // same Service still admits the other client.
    let node_port = SocketAddrV4::new(cluster.node(1).addr(), TCP_NODE_PORT);
    let exchange = refused
        .tcp_request(node_port, "via the NodePort")
        .expect("TCP to the NodePort from the other client");
    assert_eq!(exchange.peer, node_port);
}

#[test]
fn xdp_is_attached_to_every_nodes_network_interface_and_does_the_work() {
    let cluster = cluster("xdp");
    for n in 1..=2 {
        assert_xdp_attached(&cluster, n);
        // A veth has native XDP: no fallback to generic mode here.
        let xdp = xdp_program(cluster.node(n).ns(), NETWORK_IFACE)
            .expect("query XDP")
            .expect("attached");
        assert_eq!(xdp.mode, XdpMode::Driver, "node {n}: {xdp:?}");
    }
    let web = service("web", 15, ServiceType::NodePort);
    cluster.write(&web, &[(2, 1)]).expect("write");
    let frontend = SocketAddrV4::new(cluster.node(1).addr(), TCP_NODE_PORT);
    let agent = cluster.agent(1);
    wait_external(
        agent,
        frontend,
        Protocol::Tcp,
        &[cluster.backend(2, 1, TCP_TARGET)],
    );
    let new_flows_before = counter(agent, Counter::NewFlow);
    let forwarded_before = counter(agent, Counter::Forwarded);
    let client = cluster.external_client(1);
    let mut session = client.tcp_connect(frontend).expect("connect");
    let mut seen = BTreeSet::new();
    for n in 0..5 {
        let exchange = session.exchange(&format!("request {n}")).expect("exchange");
        assert_eq!(exchange.peer, frontend);
        assert_eq!(exchange.reply.server, node_pod_name(2, 1));
        assert_eq!(*exchange.reply.client_seen.ip(), cluster.node(1).addr());
        seen.insert(exchange.reply.client_seen);
    }
    // One flow, one translated source port all along, from the default
    // range, and the flow and its LB_SNAT entry agree on it.
    assert_eq!(seen.len(), 1, "{seen:?}");
    let translated = *seen.first().expect("one");
    assert!((61000..=65535).contains(&translated.port()), "{translated}");
    let local = session.local().expect("local address");
    let flows = agent.conntrack().expect("inspect conntrack");
    let flow = flows
        .iter()
        .find(|flow| flow.client == local)
        .unwrap_or_else(|| panic!("no flow for {local}: {flows:?}"));
    assert_eq!(flow.nat_port, Some(translated.port()), "{flow:?}");
    for flag in ["snat", "external"] {
        assert!(flow.flags.iter().any(|f| f == flag), "{flow:?}");
    }
    let snat = agent.snat().expect("inspect snat");
    assert!(
        snat.iter().any(|entry| entry.client == local
            && entry.nat_port == translated.port()
            && entry.backend == cluster.backend(2, 1, TCP_TARGET)),
        "{snat:?}"
    );
    drop(session);
    assert_eq!(counter(agent, Counter::NewFlow) - new_flows_before, 1);
    // Every packet of the connection crossed node 1 twice (client to node
    // 2, node 2 to client), each time forwarded by the datapath rather than
    // the stack: at least handshake, 5 requests and 5 answers.
    let forwarded = counter(agent, Counter::Forwarded) - forwarded_before;
    assert!(
        forwarded >= 11,
        "forwarded {forwarded}:\n{}",
        agent.diagnostics()
    );
}

#[test]
fn an_interface_without_native_xdp_gets_generic_xdp_and_its_address_serves_node_ports() {
    let mut cluster = MultiNode::build(
        "generic",
        MultiNodeSpec {
            nodes: 1,
            pods_per_node: 1,
            external_clients: 0,
            ..MultiNodeSpec::default()
        },
    )
    .expect("cluster");
    // A second uplink whose driver has no XDP of its own (a bridge device,
    // created in the node's namespace), with an address of its own.
    let uplink = "uplink0";
    let uplink_addr = std::net::Ipv4Addr::new(198, 18, 252, 1);
    let node = cluster.node(1);
    node.ns()
        .ip(&["link", "add", uplink, "type", "bridge"])
        .expect("add uplink0");
    node.ns()
        .ip(&["addr", "add", &format!("{uplink_addr}/24"), "dev", uplink])
        .expect("address uplink0");
    node.ns()
        .ip(&["link", "set", uplink, "up"])
        .expect("uplink0 up");
    cluster
        .start_agents_with(|config| config.external(uplink))
        .expect("agent");
    let node = cluster.node(1);
    let agent = cluster.agent(1);

    let eth0 = xdp_program(node.ns(), NETWORK_IFACE)
        .expect("query XDP")
        .expect("XDP on eth0");
    assert_eq!(eth0.mode, XdpMode::Driver, "{eth0:?}");
    let uplink_xdp = xdp_program(node.ns(), uplink)
        .expect("query XDP")
        .expect("XDP on uplink0");
    assert_eq!(uplink_xdp.mode, XdpMode::Generic, "{uplink_xdp:?}");
    assert_eq!(uplink_xdp.program, lb_common::names::PROG_XDP_EXTERNAL);
    let log = agent.log();
    assert!(
        log.lines()
            .any(|line| line.contains("WARN") && line.contains(uplink) && line.contains("generic")),
        "no warning about generic XDP on {uplink}:\n{log}"
    );

    // Both interfaces' addresses are node addresses: NodePorts on each.
    let web = service("web", 16, ServiceType::NodePort);
    cluster.write(&web, &[(1, 1)]).expect("write");
    for addr in [node.addr(), uplink_addr] {
        wait_external(
            agent,
            SocketAddrV4::new(addr, TCP_NODE_PORT),
            Protocol::Tcp,
            &[cluster.backend(1, 1, TCP_TARGET)],
        );
    }
}

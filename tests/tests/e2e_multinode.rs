//! Several nodes on one network, first without the load balancer (the
//! testbed itself: routes, offloads, teardown), then with one agent per
//! node for the traffic that starts in a pod: a ClusterIP whose only
//! backend is on another node, hairpin, and a pod reaching a NodePort of
//! its own node.
//!
//! Each test builds its own testbed, so tests run in parallel. Needs root,
//! bpffs and (for the agent tests) the agent binary (`LB_AGENT_BIN`, or
//! target/debug/lb-agent).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::counters::Counter;
use lb_tests::agent::xdp_program;
use lb_tests::command;
use lb_tests::ethtool::{self, Feature};
use lb_tests::fixture::{MultiNode, MultiNodeSpec, node_pod_name};
use lb_tests::manifests::{Protocol, Service, ServicePort, ServiceType};
use lb_tests::topology::{NETWORK_IFACE, Testbed, cluster_ip};
use lb_tests::traffic::{TcpServer, UdpServer};

const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
/// The datapath's default `--hairpin-address`.
const HAIRPIN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

fn netns_list() -> String {
    command::run("ip", &["netns", "list"]).expect("ip netns list")
}

fn namespaces_of(list: &str, testbed: &str) -> Vec<String> {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&format!("{testbed}-")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn nodes_pods_and_external_clients_talk_over_the_network() {
    let mut testbed = Testbed::new("net").expect("testbed");
    let name = testbed.name().to_owned();
    for n in 1..=2 {
        testbed
            .add_networked_node(&format!("node-{n}"))
            .expect("node")
            .add_pod(&format!("pod-{n}"))
            .expect("pod");
    }
    testbed.add_external_client("ext").expect("client");
    let node1 = testbed.node("node-1");
    let node2 = testbed.node("node-2");
    let pod1 = node1.pod("pod-1");
    let pod2 = node2.pod("pod-2");
    let client = testbed.external_client("ext");
    let network = testbed.network_ns().expect("the network exists");

    // The wire's properties: no TX checksum offload on either end of any
    // network veth, GRO on where a node's XDP_TX lands.
    for (ns, iface) in [
        (node1.ns(), NETWORK_IFACE),
        (node2.ns(), NETWORK_IFACE),
        (client.ns(), NETWORK_IFACE),
        (network, "n0"),
        (network, "n1"),
        (network, "c0"),
    ] {
        assert!(
            !ethtool::get(ns, iface, Feature::TxChecksum).expect("ethtool"),
            "tx checksum offload on for {iface} in {}",
            ns.name()
        );
    }
    for port in ["n0", "n1"] {
        assert!(ethtool::get(network, port, Feature::Gro).expect("ethtool"));
        let xdp = xdp_program(network, port)
            .expect("query XDP")
            .unwrap_or_else(|| panic!("no XDP program on {port}"));
        assert_eq!(xdp.program, "lbt_xdp_pass", "{xdp:?}");
    }
    assert_eq!(xdp_program(network, "c0").expect("query XDP"), None);
    let bridge_ports = network
        .ip(&["-o", "link", "show", "master", "br0"])
        .expect("ip link");
    for port in ["n0", "n1", "c0"] {
        assert!(
            bridge_ports.contains(&format!(": {port}@")),
            "{bridge_ports}"
        );
    }
    // Nothing of the testbed's lives in the root namespace.
    let root_links = command::run("ip", &["-o", "link", "show"]).expect("ip link");
    for iface in ["n0@", "n1@", "c0@", "br0:"] {
        assert!(
            !root_links.contains(&format!(": {iface}")),
            "{iface} in the root namespace:\n{root_links}"
        );
    }

    let _node2_tcp = TcpServer::start_in(node2.ns(), "node-2", 9000).expect("server");
    let _node2_udp = UdpServer::start_in(node2.ns(), "node-2", 9053).expect("server");
    let _pod2_tcp = TcpServer::start(pod2, TCP_TARGET).expect("server");
    let _pod2_udp = UdpServer::start(pod2, UDP_TARGET).expect("server");

    // External client to a node address: no translation anywhere.
    let node2_tcp = SocketAddrV4::new(node2.addr(), 9000);
    let exchange = client.tcp_request(node2_tcp, "ext to node").expect("TCP");
    assert_eq!(exchange.reply.server, "node-2");
    assert_eq!(exchange.peer, node2_tcp);
    assert_eq!(exchange.reply.client_seen, exchange.local);
    assert_eq!(*exchange.local.ip(), client.addr());
    let exchange = client
        .udp_connected_request(SocketAddrV4::new(node2.addr(), 9053), "ext to node")
        .expect("UDP");
    assert_eq!(*exchange.reply.client_seen.ip(), client.addr());

    // Node to node.
    let exchange = node1.tcp_request(node2_tcp, "node to node").expect("TCP");
    assert_eq!(*exchange.reply.client_seen.ip(), node1.addr());

    // Pod to pod across nodes, both protocols, addresses untouched.
    let pod2_tcp = SocketAddrV4::new(pod2.addr(), TCP_TARGET);
    let exchange = pod1.tcp_request(pod2_tcp, "pod to pod").expect("TCP");
    assert_eq!(exchange.reply.server, "pod-2");
    assert_eq!(exchange.reply.client_seen, exchange.local);
    assert_eq!(*exchange.local.ip(), pod1.addr());
    let exchange = pod1
        .udp_connected_request(SocketAddrV4::new(pod2.addr(), UDP_TARGET), "pod to pod")
        .expect("UDP");
    assert_eq!(*exchange.reply.client_seen.ip(), pod1.addr());

    // The external client has no route to pods, nor to service addresses.
    let unreachable = client.tcp_request(pod2_tcp, "no route");
    assert!(unreachable.is_err(), "{unreachable:?}");
    let unrouted = client.ns().ip(&["route", "get", &pod2.addr().to_string()]);
    assert!(unrouted.is_err(), "{unrouted:?}");

    drop(_node2_tcp);
    drop(_node2_udp);
    drop(_pod2_tcp);
    drop(_pod2_udp);
    let created = namespaces_of(&netns_list(), &name);
    assert_eq!(created.len(), 6, "{created:?}");
    drop(testbed);
    let left = namespaces_of(&netns_list(), &name);
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn two_nodes(tag: &str) -> MultiNode {
    MultiNode::start(
        tag,
        MultiNodeSpec {
            external_clients: 0,
            ..MultiNodeSpec::default()
        },
    )
    .expect("cluster")
}

fn clusterip_service(name: &str, index: u16) -> Service {
    Service::new(
        name,
        cluster_ip(index),
        vec![
            ServicePort::tcp("tcp", 80, TCP_TARGET),
            ServicePort::udp("udp", 53, UDP_TARGET),
        ],
    )
}

#[test]
fn a_cluster_ip_whose_only_backend_is_on_another_node() {
    let cluster = two_nodes("xnode");
    let service = clusterip_service("remote", 10);
    cluster.write(&service, &[(2, 1)]).expect("write");
    let tcp_frontend = SocketAddrV4::new(service.cluster_ip, 80);
    let udp_frontend = SocketAddrV4::new(service.cluster_ip, 53);
    for agent in cluster.agents() {
        agent
            .wait_for_backends(
                tcp_frontend,
                Protocol::Tcp,
                &[(cluster.backend(2, 1, TCP_TARGET), true)],
            )
            .expect("programmed");
    }
    let client = cluster.pod(1, 1);
    let before = cluster
        .agent(1)
        .counter(Counter::Reply.name())
        .expect("counters");

    let mut session = client.tcp_connect(tcp_frontend).expect("connect");
    for n in 0..3 {
        let exchange = session.exchange(&format!("request {n}")).expect("exchange");
        assert_eq!(exchange.reply.server, node_pod_name(2, 1));
        // The reply came back translated: the socket is connected to the
        // ClusterIP and accepted it.
        assert_eq!(exchange.peer, tcp_frontend);
        assert_eq!(exchange.reply.client_seen, exchange.local);
    }
    drop(session);
    let exchange = client
        .udp_connected_request(udp_frontend, "udp")
        .expect("UDP exchange");
    assert_eq!(exchange.reply.server, node_pod_name(2, 1));
    assert_eq!(*exchange.reply.client_seen.ip(), client.addr());

    // The replies were reverse-translated on node 1 (at its network
    // interface), not on node 2.
    let after = cluster
        .agent(1)
        .counter(Counter::Reply.name())
        .expect("counters");
    assert!(after >= before + 4, "node 1 replies: {before} -> {after}");
}

#[test]
fn hairpin_a_pod_reaches_its_own_service_and_lands_on_itself() {
    let cluster = two_nodes("hairpin");
    let service = clusterip_service("self", 11);
    cluster.write(&service, &[(1, 1)]).expect("write");
    let tcp_frontend = SocketAddrV4::new(service.cluster_ip, 80);
    let udp_frontend = SocketAddrV4::new(service.cluster_ip, 53);
    cluster
        .agent(1)
        .wait_for_backends(
            tcp_frontend,
            Protocol::Tcp,
            &[(cluster.backend(1, 1, TCP_TARGET), true)],
        )
        .expect("programmed");
    let pod = cluster.pod(1, 1);

    let mut session = pod.tcp_connect(tcp_frontend).expect("TCP hairpin");
    let exchange = session.exchange("me?").expect("TCP hairpin exchange");
    assert_eq!(exchange.reply.server, pod.name());
    assert_eq!(exchange.peer, tcp_frontend);
    // The pod cannot answer itself at its own address through the node:
    // the datapath hides the client behind the hairpin address.
    assert_eq!(
        *exchange.reply.client_seen.ip(),
        HAIRPIN_ADDR,
        "{exchange:?}"
    );
    let flows = cluster.agent(1).conntrack().expect("inspect conntrack");
    let flow = flows
        .iter()
        .find(|flow| flow.client == exchange.local)
        .unwrap_or_else(|| panic!("no flow for {}: {flows:?}", exchange.local));
    assert!(flow.flags.iter().any(|f| f == "hairpin"), "{flow:?}");
    assert_eq!(flow.nat_port, Some(exchange.reply.client_seen.port()));
    drop(session);

    let exchange = pod
        .udp_connected_request(udp_frontend, "me?")
        .expect("UDP hairpin");
    assert_eq!(exchange.reply.server, pod.name());
    assert_eq!(
        *exchange.reply.client_seen.ip(),
        HAIRPIN_ADDR,
        "{exchange:?}"
    );

    // Another pod of the service's node still comes in with its own address.
    let exchange = cluster
        .pod(1, 2)
        .tcp_request(tcp_frontend, "neighbour")
        .expect("TCP from a neighbour");
    assert_eq!(*exchange.reply.client_seen.ip(), cluster.pod(1, 2).addr());
}

#[test]
fn a_pod_reaches_a_node_port_of_its_own_node() {
    let cluster = two_nodes("ownnp");
    let service = Service::new(
        "np",
        cluster_ip(12),
        vec![
            ServicePort::tcp("tcp", 80, TCP_TARGET).with_node_port(30080),
            ServicePort::udp("udp", 53, UDP_TARGET).with_node_port(30053),
        ],
    )
    .with_type(ServiceType::NodePort);
    let backends = [(1, 1), (2, 1)];
    cluster.write(&service, &backends).expect("write");
    let node1 = cluster.node(1);
    let tcp_frontend = SocketAddrV4::new(node1.addr(), 30080);
    let udp_frontend = SocketAddrV4::new(node1.addr(), 30053);
    let expected: Vec<_> = backends
        .iter()
        .map(|&(n, k)| (cluster.backend(n, k, TCP_TARGET), true))
        .collect();
    cluster
        .agent(1)
        .wait_for_backends(tcp_frontend, Protocol::Tcp, &expected)
        .expect("NodePort programmed on node 1");

    let client = cluster.pod(1, 2);
    let mut reached = BTreeSet::new();
    for n in 0..30 {
        let exchange = client
            .tcp_request(tcp_frontend, &format!("np {n}"))
            .expect("TCP to the own node's NodePort");
        assert_eq!(exchange.peer, tcp_frontend);
        assert_eq!(
            *exchange.reply.client_seen.ip(),
            client.addr(),
            "{exchange:?}"
        );
        reached.insert(exchange.reply.server);
    }
    let all: BTreeSet<String> = backends.iter().map(|&(n, k)| node_pod_name(n, k)).collect();
    assert_eq!(reached, all);
    let exchange = client
        .udp_connected_request(udp_frontend, "np udp")
        .expect("UDP to the own node's NodePort");
    assert_eq!(exchange.from, udp_frontend);
}

#[test]
fn a_failing_multi_node_test_leaves_nothing_behind() {
    struct Left {
        testbed: String,
        pin_dirs: Vec<std::path::PathBuf>,
        pids: Vec<u32>,
    }
    let left = std::panic::catch_unwind(|| {
        let cluster = MultiNode::start("mnpanic", MultiNodeSpec::default()).expect("cluster");
        let left = Left {
            testbed: cluster.testbed().name().to_owned(),
            pin_dirs: cluster
                .agents()
                .iter()
                .map(|agent| agent.pin_dir().to_owned())
                .collect(),
            pids: cluster
                .agents()
                .iter()
                .filter_map(lb_tests::agent::Agent::pid)
                .collect(),
        };
        assert!(left.pin_dirs.iter().all(|dir| dir.exists()));
        // Unwinding from here must stop both agents and remove every
        // namespace, pin and process.
        std::panic::panic_any(left);
    })
    .map(|()| unreachable!("the closure panics"))
    .unwrap_err()
    .downcast::<Left>()
    .expect("the payload names what to look for");

    assert_eq!(left.pids.len(), 2);
    let list = netns_list();
    let namespaces = namespaces_of(&list, &left.testbed);
    assert!(namespaces.is_empty(), "left behind: {namespaces:?}");
    for dir in &left.pin_dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    for pid in left.pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "lb-agent {pid} still running"
        );
    }
}

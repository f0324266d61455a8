//! The testbed itself, without the load balancer: pods reach each other
//! through their node, servers and clients speak their protocol, service
//! addresses are unreachable without the agent, and teardown leaves nothing
//! behind, also when a test panics.

use std::net::SocketAddrV4;
use std::path::Path;
use std::time::{Duration, Instant};

use lb_tests::command;
use lb_tests::topology::{Testbed, cluster_ip};
use lb_tests::traffic::{TcpServer, UdpServer};

fn netns_list() -> String {
    command::run("ip", &["netns", "list"]).expect("ip netns list")
}

/// Names of the namespaces of `testbed`, with a trailing space so that
/// `lbt-x-1-1` does not match `lbt-x-1-10-...`.
fn namespaces_of(list: &str, testbed: &str) -> Vec<String> {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&format!("{testbed}-")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn pods_talk_across_the_node_and_teardown_leaves_nothing() {
    let mut testbed = Testbed::new("bed").expect("testbed");
    let name = testbed.name().to_owned();
    let scratch = testbed.scratch().to_owned();
    {
        let node = testbed.add_node("node").expect("node");
        node.add_pod("client").expect("client pod");
        node.add_pod("server").expect("server pod");
    }
    let node = testbed.node("node");
    let client = node.pod("client");
    let server = node.pod("server");
    assert_eq!(node.pod_ifaces(), ["h0", "h1"]);
    assert_ne!(client.addr(), server.addr());

    // Interfaces exist only in the test's namespaces.
    let root_links = command::run("ip", &["-o", "link", "show"]).expect("ip link");
    let node_links = node
        .ns()
        .ip(&["-o", "link", "show"])
        .expect("ip link in node");
    assert!(
        node_links.contains(": h0@") && node_links.contains(": h1@"),
        "{node_links}"
    );
    for host_iface in node.pod_ifaces() {
        assert!(
            !root_links.contains(&format!(": {host_iface}@")),
            "{host_iface} must not exist in the root namespace:\n{root_links}"
        );
    }

    let tcp = TcpServer::start(server, 8080).expect("TCP server");
    let udp = UdpServer::start(server, 5353).expect("UDP server");

    let destination = SocketAddrV4::new(server.addr(), 8080);
    let exchange = client
        .tcp_request(destination, "hello over tcp")
        .expect("TCP exchange");
    assert_eq!(exchange.reply.server, "server");
    assert_eq!(exchange.reply.echo, "hello over tcp");
    assert_eq!(exchange.reply.server_port, 8080);
    assert_eq!(exchange.peer, destination);
    assert_eq!(exchange.reply.client_seen, exchange.local);
    assert_eq!(*exchange.local.ip(), client.addr());

    // One connection carries several exchanges.
    let mut session = client.tcp_connect(destination).expect("TCP session");
    for n in 0..3 {
        let exchange = session
            .exchange(&format!("request {n}"))
            .expect("exchange on session");
        assert_eq!(exchange.reply.echo, format!("request {n}"));
    }
    drop(session);

    let spread = client.tcp_spread(destination, 20).expect("20 connections");
    assert_eq!(spread.get("server"), Some(&20));
    assert_eq!(tcp.accepted(), 22);

    let destination = SocketAddrV4::new(server.addr(), 5353);
    let exchange = client
        .udp_request(destination, "hello over udp")
        .expect("UDP exchange");
    assert_eq!(exchange.reply.server, "server");
    assert_eq!(exchange.reply.echo, "hello over udp");
    assert_eq!(exchange.reply.server_port, 5353);
    assert_eq!(exchange.from, destination);
    // An unconnected socket is bound to the wildcard address.
    assert_eq!(
        exchange.reply.client_seen,
        SocketAddrV4::new(client.addr(), exchange.local.port())
    );
    let exchange = client
        .udp_connected_request(destination, "connected")
        .expect("connected UDP exchange");
    assert_eq!(exchange.from, destination);
    assert_eq!(udp.received(), 2);

    // Nothing listens on this port: the pod's kernel answers with RST and
    // ICMP port unreachable, which the clients report as refusals.
    let closed = SocketAddrV4::new(server.addr(), 9);
    let error = client
        .tcp_request(closed, "x")
        .expect_err("closed TCP port");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{error}"
    );
    let error = client
        .udp_connected_request(closed, "x")
        .expect_err("closed UDP port");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{error}"
    );

    // Without a load balancer, service addresses lead nowhere: the node has
    // no route and says so at once.
    let started = Instant::now();
    let error = client
        .tcp_request(SocketAddrV4::new(cluster_ip(10), 80), "x")
        .expect_err("a ClusterIP without the agent");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{error} took {:?}",
        started.elapsed()
    );

    let list = netns_list();
    assert_eq!(namespaces_of(&list, &name).len(), 3, "{list}");

    drop((tcp, udp));
    drop(testbed);
    let list = netns_list();
    assert!(
        namespaces_of(&list, &name).is_empty(),
        "left behind:\n{list}"
    );
    assert!(!scratch.exists(), "{} left behind", scratch.display());
}

#[test]
fn teardown_runs_when_a_test_panics() {
    let (name, scratch) = std::panic::catch_unwind(|| {
        let mut testbed = Testbed::new("panic").expect("testbed");
        let name = testbed.name().to_owned();
        let scratch = testbed.scratch().to_owned();
        let node = testbed.add_node("node").expect("node");
        let pod = node.add_pod("server").expect("pod");
        let server = TcpServer::start(pod, 8080).expect("server");
        // Unwinding from here must drop the server, the pod and the node.
        std::panic::panic_any((name, scratch, server.port()));
    })
    .map(|()| unreachable!("the closure panics"))
    .unwrap_err()
    .downcast::<(String, std::path::PathBuf, u16)>()
    .map(|payload| (payload.0, payload.1))
    .expect("the payload names the testbed");

    let list = netns_list();
    assert!(
        namespaces_of(&list, &name).is_empty(),
        "left behind:\n{list}"
    );
    assert!(
        !Path::new(&scratch).exists(),
        "{} left behind",
        scratch.display()
    );
}

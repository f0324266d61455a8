//! Flows across endpoint churn, end to end: an established TCP connection
//! to a backend that left the Service is reset, not left hanging; a UDP
//! client moves to a live backend on its very next datagram (also after
//! the Service scaled to zero and back); closed connections leave no
//! conntrack entries behind, even after 10,000 of them.
//!
//! Needs root, bpffs and the agent binary (`LB_AGENT_BIN`, or
//! target/debug/lb-agent).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use lb_tests::fixture::{OneNode, SimpleService, backend_name};
use lb_tests::manifests::Endpoint;
use lb_tests::topology::cluster_ip;

const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;

fn web() -> SimpleService {
    SimpleService::new("web", cluster_ip(30), (80, TCP_TARGET), (53, UDP_TARGET))
}

fn endpoints(cluster: &OneNode, backends: impl IntoIterator<Item = usize>) -> Vec<Endpoint> {
    backends
        .into_iter()
        .map(|n| Endpoint::ready(cluster.backend(n).addr()))
        .collect()
}

fn program(cluster: &OneNode, web: &SimpleService, endpoints: &[Endpoint]) {
    web.write_slice(cluster.manifests(), endpoints)
        .expect("write EndpointSlice");
    web.wait_programmed(cluster.agent(), endpoints)
        .unwrap_or_else(|error| panic!("{error}\n{}", cluster.agent().diagnostics()));
}

fn cluster_with_web(tag: &str, backends: usize) -> (OneNode, SimpleService) {
    let cluster = OneNode::start(tag, backends, &[TCP_TARGET], &[UDP_TARGET]).expect("cluster");
    let web = web();
    web.write_service(cluster.manifests())
        .expect("write Service");
    program(&cluster, &web, &endpoints(&cluster, 1..=backends));
    (cluster, web)
}

fn backend_index(name: &str, backends: usize) -> usize {
    (1..=backends)
        .find(|&n| backend_name(n) == name)
        .unwrap_or_else(|| panic!("{name} is no backend"))
}

#[test]
fn established_tcp_to_a_removed_backend_is_reset_not_hung() {
    let (cluster, web) = cluster_with_web("churn-rst", 3);
    let mut session = cluster
        .client()
        .tcp_connect(web.tcp_frontend())
        .expect("connect");
    let first = session.exchange("before").expect("exchange").reply.server;
    let gone = backend_index(&first, 3);

    // Not ready (still listed): the connection keeps working.
    let mut listed: Vec<Endpoint> = endpoints(&cluster, 1..=3);
    listed[gone - 1] = Endpoint::not_ready(cluster.backend(gone).addr());
    program(&cluster, &web, &listed);
    let again = session.exchange("not ready").expect("still served");
    assert_eq!(again.reply.server, first);

    // Gone from the slice: the next packet gets a RST at once.
    program(
        &cluster,
        &web,
        &endpoints(&cluster, (1..=3).filter(|&n| n != gone)),
    );
    let started = Instant::now();
    let error = session
        .exchange("after")
        .expect_err("a connection to a removed backend must fail");
    let elapsed = started.elapsed();
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    assert!(elapsed < Duration::from_secs(1), "reset took {elapsed:?}");
}

/// A connected UDP socket in the client pod: one source port, one flow.
fn udp_socket(cluster: &OneNode, frontend: SocketAddrV4) -> UdpSocket {
    cluster
        .client()
        .run(|| -> io::Result<UdpSocket> {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.connect(frontend)?;
            Ok(socket)
        })
        .expect("enter the client")
        .expect("UDP socket")
}

/// One datagram and its answer: the name of the backend that answered.
fn udp_exchange(socket: &UdpSocket, request: &str) -> io::Result<String> {
    socket.send(request.as_bytes())?;
    let mut buffer = [0u8; 512];
    let len = socket.recv(&mut buffer)?;
    let text = String::from_utf8_lossy(&buffer[..len]).into_owned();
    Ok(text.split(' ').next().unwrap_or_default().to_owned())
}

#[test]
fn udp_client_moves_to_a_live_backend_on_its_next_datagram() {
    let (cluster, web) = cluster_with_web("churn-udp", 3);
    let socket = udp_socket(&cluster, web.udp_frontend());
    let first = udp_exchange(&socket, "one").expect("first answer");
    // The flow stays on its backend while nothing changes.
    for _ in 0..5 {
        assert_eq!(udp_exchange(&socket, "same").expect("answer"), first);
    }
    let gone = backend_index(&first, 3);
    program(
        &cluster,
        &web,
        &endpoints(&cluster, (1..=3).filter(|&n| n != gone)),
    );
    // The very next datagram of the same flow reaches a live backend.
    let moved = udp_exchange(&socket, "two").expect("answer after removal");
    assert_ne!(moved, first);
    assert_eq!(udp_exchange(&socket, "three").expect("answer"), moved);
}

#[test]
fn udp_client_recovers_after_scale_to_zero_and_back() {
    let (cluster, web) = cluster_with_web("churn-zero", 2);
    let socket = udp_socket(&cluster, web.udp_frontend());
    let first = udp_exchange(&socket, "one").expect("first answer");

    // No endpoint: refused at once (ICMP port unreachable), not silence.
    program(&cluster, &web, &[]);
    let error = udp_exchange(&socket, "zero").expect_err("no backend");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");

    // Back, on the other pod only: the same socket reaches it on its next
    // datagram.
    let other = 3 - backend_index(&first, 2);
    program(&cluster, &web, &endpoints(&cluster, [other]));
    assert_eq!(
        udp_exchange(&socket, "back").expect("answer after scale up"),
        backend_name(other)
    );
}

#[test]
fn conntrack_drains_after_10000_short_connections() {
    const CONNECTIONS: usize = 10_000;
    let (cluster, web) = cluster_with_web("churn-drain", 2);
    let started = Instant::now();
    let tally = cluster
        .client()
        .tcp_spread(web.tcp_frontend(), CONNECTIONS)
        .expect("10,000 connections");
    let took = started.elapsed();
    assert_eq!(tally.values().sum::<usize>(), CONNECTIONS);

    let tcp_flows = || -> usize {
        cluster
            .agent()
            .conntrack()
            .expect("inspect conntrack")
            .iter()
            .filter(|flow| flow.proto == "tcp" && flow.frontend == web.tcp_frontend())
            .count()
    };
    let right_after = tcp_flows();
    // Every connection ended with FINs both ways and a last ACK: its flow
    // is deleted by the datapath at once (allow the last few to finish).
    let drain_started = Instant::now();
    let mut left = right_after;
    while left > 0 && drain_started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        left = tcp_flows();
    }
    println!(
        "{CONNECTIONS} connections in {took:?}; TCP flows right after: {right_after}, after {:?}: {left}",
        drain_started.elapsed()
    );
    assert_eq!(left, 0, "{}", cluster.agent().diagnostics());
    let entry = cluster
        .agent()
        .service(web.tcp_frontend(), lb_tests::manifests::Protocol::Tcp)
        .expect("inspect")
        .expect("programmed");
    assert_eq!(entry.counters.new_flows, CONNECTIONS as u64);
}

//! The checksum state `BPF_PROG_TEST_RUN` cannot produce: CHECKSUM_PARTIAL.
//!
//! A packet that a pod's socket sends over its veth reaches the node's tcx
//! ingress as CHECKSUM_PARTIAL: its L4 checksum field holds only the
//! pseudo-header sum, and whoever transmits it last (a NIC, or
//! `skb_checksum_help`) sums the segment on top. The datapath must update
//! that field for address changes only, never for port changes. On one
//! host a wrong field goes unnoticed (the receiving pod trusts a PARTIAL
//! skb), so here the node's interfaces towards the pods have TX checksum
//! offload switched off: the kernel then finishes every PARTIAL packet in
//! software from the field the datapath left, and the receiving pod
//! verifies the result. A wrong field makes these exchanges fail.
//!
//! Privileged: needs root, network namespaces (created here, joined only to
//! each other by veth pairs) and a 6.6+ kernel (tcx).

use std::{io, net::SocketAddrV4};

use lb_common::{counters::Counter, proto};
use lb_tests::{
    ethtool::{self, Feature},
    netns::NetNs,
    packet::datapath::{BackendSpec, Datapath, ServiceSpec},
    topology::{Testbed, cluster_ip},
    traffic::{TcpServer, UdpServer},
};

/// Switches TX checksum offload of `iface` (in `ns`) off; the helper checks
/// the kernel reports it off.
fn disable_tx_checksum_offload(ns: &NetNs, iface: &str) {
    ethtool::set(ns, iface, Feature::TxChecksum, false)
        .unwrap_or_else(|error| panic!("ethtool tx off on {iface}: {error}"));
}

#[test]
fn partial_checksums_stay_right_through_dnat_and_reverse_snat() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    let mut testbed = Testbed::new("csum").expect("testbed");
    {
        let node = testbed.add_node("node").expect("node");
        node.add_pod("client").expect("client pod");
        node.add_pod("server").expect("server pod");
    }
    let node = testbed.node("node");
    let client = node.pod("client");
    let server = node.pod("server");
    for iface in node.pod_ifaces() {
        disable_tx_checksum_offload(node.ns(), iface);
    }

    // Service ports differ from the target ports, so both the addresses
    // and the ports of every packet are rewritten.
    let tcp_frontend = SocketAddrV4::new(cluster_ip(1), 80);
    let udp_frontend = SocketAddrV4::new(cluster_ip(1), 53);
    let mut datapath = Datapath::load().expect("load the datapath");
    for (id, frontend, port, protocol) in [
        (1, tcp_frontend, 8080, proto::TCP),
        (2, udp_frontend, 5353, proto::UDP),
    ] {
        datapath
            .add_service(&ServiceSpec {
                id,
                frontend,
                proto: protocol,
                backends: vec![BackendSpec {
                    id,
                    addr: SocketAddrV4::new(server.addr(), port),
                    ready: true,
                }],
            })
            .expect("write a service");
    }
    for iface in node.pod_ifaces() {
        datapath
            .attach_ingress(node.ns(), iface)
            .expect("attach lb_tc_pod");
    }
    let _tcp_server = TcpServer::start(server, 8080).expect("TCP server");
    let _udp_server = UdpServer::start(server, 5353).expect("UDP server");
    let before = datapath.counters().expect("counters");

    let request = "a request long enough to span more than one checksum word";
    let exchange = client
        .tcp_request(tcp_frontend, request)
        .expect("TCP exchange through the ClusterIP");
    assert_eq!(exchange.reply.server, server.name());
    assert_eq!(exchange.reply.echo, request);
    assert_eq!(exchange.peer, tcp_frontend);
    assert_eq!(*exchange.reply.client_seen.ip(), client.addr());

    let answer = client
        .udp_request(udp_frontend, request)
        .expect("UDP exchange through the ClusterIP");
    assert_eq!(answer.reply.server, server.name());
    assert_eq!(answer.reply.echo, request);
    assert_eq!(answer.from, udp_frontend);

    let deltas = datapath.counters().expect("counters").since(&before);
    assert_eq!(deltas.get(Counter::NewFlow.name()), Some(&2), "{deltas:?}");
    assert!(
        deltas.get(Counter::Reply.name()).is_some_and(|&n| n >= 2),
        "{deltas:?}"
    );
    assert_eq!(
        deltas.get(Counter::RewriteFailed.name()),
        None,
        "{deltas:?}"
    );
}

/// The TCP RST and the ICMP port unreachable the datapath builds in place
/// of a client's CHECKSUM_PARTIAL packet must come out right when the
/// kernel finishes the checksum on the way back to the client.
#[test]
fn rejects_built_from_partial_packets_stay_right() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    let mut testbed = Testbed::new("rcsum").expect("testbed");
    testbed
        .add_node("node")
        .expect("node")
        .add_pod("client")
        .expect("client pod");
    let node = testbed.node("node");
    let client = node.pod("client");
    disable_tx_checksum_offload(node.ns(), client.host_iface());

    let tcp_frontend = SocketAddrV4::new(cluster_ip(1), 80);
    let udp_frontend = SocketAddrV4::new(cluster_ip(1), 53);
    let mut datapath = Datapath::load().expect("load the datapath");
    for (id, frontend, protocol) in [(1, tcp_frontend, proto::TCP), (2, udp_frontend, proto::UDP)] {
        datapath
            .add_service(&ServiceSpec {
                id,
                frontend,
                proto: protocol,
                backends: Vec::new(),
            })
            .expect("write a service without backends");
    }
    datapath
        .attach_ingress(node.ns(), client.host_iface())
        .expect("attach lb_tc_pod");

    // A reset the client drops (bad checksum) would make it retry until
    // the client timeout instead.
    let refused = client
        .tcp_request(tcp_frontend, "anyone?")
        .expect_err("no backend");
    assert_eq!(
        refused.kind(),
        io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    let refused = client
        .udp_connected_request(udp_frontend, "anyone?")
        .expect_err("no backend");
    assert_eq!(
        refused.kind(),
        io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
}

//! External flows across nodes on veth uplinks whose far end has no XDP
//! program, as on kind nodes or containers: the agents run with the
//! default `--xdp-forward auto`, see that `eth0` is a veth and leave all
//! forwarding to `lb_tc_ext` (`CONFIG_F_XDP_NO_TX`). XDP_TX would not do
//! here: the kernel's veth driver wakes the peer to take XDP_TX frames
//! only if the peer has an XDP program of its own, so they would wait
//! until unrelated traffic came by.
//!
//! Needs root, bpffs and the agent binary (`LB_AGENT_BIN`, or
//! target/debug/lb-agent).

use std::net::SocketAddrV4;

use lb_common::counters::Counter;
use lb_common::service::SERVICE_F_EXTERNAL;
use lb_tests::agent::{Agent, xdp_program};
use lb_tests::fixture::{MultiNode, MultiNodeSpec, node_pod_name};
use lb_tests::manifests::{Protocol, Service, ServicePort, ServiceType};
use lb_tests::topology::{UplinkPeer, cluster_ip};

const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
const TCP_NODE_PORT: u16 = 30180;
const UDP_NODE_PORT: u16 = 30153;
/// Exchanges per protocol; each must complete within the client timeout.
const EXCHANGES: u64 = 8;

fn counter(agent: &Agent, counter: Counter) -> u64 {
    agent
        .counter(counter.name())
        .unwrap_or_else(|error| panic!("read counters: {error}"))
}

/// Waits until `agent` programs `frontend` as an external frontend whose
/// only (ready) backend is `backend`.
fn wait_external(agent: &Agent, frontend: SocketAddrV4, proto: Protocol, backend: SocketAddrV4) {
    agent
        .wait_for_service(
            frontend,
            proto,
            &format!("external, backend {backend}"),
            |entry| {
                entry.flags & SERVICE_F_EXTERNAL != 0
                    && entry.backends.len() == 1
                    && entry.backends[0].addr == backend
                    && entry.backends[0].ready
            },
        )
        .unwrap_or_else(|error| panic!("{error}\n{}", agent.diagnostics()));
}

#[test]
fn veth_uplinks_without_peer_xdp_forward_through_tc_by_default() {
    let cluster = MultiNode::start(
        "xdpfwd",
        MultiNodeSpec {
            uplink_peer: UplinkPeer::Plain,
            // The agents' default: auto.
            xdp_forward: None,
            ..MultiNodeSpec::default()
        },
    )
    .expect("cluster");

    // The far ends of the uplinks run nothing that would wake them for
    // XDP_TX frames.
    let network = cluster.testbed().network_ns().expect("the network exists");
    for port in ["n0", "n1"] {
        assert_eq!(
            xdp_program(network, port).expect("query XDP"),
            None,
            "an XDP program on the bridge-side peer {port}"
        );
    }
    // Each agent chose TC forwarding, and said why.
    for agent in cluster.agents() {
        let log = agent.log();
        assert!(
            log.contains("XDP forwarding tc: every packet to forward goes to lb_tc_ext")
                && log.contains("eth0 is a veth"),
            "no decision for TC forwarding in the log:\n{log}"
        );
    }

    // A NodePort whose only backend is on node 2, reached through node 1:
    // source-translated to node 1's address, forwarded both ways.
    let web = Service::new(
        "web",
        cluster_ip(30),
        vec![
            ServicePort::tcp("tcp", 80, TCP_TARGET).with_node_port(TCP_NODE_PORT),
            ServicePort::udp("udp", 53, UDP_TARGET).with_node_port(UDP_NODE_PORT),
        ],
    )
    .with_type(ServiceType::NodePort);
    cluster.write(&web, &[(2, 1)]).expect("write");
    let node1 = cluster.node(1);
    let tcp_frontend = SocketAddrV4::new(node1.addr(), TCP_NODE_PORT);
    let udp_frontend = SocketAddrV4::new(node1.addr(), UDP_NODE_PORT);
    let agent = cluster.agent(1);
    wait_external(
        agent,
        tcp_frontend,
        Protocol::Tcp,
        cluster.backend(2, 1, TCP_TARGET),
    );
    wait_external(
        agent,
        udp_frontend,
        Protocol::Udp,
        cluster.backend(2, 1, UDP_TARGET),
    );

    let to_tc_before = counter(agent, Counter::XdpToTc);
    let forwarded_before = counter(agent, Counter::Forwarded);
    let client = cluster.external_client(1);
    let backend = node_pod_name(2, 1);
    for n in 0..EXCHANGES {
        let exchange = client
            .tcp_request(tcp_frontend, &format!("tcp {n}"))
            .unwrap_or_else(|error| {
                panic!(
                    "TCP {n} to {tcp_frontend}: {error}\n{}",
                    agent.diagnostics()
                )
            });
        assert_eq!(exchange.peer, tcp_frontend, "{exchange:?}");
        assert_eq!(exchange.reply.server, backend, "{exchange:?}");
        assert_eq!(
            *exchange.reply.client_seen.ip(),
            node1.addr(),
            "{exchange:?}"
        );

        let exchange = client
            .udp_connected_request(udp_frontend, &format!("udp {n}"))
            .unwrap_or_else(|error| {
                panic!(
                    "UDP {n} to {udp_frontend}: {error}\n{}",
                    agent.diagnostics()
                )
            });
        assert_eq!(exchange.from, udp_frontend, "{exchange:?}");
        assert_eq!(exchange.reply.server, backend, "{exchange:?}");
        assert_eq!(
            *exchange.reply.client_seen.ip(),
            node1.addr(),
            "{exchange:?}"
        );
    }

    // Every packet of these flows crossed node 1 twice over: XDP handed it
    // on untouched (`xdp_to_tc`) and TC forwarded it (`forwarded`, which
    // XDP never counts under TC forwarding). At least the SYN, the request
    // and the answer of each TCP exchange, and both datagrams of each UDP
    // one.
    let to_tc = counter(agent, Counter::XdpToTc) - to_tc_before;
    let forwarded = counter(agent, Counter::Forwarded) - forwarded_before;
    let least = EXCHANGES * (3 + 2);
    assert!(
        to_tc >= least,
        "xdp_to_tc grew by {to_tc}, expected at least {least}\n{}",
        agent.diagnostics()
    );
    assert!(
        forwarded >= to_tc,
        "forwarded grew by {forwarded}, less than the {to_tc} packets XDP handed to TC\n{}",
        agent.diagnostics()
    );
}

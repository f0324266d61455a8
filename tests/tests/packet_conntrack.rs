//! Conntrack entries of `lb_tc_pod` end with their TCP connection: the
//! last ACK after FINs both ways, or a RST either way, deletes the flow
//! once translated, so closed connections do not pile up in the LRU table.
//!
//! Privileged: needs root (BPF program load) and a 6.x kernel.

use std::net::SocketAddrV4;

use lb_common::{conntrack::FlowKey, proto};
use lb_tests::packet::{
    datapath::{BackendSpec, Datapath, ServiceSpec, TC_ACT_OK, be_addr, be_port},
    frame::{Frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

fn sa(text: &str) -> SocketAddrV4 {
    text.parse().expect("socket address literal")
}

const FRONTEND: &str = "198.19.0.70:80";
const BACKEND: &str = "198.18.6.1:8080";
const SERVICE_ID: u32 = 9;

fn datapath() -> Datapath {
    let mut datapath = Datapath::load().expect("load the datapath");
    datapath
        .add_service(&ServiceSpec {
            id: SERVICE_ID,
            frontend: sa(FRONTEND),
            proto: proto::TCP,
            backends: vec![BackendSpec {
                id: 1,
                addr: sa(BACKEND),
                ready: true,
            }],
        })
        .unwrap();
    datapath
}

fn key(client: &str) -> FlowKey {
    FlowKey {
        client_addr: be_addr(&sa(client)),
        client_port: be_port(&sa(client)),
        proto: proto::TCP,
        _pad: 0,
        service_id: SERVICE_ID,
    }
}

/// Runs `(from client?, flags)` packets of one connection; after each, the
/// flow must exist or not as `exists` says.
fn run(datapath: &mut Datapath, client: &str, steps: &[(bool, u8, bool)]) {
    for (i, &(from_client, flags, exists)) in steps.iter().enumerate() {
        let frame = if from_client {
            Frame::tcp(sa(client), sa(FRONTEND), flags)
        } else {
            Frame::tcp(sa(BACKEND), sa(client), flags)
        };
        let out = datapath.run(&frame.to_bytes()).unwrap();
        assert_eq!(out.verdict, TC_ACT_OK, "step {i}");
        let expected = if from_client {
            frame.with_dst(sa(BACKEND))
        } else {
            frame.with_src(sa(FRONTEND))
        };
        assert_eq!(out.frame, expected.to_bytes(), "step {i} translated");
        assert_eq!(
            datapath.flow(&key(client)).unwrap().is_some(),
            exists,
            "step {i}: flow exists"
        );
    }
}

#[test]
fn client_close_ends_the_flow_with_the_last_ack() {
    let mut datapath = datapath();
    run(
        &mut datapath,
        "198.18.0.70:41000",
        &[
            (true, TCP_SYN, true),
            (false, TCP_SYN | TCP_ACK, true),
            (true, TCP_ACK, true),
            (true, TCP_FIN | TCP_ACK, true),
            // An ACK of the client's FIN alone does not end it.
            (false, TCP_ACK, true),
            (false, TCP_FIN | TCP_ACK, true),
            (true, TCP_ACK, false),
        ],
    );
}

#[test]
fn backend_close_ends_the_flow_with_the_last_ack() {
    let mut datapath = datapath();
    run(
        &mut datapath,
        "198.18.0.70:41001",
        &[
            (true, TCP_SYN, true),
            (false, TCP_SYN | TCP_ACK, true),
            (true, TCP_ACK, true),
            (false, TCP_FIN | TCP_ACK, true),
            (true, TCP_ACK, true),
            (true, TCP_FIN | TCP_ACK, true),
            (false, TCP_ACK, false),
        ],
    );
    assert_eq!(datapath.flow_count().unwrap(), 0);
}

#[test]
fn reset_either_way_ends_the_flow() {
    let mut datapath = datapath();
    run(
        &mut datapath,
        "198.18.0.70:41002",
        &[
            (true, TCP_SYN, true),
            (false, TCP_SYN | TCP_ACK, true),
            (true, TCP_RST, false),
        ],
    );
    run(
        &mut datapath,
        "198.18.0.70:41003",
        &[(true, TCP_SYN, true), (false, TCP_RST | TCP_ACK, false)],
    );
}

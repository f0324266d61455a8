//! Per-service and per-backend counters of `lb_tc_pod` (`LB_SVC_STATS`,
//! `LB_BE_STATS`), packet by packet with `BPF_PROG_TEST_RUN`: translated
//! packets and bytes both ways, new flows, refusals and resets by reason.
//!
//! Privileged: needs root (BPF program load) and a 6.x kernel.

use std::net::SocketAddrV4;

use lb_common::{
    backend::Backend,
    proto,
    stats::{BackendStats, DropReason, ServiceStats},
};
use lb_tests::packet::{
    datapath::{BackendSpec, Datapath, ServiceSpec, TC_ACT_OK, TC_ACT_REDIRECT},
    frame::{Frame, TCP_ACK, TCP_SYN},
};

fn sa(text: &str) -> SocketAddrV4 {
    text.parse().expect("socket address literal")
}

const CLIENT: &str = "198.18.0.60:40000";
const FRONTEND: &str = "198.19.0.60:80";
const EMPTY_FRONTEND: &str = "198.19.0.61:80";
const BACKEND: &str = "198.18.5.1:8080";

#[test]
fn counters_follow_translated_packets_and_drops() {
    let mut datapath = Datapath::load().expect("load the datapath");
    datapath
        .add_service(&ServiceSpec {
            id: 7,
            frontend: sa(FRONTEND),
            proto: proto::TCP,
            backends: vec![BackendSpec {
                id: 3,
                addr: sa(BACKEND),
                ready: true,
            }],
        })
        .unwrap();
    datapath
        .add_service(&ServiceSpec {
            id: 8,
            frontend: sa(EMPTY_FRONTEND),
            proto: proto::TCP,
            backends: Vec::new(),
        })
        .unwrap();

    let syn = Frame::tcp(sa(CLIENT), sa(FRONTEND), TCP_SYN).to_bytes();
    let data = Frame::tcp(sa(CLIENT), sa(FRONTEND), TCP_ACK)
        .with_payload(&[7; 100])
        .to_bytes();
    let reply = Frame::tcp(sa(BACKEND), sa(CLIENT), TCP_ACK)
        .with_payload(&[9; 10])
        .to_bytes();
    for (frame, verdict) in [(&syn, TC_ACT_OK), (&data, TC_ACT_OK), (&reply, TC_ACT_OK)] {
        assert_eq!(datapath.run(frame).unwrap().verdict, verdict);
    }
    let service = datapath.service_stats(7).unwrap();
    assert_eq!(
        service,
        ServiceStats {
            packets: 2,
            bytes: (syn.len() + data.len()) as u64,
            reply_packets: 1,
            reply_bytes: reply.len() as u64,
            new_flows: 1,
            drops: [0; lb_common::stats::DROP_REASON_COUNT],
        }
    );
    assert_eq!(
        datapath.backend_stats(3).unwrap(),
        BackendStats {
            packets: 2,
            bytes: (syn.len() + data.len()) as u64,
            reply_packets: 1,
            reply_bytes: reply.len() as u64,
            new_flows: 1,
        }
    );

    // Refused: no ready backend.
    let refused = Frame::tcp(sa(CLIENT), sa(EMPTY_FRONTEND), TCP_SYN).to_bytes();
    assert_eq!(datapath.run(&refused).unwrap().verdict, TC_ACT_REDIRECT);
    let mut drops = [0; lb_common::stats::DROP_REASON_COUNT];
    drops[DropReason::NoBackend as usize] = 1;
    assert_eq!(
        datapath.service_stats(8).unwrap(),
        ServiceStats {
            drops,
            ..ServiceStats::default()
        }
    );

    // The backend leaves every EndpointSlice: the next packet is reset.
    datapath
        .remove_backend(3, &sa(BACKEND), proto::TCP)
        .unwrap();
    assert_eq!(datapath.backend(3).unwrap(), Backend::default());
    assert_eq!(datapath.run(&data).unwrap().verdict, TC_ACT_REDIRECT);
    let after = datapath.service_stats(7).unwrap();
    assert_eq!(after.drops[DropReason::BackendGone as usize], 1);
    assert_eq!(after.packets, service.packets);
}

//! ns/packet of `lb_tc_pod` for a new TCP flow, an established one and a
//! packet that is no service's, measured with the replay wrapper of
//! `lb_tests::packet::bench` (see there why plain `repeat` is wrong).
//!
//! Ignored by default (timing, not correctness; it needs a quiet machine):
//!
//! ```text
//! cargo +1.98.0 test -p lb-tests --test packet_bench -- --ignored --nocapture
//! ```
//!
//! Privileged: needs root (BPF program load) and a 6.x kernel.

use std::net::SocketAddrV4;

use lb_common::{config::defaults::MAX_FLOWS, counters::Counter, proto};
use lb_tests::packet::{
    bench::{Bench, BenchCase, BenchResult},
    datapath::{BackendSpec, Datapath, ServiceSpec, TC_ACT_OK},
    frame::{Frame, TCP_ACK, TCP_SYN},
};

/// Runs per `BPF_PROG_TEST_RUN` call and calls per case. New-flow runs step
/// the client address once per run (calibration runs too), so
/// `2 * RUNS * ROUNDS` addresses from 198.18.0.1 stay inside 198.18.0.0/15,
/// and the flows fit the production-size conntrack table.
const RUNS: u32 = 5_000;
const ROUNDS: u32 = 9;
const _: () = assert!(2 * RUNS * ROUNDS < 1 << 17 && RUNS * ROUNDS < MAX_FLOWS);

fn sa(text: &str) -> SocketAddrV4 {
    text.parse().expect("socket address literal")
}

const CLIENT: &str = "198.18.0.1:40000";
const FRONTEND: &str = "198.19.255.1:80";
const BACKENDS: [&str; 4] = [
    "198.19.254.1:8080",
    "198.19.254.2:8080",
    "198.19.254.3:8080",
    "198.19.254.4:8080",
];

/// Offset of the TCP checksum in an untagged frame without IP options.
const TCP_CSUM_OFF: usize = 14 + 20 + 16;

fn report(result: &BenchResult) {
    println!(
        "{:<28} {:>5} ns/packet  (with wrapper {} ns, calibration {} ns; median of {} x {} runs)",
        result.name,
        result.ns_per_packet,
        result.datapath_ns,
        result.calibration_ns,
        result.rounds,
        result.runs_per_round
    );
}

#[test]
#[ignore = "timing measurement; run explicitly with --ignored"]
fn ns_per_packet() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    let mut datapath = Datapath::load_with_max_flows(MAX_FLOWS).expect("load the datapath object");
    datapath
        .add_service(&ServiceSpec {
            id: 1,
            frontend: sa(FRONTEND),
            proto: proto::TCP,
            backends: BACKENDS
                .iter()
                .enumerate()
                .map(|(i, addr)| BackendSpec {
                    id: i as u32 + 1,
                    addr: sa(addr),
                    ready: true,
                })
                .collect(),
        })
        .expect("write the service");
    let mut bench = Bench::load(datapath).expect("load the bench harness");

    // Established: the flow exists before the measurement.
    let data = Frame::tcp(sa(CLIENT), sa(FRONTEND), TCP_ACK).with_payload(&[0x42; 64]);
    let first = bench
        .datapath()
        .run(&Frame::tcp(sa(CLIENT), sa(FRONTEND), TCP_SYN).to_bytes())
        .expect("open the flow");
    assert_eq!(first.verdict, TC_ACT_OK);
    let backend = BACKENDS
        .iter()
        .find(|b| {
            first.frame
                == Frame::tcp(sa(CLIENT), sa(FRONTEND), TCP_SYN)
                    .with_dst(sa(b))
                    .to_bytes()
        })
        .expect("the SYN went to a backend");

    let other = Frame::tcp(sa(CLIENT), sa("198.19.253.1:80"), TCP_ACK)
        .with_payload(&[0x42; 64])
        .to_bytes();
    let cases = [
        BenchCase {
            name: "new TCP flow (SYN)".into(),
            frame: Frame::tcp(sa("198.18.0.1:40001"), sa(FRONTEND), TCP_SYN).to_bytes(),
            step_source_l4_csum_off: Some(TCP_CSUM_OFF),
            expected_verdict: TC_ACT_OK,
            expected_counter: Counter::NewFlow,
            expected_output: None,
        },
        BenchCase {
            name: "established TCP flow".into(),
            frame: data.to_bytes(),
            step_source_l4_csum_off: None,
            expected_verdict: TC_ACT_OK,
            expected_counter: Counter::Established,
            expected_output: Some(data.clone().with_dst(sa(backend)).to_bytes()),
        },
        BenchCase {
            name: "no service's packet".into(),
            frame: other.clone(),
            step_source_l4_csum_off: None,
            expected_verdict: TC_ACT_OK,
            expected_counter: Counter::Pass,
            expected_output: Some(other),
        },
    ];
    for case in &cases {
        let result = bench.measure(case, RUNS, ROUNDS).expect("measure");
        report(&result);
    }
}

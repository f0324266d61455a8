//! ns/packet of `lb_tc_pod` for a new TCP flow (random selection; with
//! ClientIP affinity, hit and miss; with Maglev), an established one and a
//! packet that is no service's, measured with the replay wrapper of
//! `lb_tests::packet::bench` (see there why plain `repeat` is wrong); and
//! every hot path of `lb_tc_pod` and `lb_xdp_ext` the way `cargo xtask
//! bench` measures them, with small maps (`hot_paths_tc_and_xdp`).
//!
//! Ignored by default (timing, not correctness; it needs a quiet machine):
//!
//! ```text
//! cargo +1.98.0 test -p lb-tests --test packet_bench -- --ignored --nocapture
//! ```
//!
//! Privileged: needs root (BPF program load) and a 6.x kernel.

use std::net::SocketAddrV4;

use std::net::Ipv4Addr;

use lb_common::{
    affinity::Affinity,
    config::defaults::{MAGLEV_TABLE_SIZE, MAX_AFFINITIES, MAX_FLOWS},
    conntrack::FlowKey,
    counters::Counter,
    proto,
    service::{SERVICE_F_MAGLEV, ServiceValue},
};
use lb_tests::packet::{
    bench::{Bench, BenchCase, BenchResult},
    datapath::{BackendSpec, Datapath, Program, ServiceSpec, TC_ACT_OK, monotonic_secs},
    frame::{Frame, TCP_ACK, TCP_SYN},
};

/// Runs per `BPF_PROG_TEST_RUN` call and calls per case. New-flow runs step
/// the client address once per run (calibration runs too), so
/// `2 * RUNS * ROUNDS` addresses from 198.18.0.1 stay inside 198.18.0.0/15,
/// and the flows fit the production-size conntrack table.
const RUNS: u32 = 5_000;
const ROUNDS: u32 = 9;
const _: () = assert!(2 * RUNS * ROUNDS < 1 << 17 && 5 * RUNS * ROUNDS < MAX_FLOWS);
/// Runs per call for the affinity-hit case: every address it uses has an
/// affinity written beforehand, and they must all fit the affinity table.
const HIT_RUNS: u32 = 2_000;
const _: () = assert!(2 * HIT_RUNS * ROUNDS < MAX_AFFINITIES);

/// Frontends of the same four backends: with ClientIP affinity, and with
/// Maglev selection (each its own service id, so flows never collide).
const FRONTEND_AFFINITY: &str = "198.19.255.2:80";
const FRONTEND_MAGLEV: &str = "198.19.255.3:80";
const FRONTEND_AFFINITY_HIT: &str = "198.19.255.4:80";

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
    add_variants(&mut datapath);
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
            program: Program::TcPod,
            ifindex: None,
            frame: Frame::tcp(sa("198.18.0.1:40001"), sa(FRONTEND), TCP_SYN).to_bytes(),
            step_source_l4_csum_off: Some(TCP_CSUM_OFF),
            expected_verdict: TC_ACT_OK,
            expected_counters: vec![Counter::NewFlow],
            expected_output: None,
        },
        BenchCase {
            name: "established TCP flow".into(),
            program: Program::TcPod,
            ifindex: None,
            frame: data.to_bytes(),
            step_source_l4_csum_off: None,
            expected_verdict: TC_ACT_OK,
            expected_counters: vec![Counter::Established],
            expected_output: Some(data.clone().with_dst(sa(backend)).to_bytes()),
        },
        BenchCase {
            name: "no service's packet".into(),
            program: Program::TcPod,
            ifindex: None,
            frame: other.clone(),
            step_source_l4_csum_off: None,
            expected_verdict: TC_ACT_OK,
            expected_counters: vec![Counter::Pass],
            expected_output: Some(other),
        },
    ];
    for case in &cases {
        let result = bench.measure(case, RUNS, ROUNDS).expect("measure");
        report(&result);
    }

    let syn_to = |frontend: &str| BenchCase {
        name: String::new(),
        program: Program::TcPod,
        ifindex: None,
        frame: Frame::tcp(sa("198.18.0.1:40001"), sa(frontend), TCP_SYN).to_bytes(),
        step_source_l4_csum_off: Some(TCP_CSUM_OFF),
        expected_verdict: TC_ACT_OK,
        expected_counters: vec![Counter::NewFlow],
        expected_output: None,
    };
    let miss = BenchCase {
        name: "new flow, affinity miss".into(),
        ..syn_to(FRONTEND_AFFINITY)
    };
    report(&bench.measure(&miss, RUNS, ROUNDS).expect("measure"));
    let maglev = BenchCase {
        name: "new flow, Maglev".into(),
        ..syn_to(FRONTEND_MAGLEV)
    };
    report(&bench.measure(&maglev, RUNS, ROUNDS).expect("measure"));

    // Every client address the hit case steps through has an affinity.
    let now = monotonic_secs();
    let first = u32::from(Ipv4Addr::new(198, 18, 0, 1));
    for i in 0..2 * HIT_RUNS * ROUNDS + 2 {
        let client = Ipv4Addr::from(first + i);
        bench
            .datapath()
            .set_affinity(
                AFFINITY_HIT_ID,
                u32::from_ne_bytes(client.octets()),
                &Affinity {
                    backend_id: 2,
                    last_seen: now,
                },
            )
            .expect("write an affinity");
    }
    let hit = BenchCase {
        name: "new flow, affinity hit".into(),
        expected_output: None,
        ..syn_to(FRONTEND_AFFINITY_HIT)
    };
    report(&bench.measure(&hit, HIT_RUNS, ROUNDS).expect("measure"));
    // The runs followed the affinities (all to backend 2).
    let mut hits = 0;
    for i in 0..2 * HIT_RUNS * ROUNDS + 2 {
        let client = Ipv4Addr::from(first + i);
        let key = FlowKey {
            client_addr: u32::from_ne_bytes(client.octets()),
            client_port: 40001u16.to_be(),
            proto: proto::TCP,
            _pad: 0,
            service_id: AFFINITY_HIT_ID,
        };
        if let Some(flow) = bench.datapath().flow(&key).expect("read a flow") {
            assert_eq!(flow.backend_id, 2, "flow of {client} ignored its affinity");
            hits += 1;
        }
    }
    assert_eq!(hits, HIT_RUNS * ROUNDS);
}

const AFFINITY_ID: u32 = 2;
const MAGLEV_ID: u32 = 3;
const AFFINITY_HIT_ID: u32 = 4;

/// The service of [`BACKENDS`] again under three more frontends: with
/// affinity (a miss every run), with Maglev, and with affinity for hits.
fn add_variants(datapath: &mut Datapath) {
    let backends: Vec<BackendSpec> = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, addr)| BackendSpec {
            id: i as u32 + 1,
            addr: sa(addr),
            ready: true,
        })
        .collect();
    for (id, frontend) in [
        (AFFINITY_ID, FRONTEND_AFFINITY),
        (MAGLEV_ID, FRONTEND_MAGLEV),
        (AFFINITY_HIT_ID, FRONTEND_AFFINITY_HIT),
    ] {
        datapath
            .add_service(&ServiceSpec {
                id,
                frontend: sa(frontend),
                proto: proto::TCP,
                backends: backends.clone(),
            })
            .expect("write the service");
    }
    let addrs: Vec<SocketAddrV4> = BACKENDS.iter().map(|b| sa(b)).collect();
    let table: Vec<u32> = lb_agent::datapath::maglev::table(&addrs, MAGLEV_TABLE_SIZE)
        .into_iter()
        .map(|i| i + 1)
        .collect();
    datapath
        .set_maglev_table(0, &table)
        .expect("write the table");
    let value = |id, flags, affinity_timeout| ServiceValue {
        id,
        backend_count: BACKENDS.len() as u32,
        flags,
        affinity_timeout,
        ..ServiceValue::default()
    };
    for (frontend, value) in [
        (FRONTEND_AFFINITY, value(AFFINITY_ID, 0, 10_800)),
        (FRONTEND_MAGLEV, value(MAGLEV_ID, SERVICE_F_MAGLEV, 0)),
        (FRONTEND_AFFINITY_HIT, value(AFFINITY_HIT_ID, 0, 10_800)),
    ] {
        datapath
            .set_service(&sa(frontend), proto::TCP, &value)
            .expect("write the frontend");
    }
}

/// The program-cost part of `cargo xtask bench` with one service and no
/// other flows: every TC and XDP hot path (the XDP ones NodePort packets on
/// the external interface of a test namespace), printed as the report's
/// table.
#[test]
#[ignore = "timing measurement; run explicitly with --ignored"]
fn hot_paths_tc_and_xdp() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    let plan = lb_tests::bench::Plan {
        prog_services: vec![1],
        prog_flows: vec![0],
        // New-flow clients step through 198.18.0.0/16: 2 * runs * rounds
        // addresses must fit.
        prog_runs: 2_000,
        prog_rounds: ROUNDS,
        ..lb_tests::bench::Plan::smoke()
    };
    let results = lb_tests::bench::prog::measure(&plan, &mut |what| eprintln!("{what}"))
        .expect("measure the hot paths");
    println!("{}", lb_tests::bench::report::prog_table(&results));
}

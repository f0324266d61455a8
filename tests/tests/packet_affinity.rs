//! Session affinity and Maglev selection of `lb_tc_pod`, packet by packet
//! with `BPF_PROG_TEST_RUN`: affinity hit, miss, expiry, membership, the
//! per-service switch; Maglev tables followed, and two datapaths ("two
//! nodes") choosing the same backend for the same flow.
//!
//! Every output frame is compared with one built independently by
//! `lb_tests::packet::frame` (checksums from scratch).
//!
//! Privileged: needs root (BPF program load) and a 6.x kernel.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    affinity::Affinity,
    backend::{BACKEND_F_ACTIVE, Backend},
    config::defaults::MAGLEV_TABLE_SIZE,
    counters::Counter,
    proto,
    service::{SERVICE_F_MAGLEV, ServiceValue},
};
use lb_tests::packet::{
    datapath::{BackendSpec, Datapath, ServiceSpec, TC_ACT_OK, be_addr, be_port, monotonic_secs},
    frame::{Frame, TCP_SYN},
};

fn sa(text: &str) -> SocketAddrV4 {
    text.parse().expect("socket address literal")
}

const SERVICE_ID: u32 = 3;
const FRONTEND: &str = "198.19.0.30:80";
const BACKENDS: [&str; 4] = [
    "198.18.2.1:8080",
    "198.18.2.2:8080",
    "198.18.2.3:8080",
    "198.18.2.4:8080",
];
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_ADDR, port)
}

fn backend_spec(i: usize) -> BackendSpec {
    BackendSpec {
        id: i as u32 + 1,
        addr: sa(BACKENDS[i]),
        ready: true,
    }
}

/// A datapath with the service: all four backends listed and ready, with
/// `affinity_timeout` seconds of ClientIP affinity.
fn datapath(affinity_timeout: u32) -> Datapath {
    let mut datapath = Datapath::load().expect("load the datapath");
    datapath
        .add_service(&ServiceSpec {
            id: SERVICE_ID,
            frontend: sa(FRONTEND),
            proto: proto::TCP,
            backends: (0..BACKENDS.len()).map(backend_spec).collect(),
        })
        .expect("write the service");
    set_affinity_timeout(&mut datapath, affinity_timeout);
    datapath
}

fn set_affinity_timeout(datapath: &mut Datapath, affinity_timeout: u32) {
    datapath
        .set_service(
            &sa(FRONTEND),
            proto::TCP,
            &ServiceValue {
                id: SERVICE_ID,
                backend_count: BACKENDS.len() as u32,
                affinity_timeout,
                ..ServiceValue::default()
            },
        )
        .expect("write the frontend");
}

/// Sends a SYN from `src` to the frontend; returns the index of the
/// backend it was translated to, checking the whole output frame.
fn connect(datapath: &Datapath, src: SocketAddrV4) -> usize {
    let syn = Frame::tcp(src, sa(FRONTEND), TCP_SYN);
    let before = datapath.counters().expect("counters");
    let out = datapath.run(&syn.to_bytes()).expect("test run");
    assert_eq!(out.verdict, TC_ACT_OK);
    let after = datapath.counters().expect("counters");
    assert_eq!(after.since(&before), BTreeMap::from([("new_flow", 1)]));
    BACKENDS
        .iter()
        .position(|b| out.frame == syn.clone().with_dst(sa(b)).to_bytes())
        .unwrap_or_else(|| panic!("SYN from {src} went to no backend"))
}

#[test]
fn miss_creates_the_affinity_and_hits_follow_it() {
    let mut datapath = datapath(600);
    let client_addr = be_addr(&client(0));
    assert_eq!(datapath.affinity(SERVICE_ID, client_addr).unwrap(), None);
    let first = connect(&datapath, client(41000));
    let affinity = datapath
        .affinity(SERVICE_ID, client_addr)
        .unwrap()
        .expect("a miss records the affinity");
    assert_eq!(affinity.backend_id, first as u32 + 1);
    assert!(affinity.last_seen.abs_diff(monotonic_secs()) <= 1);
    for port in 41001..41050 {
        assert_eq!(connect(&datapath, client(port)), first, "port {port}");
    }
    // Other clients are spread (random among four: 30 all on one backend
    // has probability 4 * 4^-30).
    let others: std::collections::BTreeSet<usize> = (0..30u8)
        .map(|i| {
            connect(
                &datapath,
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 3, i), 40000),
            )
        })
        .collect();
    assert!(others.len() > 1);
}

#[test]
fn affinity_beats_selection_until_it_expires() {
    let mut datapath = datapath(30);
    let client_addr = be_addr(&client(0));
    // An affinity to backend 4 (index 3), used 10 s ago.
    let now = monotonic_secs();
    datapath
        .set_affinity(
            SERVICE_ID,
            client_addr,
            &Affinity {
                backend_id: 4,
                last_seen: now - 10,
            },
        )
        .unwrap();
    for port in 42000..42020 {
        assert_eq!(connect(&datapath, client(port)), 3);
    }
    // A hit refreshes it.
    let refreshed = datapath.affinity(SERVICE_ID, client_addr).unwrap().unwrap();
    assert_eq!(refreshed.backend_id, 4);
    assert!(refreshed.last_seen >= now);

    // Idle for longer than the timeout: chosen afresh (among four, so the
    // new choice is seen through the refreshed entry, not the backend).
    datapath
        .set_affinity(
            SERVICE_ID,
            client_addr,
            &Affinity {
                backend_id: 4,
                last_seen: now - 31,
            },
        )
        .unwrap();
    let mut chosen = std::collections::BTreeSet::new();
    for round in 0..30u16 {
        datapath
            .set_affinity(
                SERVICE_ID,
                client_addr,
                &Affinity {
                    backend_id: 4,
                    last_seen: now - 31,
                },
            )
            .unwrap();
        let backend = connect(&datapath, client(42100 + round));
        let affinity = datapath.affinity(SERVICE_ID, client_addr).unwrap().unwrap();
        assert_eq!(affinity.backend_id, backend as u32 + 1);
        assert!(affinity.last_seen >= now);
        chosen.insert(backend);
    }
    assert!(
        chosen.len() > 1,
        "an expired affinity was followed: {chosen:?}"
    );
}

#[test]
fn affinity_to_a_backend_that_left_the_service_is_dropped() {
    let mut datapath = datapath(600);
    let client_addr = be_addr(&client(0));
    let now = monotonic_secs();
    // Backend 9 is live (another service lists it) but no member of this one.
    datapath
        .set_backend(
            9,
            &Backend {
                addr: be_addr(&sa("198.18.2.9:8080")),
                port: be_port(&sa("198.18.2.9:8080")),
                proto: proto::TCP,
                flags: BACKEND_F_ACTIVE,
            },
        )
        .unwrap();
    datapath
        .set_affinity(
            SERVICE_ID,
            client_addr,
            &Affinity {
                backend_id: 9,
                last_seen: now,
            },
        )
        .unwrap();
    let backend = connect(&datapath, client(43000));
    let affinity = datapath.affinity(SERVICE_ID, client_addr).unwrap().unwrap();
    assert_eq!(affinity.backend_id, backend as u32 + 1);
    // Freed backend id (zeroed): the same.
    datapath.set_backend(9, &Backend::default()).unwrap();
    datapath
        .set_affinity(
            SERVICE_ID,
            client_addr,
            &Affinity {
                backend_id: 9,
                last_seen: now,
            },
        )
        .unwrap();
    let backend = connect(&datapath, client(43001));
    assert_eq!(
        datapath
            .affinity(SERVICE_ID, client_addr)
            .unwrap()
            .unwrap()
            .backend_id,
        backend as u32 + 1
    );
}

#[test]
fn affinity_switched_off_and_on_applies_to_the_next_connection() {
    let mut datapath = datapath(0);
    let client_addr = be_addr(&client(0));
    // Off: no affinity recorded, entries ignored.
    connect(&datapath, client(44000));
    assert_eq!(datapath.affinity(SERVICE_ID, client_addr).unwrap(), None);
    let now = monotonic_secs();
    datapath
        .set_affinity(
            SERVICE_ID,
            client_addr,
            &Affinity {
                backend_id: 2,
                last_seen: now,
            },
        )
        .unwrap();
    let spread: std::collections::BTreeSet<usize> = (44001..44031)
        .map(|port| connect(&datapath, client(port)))
        .collect();
    assert!(spread.len() > 1);
    // On: followed from the next connection.
    set_affinity_timeout(&mut datapath, 60);
    for port in 44100..44120 {
        assert_eq!(connect(&datapath, client(port)), 1);
    }
    // A shorter timeout than the entry's age: expired at once.
    datapath
        .set_affinity(
            SERVICE_ID,
            client_addr,
            &Affinity {
                backend_id: 2,
                last_seen: now - 20,
            },
        )
        .unwrap();
    set_affinity_timeout(&mut datapath, 10);
    connect(&datapath, client(44200));
    assert!(
        datapath
            .affinity(SERVICE_ID, client_addr)
            .unwrap()
            .unwrap()
            .last_seen
            >= now
    );
}

/// The datapath with the service on Maglev table 5, computed by the agent.
fn maglev_datapath() -> Datapath {
    let mut datapath = datapath(0);
    let addrs: Vec<SocketAddrV4> = BACKENDS.iter().map(|b| sa(b)).collect();
    let table: Vec<u32> = lb_agent::datapath::maglev::table(&addrs, MAGLEV_TABLE_SIZE)
        .into_iter()
        .map(|i| i + 1)
        .collect();
    datapath.set_maglev_table(5, &table).unwrap();
    datapath
        .set_service(
            &sa(FRONTEND),
            proto::TCP,
            &ServiceValue {
                id: SERVICE_ID,
                backend_count: BACKENDS.len() as u32,
                flags: SERVICE_F_MAGLEV,
                maglev_table: 5,
                ..ServiceValue::default()
            },
        )
        .unwrap();
    datapath
}

#[test]
fn maglev_picks_the_same_backend_for_the_same_flow_on_every_node() {
    let node_a = maglev_datapath();
    let node_b = maglev_datapath();
    let mut per_backend = [0u32; 4];
    for i in 0..200u16 {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 4, (i % 50) as u8), 30000 + i);
        let a = connect(&node_a, src);
        assert_eq!(connect(&node_b, src), a, "flow {src}");
        per_backend[a] += 1;
    }
    // 200 flows over four backends by hash: each gets some.
    assert!(per_backend.iter().all(|&n| n > 20), "{per_backend:?}");
    let counters = node_a.counters().unwrap();
    assert_eq!(counters.get(Counter::SlotMiss), 0);
}

#[test]
fn maglev_table_entry_decides() {
    let mut datapath = maglev_datapath();
    // Every entry names backend 2: every flow goes there.
    datapath
        .set_maglev_table(5, &vec![2; MAGLEV_TABLE_SIZE as usize])
        .unwrap();
    for port in 45000..45020 {
        assert_eq!(connect(&datapath, client(port)), 1);
    }
}

//! Program cost: ns per packet of `lb_tc_pod` and `lb_xdp_ext` on each hot
//! path, with `BPF_PROG_TEST_RUN` through the replay wrappers of
//! [`crate::packet::bench`] (the input restored before every run, every
//! run's counter increments, the last verdict and output checked), while
//! the maps hold 1 to 100,000 services and 0 to a million flows written
//! from userspace.
//!
//! The XDP paths are NodePort packets arriving on the external interface
//! of a [`FibNet`] namespace (the test runs are made from a thread inside
//! it, with the interface as `ingress_ifindex`): to a backend on this node
//! (DNAT, `XDP_PASS`), and to a backend on another node (DNAT + SNAT to the
//! node address, `XDP_TX` with the MACs of the FIB lookup).
//!
//! The services other than the measured one are shaped like the agent
//! writes them: a frontend, one slot, one backend of their own and its
//! reverse-NAT entry. The filler flows belong to clients no measured
//! packet uses. A new-flow figure adds `prog_runs` flows per round, which
//! are deleted again (and counted) before the next figure.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, ProgramArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    backend::{BACKEND_F_ACTIVE, BACKEND_F_LOCAL, Backend, BackendAddr, RevNat},
    config::DatapathConfig,
    conntrack::{Flow, FlowKey},
    counters::Counter,
    proto,
    service::{SERVICE_F_EXTERNAL, ServiceKey, ServiceValue},
};

use super::stats::Summary;
use super::{BenchError, Plan, Result};
use crate::packet::PacketError;
use crate::packet::bench::{Bench, BenchCase};
use crate::packet::datapath::{
    BackendSpec, Capacities, Datapath, Program, ServiceSpec, TC_ACT_OK, XDP_PASS, XDP_TX, be_addr,
    be_port,
};
use crate::packet::fib::{CLIENT_ADDR, FibNet, NODE_ADDR, NODE_MAC, NODE2_MAC, NODE2_PODS};
use crate::packet::frame::{Frame, TCP_ACK, TCP_SYN};

/// The measured service (id 1) and its clients.
const SERVICE_ID: u32 = 1;
const FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), 80);
const BACKENDS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 250, 2), 8080),
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 251, 2), 8080),
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 252, 2), 8080),
];
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40000);
/// Port of the clients whose source address the wrapper steps, per path
/// (so the new flows of different paths never share a conntrack key).
const NEW_FLOW_PORT: u16 = 40001;
const XDP_NEW_FLOW_PORT: u16 = 40002;
const XDP_SNAT_NEW_FLOW_PORT: u16 = 40003;
/// The measured service's NodePort on the node address (same service id,
/// its backends on this node).
const NODEPORT: SocketAddrV4 = SocketAddrV4::new(NODE_ADDR, 30080);
/// A NodePort whose backends are on another node (ETP Cluster: SNAT).
const NODEPORT_SNAT: SocketAddrV4 = SocketAddrV4::new(NODE_ADDR, 30081);
const SNAT_SERVICE_ID: u32 = 1 << 30;
/// Backends of [`NODEPORT_SNAT`] (ids 4..=6), in node 2's pod subnet.
const SNAT_BACKEND_BASE_ID: u32 = 4;
fn snat_backends() -> [SocketAddrV4; 3] {
    [2, 3, 4].map(|host| SocketAddrV4::new(ipv4_plus(NODE2_PODS, host), 8080))
}
/// The external client of the established XDP flows.
const XDP_CLIENT: SocketAddrV4 = SocketAddrV4::new(CLIENT_ADDR, 40000);
/// A destination no service has.
const NO_SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 249, 2), 80);
/// Offset of the TCP checksum in an untagged frame without IP options.
const TCP_CSUM_OFF: usize = 14 + 20 + 16;
/// Backend ids of filler services start above the measured service's.
const FILLER_BACKEND_BASE: u32 = 16;
/// Payload of the data packets: a small request.
const PAYLOAD: [u8; 64] = [0x42; 64];

/// The hot paths measured: of `lb_tc_pod`, and of `lb_xdp_ext`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HotPath {
    /// A packet of an established flow, client to frontend.
    Established,
    /// The first packet (SYN) of a new flow: backend choice, flow insert.
    NewFlow,
    /// A backend's reply, reverse-translated.
    Reply,
    /// A packet for no service, passed untouched.
    NoService,
    /// XDP: a NodePort packet of an established flow to a local backend.
    XdpEstablished,
    /// XDP: the SYN of a new NodePort flow to a local backend.
    XdpNewFlow,
    /// XDP: a packet for no service on the external interface.
    XdpNoService,
    /// XDP: a NodePort packet of an established flow to a backend on
    /// another node (DNAT + SNAT, FIB lookup, `XDP_TX`).
    XdpEstablishedSnat,
    /// XDP: the SYN of a new NodePort flow to a backend on another node
    /// (translated port allocated, FIB lookup, `XDP_TX`).
    XdpNewFlowSnat,
}

impl HotPath {
    pub const ALL: [HotPath; 9] = [
        HotPath::Established,
        HotPath::NewFlow,
        HotPath::Reply,
        HotPath::NoService,
        HotPath::XdpEstablished,
        HotPath::XdpNewFlow,
        HotPath::XdpNoService,
        HotPath::XdpEstablishedSnat,
        HotPath::XdpNewFlowSnat,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HotPath::Established => "TC: established flow",
            HotPath::NewFlow => "TC: new flow (SYN)",
            HotPath::Reply => "TC: reply (reverse NAT)",
            HotPath::NoService => "TC: no service",
            HotPath::XdpEstablished => "XDP: NodePort, established flow",
            HotPath::XdpNewFlow => "XDP: NodePort, new flow (SYN)",
            HotPath::XdpNoService => "XDP: no service",
            HotPath::XdpEstablishedSnat => {
                "XDP: NodePort, established, remote backend (SNAT, XDP_TX)"
            }
            HotPath::XdpNewFlowSnat => "XDP: NodePort, new flow, remote backend (SNAT, XDP_TX)",
        }
    }

    /// The program the path runs through.
    pub fn program(self) -> Program {
        match self {
            HotPath::Established | HotPath::NewFlow | HotPath::Reply | HotPath::NoService => {
                Program::TcPod
            }
            _ => Program::XdpExternal,
        }
    }

    /// The new-flow paths: (client port, service id) of the flows they make.
    fn new_flows(self) -> Option<(u16, u32)> {
        match self {
            HotPath::NewFlow => Some((NEW_FLOW_PORT, SERVICE_ID)),
            HotPath::XdpNewFlow => Some((XDP_NEW_FLOW_PORT, SERVICE_ID)),
            HotPath::XdpNewFlowSnat => Some((XDP_SNAT_NEW_FLOW_PORT, SNAT_SERVICE_ID)),
            _ => None,
        }
    }
}

/// One figure of the grid.
#[derive(Clone, Debug)]
pub struct ProgRow {
    pub path: HotPath,
    pub services: u32,
    pub flows: u32,
    /// ns/packet of `lb_tc_pod` itself (the wrapper's calibration run
    /// subtracted round by round).
    pub ns: Summary,
}

/// A calibration figure.
#[derive(Clone, Debug)]
pub struct CalibrationRow {
    pub label: &'static str,
    pub ns: Summary,
}

#[derive(Clone, Debug)]
pub struct ProgResults {
    pub runs: u32,
    pub rounds: u32,
    pub rows: Vec<ProgRow>,
    pub calibration: Vec<CalibrationRow>,
}

impl ProgResults {
    pub fn get(&self, path: HotPath, services: u32, flows: u32) -> Option<&ProgRow> {
        self.rows
            .iter()
            .find(|row| row.path == path && row.services == services && row.flows == flows)
    }
}

fn ipv4_plus(base: Ipv4Addr, offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(offset))
}

/// Frontend of filler service `index` (0-based): 198.19.0.0/16, port 1080
/// and up, so it never equals [`FRONTEND`].
fn filler_frontend(index: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        ipv4_plus(Ipv4Addr::new(198, 19, 0, 0), index & 0xffff),
        1080 + (index >> 16) as u16,
    )
}

/// Backend of filler service `index`: 198.18.128.0/17.
fn filler_backend(index: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        ipv4_plus(Ipv4Addr::new(198, 18, 128, 0), index & 0x7fff),
        9000 + (index >> 15) as u16,
    )
}

/// Key and value of filler flow `index`: clients in 198.19.0.0/16 (the
/// new-flow clients stay in 198.18.0.0/16) on ports no measured packet
/// uses.
fn filler_flow(index: u32) -> (FlowKey, Flow) {
    let client = SocketAddrV4::new(
        ipv4_plus(Ipv4Addr::new(198, 19, 0, 0), index & 0xffff),
        1024 + (index >> 16) as u16,
    );
    let backend = BACKENDS[index as usize % BACKENDS.len()];
    (
        FlowKey {
            client_addr: be_addr(&client),
            client_port: be_port(&client),
            proto: proto::TCP,
            _pad: 0,
            service_id: SERVICE_ID,
        },
        Flow {
            backend_addr: be_addr(&backend),
            backend_port: be_port(&backend),
            frontend_port: be_port(&FRONTEND),
            frontend_addr: be_addr(&FRONTEND),
            backend_id: 1 + index % BACKENDS.len() as u32,
            ..Flow::default()
        },
    )
}

/// Adds filler services `from..to` (0-based indices; service ids start
/// at 2).
fn add_filler_services(datapath: &mut Datapath, from: u32, to: u32) -> Result<()> {
    for index in from..to {
        let service_id = index + 2;
        let backend_id = FILLER_BACKEND_BASE + index;
        let backend = filler_backend(index);
        datapath.set_backend(
            backend_id,
            &Backend {
                addr: be_addr(&backend),
                port: be_port(&backend),
                proto: proto::TCP,
                flags: BACKEND_F_ACTIVE,
            },
        )?;
        datapath.set_slot(service_id, 0, backend_id)?;
        let mut revnat = RevNat {
            count: 1,
            ..RevNat::default()
        };
        revnat.service_ids[0] = service_id;
        datapath.set_revnat(
            &BackendAddr::new(be_addr(&backend), be_port(&backend), proto::TCP),
            &revnat,
        )?;
        datapath.set_service(
            &filler_frontend(index),
            proto::TCP,
            &ServiceValue {
                id: service_id,
                backend_count: 1,
                ..ServiceValue::default()
            },
        )?;
    }
    Ok(())
}

fn add_filler_flows(datapath: &mut Datapath, from: u32, to: u32) -> Result<()> {
    for index in from..to {
        let (key, flow) = filler_flow(index);
        datapath.set_flow(&key, &flow)?;
    }
    Ok(())
}

/// Client of the first new flow of `round`: the wrapper steps the address
/// before every run, so round `r` uses `base + 1 ..= base + 2 * runs`
/// (its calibration runs step too).
fn new_flow_base(round: u32, runs: u32) -> Ipv4Addr {
    ipv4_plus(Ipv4Addr::new(198, 18, 0, 0), 16 + round * 2 * runs)
}

/// Deletes the flows the new-flow runs of one round created (clients
/// `base + 1 ..= base + 2 * runs` on `port`, of `service_id`), checking
/// that there were exactly `runs` of them, and their `LB_SNAT` entries.
fn remove_new_flows(
    datapath: &mut Datapath,
    base: Ipv4Addr,
    runs: u32,
    port: u16,
    service_id: u32,
) -> Result<()> {
    let mut removed = 0;
    for step in 1..=2 * runs {
        let client = SocketAddrV4::new(ipv4_plus(base, step), port);
        let key = FlowKey {
            client_addr: be_addr(&client),
            client_port: be_port(&client),
            proto: proto::TCP,
            _pad: 0,
            service_id,
        };
        if datapath.remove_flow(&key)? {
            removed += 1;
        }
    }
    if removed != runs {
        return Err(BenchError::check(
            "new-flow runs",
            format!("{runs} runs left {removed} flows in the conntrack table"),
        ));
    }
    if service_id == SNAT_SERVICE_ID {
        let mut translated = 0;
        for (key, flow) in datapath.snat_entries()? {
            if flow.client_port == port.to_be() {
                datapath.remove_snat(&key)?;
                translated += 1;
            }
        }
        if translated != runs {
            return Err(BenchError::check(
                "new-flow runs",
                format!("{runs} runs left {translated} LB_SNAT entries"),
            ));
        }
    }
    Ok(())
}

/// The measured service's spec: three ready backends, ids 1..=3.
fn measured_service() -> ServiceSpec {
    ServiceSpec {
        id: SERVICE_ID,
        frontend: FRONTEND,
        proto: proto::TCP,
        backends: BACKENDS
            .iter()
            .enumerate()
            .map(|(i, addr)| BackendSpec {
                id: i as u32 + 1,
                addr: *addr,
                ready: true,
            })
            .collect(),
    }
}

/// Writes the NodePort frontends of the XDP paths: [`NODEPORT`] for the
/// measured service (its backends marked local) and [`NODEPORT_SNAT`] with
/// backends on node 2; and the node address to translate to.
fn add_nodeports(datapath: &mut Datapath) -> Result<()> {
    datapath.add_service_with(&measured_service(), 0, BACKEND_F_LOCAL)?;
    datapath.set_service(
        &NODEPORT,
        proto::TCP,
        &ServiceValue {
            id: SERVICE_ID,
            backend_count: BACKENDS.len() as u32,
            flags: SERVICE_F_EXTERNAL,
            ..ServiceValue::default()
        },
    )?;
    let snat = ServiceSpec {
        id: SNAT_SERVICE_ID,
        frontend: NODEPORT_SNAT,
        proto: proto::TCP,
        backends: snat_backends()
            .iter()
            .enumerate()
            .map(|(i, addr)| BackendSpec {
                id: SNAT_BACKEND_BASE_ID + i as u32,
                addr: *addr,
                ready: true,
            })
            .collect(),
    };
    datapath.add_service_with(&snat, SERVICE_F_EXTERNAL, 0)?;
    datapath.set_config(&DatapathConfig {
        snat_addr: u32::from_ne_bytes(NODE_ADDR.octets()),
        ..DatapathConfig::DEFAULT
    })?;
    Ok(())
}

/// The backends the measured flows went to (their packets' outputs).
#[derive(Clone, Copy, Debug)]
struct Established {
    /// Of the TC flow and of the local-backend XDP flow.
    tc: SocketAddrV4,
    xdp: SocketAddrV4,
    /// Of the SNAT XDP flow, and its translated source port.
    snat: SocketAddrV4,
    nat_port: u16,
}

fn check_open(what: &str, verdict: u32, expected: u32) -> Result<()> {
    if verdict != expected {
        return Err(BenchError::check(
            what,
            format!("verdict {verdict:#x}, expected {expected:#x}"),
        ));
    }
    Ok(())
}

/// Opens the established flows (TC, XDP to a local backend, XDP with SNAT)
/// and returns where they went. Runs in the [`FibNet`] namespace.
fn open_flows(datapath: &mut Datapath, ext_ifindex: u32) -> Result<Established> {
    let syn = Frame::tcp(CLIENT, FRONTEND, TCP_SYN);
    let output = datapath.run(&syn.to_bytes())?;
    check_open("opening the measured TC flow", output.verdict, TC_ACT_OK)?;
    let tc = BACKENDS
        .iter()
        .copied()
        .find(|backend| output.frame == syn.clone().with_dst(*backend).to_bytes())
        .ok_or_else(|| BenchError::check("opening the measured flow", "no backend got the SYN"))?;

    let syn = Frame::tcp(XDP_CLIENT, NODEPORT, TCP_SYN);
    let output = datapath.run_on(Program::XdpExternal, &syn.to_bytes(), Some(ext_ifindex))?;
    check_open("opening the measured XDP flow", output.verdict, XDP_PASS)?;
    let xdp = BACKENDS
        .iter()
        .copied()
        .find(|backend| output.frame == syn.clone().with_dst(*backend).to_bytes())
        .ok_or_else(|| {
            BenchError::check("opening the measured XDP flow", "no backend got the SYN")
        })?;

    let syn = Frame::tcp(XDP_CLIENT, NODEPORT_SNAT, TCP_SYN);
    let output = datapath.run_on(Program::XdpExternal, &syn.to_bytes(), Some(ext_ifindex))?;
    check_open("opening the measured SNAT flow", output.verdict, XDP_TX)?;
    let key = FlowKey {
        client_addr: be_addr(&XDP_CLIENT),
        client_port: be_port(&XDP_CLIENT),
        proto: proto::TCP,
        _pad: 0,
        service_id: SNAT_SERVICE_ID,
    };
    let flow = datapath
        .flow(&key)?
        .ok_or_else(|| BenchError::check("opening the measured SNAT flow", "no conntrack entry"))?;
    let snat = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(flow.backend_addr)),
        u16::from_be(flow.backend_port),
    );
    let nat_port = u16::from_be(flow.nat_port);
    if output.frame != snat_output(&syn, snat, nat_port).to_bytes() {
        return Err(BenchError::check(
            "opening the measured SNAT flow",
            format!(
                "SYN left as {}",
                crate::packet::frame::describe(&output.frame)
            ),
        ));
    }
    Ok(Established {
        tc,
        xdp,
        snat,
        nat_port,
    })
}

/// A client frame to [`NODEPORT_SNAT`] as `lb_xdp_ext` sends it on.
fn snat_output(frame: &Frame, backend: SocketAddrV4, nat_port: u16) -> Frame {
    frame
        .clone()
        .with_dst(backend)
        .with_src(SocketAddrV4::new(NODE_ADDR, nat_port))
        .with_macs(NODE_MAC, NODE2_MAC)
}

fn case(path: HotPath, flows: &Established, base: Ipv4Addr, ext_ifindex: u32) -> BenchCase {
    let data = Frame::tcp(CLIENT, FRONTEND, TCP_ACK).with_payload(&PAYLOAD);
    let xdp_data = Frame::tcp(XDP_CLIENT, NODEPORT, TCP_ACK).with_payload(&PAYLOAD);
    let snat_data = Frame::tcp(XDP_CLIENT, NODEPORT_SNAT, TCP_ACK).with_payload(&PAYLOAD);
    let other = Frame::tcp(CLIENT, NO_SERVICE, TCP_ACK)
        .with_payload(&PAYLOAD)
        .to_bytes();
    let syn_from = |port: u16, frontend: SocketAddrV4| {
        Frame::tcp(SocketAddrV4::new(base, port), frontend, TCP_SYN).to_bytes()
    };
    let program = path.program();
    let ifindex = program.is_xdp().then_some(ext_ifindex);
    let (frame, step_source, verdict, counters, output) = match path {
        HotPath::Established => (
            data.to_bytes(),
            false,
            TC_ACT_OK,
            vec![Counter::Established],
            Some(data.with_dst(flows.tc).to_bytes()),
        ),
        // Which backend the last run chose is random.
        HotPath::NewFlow => (
            syn_from(NEW_FLOW_PORT, FRONTEND),
            true,
            TC_ACT_OK,
            vec![Counter::NewFlow],
            None,
        ),
        HotPath::Reply => {
            let reply = Frame::tcp(flows.tc, CLIENT, TCP_ACK).with_payload(&PAYLOAD);
            (
                reply.to_bytes(),
                false,
                TC_ACT_OK,
                vec![Counter::Reply],
                Some(reply.with_src(FRONTEND).to_bytes()),
            )
        }
        HotPath::NoService => (
            other.clone(),
            false,
            TC_ACT_OK,
            vec![Counter::Pass],
            Some(other),
        ),
        HotPath::XdpEstablished => (
            xdp_data.to_bytes(),
            false,
            XDP_PASS,
            vec![Counter::Established],
            Some(xdp_data.with_dst(flows.xdp).to_bytes()),
        ),
        HotPath::XdpNewFlow => (
            syn_from(XDP_NEW_FLOW_PORT, NODEPORT),
            true,
            XDP_PASS,
            vec![Counter::NewFlow],
            None,
        ),
        HotPath::XdpNoService => (
            other.clone(),
            false,
            XDP_PASS,
            vec![Counter::Pass],
            Some(other),
        ),
        HotPath::XdpEstablishedSnat => (
            snat_data.to_bytes(),
            false,
            XDP_TX,
            vec![Counter::Established, Counter::Forwarded],
            Some(snat_output(&snat_data, flows.snat, flows.nat_port).to_bytes()),
        ),
        HotPath::XdpNewFlowSnat => (
            syn_from(XDP_SNAT_NEW_FLOW_PORT, NODEPORT_SNAT),
            true,
            XDP_TX,
            vec![Counter::NewFlow, Counter::Forwarded],
            None,
        ),
    };
    BenchCase {
        name: path.label().to_owned(),
        program,
        ifindex,
        frame,
        step_source_l4_csum_off: step_source.then_some(TCP_CSUM_OFF),
        expected_verdict: verdict,
        expected_counters: counters,
        expected_output: output,
    }
}

/// Measures every hot path round by round (each round one `measure` call
/// of `runs` runs per path, the paths in turn), so the spread over rounds
/// is known and a burst of noise lands on every path alike.
fn measure_paths(
    bench: &mut Bench,
    flows: &Established,
    ext_ifindex: u32,
    runs: u32,
    rounds: u32,
) -> Result<Vec<(HotPath, Summary)>> {
    let mut per_round: Vec<Vec<f64>> = HotPath::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        let base = new_flow_base(round, runs);
        for (path, figures) in HotPath::ALL.into_iter().zip(&mut per_round) {
            let result = bench.measure(&case(path, flows, base, ext_ifindex), runs, 1)?;
            if let Some((port, service_id)) = path.new_flows() {
                remove_new_flows(bench.datapath(), base, runs, port, service_id)?;
            }
            figures.push(result.ns_per_packet as f64);
        }
    }
    Ok(HotPath::ALL
        .into_iter()
        .zip(per_round)
        .map(|(path, figures)| (path, Summary::of(&figures).expect("at least one round")))
        .collect())
}

/// Runs the program-cost grid of `plan`; `progress` hears what is being
/// done (filling a million flows takes a while).
pub fn measure(plan: &Plan, progress: &mut dyn FnMut(String)) -> Result<ProgResults> {
    let runs = plan.prog_runs;
    let rounds = plan.prog_rounds;
    assert!(
        16 + rounds * 2 * runs < 1 << 16,
        "new-flow clients must stay in 198.18.0.0/16 (the filler flows use 198.19.0.0/16)"
    );
    let max_services = plan.prog_services.iter().copied().max().unwrap_or(1);
    let max_flows = plan.prog_flows.iter().copied().max().unwrap_or(0);
    let capacities = Capacities {
        services: max_services + 16,
        slots: max_services + 64,
        backends: max_services + FILLER_BACKEND_BASE + 16,
        // Room for the new flows of a round on top (three new-flow paths),
        // so nothing is evicted.
        flows: max_flows + max_flows / 4 + 8 * runs + 1024,
    };
    let mut services_levels = plan.prog_services.clone();
    services_levels.sort_unstable();
    let mut flows_levels = plan.prog_flows.clone();
    flows_levels.sort_unstable();

    let mut rows = Vec::new();
    let fib = FibNet::create()?;
    let ext_ifindex = fib.ext_ifindex();
    // One freshly loaded datapath per conntrack level; services only grow
    // within it.
    for &flows in &flows_levels {
        let mut datapath =
            Datapath::load_programs(&capacities, &[Program::TcPod, Program::XdpExternal])?;
        add_nodeports(&mut datapath)?;
        progress(format!("program cost: writing {flows} flows"));
        add_filler_flows(&mut datapath, 0, flows)?;
        let established = fib.run(|| open_flows(&mut datapath, ext_ifindex))??;
        let mut bench = Bench::load(datapath)?;
        let mut services_now = 1;
        for &services in &services_levels {
            add_filler_services(bench.datapath(), services_now - 1, services - 1)?;
            services_now = services;
            progress(format!("program cost: {services} services, {flows} flows"));
            let measured =
                fib.run(|| measure_paths(&mut bench, &established, ext_ifindex, runs, rounds))??;
            for (path, ns) in measured {
                rows.push(ProgRow {
                    path,
                    services,
                    flows,
                    ns,
                });
            }
        }
    }
    let calibration = calibrate(runs, rounds)?;
    Ok(ProgResults {
        runs,
        rounds,
        rows,
        calibration,
    })
}

const PROG_BENCH_RUN: &str = "lb_bench_run";
const PROG_BENCH_EMPTY: &str = "lb_bench_empty";
const PROG_BENCH_LOOKUP: &str = "lb_bench_lookup";
const PROG_BENCH_XDP_RUN: &str = "lb_bench_xdp_run";
const PROG_BENCH_XDP_EMPTY: &str = "lb_bench_xdp_empty";
const MAP_BENCH_XDP_TARGET: &str = "LB_BENCH_XDP_TARGET";
const MAP_BENCH_INPUT: &str = "LB_BENCH_INPUT";
const MAP_BENCH_TARGET: &str = "LB_BENCH_TARGET";
const MAP_BENCH_LOOKUP: &str = "LB_BENCH_LOOKUP";
/// The key `lb_bench_lookup` looks up (see lb-ebpf/src/bin/lb-bench.rs).
const LOOKUP_FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 254), 80);
/// `LB_BENCH_INPUT`'s length field sits first; the frame starts at 16.
const INPUT_HEADER: usize = 16;
const INPUT_SIZE: usize = INPUT_HEADER + crate::packet::bench::MAX_BENCH_FRAME;

/// `LB_BENCH_INPUT`'s value as bytes (layout in lb-bench.rs: len,
/// step_source, l4_csum_off, pad, data).
#[repr(C)]
#[derive(Clone, Copy)]
struct InputBytes([u8; INPUT_SIZE]);

// SAFETY: a plain byte array, valid for any bit pattern.
unsafe impl aya::Pod for InputBytes {}

/// The loaded program `name` as its type `P` (`SchedClassifier`, `Xdp`).
fn loaded<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(PacketError::MissingProgram { name })?
        .try_into()
        .map_err(|source| PacketError::ProgramType { name, source }.into())
}

/// One test run of `name` (of type `P`) with `repeat`: (ns per run, verdict).
fn test_run<P>(ebpf: &mut Ebpf, name: &'static str, frame: &[u8], repeat: u32) -> Result<(f64, u32)>
where
    P: for<'o> TestRun<Opts<'o> = TestRunOptions<'o>, Result = aya::TestRunResult>,
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let mut out = vec![0u8; 4096];
    let result = loaded::<P>(ebpf, name)?
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .map_err(|source| PacketError::TestRun { name, source })?;
    Ok((result.duration.as_nanos() as f64, result.return_value))
}

/// Puts the program `name` into slot 0 of the wrapper's program array
/// `slots` (the TC or the XDP one).
fn set_target(ebpf: &mut Ebpf, slots: &'static str, name: &'static str) -> Result<()> {
    let fd = ebpf
        .program(name)
        .ok_or(PacketError::MissingProgram { name })?
        .fd()
        .map_err(|source| PacketError::LoadProgram { name, source })?
        .try_clone()
        .map_err(|error| BenchError::io("duplicating a program fd", error))?;
    let map = ebpf
        .map_mut(slots)
        .ok_or(PacketError::MissingMap { name: slots })?;
    let mut array = ProgramArray::try_from(map).map_err(map_error(slots, "open"))?;
    array.set(0, &fd, 0).map_err(map_error(slots, "set"))
}

fn map_error(
    name: &'static str,
    operation: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> BenchError {
    move |source| {
        PacketError::Map {
            name,
            operation,
            source,
        }
        .into()
    }
}

/// Calibration rows: the test-run loop with an empty program, the replay
/// wrapper's own cost (TC and XDP), and one hash lookup (a frontend-shaped
/// key in a hash map), each the difference of two runs in the same round.
pub fn calibrate(runs: u32, rounds: u32) -> Result<Vec<CalibrationRow>> {
    let mut ebpf = EbpfLoader::new()
        .load(lb_agent::EBPF_BENCH_OBJECT)
        .map_err(PacketError::LoadObject)?;
    for name in [PROG_BENCH_RUN, PROG_BENCH_EMPTY, PROG_BENCH_LOOKUP] {
        loaded::<SchedClassifier>(&mut ebpf, name)?
            .load()
            .map_err(|source| PacketError::LoadProgram { name, source })?;
    }
    for name in [PROG_BENCH_XDP_RUN, PROG_BENCH_XDP_EMPTY] {
        loaded::<Xdp>(&mut ebpf, name)?
            .load()
            .map_err(|source| PacketError::LoadProgram { name, source })?;
    }
    set_target(&mut ebpf, MAP_BENCH_XDP_TARGET, PROG_BENCH_XDP_EMPTY)?;
    let frame = Frame::tcp(CLIENT, NO_SERVICE, TCP_ACK)
        .with_payload(&PAYLOAD)
        .to_bytes();
    let mut input = [0u8; INPUT_SIZE];
    input[..4].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    input[INPUT_HEADER..INPUT_HEADER + frame.len()].copy_from_slice(&frame);
    {
        let map = ebpf
            .map_mut(MAP_BENCH_INPUT)
            .ok_or(PacketError::MissingMap {
                name: MAP_BENCH_INPUT,
            })?;
        let mut array: Array<_, InputBytes> =
            Array::try_from(map).map_err(map_error(MAP_BENCH_INPUT, "open"))?;
        array
            .set(0, &InputBytes(input), 0)
            .map_err(map_error(MAP_BENCH_INPUT, "set"))?;
    }
    {
        let map = ebpf
            .map_mut(MAP_BENCH_LOOKUP)
            .ok_or(PacketError::MissingMap {
                name: MAP_BENCH_LOOKUP,
            })?;
        let mut lookup: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(map).map_err(map_error(MAP_BENCH_LOOKUP, "open"))?;
        let key = ServiceKey::new(
            be_addr(&LOOKUP_FRONTEND),
            be_port(&LOOKUP_FRONTEND),
            proto::TCP,
        );
        let value = ServiceValue {
            id: 1,
            backend_count: 1,
            ..ServiceValue::default()
        };
        lookup
            .insert(&key, &value, 0)
            .map_err(map_error(MAP_BENCH_LOOKUP, "insert"))?;
    }

    let mut empty = Vec::new();
    let mut wrapper = Vec::new();
    let mut lookup = Vec::new();
    let mut xdp_empty = Vec::new();
    let mut xdp_wrapper = Vec::new();
    for _ in 0..rounds {
        let (bare, verdict) =
            test_run::<SchedClassifier>(&mut ebpf, PROG_BENCH_EMPTY, &frame, runs)?;
        expect_verdict("empty program", verdict, TC_ACT_OK)?;
        set_target(&mut ebpf, MAP_BENCH_TARGET, PROG_BENCH_EMPTY)?;
        let (wrapped, verdict) =
            test_run::<SchedClassifier>(&mut ebpf, PROG_BENCH_RUN, &frame, runs)?;
        expect_verdict("wrapper with the empty program", verdict, TC_ACT_OK)?;
        set_target(&mut ebpf, MAP_BENCH_TARGET, PROG_BENCH_LOOKUP)?;
        // A miss would return TC_ACT_SHOT: the verdict proves the lookup
        // found its key in every run (the last run's verdict, and every run
        // takes the same path on the same restored input).
        let (looked_up, verdict) =
            test_run::<SchedClassifier>(&mut ebpf, PROG_BENCH_RUN, &frame, runs)?;
        expect_verdict("wrapper with one hash lookup", verdict, TC_ACT_OK)?;
        empty.push(bare);
        wrapper.push(wrapped - bare);
        lookup.push(looked_up - wrapped);
        let (bare, verdict) = test_run::<Xdp>(&mut ebpf, PROG_BENCH_XDP_EMPTY, &frame, runs)?;
        expect_verdict("empty XDP program", verdict, XDP_PASS)?;
        let (wrapped, verdict) = test_run::<Xdp>(&mut ebpf, PROG_BENCH_XDP_RUN, &frame, runs)?;
        expect_verdict("XDP wrapper with the empty program", verdict, XDP_PASS)?;
        xdp_empty.push(bare);
        xdp_wrapper.push(wrapped - bare);
    }
    let summary = |values: &[f64]| Summary::of(values).expect("at least one round");
    Ok(vec![
        CalibrationRow {
            label: "TC: empty program (test-run loop)",
            ns: summary(&empty),
        },
        CalibrationRow {
            label: "TC: replay wrapper + tail call",
            ns: summary(&wrapper),
        },
        CalibrationRow {
            label: "XDP: empty program (test-run loop)",
            ns: summary(&xdp_empty),
        },
        CalibrationRow {
            label: "XDP: replay wrapper + tail call",
            ns: summary(&xdp_wrapper),
        },
        CalibrationRow {
            label: "one hash lookup",
            ns: summary(&lookup),
        },
    ])
}

fn expect_verdict(what: &str, verdict: u32, expected: u32) -> Result<()> {
    if verdict == expected {
        Ok(())
    } else {
        Err(BenchError::check(
            what,
            format!("verdict {verdict:#x}, expected {expected:#x}"),
        ))
    }
}

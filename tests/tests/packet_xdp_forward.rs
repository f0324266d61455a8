//! `CONFIG_F_XDP_NO_TX` packet by packet with `BPF_PROG_TEST_RUN`: with
//! the flag in `LB_CONFIG`, `lb_xdp_ext` forwards nothing itself. A packet
//! it would send back out with XDP_TX (a NodePort flow to another node's
//! backend, and that backend's reply) is passed untouched, counted
//! `XdpToTc` (its flow created first), and `lb_tc_ext` translates and
//! redirects it. Packets that are not forwards (a NodePort to a local
//! backend) are translated at XDP as without the flag, and clearing the
//! flag brings XDP_TX back for the same packet.
//!
//! Runs on a thread inside the namespace of `lb_tests::packet::fib`, whose
//! routes and permanent neighbours make the FIB lookups deterministic.
//!
//! Privileged: needs root (BPF program load, network namespaces).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    backend::BACKEND_F_LOCAL,
    config::{CONFIG_F_XDP_NO_TX, DatapathConfig},
    conntrack::{FLOW_F_EXTERNAL, FLOW_F_SNAT, FlowKey},
    counters::Counter,
    proto,
    service::SERVICE_F_EXTERNAL,
};
use lb_tests::packet::{
    datapath::{
        BackendSpec, Datapath, Program, RunOutput, ServiceSpec, TC_ACT_REDIRECT, XDP_PASS, XDP_TX,
        be_addr, be_port,
    },
    fib::{CLIENT_ADDR, CLIENT_MAC, FibNet, LOCAL_POD, NODE_ADDR, NODE_MAC, NODE2_MAC, NODE2_PODS},
    frame::{Frame, TCP_ACK, TCP_SYN, describe},
};

const CLIENT: SocketAddrV4 = SocketAddrV4::new(CLIENT_ADDR, 40000);
const CLIENT_2: SocketAddrV4 = SocketAddrV4::new(CLIENT_ADDR, 40001);
const CLIENT_3: SocketAddrV4 = SocketAddrV4::new(CLIENT_ADDR, 40002);

/// A NodePort whose backend is on node 2 (routed via node 2, whose MAC is
/// known: a lookup without the flag succeeds out of the arrival interface).
/// Its backend lies in node 2's pod subnet.
const SVC_REMOTE: u32 = 1;
const NODEPORT_REMOTE: SocketAddrV4 = SocketAddrV4::new(NODE_ADDR, 30081);
const BACKEND_REMOTE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 64, 10), 8080);
/// A NodePort without endpoints: refused (RST, ICMP port unreachable).
const SVC_EMPTY: u32 = 3;
const NODEPORT_EMPTY: SocketAddrV4 = SocketAddrV4::new(NODE_ADDR, 30083);
/// A NodePort whose backend is a pod of this node: DNAT only, no forward.
const SVC_LOCAL: u32 = 2;
const NODEPORT_LOCAL: SocketAddrV4 = SocketAddrV4::new(NODE_ADDR, 30082);
const BACKEND_LOCAL: SocketAddrV4 = SocketAddrV4::new(LOCAL_POD, 8080);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "packet tests load BPF programs and need root");
}

fn config(flags: u32) -> DatapathConfig {
    DatapathConfig {
        flags,
        snat_addr: u32::from_ne_bytes(NODE_ADDR.octets()),
        ..DatapathConfig::DEFAULT
    }
}

/// Every program, both NodePorts, the node's SNAT address and `flags`.
fn load(flags: u32) -> Datapath {
    let mut datapath = Datapath::load_all().expect("load the datapath object");
    datapath
        .set_config(&config(flags))
        .expect("write LB_CONFIG");
    for (id, frontend, backend, backend_flags) in [
        (SVC_REMOTE, NODEPORT_REMOTE, BACKEND_REMOTE, 0),
        (SVC_LOCAL, NODEPORT_LOCAL, BACKEND_LOCAL, BACKEND_F_LOCAL),
    ] {
        let spec = ServiceSpec {
            id,
            frontend,
            proto: proto::TCP,
            backends: vec![BackendSpec {
                id,
                addr: backend,
                ready: true,
            }],
        };
        datapath
            .add_service_with(&spec, SERVICE_F_EXTERNAL, backend_flags)
            .expect("write a service");
    }
    datapath
}

fn flow_key(client: SocketAddrV4, service_id: u32) -> FlowKey {
    FlowKey {
        client_addr: be_addr(&client),
        client_port: be_port(&client),
        proto: proto::TCP,
        _pad: 0,
        service_id,
    }
}

/// A SYN from the external client to `frontend`, as it arrives on the
/// external interface.
fn syn(client: SocketAddrV4, frontend: SocketAddrV4) -> Frame {
    Frame::tcp(client, frontend, TCP_SYN).with_macs(CLIENT_MAC, NODE_MAC)
}

/// Runs `program` on `frame` arriving on the external interface; returns
/// the output and the counters that moved.
fn run(
    datapath: &Datapath,
    fib: &FibNet,
    program: Program,
    frame: &Frame,
) -> (RunOutput, BTreeMap<&'static str, u64>) {
    let before = datapath.counters().expect("read counters");
    let output = datapath
        .run_on(program, &frame.to_bytes(), Some(fib.ext_ifindex()))
        .unwrap_or_else(|error| panic!("{} test run: {error:?}", program.name()));
    let after = datapath.counters().expect("read counters");
    (output, after.since(&before))
}

fn counted(counters: &[(Counter, u64)]) -> BTreeMap<&'static str, u64> {
    counters.iter().map(|&(c, n)| (c.name(), n)).collect()
}

fn assert_frame(what: &str, output: &RunOutput, expected: &Frame) {
    assert_eq!(
        output.frame,
        expected.to_bytes(),
        "{what}:\n  got      {}\n  expected {}",
        describe(&output.frame),
        describe(&expected.to_bytes())
    );
}

/// The translated port of the SNAT flow of `client`, checked.
fn snat_flow_port(datapath: &mut Datapath, client: SocketAddrV4) -> u16 {
    let flow = datapath
        .flow(&flow_key(client, SVC_REMOTE))
        .expect("flow lookup")
        .unwrap_or_else(|| panic!("no flow for {client}"));
    assert_eq!(
        flow.flags & (FLOW_F_SNAT | FLOW_F_EXTERNAL),
        FLOW_F_SNAT | FLOW_F_EXTERNAL,
        "{flow:?}"
    );
    assert_eq!(
        (flow.backend_addr, flow.backend_port),
        (be_addr(&BACKEND_REMOTE), be_port(&BACKEND_REMOTE))
    );
    u16::from_be(flow.nat_port)
}

#[test]
fn without_xdp_tx_every_forward_goes_to_tc_untouched() {
    require_root();
    // In node 2's pod subnet (a /24), routed via node 2.
    assert_eq!(BACKEND_REMOTE.ip().octets()[..3], NODE2_PODS.octets()[..3]);
    let fib = FibNet::create().expect("create the test namespace");
    fib.run(|| {
        let mut datapath = load(CONFIG_F_XDP_NO_TX);

        // The SYN XDP would send to node 2 with XDP_TX: passed untouched,
        // its flow (and translated port) created.
        let first = syn(CLIENT, NODEPORT_REMOTE);
        let (output, moved) = run(&datapath, &fib, Program::XdpExternal, &first);
        assert_eq!(output.verdict, XDP_PASS, "{}", describe(&output.frame));
        assert_frame("SYN at XDP", &output, &first);
        assert_eq!(
            moved,
            counted(&[(Counter::NewFlow, 1), (Counter::XdpToTc, 1)])
        );
        let nat_port = snat_flow_port(&mut datapath, CLIENT);
        let translated = SocketAddrV4::new(NODE_ADDR, nat_port);

        // TC finds the flow, translates and redirects.
        let (output, moved) = run(&datapath, &fib, Program::TcExternal, &first);
        assert_eq!(
            output.verdict,
            TC_ACT_REDIRECT,
            "{}",
            describe(&output.frame)
        );
        assert_frame(
            "SYN at TC",
            &output,
            &first.clone().with_dst(BACKEND_REMOTE).with_src(translated),
        );
        assert_eq!(
            moved,
            counted(&[(Counter::Established, 1), (Counter::Forwarded, 1)])
        );

        // Node 2's answer to the translated port: XDP would translate it
        // back and XDP_TX it to the client; it too goes to TC untouched.
        let answer = Frame::tcp(BACKEND_REMOTE, translated, TCP_SYN | TCP_ACK)
            .with_tcp(TCP_SYN | TCP_ACK, 0x3000_0000, 1)
            .with_macs(NODE2_MAC, NODE_MAC);
        let (output, moved) = run(&datapath, &fib, Program::XdpExternal, &answer);
        assert_eq!(output.verdict, XDP_PASS, "{}", describe(&output.frame));
        assert_frame("answer at XDP", &output, &answer);
        assert_eq!(moved, counted(&[(Counter::XdpToTc, 1)]));
        let (output, moved) = run(&datapath, &fib, Program::TcExternal, &answer);
        assert_eq!(
            output.verdict,
            TC_ACT_REDIRECT,
            "{}",
            describe(&output.frame)
        );
        assert_frame(
            "answer at TC",
            &output,
            &answer.clone().with_src(NODEPORT_REMOTE).with_dst(CLIENT),
        );
        assert_eq!(
            moved,
            counted(&[(Counter::Reply, 1), (Counter::Forwarded, 1)])
        );

        // Not a forward: a NodePort to a local backend is still translated
        // at XDP and passed to the stack.
        let local = syn(CLIENT_2, NODEPORT_LOCAL);
        let (output, moved) = run(&datapath, &fib, Program::XdpExternal, &local);
        assert_eq!(output.verdict, XDP_PASS, "{}", describe(&output.frame));
        assert_frame(
            "SYN to a local backend at XDP",
            &output,
            &local.clone().with_dst(BACKEND_LOCAL),
        );
        assert_eq!(moved, counted(&[(Counter::NewFlow, 1)]));

        // The flag is what kept XDP from transmitting: cleared, a new
        // client's SYN to the same NodePort leaves by XDP_TX toward node 2.
        datapath.set_config(&config(0)).expect("write LB_CONFIG");
        let other = syn(CLIENT_3, NODEPORT_REMOTE);
        let (output, moved) = run(&datapath, &fib, Program::XdpExternal, &other);
        assert_eq!(output.verdict, XDP_TX, "{}", describe(&output.frame));
        let nat_port = snat_flow_port(&mut datapath, CLIENT_3);
        assert_frame(
            "SYN at XDP without the flag",
            &output,
            &other
                .clone()
                .with_dst(BACKEND_REMOTE)
                .with_src(SocketAddrV4::new(NODE_ADDR, nat_port))
                .with_macs(NODE_MAC, NODE2_MAC),
        );
        assert_eq!(
            moved,
            counted(&[(Counter::NewFlow, 1), (Counter::Forwarded, 1)])
        );
    })
    .expect("run in the test namespace");
}

/// Refusals are answers sent back out of the arrival interface: with the
/// flag, XDP does not send them either but hands the request to TC, which
/// answers from there.
#[test]
fn without_xdp_tx_refusals_are_answered_by_tc() {
    require_root();
    let fib = FibNet::create().expect("create the test namespace");
    fib.run(|| {
        let mut datapath = load(CONFIG_F_XDP_NO_TX);
        datapath
            .add_service_with(
                &ServiceSpec {
                    id: SVC_EMPTY,
                    frontend: NODEPORT_EMPTY,
                    proto: proto::TCP,
                    backends: Vec::new(),
                },
                SERVICE_F_EXTERNAL,
                0,
            )
            .expect("write a service without endpoints");
        let request = syn(CLIENT, NODEPORT_EMPTY);
        let (output, moved) = run(&datapath, &fib, Program::XdpExternal, &request);
        assert_eq!(output.verdict, XDP_PASS, "{}", describe(&output.frame));
        assert_frame("SYN at XDP", &output, &request);
        assert_eq!(moved, counted(&[(Counter::XdpToTc, 1)]));

        let (output, moved) = run(&datapath, &fib, Program::TcExternal, &request);
        assert_eq!(
            output.verdict,
            TC_ACT_REDIRECT,
            "{}",
            describe(&output.frame)
        );
        assert_frame("RST from TC", &output, &request.expected_reset());
        assert_eq!(moved, counted(&[(Counter::NoBackend, 1)]));

        // Without the flag, XDP answers itself.
        datapath.set_config(&config(0)).expect("write LB_CONFIG");
        let (output, moved) = run(&datapath, &fib, Program::XdpExternal, &request);
        assert_eq!(output.verdict, XDP_TX, "{}", describe(&output.frame));
        assert_frame("RST from XDP", &output, &request.expected_reset());
        assert_eq!(moved, counted(&[(Counter::NoBackend, 1)]));
    })
    .expect("run in the test namespace");
}

//! Pods reaching the external frontends of a Service whose traffic
//! policies differ (`SERVICE_F_INTERNAL_VIEW`), packet by packet with
//! `BPF_PROG_TEST_RUN`.
//!
//! The Service has `externalTrafficPolicy: Local` and its only endpoint is
//! on node 2, so its NodePort's own id (the external view) has no backend
//! on this node and drops. A client from outside is dropped at XDP; a pod
//! of this node reaching the same NodePort is balanced with the ClusterIP's
//! entry (every endpoint), as kube-proxy does, and the backend's reply
//! comes back from the NodePort address.
//!
//! Runs on a thread inside the namespace of `lb_tests::packet::fib`, whose
//! routes and permanent neighbours make the FIB lookups deterministic.
//!
//! Privileged: needs root (BPF program load, network namespaces).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    config::DatapathConfig,
    conntrack::{FLOW_F_EXTERNAL, FLOW_F_SNAT, FlowKey},
    counters::Counter,
    proto,
    service::{SERVICE_F_DROP, SERVICE_F_EXTERNAL, SERVICE_F_INTERNAL_VIEW, ServiceValue},
};
use lb_tests::packet::{
    datapath::{
        BackendSpec, Datapath, Program, RunOutput, ServiceSpec, TC_ACT_OK, TC_ACT_REDIRECT,
        TC_ACT_SHOT, XDP_DROP, XDP_PASS, be_addr, be_port,
    },
    fib::{CLIENT_ADDR, CLIENT_MAC, FibNet, LOCAL_POD, NODE_ADDR, NODE_MAC, NODE2_MAC},
    frame::{Frame, TCP_ACK, TCP_SYN, describe},
};

/// The internal view: the ClusterIP's id, every endpoint.
const SVC_INTERNAL: u32 = 1;
const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 80);
/// The external view: the NodePort's id, this node's endpoints (none).
const SVC_EXTERNAL: u32 = 2;
const NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_ADDR, 30090);
/// The only endpoint, a pod on node 2 (routed via node 2).
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 64, 10), 8080);
const BACKEND_ID: u32 = 1;
const POD_CLIENT: SocketAddrV4 = SocketAddrV4::new(LOCAL_POD, 40000);
const EXTERNAL_CLIENT: SocketAddrV4 = SocketAddrV4::new(CLIENT_ADDR, 40000);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "packet tests load BPF programs and need root");
}

/// Both views as the agent writes them: the NodePort's entry (no ready
/// backend, drop) names the ClusterIP's with `SERVICE_F_INTERNAL_VIEW`
/// when `internal_view`.
fn load(internal_view: bool) -> Datapath {
    let mut datapath = Datapath::load_all().expect("load the datapath object");
    datapath
        .set_config(&DatapathConfig {
            snat_addr: u32::from_ne_bytes(NODE_ADDR.octets()),
            ..DatapathConfig::DEFAULT
        })
        .expect("write LB_CONFIG");
    let spec = |id, frontend, ready| ServiceSpec {
        id,
        frontend,
        proto: proto::TCP,
        backends: vec![BackendSpec {
            id: BACKEND_ID,
            addr: BACKEND,
            ready,
        }],
    };
    // The external view first: it lists the endpoint but not as ready
    // (not on this node); the internal one then writes it ready.
    datapath
        .add_service_with(
            &spec(SVC_EXTERNAL, NODE_PORT, false),
            SERVICE_F_EXTERNAL | SERVICE_F_DROP,
            0,
        )
        .expect("write the external view");
    datapath
        .add_service(&spec(SVC_INTERNAL, CLUSTER_IP, true))
        .expect("write the internal view");
    if internal_view {
        datapath
            .set_service(
                &NODE_PORT,
                proto::TCP,
                &ServiceValue {
                    id: SVC_EXTERNAL,
                    backend_count: 0,
                    flags: SERVICE_F_EXTERNAL | SERVICE_F_DROP | SERVICE_F_INTERNAL_VIEW,
                    internal_addr: be_addr(&CLUSTER_IP),
                    internal_port: be_port(&CLUSTER_IP),
                    ..ServiceValue::default()
                },
            )
            .expect("point the NodePort at the ClusterIP");
    }
    datapath
}

fn run(
    datapath: &Datapath,
    program: Program,
    frame: &Frame,
    ifindex: u32,
) -> (RunOutput, BTreeMap<&'static str, u64>) {
    let before = datapath.counters().expect("read counters");
    let output = datapath
        .run_on(program, &frame.to_bytes(), Some(ifindex))
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

fn flow_key(client: SocketAddrV4, service_id: u32) -> FlowKey {
    FlowKey {
        client_addr: be_addr(&client),
        client_port: be_port(&client),
        proto: proto::TCP,
        _pad: 0,
        service_id,
    }
}

#[test]
fn pods_reach_external_frontends_of_a_local_service_through_the_internal_view() {
    require_root();
    let fib = FibNet::create().expect("create the test namespace");
    fib.run(|| {
        let mut datapath = load(true);

        // From outside: the external view, no local endpoint, dropped.
        let external_syn =
            Frame::tcp(EXTERNAL_CLIENT, NODE_PORT, TCP_SYN).with_macs(CLIENT_MAC, NODE_MAC);
        let (output, moved) = run(
            &datapath,
            Program::XdpExternal,
            &external_syn,
            fib.ext_ifindex(),
        );
        assert_eq!(output.verdict, XDP_DROP, "{}", describe(&output.frame));
        assert_eq!(moved, counted(&[(Counter::NoBackend, 1)]));

        // From a pod: the ClusterIP's view, DNAT to node 2's pod (the pod's
        // own address is routable: no source translation).
        let pod_syn = Frame::tcp(POD_CLIENT, NODE_PORT, TCP_SYN);
        let (output, moved) = run(&datapath, Program::TcPod, &pod_syn, fib.pod_ifindex());
        assert_eq!(output.verdict, TC_ACT_OK, "{}", describe(&output.frame));
        assert_frame("pod SYN", &output, &pod_syn.clone().with_dst(BACKEND));
        assert_eq!(moved, counted(&[(Counter::NewFlow, 1)]));
        let flow = datapath
            .flow(&flow_key(POD_CLIENT, SVC_INTERNAL))
            .expect("flow lookup")
            .expect("the flow is the internal id's");
        assert_eq!(
            flow.flags & (FLOW_F_EXTERNAL | FLOW_F_SNAT),
            FLOW_F_EXTERNAL
        );
        assert_eq!(
            (flow.frontend_addr, flow.frontend_port),
            (be_addr(&NODE_PORT), be_port(&NODE_PORT))
        );
        assert_eq!(
            datapath
                .flow(&flow_key(POD_CLIENT, SVC_EXTERNAL))
                .expect("flow lookup"),
            None
        );

        // Node 2's answer arrives on the external interface. Its new source
        // is a node address, so it is forwarded by FIB, not passed: XDP
        // hands it on (the pod is behind another interface) ...
        let answer = Frame::tcp(BACKEND, POD_CLIENT, TCP_SYN | TCP_ACK)
            .with_tcp(TCP_SYN | TCP_ACK, 0x3000_0000, 1)
            .with_macs(NODE2_MAC, NODE_MAC);
        let (output, moved) = run(&datapath, Program::XdpExternal, &answer, fib.ext_ifindex());
        assert_eq!(output.verdict, XDP_PASS, "{}", describe(&output.frame));
        assert_frame("answer at XDP", &output, &answer);
        assert_eq!(moved, counted(&[(Counter::XdpToTc, 1)]));
        // ... and TC sends it to the pod from the NodePort it used.
        let (output, moved) = run(&datapath, Program::TcExternal, &answer, fib.ext_ifindex());
        assert_eq!(
            output.verdict,
            TC_ACT_REDIRECT,
            "{}",
            describe(&output.frame)
        );
        let translated = answer.clone().with_src(NODE_PORT);
        assert_eq!(
            output.frame[14..],
            translated.to_bytes()[14..],
            "answer at TC:\n  got      {}\n  expected {}",
            describe(&output.frame),
            describe(&translated.to_bytes())
        );
        assert_eq!(
            moved,
            counted(&[(Counter::Reply, 1), (Counter::Forwarded, 1)])
        );

        // The pod's next packet follows its flow.
        let ack = Frame::tcp(POD_CLIENT, NODE_PORT, TCP_ACK).with_tcp(TCP_ACK, 1, 0x3000_0001);
        let (output, moved) = run(&datapath, Program::TcPod, &ack, fib.pod_ifindex());
        assert_eq!(output.verdict, TC_ACT_OK, "{}", describe(&output.frame));
        assert_frame("pod ACK", &output, &ack.clone().with_dst(BACKEND));
        assert_eq!(moved, counted(&[(Counter::Established, 1)]));
    })
    .expect("run in the test namespace");
}

#[test]
fn without_the_internal_view_pods_get_the_external_one() {
    require_root();
    let fib = FibNet::create().expect("create the test namespace");
    fib.run(|| {
        let datapath = load(false);
        let pod_syn = Frame::tcp(POD_CLIENT, NODE_PORT, TCP_SYN);
        let (output, moved) = run(&datapath, Program::TcPod, &pod_syn, fib.pod_ifindex());
        assert_eq!(output.verdict, TC_ACT_SHOT, "{}", describe(&output.frame));
        assert_eq!(moved, counted(&[(Counter::NoBackend, 1)]));
    })
    .expect("run in the test namespace");
}

//! The external path packet by packet with `BPF_PROG_TEST_RUN`: `lb_xdp_ext`
//! (XDP on the node's external interface), `lb_tc_ext` (what XDP hands on)
//! and the parts of `lb_tc_pod` that serve external flows and hairpins.
//!
//! Table-driven like `packet_tc`: each scenario writes services into the
//! maps the way the agent does, then runs steps; a packet step names the
//! program, the interface the frame arrives on, the input frame, the
//! expected verdict, the expected output frame and the exact counter
//! increments. Expected frames are built independently by
//! `lb_tests::packet::frame` with every checksum computed from scratch.
//!
//! Forwarding decisions come from `bpf_fib_lookup`, which reads the routes
//! and neighbours of the namespace the test run is made in: every scenario
//! runs on a thread inside a namespace of its own (`lb_tests::packet::fib`)
//! with permanent neighbours, so the MACs an XDP_TX packet leaves with are
//! known in advance. A translated source port is chosen at random: a step
//! reads it from `LB_CONNTRACK` (and checks `LB_SNAT` and the port range),
//! and later frames are built with it.
//!
//! Privileged: needs root (BPF program load, network namespaces) and a 6.x
//! kernel.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    config::DatapathConfig,
    conntrack::{FLOW_F_EXTERNAL, FLOW_F_HAIRPIN, FLOW_F_SNAT, FlowKey},
    counters::Counter,
    nat::SnatKey,
    proto,
    service::{SERVICE_F_DROP, SERVICE_F_EXTERNAL, SERVICE_F_SOURCE_RANGES, ServiceValue},
    stats::DropReason,
};
use lb_tests::packet::{
    datapath::{
        BackendSpec, Datapath, Program, ServiceSpec, SourceRangeSpec, TC_ACT_OK, TC_ACT_REDIRECT,
        XDP_DROP, XDP_PASS, XDP_TX, be_addr, be_port,
    },
    fib::{
        CLIENT_ADDR, CLIENT_MAC, CLIENT2_ADDR, CLIENT2_MAC, FibNet, LOCAL_POD, NODE_ADDR, NODE_MAC,
        NODE2_MAC,
    },
    frame::{Frame, HOST_MAC, POD_MAC, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN, describe, hexdump},
};

const CLIENT_PORT: u16 = 40000;
const CLIENT: SocketAddrV4 = SocketAddrV4::new(CLIENT_ADDR, CLIENT_PORT);
const CLIENT2: SocketAddrV4 = SocketAddrV4::new(CLIENT2_ADDR, 40001);
/// The local pod as a client (of its own Service, of a NodePort).
const POD_CLIENT: SocketAddrV4 = SocketAddrV4::new(LOCAL_POD, 41000);
/// Hairpin source address (the default of `DatapathConfig`).
const HAIRPIN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

const fn node(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE_ADDR, port)
}

const fn pod(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(LOCAL_POD, port)
}

// Service ids, frontends and backends. Every service has its own backend
// (address, port, protocol), so backend ids never collide.
/// NodePort to a backend on this node (and its ClusterIP, same id).
const SVC_LOCAL: u32 = 1;
const NODEPORT_LOCAL: SocketAddrV4 = node(30080);
const CLUSTER_IP_LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
const BACKEND_LOCAL: SocketAddrV4 = pod(8080);
/// NodePort (TCP) to a backend on node 2 (ETP Cluster: SNAT).
const SVC_REMOTE: u32 = 2;
const NODEPORT_REMOTE: SocketAddrV4 = node(30081);
const BACKEND_REMOTE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 64, 10), 8080);
/// NodePort (UDP) to a backend on node 2.
const SVC_REMOTE_UDP: u32 = 3;
const NODEPORT_REMOTE_UDP: SocketAddrV4 = node(30053);
const BACKEND_REMOTE_UDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 64, 11), 5353);
/// NodePort to a backend on node 3, whose MAC is not known.
const SVC_NO_NEIGH: u32 = 4;
const NODEPORT_NO_NEIGH: SocketAddrV4 = node(30082);
const BACKEND_NO_NEIGH: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 96, 10), 8080);
/// Load-balancer ingress IP with `loadBalancerSourceRanges`.
const SVC_LB: u32 = 5;
const LB_INGRESS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 253, 10), 80);
const BACKEND_LB: SocketAddrV4 = pod(8081);
/// The allowed range: 198.18.254.96/27 holds CLIENT (.101), not CLIENT2 (.150).
const ALLOWED_RANGE: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 96);
const ALLOWED_PREFIX: u8 = 27;
/// An external IP.
const SVC_EXTERNAL_IP: u32 = 6;
const EXTERNAL_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 253, 20), 80);
const BACKEND_EXTERNAL_IP: SocketAddrV4 = pod(8082);
/// ETP Local without a local endpoint: the agent writes no slot and
/// SERVICE_F_DROP.
const SVC_LOCAL_NONE: u32 = 7;
const NODEPORT_LOCAL_NONE: SocketAddrV4 = node(30090);
/// No ready backend at all: new connections refused (TCP and UDP).
const SVC_EMPTY_TCP: u32 = 8;
const SVC_EMPTY_UDP: u32 = 9;
const NODEPORT_EMPTY: SocketAddrV4 = node(30091);
/// A ClusterIP whose backend is the local pod (hairpin).
const SVC_HAIRPIN: u32 = 10;
const CLUSTER_IP_HAIRPIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 30), 80);
const BACKEND_HAIRPIN: SocketAddrV4 = pod(8083);
/// NodePort (UDP) to a local backend.
const SVC_LOCAL_UDP: u32 = 11;
const NODEPORT_LOCAL_UDP: SocketAddrV4 = node(30054);
const BACKEND_LOCAL_UDP: SocketAddrV4 = pod(5354);
/// NodePort to a backend behind another interface of the node.
const SVC_OTHER_IFACE: u32 = 12;
const NODEPORT_OTHER_IFACE: SocketAddrV4 = node(30083);
const BACKEND_OTHER_IFACE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 128, 10), 8080);
/// A ClusterIP whose backend is on node 2 (a pod here reaching it).
const SVC_CLUSTER_REMOTE: u32 = 14;
const CLUSTER_IP_REMOTE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 40), 80);
const BACKEND_CLUSTER_REMOTE: SocketAddrV4 =
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 64, 20), 8080);
/// NodePort to a backend behind a blackhole route.
const SVC_BLACKHOLE: u32 = 13;
const NODEPORT_BLACKHOLE: SocketAddrV4 = node(30084);
const BACKEND_BLACKHOLE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 160, 10), 8080);

struct Service {
    spec: ServiceSpec,
    /// Further frontends of the same service id, with their flags.
    more_frontends: Vec<(SocketAddrV4, u16)>,
    flags: u16,
    local: bool,
}

fn service(
    id: u32,
    frontend: SocketAddrV4,
    proto: u8,
    backend: Option<SocketAddrV4>,
    flags: u16,
    local: bool,
) -> Service {
    Service {
        spec: ServiceSpec {
            id,
            frontend,
            proto,
            backends: backend
                .into_iter()
                .map(|addr| BackendSpec {
                    id,
                    addr,
                    ready: true,
                })
                .collect(),
        },
        more_frontends: Vec::new(),
        flags,
        local,
    }
}

/// The services every scenario starts with.
fn cluster() -> Vec<Service> {
    const EXT: u16 = SERVICE_F_EXTERNAL;
    let mut local = service(
        SVC_LOCAL,
        NODEPORT_LOCAL,
        proto::TCP,
        Some(BACKEND_LOCAL),
        EXT,
        true,
    );
    local.more_frontends.push((CLUSTER_IP_LOCAL, 0));
    vec![
        local,
        service(
            SVC_REMOTE,
            NODEPORT_REMOTE,
            proto::TCP,
            Some(BACKEND_REMOTE),
            EXT,
            false,
        ),
        service(
            SVC_REMOTE_UDP,
            NODEPORT_REMOTE_UDP,
            proto::UDP,
            Some(BACKEND_REMOTE_UDP),
            EXT,
            false,
        ),
        service(
            SVC_NO_NEIGH,
            NODEPORT_NO_NEIGH,
            proto::TCP,
            Some(BACKEND_NO_NEIGH),
            EXT,
            false,
        ),
        service(
            SVC_LB,
            LB_INGRESS,
            proto::TCP,
            Some(BACKEND_LB),
            EXT | SERVICE_F_SOURCE_RANGES,
            true,
        ),
        service(
            SVC_EXTERNAL_IP,
            EXTERNAL_IP,
            proto::TCP,
            Some(BACKEND_EXTERNAL_IP),
            EXT,
            true,
        ),
        service(
            SVC_LOCAL_NONE,
            NODEPORT_LOCAL_NONE,
            proto::TCP,
            None,
            EXT | SERVICE_F_DROP,
            true,
        ),
        service(SVC_EMPTY_TCP, NODEPORT_EMPTY, proto::TCP, None, EXT, true),
        service(SVC_EMPTY_UDP, NODEPORT_EMPTY, proto::UDP, None, EXT, true),
        service(
            SVC_HAIRPIN,
            CLUSTER_IP_HAIRPIN,
            proto::TCP,
            Some(BACKEND_HAIRPIN),
            0,
            true,
        ),
        service(
            SVC_LOCAL_UDP,
            NODEPORT_LOCAL_UDP,
            proto::UDP,
            Some(BACKEND_LOCAL_UDP),
            EXT,
            true,
        ),
        service(
            SVC_OTHER_IFACE,
            NODEPORT_OTHER_IFACE,
            proto::TCP,
            Some(BACKEND_OTHER_IFACE),
            EXT,
            false,
        ),
        service(
            SVC_CLUSTER_REMOTE,
            CLUSTER_IP_REMOTE,
            proto::TCP,
            Some(BACKEND_CLUSTER_REMOTE),
            0,
            false,
        ),
        service(
            SVC_BLACKHOLE,
            NODEPORT_BLACKHOLE,
            proto::TCP,
            Some(BACKEND_BLACKHOLE),
            EXT,
            false,
        ),
    ]
}

/// What the steps of a scenario learned from the maps so far: the
/// translated source port of its SNAT flow.
#[derive(Clone, Copy, Debug, Default)]
struct Learned {
    nat_port: Option<u16>,
}

impl Learned {
    fn nat_port(&self) -> u16 {
        self.nat_port
            .expect("a step before this one reads the flow's translated port")
    }
}

/// A frame known in advance, or one built from what was learned.
enum FrameSpec {
    Fixed(Box<Frame>),
    Learned(Box<dyn Fn(&Learned) -> Frame>),
}

impl FrameSpec {
    fn build(&self, learned: &Learned) -> Frame {
        match self {
            FrameSpec::Fixed(frame) => (**frame).clone(),
            FrameSpec::Learned(build) => build(learned),
        }
    }
}

fn fixed(frame: Frame) -> FrameSpec {
    FrameSpec::Fixed(Box::new(frame))
}

fn learned(build: impl Fn(&Learned) -> Frame + 'static) -> FrameSpec {
    FrameSpec::Learned(Box::new(build))
}

/// What the output frame must be.
enum Expect {
    /// Byte for byte the input.
    Unchanged,
    Exactly(FrameSpec),
}

/// The interface a frame arrives on.
#[derive(Clone, Copy, Debug)]
enum Iface {
    External,
    Pod,
}

enum Step {
    Packet {
        what: &'static str,
        program: Program,
        iface: Iface,
        input: FrameSpec,
        verdict: u32,
        expect: Expect,
        counters: Vec<(Counter, u64)>,
        /// Checked (and learned from) right after the run, before the
        /// output is compared: the expected frame may need its port.
        flow: Option<FlowCheck>,
    },
    /// The flow of `key` must exist with exactly `flags` among
    /// SNAT/HAIRPIN/EXTERNAL; with FLOW_F_SNAT its translated port is read,
    /// checked against the configured range and `LB_SNAT`, and learned.
    Flow(FlowCheck),
    FlowAbsent {
        key: FlowKey,
    },
    /// `LB_SNAT` must hold exactly this many entries.
    SnatEntries(usize),
    /// A map update between packets, as the agent would make it.
    Update {
        what: &'static str,
        apply: fn(&mut Datapath) -> lb_tests::packet::Result<()>,
    },
    /// The service's per-service drop counter for `reason` must be `total`.
    ServiceDrops {
        service_id: u32,
        reason: DropReason,
        total: u64,
    },
}

/// See [`Step::Flow`].
struct FlowCheck {
    key: FlowKey,
    backend: SocketAddrV4,
    flags: u8,
}

struct Scenario {
    name: &'static str,
    steps: Vec<Step>,
}

fn packet(
    what: &'static str,
    (program, iface): (Program, Iface),
    input: FrameSpec,
    verdict: u32,
    expect: Expect,
    counters: &[(Counter, u64)],
) -> Step {
    Step::Packet {
        what,
        program,
        iface,
        input,
        verdict,
        expect,
        counters: counters.to_vec(),
        flow: None,
    }
}

/// A packet step that creates the flow `check` describes, checked and
/// learned from right after the run.
fn packet_creating(step: Step, check: FlowCheck) -> Step {
    match step {
        Step::Packet {
            what,
            program,
            iface,
            input,
            verdict,
            expect,
            counters,
            flow: None,
        } => Step::Packet {
            what,
            program,
            iface,
            input,
            verdict,
            expect,
            counters,
            flow: Some(check),
        },
        _ => panic!("packet_creating takes a packet step"),
    }
}

const XDP: (Program, Iface) = (Program::XdpExternal, Iface::External);
const TC_EXT: (Program, Iface) = (Program::TcExternal, Iface::External);
const TC_POD: (Program, Iface) = (Program::TcPod, Iface::Pod);

fn flow_key(client: SocketAddrV4, proto: u8, service_id: u32) -> FlowKey {
    FlowKey {
        client_addr: be_addr(&client),
        client_port: be_port(&client),
        proto,
        _pad: 0,
        service_id,
    }
}

/// A frame from an external client (on the node network, to the node's MAC).
fn from_client(frame: Frame) -> Frame {
    frame.with_macs(CLIENT_MAC, NODE_MAC)
}

/// A frame from node 2 (a backend there answering).
fn from_node2(frame: Frame) -> Frame {
    frame.with_macs(NODE2_MAC, NODE_MAC)
}

/// A frame from the local pod (to the host side of its veth).
fn from_pod(frame: Frame) -> Frame {
    frame.with_macs(POD_MAC, HOST_MAC)
}

/// Client frames of the new flow and of the established one.
fn client_tcp(client: SocketAddrV4, frontend: SocketAddrV4) -> (Frame, Frame) {
    let syn = from_client(Frame::tcp(client, frontend, TCP_SYN));
    let data = from_client(
        Frame::tcp(client, frontend, TCP_ACK | TCP_PSH)
            .with_tcp(TCP_ACK | TCP_PSH, 0x1000_0001, 0x3000_0001)
            .with_payload(b"GET / HTTP/1.0\r\n\r\n"),
    );
    (syn, data)
}

fn dnat(frame: &Frame, backend: SocketAddrV4) -> Frame {
    frame.clone().with_dst(backend)
}

/// DNAT to `backend` and SNAT to `source`:`nat_port`, as a forwarded
/// packet leaves (MACs from the FIB lookup when `macs` is given).
fn dnat_snat(
    frame: &Frame,
    backend: SocketAddrV4,
    source: Ipv4Addr,
    nat_port: u16,
    macs: Option<([u8; 6], [u8; 6])>,
) -> Frame {
    let frame = frame
        .clone()
        .with_dst(backend)
        .with_src(SocketAddrV4::new(source, nat_port));
    match macs {
        Some((src, dst)) => frame.with_macs(src, dst),
        None => frame,
    }
}

fn scenarios() -> Vec<Scenario> {
    let mut scenarios = Vec::new();

    // NodePort to a local backend: DNAT only, passed to the stack; the
    // backend's reply (through lb_tc_pod) leaves from the NodePort address
    // and is forwarded by FIB lookup, not handed to the stack.
    let (syn, data) = client_tcp(CLIENT, NODEPORT_LOCAL);
    let reply = from_pod(
        Frame::tcp(BACKEND_LOCAL, CLIENT, TCP_SYN | TCP_ACK).with_tcp(
            TCP_SYN | TCP_ACK,
            0x3000_0000,
            0x1000_0001,
        ),
    );
    scenarios.push(Scenario {
        name: "NodePort to a local backend: DNAT at XDP, reply redirected from lb_tc_pod",
        steps: vec![
            packet(
                "SYN to the NodePort",
                XDP,
                fixed(syn.clone()),
                XDP_PASS,
                Expect::Exactly(fixed(dnat(&syn, BACKEND_LOCAL))),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Flow(FlowCheck {
                key: flow_key(CLIENT, proto::TCP, SVC_LOCAL),
                backend: BACKEND_LOCAL,
                flags: FLOW_F_EXTERNAL,
            }),
            packet(
                "the backend's SYN-ACK through lb_tc_pod",
                TC_POD,
                fixed(reply.clone()),
                TC_ACT_REDIRECT,
                Expect::Exactly(fixed(reply.clone().with_src(NODEPORT_LOCAL))),
                &[(Counter::Reply, 1), (Counter::Forwarded, 1)],
            ),
            packet(
                "data of the established flow",
                XDP,
                fixed(data.clone()),
                XDP_PASS,
                Expect::Exactly(fixed(dnat(&data, BACKEND_LOCAL))),
                &[(Counter::Established, 1)],
            ),
            packet(
                "the same data through lb_tc_ext (no XDP on the interface)",
                TC_EXT,
                fixed(data.clone()),
                TC_ACT_OK,
                Expect::Exactly(fixed(dnat(&data, BACKEND_LOCAL))),
                &[(Counter::Established, 1)],
            ),
        ],
    });

    // NodePort, ETP Cluster, backend on node 2: DNAT + SNAT to the node
    // address, XDP_TX back out of the external interface with the MACs of
    // the FIB lookup; the backend's reply comes back to the node address
    // and is translated back to the client, again by XDP_TX.
    let (syn, data) = client_tcp(CLIENT, NODEPORT_REMOTE);
    let toward_node2 = Some((NODE_MAC, NODE2_MAC));
    let reply_from = move |learned: &Learned| {
        from_node2(
            Frame::tcp(BACKEND_REMOTE, node(learned.nat_port()), TCP_SYN | TCP_ACK).with_tcp(
                TCP_SYN | TCP_ACK,
                0x3000_0000,
                0x1000_0001,
            ),
        )
    };
    let reply_to_client = move |learned: &Learned| {
        reply_from(learned)
            .with_src(NODEPORT_REMOTE)
            .with_dst(CLIENT)
            .with_macs(NODE_MAC, CLIENT_MAC)
    };
    let reply_to_client_tc = move |learned: &Learned| {
        reply_from(learned)
            .with_src(NODEPORT_REMOTE)
            .with_dst(CLIENT)
    };
    let syn_out = syn.clone();
    let data_out = data.clone();
    let data_tc = data.clone();
    scenarios.push(Scenario {
        name: "NodePort to a backend on another node: DNAT + SNAT, XDP_TX both ways",
        steps: vec![
            packet_creating(
                packet(
                    "SYN to the NodePort",
                    XDP,
                    fixed(syn.clone()),
                    XDP_TX,
                    Expect::Exactly(learned(move |learned| {
                        dnat_snat(
                            &syn_out,
                            BACKEND_REMOTE,
                            NODE_ADDR,
                            learned.nat_port(),
                            toward_node2,
                        )
                    })),
                    &[(Counter::NewFlow, 1), (Counter::Forwarded, 1)],
                ),
                FlowCheck {
                    key: flow_key(CLIENT, proto::TCP, SVC_REMOTE),
                    backend: BACKEND_REMOTE,
                    flags: FLOW_F_SNAT | FLOW_F_EXTERNAL,
                },
            ),
            packet(
                "the backend's SYN-ACK to the node address",
                XDP,
                learned(reply_from),
                XDP_TX,
                Expect::Exactly(learned(reply_to_client)),
                &[(Counter::Reply, 1), (Counter::Forwarded, 1)],
            ),
            packet(
                "data of the established flow",
                XDP,
                fixed(data.clone()),
                XDP_TX,
                Expect::Exactly(learned(move |learned| {
                    dnat_snat(
                        &data_out,
                        BACKEND_REMOTE,
                        NODE_ADDR,
                        learned.nat_port(),
                        toward_node2,
                    )
                })),
                &[(Counter::Established, 1), (Counter::Forwarded, 1)],
            ),
            packet(
                "the same data through lb_tc_ext: translated and redirected",
                TC_EXT,
                fixed(data.clone()),
                TC_ACT_REDIRECT,
                Expect::Exactly(learned(move |learned| {
                    dnat_snat(
                        &data_tc,
                        BACKEND_REMOTE,
                        NODE_ADDR,
                        learned.nat_port(),
                        None,
                    )
                })),
                &[(Counter::Established, 1), (Counter::Forwarded, 1)],
            ),
            packet(
                "the backend's reply through lb_tc_ext: translated and redirected",
                TC_EXT,
                learned(reply_from),
                TC_ACT_REDIRECT,
                Expect::Exactly(learned(reply_to_client_tc)),
                &[(Counter::Reply, 1), (Counter::Forwarded, 1)],
            ),
        ],
    });

    // The same over UDP, with and without a UDP checksum.
    for (name, checksum) in [
        (
            "UDP NodePort to a backend on another node: SNAT both ways",
            true,
        ),
        (
            "UDP NodePort with checksum 0 to another node: it stays 0 both ways",
            false,
        ),
    ] {
        let with_checksum = move |frame: Frame| {
            if checksum {
                frame
            } else {
                frame.without_udp_checksum()
            }
        };
        let query = from_client(with_checksum(Frame::udp(
            CLIENT,
            NODEPORT_REMOTE_UDP,
            b"query",
        )));
        let query_out = query.clone();
        let answer_from = move |learned: &Learned| {
            from_node2(with_checksum(Frame::udp(
                BACKEND_REMOTE_UDP,
                node(learned.nat_port()),
                b"answer!",
            )))
        };
        scenarios.push(Scenario {
            name,
            steps: vec![
                packet_creating(
                    packet(
                        "query to the NodePort",
                        XDP,
                        fixed(query.clone()),
                        XDP_TX,
                        Expect::Exactly(learned(move |learned| {
                            dnat_snat(
                                &query_out,
                                BACKEND_REMOTE_UDP,
                                NODE_ADDR,
                                learned.nat_port(),
                                toward_node2,
                            )
                        })),
                        &[(Counter::NewFlow, 1), (Counter::Forwarded, 1)],
                    ),
                    FlowCheck {
                        key: flow_key(CLIENT, proto::UDP, SVC_REMOTE_UDP),
                        backend: BACKEND_REMOTE_UDP,
                        flags: FLOW_F_SNAT | FLOW_F_EXTERNAL,
                    },
                ),
                packet(
                    "answer to the node address",
                    XDP,
                    learned(answer_from),
                    XDP_TX,
                    Expect::Exactly(learned(move |learned| {
                        answer_from(learned)
                            .with_src(NODEPORT_REMOTE_UDP)
                            .with_dst(CLIENT)
                            .with_macs(NODE_MAC, CLIENT_MAC)
                    })),
                    &[(Counter::Reply, 1), (Counter::Forwarded, 1)],
                ),
            ],
        });
    }

    // The next hop's MAC is unknown: XDP creates the flow but hands the
    // packet to TC untouched; lb_tc_ext then finds the established flow,
    // translates and redirects (the kernel resolves the neighbour).
    let (syn, _) = client_tcp(CLIENT, NODEPORT_NO_NEIGH);
    let syn_tc = syn.clone();
    scenarios.push(Scenario {
        name: "NodePort to a node whose MAC is unknown: XDP hands to lb_tc_ext",
        steps: vec![
            packet(
                "SYN at XDP: passed untouched",
                XDP,
                fixed(syn.clone()),
                XDP_PASS,
                Expect::Unchanged,
                &[(Counter::NewFlow, 1), (Counter::XdpToTc, 1)],
            ),
            Step::Flow(FlowCheck {
                key: flow_key(CLIENT, proto::TCP, SVC_NO_NEIGH),
                backend: BACKEND_NO_NEIGH,
                flags: FLOW_F_SNAT | FLOW_F_EXTERNAL,
            }),
            packet(
                "the same SYN at lb_tc_ext: translated and redirected",
                TC_EXT,
                fixed(syn.clone()),
                TC_ACT_REDIRECT,
                Expect::Exactly(learned(move |learned| {
                    dnat_snat(
                        &syn_tc,
                        BACKEND_NO_NEIGH,
                        NODE_ADDR,
                        learned.nat_port(),
                        None,
                    )
                })),
                &[(Counter::Established, 1), (Counter::Forwarded, 1)],
            ),
        ],
    });

    let (allowed, _) = client_tcp(CLIENT, LB_INGRESS);
    let denied = Frame::tcp(CLIENT2, LB_INGRESS, TCP_SYN).with_macs(CLIENT2_MAC, NODE_MAC);
    scenarios.push(Scenario {
        name: "LB ingress IP with loadBalancerSourceRanges: one client in, one out",
        steps: vec![
            packet(
                "SYN from a client in the range",
                XDP,
                fixed(allowed.clone()),
                XDP_PASS,
                Expect::Exactly(fixed(dnat(&allowed, BACKEND_LB))),
                &[(Counter::NewFlow, 1)],
            ),
            packet(
                "SYN from a client outside the range: dropped",
                XDP,
                fixed(denied),
                XDP_DROP,
                Expect::Unchanged,
                &[(Counter::SourceRangeDenied, 1)],
            ),
            Step::FlowAbsent {
                key: flow_key(CLIENT2, proto::TCP, SVC_LB),
            },
            Step::ServiceDrops {
                service_id: SVC_LB,
                reason: DropReason::SourceRange,
                total: 1,
            },
        ],
    });

    let (external_syn, _) = client_tcp(CLIENT, EXTERNAL_IP);
    let cluster_ip_syn = from_client(Frame::tcp(CLIENT, CLUSTER_IP_LOCAL, TCP_SYN));
    let not_a_port = from_client(Frame::tcp(CLIENT, node(22), TCP_SYN));
    let icmp = from_client(Frame::icmp_echo(CLIENT_ADDR, NODE_ADDR));
    scenarios.push(Scenario {
        name: "external IP translated; ClusterIP and other traffic on the external interface untouched",
        steps: vec![
            packet(
                "SYN to an external IP",
                XDP,
                fixed(external_syn.clone()),
                XDP_PASS,
                Expect::Exactly(fixed(dnat(&external_syn, BACKEND_EXTERNAL_IP))),
                &[(Counter::NewFlow, 1)],
            ),
            packet(
                "SYN to a ClusterIP arriving from outside",
                XDP,
                fixed(cluster_ip_syn.clone()),
                XDP_PASS,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
            packet(
                "the same at lb_tc_ext",
                TC_EXT,
                fixed(cluster_ip_syn),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
            Step::FlowAbsent {
                key: flow_key(CLIENT, proto::TCP, SVC_LOCAL),
            },
            packet(
                "SYN to a node port no Service has",
                XDP,
                fixed(not_a_port),
                XDP_PASS,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
            packet(
                "ICMP echo to the node",
                XDP,
                fixed(icmp),
                XDP_PASS,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
        ],
    });

    let (local_none_syn, _) = client_tcp(CLIENT, NODEPORT_LOCAL_NONE);
    let (empty_syn, _) = client_tcp(CLIENT, NODEPORT_EMPTY);
    let empty_udp = from_client(Frame::udp(CLIENT, NODEPORT_EMPTY, b"query"));
    scenarios.push(Scenario {
        name: "no backend: ETP Local drops, no endpoint at all refuses at XDP",
        steps: vec![
            packet(
                "SYN to an ETP Local NodePort without a local endpoint: dropped",
                XDP,
                fixed(local_none_syn),
                XDP_DROP,
                Expect::Unchanged,
                &[(Counter::NoBackend, 1)],
            ),
            Step::ServiceDrops {
                service_id: SVC_LOCAL_NONE,
                reason: DropReason::NoBackend,
                total: 1,
            },
            packet(
                "SYN to a NodePort without endpoints: RST|ACK by XDP_TX",
                XDP,
                fixed(empty_syn.clone()),
                XDP_TX,
                Expect::Exactly(fixed(empty_syn.expected_reset())),
                &[(Counter::NoBackend, 1)],
            ),
            packet(
                "UDP to a NodePort without endpoints: ICMP port unreachable by XDP_TX",
                XDP,
                fixed(empty_udp.clone()),
                XDP_TX,
                Expect::Exactly(fixed(empty_udp.expected_port_unreachable())),
                &[(Counter::NoBackend, 1)],
            ),
        ],
    });

    let query = from_client(Frame::udp(CLIENT, NODEPORT_LOCAL_UDP, b"q").without_udp_checksum());
    let answer = from_pod(Frame::udp(BACKEND_LOCAL_UDP, CLIENT, b"a").without_udp_checksum());
    scenarios.push(Scenario {
        name: "UDP NodePort to a local backend, checksum 0: DNAT at XDP, reply redirected",
        steps: vec![
            packet(
                "query",
                XDP,
                fixed(query.clone()),
                XDP_PASS,
                Expect::Exactly(fixed(dnat(&query, BACKEND_LOCAL_UDP))),
                &[(Counter::NewFlow, 1)],
            ),
            packet(
                "answer through lb_tc_pod",
                TC_POD,
                fixed(answer.clone()),
                TC_ACT_REDIRECT,
                Expect::Exactly(fixed(answer.with_src(NODEPORT_LOCAL_UDP))),
                &[(Counter::Reply, 1), (Counter::Forwarded, 1)],
            ),
        ],
    });

    // A pod reaching its own Service and landing on itself: the source
    // becomes the hairpin address, so the pod's reply (to that address)
    // comes back through lb_tc_pod and is translated back.
    let hairpin_syn = from_pod(Frame::tcp(POD_CLIENT, CLUSTER_IP_HAIRPIN, TCP_SYN));
    let hairpin_out = hairpin_syn.clone();
    let hairpin_reply = move |learned: &Learned| {
        from_pod(
            Frame::tcp(
                BACKEND_HAIRPIN,
                SocketAddrV4::new(HAIRPIN_ADDR, learned.nat_port()),
                TCP_SYN | TCP_ACK,
            )
            .with_tcp(TCP_SYN | TCP_ACK, 0x3000_0000, 0x1000_0001),
        )
    };
    scenarios.push(Scenario {
        name: "hairpin: a pod reaching its own Service lands on itself from the hairpin address",
        steps: vec![
            packet_creating(
                packet(
                    "SYN from the pod to its ClusterIP",
                    TC_POD,
                    fixed(hairpin_syn),
                    TC_ACT_REDIRECT,
                    Expect::Exactly(learned(move |learned| {
                        dnat_snat(
                            &hairpin_out,
                            BACKEND_HAIRPIN,
                            HAIRPIN_ADDR,
                            learned.nat_port(),
                            None,
                        )
                    })),
                    &[(Counter::NewFlow, 1), (Counter::Forwarded, 1)],
                ),
                FlowCheck {
                    key: flow_key(POD_CLIENT, proto::TCP, SVC_HAIRPIN),
                    backend: BACKEND_HAIRPIN,
                    flags: FLOW_F_SNAT | FLOW_F_HAIRPIN,
                },
            ),
            packet(
                "the pod's SYN-ACK to the hairpin address",
                TC_POD,
                learned(hairpin_reply),
                TC_ACT_REDIRECT,
                Expect::Exactly(learned(move |learned| {
                    hairpin_reply(learned)
                        .with_src(CLUSTER_IP_HAIRPIN)
                        .with_dst(POD_CLIENT)
                })),
                &[(Counter::Reply, 1), (Counter::Forwarded, 1)],
            ),
        ],
    });

    // A pod reaching a NodePort of its own node: role Pod translates every
    // frontend, without node SNAT (the reply comes back through the pod's
    // own veth anyway).
    let pod_syn = from_pod(Frame::tcp(POD_CLIENT, NODEPORT_REMOTE, TCP_SYN));
    scenarios.push(Scenario {
        name: "a pod reaching a NodePort of its own node: DNAT only",
        steps: vec![
            packet(
                "SYN from the pod",
                TC_POD,
                fixed(pod_syn.clone()),
                TC_ACT_OK,
                Expect::Exactly(fixed(dnat(&pod_syn, BACKEND_REMOTE))),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Flow(FlowCheck {
                key: flow_key(POD_CLIENT, proto::TCP, SVC_REMOTE),
                backend: BACKEND_REMOTE,
                flags: FLOW_F_EXTERNAL,
            }),
        ],
    });

    // The route to the backend leaves through another interface: XDP
    // cannot transmit there (a redirect to a veth needs its peer's NAPI),
    // so it hands the packet to lb_tc_ext, which redirects.
    let (syn, _) = client_tcp(CLIENT, NODEPORT_OTHER_IFACE);
    let syn_tc = syn.clone();
    scenarios.push(Scenario {
        name: "NodePort to a backend behind another interface: XDP hands to lb_tc_ext",
        steps: vec![
            packet(
                "SYN at XDP: passed untouched",
                XDP,
                fixed(syn.clone()),
                XDP_PASS,
                Expect::Unchanged,
                &[(Counter::NewFlow, 1), (Counter::XdpToTc, 1)],
            ),
            Step::Flow(FlowCheck {
                key: flow_key(CLIENT, proto::TCP, SVC_OTHER_IFACE),
                backend: BACKEND_OTHER_IFACE,
                flags: FLOW_F_SNAT | FLOW_F_EXTERNAL,
            }),
            packet(
                "the same SYN at lb_tc_ext: translated and redirected",
                TC_EXT,
                fixed(syn),
                TC_ACT_REDIRECT,
                Expect::Exactly(learned(move |learned| {
                    dnat_snat(
                        &syn_tc,
                        BACKEND_OTHER_IFACE,
                        NODE_ADDR,
                        learned.nat_port(),
                        None,
                    )
                })),
                &[(Counter::Established, 1), (Counter::Forwarded, 1)],
            ),
        ],
    });

    let (syn, _) = client_tcp(CLIENT, NODEPORT_BLACKHOLE);
    let (remote_syn, _) = client_tcp(CLIENT2, NODEPORT_REMOTE);
    scenarios.push(Scenario {
        name: "no route, no SNAT address: dropped and counted",
        steps: vec![
            packet(
                "SYN to a backend behind a blackhole route",
                XDP,
                fixed(syn),
                XDP_DROP,
                Expect::Unchanged,
                &[(Counter::NoRoute, 1)],
            ),
            Step::ServiceDrops {
                service_id: SVC_BLACKHOLE,
                reason: DropReason::NoRoute,
                total: 1,
            },
            // The dropped SYN leaves neither its flow nor its port.
            Step::FlowAbsent {
                key: flow_key(CLIENT, proto::TCP, SVC_BLACKHOLE),
            },
            Step::SnatEntries(0),
            Step::Update {
                what: "no node address known (snat_addr 0)",
                apply: |datapath| datapath.set_config(&DatapathConfig::DEFAULT),
            },
            packet(
                "SYN that needs SNAT without an address",
                XDP,
                fixed(remote_syn),
                XDP_DROP,
                Expect::Unchanged,
                &[(Counter::NoNatAddr, 1)],
            ),
            Step::FlowAbsent {
                key: flow_key(CLIENT2, proto::TCP, SVC_REMOTE),
            },
            Step::ServiceDrops {
                service_id: SVC_REMOTE,
                reason: DropReason::NoNat,
                total: 1,
            },
        ],
    });

    // A pod reaching a ClusterIP whose backend is on another node: the
    // backend's reply comes back on the external interface and is
    // reverse-translated there (role External), then goes to the stack.
    let pod_syn = from_pod(Frame::tcp(POD_CLIENT, CLUSTER_IP_REMOTE, TCP_SYN));
    let remote_reply = from_node2(
        Frame::tcp(BACKEND_CLUSTER_REMOTE, POD_CLIENT, TCP_SYN | TCP_ACK).with_tcp(
            TCP_SYN | TCP_ACK,
            0x3000_0000,
            0x1000_0001,
        ),
    );
    scenarios.push(Scenario {
        name: "ClusterIP with the backend on another node: reply reverse-translated at XDP",
        steps: vec![
            packet(
                "SYN from the pod",
                TC_POD,
                fixed(pod_syn.clone()),
                TC_ACT_OK,
                Expect::Exactly(fixed(dnat(&pod_syn, BACKEND_CLUSTER_REMOTE))),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Flow(FlowCheck {
                key: flow_key(POD_CLIENT, proto::TCP, SVC_CLUSTER_REMOTE),
                backend: BACKEND_CLUSTER_REMOTE,
                flags: 0,
            }),
            packet(
                "the backend's SYN-ACK arriving from node 2",
                XDP,
                fixed(remote_reply.clone()),
                XDP_PASS,
                Expect::Exactly(fixed(remote_reply.with_src(CLUSTER_IP_REMOTE))),
                &[(Counter::Reply, 1)],
            ),
        ],
    });

    // A source-translated TCP flow that ends (RST) frees its port.
    let (syn, _) = client_tcp(CLIENT, NODEPORT_REMOTE);
    let rst = from_client(Frame::tcp(CLIENT, NODEPORT_REMOTE, TCP_RST));
    let syn_out = syn.clone();
    let rst_out = rst.clone();
    scenarios.push(Scenario {
        name: "a source-translated TCP flow that ends frees its LB_SNAT entry",
        steps: vec![
            packet_creating(
                packet(
                    "SYN to the NodePort",
                    XDP,
                    fixed(syn),
                    XDP_TX,
                    Expect::Exactly(learned(move |learned| {
                        dnat_snat(
                            &syn_out,
                            BACKEND_REMOTE,
                            NODE_ADDR,
                            learned.nat_port(),
                            Some((NODE_MAC, NODE2_MAC)),
                        )
                    })),
                    &[(Counter::NewFlow, 1), (Counter::Forwarded, 1)],
                ),
                FlowCheck {
                    key: flow_key(CLIENT, proto::TCP, SVC_REMOTE),
                    backend: BACKEND_REMOTE,
                    flags: FLOW_F_SNAT | FLOW_F_EXTERNAL,
                },
            ),
            Step::SnatEntries(1),
            packet(
                "the client's RST, still translated",
                XDP,
                fixed(rst),
                XDP_TX,
                Expect::Exactly(learned(move |learned| {
                    dnat_snat(
                        &rst_out,
                        BACKEND_REMOTE,
                        NODE_ADDR,
                        learned.nat_port(),
                        Some((NODE_MAC, NODE2_MAC)),
                    )
                })),
                &[(Counter::Established, 1), (Counter::Forwarded, 1)],
            ),
            Step::FlowAbsent {
                key: flow_key(CLIENT, proto::TCP, SVC_REMOTE),
            },
            Step::SnatEntries(0),
        ],
    });

    scenarios
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "packet tests load BPF programs and need root");
}

/// The datapath with every program, the cluster's services, the source
/// range, and the node's SNAT address configured.
fn load_cluster() -> Datapath {
    let mut datapath = Datapath::load_all().expect("load the datapath object");
    datapath
        .set_config(&DatapathConfig {
            snat_addr: u32::from_ne_bytes(NODE_ADDR.octets()),
            ..DatapathConfig::DEFAULT
        })
        .expect("write the configuration");
    for service in cluster() {
        let backend_flags = if service.local {
            lb_common::backend::BACKEND_F_LOCAL
        } else {
            0
        };
        datapath
            .add_service_with(&service.spec, service.flags, backend_flags)
            .expect("write a service");
        for (frontend, flags) in &service.more_frontends {
            let backend_count = service.spec.backends.len() as u32;
            datapath
                .set_service(
                    frontend,
                    service.spec.proto,
                    &ServiceValue {
                        id: service.spec.id,
                        backend_count,
                        flags: *flags,
                        ..ServiceValue::default()
                    },
                )
                .expect("write a frontend");
        }
    }
    datapath
        .allow_source_range(&SourceRangeSpec {
            service_id: SVC_LB,
            addr: ALLOWED_RANGE,
            prefix_len: ALLOWED_PREFIX,
        })
        .expect("write the source range");
    datapath
}

fn mismatch(what: &str, got: &[u8], expected: &[u8]) -> String {
    format!(
        "{what}: output differs\n  got      {}\n  expected {}\n got:\n{}\n expected:\n{}",
        describe(got),
        describe(expected),
        hexdump(got),
        hexdump(expected)
    )
}

/// Checks the flow of `key` and learns its translated port.
fn check_flow(
    datapath: &mut Datapath,
    key: &FlowKey,
    backend: SocketAddrV4,
    flags: u8,
    learned: &mut Learned,
) -> Result<(), String> {
    let flow = datapath
        .flow(key)
        .map_err(|error| format!("flow lookup: {error:?}"))?
        .ok_or_else(|| format!("no flow {key:?}"))?;
    let translation = FLOW_F_SNAT | FLOW_F_HAIRPIN | FLOW_F_EXTERNAL;
    if flow.flags & translation != flags
        || flow.backend_addr != be_addr(&backend)
        || flow.backend_port != be_port(&backend)
    {
        return Err(format!(
            "flow {key:?} is {flow:?}; expected backend {backend} and flags {flags:#x} among {translation:#x}"
        ));
    }
    if flags & FLOW_F_SNAT == 0 {
        return Ok(());
    }
    let nat_port = u16::from_be(flow.nat_port);
    let config = DatapathConfig::DEFAULT;
    if !(config.nat_port_min..=config.nat_port_max).contains(&nat_port) {
        return Err(format!(
            "translated port {nat_port} outside {}..={}",
            config.nat_port_min, config.nat_port_max
        ));
    }
    let snat_key = SnatKey::new(
        be_addr(&backend),
        be_port(&backend),
        flow.nat_port,
        key.proto,
    );
    let entry = datapath
        .snat(&snat_key)
        .map_err(|error| format!("LB_SNAT lookup: {error:?}"))?;
    if entry != Some(*key) {
        return Err(format!(
            "LB_SNAT {snat_key:?} holds {entry:?}, expected the flow {key:?}"
        ));
    }
    learned.nat_port = Some(nat_port);
    Ok(())
}

/// Runs one scenario on a fresh datapath; returns the first failure.
/// Called on a thread inside the test's namespace.
fn run_scenario(scenario: &Scenario, fib: &FibNet) -> Result<(), String> {
    let mut datapath = load_cluster();
    let mut learned = Learned::default();
    for step in &scenario.steps {
        match step {
            Step::Flow(FlowCheck {
                key,
                backend,
                flags,
            }) => check_flow(&mut datapath, key, *backend, *flags, &mut learned)?,
            Step::SnatEntries(total) => {
                let entries = datapath
                    .snat_entries()
                    .map_err(|error| format!("LB_SNAT: {error:?}"))?;
                if entries.len() != *total {
                    return Err(format!(
                        "LB_SNAT holds {entries:?}, expected {total} entries"
                    ));
                }
            }
            Step::Update { what, apply } => {
                apply(&mut datapath).map_err(|error| format!("update '{what}': {error:?}"))?;
            }
            Step::FlowAbsent { key } => {
                let flow = datapath
                    .flow(key)
                    .map_err(|error| format!("flow lookup: {error:?}"))?;
                if flow.is_some() {
                    return Err(format!("flow {key:?} exists: {flow:?}"));
                }
            }
            Step::ServiceDrops {
                service_id,
                reason,
                total,
            } => {
                let stats = datapath
                    .service_stats(*service_id)
                    .map_err(|error| format!("service stats: {error:?}"))?;
                let counted = stats.drops[*reason as usize];
                if counted != *total {
                    return Err(format!(
                        "service {service_id}: {} drops {counted}, expected {total}",
                        reason.name()
                    ));
                }
            }
            Step::Packet {
                what,
                program,
                iface,
                input,
                verdict,
                expect,
                counters,
                flow,
            } => {
                let input = input.build(&learned).to_bytes();
                let ifindex = match iface {
                    Iface::External => fib.ext_ifindex(),
                    Iface::Pod => fib.pod_ifindex(),
                };
                let before = datapath.counters().map_err(|e| format!("{e:?}"))?;
                let output = datapath
                    .run_on(*program, &input, Some(ifindex))
                    .map_err(|error| format!("{what}: test run: {error:?}"))?;
                let after = datapath.counters().map_err(|e| format!("{e:?}"))?;
                if output.verdict != *verdict {
                    return Err(format!(
                        "{what}: {} verdict {} expected {verdict}\n  input  {}\n  output {}\n  counters {:?}",
                        program.name(),
                        output.verdict,
                        describe(&input),
                        describe(&output.frame),
                        after.since(&before)
                    ));
                }
                if let Some(check) = flow {
                    check_flow(
                        &mut datapath,
                        &check.key,
                        check.backend,
                        check.flags,
                        &mut learned,
                    )
                    .map_err(|error| format!("{what}: {error}"))?;
                }
                let expected = match expect {
                    Expect::Unchanged => input.clone(),
                    Expect::Exactly(frame) => frame.build(&learned).to_bytes(),
                };
                if output.frame != expected {
                    return Err(mismatch(what, &output.frame, &expected));
                }
                let deltas = after.since(&before);
                let expected: BTreeMap<&str, u64> =
                    counters.iter().map(|&(c, n)| (c.name(), n)).collect();
                if deltas != expected {
                    return Err(format!(
                        "{what}: counters moved by {deltas:?}, expected {expected:?}"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn external_packet_table() {
    require_root();
    let fib = FibNet::create().expect("create the test namespace");
    let failures = fib
        .run(|| {
            scenarios()
                .iter()
                .filter_map(|scenario| {
                    run_scenario(scenario, &fib)
                        .err()
                        .map(|error| format!("scenario '{}': {error}", scenario.name))
                })
                .collect::<Vec<String>>()
        })
        .expect("run in the test namespace");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Translated ports of concurrent SNAT flows to the same backend differ,
/// stay in the configured range, and each has its `LB_SNAT` entry.
#[test]
fn snat_ports_are_distinct_and_in_range() {
    require_root();
    let fib = FibNet::create().expect("create the test namespace");
    let ports = fib
        .run(|| {
            let mut datapath = load_cluster();
            let mut ports = std::collections::BTreeSet::new();
            for index in 0..64u16 {
                let client = SocketAddrV4::new(CLIENT_ADDR, 20000 + index);
                let syn = from_client(Frame::tcp(client, NODEPORT_REMOTE, TCP_SYN));
                let output = datapath
                    .run_on(
                        Program::XdpExternal,
                        &syn.to_bytes(),
                        Some(fib.ext_ifindex()),
                    )
                    .expect("test run");
                assert_eq!(output.verdict, XDP_TX, "{}", describe(&output.frame));
                let mut learned = Learned::default();
                check_flow(
                    &mut datapath,
                    &flow_key(client, proto::TCP, SVC_REMOTE),
                    BACKEND_REMOTE,
                    FLOW_F_SNAT | FLOW_F_EXTERNAL,
                    &mut learned,
                )
                .unwrap_or_else(|error| panic!("{error}"));
                let nat_port = learned.nat_port();
                assert_eq!(
                    output.frame,
                    dnat_snat(
                        &syn,
                        BACKEND_REMOTE,
                        NODE_ADDR,
                        nat_port,
                        Some((NODE_MAC, NODE2_MAC))
                    )
                    .to_bytes()
                );
                ports.insert(nat_port);
            }
            let entries = datapath.snat_entries().expect("read LB_SNAT");
            (ports, entries.len())
        })
        .expect("run in the test namespace");
    assert_eq!(ports.0.len(), 64, "ports {:?}", ports.0);
    assert_eq!(ports.1, 64, "LB_SNAT entries");
}

//! `lb_tc_pod` packet by packet with `BPF_PROG_TEST_RUN`: no namespaces, no
//! interfaces, just the program, its maps and byte buffers.
//!
//! Table-driven: each scenario writes services into the maps the way the
//! agent does, then runs steps. A packet step names the input frame, the
//! expected verdict, the expected output frame and the exact counter
//! increments. Expected frames are built independently by
//! `lb_tests::packet::frame` with every checksum computed from scratch
//! (`lb_tests::packet::checksum`), never by the code under test.
//!
//! Privileged: needs root (BPF program load) and a 6.x kernel.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    backend::{BACKEND_F_ACTIVE, BACKEND_F_NOT_READY, Backend},
    config::{CONFIG_F_LOG, DatapathConfig},
    conntrack::{FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT, FLOW_F_REPLY_SEEN, Flow, FlowKey},
    counters::Counter,
    proto,
    service::{SERVICE_F_DROP, SERVICE_F_REJECT, ServiceValue},
    stats::DropReason,
};
use lb_tests::packet::{
    datapath::{
        BackendSpec, Datapath, ServiceSpec, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, be_addr,
        be_port,
    },
    frame::{
        ETHERTYPE_IPV6, Frame, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, describe, hexdump,
    },
};

fn sa(text: &str) -> SocketAddrV4 {
    text.parse().expect("socket address literal")
}

// Addresses: clients and backends in 198.18.0.0/16, frontends in 198.19.0.0/16.
const CLIENT: &str = "198.18.0.10:40000";
const CLIENT_2: &str = "198.18.0.11:40001";
/// ClusterIP with a TCP service port 80 (one backend) and UDP 53.
const FRONTEND_TCP: &str = "198.19.0.10:80";
const FRONTEND_UDP: &str = "198.19.0.10:53";
/// ClusterIP port 80 with three ready backends.
const FRONTEND_MULTI: &str = "198.19.0.11:80";
/// ClusterIP whose ports 80/TCP and 53/UDP have no ready backend.
const FRONTEND_EMPTY_TCP: &str = "198.19.0.12:80";
const FRONTEND_EMPTY_UDP: &str = "198.19.0.12:53";
/// A frontend and backend whose addresses have the same one's-complement
/// sum (0xc613 + 0x0014 = 0xc612 + 0x0015): the address change leaves the
/// L4 checksum as it is, so the datapath cannot tell the skb's checksum
/// state from it and rewrites the port through the helper.
const FRONTEND_SAME_SUM: &str = "198.19.0.20:80";
const BACKEND_SAME_SUM: &str = "198.18.0.21:8080";

const BACKEND_TCP: &str = "198.18.1.1:8080";
const BACKEND_TCP_2: &str = "198.18.1.9:8080";
const BACKEND_UDP: &str = "198.18.1.2:5353";
const BACKEND_UDP_2: &str = "198.18.1.3:5353";
const BACKENDS_MULTI: [&str; 3] = ["198.18.1.11:8080", "198.18.1.12:8080", "198.18.1.13:8080"];

const SVC_TCP: u32 = 1;
const SVC_UDP: u32 = 2;
const SVC_MULTI: u32 = 3;
const SVC_EMPTY_TCP: u32 = 4;
const SVC_EMPTY_UDP: u32 = 5;
const SVC_SAME_SUM: u32 = 6;

const ID_BACKEND_TCP: u32 = 1;
const ID_BACKEND_UDP: u32 = 2;
const ID_BACKEND_UDP_2: u32 = 3;
const ID_BACKENDS_MULTI: [u32; 3] = [11, 12, 13];
const ID_BACKEND_SAME_SUM: u32 = 20;

fn service(id: u32, frontend: &str, proto: u8, backends: &[(u32, &str, bool)]) -> ServiceSpec {
    ServiceSpec {
        id,
        frontend: sa(frontend),
        proto,
        backends: backends
            .iter()
            .map(|&(id, addr, ready)| BackendSpec {
                id,
                addr: sa(addr),
                ready,
            })
            .collect(),
    }
}

/// The services every scenario starts with.
fn cluster() -> Vec<ServiceSpec> {
    vec![
        service(
            SVC_TCP,
            FRONTEND_TCP,
            proto::TCP,
            &[(ID_BACKEND_TCP, BACKEND_TCP, true)],
        ),
        service(
            SVC_UDP,
            FRONTEND_UDP,
            proto::UDP,
            &[(ID_BACKEND_UDP, BACKEND_UDP, true)],
        ),
        service(
            SVC_MULTI,
            FRONTEND_MULTI,
            proto::TCP,
            &[
                (ID_BACKENDS_MULTI[0], BACKENDS_MULTI[0], true),
                (ID_BACKENDS_MULTI[1], BACKENDS_MULTI[1], true),
                (ID_BACKENDS_MULTI[2], BACKENDS_MULTI[2], true),
            ],
        ),
        service(SVC_EMPTY_TCP, FRONTEND_EMPTY_TCP, proto::TCP, &[]),
        service(SVC_EMPTY_UDP, FRONTEND_EMPTY_UDP, proto::UDP, &[]),
        service(
            SVC_SAME_SUM,
            FRONTEND_SAME_SUM,
            proto::TCP,
            &[(ID_BACKEND_SAME_SUM, BACKEND_SAME_SUM, true)],
        ),
    ]
}

/// What the output frame must be.
enum Expect {
    /// Byte for byte the input.
    Unchanged,
    Exactly(Frame),
    /// One of these; the first step of a scenario with `Sticky` records
    /// which, and every later `Sticky` step must match the same index.
    Sticky(Vec<Frame>),
}

/// A map update between packets, as the agent would make it.
type Update = fn(&mut Datapath) -> lb_tests::packet::Result<()>;

enum Step {
    Packet {
        what: &'static str,
        input: Vec<u8>,
        verdict: u32,
        expect: Expect,
        counters: Vec<(Counter, u64)>,
    },
    Update {
        what: &'static str,
        apply: Update,
    },
    /// The flow of this key must (not) exist.
    FlowExists {
        key: FlowKey,
        exists: bool,
    },
    /// The service's per-service drop counter for `reason` must be `total`
    /// (summed over CPUs, since the scenario started).
    ServiceDrops {
        service_id: u32,
        reason: DropReason,
        total: u64,
    },
}

struct Scenario {
    name: &'static str,
    steps: Vec<Step>,
}

fn packet(
    what: &'static str,
    input: Vec<u8>,
    verdict: u32,
    expect: Expect,
    counters: &[(Counter, u64)],
) -> Step {
    Step::Packet {
        what,
        input,
        verdict,
        expect,
        counters: counters.to_vec(),
    }
}

fn flow_key(client: &str, proto: u8, service_id: u32) -> FlowKey {
    let client = sa(client);
    FlowKey {
        client_addr: be_addr(&client),
        client_port: be_port(&client),
        proto,
        _pad: 0,
        service_id,
    }
}

fn tcp(src: &str, dst: &str, flags: u8) -> Frame {
    Frame::tcp(sa(src), sa(dst), flags)
}

fn udp(src: &str, dst: &str) -> Frame {
    Frame::udp(sa(src), sa(dst), b"query")
}

/// Translations the datapath must make, built from the input frame.
fn dnat(frame: &Frame, backend: &str) -> Frame {
    frame.clone().with_dst(sa(backend))
}

fn snat(frame: &Frame, frontend: &str) -> Frame {
    frame.clone().with_src(sa(frontend))
}

fn tcp_flow_steps() -> Vec<Step> {
    let syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN);
    let data = tcp(CLIENT, FRONTEND_TCP, TCP_ACK | TCP_PSH)
        .with_tcp(TCP_ACK | TCP_PSH, 0x1000_0001, 0x3000_0001)
        .with_payload(b"GET / HTTP/1.0\r\n\r\n");
    let syn_ack = tcp(BACKEND_TCP, CLIENT, TCP_SYN | TCP_ACK).with_tcp(
        TCP_SYN | TCP_ACK,
        0x3000_0000,
        0x1000_0001,
    );
    let fin = tcp(CLIENT, FRONTEND_TCP, TCP_FIN | TCP_ACK);
    let backend_fin = tcp(BACKEND_TCP, CLIENT, TCP_FIN | TCP_ACK);
    vec![
        packet(
            "SYN to the frontend",
            syn.to_bytes(),
            TC_ACT_OK,
            Expect::Exactly(dnat(&syn, BACKEND_TCP)),
            &[(Counter::NewFlow, 1)],
        ),
        packet(
            "SYN-ACK from the backend",
            syn_ack.to_bytes(),
            TC_ACT_OK,
            Expect::Exactly(snat(&syn_ack, FRONTEND_TCP)),
            &[(Counter::Reply, 1)],
        ),
        packet(
            "data of the flow",
            data.to_bytes(),
            TC_ACT_OK,
            Expect::Exactly(dnat(&data, BACKEND_TCP)),
            &[(Counter::Established, 1)],
        ),
        packet(
            "FIN from the client",
            fin.to_bytes(),
            TC_ACT_OK,
            Expect::Exactly(dnat(&fin, BACKEND_TCP)),
            &[(Counter::Established, 1)],
        ),
        packet(
            "FIN from the backend",
            backend_fin.to_bytes(),
            TC_ACT_OK,
            Expect::Exactly(snat(&backend_fin, FRONTEND_TCP)),
            &[(Counter::Reply, 1)],
        ),
    ]
}

fn scenarios() -> Vec<Scenario> {
    let mut scenarios = vec![Scenario {
        name: "TCP flow to a one-backend service: SYN, reply, data, FINs",
        steps: tcp_flow_steps(),
    }];

    let multi_syn = tcp(CLIENT, FRONTEND_MULTI, TCP_SYN);
    let multi_data = tcp(CLIENT, FRONTEND_MULTI, TCP_ACK).with_payload(b"more");
    scenarios.push(Scenario {
        name: "TCP SYN to a three-backend service, then the flow sticks",
        steps: vec![
            packet(
                "SYN",
                multi_syn.to_bytes(),
                TC_ACT_OK,
                Expect::Sticky(BACKENDS_MULTI.iter().map(|b| dnat(&multi_syn, b)).collect()),
                &[(Counter::NewFlow, 1)],
            ),
            packet(
                "ACK with data",
                multi_data.to_bytes(),
                TC_ACT_OK,
                Expect::Sticky(
                    BACKENDS_MULTI
                        .iter()
                        .map(|b| dnat(&multi_data, b))
                        .collect(),
                ),
                &[(Counter::Established, 1)],
            ),
            packet(
                "ACK with data again",
                multi_data.to_bytes(),
                TC_ACT_OK,
                Expect::Sticky(
                    BACKENDS_MULTI
                        .iter()
                        .map(|b| dnat(&multi_data, b))
                        .collect(),
                ),
                &[(Counter::Established, 1)],
            ),
        ],
    });

    let query = udp(CLIENT, FRONTEND_UDP);
    let answer = Frame::udp(sa(BACKEND_UDP), sa(CLIENT), b"answer!");
    scenarios.push(Scenario {
        name: "UDP with checksum: new flow, reply, established",
        steps: vec![
            packet(
                "query",
                query.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&query, BACKEND_UDP)),
                &[(Counter::NewFlow, 1)],
            ),
            packet(
                "answer",
                answer.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(snat(&answer, FRONTEND_UDP)),
                &[(Counter::Reply, 1)],
            ),
            packet(
                "second query",
                query.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&query, BACKEND_UDP)),
                &[(Counter::Established, 1)],
            ),
        ],
    });

    let bare_query = udp(CLIENT, FRONTEND_UDP).without_udp_checksum();
    let bare_answer = Frame::udp(sa(BACKEND_UDP), sa(CLIENT), b"a").without_udp_checksum();
    scenarios.push(Scenario {
        name: "UDP with checksum 0: it stays 0 both ways",
        steps: vec![
            packet(
                "query",
                bare_query.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&bare_query, BACKEND_UDP)),
                &[(Counter::NewFlow, 1)],
            ),
            packet(
                "answer",
                bare_answer.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(snat(&bare_answer, FRONTEND_UDP)),
                &[(Counter::Reply, 1)],
            ),
        ],
    });

    scenarios.push(Scenario {
        name: "not a service: untouched",
        steps: vec![
            packet(
                "TCP to an address that is no frontend",
                tcp(CLIENT, "198.19.7.7:80", TCP_SYN).to_bytes(),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
            packet(
                "TCP to a port the ClusterIP does not have",
                tcp(CLIENT, "198.19.0.10:81", TCP_SYN).to_bytes(),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
            packet(
                "UDP to a port that exists only for TCP",
                udp(CLIENT, FRONTEND_TCP).to_bytes(),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
            packet(
                "ICMP echo to the ClusterIP",
                Frame::icmp_echo(*sa(CLIENT).ip(), *sa(FRONTEND_TCP).ip()).to_bytes(),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
            packet(
                "IPv6 frame",
                {
                    let mut frame = tcp(CLIENT, FRONTEND_TCP, TCP_SYN).to_bytes();
                    frame[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
                    frame
                },
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
            packet(
                "reply from a backend to a client without a flow",
                tcp(BACKEND_TCP, CLIENT, TCP_ACK).to_bytes(),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Pass, 1)],
            ),
        ],
    });

    let same_sum_syn = tcp(CLIENT, FRONTEND_SAME_SUM, TCP_SYN).with_payload(b"hi");
    let same_sum_reply = tcp(BACKEND_SAME_SUM, CLIENT, TCP_SYN | TCP_ACK);
    scenarios.push(Scenario {
        name: "address change that leaves the L4 sum unchanged: port via the helper",
        steps: vec![
            packet(
                "SYN",
                same_sum_syn.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&same_sum_syn, BACKEND_SAME_SUM)),
                &[(Counter::NewFlow, 1)],
            ),
            packet(
                "SYN-ACK",
                same_sum_reply.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(snat(&same_sum_reply, FRONTEND_SAME_SUM)),
                &[(Counter::Reply, 1)],
            ),
        ],
    });

    let empty_syn = tcp(CLIENT, FRONTEND_EMPTY_TCP, TCP_SYN);
    let empty_syn_data = tcp(CLIENT, FRONTEND_EMPTY_TCP, TCP_SYN).with_payload(b"fast open");
    let empty_ack = tcp(CLIENT, FRONTEND_EMPTY_TCP, TCP_ACK).with_tcp(TCP_ACK, 77, 0xdead_beef);
    let empty_rst = tcp(CLIENT, FRONTEND_EMPTY_TCP, TCP_RST);
    let empty_udp = udp(CLIENT, FRONTEND_EMPTY_UDP);
    let empty_udp_options =
        udp(CLIENT, FRONTEND_EMPTY_UDP).with_ip_options(&[1, 1, 1, 1, 1, 1, 1, 0]);
    scenarios.push(Scenario {
        name: "service without ready backend: RST / ICMP port unreachable back to the client",
        steps: vec![
            packet(
                "SYN gets RST|ACK",
                empty_syn.to_bytes(),
                TC_ACT_REDIRECT,
                Expect::Exactly(empty_syn.expected_reset()),
                &[(Counter::NoBackend, 1)],
            ),
            packet(
                "SYN with data gets RST|ACK acknowledging the data",
                empty_syn_data.to_bytes(),
                TC_ACT_REDIRECT,
                Expect::Exactly(empty_syn_data.expected_reset()),
                &[(Counter::NoBackend, 1)],
            ),
            packet(
                "ACK without a flow gets RST with seq = its ack",
                empty_ack.to_bytes(),
                TC_ACT_REDIRECT,
                Expect::Exactly(empty_ack.expected_reset()),
                &[(Counter::NoBackend, 1)],
            ),
            packet(
                "RST is dropped, never answered",
                empty_rst.to_bytes(),
                TC_ACT_SHOT,
                Expect::Unchanged,
                &[(Counter::NoBackend, 1)],
            ),
            packet(
                "UDP gets ICMP port unreachable",
                empty_udp.to_bytes(),
                TC_ACT_REDIRECT,
                Expect::Exactly(empty_udp.expected_port_unreachable()),
                &[(Counter::NoBackend, 1)],
            ),
            packet(
                "UDP with IP options: the quote has the whole header",
                empty_udp_options.to_bytes(),
                TC_ACT_REDIRECT,
                Expect::Exactly(empty_udp_options.expected_port_unreachable()),
                &[(Counter::NoBackend, 1)],
            ),
        ],
    });

    let reject_syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN);
    scenarios.push(Scenario {
        name: "SERVICE_F_REJECT refuses new connections despite backends",
        steps: vec![
            Step::Update {
                what: "set SERVICE_F_REJECT",
                apply: |datapath| {
                    datapath.set_service(
                        &sa(FRONTEND_TCP),
                        proto::TCP,
                        &ServiceValue {
                            id: SVC_TCP,
                            backend_count: 1,
                            flags: SERVICE_F_REJECT,
                            ..Default::default()
                        },
                    )
                },
            },
            packet(
                "SYN gets RST|ACK",
                reject_syn.to_bytes(),
                TC_ACT_REDIRECT,
                Expect::Exactly(reject_syn.expected_reset()),
                &[(Counter::NoBackend, 1)],
            ),
        ],
    });

    let gone_syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN);
    let gone_data = tcp(CLIENT, FRONTEND_TCP, TCP_ACK | TCP_PSH)
        .with_tcp(TCP_ACK | TCP_PSH, 0x1000_0001, 0x3000_0001)
        .with_payload(b"still there?");
    let gone_rst = tcp(CLIENT, FRONTEND_TCP, TCP_RST);
    scenarios.push(Scenario {
        name: "TCP flow whose backend left every EndpointSlice gets RST",
        steps: vec![
            packet(
                "SYN",
                gone_syn.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&gone_syn, BACKEND_TCP)),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Update {
                what: "the backend leaves the service",
                apply: |datapath| {
                    datapath.set_service(
                        &sa(FRONTEND_TCP),
                        proto::TCP,
                        &ServiceValue {
                            id: SVC_TCP,
                            backend_count: 0,
                            ..Default::default()
                        },
                    )?;
                    datapath.remove_backend(ID_BACKEND_TCP, &sa(BACKEND_TCP), proto::TCP)
                },
            },
            packet(
                "data of the flow gets RST",
                gone_data.to_bytes(),
                TC_ACT_REDIRECT,
                Expect::Exactly(gone_data.expected_reset()),
                &[(Counter::BackendGone, 1)],
            ),
            Step::FlowExists {
                key: flow_key(CLIENT, proto::TCP, SVC_TCP),
                exists: false,
            },
            packet(
                "the client's RST then finds no flow and no backend: dropped",
                gone_rst.to_bytes(),
                TC_ACT_SHOT,
                Expect::Unchanged,
                &[(Counter::NoBackend, 1)],
            ),
        ],
    });

    let replaced_syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN);
    let replaced_data = tcp(CLIENT, FRONTEND_TCP, TCP_ACK).with_payload(b"x");
    scenarios.push(Scenario {
        name: "a backend replaced by another under the same id is gone for its flows",
        steps: vec![
            packet(
                "SYN",
                replaced_syn.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&replaced_syn, BACKEND_TCP)),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Update {
                what: "id 1 now holds another backend",
                apply: |datapath| {
                    datapath.remove_backend(ID_BACKEND_TCP, &sa(BACKEND_TCP), proto::TCP)?;
                    datapath.add_service(&service(
                        SVC_TCP,
                        FRONTEND_TCP,
                        proto::TCP,
                        &[(ID_BACKEND_TCP, BACKEND_TCP_2, true)],
                    ))
                },
            },
            packet(
                "data of the old flow gets RST",
                replaced_data.to_bytes(),
                TC_ACT_REDIRECT,
                Expect::Exactly(replaced_data.expected_reset()),
                &[(Counter::BackendGone, 1)],
            ),
        ],
    });

    let rebalance_query = udp(CLIENT, FRONTEND_UDP);
    let rebalance_answer = Frame::udp(sa(BACKEND_UDP_2), sa(CLIENT), b"new");
    scenarios.push(Scenario {
        name: "UDP flow whose backend left is re-balanced",
        steps: vec![
            packet(
                "query",
                rebalance_query.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&rebalance_query, BACKEND_UDP)),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Update {
                what: "the backend is replaced by another",
                apply: |datapath| {
                    datapath.add_service(&service(
                        SVC_UDP,
                        FRONTEND_UDP,
                        proto::UDP,
                        &[(ID_BACKEND_UDP_2, BACKEND_UDP_2, true)],
                    ))?;
                    datapath.remove_backend(ID_BACKEND_UDP, &sa(BACKEND_UDP), proto::UDP)
                },
            },
            packet(
                "next query goes to the new backend",
                rebalance_query.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&rebalance_query, BACKEND_UDP_2)),
                &[(Counter::BackendGone, 1), (Counter::NewFlow, 1)],
            ),
            packet(
                "the new backend's answer is reverse-translated",
                rebalance_answer.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(snat(&rebalance_answer, FRONTEND_UDP)),
                &[(Counter::Reply, 1)],
            ),
        ],
    });

    let ready_syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN);
    let ready_data = tcp(CLIENT, FRONTEND_TCP, TCP_ACK).with_payload(b"keep going");
    let ready_reply = tcp(BACKEND_TCP, CLIENT, TCP_ACK).with_payload(b"ok");
    let other_client_syn = tcp(CLIENT_2, FRONTEND_TCP, TCP_SYN);
    scenarios.push(Scenario {
        name: "a NOT_READY backend keeps its established flow, takes no new one",
        steps: vec![
            packet(
                "SYN",
                ready_syn.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&ready_syn, BACKEND_TCP)),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Update {
                what: "the backend becomes not ready (terminating)",
                apply: |datapath| {
                    datapath.set_service(
                        &sa(FRONTEND_TCP),
                        proto::TCP,
                        &ServiceValue {
                            id: SVC_TCP,
                            backend_count: 0,
                            ..Default::default()
                        },
                    )?;
                    let backend = sa(BACKEND_TCP);
                    datapath.set_backend(
                        ID_BACKEND_TCP,
                        &Backend {
                            addr: be_addr(&backend),
                            port: be_port(&backend),
                            proto: proto::TCP,
                            flags: BACKEND_F_ACTIVE | BACKEND_F_NOT_READY,
                        },
                    )
                },
            },
            packet(
                "data of the flow still reaches it",
                ready_data.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&ready_data, BACKEND_TCP)),
                &[(Counter::Established, 1)],
            ),
            packet(
                "its reply is still reverse-translated",
                ready_reply.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(snat(&ready_reply, FRONTEND_TCP)),
                &[(Counter::Reply, 1)],
            ),
            packet(
                "a new client is refused",
                other_client_syn.to_bytes(),
                TC_ACT_REDIRECT,
                Expect::Exactly(other_client_syn.expected_reset()),
                &[(Counter::NoBackend, 1)],
            ),
        ],
    });

    let syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN).to_bytes();
    let udp_query = udp(CLIENT, FRONTEND_UDP).to_bytes();
    scenarios.push(Scenario {
        name: "truncated or inconsistent headers to a frontend: passed untouched",
        steps: vec![
            // BPF_PROG_TEST_RUN (6.18) refuses frames shorter than Ethernet
            // plus the minimum header of their ethertype (34 bytes for
            // IPv4), so shorter truncations cannot be shown to the program;
            // its bounds checks for them are what the verifier demands.
            packet(
                "IPv4 header only, total length claims a TCP header",
                syn[..34].to_vec(),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Malformed, 1)],
            ),
            packet(
                "IHL 6 but the frame ends after 20 bytes of header",
                {
                    let mut frame = with_total_length(&syn[..34], 24);
                    frame[14] = 0x46;
                    frame
                },
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Malformed, 1)],
            ),
            packet(
                "total length shorter than the IPv4 header",
                with_total_length(&syn, 16),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Malformed, 1)],
            ),
            packet(
                "total length beyond the frame",
                syn[..44].to_vec(),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Malformed, 1)],
            ),
            packet(
                "TCP header cut at 10 bytes (consistent total length)",
                with_total_length(&syn[..44], 30),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Malformed, 1)],
            ),
            packet(
                "UDP header cut at 4 bytes (consistent total length)",
                with_total_length(&udp_query[..38], 24),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Malformed, 1)],
            ),
            packet(
                "IHL below 5",
                {
                    let mut frame = syn.clone();
                    frame[14] = 0x44;
                    frame
                },
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Malformed, 1)],
            ),
            packet(
                "IP version 6 in an IPv4 ethertype",
                {
                    let mut frame = syn.clone();
                    frame[14] = 0x65;
                    frame
                },
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Malformed, 1)],
            ),
            packet(
                "TCP data offset below 5",
                {
                    let mut frame = syn.clone();
                    frame[14 + 20 + 12] = 0x40;
                    frame
                },
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Malformed, 1)],
            ),
        ],
    });

    let options_syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN)
        // Record route (type 7, length 11, pointer 4) padded with end-of-options.
        .with_ip_options(&[7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
    let options_reply = tcp(BACKEND_TCP, CLIENT, TCP_SYN | TCP_ACK).with_ip_options(&[1, 1, 1, 0]);
    scenarios.push(Scenario {
        name: "IP options: L4 found after IHL*4, translated both ways",
        steps: vec![
            packet(
                "SYN with 12 bytes of options",
                options_syn.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&options_syn, BACKEND_TCP)),
                &[(Counter::NewFlow, 1)],
            ),
            packet(
                "SYN-ACK with 4 bytes of options",
                options_reply.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(snat(&options_reply, FRONTEND_TCP)),
                &[(Counter::Reply, 1)],
            ),
        ],
    });

    let datagram = Frame::udp(sa(CLIENT), sa(FRONTEND_UDP), &[0x5a; 64]);
    let first_fragment = datagram.clone().first_fragment(24);
    let mut second_fragment = datagram.clone();
    second_fragment.ip.fragment_offset = 3;
    second_fragment.ip.dont_fragment = false;
    second_fragment.l4 = lb_tests::packet::frame::L4::Raw(vec![0x5a; 48]);
    scenarios.push(Scenario {
        name: "fragments: the first is translated, later ones pass untouched",
        steps: vec![
            packet(
                "first fragment (MF, offset 0)",
                first_fragment.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&first_fragment, BACKEND_UDP)),
                &[(Counter::NewFlow, 1)],
            ),
            packet(
                "second fragment (offset 24 bytes)",
                second_fragment.to_bytes(),
                TC_ACT_OK,
                Expect::Unchanged,
                &[(Counter::Fragment, 1)],
            ),
        ],
    });

    let expiring_query = udp(CLIENT, FRONTEND_UDP);
    scenarios.push(Scenario {
        name: "an expired UDP flow is replaced by a new one",
        steps: vec![
            packet(
                "query",
                expiring_query.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&expiring_query, BACKEND_UDP)),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Update {
                what: "age the flow past the UDP timeout",
                apply: |datapath| {
                    let key = flow_key(CLIENT, proto::UDP, SVC_UDP);
                    let mut flow = datapath.flow(&key)?.expect("flow after the first query");
                    flow.last_seen -= DatapathConfig::DEFAULT.udp_timeout + 5;
                    datapath.set_flow(&key, &flow)
                },
            },
            packet(
                "next query is a new flow",
                expiring_query.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&expiring_query, BACKEND_UDP)),
                &[(Counter::NewFlow, 1)],
            ),
        ],
    });

    // internalTrafficPolicy Local without a local endpoint: the agent
    // writes backend_count 0 with SERVICE_F_DROP; the remote endpoints
    // stay listed (LB_BACKENDS, LB_REVNAT), so established flows keep
    // going while new connections are dropped silently, as kube-proxy's
    // DROP rule does (no RST, no ICMP).
    let local_syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN);
    let local_data = tcp(CLIENT, FRONTEND_TCP, TCP_ACK | TCP_PSH)
        .with_tcp(TCP_ACK | TCP_PSH, 0x1000_0001, 0x3000_0001)
        .with_payload(b"still local?");
    let local_reply = tcp(BACKEND_TCP, CLIENT, TCP_ACK).with_payload(b"yes");
    let local_new_syn = tcp(CLIENT_2, FRONTEND_TCP, TCP_SYN);
    let local_new_ack = tcp(CLIENT_2, FRONTEND_TCP, TCP_ACK).with_payload(b"x");
    let local_new_rst = tcp(CLIENT_2, FRONTEND_TCP, TCP_RST);
    scenarios.push(Scenario {
        name: "SERVICE_F_DROP: no ready backend drops new TCP connections, established flows go on",
        steps: vec![
            Step::Update {
                what: "SERVICE_F_DROP with a ready backend",
                apply: |datapath| {
                    datapath.set_service(
                        &sa(FRONTEND_TCP),
                        proto::TCP,
                        &ServiceValue {
                            id: SVC_TCP,
                            backend_count: 1,
                            flags: SERVICE_F_DROP,
                            ..Default::default()
                        },
                    )
                },
            },
            packet(
                "with a ready backend the flag changes nothing: SYN balanced",
                local_syn.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&local_syn, BACKEND_TCP)),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Update {
                what: "no ready backend left (the endpoint stays listed)",
                apply: |datapath| {
                    datapath.set_service(
                        &sa(FRONTEND_TCP),
                        proto::TCP,
                        &ServiceValue {
                            id: SVC_TCP,
                            backend_count: 0,
                            flags: SERVICE_F_DROP,
                            ..Default::default()
                        },
                    )
                },
            },
            packet(
                "data of the established flow still reaches its backend",
                local_data.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&local_data, BACKEND_TCP)),
                &[(Counter::Established, 1)],
            ),
            packet(
                "and its reply is reverse-translated",
                local_reply.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(snat(&local_reply, FRONTEND_TCP)),
                &[(Counter::Reply, 1)],
            ),
            packet(
                "a new client's SYN is dropped, not answered",
                local_new_syn.to_bytes(),
                TC_ACT_SHOT,
                Expect::Unchanged,
                &[(Counter::NoBackend, 1)],
            ),
            Step::FlowExists {
                key: flow_key(CLIENT_2, proto::TCP, SVC_TCP),
                exists: false,
            },
            packet(
                "an ACK without a flow is dropped, not reset",
                local_new_ack.to_bytes(),
                TC_ACT_SHOT,
                Expect::Unchanged,
                &[(Counter::NoBackend, 1)],
            ),
            packet(
                "a RST without a flow is dropped",
                local_new_rst.to_bytes(),
                TC_ACT_SHOT,
                Expect::Unchanged,
                &[(Counter::NoBackend, 1)],
            ),
            Step::ServiceDrops {
                service_id: SVC_TCP,
                reason: DropReason::NoBackend,
                total: 3,
            },
            Step::FlowExists {
                key: flow_key(CLIENT, proto::TCP, SVC_TCP),
                exists: true,
            },
        ],
    });

    let local_query = udp(CLIENT, FRONTEND_UDP);
    let local_new_query = udp(CLIENT_2, FRONTEND_UDP);
    scenarios.push(Scenario {
        name: "SERVICE_F_DROP: no ready backend drops new UDP flows without ICMP",
        steps: vec![
            packet(
                "query while the backend is ready",
                local_query.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&local_query, BACKEND_UDP)),
                &[(Counter::NewFlow, 1)],
            ),
            Step::Update {
                what: "no ready backend left, SERVICE_F_DROP (the endpoint stays listed)",
                apply: |datapath| {
                    datapath.set_service(
                        &sa(FRONTEND_UDP),
                        proto::UDP,
                        &ServiceValue {
                            id: SVC_UDP,
                            backend_count: 0,
                            flags: SERVICE_F_DROP,
                            ..Default::default()
                        },
                    )
                },
            },
            packet(
                "the tracked client's next query still goes to its backend",
                local_query.to_bytes(),
                TC_ACT_OK,
                Expect::Exactly(dnat(&local_query, BACKEND_UDP)),
                &[(Counter::Established, 1)],
            ),
            packet(
                "a new client's query is dropped, no ICMP unreachable",
                local_new_query.to_bytes(),
                TC_ACT_SHOT,
                Expect::Unchanged,
                &[(Counter::NoBackend, 1)],
            ),
            Step::ServiceDrops {
                service_id: SVC_UDP,
                reason: DropReason::NoBackend,
                total: 1,
            },
        ],
    });

    scenarios
}

/// `frame` with the IPv4 total length set to `total_len` and the header
/// checksum recomputed, so only the L4 header is short.
fn with_total_length(frame: &[u8], total_len: u16) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[16..18].copy_from_slice(&total_len.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let check = lb_tests::packet::checksum::internet_checksum(&[&frame[14..34]]);
    frame[24..26].copy_from_slice(&check.to_be_bytes());
    frame
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "packet tests load BPF programs and need root");
}

fn load_cluster() -> Datapath {
    require_root();
    let mut datapath = Datapath::load().expect("load the datapath object");
    for spec in cluster() {
        datapath.add_service(&spec).expect("write a service");
    }
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

/// Runs one scenario on a fresh datapath; returns the first failure.
fn run_scenario(scenario: &Scenario) -> Result<(), String> {
    let mut datapath = load_cluster();
    let mut sticky: Option<usize> = None;
    for step in &scenario.steps {
        match step {
            Step::Update { what, apply } => {
                apply(&mut datapath).map_err(|error| format!("update '{what}': {error:?}"))?;
            }
            Step::FlowExists { key, exists } => {
                let flow = datapath
                    .flow(key)
                    .map_err(|error| format!("flow lookup: {error:?}"))?;
                if flow.is_some() != *exists {
                    return Err(format!(
                        "flow {key:?}: expected exists={exists}, found {flow:?}"
                    ));
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
                input,
                verdict,
                expect,
                counters,
            } => {
                let before = datapath.counters().map_err(|e| format!("{e:?}"))?;
                let output = datapath
                    .run(input)
                    .map_err(|error| format!("{what}: test run: {error:?}"))?;
                let after = datapath.counters().map_err(|e| format!("{e:?}"))?;
                if output.verdict != *verdict {
                    return Err(format!(
                        "{what}: verdict {} expected {verdict}\n  input  {}\n  output {}",
                        output.verdict,
                        describe(input),
                        describe(&output.frame)
                    ));
                }
                match expect {
                    Expect::Unchanged => {
                        if output.frame != *input {
                            return Err(mismatch(what, &output.frame, input));
                        }
                    }
                    Expect::Exactly(frame) => {
                        let expected = frame.to_bytes();
                        if output.frame != expected {
                            return Err(mismatch(what, &output.frame, &expected));
                        }
                    }
                    Expect::Sticky(frames) => {
                        let expected: Vec<Vec<u8>> = frames.iter().map(Frame::to_bytes).collect();
                        let Some(index) = expected.iter().position(|e| *e == output.frame) else {
                            return Err(mismatch(what, &output.frame, &expected[0]));
                        };
                        if let Some(previous) = sticky
                            && previous != index
                        {
                            return Err(format!(
                                "{what}: went to candidate {index}, the flow started on {previous}"
                            ));
                        }
                        sticky = Some(index);
                    }
                }
                let deltas = after.since(&before);
                let expected: std::collections::BTreeMap<&str, u64> =
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
fn packet_table() {
    let failures: Vec<String> = scenarios()
        .iter()
        .filter_map(|scenario| {
            run_scenario(scenario)
                .err()
                .map(|error| format!("scenario '{}': {error}", scenario.name))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// New flows spread over every ready backend (random slot choice): with
/// 3 backends and 60 flows, missing one has probability 3 * (2/3)^60 < 1e-10.
#[test]
fn new_flows_spread_over_all_ready_backends() {
    let mut datapath = load_cluster();
    let mut seen = std::collections::BTreeSet::new();
    for port in 0..60u16 {
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 20), 30000 + port);
        let syn = Frame::tcp(client, sa(FRONTEND_MULTI), TCP_SYN);
        let output = datapath.run(&syn.to_bytes()).expect("test run");
        assert_eq!(output.verdict, TC_ACT_OK);
        let backend = BACKENDS_MULTI
            .iter()
            .position(|b| output.frame == syn.clone().with_dst(sa(b)).to_bytes())
            .unwrap_or_else(|| panic!("not translated to a backend: {}", describe(&output.frame)));
        seen.insert(backend);
        let key = FlowKey {
            client_addr: be_addr(&client),
            client_port: be_port(&client),
            proto: proto::TCP,
            _pad: 0,
            service_id: SVC_MULTI,
        };
        let flow = datapath
            .flow(&key)
            .expect("flow lookup")
            .expect("flow created");
        assert_eq!(flow.backend_id, ID_BACKENDS_MULTI[backend]);
    }
    assert_eq!(seen.len(), 3, "backends chosen: {seen:?}");
    assert_eq!(datapath.flow_count().expect("count flows"), 60);
}

/// The conntrack entry holds what both directions need, and TCP state.
#[test]
fn flow_entry_records_frontend_backend_and_tcp_state() {
    let mut datapath = load_cluster();
    let key = flow_key(CLIENT, proto::TCP, SVC_TCP);
    for step in tcp_flow_steps() {
        let Step::Packet { input, verdict, .. } = step else {
            unreachable!()
        };
        assert_eq!(datapath.run(&input).expect("test run").verdict, verdict);
    }
    let flow: Flow = datapath.flow(&key).expect("lookup").expect("flow exists");
    let (frontend, backend) = (sa(FRONTEND_TCP), sa(BACKEND_TCP));
    assert_eq!(flow.frontend_addr, be_addr(&frontend));
    assert_eq!(flow.frontend_port, be_port(&frontend));
    assert_eq!(flow.backend_addr, be_addr(&backend));
    assert_eq!(flow.backend_port, be_port(&backend));
    assert_eq!(flow.backend_id, ID_BACKEND_TCP);
    assert_eq!(
        flow.flags,
        FLOW_F_REPLY_SEEN | FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND,
        "flags {:#x}",
        flow.flags
    );
    assert_ne!(flow.last_seen, 0);
}

/// A flow that closed (FIN both ways) expires after the closing timeout,
/// not the established one; a new SYN then starts a new flow.
#[test]
fn closed_tcp_flow_uses_the_closing_timeout() {
    let mut datapath = load_cluster();
    let key = flow_key(CLIENT, proto::TCP, SVC_TCP);
    for step in tcp_flow_steps() {
        let Step::Packet { input, .. } = step else {
            unreachable!()
        };
        datapath.run(&input).expect("test run");
    }
    let mut flow = datapath.flow(&key).expect("lookup").expect("flow exists");
    flow.last_seen -= DatapathConfig::DEFAULT.tcp_closing_timeout + 1;
    datapath.set_flow(&key, &flow).expect("age the flow");

    let before = datapath.counters().expect("counters");
    let syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN);
    let output = datapath.run(&syn.to_bytes()).expect("test run");
    assert_eq!(output.verdict, TC_ACT_OK);
    assert_eq!(output.frame, dnat(&syn, BACKEND_TCP).to_bytes());
    let after = datapath.counters().expect("counters");
    assert_eq!(
        after.since(&before),
        [(Counter::NewFlow.name(), 1)].into_iter().collect()
    );
    let flow = datapath.flow(&key).expect("lookup").expect("flow exists");
    assert_eq!(flow.flags, 0, "the new flow starts without TCP state");
}

/// Log lines cost ~100 ns each: the datapath writes them only while
/// `CONFIG_F_LOG` is set, and then for events (a new flow), not for every
/// packet of an established flow.
#[test]
fn log_lines_only_with_the_runtime_switch() {
    let mut datapath = load_cluster();
    let run = |datapath: &mut Datapath, frame: &Frame| {
        assert_eq!(
            datapath.run(&frame.to_bytes()).expect("test run").verdict,
            TC_ACT_OK
        );
        datapath
            .drain_log_records()
            .expect("read the log ring buffer")
    };

    let quiet = tcp(CLIENT, FRONTEND_TCP, TCP_SYN);
    assert_eq!(run(&mut datapath, &quiet), 0, "logged with the switch off");

    datapath
        .set_config(&DatapathConfig {
            flags: CONFIG_F_LOG,
            ..DatapathConfig::DEFAULT
        })
        .expect("switch logging on");
    let logged = tcp(CLIENT_2, FRONTEND_TCP, TCP_SYN);
    assert_eq!(run(&mut datapath, &logged), 1, "one line for a new flow");
    let established = tcp(CLIENT_2, FRONTEND_TCP, TCP_ACK);
    assert_eq!(
        run(&mut datapath, &established),
        0,
        "established packets are not logged"
    );
}

/// A client that reuses its port for a new connection while the old one
/// is still closing stays on the same backend, and the flow's TCP state
/// starts over (the new connection gets the established timeout).
#[test]
fn syn_on_a_closing_flow_starts_its_tcp_state_over() {
    let mut datapath = load_cluster();
    let key = flow_key(CLIENT, proto::TCP, SVC_TCP);
    for step in tcp_flow_steps() {
        let Step::Packet { input, .. } = step else {
            unreachable!()
        };
        datapath.run(&input).expect("test run");
    }
    let closing = datapath.flow(&key).expect("lookup").expect("flow exists");
    assert_eq!(
        closing.flags & (FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND),
        FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND
    );

    let before = datapath.counters().expect("counters");
    let syn = tcp(CLIENT, FRONTEND_TCP, TCP_SYN).with_tcp(TCP_SYN, 0x5000_0000, 0);
    let output = datapath.run(&syn.to_bytes()).expect("test run");
    assert_eq!(output.verdict, TC_ACT_OK);
    assert_eq!(output.frame, dnat(&syn, BACKEND_TCP).to_bytes());
    assert_eq!(
        datapath.counters().expect("counters").since(&before),
        [(Counter::Established.name(), 1)].into_iter().collect()
    );
    let reopened = datapath.flow(&key).expect("lookup").expect("flow exists");
    assert_eq!(reopened.flags, 0, "flags {:#x}", reopened.flags);
    assert_eq!(reopened.backend_id, closing.backend_id);
}

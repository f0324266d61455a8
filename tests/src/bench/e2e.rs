//! End to end, four ways in the same run: a client pod reaches a Service
//! with three backend pods straight by pod IP (the ceiling), through this
//! datapath (the agent, from manifests), through kube-proxy's iptables
//! rules and through its nftables rules (see [`super::kube_proxy`]), each
//! with 1 to 10,000 Services programmed and the measured one last.
//!
//! Each way gets a testbed of its own (one node namespace, a client pod and
//! three backend pods), built side by side; each round measures every way
//! in turn, in [`BATCHES`] slices, so ratios compare figures taken moments
//! apart.

use std::net::SocketAddrV4;
use std::time::Duration;

use super::kube_proxy::{self, ServicePort};
use super::load::{self, Expect};
use super::services::{self, fillers, service_ip};
use super::stats::{Summary, p50_p99_us};
use super::{Plan, Result};
use crate::fixture::OneNode;
use crate::manifests::{NAMESPACE, Protocol};

/// The backends' TCP and UDP ports, and the Service's.
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
/// Pod CIDR of the testbed (kube-proxy's `--cluster-cidr`).
const CLUSTER_CIDR: &str = "198.18.0.0/16";
/// Exchanges before the first round (neighbour entries, lazy setup).
const WARM_UP: usize = 20;
/// Each round runs every way this many times in turn, a slice of the
/// round's work each time.
const BATCHES: usize = 10;
/// Manifest files hold this many Services each.
const SERVICES_PER_FILE: usize = 1_000;

/// How the client reaches the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Way {
    Direct,
    Datapath,
    Iptables,
    Nftables,
}

impl Way {
    pub const ALL: [Way; 4] = [Way::Direct, Way::Datapath, Way::Iptables, Way::Nftables];

    pub fn label(self) -> &'static str {
        match self {
            Way::Direct => "pod IP (no service)",
            Way::Datapath => "this datapath",
            Way::Iptables => "kube-proxy iptables",
            Way::Nftables => "kube-proxy nftables",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Way::Direct => "bench-direct",
            Way::Datapath => "bench-lb",
            Way::Iptables => "bench-ipt",
            Way::Nftables => "bench-nft",
        }
    }
}

/// The figures of one way at one number of Services.
#[derive(Clone, Debug)]
pub struct E2eRow {
    pub way: Way,
    pub services: u32,
    /// TCP request/response on one connection, µs.
    pub tcp_p50_us: Summary,
    pub tcp_p99_us: Summary,
    /// New connections per second (connect, request, response, close).
    pub connections_per_s: Summary,
    /// UDP request/response, µs.
    pub udp_p50_us: Summary,
    pub udp_p99_us: Summary,
    /// Connections per second relative to the pod-IP way, round by round.
    pub connections_vs_direct: Summary,
    /// ... and relative to the iptables way.
    pub connections_vs_iptables: Summary,
}

#[derive(Clone, Debug)]
pub struct E2eResults {
    pub rows: Vec<E2eRow>,
    /// `iptables --version` and `nft --version` as run in the node.
    pub iptables_version: String,
    pub nft_version: String,
}

impl E2eResults {
    pub fn get(&self, way: Way, services: u32) -> Option<&E2eRow> {
        self.rows
            .iter()
            .find(|row| row.way == way && row.services == services)
    }
}

/// One way's testbed and what its client talks to.
struct Setup {
    way: Way,
    cluster: OneNode,
    tcp: SocketAddrV4,
    udp: SocketAddrV4,
    expect: Expect,
}

/// The measured Service: TCP 80 -> 8080 and UDP 53 -> 5353 on the three
/// backend pods, address after every filler's.
fn measured(cluster: &OneNode, services: u32) -> Vec<ServicePort> {
    let ip = service_ip(services - 1);
    let endpoints = |port| {
        cluster
            .backends()
            .iter()
            .map(|pod| SocketAddrV4::new(pod.addr(), port))
            .collect()
    };
    vec![
        ServicePort {
            namespace: NAMESPACE.to_owned(),
            name: "measured".to_owned(),
            port_name: "tcp".to_owned(),
            cluster_ip: ip,
            port: TCP_PORT,
            protocol: Protocol::Tcp,
            endpoints: endpoints(TCP_TARGET),
        },
        ServicePort {
            namespace: NAMESPACE.to_owned(),
            name: "measured".to_owned(),
            port_name: "udp".to_owned(),
            cluster_ip: ip,
            port: UDP_PORT,
            protocol: Protocol::Udp,
            endpoints: endpoints(UDP_TARGET),
        },
    ]
}

fn build(way: Way, services: u32) -> Result<Setup> {
    let mut cluster = OneNode::build(way.tag(), 3, &[TCP_TARGET], &[UDP_TARGET])?;
    let client = cluster.client().addr();
    let backend_names = |cluster: &OneNode| -> Vec<String> {
        cluster
            .backends()
            .iter()
            .map(|pod| pod.name().to_owned())
            .collect()
    };
    let mut ports = fillers(services - 1, 3);
    let measured_ports = measured(&cluster, services);
    let frontend = SocketAddrV4::new(measured_ports[0].cluster_ip, TCP_PORT);
    let udp_frontend = SocketAddrV4::new(measured_ports[0].cluster_ip, UDP_PORT);
    ports.extend(measured_ports.iter().cloned());
    let (tcp, udp, servers) = match way {
        Way::Direct => {
            let pod = &cluster.backends()[0];
            (
                SocketAddrV4::new(pod.addr(), TCP_TARGET),
                SocketAddrV4::new(pod.addr(), UDP_TARGET),
                vec![pod.name().to_owned()],
            )
        }
        Way::Datapath => {
            services::write_manifests(cluster.manifests(), &ports, SERVICES_PER_FILE)?;
            cluster.start_agent()?;
            let agent = cluster.agent();
            for port in &measured_ports {
                let expected: Vec<(SocketAddrV4, bool)> =
                    port.endpoints.iter().map(|e| (*e, true)).collect();
                agent.wait_for_backends(
                    SocketAddrV4::new(port.cluster_ip, port.port),
                    port.protocol,
                    &expected,
                )?;
            }
            (frontend, udp_frontend, backend_names(&cluster))
        }
        Way::Iptables => {
            let rules = kube_proxy::iptables_rules(&ports, CLUSTER_CIDR);
            kube_proxy::load_rules(
                cluster.node().ns(),
                "iptables-restore",
                &["-w", "10"],
                &rules,
            )?;
            (frontend, udp_frontend, backend_names(&cluster))
        }
        Way::Nftables => {
            let rules = kube_proxy::nftables_rules(&ports, CLUSTER_CIDR);
            kube_proxy::load_rules(cluster.node().ns(), "nft", &["-f", "-"], &rules)?;
            (frontend, udp_frontend, backend_names(&cluster))
        }
    };
    Ok(Setup {
        way,
        cluster,
        tcp,
        udp,
        expect: Expect { servers, client },
    })
}

/// What one way measured in one round.
#[derive(Default)]
struct Round {
    tcp: Vec<Duration>,
    udp: Vec<Duration>,
    connections: usize,
    connecting: Duration,
}

impl Round {
    fn tcp_p50_p99(&self) -> (f64, f64) {
        p50_p99_us(&self.tcp)
    }

    fn udp_p50_p99(&self) -> (f64, f64) {
        p50_p99_us(&self.udp)
    }

    fn rate(&self) -> f64 {
        self.connections as f64 / self.connecting.as_secs_f64()
    }
}

/// One batch of one way into `round`: `requests` TCP exchanges on a new
/// connection, up to `connections` connections (bounded by `bound`), and
/// `requests` UDP exchanges.
fn batch(
    setup: &Setup,
    requests: usize,
    connections: usize,
    bound: Duration,
    round: &mut Round,
) -> Result<()> {
    let client = setup.cluster.client();
    let (tcp, udp, expect) = (setup.tcp, setup.udp, &setup.expect);
    round
        .tcp
        .extend(client.run(|| load::tcp_latency(tcp, requests, expect))??);
    let (made, elapsed) = client.run(|| load::connections(tcp, connections, bound, expect))??;
    round.connections += made;
    round.connecting += elapsed;
    round
        .udp
        .extend(client.run(|| load::udp_latency(udp, requests, expect))??);
    Ok(())
}

/// One round: every way in turn, [`BATCHES`] times, so a burst of noise
/// from elsewhere on the machine lands on every way alike.
fn round(setups: &[Setup], plan: &Plan) -> Result<Vec<Round>> {
    let mut rounds: Vec<Round> = setups.iter().map(|_| Round::default()).collect();
    let requests = plan.e2e_requests.div_ceil(BATCHES);
    let connections = plan.e2e_connections.div_ceil(BATCHES);
    let bound = plan.e2e_time_bound / BATCHES as u32;
    for _ in 0..BATCHES {
        for (setup, round) in setups.iter().zip(&mut rounds) {
            batch(setup, requests, connections, bound, round)?;
        }
    }
    Ok(rounds)
}

fn version(setup: &Setup, program: &str) -> String {
    kube_proxy::output_of(setup.cluster.node().ns(), program, &["--version"])
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|error| format!("unknown ({error})"))
}

/// Runs the end-to-end comparison of `plan`.
pub fn measure(plan: &Plan, progress: &mut dyn FnMut(String)) -> Result<E2eResults> {
    let mut rows = Vec::new();
    let mut iptables_version = String::new();
    let mut nft_version = String::new();
    for &services in &plan.e2e_services {
        progress(format!(
            "end to end: programming {services} services four ways"
        ));
        let setups = Way::ALL
            .iter()
            .map(|&way| build(way, services))
            .collect::<Result<Vec<_>>>()?;
        for setup in &setups {
            batch(
                setup,
                WARM_UP,
                WARM_UP,
                plan.e2e_time_bound,
                &mut Round::default(),
            )?;
            match setup.way {
                Way::Iptables => iptables_version = version(setup, "iptables"),
                Way::Nftables => nft_version = version(setup, "nft"),
                Way::Direct | Way::Datapath => {}
            }
        }
        let mut rounds: Vec<Vec<Round>> = setups.iter().map(|_| Vec::new()).collect();
        for n in 0..plan.e2e_rounds {
            progress(format!(
                "end to end: {services} services, round {}/{}",
                n + 1,
                plan.e2e_rounds
            ));
            for (figures, measured) in rounds.iter_mut().zip(round(&setups, plan)?) {
                figures.push(measured);
            }
        }
        let index = |way: Way| Way::ALL.iter().position(|w| *w == way).expect("every way");
        for (setup, figures) in setups.iter().zip(&rounds) {
            let summary = |pick: &dyn Fn(&Round) -> f64| {
                Summary::of(&figures.iter().map(pick).collect::<Vec<_>>()).expect("rounds")
            };
            let ratio_to = |other: Way| {
                let base = &rounds[index(other)];
                let ratios: Vec<f64> = figures
                    .iter()
                    .zip(base)
                    .map(|(mine, theirs)| mine.rate() / theirs.rate())
                    .collect();
                Summary::of(&ratios).expect("rounds")
            };
            rows.push(E2eRow {
                way: setup.way,
                services,
                tcp_p50_us: summary(&|r| r.tcp_p50_p99().0),
                tcp_p99_us: summary(&|r| r.tcp_p50_p99().1),
                connections_per_s: summary(&|r| r.rate()),
                udp_p50_us: summary(&|r| r.udp_p50_p99().0),
                udp_p99_us: summary(&|r| r.udp_p50_p99().1),
                connections_vs_direct: ratio_to(Way::Direct),
                connections_vs_iptables: ratio_to(Way::Iptables),
            });
        }
        // The testbeds go here, before the next size is built.
        drop(setups);
    }
    Ok(E2eResults {
        rows,
        iptables_version,
        nft_version,
    })
}

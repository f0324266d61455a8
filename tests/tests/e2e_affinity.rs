//! ClientIP session affinity and Maglev selection end to end: the agent in
//! a node namespace, real TCP and UDP sockets in pod namespaces.
//!
//! Each test builds its own node with several client pods and backend pods
//! (so "other clients" exist) and its own agent. Needs root, bpffs and the
//! agent binary (`LB_AGENT_BIN`, or target/debug/lb-agent).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::time::Duration;

use lb_tests::agent::Agent;
use lb_tests::fixture::{SimpleService, backend_name};
use lb_tests::manifests::{Endpoint, ManifestDir, Protocol};
use lb_tests::topology::{Pod, Testbed, cluster_ip};
use lb_tests::traffic::{TcpServer, UdpServer};
use serde_json::{Value, json};

const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
const NODE: &str = "node";

fn client_name(n: usize) -> String {
    format!("client-{n}")
}

/// One node with `clients` client pods and `backends` backend pods running
/// TCP and UDP servers, and its agent. Field order is teardown order.
struct Cluster {
    agent: Agent,
    _tcp_servers: Vec<TcpServer>,
    _udp_servers: Vec<UdpServer>,
    manifests: ManifestDir,
    testbed: Testbed,
    clients: usize,
}

impl Cluster {
    fn start(tag: &str, clients: usize, backends: usize) -> Self {
        let mut testbed = Testbed::new(tag).expect("testbed");
        let manifests =
            ManifestDir::create(testbed.scratch().join("manifests")).expect("manifest dir");
        let node = testbed.add_node(NODE).expect("node");
        for n in 1..=clients {
            node.add_pod(&client_name(n)).expect("client pod");
        }
        for n in 1..=backends {
            node.add_pod(&backend_name(n)).expect("backend pod");
        }
        let mut tcp_servers = Vec::new();
        let mut udp_servers = Vec::new();
        for pod in &node.pods()[clients..] {
            tcp_servers.push(TcpServer::start(pod, TCP_TARGET).expect("TCP server"));
            udp_servers.push(UdpServer::start(pod, UDP_TARGET).expect("UDP server"));
        }
        let node = testbed.node(NODE);
        let agent = Agent::start(
            node,
            manifests.path(),
            &node.pod_ifaces(),
            testbed.pin_dir("agent").expect("pin dir"),
        )
        .expect("agent");
        Self {
            agent,
            _tcp_servers: tcp_servers,
            _udp_servers: udp_servers,
            manifests,
            testbed,
            clients,
        }
    }

    fn client(&self, n: usize) -> &Pod {
        self.testbed.node(NODE).pod(&client_name(n))
    }

    fn backend(&self, n: usize) -> &Pod {
        self.testbed.node(NODE).pod(&backend_name(n))
    }

    fn endpoints(&self, backends: impl IntoIterator<Item = usize>) -> Vec<Endpoint> {
        backends
            .into_iter()
            .map(|n| Endpoint::ready(self.backend(n).addr()))
            .collect()
    }

    /// Writes `service` with `spec` fields merged in and annotations, and
    /// its slice with `endpoints`; waits until the agent programmed the
    /// endpoints and `check` accepts the TCP frontend.
    fn write(
        &self,
        service: &SimpleService,
        spec: Value,
        annotations: Value,
        endpoints: &[Endpoint],
        check: impl Fn(&lb_agent::inspect::ServiceEntry) -> bool,
    ) {
        let mut value = service.service().to_value();
        for (key, field) in spec.as_object().expect("spec object") {
            value["spec"][key] = field.clone();
        }
        value["metadata"]["annotations"] = annotations;
        self.manifests
            .write(&service.service_file(), &[value])
            .expect("write Service");
        service
            .write_slice(&self.manifests, endpoints)
            .expect("write EndpointSlice");
        service
            .wait_programmed(&self.agent, endpoints)
            .unwrap_or_else(|error| panic!("{error}\n{}", self.agent.diagnostics()));
        self.agent
            .wait_for_service(service.tcp_frontend(), Protocol::Tcp, "options", check)
            .expect("options programmed");
    }
}

fn web() -> SimpleService {
    SimpleService::new("web", cluster_ip(20), (80, TCP_TARGET), (53, UDP_TARGET))
}

fn client_ip(timeout: u32) -> Value {
    json!({
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": timeout } },
    })
}

/// The backend pod that answers one new TCP connection from `client`.
fn answer(client: &Pod, frontend: SocketAddrV4) -> String {
    client
        .tcp_request(frontend, "affinity")
        .unwrap_or_else(|error| panic!("{} -> {frontend}: {error}", client.name()))
        .reply
        .server
}

#[test]
fn affinity_holds_per_client_while_clients_spread_and_switches_off() {
    let cluster = Cluster::start("aff-hold", 8, 3);
    let web = web();
    let endpoints = cluster.endpoints(1..=3);
    cluster.write(&web, client_ip(60), json!({}), &endpoints, |entry| {
        entry.affinity_timeout == 60
    });

    // One client, 100 connections: one backend.
    let tally = cluster
        .client(1)
        .tcp_spread(web.tcp_frontend(), 100)
        .expect("100 connections");
    assert_eq!(
        tally.len(),
        1,
        "client-1 spread despite affinity: {tally:?}"
    );

    // Every client sticks to one backend; together they spread (all eight
    // on one of three backends by chance: 3^-7).
    let mut chosen = BTreeMap::new();
    for n in 1..=cluster.clients {
        let tally = cluster
            .client(n)
            .tcp_spread(web.tcp_frontend(), 10)
            .expect("10 connections");
        assert_eq!(tally.len(), 1, "client-{n}: {tally:?}");
        chosen.insert(n, tally.into_keys().next().unwrap());
    }
    let used: BTreeSet<&String> = chosen.values().collect();
    assert!(used.len() > 1, "all clients on one backend: {chosen:?}");

    // `inspect affinity` lists one affinity per client (TCP frontend) and
    // the service's counters saw every connection.
    let affinities = lb_agent::inspect::affinity(cluster.agent.pin_dir()).expect("affinity");
    let entry = cluster
        .agent
        .service(web.tcp_frontend(), Protocol::Tcp)
        .expect("inspect")
        .expect("programmed");
    let ours: Vec<_> = affinities
        .iter()
        .filter(|a| a.service_id == entry.service_id)
        .collect();
    assert_eq!(ours.len(), cluster.clients, "{affinities:?}");
    for affinity in &ours {
        let n = (1..=cluster.clients)
            .find(|&n| cluster.client(n).addr() == affinity.client)
            .expect("a client's affinity");
        let backend = affinity.backend.expect("live backend");
        assert_eq!(
            cluster
                .testbed
                .node(NODE)
                .pods()
                .iter()
                .find(|p| p.addr() == *backend.ip())
                .unwrap()
                .name(),
            chosen[&n]
        );
    }
    assert_eq!(
        entry.counters.new_flows,
        100 + 10 * cluster.clients as u64,
        "{:?}",
        entry.counters
    );

    // Switched off: the next connections spread (60 on one of three: 3^-59).
    cluster.write(&web, json!({}), json!({}), &endpoints, |entry| {
        entry.affinity_timeout == 0
    });
    let tally = cluster
        .client(1)
        .tcp_spread(web.tcp_frontend(), 60)
        .expect("60 connections");
    assert!(tally.len() > 1, "affinity still applied: {tally:?}");
}

#[test]
fn affinity_expires_after_its_timeout_and_is_chosen_afresh() {
    let cluster = Cluster::start("aff-expire", 8, 3);
    let web = web();
    let endpoints = cluster.endpoints(1..=3);
    cluster.write(&web, client_ip(2), json!({}), &endpoints, |entry| {
        entry.affinity_timeout == 2
    });
    let first: Vec<String> = (1..=cluster.clients)
        .map(|n| answer(cluster.client(n), web.tcp_frontend()))
        .collect();
    // Within the timeout: the same backends.
    std::thread::sleep(Duration::from_millis(500));
    let again: Vec<String> = (1..=cluster.clients)
        .map(|n| answer(cluster.client(n), web.tcp_frontend()))
        .collect();
    assert_eq!(first, again);
    // Idle for longer than 2 s (a whole second more, the datapath counts
    // whole seconds): chosen afresh, so some client moves (all eight
    // staying by chance: 3^-8).
    std::thread::sleep(Duration::from_millis(3_500));
    let after: Vec<String> = (1..=cluster.clients)
        .map(|n| answer(cluster.client(n), web.tcp_frontend()))
        .collect();
    assert_ne!(first, after, "no affinity expired");
    // And the fresh choice sticks again.
    let sticky: Vec<String> = (1..=cluster.clients)
        .map(|n| answer(cluster.client(n), web.tcp_frontend()))
        .collect();
    assert_eq!(after, sticky);
}

#[test]
fn affinity_moves_when_its_backend_leaves_the_service() {
    let cluster = Cluster::start("aff-move", 1, 3);
    let web = web();
    let endpoints = cluster.endpoints(1..=3);
    cluster.write(&web, client_ip(600), json!({}), &endpoints, |entry| {
        entry.affinity_timeout == 600
    });
    let client = cluster.client(1);
    let first = answer(client, web.tcp_frontend());
    let index = (1..=3)
        .find(|&n| backend_name(n) == first)
        .expect("a backend answered");

    // Not ready for this Service (still listed, its id still live): the
    // affinity is not followed any more.
    let endpoints: Vec<Endpoint> = (1..=3)
        .map(|n| {
            let addr = cluster.backend(n).addr();
            if n == index {
                Endpoint::not_ready(addr)
            } else {
                Endpoint::ready(addr)
            }
        })
        .collect();
    cluster.write(&web, client_ip(600), json!({}), &endpoints, |_| true);
    let tally = client
        .tcp_spread(web.tcp_frontend(), 20)
        .expect("20 connections");
    assert_eq!(tally.len(), 1, "a new affinity sticks: {tally:?}");
    assert!(
        !tally.contains_key(&first),
        "followed a not-ready backend: {tally:?}"
    );
    let second = tally.into_keys().next().unwrap();

    // Removed from the slice altogether: moves again.
    let index = (1..=3).find(|&n| backend_name(n) == second).unwrap();
    let endpoints = cluster.endpoints((1..=3).filter(|&n| n != index));
    cluster.write(&web, client_ip(600), json!({}), &endpoints, |_| true);
    let tally = client
        .tcp_spread(web.tcp_frontend(), 20)
        .expect("20 connections");
    assert_eq!(tally.len(), 1, "{tally:?}");
    assert!(
        !tally.contains_key(&second),
        "followed a removed backend: {tally:?}"
    );
}

/// Opens a TCP connection to `frontend` from `client`'s port `port`,
/// makes one exchange and aborts it (RST, so the port is free again at
/// once and the datapath deletes the flow): the name of the backend that
/// answered. The next call with the same port is a new flow with the same
/// addresses and ports.
fn tcp_from_port(client: &Pod, port: u16, frontend: SocketAddrV4) -> String {
    fn check(ret: libc::c_int) -> io::Result<()> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(addr.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    }
    let exchange = || -> io::Result<String> {
        // SAFETY: plain socket call; the descriptor is owned by `stream`
        // right after.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        check(fd)?;
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        let abort = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let local = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        let remote = sockaddr(frontend);
        // SAFETY: each call gets a valid pointer to a value of the size
        // it is told.
        unsafe {
            check(libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            ))?;
            check(libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const abort).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            ))?;
            check(libc::bind(
                fd,
                (&raw const local).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ))?;
            check(libc::connect(
                fd,
                (&raw const remote).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ))?;
        }
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        (&stream).write_all(b"maglev\n")?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok(line.split(' ').next().unwrap_or_default().to_owned())
    };
    client
        .run(exchange)
        .expect("enter the client")
        .unwrap_or_else(|error| panic!("TCP from port {port}: {error}"))
}

#[test]
fn maglev_is_even_and_moves_about_a_tenth_when_one_of_ten_backends_leaves() {
    // Every connection ends with a RST, which deletes its flow, so a
    // second pass over the same source ports is balanced anew.
    let cluster = Cluster::start("maglev", 1, 10);
    let web = web();
    let endpoints = cluster.endpoints(1..=10);
    let maglev = json!({ lb_agent::translate::ANNOTATION_SELECTION: "maglev" });
    cluster.write(&web, json!({}), maglev.clone(), &endpoints, |entry| {
        entry.selection == "maglev"
    });
    let client = cluster.client(1);
    let ports: Vec<u16> = (20_000..20_600).collect();
    let before: Vec<String> = ports
        .iter()
        .map(|&port| tcp_from_port(client, port, web.tcp_frontend()))
        .collect();
    let mut per_backend: BTreeMap<&String, usize> = BTreeMap::new();
    for backend in &before {
        *per_backend.entry(backend).or_default() += 1;
    }
    // 600 flows hashed onto ten equal shares: each within 60 ± 30.
    assert_eq!(per_backend.len(), 10, "{per_backend:?}");
    assert!(
        per_backend.values().all(|&n| (30..=90).contains(&n)),
        "{per_backend:?}"
    );

    // The same flows again, as new flows: the same backends (the table,
    // not chance, decides).
    let replay: Vec<String> = ports
        .iter()
        .map(|&port| tcp_from_port(client, port, web.tcp_frontend()))
        .collect();
    assert_eq!(
        before, replay,
        "Maglev choice changed without a backend change"
    );

    // Backend 10 leaves.
    let endpoints = cluster.endpoints(1..=9);
    cluster.write(&web, json!({}), maglev, &endpoints, |entry| {
        entry.selection == "maglev"
    });
    let after: Vec<String> = ports
        .iter()
        .map(|&port| tcp_from_port(client, port, web.tcp_frontend()))
        .collect();
    let removed = backend_name(10);
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let moved_from_kept = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| **b != removed && b != a)
        .count();
    let share = moved as f64 / ports.len() as f64;
    println!(
        "Maglev, one of ten backends removed: {moved} of {} flows moved ({:.1} %), {moved_from_kept} of them from a kept backend",
        ports.len(),
        share * 100.0
    );
    assert!(after.iter().all(|b| *b != removed));
    assert!((0.05..0.16).contains(&share), "moved {share}");
    // Maglev moves ~0.5 % of a kept backend's flows (10.5 % - 10 %).
    assert!(
        moved_from_kept <= ports.len() / 25,
        "{moved_from_kept} kept flows moved"
    );
}

//! ClusterIP services end to end: the agent in a node namespace, the
//! datapath on the pods' veths, real TCP and UDP between pod namespaces.
//!
//! Each test builds its own testbed (one node, a client pod, backend pods
//! running servers) and its own agent, so tests run in parallel. Needs root,
//! bpffs and the agent binary (`LB_AGENT_BIN`, or target/debug/lb-agent).

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use lb_tests::agent::{Agent, START_TIMEOUT, tcx_ingress_programs};
use lb_tests::error::TestbedError;
use lb_tests::fixture::{OneNode, SimpleService, backend_name};
use lb_tests::manifests::{Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServicePort};
use lb_tests::topology::cluster_ip;
use lb_tests::traffic::{Tally, UdpExchange, udp_request};

/// Target ports every backend serves.
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;

fn web() -> SimpleService {
    SimpleService::new("web", cluster_ip(10), (80, TCP_TARGET), (53, UDP_TARGET))
}

fn all_ready(cluster: &OneNode) -> Vec<Endpoint> {
    cluster
        .backends()
        .iter()
        .map(|pod| Endpoint::ready(pod.addr()))
        .collect()
}

/// Three backends behind `web`, programmed through the watched directory
/// (the agent starts on an empty one).
fn cluster_with_web(tag: &str) -> (OneNode, SimpleService, Vec<Endpoint>) {
    let cluster = OneNode::start(tag, 3, &[TCP_TARGET], &[UDP_TARGET]).expect("cluster");
    let web = web();
    let endpoints = all_ready(&cluster);
    web.write_service(cluster.manifests())
        .expect("write Service");
    web.write_slice(cluster.manifests(), &endpoints)
        .expect("write EndpointSlice");
    web.wait_programmed(cluster.agent(), &endpoints)
        .expect("web programmed");
    (cluster, web, endpoints)
}

fn backend_names(cluster: &OneNode) -> BTreeSet<String> {
    cluster
        .backends()
        .iter()
        .map(|pod| pod.name().to_owned())
        .collect()
}

fn assert_each_at_least(tally: &Tally, expected: &BTreeSet<String>, total: usize, min_share: f64) {
    let reached: BTreeSet<String> = tally.keys().cloned().collect();
    assert_eq!(&reached, expected, "backends reached: {tally:?}");
    assert_eq!(tally.values().sum::<usize>(), total, "{tally:?}");
    for (backend, &count) in tally {
        assert!(
            count as f64 >= min_share * total as f64,
            "{backend} got {count} of {total} (under {:.0}%): {tally:?}",
            min_share * 100.0
        );
    }
}

#[test]
fn tcp_connections_spread_over_all_backends() {
    // Manifests in place before the agent starts: the initial load path.
    let mut cluster = OneNode::build("spread", 3, &[TCP_TARGET], &[UDP_TARGET]).expect("cluster");
    let web = web();
    let endpoints = all_ready(&cluster);
    web.write_service(cluster.manifests())
        .expect("write Service");
    web.write_slice(cluster.manifests(), &endpoints)
        .expect("write EndpointSlice");
    cluster.start_agent().expect("agent");
    web.wait_programmed(cluster.agent(), &endpoints)
        .expect("web programmed");

    let tally = cluster
        .client()
        .tcp_spread(web.tcp_frontend(), 300)
        .expect("300 connections");
    // Uniform choice among 3: each gets 100 ± 8 (one standard deviation);
    // under 60 is a five-sigma event.
    assert_each_at_least(&tally, &backend_names(&cluster), 300, 0.20);
}

#[test]
fn clients_talk_to_the_cluster_ip_and_backends_see_the_client() {
    let (cluster, web, _) = cluster_with_web("peer");
    let client = cluster.client();
    let names = backend_names(&cluster);

    // TCP: the client's socket is connected to the ClusterIP, the backend
    // sees the client's own address and port (no source NAT).
    let mut session = client
        .tcp_connect(web.tcp_frontend())
        .expect("connect to the ClusterIP");
    let exchange = session.exchange("who answers").expect("TCP exchange");
    assert_eq!(exchange.peer, web.tcp_frontend(), "getpeername");
    assert_eq!(*exchange.local.ip(), client.addr());
    assert_eq!(
        exchange.reply.client_seen, exchange.local,
        "the backend must see the client unchanged"
    );
    assert_eq!(exchange.reply.server_port, TCP_TARGET);
    assert_eq!(exchange.reply.echo, "who answers");
    assert!(names.contains(&exchange.reply.server), "{exchange:?}");

    // The open connection is one tracked flow, pinned to the backend that
    // answered.
    let answered = SocketAddrV4::new(
        cluster.node().pod(&exchange.reply.server).addr(),
        TCP_TARGET,
    );
    let flows = cluster.agent().conntrack().expect("inspect conntrack");
    let flow = flows
        .iter()
        .find(|flow| flow.client == exchange.local && flow.proto == "tcp")
        .unwrap_or_else(|| panic!("no flow for {} in {flows:?}", exchange.local));
    assert_eq!(flow.frontend, web.tcp_frontend(), "{flow:?}");
    assert_eq!(flow.backend, answered, "{flow:?}");
    drop(session);

    // UDP from an unconnected socket: the answer's source is the ClusterIP.
    let exchange = client
        .udp_request(web.udp_frontend(), "who answers")
        .expect("UDP exchange");
    assert_eq!(exchange.from, web.udp_frontend(), "recv_from source");
    assert_eq!(
        exchange.reply.client_seen,
        SocketAddrV4::new(client.addr(), exchange.local.port()),
        "the backend must see the client unchanged"
    );
    assert_eq!(exchange.reply.server_port, UDP_TARGET);
    assert!(names.contains(&exchange.reply.server), "{exchange:?}");

    // A connected socket only accepts datagrams from the ClusterIP, so an
    // answer at all proves the source.
    let exchange = client
        .udp_connected_request(web.udp_frontend(), "connected")
        .expect("connected UDP exchange");
    assert_eq!(exchange.from, web.udp_frontend());
}

#[test]
fn udp_requests_spread_and_every_answer_comes_from_the_cluster_ip() {
    let (cluster, web, _) = cluster_with_web("udp");
    let frontend = web.udp_frontend();
    // Each request from a new socket: a new source port, a new flow.
    let exchanges: Vec<UdpExchange> = cluster
        .client()
        .run(|| {
            (0..150)
                .map(|n| udp_request(frontend, &format!("datagram {n}")))
                .collect::<io::Result<_>>()
        })
        .expect("run in client pod")
        .expect("150 UDP exchanges");
    let mut tally = Tally::new();
    for (n, exchange) in exchanges.iter().enumerate() {
        assert_eq!(exchange.from, frontend, "answer {n}: {exchange:?}");
        assert_eq!(exchange.reply.echo, format!("datagram {n}"));
        *tally.entry(exchange.reply.server.clone()).or_default() += 1;
    }
    assert_each_at_least(&tally, &backend_names(&cluster), 150, 0.15);
}

#[test]
fn multi_port_service_with_a_named_target_port() {
    let cluster = OneNode::start("ports", 2, &[8080, 5353], &[5353]).expect("cluster");
    let ip = cluster_ip(20);
    // `http` targets the container port named `web`; the EndpointSlice,
    // like the EndpointSlice controller, carries the resolved number under
    // the Service port's name.
    let service = Service::new(
        "multi",
        ip,
        vec![
            ServicePort::tcp("http", 80, "web"),
            ServicePort::tcp("dns-tcp", 53, 5353),
            ServicePort::udp("dns-udp", 53, 5353),
        ],
    );
    let endpoints: Vec<Endpoint> = cluster
        .backends()
        .iter()
        .map(|pod| Endpoint::ready(pod.addr()))
        .collect();
    let slice = EndpointSlice::new(
        "multi",
        "abcde",
        vec![
            EndpointPort::tcp("http", 8080),
            EndpointPort::tcp("dns-tcp", 5353),
            EndpointPort::udp("dns-udp", 5353),
        ],
        endpoints.clone(),
    );
    cluster
        .manifests()
        .write("multi.yaml", &[service.to_value(), slice.to_value()])
        .expect("write manifests");

    let agent = cluster.agent();
    for (port, proto, target) in [
        (80, Protocol::Tcp, 8080),
        (53, Protocol::Tcp, 5353),
        (53, Protocol::Udp, 5353),
    ] {
        let expected: Vec<_> = endpoints
            .iter()
            .map(|endpoint| (SocketAddrV4::new(endpoint.address, target), true))
            .collect();
        agent
            .wait_for_backends(SocketAddrV4::new(ip, port), proto, &expected)
            .expect("frontend programmed");
    }

    let client = cluster.client();
    let names = backend_names(&cluster);
    for (port, target) in [(80, 8080), (53, 5353)] {
        let tally = client
            .tcp_spread(SocketAddrV4::new(ip, port), 30)
            .expect("TCP connections");
        assert_eq!(
            tally.keys().cloned().collect::<BTreeSet<_>>(),
            names,
            "tcp/{port}: {tally:?}"
        );
        let exchange = client
            .tcp_request(SocketAddrV4::new(ip, port), "port")
            .expect("TCP exchange");
        assert_eq!(
            exchange.reply.server_port, target,
            "tcp/{port} reached the wrong target port"
        );
        assert_eq!(exchange.peer, SocketAddrV4::new(ip, port));
    }
    let exchange = client
        .udp_request(SocketAddrV4::new(ip, 53), "port")
        .expect("UDP exchange");
    assert_eq!(exchange.reply.server_port, 5353);
    assert_eq!(exchange.from, SocketAddrV4::new(ip, 53));
}

#[test]
fn a_not_ready_backend_gets_no_new_connections_but_keeps_its_open_ones() {
    let (cluster, web, mut endpoints) = cluster_with_web("notready");
    let client = cluster.client();

    let mut session = client.tcp_connect(web.tcp_frontend()).expect("connect");
    let before = session
        .exchange("before")
        .expect("exchange before the change");
    let victim = before.reply.server.clone();
    let victim_addr = cluster.node().pod(&victim).addr();

    for endpoint in &mut endpoints {
        if endpoint.address == victim_addr {
            endpoint.ready = false;
        }
    }
    web.write_slice(cluster.manifests(), &endpoints)
        .expect("rewrite EndpointSlice");
    web.wait_programmed(cluster.agent(), &endpoints)
        .expect("victim not ready");

    let tally = client
        .tcp_spread(web.tcp_frontend(), 60)
        .expect("new connections");
    let mut others = backend_names(&cluster);
    others.remove(&victim);
    assert_each_at_least(&tally, &others, 60, 0.2);

    for n in 0..3 {
        let after = session
            .exchange(&format!("after {n}"))
            .expect("the open connection to a not-ready backend keeps working");
        assert_eq!(after.reply.server, victim);
        assert_eq!(after.reply.client_seen, before.reply.client_seen);
        assert_eq!(after.peer, web.tcp_frontend());
    }
}

#[test]
fn a_removed_backend_gets_no_new_connections() {
    let (cluster, web, mut endpoints) = cluster_with_web("removed");
    let removed = cluster.backend(2).addr();
    endpoints.retain(|endpoint| endpoint.address != removed);
    web.write_slice(cluster.manifests(), &endpoints)
        .expect("rewrite EndpointSlice");
    web.wait_programmed(cluster.agent(), &endpoints)
        .expect("backend-2 removed");

    let client = cluster.client();
    let mut remaining = backend_names(&cluster);
    remaining.remove(&backend_name(2));
    let tally = client
        .tcp_spread(web.tcp_frontend(), 60)
        .expect("TCP connections");
    assert_each_at_least(&tally, &remaining, 60, 0.2);
    let tally = client
        .udp_spread(web.udp_frontend(), 60)
        .expect("UDP exchanges");
    assert_each_at_least(&tally, &remaining, 60, 0.2);
}

#[test]
fn deleting_the_service_stops_translation() {
    let (cluster, web, _) = cluster_with_web("delete");
    let client = cluster.client();
    client
        .tcp_request(web.tcp_frontend(), "still there")
        .expect("works before");

    cluster
        .manifests()
        .remove(&web.service_file())
        .expect("delete Service");
    let agent = cluster.agent();
    agent
        .wait_for_no_service(web.tcp_frontend(), Protocol::Tcp)
        .expect("tcp frontend gone");
    agent
        .wait_for_no_service(web.udp_frontend(), Protocol::Udp)
        .expect("udp frontend gone");

    // Nothing routes service addresses: untranslated, the packets die at
    // the node.
    let result = client.tcp_request(web.tcp_frontend(), "gone");
    assert!(
        result.is_err(),
        "TCP to a deleted Service answered: {result:?}"
    );
    let result = client.udp_request(web.udp_frontend(), "gone");
    assert!(
        result.is_err(),
        "UDP to a deleted Service answered: {result:?}"
    );

    // Writing it again brings it back, with the slice that stayed.
    web.write_service(cluster.manifests())
        .expect("re-create Service");
    agent
        .wait_for_service(
            web.tcp_frontend(),
            Protocol::Tcp,
            "three ready backends",
            |entry| {
                entry
                    .backends
                    .iter()
                    .filter(|backend| backend.ready)
                    .count()
                    == 3
            },
        )
        .expect("tcp frontend back");
    client
        .tcp_request(web.tcp_frontend(), "back")
        .expect("works again");
}

#[test]
fn a_service_without_ready_endpoints_refuses_at_once() {
    let cluster = OneNode::start("refuse", 1, &[TCP_TARGET], &[UDP_TARGET]).expect("cluster");
    // `empty` has no EndpointSlice at all; `idle` has one whose only
    // endpoint is not ready.
    let empty = SimpleService::new("empty", cluster_ip(30), (80, TCP_TARGET), (53, UDP_TARGET));
    let idle = SimpleService::new("idle", cluster_ip(31), (80, TCP_TARGET), (53, UDP_TARGET));
    let idle_endpoints = [Endpoint::not_ready(cluster.backend(1).addr())];
    empty
        .write_service(cluster.manifests())
        .expect("write empty");
    idle.write_service(cluster.manifests()).expect("write idle");
    idle.write_slice(cluster.manifests(), &idle_endpoints)
        .expect("write idle slice");
    empty
        .wait_programmed(cluster.agent(), &[])
        .expect("empty programmed");
    idle.wait_programmed(cluster.agent(), &idle_endpoints)
        .expect("idle programmed");

    let client = cluster.client();
    for service in [&empty, &idle] {
        let started = Instant::now();
        let error = client
            .tcp_request(service.tcp_frontend(), "anyone?")
            .expect_err("connect to a Service without ready endpoints");
        let took = started.elapsed();
        assert_eq!(
            error.kind(),
            io::ErrorKind::ConnectionRefused,
            "{}: {error}",
            service.name
        );
        assert!(
            took < Duration::from_millis(500),
            "{}: refused only after {took:?}",
            service.name
        );

        let started = Instant::now();
        let error = client
            .udp_connected_request(service.udp_frontend(), "anyone?")
            .expect_err("UDP to a Service without ready endpoints");
        let took = started.elapsed();
        assert_eq!(
            error.kind(),
            io::ErrorKind::ConnectionRefused,
            "{}: {error}",
            service.name
        );
        assert!(
            took < Duration::from_millis(500),
            "{}: refused only after {took:?}",
            service.name
        );
    }
    assert_eq!(cluster.udp_servers()[0].received(), 0);
    assert_eq!(cluster.tcp_servers()[0].accepted(), 0);
}

#[test]
fn malformed_manifests_leave_good_services_programmed() {
    let (cluster, web, web_endpoints) = cluster_with_web("malformed");
    let agent = cluster.agent();
    let manifests = cluster.manifests();
    let api = SimpleService::new(
        "api",
        cluster_ip(40),
        (8000, TCP_TARGET),
        (5300, UDP_TARGET),
    );
    let mut api_endpoints = vec![Endpoint::ready(cluster.backend(1).addr())];
    api.write_service(manifests).expect("write api");
    api.write_slice(manifests, &api_endpoints)
        .expect("write api slice");
    api.wait_programmed(agent, &api_endpoints)
        .expect("api programmed");

    // 1. A file that is not YAML at all.
    manifests
        .write_text(
            "garbage.yaml",
            "apiVersion: v1\nkind: [Service\n  ::: {{{ not yaml\n",
        )
        .expect("write garbage");
    // 2. A file with a good Service next to one with an invalid field.
    let extra = SimpleService::new("extra", cluster_ip(50), (80, TCP_TARGET), (53, UDP_TARGET));
    let extra_endpoints = vec![Endpoint::ready(cluster.backend(3).addr())];
    let mut broken =
        SimpleService::new("broken", cluster_ip(51), (80, TCP_TARGET), (53, UDP_TARGET))
            .service()
            .to_value();
    broken["spec"]["ports"][0]["port"] = serde_json::json!(70000);
    manifests
        .write(
            "mixed.yaml",
            &[
                extra.service().to_value(),
                extra.slice(&extra_endpoints).to_value(),
                broken,
            ],
        )
        .expect("write mixed");
    // 3. The good `web` Service turns invalid: its last good version stays.
    let mut invalid_web = web.service().to_value();
    invalid_web["spec"]["clusterIP"] = serde_json::json!("not-an-ip");
    invalid_web["spec"]["clusterIPs"] = serde_json::json!(["not-an-ip"]);
    manifests
        .write(&web.service_file(), &[invalid_web])
        .expect("break web");
    // 4. Last, a valid change: once it shows, the agent has read all of the above.
    api_endpoints.push(Endpoint::ready(cluster.backend(2).addr()));
    api.write_slice(manifests, &api_endpoints)
        .expect("grow api");
    api.wait_programmed(agent, &api_endpoints)
        .expect("api grew");
    extra
        .wait_programmed(agent, &extra_endpoints)
        .expect("extra programmed");

    agent
        .ensure_running()
        .expect("the agent survives bad input");
    web.wait_programmed(agent, &web_endpoints)
        .expect("web keeps its last good version");
    let broken_frontend = SocketAddrV4::new(cluster_ip(51), 80);
    let programmed = agent
        .service(broken_frontend, Protocol::Tcp)
        .expect("inspect");
    assert!(
        programmed.is_none(),
        "the invalid Service must not be programmed: {programmed:?}"
    );

    let client = cluster.client();
    let tally = client
        .tcp_spread(web.tcp_frontend(), 30)
        .expect("web still works");
    assert_eq!(
        tally.keys().cloned().collect::<BTreeSet<_>>(),
        backend_names(&cluster)
    );
    let exchange = client
        .tcp_request(api.tcp_frontend(), "api")
        .expect("api works");
    assert!(["backend-1", "backend-2"].contains(&exchange.reply.server.as_str()));
    let exchange = client
        .udp_request(extra.udp_frontend(), "extra")
        .expect("extra works");
    assert_eq!(exchange.reply.server, "backend-3");
    assert_eq!(exchange.from, extra.udp_frontend());
}

#[test]
fn stopping_the_agent_detaches_and_unpins() {
    let (mut cluster, web, _) = cluster_with_web("stop");
    let pin_dir = cluster.agent().pin_dir().to_owned();
    let stopped = cluster.stop_agent().expect("stop the agent");
    assert!(
        stopped.status.success(),
        "lb-agent exited with {}",
        stopped.status
    );
    assert!(
        !stopped.pin_dir_left,
        "lb-agent left {} behind: {:?}",
        pin_dir.display(),
        stopped.pins_left
    );
    let node = cluster.node();
    for iface in node.pod_ifaces() {
        let programs = tcx_ingress_programs(node.ns(), iface).expect("query tcx");
        assert!(programs.is_empty(), "{iface} still has {programs:?}");
    }
    // Without the datapath the ClusterIP leads nowhere again.
    let result = cluster.client().tcp_request(web.tcp_frontend(), "anyone?");
    assert!(result.is_err(), "{result:?}");
}

#[test]
fn an_agent_that_cannot_attach_fails_at_once_and_leaves_nothing() {
    let cluster = OneNode::build("noattach", 1, &[], &[]).expect("cluster");
    let pin_dir = cluster.testbed().pin_dir("agent").expect("pin dir");
    let pin_path = pin_dir.path().to_owned();
    let started = Instant::now();
    let error = Agent::start(
        cluster.node(),
        cluster.manifests().path(),
        &["h0", "missing0"],
        pin_dir,
    )
    .expect_err("attaching to a missing interface");
    let took = started.elapsed();
    assert!(took < START_TIMEOUT / 2, "failing took {took:?}");
    assert!(matches!(error, TestbedError::AgentExited { .. }), "{error}");
    // The log, quoted in the error, names the culprit.
    assert!(error.to_string().contains("missing0"), "{error}");
    assert!(!pin_path.exists(), "{} left behind", pin_path.display());
    let programs = tcx_ingress_programs(cluster.node().ns(), "h0").expect("query tcx");
    assert!(programs.is_empty(), "h0 still has {programs:?}");
}

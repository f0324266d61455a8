//! `cargo xtask demo`: Services in network namespaces, end to end, in two
//! parts.
//!
//! Part 1, a ClusterIP Service: builds one node with a client pod and three
//! backend pods, starts the agent on `examples/clusterip-demo.yaml`, sends
//! TCP and UDP to the ClusterIP, shows how the connections spread and what
//! the maps hold.
//!
//! Part 2, the external path: builds two nodes on one network with two
//! pods each and an external client, starts one agent per node with
//! `--external eth0` on `examples/nodeport-demo.yaml`, and shows a NodePort
//! (`externalTrafficPolicy: Cluster`) spreading the client's connections
//! over the pods of both nodes, what source each backend saw, XDP on eth0,
//! the source-translated flows and counters of node 1, and a LoadBalancer
//! with `externalTrafficPolicy: Local` and its health-check node port.
//!
//! Each part removes everything it built and the demo checks that nothing
//! is left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail, ensure};
use lb_common::service::SERVICE_F_EXTERNAL;
use lb_tests::agent::{Agent, XdpMode, agent_binary, tcx_ingress_programs, xdp_program};
use lb_tests::fixture::{MultiNode, MultiNodeSpec, OneNode};
use lb_tests::manifests::{ManifestDir, Protocol};
use lb_tests::topology::{BRIDGE, NETWORK_IFACE, Pod, cluster_ip};
use lb_tests::traffic::{HttpResponse, Tally, TcpExchange, TcpSession};
use lb_tests::wait::{self, DEFAULT_TIMEOUT};

/// The example the demo loads, relative to the workspace.
const EXAMPLE: &str = "examples/clusterip-demo.yaml";
const BACKENDS: usize = 3;
/// Frontends and target ports as `EXAMPLE` declares them.
const HTTP_PORT: u16 = 80;
const HTTP_TARGET: u16 = 8080;
const DNS_PORT: u16 = 53;
const DNS_TARGET: u16 = 5353;
const TCP_CONNECTIONS: usize = 300;
const UDP_REQUESTS: usize = 90;
/// Conntrack entries shown in full.
const FLOWS_SHOWN: usize = 3;
/// Lines of `lb-agent inspect conntrack` shown.
const CONNTRACK_LINES: usize = 12;

/// The example part 2 loads.
const EXTERNAL_EXAMPLE: &str = "examples/nodeport-demo.yaml";
const NODES: usize = 2;
const PODS_PER_NODE: usize = 2;
/// As `EXTERNAL_EXAMPLE` declares them: web's node ports, edge's
/// load-balancer ingress IP (routed to node 1) and health-check node port.
const WEB_TCP_NODE_PORT: u16 = 30080;
const WEB_UDP_NODE_PORT: u16 = 30053;
const LB_INGRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 253, 1);
const HEALTH_CHECK_NODE_PORT: u16 = 32100;
const EXTERNAL_TCP_CONNECTIONS: usize = 200;
const EXTERNAL_UDP_REQUESTS: usize = 60;
const LB_CONNECTIONS: usize = 20;
/// TCP connections to node 2 held open while `inspect snat` looks, and
/// the connections tried to get them.
const OPEN_SESSIONS: usize = 2;
const OPEN_ATTEMPTS: usize = 32;
/// Lines of `lb-agent inspect snat` shown.
const SNAT_LINES: usize = 9;

/// Set by SIGINT/SIGTERM so the demo stops between steps and still tears
/// down (a signal's default action would skip every destructor).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn section(title: &str) -> Result<()> {
    check_interrupted()?;
    println!(
        "\n=== {title} {}",
        "=".repeat(72_usize.saturating_sub(title.len()))
    );
    Ok(())
}

/// A banner between the parts of the demo.
fn part(title: &str) -> Result<()> {
    check_interrupted()?;
    println!("\n{}\n{title}\n{}", "#".repeat(77), "#".repeat(77));
    Ok(())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

fn main() -> ExitCode {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        // Whatever failed on the way, the testbed built so far is gone by
        // now (dropped while the error came up).
        Err(_) if INTERRUPTED.load(Ordering::Relaxed) => {
            eprintln!("\ninterrupted: the demo tore down what it had built");
            ExitCode::from(130)
        }
        Err(error) => {
            eprintln!("Error: {error:?}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<()> {
    let extra: Vec<String> = std::env::args().skip(1).collect();
    ensure!(
        extra.is_empty(),
        "lb-demo takes no arguments (got {extra:?})"
    );
    ensure!(
        // SAFETY: getuid has no preconditions.
        unsafe { libc::getuid() } == 0,
        "the demo creates network namespaces and loads BPF programs: run it as root"
    );
    let binary = agent_binary()?;

    part("Part 1: a ClusterIP Service on one node")?;
    let cluster_ip_part = run_cluster_ip(&binary)?;
    section("Cleanup check")?;
    cluster_ip_part.check_gone()?;

    part("Part 2: the external path, NodePort and LoadBalancer on two nodes")?;
    let external_part = run_external(&binary)?;
    section("Cleanup check")?;
    external_part.check_gone()?;
    println!("\nDone.");
    Ok(())
}

/// What one part of the demo built that must be gone once it is torn down.
struct Built {
    testbed: String,
    pin_dirs: Vec<PathBuf>,
}

impl Built {
    fn check_gone(&self) -> Result<()> {
        let testbed = &self.testbed;
        let namespaces = lb_tests::command::run("ip", &["netns", "list"])?;
        let left: Vec<&str> = namespaces
            .lines()
            .filter(|line| line.starts_with(&format!("{testbed}-")))
            .collect();
        ensure!(left.is_empty(), "namespaces left behind: {left:?}");
        for pin_dir in &self.pin_dirs {
            ensure!(!pin_dir.exists(), "{} left behind", pin_dir.display());
        }
        let scratch = std::env::temp_dir().join(testbed);
        ensure!(!scratch.exists(), "{} left behind", scratch.display());
        println!("network namespaces {testbed}-*: none left (ip netns list)");
        for pin_dir in &self.pin_dirs {
            println!("pin directory {}: gone", pin_dir.display());
        }
        println!("scratch directory {}: gone", scratch.display());
        Ok(())
    }
}

/// Part 1. Everything that needs its testbed; it is torn down when this
/// returns, successfully or not. Returns what the caller checks is gone.
fn run_cluster_ip(binary: &Path) -> Result<Built> {
    section("Testbed")?;
    let mut cluster = OneNode::build("demo", BACKENDS, &[HTTP_TARGET], &[DNS_TARGET])
        .context("build the testbed")?;
    let testbed_name = cluster.testbed().name().to_owned();
    let node = cluster.node();
    println!("node {:<10} namespace {}", node.name(), node.ns().name());
    for pod in node.pods() {
        println!(
            "pod  {:<10} namespace {:<28} {}/24 on eth0, node side {} ({})",
            pod.name(),
            pod.ns().name(),
            pod.addr(),
            pod.host_iface(),
            pod.gateway()
        );
    }
    println!(
        "backends serve TCP {HTTP_TARGET} and UDP {DNS_TARGET}, answering with their pod name"
    );

    section("Manifests")?;
    load_example(EXAMPLE, cluster.manifests())?;

    section("Agent")?;
    cluster.start_agent().context("start lb-agent")?;
    let agent = cluster.agent();
    let pin_dir = agent.pin_dir().to_owned();
    println!(
        "{} run --manifests {} {} --pin-dir {} (pid {}, in namespace {})",
        binary.display(),
        cluster.manifests().path().display(),
        cluster
            .node()
            .pod_ifaces()
            .iter()
            .map(|iface| format!("--attach {iface}"))
            .collect::<Vec<_>>()
            .join(" "),
        pin_dir.display(),
        agent.pid().unwrap_or_default(),
        cluster.node().ns().name(),
    );
    let http = SocketAddrV4::new(cluster_ip(10), HTTP_PORT);
    let dns = SocketAddrV4::new(cluster_ip(10), DNS_PORT);
    wait_ready(agent, http, Protocol::Tcp)?;
    wait_ready(agent, dns, Protocol::Udp)?;
    println!("programmed: tcp/{http} and udp/{dns}, {BACKENDS} ready backends each");

    section(&format!(
        "Traffic: {TCP_CONNECTIONS} TCP connections to {http}"
    ))?;
    let client = cluster.client();
    let tally = client
        .tcp_spread(http, TCP_CONNECTIONS)
        .with_context(|| format!("TCP to {http}"))?;
    print_tally(&cluster, &tally, "connections");

    section(&format!("Traffic: {UDP_REQUESTS} UDP requests to {dns}"))?;
    let tally = client
        .udp_spread(dns, UDP_REQUESTS)
        .with_context(|| format!("UDP to {dns}"))?;
    print_tally(&cluster, &tally, "requests");
    let exchange = client.udp_request(dns, "where from?")?;
    println!(
        "a UDP answer's source as the client sees it: {} (backend {} saw the client as {})",
        exchange.from, exchange.reply.server, exchange.reply.client_seen
    );

    section("lb-agent inspect services")?;
    print_output(
        binary,
        &["inspect", "services", "--pin-dir", path_str(&pin_dir)?],
        None,
    )?;

    section("lb-agent inspect conntrack")?;
    print_output(
        binary,
        &["inspect", "conntrack", "--pin-dir", path_str(&pin_dir)?],
        Some(CONNTRACK_LINES),
    )?;

    section("lb-agent inspect counters")?;
    print_output(
        binary,
        &["inspect", "counters", "--pin-dir", path_str(&pin_dir)?],
        None,
    )?;

    let services_pin = pin_dir.join(lb_common::names::MAP_SERVICES);
    section(&format!(
        "bpftool map dump pinned {}",
        services_pin.display()
    ))?;
    print_output(
        Path::new("bpftool"),
        &["map", "dump", "pinned", path_str(&services_pin)?],
        None,
    )?;

    let conntrack_pin = pin_dir.join(lb_common::names::MAP_CONNTRACK);
    section(&format!(
        "bpftool map dump pinned {} (first {FLOWS_SHOWN} entries)",
        conntrack_pin.display()
    ))?;
    print_flows(&conntrack_pin)?;
    println!("(addresses and ports are in network byte order; `lb-agent inspect` decodes them)");

    section("Teardown")?;
    let stopped = cluster.stop_agent().context("stop lb-agent")?;
    println!("lb-agent stopped on SIGTERM: {}", stopped.status);
    ensure!(stopped.status.success(), "lb-agent failed on SIGTERM");
    ensure!(
        !stopped.pin_dir_left,
        "lb-agent left its pin directory behind: {:?}",
        stopped.pins_left
    );
    println!("lb-agent detached and removed {}", pin_dir.display());
    drop(cluster);
    println!("servers stopped, namespaces deleted, scratch directory removed");
    Ok(Built {
        testbed: testbed_name,
        pin_dirs: vec![pin_dir],
    })
}

/// Copies the example `relative` (to the workspace) into `manifests` and
/// prints it without its comments.
fn load_example(relative: &str, manifests: &ManifestDir) -> Result<()> {
    let example = workspace().join(relative);
    let text =
        std::fs::read_to_string(&example).with_context(|| format!("read {}", example.display()))?;
    let file = example
        .file_name()
        .and_then(|name| name.to_str())
        .with_context(|| format!("{} has no UTF-8 file name", example.display()))?;
    manifests.write_text(file, &text)?;
    println!("{} -> {}", example.display(), manifests.path().display());
    for line in text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
    {
        println!("  {line}");
    }
    Ok(())
}

fn wait_ready(agent: &Agent, frontend: SocketAddrV4, proto: Protocol) -> Result<()> {
    agent
        .wait_for_service(frontend, proto, "all backends ready", |entry| {
            entry.backends.len() == BACKENDS && entry.backends.iter().all(|backend| backend.ready)
        })
        .with_context(|| {
            format!(
                "waiting for {}/{frontend}; agent log:\n{}",
                proto.as_lower(),
                agent.log()
            )
        })?;
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

fn print_tally(cluster: &OneNode, tally: &Tally, unit: &str) {
    let total: usize = tally.values().sum();
    println!(
        "{:<12} {:<14} {:>12} {:>7}",
        "backend", "address", unit, "share"
    );
    for pod in cluster.backends() {
        let count = tally.get(pod.name()).copied().unwrap_or(0);
        let share = if total == 0 {
            0.0
        } else {
            100.0 * count as f64 / total as f64
        };
        println!(
            "{:<12} {:<14} {:>12} {:>6.1}% {}",
            pod.name(),
            pod.addr().to_string(),
            count,
            share,
            "#".repeat((share / 2.0).round() as usize)
        );
    }
    println!("{:<12} {:<14} {:>12}", "total", "", total);
}

/// Runs a command and prints its output, at most `max_lines` lines of it.
fn print_output(program: &Path, args: &[&str], max_lines: Option<usize>) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {}", program.display()))?;
    ensure!(
        output.status.success(),
        "{} {} failed ({}): {}",
        program.display(),
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let shown = max_lines.unwrap_or(lines.len()).min(lines.len());
    for line in &lines[..shown] {
        println!("{line}");
    }
    if shown < lines.len() {
        println!("... ({} more lines)", lines.len() - shown);
    }
    Ok(())
}

/// `bpftool -j map dump` of the conntrack map, first few entries pretty.
fn print_flows(pin: &Path) -> Result<()> {
    let output = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", path_str(pin)?])
        .output()
        .context("run bpftool")?;
    ensure!(
        output.status.success(),
        "bpftool map dump pinned {} failed: {}",
        pin.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).context("parse bpftool's JSON output")?;
    for entry in entries.iter().take(FLOWS_SHOWN) {
        // With BTF, bpftool gives each entry a decoded "formatted" form.
        let shown = entry.get("formatted").unwrap_or(entry);
        println!("{}", serde_json::to_string_pretty(shown)?);
    }
    println!("({} entries in all)", entries.len());
    Ok(())
}

/// Part 2. Everything that needs its testbed; it is torn down when this
/// returns, successfully or not. Returns what the caller checks is gone.
fn run_external(binary: &Path) -> Result<Built> {
    section("Testbed")?;
    let spec = MultiNodeSpec {
        nodes: NODES,
        pods_per_node: PODS_PER_NODE,
        external_clients: 1,
        tcp_ports: vec![HTTP_TARGET],
        udp_ports: vec![DNS_TARGET],
        ..MultiNodeSpec::default()
    };
    let mut cluster = MultiNode::build("demo-ext", spec).context("build the testbed")?;
    let testbed_name = cluster.testbed().name().to_owned();
    let network = cluster
        .testbed()
        .network_ns()
        .context("a networked testbed has a network namespace")?
        .name()
        .to_owned();
    println!("network   namespace {network:<30} bridge {BRIDGE}");
    for n in 1..=NODES {
        let node = cluster.node(n);
        println!(
            "node {:<9} namespace {:<30} {NETWORK_IFACE} {}/24 on the network",
            node.name(),
            node.ns().name(),
            node.addr()
        );
        for pod in node.pods() {
            println!(
                "  pod {:<9} namespace {:<28} {}/24, node side {}",
                pod.name(),
                pod.ns().name(),
                pod.addr(),
                pod.host_iface()
            );
        }
    }
    let client = cluster.external_client(1);
    let client_name = client.name().to_owned();
    println!(
        "client {:<7} namespace {:<30} {NETWORK_IFACE} {}/24 on the network, no route beyond it",
        client.name(),
        client.ns().name(),
        client.addr()
    );
    println!(
        "every node routes the other's pod subnets via its address; pods serve TCP {HTTP_TARGET} and UDP {DNS_TARGET}"
    );

    section("Manifests")?;
    load_example(EXTERNAL_EXAMPLE, cluster.manifests())?;
    // The router in front of the cluster (or MetalLB) sends the ingress IP
    // to node 1.
    cluster.route_external(LB_INGRESS, 1)?;
    println!(
        "{client_name}: ip route add {LB_INGRESS}/32 via {} (the load balancer's choice of node)",
        cluster.node(1).addr()
    );

    section("Agents")?;
    cluster
        .start_agents()
        .context("start one lb-agent per node")?;
    let mut pin_dirs = Vec::new();
    for (n, agent) in (1..=NODES).zip(cluster.agents()) {
        let pid = agent.pid().unwrap_or_default();
        println!(
            "{} (pid {pid}, in namespace {})",
            command_line(pid).unwrap_or_else(|| binary.display().to_string()),
            cluster.node(n).ns().name()
        );
        pin_dirs.push(agent.pin_dir().to_owned());
    }
    let all_pods: Vec<(usize, usize)> = (1..=NODES)
        .flat_map(|n| (1..=PODS_PER_NODE).map(move |k| (n, k)))
        .collect();
    let node1_pods: Vec<(usize, usize)> = (1..=PODS_PER_NODE).map(|k| (1, k)).collect();
    for n in 1..=NODES {
        let addr = cluster.node(n).addr();
        wait_external(
            &cluster,
            n,
            SocketAddrV4::new(addr, WEB_TCP_NODE_PORT),
            Protocol::Tcp,
            HTTP_TARGET,
            &all_pods,
        )?;
        wait_external(
            &cluster,
            n,
            SocketAddrV4::new(addr, WEB_UDP_NODE_PORT),
            Protocol::Udp,
            DNS_TARGET,
            &all_pods,
        )?;
    }
    let edge = SocketAddrV4::new(LB_INGRESS, HTTP_PORT);
    wait_external(&cluster, 1, edge, Protocol::Tcp, HTTP_TARGET, &node1_pods)?;
    println!(
        "programmed on both nodes: web's NodePorts tcp/<node>:{WEB_TCP_NODE_PORT} and udp/<node>:{WEB_UDP_NODE_PORT}, {} backends each",
        all_pods.len()
    );
    println!(
        "programmed on node-1: edge's tcp/{edge}, its {} local backends",
        node1_pods.len()
    );

    section(&format!("XDP on {NETWORK_IFACE}"))?;
    for n in 1..=NODES {
        let node = cluster.node(n);
        let xdp = xdp_program(node.ns(), NETWORK_IFACE)
            .map_err(anyhow::Error::msg)?
            .with_context(|| format!("no XDP program on {NETWORK_IFACE} of {}", node.name()))?;
        let tcx = tcx_ingress_programs(node.ns(), NETWORK_IFACE).map_err(anyhow::Error::msg)?;
        println!(
            "{} {NETWORK_IFACE}: XDP {} (id {}) in {} mode; tcx ingress: {}",
            node.name(),
            xdp.program,
            xdp.id,
            xdp_mode_name(xdp.mode),
            tcx.join(", ")
        );
    }
    println!("node-1's agent log says:");
    for line in cluster
        .agent(1)
        .log()
        .lines()
        .filter(|line| line.contains("XDP"))
    {
        println!("  {}", log_message(line));
    }

    let client = cluster.external_client(1);
    let node1 = cluster.node(1);
    let web_tcp = SocketAddrV4::new(node1.addr(), WEB_TCP_NODE_PORT);
    let web_udp = SocketAddrV4::new(node1.addr(), WEB_UDP_NODE_PORT);
    section(&format!(
        "Traffic: {EXTERNAL_TCP_CONNECTIONS} TCP connections from {} to NodePort {web_tcp}",
        client.name()
    ))?;
    let mut spread = Spread::default();
    for n in 0..EXTERNAL_TCP_CONNECTIONS {
        check_interrupted()?;
        let exchange = client
            .tcp_request(web_tcp, &format!("tcp {n}"))
            .with_context(|| {
                failed_traffic(&cluster, &format!("TCP connection {n} to {web_tcp}"))
            })?;
        ensure!(
            exchange.peer == web_tcp,
            "the client talked to {}, not to {web_tcp}",
            exchange.peer
        );
        spread.add(&exchange.reply.server, *exchange.reply.client_seen.ip());
    }
    spread.print(&cluster, &all_pods, "connections");
    check_sources(&cluster, &spread)?;

    section(&format!(
        "Traffic: {EXTERNAL_UDP_REQUESTS} UDP requests from {} to NodePort {web_udp}",
        client.name()
    ))?;
    let mut spread = Spread::default();
    for n in 0..EXTERNAL_UDP_REQUESTS {
        check_interrupted()?;
        // Connected: the client's kernel takes an answer from the NodePort
        // address only.
        let exchange = client
            .udp_connected_request(web_udp, &format!("udp {n}"))
            .with_context(|| failed_traffic(&cluster, &format!("UDP request {n} to {web_udp}")))?;
        spread.add(&exchange.reply.server, *exchange.reply.client_seen.ip());
    }
    spread.print(&cluster, &all_pods, "requests");
    check_sources(&cluster, &spread)?;

    let node1_pin = cluster.agent(1).pin_dir().to_owned();
    section("lb-agent inspect snat (node-1)")?;
    // A closed TCP connection gives its translated port back at once: keep
    // a few open to node 2 while looking (the UDP flows above stay until
    // they time out).
    let open = open_sessions_to_node2(&cluster, web_tcp)?;
    for (session, exchange) in &open {
        println!(
            "open: {} -> {web_tcp} -> {} ({}), which sees {}",
            session.local()?,
            exchange.reply.server,
            SocketAddrV4::new(
                pod_by_name(&cluster, &exchange.reply.server)?.addr(),
                exchange.reply.server_port
            ),
            exchange.reply.client_seen
        );
    }
    print_output(
        binary,
        &["inspect", "snat", "--pin-dir", path_str(&node1_pin)?],
        Some(SNAT_LINES),
    )?;
    drop(open);

    section("lb-agent inspect counters (node-1)")?;
    print_output(
        binary,
        &["inspect", "counters", "--pin-dir", path_str(&node1_pin)?],
        None,
    )?;
    println!(
        "(forwarded: sent on by FIB lookup, XDP_TX or TC redirect, never through the stack; xdp_to_tc: handed by XDP to lb_tc_ext)"
    );

    section(&format!(
        "LoadBalancer edge, externalTrafficPolicy: Local, ingress {LB_INGRESS}"
    ))?;
    let mut spread = Spread::default();
    for n in 0..LB_CONNECTIONS {
        check_interrupted()?;
        let exchange = client
            .tcp_request(edge, &format!("lb {n}"))
            .with_context(|| failed_traffic(&cluster, &format!("TCP connection {n} to {edge}")))?;
        ensure!(
            exchange.peer == edge,
            "the client talked to {}, not to {edge}",
            exchange.peer
        );
        spread.add(&exchange.reply.server, *exchange.reply.client_seen.ip());
    }
    println!(
        "{LB_CONNECTIONS} TCP connections to {edge}, routed to node-1: only its own pods, the client's address kept"
    );
    spread.print(&cluster, &node1_pods, "connections");
    for (pod, (_, seen)) in &spread.by_pod {
        ensure!(
            pod.starts_with("pod-1-") && seen.iter().all(|addr| *addr == client.addr()),
            "{pod} took a connection to {edge} and saw {seen:?}"
        );
    }
    println!(
        "health checks, GET http://<node>:{HEALTH_CHECK_NODE_PORT}/ from {}:",
        client.name()
    );
    for (n, status, local) in [(1, 200, node1_pods.len()), (2, 503, 0)] {
        let response = wait_health(&cluster, n, status, local)?;
        println!(
            "  {} {}: {} {}",
            cluster.node(n).name(),
            SocketAddrV4::new(cluster.node(n).addr(), HEALTH_CHECK_NODE_PORT),
            response.status,
            response.body.trim()
        );
    }

    section("Teardown")?;
    for (n, agent) in (1..=NODES).zip(cluster.agents()) {
        let status = agent.stop().context("stop lb-agent")?;
        println!("node-{n}'s lb-agent stopped on SIGTERM: {status}");
        ensure!(status.success(), "node-{n}'s lb-agent failed on SIGTERM");
        ensure!(
            !agent.pin_dir_exists(),
            "node-{n}'s lb-agent left its pin directory behind: {:?}",
            agent.pins_left()
        );
        println!(
            "node-{n}'s lb-agent detached and removed {}",
            agent.pin_dir().display()
        );
    }
    drop(cluster);
    println!("servers stopped, namespaces deleted, scratch directory removed");
    Ok(Built {
        testbed: testbed_name,
        pin_dirs,
    })
}

/// The pods that answered and the client addresses each saw.
#[derive(Default)]
struct Spread {
    by_pod: BTreeMap<String, (usize, BTreeSet<Ipv4Addr>)>,
}

impl Spread {
    fn add(&mut self, pod: &str, client_seen: Ipv4Addr) {
        let (count, seen) = self.by_pod.entry(pod.to_owned()).or_default();
        *count += 1;
        seen.insert(client_seen);
    }

    /// A table of `pods` ((node, pod), 1-based): how many answers each
    /// gave, and who the client was as it saw it.
    fn print(&self, cluster: &MultiNode, pods: &[(usize, usize)], unit: &str) {
        let total: usize = self.by_pod.values().map(|(count, _)| count).sum();
        let client = cluster.external_client(1);
        let name_of = |addr: Ipv4Addr| {
            if addr == client.addr() {
                format!("{addr} ({})", client.name())
            } else if let Some(node) = cluster
                .testbed()
                .nodes()
                .iter()
                .find(|node| node.addr() == addr)
            {
                format!("{addr} ({})", node.name())
            } else {
                addr.to_string()
            }
        };
        println!(
            "{:<9} {:<7} {:<12} {:>11} {:>6}  {:<26} saw the client as",
            "backend", "node", "address", unit, "share", ""
        );
        for &(n, k) in pods {
            let pod = cluster.pod(n, k);
            let (count, seen) = self.by_pod.get(pod.name()).cloned().unwrap_or_default();
            let share = if total == 0 {
                0.0
            } else {
                100.0 * count as f64 / total as f64
            };
            println!(
                "{:<9} {:<7} {:<12} {:>11} {:>5.1}%  {:<26} {}",
                pod.name(),
                cluster.node(n).name(),
                pod.addr().to_string(),
                count,
                share,
                "#".repeat((share / 2.0).round() as usize),
                seen.into_iter().map(name_of).collect::<Vec<_>>().join(", ")
            );
        }
        println!("{:<9} {:<7} {:<12} {:>11}", "total", "", "", total);
    }
}

/// Through node 1's NodePort with `externalTrafficPolicy: Cluster`: the
/// pods of both nodes answered; those on node 1 saw the client, those on
/// node 2 saw node 1 (source translation, so the reply returns through
/// node 1).
fn check_sources(cluster: &MultiNode, spread: &Spread) -> Result<()> {
    let client = cluster.external_client(1).addr();
    let node1 = cluster.node(1).addr();
    for n in 1..=NODES {
        ensure!(
            spread
                .by_pod
                .keys()
                .any(|pod| pod.starts_with(&format!("pod-{n}-"))),
            "no pod of node-{n} answered"
        );
    }
    for (pod, (_, seen)) in &spread.by_pod {
        let expected = if pod.starts_with("pod-1-") {
            client
        } else {
            node1
        };
        ensure!(
            seen.iter().all(|addr| *addr == expected),
            "{pod} saw the client as {seen:?}, expected {expected}"
        );
    }
    Ok(())
}

/// Opens connections to `frontend` from the external client until
/// [`OPEN_SESSIONS`] of them landed on node 2 (at most
/// [`OPEN_ATTEMPTS`] tries), keeping those open; each with its first
/// exchange.
fn open_sessions_to_node2(
    cluster: &MultiNode,
    frontend: SocketAddrV4,
) -> Result<Vec<(TcpSession, TcpExchange)>> {
    let client = cluster.external_client(1);
    let mut open = Vec::new();
    for attempt in 0..OPEN_ATTEMPTS {
        if open.len() == OPEN_SESSIONS {
            break;
        }
        check_interrupted()?;
        let mut session = client
            .tcp_connect(frontend)
            .with_context(|| format!("connect to {frontend}"))?;
        let exchange = session
            .exchange(&format!("held {attempt}"))
            .with_context(|| format!("exchange with {frontend}"))?;
        if exchange.reply.server.starts_with("pod-2-") {
            open.push((session, exchange));
        }
    }
    ensure!(
        !open.is_empty(),
        "none of {OPEN_ATTEMPTS} connections to {frontend} reached node-2"
    );
    Ok(open)
}

/// The context of a failed exchange: what node 1's and node 2's maps hold,
/// to tell a lost packet from a wrong translation.
fn failed_traffic(cluster: &MultiNode, what: &str) -> String {
    let mut context = format!("{what}; the maps now:");
    for (n, agent) in (1..=NODES).zip(cluster.agents()) {
        context.push_str(&format!("\n--- node-{n} ---\n{}", agent.diagnostics()));
    }
    context
}

/// The pod called `name` on any node.
fn pod_by_name<'a>(cluster: &'a MultiNode, name: &str) -> Result<&'a Pod> {
    cluster
        .testbed()
        .nodes()
        .iter()
        .flat_map(|node| node.pods())
        .find(|pod| pod.name() == name)
        .with_context(|| format!("no pod {name}"))
}

/// Waits until node `n`'s agent programs `frontend` as an external frontend
/// whose ready backends are exactly `pods` on `target`.
fn wait_external(
    cluster: &MultiNode,
    n: usize,
    frontend: SocketAddrV4,
    proto: Protocol,
    target: u16,
    pods: &[(usize, usize)],
) -> Result<()> {
    let mut expected: Vec<SocketAddrV4> = pods
        .iter()
        .map(|&(node, k)| cluster.backend(node, k, target))
        .collect();
    expected.sort();
    let agent = cluster.agent(n);
    agent
        .wait_for_service(
            frontend,
            proto,
            &format!("external, ready backends {expected:?}"),
            |entry| {
                let mut ready: Vec<SocketAddrV4> = entry
                    .backends
                    .iter()
                    .filter(|backend| backend.ready)
                    .map(|backend| backend.addr)
                    .collect();
                ready.sort();
                entry.flags & SERVICE_F_EXTERNAL != 0 && ready == expected
            },
        )
        .with_context(|| {
            format!(
                "node-{n}'s agent programming {}/{frontend} (does {EXTERNAL_EXAMPLE} match the testbed?); maps:\n{}agent log:\n{}",
                proto.as_lower(),
                agent.diagnostics(),
                agent.log()
            )
        })?;
    Ok(())
}

/// Waits until node `n`'s health-check node port answers `status` with
/// `localEndpoints: local`.
fn wait_health(cluster: &MultiNode, n: usize, status: u16, local: usize) -> Result<HttpResponse> {
    let address = SocketAddrV4::new(cluster.node(n).addr(), HEALTH_CHECK_NODE_PORT);
    let client = cluster.external_client(1);
    let response = wait::wait_for(
        DEFAULT_TIMEOUT,
        &format!("{address} to answer {status} with {local} local endpoints"),
        || -> Result<HttpResponse, String> {
            let response = client
                .http_get(address, "/")
                .map_err(|error| error.to_string())?;
            let body: serde_json::Value = serde_json::from_str(&response.body)
                .map_err(|error| format!("{error}: {response:?}"))?;
            if response.status == status && body["localEndpoints"] == local {
                Ok(response)
            } else {
                Err(format!("{response:?}"))
            }
        },
    )
    .with_context(|| format!("node-{n}'s agent log:\n{}", cluster.agent(n).log()))?;
    Ok(response)
}

fn xdp_mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native (driver)",
        XdpMode::Generic => "generic (SKB)",
        XdpMode::Offload => "offloaded",
    }
}

/// The command line of process `pid`, as `/proc` has it.
fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|byte| *byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// A log line of the agent without its timestamp.
fn log_message(line: &str) -> &str {
    match line.split_once(' ') {
        Some((first, rest)) if first.ends_with('Z') && first.contains('T') => rest.trim_start(),
        _ => line,
    }
}

//! `cargo xtask demo`: a ClusterIP Service in network namespaces, end to end.
//!
//! Builds one node with a client pod and three backend pods, starts the
//! agent on `examples/clusterip-demo.yaml`, sends TCP and UDP to the
//! ClusterIP, shows how the connections spread and what the maps hold, then
//! removes everything and checks that nothing is left.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::agent::{Agent, agent_binary};
use lb_tests::fixture::OneNode;
use lb_tests::manifests::Protocol;
use lb_tests::topology::cluster_ip;
use lb_tests::traffic::Tally;

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

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

fn main() -> Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
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

    let (testbed_name, pin_dir) = run_demo(&binary)?;

    section("Cleanup check")?;
    let namespaces = lb_tests::command::run("ip", &["netns", "list"])?;
    let left: Vec<&str> = namespaces
        .lines()
        .filter(|line| line.starts_with(&format!("{testbed_name}-")))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    ensure!(!pin_dir.exists(), "{} left behind", pin_dir.display());
    let scratch = std::env::temp_dir().join(&testbed_name);
    ensure!(!scratch.exists(), "{} left behind", scratch.display());
    println!("network namespaces {testbed_name}-*: none left (ip netns list)");
    println!("pin directory {}: gone", pin_dir.display());
    println!("scratch directory {}: gone", scratch.display());
    println!("\nDone.");
    Ok(())
}

/// Everything that needs the testbed; it is torn down when this returns,
/// successfully or not. Returns the testbed's name and pin directory so the
/// caller can check they are gone.
fn run_demo(binary: &Path) -> Result<(String, PathBuf)> {
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
    let example = workspace().join(EXAMPLE);
    let text =
        std::fs::read_to_string(&example).with_context(|| format!("read {}", example.display()))?;
    cluster
        .manifests()
        .write_text("clusterip-demo.yaml", &text)?;
    println!(
        "{} -> {}",
        example.display(),
        cluster.manifests().path().display()
    );
    for line in text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
    {
        println!("  {line}");
    }

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
    Ok((testbed_name, pin_dir))
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

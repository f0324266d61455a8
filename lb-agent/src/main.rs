//! `lb-agent`: the command line. Everything it runs lives in the library.

use std::fmt;
use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_agent::agent::{self, RunOptions, SourceOptions};
use lb_agent::datapath::loader::{Capacities, XdpForwardChoice, XdpForwarding};
use lb_agent::inspect;
use lb_agent::model::Selection;
use lb_agent::source::kube::KubeOptions;
use lb_agent::translate::Scope;
use lb_common::config::{CONFIG_F_LOG, DatapathConfig, defaults};
use lb_common::names::DEFAULT_PIN_DIR;
use tracing_subscriber::EnvFilter;

/// Kubernetes Service load balancing in eBPF (ClusterIP, NodePort,
/// LoadBalancer, external IPs): keeps the datapath's maps equal to what
/// Services and EndpointSlices say.
#[derive(Parser, Debug)]
#[command(name = "lb-agent", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Log format (filter with RUST_LOG, default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the datapath, attach it and program it from the Kubernetes API
    /// (or a manifest directory), following every change until
    /// SIGINT/SIGTERM; then detach and remove the pinned maps (unless
    /// --keep-pins).
    Run(Box<RunArgs>),
    /// Print the state of a running agent, read from its pinned maps.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Directory of Service and EndpointSlice manifests (*.yaml, *.yml,
    /// *.json; multi-document YAML, JSON arrays, kind: List). Watched: a
    /// change reaches the maps within a fraction of a second. Without it,
    /// the agent watches the Kubernetes API.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,

    /// Kubeconfig to reach the Kubernetes API with. Without it (and without
    /// --manifests): the file named by KUBECONFIG, else the in-cluster
    /// configuration of a Pod.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,

    /// This node's name: its Node is watched (its InternalIP and ExternalIP
    /// addresses are where NodePorts are reached), and the traffic policies
    /// Local keep the endpoints whose nodeName it is.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,

    /// Serve only Services labelled service.kubernetes.io/service-proxy-name
    /// with this value (by default, only Services without that label).
    #[arg(long, value_name = "NAME")]
    service_proxy_name: Option<String>,

    /// Address of the HTTP endpoint with /healthz, /readyz (ready once the
    /// initial state is programmed and the datapath attached) and
    /// /metrics (Prometheus). None by default.
    #[arg(long, value_name = "HOST:PORT")]
    health_addr: Option<SocketAddr>,

    /// Pod-facing interface (the node's end of a pod's veth) to attach the
    /// datapath to, at tcx ingress. Repeat for every pod.
    #[arg(
        long = "attach",
        value_name = "IFACE",
        required_unless_present_any = ["attach_veths", "external"]
    )]
    attach: Vec<String>,

    /// Attach to every veth of the node's network namespace (the node's
    /// end of each pod's veth pair, whatever the CNI plugin names it), and
    /// follow pods as they come and go: new veths are attached within a
    /// second. What a DaemonSet uses. The --external interfaces are left
    /// out (a node's own uplink can be a veth too).
    #[arg(long)]
    attach_veths: bool,

    /// The node's interface to its network, where NodePort, load-balancer
    /// and external-IP traffic arrives. Gets the XDP program (native mode;
    /// generic mode, with a warning, where the driver has none) and a TC
    /// program at tcx ingress for what XDP hands on. With --manifests, its
    /// IPv4 addresses are the node's NodePort addresses, and the first one
    /// the source address of external flows sent on to other nodes. Must
    /// exist in the agent's network namespace. Repeat for every uplink.
    #[arg(long = "external", value_name = "IFACE")]
    external: Vec<String>,

    /// How the XDP program forwards what must not go through the stack
    /// (external flows to backends on other nodes, their replies, replies
    /// of external flows): `tx` sends it back out of the arrival interface
    /// with XDP_TX where the route allows (the rest goes through the TC
    /// program); `tc` leaves all of it to the TC program
    /// (bpf_redirect_neigh). `auto`: `tc` if an --external interface is a
    /// veth (a veth's peer takes XDP_TX frames only if it has an XDP
    /// program of its own, which a node cannot arrange for the far end of
    /// its uplink: kind, containers as nodes), `tx` otherwise. One mode
    /// for all --external interfaces.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = XdpForwardArg::Auto)]
    xdp_forward: XdpForwardArg,

    /// Source address the datapath gives a pod's connection to its own
    /// Service when it lands on the pod itself (hairpin): routed from pods
    /// to the node, and no pod's address.
    #[arg(
        long,
        value_name = "ADDR",
        default_value_t = Ipv4Addr::from(defaults::HAIRPIN_ADDR),
        value_parser = parse_hairpin_address
    )]
    hairpin_address: Ipv4Addr,

    /// Source ports of translated flows (external flows to other nodes,
    /// hairpin), inclusive; keep it outside the node's ephemeral ports
    /// (net.ipv4.ip_local_port_range, 32768-60999 by default).
    #[arg(
        long,
        value_name = "MIN-MAX",
        default_value_t = NatPortRange::DEFAULT,
        value_parser = parse_nat_port_range
    )]
    nat_port_range: NatPortRange,

    /// bpffs directory where this instance pins its maps, one per instance.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,

    /// Leave the pinned maps in place on exit, so the next start reuses
    /// them and established flows survive the restart.
    #[arg(long)]
    keep_pins: bool,

    /// Capacity of LB_SERVICES: frontends (address, port, protocol): each
    /// ClusterIP port, each NodePort once per node address, each
    /// load-balancer ingress IP and external IP port.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_SERVICES, value_parser = clap::value_parser!(u32).range(1..))]
    max_services: u32,

    /// Capacity of LB_BACKENDS and LB_REVNAT: distinct backends (pod
    /// address, target port, protocol); one entry (id 0) is reserved.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_BACKENDS, value_parser = clap::value_parser!(u32).range(2..))]
    max_backends: u32,

    /// Capacity of LB_SLOTS: ready backends summed over all services.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_SLOTS, value_parser = clap::value_parser!(u32).range(1..))]
    max_slots: u32,

    /// Capacity of LB_CONNTRACK: tracked flows (least recently used ones
    /// are evicted when full).
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_FLOWS, value_parser = clap::value_parser!(u32).range(1..))]
    max_flows: u32,

    /// Idle timeout of an established TCP flow, seconds.
    #[arg(long, value_name = "S", default_value_t = DatapathConfig::DEFAULT.tcp_timeout)]
    tcp_timeout: u32,

    /// Timeout of a TCP flow after FIN in both directions or RST, seconds.
    #[arg(long, value_name = "S", default_value_t = DatapathConfig::DEFAULT.tcp_closing_timeout)]
    tcp_closing_timeout: u32,

    /// Idle timeout of a UDP flow, seconds.
    #[arg(long, value_name = "S", default_value_t = DatapathConfig::DEFAULT.udp_timeout)]
    udp_timeout: u32,

    /// How new connections choose a backend when the Service has no
    /// `lb.dev/selection` annotation: random, or Maglev consistent hashing
    /// (the same backend for the same flow on every node).
    #[arg(long, value_enum, default_value_t = SelectionArg::Random)]
    selection: SelectionArg,

    /// Entries of a Maglev table: a prime, well above 100 times the
    /// backends of any Service using Maglev (4 bytes an entry).
    #[arg(long, value_name = "M", default_value_t = defaults::MAGLEV_TABLE_SIZE, value_parser = parse_maglev_table_size)]
    maglev_table_size: u32,

    /// Services that can use Maglev at once: LB_MAGLEV holds this many
    /// tables (--maglev-table-size entries of 4 bytes each). Services
    /// beyond it choose backends at random (with a warning).
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_MAGLEV_TABLES, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_maglev_services: u32,

    /// Capacity of LB_AFFINITY: ClientIP session affinities (service,
    /// client address); the least recently used are forgotten when full.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_AFFINITIES, value_parser = clap::value_parser!(u32).range(1..))]
    max_affinities: u32,

    /// Capacity of LB_SNAT: source-translated flows (external flows to
    /// backends on other nodes, hairpin flows); the least recently used
    /// are evicted when full.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_SNAT_FLOWS, value_parser = clap::value_parser!(u32).range(1..))]
    max_snat_flows: u32,

    /// Capacity of LB_SRC_RANGES: client ranges of
    /// loadBalancerSourceRanges, summed over all Services.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_SOURCE_RANGES, value_parser = clap::value_parser!(u32).range(1..))]
    max_source_ranges: u32,

    /// Log from the datapath (aya-log, target lb_ebpf). Off by default: one
    /// line costs about 100 ns per packet.
    #[arg(long)]
    datapath_log: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum XdpForwardArg {
    /// By the drivers of the --external interfaces.
    Auto,
    /// XDP_TX where the route leads back out of the arrival interface.
    Tx,
    /// Everything through the TC program.
    Tc,
}

impl From<XdpForwardArg> for XdpForwardChoice {
    fn from(arg: XdpForwardArg) -> Self {
        match arg {
            XdpForwardArg::Auto => XdpForwardChoice::Auto,
            XdpForwardArg::Tx => XdpForwardChoice::Fixed(XdpForwarding::Transmit),
            XdpForwardArg::Tc => XdpForwardChoice::Fixed(XdpForwarding::Tc),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SelectionArg {
    Random,
    Maglev,
}

/// `--nat-port-range`: inclusive, host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NatPortRange {
    min: u16,
    max: u16,
}

impl NatPortRange {
    const DEFAULT: Self = Self {
        min: defaults::NAT_PORT_MIN,
        max: defaults::NAT_PORT_MAX,
    };
}

impl fmt::Display for NatPortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

fn parse_nat_port_range(text: &str) -> Result<NatPortRange, String> {
    let (min, max) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not MIN-MAX"))?;
    let port = |text: &str| -> Result<u16, String> {
        match text.trim().parse::<u16>() {
            Ok(0) => Err("port 0 is not a port".to_owned()),
            Ok(port) => Ok(port),
            Err(error) => Err(format!("{text:?}: {error}")),
        }
    };
    let range = NatPortRange {
        min: port(min)?,
        max: port(max)?,
    };
    if range.min > range.max {
        return Err(format!("{range}: the first port is above the last"));
    }
    Ok(range)
}

fn parse_hairpin_address(text: &str) -> Result<Ipv4Addr, String> {
    let addr: Ipv4Addr = text.parse().map_err(|error| format!("{error}"))?;
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
        return Err(format!("{addr} cannot be a source address"));
    }
    Ok(addr)
}

fn parse_maglev_table_size(text: &str) -> Result<u32, String> {
    let size: u32 = text.parse().map_err(|error| format!("{error}"))?;
    if size < 3 || !lb_agent::datapath::maglev::is_prime(size) {
        return Err(format!("{size} is not a prime above 2"));
    }
    Ok(size)
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// What to print.
    #[arg(value_enum)]
    what: InspectWhat,

    /// The pin directory of the agent to inspect.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,

    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum InspectWhat {
    /// Frontends, their service ids and backends (ready ones first).
    Services,
    /// Tracked flows: client, frontend, backend, idle time, TCP state.
    Conntrack,
    /// Datapath counters, summed over CPUs.
    Counters,
    /// ClientIP session affinities: service id, client, backend, idle time.
    Affinity,
    /// Source-translated flows (LB_SNAT): backend, translated port, client,
    /// service id.
    Snat,
    /// Client ranges of loadBalancerSourceRanges (LB_SRC_RANGES), by
    /// service id.
    SourceRanges,
}

fn init_logging(format: LogFormat, datapath_log: bool) -> anyhow::Result<()> {
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(directives) => EnvFilter::try_new(directives).context("parsing RUST_LOG")?,
        Err(_) if datapath_log => EnvFilter::new("info,lb_ebpf=trace"),
        Err(_) => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // Both also route the `log` records of aya and aya-log into tracing.
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("installing the logger: {error}"))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = match args.manifests {
        Some(dir) => SourceOptions::Manifests(dir),
        None => SourceOptions::Kube(KubeOptions {
            kubeconfig: args.kubeconfig,
        }),
    };
    let scope = Scope {
        node_name: args.node_name.filter(|name| !name.is_empty()),
        service_proxy_name: args.service_proxy_name.filter(|name| !name.is_empty()),
        ..Scope::default()
    };
    let mut config = DatapathConfig {
        tcp_timeout: args.tcp_timeout,
        tcp_closing_timeout: args.tcp_closing_timeout,
        udp_timeout: args.udp_timeout,
        maglev_table_size: args.maglev_table_size,
        // Network byte order: the octets in memory as on the wire.
        hairpin_addr: u32::from_ne_bytes(args.hairpin_address.octets()),
        nat_port_min: args.nat_port_range.min,
        nat_port_max: args.nat_port_range.max,
        // Found at run time: the Node's, or the external interfaces'.
        snat_addr: 0,
        ..DatapathConfig::DEFAULT
    };
    if args.datapath_log {
        config.flags |= CONFIG_F_LOG;
    }
    let options = RunOptions {
        source,
        scope,
        health_addr: args.health_addr,
        attach: args.attach,
        attach_veths: args.attach_veths,
        external: args.external,
        xdp_forward: args.xdp_forward.into(),
        pin_dir: args.pin_dir,
        keep_pins: args.keep_pins,
        capacities: Capacities {
            services: args.max_services,
            backends: args.max_backends,
            slots: args.max_slots,
            flows: args.max_flows,
            affinities: args.max_affinities,
            maglev_tables: args.max_maglev_services,
            snat_flows: args.max_snat_flows,
            source_ranges: args.max_source_ranges,
        },
        config,
        datapath_log: args.datapath_log,
        selection: match args.selection {
            SelectionArg::Random => Selection::Random,
            SelectionArg::Maglev => Selection::Maglev,
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(agent::run(options))?;
    Ok(())
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let context = || {
        format!(
            "reading the maps pinned in {} (is an agent running with --pin-dir {}?)",
            args.pin_dir.display(),
            args.pin_dir.display()
        )
    };
    let output = match args.what {
        InspectWhat::Services => {
            let entries = inspect::services(&args.pin_dir).with_context(context)?;
            if args.json {
                serde_json::to_string_pretty(&entries)?
            } else {
                inspect::services_table(&entries).to_string()
            }
        }
        InspectWhat::Conntrack => {
            let entries = inspect::conntrack(&args.pin_dir).with_context(context)?;
            if args.json {
                serde_json::to_string_pretty(&entries)?
            } else {
                inspect::conntrack_table(&entries).to_string()
            }
        }
        InspectWhat::Counters => {
            let entries = inspect::counters(&args.pin_dir).with_context(context)?;
            if args.json {
                let object: serde_json::Map<String, serde_json::Value> = entries
                    .into_iter()
                    .map(|(name, value)| (name, value.into()))
                    .collect();
                serde_json::to_string_pretty(&object)?
            } else {
                inspect::counters_table(&entries).to_string()
            }
        }
        InspectWhat::Affinity => {
            let entries = inspect::affinity(&args.pin_dir).with_context(context)?;
            if args.json {
                serde_json::to_string_pretty(&entries)?
            } else {
                inspect::affinity_table(&entries).to_string()
            }
        }
        InspectWhat::Snat => {
            let entries = inspect::snat(&args.pin_dir).with_context(context)?;
            if args.json {
                serde_json::to_string_pretty(&entries)?
            } else {
                inspect::snat_table(&entries).to_string()
            }
        }
        InspectWhat::SourceRanges => {
            let entries = inspect::source_ranges(&args.pin_dir).with_context(context)?;
            if args.json {
                serde_json::to_string_pretty(&entries)?
            } else {
                inspect::source_ranges_table(&entries).to_string()
            }
        }
    };
    println!("{output}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let datapath_log = matches!(&cli.command, Command::Run(args) if args.datapath_log);
    let result = init_logging(cli.log_format, datapath_log).and_then(|()| match cli.command {
        Command::Run(args) => run(*args),
        Command::Inspect(args) => inspect(args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, outermost first.
            eprintln!("lb-agent: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["lb-agent", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(args) => Ok(*args),
            Command::Inspect(_) => unreachable!("parsed `run`"),
        }
    }

    #[test]
    fn the_cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn external_defaults() {
        let args = run_args(&["--manifests", "/m", "--attach", "pod0"]).unwrap();
        assert!(args.external.is_empty());
        assert_eq!(args.hairpin_address, Ipv4Addr::new(169, 254, 42, 1));
        assert_eq!(
            args.nat_port_range,
            NatPortRange {
                min: 61_000,
                max: 65_535
            }
        );
        assert_eq!(args.max_snat_flows, defaults::MAX_SNAT_FLOWS);
        assert_eq!(args.max_source_ranges, defaults::MAX_SOURCE_RANGES);
    }

    #[test]
    fn external_interfaces_repeat_and_stand_in_for_attach() {
        let args = run_args(&[
            "--manifests",
            "/m",
            "--external",
            "eth0",
            "--external",
            "eth1",
            "--hairpin-address",
            "169.254.7.7",
            "--nat-port-range",
            "40000-40999",
            "--max-snat-flows",
            "1024",
            "--max-source-ranges",
            "64",
        ])
        .unwrap();
        assert_eq!(args.external, ["eth0", "eth1"]);
        assert!(args.attach.is_empty());
        assert_eq!(args.hairpin_address, Ipv4Addr::new(169, 254, 7, 7));
        assert_eq!(
            args.nat_port_range,
            NatPortRange {
                min: 40_000,
                max: 40_999
            }
        );
        assert_eq!((args.max_snat_flows, args.max_source_ranges), (1024, 64));
        // Some interface is still needed.
        assert!(run_args(&["--manifests", "/m"]).is_err());
    }

    #[test]
    fn xdp_forwarding_is_automatic_by_default_and_can_be_fixed() {
        let args = run_args(&["--manifests", "/m", "--external", "eth0"]).unwrap();
        assert_eq!(args.xdp_forward, XdpForwardArg::Auto);
        assert_eq!(
            XdpForwardChoice::from(args.xdp_forward),
            XdpForwardChoice::Auto
        );
        for (text, expected) in [
            ("tx", XdpForwardChoice::Fixed(XdpForwarding::Transmit)),
            ("tc", XdpForwardChoice::Fixed(XdpForwarding::Tc)),
            ("auto", XdpForwardChoice::Auto),
        ] {
            let args = run_args(&[
                "--manifests",
                "/m",
                "--external",
                "eth0",
                "--xdp-forward",
                text,
            ])
            .unwrap();
            assert_eq!(XdpForwardChoice::from(args.xdp_forward), expected, "{text}");
        }
        for bad in ["", "xdp", "TX-only", "redirect"] {
            assert!(
                run_args(&["--external", "eth0", "--xdp-forward", bad]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn inspect_lists_snat_flows_and_source_ranges() {
        for (what, expected) in [("snat", "Snat"), ("source-ranges", "SourceRanges")] {
            let cli = Cli::try_parse_from(["lb-agent", "inspect", what]).unwrap();
            match cli.command {
                Command::Inspect(args) => assert_eq!(format!("{:?}", args.what), expected),
                Command::Run(_) => unreachable!("parsed `inspect`"),
            }
        }
    }

    #[test]
    fn nat_port_ranges_are_validated() {
        assert_eq!(
            parse_nat_port_range("1-1"),
            Ok(NatPortRange { min: 1, max: 1 })
        );
        assert_eq!(NatPortRange::DEFAULT.to_string(), "61000-65535");
        for bad in ["61000", "65535-61000", "0-100", "61000-65536", "a-b", "-"] {
            assert!(parse_nat_port_range(bad).is_err(), "{bad}");
            assert!(
                run_args(&["--attach", "p", "--nat-port-range", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn hairpin_addresses_are_validated() {
        for bad in ["0.0.0.0", "255.255.255.255", "224.0.0.1", "fe80::1", "x"] {
            assert!(parse_hairpin_address(bad).is_err(), "{bad}");
        }
        for bad in ["0", "0"] {
            assert!(run_args(&["--attach", "p", "--max-snat-flows", bad]).is_err());
            assert!(run_args(&["--attach", "p", "--max-source-ranges", bad]).is_err());
        }
    }
}

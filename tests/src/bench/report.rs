//! The report: tables (printed, and in `benchmarks.md`), the goals and
//! whether each is met, and the SVG plots next to the markdown.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::agent::AgentResults;
use super::e2e::{E2eResults, Way};
use super::prog::{HotPath, ProgResults};
use super::stats::Summary;
use super::svg::{BarChart, Series};
use super::{BenchError, Plan, Result};

/// Where and how the figures were taken.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub date: String,
    pub command: String,
}

impl Machine {
    pub fn current(command: &str) -> Self {
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("model name"))
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            cpu,
            cores,
            kernel,
            date: utc_date_time(SystemTime::now()),
            command: command.to_owned(),
        }
    }
}

/// `YYYY-MM-DD HH:MM UTC` (civil-from-days, proleptic Gregorian).
fn utc_date_time(now: SystemTime) -> String {
    let seconds = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        of_day / 3600,
        of_day % 3600 / 60
    )
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct Results {
    pub plan: Plan,
    pub prog: ProgResults,
    pub e2e: E2eResults,
    pub agent: AgentResults,
    pub elapsed: Duration,
}

/// A goal, what was measured against it, and whether it is met (`None`:
/// it cannot be measured yet).
#[derive(Clone, Debug)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

fn count(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The program-cost table: one row per path and conntrack size, one
/// column per number of services.
pub fn prog_table(prog: &ProgResults) -> String {
    let mut services: Vec<u32> = prog.rows.iter().map(|row| row.services).collect();
    services.sort_unstable();
    services.dedup();
    let mut flows: Vec<u32> = prog.rows.iter().map(|row| row.flows).collect();
    flows.sort_unstable();
    flows.dedup();
    let mut text = String::from("| hot path | flows |");
    for s in &services {
        let _ = write!(text, " {} services |", count(*s));
    }
    text.push_str("\n|---|---:|");
    text.push_str(&"---:|".repeat(services.len()));
    text.push('\n');
    for path in HotPath::ALL {
        for &f in &flows {
            let _ = write!(text, "| {} | {} |", path.label(), count(f));
            for &s in &services {
                let cell = prog
                    .get(path, s, f)
                    .map_or("–".to_owned(), |row| row.ns.show(0));
                let _ = write!(text, " {cell} |");
            }
            text.push('\n');
        }
    }
    text.push_str("\n| calibration | ns |\n|---|---:|\n");
    for row in &prog.calibration {
        let _ = writeln!(text, "| {} | {} |", row.label, row.ns.show(1));
    }
    text
}

pub fn e2e_table(e2e: &E2eResults) -> String {
    let mut text = String::from(
        "| services | way | TCP p50 µs | TCP p99 µs | new conn/s | vs pod IP | vs iptables | UDP p50 µs | UDP p99 µs |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &e2e.rows {
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            count(row.services),
            row.way.label(),
            row.tcp_p50_us.show(1),
            row.tcp_p99_us.show(1),
            row.connections_per_s.show(0),
            row.connections_vs_direct.show(2),
            row.connections_vs_iptables.show(2),
            row.udp_p50_us.show(1),
            row.udp_p99_us.show(1),
        );
    }
    text
}

pub fn agent_table(agent: &AgentResults) -> String {
    let mut text = String::from(
        "| services × endpoints | cold start to programmed, ms | of which reading + writing maps, ms | of which map writes (agent's own figure), ms | peak RSS (VmHWM), MiB |\n|---:|---:|---:|---:|---:|\n",
    );
    for row in &agent.cold {
        let _ = writeln!(
            text,
            "| {} × {} | {} | {} | {} | {} |",
            count(row.services),
            row.endpoints,
            row.total_ms.show(0),
            row.programming_ms.show(0),
            row.map_writes_ms
                .map_or("–".to_owned(), |writes| writes.show(0)),
            row.peak_rss_mib.show(1)
        );
    }
    let change = &agent.change;
    let _ = writeln!(
        text,
        "\nOne EndpointSlice change on disk to its map write ({} changes, {} services programmed): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms.\n",
        change.changes,
        count(change.services),
        change.p50_ms,
        change.p99_ms,
        change.max_ms
    );
    text.push_str(
        "| map | max entries | memlock bytes | bytes per entry |\n|---|---:|---:|---:|\n",
    );
    for map in &agent.maps {
        let _ = writeln!(
            text,
            "| {} | {} | {} | {:.1} |",
            map.name,
            map.max_entries,
            map.memlock_bytes,
            map.bytes_per_entry()
        );
    }
    text
}

/// All tables, as printed on stdout.
pub fn tables(results: &Results) -> String {
    format!(
        "## Program cost, ns/packet (median (min–max) of {} rounds × {} runs)\n\n{}\n## End to end (median (min–max) of {} rounds)\n\n{}\n## Agent\n\n{}",
        results.prog.rounds,
        results.prog.runs,
        prog_table(&results.prog),
        results.plan.e2e_rounds,
        e2e_table(&results.e2e),
        agent_table(&results.agent)
    )
}

/// The median of `path` at the smallest grid point, and the worst median
/// of the grid.
fn path_figures(prog: &ProgResults, path: HotPath) -> Option<(f64, f64)> {
    let rows: Vec<_> = prog.rows.iter().filter(|row| row.path == path).collect();
    let first = rows
        .iter()
        .min_by_key(|row| (row.services, row.flows))?
        .ns
        .median;
    let worst = rows
        .iter()
        .map(|row| row.ns.median)
        .fold(f64::MIN, f64::max);
    Some((first, worst))
}

fn met_text(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measurable yet",
    }
}

/// Whether `large` grew measurably over `small`: its median above the
/// largest repetition at `small` and more than 5 % above its median.
fn grew(small: &Summary, large: &Summary) -> bool {
    large.median > small.max && large.median > small.median * 1.05
}

pub fn goals(results: &Results) -> Vec<Goal> {
    let prog = &results.prog;
    let mut goals = Vec::new();
    for (what, path, tc_path, limit, katran) in [
        (
            "a NodePort packet of an established flow",
            HotPath::XdpEstablished,
            HotPath::Established,
            67.0,
            134,
        ),
        (
            "a NodePort packet of a new flow (SYN)",
            HotPath::XdpNewFlow,
            HotPath::NewFlow,
            230.0,
            284,
        ),
        (
            "a packet for no Service",
            HotPath::XdpNoService,
            HotPath::NoService,
            35.0,
            69,
        ),
    ] {
        let xdp = path_figures(prog, path);
        let tc = path_figures(prog, tc_path).map_or(String::new(), |(first, worst)| {
            format!("; TC for comparison: {first:.0} ns, worst {worst:.0} ns")
        });
        let measured = match xdp {
            Some((first, worst)) => format!(
                "XDP: {first:.0} ns with the smallest maps, {worst:.0} ns worst of the grid{tc}"
            ),
            None => "not measured".to_owned(),
        };
        goals.push(Goal {
            goal: format!("{what} ≤ {limit:.0} ns/packet at XDP (Katran: {katran} ns)"),
            measured,
            // Met only if it holds over the whole grid, not just with
            // near-empty maps.
            met: xdp.map(|(_, worst)| worst <= limit),
        });
    }
    let mut services: Vec<u32> = prog.rows.iter().map(|row| row.services).collect();
    services.sort_unstable();
    services.dedup();
    if let (Some(&smallest), Some(&largest)) = (services.first(), services.last()) {
        let mut grown = Vec::new();
        for path in HotPath::ALL {
            for row in prog
                .rows
                .iter()
                .filter(|r| r.path == path && r.services == smallest)
            {
                if let Some(large) = prog.get(path, largest, row.flows)
                    && grew(&row.ns, &large.ns)
                {
                    grown.push(format!(
                        "{} at {} flows: {:.0} → {:.0} ns",
                        path.label(),
                        count(row.flows),
                        row.ns.median,
                        large.ns.median
                    ));
                }
            }
        }
        goals.push(Goal {
            goal: format!(
                "no measurable growth in program cost from {} to {} services",
                count(smallest),
                count(largest)
            ),
            measured: if grown.is_empty() {
                "no path's median at the largest size is above every repetition at the smallest and 5 % above its median".to_owned()
            } else {
                format!("grew: {}", grown.join("; "))
            },
            met: Some(grown.is_empty()),
        });
    }
    let e2e = &results.e2e;
    let ratios: Vec<String> = e2e
        .rows
        .iter()
        .filter(|row| row.way == Way::Datapath)
        .map(|row| {
            format!(
                "{:.0} % at {} services",
                row.connections_vs_direct.median * 100.0,
                count(row.services)
            )
        })
        .collect();
    let all_met = e2e
        .rows
        .iter()
        .filter(|row| row.way == Way::Datapath)
        .all(|row| row.connections_vs_direct.median >= 0.97);
    goals.push(Goal {
        goal: "new connections per second through a Service ≥ 97 % of straight to the pod"
            .to_owned(),
        measured: ratios.join(", "),
        met: (!ratios.is_empty()).then_some(all_met),
    });
    let largest = e2e.rows.iter().map(|row| row.services).max().unwrap_or(0);
    let versus = e2e.get(Way::Datapath, largest);
    goals.push(Goal {
        goal: "new connections per second ≥ 2× the iptables rules at 10,000 Services".to_owned(),
        measured: versus.map_or("not measured".to_owned(), |row| {
            format!(
                "{:.2}× at {} services",
                row.connections_vs_iptables.median,
                count(row.services)
            )
        }),
        met: versus
            .filter(|row| row.services >= 10_000)
            .map(|row| row.connections_vs_iptables.median >= 2.0),
    });
    let agent = &results.agent;
    let cold = agent.cold.iter().max_by_key(|row| row.services);
    goals.push(Goal {
        goal: "30,000 Services programmed in under a second".to_owned(),
        measured: cold.map_or("not measured".to_owned(), |row| {
            format!(
                "{:.0} ms from process start ({:.0} ms reading and writing) for {} services × {}",
                row.total_ms.median,
                row.programming_ms.median,
                count(row.services),
                row.endpoints
            )
        }),
        met: cold
            .filter(|row| row.services >= 30_000)
            .map(|row| row.total_ms.median < 1_000.0),
    });
    goals.push(Goal {
        goal: "a single change in the maps, p99 under 10 ms".to_owned(),
        measured: format!(
            "p99 {:.1} ms over {} changes",
            agent.change.p99_ms, agent.change.changes
        ),
        met: Some(agent.change.p99_ms < 10.0),
    });
    goals.push(Goal {
        goal: "at most 128 bytes of kernel memory per tracked flow".to_owned(),
        measured: agent
            .bytes_per_flow()
            .map_or("not measured".to_owned(), |bytes| {
                format!("{bytes:.0} bytes (LB_CONNTRACK memlock / max entries)")
            }),
        met: agent.bytes_per_flow().map(|bytes| bytes <= 128.0),
    });
    goals
}

pub fn goals_table(goals: &[Goal]) -> String {
    let mut text = String::from("| goal | measured | |\n|---|---|---|\n");
    for goal in goals {
        let _ = writeln!(
            text,
            "| {} | {} | {} |",
            goal.goal,
            goal.measured,
            met_text(goal.met)
        );
    }
    text
}

/// Plot file names, next to `benchmarks.md`.
pub const PLOT_PROG_SERVICES: &str = "benchmarks-program-cost-services.svg";
pub const PLOT_PROG_FLOWS: &str = "benchmarks-program-cost-flows.svg";
pub const PLOT_CONNECTIONS: &str = "benchmarks-connections.svg";
pub const PLOT_LATENCY: &str = "benchmarks-tcp-latency.svg";
pub const PLOT_AGENT: &str = "benchmarks-agent-cold-start.svg";

pub fn plots(results: &Results) -> Vec<(&'static str, String)> {
    let prog = &results.prog;
    let mut services: Vec<u32> = prog.rows.iter().map(|row| row.services).collect();
    services.sort_unstable();
    services.dedup();
    let mut flows: Vec<u32> = prog.rows.iter().map(|row| row.flows).collect();
    flows.sort_unstable();
    flows.dedup();
    let least_flows = flows.first().copied().unwrap_or(0);
    let least_services = services.first().copied().unwrap_or(1);
    let by_services = BarChart {
        title: format!("ns/packet by services ({} flows)", count(least_flows)),
        y_label: "ns/packet".into(),
        categories: services
            .iter()
            .map(|s| format!("{} svc", count(*s)))
            .collect(),
        series: HotPath::ALL
            .iter()
            .map(|&path| Series {
                name: path.label().into(),
                values: services
                    .iter()
                    .map(|&s| prog.get(path, s, least_flows).map(|row| row.ns))
                    .collect(),
            })
            .collect(),
    };
    let by_flows = BarChart {
        title: format!(
            "ns/packet by tracked flows ({} services)",
            count(least_services)
        ),
        y_label: "ns/packet".into(),
        categories: flows
            .iter()
            .map(|f| format!("{} flows", count(*f)))
            .collect(),
        series: HotPath::ALL
            .iter()
            .map(|&path| Series {
                name: path.label().into(),
                values: flows
                    .iter()
                    .map(|&f| prog.get(path, least_services, f).map(|row| row.ns))
                    .collect(),
            })
            .collect(),
    };
    let e2e = &results.e2e;
    let mut e2e_services: Vec<u32> = e2e.rows.iter().map(|row| row.services).collect();
    e2e_services.sort_unstable();
    e2e_services.dedup();
    let e2e_chart =
        |title: &str, y_label: &str, pick: fn(&super::e2e::E2eRow) -> Summary| BarChart {
            title: title.into(),
            y_label: y_label.into(),
            categories: e2e_services
                .iter()
                .map(|s| format!("{} services", count(*s)))
                .collect(),
            series: Way::ALL
                .iter()
                .map(|&way| Series {
                    name: way.label().into(),
                    values: e2e_services
                        .iter()
                        .map(|&s| e2e.get(way, s).map(pick))
                        .collect(),
                })
                .collect(),
        };
    let connections = e2e_chart(
        "New connections per second (connect, request, response, close)",
        "connections/s",
        |row| row.connections_per_s,
    );
    let latency = e2e_chart("TCP request/response on one connection, p50", "µs", |row| {
        row.tcp_p50_us
    });
    let agent = BarChart {
        title: "Agent cold start to programmed maps (10 endpoints per service)".into(),
        y_label: "ms".into(),
        categories: results
            .agent
            .cold
            .iter()
            .map(|row| format!("{} services", count(row.services)))
            .collect(),
        series: vec![
            Series {
                name: "process start".into(),
                values: results
                    .agent
                    .cold
                    .iter()
                    .map(|row| Some(row.total_ms))
                    .collect(),
            },
            Series {
                name: "reading + writing".into(),
                values: results
                    .agent
                    .cold
                    .iter()
                    .map(|row| Some(row.programming_ms))
                    .collect(),
            },
        ],
    };
    vec![
        (PLOT_PROG_SERVICES, by_services.render()),
        (PLOT_PROG_FLOWS, by_flows.render()),
        (PLOT_CONNECTIONS, connections.render()),
        (PLOT_LATENCY, latency.render()),
        (PLOT_AGENT, agent.render()),
    ]
}

/// `benchmarks.md`.
pub fn markdown(results: &Results, machine: &Machine) -> String {
    let mut text = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        text,
        "Measured by `{}` ({} plan, {:.0} s) on {} ({} cores), Linux {}, {}. Every figure is the median of repeated measurements with the smallest and largest in parentheses; ratios are taken round by round within the same run. These machines are shared and noisy: compare figures within this file, not across machines.\n",
        machine.command,
        results.plan.name,
        results.elapsed.as_secs_f64(),
        machine.cpu,
        machine.cores,
        machine.kernel,
        machine.date
    );
    text.push_str("## Goals\n\n");
    text.push_str(&goals_table(&goals(results)));
    text.push_str(
        "\nThe per-packet goals are stated for XDP and judged on the worst median over the whole grid of services and flows (section 1); the XDP figures are for `lb_xdp_ext` on NodePort packets to a backend on this node, the TC figures of `lb_tc_pod` are listed for comparison.\n\n",
    );
    let _ = writeln!(
        text,
        "## 1. Program cost (`BPF_PROG_TEST_RUN`)\n\nns per packet of `lb_tc_pod` (TC rows) and `lb_xdp_ext` (XDP rows), median (min–max) over {} rounds of {} runs. Each run goes through the `lb-bench` replay wrapper (a TC and an XDP one), which restores the original packet before every run and tail-calls the program under test; the same wrapper tail-calling an empty program is measured in the same round and subtracted. After every round the datapath's counters must have moved by exactly one count per run on each of the expected counters (established, new_flow, reply, pass; forwarded for XDP_TX) and by nothing else, and the last run's verdict and output frame must be the expected ones; new flows step the client address every run and are deleted (and counted, with their LB_SNAT entries) after each round. The XDP runs are made in a network namespace with the external interface as `ingress_ifindex`, fixed routes and permanent neighbours: the NodePort rows go to a backend on this node (DNAT, XDP_PASS), the remote-backend rows to a backend on another node (DNAT + SNAT to the node address, FIB lookup, XDP_TX with the looked-up MACs). The maps are filled from userspace: filler services each have a frontend, a slot, a backend and its reverse-NAT entry; filler flows are conntrack entries of other clients.\n",
        results.prog.rounds, results.prog.runs
    );
    text.push_str(&prog_table(&results.prog));
    let _ = writeln!(
        text,
        "\n![by services]({PLOT_PROG_SERVICES})\n![by flows]({PLOT_PROG_FLOWS})\n"
    );
    let _ = writeln!(
        text,
        "## 2. End to end\n\nA client pod and three backend pods on one node (network namespaces and veth pairs). Four ways, each its own testbed built side by side and measured in turn every round: straight to a backend pod's IP; through this datapath (the agent, manifest source); through kube-proxy's iptables-mode layout (`KUBE-SERVICES` dispatch, `KUBE-SVC-*` chains with `statistic` random choice, `KUBE-SEP-*` DNAT chains, `KUBE-MARK-MASQ`/`KUBE-POSTROUTING` masquerade marks, `KUBE-FORWARD`) and kube-proxy's nftables-mode layout (table `ip kube-proxy`, verdict map `service-ips` keyed by `ip daddr . meta l4proto . th dport`, `numgen random mod n` endpoint choice, masquerade marks, `cluster-ips` reject set), loaded in the node namespace with `iptables-restore` ({}) and `nft -f` ({}). The filler services have three endpoints each at unused addresses; the measured service is programmed last. Load: the project's own generator, one request outstanding at a time: per round and way {} request/response exchanges on TCP connections, up to {} new connections (each connect, request, response, close; bounded to {:?} per round), and {} UDP exchanges; every answer is checked (from an expected backend, the request echoed, the client's own address seen). A round runs every way ten times in turn with a tenth of the work each time, so noise from elsewhere on the machine lands on every way alike; ratios are per round. Median (min–max) over {} rounds.\n",
        results.e2e.iptables_version,
        results.e2e.nft_version,
        results.plan.e2e_requests,
        results.plan.e2e_connections,
        results.plan.e2e_time_bound,
        results.plan.e2e_requests,
        results.plan.e2e_rounds
    );
    text.push_str(&e2e_table(&results.e2e));
    let _ = writeln!(
        text,
        "\n![connections]({PLOT_CONNECTIONS})\n![latency]({PLOT_LATENCY})\n"
    );
    let _ = writeln!(
        text,
        "## 3. The agent\n\nCold start: `lb-agent run` with a manifest directory already holding the Services (10 endpoints each, every endpoint a backend of its own; 1,000 Services per file), from process start to its log line saying it programmed the maps (after loading, pinning and attaching to one interface), and from the line saying the maps are pinned to that line; LB_SERVICES is then checked to hold every frontend. {} rounds each. Change: the last Service's manifest file is rewritten with one endpoint not ready, then ready again, alternately, and the time from the write to the moment LB_SERVICES shows the new number of ready backends (spinning on a map lookup) is taken per change. Kernel memory: `memlock` and `max_entries` from each pinned map's fdinfo (the maps' own accounting, what `bpftool map show` prints); per entry is memlock / max entries, since the hash maps are preallocated.\n",
        results.plan.agent_rounds
    );
    text.push_str(&agent_table(&results.agent));
    let _ = writeln!(text, "\n![agent]({PLOT_AGENT})");
    text
}

/// Writes `benchmarks.md` and the plots into `dir`.
pub fn write(dir: &Path, results: &Results, machine: &Machine) -> Result<()> {
    fs::create_dir_all(dir)
        .map_err(|error| BenchError::io(format!("create {}", dir.display()), error))?;
    let path = dir.join("benchmarks.md");
    fs::write(&path, markdown(results, machine))
        .map_err(|error| BenchError::io(format!("write {}", path.display()), error))?;
    for (name, svg) in plots(results) {
        let path = dir.join(name);
        fs::write(&path, svg)
            .map_err(|error| BenchError::io(format!("write {}", path.display()), error))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        let at = UNIX_EPOCH + Duration::from_secs(1_795_620_600);
        assert_eq!(utc_date_time(at), "2026-11-25 15:30 UTC");
        assert_eq!(utc_date_time(UNIX_EPOCH), "1970-01-01 00:00 UTC");
    }

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(count(1), "1");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_000_000), "1,000,000");
    }

    #[test]
    fn growth_needs_more_than_the_spread() {
        let small = Summary::of(&[50.0, 52.0, 55.0]).expect("values");
        assert!(!grew(&small, &Summary::of(&[54.0]).expect("values")));
        assert!(grew(&small, &Summary::of(&[60.0]).expect("values")));
    }
}

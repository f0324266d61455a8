//! The agent: how long a cold start takes to program N Services of 10
//! endpoints each (from the manifest source), how long one EndpointSlice
//! change on disk takes to reach the maps, the agent's peak memory, and
//! the kernel memory of its maps per entry from the maps' own accounting
//! (`memlock` in the map's fdinfo, what `bpftool map show` prints).

use std::fs::{self, File};
use std::net::SocketAddrV4;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    names, proto,
    service::{ServiceKey, ServiceValue},
};

use super::services::{self, fillers};
use super::stats::{Summary, percentile_of_sorted};
use super::{BenchError, Plan, Result};
use crate::agent::{STOP_TIMEOUT, agent_binary};
use crate::dirs::PinDir;
use crate::error::TestbedError;
use crate::packet::datapath::{be_addr, be_port};
use crate::topology::{Node, Testbed};
use crate::wait::{self, Probe};

/// Endpoints per Service.
pub const ENDPOINTS: u32 = 10;
/// Services per manifest file.
const SERVICES_PER_FILE: usize = 1_000;
/// How long one change may take before the measurement fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to log that it programmed the maps.
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(120);

/// Cold start with `services` Services.
#[derive(Clone, Debug)]
pub struct ColdStartRow {
    pub services: u32,
    pub endpoints: u32,
    /// Process start to "programmed" in its log, ms.
    pub total_ms: Summary,
    /// Maps pinned to "programmed" (reading, translating, writing), ms.
    pub programming_ms: Summary,
    /// The agent's own figure for writing the maps (`programmed_in_ms` in
    /// its log line), ms, when it logs one.
    pub map_writes_ms: Option<Summary>,
    /// Peak resident memory (VmHWM) after programming, MiB.
    pub peak_rss_mib: Summary,
}

/// One EndpointSlice change on disk to the map write.
#[derive(Clone, Debug)]
pub struct ChangeResult {
    pub services: u32,
    pub changes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Kernel memory of one map.
#[derive(Clone, Debug)]
pub struct MapMemory {
    pub name: String,
    pub max_entries: u64,
    pub memlock_bytes: u64,
}

impl MapMemory {
    pub fn bytes_per_entry(&self) -> f64 {
        self.memlock_bytes as f64 / self.max_entries.max(1) as f64
    }
}

#[derive(Clone, Debug)]
pub struct AgentResults {
    pub cold: Vec<ColdStartRow>,
    pub change: ChangeResult,
    /// The maps of the agent's default-size datapath.
    pub maps: Vec<MapMemory>,
}

impl AgentResults {
    /// Kernel bytes per tracked flow: conntrack's memlock per entry.
    pub fn bytes_per_flow(&self) -> Option<f64> {
        self.maps
            .iter()
            .find(|map| map.name == names::MAP_CONNTRACK)
            .map(MapMemory::bytes_per_entry)
    }
}

/// Seconds since midnight UTC of a log line's RFC 3339 timestamp
/// (`2026-11-25T15:20:01.123456Z ...`).
fn log_time_of_day(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (_, time) = stamp.split_once('T')?;
    let time = time.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

fn time_of_day(now: SystemTime) -> f64 {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    (since_epoch.as_secs() % 86_400) as f64 + f64::from(since_epoch.subsec_nanos()) * 1e-9
}

/// Seconds from `start` (time of day) to `later`, across midnight.
fn seconds_after(start: f64, later: f64) -> f64 {
    let delta = later - start;
    if delta < -43_200.0 {
        delta + 86_400.0
    } else {
        delta
    }
}

/// The value of `field=<number>` in a log line.
fn log_field(line: &str, field: &str) -> Option<f64> {
    let start = line.find(&format!("{field}="))? + field.len() + 1;
    line[start..].split_whitespace().next()?.parse().ok()
}

/// The first log line containing `needle`.
fn log_line<'a>(log: &'a str, needle: &str) -> Option<&'a str> {
    log.lines().find(|line| line.contains(needle))
}

fn peak_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status =
        fs::read_to_string(&path).map_err(|error| BenchError::io(format!("read {path}"), error))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| BenchError::check("agent memory", format!("no VmHWM in {path}")))
}

fn open_services(pin_dir: &Path) -> Result<HashMap<MapData, ServiceKey, ServiceValue>> {
    let path = pin_dir.join(names::MAP_SERVICES);
    let data = MapData::from_pin(&path).map_err(|source| {
        BenchError::check(format!("open {}", path.display()), source.to_string())
    })?;
    let map = Map::from_map_data(data)
        .map_err(|source| BenchError::check("map type of LB_SERVICES", source.to_string()))?;
    HashMap::try_from(map)
        .map_err(|source| BenchError::check("map type of LB_SERVICES", source.to_string()))
}

/// Frontends in LB_SERVICES.
fn frontend_count(pin_dir: &Path) -> Result<usize> {
    let map = open_services(pin_dir)?;
    let mut count = 0;
    for key in map.keys() {
        key.map_err(|source| BenchError::check("iterate LB_SERVICES", source.to_string()))?;
        count += 1;
    }
    Ok(count)
}

/// `memlock` and `max_entries` of every map pinned in `pin_dir`.
pub fn map_memory(pin_dir: &Path) -> Result<Vec<MapMemory>> {
    let entries = fs::read_dir(pin_dir)
        .map_err(|error| BenchError::io(format!("read {}", pin_dir.display()), error))?;
    let mut maps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| BenchError::io("read pin directory", error))?;
        let path = entry.path();
        let Ok(data) = MapData::from_pin(&path) else {
            // Not a map (a lock file, a pinned program).
            continue;
        };
        let fd = data.fd().as_fd().as_raw_fd();
        let info_path = format!("/proc/self/fdinfo/{fd}");
        let info = fs::read_to_string(&info_path)
            .map_err(|error| BenchError::io(format!("read {info_path}"), error))?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        let (Some(max_entries), Some(memlock_bytes)) = (field("max_entries:"), field("memlock:"))
        else {
            return Err(BenchError::check(
                "map memory",
                format!("{info_path} has no max_entries or memlock"),
            ));
        };
        maps.push(MapMemory {
            name: entry.file_name().to_string_lossy().into_owned(),
            max_entries,
            memlock_bytes,
        });
    }
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(maps)
}

/// A one-node testbed with one pod (the agent needs an interface to attach
/// to) and `services` Services of [`ENDPOINTS`] endpoints in its manifest
/// directory. Returns the testbed, the manifest directory and the ports.
fn agent_testbed(
    services: u32,
) -> Result<(
    Testbed,
    crate::manifests::ManifestDir,
    Vec<super::kube_proxy::ServicePort>,
)> {
    let mut testbed = Testbed::new("bench-agent")?;
    let manifests = crate::manifests::ManifestDir::create(testbed.scratch().join("manifests"))?;
    let node = testbed.add_node("node")?;
    node.add_pod("pod")?;
    let ports = fillers(services, ENDPOINTS);
    services::write_manifests(&manifests, &ports, SERVICES_PER_FILE)?;
    Ok((testbed, manifests, ports))
}

/// `lb-agent run` started for a measurement. Unlike
/// [`crate::agent::Agent`] it is not waited for here: a cold start with
/// tens of thousands of Services takes far longer than the tests' start
/// timeout (the agent programs the maps before it attaches), and is timed
/// from its log instead. On drop it gets SIGTERM (it detaches and unpins),
/// then SIGKILL after [`STOP_TIMEOUT`]; the pin directory guard removes
/// what is left.
struct BenchAgent {
    child: Child,
    log_path: PathBuf,
    pin_dir: PinDir,
}

impl BenchAgent {
    /// Starts the agent in `node`'s network namespace (and this process's
    /// mount namespace, for bpffs), attached to every pod, watching
    /// `manifests`, with room for `services` Services of [`ENDPOINTS`]
    /// backends each. Its log goes to `log_path`.
    fn spawn(
        node: &Node,
        manifests: &Path,
        pin_dir: PinDir,
        log_path: PathBuf,
        services: u32,
    ) -> Result<Self> {
        let binary = agent_binary()?;
        let log = File::create(&log_path)
            .map_err(|error| BenchError::io(format!("create {}", log_path.display()), error))?;
        let log_for_stderr = log
            .try_clone()
            .map_err(|error| BenchError::io("duplicate the agent log", error))?;
        let mut command = node.ns().command(&binary)?;
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of
        // ours: if this process dies, the agent gets SIGTERM and cleans up.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
            .arg("run")
            .arg("--manifests")
            .arg(manifests)
            .arg("--pin-dir")
            .arg(pin_dir.path())
            .arg("--max-backends")
            .arg((services * ENDPOINTS + 1024).to_string())
            .arg("--max-slots")
            .arg((services * ENDPOINTS * 2 + 1024).max(1 << 19).to_string());
        for iface in node.pod_ifaces() {
            command.arg("--attach").arg(iface);
        }
        command
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_for_stderr));
        let child = command
            .spawn()
            .map_err(|source| TestbedError::CommandSpawn {
                command: format!("{} run (in {})", binary.display(), node.ns().name()),
                source,
            })?;
        Ok(Self {
            child,
            log_path,
            pin_dir,
        })
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn pin_dir(&self) -> &Path {
        self.pin_dir.path()
    }

    /// Fails (with the agent's log) if the agent has exited.
    fn ensure_running(&mut self) -> Result<(), TestbedError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(TestbedError::AgentExited {
                status,
                log: self.log(),
            }),
            Err(source) => Err(TestbedError::io("wait for lb-agent", source)),
        }
    }

    /// Waits until the agent logs that it programmed the maps (its first
    /// line with "programmed") and returns that line.
    fn wait_programmed(&mut self) -> Result<String> {
        Ok(wait::poll(
            PROGRAMMED_TIMEOUT,
            "the agent to log \"programmed\"",
            || {
                if let Err(error) = self.ensure_running() {
                    return Probe::Failed(error);
                }
                match log_line(&self.log(), "programmed") {
                    Some(line) => Probe::Ready(line.to_owned()),
                    None => Probe::Pending("not yet".to_owned()),
                }
            },
        )?)
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pids fit in pid_t");
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: our own child, not reaped yet (we hold its `Child`),
            // so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() >= deadline {
                    eprintln!("bench: lb-agent did not exit after SIGTERM; killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Starts the agent on the testbed's node.
fn start_agent(testbed: &Testbed, manifests: &Path, services: u32) -> Result<BenchAgent> {
    BenchAgent::spawn(
        testbed.node("node"),
        manifests,
        testbed.pin_dir("agent")?,
        testbed.scratch().join("agent.log"),
        services,
    )
}

/// What one cold start measured.
struct ColdStart {
    total_ms: f64,
    programming_ms: f64,
    map_writes_ms: Option<f64>,
    peak_rss_kib: u64,
    maps: Vec<MapMemory>,
}

/// One cold start with `services` Services.
fn cold_start(services: u32) -> Result<ColdStart> {
    let (testbed, manifests, _ports) = agent_testbed(services)?;
    let started = time_of_day(SystemTime::now());
    let mut agent = start_agent(&testbed, manifests.path(), services)?;
    let programmed = agent.wait_programmed()?;
    let log = agent.log();
    let at = |line: &str| {
        log_time_of_day(line)
            .ok_or_else(|| BenchError::check("agent log", format!("no UTC timestamp in {line:?}")))
    };
    let done = at(&programmed)?;
    let pinned = log_line(&log, "maps pinned")
        .map(at)
        .transpose()?
        .unwrap_or(started);
    let peak = peak_rss_kib(agent.pid())?;
    let frontends = frontend_count(agent.pin_dir())?;
    if frontends != services as usize {
        return Err(BenchError::check(
            "cold start",
            format!("{frontends} frontends in LB_SERVICES, expected {services}"),
        ));
    }
    let maps = map_memory(agent.pin_dir())?;
    Ok(ColdStart {
        total_ms: seconds_after(started, done) * 1e3,
        programming_ms: seconds_after(pinned, done) * 1e3,
        map_writes_ms: log_field(&programmed, "programmed_in_ms"),
        peak_rss_kib: peak,
        maps,
    })
}

/// Times `changes` EndpointSlice changes: each rewrites the last Service's
/// manifest file with one endpoint ready or not, alternately, and waits
/// (spinning on a map lookup) until LB_SERVICES shows the new number of
/// ready backends for its frontend.
fn changes(services: u32, count: usize, progress: &mut dyn FnMut(String)) -> Result<ChangeResult> {
    let (testbed, manifests, ports) = agent_testbed(services)?;
    let mut agent = start_agent(&testbed, manifests.path(), services)?;
    agent.wait_programmed()?;
    let measured = ports.last().expect("at least one service");
    let key = ServiceKey::new(
        be_addr(&SocketAddrV4::new(measured.cluster_ip, measured.port)),
        be_port(&SocketAddrV4::new(measured.cluster_ip, measured.port)),
        proto::TCP,
    );
    let map = open_services(agent.pin_dir())?;
    let ready_backends = || map.get(&key, 0).ok().map(|value| value.backend_count);
    wait::poll(
        PROGRAMMED_TIMEOUT,
        "the measured service",
        || match ready_backends() {
            Some(count) if count == ENDPOINTS => Probe::Ready(()),
            other => Probe::Pending(format!("{other:?} ready backends")),
        },
    )?;
    let toggled = *measured.endpoints.last().expect("endpoints").ip();
    let single = std::slice::from_ref(measured);
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count {
        if n > 0 && n % 100 == 0 {
            progress(format!("agent: {n} of {count} changes"));
        }
        let (not_ready, expected): (&[_], u32) = if n % 2 == 0 {
            (&[toggled], ENDPOINTS - 1)
        } else {
            (&[], ENDPOINTS)
        };
        let text = services::manifest_text(single, not_ready);
        let start = Instant::now();
        manifests.write_text("bench-measured.json", &text)?;
        loop {
            if ready_backends() == Some(expected) {
                break;
            }
            if start.elapsed() > CHANGE_TIMEOUT {
                agent.ensure_running()?;
                return Err(BenchError::check(
                    "EndpointSlice change",
                    format!(
                        "change {n} not in LB_SERVICES after {CHANGE_TIMEOUT:?} (ready backends {:?}, expected {expected})",
                        ready_backends()
                    ),
                ));
            }
            std::hint::spin_loop();
        }
        latencies.push(start.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(ChangeResult {
        services,
        changes: count,
        p50_ms: percentile_of_sorted(&latencies, 50.0),
        p99_ms: percentile_of_sorted(&latencies, 99.0),
        max_ms: latencies[latencies.len() - 1],
    })
}

/// Runs the agent measurements of `plan`.
pub fn measure(plan: &Plan, progress: &mut dyn FnMut(String)) -> Result<AgentResults> {
    let mut cold = Vec::new();
    let mut maps = Vec::new();
    for &services in &plan.agent_services {
        let mut totals = Vec::new();
        let mut programming = Vec::new();
        let mut peaks = Vec::new();
        let mut writes = Vec::new();
        for round in 0..plan.agent_rounds {
            progress(format!(
                "agent: cold start with {services} services, round {}/{}",
                round + 1,
                plan.agent_rounds
            ));
            let measured = cold_start(services)?;
            totals.push(measured.total_ms);
            programming.push(measured.programming_ms);
            peaks.push(measured.peak_rss_kib as f64 / 1024.0);
            writes.extend(measured.map_writes_ms);
            maps = measured.maps;
        }
        cold.push(ColdStartRow {
            services,
            endpoints: ENDPOINTS,
            total_ms: Summary::of(&totals).expect("rounds"),
            programming_ms: Summary::of(&programming).expect("rounds"),
            map_writes_ms: Summary::of(&writes),
            peak_rss_mib: Summary::of(&peaks).expect("rounds"),
        });
    }
    progress(format!(
        "agent: {} EndpointSlice changes with {} services",
        plan.changes, plan.change_services
    ));
    let change = changes(plan.change_services, plan.changes, progress)?;
    Ok(AgentResults { cold, change, maps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_are_read_as_time_of_day() {
        let line = "2026-11-25T15:20:01.250000Z  INFO lb_agent::agent: programmed 3 services";
        assert_eq!(
            log_time_of_day(line),
            Some(15.0 * 3600.0 + 20.0 * 60.0 + 1.25)
        );
        assert_eq!(log_time_of_day("no timestamp here"), None);
    }

    #[test]
    fn log_fields_are_read_by_name() {
        let line = "... programmed 2 services frontends=2 programmed_in_ms=0.494635 writes=26";
        assert_eq!(log_field(line, "programmed_in_ms"), Some(0.494635));
        assert_eq!(log_field(line, "writes"), Some(26.0));
        assert_eq!(log_field(line, "absent"), None);
    }

    #[test]
    fn intervals_cross_midnight() {
        assert!((seconds_after(86_399.5, 0.5) - 1.0).abs() < 1e-9);
        assert!((seconds_after(10.0, 12.5) - 2.5).abs() < 1e-9);
    }
}

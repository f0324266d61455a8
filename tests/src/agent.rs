//! The agent under test: `lb-agent run` inside a node's network namespace,
//! and waits on what it programmed, read back from its pinned maps.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::net::SocketAddrV4;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType};
use lb_agent::inspect::{FlowEntry, ServiceEntry, SnatEntry, SourceRangeEntry};

use crate::dirs::PinDir;
use crate::error::{Result, TestbedError};
use crate::manifests::Protocol;
use crate::netns::NetNs;
use crate::topology::Node;
use crate::wait::{self, DEFAULT_TIMEOUT, Probe};

/// Environment variable naming the agent binary (`cargo xtask test` sets it).
pub const AGENT_BIN_ENV: &str = "LB_AGENT_BIN";
/// How long the agent may take to load and pin its maps.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent may take to detach and exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent binary: `$LB_AGENT_BIN`, else `<workspace>/target/debug/lb-agent`.
pub fn agent_binary() -> Result<PathBuf> {
    let path = match std::env::var_os(AGENT_BIN_ENV) {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb-agent"),
    };
    if path.is_file() {
        Ok(path.canonicalize().unwrap_or(path))
    } else {
        Err(TestbedError::AgentBinaryMissing { path })
    }
}

/// A running `lb-agent run`. On drop it gets SIGTERM, then SIGKILL if it
/// has not exited within [`STOP_TIMEOUT`]; then whatever it left in its pin
/// directory is removed. If the test is failing (panicking), the agent's
/// log is printed first.
#[derive(Debug)]
pub struct Agent {
    child: Mutex<Option<Child>>,
    log_path: PathBuf,
    // Dropped after `Drop::drop` has stopped the process.
    pin_dir: PinDir,
}

/// The command line of one `lb-agent run` beyond its pin directory: the
/// source of Services, the interfaces, the node name and any other flag.
#[derive(Clone, Debug, Default)]
pub struct AgentConfig {
    source_args: Vec<OsString>,
    node_name: Option<String>,
    attach: Vec<String>,
    external: Vec<String>,
    extra_args: Vec<OsString>,
}

/// The modes of `lb-agent run --xdp-forward`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpForward {
    /// By the drivers of the external interfaces (`tc` for a veth).
    Auto,
    /// XDP_TX where the route leads back out of the arrival interface.
    Tx,
    /// Every forwarded packet through `lb_tc_ext`.
    Tc,
}

impl XdpForward {
    pub const fn name(self) -> &'static str {
        match self {
            XdpForward::Auto => "auto",
            XdpForward::Tx => "tx",
            XdpForward::Tc => "tc",
        }
    }
}

impl AgentConfig {
    /// Reads Services and EndpointSlices from the directory `manifests`.
    pub fn manifests(manifests: &Path) -> Self {
        Self::source(&[OsStr::new("--manifests"), manifests.as_os_str()])
    }

    /// `source_args` (say `--kubeconfig K`) in place of `--manifests DIR`.
    pub fn source(source_args: &[&OsStr]) -> Self {
        Self {
            source_args: source_args.iter().map(|arg| arg.to_os_string()).collect(),
            ..Self::default()
        }
    }

    /// `--node-name NAME`.
    pub fn node_name(mut self, name: &str) -> Self {
        self.node_name = Some(name.to_owned());
        self
    }

    /// `--attach IFACE` for each of `ifaces` (pod-facing interfaces).
    pub fn attach(mut self, ifaces: &[&str]) -> Self {
        self.attach
            .extend(ifaces.iter().map(|iface| (*iface).to_owned()));
        self
    }

    /// `--external IFACE` (the node's interface on the network).
    pub fn external(mut self, iface: &str) -> Self {
        self.external.push(iface.to_owned());
        self
    }

    /// `--xdp-forward MODE`: how the XDP program forwards.
    pub fn xdp_forward(self, mode: XdpForward) -> Self {
        self.arg("--xdp-forward").arg(mode.name())
    }

    /// Any other argument of `lb-agent run`, in order.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.extra_args.push(arg.as_ref().to_os_string());
        self
    }

    /// The arguments after `run`, pin directory excluded.
    fn args(&self) -> Vec<OsString> {
        let mut args = self.source_args.clone();
        if let Some(name) = &self.node_name {
            args.push("--node-name".into());
            args.push(name.into());
        }
        for iface in &self.attach {
            args.push("--attach".into());
            args.push(iface.into());
        }
        for iface in &self.external {
            args.push("--external".into());
            args.push(iface.into());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

impl Agent {
    /// Starts `lb-agent run --manifests <manifests> --attach <iface>...
    /// --pin-dir <pin_dir>` in `node`'s network namespace (and the test's
    /// mount namespace, so it sees bpffs) and waits until its maps are
    /// pinned and its program is attached to every interface of `attach`.
    /// Its stdout and stderr go to a log file.
    pub fn start(node: &Node, manifests: &Path, attach: &[&str], pin_dir: PinDir) -> Result<Self> {
        Self::start_config(
            node,
            &AgentConfig::manifests(manifests).attach(attach),
            pin_dir,
        )
    }

    /// As [`Agent::start`], with `source_args` (say `--kubeconfig K
    /// --node-name N`) in place of `--manifests DIR`.
    pub fn start_with(
        node: &Node,
        source_args: &[&OsStr],
        attach: &[&str],
        pin_dir: PinDir,
    ) -> Result<Self> {
        Self::start_config(
            node,
            &AgentConfig::source(source_args).attach(attach),
            pin_dir,
        )
    }

    /// Starts `lb-agent run <config> --pin-dir <pin_dir>` in `node`'s
    /// network namespace and waits until its maps are pinned, `lb_tc_pod`
    /// is at tcx ingress of every `--attach` interface, and `lb_xdp_ext`
    /// (in any XDP mode) and `lb_tc_ext` are on every `--external` one.
    pub fn start_config(node: &Node, config: &AgentConfig, pin_dir: PinDir) -> Result<Self> {
        let binary = agent_binary()?;
        let pin_name = pin_dir
            .path()
            .file_name()
            .expect("a pin directory has a name")
            .to_string_lossy()
            .into_owned();
        let log_path = std::env::temp_dir().join(format!("{pin_name}.agent.log"));
        let log = File::create(&log_path)
            .map_err(|source| TestbedError::path("create", &log_path, source))?;
        let log_for_stderr = log
            .try_clone()
            .map_err(|source| TestbedError::path("duplicate", &log_path, source))?;

        let mut command = node.ns().command(&binary)?;
        // If the test process dies without unwinding (SIGKILL, a harness
        // timeout), the kernel sends the agent SIGTERM, so it still detaches
        // and unpins. The signal follows the spawning *thread*: an Agent
        // must not outlive the thread that started it.
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of ours.
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
            .args(config.args())
            .arg("--pin-dir")
            .arg(pin_dir.path());
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        // The log is a file, read by people in test output: no colour codes.
        command.env("NO_COLOR", "1");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_for_stderr));
        let child = command
            .spawn()
            .map_err(|source| TestbedError::CommandSpawn {
                command: format!("{} run (in {})", binary.display(), node.ns().name()),
                source,
            })?;

        let agent = Self {
            child: Mutex::new(Some(child)),
            log_path,
            pin_dir,
        };
        // The agent pins its maps one by one after loading, attaches, and
        // may program the maps before it attaches: ready means every map
        // pinned and the programs on every interface, as the kernel reports.
        let ready = wait::poll(START_TIMEOUT, "lb-agent to pin its maps and attach", || {
            if let Err(error) = agent.ensure_running() {
                return Probe::Failed(error);
            }
            match agent.attached_and_pinned(node, config) {
                Ok(()) => Probe::Ready(()),
                Err(state) => Probe::Pending(state),
            }
        });
        match ready {
            Ok(()) => Ok(agent),
            // Carries the log already.
            Err(error @ TestbedError::AgentExited { .. }) => Err(error),
            // The guard is dropped on return, before a caller's `expect`
            // panics, so the log goes into the error.
            Err(error) => Err(TestbedError::AgentNotReady {
                source: Box::new(error),
                log: agent.log(),
            }),
        }
    }

    /// Every map pinned and readable, `lb_tc_pod` at tcx ingress of every
    /// `--attach` interface, `lb_xdp_ext` and `lb_tc_ext` on every
    /// `--external` one, as the kernel reports it.
    fn attached_and_pinned(&self, node: &Node, config: &AgentConfig) -> Result<(), String> {
        let missing: Vec<&str> = lb_common::names::ALL_MAPS
            .into_iter()
            .filter(|map| !self.pin_dir.path().join(map).exists())
            .collect();
        if !missing.is_empty() {
            return Err(format!("not pinned yet: {}", missing.join(", ")));
        }
        self.services()?;
        for iface in &config.attach {
            let programs = tcx_ingress_programs(node.ns(), iface)?;
            if !programs
                .iter()
                .any(|name| name == lb_common::names::PROG_TC_POD)
            {
                return Err(format!("tcx ingress of {iface}: {programs:?}"));
            }
        }
        for iface in &config.external {
            let programs = tcx_ingress_programs(node.ns(), iface)?;
            if !programs
                .iter()
                .any(|name| name == lb_common::names::PROG_TC_EXTERNAL)
            {
                return Err(format!("tcx ingress of {iface}: {programs:?}"));
            }
            match xdp_program(node.ns(), iface)? {
                Some(xdp) if xdp.program == lb_common::names::PROG_XDP_EXTERNAL => {}
                other => return Err(format!("XDP on {iface}: {other:?}")),
            }
        }
        Ok(())
    }

    pub fn pin_dir(&self) -> &Path {
        self.pin_dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.lock_child().as_ref().map(Child::id)
    }

    /// Everything the agent wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|error| {
            format!("(could not read {}: {error})", self.log_path.display())
        })
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Fails with the agent's log if it has exited.
    pub fn ensure_running(&self) -> Result<()> {
        let mut child = self.lock_child();
        let Some(process) = child.as_mut() else {
            return Err(TestbedError::io(
                "lb-agent was stopped",
                std::io::Error::from(std::io::ErrorKind::NotConnected),
            ));
        };
        match process.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(TestbedError::AgentExited {
                status,
                log: self.log(),
            }),
            Err(source) => Err(TestbedError::io("wait for lb-agent", source)),
        }
    }

    /// The frontends the agent programmed, read from its pinned maps.
    pub fn services(&self) -> Result<Vec<ServiceEntry>, String> {
        lb_agent::inspect::services(self.pin_dir.path())
            .map_err(|error| format!("inspect services: {error}"))
    }

    /// The flows the datapath tracks.
    pub fn conntrack(&self) -> Result<Vec<FlowEntry>, String> {
        lb_agent::inspect::conntrack(self.pin_dir.path())
            .map_err(|error| format!("inspect conntrack: {error}"))
    }

    /// The frontend `frontend`/`proto`, if programmed.
    pub fn service(
        &self,
        frontend: SocketAddrV4,
        proto: Protocol,
    ) -> Result<Option<ServiceEntry>, String> {
        Ok(self
            .services()?
            .into_iter()
            .find(|entry| entry.frontend == frontend && entry.proto == proto.as_lower()))
    }

    /// Datapath counters (name, value summed over CPUs).
    pub fn counters(&self) -> Result<Vec<(String, u64)>, String> {
        lb_agent::inspect::counters(self.pin_dir.path())
            .map_err(|error| format!("inspect counters: {error}"))
    }

    /// The source-translated flows' `LB_SNAT` entries.
    pub fn snat(&self) -> Result<Vec<SnatEntry>, String> {
        lb_agent::inspect::snat(self.pin_dir.path())
            .map_err(|error| format!("inspect snat: {error}"))
    }

    /// The `loadBalancerSourceRanges` in `LB_SRC_RANGES`.
    pub fn source_ranges(&self) -> Result<Vec<SourceRangeEntry>, String> {
        lb_agent::inspect::source_ranges(self.pin_dir.path())
            .map_err(|error| format!("inspect source ranges: {error}"))
    }

    /// One datapath counter (`Counter::name`), summed over CPUs.
    pub fn counter(&self, name: &str) -> Result<u64, String> {
        self.counters()?
            .into_iter()
            .find(|(counter, _)| counter == name)
            .map(|(_, value)| value)
            .ok_or_else(|| format!("no counter {name}"))
    }

    /// What the maps hold right now, for a failing test's output: non-zero
    /// counters, frontends and tracked flows.
    pub fn diagnostics(&self) -> String {
        let mut report = String::new();
        match self.counters() {
            Ok(counters) => {
                let shown: Vec<String> = counters
                    .iter()
                    .filter(|(_, value)| *value != 0)
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                report.push_str(&format!("counters: {}\n", shown.join(" ")));
            }
            Err(error) => report.push_str(&format!("{error}\n")),
        }
        match self.services() {
            Ok(services) => {
                for service in services {
                    report.push_str(&format!("service {service:?}\n"));
                }
            }
            Err(error) => report.push_str(&format!("{error}\n")),
        }
        match self.conntrack() {
            Ok(flows) => {
                report.push_str(&format!("{} flows\n", flows.len()));
                for flow in flows.iter().take(20) {
                    report.push_str(&format!("flow {flow:?}\n"));
                }
            }
            Err(error) => report.push_str(&format!("{error}\n")),
        }
        match self.snat() {
            Ok(entries) => {
                for entry in entries.iter().take(20) {
                    report.push_str(&format!("snat {entry:?}\n"));
                }
            }
            Err(error) => report.push_str(&format!("{error}\n")),
        }
        match self.source_ranges() {
            Ok(entries) => {
                for entry in entries.iter().take(20) {
                    report.push_str(&format!("source range {entry:?}\n"));
                }
            }
            Err(error) => report.push_str(&format!("{error}\n")),
        }
        report
    }

    /// Waits until the frontend is programmed and `accept` holds for it.
    pub fn wait_for_service(
        &self,
        frontend: SocketAddrV4,
        proto: Protocol,
        what: &str,
        accept: impl Fn(&ServiceEntry) -> bool,
    ) -> Result<ServiceEntry> {
        let description = format!("{}/{frontend}: {what}", proto.as_lower());
        self.wait_for_frontend(&description, frontend, proto, |entry| match entry {
            Some(entry) if accept(&entry) => Ok(entry),
            Some(entry) => Err(format!("{entry:?}")),
            None => Err("not programmed".to_owned()),
        })
    }

    /// Polls the frontend until `check` accepts what the maps say about it
    /// (`None`: not programmed); fails at once if the agent exits.
    fn wait_for_frontend<T>(
        &self,
        description: &str,
        frontend: SocketAddrV4,
        proto: Protocol,
        check: impl Fn(Option<ServiceEntry>) -> Result<T, String>,
    ) -> Result<T> {
        wait::poll(DEFAULT_TIMEOUT, description, || {
            if let Err(error) = self.ensure_running() {
                return Probe::Failed(error);
            }
            match self.service(frontend, proto).and_then(&check) {
                Ok(value) => Probe::Ready(value),
                Err(state) => Probe::Pending(state),
            }
        })
    }

    /// Waits until the frontend's backends are exactly `expected` (address,
    /// ready), in any order.
    pub fn wait_for_backends(
        &self,
        frontend: SocketAddrV4,
        proto: Protocol,
        expected: &[(SocketAddrV4, bool)],
    ) -> Result<ServiceEntry> {
        let mut expected: Vec<(SocketAddrV4, bool)> = expected.to_vec();
        expected.sort();
        let what = format!("backends {expected:?}");
        self.wait_for_service(frontend, proto, &what, |entry| {
            let mut actual: Vec<(SocketAddrV4, bool)> = entry
                .backends
                .iter()
                .map(|backend| (backend.addr, backend.ready))
                .collect();
            actual.sort();
            actual == expected
        })
    }

    /// Waits until the frontend is no longer programmed.
    pub fn wait_for_no_service(&self, frontend: SocketAddrV4, proto: Protocol) -> Result<()> {
        let description = format!("{}/{frontend} to be removed", proto.as_lower());
        self.wait_for_frontend(&description, frontend, proto, |entry| match entry {
            None => Ok(()),
            Some(entry) => Err(format!("{entry:?}")),
        })
    }

    /// What is left in the pin directory (nothing once the agent has
    /// cleaned up after itself; the guard removes leftovers on drop).
    pub fn pins_left(&self) -> Vec<String> {
        self.pin_dir.pins()
    }

    /// Whether the pin directory itself still exists.
    pub fn pin_dir_exists(&self) -> bool {
        self.pin_dir.path().exists()
    }

    /// Stops the agent with SIGTERM (SIGKILL after [`STOP_TIMEOUT`]) and
    /// returns how it exited; an error if it was stopped already. The pin
    /// directory stays as the agent left it until this guard is dropped.
    pub fn stop(&self) -> Result<ExitStatus> {
        let Some(mut child) = self.lock_child().take() else {
            return Err(TestbedError::io(
                "stop lb-agent",
                std::io::Error::from(std::io::ErrorKind::NotConnected),
            ));
        };
        let pid = libc::pid_t::try_from(child.id()).expect("pids fit in pid_t");
        // SAFETY: signalling our own child, which has not been reaped yet
        // (we hold its `Child`), so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(wait::POLL_INTERVAL),
                Ok(None) => {
                    eprintln!(
                        "testbed: lb-agent did not exit {STOP_TIMEOUT:?} after SIGTERM; killing it"
                    );
                    child
                        .kill()
                        .map_err(|source| TestbedError::io("kill lb-agent", source))?;
                    return child
                        .wait()
                        .map_err(|source| TestbedError::io("wait for lb-agent", source));
                }
                Err(source) => return Err(TestbedError::io("wait for lb-agent", source)),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let already_stopped = self.lock_child().is_none();
        // Read the maps while they are still pinned: the agent unpins them
        // when it stops.
        let diagnostics = (thread::panicking() && !already_stopped).then(|| self.diagnostics());
        if !already_stopped && let Err(error) = self.stop() {
            eprintln!("testbed: {error}");
        }
        if thread::panicking() {
            if let Some(diagnostics) = diagnostics {
                eprintln!(
                    "----- lb-agent maps ({}) -----\n{diagnostics}----- end of lb-agent maps -----",
                    self.pin_dir.path().display()
                );
            }
            eprintln!(
                "----- lb-agent log ({}) -----\n{}\n----- end of lb-agent log -----",
                self.pin_dir.path().display(),
                self.log()
            );
        }
        if let Err(error) = fs::remove_file(&self.log_path) {
            eprintln!(
                "testbed: could not remove {}: {error}",
                self.log_path.display()
            );
        }
    }
}

/// How an XDP program is attached (`IFLA_XDP_ATTACHED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native: the driver runs it (`xdpdrv`; on a veth, in its NAPI poll).
    Driver,
    /// Generic: the stack runs it on the skb (`xdpgeneric`).
    Generic,
    /// Offloaded to the NIC (`xdpoffload`).
    Offload,
}

/// The XDP program on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpProgram {
    pub mode: XdpMode,
    /// The program's name as the kernel reports it.
    pub program: String,
    pub id: u64,
}

/// The XDP program attached to `iface` in `ns`, as `ip -details -json link
/// show` reports it (`None`: none).
pub fn xdp_program(ns: &NetNs, iface: &str) -> Result<Option<XdpProgram>, String> {
    let output = ns
        .ip(&["-details", "-json", "link", "show", "dev", iface])
        .map_err(|error| error.to_string())?;
    parse_xdp_program(&output)
        .map_err(|error| format!("XDP state of {iface} in {}: {error}", ns.name()))
}

fn parse_xdp_program(json: &str) -> Result<Option<XdpProgram>, String> {
    let links: serde_json::Value =
        serde_json::from_str(json).map_err(|error| format!("ip -json output: {error}"))?;
    let Some(xdp) = links.get(0).and_then(|link| link.get("xdp")) else {
        return Ok(None);
    };
    // With one program: {"mode": M, "prog": {...}}; several modes at once
    // (rare): {"mode": 4 (multi), "attached": [{"mode": M, "prog": {...}}]}.
    let attachment = match xdp.get("attached").and_then(|all| all.get(0)) {
        Some(first) => first,
        None => xdp,
    };
    let mode = match attachment.get("mode").and_then(serde_json::Value::as_u64) {
        Some(1) => XdpMode::Driver,
        Some(2) => XdpMode::Generic,
        Some(3) => XdpMode::Offload,
        other => return Err(format!("unknown XDP mode {other:?} in {xdp}")),
    };
    let program = attachment
        .get("prog")
        .ok_or_else(|| format!("no prog in {xdp}"))?;
    Ok(Some(XdpProgram {
        mode,
        program: program
            .get("name")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?")
            .to_owned(),
        id: program
            .get("id")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
    }))
}

/// Names of the programs attached at tcx ingress of `iface` in namespace
/// `ns`, in order, as the kernel reports them (`BPF_PROG_QUERY`).
pub fn tcx_ingress_programs(ns: &NetNs, iface: &str) -> Result<Vec<String>, String> {
    let name = CString::new(iface).map_err(|_| format!("interface name {iface:?} contains NUL"))?;
    // The interface name resolves in the calling thread's namespace.
    let (_revision, programs) = ns
        .run(|| SchedClassifier::query_tcx(name.as_c_str(), TcAttachType::Ingress))
        .map_err(|error| error.to_string())?
        .map_err(|error| format!("query tcx ingress of {iface} in {}: {error}", ns.name()))?;
    Ok(programs
        .iter()
        .map(|program| program.name_as_str().unwrap_or("?").to_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_attachments_parse() {
        assert_eq!(
            parse_xdp_program(r#"[{"ifname":"eth0","mtu":1500}]"#),
            Ok(None)
        );
        assert_eq!(
            parse_xdp_program(
                r#"[{"ifname":"eth0","xdp":{"mode":1,"prog":{"id":42,"name":"lb_xdp_ext","tag":"ab","jited":1}}}]"#
            ),
            Ok(Some(XdpProgram {
                mode: XdpMode::Driver,
                program: "lb_xdp_ext".into(),
                id: 42
            }))
        );
        assert_eq!(
            parse_xdp_program(
                r#"[{"xdp":{"mode":4,"attached":[{"mode":2,"prog":{"id":7,"name":"p"}}]}}]"#
            ),
            Ok(Some(XdpProgram {
                mode: XdpMode::Generic,
                program: "p".into(),
                id: 7
            }))
        );
        assert!(parse_xdp_program("not json").is_err());
    }
}

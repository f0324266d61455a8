//! Guards for the privileged tests: every one removes what it made on drop,
//! also when the test fails. Names are unique per process and per guard,
//! so tests run in parallel (and alongside other test binaries).

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lb_agent::datapath::loader::{Capacities, LoadOptions};
use lb_common::config::DatapathConfig;

/// The agent binary Cargo built for these tests.
pub const AGENT_BINARY: &str = env!("CARGO_BIN_EXE_lb-agent");

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix>-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fails the test early, and clearly, when it cannot run here.
pub fn require_privileges() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test loads BPF programs: run it as root"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
    assert!(
        mounts
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && line.split_whitespace().nth(2) == Some("bpf")),
        "bpffs is not mounted on /sys/fs/bpf (`mount -t bpf bpf /sys/fs/bpf`)"
    );
}

/// A pin directory under /sys/fs/bpf, removed (with its pins) on drop.
pub struct PinDirGuard {
    path: PathBuf,
}

impl PinDirGuard {
    pub fn new() -> Self {
        Self {
            path: Path::new("/sys/fs/bpf").join(unique("lbtest")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        if self.path.exists() {
            let _ = lb_agent::datapath::loader::unpin(&self.path);
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Small maps, so tests load fast and leave little kernel memory in use.
pub fn load_options(pin_dir: &Path) -> LoadOptions {
    LoadOptions {
        pin_dir: pin_dir.to_owned(),
        capacities: Capacities {
            services: 64,
            backends: 64,
            slots: 256,
            flows: 1024,
            affinities: 1024,
            maglev_tables: 2,
            snat_flows: 256,
            source_ranges: 64,
        },
        config: DatapathConfig::DEFAULT,
    }
}

/// Runs `ip ARGS`, failing the test if it fails.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip(8)");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace holding one veth pair, both ends inside it (nothing
/// touches the root namespace). Deleted, with its interfaces, on drop.
pub struct NetnsGuard {
    pub name: String,
    /// The interface the tests attach to.
    pub host_end: String,
    pub peer_end: String,
}

impl NetnsGuard {
    pub fn with_veth() -> Self {
        let name = unique("lbt");
        ip(&["netns", "add", &name]);
        // The guard exists from here on, so a failure below still cleans up.
        let guard = Self {
            host_end: "lbt-host".into(),
            peer_end: "lbt-pod".into(),
            name,
        };
        ip(&[
            "link",
            "add",
            &guard.host_end,
            "netns",
            &guard.name,
            "type",
            "veth",
            "peer",
            "name",
            &guard.peer_end,
            "netns",
            &guard.name,
        ]);
        ip(&["-n", &guard.name, "link", "set", &guard.host_end, "up"]);
        ip(&["-n", &guard.name, "link", "set", &guard.peer_end, "up"]);
        guard
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Opens the namespace, for setns().
    pub fn open(&self) -> File {
        File::open(self.path()).expect("opening the test netns")
    }

    /// Runs `f` on a thread that joined this namespace (network only: the
    /// mount namespace, and so bpffs, stays the test's).
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let netns = self.open();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns on a valid namespace fd affects only this thread.
                    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("thread inside the netns panicked")
        })
    }

    /// Names of the programs attached at tcx ingress of `iface` (bpftool
    /// before 7.3 does not list tcx, so ask the kernel directly).
    pub fn tcx_ingress_programs(&self, iface: &str) -> Vec<String> {
        let name = std::ffi::CString::new(iface).unwrap();
        let (_, programs) = self
            .run_inside(|| {
                aya::programs::SchedClassifier::query_tcx(
                    name.as_c_str(),
                    aya::programs::TcAttachType::Ingress,
                )
            })
            .expect("querying tcx ingress");
        programs
            .iter()
            .map(|program| program.name_as_str().unwrap_or("?").to_owned())
            .collect()
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The agent process; killed on drop if the test did not stop it.
pub struct AgentGuard {
    child: Child,
    log: PathBuf,
}

impl AgentGuard {
    /// Starts the agent in `netns` (network namespace only: it keeps the
    /// test's mount namespace, and so sees bpffs).
    pub fn start(netns: &NetnsGuard, args: &[&str], log: PathBuf) -> Self {
        let netns_file = netns.open();
        let netns_fd = netns_file.as_raw_fd();
        let mut command = Command::new(AGENT_BINARY);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::options().append(true).open(&log).unwrap());
        // SAFETY: only async-signal-safe setns between fork and exec; the
        // namespace fd stays open (netns_file lives past spawn).
        unsafe {
            command.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("starting lb-agent");
        drop(netns_file);
        Self { child, log }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_lines(&self) -> Vec<String> {
        let Ok(file) = File::open(&self.log) else {
            return Vec::new();
        };
        BufReader::new(file).lines().map_while(Result::ok).collect()
    }

    /// Waits until a log line satisfies `predicate`, failing if the agent
    /// exits first or `timeout` passes.
    pub fn wait_for_log(&mut self, timeout: Duration, predicate: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log_lines().into_iter().find(|line| predicate(line)) {
                return line;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("agent exited ({status}):\n{}", self.log_lines().join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "timed out; agent log:\n{}",
                self.log_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, once the agent exits by itself (within `timeout`).
    pub fn wait_for_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "agent kept running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status (within 10 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "agent ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.log_lines().join("\n"));
        }
    }
}

//! A named network namespace (`ip netns`) that is deleted on drop, and ways
//! to run code and processes inside it without leaving the test's mount
//! namespace.
//!
//! Sockets belong to the network namespace of the thread that creates them,
//! so code that must create sockets "in a pod" runs on a fresh thread that
//! first joins the namespace with `setns(CLONE_NEWNET)`; the sockets it
//! returns keep working from any thread (servers create their sockets this
//! way and serve them from ordinary threads). Processes are spawned with a
//! `pre_exec` hook doing the same `setns`, never with `ip netns exec`, which
//! also remounts `/sys` and would hide `/sys/fs/bpf` from the process.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::thread;

use crate::command;
use crate::error::{Result, TestbedError};

/// Where iproute2 bind-mounts named network namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// A network namespace created with `ip netns add`, deleted with
/// `ip netns del` on drop (also while unwinding from a failed test).
///
/// Deleting the name does not destroy the namespace while threads,
/// processes or sockets still hold it; the kernel does that (and removes
/// its interfaces, veth peers included) when the last one goes. Guards that
/// own those (servers, the agent) are therefore dropped before this one.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace `name` and brings its loopback up.
    pub fn create(name: impl Into<String>) -> Result<Self> {
        // iproute2 sets up the shared bind mount of /var/run/netns on first
        // use; two first uses at once can race, so this process creates its
        // namespaces one at a time.
        static CREATE: Mutex<()> = Mutex::new(());
        let name = name.into();
        {
            let _serialised = CREATE
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            command::run("ip", &["netns", "add", name.as_str()])?;
        }
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that names the namespace: what `setns` opens.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path)
            .map_err(|source| TestbedError::path("open network namespace", path, source))
    }

    /// Runs `ip -n <ns> args...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        command::run("ip", &full)
    }

    /// Sets a sysctl of this namespace (`net.*` keys are per namespace).
    /// Goes through `ip netns exec`, which is fine here: `sysctl` needs
    /// `/proc/sys`, not `/sys/fs/bpf`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let assignment = format!("{key}={value}");
        command::run(
            "ip",
            &[
                "netns",
                "exec",
                self.name.as_str(),
                "sysctl",
                "-q",
                "-w",
                assignment.as_str(),
            ],
        )?;
        Ok(())
    }

    /// A command that runs in this network namespace and in the caller's
    /// mount namespace (so it sees `/sys/fs/bpf`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let namespace = self.open()?;
        let mut command = Command::new(program);
        // SAFETY: the hook runs in the forked child before exec and only
        // calls setns(2), which is async-signal-safe; `namespace` was opened
        // in the parent, so the child allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Moves the calling thread into this namespace. Only for threads made
    /// for the purpose (see [`NetNs::run`]): a thread
    /// cannot go back, and a test's own thread must stay where it is.
    fn enter_current_thread(&self) -> Result<()> {
        let namespace = self.open()?;
        // SAFETY: plain syscall on a valid, open descriptor.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(TestbedError::Setns {
                namespace: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Runs `task` to completion on a new thread inside this namespace and
    /// returns its result. Sockets it creates belong to the namespace and
    /// can be returned to, and used from, the caller.
    pub fn run<T, F>(&self, task: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        thread::scope(|scope| {
            let worker = thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(scope, || -> Result<T> {
                    self.enter_current_thread()?;
                    Ok(task())
                })
                .map_err(|source| TestbedError::io("spawn thread", source))?;
            worker.join().map_err(|_| TestbedError::ThreadPanicked {
                namespace: self.name.clone(),
            })?
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(error) = command::run("ip", &["netns", "del", self.name.as_str()]) {
            eprintln!(
                "testbed: could not delete network namespace {}: {error}",
                self.name
            );
        }
    }
}

//! Directories a testbed owns: a scratch directory for manifests and logs,
//! and a pin directory on bpffs for one agent instance. Both are removed on
//! drop.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::command;
use crate::error::{Result, TestbedError};

/// A fresh directory under the system temp directory, removed with its
/// contents on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<tmp>/<name>`; fails if it exists (names are unique, so an
    /// existing one is another testbed's).
    pub fn create(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path)
            .map_err(|source| TestbedError::path("create directory", &path, source))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.path) {
            eprintln!("testbed: could not remove {}: {error}", self.path.display());
        }
    }
}

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A pin directory `/sys/fs/bpf/<name>` for one agent. The agent creates and
/// fills it and removes it when it stops; this guard removes whatever is
/// left (an agent that was killed, or one that crashed).
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Reserves `/sys/fs/bpf/<name>` (which must not exist yet), mounting
    /// bpffs first if the machine has not.
    pub fn new(name: &str) -> Result<Self> {
        ensure_bpffs()?;
        let path = Path::new(BPFFS).join(name);
        if path.exists() {
            return Err(TestbedError::path(
                "reserve pin directory",
                path,
                io::Error::from(io::ErrorKind::AlreadyExists),
            ));
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the pins currently in the directory (empty if it is gone).
    pub fn pins(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.path) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Unlinking a pin drops the reference it holds; bpffs allows
        // removing pins and directories like ordinary files.
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => eprintln!(
                "testbed: could not remove pin directory {}: {error}",
                self.path.display()
            ),
        }
    }
}

/// Mounts bpffs at [`BPFFS`] unless something is mounted there already.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(|source| TestbedError::path("read", "/proc/self/mounts", source))?;
    let mounted = mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(BPFFS));
    if !mounted {
        command::run("mount", &["-t", "bpf", "bpf", BPFFS])?;
    }
    Ok(())
}

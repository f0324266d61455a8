//! The one error type of the testbed library.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while building, driving or tearing down a
/// testbed. Each variant names the failing operation; the cause is kept.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("`{command}` exited with {status}: {stderr}")]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("could not run `{command}`")]
    CommandSpawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("setns into network namespace {namespace}")]
    Setns {
        namespace: String,
        #[source]
        source: io::Error,
    },
    #[error("{operation} {path}")]
    Path {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{operation}")]
    Io {
        operation: String,
        #[source]
        source: io::Error,
    },
    #[error("thread running in network namespace {namespace} panicked")]
    ThreadPanicked { namespace: String },
    #[error("serialize manifest {file}")]
    Manifest {
        file: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("timed out after {waited:?} waiting for {what}{}", last.as_deref().map(|l| format!(" (last seen: {l})")).unwrap_or_default())]
    Timeout {
        what: String,
        waited: std::time::Duration,
        last: Option<String>,
    },
    #[error(
        "lb-agent binary not found at {path}: build it with `cargo +1.98.0 build -p lb-agent` or set LB_AGENT_BIN"
    )]
    AgentBinaryMissing { path: PathBuf },
    #[error("lb-agent exited early with {status}; its log:\n{log}")]
    AgentExited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("lb-agent did not become ready; its log:\n{log}")]
    AgentNotReady {
        #[source]
        source: Box<TestbedError>,
        log: String,
    },
    #[error("unexpected reply {reply:?}: {reason}")]
    BadReply { reply: String, reason: &'static str },
}

impl TestbedError {
    pub(crate) fn io(operation: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            operation: operation.into(),
            source,
        }
    }

    pub(crate) fn path(
        operation: &'static str,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> Self {
        Self::Path {
            operation,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

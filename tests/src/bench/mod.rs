//! `cargo xtask bench`: the datapath and the agent measured side by side
//! with what users would run instead (kube-proxy's iptables and nftables
//! rules), on the machine at hand.
//!
//! - [`prog`]: ns/packet of `lb_tc_pod` per hot path with
//!   `BPF_PROG_TEST_RUN`, through the replay wrapper of
//!   [`crate::packet::bench`], with maps filled from userspace up to
//!   100,000 services and a million flows; calibration rows.
//! - [`e2e`]: request/response latency, new connections per second and UDP
//!   request/response between network-namespace pods, four ways: straight
//!   to the pod, this datapath, [`kube_proxy`]'s iptables layout and its
//!   nftables layout; [`load`] is the load generator.
//! - [`agent`]: cold-start programming time, change-to-map latency, peak
//!   memory of the agent and kernel memory of its maps.
//! - [`report`]: the table, `benchmarks.md` and the SVG plots ([`svg`]).
//!
//! Nothing here asserts a speed: a figure is measured and reported, and a
//! goal is stated next to it. What is asserted is that every figure comes
//! from the path it claims (verdicts, counters and replies are checked).

pub mod agent;
pub mod e2e;
pub mod kube_proxy;
pub mod load;
pub mod prog;
pub mod report;
pub mod services;
pub mod stats;
pub mod svg;

use std::time::Duration;

use crate::error::TestbedError;
use crate::packet::PacketError;

/// Failures of a benchmark. Each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("packet harness")]
    Packet(#[from] PacketError),
    #[error("testbed")]
    Testbed(#[from] TestbedError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A measurement did not come from the path it claims: a wrong reply,
    /// verdict or map content. The figure is discarded, never reported.
    #[error("{what}: {detail}")]
    Check { what: String, detail: String },
}

impl BenchError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub fn check(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Check {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// How much to measure. [`Plan::full`] is what `docs/benchmarks.md` holds,
/// [`Plan::quick`] fits in two minutes, [`Plan::smoke`] only proves every
/// part still runs and checks what it measures.
#[derive(Clone, Debug)]
pub struct Plan {
    pub name: &'static str,
    /// Services in the maps for the program-cost grid.
    pub prog_services: Vec<u32>,
    /// Flows in the conntrack table for the program-cost grid.
    pub prog_flows: Vec<u32>,
    /// `BPF_PROG_TEST_RUN` repeat per round, and rounds per figure.
    pub prog_runs: u32,
    pub prog_rounds: u32,
    /// Services programmed for the end-to-end comparison.
    pub e2e_services: Vec<u32>,
    /// Rounds per end-to-end figure (each round measures every way once).
    pub e2e_rounds: usize,
    /// Request/response exchanges per latency round, TCP and UDP.
    pub e2e_requests: usize,
    /// Connections per connection-rate round, and the time bound of one.
    pub e2e_connections: usize,
    pub e2e_time_bound: Duration,
    /// Services (10 endpoints each) for the agent's cold start.
    pub agent_services: Vec<u32>,
    pub agent_rounds: usize,
    /// Services programmed while EndpointSlice changes are measured, and
    /// how many changes.
    pub change_services: u32,
    pub changes: usize,
}

impl Plan {
    pub fn full() -> Self {
        Self {
            name: "full",
            prog_services: vec![1, 1_000, 10_000, 100_000],
            prog_flows: vec![0, 100_000, 1_000_000],
            prog_runs: 2_000,
            prog_rounds: 15,
            e2e_services: vec![1, 1_000, 10_000],
            e2e_rounds: 7,
            e2e_requests: 2_000,
            e2e_connections: 2_000,
            e2e_time_bound: Duration::from_secs(5),
            agent_services: vec![1_000, 10_000, 30_000],
            agent_rounds: 3,
            change_services: 1_000,
            changes: 1_000,
        }
    }

    pub fn quick() -> Self {
        Self {
            name: "quick",
            prog_services: vec![1, 10_000, 100_000],
            prog_flows: vec![0, 100_000],
            prog_runs: 1_000,
            prog_rounds: 5,
            e2e_services: vec![1, 1_000],
            e2e_rounds: 3,
            e2e_requests: 500,
            e2e_connections: 300,
            e2e_time_bound: Duration::from_secs(2),
            agent_services: vec![1_000, 10_000],
            agent_rounds: 3,
            change_services: 1_000,
            changes: 60,
        }
    }

    pub fn smoke() -> Self {
        Self {
            name: "smoke",
            prog_services: vec![1, 100],
            prog_flows: vec![0, 1_000],
            prog_runs: 100,
            prog_rounds: 3,
            e2e_services: vec![1, 10],
            e2e_rounds: 1,
            e2e_requests: 20,
            e2e_connections: 20,
            e2e_time_bound: Duration::from_secs(2),
            agent_services: vec![50],
            agent_rounds: 1,
            change_services: 20,
            changes: 5,
        }
    }
}

//! The agent: sources (manifests, the Kubernetes API) produce one
//! desired-state model; one module writes it into the BPF maps as diffs.
//!
//! - [`source`] reads Services and EndpointSlices from where they live,
//!   and this node's addresses ([`source::node`]).
//! - [`translate`] turns them into a [`model::DesiredState`] with
//!   kube-proxy's semantics.
//! - [`datapath::loader`] loads, sizes, attaches and pins the datapath;
//!   [`datapath::writer`] is the only writer of its maps.
//! - [`inspect`] reads the pinned maps of a running agent.
//! - [`veths`] finds the pods' interfaces (`--attach-veths`).
//! - [`http`] serves `/healthz`, `/readyz` and [`metrics`];
//!   [`health_check`] the Services' health-check node ports.
//! - [`agent`] runs it all: initial load, watch, apply, shutdown.

pub mod agent;
pub mod datapath;
pub mod health_check;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod source;
pub mod translate;
pub mod veths;

/// The datapath object built from `lb-ebpf` by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The measurement harness built from `lb-ebpf`'s `lb-bench` target: not
/// part of the datapath, used only by the packet benchmarks.
pub static EBPF_BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));

//! The agent: sources (manifests, later the Kubernetes API) produce one
//! desired-state model; one module writes it into the BPF maps as diffs.

/// The datapath object built from `lb-ebpf` by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

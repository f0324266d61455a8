//! Packet-level testing of the datapath with `BPF_PROG_TEST_RUN`: no
//! namespaces, no interfaces, just the program, its maps and byte buffers.
//!
//! - [`checksum`]: the Internet checksum, computed from scratch here so the
//!   expectations never depend on the code under test.
//! - [`frame`]: Ethernet/IPv4/TCP/UDP/ICMP frames as plain data, serialized
//!   with every length and checksum computed from scratch; a decoder for
//!   readable failure messages.
//! - [`datapath`]: loads `lb_agent::EBPF_OBJECT` without pinning, fills its
//!   maps with `lb_common` types and runs frames through `lb_tc_pod`,
//!   `lb_xdp_ext` and `lb_tc_ext`.
//! - [`fib`]: a network namespace with fixed routes and neighbours, for
//!   the test runs whose programs forward by `bpf_fib_lookup`.
//! - [`bench`]: the ns/packet measurement with the `lb-bench` replay
//!   wrapper (`lb_agent::EBPF_BENCH_OBJECT`).

pub mod bench;
pub mod checksum;
pub mod datapath;
pub mod fib;
pub mod frame;

/// Failures of the packet harness. Each names the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("loading the BPF object failed")]
    LoadObject(#[source] aya::EbpfError),
    #[error("program {name} not found in the BPF object")]
    MissingProgram { name: &'static str },
    #[error("program {name} is not of the expected type")]
    ProgramType {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("loading program {name} into the kernel failed")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name} not found in the BPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {operation} failed")]
    Map {
        name: &'static str,
        operation: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("attaching {name} at tcx ingress of {iface} failed")]
    Attach {
        name: &'static str,
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("entering the network namespace to attach failed")]
    Namespace(#[source] crate::error::TestbedError),
    #[error("setting up, or running in, the test network namespace failed")]
    Network(#[source] crate::error::TestbedError),
    #[error("if_nametoindex({iface}) failed")]
    Interface {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("BPF_PROG_TEST_RUN of {name} failed")]
    TestRun {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("benchmark {case}: {detail}")]
    Bench { case: String, detail: String },
}

pub type Result<T, E = PacketError> = std::result::Result<T, E>;

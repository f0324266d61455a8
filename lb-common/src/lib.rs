//! Types shared by the kernel datapath (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! One module per concern, as in aya: every BPF map's key and value type lives
//! here, `#[repr(C)]` with explicit padding fields, and derives
//! [`bytemuck::Pod`], which refuses to compile a type with implicit padding.
//! With the `user` feature, each of them also implements `aya::Pod` so the
//! agent can read and write the maps.
//!
//! Byte order: every address and port field holds the value exactly as it is
//! on the wire (network byte order), so the datapath compares and copies
//! without swapping. Helpers named `*_host` convert for display.
#![no_std]

pub mod affinity;
pub mod backend;
pub mod config;
pub mod conntrack;
pub mod counters;
pub mod names;
pub mod nat;
pub mod ports;
pub mod service;
pub mod stats;

/// IANA protocol numbers the load balancer handles.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMP: u8 = 1;

    /// Lower-case name, as kube-proxy and `ss` print it.
    pub const fn name(proto: u8) -> &'static str {
        match proto {
            TCP => "tcp",
            UDP => "udp",
            ICMP => "icmp",
            _ => "other",
        }
    }
}

/// Implements `aya::Pod` for types that are already `bytemuck::Pod`, so the
/// padding check of bytemuck's derive is the one guarantee both sides rely on.
macro_rules! aya_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: `bytemuck::Pod` (derived, so checked at compile time)
            // guarantees the type is `Copy`, has no padding and is valid for
            // any bit pattern, which is what `aya::Pod` requires.
            unsafe impl aya::Pod for $t where $t: bytemuck::Pod {}
        )*
    };
}
pub(crate) use aya_pod;

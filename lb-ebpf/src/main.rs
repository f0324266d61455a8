//! The kernel datapath: service translation for traffic from pods.
//!
//! `lb_tc_pod` runs at tcx ingress on the host side of every pod's veth, so
//! it sees both directions of a flow: client -> frontend packets (from the
//! client pod) and backend -> client replies (from the backend pod). It
//! translates the first (DNAT to a backend, tracked in `LB_CONNTRACK`) and
//! reverses the translation of the second (source back to the frontend).
//! The logic lives in modules written against `context::PacketContext`, so
//! an XDP entry point can reuse it; this file only holds entry points.
//!
//! # Verdicts
//!
//! Each packet is counted once in `LB_COUNTERS` (a UDP flow whose backend
//! left is counted as `BackendGone` and then by how it is re-balanced).
//! A packet of a service is also counted per service and per backend
//! (`LB_SVC_STATS`, `LB_BE_STATS`: packets and bytes both ways, new flows;
//! per service also refusals and drops by reason, see `stats`).
//!
//! | Packet | Verdict | Counter |
//! |---|---|---|
//! | not IPv4 | `TC_ACT_OK` | `Pass` |
//! | IPv4 truncated or inconsistent (version, IHL < 5, total length, L4 header, TCP data offset) | `TC_ACT_OK`, untouched | `Malformed` |
//! | IPv4 fragment with offset != 0 (no L4 header: not translated, a known limitation; a first fragment is translated like any packet) | `TC_ACT_OK`, untouched | `Fragment` |
//! | not TCP/UDP | `TC_ACT_OK`, untouched | `Pass` |
//! | to a frontend, flow tracked, not expired, backend still listed (ready or not) | `TC_ACT_OK`, DNAT to the flow's backend | `Established` |
//! | to a frontend, flow tracked but its backend left every EndpointSlice, TCP | `TC_ACT_REDIRECT`: RST to the client (a RST is dropped, `TC_ACT_SHOT`); flow deleted | `BackendGone` |
//! | same, UDP | flow deleted, then handled as a new flow | `BackendGone` + the new flow's counter |
//! | to a frontend, no flow (or expired), service has no ready backend or `SERVICE_F_REJECT` | `TC_ACT_REDIRECT` back to the client: TCP RST (a RST is dropped, `TC_ACT_SHOT`), UDP ICMP port unreachable | `NoBackend` |
//! | to a frontend, no flow (or expired; TCP with or without SYN) | `TC_ACT_OK`, DNAT to the client's affinity backend if the service has ClientIP affinity and it is valid, else to a ready backend chosen by the service's Maglev table or at random; flow created | `NewFlow` |
//! | to a frontend, the chosen slot or its backend is missing (agent update race) | `TC_ACT_SHOT` | `SlotMiss` |
//! | to a frontend, the flow cannot be inserted | `TC_ACT_SHOT` | `ConntrackFull` |
//! | from a backend to the client of a tracked flow of one of its services | `TC_ACT_OK`, source rewritten to the frontend | `Reply` |
//! | anything else (no frontend, no tracked reply) | `TC_ACT_OK`, untouched | `Pass` |
//! | a rewrite helper failed | `TC_ACT_SHOT` | `RewriteFailed` |
//! | building the RST / ICMP answer failed | `TC_ACT_SHOT` | `RejectFailed` |
//!
//! Flow expiry: a flow idle for longer than its timeout (`LB_CONFIG`:
//! UDP, TCP, or TCP closing once FIN was seen both ways or RST either way)
//! is treated as absent by the forward path and replaced. A TCP flow is
//! deleted as soon as its connection ends: after translating a RST (either
//! way) or the last ACK following FINs both ways (`conntrack::closes`), so
//! connection churn does not fill the LRU table with closed flows.
//!
//! # Checksums
//!
//! Packets from a pod's socket reach the veth as CHECKSUM_PARTIAL (the L4
//! field holds only the pseudo-header sum). Address changes therefore go
//! through `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR`, the one code that
//! knows the skb's state; how it changed the field tells that state, so a
//! port change is folded in inline instead of by a second helper call
//! (`nat`, `csum::classify_after_addr_update`). The IPv4 header checksum is
//! always complete and is updated in software. Generated RST and ICMP
//! packets are checksummed from scratch; a RST built from a PARTIAL
//! segment carries the pseudo-header sum, as the stack would.
//!
//! # Limitations
//!
//! - Non-first IPv4 fragments are not translated (no L4 header, no
//!   reassembly state): a fragmented datagram to a frontend does not reach
//!   its backend whole.
//! - IPv4 only, untagged Ethernet. GSO packets above 64 KiB (BIG TCP, total
//!   length 0) count as malformed and pass untranslated.
//! - A RST or ICMP error built from a CHECKSUM_PARTIAL packet that carried
//!   IP options is only right if nothing finishes its checksum in software
//!   on the way back (the skb's checksum offset keeps pointing after the
//!   original, longer IP header). Pods practically never send IP options.
//! - Pod veths never deliver CHECKSUM_COMPLETE skbs; the in-place RST/ICMP
//!   rewrite does not maintain `skb->csum` for them.
#![no_std]
#![no_main]

mod affinity;
mod backend;
mod config;
mod conntrack;
mod context;
mod counters;
mod csum;
mod datapath;
mod error;
mod log;
mod maps;
mod nat;
mod parse;
mod reject;
mod service;
mod stats;

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::context::tc_verdict;

/// Service translation at tcx ingress of a pod's host-side veth.
#[classifier]
fn lb_tc_pod(ctx: TcContext) -> i32 {
    match datapath::process(&ctx) {
        Ok(action) => tc_verdict(&ctx, action),
        Err(error) => {
            counters::count(error.counter());
            tc_verdict(&ctx, error.action())
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

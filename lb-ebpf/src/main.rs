//! The kernel datapath: service translation for traffic from pods and
//! from outside the node.
//!
//! Three programs share one per-packet logic (`datapath::process`, written
//! against `context::PacketContext`), parameterised by a role
//! (`datapath::Role`):
//!
//! - `lb_tc_pod` (role Pod) runs at tcx ingress on the host side of every
//!   pod's veth, so it sees both directions of a flow: client -> frontend
//!   packets (from the client pod) and backend -> client replies (from the
//!   backend pod). It translates every frontend: ClusterIPs, and the
//!   NodePorts, load-balancer IPs and external IPs a pod may reach too.
//! - `lb_xdp_ext` (role External) runs at XDP of the node's external
//!   interfaces: NodePorts on the node's addresses, load-balancer ingress
//!   IPs and external IPs (`SERVICE_F_EXTERNAL` frontends only; ClusterIP
//!   traffic arriving from outside passes untouched), the replies to
//!   source-translated flows, and replies of flows whose backend is on
//!   another node (a pod's ClusterIP flow, an external flow).
//! - `lb_tc_ext` (role External) runs at tcx ingress of the same
//!   interfaces: what XDP handed on (see Forwarding), and everything when
//!   XDP is not attached.
//!
//! This file only holds the entry points.
//!
//! # Verdicts
//!
//! Each packet is counted once in `LB_COUNTERS` by each program it passes
//! through, with these exceptions: a UDP flow whose backend left is
//! counted as `BackendGone` and then by how it is re-balanced; a packet
//! forwarded by FIB lookup is counted by its translation and `Forwarded`;
//! a packet XDP hands to TC is counted `XdpToTc` by XDP (plus `NewFlow`
//! if XDP created its flow) and then by TC as what TC does with it. A
//! packet of a service is also counted per service and per backend
//! (`LB_SVC_STATS`, `LB_BE_STATS`: packets and bytes both ways, new flows;
//! per service also refusals and drops by reason, see `stats`); a packet
//! handed from XDP to TC only by TC, a flow XDP created before handing its
//! first packet on by XDP (`new_flows`).
//!
//! Verdicts in the table are TC's; XDP's are `XDP_PASS` for `TC_ACT_OK`,
//! `XDP_DROP` for `TC_ACT_SHOT`, `XDP_TX` for a bounced answer or a
//! forwarded packet.
//!
//! | Packet | Verdict | Counter |
//! |---|---|---|
//! | not IPv4 | `TC_ACT_OK` | `Pass` |
//! | IPv4 truncated or inconsistent (version, IHL < 5, total length, L4 header, TCP data offset) | `TC_ACT_OK`, untouched | `Malformed` |
//! | IPv4 fragment with offset != 0 (no L4 header: not translated, a known limitation; a first fragment is translated like any packet) | `TC_ACT_OK`, untouched | `Fragment` |
//! | not TCP/UDP | `TC_ACT_OK`, untouched | `Pass` |
//! | role External: to a frontend without `SERVICE_F_EXTERNAL` (a ClusterIP from outside) | as if to no frontend (the reply checks below) | |
//! | to a frontend, flow tracked, not expired, backend still listed (ready or not), not source-translated | `TC_ACT_OK`, DNAT to the flow's backend | `Established` |
//! | same, source-translated (`FLOW_F_SNAT`) | DNAT to the backend and SNAT to the node's SNAT address (or the hairpin address, `FLOW_F_HAIRPIN`) and the flow's port; forwarded by FIB lookup | `Established` + `Forwarded` |
//! | to a frontend, flow tracked but its backend left every EndpointSlice, TCP | `TC_ACT_REDIRECT`: RST to the client (a RST is dropped, `TC_ACT_SHOT`); flow (and its translated port) deleted | `BackendGone` |
//! | same, UDP | flow deleted, then handled as a new flow | `BackendGone` + the new flow's counter |
//! | to a frontend with `SERVICE_F_SOURCE_RANGES`, no flow, client in none of the service's ranges (`LB_SRC_RANGES`) | `TC_ACT_SHOT` | `SourceRangeDenied` |
//! | to a frontend, no flow (or expired), service has no ready backend or `SERVICE_F_REJECT` | `TC_ACT_REDIRECT` back to the client: TCP RST (a RST is dropped, `TC_ACT_SHOT`), UDP ICMP port unreachable; with `SERVICE_F_DROP` and no ready backend `TC_ACT_SHOT` | `NoBackend` |
//! | to a frontend, no flow (or expired; TCP with or without SYN), no source translation needed | `TC_ACT_OK`, DNAT to the client's affinity backend if the service has ClientIP affinity and it is valid, else to a ready backend chosen by the service's Maglev table or at random; flow created (`FLOW_F_EXTERNAL` for an external frontend) | `NewFlow` |
//! | same, backend is the client itself (hairpin, any role) | flow created with `FLOW_F_SNAT | FLOW_F_HAIRPIN` and a port from `LB_SNAT`; DNAT + SNAT to the hairpin address; forwarded by FIB lookup | `NewFlow` + `Forwarded` |
//! | same, role External, external frontend, backend without `BACKEND_F_LOCAL` (on another node) | flow created with `FLOW_F_SNAT` and a port from `LB_SNAT`; DNAT + SNAT to the node's SNAT address; forwarded by FIB lookup | `NewFlow` + `Forwarded` |
//! | a flow needing SNAT, no SNAT address configured (`snat_addr` 0) | `TC_ACT_SHOT` | `NoNatAddr` |
//! | a flow needing SNAT, none of the 16 ports drawn at random is free | `TC_ACT_SHOT` | `NoNatPort` |
//! | to a frontend, the chosen slot or its backend is missing (agent update race) | `TC_ACT_SHOT` | `SlotMiss` |
//! | to a frontend, the flow cannot be inserted | `TC_ACT_SHOT` | `ConntrackFull` |
//! | to the SNAT or hairpin address, port in the translated range, from the backend of the source-translated flow holding that port (`LB_SNAT`) | source rewritten to the frontend, destination to the client; forwarded by FIB lookup | `Reply` + `Forwarded` |
//! | from a backend to the client of a tracked flow of one of its services, not external | `TC_ACT_OK`, source rewritten to the frontend | `Reply` |
//! | same, external flow (`FLOW_F_EXTERNAL`: the new source may be a node address) | source rewritten to the frontend; forwarded by FIB lookup | `Reply` + `Forwarded` |
//! | anything else (no frontend, no tracked reply) | `TC_ACT_OK`, untouched | `Pass` |
//! | a rewrite helper failed | `TC_ACT_SHOT` | `RewriteFailed` |
//! | building the RST / ICMP answer failed | `TC_ACT_SHOT` | `RejectFailed` |
//!
//! A packet is checked against the port filter (`LB_PORTS`, two array
//! loads) before the frontend lookup (its destination port must be some
//! frontend's: any frontend's for `lb_tc_pod`, an external one's for the
//! external programs) and before the reply lookups (its source port must
//! be some backend's); a port without the bit skips the hash lookup, so a
//! packet between ports no service uses costs no hash lookup at all.
//!
//! ## Forwarding
//!
//! A packet whose new source the stack would reject (a node address is a
//! martian as a source; a translated source may fail reverse-path
//! filtering) is never handed to the stack but forwarded by FIB lookup
//! (`fib`): forward packets of source-translated flows, replies to
//! translated ports, replies of external flows. How, by program:
//!
//! | Lookup result | `lb_xdp_ext` (looks up before rewriting) | `lb_tc_pod`, `lb_tc_ext` (look up after rewriting, `BPF_FIB_LOOKUP_SKIP_NEIGH`) |
//! |---|---|---|
//! | route out of the arrival interface, neighbour known | rewrite, MACs from the lookup, `XDP_TX` | `bpf_redirect_neigh`, `TC_ACT_REDIRECT` |
//! | route out of another interface, or neighbour unknown (`NO_NEIGH`), not forwardable (`NOT_FWDED`), MTU exceeded (`FRAG_NEEDED`) | `XDP_PASS` untouched (counted `XdpToTc`; a new flow is created first): `lb_tc_ext` finds the flow and does it | another interface: as above; the others: `TC_ACT_SHOT`, `NoRoute` |
//! | blackhole, unreachable, prohibit, forwarding disabled on the arrival interface, other | `XDP_DROP`, `NoRoute` | `TC_ACT_SHOT`, `NoRoute` |
//!
//! With `CONFIG_F_XDP_NO_TX` in `LB_CONFIG` (`lb-agent run --xdp-forward
//! tc`, the default for a veth uplink) `lb_xdp_ext` does no lookup and
//! transmits nothing it forwards: every such packet is `XDP_PASS`
//! untouched, counted `XdpToTc` (a new flow is created first, `NewFlow`),
//! and `lb_tc_ext` forwards it as in the last column (`Forwarded`; a
//! packet without a route is dropped there, `NoRoute`). On a veth,
//! `XDP_TX` frames wait in the peer's queue until something else wakes
//! it, unless the peer has an XDP program of its own, which a node cannot
//! arrange for the far end of its uplink. The flag is read only on the way
//! to a forward or a refusal: the answers XDP would bounce (RST, ICMP port
//! unreachable) are left to TC too, the request passed untouched
//! (`XdpToTc`), and TC answers it as in the verdict table.
//!
//! Flow expiry: a flow idle for longer than its timeout (`LB_CONFIG`:
//! UDP, TCP, or TCP closing once FIN was seen both ways or RST either way)
//! is treated as absent by the forward path and replaced. A TCP flow is
//! deleted as soon as its connection ends: after translating a RST (either
//! way) or the last ACK following FINs both ways (`conntrack::closes`), so
//! connection churn does not fill the LRU table with closed flows; its
//! translated port goes back to `LB_SNAT` with it.
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
//! XDP sees frames as received, whose L4 checksum is complete: it updates
//! it in software (RFC 1624), a UDP checksum of 0 stays 0 (see `context`).
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
//! - The in-place RST/ICMP rewrite does not maintain `skb->csum` of a
//!   CHECKSUM_COMPLETE skb. Pod veths never deliver one; on an external
//!   interface the answer is sent straight back out, where `skb->csum`
//!   plays no part.
//! - XDP assumes complete L4 checksums on the external interfaces: a frame
//!   from a local veth peer with TX checksum offload on (pseudo-header sum
//!   only) would be translated with a wrong checksum.
//! - XDP forwards only out of the interface a packet arrived on
//!   (`XDP_TX`); everything else goes through `lb_tc_ext`, which must be
//!   attached wherever `lb_xdp_ext` is.
//! - The FIB lookup uses TOS 0 and no mark: policy routing on those does
//!   not apply to forwarded packets. A packet too big for the egress MTU
//!   is dropped (`NoRoute`), not answered with ICMP fragmentation needed.
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
mod fib;
mod log;
mod maps;
mod nat;
mod parse;
mod ports;
mod reject;
mod service;
mod snat;
mod source_range;
mod stats;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{
    context::{Action, PacketContext, tc_verdict, xdp_verdict},
    datapath::{External, Pod, Role},
};

/// Runs the datapath in `role` and turns an error into its counted action.
#[inline(always)]
fn run<C: PacketContext, R: Role>(ctx: &C) -> Action {
    match datapath::process::<C, R>(ctx) {
        Ok(action) => action,
        Err(error) => {
            counters::count(error.counter());
            error.action()
        }
    }
}

/// Service translation at tcx ingress of a pod's host-side veth.
#[classifier]
#[inline(always)]
fn lb_tc_pod(ctx: TcContext) -> i32 {
    let action = run::<_, Pod>(&ctx);
    tc_verdict(&ctx, action)
}

/// External frontends at XDP of the node's external interfaces.
#[xdp]
#[inline(always)]
fn lb_xdp_ext(ctx: XdpContext) -> u32 {
    xdp_verdict(run::<_, External>(&ctx))
}

/// External frontends at tcx ingress of the node's external interfaces:
/// what XDP handed on, and everything where XDP is not attached.
#[classifier]
#[inline(always)]
fn lb_tc_ext(ctx: TcContext) -> i32 {
    let action = run::<_, External>(&ctx);
    tc_verdict(&ctx, action)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

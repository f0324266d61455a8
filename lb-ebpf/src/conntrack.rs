//! Connection tracking: flow lookup, creation, expiry and TCP state.
//!
//! One LRU entry per flow, keyed by what both directions share (client
//! address and port, protocol, service id). Entries are updated in place
//! through the pointer the lookup returns, and only when something changed:
//! an established flow's packets otherwise only read the entry, which keeps
//! its cache line shared between CPUs.
//!
//! The in-place updates are plain stores, not atomics: two CPUs updating
//! the same flow at once can lose a flag bit or a timestamp. The worst
//! outcome is a flow that keeps the long timeout after it closed, which the
//! LRU reclaims under pressure anyway.

use aya_ebpf::{bindings::BPF_ANY, helpers::generated::bpf_ktime_get_coarse_ns};
use lb_common::{
    backend::Backend,
    conntrack::{
        FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT, FLOW_F_REPLY_SEEN, FLOW_F_RST, Flow, FlowKey,
    },
};

use crate::{
    config::Config,
    error::Error,
    maps::LB_CONNTRACK,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Flow flags that mean the TCP connection is closing.
const FLOW_F_CLOSING: u8 = FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND | FLOW_F_RST;

/// Seconds of CLOCK_MONOTONIC at tick resolution, the unit of
/// `Flow::last_seen`. The coarse clock is a plain load, unlike ktime_get_ns.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_coarse_ns() } / NS_PER_SEC) as u32
}

/// The key of the flow a client-to-frontend packet belongs to.
#[inline(always)]
pub const fn forward_key(pkt: &Packet, service_id: u32) -> FlowKey {
    FlowKey {
        client_addr: pkt.src_addr,
        client_port: pkt.src_port,
        proto: pkt.proto,
        _pad: 0,
        service_id,
    }
}

/// The key of the flow a backend-to-client packet would belong to, if the
/// backend serves it for `service_id`.
#[inline(always)]
pub const fn reply_key(pkt: &Packet, service_id: u32) -> FlowKey {
    FlowKey {
        client_addr: pkt.dst_addr,
        client_port: pkt.dst_port,
        proto: pkt.proto,
        _pad: 0,
        service_id,
    }
}

/// A pointer to the flow's entry. Valid until the next update or delete of
/// this map by this program; other CPUs may update the entry concurrently.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut Flow> {
    LB_CONNTRACK.get_ptr_mut(key)
}

#[inline(always)]
const fn is_closing(flags: u8) -> bool {
    flags & FLOW_F_RST != 0
        || flags & (FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND)
            == (FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND)
}

/// Whether the flow has been idle longer than its timeout: UDP's; TCP's,
/// or the closing timeout once both sides sent FIN or either sent RST.
#[inline(always)]
pub fn is_expired(flow: &Flow, is_tcp: bool, now: u32, config: &Config) -> bool {
    let timeout = if !is_tcp {
        config.udp_timeout
    } else if is_closing(flow.flags) {
        config.tcp_closing_timeout
    } else {
        config.tcp_timeout
    };
    now.wrapping_sub(flow.last_seen) > timeout
}

/// Flow flags a packet of the flow sets, by direction.
#[inline(always)]
const fn flags_from(pkt: &Packet, from_client: bool) -> u8 {
    let mut flags = 0;
    if pkt.tcp_flags & TCP_RST != 0 {
        flags |= FLOW_F_RST;
    }
    if pkt.tcp_flags & TCP_FIN != 0 {
        flags |= if from_client {
            FLOW_F_FIN_CLIENT
        } else {
            FLOW_F_FIN_BACKEND
        };
    }
    flags
}

/// Writes `last_seen` and `flags` into the entry if they differ.
#[inline(always)]
fn store_if_changed(flow: *mut Flow, current: &Flow, now: u32, flags: u8) {
    // SAFETY: `flow` comes from a lookup in this program run, with no map
    // update in between; the map memory stays valid for the whole run.
    unsafe {
        if current.last_seen != now {
            (*flow).last_seen = now;
        }
        if current.flags != flags {
            (*flow).flags = flags;
        }
    }
}

/// Records a client packet of an established flow: time, TCP flags and the
/// frontend it used (replies carry the frontend used last).
///
/// A SYN without ACK on a closing flow is the client reusing its port for
/// a new connection: the flow's TCP state starts over, so the new
/// connection gets the established timeout, on the same backend.
#[inline(always)]
pub fn touch_forward(flow: *mut Flow, current: &Flow, pkt: &Packet, now: u32) {
    let mut flags = current.flags;
    if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && flags & FLOW_F_CLOSING != 0 {
        flags &= !(FLOW_F_CLOSING | FLOW_F_REPLY_SEEN);
    }
    flags |= flags_from(pkt, true);
    store_if_changed(flow, current, now, flags);
    if current.frontend_addr != pkt.dst_addr || current.frontend_port != pkt.dst_port {
        // SAFETY: as in `store_if_changed`.
        unsafe {
            (*flow).frontend_addr = pkt.dst_addr;
            (*flow).frontend_port = pkt.dst_port;
        }
    }
}

/// Records a backend packet of the flow: time, reply seen, TCP flags.
#[inline(always)]
pub fn touch_reply(flow: *mut Flow, current: &Flow, pkt: &Packet, now: u32) {
    let flags = current.flags | FLOW_F_REPLY_SEEN | flags_from(pkt, false);
    store_if_changed(flow, current, now, flags);
}

/// Inserts (or replaces an expired) flow of `key` to `backend`.
#[inline(always)]
pub fn create(
    key: &FlowKey,
    pkt: &Packet,
    backend_id: u32,
    backend: &Backend,
    now: u32,
) -> Result<(), Error> {
    let flow = Flow {
        backend_addr: backend.addr,
        backend_port: backend.port,
        frontend_port: pkt.dst_port,
        frontend_addr: pkt.dst_addr,
        backend_id,
        last_seen: now,
        flags: flags_from(pkt, true),
        _pad: [0; 3],
    };
    LB_CONNTRACK
        .insert(key, &flow, u64::from(BPF_ANY))
        .map_err(|_| Error::ConntrackFull)
}

/// Deletes the flow. A flow already gone (deleted by another CPU, evicted)
/// is what the caller wanted anyway.
#[inline(always)]
pub fn remove(key: &FlowKey) {
    let _ = LB_CONNTRACK.remove(key);
}

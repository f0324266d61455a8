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

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use bytemuck::Zeroable;
use lb_common::{
    backend::Backend,
    conntrack::{
        FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT, FLOW_F_REPLY_SEEN, FLOW_F_RST, FLOW_F_SNAT, Flow,
        FlowKey,
    },
};

use crate::{
    config::Config,
    error::Error,
    maps::{LB_CLOCK, LB_CONNTRACK},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    snat,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Flow flags that mean the TCP connection is closing.
const FLOW_F_CLOSING: u8 = FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND | FLOW_F_RST;

/// The time a packet is handled at, read once: nanoseconds of
/// CLOCK_MONOTONIC at tick resolution (`bpf_ktime_get_coarse_ns`).
///
/// Flows store whole seconds (`Flow::last_seen`). Comparisons multiply the
/// stored seconds instead of dividing the clock, so the established path
/// has no 64-bit division; [`Now::secs`] divides only when a second is
/// stored.
#[derive(Clone, Copy)]
pub struct Now {
    ns: u64,
}

impl Now {
    /// The coarse clock only moves when the tick updates the timekeeper,
    /// which is also when `jiffies` moves; `bpf_jiffies64` is inlined by
    /// the verifier (a load), while a clock helper call costs ~10 ns. So
    /// each CPU keeps the clock value it read last together with the
    /// jiffies it read it at, and calls the helper only once per tick.
    /// The tick updates jiffies just before the timekeeper, so a packet in
    /// that window caches the previous tick's value for one tick: a
    /// timestamp at most one tick (<= 4 ms) old.
    #[inline(always)]
    pub fn read() -> Self {
        // SAFETY: plain helper calls.
        let jiffies = unsafe { bpf_jiffies64() };
        let Some(cache) = LB_CLOCK.get_ptr_mut(0) else {
            // SAFETY: plain helper call.
            return Self {
                ns: unsafe { bpf_ktime_get_coarse_ns() },
            };
        };
        // SAFETY: this CPU's slot of a per-CPU array entry, valid for the
        // whole run; nothing else runs on this CPU meanwhile.
        unsafe {
            if (*cache).jiffies != jiffies {
                (*cache).ns = bpf_ktime_get_coarse_ns();
                (*cache).jiffies = jiffies;
            }
            Self { ns: (*cache).ns }
        }
    }

    /// Whole seconds, the unit of `Flow::last_seen`.
    #[inline(always)]
    pub const fn secs(self) -> u32 {
        (self.ns / NS_PER_SEC) as u32
    }

    /// Whether this time falls in second `secs` (so `secs` is current).
    #[inline(always)]
    pub const fn is_in_second(self, secs: u32) -> bool {
        let start = secs as u64 * NS_PER_SEC;
        self.ns >= start && self.ns - start < NS_PER_SEC
    }

    /// Whether more than `timeout` whole seconds passed since second
    /// `secs`: `self.secs() - secs > timeout`, i.e. `self.secs() >=
    /// secs + timeout + 1`, without dividing.
    #[inline(always)]
    pub const fn is_past(self, secs: u32, timeout: u32) -> bool {
        self.ns >= (secs as u64 + timeout as u64 + 1) * NS_PER_SEC
    }
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
pub fn is_expired(flow: &Flow, is_tcp: bool, now: Now, config: &Config) -> bool {
    let timeout = if !is_tcp {
        config.udp_timeout
    } else if is_closing(flow.flags) {
        config.tcp_closing_timeout
    } else {
        config.tcp_timeout
    };
    now.is_past(flow.last_seen, timeout)
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
fn store_if_changed(flow: *mut Flow, current: &Flow, now: Now, flags: u8) {
    // SAFETY: `flow` comes from a lookup in this program run, with no map
    // update in between; the map memory stays valid for the whole run.
    unsafe {
        if !now.is_in_second(current.last_seen) {
            (*flow).last_seen = now.secs();
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
pub fn touch_forward(flow: *mut Flow, current: &Flow, pkt: &Packet, now: Now) {
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
pub fn touch_reply(flow: *mut Flow, current: &Flow, pkt: &Packet, now: Now) {
    let flags = current.flags | FLOW_F_REPLY_SEEN | flags_from(pkt, false);
    store_if_changed(flow, current, now, flags);
}

/// Whether this packet ends the TCP connection, so its flow can be
/// deleted right after the packet is translated: a RST either way, or the
/// last ACK (no FIN, no SYN) after FIN was seen both ways.
///
/// Deleting here is what keeps the table free of closed flows under
/// connection churn without a userspace sweep (an LRU hash never drops an
/// entry by itself; without this, every closed flow would sit there until
/// evicted). If that last ACK is lost, the retransmitted FIN finds no
/// flow: from the backend it passes untranslated and the client answers
/// with a RST, from the client it is balanced afresh and the new backend
/// answers with a RST; either way the closing side finishes.
#[inline(always)]
pub const fn closes(flow: &Flow, pkt: &Packet) -> bool {
    if !pkt.is_tcp() {
        return false;
    }
    pkt.tcp_flags & TCP_RST != 0
        || (flow.flags & (FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND)
            == (FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND)
            && pkt.tcp_flags & (TCP_ACK | TCP_FIN | TCP_SYN) == TCP_ACK)
}

/// Inserts (or replaces an expired) flow of `key` to `backend`, with
/// `flags` (`FLOW_F_EXTERNAL`, `FLOW_F_SNAT`, `FLOW_F_HAIRPIN`) and, for a
/// source-translated flow, its translated port `nat_port`.
#[inline(always)]
pub fn create(
    key: &FlowKey,
    pkt: &Packet,
    backend_id: u32,
    backend: &Backend,
    now: Now,
    flags: u8,
    nat_port: u16,
) -> Result<(), Error> {
    // Built on a zeroed value: a struct literal with the `_pad` array makes
    // the compiler call memset for three bytes.
    let mut flow: Flow = Zeroable::zeroed();
    flow.backend_addr = backend.addr;
    flow.backend_port = backend.port;
    flow.frontend_port = pkt.dst_port;
    flow.frontend_addr = pkt.dst_addr;
    flow.backend_id = backend_id;
    flow.last_seen = now.secs();
    flow.flags = flags | flags_from(pkt, true);
    flow.nat_port = nat_port;
    LB_CONNTRACK
        .insert(key, &flow, u64::from(BPF_ANY))
        .map_err(|_| Error::ConntrackFull)
}

/// Deletes the flow of `key` whose translated port could not be claimed
/// (so there is none to give back).
#[inline(always)]
pub fn remove_unclaimed(key: &FlowKey) {
    let _ = LB_CONNTRACK.remove(key);
}

/// Deletes the source-translated flow of `key` that the current packet
/// created (to `backend`, holding `nat_port`) and gives its port back:
/// that packet was dropped.
#[inline(always)]
pub fn remove_new(key: &FlowKey, backend: &Backend, nat_port: u16) {
    let _ = LB_CONNTRACK.remove(key);
    snat::release_port(backend.addr, backend.port, nat_port, key.proto);
}

/// Deletes the flow `flow` of `key`, and the translated port it holds if
/// it is source-translated. A flow already gone (deleted by another CPU,
/// evicted) is what the caller wanted anyway.
#[inline(always)]
pub fn remove(key: &FlowKey, flow: &Flow) {
    let _ = LB_CONNTRACK.remove(key);
    if flow.flags & FLOW_F_SNAT != 0 {
        snat::release(flow, key.proto);
    }
}

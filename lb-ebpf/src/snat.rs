//! Translated source ports of source-translated flows (`LB_SNAT`).
//!
//! A flow gets a port when it is created ([`allocate`]): a few ports drawn
//! at random from the configured range are tried (independent draws, as
//! Cilium's SNAT retries: consecutive ports from one random start would
//! let taken ports cluster into runs longer than the tries), each
//! claimed with an insert that fails if the port is taken for the same
//! backend address, port and protocol (the key of `LB_SNAT`: the reply's
//! view, so the translated address itself is not part of it). A taken
//! port whose owner is gone (its flow deleted, expired, or holding another
//! port or backend by now) is stale and taken over. The port is given back
//! when the flow's TCP connection closes ([`release`]); a flow that just
//! expires leaves a stale entry, reused by a later allocation or reclaimed
//! by the LRU.
//!
//! The flow's conntrack entry exists before its port is claimed, and holds
//! the port being claimed at each try: another CPU that finds a port
//! claimed always finds its owner's flow holding it, so two flows racing
//! for one free port never both get it.
//!
//! Known limits:
//! - Taking over a stale port is a check and then an overwrite: two CPUs
//!   taking over the same stale port in the same instant both believe
//!   they got it, and the first one's replies reach the second one's
//!   client. That needs two new flows to one backend to draw the same of
//!   ~4,500 ports at the same moment while an old flow's port lies stale.
//! - `LB_SNAT` is an LRU map: when it is full, inserting evicts the least
//!   recently used entry, possibly of a live idle flow, whose replies then
//!   find no flow and go to the stack. Size it (`--max-snat-flows`) for the
//!   source-translated flows the node carries.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_get_prandom_u32,
};
use lb_common::{
    backend::Backend,
    conntrack::{FLOW_F_SNAT, Flow, FlowKey},
    nat::SnatKey,
    proto,
};

use crate::{
    config::{Config, NatConfig},
    conntrack::{self, Now},
    error::Error,
    maps::{LB_CONNTRACK, LB_SNAT},
    parse::Packet,
};

/// Ports tried per new flow before giving up (`Counter::NoNatPort`). With
/// independent draws, all fail with probability (share of the range taken
/// for this backend)^16: 1.5e-5 with half of the ~4,500 ports taken. A try
/// that finds its port free costs one insert, so only collisions add up.
const ALLOCATION_ATTEMPTS: u32 = 16;

/// Claims a translated source port (network byte order) for flow `key`
/// (conntrack entry `entry`) to `backend`, recording each port tried in
/// the entry before trying to claim it.
#[inline(always)]
pub fn allocate(
    key: &FlowKey,
    entry: *mut Flow,
    backend: &Backend,
    config: &Config,
    nat_config: &NatConfig,
    now: Now,
) -> Result<u16, Error> {
    let min = u32::from(nat_config.nat_port_min);
    // `NatConfig` keeps min <= max; written so the compiler sees 1..=65536
    // (a division it cannot prove non-zero would pull in a panic path).
    let range = u32::from(
        nat_config
            .nat_port_max
            .wrapping_sub(nat_config.nat_port_min),
    ) + 1;
    for _ in 0..ALLOCATION_ATTEMPTS {
        // SAFETY: plain helper call.
        let offset = unsafe { bpf_get_prandom_u32() } % range;
        let port = ((min + offset) as u16).to_be();
        // SAFETY: `entry` comes from a lookup in this run; LB_CONNTRACK
        // has not been updated since, and map memory stays valid for the run.
        unsafe { (*entry).nat_port = port };
        let snat_key = SnatKey::new(backend.addr, backend.port, port, key.proto);
        if LB_SNAT
            .insert(&snat_key, key, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Ok(port);
        }
        if is_stale(&snat_key, key, config, now)
            && LB_SNAT.insert(&snat_key, key, u64::from(BPF_ANY)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(Error::NoNatPort)
}

/// Whether the port of `snat_key` may be taken over by flow `own`: its
/// entry is gone, or belongs to `own` itself (whose expired flow is being
/// replaced), or to a flow that no longer holds it.
#[inline(always)]
fn is_stale(snat_key: &SnatKey, own: &FlowKey, config: &Config, now: Now) -> bool {
    let Some(owner) = LB_SNAT.get_ptr(snat_key) else {
        return true;
    };
    // SAFETY: copied at once, before any map update.
    let owner: FlowKey = unsafe { *owner };
    if owner == *own {
        return true;
    }
    let Some(flow) = LB_CONNTRACK.get_ptr(&owner) else {
        return true;
    };
    // SAFETY: copied at once, before any map update.
    let flow: Flow = unsafe { *flow };
    !holds(&flow, snat_key) || conntrack::is_expired(&flow, owner.proto == proto::TCP, now, config)
}

/// Whether `flow` is the source-translated flow that `snat_key` names.
#[inline(always)]
const fn holds(flow: &Flow, snat_key: &SnatKey) -> bool {
    flow.flags & FLOW_F_SNAT != 0
        && flow.nat_port == snat_key.nat_port
        && flow.backend_addr == snat_key.backend_addr
        && flow.backend_port == snat_key.backend_port
}

/// The flow a backend's reply to a translated port belongs to: its key, a
/// pointer to its entry and a copy, if `LB_SNAT` names a flow that still
/// holds that port.
#[inline(always)]
pub fn reply_flow(pkt: &Packet) -> Option<(FlowKey, *mut Flow, Flow)> {
    let snat_key = SnatKey::new(pkt.src_addr, pkt.src_port, pkt.dst_port, pkt.proto);
    // SAFETY: copied at once, before any map update.
    let key: FlowKey = unsafe { *LB_SNAT.get_ptr(&snat_key)? };
    let entry = conntrack::lookup(&key)?;
    // SAFETY: the entry pointer is valid for this run; copied before any
    // map update.
    let flow: Flow = unsafe { *entry };
    holds(&flow, &snat_key).then_some((key, entry, flow))
}

/// Gives back the translated port of `flow` (protocol `proto`).
#[inline(always)]
pub fn release(flow: &Flow, proto: u8) {
    release_port(flow.backend_addr, flow.backend_port, flow.nat_port, proto);
}

/// Gives back translated port `nat_port` of backend `backend_addr:backend_port`.
#[inline(always)]
pub fn release_port(backend_addr: u32, backend_port: u16, nat_port: u16, proto: u8) {
    let _ = LB_SNAT.remove(&SnatKey::new(backend_addr, backend_port, nat_port, proto));
}

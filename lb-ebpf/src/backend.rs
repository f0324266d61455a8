//! Backend selection for new flows and validation for established ones.

use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use lb_common::{
    backend::Backend,
    conntrack::Flow,
    service::{SERVICE_F_MAGLEV, ServiceValue, SlotKey},
};

use crate::{
    config::Config,
    error::Error,
    maps::{LB_BACKENDS, LB_MAGLEV, LB_SLOTS},
    parse::Packet,
};

/// Chooses the backend of a new flow: by the service's Maglev table
/// (`SERVICE_F_MAGLEV`: the same backend for the same flow on every node),
/// else a uniformly random slot among the service's `backend_count` slots,
/// which hold its ready backends.
///
/// A missing slot, a table entry naming no backend or an inactive backend
/// means the agent is between two writes (it fills slots, tables and
/// backends before raising `backend_count` or setting the Maglev flag, and
/// lowers it before removing them), so this is [`Error::SlotMiss`].
/// `backend_count` must not be 0.
#[inline(always)]
pub fn select(
    service: &ServiceValue,
    pkt: &Packet,
    config: &Config,
) -> Result<(u32, Backend), Error> {
    let backend_id = if service.flags & SERVICE_F_MAGLEV != 0 {
        let size = config.maglev_table_size;
        let index = u32::from(service.maglev_table) * size + flow_hash(pkt) % size;
        *LB_MAGLEV.get(index).ok_or(Error::SlotMiss)?
    } else {
        // SAFETY: plain helper call.
        let random = unsafe { bpf_get_prandom_u32() };
        let key = SlotKey {
            service_id: service.id,
            slot: random % service.backend_count,
        };
        let slot = LB_SLOTS.get_ptr(&key).ok_or(Error::SlotMiss)?;
        // SAFETY: the slot is read immediately, before any map update.
        unsafe { (*slot).backend_id }
    };
    active(backend_id).ok_or(Error::SlotMiss)
}

/// The backend with id `backend_id`, if the id holds a live backend.
#[inline(always)]
pub fn active(backend_id: u32) -> Option<(u32, Backend)> {
    match LB_BACKENDS.get(backend_id) {
        Some(backend) if backend.is_active() => Some((backend_id, *backend)),
        _ => None,
    }
}

/// A hash of the flow's addresses, ports and protocol that every node
/// computes alike (no random seed): MurmurHash3's 32-bit mixing of the
/// four words, then its finaliser.
#[inline(always)]
pub fn flow_hash(pkt: &Packet) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    #[inline(always)]
    fn mix(hash: u32, word: u32) -> u32 {
        let word = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        (hash ^ word)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let ports = (u32::from(pkt.src_port) << 16) | u32::from(pkt.dst_port);
    let mut hash = mix(0, pkt.src_addr);
    hash = mix(hash, pkt.dst_addr);
    hash = mix(hash, ports);
    hash = mix(hash, u32::from(pkt.proto));
    hash ^= 16;
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// Whether the flow's backend is still listed by some service in any
/// condition: its id is active and still holds the flow's address and port
/// (ids are reused once freed). A NOT_READY backend keeps its flows.
#[inline(always)]
pub fn still_serves(flow: &Flow) -> bool {
    match LB_BACKENDS.get(flow.backend_id) {
        Some(backend) => {
            backend.is_active()
                && backend.addr == flow.backend_addr
                && backend.port == flow.backend_port
        }
        None => false,
    }
}

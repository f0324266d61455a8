//! Backend selection for new flows and validation for established ones.

use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use lb_common::{
    backend::Backend,
    conntrack::Flow,
    service::{ServiceValue, SlotKey},
};

use crate::{
    error::Error,
    maps::{LB_BACKENDS, LB_SLOTS},
};

/// Chooses the backend of a new flow: a uniformly random slot among the
/// service's `backend_count` slots, which hold its ready backends.
///
/// A missing slot or an inactive backend means the agent is between two
/// writes (it fills slots and backends before raising `backend_count`, and
/// lowers it before removing them), so this is [`Error::SlotMiss`].
/// `backend_count` must not be 0.
#[inline(always)]
pub fn select(service: &ServiceValue) -> Result<(u32, Backend), Error> {
    // SAFETY: plain helper call.
    let random = unsafe { bpf_get_prandom_u32() };
    let key = SlotKey {
        service_id: service.id,
        slot: random % service.backend_count,
    };
    let slot = LB_SLOTS.get_ptr(&key).ok_or(Error::SlotMiss)?;
    // SAFETY: the slot is read immediately, before any map update.
    let backend_id = unsafe { (*slot).backend_id };
    match LB_BACKENDS.get(backend_id) {
        Some(backend) if backend.is_active() => Ok((backend_id, *backend)),
        _ => Err(Error::SlotMiss),
    }
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

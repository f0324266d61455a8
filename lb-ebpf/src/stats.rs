//! Per-service and per-backend traffic counters (`LB_SVC_STATS`,
//! `LB_BE_STATS`): per-CPU array slots updated in place, no atomics.
//! Array lookups are inlined by the verifier, so this costs a few
//! nanoseconds per translated packet; passed packets never get here.

use lb_common::stats::{DropReason, MAX_BACKEND_STATS, MAX_SERVICE_STATS};

use crate::maps::{LB_BE_STATS as LB_BACKEND_STATS, LB_SVC_STATS as LB_SERVICE_STATS};

/// A client packet of `len` bytes translated to `backend_id` for
/// `service_id`; `new_flow` if it started the flow.
#[inline(always)]
pub fn forward(service_id: u32, backend_id: u32, len: u32, new_flow: bool) {
    let new_flows = u64::from(new_flow);
    if let Some(stats) = LB_SERVICE_STATS.get_ptr_mut(service_id & (MAX_SERVICE_STATS - 1)) {
        // SAFETY: this CPU's share of an array entry, valid for the run;
        // nothing else runs on this CPU meanwhile.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(len);
            (*stats).new_flows += new_flows;
        }
    }
    if let Some(stats) = LB_BACKEND_STATS.get_ptr_mut(backend_id & (MAX_BACKEND_STATS - 1)) {
        // SAFETY: as above.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(len);
            (*stats).new_flows += new_flows;
        }
    }
}

/// A flow created for `service_id` to `backend_id` whose first packet is
/// counted elsewhere (XDP created it and handed the packet to TC, which
/// counts the packet as established).
#[inline(always)]
pub fn new_flow(service_id: u32, backend_id: u32) {
    if let Some(stats) = LB_SERVICE_STATS.get_ptr_mut(service_id & (MAX_SERVICE_STATS - 1)) {
        // SAFETY: as in `forward`.
        unsafe { (*stats).new_flows += 1 };
    }
    if let Some(stats) = LB_BACKEND_STATS.get_ptr_mut(backend_id & (MAX_BACKEND_STATS - 1)) {
        // SAFETY: as in `forward`.
        unsafe { (*stats).new_flows += 1 };
    }
}

/// A backend packet of `len` bytes reverse-translated.
#[inline(always)]
pub fn reply(service_id: u32, backend_id: u32, len: u32) {
    if let Some(stats) = LB_SERVICE_STATS.get_ptr_mut(service_id & (MAX_SERVICE_STATS - 1)) {
        // SAFETY: as in `forward`.
        unsafe {
            (*stats).reply_packets += 1;
            (*stats).reply_bytes += u64::from(len);
        }
    }
    if let Some(stats) = LB_BACKEND_STATS.get_ptr_mut(backend_id & (MAX_BACKEND_STATS - 1)) {
        // SAFETY: as in `forward`.
        unsafe {
            (*stats).reply_packets += 1;
            (*stats).reply_bytes += u64::from(len);
        }
    }
}

/// A packet of `service_id` dropped or refused for `reason`.
#[inline(always)]
pub fn drop(service_id: u32, reason: DropReason) {
    if let Some(stats) = LB_SERVICE_STATS.get_ptr_mut(service_id & (MAX_SERVICE_STATS - 1)) {
        let index = reason as usize;
        // SAFETY: as in `forward`; `index` < DROP_REASON_COUNT by the enum.
        unsafe {
            if let Some(slot) = (*stats).drops.get_mut(index) {
                *slot += 1;
            }
        }
    }
}

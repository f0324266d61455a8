//! ClientIP session affinity for new flows.
//!
//! A service with `affinity_timeout != 0` sends every new connection of a
//! client to the backend its previous one went to, as long as fewer than
//! `affinity_timeout` seconds passed since that previous new connection
//! (kube-proxy's `recent` match counts from the last new connection too;
//! packets of established flows never touch the affinity, which keeps
//! them cheap). An affinity is only followed while its backend is a ready
//! backend of this very service (`LB_MEMBERS`; a backend's `LB_BACKENDS`
//! flags are shared by every service listing it); otherwise, and when it
//! expired, the backend is chosen afresh and the affinity replaced.
//!
//! The timeout is read from the service on every use, so switching
//! affinity off, on, or changing the timeout applies to the next
//! connection.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    affinity::{Affinity, AffinityKey, MemberKey},
    backend::Backend,
    service::ServiceValue,
};

use crate::{
    backend,
    config::Config,
    conntrack::Now,
    error::Error,
    maps::{LB_AFFINITY, LB_MEMBERS},
    parse::Packet,
};

/// The backend for a new flow of a service with session affinity.
#[inline(always)]
pub fn select(
    service: &ServiceValue,
    pkt: &Packet,
    now: Now,
    config: &Config,
) -> Result<(u32, Backend), Error> {
    let key = AffinityKey {
        service_id: service.id,
        client_addr: pkt.src_addr,
    };
    if let Some(entry) = LB_AFFINITY.get_ptr_mut(&key) {
        // SAFETY: the entry pointer is valid for this run; copied at once.
        let affinity: Affinity = unsafe { *entry };
        if !now.is_past(affinity.last_seen, service.affinity_timeout)
            && is_member(service.id, affinity.backend_id)
            && let Some(chosen) = backend::active(affinity.backend_id)
        {
            if !now.is_in_second(affinity.last_seen) {
                // SAFETY: as above; a plain store into the map's value.
                unsafe { (*entry).last_seen = now.secs() };
            }
            return Ok(chosen);
        }
    }
    let chosen = backend::select(service, pkt, config)?;
    let affinity = Affinity {
        backend_id: chosen.0,
        last_seen: now.secs(),
    };
    // An LRU insert only fails when the kernel is out of memory; the flow
    // is still translated, and the next connection chooses afresh.
    let _ = LB_AFFINITY.insert(&key, &affinity, u64::from(BPF_ANY));
    Ok(chosen)
}

/// Whether `backend_id` is a ready backend of service `service_id`.
#[inline(always)]
fn is_member(service_id: u32, backend_id: u32) -> bool {
    LB_MEMBERS
        .get_ptr(&MemberKey {
            service_id,
            backend_id,
        })
        .is_some()
}

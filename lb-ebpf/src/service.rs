//! Frontend lookup: is the packet's destination a service frontend?

use lb_common::service::{SERVICE_F_DROP, SERVICE_F_REJECT, ServiceKey, ServiceValue};

use crate::{maps::LB_SERVICES, parse::Packet};

/// The service whose frontend is the packet's destination, if any.
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Option<ServiceValue> {
    let key = ServiceKey::new(pkt.dst_addr, pkt.dst_port, pkt.proto);
    // SAFETY: the entry is copied out immediately, before any map update.
    LB_SERVICES.get_ptr(&key).map(|value| unsafe { *value })
}

/// Whether new connections to the service are refused (kube-proxy's REJECT):
/// no ready backend, or the service asks for it.
#[inline(always)]
pub const fn rejects_new_connections(service: &ServiceValue) -> bool {
    service.backend_count == 0 || service.flags & SERVICE_F_REJECT != 0
}

/// Whether a refused new connection is dropped silently instead of
/// answered (kube-proxy's DROP for internalTrafficPolicy Local without a
/// local endpoint).
#[inline(always)]
pub const fn drops_new_connections(service: &ServiceValue) -> bool {
    service.backend_count == 0 && service.flags & SERVICE_F_DROP != 0
}

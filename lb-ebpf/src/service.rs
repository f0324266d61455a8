//! Frontend lookup: is the packet's destination a service frontend?

use lb_common::service::{
    SERVICE_F_DROP, SERVICE_F_EXTERNAL, SERVICE_F_INTERNAL_VIEW, SERVICE_F_REJECT, ServiceKey,
    ServiceValue,
};

use crate::{maps::LB_SERVICES, parse::Packet};

/// The service whose frontend is the packet's destination, if any.
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Option<ServiceValue> {
    let key = ServiceKey::new(pkt.dst_addr, pkt.dst_port, pkt.proto);
    // SAFETY: the entry is copied out immediately, before any map update.
    LB_SERVICES.get_ptr(&key).map(|value| unsafe { *value })
}

/// The service a packet from a pod is balanced with when it reaches
/// `service`'s frontend. An external frontend of a Service whose traffic
/// policies differ (`SERVICE_F_INTERNAL_VIEW`) holds the external view of
/// the backends (e.g. only this node's, `externalTrafficPolicy: Local`);
/// pods get the internal view, the entry of the Service's ClusterIP, as
/// kube-proxy sends pod traffic to external addresses of a Local Service
/// to every endpoint. The flow stays external (its replies come from the
/// frontend the pod used, possibly a node address). Policy: if the
/// ClusterIP's entry is missing (mid-update), the external view is used.
/// Source ranges are the load-balancer frontends' and not checked for pods
/// taking the internal view.
#[inline(always)]
pub fn internal_view(pkt: &Packet, service: ServiceValue) -> ServiceValue {
    if service.flags & SERVICE_F_INTERNAL_VIEW == 0 {
        return service;
    }
    let key = ServiceKey::new(service.internal_addr, service.internal_port, pkt.proto);
    match LB_SERVICES.get_ptr(&key) {
        Some(internal) => {
            // SAFETY: copied out immediately, before any map update.
            let internal = unsafe { *internal };
            ServiceValue {
                flags: internal.flags | SERVICE_F_EXTERNAL,
                ..internal
            }
        }
        None => service,
    }
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

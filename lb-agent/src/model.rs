//! The desired state of the datapath, independent of where it came from
//! (manifests today, the Kubernetes API later) and of how it is stored in
//! BPF maps (`datapath::writer` decides that).
//!
//! A [`ServicePort`] is one port of one Service, named by a stable
//! [`ServicePortName`]; it has the frontends clients connect to and the
//! backends connections are sent to. Every collection is ordered, so two
//! equal inputs give equal states and iteration order is deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Transport protocols the load balancer translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number, as stored in the maps.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::proto::TCP,
            Protocol::Udp => lb_common::proto::UDP,
        }
    }

    pub const fn name(self) -> &'static str {
        lb_common::proto::name(self.number())
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An address, port and protocol that clients connect to (a ClusterIP and a
/// Service port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl Frontend {
    /// The key of this frontend in `LB_SERVICES` (network byte order).
    pub fn key(&self) -> lb_common::service::ServiceKey {
        lb_common::service::ServiceKey::new(
            u32::from(self.addr).to_be(),
            self.port.to_be(),
            self.proto.number(),
        )
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// The stable identity of one port of one Service: namespace, name, port
/// name and protocol, as kube-proxy's `ServicePortName`. The datapath's
/// service id follows this identity for as long as it exists.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name`; empty for the single unnamed port.
    pub port_name: String,
    pub proto: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.proto)
    }
}

/// Whether a listed backend may receive new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Readiness {
    /// New connections may be sent to it.
    Ready,
    /// Listed but not ready (or terminating): its established flows keep
    /// working, new connections go elsewhere.
    NotReady,
}

impl Readiness {
    pub const fn is_ready(self) -> bool {
        matches!(self, Readiness::Ready)
    }
}

/// How new connections of a service port choose their backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// A uniformly random ready backend, chosen by each node on its own.
    Random,
    /// The service's Maglev table: the same backend for the same flow on
    /// every node, and few flows move when the backends change.
    Maglev,
}

impl Selection {
    pub const fn name(self) -> &'static str {
        match self {
            Selection::Random => "random",
            Selection::Maglev => "maglev",
        }
    }
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One Service port: its frontends and its backends (pod address and
/// target port; the protocol is the Service port's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    pub frontends: BTreeSet<Frontend>,
    pub backends: BTreeMap<SocketAddrV4, Readiness>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds (1..=86400).
    pub affinity_timeout: Option<u32>,
    /// Backend selection the Service asks for; `None`: the agent's default.
    pub selection: Option<Selection>,
    /// With no ready backend, drop new connections rather than refuse them
    /// (`internalTrafficPolicy: Local`, as kube-proxy does).
    pub drop_without_backend: bool,
}

impl ServicePort {
    pub fn ready_backends(&self) -> impl Iterator<Item = SocketAddrV4> + '_ {
        self.backends
            .iter()
            .filter(|(_, readiness)| readiness.is_ready())
            .map(|(addr, _)| *addr)
    }
}

/// Two service ports claim the same frontend; the first in
/// [`ServicePortName`] order keeps it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frontend {frontend} of {rejected} is already the frontend of {owner}")]
pub struct FrontendConflict {
    pub frontend: Frontend,
    pub owner: ServicePortName,
    pub rejected: ServicePortName,
}

/// Everything the datapath should do: every service port by identity.
/// Invariant: no frontend belongs to two service ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    services: BTreeMap<ServicePortName, ServicePort>,
    owners: BTreeMap<Frontend, ServicePortName>,
}

impl DesiredState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a service port (or merges into an existing one of the same
    /// name). A frontend that already belongs to another service port is
    /// not added to this one; each such frontend is returned as a conflict.
    pub fn insert(&mut self, name: ServicePortName, port: ServicePort) -> Vec<FrontendConflict> {
        let mut conflicts = Vec::new();
        let entry = self.services.entry(name.clone()).or_default();
        // Both come from the Service object, the same for every merge.
        entry.affinity_timeout = port.affinity_timeout;
        entry.selection = port.selection;
        entry.drop_without_backend = port.drop_without_backend;
        for frontend in port.frontends {
            match self.owners.get(&frontend) {
                Some(owner) if *owner != name => conflicts.push(FrontendConflict {
                    frontend,
                    owner: owner.clone(),
                    rejected: name.clone(),
                }),
                _ => {
                    self.owners.insert(frontend, name.clone());
                    entry.frontends.insert(frontend);
                }
            }
        }
        for (addr, readiness) in port.backends {
            entry
                .backends
                .entry(addr)
                .and_modify(|existing| *existing = (*existing).min(readiness))
                .or_insert(readiness);
        }
        conflicts
    }

    /// Service ports in [`ServicePortName`] order.
    pub fn services(&self) -> impl ExactSizeIterator<Item = (&ServicePortName, &ServicePort)> {
        self.services.iter()
    }

    pub fn service(&self, name: &ServicePortName) -> Option<&ServicePort> {
        self.services.get(name)
    }

    /// The service port a frontend belongs to.
    pub fn owner(&self, frontend: &Frontend) -> Option<&ServicePortName> {
        self.owners.get(frontend)
    }

    /// Every frontend, in order, with its service port.
    pub fn frontends(&self) -> impl ExactSizeIterator<Item = (&Frontend, &ServicePortName)> {
        self.owners.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(service: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: "default".into(),
            name: service.into(),
            port_name: port.into(),
            proto: Protocol::Tcp,
        }
    }

    fn frontend(port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(198, 18, 100, 1),
            port,
            proto: Protocol::Tcp,
        }
    }

    #[test]
    fn a_frontend_has_one_owner() {
        let mut state = DesiredState::new();
        let port = ServicePort {
            frontends: [frontend(80)].into(),
            ..ServicePort::default()
        };
        assert!(state.insert(name("a", "http"), port.clone()).is_empty());
        let conflicts = state.insert(name("b", "http"), port);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].owner, name("a", "http"));
        assert_eq!(state.owner(&frontend(80)), Some(&name("a", "http")));
        assert!(
            state
                .service(&name("b", "http"))
                .unwrap()
                .frontends
                .is_empty()
        );
    }

    #[test]
    fn merged_backends_are_ready_if_any_listing_is_ready() {
        let addr = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10), 8080);
        let mut state = DesiredState::new();
        state.insert(
            name("a", ""),
            ServicePort {
                frontends: BTreeSet::new(),
                backends: [(addr, Readiness::NotReady)].into(),
                ..ServicePort::default()
            },
        );
        state.insert(
            name("a", ""),
            ServicePort {
                frontends: BTreeSet::new(),
                backends: [(addr, Readiness::Ready)].into(),
                ..ServicePort::default()
            },
        );
        assert_eq!(
            state.service(&name("a", "")).unwrap().backends[&addr],
            Readiness::Ready
        );
    }

    #[test]
    fn frontend_key_is_network_byte_order() {
        let key = frontend(80).key();
        assert_eq!(key.addr.to_ne_bytes(), [198, 18, 100, 1]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.proto, lb_common::proto::TCP);
    }
}

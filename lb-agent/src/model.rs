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

/// How a frontend is reached, which decides its `SERVICE_F_*` flags.
///
/// Ordered from the least to the most restrictive: when one service port
/// lists the same frontend twice (an external IP that is also a
/// load-balancer ingress IP), the most restrictive kind is kept, so
/// `loadBalancerSourceRanges` is never bypassed through the other one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendKind {
    /// A `spec.clusterIPs` address and the Service port.
    ClusterIp,
    /// A node address and the Service port's `nodePort`.
    NodePort,
    /// A `spec.externalIPs` address and the Service port.
    ExternalIp,
    /// A `status.loadBalancer.ingress[].ip` and the Service port.
    LoadBalancer,
}

impl FrontendKind {
    /// Reached from outside the cluster: translated on the node's external
    /// interfaces too (`SERVICE_F_EXTERNAL`), and scoped by
    /// `externalTrafficPolicy`.
    pub const fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }

    pub const fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "clusterip",
            FrontendKind::NodePort => "nodeport",
            FrontendKind::ExternalIp => "externalip",
            FrontendKind::LoadBalancer => "loadbalancer",
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The frontends of a service port, each with its kind, in frontend order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontends(BTreeMap<Frontend, FrontendKind>);

impl Frontends {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a frontend; one already present keeps the more restrictive
    /// kind of the two (see [`FrontendKind`]).
    pub fn insert(&mut self, frontend: Frontend, kind: FrontendKind) {
        let merged = self.0.entry(frontend).or_insert(kind);
        *merged = (*merged).max(kind);
    }

    pub fn kind(&self, frontend: &Frontend) -> Option<FrontendKind> {
        self.0.get(frontend).copied()
    }

    pub fn contains(&self, frontend: &Frontend) -> bool {
        self.0.contains_key(frontend)
    }

    /// The lowest frontend.
    pub fn first(&self) -> Option<&Frontend> {
        self.0.keys().next()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Frontend, FrontendKind)> {
        self.0.iter().map(|(frontend, kind)| (frontend, *kind))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &Frontend> {
        self.0.keys()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any frontend is of `kind`.
    pub fn any_of(&self, kind: FrontendKind) -> bool {
        self.0.values().any(|k| *k == kind)
    }
}

impl Extend<(Frontend, FrontendKind)> for Frontends {
    fn extend<I: IntoIterator<Item = (Frontend, FrontendKind)>>(&mut self, iter: I) {
        for (frontend, kind) in iter {
            self.insert(frontend, kind);
        }
    }
}

impl FromIterator<(Frontend, FrontendKind)> for Frontends {
    fn from_iter<I: IntoIterator<Item = (Frontend, FrontendKind)>>(iter: I) -> Self {
        let mut frontends = Self::new();
        frontends.extend(iter);
        frontends
    }
}

/// ClusterIP frontends.
impl FromIterator<Frontend> for Frontends {
    fn from_iter<I: IntoIterator<Item = Frontend>>(iter: I) -> Self {
        iter.into_iter()
            .map(|frontend| (frontend, FrontendKind::ClusterIp))
            .collect()
    }
}

/// ClusterIP frontends.
impl<const N: usize> From<[Frontend; N]> for Frontends {
    fn from(frontends: [Frontend; N]) -> Self {
        frontends.into_iter().collect()
    }
}

impl<const N: usize> From<[(Frontend, FrontendKind); N]> for Frontends {
    fn from(frontends: [(Frontend, FrontendKind); N]) -> Self {
        frontends.into_iter().collect()
    }
}

impl IntoIterator for Frontends {
    type Item = (Frontend, FrontendKind);
    type IntoIter = std::collections::btree_map::IntoIter<Frontend, FrontendKind>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// An IPv4 network `addr/prefix_len`, host bits zero (as Go's
/// `net.ParseCIDR`, which Kubernetes uses, returns it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

/// A string that is not an IPv4 CIDR (`a.b.c.d/n`, n in 0..=32).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 CIDR (a.b.c.d/n)")]
pub struct InvalidCidr(pub String);

impl Ipv4Cidr {
    /// The network of `addr` with `prefix_len` bits (host bits cleared);
    /// `None` if `prefix_len` exceeds 32.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Option<Self> {
        let mask = Self::mask(prefix_len)?;
        Some(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len,
        })
    }

    fn mask(prefix_len: u8) -> Option<u32> {
        match prefix_len {
            0 => Some(0),
            1..=32 => Some(u32::MAX << (32 - u32::from(prefix_len))),
            _ => None,
        }
    }

    /// The network address (host bits zero).
    pub const fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub const fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = Self::mask(self.prefix_len).unwrap_or(u32::MAX);
        u32::from(addr) & mask == u32::from(self.addr)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = InvalidCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidCidr(s.to_owned());
        let (addr, prefix_len) = s.split_once('/').ok_or_else(invalid)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| invalid())?;
        // Digits only: `u8::from_str` would also take a leading `+`.
        if prefix_len.is_empty() || !prefix_len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let prefix_len: u8 = prefix_len.parse().map_err(|_| invalid())?;
        Self::new(addr, prefix_len).ok_or_else(invalid)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Which clients may open connections through a service port's
/// load-balancer frontends (`loadBalancerSourceRanges`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SourceRanges {
    /// Every client (no ranges given).
    #[default]
    Any,
    /// Only clients in these ranges. Empty: nobody, which is what a
    /// Service whose ranges could not all be parsed gets (fail closed).
    Only(BTreeSet<Ipv4Cidr>),
}

impl SourceRanges {
    /// Whether the load-balancer frontends check the client
    /// (`SERVICE_F_SOURCE_RANGES`).
    pub const fn is_restricted(&self) -> bool {
        matches!(self, SourceRanges::Only(_))
    }

    /// The allowed ranges; none when unrestricted.
    pub fn ranges(&self) -> impl Iterator<Item = &Ipv4Cidr> {
        match self {
            SourceRanges::Any => None,
            SourceRanges::Only(ranges) => Some(ranges),
        }
        .into_iter()
        .flatten()
    }

    pub fn admits(&self, client: Ipv4Addr) -> bool {
        match self {
            SourceRanges::Any => true,
            SourceRanges::Only(ranges) => ranges.iter().any(|range| range.contains(client)),
        }
    }
}

/// Which endpoints of a Service port a service port (one backend set, one
/// service id) holds, as kube-proxy separates them by traffic policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Traffic {
    /// The `internalTrafficPolicy` view: the ClusterIP frontends, and the
    /// external ones too when `externalTrafficPolicy` selects the same
    /// endpoints (both Cluster, or both Local), so they share one id.
    #[default]
    Internal,
    /// The `externalTrafficPolicy` view, when it differs from the
    /// internal one: the external frontends only, with their own id
    /// (slots, Maglev table, affinity).
    External,
}

/// The stable identity of one port of one Service: namespace, name, port
/// name and protocol, as kube-proxy's `ServicePortName`, and which
/// traffic policy's endpoints it holds. The datapath's service id follows
/// this identity for as long as it exists.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name`; empty for the single unnamed port.
    pub port_name: String,
    pub proto: Protocol,
    pub traffic: Traffic,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.proto)?;
        if self.traffic == Traffic::External {
            f.write_str(" (external traffic)")?;
        }
        Ok(())
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
    pub frontends: Frontends,
    pub backends: BTreeMap<SocketAddrV4, Readiness>,
    /// Backend addresses whose endpoint runs on this node
    /// (`BACKEND_F_LOCAL`; a property of the address, whatever the port).
    pub local_addresses: BTreeSet<Ipv4Addr>,
    /// Clients admitted through the load-balancer frontends.
    pub source_ranges: SourceRanges,
    /// `sessionAffinity: ClientIP`: its timeout in seconds (1..=86400).
    pub affinity_timeout: Option<u32>,
    /// Backend selection the Service asks for; `None`: the agent's default.
    pub selection: Option<Selection>,
    /// With no ready backend, drop new connections rather than refuse them
    /// (`internalTrafficPolicy: Local`, as kube-proxy does).
    pub drop_without_backend: bool,
    /// On the [`Traffic::External`] port of a Service whose traffic
    /// policies differ: the ClusterIP frontend of its internal port. A pod
    /// reaching one of the external frontends is balanced over that
    /// frontend's backends instead (kube-proxy sends pod traffic to the
    /// external addresses of an `externalTrafficPolicy: Local` Service to
    /// every endpoint), so the entry of each external frontend names it.
    pub internal_view: Option<Frontend>,
}

impl ServicePort {
    pub fn ready_backends(&self) -> impl Iterator<Item = SocketAddrV4> + '_ {
        self.backends
            .iter()
            .filter(|(_, readiness)| readiness.is_ready())
            .map(|(addr, _)| *addr)
    }

    /// Whether the backend address runs on this node.
    pub fn is_local(&self, backend: &SocketAddrV4) -> bool {
        self.local_addresses.contains(backend.ip())
    }

    /// The `SERVICE_F_*` bits a frontend of this kind gets beyond those of
    /// the service port (its selection and drop behaviour).
    pub fn frontend_flags(&self, kind: FrontendKind) -> u16 {
        let mut flags = 0;
        if kind.is_external() {
            flags |= lb_common::service::SERVICE_F_EXTERNAL;
        }
        if kind == FrontendKind::LoadBalancer && self.source_ranges.is_restricted() {
            flags |= lb_common::service::SERVICE_F_SOURCE_RANGES;
        }
        flags
    }
}

/// A `healthCheckNodePort` to serve: the Service and how many of its
/// endpoints on this node are ready.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Endpoint addresses on this node with `conditions.ready` over every
    /// port of the Service, as kube-proxy counts them (terminating
    /// endpoints are never ready, even when they take connections for
    /// lack of ready ones). 0 answers 503, so load balancers drain the
    /// node.
    pub local_endpoints: usize,
}

/// Two Services claim the same `healthCheckNodePort`; the first in
/// object order keeps it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("healthCheckNodePort {port} is already the health check of {owner_namespace}/{owner_name}")]
pub struct HealthCheckConflict {
    pub port: u16,
    pub owner_namespace: String,
    pub owner_name: String,
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
    health_checks: BTreeMap<u16, HealthCheck>,
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
        entry.internal_view = port.internal_view;
        entry.source_ranges = port.source_ranges;
        entry.local_addresses.extend(port.local_addresses);
        for (frontend, kind) in port.frontends {
            match self.owners.get(&frontend) {
                Some(owner) if *owner != name => conflicts.push(FrontendConflict {
                    frontend,
                    owner: owner.clone(),
                    rejected: name.clone(),
                }),
                _ => {
                    self.owners.insert(frontend, name.clone());
                    entry.frontends.insert(frontend, kind);
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

    /// Adds the health check served on `port`, unless another Service has
    /// that port already.
    pub fn insert_health_check(
        &mut self,
        port: u16,
        check: HealthCheck,
    ) -> Result<(), HealthCheckConflict> {
        match self.health_checks.get(&port) {
            Some(owner) if (&owner.namespace, &owner.name) != (&check.namespace, &check.name) => {
                Err(HealthCheckConflict {
                    port,
                    owner_namespace: owner.namespace.clone(),
                    owner_name: owner.name.clone(),
                })
            }
            _ => {
                self.health_checks.insert(port, check);
                Ok(())
            }
        }
    }

    /// The `healthCheckNodePort`s to serve (Services of type LoadBalancer
    /// with `externalTrafficPolicy: Local`), by port.
    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        &self.health_checks
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
            traffic: Traffic::Internal,
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
                frontends: Frontends::new(),
                backends: [(addr, Readiness::NotReady)].into(),
                ..ServicePort::default()
            },
        );
        state.insert(
            name("a", ""),
            ServicePort {
                frontends: Frontends::new(),
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

    #[test]
    fn cidrs_parse_like_go() {
        let cases = [
            ("198.18.254.0/24", Some("198.18.254.0/24")),
            // Host bits are cleared, as net.ParseCIDR's network.
            ("198.18.254.77/24", Some("198.18.254.0/24")),
            ("0.0.0.0/0", Some("0.0.0.0/0")),
            ("198.18.254.1/32", Some("198.18.254.1/32")),
            ("198.18.254.1", None),
            ("198.18.254.1/33", None),
            ("198.18.254.1/", None),
            ("198.18.254.1/+8", None),
            ("198.18.254/24", None),
            ("2001:db8::/32", None),
            ("", None),
        ];
        for (input, expected) in cases {
            let parsed = input.parse::<Ipv4Cidr>().ok().map(|c| c.to_string());
            assert_eq!(parsed.as_deref(), expected, "{input}");
        }
        let range: Ipv4Cidr = "198.18.254.0/24".parse().unwrap();
        assert!(range.contains(Ipv4Addr::new(198, 18, 254, 200)));
        assert!(!range.contains(Ipv4Addr::new(198, 18, 255, 1)));
        let everyone: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(everyone.contains(Ipv4Addr::new(203, 0, 113, 1)));
    }

    #[test]
    fn source_ranges_admit() {
        let client = Ipv4Addr::new(198, 18, 254, 100);
        assert!(SourceRanges::Any.admits(client));
        assert!(!SourceRanges::Only(BTreeSet::new()).admits(client));
        let ranges = SourceRanges::Only(["198.18.254.100/32".parse().unwrap()].into());
        assert!(ranges.admits(client));
        assert!(!ranges.admits(Ipv4Addr::new(198, 18, 254, 101)));
        assert!(ranges.is_restricted() && !SourceRanges::Any.is_restricted());
    }

    #[test]
    fn frontend_flags_by_kind() {
        use lb_common::service::{SERVICE_F_EXTERNAL, SERVICE_F_SOURCE_RANGES};
        let restricted = ServicePort {
            source_ranges: SourceRanges::Only(BTreeSet::new()),
            ..ServicePort::default()
        };
        let open = ServicePort::default();
        let cases = [
            (FrontendKind::ClusterIp, 0, 0),
            (
                FrontendKind::NodePort,
                SERVICE_F_EXTERNAL,
                SERVICE_F_EXTERNAL,
            ),
            (
                FrontendKind::ExternalIp,
                SERVICE_F_EXTERNAL,
                SERVICE_F_EXTERNAL,
            ),
            (
                FrontendKind::LoadBalancer,
                SERVICE_F_EXTERNAL,
                SERVICE_F_EXTERNAL | SERVICE_F_SOURCE_RANGES,
            ),
        ];
        for (kind, unrestricted_flags, restricted_flags) in cases {
            assert_eq!(open.frontend_flags(kind), unrestricted_flags, "{kind}");
            assert_eq!(restricted.frontend_flags(kind), restricted_flags, "{kind}");
        }
    }

    #[test]
    fn a_frontend_listed_twice_keeps_the_most_restrictive_kind() {
        let mut frontends = Frontends::from([(frontend(80), FrontendKind::ExternalIp)]);
        frontends.insert(frontend(80), FrontendKind::LoadBalancer);
        frontends.insert(frontend(80), FrontendKind::NodePort);
        assert_eq!(
            frontends.kind(&frontend(80)),
            Some(FrontendKind::LoadBalancer)
        );
        // Merging service ports of one name does the same.
        let mut state = DesiredState::new();
        for kind in [FrontendKind::LoadBalancer, FrontendKind::ExternalIp] {
            state.insert(
                name("a", ""),
                ServicePort {
                    frontends: [(frontend(80), kind)].into(),
                    ..ServicePort::default()
                },
            );
        }
        assert_eq!(
            state
                .service(&name("a", ""))
                .unwrap()
                .frontends
                .kind(&frontend(80)),
            Some(FrontendKind::LoadBalancer)
        );
    }

    #[test]
    fn a_health_check_port_has_one_owner() {
        let check = |name: &str, count| HealthCheck {
            namespace: "default".into(),
            name: name.into(),
            local_endpoints: count,
        };
        let mut state = DesiredState::new();
        assert_eq!(state.insert_health_check(32000, check("a", 1)), Ok(()));
        // The same Service again (another of its ports): replaced.
        assert_eq!(state.insert_health_check(32000, check("a", 2)), Ok(()));
        let conflict = state.insert_health_check(32000, check("b", 5)).unwrap_err();
        assert_eq!(conflict.owner_name, "a");
        assert_eq!(state.health_checks()[&32000], check("a", 2));
        assert_eq!(
            serde_json::to_value(&state.health_checks()[&32000]).unwrap(),
            serde_json::json!({"namespace": "default", "name": "a", "localEndpoints": 2})
        );
    }

    #[test]
    fn external_traffic_names_display_apart() {
        let internal = name("web", "http");
        let external = ServicePortName {
            traffic: Traffic::External,
            ..internal.clone()
        };
        assert_eq!(internal.to_string(), "default/web:http/tcp");
        assert_eq!(
            external.to_string(),
            "default/web:http/tcp (external traffic)"
        );
        assert!(internal < external);
    }
}

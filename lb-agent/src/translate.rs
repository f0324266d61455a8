//! Services and EndpointSlices -> [`DesiredState`], with kube-proxy's rules.
//!
//! The input is plain sets of `k8s-openapi` objects, whatever their origin
//! (a directory of manifests now, the Kubernetes API later), so every source
//! gets the same semantics:
//!
//! - One service port per entry of `spec.ports`; one frontend per IPv4
//!   address of `spec.clusterIPs` (or `spec.clusterIP`) and that port.
//! - Headless (`clusterIP: None`) and `ExternalName` Services are not
//!   proxied, nor is a Service (or EndpointSlice) labelled
//!   `service.kubernetes.io/service-proxy-name` (another proxy owns it), nor
//!   an EndpointSlice labelled `service.kubernetes.io/headless`: these are
//!   the label selectors kube-proxy watches with.
//! - TCP and UDP only; an SCTP port is skipped with a warning.
//! - EndpointSlices join their Service by namespace and the label
//!   `kubernetes.io/service-name`; only `addressType: IPv4` slices count;
//!   several slices of one Service are merged and endpoints deduplicated by
//!   address (ready if any copy is ready).
//! - A service port's backends come from the slice port with the same name
//!   and protocol: its number is the target port. That is how a named
//!   `targetPort` resolves, through the EndpointSlice's ports.
//! - Only an endpoint's first address is used (the API says addresses are
//!   fungible and consumers may use only the first; kube-proxy does).
//! - Ready means `conditions.ready` true or unset. A not-ready endpoint is
//!   still listed (its flows keep working) but gets no new connection.
//!   As kube-proxy does, when a service port has no ready endpoint at all,
//!   its serving-and-terminating endpoints take new connections instead.
//! - `internalTrafficPolicy: Local` keeps only the endpoints whose
//!   `nodeName` is this node ([`Scope::node_name`]) for new connections
//!   (the fallback above applies among them); the others stay listed as not
//!   ready, so flows already open to them keep working. With no local
//!   endpoint, new connections are dropped (kube-proxy's DROP), not
//!   refused.
//! - External frontends (kube-proxy's): for a Service of type NodePort or
//!   LoadBalancer, `(node address, ports[].nodePort)` for every address of
//!   [`Scope::node_addresses`]; for any type, `(spec.externalIPs[], port)`;
//!   for type LoadBalancer, `(status.loadBalancer.ingress[].ip, port)`
//!   (not for `ipMode: Proxy`, where the load balancer proxies to the
//!   node). They are scoped by `externalTrafficPolicy` as ClusterIP
//!   frontends are by `internalTrafficPolicy`: Local keeps only this
//!   node's endpoints and drops new connections when there is none. When
//!   both policies select the same endpoints (both Cluster, or both
//!   Local) the external frontends share the ClusterIP's service port;
//!   otherwise they get their own ([`Traffic::External`]), so every
//!   service id has one backend set.
//! - `spec.loadBalancerSourceRanges` (else the deprecated annotation
//!   [`ANNOTATION_SOURCE_RANGES`]) restricts the load-balancer frontends
//!   (not NodePorts, not external IPs, as kube-proxy does) to those client
//!   ranges. IPv6 ranges are ignored, as kube-proxy ignores ranges of the
//!   other family. A range that cannot be parsed fails closed: the
//!   load-balancer frontends then admit no client.
//! - A malformed external field (a nodePort out of 1-65535, a bad
//!   ingress or external IP, a bad CIDR) gives one warning naming the
//!   field; the rest of the Service is still translated.
//! - Endpoints whose `nodeName` is this node are local
//!   ([`ServicePort::local_addresses`], `BACKEND_F_LOCAL`).
//! - A Service of type LoadBalancer with `externalTrafficPolicy: Local` and
//!   a `healthCheckNodePort` gets a [`HealthCheck`] with the number of its
//!   ready endpoint addresses on this node, over all its ports
//!   ([`DesiredState::health_checks`]).
//!   Terminating endpoints are never counted, even when they take
//!   connections for lack of ready ones: kube-proxy fails the health check
//!   then, so load balancers drain the node (KEP-1669).
//! - With a [`Scope::service_proxy_name`], only objects labelled
//!   `service.kubernetes.io/service-proxy-name` with that value are proxied
//!   (and unlabelled ones are not), as a kube-proxy started with that
//!   label selector would.
//!
//! [`validate_service`] and [`validate_endpoint_slice`] reject objects that
//! make no sense (the checks the API server would have made for the fields
//! we use); a source uses them to keep the last good version of an object.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{
    DesiredState, Frontend, FrontendKind, Frontends, HealthCheck, Ipv4Cidr, Protocol, Readiness,
    Selection, ServicePort, ServicePortName, SourceRanges, Traffic,
};
use k8s_openapi::api::core::v1::ServiceSpec;
use lb_common::affinity::{DEFAULT_TIMEOUT_SECS, MAX_TIMEOUT_SECS};

/// Label joining an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label naming the proxy that owns a Service; kube-proxy skips such objects.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Service annotation choosing how new connections pick a backend:
/// `random` or `maglev`; without it, the agent's `--selection` applies.
pub const ANNOTATION_SELECTION: &str = "lb.dev/selection";
/// Deprecated Service annotation with comma-separated client ranges, read
/// when `spec.loadBalancerSourceRanges` is empty (as kube-proxy does).
pub const ANNOTATION_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Namespace of an object that names none (as `kubectl apply` assumes).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Who translates: the node the agent runs on and the proxy name it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// This node's name, for `internalTrafficPolicy: Local`.
    pub node_name: Option<String>,
    /// Serve only objects labelled `service.kubernetes.io/service-proxy-name`
    /// with this value; `None`: only objects without that label.
    pub service_proxy_name: Option<String>,
    /// This node's addresses: every NodePort is a frontend on each of them.
    pub node_addresses: Vec<Ipv4Addr>,
}

impl Scope {
    /// Why an object with these labels is not ours, if it is not.
    fn foreign_proxy(&self, meta: &ObjectMeta) -> Option<String> {
        match (
            label(meta, LABEL_SERVICE_PROXY_NAME),
            &self.service_proxy_name,
        ) {
            (None, None) => None,
            (Some(theirs), Some(ours)) if theirs == ours => None,
            (Some(theirs), _) => Some(format!("labelled {LABEL_SERVICE_PROXY_NAME}={theirs}")),
            (None, Some(ours)) => Some(format!(
                "not labelled {LABEL_SERVICE_PROXY_NAME}={ours} (--service-proxy-name)"
            )),
        }
    }
}

/// The kinds of object the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        })
    }
}

/// An object's identity: kind, namespace and name. Displays as
/// `Service default/web`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: Kind, meta: &ObjectMeta) -> Self {
        Self {
            kind,
            namespace: namespace_of(meta).to_owned(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    pub fn of_service(service: &Service) -> Self {
        Self::new(Kind::Service, &service.metadata)
    }

    pub fn of_slice(slice: &EndpointSlice) -> Self {
        Self::new(Kind::EndpointSlice, &slice.metadata)
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() {
            "<unnamed>"
        } else {
            &self.name
        };
        write!(f, "{} {}/{}", self.kind, self.namespace, name)
    }
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|namespace| !namespace.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// A field of an object that makes no sense.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {message}")]
pub struct InvalidField {
    /// Path of the field, as in `kubectl explain`: `spec.ports[0].port`.
    pub field: String,
    pub message: String,
}

impl InvalidField {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses a Service or EndpointSlice protocol (`TCP` when unset). `None`
/// for an unknown protocol; `Some(None)` for SCTP, valid but not proxied.
fn parse_protocol(protocol: Option<&str>) -> Option<Option<Protocol>> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Some(Protocol::Tcp)),
        "UDP" => Some(Some(Protocol::Udp)),
        "SCTP" => Some(None),
        _ => None,
    }
}

fn check_port(field: String, port: i32) -> Result<u16, InvalidField> {
    u16::try_from(port)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| InvalidField::new(field, format!("{port} is not a valid port (1-65535)")))
}

fn check_name(meta: &ObjectMeta) -> Result<(), InvalidField> {
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => Ok(()),
        _ => Err(InvalidField::new("metadata.name", "missing")),
    }
}

fn check_protocol(field: String, protocol: Option<&str>) -> Result<(), InvalidField> {
    parse_protocol(protocol).map(|_| ()).ok_or_else(|| {
        InvalidField::new(
            field,
            format!("{:?} is not TCP, UDP or SCTP", protocol.unwrap_or_default()),
        )
    })
}

/// Checks the fields of a Service this agent uses.
pub fn validate_service(service: &Service) -> Result<(), InvalidField> {
    check_name(&service.metadata)?;
    let Some(spec) = &service.spec else {
        return Err(InvalidField::new("spec", "missing"));
    };
    match spec.type_.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        // Nothing else of an ExternalName Service matters here.
        Some("ExternalName") => return Ok(()),
        Some(other) => {
            return Err(InvalidField::new(
                "spec.type",
                format!("{other:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"),
            ));
        }
    }
    let check_ip = |field: String, ip: &str| -> Result<(), InvalidField> {
        if ip == "None" || ip.parse::<IpAddr>().is_ok() {
            Ok(())
        } else {
            Err(InvalidField::new(
                field,
                format!("{ip:?} is not an IP address (nor \"None\")"),
            ))
        }
    };
    if let Some(cluster_ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty()) {
        check_ip("spec.clusterIP".into(), cluster_ip)?;
    }
    let cluster_ips = spec.cluster_ips.as_deref().unwrap_or_default();
    for (i, ip) in cluster_ips.iter().enumerate() {
        check_ip(format!("spec.clusterIPs[{i}]"), ip)?;
    }
    if let (Some(first), Some(cluster_ip)) = (
        cluster_ips.first(),
        spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty()),
    ) && first != cluster_ip
    {
        return Err(InvalidField::new(
            "spec.clusterIPs[0]",
            format!("{first:?} differs from spec.clusterIP {cluster_ip:?}"),
        ));
    }
    match spec.session_affinity.as_deref() {
        None | Some("None" | "ClientIP") => {}
        Some(other) => {
            return Err(InvalidField::new(
                "spec.sessionAffinity",
                format!("{other:?} is not None or ClientIP"),
            ));
        }
    }
    if let Some(timeout) = affinity_timeout_field(spec)
        && !(1..=i64::from(MAX_TIMEOUT_SECS)).contains(&i64::from(timeout))
    {
        return Err(InvalidField::new(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            format!("{timeout} is not in 1..={MAX_TIMEOUT_SECS}"),
        ));
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let number = check_port(format!("spec.ports[{i}].port"), port.port)?;
        check_protocol(
            format!("spec.ports[{i}].protocol"),
            port.protocol.as_deref(),
        )?;
        let name = port.name.as_deref().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            return Err(InvalidField::new(
                format!("spec.ports[{i}].name"),
                "required when a Service has more than one port",
            ));
        }
        if !names.insert(name) {
            return Err(InvalidField::new(
                format!("spec.ports[{i}].name"),
                format!("duplicate port name {name:?}"),
            ));
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !numbers.insert((number, protocol)) {
            return Err(InvalidField::new(
                format!("spec.ports[{i}].port"),
                format!("duplicate port {number}/{protocol}"),
            ));
        }
        match &port.target_port {
            Some(IntOrString::Int(target)) => {
                check_port(format!("spec.ports[{i}].targetPort"), *target)?;
            }
            Some(IntOrString::String(target)) if target.is_empty() => {
                return Err(InvalidField::new(
                    format!("spec.ports[{i}].targetPort"),
                    "empty port name",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks the fields of an EndpointSlice this agent uses.
pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Result<(), InvalidField> {
    check_name(&slice.metadata)?;
    let address_type = slice.address_type.as_str();
    if !matches!(address_type, "IPv4" | "IPv6" | "FQDN") {
        return Err(InvalidField::new(
            "addressType",
            format!("{address_type:?} is not IPv4, IPv6 or FQDN"),
        ));
    }
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(number) = port.port {
            check_port(format!("ports[{i}].port"), number)?;
        }
        check_protocol(format!("ports[{i}].protocol"), port.protocol.as_deref())?;
    }
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        if endpoint.addresses.is_empty() {
            return Err(InvalidField::new(
                format!("endpoints[{i}].addresses"),
                "must list at least one address",
            ));
        }
        for (j, address) in endpoint.addresses.iter().enumerate() {
            let valid = match address_type {
                "IPv4" => address.parse::<Ipv4Addr>().is_ok(),
                "IPv6" => address.parse::<Ipv6Addr>().is_ok(),
                _ => !address.is_empty(),
            };
            if !valid {
                return Err(InvalidField::new(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{address:?} is not a valid {address_type} address"),
                ));
            }
        }
    }
    Ok(())
}

/// How much a [`Notice`] matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NoticeLevel {
    /// Expected and harmless (a headless Service, an IPv6 slice).
    Debug,
    /// Probably a mistake in the input; the rest is still translated.
    Warn,
}

/// Something translation skipped, and why. Translation is repeated on
/// every change, so the caller logs a notice once, when it first appears.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Notice {
    pub level: NoticeLevel,
    pub object: ObjectRef,
    pub message: String,
}

/// The result of [`translate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    pub notices: Vec<Notice>,
}

/// Translates sets of Services and EndpointSlices into the desired state,
/// for an agent with the default [`Scope`] (no node name, no proxy name).
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Translation {
    translate_in(&Scope::default(), services, slices)
}

/// Translates sets of Services and EndpointSlices into the desired state of
/// the agent `scope` describes. Deterministic: the order of the input does
/// not matter. An object that fails validation is skipped with a warning
/// notice.
pub fn translate_in<'a>(
    scope: &Scope,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Translation {
    let mut translation = Translation::default();
    let notices = &mut translation.notices;
    let mut notice = |level, object: ObjectRef, message: String| {
        notices.push(Notice {
            level,
            object,
            message,
        })
    };

    // Slices by (namespace, service name), each list in slice-name order.
    let mut slices_by_service: BTreeMap<(String, String), BTreeMap<String, &EndpointSlice>> =
        BTreeMap::new();
    for slice in slices {
        let object = ObjectRef::of_slice(slice);
        if let Err(error) = validate_endpoint_slice(slice) {
            notice(NoticeLevel::Warn, object, format!("ignored: {error}"));
            continue;
        }
        if let Some(reason) = scope.foreign_proxy(&slice.metadata) {
            notice(NoticeLevel::Debug, object, format!("ignored: {reason}"));
            continue;
        }
        if label(&slice.metadata, LABEL_HEADLESS).is_some() {
            notice(
                NoticeLevel::Debug,
                object,
                format!("ignored: labelled {LABEL_HEADLESS}"),
            );
            continue;
        }
        if slice.address_type != "IPv4" {
            notice(
                NoticeLevel::Debug,
                object,
                format!("ignored: addressType {}", slice.address_type),
            );
            continue;
        }
        let Some(service_name) = label(&slice.metadata, LABEL_SERVICE_NAME) else {
            notice(
                NoticeLevel::Warn,
                object,
                format!("ignored: no {LABEL_SERVICE_NAME} label joins it to a Service"),
            );
            continue;
        };
        let by_name = slices_by_service
            .entry((object.namespace.clone(), service_name.to_owned()))
            .or_default();
        if by_name.insert(object.name.clone(), slice).is_some() {
            notice(
                NoticeLevel::Warn,
                object,
                "defined twice; the last one is used".into(),
            );
        }
    }

    let mut services_by_name: BTreeMap<ObjectRef, &Service> = BTreeMap::new();
    for service in services {
        let object = ObjectRef::of_service(service);
        if let Err(error) = validate_service(service) {
            notice(NoticeLevel::Warn, object, format!("ignored: {error}"));
            continue;
        }
        if services_by_name.insert(object.clone(), service).is_some() {
            notice(
                NoticeLevel::Warn,
                object,
                "defined twice; the last one is used".into(),
            );
        }
    }

    for (object, service) in services_by_name {
        let key = (object.namespace.clone(), object.name.clone());
        let slices = slices_by_service
            .get(&key)
            .map(|by_name| by_name.values().copied().collect::<Vec<_>>())
            .unwrap_or_default();
        translate_service(
            scope,
            &object,
            service,
            &slices,
            &mut translation.state,
            &mut notice,
        );
    }
    translation.notices.sort();
    translation.notices.dedup();
    translation
}

fn translate_service(
    scope: &Scope,
    object: &ObjectRef,
    service: &Service,
    slices: &[&EndpointSlice],
    state: &mut DesiredState,
    notice: &mut impl FnMut(NoticeLevel, ObjectRef, String),
) {
    let Some(spec) = &service.spec else {
        return;
    };
    if let Some(reason) = scope.foreign_proxy(&service.metadata) {
        notice(
            NoticeLevel::Debug,
            object.clone(),
            format!("not proxied: {reason}"),
        );
        return;
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        notice(
            NoticeLevel::Debug,
            object.clone(),
            "not proxied: type ExternalName".into(),
        );
        return;
    }
    let cluster_ips: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty())
            .into_iter()
            .collect(),
    };
    if cluster_ips.contains(&"None") {
        notice(
            NoticeLevel::Debug,
            object.clone(),
            "not proxied: headless (clusterIP None)".into(),
        );
        return;
    }
    if cluster_ips.is_empty() {
        notice(
            NoticeLevel::Warn,
            object.clone(),
            "not proxied: no spec.clusterIP (the API server allocates one; a manifest must set it)"
                .into(),
        );
        return;
    }
    let addrs: Vec<Ipv4Addr> = cluster_ips
        .iter()
        .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
        .collect();
    if addrs.is_empty() {
        notice(
            NoticeLevel::Debug,
            object.clone(),
            "not proxied: no IPv4 cluster IP".into(),
        );
        return;
    }

    let node = scope.node_name.as_deref();
    let mut locality_of = |policy: Option<&str>, field: &str| match policy {
        Some("Local") => {
            if node.is_none() {
                notice(
                    NoticeLevel::Warn,
                    object.clone(),
                    format!(
                        "{field} Local without a node name (--node-name): \
                         no endpoint is local, new connections are dropped"
                    ),
                );
            }
            Locality::Node(node)
        }
        _ => Locality::Cluster,
    };
    let internal_locality = locality_of(
        spec.internal_traffic_policy.as_deref(),
        "internalTrafficPolicy",
    );
    let external_locality = locality_of(
        spec.external_traffic_policy.as_deref(),
        "externalTrafficPolicy",
    );
    let affinity_timeout = affinity_timeout(spec);
    let selection = match selection(&service.metadata) {
        Ok(selection) => selection,
        Err(message) => {
            notice(NoticeLevel::Warn, object.clone(), message);
            None
        }
    };
    let is_type = |name: &str| spec.type_.as_deref() == Some(name);
    let has_node_ports = is_type("NodePort") || is_type("LoadBalancer");
    let mut warn = |message: String| notice(NoticeLevel::Warn, object.clone(), message);
    // Addresses every port of the Service is reachable on from outside.
    let mut external_addrs: BTreeMap<Ipv4Addr, FrontendKind> = BTreeMap::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if let Some(addr) = external_ip(ip, &format!("spec.externalIPs[{i}]"), &mut warn) {
            external_addrs.insert(addr, FrontendKind::ExternalIp);
        }
    }
    if is_type("LoadBalancer") {
        for (addr, kind) in load_balancer_ips(service, &mut warn) {
            // The most restrictive kind wins (see `FrontendKind`).
            let merged = external_addrs.entry(addr).or_insert(kind);
            *merged = (*merged).max(kind);
        }
    }
    let source_ranges = source_ranges(service, &mut warn);
    let local_addresses = local_addresses(slices, node);

    // Addresses, not address and port: a pod serving two ports is one
    // endpoint (kube-proxy squashes them by IP too).
    let mut ready_local_endpoints: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let Some(Some(proto)) = parse_protocol(port.protocol.as_deref()) else {
            notice(
                NoticeLevel::Warn,
                object.clone(),
                format!("spec.ports[{i}]: SCTP is not supported; port skipped"),
            );
            continue;
        };
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        let port_name = port.name.clone().unwrap_or_default();
        let frontend = |addr| Frontend {
            addr,
            port: number,
            proto,
        };
        let mut frontends: Frontends = addrs
            .iter()
            .map(|&addr| (frontend(addr), FrontendKind::ClusterIp))
            .collect();
        let mut external: Frontends = external_addrs
            .iter()
            .map(|(&addr, &kind)| (frontend(addr), kind))
            .collect();
        if has_node_ports {
            match port.node_port {
                Some(node_port) => match check_port(format!("spec.ports[{i}].nodePort"), node_port)
                {
                    Ok(node_port) => {
                        for &addr in &scope.node_addresses {
                            let frontend = Frontend {
                                addr,
                                port: node_port,
                                proto,
                            };
                            external.insert(frontend, FrontendKind::NodePort);
                        }
                    }
                    Err(error) => notice(
                        NoticeLevel::Warn,
                        object.clone(),
                        format!("{error}; no NodePort frontend for this port"),
                    ),
                },
                // Allocated by the API server; a manifest must set it.
                None if spec.allocate_load_balancer_node_ports != Some(false)
                    || is_type("NodePort") =>
                {
                    notice(
                        NoticeLevel::Warn,
                        object.clone(),
                        format!(
                            "spec.ports[{i}].nodePort: missing (the API server allocates one; \
                             a manifest must set it); no NodePort frontend for this port"
                        ),
                    );
                }
                None => {}
            }
        }

        let endpoints = endpoints_of(&port_name, proto, slices);
        ready_local_endpoints.extend(
            endpoints
                .by_addr
                .iter()
                .filter(|(_, copies)| EndpointView { copies }.admitted(Locality::Node(node)).ready)
                .map(|(addr, _)| *addr.ip()),
        );
        let internal_backends = readiness(&endpoints, internal_locality);
        let local_addresses: BTreeSet<Ipv4Addr> = internal_backends
            .keys()
            .map(|addr| *addr.ip())
            .filter(|ip| local_addresses.contains(ip))
            .collect();
        let name = |traffic| ServicePortName {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            port_name: port_name.clone(),
            proto,
            traffic,
        };
        let port_of = |frontends: Frontends, backends, locality, internal_view| {
            let has_load_balancer = frontends.any_of(FrontendKind::LoadBalancer);
            ServicePort {
                frontends,
                backends,
                local_addresses: local_addresses.clone(),
                // Only load-balancer frontends check the client.
                source_ranges: if has_load_balancer {
                    source_ranges.clone()
                } else {
                    SourceRanges::Any
                },
                affinity_timeout,
                selection,
                drop_without_backend: matches!(locality, Locality::Node(_)),
                internal_view,
            }
        };
        // One backend set per service id: the external frontends join the
        // ClusterIP's service port when both policies agree.
        let external_port =
            if external.is_empty() || internal_locality.same_endpoints(external_locality) {
                frontends.extend(external);
                None
            } else {
                let backends = readiness(&endpoints, external_locality);
                let cluster_ip = frontends
                    .iter()
                    .find(|(_, kind)| *kind == FrontendKind::ClusterIp)
                    .map(|(frontend, _)| *frontend);
                Some((
                    name(Traffic::External),
                    port_of(external, backends, external_locality, cluster_ip),
                ))
            };
        let internal_port = (
            name(Traffic::Internal),
            port_of(frontends, internal_backends, internal_locality, None),
        );
        let ports = [internal_port].into_iter().chain(external_port);
        for (name, port) in ports {
            for conflict in state.insert(name, port) {
                notice(NoticeLevel::Warn, object.clone(), conflict.to_string());
            }
        }
    }

    if is_type("LoadBalancer") && matches!(external_locality, Locality::Node(_)) {
        match spec.health_check_node_port {
            Some(port) => match check_port("spec.healthCheckNodePort".into(), port) {
                Ok(port) => {
                    let check = HealthCheck {
                        namespace: object.namespace.clone(),
                        name: object.name.clone(),
                        local_endpoints: ready_local_endpoints.len(),
                    };
                    if let Err(conflict) = state.insert_health_check(port, check) {
                        notice(NoticeLevel::Warn, object.clone(), conflict.to_string());
                    }
                }
                Err(error) => notice(
                    NoticeLevel::Warn,
                    object.clone(),
                    format!("{error}; no health check served"),
                ),
            },
            None => notice(
                NoticeLevel::Warn,
                object.clone(),
                "spec.healthCheckNodePort: missing (the API server allocates one; \
                 a manifest must set it); no health check served"
                    .into(),
            ),
        }
    }
}

/// An IPv4 address of an external field; `None` for an IPv6 one (not
/// proxied) or, with a warning naming `field`, a malformed one.
fn external_ip(ip: &str, field: &str, warn: &mut impl FnMut(String)) -> Option<Ipv4Addr> {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(addr)) => Some(addr),
        Ok(IpAddr::V6(_)) => None,
        Err(_) => {
            warn(format!("{field}: {ip:?} is not an IP address; ignored"));
            None
        }
    }
}

/// The load-balancer ingress IPs of a Service of type LoadBalancer.
fn load_balancer_ips(
    service: &Service,
    warn: &mut impl FnMut(String),
) -> Vec<(Ipv4Addr, FrontendKind)> {
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_deref())
        .unwrap_or_default();
    ingress
        .iter()
        .enumerate()
        // `ipMode: Proxy`: the load balancer proxies to the node's
        // NodePort, so kube-proxy does not take the address over.
        .filter(|(_, ingress)| ingress.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|(i, ingress)| {
            let field = format!("status.loadBalancer.ingress[{i}].ip");
            let addr = external_ip(ingress.ip.as_deref()?, &field, warn)?;
            Some((addr, FrontendKind::LoadBalancer))
        })
        .collect()
}

/// The client ranges of a Service's load-balancer frontends: the field,
/// else the deprecated annotation; IPv6 ranges are skipped. A range that
/// does not parse is warned about and leaves nobody admitted.
fn source_ranges(service: &Service, warn: &mut impl FnMut(String)) -> SourceRanges {
    let field = service
        .spec
        .as_ref()
        .and_then(|spec| spec.load_balancer_source_ranges.as_deref())
        .unwrap_or_default();
    let (ranges, describe): (Vec<&str>, Box<dyn Fn(usize) -> String>) = if !field.is_empty() {
        (
            field.iter().map(String::as_str).collect(),
            Box::new(|i| format!("spec.loadBalancerSourceRanges[{i}]")),
        )
    } else {
        let annotation = service
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(ANNOTATION_SOURCE_RANGES))
            .map(|value| value.trim())
            .unwrap_or_default();
        if annotation.is_empty() {
            return SourceRanges::Any;
        }
        (
            annotation.split(',').collect(),
            Box::new(|i| format!("annotation {ANNOTATION_SOURCE_RANGES} (entry {i})")),
        )
    };
    let mut allowed = BTreeSet::new();
    let mut invalid = Vec::new();
    for (i, range) in ranges.iter().enumerate() {
        let range = range.trim();
        match range.parse::<Ipv4Cidr>() {
            Ok(cidr) => {
                allowed.insert(cidr);
            }
            // Another family's range: kube-proxy applies it to that family.
            Err(_) if is_ipv6_cidr(range) => {}
            Err(error) => invalid.push(format!("{}: {error}", describe(i))),
        }
    }
    if !invalid.is_empty() {
        warn(format!(
            "{}; the load-balancer frontends admit no client until it is fixed",
            invalid.join("; ")
        ));
        return SourceRanges::Only(BTreeSet::new());
    }
    if allowed.is_empty() {
        // Only IPv6 ranges: no IPv4 restriction, as kube-proxy.
        return SourceRanges::Any;
    }
    SourceRanges::Only(allowed)
}

fn is_ipv6_cidr(range: &str) -> bool {
    range.split_once('/').is_some_and(|(addr, len)| {
        addr.parse::<Ipv6Addr>().is_ok() && len.parse::<u8>().is_ok_and(|len| len <= 128)
    })
}

/// The IPv4 endpoint addresses of a Service's slices on `node`.
fn local_addresses(slices: &[&EndpointSlice], node: Option<&str>) -> BTreeSet<Ipv4Addr> {
    let Some(node) = node else {
        return BTreeSet::new();
    };
    slices
        .iter()
        .flat_map(|slice| &slice.endpoints)
        .filter(|endpoint| endpoint.node_name.as_deref() == Some(node))
        .filter_map(|endpoint| endpoint.addresses.first()?.parse::<Ipv4Addr>().ok())
        .collect()
}

/// Which endpoints may take new connections (a traffic policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Locality<'a> {
    /// Every endpoint.
    Cluster,
    /// Only endpoints on this node (none when the node name is unknown).
    Node(Option<&'a str>),
}

impl Locality<'_> {
    /// Whether an endpoint on `node` takes new connections.
    fn admits(self, node: Option<&str>) -> bool {
        match self {
            Locality::Cluster => true,
            Locality::Node(this) => this.is_some() && node == this,
        }
    }

    /// Both select the same endpoints, so they can share a service id.
    fn same_endpoints(self, other: Self) -> bool {
        self == other
    }
}

/// `sessionAffinityConfig.clientIP.timeoutSeconds` as written, if it is.
fn affinity_timeout_field(spec: &ServiceSpec) -> Option<i32> {
    spec.session_affinity_config
        .as_ref()?
        .client_ip
        .as_ref()?
        .timeout_seconds
}

/// The ClientIP affinity timeout of a (validated) Service, if it has
/// `sessionAffinity: ClientIP`; the API server's default when unset.
fn affinity_timeout(spec: &ServiceSpec) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let timeout = affinity_timeout_field(spec)
        .and_then(|secs| u32::try_from(secs).ok())
        .unwrap_or(DEFAULT_TIMEOUT_SECS);
    Some(timeout.clamp(1, MAX_TIMEOUT_SECS))
}

/// The selection the Service's [`ANNOTATION_SELECTION`] asks for.
fn selection(meta: &ObjectMeta) -> Result<Option<Selection>, String> {
    let Some(value) = meta
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(ANNOTATION_SELECTION))
    else {
        return Ok(None);
    };
    match value.as_str() {
        "random" => Ok(Some(Selection::Random)),
        "maglev" => Ok(Some(Selection::Maglev)),
        other => Err(format!(
            "annotation {ANNOTATION_SELECTION}: {other:?} is not random or maglev; the agent's default applies"
        )),
    }
}

/// Conditions of one endpoint address, merged over its copies.
#[derive(Clone, Copy, Default)]
struct Conditions {
    ready: bool,
    serving_terminating: bool,
}

impl Conditions {
    fn of(endpoint: &Endpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        Self {
            ready,
            serving_terminating: serving && terminating,
        }
    }
}

/// Endpoints of one service port, with the node of each copy.
struct Endpoints<'a> {
    by_addr: BTreeMap<SocketAddrV4, Vec<(Option<&'a str>, Conditions)>>,
}

/// One endpoint address's copies.
struct EndpointView<'e, 'a> {
    copies: &'e [(Option<&'a str>, Conditions)],
}

impl EndpointView<'_, '_> {
    /// Its conditions over the copies a locality admits.
    fn admitted(&self, locality: Locality) -> Conditions {
        let mut merged = Conditions::default();
        for (node, conditions) in self.copies {
            if locality.admits(*node) {
                merged.ready |= conditions.ready;
                merged.serving_terminating |= conditions.serving_terminating;
            }
        }
        merged
    }
}

/// The endpoints of the service port `port_name`/`proto` from its slices.
fn endpoints_of<'a>(
    port_name: &str,
    proto: Protocol,
    slices: &[&'a EndpointSlice],
) -> Endpoints<'a> {
    let mut by_addr: BTreeMap<SocketAddrV4, Vec<(Option<&'a str>, Conditions)>> = BTreeMap::new();
    for slice in slices {
        // The slice port of the same name and protocol gives the target
        // port; a slice without one has no endpoint for this service port.
        let target_port = slice.ports.iter().flatten().find_map(|port| {
            let same_name = port.name.as_deref().unwrap_or_default() == port_name;
            let same_proto = parse_protocol(port.protocol.as_deref()) == Some(Some(proto));
            (same_name && same_proto)
                .then_some(port.port)
                .flatten()
                .and_then(|number| u16::try_from(number).ok())
                .filter(|number| *number != 0)
        });
        let Some(target_port) = target_port else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(addr) = endpoint
                .addresses
                .first()
                .and_then(|address| address.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            by_addr
                .entry(SocketAddrV4::new(addr, target_port))
                .or_default()
                .push((endpoint.node_name.as_deref(), Conditions::of(endpoint)));
        }
    }
    Endpoints { by_addr }
}

/// The backends a locality gives a service port: every endpoint listed,
/// ready if the locality admits a ready copy of it. As kube-proxy, when
/// none is ready, the admitted serving terminating endpoints take new
/// connections rather than refusing them. An endpoint the locality
/// excludes stays listed, not ready, so flows open to it keep working.
fn readiness(endpoints: &Endpoints, locality: Locality) -> BTreeMap<SocketAddrV4, Readiness> {
    let admitted: Vec<(SocketAddrV4, Conditions)> = endpoints
        .by_addr
        .iter()
        .map(|(addr, copies)| (*addr, EndpointView { copies }.admitted(locality)))
        .collect();
    let any_ready = admitted.iter().any(|(_, c)| c.ready);
    admitted
        .into_iter()
        .map(|(addr, c)| {
            let ready = c.ready || (!any_ready && c.serving_terminating);
            let readiness = if ready {
                Readiness::Ready
            } else {
                Readiness::NotReady
            };
            (addr, readiness)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn name(service: &str, port: &str, proto: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: "default".into(),
            name: service.into(),
            port_name: port.into(),
            proto,
            traffic: Traffic::Internal,
        }
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 198.18.100.10
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

    const WEB_SLICE_A: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [198.18.0.10]
- addresses: [198.18.0.11]
  conditions: {ready: false}
"#;

    const WEB_SLICE_B: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080}
endpoints:
- addresses: [198.18.0.12]
  conditions: {ready: true}
- addresses: [198.18.0.10]
  conditions: {ready: false}
"#;

    #[test]
    fn multi_port_service_with_named_target_port_and_several_slices() {
        let services = [service(WEB)];
        let slices = [slice(WEB_SLICE_A), slice(WEB_SLICE_B)];
        let translation = translate(&services, &slices);
        assert!(translation.notices.is_empty(), "{:?}", translation.notices);
        let state = translation.state;
        assert_eq!(state.services().len(), 2);

        let http = state.service(&name("web", "http", Protocol::Tcp)).unwrap();
        assert_eq!(
            http.frontends.keys().copied().collect::<Vec<_>>(),
            [Frontend {
                addr: Ipv4Addr::new(198, 18, 100, 10),
                port: 80,
                proto: Protocol::Tcp
            }]
        );
        // The named targetPort "web" resolves through the slice port named
        // like the service port: 8080. 198.18.0.10 is in both slices, ready
        // in one: listed once, ready.
        assert_eq!(
            http.backends,
            BTreeMap::from([
                (addr("198.18.0.10:8080"), Readiness::Ready),
                (addr("198.18.0.11:8080"), Readiness::NotReady),
                (addr("198.18.0.12:8080"), Readiness::Ready),
            ])
        );

        let dns = state.service(&name("web", "dns", Protocol::Udp)).unwrap();
        assert_eq!(dns.frontends.first().unwrap().port, 53);
        assert_eq!(dns.frontends.first().unwrap().proto, Protocol::Udp);
        // Only web-a has a "dns" port.
        assert_eq!(
            dns.backends,
            BTreeMap::from([
                (addr("198.18.0.10:5353"), Readiness::Ready),
                (addr("198.18.0.11:5353"), Readiness::NotReady),
            ])
        );
    }

    #[test]
    fn input_order_does_not_matter() {
        let forward = translate(&[service(WEB)], &[slice(WEB_SLICE_A), slice(WEB_SLICE_B)]);
        let backward = translate(&[service(WEB)], &[slice(WEB_SLICE_B), slice(WEB_SLICE_A)]);
        assert_eq!(forward, backward);
    }

    #[test]
    fn slice_port_must_match_name_and_protocol() {
        let services = [service(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 198.18.100.10
  ports: [{port: 80}]
"#,
        )];
        // Unnamed service port: matches the unnamed slice port, not the
        // named one, and not the UDP one.
        let slices = [slice(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: other, port: 9000}
- {port: 9001, protocol: UDP}
- {port: 9002}
endpoints:
- addresses: [198.18.0.10]
"#,
        )];
        let state = translate(&services, &slices).state;
        let port = state.service(&name("web", "", Protocol::Tcp)).unwrap();
        assert_eq!(
            port.backends.keys().copied().collect::<Vec<_>>(),
            [addr("198.18.0.10:9002")]
        );
    }

    #[test]
    fn every_ipv4_cluster_ip_is_a_frontend() {
        let services = [service(
            r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: apps}
spec:
  clusterIP: 198.18.100.20
  clusterIPs: [198.18.100.20, "2001:db8::20"]
  ports: [{port: 443}]
"#,
        )];
        let state = translate(&services, &[]).state;
        let frontends: Vec<_> = state.frontends().map(|(f, n)| (*f, n.clone())).collect();
        assert_eq!(frontends.len(), 1);
        assert_eq!(frontends[0].0.addr, Ipv4Addr::new(198, 18, 100, 20));
        assert_eq!(frontends[0].1.namespace, "apps");
    }

    #[test]
    fn unproxied_services_are_ignored() {
        let services = [
            service(
                r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
"#,
            ),
            service(
                r#"
apiVersion: v1
kind: Service
metadata: {name: external}
spec: {type: ExternalName, externalName: example.org, ports: [{port: 80}]}
"#,
            ),
            service(
                r#"
apiVersion: v1
kind: Service
metadata:
  name: other-proxy
  labels: {service.kubernetes.io/service-proxy-name: someone-else}
spec: {clusterIP: 198.18.100.30, ports: [{port: 80}]}
"#,
            ),
        ];
        let translation = translate(&services, &[]);
        assert!(translation.state.is_empty());
        assert_eq!(translation.notices.len(), 3);
        assert!(
            translation
                .notices
                .iter()
                .all(|n| n.level == NoticeLevel::Debug)
        );
    }

    #[test]
    fn sctp_port_is_skipped_with_one_warning() {
        let services = [service(
            r#"
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec:
  clusterIP: 198.18.100.40
  ports:
  - {name: a, port: 80}
  - {name: b, port: 90, protocol: SCTP}
"#,
        )];
        let translation = translate(&services, &[]);
        assert_eq!(translation.state.services().len(), 1);
        let warnings: Vec<_> = translation
            .notices
            .iter()
            .filter(|n| n.level == NoticeLevel::Warn)
            .collect();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].message.contains("SCTP"));
    }

    #[test]
    fn ipv6_fqdn_unlabelled_and_foreign_slices_are_ignored() {
        let services = [service(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.10, ports: [{port: 80}]}
"#,
        )];
        let slices = [
            slice(
                r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["2001:db8::1"]}]
"#,
            ),
            slice(
                r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: fqdn, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
ports: [{port: 8080}]
endpoints: [{addresses: [pod.example.org]}]
"#,
            ),
            slice(
                r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.18.0.1]}]
"#,
            ),
            slice(
                r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other-ns, namespace: elsewhere, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.18.0.2]}]
"#,
            ),
        ];
        let state = translate(&services, &slices).state;
        let web = state.service(&name("web", "", Protocol::Tcp)).unwrap();
        assert!(web.backends.is_empty(), "{:?}", web.backends);
    }

    #[test]
    fn readiness_follows_conditions() {
        let services = [service(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.10, ports: [{port: 80}]}
"#,
        )];
        let slices = [slice(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [198.18.0.1]
- addresses: [198.18.0.2]
  conditions: {}
- addresses: [198.18.0.3]
  conditions: {ready: false}
- addresses: [198.18.0.4]
  conditions: {ready: false, serving: true, terminating: true}
"#,
        )];
        let state = translate(&services, &slices).state;
        let web = state.service(&name("web", "", Protocol::Tcp)).unwrap();
        assert_eq!(
            web.backends,
            BTreeMap::from([
                (addr("198.18.0.1:8080"), Readiness::Ready),
                (addr("198.18.0.2:8080"), Readiness::Ready),
                (addr("198.18.0.3:8080"), Readiness::NotReady),
                // Ready endpoints exist, so no terminating fallback.
                (addr("198.18.0.4:8080"), Readiness::NotReady),
            ])
        );
    }

    #[test]
    fn serving_terminating_endpoints_are_used_when_none_is_ready() {
        let services = [service(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.10, ports: [{port: 80}]}
"#,
        )];
        let slices = [slice(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [198.18.0.3]
  conditions: {ready: false}
- addresses: [198.18.0.4]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [198.18.0.5]
  conditions: {ready: false, serving: false, terminating: true}
"#,
        )];
        let state = translate(&services, &slices).state;
        let web = state.service(&name("web", "", Protocol::Tcp)).unwrap();
        assert_eq!(
            web.backends,
            BTreeMap::from([
                (addr("198.18.0.3:8080"), Readiness::NotReady),
                (addr("198.18.0.4:8080"), Readiness::Ready),
                (addr("198.18.0.5:8080"), Readiness::NotReady),
            ])
        );
    }

    #[test]
    fn conflicting_frontend_keeps_first_owner() {
        let services = [
            service(
                r#"
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 198.18.100.10, ports: [{port: 80}]}
"#,
            ),
            service(
                r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 198.18.100.10, ports: [{port: 80}]}
"#,
            ),
        ];
        let translation = translate(&services, &[]);
        let (_, owner) = translation.state.frontends().next().unwrap();
        assert_eq!(owner.name, "a");
        assert_eq!(translation.notices.len(), 1);
        assert_eq!(translation.notices[0].object.name, "b");
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {clusterIP: 198.18.0.1, ports: [{port: 80}]}",
                "metadata.name",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: 300.1.1.1, ports: [{port: 80}]}",
                "spec.clusterIP",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: 198.18.0.1, ports: [{port: 0}]}",
                "spec.ports[0].port",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: 198.18.0.1, ports: [{name: a, port: 80}, {name: b, port: 70000}]}",
                "spec.ports[1].port",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: 198.18.0.1, ports: [{port: 80}, {port: 81}]}",
                "spec.ports[0].name",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: 198.18.0.1, ports: [{port: 80, protocol: ICMP}]}",
                "spec.ports[0].protocol",
            ),
        ];
        for (yaml, field) in cases {
            let error = validate_service(&service(yaml)).unwrap_err();
            assert_eq!(error.field, field, "{yaml}");
        }
        let slice_cases = [
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: [198.18.0.1]}, {addresses: [not-an-ip]}]",
                "endpoints[1].addresses[0]",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nports: [{port: 0}]\nendpoints: []",
                "ports[0].port",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv5\nendpoints: []",
                "addressType",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: []}]",
                "endpoints[0].addresses",
            ),
        ];
        for (yaml, field) in slice_cases {
            let error = validate_endpoint_slice(&slice(yaml)).unwrap_err();
            assert_eq!(error.field, field, "{yaml}");
        }
        assert_eq!(validate_service(&service(WEB)), Ok(()));
        assert_eq!(validate_endpoint_slice(&slice(WEB_SLICE_A)), Ok(()));
    }

    /// A one-port Service `web` with `extra` lines under `metadata` and
    /// `spec`.
    fn web_with(metadata: &str, spec: &str) -> Service {
        service(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web{metadata}}}\nspec: {{clusterIP: 198.18.100.10, ports: [{{port: 80}}]{spec}}}"
        ))
    }

    fn only_port(translation: &Translation) -> &ServicePort {
        translation
            .state
            .service(&name("web", "", Protocol::Tcp))
            .expect("web translated")
    }

    #[test]
    fn session_affinity_and_its_timeout() {
        let cases = [
            ("", None),
            (", sessionAffinity: None", None),
            (", sessionAffinity: ClientIP", Some(DEFAULT_TIMEOUT_SECS)),
            (
                ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}",
                Some(5),
            ),
            (
                ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}",
                Some(86_400),
            ),
            // The config alone does not turn affinity on.
            (
                ", sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}",
                None,
            ),
        ];
        for (spec, expected) in cases {
            let web = web_with("", spec);
            assert_eq!(validate_service(&web), Ok(()), "{spec}");
            let translation = translate([&web], []);
            assert_eq!(only_port(&translation).affinity_timeout, expected, "{spec}");
        }
        for (spec, field) in [
            (", sessionAffinity: Cookie", "spec.sessionAffinity"),
            (
                ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
            (
                ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
        ] {
            let error = validate_service(&web_with("", spec)).unwrap_err();
            assert_eq!(error.field, field, "{spec}");
        }
    }

    #[test]
    fn selection_annotation_overrides_the_default() {
        let cases = [
            ("", None),
            (
                ", annotations: {lb.dev/selection: maglev}",
                Some(Selection::Maglev),
            ),
            (
                ", annotations: {lb.dev/selection: random}",
                Some(Selection::Random),
            ),
        ];
        for (metadata, expected) in cases {
            let translation = translate([&web_with(metadata, "")], []);
            assert_eq!(only_port(&translation).selection, expected, "{metadata}");
            assert!(
                translation
                    .notices
                    .iter()
                    .all(|n| n.level != NoticeLevel::Warn)
            );
        }
        // An unknown value warns and leaves the agent's default.
        let translation = translate(
            [&web_with(", annotations: {lb.dev/selection: ring}", "")],
            [],
        );
        assert_eq!(only_port(&translation).selection, None);
        assert!(
            translation
                .notices
                .iter()
                .any(|n| n.level == NoticeLevel::Warn && n.message.contains(ANNOTATION_SELECTION)),
            "{:?}",
            translation.notices
        );
    }

    const LOCAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: local}
spec:
  clusterIP: 198.18.100.20
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80}]
"#;

    const LOCAL_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-1
  labels: {kubernetes.io/service-name: local}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [198.18.0.10], nodeName: here}
- {addresses: [198.18.0.11], nodeName: there}
- {addresses: [198.18.0.12], nodeName: here, conditions: {ready: false, serving: true, terminating: true}}
"#;

    fn scoped(node: Option<&str>, proxy: Option<&str>) -> Scope {
        Scope {
            node_name: node.map(str::to_owned),
            service_proxy_name: proxy.map(str::to_owned),
            ..Scope::default()
        }
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
        let services = [service(LOCAL)];
        let slices = [slice(LOCAL_SLICE)];
        let backends = |scope: &Scope| {
            translate_in(scope, &services, &slices)
                .state
                .service(&name("local", "http", Protocol::Tcp))
                .unwrap()
                .backends
                .clone()
        };
        let local = translate_in(&scoped(Some("here"), None), &services, &slices).state;
        let port = local
            .service(&name("local", "http", Protocol::Tcp))
            .unwrap();
        assert!(port.drop_without_backend);
        // The remote endpoint stays listed (its flows live on), not ready.
        assert_eq!(
            backends(&scoped(Some("here"), None)),
            BTreeMap::from([
                (addr("198.18.0.10:8080"), Readiness::Ready),
                (addr("198.18.0.11:8080"), Readiness::NotReady),
                (addr("198.18.0.12:8080"), Readiness::NotReady),
            ])
        );
        // No ready local endpoint: the local serving terminating one takes
        // new connections, never the remote ready one.
        let no_ready_local = LOCAL_SLICE.replace(
            "- {addresses: [198.18.0.10], nodeName: here}",
            "- {addresses: [198.18.0.10], nodeName: there}",
        );
        let slices = [slice(&no_ready_local)];
        let state = translate_in(&scoped(Some("here"), None), &services, &slices).state;
        let port = state
            .service(&name("local", "http", Protocol::Tcp))
            .unwrap();
        assert_eq!(
            port.ready_backends().collect::<Vec<_>>(),
            [addr("198.18.0.12:8080")]
        );
        // Not on this node at all, or no node name: nothing takes new
        // connections (they are refused); a warning without a node name.
        assert_eq!(
            backends(&scoped(Some("elsewhere"), None))
                .values()
                .filter(|r| r.is_ready())
                .count(),
            0
        );
        let unnamed = translate_in(&Scope::default(), &services, &[slice(LOCAL_SLICE)]);
        assert!(
            unnamed
                .notices
                .iter()
                .any(|n| n.level == NoticeLevel::Warn && n.message.contains("--node-name")),
            "{:?}",
            unnamed.notices
        );
    }

    #[test]
    fn service_proxy_name_selects_labelled_objects() {
        let labelled = |value: &str| {
            WEB.replace(
                "metadata: {name: web}",
                &format!(
                    "metadata: {{name: web, labels: {{service.kubernetes.io/service-proxy-name: {value}}}}}"
                ),
            )
        };
        let services_of = |yaml: &str, proxy: Option<&str>| {
            translate_in(&scoped(None, proxy), &[service(yaml)], &[])
                .state
                .services()
                .len()
        };
        assert_eq!(services_of(WEB, None), 2);
        assert_eq!(services_of(&labelled("lb"), None), 0);
        assert_eq!(services_of(WEB, Some("lb")), 0);
        assert_eq!(services_of(&labelled("lb"), Some("lb")), 2);
        assert_eq!(services_of(&labelled("other"), Some("lb")), 0);
    }

    // External frontends.

    const NODE_A: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 1);
    const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 11);
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 50);
    const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 253, 1);
    const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 253, 2);

    /// The agent on node `here` with two node addresses.
    fn node_scope() -> Scope {
        Scope {
            node_name: Some("here".into()),
            node_addresses: vec![NODE_A, NODE_B],
            ..Scope::default()
        }
    }

    /// Service `ext` (one TCP port 80, nodePort 30080) with `spec` lines
    /// added to its spec, and `status` as its status.
    fn ext_service(spec: &str, status: &str) -> Service {
        service(&format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: ext}}
spec:
  clusterIP: 198.18.100.50
  ports: [{{port: 80, nodePort: 30080, targetPort: 8080}}]
{spec}
status: {{{status}}}
"#
        ))
    }

    /// Endpoints of `ext`: 10 ready here, 11 ready there, 12 on this node
    /// but serving terminating.
    const EXT_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ext-1
  labels: {kubernetes.io/service-name: ext}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.18.0.10], nodeName: here}
- {addresses: [198.18.0.11], nodeName: there}
- {addresses: [198.18.0.12], nodeName: here, conditions: {ready: false, serving: true, terminating: true}}
"#;

    fn ext_name(traffic: Traffic) -> ServicePortName {
        ServicePortName {
            traffic,
            ..name("ext", "", Protocol::Tcp)
        }
    }

    fn tcp(addr: Ipv4Addr, port: u16) -> Frontend {
        Frontend {
            addr,
            port,
            proto: Protocol::Tcp,
        }
    }

    fn warnings(translation: &Translation) -> Vec<&str> {
        translation
            .notices
            .iter()
            .filter(|n| n.level == NoticeLevel::Warn)
            .map(|n| n.message.as_str())
            .collect()
    }

    #[test]
    fn external_frontends_by_service_type() {
        let lb_status = "loadBalancer: {ingress: [{ip: 198.18.253.1}, {hostname: lb.example.org}, {ip: \"2001:db8::1\"}]}";
        let cluster = [(tcp(CLUSTER_IP, 80), FrontendKind::ClusterIp)];
        let node_ports = [
            (tcp(NODE_A, 30080), FrontendKind::NodePort),
            (tcp(NODE_B, 30080), FrontendKind::NodePort),
        ];
        let external_ip = (tcp(EXTERNAL_IP, 80), FrontendKind::ExternalIp);
        let load_balancer = (tcp(LB_IP, 80), FrontendKind::LoadBalancer);
        // (spec lines, status, expected frontends)
        type Case<'a> = (&'a str, &'a str, Vec<(Frontend, FrontendKind)>);
        let cases: [Case; 6] = [
            // A ClusterIP Service has no NodePort, even with one written,
            // and no load-balancer address, even with a status.
            ("", lb_status, cluster.to_vec()),
            (
                "  type: NodePort",
                "",
                [&cluster[..], &node_ports[..]].concat(),
            ),
            (
                "  type: LoadBalancer",
                lb_status,
                [&cluster[..], &node_ports[..], &[load_balancer]].concat(),
            ),
            // externalIPs on any type; IPv6 ones are not proxied.
            (
                "  externalIPs: [198.18.253.2, \"2001:db8::2\"]",
                "",
                [&cluster[..], &[external_ip]].concat(),
            ),
            // `ipMode: Proxy`: the load balancer proxies to the node.
            (
                "  type: LoadBalancer",
                "loadBalancer: {ingress: [{ip: 198.18.253.1, ipMode: Proxy}]}",
                [&cluster[..], &node_ports[..]].concat(),
            ),
            // An address that is both an external IP and a load-balancer
            // IP is the more restrictive load-balancer frontend.
            (
                "  type: LoadBalancer\n  externalIPs: [198.18.253.1]",
                lb_status,
                [&cluster[..], &node_ports[..], &[load_balancer]].concat(),
            ),
        ];
        for (spec, status, expected) in cases {
            let translation = translate_in(&node_scope(), &[ext_service(spec, status)], &[]);
            assert!(
                warnings(&translation).is_empty(),
                "{spec}: {:?}",
                translation.notices
            );
            let state = &translation.state;
            assert_eq!(state.services().len(), 1, "{spec}");
            let port = state.service(&ext_name(Traffic::Internal)).unwrap();
            let mut expected = expected;
            expected.sort();
            assert_eq!(
                port.frontends
                    .iter()
                    .map(|(f, k)| (*f, k))
                    .collect::<Vec<_>>(),
                expected,
                "{spec} / {status}"
            );
        }
    }

    #[test]
    fn external_traffic_policy_shares_or_splits_the_service_id() {
        let slices = [slice(EXT_SLICE)];
        let ready = |port: &ServicePort| {
            port.ready_backends()
                .map(|addr| addr.ip().octets()[3])
                .collect::<Vec<_>>()
        };
        // (internalTrafficPolicy, externalTrafficPolicy) -> separate
        // external service port?, ready backends of the internal one and
        // of the external frontends, and whether they drop.
        let cases = [
            (
                "Cluster",
                "Cluster",
                false,
                vec![10, 11],
                vec![10, 11],
                false,
                false,
            ),
            ("Local", "Local", false, vec![10], vec![10], true, true),
            (
                "Cluster",
                "Local",
                true,
                vec![10, 11],
                vec![10],
                false,
                true,
            ),
            (
                "Local",
                "Cluster",
                true,
                vec![10],
                vec![10, 11],
                true,
                false,
            ),
        ];
        for (
            internal,
            external,
            split,
            internal_ready,
            external_ready,
            internal_drop,
            external_drop,
        ) in cases
        {
            let spec = format!(
                "  type: NodePort\n  internalTrafficPolicy: {internal}\n  externalTrafficPolicy: {external}"
            );
            let translation = translate_in(&node_scope(), &[ext_service(&spec, "")], &slices);
            let state = &translation.state;
            let case = format!("{internal}/{external}");
            let internal_port = state.service(&ext_name(Traffic::Internal)).unwrap();
            assert_eq!(ready(internal_port), internal_ready, "{case}");
            assert_eq!(internal_port.drop_without_backend, internal_drop, "{case}");
            let node_port = tcp(NODE_A, 30080);
            let external_port = if split {
                assert_eq!(state.services().len(), 2, "{case}");
                let port = state.service(&ext_name(Traffic::External)).unwrap();
                // Only the external frontends; the ClusterIP keeps its own id.
                assert_eq!(port.frontends.len(), 2, "{case}");
                assert!(!port.frontends.contains(&tcp(CLUSTER_IP, 80)), "{case}");
                assert_eq!(internal_port.frontends.len(), 1, "{case}");
                // Pods reaching the external frontends take the ClusterIP's view.
                assert_eq!(port.internal_view, Some(tcp(CLUSTER_IP, 80)), "{case}");
                assert_eq!(internal_port.internal_view, None, "{case}");
                port
            } else {
                assert_eq!(state.services().len(), 1, "{case}");
                assert_eq!(internal_port.frontends.len(), 3, "{case}");
                // One id, one view: nothing to redirect pods to.
                assert_eq!(internal_port.internal_view, None, "{case}");
                internal_port
            };
            assert_eq!(
                external_port.frontends.kind(&node_port),
                Some(FrontendKind::NodePort),
                "{case}"
            );
            assert_eq!(
                state.owner(&node_port).unwrap(),
                &ext_name(if split {
                    Traffic::External
                } else {
                    Traffic::Internal
                })
            );
            assert_eq!(ready(external_port), external_ready, "{case}");
            assert_eq!(external_port.drop_without_backend, external_drop, "{case}");
            // Every endpoint stays listed in both (flows open to it live on).
            assert_eq!(external_port.backends.len(), 3, "{case}");
            // Locality is the address's, in both.
            assert_eq!(
                external_port.local_addresses,
                BTreeSet::from([Ipv4Addr::new(198, 18, 0, 10), Ipv4Addr::new(198, 18, 0, 12)]),
                "{case}"
            );
            assert_eq!(external_port.local_addresses, internal_port.local_addresses);
        }
    }

    #[test]
    fn external_local_without_a_local_ready_endpoint_falls_back_then_drops() {
        let spec = "  type: NodePort\n  externalTrafficPolicy: Local";
        // Only the terminating one is here: it takes new connections.
        let only_terminating = EXT_SLICE.replace(
            "- {addresses: [198.18.0.10], nodeName: here}",
            "- {addresses: [198.18.0.10], nodeName: there}",
        );
        let state = translate_in(
            &node_scope(),
            &[ext_service(spec, "")],
            &[slice(&only_terminating)],
        )
        .state;
        let external = state.service(&ext_name(Traffic::External)).unwrap();
        assert_eq!(
            external.ready_backends().collect::<Vec<_>>(),
            [addr("198.18.0.12:8080")]
        );
        // Nothing here at all: no ready backend, drop.
        let translation = translate_in(
            &Scope {
                node_name: Some("elsewhere".into()),
                ..node_scope()
            },
            &[ext_service(spec, "")],
            &[slice(EXT_SLICE)],
        );
        let external = translation
            .state
            .service(&ext_name(Traffic::External))
            .unwrap();
        assert_eq!(external.ready_backends().count(), 0);
        assert!(external.drop_without_backend);
        assert!(external.local_addresses.is_empty());
        // Without a node name: warned, same result.
        let translation = translate_in(
            &Scope {
                node_name: None,
                ..node_scope()
            },
            &[ext_service(spec, "")],
            &[slice(EXT_SLICE)],
        );
        assert!(
            warnings(&translation)
                .iter()
                .any(|w| w.contains("externalTrafficPolicy") && w.contains("--node-name")),
            "{:?}",
            translation.notices
        );
    }

    #[test]
    fn source_ranges_restrict_only_load_balancer_frontends() {
        let status = "loadBalancer: {ingress: [{ip: 198.18.253.1}]}";
        let annotated = |value: &str| {
            let mut service = ext_service("  type: LoadBalancer", status);
            service.metadata.annotations =
                Some([(ANNOTATION_SOURCE_RANGES.to_owned(), value.to_owned())].into());
            service
        };
        let cidrs =
            |list: &[&str]| SourceRanges::Only(list.iter().map(|c| c.parse().unwrap()).collect());
        // (service, expected ranges, expected warning naming a field)
        let cases: Vec<(Service, SourceRanges, Option<&str>)> = vec![
            (
                ext_service("  type: LoadBalancer", status),
                SourceRanges::Any,
                None,
            ),
            (
                ext_service(
                    "  type: LoadBalancer\n  loadBalancerSourceRanges: [198.18.254.100/32, \" 10.1.2.3/8 \"]",
                    status,
                ),
                // Host bits cleared, spaces trimmed.
                cidrs(&["198.18.254.100/32", "10.0.0.0/8"]),
                None,
            ),
            // The field wins over the annotation.
            (
                {
                    let mut service = annotated("10.0.0.0/8");
                    service.spec.as_mut().unwrap().load_balancer_source_ranges =
                        Some(vec!["198.18.254.0/24".into()]);
                    service
                },
                cidrs(&["198.18.254.0/24"]),
                None,
            ),
            (
                annotated(" 198.18.254.100/32 , 198.18.254.101/32 "),
                cidrs(&["198.18.254.100/32", "198.18.254.101/32"]),
                None,
            ),
            // IPv6 ranges apply to IPv6 only (as kube-proxy).
            (
                ext_service(
                    "  type: LoadBalancer\n  loadBalancerSourceRanges: [\"2001:db8::/32\", 198.18.254.0/24]",
                    status,
                ),
                cidrs(&["198.18.254.0/24"]),
                None,
            ),
            (
                ext_service(
                    "  type: LoadBalancer\n  loadBalancerSourceRanges: [\"2001:db8::/32\"]",
                    status,
                ),
                SourceRanges::Any,
                None,
            ),
            // Fail closed: one bad range admits nobody.
            (
                ext_service(
                    "  type: LoadBalancer\n  loadBalancerSourceRanges: [198.18.254.0/24, 198.18.254.0/33]",
                    status,
                ),
                SourceRanges::Only(BTreeSet::new()),
                Some("spec.loadBalancerSourceRanges[1]"),
            ),
            (
                annotated("198.18.254.0/24,not-a-range"),
                SourceRanges::Only(BTreeSet::new()),
                Some(ANNOTATION_SOURCE_RANGES),
            ),
        ];
        for (i, (service, expected, warning)) in cases.into_iter().enumerate() {
            let translation = translate_in(&node_scope(), &[service], &[]);
            let port = translation
                .state
                .service(&ext_name(Traffic::Internal))
                .unwrap();
            assert_eq!(port.source_ranges, expected, "case {i}");
            let lb = port.frontends.kind(&tcp(LB_IP, 80));
            assert_eq!(lb, Some(FrontendKind::LoadBalancer), "case {i}");
            let flags = port.frontend_flags(FrontendKind::LoadBalancer);
            assert_eq!(
                flags & lb_common::service::SERVICE_F_SOURCE_RANGES != 0,
                expected.is_restricted(),
                "case {i}"
            );
            // NodePorts are never restricted.
            assert_eq!(
                port.frontend_flags(FrontendKind::NodePort),
                lb_common::service::SERVICE_F_EXTERNAL
            );
            let warned = warnings(&translation);
            match warning {
                None => assert!(warned.is_empty(), "case {i}: {warned:?}"),
                Some(field) => {
                    assert_eq!(warned.len(), 1, "case {i}: {warned:?}");
                    assert!(warned[0].contains(field), "case {i}: {warned:?}");
                    assert!(warned[0].contains("admit no client"), "case {i}");
                }
            }
        }
        // A split external id carries the ranges; the ClusterIP's does not.
        let split = ext_service(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [198.18.254.0/24]",
            status,
        );
        let state = translate_in(&node_scope(), &[split], &[]).state;
        assert_eq!(
            state
                .service(&ext_name(Traffic::Internal))
                .unwrap()
                .source_ranges,
            SourceRanges::Any
        );
        assert!(
            state
                .service(&ext_name(Traffic::External))
                .unwrap()
                .source_ranges
                .is_restricted()
        );
    }

    #[test]
    fn malformed_external_fields_warn_once_and_keep_the_rest() {
        let status_ok = "loadBalancer: {ingress: [{ip: 198.18.253.1}]}";
        // (spec, status, field named, frontends left)
        let cases = [
            (
                "  type: NodePort\n  ports: [{port: 80, nodePort: 70000}]",
                "",
                "spec.ports[0].nodePort",
                vec![tcp(CLUSTER_IP, 80)],
            ),
            (
                "  type: NodePort\n  ports: [{port: 80, nodePort: 0}]",
                "",
                "spec.ports[0].nodePort",
                vec![tcp(CLUSTER_IP, 80)],
            ),
            // A manifest NodePort without a nodePort.
            (
                "  type: NodePort\n  ports: [{port: 80}]",
                "",
                "spec.ports[0].nodePort",
                vec![tcp(CLUSTER_IP, 80)],
            ),
            (
                "  type: LoadBalancer",
                "loadBalancer: {ingress: [{ip: 198.18.253.300}, {ip: 198.18.253.1}]}",
                "status.loadBalancer.ingress[0].ip",
                vec![
                    tcp(CLUSTER_IP, 80),
                    tcp(LB_IP, 80),
                    tcp(NODE_A, 30080),
                    tcp(NODE_B, 30080),
                ],
            ),
            (
                "  externalIPs: [198.18.253.2, bogus]",
                "",
                "spec.externalIPs[1]",
                vec![tcp(CLUSTER_IP, 80), tcp(EXTERNAL_IP, 80)],
            ),
            (
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 0",
                status_ok,
                "spec.healthCheckNodePort",
                vec![
                    tcp(CLUSTER_IP, 80),
                    tcp(LB_IP, 80),
                    tcp(NODE_A, 30080),
                    tcp(NODE_B, 30080),
                ],
            ),
        ];
        for (spec, status, field, frontends) in cases {
            // `ports` in `spec` replaces the fixture's.
            let service = if spec.contains("ports:") {
                let yaml = format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: ext}}\nspec:\n  clusterIP: 198.18.100.50\n{spec}\nstatus: {{{status}}}\n"
                );
                service(&yaml)
            } else {
                ext_service(spec, status)
            };
            assert_eq!(validate_service(&service), Ok(()), "{spec}");
            let translation = translate_in(&node_scope(), &[service], &[]);
            let warned = warnings(&translation);
            assert_eq!(warned.len(), 1, "{spec}: {warned:?}");
            assert!(warned[0].contains(field), "{spec}: {warned:?}");
            assert_eq!(translation.notices[0].object.name, "ext");
            let mut all: Vec<Frontend> = translation.state.frontends().map(|(f, _)| *f).collect();
            all.sort();
            let mut frontends = frontends;
            frontends.sort();
            assert_eq!(all, frontends, "{spec}");
        }
        // A LoadBalancer that opts out of node ports is not warned about.
        let translation = translate_in(
            &node_scope(),
            &[service(
                "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  clusterIP: 198.18.100.50\n  type: LoadBalancer\n  allocateLoadBalancerNodePorts: false\n  ports: [{port: 80}]\n",
            )],
            &[],
        );
        assert!(
            warnings(&translation).is_empty(),
            "{:?}",
            translation.notices
        );
    }

    #[test]
    fn node_ports_follow_the_node_addresses() {
        let services = [ext_service("  type: NodePort", "")];
        let node_ports = |addresses: Vec<Ipv4Addr>| {
            let scope = Scope {
                node_addresses: addresses,
                ..node_scope()
            };
            translate_in(&scope, &services, &[])
                .state
                .frontends()
                .filter(|(f, _)| f.port == 30080)
                .map(|(f, _)| f.addr)
                .collect::<Vec<_>>()
        };
        assert_eq!(node_ports(vec![]), Vec::<Ipv4Addr>::new());
        assert_eq!(node_ports(vec![NODE_B]), [NODE_B]);
        assert_eq!(node_ports(vec![NODE_B, NODE_A, NODE_B]), [NODE_A, NODE_B]);
        // Two Services on one nodePort: the first keeps it, on every address.
        let other = service(
            "apiVersion: v1\nkind: Service\nmetadata: {name: another}\nspec:\n  type: NodePort\n  clusterIP: 198.18.100.51\n  ports: [{port: 80, nodePort: 30080}]\n",
        );
        let translation = translate_in(&node_scope(), &[services[0].clone(), other], &[]);
        assert_eq!(
            translation.state.owner(&tcp(NODE_A, 30080)).unwrap().name,
            "another"
        );
        assert_eq!(warnings(&translation).len(), 2);
    }

    #[test]
    fn health_checks_count_ready_local_endpoints() {
        let lb_local =
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000";
        let slices = [slice(EXT_SLICE)];
        let checks = |spec: &str, scope: &Scope, slices: &[EndpointSlice]| {
            let translation = translate_in(scope, &[ext_service(spec, "")], slices);
            (
                translation.state.health_checks().clone(),
                warnings(&translation).len(),
            )
        };
        let check = |count| {
            BTreeMap::from([(
                32000,
                HealthCheck {
                    namespace: "default".into(),
                    name: "ext".into(),
                    local_endpoints: count,
                },
            )])
        };
        // One ready endpoint here; the terminating one never counts (so
        // load balancers drain a node that only has terminating ones).
        assert_eq!(checks(lb_local, &node_scope(), &slices), (check(1), 0));
        let only_terminating = EXT_SLICE.replace(
            "- {addresses: [198.18.0.10], nodeName: here}",
            "- {addresses: [198.18.0.10], nodeName: there}",
        );
        assert_eq!(
            checks(lb_local, &node_scope(), &[slice(&only_terminating)]),
            (check(0), 0)
        );
        assert_eq!(checks(lb_local, &node_scope(), &[]), (check(0), 0));
        // Not Local, not a LoadBalancer: no health check.
        for spec in [
            "  type: LoadBalancer\n  healthCheckNodePort: 32000",
            "  type: NodePort\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
        ] {
            assert_eq!(
                checks(spec, &node_scope(), &slices),
                (BTreeMap::new(), 0),
                "{spec}"
            );
        }
        // A manifest without the port: warned, none.
        let (none, warned) = checks(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local",
            &node_scope(),
            &slices,
        );
        assert!(none.is_empty());
        assert_eq!(warned, 1);
        // Multi-port: distinct ready local addresses over the ports (13
        // serves both, 14 is elsewhere, 15 not ready).
        let multi = service(
            "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  clusterIP: 198.18.100.50\n  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30081}]\n",
        );
        let multi_slice = slice(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: a, port: 8080}]
endpoints:
- {addresses: [198.18.0.10], nodeName: here}
- {addresses: [198.18.0.12], nodeName: here}
"#,
        );
        let other_slice = slice(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-2, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: b, port: 8081}]
endpoints:
- {addresses: [198.18.0.13], nodeName: here}
- {addresses: [198.18.0.10], nodeName: here}
- {addresses: [198.18.0.14], nodeName: there}
- {addresses: [198.18.0.15], nodeName: here, conditions: {ready: false}}
"#,
        );
        let translation = translate_in(&node_scope(), &[multi], &[multi_slice, other_slice]);
        assert_eq!(translation.state.health_checks()[&32000].local_endpoints, 3);
        // Two Services on one health check port: the first keeps it.
        let first = ext_service(lb_local, "");
        let mut second = first.clone();
        second.metadata.name = Some("another".into());
        second.spec.as_mut().unwrap().cluster_ip = Some("198.18.100.51".into());
        second.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30081);
        let translation = translate_in(&node_scope(), &[first, second], &[]);
        assert_eq!(translation.state.health_checks()[&32000].name, "another");
        assert_eq!(warnings(&translation).len(), 1, "{:?}", translation.notices);
    }
}

//! Service and EndpointSlice manifests, and the directory the agent watches.
//!
//! Objects are built as JSON values (so a test can break any field on
//! purpose) and written as YAML. Every change to the directory is atomic:
//! the new content goes to a hidden `.<file>.tmp` (an extension the agent
//! does not read) and is renamed over the target, so the agent never reads
//! a half-written file.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::error::{Result, TestbedError};

/// Namespace of every object the helpers build.
pub const NAMESPACE: &str = "default";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As Kubernetes spells it.
    pub const fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    /// As `lb-agent inspect` spells it.
    pub const fn as_lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A Service port's `targetPort`: a number, or the name of a container
/// port (which the EndpointSlice resolves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(port: u16) -> Self {
        TargetPort::Number(port)
    }
}

impl From<&str> for TargetPort {
    fn from(name: &str) -> Self {
        TargetPort::Name(name.to_owned())
    }
}

impl TargetPort {
    fn to_value(&self) -> Value {
        match self {
            TargetPort::Number(port) => json!(port),
            TargetPort::Name(name) => json!(name),
        }
    }
}

/// One entry of `spec.ports` of a Service.
#[derive(Clone, Debug)]
pub struct ServicePort {
    /// Empty for the single unnamed port a Service may have.
    pub name: String,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
    /// `nodePort` (type NodePort or LoadBalancer): without an API server
    /// nothing allocates one, so a manifest states it.
    pub node_port: Option<u16>,
}

impl ServicePort {
    pub fn tcp(name: &str, port: u16, target_port: impl Into<TargetPort>) -> Self {
        Self {
            name: name.to_owned(),
            port,
            target_port: target_port.into(),
            protocol: Protocol::Tcp,
            node_port: None,
        }
    }

    pub fn udp(name: &str, port: u16, target_port: impl Into<TargetPort>) -> Self {
        Self {
            name: name.to_owned(),
            port,
            target_port: target_port.into(),
            protocol: Protocol::Udp,
            node_port: None,
        }
    }

    /// The same port with `nodePort: node_port`.
    pub fn with_node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }

    fn to_value(&self) -> Value {
        let mut port = json!({
            "port": self.port,
            "targetPort": self.target_port.to_value(),
            "protocol": self.protocol.as_k8s(),
        });
        if !self.name.is_empty() {
            port["name"] = json!(self.name);
        }
        if let Some(node_port) = self.node_port {
            port["nodePort"] = json!(node_port);
        }
        port
    }
}

/// `spec.type` of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub const fn as_k8s(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// `spec.externalTrafficPolicy` / `spec.internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub const fn as_k8s(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// A `v1/Service`: type ClusterIP unless a `with_*` method says otherwise.
/// Fields left at their defaults are left out of the manifest, as an API
/// server would default them.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub service_type: ServiceType,
    /// `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// `spec.externalTrafficPolicy` (None: unset, which means Cluster).
    pub external_traffic_policy: Option<TrafficPolicy>,
    /// `spec.internalTrafficPolicy` (None: unset, which means Cluster).
    pub internal_traffic_policy: Option<TrafficPolicy>,
    /// `spec.healthCheckNodePort`.
    pub health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges`, as written (so a test can write an
    /// invalid one).
    pub load_balancer_source_ranges: Vec<String>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ingress: Vec<Ipv4Addr>,
}

impl Service {
    pub fn new(name: &str, cluster_ip: Ipv4Addr, ports: Vec<ServicePort>) -> Self {
        Self {
            name: name.to_owned(),
            cluster_ip,
            ports,
            service_type: ServiceType::ClusterIP,
            external_ips: Vec::new(),
            external_traffic_policy: None,
            internal_traffic_policy: None,
            health_check_node_port: None,
            load_balancer_source_ranges: Vec::new(),
            load_balancer_ingress: Vec::new(),
        }
    }

    pub fn with_type(mut self, service_type: ServiceType) -> Self {
        self.service_type = service_type;
        self
    }

    pub fn with_external_ips(mut self, ips: &[Ipv4Addr]) -> Self {
        self.external_ips = ips.to_vec();
        self
    }

    pub fn with_external_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.external_traffic_policy = Some(policy);
        self
    }

    pub fn with_internal_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.internal_traffic_policy = Some(policy);
        self
    }

    pub fn with_health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    pub fn with_source_ranges(mut self, ranges: &[&str]) -> Self {
        self.load_balancer_source_ranges = ranges.iter().map(|range| (*range).to_owned()).collect();
        self
    }

    pub fn with_ingress(mut self, ips: &[Ipv4Addr]) -> Self {
        self.load_balancer_ingress = ips.to_vec();
        self
    }

    pub fn to_value(&self) -> Value {
        let mut service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": self.name, "namespace": NAMESPACE },
            "spec": {
                "type": self.service_type.as_k8s(),
                "clusterIP": self.cluster_ip.to_string(),
                "clusterIPs": [self.cluster_ip.to_string()],
                "ports": self.ports.iter().map(ServicePort::to_value).collect::<Vec<_>>(),
            },
        });
        let spec = &mut service["spec"];
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(
                self.external_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            );
        }
        if let Some(policy) = self.external_traffic_policy {
            spec["externalTrafficPolicy"] = json!(policy.as_k8s());
        }
        if let Some(policy) = self.internal_traffic_policy {
            spec["internalTrafficPolicy"] = json!(policy.as_k8s());
        }
        if let Some(port) = self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(port);
        }
        if !self.load_balancer_source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.load_balancer_source_ranges);
        }
        if !self.load_balancer_ingress.is_empty() {
            service["status"] = json!({
                "loadBalancer": {
                    "ingress": self
                        .load_balancer_ingress
                        .iter()
                        .map(|ip| json!({ "ip": ip.to_string() }))
                        .collect::<Vec<_>>(),
                },
            });
        }
        service
    }
}

/// One entry of `ports` of an EndpointSlice: named after the Service port
/// it serves, carrying the resolved target port.
#[derive(Clone, Debug)]
pub struct EndpointPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl EndpointPort {
    pub fn tcp(name: &str, port: u16) -> Self {
        Self {
            name: name.to_owned(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    pub fn udp(name: &str, port: u16) -> Self {
        Self {
            name: name.to_owned(),
            port,
            protocol: Protocol::Udp,
        }
    }

    fn to_value(&self) -> Value {
        json!({ "name": self.name, "port": self.port, "protocol": self.protocol.as_k8s() })
    }
}

/// One endpoint (one pod address) of an EndpointSlice.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub ready: bool,
}

impl Endpoint {
    pub fn ready(address: Ipv4Addr) -> Self {
        Self {
            address,
            ready: true,
        }
    }

    pub fn not_ready(address: Ipv4Addr) -> Self {
        Self {
            address,
            ready: false,
        }
    }
}

/// A `discovery.k8s.io/v1/EndpointSlice` of one Service.
#[derive(Clone, Debug)]
pub struct EndpointSlice {
    pub name: String,
    pub service: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
    /// `nodeName` of endpoints, by address (an endpoint not listed has
    /// none).
    pub node_names: BTreeMap<Ipv4Addr, String>,
}

impl EndpointSlice {
    /// Slice `<service>-<suffix>`, as the EndpointSlice controller names them.
    pub fn new(
        service: &str,
        suffix: &str,
        ports: Vec<EndpointPort>,
        endpoints: Vec<Endpoint>,
    ) -> Self {
        Self {
            name: format!("{service}-{suffix}"),
            service: service.to_owned(),
            ports,
            endpoints,
            node_names: BTreeMap::new(),
        }
    }

    /// The same slice with `nodeName: node` on the endpoint `address`.
    pub fn with_node_name(mut self, address: Ipv4Addr, node: &str) -> Self {
        self.node_names.insert(address, node.to_owned());
        self
    }

    pub fn to_value(&self) -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.name,
                "namespace": NAMESPACE,
                "labels": { "kubernetes.io/service-name": self.service },
            },
            "addressType": "IPv4",
            "ports": self.ports.iter().map(EndpointPort::to_value).collect::<Vec<_>>(),
            "endpoints": self.endpoints.iter().map(|endpoint| {
                let mut value = json!({
                    "addresses": [endpoint.address.to_string()],
                    "conditions": { "ready": endpoint.ready },
                });
                if let Some(node) = self.node_names.get(&endpoint.address) {
                    value["nodeName"] = json!(node);
                }
                value
            }).collect::<Vec<_>>(),
        })
    }
}

/// The directory of manifests one agent watches.
#[derive(Debug)]
pub struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    /// Creates the directory `path` (its parent must exist). It is not
    /// removed on drop: it lives in a testbed's scratch directory.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        fs::create_dir(&path)
            .map_err(|source| TestbedError::path("create manifest directory", &path, source))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `objects` to `file` as a multi-document YAML file, replacing
    /// it atomically.
    pub fn write(&self, file: &str, objects: &[Value]) -> Result<()> {
        let mut text = String::new();
        for object in objects {
            let document =
                serde_yaml::to_string(object).map_err(|source| TestbedError::Manifest {
                    file: file.to_owned(),
                    source,
                })?;
            text.push_str("---\n");
            text.push_str(&document);
        }
        self.write_text(file, &text)
    }

    /// Writes `text` verbatim to `file` (e.g. something that is not YAML at
    /// all), replacing it atomically.
    pub fn write_text(&self, file: &str, text: &str) -> Result<()> {
        let target = self.path.join(file);
        let temporary = self.path.join(format!(".{file}.tmp"));
        fs::write(&temporary, text)
            .map_err(|source| TestbedError::path("write", &temporary, source))?;
        fs::rename(&temporary, &target)
            .map_err(|source| TestbedError::path("rename into place", &target, source))
    }

    /// Deletes `file`.
    pub fn remove(&self, file: &str) -> Result<()> {
        let target = self.path.join(file);
        fs::remove_file(&target).map_err(|source| TestbedError::path("remove", target, source))
    }

    /// Copies every regular file of `source` into the directory (each
    /// atomically), returning the names copied.
    pub fn copy_from(&self, source: &Path) -> Result<Vec<String>> {
        let entries = fs::read_dir(source)
            .map_err(|error| TestbedError::path("read directory", source, error))?;
        let mut copied = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|error| TestbedError::path("read directory", source, error))?;
            let from = entry.path();
            if !from.is_file() {
                continue;
            }
            let text = fs::read_to_string(&from)
                .map_err(|error| TestbedError::path("read", &from, error))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            self.write_text(&name, &text)?;
            copied.push(name);
        }
        copied.sort();
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::discovery::v1 as discovery;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use k8s_openapi::serde::Deserialize;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(crate::names::unique(name));
        fs::create_dir(&path).expect("create scratch directory");
        path
    }

    #[test]
    fn objects_are_what_kubernetes_types_accept() {
        let service = Service::new(
            "web",
            Ipv4Addr::new(198, 19, 0, 10),
            vec![
                ServicePort::tcp("http", 80, "web"),
                ServicePort::udp("dns", 53, 5353),
            ],
        );
        let slice = EndpointSlice::new(
            "web",
            "1",
            vec![
                EndpointPort::tcp("http", 8080),
                EndpointPort::udp("dns", 5353),
            ],
            vec![
                Endpoint::ready(Ipv4Addr::new(198, 18, 1, 2)),
                Endpoint::not_ready(Ipv4Addr::new(198, 18, 2, 2)),
            ],
        );
        let directory = scratch("manifests");
        let manifests = ManifestDir {
            path: directory.clone(),
        };
        manifests
            .write("web.yaml", &[service.to_value(), slice.to_value()])
            .expect("write");
        let names: Vec<String> = fs::read_dir(&directory)
            .expect("list")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["web.yaml"], "no temporary file may stay behind");

        let text = fs::read_to_string(directory.join("web.yaml")).expect("read back");
        let mut documents = serde_yaml::Deserializer::from_str(&text);
        let parsed = core::Service::deserialize(documents.next().expect("first document"))
            .expect("a v1 Service");
        let parsed_slice =
            discovery::EndpointSlice::deserialize(documents.next().expect("second document"))
                .expect("a v1 EndpointSlice");
        assert!(documents.next().is_none());
        fs::remove_dir_all(&directory).expect("clean up");

        let spec = parsed.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("198.19.0.10"));
        let ports = spec.ports.expect("ports");
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::String("web".into()))
        );
        assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
        assert_eq!(ports[1].target_port, Some(IntOrString::Int(5353)));

        let labels = parsed_slice.metadata.labels.expect("labels");
        assert_eq!(labels["kubernetes.io/service-name"], "web");
        assert_eq!(parsed_slice.address_type, "IPv4");
        let endpoints = parsed_slice.endpoints;
        assert_eq!(endpoints[0].addresses, ["198.18.1.2"]);
        assert_eq!(
            endpoints[1].conditions.as_ref().and_then(|c| c.ready),
            Some(false)
        );
        let ports = parsed_slice.ports.expect("ports");
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("http"), Some(8080))
        );
    }

    #[test]
    fn external_fields_are_what_kubernetes_types_accept() {
        let service = Service::new(
            "edge",
            Ipv4Addr::new(198, 19, 0, 11),
            vec![ServicePort::tcp("http", 80, 8080).with_node_port(30080)],
        )
        .with_type(ServiceType::LoadBalancer)
        .with_external_ips(&[Ipv4Addr::new(198, 18, 253, 2)])
        .with_external_traffic_policy(TrafficPolicy::Local)
        .with_health_check_node_port(32000)
        .with_source_ranges(&["198.18.254.100/32"])
        .with_ingress(&[Ipv4Addr::new(198, 18, 253, 1)]);
        let parsed: core::Service =
            serde_json::from_value(service.to_value()).expect("a v1 Service");
        let spec = parsed.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.ports.expect("ports")[0].node_port, Some(30080));
        assert_eq!(spec.external_ips, Some(vec!["198.18.253.2".to_owned()]));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.health_check_node_port, Some(32000));
        assert_eq!(
            spec.load_balancer_source_ranges,
            Some(vec!["198.18.254.100/32".to_owned()])
        );
        let ingress = parsed
            .status
            .and_then(|status| status.load_balancer)
            .and_then(|lb| lb.ingress)
            .expect("ingress");
        assert_eq!(ingress[0].ip.as_deref(), Some("198.18.253.1"));

        let address = Ipv4Addr::new(198, 18, 1, 2);
        let slice = EndpointSlice::new(
            "edge",
            "1",
            vec![EndpointPort::tcp("http", 8080)],
            vec![
                Endpoint::ready(address),
                Endpoint::ready(Ipv4Addr::new(198, 18, 33, 2)),
            ],
        )
        .with_node_name(address, "node-1");
        let parsed: discovery::EndpointSlice =
            serde_json::from_value(slice.to_value()).expect("a v1 EndpointSlice");
        assert_eq!(parsed.endpoints[0].node_name.as_deref(), Some("node-1"));
        assert_eq!(parsed.endpoints[1].node_name, None);
    }

    #[test]
    fn write_text_replaces_and_remove_deletes() {
        let directory = scratch("rewrite");
        let manifests = ManifestDir {
            path: directory.clone(),
        };
        manifests.write_text("a.yaml", "first").expect("write");
        manifests.write_text("a.yaml", "second").expect("rewrite");
        assert_eq!(
            fs::read_to_string(directory.join("a.yaml")).expect("read"),
            "second"
        );
        manifests.remove("a.yaml").expect("remove");
        assert!(
            manifests.remove("a.yaml").is_err(),
            "removing a missing file is an error"
        );
        assert_eq!(fs::read_dir(&directory).expect("list").count(), 0);
        fs::remove_dir_all(&directory).expect("clean up");
    }
}

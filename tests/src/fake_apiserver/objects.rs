//! The three resources the fake serves: their names and paths, what the
//! real server does to an object when it is written (server-set metadata,
//! defaulting, the few validations a test could trip over), and the exact
//! JSON shapes of lists, bookmarks and `Status` errors.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::{LoadBalancerStatus, Node, Service, ServiceStatus};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::serde::Serialize;
use k8s_openapi::serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// The resources the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// `v1/services`
    Service,
    /// `discovery.k8s.io/v1/endpointslices`
    EndpointSlice,
    /// `v1/nodes`
    Node,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 3] = [Self::Service, Self::EndpointSlice, Self::Node];

    pub fn kind(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The API group ("" for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "",
            Self::EndpointSlice => "discovery.k8s.io",
        }
    }

    /// The resource name in URLs, RBAC rules and error messages.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Service => "services",
            Self::EndpointSlice => "endpointslices",
            Self::Node => "nodes",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Self::Node)
    }

    pub(super) fn list_kind(self) -> String {
        format!("{}List", self.kind())
    }

    /// `kind.group` as the server names the type in `Invalid` errors.
    pub(super) fn qualified_kind(self) -> String {
        match self.group() {
            "" => self.kind().to_owned(),
            group => format!("{}.{group}", self.kind()),
        }
    }

    /// Fields the server indexes for `fieldSelector` on this resource.
    pub(super) fn selectable_fields(self) -> &'static [&'static str] {
        match self {
            Self::Service => &[
                "metadata.name",
                "metadata.namespace",
                "spec.clusterIP",
                "spec.type",
            ],
            Self::EndpointSlice => &["metadata.name", "metadata.namespace"],
            Self::Node => &["metadata.name", "spec.unschedulable"],
        }
    }

    pub(super) fn from_path(group: &str, plural: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.group() == group && kind.plural() == plural)
    }

    /// The object a BOOKMARK event carries: the type's zero value with only
    /// `metadata.resourceVersion` (and annotations) set, serialized the way
    /// Go serializes a zero struct (`creationTimestamp: null`, required
    /// lists as `null`).
    pub(super) fn bookmark_object(
        self,
        resource_version: u64,
        annotations: Option<Value>,
    ) -> Value {
        let mut metadata = json!({
            "resourceVersion": resource_version.to_string(),
            "creationTimestamp": null,
        });
        if let Some(annotations) = annotations {
            metadata["annotations"] = annotations;
        }
        let mut object =
            json!({"kind": self.kind(), "apiVersion": self.api_version(), "metadata": metadata});
        match self {
            Self::Service => {
                object["spec"] = json!({});
                object["status"] = json!({"loadBalancer": {}});
            }
            Self::EndpointSlice => {
                object["addressType"] = json!("");
                object["endpoints"] = Value::Null;
                object["ports"] = Value::Null;
            }
            Self::Node => {
                object["spec"] = json!({});
                object["status"] = json!({
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                    "nodeInfo": {
                        "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                        "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "",
                        "kubeProxyVersion": "", "operatingSystem": "", "architecture": "",
                    },
                });
            }
        }
        object
    }
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.plural())
    }
}

/// A refusal by the server, carried to the client as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl Rejection {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// `410 Gone` as the watch cache reports a resourceVersion it no longer has.
    pub fn too_old_resource_version(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// `504` as the server reports a resourceVersion it has not reached
    /// after waiting for it.
    pub fn too_large_resource_version(requested: u64, current: u64) -> Self {
        Self::new(
            504,
            "Timeout",
            format!("Too large resource version: {requested}, current: {current}"),
        )
        .with_details(json!({
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        }))
    }

    pub fn not_found(kind: ResourceKind, name: &str) -> Self {
        let mut details = json!({"name": name, "kind": kind.plural()});
        if !kind.group().is_empty() {
            details["group"] = json!(kind.group());
        }
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified_plural(kind)),
        )
        .with_details(details)
    }

    pub fn already_exists(kind: ResourceKind, name: &str) -> Self {
        let mut details = json!({"name": name, "kind": kind.plural()});
        if !kind.group().is_empty() {
            details["group"] = json!(kind.group());
        }
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified_plural(kind)),
        )
        .with_details(details)
    }

    pub fn conflict(kind: ResourceKind, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                qualified_plural(kind)
            ),
        )
    }

    /// `422 Invalid` for one field, worded as field.ErrorList renders it.
    pub fn invalid(qualified_kind: &str, name: &str, field: &str, detail: &str) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{qualified_kind} \"{name}\" is invalid: {field}: {detail}"),
        )
        .with_details(json!({
            "name": name,
            "kind": qualified_kind.split('.').next().unwrap_or(qualified_kind),
            "causes": [{"field": field, "message": detail}],
        }))
    }

    /// The `Status` object the server writes for this refusal.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        status["details"] = self.details.clone().unwrap_or_else(|| json!({}));
        status
    }
}

/// `services` or `endpointslices.discovery.k8s.io`, as errors name them.
fn qualified_plural(kind: ResourceKind) -> String {
    match kind.group() {
        "" => kind.plural().to_owned(),
        group => format!("{}.{group}", kind.plural()),
    }
}

pub(super) mod sealed {
    use super::{Rejection, WriteContext};

    /// Keeps [`super::FakeResource`] to the three types the fake serves, and
    /// carries what the server does to each on a write.
    pub trait Sealed {
        /// Applies what the real API server's defaulting and registry
        /// strategy do to this type on create and update.
        fn apply_server_defaults(&mut self, context: &WriteContext<'_>) -> Result<(), Rejection>;
    }
}

/// What the server knows while defaulting an object being written.
pub struct WriteContext<'a> {
    /// The stored object this write replaces.
    pub previous: Option<&'a Value>,
    /// Whether a ClusterIP is held by another Service.
    pub cluster_ip_taken: &'a dyn Fn(&str) -> bool,
    /// The range a missing ClusterIP is allocated from.
    pub service_cidr: (Ipv4Addr, u8),
}

/// A Kubernetes type the fake API server stores and serves: `Service`,
/// `EndpointSlice` or `Node`.
pub trait FakeResource:
    k8s_openapi::Resource
    + k8s_openapi::Metadata<Ty = ObjectMeta>
    + Serialize
    + DeserializeOwned
    + Clone
    + sealed::Sealed
{
    const RESOURCE: ResourceKind;
}

impl FakeResource for Service {
    const RESOURCE: ResourceKind = ResourceKind::Service;
}

impl FakeResource for EndpointSlice {
    const RESOURCE: ResourceKind = ResourceKind::EndpointSlice;
}

impl FakeResource for Node {
    const RESOURCE: ResourceKind = ResourceKind::Node;
}

impl sealed::Sealed for Service {
    fn apply_server_defaults(&mut self, context: &WriteContext<'_>) -> Result<(), Rejection> {
        let name = self.metadata.name.clone().unwrap_or_default();
        let previous_ip = context
            .previous
            .and_then(|previous| previous.pointer("/spec/clusterIP"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let spec = self.spec.get_or_insert_default();
        let service_type = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
        spec.session_affinity.get_or_insert_with(|| "None".into());
        for port in spec.ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".into());
            port.target_port.get_or_insert(IntOrString::Int(port.port));
        }
        if service_type != "ExternalName" {
            let requested = spec.cluster_ip.clone().filter(|ip| !ip.is_empty());
            let cluster_ip = match (requested, previous_ip) {
                (Some(requested), Some(previous)) if requested != previous => {
                    return Err(Rejection::invalid(
                        "Service",
                        &name,
                        "spec.clusterIPs[0]",
                        &format!("Invalid value: []string{{\"{requested}\"}}: may not change once set"),
                    ));
                }
                (Some(requested), _) => {
                    if requested != "None" {
                        requested.parse::<IpAddr>().map_err(|_| {
                            Rejection::invalid(
                                "Service",
                                &name,
                                "spec.clusterIPs[0]",
                                &format!("Invalid value: \"{requested}\": must be a valid IP address"),
                            )
                        })?;
                        if context.previous.is_none() && (context.cluster_ip_taken)(&requested) {
                            return Err(Rejection::invalid(
                                "Service",
                                &name,
                                "spec.clusterIPs",
                                &format!(
                                    "Invalid value: []string{{\"{requested}\"}}: failed to allocate IP \
                                     {requested}: provided IP is already allocated"
                                ),
                            ));
                        }
                    }
                    requested
                }
                // On update an unset ClusterIP keeps the allocated one.
                (None, Some(previous)) => previous,
                (None, None) => allocate_cluster_ip(context).ok_or_else(|| {
                    Rejection::new(
                        500,
                        "InternalError",
                        format!(
                            "Internal error occurred: failed to allocate a serviceIP: range is full \
                             ({}/{})",
                            context.service_cidr.0, context.service_cidr.1
                        ),
                    )
                })?,
            };
            let family = match cluster_ip.parse::<IpAddr>() {
                Ok(IpAddr::V6(_)) => "IPv6",
                _ => "IPv4",
            };
            spec.cluster_ips
                .get_or_insert_with(|| vec![cluster_ip.clone()]);
            spec.cluster_ip = Some(cluster_ip);
            spec.ip_families.get_or_insert_with(|| vec![family.into()]);
            spec.ip_family_policy
                .get_or_insert_with(|| "SingleStack".into());
            spec.internal_traffic_policy
                .get_or_insert_with(|| "Cluster".into());
        }
        if matches!(service_type.as_str(), "NodePort" | "LoadBalancer") {
            spec.external_traffic_policy
                .get_or_insert_with(|| "Cluster".into());
        }
        let status = self.status.get_or_insert_with(ServiceStatus::default);
        status
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default);
        Ok(())
    }
}

fn allocate_cluster_ip(context: &WriteContext<'_>) -> Option<String> {
    let (base, prefix) = context.service_cidr;
    let size = 1u64 << (32 - u32::from(prefix.min(32)));
    let base = u32::from(base) & !((size - 1) as u32);
    // The network and broadcast addresses are never handed out.
    (1..size.saturating_sub(1))
        .map(|offset| Ipv4Addr::from(base + offset as u32).to_string())
        .find(|candidate| !(context.cluster_ip_taken)(candidate))
}

impl sealed::Sealed for EndpointSlice {
    fn apply_server_defaults(&mut self, _context: &WriteContext<'_>) -> Result<(), Rejection> {
        if self.address_type.is_empty() {
            let name = self.metadata.name.clone().unwrap_or_default();
            return Err(Rejection::invalid(
                &ResourceKind::EndpointSlice.qualified_kind(),
                &name,
                "addressType",
                "Required value",
            ));
        }
        for port in self.ports.iter_mut().flatten() {
            port.name.get_or_insert_with(String::new);
            port.protocol.get_or_insert_with(|| "TCP".into());
        }
        Ok(())
    }
}

impl sealed::Sealed for Node {
    fn apply_server_defaults(&mut self, _context: &WriteContext<'_>) -> Result<(), Rejection> {
        Ok(())
    }
}

/// A random RFC 4122 version 4 UUID, as the server assigns to `metadata.uid`.
pub(super) fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let random = || {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.finish()
    };
    let bytes = (u128::from(random()) << 64 | u128::from(random())).to_be_bytes();
    let mut bytes = bytes;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Now, to the second (the precision `metav1.Time` keeps).
pub(super) fn now() -> Time {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_secs());
    let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
    Time(
        k8s_openapi::jiff::Timestamp::from_second(seconds)
            .unwrap_or(k8s_openapi::jiff::Timestamp::MAX),
    )
}

/// Rewrites fields the Go server serializes as `null` rather than omitting
/// (`EndpointSlice.endpoints` and `.ports` carry no `omitempty`, and an
/// empty list read back from storage is a nil slice).
pub(super) fn to_wire_shape(kind: ResourceKind, object: &mut Value) {
    if kind == ResourceKind::EndpointSlice
        && let Some(map) = object.as_object_mut()
    {
        for field in ["endpoints", "ports"] {
            let empty = match map.get(field) {
                None => true,
                Some(Value::Array(items)) => items.is_empty(),
                Some(_) => false,
            };
            if empty {
                map.insert(field.to_owned(), Value::Null);
            }
        }
    }
}

/// An item of a list response: the object without `kind` and `apiVersion`,
/// which the server only writes on the list itself.
pub(super) struct ListItem<'a>(pub &'a Value);

impl Serialize for ListItem<'_> {
    fn serialize<S: k8s_openapi::serde::Serializer>(
        &self,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        use k8s_openapi::serde::ser::SerializeMap;
        let Some(map) = self.0.as_object() else {
            return self.0.serialize(serializer);
        };
        let fields: Vec<(&String, &Value)> = map
            .iter()
            .filter(|(key, _)| key.as_str() != "kind" && key.as_str() != "apiVersion")
            .collect();
        let mut out = serializer.serialize_map(Some(fields.len()))?;
        for (key, value) in fields {
            out.serialize_entry(key, value)?;
        }
        out.end()
    }
}

/// Compares two stored objects ignoring `metadata.resourceVersion`: an
/// update that changes nothing else is a no-op for the real server (no new
/// resourceVersion, no watch event).
pub(super) fn same_apart_from_resource_version(a: &Value, b: &Value) -> bool {
    let strip = |value: &Value| {
        let mut value = value.clone();
        if let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.remove("resourceVersion");
        }
        value
    };
    strip(a) == strip(b)
}

/// Sets `metadata.resourceVersion` in a stored JSON object.
pub(super) fn set_resource_version(object: &mut Value, resource_version: u64) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.insert(
            "resourceVersion".into(),
            Value::String(resource_version.to_string()),
        );
    }
}

/// The `metadata.generation` the registry keeps for EndpointSlices: 1 on
/// create, +1 when anything outside metadata changes.
pub(super) fn endpoint_slice_generation(new: &Value, previous: Option<&Value>) -> i64 {
    let Some(previous) = previous else {
        return 1;
    };
    let generation = previous
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let body = |value: &Value| -> Map<String, Value> {
        value
            .as_object()
            .map(|map| {
                map.iter()
                    .filter(|(key, _)| key.as_str() != "metadata")
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    if body(new) == body(previous) {
        generation
    } else {
        generation + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_version_4_and_unique() {
        let a = new_uid();
        let b = new_uid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn list_items_lose_type_meta() {
        let object = json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "a"}});
        let text = serde_json::to_string(&ListItem(&object)).unwrap();
        assert_eq!(text, r#"{"metadata":{"name":"a"}}"#);
    }

    #[test]
    fn allocation_skips_taken_addresses() {
        let taken = |ip: &str| ip == "198.19.192.1";
        let context = WriteContext {
            previous: None,
            cluster_ip_taken: &taken,
            service_cidr: (Ipv4Addr::new(198, 19, 192, 0), 18),
        };
        assert_eq!(
            allocate_cluster_ip(&context).as_deref(),
            Some("198.19.192.2")
        );
    }
}

//! The Kubernetes API source: Services, EndpointSlices and this node's Node
//! (its addresses are the NodePort addresses), followed with kube-rs's
//! watchers and reflectors, as kube-proxy follows them with informers.
//!
//! - Each resource has a reflector: a watcher (list, then watch from the
//!   list's resourceVersion, bookmarks, resume; relist on `410 Gone`; an
//!   exponential backoff between failed attempts) feeding a store. The
//!   store swaps in a relist's objects only once the list is complete, so
//!   the state translated from it is never partial: a broken watch or a
//!   `410` ends in a translation of the complete new list, which the writer
//!   applies as a diff. Nothing is flushed meanwhile.
//! - The watches use kube-proxy's label selectors: no
//!   `service.kubernetes.io/headless`, and no
//!   `service.kubernetes.io/service-proxy-name` (or exactly the configured
//!   one, with `--service-proxy-name`). [`crate::translate`] applies the
//!   same rules again, so a source without selectors behaves the same.
//! - Every event that changes a store wakes the run loop; it waits
//!   [`BATCH_DELAY`] more so a burst (a rollout, a relist) is translated
//!   and written once, then translates every store and writes the diff.

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector::Lookup};
use kube::{Api, Client, Config};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::node::NodeAddresses;
use crate::translate::{self, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, Scope, Translation};

/// After a change, how long to wait for more before translating: a burst
/// of events (a relist, a rollout) is written once, while a single change
/// still reaches the maps within a few milliseconds.
pub const BATCH_DELAY: Duration = Duration::from_millis(5);

/// Annotation the EndpointSlice controller sets to the time of the change
/// (to a Pod or Service) that triggered the slice's last update.
pub const ANNOTATION_LAST_CHANGE_TRIGGER_TIME: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// A kubeconfig file; otherwise `$KUBECONFIG`, otherwise the in-cluster
    /// configuration (the ServiceAccount token and CA Kubernetes mounts).
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading the kubeconfig {}", .path.display())]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("loading the kubeconfig {}", .path.display())]
    LoadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("loading the kubeconfig named by $KUBECONFIG")]
    EnvKubeconfig(#[source] kube::config::KubeconfigError),
    #[error(
        "loading the in-cluster configuration (not in a Pod? pass --kubeconfig, or --manifests)"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("the {0} reflector stopped before its first list completed")]
    ReflectorStopped(&'static str),
}

/// Loads the client configuration: `--kubeconfig`, else `$KUBECONFIG`,
/// else in-cluster.
pub async fn client_config(options: &KubeOptions) -> Result<Config, KubeError> {
    let defaults = kube::config::KubeConfigOptions::default();
    if let Some(path) = &options.kubeconfig {
        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
            KubeError::ReadKubeconfig {
                path: path.clone(),
                source,
            }
        })?;
        return Config::from_custom_kubeconfig(kubeconfig, &defaults)
            .await
            .map_err(|source| KubeError::LoadKubeconfig {
                path: path.clone(),
                source,
            });
    }
    if std::env::var_os("KUBECONFIG").is_some_and(|value| !value.is_empty()) {
        return Config::from_kubeconfig(&defaults)
            .await
            .map_err(KubeError::EnvKubeconfig);
    }
    Config::incluster().map_err(KubeError::InCluster)
}

/// The label selector kube-proxy lists Services and EndpointSlices with.
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        None => format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"),
        Some(name) => format!("{LABEL_SERVICE_PROXY_NAME}={name},!{LABEL_HEADLESS}"),
    }
}

/// Counts of what the watches went through, for metrics.
pub trait WatchObserver: Send + Sync + 'static {
    /// A watch or list failed (the watcher retries with backoff).
    fn watch_error(&self, resource: &'static str);
    /// A list completed (the initial one or a relist).
    fn list_completed(&self, resource: &'static str);
}

/// One resource's reflector: its store and the task driving it.
struct Reflected<K: Lookup + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    task: JoinHandle<()>,
}

/// Starts the reflector of one resource; every event that changes its store
/// notifies `changes`.
fn reflect<K>(
    resource: &'static str,
    api: Api<K>,
    config: watcher::Config,
    changes: Arc<Notify>,
    observer: Arc<dyn WatchObserver>,
) -> Reflected<K>
where
    K: kube::Resource + Lookup + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    <K as Lookup>::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                // A relist is swapped into the store whole at InitDone;
                // before that the store still holds the previous list.
                Ok(Event::Init) => debug!(resource, "listing"),
                Ok(Event::InitApply(_)) => {}
                Ok(Event::InitDone) => {
                    debug!(resource, "list complete");
                    observer.list_completed(resource);
                    changes.notify_one();
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => changes.notify_one(),
                Err(error) => {
                    observer.watch_error(resource);
                    warn!(
                        resource,
                        "{}; retrying with backoff, the programmed state stays",
                        crate::agent::error_chain(&error)
                    );
                }
            }
        }
    });
    Reflected { store, task }
}

/// Services, EndpointSlices and this node's Node as the API server has them.
pub struct KubeSource {
    services: Reflected<Service>,
    slices: Reflected<EndpointSlice>,
    node: Option<Reflected<Node>>,
    node_name: Option<String>,
    changes: Arc<Notify>,
    /// When this source started: trigger times before it are not latencies
    /// of this agent (as kube-proxy ignores them too).
    started: jiff::Timestamp,
    /// The last trigger time seen per slice (namespace, name).
    trigger_times: HashMap<(String, String), jiff::Timestamp>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.services.task.abort();
        self.slices.task.abort();
        if let Some(node) = &self.node {
            node.task.abort();
        }
    }
}

impl KubeSource {
    /// Connects (lazily: the watchers connect, and retry, on their own) and
    /// starts the reflectors.
    pub fn start(
        config: Config,
        scope: &Scope,
        observer: Arc<dyn WatchObserver>,
    ) -> Result<Self, KubeError> {
        let client = Client::try_from(config).map_err(KubeError::Client)?;
        Ok(Self::start_with_client(client, scope, observer))
    }

    /// Starts the reflectors on an existing client.
    pub fn start_with_client(
        client: Client,
        scope: &Scope,
        observer: Arc<dyn WatchObserver>,
    ) -> Self {
        let changes = Arc::new(Notify::new());
        let selector = label_selector(scope.service_proxy_name.as_deref());
        let services = reflect(
            "services",
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            Arc::clone(&changes),
            Arc::clone(&observer),
        );
        let slices = reflect(
            "endpointslices",
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            Arc::clone(&changes),
            Arc::clone(&observer),
        );
        let node = scope.node_name.as_ref().map(|name| {
            reflect(
                "nodes",
                Api::<Node>::all(client),
                watcher::Config::default().fields(&format!("metadata.name={name}")),
                Arc::clone(&changes),
                observer,
            )
        });
        Self {
            services,
            slices,
            node,
            node_name: scope.node_name.clone(),
            changes,
            started: jiff::Timestamp::now(),
            trigger_times: HashMap::new(),
        }
    }

    /// Waits until every resource's first list is complete, so the first
    /// programming never sees half of a Service.
    pub async fn wait_synced(&self) -> Result<(), KubeError> {
        let stopped = |resource| move |_| KubeError::ReflectorStopped(resource);
        self.services
            .store
            .wait_until_ready()
            .await
            .map_err(stopped("services"))?;
        self.slices
            .store
            .wait_until_ready()
            .await
            .map_err(stopped("endpointslices"))?;
        if let Some(node) = &self.node {
            node.store
                .wait_until_ready()
                .await
                .map_err(stopped("nodes"))?;
            match (&self.node_name, node.store.is_empty()) {
                (Some(name), true) => warn!(
                    node = name.as_str(),
                    "no Node named {name}: is --node-name (NODE_NAME) right? \
                     traffic policies Local will find no local endpoint, and NodePorts no node address"
                ),
                (Some(name), false) => info!(node = name.as_str(), "found this node's Node"),
                (None, _) => {}
            }
        }
        info!(
            services = self.services.store.len(),
            endpointslices = self.slices.store.len(),
            "initial lists complete"
        );
        Ok(())
    }

    /// Waits for a change, then [`BATCH_DELAY`] more for the rest of its
    /// burst. Changes made while the caller applies are not lost: the next
    /// call returns at once.
    pub async fn changed(&self) {
        self.changes.notified().await;
        tokio::time::sleep(BATCH_DELAY).await;
    }

    /// Translates what the stores hold now.
    pub fn translate(&self, scope: &Scope) -> Translation {
        let services = self.services.store.state();
        let slices = self.slices.store.state();
        translate::translate_in(
            scope,
            services.iter().map(Arc::as_ref),
            slices.iter().map(Arc::as_ref),
        )
    }

    /// This node's addresses as its Node has them now (none without
    /// `--node-name`, or before the Node exists). A change of the Node
    /// wakes [`KubeSource::changed`] like any other event.
    pub fn node_addresses(&self) -> NodeAddresses {
        let Some(node) = &self.node else {
            return NodeAddresses::default();
        };
        // The watch selects the Node by name: the store holds it or nothing.
        node.store
            .state()
            .first()
            .map(|node| super::node::of_node(node))
            .unwrap_or_default()
    }

    /// The `last-change-trigger-time` of every slice whose annotation
    /// changed since the last call, if later than this source's start: the
    /// changes the caller just programmed.
    pub fn new_trigger_times(&mut self) -> Vec<jiff::Timestamp> {
        let slices = self.slices.store.state();
        let mut current = HashMap::with_capacity(slices.len());
        let mut new = Vec::new();
        for slice in &slices {
            let Some(time) = slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME))
                .and_then(|value| value.parse::<jiff::Timestamp>().ok())
            else {
                continue;
            };
            let key = (
                slice.metadata.namespace.clone().unwrap_or_default(),
                slice.metadata.name.clone().unwrap_or_default(),
            );
            if time > self.started && self.trigger_times.get(&key) != Some(&time) {
                new.push(time);
            }
            current.insert(key, time);
        }
        self.trigger_times = current;
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::Ipv4Addr;
    use std::sync::Mutex;

    use bytes::Bytes;
    use futures::stream::{self, BoxStream};
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use hyper::{Request, Response};
    use serde_json::{Value, json};
    use tokio::sync::mpsc;

    struct NoObserver;

    impl WatchObserver for NoObserver {
        fn watch_error(&self, _: &'static str) {}
        fn list_completed(&self, _: &'static str) {}
    }

    type FakeBody = UnsyncBoxBody<Bytes, Infallible>;

    fn json_response(value: &Value) -> Response<FakeBody> {
        Response::new(Full::new(Bytes::from(value.to_string())).boxed_unsync())
    }

    fn node(addresses: &[(&str, &str)], resource_version: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-a", "resourceVersion": resource_version},
            "status": {"addresses": addresses
                .iter()
                .map(|(kind, address)| json!({"type": kind, "address": address}))
                .collect::<Vec<_>>()},
        })
    }

    /// An API server with no Services or EndpointSlices and one Node,
    /// whose watch streams the events sent on `node_events` (the other
    /// watches stay open and quiet). Only what the reflectors ask.
    fn fake_api(initial_node: Value, node_events: mpsc::UnboundedReceiver<Value>) -> Client {
        let node_events = Arc::new(Mutex::new(Some(node_events)));
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let node_events = Arc::clone(&node_events);
            let initial_node = initial_node.clone();
            async move {
                let path = request.uri().path().to_owned();
                let watch = request
                    .uri()
                    .query()
                    .is_some_and(|query| query.split('&').any(|pair| pair == "watch=true"));
                let (kind, items) = match path.as_str() {
                    "/api/v1/nodes" => ("NodeList", vec![initial_node]),
                    "/api/v1/services" => ("ServiceList", Vec::new()),
                    "/apis/discovery.k8s.io/v1/endpointslices" => ("EndpointSliceList", Vec::new()),
                    other => panic!("unexpected request for {other}"),
                };
                if !watch {
                    return Ok::<_, Infallible>(json_response(&json!({
                        "kind": kind,
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": "1"},
                        "items": items,
                    })));
                }
                let node_watch = match path.as_str() {
                    "/api/v1/nodes" => node_events.lock().unwrap().take(),
                    _ => None,
                };
                let events: BoxStream<'static, Result<Frame<Bytes>, Infallible>> = match node_watch
                {
                    Some(receiver) => stream::unfold(receiver, |mut receiver| async move {
                        let object = receiver.recv().await?;
                        let line = json!({"type": "MODIFIED", "object": object});
                        Some((Ok(Frame::data(Bytes::from(format!("{line}\n")))), receiver))
                    })
                    .boxed(),
                    None => stream::pending().boxed(),
                };
                Ok(Response::new(StreamBody::new(events).boxed_unsync()))
            }
        });
        Client::new(service, "default")
    }

    #[tokio::test]
    async fn node_addresses_follow_the_node() {
        let (node_events, receiver) = mpsc::unbounded_channel();
        let client = fake_api(
            node(
                &[("Hostname", "node-a"), ("InternalIP", "198.18.254.2")],
                "1",
            ),
            receiver,
        );
        let scope = Scope {
            node_name: Some("node-a".into()),
            ..Scope::default()
        };
        let source = KubeSource::start_with_client(client, &scope, Arc::new(NoObserver));
        tokio::time::timeout(Duration::from_secs(10), source.wait_synced())
            .await
            .expect("the initial lists")
            .unwrap();
        let addresses = source.node_addresses();
        assert_eq!(addresses.addresses, [Ipv4Addr::new(198, 18, 254, 2)]);
        assert_eq!(addresses.snat, Some(Ipv4Addr::new(198, 18, 254, 2)));

        // The Node gets another InternalIP first and an ExternalIP: the
        // source wakes up and reports them.
        node_events
            .send(node(
                &[
                    ("InternalIP", "198.18.254.3"),
                    ("InternalIP", "198.18.254.2"),
                    ("ExternalIP", "198.18.253.7"),
                ],
                "2",
            ))
            .unwrap();
        let wanted = [
            Ipv4Addr::new(198, 18, 254, 3),
            Ipv4Addr::new(198, 18, 254, 2),
            Ipv4Addr::new(198, 18, 253, 7),
        ];
        tokio::time::timeout(Duration::from_secs(10), async {
            while source.node_addresses().addresses != wanted {
                source.changed().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("still {:?}", source.node_addresses()));
        assert_eq!(
            source.node_addresses().snat,
            Some(Ipv4Addr::new(198, 18, 254, 3))
        );
    }

    #[test]
    fn no_node_name_no_addresses() {
        // Without --node-name there is no Node to watch.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (_events, receiver) = mpsc::unbounded_channel();
            let client = fake_api(node(&[("InternalIP", "198.18.254.2")], "1"), receiver);
            let source =
                KubeSource::start_with_client(client, &Scope::default(), Arc::new(NoObserver));
            assert!(source.node.is_none());
            assert_eq!(source.node_addresses(), NodeAddresses::default());
        });
    }

    #[test]
    fn selectors_are_kube_proxys() {
        assert_eq!(
            label_selector(None),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        assert_eq!(
            label_selector(Some("lb")),
            "service.kubernetes.io/service-proxy-name=lb,!service.kubernetes.io/headless"
        );
    }
}

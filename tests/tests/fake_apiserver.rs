//! The fake API server against kube-rs 5, the client the agent uses: if
//! kube's client and its runtime watcher list, watch, resume and relist
//! against it as they do against kube-apiserver, tests of the agent's
//! Kubernetes source mean something. A raw HTTP client checks the wire
//! format itself (chunked watch streams, list shapes, Status errors).
//!
//! Every wait is bounded: no test can hang.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watch_object};
use kube::{Client, ResourceExt};
use lb_tests::dirs::ScratchDir;
use lb_tests::fake_apiserver::{FakeApiConfig, FakeApiServer, ResourceKind, Verb};
use lb_tests::names;
use lb_tests::netns::NetNs;
use serde_json::{Value, json};

const STEP: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {STEP:?}"))
}

fn service(name: &str, cluster_ip: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]},
    }))
    .expect("a valid Service")
}

fn endpoint_slice(name: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|address| json!({"addresses": [address], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080}],
    }))
    .expect("a valid EndpointSlice")
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name}})).expect("a valid Node")
}

/// A kube client configured the way the agent gets one: from a kubeconfig file.
struct Connected {
    client: Client,
    _dir: ScratchDir,
}

async fn connect(server: &FakeApiServer) -> Connected {
    let dir = ScratchDir::create(&names::unique("fakeapi")).expect("scratch directory");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kube reads the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kube accepts the kubeconfig");
    let client = Client::try_from(config).expect("kube builds a client for plain http");
    Connected { client, _dir: dir }
}

/// A kube-runtime watcher polled continuously by its own task, as the
/// agent runs one: it keeps watching while the test waits on the server.
struct Watcher<K> {
    events: tokio::sync::mpsc::UnboundedReceiver<watcher::Result<Event<K>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Drop for Watcher<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn_watcher<K: Send + 'static>(
    mut stream: BoxStream<'static, watcher::Result<Event<K>>>,
) -> Watcher<K> {
    let (sender, events) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            if sender.send(event).is_err() {
                break;
            }
        }
    });
    Watcher { events, task }
}

fn watch<K>(api: Api<K>, config: watcher::Config) -> Watcher<K>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    spawn_watcher(watcher::watcher(api, config).boxed())
}

async fn next<K>(stream: &mut Watcher<K>) -> watcher::Result<Event<K>> {
    within("watcher event", stream.events.recv())
        .await
        .expect("a watcher stream never ends")
}

/// The next event, skipping the errors the watcher recovers from.
async fn next_event<K>(stream: &mut Watcher<K>) -> Event<K> {
    loop {
        if let Ok(event) = next(stream).await {
            return event;
        }
    }
}

/// Reads a complete initial sync (Init, InitApply..., InitDone) and returns
/// the names listed.
async fn initial_sync<K: ResourceExt>(stream: &mut Watcher<K>) -> Vec<String> {
    match next_event(stream).await {
        Event::Init => {}
        other => panic!("expected Init, got {}", describe(&other)),
    }
    let mut names = Vec::new();
    loop {
        match next_event(stream).await {
            Event::InitApply(object) => names.push(object.name_any()),
            Event::InitDone => return names,
            other => panic!("expected InitApply or InitDone, got {}", describe(&other)),
        }
    }
}

fn describe<K: ResourceExt>(event: &Event<K>) -> String {
    match event {
        Event::Init => "Init".into(),
        Event::InitApply(object) => format!("InitApply({})", object.name_any()),
        Event::InitDone => "InitDone".into(),
        Event::Apply(object) => format!("Apply({})", object.name_any()),
        Event::Delete(object) => format!("Delete({})", object.name_any()),
    }
}

/// Polls `condition` without blocking the runtime the watchers run on.
async fn wait_for(
    server: &FakeApiServer,
    what: &str,
    mut condition: impl FnMut(&FakeApiServer) -> bool,
) {
    let deadline = Instant::now() + STEP;
    while !condition(server) {
        assert!(Instant::now() < deadline, "{what}: not within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The same, for the synchronous tests.
fn wait_for_blocking(
    server: &FakeApiServer,
    what: &str,
    condition: impl FnMut(&FakeApiServer) -> bool,
) {
    assert!(
        server.wait_until(STEP, condition),
        "{what}: not within {STEP:?}"
    );
}

fn watches_of(
    server: &FakeApiServer,
    kind: ResourceKind,
) -> Vec<lb_tests::fake_apiserver::RequestRecord> {
    server
        .requests()
        .into_iter()
        .filter(|record| record.is(kind, Verb::Watch))
        .collect()
}

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 client, to see the bytes kube-rs would see.

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The chunks of a chunked body, in order.
    chunks: Vec<Vec<u8>>,
    /// Whether a chunked body ended with its terminating chunk (a clean
    /// end) rather than the connection dropping.
    complete: bool,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// The events of a watch body, one per chunk and line.
    fn events(&self) -> Vec<Value> {
        self.chunks
            .iter()
            .map(|chunk| {
                assert_eq!(chunk.last(), Some(&b'\n'), "each chunk is one line");
                let line = &chunk[..chunk.len() - 1];
                assert!(!line.contains(&b'\n'), "one event per chunk");
                serde_json::from_slice(line).expect("each line is a JSON event")
            })
            .collect()
    }
}

fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> RawResponse {
    let mut stream = TcpStream::connect_timeout(&addr, STEP).expect("connect to the fake");
    stream
        .set_read_timeout(Some(STEP))
        .expect("set a read timeout");
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut raw = Vec::new();
    // A dropped connection may end in a reset: what arrived before counts.
    let _ = stream.read_to_end(&mut raw);
    let head_end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(": "))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let mut response = RawResponse {
        status,
        headers,
        body: Vec::new(),
        chunks: Vec::new(),
        complete: false,
    };
    let mut rest = &raw[head_end + 4..];
    if response.header("transfer-encoding") == Some("chunked") {
        while let Some(line_end) = rest.windows(2).position(|window| window == b"\r\n") {
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[..line_end]).expect("hex size"),
                16,
            )
            .expect("a chunk size");
            rest = &rest[line_end + 2..];
            if size == 0 {
                response.complete = true;
                break;
            }
            if rest.len() < size + 2 {
                break;
            }
            response.chunks.push(rest[..size].to_vec());
            response.body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    } else {
        response.body = rest.to_vec();
        response.complete = true;
    }
    response
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_lists_through_a_kubeconfig_and_sees_server_shaped_objects() {
    let server = FakeApiServer::start().expect("start the fake");
    let created = server
        .create(&service("web", "198.19.0.10"))
        .expect("create");
    // What the server sets and defaults, as kube-apiserver would.
    let metadata = &created.metadata;
    assert_eq!(metadata.uid.as_ref().map(String::len), Some(36));
    assert!(metadata.creation_timestamp.is_some());
    assert_eq!(
        metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    let spec = created.spec.as_ref().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.cluster_ips, Some(vec!["198.19.0.10".to_owned()]));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    let port = &spec.ports.as_ref().expect("ports")[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
    );
    let allocated = server
        .create(&serde_json::from_value::<Service>(json!({"metadata": {"name": "auto"}})).unwrap())
        .expect("create without a ClusterIP");
    let allocated_ip = allocated
        .spec
        .unwrap()
        .cluster_ip
        .expect("an allocated ClusterIP");
    assert!(allocated_ip.starts_with("198.19."), "{allocated_ip}");
    server
        .create(&endpoint_slice("web-empty", "web", &[]))
        .expect("create slice");
    server.create(&node("node-a")).expect("create node");

    let connected = connect(&server).await;
    let services: Api<Service> = Api::all(connected.client.clone());
    let list = within("list", services.list(&ListParams::default()))
        .await
        .expect("list services");
    let names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["auto", "web"], "lists come in key order");
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    let namespaced: Api<Service> = Api::namespaced(connected.client.clone(), "default");
    let web = within("get", namespaced.get("web")).await.expect("get web");
    assert_eq!(web.metadata.uid, created.metadata.uid);
    let missing = within("get", namespaced.get("nope"))
        .await
        .expect_err("no such service");
    assert!(
        matches!(missing, kube::Error::Api(status) if status.code == 404 && status.reason == "NotFound")
    );
    let slices: Api<EndpointSlice> = Api::namespaced(connected.client.clone(), "default");
    let slice = within("get", slices.get("web-empty"))
        .await
        .expect("get slice");
    assert!(slice.endpoints.is_empty());
    assert_eq!(slice.metadata.generation, Some(1));
    let nodes: Api<Node> = Api::all(connected.client.clone());
    assert_eq!(
        within("get", nodes.get("node-a"))
            .await
            .expect("get node")
            .name_any(),
        "node-a"
    );

    // The raw bytes: list items carry no kind/apiVersion; an empty slice's
    // endpoints are null, as Go serializes a nil slice.
    let raw = raw_request(server.addr(), "GET", "/api/v1/services", &[]);
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("content-type"), Some("application/json"));
    let body = raw.json();
    assert_eq!(body["kind"], "ServiceList");
    assert_eq!(body["apiVersion"], "v1");
    assert!(body["items"][0].get("kind").is_none());
    assert!(body["items"][0].get("apiVersion").is_none());
    assert_eq!(body["items"][0]["status"], json!({"loadBalancer": {}}));
    let raw = raw_request(
        server.addr(),
        "GET",
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-empty",
        &[],
    );
    let body = raw.json();
    assert_eq!(body["kind"], "EndpointSlice");
    assert_eq!(body["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(body["endpoints"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_is_consistent_and_expires_with_the_history() {
    let server = FakeApiServer::start().expect("start the fake");
    for index in 0..25 {
        server
            .create(&service(
                &format!("svc-{index:02}"),
                &format!("198.19.1.{index}"),
            ))
            .expect("create");
    }
    let connected = connect(&server).await;
    let services: Api<Service> = Api::all(connected.client.clone());
    let first = within("list", services.list(&ListParams::default().limit(10)))
        .await
        .expect("first page");
    assert_eq!(first.items.len(), 10);
    assert_eq!(first.metadata.remaining_item_count, Some(15));
    let token = first.metadata.continue_.clone().expect("a continue token");
    // Changes after the first page do not show in later pages.
    server
        .create(&service("svc-99", "198.19.1.99"))
        .expect("create");
    server
        .delete::<Service>("default", "svc-24")
        .expect("delete");
    let second = within(
        "list",
        services.list(&ListParams::default().limit(10).continue_token(&token)),
    )
    .await
    .expect("second page");
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    assert_eq!(
        second.items.first().map(ResourceExt::name_any).as_deref(),
        Some("svc-10")
    );
    let token = second.metadata.continue_.clone().expect("a continue token");
    let third = within(
        "list",
        services.list(&ListParams::default().limit(10).continue_token(&token)),
    )
    .await
    .expect("third page");
    let names: Vec<String> = third.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names.len(), 5);
    assert_eq!(
        names.last().map(String::as_str),
        Some("svc-24"),
        "deleted after the snapshot"
    );
    assert!(third.metadata.continue_.is_none());

    // An exact list at the first page's resourceVersion sees that past.
    let at: String = first.metadata.resource_version.clone().unwrap();
    let exact = within(
        "list",
        services.list(
            &ListParams::default()
                .at(&at)
                .matching(kube::api::VersionMatch::Exact),
        ),
    )
    .await
    .expect("exact list");
    assert_eq!(exact.items.len(), 25);
    assert!(exact.items.iter().all(|item| item.name_any() != "svc-99"));
    let current = within("list", services.list(&ListParams::default()))
        .await
        .expect("list");
    assert_eq!(current.items.len(), 25);
    assert!(current.items.iter().any(|item| item.name_any() == "svc-99"));

    // Once the history is compacted, the old token and version are gone.
    server.compact();
    let expired = within(
        "list",
        services.list(&ListParams::default().limit(10).continue_token(&token)),
    )
    .await
    .expect_err("the token is too old");
    assert!(
        matches!(&expired, kube::Error::Api(status) if status.code == 410 && status.reason == "Expired")
    );
    let expired = within(
        "list",
        services.list(
            &ListParams::default()
                .at(&at)
                .matching(kube::api::VersionMatch::Exact),
        ),
    )
    .await
    .expect_err("the version is too old");
    assert!(matches!(&expired, kube::Error::Api(status) if status.code == 410));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_syncs_then_sees_every_event_type() {
    let server = FakeApiServer::start().expect("start the fake");
    server.create(&service("a", "198.19.2.1")).expect("create");
    server.create(&service("b", "198.19.2.2")).expect("create");
    let connected = connect(&server).await;
    let mut services = watch(
        Api::<Service>::all(connected.client.clone()),
        watcher::Config::default(),
    );
    assert_eq!(initial_sync(&mut services).await, ["a", "b"]);

    // What kube-runtime's watcher sent: a paginated list, then a watch from
    // the list's resourceVersion with bookmarks.
    let list_version = server.resource_version().to_string();
    let requests = server.requests();
    let list = requests
        .iter()
        .find(|record| record.is(ResourceKind::Service, Verb::List))
        .expect("a list");
    assert_eq!(list.param("limit"), Some("500"));
    assert_eq!(list.param("resourceVersion"), None);
    wait_for(&server, "the watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 1
    })
    .await;
    let watch_request = &watches_of(&server, ResourceKind::Service)[0];
    assert_eq!(
        watch_request.param("resourceVersion"),
        Some(list_version.as_str())
    );
    assert_eq!(watch_request.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(watch_request.param("timeoutSeconds"), Some("290"));
    assert_eq!(watch_request.param("sendInitialEvents"), None);

    server.create(&service("c", "198.19.2.3")).expect("create");
    assert!(matches!(next_event(&mut services).await, Event::Apply(s) if s.name_any() == "c"));
    let mut changed = server.get::<Service>("default", "a").expect("a exists");
    changed.metadata.labels = Some([("tier".to_owned(), "web".to_owned())].into());
    let updated = server.update(&changed).expect("update");
    match next_event(&mut services).await {
        Event::Apply(service) => {
            assert_eq!(service.name_any(), "a");
            assert_eq!(
                service.metadata.resource_version,
                updated.metadata.resource_version
            );
            assert_eq!(
                service.labels().get("tier").map(String::as_str),
                Some("web")
            );
        }
        other => panic!("expected Apply(a), got {}", describe(&other)),
    }
    // An update that changes nothing is no event at all (as with etcd).
    let before = server.resource_version();
    server.apply(&updated).expect("no-op update");
    assert_eq!(server.resource_version(), before);
    server.delete::<Service>("default", "b").expect("delete");
    match next_event(&mut services).await {
        Event::Delete(service) => {
            assert_eq!(service.name_any(), "b");
            assert_eq!(
                service.metadata.resource_version,
                Some(server.resource_version().to_string())
            );
        }
        other => panic!("expected Delete(b), got {}", describe(&other)),
    }
    // A stale resourceVersion on update conflicts.
    let stale = server.update(&changed).expect_err("stale update");
    assert!(matches!(
        stale,
        lb_tests::fake_apiserver::FakeApiError::Rejected { code: 409, .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_watch_resumes_from_the_last_version_without_relisting() {
    let server = FakeApiServer::start().expect("start the fake");
    server.create(&service("a", "198.19.3.1")).expect("create");
    let connected = connect(&server).await;
    let mut services = watch(
        Api::<Service>::all(connected.client.clone()),
        watcher::Config::default(),
    );
    initial_sync(&mut services).await;
    wait_for(&server, "the watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 1
    })
    .await;
    server.create(&service("b", "198.19.3.2")).expect("create");
    assert!(matches!(next_event(&mut services).await, Event::Apply(s) if s.name_any() == "b"));
    let last_seen = server.resource_version();

    assert_eq!(server.break_watches(), 1);
    // Written while the watch is down: the resumed watch replays it.
    server.create(&service("c", "198.19.3.3")).expect("create");
    assert!(matches!(next_event(&mut services).await, Event::Apply(s) if s.name_any() == "c"));
    assert_eq!(
        server.count_requests(ResourceKind::Service, Verb::List),
        1,
        "no relist"
    );
    let watches = watches_of(&server, ResourceKind::Service);
    assert_eq!(watches.len(), 2);
    assert_eq!(
        watches[1].param("resourceVersion"),
        Some(last_seen.to_string().as_str())
    );

    // A clean end (as timeoutSeconds gives) resumes the same way.
    wait_for(&server, "the second watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 1
    })
    .await;
    assert_eq!(server.close_watches(), 1);
    server.delete::<Service>("default", "a").expect("delete");
    assert!(matches!(next_event(&mut services).await, Event::Delete(s) if s.name_any() == "a"));
    assert_eq!(
        server.count_requests(ResourceKind::Service, Verb::List),
        1,
        "no relist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_move_the_resume_point() {
    let server = FakeApiServer::start().expect("start the fake");
    server.create(&service("a", "198.19.4.1")).expect("create");
    let connected = connect(&server).await;
    let mut services = watch(
        Api::<Service>::all(connected.client.clone()),
        watcher::Config::default(),
    );
    initial_sync(&mut services).await;
    wait_for(&server, "the watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 1
    })
    .await;
    // Writes to other resources move the global resourceVersion; the
    // bookmark tells the service watcher it is current up to there.
    for index in 0..3 {
        server
            .create(&node(&format!("node-{index}")))
            .expect("create node");
    }
    let bookmarked = server.resource_version();
    assert_eq!(server.send_bookmarks(), 1);
    // A clean end after the bookmark (the stream is ordered, so the
    // watcher reads the bookmark first), and history from before it gone:
    // the watcher resumes from the bookmark, which is still valid.
    assert_eq!(server.close_watches(), 1);
    server.compact();
    server.create(&service("b", "198.19.4.2")).expect("create");
    assert!(matches!(next_event(&mut services).await, Event::Apply(s) if s.name_any() == "b"));
    let watches = watches_of(&server, ResourceKind::Service);
    assert_eq!(watches.len(), 2);
    assert_eq!(
        watches[1].param("resourceVersion"),
        Some(bookmarked.to_string().as_str())
    );
    assert_eq!(
        server.count_requests(ResourceKind::Service, Verb::List),
        1,
        "no relist"
    );

    // The bookmark itself, on the wire.
    let addr = server.addr();
    let path = format!(
        "/api/v1/services?watch=true&allowWatchBookmarks=true&timeoutSeconds=2&resourceVersion={}",
        server.resource_version()
    );
    let raw_watch = tokio::task::spawn_blocking(move || raw_request(addr, "GET", &path, &[]));
    wait_for(&server, "the raw watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 2
    })
    .await;
    assert_eq!(server.send_bookmarks(), 2);
    let raw = raw_watch.await.expect("raw watch thread");
    let events = raw.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "BOOKMARK");
    let bookmark = &events[0]["object"];
    assert_eq!(bookmark["kind"], "Service");
    assert_eq!(bookmark["apiVersion"], "v1");
    assert_eq!(
        bookmark["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );
    assert!(bookmark["metadata"].get("name").is_none());
    assert!(raw.complete, "the watch ends cleanly at timeoutSeconds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_resource_version_makes_the_watcher_relist() {
    let server = FakeApiServer::start().expect("start the fake");
    server.create(&service("a", "198.19.5.1")).expect("create");
    let connected = connect(&server).await;
    let mut services = watch(
        Api::<Service>::all(connected.client.clone()),
        watcher::Config::default().disable_bookmarks(),
    );
    initial_sync(&mut services).await;
    wait_for(&server, "the watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 1
    })
    .await;
    server.create(&service("b", "198.19.5.2")).expect("create");
    assert!(matches!(next_event(&mut services).await, Event::Apply(s) if s.name_any() == "b"));

    // History moves past the watcher's resourceVersion (a write it does
    // not watch, then compaction) and its watch breaks: resuming answers
    // an ERROR 410 event, and the watcher relists.
    server.create(&node("node-a")).expect("create node");
    server.compact();
    assert_eq!(server.break_watches(), 1);
    let gone = next(&mut services).await.expect_err("the 410");
    assert!(
        matches!(&gone, watcher::Error::WatchError(status) if status.code == 410 && status.reason == "Expired"),
        "{gone:?}"
    );
    assert_eq!(initial_sync(&mut services).await, ["a", "b"]);
    assert_eq!(
        server.count_requests(ResourceKind::Service, Verb::List),
        2,
        "one relist"
    );
    let watches = watches_of(&server, ResourceKind::Service);
    assert_eq!(
        watches[1].status, 200,
        "the 410 travels inside the watch stream"
    );

    // The same ERROR event can arrive in an open watch (etcd compaction).
    wait_for(&server, "the new watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 1
    })
    .await;
    assert_eq!(server.expire_watches(), 1);
    let gone = next(&mut services).await.expect_err("the 410");
    assert!(
        matches!(&gone, watcher::Error::WatchError(status) if status.code == 410),
        "{gone:?}"
    );
    assert_eq!(initial_sync(&mut services).await, ["a", "b"]);
    assert_eq!(
        server.count_requests(ResourceKind::Service, Verb::List),
        3,
        "another relist"
    );
    server.delete::<Service>("default", "a").expect("delete");
    assert!(matches!(next_event(&mut services).await, Event::Delete(s) if s.name_any() == "a"));

    // On the wire: a too-old watch is a 200 with one ERROR event.
    let raw = raw_request(
        server.addr(),
        "GET",
        "/api/v1/services?watch=true&resourceVersion=1",
        &[],
    );
    assert_eq!(raw.status, 200);
    assert!(raw.complete);
    let events = raw.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["kind"], "Status");
    assert_eq!(events[0]["object"]["code"], 410);
    assert_eq!(events[0]["object"]["reason"], "Expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_survives_a_server_restart() {
    let server = FakeApiServer::start().expect("start the fake");
    server.create(&service("a", "198.19.6.1")).expect("create");
    let connected = connect(&server).await;
    let mut services = spawn_watcher(
        watcher::watcher(
            Api::<Service>::all(connected.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .boxed(),
    );
    initial_sync(&mut services).await;
    wait_for(&server, "the watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 1
    })
    .await;
    server.restart(Duration::from_millis(300));
    server.create(&service("b", "198.19.6.2")).expect("create");
    assert!(matches!(next_event(&mut services).await, Event::Apply(s) if s.name_any() == "b"));
    server.create(&service("c", "198.19.6.3")).expect("create");
    assert!(matches!(next_event(&mut services).await, Event::Apply(s) if s.name_any() == "c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_watch_by_field_selector() {
    let server = FakeApiServer::start().expect("start the fake");
    server.create(&node("node-a")).expect("create");
    server.create(&node("node-b")).expect("create");
    let connected = connect(&server).await;
    let (node_sender, mut node_a) = tokio::sync::mpsc::unbounded_channel();
    let mut node_stream =
        watch_object(Api::<Node>::all(connected.client.clone()), "node-a").boxed();
    let node_task = tokio::spawn(async move {
        while let Some(event) = node_stream.next().await {
            if node_sender.send(event).is_err() {
                break;
            }
        }
    });
    let found = within("node-a", node_a.recv())
        .await
        .expect("an event")
        .expect("no error");
    assert_eq!(found.map(|node| node.name_any()).as_deref(), Some("node-a"));
    wait_for(&server, "the node watch", |server| {
        server.open_watches(Some(ResourceKind::Node)) == 1
    })
    .await;
    let list = server
        .requests()
        .into_iter()
        .find(|record| record.is(ResourceKind::Node, Verb::List))
        .expect("a node list");
    assert_eq!(list.param("fieldSelector"), Some("metadata.name=node-a"));

    // Another node's change is not seen; this node's is.
    let mut other = server.get::<Node>("", "node-b").expect("node-b");
    other.metadata.labels = Some([("x".to_owned(), "1".to_owned())].into());
    server.update(&other).expect("update node-b");
    let mut mine = server.get::<Node>("", "node-a").expect("node-a");
    mine.metadata.labels = Some([("x".to_owned(), "2".to_owned())].into());
    server.update(&mine).expect("update node-a");
    let updated = within("node-a", node_a.recv())
        .await
        .expect("an event")
        .expect("no error");
    assert_eq!(
        updated
            .and_then(|node| node.labels().get("x").cloned())
            .as_deref(),
        Some("2")
    );
    server.delete::<Node>("", "node-a").expect("delete");
    let deleted = within("node-a", node_a.recv())
        .await
        .expect("an event")
        .expect("no error");
    assert!(deleted.is_none());
    node_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selected_watch_sees_objects_enter_and_leave() {
    let server = FakeApiServer::start().expect("start the fake");
    server
        .create(&service("plain", "198.19.7.1"))
        .expect("create");
    let mut other_proxy = service("other-proxy", "198.19.7.2");
    other_proxy.metadata.labels = Some(
        [(
            "service.kubernetes.io/service-proxy-name".to_owned(),
            "other".to_owned(),
        )]
        .into(),
    );
    server.create(&other_proxy).expect("create");
    let connected = connect(&server).await;
    let selector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
    let mut services = watch(
        Api::<Service>::all(connected.client.clone()),
        watcher::Config::default().labels(selector),
    );
    assert_eq!(initial_sync(&mut services).await, ["plain"]);
    wait_for(&server, "the watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 1
    })
    .await;

    // Gaining the label takes it out of the selection: DELETED.
    let mut plain = server.get::<Service>("default", "plain").expect("plain");
    plain.metadata.labels = Some(
        [(
            "service.kubernetes.io/service-proxy-name".to_owned(),
            "other".to_owned(),
        )]
        .into(),
    );
    server.update(&plain).expect("label plain");
    assert!(matches!(next_event(&mut services).await, Event::Delete(s) if s.name_any() == "plain"));
    // Losing it brings the other one in: ADDED.
    let mut other_proxy = server
        .get::<Service>("default", "other-proxy")
        .expect("other-proxy");
    other_proxy.metadata.labels = None;
    server.update(&other_proxy).expect("unlabel other-proxy");
    assert!(
        matches!(next_event(&mut services).await, Event::Apply(s) if s.name_any() == "other-proxy")
    );

    // The same on the wire, as event types.
    let addr = server.addr();
    let version = server.resource_version();
    let raw = tokio::task::spawn_blocking(move || {
        raw_request(
            addr,
            "GET",
            &format!(
                "/api/v1/namespaces/default/services?watch=true&timeoutSeconds=1&labelSelector=tier%3Dweb&resourceVersion={version}"
            ),
            &[],
        )
    });
    wait_for(&server, "the raw watch", |server| {
        server.open_watches(Some(ResourceKind::Service)) == 2
    })
    .await;
    let mut tiered = server
        .get::<Service>("default", "other-proxy")
        .expect("other-proxy");
    tiered.metadata.labels = Some([("tier".to_owned(), "web".to_owned())].into());
    let tiered = server.update(&tiered).expect("label");
    let mut retiered = tiered.clone();
    retiered.metadata.annotations = Some([("note".to_owned(), "x".to_owned())].into());
    server.update(&retiered).expect("annotate");
    retiered.metadata.labels = None;
    retiered.metadata.resource_version = None;
    server.update(&retiered).expect("unlabel");
    let events = raw.await.expect("raw watch thread").events();
    let types: Vec<&str> = events
        .iter()
        .map(|event| event["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"]);
    assert!(
        events
            .iter()
            .all(|event| event["object"]["kind"] == "Service")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_lists_and_a_server_without_them() {
    let server = FakeApiServer::start().expect("start the fake");
    server
        .create(&endpoint_slice("web-1", "web", &["198.18.0.10"]))
        .expect("create");
    server
        .create(&endpoint_slice("web-2", "web", &["198.18.0.11"]))
        .expect("create");
    let connected = connect(&server).await;
    let mut slices = watch(
        Api::<EndpointSlice>::all(connected.client.clone()),
        watcher::Config::default().streaming_lists(),
    );
    assert_eq!(initial_sync(&mut slices).await, ["web-1", "web-2"]);
    assert_eq!(
        server.count_requests(ResourceKind::EndpointSlice, Verb::List),
        0
    );
    let initial = &watches_of(&server, ResourceKind::EndpointSlice)[0];
    assert_eq!(initial.param("sendInitialEvents"), Some("true"));
    assert_eq!(initial.param("resourceVersionMatch"), Some("NotOlderThan"));
    server
        .create(&endpoint_slice("web-3", "web", &["198.18.0.12"]))
        .expect("create");
    assert!(matches!(next_event(&mut slices).await, Event::Apply(s) if s.name_any() == "web-3"));

    // A server whose WatchList gate is off refuses with 422, as 1.33 does
    // by default for clients that ask.
    let without = FakeApiServer::start_with(FakeApiConfig {
        watch_list: false,
        ..FakeApiConfig::default()
    })
    .expect("start the fake");
    let connected = connect(&without).await;
    let mut slices = watch(
        Api::<EndpointSlice>::all(connected.client.clone()),
        watcher::Config::default().streaming_lists(),
    );
    let refused = next(&mut slices).await.expect_err("refused");
    assert!(
        matches!(&refused, watcher::Error::WatchStartFailed(kube::Error::Api(status))
            if status.code == 422 && status.message.contains("WatchList feature gate")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_services_arrive_in_two_pages() {
    let server = FakeApiServer::start().expect("start the fake");
    let services: Vec<Service> = (0..1000)
        .map(|index| {
            service(
                &format!("svc-{index:04}"),
                &format!("198.19.{}.{}", 8 + index / 250, index % 250 + 1),
            )
        })
        .collect();
    let slices: Vec<EndpointSlice> = (0..1000)
        .map(|index| {
            let addresses: Vec<String> = (0..10)
                .map(|endpoint| format!("198.18.{}.{}", index / 25, (index % 25) * 10 + endpoint))
                .collect();
            let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
            endpoint_slice(
                &format!("svc-{index:04}-x"),
                &format!("svc-{index:04}"),
                &addresses,
            )
        })
        .collect();
    let started = Instant::now();
    server.apply_all(&services).expect("apply services");
    server.apply_all(&slices).expect("apply slices");
    eprintln!("stored 2000 objects in {:?}", started.elapsed());
    let connected = connect(&server).await;
    let mut stream = watch(
        Api::<EndpointSlice>::all(connected.client.clone()),
        watcher::Config::default(),
    );
    let started = Instant::now();
    let names = initial_sync(&mut stream).await;
    eprintln!("kube listed 1000 EndpointSlices in {:?}", started.elapsed());
    assert_eq!(names.len(), 1000);
    assert_eq!(
        server.count_requests(ResourceKind::EndpointSlice, Verb::List),
        2,
        "pages of 500"
    );
}

#[test]
fn wire_details_writes_auth_and_namespaces() {
    let server = FakeApiServer::start().expect("start the fake");
    server
        .create(&service("web", "198.19.9.1"))
        .expect("create");

    // Writes are what the agent's RBAC forbids.
    let raw = raw_request(
        server.addr(),
        "DELETE",
        "/api/v1/namespaces/default/services/web",
        &[],
    );
    assert_eq!(raw.status, 403);
    let status = raw.json();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Forbidden");
    assert!(server.get::<Service>("default", "web").is_some());
    assert_eq!(
        raw_request(server.addr(), "GET", "/api/v1/pods", &[]).status,
        404
    );
    assert_eq!(
        raw_request(server.addr(), "GET", "/version", &[]).json()["major"],
        "1"
    );
    let invalid = raw_request(
        server.addr(),
        "GET",
        "/api/v1/services?resourceVersionMatch=Exact&resourceVersion=0",
        &[],
    );
    assert_eq!(invalid.status, 422);
    assert_eq!(invalid.json()["details"]["kind"], "ListOptions");
    let unsupported = raw_request(
        server.addr(),
        "GET",
        "/api/v1/services?fieldSelector=spec.ports%3D1",
        &[],
    );
    assert_eq!(unsupported.status, 400);

    // A watch stream: chunked, one event per chunk, a clean end at timeoutSeconds.
    let started = Instant::now();
    let raw = raw_request(
        server.addr(),
        "GET",
        "/api/v1/services?watch=1&timeoutSeconds=1",
        &[],
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("transfer-encoding"), Some("chunked"));
    assert!(raw.complete);
    let events = raw.events();
    assert_eq!(
        events.len(),
        1,
        "the synthetic ADDED of a watch without resourceVersion"
    );
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["kind"], "Service");

    // A broken watch ends without the terminating chunk.
    let addr = server.addr();
    let version = server.resource_version();
    let broken = std::thread::spawn(move || {
        raw_request(
            addr,
            "GET",
            &format!("/api/v1/services?watch=true&resourceVersion={version}"),
            &[],
        )
    });
    wait_for_blocking(&server, "the raw watch", |server| {
        server.open_watches(None) == 1
    });
    server
        .create(&service("api", "198.19.9.2"))
        .expect("create");
    assert_eq!(server.break_watches(), 1);
    let broken = broken.join().expect("raw watch thread");
    assert!(!broken.complete, "no terminating chunk");
    assert_eq!(broken.events().len(), 1);

    // With a token configured, requests without it are 401.
    let guarded = FakeApiServer::start_with(FakeApiConfig {
        bearer_token: Some("s3cret".into()),
        ..FakeApiConfig::default()
    })
    .expect("start the fake");
    assert_eq!(
        raw_request(guarded.addr(), "GET", "/api/v1/nodes", &[]).status,
        401
    );
    let allowed = raw_request(
        guarded.addr(),
        "GET",
        "/api/v1/nodes",
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(allowed.status, 200);
    assert!(guarded.kubeconfig().contains("token: \"s3cret\""));

    // Inside a network namespace, on that namespace's loopback only.
    let namespace = NetNs::create(names::unique("fakeapi")).expect("create a network namespace");
    let inside = FakeApiServer::start_with(FakeApiConfig {
        netns: Some(namespace.path()),
        ..FakeApiConfig::default()
    })
    .expect("start the fake in the namespace");
    let addr = inside.addr();
    let version = namespace
        .run(move || raw_request(addr, "GET", "/version", &[]).status)
        .expect("run in the namespace");
    assert_eq!(version, 200);
    drop(inside);
}

/// Tests must not hang: the fake shuts down with open watches.
#[test]
fn dropping_the_server_ends_open_watches() {
    let server = FakeApiServer::start().expect("start the fake");
    let addr = server.addr();
    let watcher =
        std::thread::spawn(move || raw_request(addr, "GET", "/api/v1/nodes?watch=true", &[]));
    wait_for_blocking(&server, "the raw watch", |server| {
        server.open_watches(None) == 1
    });
    let started = Instant::now();
    drop(server);
    let response = watcher.join().expect("raw watch thread");
    assert_eq!(response.status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A client that goes away is forgotten at once, even while no event
/// flows, so `open_watches` counts live watches only.
#[test]
fn a_client_that_hangs_up_is_forgotten() {
    let server = FakeApiServer::start().expect("start the fake");
    let mut stream = TcpStream::connect_timeout(&server.addr(), STEP).expect("connect to the fake");
    stream
        .write_all(b"GET /api/v1/services?watch=true HTTP/1.1\r\nHost: fake\r\n\r\n")
        .expect("send the request");
    wait_for_blocking(&server, "the raw watch", |server| {
        server.open_watches(None) == 1
    });
    drop(stream);
    wait_for_blocking(&server, "the watch forgotten", |server| {
        server.open_watches(None) == 0
    });
}

/// ClusterIPs as the server's allocator treats them: unique, released on
/// delete, kept when an update leaves them out, immutable once set.
#[test]
fn cluster_ips_are_unique_kept_and_immutable() {
    let server = FakeApiServer::start().expect("start the fake");
    server
        .create(&service("a", "198.19.10.1"))
        .expect("create a");
    let taken = server
        .create(&service("b", "198.19.10.1"))
        .expect_err("the IP is taken");
    assert!(
        matches!(&taken, lb_tests::fake_apiserver::FakeApiError::Rejected { code: 422, message, .. }
            if message.contains("provided IP is already allocated")),
        "{taken}"
    );
    let mut without_ip = service("a", "");
    without_ip.spec.as_mut().unwrap().cluster_ip = None;
    let kept = server
        .apply(&without_ip)
        .expect("update without a ClusterIP");
    assert_eq!(
        kept.spec.unwrap().cluster_ip.as_deref(),
        Some("198.19.10.1")
    );
    let moved = server
        .apply(&service("a", "198.19.10.2"))
        .expect_err("immutable");
    assert!(matches!(
        moved,
        lb_tests::fake_apiserver::FakeApiError::Rejected { code: 422, .. }
    ));
    server.delete::<Service>("default", "a").expect("delete a");
    server
        .create(&service("b", "198.19.10.1"))
        .expect("the IP is free again");
    let headless = server
        .create(&service("headless", "None"))
        .expect("headless");
    assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    server
        .create(&service("headless-2", "None"))
        .expect("None is not an address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_presents_the_kubeconfig_token() {
    let server = FakeApiServer::start_with(FakeApiConfig {
        bearer_token: Some("s3cret".into()),
        ..FakeApiConfig::default()
    })
    .expect("start the fake");
    server.create(&node("node-a")).expect("create");
    let connected = connect(&server).await;
    let nodes: Api<Node> = Api::all(connected.client.clone());
    let list = within("list", nodes.list(&ListParams::default()))
        .await
        .expect("kube authenticates with the token");
    assert_eq!(list.items.len(), 1);
    assert!(server.requests().iter().all(|record| record.status == 200));
}

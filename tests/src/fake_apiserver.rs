//! A fake Kubernetes API server for `v1/services`,
//! `discovery.k8s.io/v1/endpointslices` and `v1/nodes`, faithful enough to
//! the list and watch protocol that kube-rs's watcher cannot tell it from
//! kube-apiserver, with controls to break it the ways a real one breaks.
//!
//! What it serves, as kube-apiserver 1.33 does:
//! - `GET` of collections (all namespaces or one) and of single objects;
//!   any write answers `403 Forbidden`, as the agent's RBAC would.
//! - Lists: `resourceVersion` (unset, `0`, or N) with `resourceVersionMatch`
//!   (`NotOlderThan`, `Exact`, or the legacy rules), `limit`/`continue`
//!   pagination consistent at the first page's resourceVersion,
//!   `labelSelector` (full grammar), `fieldSelector` (the fields the
//!   server indexes for each type), `ListOptions` validation with the
//!   server's messages. Items carry no `kind`/`apiVersion`, as in a real
//!   list.
//! - Watches: chunked `application/json` streams, one event per line;
//!   ADDED/MODIFIED/DELETED filtered by selector (an object that stops
//!   matching is DELETED, one that starts is ADDED); resuming after a
//!   resourceVersion from the retained history; BOOKMARK events (with
//!   `allowWatchBookmarks=true`) every bookmark interval and 2 s before
//!   the watch's `timeoutSeconds` deadline, where the stream ends cleanly;
//!   streaming lists (`sendInitialEvents=true`, ending with the
//!   `k8s.io/initial-events-end` bookmark), or, with
//!   [`FakeApiConfig::watch_list`] off, the `422` of a server whose
//!   WatchList feature gate is disabled.
//! - `410 Gone` (`Expired`) for a resourceVersion older than the history:
//!   for a watch, as the real server does it, a 200 response carrying one
//!   ERROR event; for an exact list or a continue token, as the HTTP status.
//!   [`FakeApiServer::expire_watches`] injects the ERROR event into open
//!   watches, as etcd compaction does.
//! - Objects as the server stores them: `uid`, `creationTimestamp`,
//!   `resourceVersion` (one global counter, as etcd's revision), Service
//!   defaults (type, ClusterIP allocation and immutability, `clusterIPs`,
//!   IP families, protocols, `targetPort`, `internalTrafficPolicy`,
//!   `sessionAffinity`, `status.loadBalancer`), EndpointSlice defaults and
//!   `generation`, `"endpoints": null` for an empty slice. Updates that
//!   change nothing are no-ops, as in etcd.
//!
//! What it does not do: authentication beyond one optional static bearer
//! token, protobuf or Table encodings (`406`), `managedFields`, NodePort
//! allocation, subresources, admission, and other resources (`404`).
//!
//! The server runs on its own tokio runtime on a background thread, so
//! tests drive it from synchronous code; it listens on 127.0.0.1 with an
//! ephemeral port (optionally in a test network namespace) and stops when
//! dropped.
//!
//! ```no_run
//! use k8s_openapi::api::core::v1::Service;
//! use lb_tests::fake_apiserver::FakeApiServer;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = FakeApiServer::start()?;
//! let kubeconfig = std::env::temp_dir().join("kubeconfig");
//! server.write_kubeconfig(&kubeconfig)?;
//! let service: Service = serde_json::from_value(serde_json::json!({
//!     "metadata": {"name": "web", "namespace": "default"},
//!     "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80}]},
//! }))?;
//! server.create(&service)?;
//! server.break_watches();
//! # Ok(())
//! # }
//! ```

mod objects;
mod selector;
mod server;
mod store;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use objects::{FakeResource, ResourceKind};
use server::{Shared, lock};
use store::{Store, WatchFrame, WriteMode, event_line};

/// How a [`FakeApiServer`] behaves.
#[derive(Debug, Clone)]
pub struct FakeApiConfig {
    /// Listen on 127.0.0.1 inside this network namespace (a path such as
    /// `/var/run/netns/NAME`) rather than the caller's, so an agent running
    /// in that namespace reaches it on its loopback. The namespace's `lo`
    /// must be up.
    pub netns: Option<PathBuf>,
    /// Require `Authorization: Bearer <token>` (answered `401` otherwise);
    /// the kubeconfig carries it.
    pub bearer_token: Option<String>,
    /// Writes retained for watch resumption, exact lists and continue
    /// tokens; older resourceVersions are `410 Gone`.
    pub history_limit: usize,
    /// Period of BOOKMARK events on watches that allow them
    /// (kube-apiserver's is one minute).
    pub bookmark_interval: Duration,
    /// Lifetime of a watch sent without `timeoutSeconds` (kube-apiserver
    /// picks 30 to 60 minutes).
    pub default_watch_timeout: Duration,
    /// Serve streaming lists (`sendInitialEvents`); when false, answer them
    /// as a server with the WatchList feature gate disabled does.
    pub watch_list: bool,
    /// The range a Service without a ClusterIP gets one from.
    pub service_cidr: (Ipv4Addr, u8),
}

impl Default for FakeApiConfig {
    fn default() -> Self {
        Self {
            netns: None,
            bearer_token: None,
            history_limit: 100_000,
            bookmark_interval: Duration::from_secs(60),
            default_watch_timeout: Duration::from_secs(1800),
            watch_list: true,
            service_cidr: (Ipv4Addr::new(198, 19, 192, 0), 18),
        }
    }
}

/// What a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
}

/// One request the server answered.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    /// The resource addressed, for API paths.
    pub resource: Option<ResourceKind>,
    /// Get, list or watch, for `GET`s of API paths.
    pub verb: Option<Verb>,
    /// The HTTP status (a watch that fails after acceptance is 200 with an
    /// ERROR event, as on a real server).
    pub status: u16,
    pub user_agent: Option<String>,
    pub at: Instant,
}

impl RequestRecord {
    /// The value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn is(&self, resource: ResourceKind, verb: Verb) -> bool {
        self.resource == Some(resource) && self.verb == Some(verb)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    #[error("opening network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setns(CLONE_NEWNET) into {path}")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the fake API server on 127.0.0.1")]
    Bind(#[source] std::io::Error),
    #[error("spawning the fake API server's thread")]
    Spawn(#[source] std::io::Error),
    #[error("building the fake API server's tokio runtime")]
    Runtime(#[source] std::io::Error),
    #[error("writing kubeconfig {path}")]
    WriteKubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The write was refused, as kube-apiserver would refuse it.
    #[error("the API server refused: {code} {reason}: {message}")]
    Rejected {
        code: u16,
        reason: &'static str,
        message: String,
    },
    #[error("decoding a stored {kind} as its Rust type")]
    Decode {
        kind: ResourceKind,
        #[source]
        source: serde_json::Error,
    },
}

impl From<objects::Rejection> for FakeApiError {
    fn from(rejection: objects::Rejection) -> Self {
        Self::Rejected {
            code: rejection.code,
            reason: rejection.reason,
            message: rejection.message,
        }
    }
}

/// A running fake API server; stops (closing every connection) on drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Binds 127.0.0.1:0, inside `netns` when given. A socket belongs to the
/// network namespace of the thread that creates it, so a short-lived thread
/// joins the namespace, binds, and hands the listener back.
fn bind(netns: Option<&Path>) -> Result<TcpListener, FakeApiError> {
    let loopback = (Ipv4Addr::LOCALHOST, 0);
    let Some(path) = netns else {
        return TcpListener::bind(loopback).map_err(FakeApiError::Bind);
    };
    let namespace = File::open(path).map_err(|source| FakeApiError::OpenNetns {
        path: path.to_owned(),
        source,
    })?;
    thread::scope(|scope| {
        thread::Builder::new()
            .name("fake-apiserver-bind".into())
            .spawn_scoped(scope, || {
                // SAFETY: plain syscall on an open descriptor; only this
                // short-lived thread changes namespace.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(FakeApiError::EnterNetns {
                        path: path.to_owned(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                TcpListener::bind(loopback).map_err(FakeApiError::Bind)
            })
            .map_err(FakeApiError::Spawn)?
            .join()
            .expect("the bind thread does not panic")
    })
}

impl FakeApiServer {
    /// Starts a server with the default configuration.
    pub fn start() -> Result<Self, FakeApiError> {
        Self::start_with(FakeApiConfig::default())
    }

    pub fn start_with(config: FakeApiConfig) -> Result<Self, FakeApiError> {
        let listener = bind(config.netns.as_deref())?;
        let addr = listener.local_addr().map_err(FakeApiError::Bind)?;
        listener.set_nonblocking(true).map_err(FakeApiError::Bind)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .map_err(FakeApiError::Runtime)?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(FakeApiError::Bind)?
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(config.history_limit)),
            config,
            requests: Mutex::new(Vec::new()),
            connection_generation: watch::Sender::new(0),
            down_until: Mutex::new(None),
        });
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let serving = shared.clone();
        let thread = thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                runtime.block_on(server::serve(listener, serving, shutdown_receiver));
                // Open connections are tasks; dropping them closes their sockets.
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(FakeApiError::Spawn)?;
        Ok(Self {
            shared,
            addr,
            shutdown,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context reaches this server (with the
    /// bearer token, if one is configured).
    pub fn kubeconfig(&self) -> String {
        let user = match &self.shared.config.bearer_token {
            Some(token) => format!(
                "    token: {}\n",
                serde_json::to_string(token).expect("a string serializes")
            ),
            None => "    {}\n".to_owned(),
        };
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user:\n{user}\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            url = self.url(),
        )
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), FakeApiError> {
        std::fs::write(path, self.kubeconfig()).map_err(|source| FakeApiError::WriteKubeconfig {
            path: path.to_owned(),
            source,
        })
    }

    fn write<K: FakeResource>(&self, object: &K, mode: WriteMode) -> Result<K, FakeApiError> {
        let stored =
            lock(&self.shared.store).write(object, mode, self.shared.config.service_cidr)?;
        decode(&stored)
    }

    /// Creates an object (`409 AlreadyExists` if it exists); returns it as
    /// stored, with server-set fields.
    pub fn create<K: FakeResource>(&self, object: &K) -> Result<K, FakeApiError> {
        self.write(object, WriteMode::Create)
    }

    /// Replaces an object (`404` if it does not exist; `409 Conflict` if
    /// `metadata.resourceVersion` is set and stale).
    pub fn update<K: FakeResource>(&self, object: &K) -> Result<K, FakeApiError> {
        self.write(object, WriteMode::Update)
    }

    /// Creates or replaces an object, whatever its resourceVersion.
    pub fn apply<K: FakeResource>(&self, object: &K) -> Result<K, FakeApiError> {
        self.write(object, WriteMode::Apply)
    }

    /// Creates or replaces many objects under one lock: each still gets its
    /// own resourceVersion and watch event.
    pub fn apply_all<'a, K: FakeResource + 'a>(
        &self,
        objects: impl IntoIterator<Item = &'a K>,
    ) -> Result<(), FakeApiError> {
        let mut store = lock(&self.shared.store);
        for object in objects {
            store.write(object, WriteMode::Apply, self.shared.config.service_cidr)?;
        }
        Ok(())
    }

    /// Deletes an object (`namespace` is ignored for nodes); returns it as
    /// the DELETED event carries it.
    pub fn delete<K: FakeResource>(&self, namespace: &str, name: &str) -> Result<K, FakeApiError> {
        let namespace = if K::RESOURCE.namespaced() {
            namespace
        } else {
            ""
        };
        let deleted = lock(&self.shared.store).delete(K::RESOURCE, namespace, name)?;
        decode(&deleted)
    }

    /// The stored object, if any (`namespace` is ignored for nodes).
    pub fn get<K: FakeResource>(&self, namespace: &str, name: &str) -> Option<K> {
        let namespace = if K::RESOURCE.namespaced() {
            namespace
        } else {
            ""
        };
        let stored = lock(&self.shared.store).get(K::RESOURCE, namespace, name)?;
        decode(&stored).ok()
    }

    /// Every stored object of a type, in the server's list order.
    pub fn list<K: FakeResource>(&self) -> Vec<K> {
        let stored = lock(&self.shared.store).all(K::RESOURCE);
        stored
            .iter()
            .filter_map(|object| decode(object).ok())
            .collect()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).resource_version()
    }

    /// Drops every open watch connection mid-stream (no final chunk), as a
    /// network failure would. Returns how many were open.
    pub fn break_watches(&self) -> usize {
        lock(&self.shared.store).end_watches(|| Some(WatchFrame::Abort))
    }

    /// Ends every open watch cleanly, as `timeoutSeconds` expiring does.
    pub fn close_watches(&self) -> usize {
        lock(&self.shared.store).end_watches(|| None)
    }

    /// Sends every open watch an ERROR event with `410 Expired` and ends
    /// it, as a real server does when etcd compacts past a watcher; and
    /// compacts, so resuming from the old resourceVersion is `410` too and
    /// the client must relist.
    pub fn expire_watches(&self) -> usize {
        let mut store = lock(&self.shared.store);
        store.compact();
        let status = objects::Rejection::new(
            410,
            "Expired",
            "The resourceVersion for the provided watch is too old.",
        )
        .status();
        let line = event_line("ERROR", &status);
        store.end_watches(|| Some(WatchFrame::Line(line.clone())))
    }

    /// Sends a BOOKMARK now to every watch that allows them.
    pub fn send_bookmarks(&self) -> usize {
        lock(&self.shared.store).bookmark_all()
    }

    /// Forgets the history: a watch or exact list from any earlier
    /// resourceVersion, or a continue token issued before, gets `410 Gone`.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    /// Simulates a server restart that keeps its storage (etcd survives):
    /// every connection drops at once, and for `downtime` new connections
    /// are closed unanswered. Returns immediately.
    pub fn restart(&self, downtime: Duration) {
        *lock(&self.shared.down_until) = Some(Instant::now() + downtime);
        lock(&self.shared.store).end_watches(|| Some(WatchFrame::Abort));
        self.shared
            .connection_generation
            .send_modify(|generation| *generation += 1);
    }

    /// Open watch connections, of one resource or all.
    pub fn open_watches(&self, resource: Option<ResourceKind>) -> usize {
        lock(&self.shared.store).open_watches(resource)
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests of `verb` on `resource` were answered.
    pub fn count_requests(&self, resource: ResourceKind, verb: Verb) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|record| record.is(resource, verb))
            .count()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Polls `condition` every 5 ms until it holds or `timeout` passes;
    /// returns whether it held.
    pub fn wait_until(&self, timeout: Duration, mut condition: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

fn decode<K: FakeResource>(stored: &serde_json::Value) -> Result<K, FakeApiError> {
    serde_json::from_value(stored.clone()).map_err(|source| FakeApiError::Decode {
        kind: K::RESOURCE,
        source,
    })
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("fake-apiserver: the server thread panicked");
        }
    }
}

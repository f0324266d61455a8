//! HTTP/1.1 serving: routing, query parameters and their validation as
//! kube-apiserver validates them, list responses, and chunked watch streams.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use super::objects::{ListItem, Rejection, ResourceKind};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ListPage, Scope, Store, WatchFrame, WatchStart, event_line};
use super::{FakeApiConfig, RequestRecord, Verb};

/// The identity the fake's credentials stand for, named in 403 answers to
/// writes (the agent's RBAC grants only get/list/watch).
const IDENTITY: &str = "system:serviceaccount:lb-system:lb-agent";

/// How long the server waits for a resourceVersion it has not reached yet
/// before answering "Too large resource version" (the watch cache's 3 s).
const RESOURCE_VERSION_WAIT: Duration = Duration::from_secs(3);

/// State shared by the connection tasks and the test-facing handle.
pub(super) struct Shared {
    pub store: Mutex<Store>,
    pub config: FakeApiConfig,
    pub requests: Mutex<Vec<RequestRecord>>,
    /// Bumped to drop every open connection at once.
    pub connection_generation: watch::Sender<u64>,
    /// While set and in the future, new connections are closed unanswered.
    pub down_until: Mutex<Option<Instant>>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the server down with it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn is_down(&self) -> bool {
        lock(&self.down_until).is_some_and(|until| Instant::now() < until)
    }
}

/// Accepts connections until `shutdown` flips.
pub(super) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                eprintln!("fake-apiserver: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.is_down() {
            // A restarting server: the connection closes without an answer.
            drop(stream);
            continue;
        }
        // Events are small writes that must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut generation = shared.connection_generation.subscribe();
        tokio::spawn(async move {
            let service_shared = shared.clone();
            let connection = http1::Builder::new().serve_connection(
                TokioIo::new(stream),
                service_fn(move |request| handle(service_shared.clone(), request)),
            );
            tokio::select! {
                // Errors here are clients going away or aborted watches.
                _ = connection => {}
                // Dropping the connection closes the socket mid-stream.
                _ = generation.changed() => {}
            }
        });
    }
}

/// A response body: a complete document, or a watch stream.
pub(super) enum ResponseBody {
    Complete(Option<Bytes>),
    Watch {
        frames: mpsc::UnboundedReceiver<WatchFrame>,
        /// Dropped with the body, which tells the watch's supervisor the
        /// client is gone.
        _closed: Option<oneshot::Sender<()>>,
        /// An abort was received and the body yielded once so hyper
        /// flushed the events before it; the next poll fails.
        aborting: bool,
    },
}

/// The body error that makes hyper drop a watch connection mid-stream.
#[derive(Debug, thiserror::Error)]
#[error("watch connection broken by the test")]
pub(super) struct WatchAborted;

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = WatchAborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WatchAborted>>> {
        match self.get_mut() {
            ResponseBody::Complete(data) => {
                Poll::Ready(data.take().map(|data| Ok(Frame::data(data))))
            }
            ResponseBody::Watch { aborting: true, .. } => Poll::Ready(Some(Err(WatchAborted))),
            ResponseBody::Watch {
                frames, aborting, ..
            } => match frames.poll_recv(context) {
                Poll::Ready(Some(WatchFrame::Line(line))) => {
                    Poll::Ready(Some(Ok(Frame::data(line))))
                }
                Poll::Ready(Some(WatchFrame::Abort)) => {
                    // hyper discards its write buffer when a body fails; a
                    // pending poll first makes it flush the events sent
                    // before the break, so a break falls between events.
                    *aborting = true;
                    context.waker().wake_by_ref();
                    Poll::Pending
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Complete(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Complete(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            ResponseBody::Watch { .. } => SizeHint::default(),
        }
    }
}

fn json_response(status: u16, body: Vec<u8>) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Complete(Some(Bytes::from(body))));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn rejection_response(rejection: &Rejection) -> Response<ResponseBody> {
    json_response(
        rejection.code,
        serde_json::to_vec(&rejection.status()).expect("a JSON value always serializes"),
    )
}

/// What a request addresses.
enum Target {
    Collection {
        kind: ResourceKind,
        namespace: Option<String>,
    },
    Object {
        kind: ResourceKind,
        namespace: Option<String>,
        name: String,
    },
}

impl Target {
    fn kind(&self) -> ResourceKind {
        match self {
            Target::Collection { kind, .. } | Target::Object { kind, .. } => *kind,
        }
    }

    fn namespace(&self) -> Option<&str> {
        match self {
            Target::Collection { namespace, .. } | Target::Object { namespace, .. } => {
                namespace.as_deref()
            }
        }
    }
}

fn not_found() -> Rejection {
    Rejection::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn parse_target(path: &str) -> Result<Target, Rejection> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, "v1", rest @ ..] => (*group, rest),
        _ => return Err(not_found()),
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
            (Some((*namespace).to_owned()), rest)
        }
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some((*name).to_owned())),
        _ => return Err(not_found()),
    };
    let kind = ResourceKind::from_path(group, plural).ok_or_else(not_found)?;
    if namespace.is_some() && !kind.namespaced() {
        return Err(not_found());
    }
    Ok(match name {
        Some(name) => Target::Object {
            kind,
            namespace,
            name,
        },
        None => Target::Collection { kind, namespace },
    })
}

/// The list/watch query parameters kube-apiserver reads (`ListOptions`).
#[derive(Debug, Default)]
struct ListOptions {
    watch: bool,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    allow_watch_bookmarks: bool,
    timeout_seconds: Option<u64>,
    limit: Option<i64>,
    continue_token: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    send_initial_events: Option<bool>,
}

/// Go's strconv.ParseBool, which the server's query decoder uses.
fn parse_bool(name: &str, value: &str) -> Result<bool, Rejection> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(Rejection::bad_request(format!(
            "{name}: strconv.ParseBool: parsing \"{value}\": invalid syntax"
        ))),
    }
}

fn parse_integer<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, Rejection> {
    value.parse().map_err(|_| {
        Rejection::bad_request(format!(
            "{name}: strconv.ParseInt: parsing \"{value}\": invalid syntax"
        ))
    })
}

impl ListOptions {
    fn parse(query: &[(String, String)]) -> Result<Self, Rejection> {
        let mut options = Self::default();
        for (name, value) in query {
            // An empty value means the parameter is unset.
            let set = (!value.is_empty()).then(|| value.clone());
            match name.as_str() {
                "watch" => options.watch = parse_bool(name, value)?,
                "resourceVersion" => options.resource_version = set,
                "resourceVersionMatch" => options.resource_version_match = set,
                "allowWatchBookmarks" => options.allow_watch_bookmarks = parse_bool(name, value)?,
                "timeoutSeconds" => options.timeout_seconds = Some(parse_integer(name, value)?),
                "limit" => options.limit = Some(parse_integer(name, value)?),
                "continue" => options.continue_token = set,
                "labelSelector" => options.label_selector = set,
                "fieldSelector" => options.field_selector = set,
                "sendInitialEvents" => options.send_initial_events = Some(parse_bool(name, value)?),
                _ => {}
            }
        }
        Ok(options)
    }

    /// `ValidateListOptions` of k8s.io/apimachinery: the same checks, the
    /// same messages, answered with `422 Invalid` on `ListOptions`.
    fn validate(&self, watch_list_enabled: bool) -> Result<(), Rejection> {
        let mut errors: Vec<(&str, String)> = Vec::new();
        let match_ = self.resource_version_match.as_deref();
        if self.watch {
            if self.send_initial_events.is_some() {
                if match_ != Some("NotOlderThan") {
                    errors.push((
                        "resourceVersionMatch",
                        "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"
                            .into(),
                    ));
                }
                if !watch_list_enabled {
                    errors.push((
                        "sendInitialEvents",
                        "Forbidden: sendInitialEvents is forbidden for watch unless the WatchList \
                         feature gate is enabled"
                            .into(),
                    ));
                }
            }
            if let Some(match_) = match_ {
                if self.send_initial_events.is_none() {
                    errors.push((
                        "resourceVersionMatch",
                        "Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents \
                         is provided"
                            .into(),
                    ));
                }
                if match_ != "NotOlderThan" {
                    errors.push((
                        "resourceVersionMatch",
                        format!(
                            "Unsupported value: \"{match_}\": supported values: \"NotOlderThan\""
                        ),
                    ));
                }
                if self.continue_token.is_some() {
                    errors.push((
                        "resourceVersionMatch",
                        "Forbidden: resourceVersionMatch is forbidden when continue is provided"
                            .into(),
                    ));
                }
            }
        } else {
            if let Some(match_) = match_ {
                if self.resource_version.is_none() {
                    errors.push((
                        "resourceVersionMatch",
                        "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided"
                            .into(),
                    ));
                }
                if self.continue_token.is_some() {
                    errors.push((
                        "resourceVersionMatch",
                        "Forbidden: resourceVersionMatch is forbidden when continue is provided"
                            .into(),
                    ));
                }
                if match_ != "Exact" && match_ != "NotOlderThan" {
                    errors.push((
                        "resourceVersionMatch",
                        format!(
                            "Unsupported value: \"{match_}\": supported values: \"Exact\", \"NotOlderThan\", \"\""
                        ),
                    ));
                }
                if match_ == "Exact" && self.resource_version.as_deref() == Some("0") {
                    errors.push((
                        "resourceVersionMatch",
                        "Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\""
                            .into(),
                    ));
                }
            }
            if self.send_initial_events.is_some() {
                errors.push((
                    "sendInitialEvents",
                    "Forbidden: sendInitialEvents is forbidden for list".into(),
                ));
            }
        }
        if errors.is_empty() {
            return Ok(());
        }
        let message = errors
            .iter()
            .map(|(field, detail)| format!("{field}: {detail}"))
            .collect::<Vec<_>>()
            .join(", ");
        let message = if errors.len() == 1 {
            message
        } else {
            format!("[{message}]")
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|(field, detail)| json!({"reason": "FieldValueForbidden", "message": detail, "field": field}))
            .collect();
        Err(Rejection::new(
            422,
            "Invalid",
            format!("ListOptions.meta.k8s.io \"\" is invalid: {message}"),
        )
        .with_details(json!({"group": "meta.k8s.io", "kind": "ListOptions", "causes": causes})))
    }

    fn scope(&self, target: &Target) -> Result<Scope, Rejection> {
        let kind = target.kind();
        let labels = match &self.label_selector {
            Some(selector) => LabelSelector::parse(selector).map_err(Rejection::bad_request)?,
            None => LabelSelector::default(),
        };
        let mut fields = String::new();
        if let Some(selector) = &self.field_selector {
            fields.push_str(selector);
        }
        // A named watch (`.../services/NAME?watch=true`) is a watch with a
        // name field selector.
        if let Target::Object { name, .. } = target {
            if !fields.is_empty() {
                fields.push(',');
            }
            fields.push_str(&format!("metadata.name={name}"));
        }
        let fields = FieldSelector::parse(&fields, kind).map_err(Rejection::bad_request)?;
        Ok(Scope {
            kind,
            namespace: target.namespace().map(str::to_owned),
            labels,
            fields,
        })
    }
}

fn parse_resource_version(value: &str) -> Result<u64, Rejection> {
    value
        .parse()
        .map_err(|_| Rejection::bad_request(format!("invalid resource version: {value}")))
}

/// Waits (briefly, as the watch cache does) until the store reaches
/// `wanted`; returns the current resourceVersion if it does not.
async fn wait_for_resource_version(shared: &Shared, wanted: u64) -> Result<(), u64> {
    let mut published = lock(&shared.store).subscribe_resource_version();
    let reached = tokio::time::timeout(
        RESOURCE_VERSION_WAIT,
        published.wait_for(|current| *current >= wanted),
    )
    .await
    .is_ok_and(|waited| waited.is_ok());
    if reached {
        Ok(())
    } else {
        Err(*published.borrow())
    }
}

/// The continue token: base64url of the same JSON the real server encodes.
fn encode_continue(resource_version: u64, after: &(String, String)) -> String {
    let start = if after.0.is_empty() {
        format!("{}\u{0}", after.1)
    } else {
        format!("{}/{}\u{0}", after.0, after.1)
    };
    let token = json!({"v": "meta.k8s.io/v1", "rv": resource_version, "start": start});
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).expect("a JSON value always serializes"))
}

fn decode_continue(token: &str, kind: ResourceKind) -> Result<(u64, (String, String)), Rejection> {
    let invalid = |why: &str| Rejection::bad_request(format!("continue key is not valid: {why}"));
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| invalid("not base64"))?;
    let token: Value = serde_json::from_slice(&bytes).map_err(|_| invalid("not JSON"))?;
    if token["v"] != "meta.k8s.io/v1" {
        return Err(invalid(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let resource_version = token["rv"]
        .as_u64()
        .ok_or_else(|| invalid("no resourceVersion"))?;
    let start = token["start"]
        .as_str()
        .ok_or_else(|| invalid("no start key"))?;
    let start = start.strip_suffix('\u{0}').unwrap_or(start);
    let key = if kind.namespaced() {
        let (namespace, name) = start
            .split_once('/')
            .ok_or_else(|| invalid("malformed start key"))?;
        (namespace.to_owned(), name.to_owned())
    } else {
        (String::new(), start.to_owned())
    };
    Ok((resource_version, key))
}

fn list_response(kind: ResourceKind, page: &ListPage) -> Response<ResponseBody> {
    let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(after) = &page.continue_after {
        metadata["continue"] = json!(encode_continue(page.resource_version, after));
        if let Some(remaining) = page.remaining {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let mut body = Vec::with_capacity(256 + page.items.len() * 512);
    body.extend_from_slice(b"{\"kind\":");
    serde_json::to_writer(&mut body, &kind.list_kind()).expect("a string serializes");
    body.extend_from_slice(b",\"apiVersion\":");
    serde_json::to_writer(&mut body, kind.api_version()).expect("a string serializes");
    body.extend_from_slice(b",\"metadata\":");
    serde_json::to_writer(&mut body, &metadata).expect("a JSON value always serializes");
    body.extend_from_slice(b",\"items\":[");
    for (index, item) in page.items.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, &ListItem(item)).expect("a JSON value always serializes");
    }
    body.extend_from_slice(b"]}");
    json_response(200, body)
}

async fn list(
    shared: &Shared,
    scope: Scope,
    options: &ListOptions,
) -> Result<Response<ResponseBody>, Rejection> {
    let limit = options
        .limit
        .filter(|limit| *limit > 0)
        .map(|limit| limit as usize);
    if let Some(token) = &options.continue_token {
        if options
            .resource_version
            .as_deref()
            .is_some_and(|version| version != "0")
        {
            return Err(Rejection::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let (at, after) = decode_continue(token, scope.kind)?;
        let store = lock(&shared.store);
        if at < store.oldest_resumable() || at > store.resource_version() {
            return Err(Rejection::new(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You \
                 can start a new list without the continue parameter, or use the continue token in \
                 this response to retrieve the remainder of the results. Continuing with the provided \
                 token results in an inconsistent list - objects that were created, modified, or \
                 deleted between the time the first chunk was returned and now may show up in the \
                 list.",
            ));
        }
        let page = store.list(&scope, Some(at), limit, Some(&after));
        return Ok(list_response(scope.kind, &page));
    }
    // The semantics table of "Resource versions" in the API concepts: an
    // explicit non-zero resourceVersion is served exactly when asked for
    // with Exact, or (legacy) when paginating without a match rule.
    let requested = match options.resource_version.as_deref() {
        None | Some("0") => None,
        Some(version) => Some(parse_resource_version(version)?),
    };
    let exact = match options.resource_version_match.as_deref() {
        Some("Exact") => true,
        Some(_) => false,
        None => limit.is_some(),
    };
    if let Some(requested) = requested
        && let Err(current) = wait_for_resource_version(shared, requested).await
    {
        return Err(Rejection::too_large_resource_version(requested, current));
    }
    let store = lock(&shared.store);
    let at = match requested {
        Some(requested) if exact => {
            if requested < store.oldest_resumable() {
                return Err(Rejection::new(
                    410,
                    "Expired",
                    "The resourceVersion for the provided list is too old.",
                ));
            }
            Some(requested)
        }
        _ => None,
    };
    let page = store.list(&scope, at, limit, None);
    Ok(list_response(scope.kind, &page))
}

fn watch_headers(response: &mut Response<ResponseBody>) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
}

/// A watch that fails after the request was accepted: the real server
/// answers 200 and streams one ERROR event carrying the Status, then ends
/// (the cacher's `newErrWatcher`). kube-rs relists on its 410.
fn error_watch(rejection: &Rejection) -> Response<ResponseBody> {
    let (frames, receiver) = mpsc::unbounded_channel();
    let _ = frames.send(WatchFrame::Line(event_line("ERROR", &rejection.status())));
    drop(frames);
    let mut response = Response::new(ResponseBody::Watch {
        frames: receiver,
        _closed: None,
        aborting: false,
    });
    watch_headers(&mut response);
    response
}

async fn watch(
    shared: Arc<Shared>,
    scope: Scope,
    options: &ListOptions,
) -> Result<Response<ResponseBody>, Rejection> {
    if options.send_initial_events == Some(true) && !options.allow_watch_bookmarks {
        return Err(Rejection::new(
            422,
            "Invalid",
            "ListOptions.meta.k8s.io \"\" is invalid: allowWatchBookmarks: Forbidden: sendInitialEvents \
             requires setting allowWatchBookmarks to true",
        ));
    }
    let requested = match options.resource_version.as_deref() {
        None | Some("0") => None,
        Some(version) => Some(parse_resource_version(version)?),
    };
    if let Some(requested) = requested
        && let Err(current) = wait_for_resource_version(&shared, requested).await
    {
        return Ok(error_watch(&Rejection::too_large_resource_version(
            requested, current,
        )));
    }
    let timeout = match options.timeout_seconds {
        Some(seconds) if seconds > 0 => Duration::from_secs(seconds),
        _ => shared.config.default_watch_timeout,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let bookmarks = options.allow_watch_bookmarks;
    let (id, frames) = {
        let mut store = lock(&shared.store);
        let start = match (options.send_initial_events, requested) {
            (Some(true), _) => WatchStart::CurrentState {
                initial_events_end: true,
            },
            (_, None) => WatchStart::CurrentState {
                initial_events_end: false,
            },
            (_, Some(requested)) => {
                let oldest = store.oldest_resumable();
                if requested < oldest {
                    return Ok(error_watch(&Rejection::too_old_resource_version(
                        requested, oldest,
                    )));
                }
                WatchStart::After(requested)
            }
        };
        store.register_watch(scope, bookmarks, start)
    };
    let (closed, closed_receiver) = oneshot::channel();
    tokio::spawn(supervise_watch(
        shared,
        id,
        deadline,
        bookmarks,
        closed_receiver,
    ));
    let mut response = Response::new(ResponseBody::Watch {
        frames,
        _closed: Some(closed),
        aborting: false,
    });
    watch_headers(&mut response);
    Ok(response)
}

/// When the next periodic bookmark is due, as the watch cache schedules
/// them: every bookmark interval, and one 2 s before the watch's deadline
/// so the client can resume from it; none at or after the deadline.
fn next_bookmark(
    now: tokio::time::Instant,
    interval: Duration,
    deadline: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    let heartbeat = now + interval;
    let before_deadline = deadline
        .checked_sub(Duration::from_secs(2))
        .filter(|time| *time > now);
    let next = before_deadline.map_or(heartbeat, |before| before.min(heartbeat));
    (next < deadline).then_some(next)
}

/// Ends the watch at its deadline (a clean end of the chunked body, as
/// `timeoutSeconds` does), sends periodic bookmarks, and unregisters the
/// watcher when the client goes away.
async fn supervise_watch(
    shared: Arc<Shared>,
    id: u64,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    mut closed: oneshot::Receiver<()>,
) {
    let interval = shared.config.bookmark_interval;
    let mut bookmark_at = bookmarks
        .then(|| next_bookmark(tokio::time::Instant::now(), interval, deadline))
        .flatten();
    loop {
        let bookmark_due = async {
            match bookmark_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut closed => break,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = bookmark_due => {
                if !lock(&shared.store).bookmark(id) {
                    break;
                }
                bookmark_at = next_bookmark(tokio::time::Instant::now(), interval, deadline);
            }
        }
    }
    lock(&shared.store).remove_watcher(id);
}

fn get(shared: &Shared, target: &Target) -> Result<Response<ResponseBody>, Rejection> {
    let Target::Object {
        kind,
        namespace,
        name,
    } = target
    else {
        unreachable!("get is only routed for objects");
    };
    let object = lock(&shared.store)
        .get(*kind, namespace.as_deref().unwrap_or_default(), name)
        .ok_or_else(|| Rejection::not_found(*kind, name))?;
    Ok(json_response(
        200,
        serde_json::to_vec(&*object).expect("a JSON value always serializes"),
    ))
}

/// What RBAC answers the agent's identity for anything but get/list/watch.
fn forbidden(method: &Method, target: &Target) -> Rejection {
    let verb = match (method.as_str(), target) {
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Target::Collection { .. }) => "deletecollection",
        ("DELETE", Target::Object { .. }) => "delete",
        (other, _) => {
            return Rejection::new(
                405,
                "MethodNotAllowed",
                format!("method {other} is not allowed"),
            );
        }
    };
    let kind = target.kind();
    let subject = match target {
        Target::Object { name, .. } => format!("{} \"{name}\"", kind.plural()),
        Target::Collection { .. } => kind.plural().to_owned(),
    };
    let scope = match target.namespace() {
        Some(namespace) => format!("in the namespace \"{namespace}\""),
        None => "at the cluster scope".to_owned(),
    };
    Rejection::new(
        403,
        "Forbidden",
        format!(
            "{subject} is forbidden: User \"{IDENTITY}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
            kind.plural(),
            kind.group()
        ),
    )
    .with_details(json!({"kind": kind.plural()}))
}

fn version_response() -> Response<ResponseBody> {
    let version = json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-lb-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    });
    json_response(
        200,
        serde_json::to_vec(&version).expect("a JSON value always serializes"),
    )
}

fn authorized(shared: &Shared, request: &Request<Incoming>) -> bool {
    let Some(token) = &shared.config.bearer_token else {
        return true;
    };
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|presented| presented == token)
}

async fn route(
    shared: Arc<Shared>,
    request: &Request<Incoming>,
    query: &[(String, String)],
    record: &mut RequestRecord,
) -> Result<Response<ResponseBody>, Rejection> {
    if !authorized(&shared, request) {
        return Err(Rejection::new(401, "Unauthorized", "Unauthorized"));
    }
    let path = request.uri().path();
    match path {
        "/version" | "/version/" => return Ok(version_response()),
        "/healthz" | "/livez" | "/readyz" => {
            let mut response =
                Response::new(ResponseBody::Complete(Some(Bytes::from_static(b"ok"))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return Ok(response);
        }
        _ => {}
    }
    let target = parse_target(path)?;
    record.resource = Some(target.kind());
    if request.method() != Method::GET {
        return Err(forbidden(request.method(), &target));
    }
    // Tables and partial-object metadata are other encodings the fake
    // does not produce; answering JSON objects instead would mislead.
    if request
        .headers()
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains(";as="))
    {
        return Err(Rejection::new(
            406,
            "NotAcceptable",
            "only the following media types are accepted: application/json",
        ));
    }
    let options = ListOptions::parse(query)?;
    if options.watch {
        record.verb = Some(Verb::Watch);
        options.validate(shared.config.watch_list)?;
        let scope = options.scope(&target)?;
        return watch(shared, scope, &options).await;
    }
    if matches!(target, Target::Object { .. }) {
        record.verb = Some(Verb::Get);
        return get(&shared, &target);
    }
    record.verb = Some(Verb::List);
    options.validate(shared.config.watch_list)?;
    let scope = options.scope(&target)?;
    list(&shared, scope, &options).await
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let query: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|query| {
            form_urlencoded::parse(query.as_bytes())
                .filter(|(name, _)| !name.is_empty())
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let mut record = RequestRecord {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        query: query.clone(),
        resource: None,
        verb: None,
        status: 0,
        user_agent: request
            .headers()
            .get(header::USER_AGENT)
            .and_then(|agent| agent.to_str().ok())
            .map(str::to_owned),
        at: Instant::now(),
    };
    let response = match route(shared.clone(), &request, &query, &mut record).await {
        Ok(response) => response,
        Err(rejection) => rejection_response(&rejection),
    };
    record.status = response.status().as_u16();
    lock(&shared.requests).push(record);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_the_three_resources() {
        let target = parse_target("/api/v1/namespaces/default/services/web").unwrap();
        assert!(matches!(
            target,
            Target::Object { kind: ResourceKind::Service, ref namespace, ref name }
                if namespace.as_deref() == Some("default") && name == "web"
        ));
        let target = parse_target("/apis/discovery.k8s.io/v1/endpointslices").unwrap();
        assert!(matches!(
            target,
            Target::Collection {
                kind: ResourceKind::EndpointSlice,
                namespace: None
            }
        ));
        assert!(matches!(
            parse_target("/api/v1/nodes/node-a").unwrap(),
            Target::Object {
                kind: ResourceKind::Node,
                ..
            }
        ));
        assert!(parse_target("/api/v1/namespaces/default/nodes").is_err());
        assert!(parse_target("/api/v1/pods").is_err());
        assert!(parse_target("/apis/discovery.k8s.io/v1beta1/endpointslices").is_err());
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, &("default".into(), "web".into()));
        assert_eq!(
            decode_continue(&token, ResourceKind::Service).unwrap(),
            (42, ("default".to_owned(), "web".to_owned()))
        );
        let token = encode_continue(7, &(String::new(), "node-a".into()));
        assert_eq!(
            decode_continue(&token, ResourceKind::Node).unwrap(),
            (7, (String::new(), "node-a".to_owned()))
        );
        assert_eq!(
            decode_continue("!!", ResourceKind::Node).unwrap_err().code,
            400
        );
    }

    #[test]
    fn list_options_are_validated_like_the_server() {
        let parse = |query: &[(&str, &str)]| {
            let query: Vec<(String, String)> = query
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect();
            ListOptions::parse(&query).unwrap()
        };
        let streaming = parse(&[
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("sendInitialEvents", "true"),
            ("resourceVersionMatch", "NotOlderThan"),
            ("resourceVersion", "0"),
        ]);
        assert!(streaming.validate(true).is_ok());
        let refused = streaming.validate(false).unwrap_err();
        assert_eq!(refused.code, 422);
        assert!(refused.message.contains("WatchList feature gate"));
        let exact_zero = parse(&[("resourceVersion", "0"), ("resourceVersionMatch", "Exact")]);
        assert_eq!(exact_zero.validate(true).unwrap_err().code, 422);
        let match_without_version = parse(&[("resourceVersionMatch", "NotOlderThan")]);
        assert_eq!(match_without_version.validate(true).unwrap_err().code, 422);
        assert!(parse(&[("limit", "500")]).validate(true).is_ok());
    }

    #[test]
    fn bookmarks_come_every_interval_and_before_the_deadline() {
        let now = tokio::time::Instant::now();
        let minute = Duration::from_secs(60);
        assert_eq!(
            next_bookmark(now, minute, now + Duration::from_secs(290)),
            Some(now + minute)
        );
        assert_eq!(
            next_bookmark(now, minute, now + Duration::from_secs(10)),
            Some(now + Duration::from_secs(8))
        );
        assert_eq!(
            next_bookmark(now, minute, now + Duration::from_secs(1)),
            None
        );
    }
}

//! The object store: what etcd plus the watch cache are to kube-apiserver.
//!
//! One global, monotonically increasing resourceVersion shared by every
//! resource (as etcd's revision is). Every write is kept in a bounded
//! history with the object before and after it, which serves three things
//! a real server serves: watches that resume after a resourceVersion,
//! lists at an exact past resourceVersion, and continuation pages that stay
//! consistent with their first page. A resourceVersion older than the
//! history (after [`Store::compact`] or when the history overflows) gets
//! `410 Gone`.
//!
//! Watchers are registered here and fed under the same lock that applies a
//! write, so each watcher sees changes in resourceVersion order with no gap
//! and no duplicate between its replay and its live events.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::objects::{
    self, FakeResource, Rejection, ResourceKind, WriteContext, endpoint_slice_generation,
    same_apart_from_resource_version, set_resource_version, to_wire_shape,
};
use super::selector::{FieldSelector, LabelSelector};

/// (kind, namespace or "" for cluster-scoped, name): sorts like the
/// server's etcd keys, so lists come out in the same order.
pub(super) type ObjectKey = (ResourceKind, String, String);

/// What a watch connection's body is fed.
#[derive(Debug)]
pub(super) enum WatchFrame {
    /// One event, a JSON document and a newline.
    Line(Bytes),
    /// Drop the connection without finishing the chunked body, as a
    /// network failure or a crashing server would.
    Abort,
}

/// Which objects a list or watch covers.
#[derive(Debug, Clone)]
pub(super) struct Scope {
    pub kind: ResourceKind,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Scope {
    fn in_namespace(&self, namespace: &str) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|wanted| wanted == namespace)
    }

    fn matches(&self, object: &Value) -> bool {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        self.in_namespace(namespace) && self.labels.matches(object) && self.fields.matches(object)
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }
}

struct Watcher {
    scope: Scope,
    bookmarks: bool,
    frames: mpsc::UnboundedSender<WatchFrame>,
}

/// One committed write.
struct Change {
    resource_version: u64,
    key: ObjectKey,
    /// The stored object this write replaced or deleted.
    before: Option<Arc<Value>>,
    /// The object as watch events carry it: the new state, or for a
    /// deletion the last state stamped with the deletion's resourceVersion.
    object: Arc<Value>,
    deleted: bool,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WatchStart {
    /// Synthetic ADDED events for the current state first (resourceVersion
    /// unset or "0"); with `initial_events_end`, then the BOOKMARK that ends
    /// a streaming list (`sendInitialEvents=true`).
    CurrentState { initial_events_end: bool },
    /// Every change after this resourceVersion.
    After(u64),
}

/// How a typed write treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteMode {
    /// `POST`: the object must not exist.
    Create,
    /// `PUT`: the object must exist; a set `metadata.resourceVersion` must
    /// match the stored one.
    Update,
    /// Create or replace, ignoring `metadata.resourceVersion`.
    Apply,
}

/// ((namespace, name), object), in key order.
type ListEntry<'a> = ((&'a str, &'a str), &'a Arc<Value>);

/// One page of a list.
pub(super) struct ListPage {
    pub items: Vec<Arc<Value>>,
    pub resource_version: u64,
    /// Key of the last item, when more items follow.
    pub continue_after: Option<(String, String)>,
    /// Objects left after this page, when the list has no selector (the
    /// server only counts them then).
    pub remaining: Option<u64>,
}

pub(super) struct Store {
    resource_version: u64,
    /// The history holds every change with a resourceVersion above this.
    compacted: u64,
    history_limit: usize,
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    history: VecDeque<Change>,
    watchers: BTreeMap<u64, Watcher>,
    next_watcher: u64,
    published: watch::Sender<u64>,
    /// Which Service holds each ClusterIP, for the allocator's uniqueness.
    cluster_ips: HashMap<String, ObjectKey>,
}

/// Serializes a watch event line: `{"type":T,"object":O}\n`.
pub(super) fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(event_type.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    serde_json::to_writer(&mut line, object).expect("a JSON value always serializes");
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn kind_range(
    objects: &BTreeMap<ObjectKey, Arc<Value>>,
    kind: ResourceKind,
) -> impl Iterator<Item = (&ObjectKey, &Arc<Value>)> {
    objects
        .range((kind, String::new(), String::new())..)
        .take_while(move |(key, _)| key.0 == kind)
}

impl Store {
    pub(super) fn new(history_limit: usize) -> Self {
        // etcd's first revision; nothing has happened yet, so no history is missing.
        let initial = 1;
        Self {
            resource_version: initial,
            compacted: initial,
            history_limit: history_limit.max(1),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            watchers: BTreeMap::new(),
            next_watcher: 1,
            published: watch::Sender::new(initial),
            cluster_ips: HashMap::new(),
        }
    }

    pub(super) fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// The oldest resourceVersion a watch can resume after.
    pub(super) fn oldest_resumable(&self) -> u64 {
        self.compacted
    }

    /// Follows the current resourceVersion (for requests that wait for one).
    pub(super) fn subscribe_resource_version(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    pub(super) fn get(
        &self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<Value>> {
        self.objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    pub(super) fn all(&self, kind: ResourceKind) -> Vec<Arc<Value>> {
        kind_range(&self.objects, kind)
            .map(|(_, object)| object.clone())
            .collect()
    }

    fn cluster_ip_taken(&self, ip: &str, except: &ObjectKey) -> bool {
        self.cluster_ips
            .get(ip)
            .is_some_and(|owner| owner != except)
    }

    fn index_cluster_ips(
        &mut self,
        key: &ObjectKey,
        before: Option<&Value>,
        after: Option<&Value>,
    ) {
        let ips = |service: Option<&Value>| -> Vec<String> {
            service
                .and_then(|service| service.pointer("/spec/clusterIPs"))
                .and_then(Value::as_array)
                .map(|ips| {
                    ips.iter()
                        .filter_map(Value::as_str)
                        .filter(|ip| *ip != "None")
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        for ip in ips(before) {
            self.cluster_ips.remove(&ip);
        }
        for ip in ips(after) {
            self.cluster_ips.insert(ip, key.clone());
        }
    }

    /// Writes `object` as the API server would store it: server-set
    /// metadata, defaults, a new resourceVersion, watchers notified.
    /// Returns the stored object (unchanged, without a new
    /// resourceVersion, when the write changes nothing).
    pub(super) fn write<K: FakeResource>(
        &mut self,
        object: &K,
        mode: WriteMode,
        service_cidr: (std::net::Ipv4Addr, u8),
    ) -> Result<Arc<Value>, Rejection> {
        let kind = K::RESOURCE;
        let mut object = object.clone();
        let metadata = object.metadata_mut();
        let name = metadata
            .name
            .clone()
            .filter(|name| !name.is_empty())
            .ok_or_else(|| {
                Rejection::invalid(
                    &kind.qualified_kind(),
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                )
            })?;
        let namespace = if kind.namespaced() {
            metadata
                .namespace
                .get_or_insert_with(|| "default".into())
                .clone()
        } else {
            metadata.namespace = None;
            String::new()
        };
        let key = (kind, namespace, name.clone());
        let previous = self.objects.get(&key).cloned();
        match (mode, &previous) {
            (WriteMode::Create, Some(_)) => return Err(Rejection::already_exists(kind, &name)),
            (WriteMode::Update, None) => return Err(Rejection::not_found(kind, &name)),
            (WriteMode::Update, Some(previous)) => {
                let stored = previous
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str);
                if let Some(requested) = object.metadata().resource_version.as_deref()
                    && Some(requested) != stored
                {
                    return Err(Rejection::conflict(kind, &name));
                }
            }
            _ => {}
        }
        {
            let taken = |ip: &str| self.cluster_ip_taken(ip, &key);
            let context = WriteContext {
                previous: previous.as_deref(),
                cluster_ip_taken: &taken,
                service_cidr,
            };
            object.apply_server_defaults(&context)?;
        }
        let metadata = object.metadata_mut();
        let previous_field = |pointer: &str| {
            previous
                .as_deref()
                .and_then(|previous| previous.pointer(pointer))
                .cloned()
        };
        // The server owns these: a client-sent uid or creation time is ignored.
        metadata.uid = Some(
            previous_field("/metadata/uid")
                .and_then(|uid| uid.as_str().map(str::to_owned))
                .unwrap_or_else(objects::new_uid),
        );
        metadata.creation_timestamp = Some(
            previous_field("/metadata/creationTimestamp")
                .and_then(|time| serde_json::from_value(time).ok())
                .unwrap_or_else(objects::now),
        );
        metadata.resource_version = None;
        metadata.generation = None;
        let mut value = serde_json::to_value(&object).map_err(|error| {
            Rejection::new(
                500,
                "InternalError",
                format!("encoding {kind} {name}: {error}"),
            )
        })?;
        to_wire_shape(kind, &mut value);
        if kind == ResourceKind::EndpointSlice {
            value["metadata"]["generation"] =
                json!(endpoint_slice_generation(&value, previous.as_deref()));
        }
        if let Some(previous) = previous
            && same_apart_from_resource_version(&value, &previous)
        {
            return Ok(previous);
        }
        Ok(self.commit(key, Some(value)))
    }

    /// Deletes an object; returns it as the DELETED event carries it.
    pub(super) fn delete(
        &mut self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Value>, Rejection> {
        let key = (kind, namespace.to_owned(), name.to_owned());
        if !self.objects.contains_key(&key) {
            return Err(Rejection::not_found(kind, name));
        }
        Ok(self.commit(key, None))
    }

    fn commit(&mut self, key: ObjectKey, new: Option<Value>) -> Arc<Value> {
        self.resource_version += 1;
        let resource_version = self.resource_version;
        let before = self.objects.get(&key).cloned();
        let (object, deleted) = match new {
            Some(mut value) => {
                set_resource_version(&mut value, resource_version);
                let value = Arc::new(value);
                self.objects.insert(key.clone(), value.clone());
                (value, false)
            }
            None => {
                self.objects.remove(&key);
                let mut last = before
                    .as_deref()
                    .cloned()
                    .expect("only stored objects are deleted");
                set_resource_version(&mut last, resource_version);
                (Arc::new(last), true)
            }
        };
        if key.0 == ResourceKind::Service {
            self.index_cluster_ips(&key, before.as_deref(), (!deleted).then_some(&*object));
        }
        let change = Change {
            resource_version,
            key,
            before,
            object: object.clone(),
            deleted,
        };
        self.fan_out(&change);
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.resource_version;
            }
        }
        self.published.send_replace(resource_version);
        object
    }

    /// The event a change means to a watcher with `scope`: objects that
    /// start matching a selector are ADDED, objects that stop matching are
    /// DELETED, as the watch cache filters them.
    fn event_for(scope: &Scope, change: &Change) -> Option<&'static str> {
        if change.key.0 != scope.kind {
            return None;
        }
        let matched_before = change
            .before
            .as_deref()
            .is_some_and(|before| scope.matches(before));
        if change.deleted {
            return matched_before.then_some("DELETED");
        }
        match (matched_before, scope.matches(&change.object)) {
            (true, true) => Some("MODIFIED"),
            (false, true) => Some("ADDED"),
            (true, false) => Some("DELETED"),
            (false, false) => None,
        }
    }

    fn fan_out(&mut self, change: &Change) {
        let mut lines: [(&str, Option<Bytes>); 3] =
            [("ADDED", None), ("MODIFIED", None), ("DELETED", None)];
        let mut gone = Vec::new();
        for (id, watcher) in &self.watchers {
            let Some(event_type) = Self::event_for(&watcher.scope, change) else {
                continue;
            };
            let slot = lines
                .iter_mut()
                .find(|(name, _)| *name == event_type)
                .expect("every event type has a slot");
            let line = slot
                .1
                .get_or_insert_with(|| event_line(event_type, &change.object))
                .clone();
            if watcher.frames.send(WatchFrame::Line(line)).is_err() {
                gone.push(*id);
            }
        }
        for id in gone {
            self.watchers.remove(&id);
        }
    }

    /// Registers a watcher and queues its first events. `start` must have
    /// been checked against [`Self::oldest_resumable`] and
    /// [`Self::resource_version`].
    pub(super) fn register_watch(
        &mut self,
        scope: Scope,
        bookmarks: bool,
        start: WatchStart,
    ) -> (u64, mpsc::UnboundedReceiver<WatchFrame>) {
        let (frames, receiver) = mpsc::unbounded_channel();
        match start {
            WatchStart::CurrentState { initial_events_end } => {
                for (_, object) in kind_range(&self.objects, scope.kind) {
                    if scope.matches(object) {
                        let _ = frames.send(WatchFrame::Line(event_line("ADDED", object)));
                    }
                }
                if initial_events_end {
                    let bookmark = scope.kind.bookmark_object(
                        self.resource_version,
                        Some(json!({"k8s.io/initial-events-end": "true"})),
                    );
                    let _ = frames.send(WatchFrame::Line(event_line("BOOKMARK", &bookmark)));
                }
            }
            WatchStart::After(after) => {
                debug_assert!(after >= self.compacted && after <= self.resource_version);
                for change in self
                    .history
                    .iter()
                    .filter(|change| change.resource_version > after)
                {
                    if let Some(event_type) = Self::event_for(&scope, change) {
                        let _ =
                            frames.send(WatchFrame::Line(event_line(event_type, &change.object)));
                    }
                }
            }
        }
        let id = self.next_watcher;
        self.next_watcher += 1;
        self.watchers.insert(
            id,
            Watcher {
                scope,
                bookmarks,
                frames,
            },
        );
        (id, receiver)
    }

    /// Sends a BOOKMARK at the current resourceVersion to one watcher, if
    /// it asked for bookmarks. Returns whether the watcher is still open.
    pub(super) fn bookmark(&mut self, id: u64) -> bool {
        let Some(watcher) = self.watchers.get(&id) else {
            return false;
        };
        if !watcher.bookmarks {
            return true;
        }
        let bookmark = watcher
            .scope
            .kind
            .bookmark_object(self.resource_version, None);
        if watcher
            .frames
            .send(WatchFrame::Line(event_line("BOOKMARK", &bookmark)))
            .is_err()
        {
            self.watchers.remove(&id);
            return false;
        }
        true
    }

    /// Sends a BOOKMARK to every watcher that asked for them.
    pub(super) fn bookmark_all(&mut self) -> usize {
        let ids: Vec<u64> = self
            .watchers
            .iter()
            .filter(|(_, watcher)| watcher.bookmarks)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter().filter(|id| self.bookmark(*id)).count()
    }

    /// Ends a watch: its body finishes cleanly once drained.
    pub(super) fn remove_watcher(&mut self, id: u64) {
        self.watchers.remove(&id);
    }

    pub(super) fn open_watches(&self, kind: Option<ResourceKind>) -> usize {
        self.watchers
            .values()
            .filter(|watcher| !watcher.frames.is_closed())
            .filter(|watcher| kind.is_none_or(|kind| watcher.scope.kind == kind))
            .count()
    }

    /// Ends every watch: each gets `final_frame` (if any) and is dropped.
    pub(super) fn end_watches(&mut self, final_frame: impl Fn() -> Option<WatchFrame>) -> usize {
        let watchers = std::mem::take(&mut self.watchers);
        watchers
            .into_values()
            .filter(|watcher| match final_frame() {
                Some(frame) => watcher.frames.send(frame).is_ok(),
                None => !watcher.frames.is_closed(),
            })
            .count()
    }

    /// Forgets all history: every resourceVersion before now is too old to
    /// resume a watch or continue a list from.
    pub(super) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.resource_version;
    }

    /// The objects of `kind` as they were at `at` (which the caller checked
    /// is within the history), keyed by (namespace, name).
    fn state_at(&self, kind: ResourceKind, at: u64) -> BTreeMap<(String, String), Arc<Value>> {
        let mut state: BTreeMap<(String, String), Arc<Value>> = kind_range(&self.objects, kind)
            .map(|((_, namespace, name), object)| {
                ((namespace.clone(), name.clone()), object.clone())
            })
            .collect();
        for change in self.history.iter().rev() {
            if change.resource_version <= at {
                break;
            }
            if change.key.0 != kind {
                continue;
            }
            let key = (change.key.1.clone(), change.key.2.clone());
            match &change.before {
                Some(before) => state.insert(key, before.clone()),
                None => state.remove(&key),
            };
        }
        state
    }

    /// One page of `scope` as of `at` (current when `None`), after the key
    /// `after`, at most `limit` items.
    pub(super) fn list(
        &self,
        scope: &Scope,
        at: Option<u64>,
        limit: Option<usize>,
        after: Option<&(String, String)>,
    ) -> ListPage {
        let resource_version = at.unwrap_or(self.resource_version);
        let snapshot;
        let entries: Box<dyn Iterator<Item = ListEntry<'_>>> =
            if resource_version == self.resource_version {
                Box::new(kind_range(&self.objects, scope.kind).map(
                    |((_, namespace, name), object)| ((namespace.as_str(), name.as_str()), object),
                ))
            } else {
                snapshot = self.state_at(scope.kind, resource_version);
                Box::new(snapshot.iter().map(|((namespace, name), object)| {
                    ((namespace.as_str(), name.as_str()), object)
                }))
            };
        let mut candidates = entries
            .filter(|((namespace, name), _)| {
                after.is_none_or(|(after_namespace, after_name)| {
                    (*namespace, *name) > (after_namespace.as_str(), after_name.as_str())
                })
            })
            .filter(|((namespace, _), _)| scope.in_namespace(namespace));
        let mut items = Vec::new();
        let mut last = None;
        for ((namespace, name), object) in candidates.by_ref() {
            if !scope.matches(object) {
                continue;
            }
            items.push(object.clone());
            last = Some((namespace.to_owned(), name.to_owned()));
            if limit.is_some_and(|limit| items.len() >= limit) {
                break;
            }
        }
        let rest: Vec<_> = candidates.collect();
        let more = rest.iter().any(|(_, object)| scope.matches(object));
        ListPage {
            items,
            resource_version,
            continue_after: if more { last } else { None },
            remaining: (more && !scope.has_selectors()).then_some(rest.len() as u64),
        }
    }
}

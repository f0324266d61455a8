//! Services and EndpointSlices from a directory of manifests.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file of the directory (not its
//! subdirectories, not hidden files) is read; a file holds any number of
//! objects: multi-document YAML, a JSON array or several JSON values, and
//! `kind: List` (or `ServiceList`, ...) with `items`. Only `v1/Service` and
//! `discovery.k8s.io/v1/EndpointSlice` are kept; other kinds are ignored
//! (debug log).
//!
//! Bad input never takes down what was good:
//! - a file that does not parse is reported once, and every object it held
//!   before stays as it was;
//! - an object that makes no sense (a field that does not deserialize, or
//!   fails [`translate::validate_service`] /
//!   [`translate::validate_endpoint_slice`]) is reported once, naming the
//!   file, the object and the field; its last good version stays, and the
//!   rest of the file is applied. (An object too broken to tell its kind
//!   and name makes the file keep every object it no longer lists.)
//! - a deleted file withdraws its objects.
//!
//! A file is only parsed again when its content changes, so an unchanged
//! bad file is not reported again. [`DirWatcher`] tells when to rescan.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::translate::{
    self, DEFAULT_NAMESPACE, InvalidField, Kind, ObjectRef, Scope, Translation,
};

/// A change is applied once the directory has been quiet this long.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// ... but no later than this after the first event of a burst.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

/// An object the agent reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

impl Object {
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Object::Service(service) => ObjectRef::of_service(service),
            Object::EndpointSlice(slice) => ObjectRef::of_slice(slice),
        }
    }

    fn validate(&self) -> Result<(), InvalidField> {
        match self {
            Object::Service(service) => translate::validate_service(service),
            Object::EndpointSlice(slice) => translate::validate_endpoint_slice(slice),
        }
    }
}

/// The directory cannot be read or watched.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading the manifest directory {}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("watching the manifest directory {}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Which object of a file a problem is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// 1-based document (YAML document or top-level JSON value).
    pub document: usize,
    /// The object, when its kind and name could be told.
    pub object: Option<ObjectRef>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(object) => write!(f, "{object} (document {})", self.document),
            None => write!(f, "document {}", self.document),
        }
    }
}

/// An object of a file that was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub location: Location,
    /// The offending field (`spec.ports[0].port`), when there is one.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.location)?;
        if let Some(field) = &self.field {
            write!(f, "field {field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// The content of one file: accepted objects in file order, and rejections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    pub rejections: Vec<Rejection>,
    /// Documents of other kinds, ignored.
    pub ignored: Vec<String>,
}

/// Whether a file name is a manifest: `*.yaml`, `*.yml`, `*.json`, not
/// hidden (editors' lock and swap files are hidden).
pub fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && matches!(
            path.extension().and_then(|ext| ext.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

/// Parses one file. `Err` when the file as a whole does not parse.
pub fn parse_file(path: &Path, content: &[u8]) -> Result<ParsedFile, String> {
    let mut documents = Vec::new();
    if path.extension().and_then(|ext| ext.to_str()) == Some("json") {
        for value in serde_json::Deserializer::from_slice(content).into_iter::<Value>() {
            documents.push(value.map_err(|error| error.to_string())?);
        }
    } else {
        use serde::Deserialize;
        for document in serde_yaml::Deserializer::from_slice(content) {
            documents.push(Value::deserialize(document).map_err(|error| error.to_string())?);
        }
    }
    let mut parsed = ParsedFile::default();
    for (index, value) in documents.into_iter().enumerate() {
        parse_value(index + 1, value, &mut parsed);
    }
    // The same object twice in one file: the first one counts.
    let mut seen = BTreeSet::new();
    let mut duplicates = Vec::new();
    parsed.objects.retain(|object| {
        let object_ref = object.object_ref();
        let first = seen.insert(object_ref.clone());
        if !first {
            duplicates.push(object_ref);
        }
        first
    });
    for object in duplicates {
        parsed.rejections.push(Rejection {
            location: Location {
                document: 0,
                object: Some(object),
            },
            field: None,
            message: "defined more than once in this file; the first definition is used".into(),
        });
    }
    Ok(parsed)
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |value, key| value.get(key))
        .and_then(Value::as_str)
}

fn parse_value(document: usize, value: Value, parsed: &mut ParsedFile) {
    let reject = |parsed: &mut ParsedFile, object, field: Option<&str>, message: String| {
        parsed.rejections.push(Rejection {
            location: Location { document, object },
            field: field.map(str::to_owned),
            message,
        })
    };
    match value {
        Value::Null => {}
        Value::Array(items) => {
            for item in items {
                parse_value(document, item, parsed);
            }
        }
        Value::Object(_) => {
            let api_version = str_at(&value, &["apiVersion"]).unwrap_or_default();
            let Some(kind) = str_at(&value, &["kind"]) else {
                reject(parsed, None, Some("kind"), "missing".into());
                return;
            };
            let kind_of = match (api_version, kind) {
                ("v1", "Service") => Kind::Service,
                ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
                (_, list) if list.ends_with("List") => {
                    match value.get("items") {
                        Some(Value::Array(_)) | Some(Value::Null) | None => {}
                        Some(_) => {
                            reject(parsed, None, Some("items"), "not a list".into());
                            return;
                        }
                    }
                    if let Some(Value::Array(items)) = value.get("items").cloned() {
                        for item in items {
                            parse_value(document, item, parsed);
                        }
                    }
                    return;
                }
                _ => {
                    parsed.ignored.push(format!(
                        "document {document}: {api_version}/{kind} {}",
                        str_at(&value, &["metadata", "name"]).unwrap_or("<unnamed>")
                    ));
                    return;
                }
            };
            let name = str_at(&value, &["metadata", "name"]).unwrap_or_default();
            let object_ref = (!name.is_empty()).then(|| ObjectRef {
                kind: kind_of,
                namespace: str_at(&value, &["metadata", "namespace"])
                    .filter(|namespace| !namespace.is_empty())
                    .unwrap_or(DEFAULT_NAMESPACE)
                    .to_owned(),
                name: name.to_owned(),
            });
            let object = match kind_of {
                Kind::Service => {
                    deserialize::<Service>(value).map(|s| Object::Service(Box::new(s)))
                }
                Kind::EndpointSlice => {
                    deserialize::<EndpointSlice>(value).map(|s| Object::EndpointSlice(Box::new(s)))
                }
            };
            match object {
                Ok(object) => match object.validate() {
                    Ok(()) => parsed.objects.push(object),
                    Err(invalid) => {
                        reject(parsed, object_ref, Some(&invalid.field), invalid.message)
                    }
                },
                Err((field, message)) => reject(parsed, object_ref, field.as_deref(), message),
            }
        }
        other => reject(
            parsed,
            None,
            None,
            format!("expected an object, found {other}"),
        ),
    }
}

/// Deserializes an object, naming the field that does not fit.
fn deserialize<T: serde::de::DeserializeOwned>(
    value: Value,
) -> Result<T, (Option<String>, String)> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let field = (path != ".").then_some(path);
        (field, error.into_inner().to_string())
    })
}

/// What one file contributes.
#[derive(Clone, Debug, Default)]
struct FileState {
    /// The content last read, so an unchanged file is not parsed again.
    content: Vec<u8>,
    /// Its objects as programmed: the last good version of each.
    objects: BTreeMap<ObjectRef, Object>,
}

/// The result of one [`ManifestSource::scan`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanOutcome {
    /// The set of objects changed.
    pub changed: bool,
    /// Error lines reported by this scan (also logged).
    pub errors: Vec<String>,
}

/// The directory's objects: the last good version of each, per file.
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every changed, new or deleted file. Errors about files and
    /// objects are logged (and returned in the outcome); `Err` only when the
    /// directory itself cannot be listed, in which case nothing changes.
    pub fn scan(&mut self) -> Result<ScanOutcome, SourceError> {
        let read_dir_error = |source| SourceError::ReadDir {
            path: self.dir.clone(),
            source,
        };
        let mut paths = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir).map_err(read_dir_error)? {
            let path = entry.map_err(read_dir_error)?.path();
            // Follows symlinks (ConfigMap volumes are symlinks).
            if is_manifest(&path) && path.is_file() {
                paths.insert(path);
            }
        }

        let mut outcome = ScanOutcome::default();
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !paths.contains(*path))
            .cloned()
            .collect();
        for path in removed {
            let state = self.files.remove(&path).unwrap_or_default();
            if !state.objects.is_empty() {
                info!(
                    file = %path.display(),
                    "file removed: withdrawing its {} objects",
                    state.objects.len()
                );
                outcome.changed = true;
            }
        }
        for path in paths {
            let content = match std::fs::read(&path) {
                Ok(content) => content,
                // Deleted between listing and reading: the next event says so.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => {
                    let line = format!(
                        "{}: cannot be read ({error}); keeping what it held",
                        path.display()
                    );
                    error!("{line}");
                    outcome.errors.push(line);
                    continue;
                }
            };
            if self
                .files
                .get(&path)
                .is_some_and(|state| state.content == content)
            {
                continue;
            }
            outcome.changed |= self.update_file(&path, content, &mut outcome.errors);
        }
        Ok(outcome)
    }

    /// Parses a file's new content and updates its objects. Returns whether
    /// its objects changed.
    fn update_file(&mut self, path: &Path, content: Vec<u8>, errors: &mut Vec<String>) -> bool {
        let mut report = |line: String| {
            error!("{line}");
            errors.push(line);
        };
        let old = self.files.remove(path).unwrap_or_default();
        let parsed = match parse_file(path, &content) {
            Ok(parsed) => parsed,
            Err(message) => {
                let consequence = match old.objects.len() {
                    0 => "nothing from it is applied".to_owned(),
                    n => format!("keeping the {n} objects it held before"),
                };
                report(format!(
                    "{}: does not parse: {message}; {consequence}",
                    path.display()
                ));
                self.files.insert(
                    path.to_owned(),
                    FileState {
                        content,
                        objects: old.objects,
                    },
                );
                return false;
            }
        };
        for ignored in &parsed.ignored {
            debug!(file = %path.display(), "ignored (not a v1 Service or discovery.k8s.io/v1 EndpointSlice): {ignored}");
        }

        let mut objects: BTreeMap<ObjectRef, Object> = parsed
            .objects
            .into_iter()
            .map(|object| (object.object_ref(), object))
            .collect();
        let mut unidentified = false;
        for rejection in &parsed.rejections {
            let consequence = match &rejection.location.object {
                Some(object_ref) if !objects.contains_key(object_ref) => {
                    match old.objects.get(object_ref) {
                        Some(previous) => {
                            objects.insert(object_ref.clone(), previous.clone());
                            "keeping its last good version"
                        }
                        None => "ignored",
                    }
                }
                Some(_) => "ignored",
                None => {
                    unidentified = true;
                    "ignored"
                }
            };
            report(format!("{}: {rejection}; {consequence}", path.display()));
        }
        if unidentified {
            // Cannot tell which object the broken one was: keep every
            // object the file held before and no longer lists.
            let mut kept = 0;
            for (object_ref, object) in &old.objects {
                if !objects.contains_key(object_ref) {
                    objects.insert(object_ref.clone(), object.clone());
                    kept += 1;
                }
            }
            if kept > 0 {
                warn!(
                    file = %path.display(),
                    "keeping {kept} objects the file no longer lists, as one of its objects cannot be identified"
                );
            }
        }
        for object_ref in objects.keys() {
            let elsewhere: Vec<&PathBuf> = self
                .files
                .iter()
                .filter(|(_, state)| state.objects.contains_key(object_ref))
                .map(|(other, _)| other)
                .collect();
            if let Some(other) = elsewhere.first() {
                let used = if other.as_path() < path {
                    other.display()
                } else {
                    path.display()
                };
                report(format!(
                    "{}: {object_ref} is also defined in {}; the one in {used} is used",
                    path.display(),
                    other.display()
                ));
            }
        }
        let changed = objects != old.objects;
        self.files
            .insert(path.to_owned(), FileState { content, objects });
        changed
    }

    /// Every object, each once (the first file in path order wins).
    pub fn objects(&self) -> BTreeMap<&ObjectRef, &Object> {
        let mut objects = BTreeMap::new();
        for state in self.files.values() {
            for (object_ref, object) in &state.objects {
                objects.entry(object_ref).or_insert(object);
            }
        }
        objects
    }

    /// Translates the current objects with the default scope.
    pub fn translate(&self) -> Translation {
        self.translate_in(&Scope::default())
    }

    /// Translates the current objects for the agent `scope` describes.
    pub fn translate_in(&self, scope: &Scope) -> Translation {
        let objects = self.objects();
        let services = objects.values().filter_map(|object| match object {
            Object::Service(service) => Some(service.as_ref()),
            Object::EndpointSlice(_) => None,
        });
        let slices = objects.values().filter_map(|object| match object {
            Object::EndpointSlice(slice) => Some(slice.as_ref()),
            Object::Service(_) => None,
        });
        translate::translate_in(scope, services, slices)
    }
}

/// Watches a directory (inotify) and reports bursts of changes as one.
pub struct DirWatcher {
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
    /// Set when the watched directory itself was removed or renamed:
    /// inotify follows the inode, so a directory put in its place under the
    /// same path is not watched.
    lost: Arc<AtomicBool>,
}

/// Whether an event can change what the directory holds. Opening or
/// reading a file (which the scan itself does) cannot.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

impl DirWatcher {
    pub fn new(dir: &Path) -> Result<Self, SourceError> {
        let (sender, events) = mpsc::unbounded_channel();
        let watch_error = |source| SourceError::Watch {
            path: dir.to_owned(),
            source,
        };
        let lost = Arc::new(AtomicBool::new(false));
        let watched = dir.to_owned();
        let lost_flag = Arc::clone(&lost);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let relevant = match &event {
                    Ok(event) => {
                        let moved_away = matches!(
                            event.kind,
                            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                        );
                        if moved_away && event.paths.contains(&watched) {
                            lost_flag.store(true, Ordering::Relaxed);
                        }
                        is_change(&event.kind)
                    }
                    Err(error) => {
                        // Lost events (queue overflow): rescan to be sure.
                        warn!(error = %error, "manifest directory watch error; rescanning");
                        true
                    }
                };
                if relevant {
                    // The receiver is gone only when the agent stops.
                    let _ = sender.send(());
                }
            })
            .map_err(watch_error)?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        Ok(Self {
            _watcher: watcher,
            events,
            lost,
        })
    }

    /// Whether the watched directory was removed or renamed, so that a new
    /// watcher is needed for whatever now has its path.
    pub fn is_stale(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Waits for a change, then until the directory has been quiet for
    /// [`DEBOUNCE`] (at most [`MAX_DEBOUNCE`]), so a burst of writes is one
    /// rescan. `None` if the watch ended.
    pub async fn changed(&mut self) -> Option<()> {
        self.events.recv().await?;
        let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
        loop {
            let quiet = tokio::time::sleep(DEBOUNCE);
            tokio::select! {
                event = self.events.recv() => {
                    event?;
                    if tokio::time::Instant::now() >= deadline {
                        return Some(());
                    }
                }
                () = quiet => return Some(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec:
  clusterIP: 198.18.100.10
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

    const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: apps
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.0.10]}]
"#;

    fn names(source: &ManifestSource) -> Vec<String> {
        source
            .objects()
            .keys()
            .map(|object| object.to_string())
            .collect()
    }

    fn write(dir: &Path, name: &str, content: &str) {
        std::fs::write(dir.join(name), content).unwrap();
    }

    #[test]
    fn multi_document_yaml_with_other_kinds() {
        let content = format!(
            "{SERVICE}---\n{SLICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n"
        );
        let parsed = parse_file(Path::new("a.yaml"), content.as_bytes()).unwrap();
        assert_eq!(parsed.objects.len(), 2);
        assert!(parsed.rejections.is_empty());
        assert_eq!(parsed.ignored.len(), 1);
    }

    #[test]
    fn json_arrays_streams_and_lists() {
        let service: Value = serde_yaml::from_str(SERVICE).unwrap();
        let slice: Value = serde_yaml::from_str(SLICE).unwrap();
        let array = serde_json::to_string(&vec![service.clone(), slice.clone()]).unwrap();
        let parsed = parse_file(Path::new("a.json"), array.as_bytes()).unwrap();
        assert_eq!(parsed.objects.len(), 2);

        let stream = format!("{service}\n{slice}\n");
        let parsed = parse_file(Path::new("a.json"), stream.as_bytes()).unwrap();
        assert_eq!(parsed.objects.len(), 2);

        let list =
            serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [service, slice]});
        let parsed = parse_file(Path::new("a.json"), list.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.objects.len(), 2);

        let yaml_list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n",
            serde_json::to_string(&serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"clusterIP": "198.18.100.1", "ports": [{"port": 80}]}})).unwrap()
        );
        let parsed = parse_file(Path::new("a.yml"), yaml_list.as_bytes()).unwrap();
        assert_eq!(parsed.objects.len(), 1);
    }

    #[test]
    fn bad_field_names_file_object_and_field() {
        let content = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 198.18.100.10
  ports: [{port: "eighty"}]
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: 198.18.100.11
  ports: [{port: 0}]
"#;
        let parsed = parse_file(Path::new("a.yaml"), content.as_bytes()).unwrap();
        assert!(parsed.objects.is_empty());
        assert_eq!(parsed.rejections.len(), 2);
        let first = &parsed.rejections[0];
        assert_eq!(first.field.as_deref(), Some("spec.ports[0].port"));
        assert_eq!(first.location.document, 1);
        assert_eq!(
            first.location.object.as_ref().unwrap().to_string(),
            "Service default/web"
        );
        let second = parsed.rejections[1].to_string();
        assert!(second.contains("Service default/db"), "{second}");
        assert!(second.contains("field spec.ports[0].port"), "{second}");
    }

    #[test]
    fn unparsable_file_is_an_error() {
        assert!(parse_file(Path::new("a.yaml"), b"a: [unclosed").is_err());
        assert!(parse_file(Path::new("a.json"), b"{\"a\": ").is_err());
    }

    #[test]
    fn manifest_names() {
        assert!(is_manifest(Path::new("/d/a.yaml")));
        assert!(is_manifest(Path::new("/d/a.yml")));
        assert!(is_manifest(Path::new("/d/a.json")));
        assert!(!is_manifest(Path::new("/d/.#a.yaml")));
        assert!(!is_manifest(Path::new("/d/a.yaml.swp")));
        assert!(!is_manifest(Path::new("/d/a.txt")));
    }

    #[test]
    fn scan_keeps_last_good_versions() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", &format!("{SERVICE}---\n{SLICE}"));
        let mut source = ManifestSource::new(dir.path());
        let outcome = source.scan().unwrap();
        assert!(outcome.changed);
        assert!(outcome.errors.is_empty());
        assert_eq!(
            names(&source),
            ["Service apps/web", "EndpointSlice apps/web-1"]
        );
        let state = source.translate().state;
        assert_eq!(state.services().len(), 1);

        // Nothing changed: nothing to do.
        assert_eq!(source.scan().unwrap(), ScanOutcome::default());

        // The slice gets a bad address: one error naming file, object and
        // field; the service's change still applies; the slice stays.
        let bad_slice = SLICE.replace("198.18.0.10", "198.18.0.999");
        let new_service = SERVICE.replace("port: 80,", "port: 81,");
        write(
            dir.path(),
            "web.yaml",
            &format!("{new_service}---\n{bad_slice}"),
        );
        let outcome = source.scan().unwrap();
        assert!(outcome.changed);
        assert_eq!(outcome.errors.len(), 1, "{:?}", outcome.errors);
        let line = &outcome.errors[0];
        assert!(line.contains("web.yaml"), "{line}");
        assert!(line.contains("EndpointSlice apps/web-1"), "{line}");
        assert!(line.contains("endpoints[0].addresses[0]"), "{line}");
        assert!(line.contains("keeping its last good version"), "{line}");
        let state = source.translate().state;
        let (_, port) = state.services().next().unwrap();
        assert_eq!(port.frontends.first().unwrap().port, 81);
        assert_eq!(port.backends.len(), 1);

        // Rescanning the same bad file reports nothing again.
        assert_eq!(source.scan().unwrap(), ScanOutcome::default());

        // A file that does not parse keeps everything it had.
        write(dir.path(), "web.yaml", "apiVersion: v1\nkind: [");
        let outcome = source.scan().unwrap();
        assert!(!outcome.changed);
        assert_eq!(outcome.errors.len(), 1);
        assert!(outcome.errors[0].contains("does not parse"));
        assert_eq!(names(&source).len(), 2);

        // A deleted file withdraws its objects.
        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
        let outcome = source.scan().unwrap();
        assert!(outcome.changed);
        assert!(source.objects().is_empty());
    }

    #[test]
    fn an_unidentifiable_object_keeps_what_the_file_no_longer_lists() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", &format!("{SERVICE}---\n{SLICE}"));
        let mut source = ManifestSource::new(dir.path());
        source.scan().unwrap();
        // The slice loses its name (unidentifiable): it is kept.
        let nameless = SLICE.replace("  name: web-1\n", "");
        write(dir.path(), "web.yaml", &format!("{SERVICE}---\n{nameless}"));
        let outcome = source.scan().unwrap();
        assert_eq!(outcome.errors.len(), 1);
        assert!(
            outcome.errors[0].contains("metadata.name"),
            "{:?}",
            outcome.errors
        );
        assert_eq!(names(&source).len(), 2);
    }

    #[test]
    fn a_new_bad_object_is_ignored_and_others_apply() {
        let dir = tempfile::tempdir().unwrap();
        let bad = SERVICE
            .replace("name: web", "name: bad")
            .replace("198.18.100.10", "not-an-ip");
        write(dir.path(), "a.yaml", &format!("{bad}---\n{SERVICE}"));
        write(dir.path(), "b.json", "{}");
        let mut source = ManifestSource::new(dir.path());
        let outcome = source.scan().unwrap();
        assert_eq!(outcome.errors.len(), 2, "{:?}", outcome.errors);
        assert!(outcome.errors[0].contains("Service apps/bad"));
        assert!(outcome.errors[0].contains("spec.clusterIP"));
        assert!(outcome.errors[0].contains("ignored"));
        assert!(outcome.errors[1].contains("b.json"));
        assert!(outcome.errors[1].contains("field kind"));
        assert_eq!(names(&source), ["Service apps/web"]);
    }

    #[test]
    fn an_object_in_two_files_is_reported_and_the_first_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", SERVICE);
        write(
            dir.path(),
            "b.yaml",
            &SERVICE.replace("port: 80,", "port: 81,"),
        );
        let mut source = ManifestSource::new(dir.path());
        let outcome = source.scan().unwrap();
        assert_eq!(outcome.errors.len(), 1);
        assert!(outcome.errors[0].contains("also defined"));
        let state = source.translate().state;
        let (_, port) = state.services().next().unwrap();
        assert_eq!(port.frontends.first().unwrap().port, 80);
        // Removing the winner lets the other definition take over.
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert!(source.scan().unwrap().changed);
        let state = source.translate().state;
        let (_, port) = state.services().next().unwrap();
        assert_eq!(port.frontends.first().unwrap().port, 81);
    }

    #[tokio::test]
    async fn watcher_notices_a_replaced_directory() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("manifests");
        std::fs::create_dir(&dir).unwrap();
        let mut watcher = DirWatcher::new(&dir).unwrap();
        assert!(!watcher.is_stale());
        std::fs::remove_dir(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watcher.changed())
            .await
            .expect("removal not reported")
            .unwrap();
        assert!(watcher.is_stale());
    }

    #[tokio::test]
    async fn watcher_reports_a_burst_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut watcher = DirWatcher::new(dir.path()).unwrap();
        for i in 0..5 {
            write(dir.path(), &format!("f{i}.yaml"), SERVICE);
        }
        tokio::time::timeout(Duration::from_secs(5), watcher.changed())
            .await
            .expect("no change reported")
            .unwrap();
        // Reading the files (as a scan does) is not a change.
        let mut source = ManifestSource::new(dir.path());
        source.scan().unwrap();
        let again = tokio::time::timeout(Duration::from_millis(300), watcher.changed()).await;
        assert!(again.is_err(), "reading files was reported as a change");
    }
}

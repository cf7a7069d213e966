//! The controllers' view of the API: list, watch and write objects of any served kind.
//!
//! The runners never reach into the API server's internals: the `berth` binary implements
//! [`Api`] over the server's object layer (same defaulting, validation and admission as a
//! kubectl request, without HTTP), and unit tests implement it in memory. Objects cross it as
//! JSON values; [`Typed`] converts them to k8s-openapi types at the edges.

use std::fmt;

use berth_api::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;

/// Why an API call failed, in the classes a controller acts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 404: the object is gone.
    #[error("not found: {0}")]
    NotFound(String),
    /// 409 on create: the name is taken.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// 409 on update: someone wrote since we read; re-read and decide again.
    #[error("conflict: {0}")]
    Conflict(String),
    /// 422/403: the write itself is wrong; retrying the same write cannot help.
    #[error("invalid: {0}")]
    Invalid(String),
    /// 410: a watch fell behind the store's compaction; list again.
    #[error("gone: {0}")]
    Gone(String),
    /// Anything else (the store is down, shutting down, ...): retry with backoff.
    #[error("{0}")]
    Other(String),
}

/// Which parts of an object an update writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Metadata and spec (status is kept), as a PUT of the object.
    Main,
    /// Status only, as a PUT of `/status`.
    Status,
    /// Both in one write: a controller's own path, so that a bind is one write per object
    /// instead of two (Kubernetes needs four API writes per bind; Berth two).
    Both,
}

/// A change seen by a watch: the object as it is (or was, for a deletion), resourceVersion
/// stamped.
#[derive(Debug)]
pub enum Event {
    Added(Value),
    Modified(Value),
    Deleted(Value),
    /// Added or modified, decoded only if the receiver does not already hold this revision
    /// (most events of a busy controller are its own writes, which it already holds).
    Changed(Lazy),
}

/// An object known by its cache key (`namespace/name` or `name`) and revision, whose body is
/// made on demand: JSON text, resourceVersion stamped, for [`Typed::from_json`].
pub struct Lazy {
    pub key: String,
    pub revision: u64,
    pub decode: Box<dyn FnOnce() -> Result<Vec<u8>, ApiError> + Send>,
}

/// One listed object as JSON text (resourceVersion stamped), with its cache key and revision.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub revision: u64,
    pub json: Vec<u8>,
}

impl fmt::Debug for Lazy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lazy")
            .field("key", &self.key)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

/// A stream of watch events. An `Err` ends it ([`ApiError::Gone`]: list again).
pub type EventStream = mpsc::Receiver<Result<Event, ApiError>>;

/// Everything the controllers do to the API.
#[async_trait::async_trait]
pub trait Api: Send + Sync + fmt::Debug + 'static {
    /// Every object of a kind (all namespaces) and the revision they were read at.
    async fn list(&self, res: &'static Resource) -> Result<(Vec<Value>, u64), ApiError>;
    /// [`Api::list`] as JSON text, which an informer decodes straight into its typed objects;
    /// an API in this process gives the stored text without making a `Value` of each object.
    async fn list_json(&self, res: &'static Resource) -> Result<(Vec<Listed>, u64), ApiError> {
        let (items, revision) = self.list(res).await?;
        let listed = items
            .iter()
            .map(|v| {
                Ok(Listed {
                    key: object_key(v),
                    revision: crate::informer::revision_of(v),
                    json: serde_json::to_vec(v).map_err(|e| ApiError::Other(format!("encoding an object: {e}")))?,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        Ok((listed, revision))
    }
    /// The changes after `revision`.
    async fn watch(&self, res: &'static Resource, revision: u64) -> Result<EventStream, ApiError>;
    /// One object, fresh from the store (not a cache).
    async fn get(&self, res: &'static Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError>;
    /// Creates `obj`; returns it as stored.
    async fn create(&self, res: &'static Resource, obj: Value) -> Result<Value, ApiError>;
    /// Replaces `obj` (compare-and-swap on its `metadata.resourceVersion`); returns it as stored.
    async fn update(&self, res: &'static Resource, obj: Value, part: Part) -> Result<Value, ApiError>;
    /// As [`Api::update`], for a controller that holds the object as it was (`old`, from its
    /// cache, at the revision `obj` names): an API in this process may take it instead of
    /// reading the object again. A stale `old` fails as a stale `obj` does, with a Conflict.
    /// Both are typed objects' encodings ([`Typed::to_value`]), which such an API need not read
    /// through their type again.
    async fn update_over(&self, res: &'static Resource, old: Value, obj: Value, part: Part) -> Result<Value, ApiError> {
        let _ = old;
        self.update(res, obj, part).await
    }
    /// Deletes an object (only the one with `uid`, when given); Terminating when it has finalizers.
    async fn delete(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        uid: Option<&str>,
    ) -> Result<(), ApiError>;
}

/// The served kind `plural` of `group`/`version`; the controllers name only kinds the API serves.
pub fn resource(group: &str, version: &str, plural: &str) -> &'static Resource {
    match berth_api::resources::by_plural(group, version, plural) {
        Some(r) => r,
        // The table in berth-api is static; a name missing from it is a typo caught by tests.
        None => panic!("berth-api serves no {group}/{version} {plural}"),
    }
}

/// The kinds the controllers use.
pub mod kinds {
    use super::resource;
    use berth_api::Resource;

    pub fn pvs() -> &'static Resource {
        resource("", "v1", "persistentvolumes")
    }
    pub fn pvcs() -> &'static Resource {
        resource("", "v1", "persistentvolumeclaims")
    }
    pub fn pods() -> &'static Resource {
        resource("", "v1", "pods")
    }
    pub fn nodes() -> &'static Resource {
        resource("", "v1", "nodes")
    }
    pub fn namespaces() -> &'static Resource {
        resource("", "v1", "namespaces")
    }
    pub fn events() -> &'static Resource {
        resource("", "v1", "events")
    }
    pub fn secrets() -> &'static Resource {
        resource("", "v1", "secrets")
    }
    pub fn storage_classes() -> &'static Resource {
        resource("storage.k8s.io", "v1", "storageclasses")
    }
    pub fn csi_drivers() -> &'static Resource {
        resource("storage.k8s.io", "v1", "csidrivers")
    }
    pub fn csi_nodes() -> &'static Resource {
        resource("storage.k8s.io", "v1", "csinodes")
    }
    pub fn volume_attachments() -> &'static Resource {
        resource("storage.k8s.io", "v1", "volumeattachments")
    }
    pub fn capacities() -> &'static Resource {
        resource("storage.k8s.io", "v1", "csistoragecapacities")
    }
    pub fn snapshots() -> &'static Resource {
        resource("snapshot.storage.k8s.io", "v1", "volumesnapshots")
    }
    pub fn snapshot_contents() -> &'static Resource {
        resource("snapshot.storage.k8s.io", "v1", "volumesnapshotcontents")
    }
    pub fn snapshot_classes() -> &'static Resource {
        resource("snapshot.storage.k8s.io", "v1", "volumesnapshotclasses")
    }
}

/// JSON <-> k8s-openapi conversions at the edge of [`Api`].
pub trait Typed: Sized {
    fn from_value(v: Value) -> Result<Self, ApiError>;
    fn from_json(json: &[u8]) -> Result<Self, ApiError>;
    fn to_value(&self) -> Result<Value, ApiError>;
}

impl<T: DeserializeOwned + Serialize> Typed for T {
    fn from_value(v: Value) -> Result<Self, ApiError> {
        serde_json::from_value(v).map_err(|e| ApiError::Other(format!("decoding an object: {e}")))
    }
    fn from_json(json: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(json).map_err(|e| ApiError::Other(format!("decoding an object: {e}")))
    }
    fn to_value(&self) -> Result<Value, ApiError> {
        serde_json::to_value(self).map_err(|e| ApiError::Other(format!("encoding an object: {e}")))
    }
}

/// `namespace/name`, or `name` for cluster-scoped objects: the key of caches and queues.
pub fn object_key(v: &Value) -> String {
    let m = &v["metadata"];
    let name = m["name"].as_str().unwrap_or("");
    match m["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_owned(),
    }
}

/// Splits a key made by [`object_key`].
pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, key),
    }
}

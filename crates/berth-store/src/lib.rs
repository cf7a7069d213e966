//! Berth's object store: the durable home of the control plane's Kubernetes objects.
//!
//! It owns keys of the form `/{group}/{resource}/{namespace}/{name}` (or without the namespace for
//! cluster-scoped kinds) and opaque values (the objects' JSON). It never parses a value: the API
//! layer stamps `metadata.resourceVersion` from the revision the store returns.
//!
//! Guarantees, for every backend:
//! - one global revision per store, strictly increasing; every write gets a new one;
//! - a write is acknowledged only once it is durable;
//! - `update`/`delete` with an expected revision are compare-and-swap (409 Conflict otherwise);
//! - `watch` delivers the changes after a revision, in revision order, with periodic bookmarks,
//!   and reports [`StoreError::Gone`] (410) when that revision has been compacted away.
//!
//! Backends: [`RedbStore`] (embedded, the default; group commit) and `EtcdStore` (feature
//! `etcd`, for several controllers against one etcd cluster). Both pass [`conformance`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

mod error;
mod redb_store;

#[cfg(feature = "etcd")]
mod etcd_store;

#[doc(hidden)]
pub mod conformance;

#[cfg(feature = "etcd")]
#[doc(hidden)]
pub mod etcd_server;

pub use error::StoreError;
#[cfg(feature = "etcd")]
pub use etcd_store::{EtcdOptions, EtcdStore};
pub use redb_store::{RedbOptions, RedbStore};

/// Result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How often watches send a [`WatchEvent::Bookmark`] unless a backend is told otherwise.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// One object as stored: its key, its opaque value and the revision of its last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// `/{group}/{resource}/{namespace}/{name}`.
    pub key: String,
    /// The object's bytes, as the caller wrote them.
    pub value: Bytes,
    /// The revision of the write that produced this value (a deletion's revision for a
    /// [`WatchEvent::Deleted`] object, whose value is the last one before the deletion).
    pub mod_revision: u64,
}

/// What to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// At most this many items; `None` or `Some(0)` means all.
    pub limit: Option<usize>,
    /// Resume after this key (the `next` of a previous page).
    pub continue_after: Option<String>,
    /// List the objects as they were at this revision (a previous page's `revision`, so that
    /// all pages agree). `None` lists the newest state. Older than the compaction point:
    /// [`StoreError::Gone`].
    pub at_revision: Option<u64>,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Objects in key order.
    pub items: Vec<Object>,
    /// The revision the page was read at; pass it as `at_revision` for the next page and as the
    /// starting revision of a watch that follows the list.
    pub revision: u64,
    /// The last key of this page when more items follow; pass it as `continue_after`.
    pub next: Option<String>,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created at `object.mod_revision`.
    Added(Object),
    /// The key was changed at `object.mod_revision`.
    Modified(Object),
    /// The key was deleted at `object.mod_revision`; the value is the last one it had.
    Deleted(Object),
    /// Every matching change up to and including this revision has been delivered.
    Bookmark(u64),
}

impl WatchEvent {
    /// The revision this event stands for.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => o.mod_revision,
            WatchEvent::Bookmark(r) => *r,
        }
    }
}

/// A stream of [`WatchEvent`]s. It ends when the store shuts down; an `Err` item (for instance
/// [`StoreError::Gone`] when the watcher fell behind a compaction) is always the last one.
/// Dropping it stops the watch.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<Result<WatchEvent>>,
    task: JoinHandle<()>,
}

impl Watch {
    /// Wraps the receiving end of a feeder task; the task is aborted when the watch is dropped.
    pub(crate) fn new(rx: mpsc::Receiver<Result<WatchEvent>>, task: JoinHandle<()>) -> Self {
        Watch { rx, task }
    }

    /// The next event; `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<Result<WatchEvent>> {
        self.rx.recv().await
    }
}

impl tokio_stream::Stream for Watch {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Capacity of the channel between a watch's feeder task and its consumer. A consumer that
/// falls further behind makes the feeder wait, never the writers.
pub(crate) const WATCH_CHANNEL: usize = 1024;

/// The object store. Keys are `/{group}/{resource}/{namespace}/{name}`; a prefix selects
/// every key that starts with it (end it with `/` to select one directory).
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The value of `key` and the revision of its last change, or `None` when absent.
    async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>>;

    /// The objects under `prefix`, in key order, one page at a time.
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage>;

    /// Creates `key`; returns its revision. [`StoreError::AlreadyExists`] when it exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<u64>;

    /// Replaces the value of `key`; returns the new revision. With `expected`, succeeds only if
    /// the key's revision is exactly that ([`StoreError::Conflict`] otherwise).
    async fn update(&self, key: &str, value: Bytes, expected: Option<u64>) -> Result<u64>;

    /// Deletes `key`; returns the deletion's revision. `expected` as for [`Store::update`].
    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<u64>;

    /// The changes under `prefix` after revision `from` (0: from now on), followed by live
    /// changes and periodic bookmarks. [`StoreError::Gone`] when `from` has been compacted
    /// away, either from this call or as the stream's first item.
    async fn watch(&self, prefix: &str, from: u64) -> Result<Watch>;

    /// Forgets the history up to `revision`: later lists and watches cannot start before it.
    /// Compacting to a revision at or below the current compaction point does nothing.
    async fn compact(&self, revision: u64) -> Result<()>;

    /// The revision of the newest durable write.
    async fn current_revision(&self) -> Result<u64>;
}

//! The store's error type. Each variant maps to one HTTP status in the API server.

/// What went wrong with a store operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// `update` or `delete` of a key that does not exist (HTTP 404).
    #[error("{key} not found")]
    NotFound {
        /// The key that was asked for.
        key: String,
    },
    /// `create` of a key that already exists (HTTP 409, reason AlreadyExists).
    #[error("{key} already exists")]
    AlreadyExists {
        /// The key that exists.
        key: String,
    },
    /// `update`/`delete` with an expected revision the key no longer has: someone else wrote it
    /// first. Re-read the object and retry (HTTP 409, reason Conflict).
    #[error("{key} has been modified: expected revision {expected}, it is now at {actual}; read it again and retry")]
    Conflict {
        /// The key that was written.
        key: String,
        /// The revision the caller expected.
        expected: u64,
        /// The revision the key has.
        actual: u64,
    },
    /// A list or watch asked for a revision older than the compaction point; list again to get
    /// a current revision (HTTP 410 Gone, "too old resource version").
    #[error("revision {requested} has been compacted (compacted up to {compacted}); list again")]
    Gone {
        /// The revision that was asked for.
        requested: u64,
        /// The store's compaction point (0 when the backend does not say).
        compacted: u64,
    },
    /// A list or compaction asked for a revision newer than any write (k8s answers "too large
    /// resource version" with 504 and Retry-After).
    #[error("revision {requested} is newer than the store's current revision {current}")]
    FutureRevision {
        /// The revision that was asked for.
        requested: u64,
        /// The store's newest revision.
        current: u64,
    },
    /// The backend failed: I/O error, corrupt database, etcd unreachable, or the store is
    /// shutting down. Nothing was acknowledged (HTTP 500, or 503 when etcd is unreachable).
    #[error("store backend: {0}")]
    Backend(String),
}

impl StoreError {
    pub(crate) fn backend(context: &str, e: impl std::fmt::Display) -> Self {
        StoreError::Backend(format!("{context}: {e}"))
    }
}

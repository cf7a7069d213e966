//! The embedded backend: one redb file, one writer thread doing group commits.
//!
//! Writers send requests to a single writer thread. It drains whatever is pending (up to
//! `max_batch`), applies each request with its own precondition check (one request's conflict
//! never fails another), makes the batch durable, and only then answers the callers and
//! broadcasts the batch's events to watchers.
//!
//! Durable means written to the store's write-ahead log ([`berth_wal`], `<file>.wal` beside the
//! database): the batch's changes, with their revisions, go into one `O_DSYNC` frame and redb
//! commits the same transaction without an fsync. Every `berth_wal::CHECKPOINT_EVERY` frames,
//! or when a batch would not fit in the log, redb commits durably instead and records the last frame it
//! holds (the checkpoint); the log then starts over. At open, the frames after the checkpoint
//! are applied again, so a crash loses nothing that was acknowledged. If redb fails to commit a
//! batch whose frame is already in the log, the writer refuses further writes until a restart
//! replays the log, because later frames would otherwise be replayed after one that redb never
//! applied and that its callers were told had failed.
//!
//! Tables:
//! - `objects`: key -> (mod revision, value): the newest state, for get and list.
//! - `events`: revision -> (kind, key, value): the change log, for watch replay and old lists.
//! - `versions`: (key, revision) -> kind: which revisions each key has in the log, for
//!   lists at a past revision and for compaction.
//! - `meta`: the current revision and the compaction point.
//!
//! Compaction to revision C drops every log entry at or below C except each live key's newest
//! one, exactly as etcd does, so a list at any revision >= C stays answerable.
//!
//! Guarantees: acknowledged writes survive a crash (their log frame, or redb's durable commit,
//! is on disk before the answer); revisions never go backwards across restarts. The file is
//! locked: one process owns it.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use berth_wal::Wal;
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    DEFAULT_BOOKMARK_INTERVAL, ListOptions, ListPage, Object, Result, Store, StoreError, WATCH_CHANNEL, Watch,
    WatchEvent,
};

const OBJECTS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("objects");
const EVENTS: TableDefinition<u64, (u8, &str, &[u8])> = TableDefinition::new("events");
const VERSIONS: TableDefinition<(&str, u64), u8> = TableDefinition::new("versions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";
/// The last log frame that a durable commit holds.
const META_CHECKPOINT: &str = "wal_checkpoint";

const ADDED: u8 = 1;
const MODIFIED: u8 = 2;
const DELETED: u8 = 3;

/// Events read from the log per read transaction when a watcher replays or catches up.
const REPLAY_CHUNK: usize = 1024;

/// Tuning for [`RedbStore`].
#[derive(Debug, Clone)]
pub struct RedbOptions {
    /// How often watches send a bookmark.
    pub bookmark_interval: Duration,
    /// The most write requests committed in one transaction.
    pub max_batch: usize,
    /// Pending write requests before callers wait for room.
    pub queue: usize,
    /// Batches buffered for watchers before a slow one must catch up from the log.
    pub watch_buffer: usize,
    /// Size of the write-ahead log file. A batch larger than the log is committed durably by
    /// redb instead.
    pub log_size: u64,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            max_batch: 1024,
            queue: 8192,
            watch_buffer: 1024,
            log_size: 16 << 20,
        }
    }
}

/// The embedded store: a redb database file with group-committed writes.
#[derive(Debug)]
pub struct RedbStore {
    shared: Arc<Shared>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    db: Database,
    path: PathBuf,
    /// Newest durable revision; stored after commit, before the batch is broadcast.
    revision: AtomicU64,
    compacted: AtomicU64,
    events: broadcast::Sender<Arc<Batch>>,
    bookmark_interval: Duration,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("path", &self.path)
            .field("revision", &self.revision)
            .field("compacted", &self.compacted)
            .finish_non_exhaustive()
    }
}

/// The events of one committed transaction, in revision order.
#[derive(Debug)]
struct Batch {
    events: Vec<WatchEvent>,
    /// The transaction's last revision.
    revision: u64,
}

#[derive(Debug)]
enum Op {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Option<u64>,
    },
    Delete {
        key: String,
        expected: Option<u64>,
    },
    Compact {
        revision: u64,
    },
}

#[derive(Debug)]
struct Request {
    op: Op,
    reply: oneshot::Sender<Result<u64>>,
}

fn db_err(context: &str, e: impl Into<redb::Error>) -> StoreError {
    StoreError::backend(context, e.into())
}

fn closed() -> StoreError {
    StoreError::Backend("the store is shut down".into())
}

impl RedbStore {
    /// Opens (creating if needed) the database file at `path` and starts its writer thread.
    /// Fails if another process has the file open. Blocking: after a crash redb may first
    /// repair the file, so call it before serving or from `spawn_blocking`. Dropping the store
    /// waits for the batch being committed, then closes the file.
    pub fn open(path: impl AsRef<Path>, options: RedbOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Backend(format!(
                "{} is already open by another process; stop it first",
                path.display()
            )),
            e => db_err(&format!("opening {}", path.display()), e),
        })?;
        let checkpoint = init_tables(&db).map_err(|e| db_err("creating tables", e))?;
        let log_path = path.with_extension("wal");
        let (wal, frames) = Wal::open(&log_path, options.log_size, checkpoint)
            .map_err(|e| StoreError::backend(&format!("opening the log {}", log_path.display()), e))?;
        if !frames.is_empty() {
            replay(&db, &frames).map_err(|e| match e {
                ReplayError::Db(e) => db_err("replaying the log", e),
                ReplayError::Corrupt { seq, reason } => StoreError::Backend(format!(
                    "{}: frame {seq} does not apply: {reason}; the store cannot open without it",
                    log_path.display()
                )),
            })?;
            tracing::info!(frames = frames.len(), last = wal.last_seq(), "store log replayed");
        }
        let (revision, compacted) = {
            let txn = db.begin_read().map_err(|e| db_err("reading", e))?;
            read_meta(&txn).map_err(|e| db_err("reading", e))?
        };
        let (events, _) = broadcast::channel(options.watch_buffer.max(1));
        let shared = Arc::new(Shared {
            db,
            path,
            revision: AtomicU64::new(revision),
            compacted: AtomicU64::new(compacted),
            events,
            bookmark_interval: options.bookmark_interval,
        });
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let writer_shared = Arc::clone(&shared);
        let max_batch = options.max_batch.max(1);
        let writer = std::thread::Builder::new()
            .name("berth-store-writer".into())
            .spawn(move || run_writer(&writer_shared, wal, rx, max_batch))
            .map_err(|e| StoreError::backend("starting the writer thread", e))?;
        tracing::info!(path = %shared.path.display(), revision, compacted, "store opened");
        Ok(RedbStore {
            shared,
            requests: Some(tx),
            writer: Some(writer),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    async fn submit(&self, op: Op) -> Result<u64> {
        let requests = self.requests.as_ref().ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        requests.send(Request { op, reply }).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has answered everything queued; joining
        // it means the file is closed (and unlocked) once the last handle is gone.
        self.requests.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the store writer thread panicked");
        }
    }
}

/// Creates the tables if missing; returns the log checkpoint.
fn init_tables(db: &Database) -> Result<u64, redb::Error> {
    let txn = db.begin_write()?;
    let checkpoint = {
        txn.open_table(OBJECTS)?;
        txn.open_table(EVENTS)?;
        txn.open_table(VERSIONS)?;
        let meta = txn.open_table(META)?;
        meta.get(META_CHECKPOINT)?.map(|g| g.value()).unwrap_or(0)
    };
    txn.commit()?;
    Ok(checkpoint)
}

// ---------------------------------------------------------------------------------------------
// The log.

/// One change in a log frame, tagged with its event kind (or `COMPACTED`).
const COMPACTED: u8 = 4;

/// Appends one applied change to a frame's payload: `kind, revision, key, value` (lengths as
/// little-endian u32), or `COMPACTED, revision` for a compaction.
fn encode_change(out: &mut Vec<u8>, kind: u8, rev: u64, key: &str, value: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&rev.to_le_bytes());
    if kind == COMPACTED {
        return;
    }
    // Keys and values are bounded by the API's body limit, far below 4 GiB.
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    if kind != DELETED {
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
}

/// A change read back from a frame.
#[derive(Debug, PartialEq, Eq)]
struct LoggedChange<'a> {
    kind: u8,
    rev: u64,
    key: &'a str,
    value: &'a [u8],
}

fn decode_changes(mut buf: &[u8]) -> std::result::Result<Vec<LoggedChange<'_>>, String> {
    fn take<'b>(buf: &mut &'b [u8], n: usize) -> std::result::Result<&'b [u8], String> {
        if buf.len() < n {
            return Err("truncated change".into());
        }
        let (head, rest) = buf.split_at(n);
        *buf = rest;
        Ok(head)
    }
    fn len(buf: &mut &[u8]) -> std::result::Result<usize, String> {
        let b = take(buf, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    let mut out = Vec::new();
    while let Some((&kind, rest)) = buf.split_first() {
        buf = rest;
        let mut rev = [0u8; 8];
        rev.copy_from_slice(take(&mut buf, 8)?);
        let rev = u64::from_le_bytes(rev);
        let (key, value) = match kind {
            COMPACTED => ("", &[][..]),
            ADDED | MODIFIED | DELETED => {
                let n = len(&mut buf)?;
                let key = std::str::from_utf8(take(&mut buf, n)?).map_err(|_| "a key is not UTF-8".to_owned())?;
                let value = if kind == DELETED {
                    &[][..]
                } else {
                    let n = len(&mut buf)?;
                    take(&mut buf, n)?
                };
                (key, value)
            }
            other => return Err(format!("unknown change kind {other}")),
        };
        out.push(LoggedChange { kind, rev, key, value });
    }
    Ok(out)
}

enum ReplayError {
    Db(redb::Error),
    Corrupt { seq: u64, reason: String },
}

impl<E: Into<redb::Error>> From<E> for ReplayError {
    fn from(e: E) -> Self {
        ReplayError::Db(e.into())
    }
}

/// Applies the frames after the checkpoint, in one durable transaction that is the new
/// checkpoint. Each change applies exactly as it did the first time, at the same revision.
fn replay(db: &Database, frames: &[berth_wal::Frame]) -> std::result::Result<(), ReplayError> {
    let txn = db.begin_write()?;
    {
        let mut t = Tables {
            objects: txn.open_table(OBJECTS)?,
            events: txn.open_table(EVENTS)?,
            versions: txn.open_table(VERSIONS)?,
            meta: txn.open_table(META)?,
        };
        let mut revision = t.meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0);
        let mut compacted = t.meta.get(META_COMPACTED)?.map(|g| g.value()).unwrap_or(0);
        for frame in frames {
            let corrupt = |reason: String| ReplayError::Corrupt { seq: frame.seq, reason };
            for c in decode_changes(&frame.payload).map_err(corrupt)? {
                let applied = match c.kind {
                    COMPACTED => compact(&mut t, c.rev, revision, compacted)?.map(|to| compacted = to),
                    kind => {
                        let value = (kind != DELETED).then(|| Bytes::copy_from_slice(c.value));
                        if c.rev != revision + 1 {
                            return Err(corrupt(format!("revision {} does not follow {revision}", c.rev)));
                        }
                        write_object(&mut t, c.key, value.as_ref(), None, kind == ADDED, c.rev)?
                            .map(|_| revision = c.rev)
                    }
                };
                applied.map_err(|e| corrupt(e.to_string()))?;
            }
        }
        t.meta.insert(META_REVISION, revision)?;
        t.meta.insert(META_COMPACTED, compacted)?;
        let last = frames.last().map_or(0, |f| f.seq);
        t.meta.insert(META_CHECKPOINT, last)?;
    }
    txn.commit()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The writer.

fn run_writer(shared: &Shared, mut log: Wal, mut rx: mpsc::Receiver<Request>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut stats = WriterStats::default();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        stats.record(batch.len());
        commit_batch(shared, &mut log, &mut batch);
    }
    if !log.halted() {
        // A clean stop leaves nothing to replay.
        if let Err(e) = checkpoint_now(shared, &log) {
            tracing::warn!(error = %e, "store: the closing checkpoint failed; the next open replays the log");
        }
    }
    tracing::debug!("store writer stopped");
}

/// A durable commit that records every frame written so far as applied.
fn checkpoint_now(shared: &Shared, log: &Wal) -> Result<(), redb::Error> {
    let txn = shared.db.begin_write()?;
    txn.open_table(META)?.insert(META_CHECKPOINT, log.last_seq())?;
    txn.commit()?;
    Ok(())
}

/// Commits and the writes they carried, logged (debug) every few seconds while writes come.
#[derive(Default)]
struct WriterStats {
    since: Option<std::time::Instant>,
    commits: u64,
    writes: u64,
}

impl WriterStats {
    const EVERY: Duration = Duration::from_secs(1);

    fn record(&mut self, writes: usize) {
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        self.commits += 1;
        self.writes += writes as u64;
        if since.elapsed() >= Self::EVERY {
            tracing::debug!(
                commits = self.commits,
                writes = self.writes,
                per_commit = self.writes as f64 / self.commits as f64,
                "store writer"
            );
            *self = WriterStats::default();
        }
    }
}

/// What a committed batch changed.
struct Committed {
    outcomes: Vec<Result<u64>>,
    events: Vec<WatchEvent>,
    revision: u64,
    compacted: Option<u64>,
}

fn commit_batch(shared: &Shared, log: &mut Wal, batch: &mut Vec<Request>) {
    let base = shared.revision.load(Ordering::Acquire);
    if log.halted() {
        let err = StoreError::Backend(format!(
            "the store stopped taking writes after a failed commit; restart to replay {}",
            shared.path.with_extension("wal").display()
        ));
        for req in batch.drain(..) {
            let _ = req.reply.send(Err(err.clone()));
        }
        return;
    }
    match apply_batch(shared, log, base, batch) {
        Ok(done) => {
            if let Some(c) = done.compacted {
                shared.compacted.store(c, Ordering::Release);
            }
            if done.revision > base {
                shared.revision.store(done.revision, Ordering::Release);
                // No receivers is fine: nobody is watching.
                let _ = shared.events.send(Arc::new(Batch {
                    events: done.events,
                    revision: done.revision,
                }));
            }
            for (req, outcome) in batch.drain(..).zip(done.outcomes) {
                // The caller may have gone away; the write stands either way.
                let _ = req.reply.send(outcome);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, requests = batch.len(), "store commit failed");
            let err = e.into_store_error(shared);
            for req in batch.drain(..) {
                let _ = req.reply.send(Err(err.clone()));
            }
        }
    }
}

/// The tables a write transaction works on, opened once per batch.
struct Tables<'t> {
    objects: redb::Table<'t, &'static str, (u64, &'static [u8])>,
    events: redb::Table<'t, u64, (u8, &'static str, &'static [u8])>,
    versions: redb::Table<'t, (&'static str, u64), u8>,
    meta: redb::Table<'t, &'static str, u64>,
}

/// Why a batch failed as a whole.
#[derive(Debug)]
enum CommitError {
    Db(redb::Error),
    Log(std::io::Error),
}

impl<E: Into<redb::Error>> From<E> for CommitError {
    fn from(e: E) -> Self {
        CommitError::Db(e.into())
    }
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Db(e) => e.fmt(f),
            CommitError::Log(e) => write!(f, "writing the log: {e}"),
        }
    }
}

impl CommitError {
    fn into_store_error(self, shared: &Shared) -> StoreError {
        match self {
            CommitError::Db(e) => db_err("committing", e),
            CommitError::Log(e) => StoreError::backend(
                &format!("writing the log {}", shared.path.with_extension("wal").display()),
                e,
            ),
        }
    }
}

fn apply_batch(shared: &Shared, log: &mut Wal, base: u64, batch: &[Request]) -> Result<Committed, CommitError> {
    let mut txn = shared.db.begin_write()?;
    let mut payload = Vec::new();
    let mut done = Committed {
        outcomes: Vec::with_capacity(batch.len()),
        events: Vec::with_capacity(batch.len()),
        revision: base,
        compacted: None,
    };
    {
        let mut t = Tables {
            objects: txn.open_table(OBJECTS)?,
            events: txn.open_table(EVENTS)?,
            versions: txn.open_table(VERSIONS)?,
            meta: txn.open_table(META)?,
        };
        let mut compacted = shared.compacted.load(Ordering::Acquire);
        for req in batch {
            let next = done.revision + 1;
            let outcome = match &req.op {
                Op::Create { key, value } => write_object(&mut t, key, Some(value), None, true, next)?,
                Op::Update { key, value, expected } => write_object(&mut t, key, Some(value), *expected, false, next)?,
                Op::Delete { key, expected } => write_object(&mut t, key, None, *expected, false, next)?,
                Op::Compact { revision } => {
                    let outcome = compact(&mut t, *revision, done.revision, compacted)?;
                    if let Ok(c) = outcome
                        && c > compacted
                    {
                        compacted = c;
                        done.compacted = Some(c);
                        encode_change(&mut payload, COMPACTED, c, "", &[]);
                    }
                    done.outcomes.push(outcome);
                    continue;
                }
            };
            match outcome {
                Ok(event) => {
                    done.revision = next;
                    let logged = match &event {
                        WatchEvent::Added(o) => Some((ADDED, o)),
                        WatchEvent::Modified(o) => Some((MODIFIED, o)),
                        WatchEvent::Deleted(o) => Some((DELETED, o)),
                        WatchEvent::Bookmark(_) => None,
                    };
                    if let Some((kind, o)) = logged {
                        encode_change(&mut payload, kind, next, &o.key, &o.value);
                    }
                    done.events.push(event);
                    done.outcomes.push(Ok(next));
                }
                Err(e) => done.outcomes.push(Err(e)),
            }
        }
        if done.revision > base {
            t.meta.insert(META_REVISION, done.revision)?;
        }
        if let Some(c) = done.compacted {
            t.meta.insert(META_COMPACTED, c)?;
        }
    }
    if done.revision == base && done.compacted.is_none() {
        // Every request failed its precondition: nothing to make durable.
        txn.abort()?;
        return Ok(done);
    }
    if log.checkpoint_due(payload.len()) {
        // A durable commit (the default durability) that is also the checkpoint.
        txn.open_table(META)?.insert(META_CHECKPOINT, log.last_seq())?;
        txn.commit()?;
        log.checkpointed();
        return Ok(done);
    }
    txn.set_durability(Durability::None)?;
    if let Err(e) = log.append(&payload) {
        let _ = txn.abort();
        return Err(CommitError::Log(e));
    }
    if let Err(e) = txn.commit() {
        log.halt();
        tracing::error!(error = %e, "store: a logged batch could not be committed; refusing writes until a restart replays the log");
        return Err(e.into());
    }
    Ok(done)
}

/// Creates (`create`), replaces (`value` is `Some`) or deletes (`value` is `None`) one key at
/// revision `rev`. The inner error is the request's own failure; the outer one fails the batch.
fn write_object(
    t: &mut Tables<'_>,
    key: &str,
    value: Option<&Bytes>,
    expected: Option<u64>,
    create: bool,
    rev: u64,
) -> Result<Result<WatchEvent>, redb::Error> {
    // The old value is copied out only for a deletion, whose event carries it.
    let current = t.objects.get(key)?.map(|g| {
        let (mod_rev, old) = g.value();
        (
            mod_rev,
            if value.is_none() {
                Bytes::copy_from_slice(old)
            } else {
                Bytes::new()
            },
        )
    });
    let (kind, stored) = match (current, value) {
        (Some(_), _) if create => {
            return Ok(Err(StoreError::AlreadyExists { key: key.into() }));
        }
        (None, Some(v)) if create => (ADDED, v.clone()),
        (None, _) => return Ok(Err(StoreError::NotFound { key: key.into() })),
        (Some((actual, _)), _) if expected.is_some_and(|e| e != actual) => {
            return Ok(Err(StoreError::Conflict {
                key: key.into(),
                expected: expected.unwrap_or_default(),
                actual,
            }));
        }
        (Some(_), Some(v)) => (MODIFIED, v.clone()),
        (Some((_, old)), None) => (DELETED, old),
    };
    if kind == DELETED {
        t.objects.remove(key)?;
    } else {
        t.objects.insert(key, (rev, stored.as_ref()))?;
    }
    t.events.insert(rev, (kind, key, stored.as_ref()))?;
    t.versions.insert((key, rev), kind)?;
    let object = Object {
        key: key.into(),
        value: stored,
        mod_revision: rev,
    };
    Ok(Ok(match kind {
        ADDED => WatchEvent::Added(object),
        MODIFIED => WatchEvent::Modified(object),
        _ => WatchEvent::Deleted(object),
    }))
}

/// Drops the history at or below `to`, keeping each live key's newest version. Returns the new
/// compaction point.
fn compact(t: &mut Tables<'_>, to: u64, current: u64, compacted: u64) -> Result<Result<u64>, redb::Error> {
    if to <= compacted {
        return Ok(Ok(compacted));
    }
    if to > current {
        return Ok(Err(StoreError::FutureRevision { requested: to, current }));
    }
    let mut keys = BTreeSet::new();
    for entry in t.events.range(compacted + 1..=to)? {
        let (_, v) = entry?;
        keys.insert(v.value().1.to_owned());
    }
    for key in &keys {
        let mut revs = Vec::new();
        for entry in t.versions.range((key.as_str(), 0)..=(key.as_str(), to))? {
            let (k, kind) = entry?;
            revs.push((k.value().1, kind.value()));
        }
        let keep = match revs.last() {
            Some(&(rev, kind)) if kind != DELETED => Some(rev),
            _ => None,
        };
        for (rev, _) in revs {
            if Some(rev) != keep {
                t.versions.remove((key.as_str(), rev))?;
                t.events.remove(rev)?;
            }
        }
    }
    tracing::info!(revision = to, keys = keys.len(), "store compacted");
    Ok(Ok(to))
}

// ---------------------------------------------------------------------------------------------
// Reads.

fn read_meta(txn: &redb::ReadTransaction) -> Result<(u64, u64), redb::Error> {
    let meta = txn.open_table(META)?;
    let revision = meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0);
    let compacted = meta.get(META_COMPACTED)?.map(|g| g.value()).unwrap_or(0);
    Ok((revision, compacted))
}

fn list_blocking(shared: &Shared, prefix: &str, opts: &ListOptions) -> Result<ListPage> {
    let txn = shared.db.begin_read().map_err(|e| db_err("reading", e))?;
    let (revision, compacted) = read_meta(&txn).map_err(|e| db_err("reading", e))?;
    let at = match opts.at_revision {
        None | Some(0) => revision,
        Some(at) if at > revision => {
            return Err(StoreError::FutureRevision {
                requested: at,
                current: revision,
            });
        }
        Some(at) if at < compacted => {
            return Err(StoreError::Gone {
                requested: at,
                compacted,
            });
        }
        Some(at) => at,
    };
    let limit = opts.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let after = opts.continue_after.as_deref().filter(|k| *k >= prefix);
    let mut items = Vec::new();
    let mut more = false;
    let read = |e: redb::StorageError| db_err("listing", e);
    if at == revision {
        let objects = txn.open_table(OBJECTS).map_err(|e| db_err("listing", e))?;
        let start = after.map_or(Bound::Included(prefix), Bound::Excluded);
        for entry in objects.range::<&str>((start, Bound::Unbounded)).map_err(read)? {
            let (k, v) = entry.map_err(read)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            let (mod_revision, value) = v.value();
            items.push(Object {
                key: key.to_owned(),
                value: Bytes::copy_from_slice(value),
                mod_revision,
            });
        }
    } else {
        let versions = txn.open_table(VERSIONS).map_err(|e| db_err("listing", e))?;
        let events = txn.open_table(EVENTS).map_err(|e| db_err("listing", e))?;
        let start = match after {
            Some(k) => Bound::Excluded((k, u64::MAX)),
            None => Bound::Included((prefix, 0)),
        };
        // Versions of one key are adjacent; take each key's newest version at or below `at`.
        let mut pending: Option<(String, u64, u8)> = None;
        let visible = |p: Option<(String, u64, u8)>, items: &mut Vec<Object>| -> Result<bool> {
            let Some((key, rev, kind)) = p else { return Ok(false) };
            if kind == DELETED {
                return Ok(false);
            }
            if items.len() == limit {
                return Ok(true);
            }
            let value = events
                .get(rev)
                .map_err(read)?
                .map(|g| Bytes::copy_from_slice(g.value().2))
                .ok_or_else(|| StoreError::Backend(format!("log entry {rev} of {key} is missing")))?;
            items.push(Object {
                key,
                value,
                mod_revision: rev,
            });
            Ok(false)
        };
        for entry in versions.range::<(&str, u64)>((start, Bound::Unbounded)).map_err(read)? {
            let (k, kind) = entry.map_err(read)?;
            let (key, rev) = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            if pending.as_ref().is_some_and(|p| p.0 != key) && visible(pending.take(), &mut items)? {
                more = true;
                break;
            }
            if rev <= at {
                pending = Some((key.to_owned(), rev, kind.value()));
            }
        }
        if !more && visible(pending.take(), &mut items)? {
            more = true;
        }
    }
    let next = if more {
        items.last().map(|o| o.key.clone())
    } else {
        None
    };
    Ok(ListPage {
        items,
        revision: at,
        next,
    })
}

/// One chunk of the log after `after`, filtered by `prefix`.
struct Replay {
    events: Vec<WatchEvent>,
    /// Every log entry up to here has been looked at.
    scanned_to: u64,
    /// No more log entries after `scanned_to` at the time of reading.
    done: bool,
}

fn replay_blocking(shared: &Shared, prefix: &str, after: u64) -> Result<Replay> {
    let txn = shared.db.begin_read().map_err(|e| db_err("reading the log", e))?;
    let (revision, compacted) = read_meta(&txn).map_err(|e| db_err("reading the log", e))?;
    if after < compacted {
        return Err(StoreError::Gone {
            requested: after,
            compacted,
        });
    }
    let read = |e: redb::StorageError| db_err("reading the log", e);
    let log = txn.open_table(EVENTS).map_err(|e| db_err("reading the log", e))?;
    let mut out = Replay {
        events: Vec::new(),
        scanned_to: after,
        done: true,
    };
    for (n, entry) in log.range(after + 1..).map_err(read)?.enumerate() {
        if n == REPLAY_CHUNK {
            out.done = false;
            break;
        }
        let (r, v) = entry.map_err(read)?;
        let rev = r.value();
        out.scanned_to = rev;
        let (kind, key, value) = v.value();
        if !key.starts_with(prefix) {
            continue;
        }
        let object = Object {
            key: key.to_owned(),
            value: Bytes::copy_from_slice(value),
            mod_revision: rev,
        };
        out.events.push(match kind {
            ADDED => WatchEvent::Added(object),
            MODIFIED => WatchEvent::Modified(object),
            _ => WatchEvent::Deleted(object),
        });
    }
    if out.done {
        out.scanned_to = out.scanned_to.max(revision);
    }
    Ok(out)
}

/// Sends the logged events after `*last` to `tx`, advancing `*last`. `Ok(false)` when the
/// consumer or the store has gone away.
async fn catch_up(
    shared: &Weak<Shared>,
    prefix: &Arc<str>,
    last: &mut u64,
    tx: &mpsc::Sender<Result<WatchEvent>>,
) -> Result<bool> {
    loop {
        let Some(strong) = shared.upgrade() else {
            return Ok(false);
        };
        let p = Arc::clone(prefix);
        let after = *last;
        let chunk = tokio::task::spawn_blocking(move || replay_blocking(&strong, &p, after))
            .await
            .map_err(|e| StoreError::backend("reading the log", e))??;
        for event in chunk.events {
            if tx.send(Ok(event)).await.is_err() {
                return Ok(false);
            }
        }
        *last = (*last).max(chunk.scanned_to);
        if chunk.done {
            return Ok(true);
        }
    }
}

/// A watcher's feeder: replay from the log, then follow the broadcast, falling back to the log
/// whenever it lagged behind.
async fn feed(
    shared: Weak<Shared>,
    mut batches: broadcast::Receiver<Arc<Batch>>,
    prefix: Arc<str>,
    mut last: u64,
    bookmark_interval: Duration,
    tx: mpsc::Sender<Result<WatchEvent>>,
) {
    match catch_up(&shared, &prefix, &mut last, &tx).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    }
    let start = tokio::time::Instant::now() + bookmark_interval;
    let mut ticker = tokio::time::interval_at(start, bookmark_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = batches.recv() => match batch {
                Ok(batch) => {
                    if batch.revision <= last {
                        continue;
                    }
                    for event in &batch.events {
                        let matches = match event {
                            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                                o.key.starts_with(&*prefix)
                            }
                            WatchEvent::Bookmark(_) => false,
                        };
                        if event.revision() > last && matches && tx.send(Ok(event.clone())).await.is_err() {
                            return;
                        }
                    }
                    last = batch.revision;
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, last, "watcher lagged; catching up from the log");
                    match catch_up(&shared, &prefix, &mut last, &tx).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = ticker.tick() => {
                if tx.send(Ok(WatchEvent::Bookmark(last))).await.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
        }
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>> {
        // One B-tree lookup, normally from the page cache: cheaper inline than a thread hop.
        let txn = self.shared.db.begin_read().map_err(|e| db_err("reading", e))?;
        let objects = txn.open_table(OBJECTS).map_err(|e| db_err("reading", e))?;
        let found = objects.get(key).map_err(|e| db_err("reading", e))?;
        Ok(found.map(|g| {
            let (rev, value) = g.value();
            (Bytes::copy_from_slice(value), rev)
        }))
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage> {
        let shared = Arc::clone(&self.shared);
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || list_blocking(&shared, &prefix, &opts))
            .await
            .map_err(|e| StoreError::backend("listing", e))?
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64> {
        self.submit(Op::Create {
            key: key.to_owned(),
            value,
        })
        .await
    }

    async fn update(&self, key: &str, value: Bytes, expected: Option<u64>) -> Result<u64> {
        self.submit(Op::Update {
            key: key.to_owned(),
            value,
            expected,
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<u64> {
        self.submit(Op::Delete {
            key: key.to_owned(),
            expected,
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: u64) -> Result<Watch> {
        // Subscribe before reading the revision: a batch committed after the read is then
        // certain to arrive through the broadcast.
        let batches = self.shared.events.subscribe();
        let compacted = self.shared.compacted.load(Ordering::Acquire);
        let from = match from {
            0 => self.shared.revision.load(Ordering::Acquire),
            f if f < compacted => {
                return Err(StoreError::Gone {
                    requested: f,
                    compacted,
                });
            }
            f => f,
        };
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        let task = tokio::spawn(feed(
            Arc::downgrade(&self.shared),
            batches,
            Arc::from(prefix),
            from,
            self.shared.bookmark_interval,
            tx,
        ));
        Ok(Watch::new(rx, task))
    }

    async fn compact(&self, revision: u64) -> Result<()> {
        self.submit(Op::Compact { revision }).await.map(|_| ())
    }

    async fn current_revision(&self) -> Result<u64> {
        Ok(self.shared.revision.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_through_a_log_payload() {
        let mut payload = Vec::new();
        encode_change(&mut payload, ADDED, 7, "/a", b"one");
        encode_change(&mut payload, MODIFIED, 8, "/b/\u{e9}", b"");
        encode_change(&mut payload, DELETED, 9, "/a", b"ignored: a deletion logs no value");
        encode_change(&mut payload, COMPACTED, 5, "", b"");
        let change = |kind, rev, key, value| LoggedChange { kind, rev, key, value };
        assert_eq!(
            decode_changes(&payload).unwrap(),
            vec![
                change(ADDED, 7, "/a", &b"one"[..]),
                change(MODIFIED, 8, "/b/\u{e9}", &b""[..]),
                change(DELETED, 9, "/a", &b""[..]),
                change(COMPACTED, 5, "", &b""[..]),
            ]
        );
        assert!(decode_changes(&[]).unwrap().is_empty());
        assert!(decode_changes(&payload[..payload.len() - 1]).is_err(), "truncated");
        assert!(
            decode_changes(&[9, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "kind 9 does not exist"
        );
        let mut bad_key = Vec::new();
        encode_change(&mut bad_key, ADDED, 1, "k", b"v");
        bad_key[13] = 0xff;
        assert!(decode_changes(&bad_key).is_err(), "a key that is not UTF-8");
    }
}

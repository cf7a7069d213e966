//! The durable record of every volume, staging and publish: Berth's memory across crashes.
//!
//! One redb database per data dir, with a write-ahead log beside it ([`berth_wal`]). Every
//! mutation is durable before its caller answers its client: it is written to the log in one
//! synchronous write, and that write is the commit. redb is read only at open, so the logged
//! changes are kept in memory and applied to redb in one durable transaction every so often
//! (a checkpoint: every `CHECKPOINT_EVERY` frames, when the log is full, and at a clean close);
//! at open the log's frames after the last checkpoint are applied. A mutation's latency is
//! thus one log write, with no redb transaction on its path.
//! Mutations that arrive while a commit is under way are committed together in the next
//! transaction (group commit): the first caller to find no commit running commits everything
//! queued, and each caller returns once its own change is on disk. redb holds an exclusive lock
//! on its file, which makes a data dir (and its log) single-owner. Values are JSON so records
//! stay readable and can grow fields without a migration.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::id::VolumeId;
use crate::spec::{Capability, Kind};
use berth_host::FileSystem;
use berth_wal::Wal;

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const STAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("stages");
const PUBLISHES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("publishes");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("group_snapshots");
const ATTACHMENTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("attachments");
/// Qgroups of deleted subvolumes that the kernel would not drop yet: (pool, subvolume id).
const RETIRED_QGROUPS: TableDefinition<(&str, u64), ()> = TableDefinition::new("retired_qgroups");
/// The journal's own state; `CHECKPOINT` is the last log frame a durable commit holds.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CHECKPOINT: &str = "wal_checkpoint";
/// Size of the log file.
const LOG_SIZE: u64 = 8 << 20;

/// A journal failure: the disk under the data dir is failing or full.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("journal {path}: the commit that carried this change was interrupted")]
    Interrupted { path: PathBuf },
    #[error("journal log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal log {path}: frame {seq} does not decode: {reason}")]
    Corrupt { path: PathBuf, seq: u64, reason: String },
    #[error("journal record {key}: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Where a volume is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Ready,
    /// DeleteVolume started; the backend may be partly gone. Finished on retry or at start.
    Deleting,
}

/// One volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub kind: Kind,
    /// Pool name; empty for tmpfs.
    pub pool: String,
    pub fs: Option<FileSystem>,
    pub capacity: u64,
    pub parameters: BTreeMap<String, String>,
    pub capabilities: Vec<Capability>,
    /// btrfs subvolume id of a dir volume (its qgroup is 0/id).
    pub subvolume_id: Option<u64>,
    pub state: VolumeState,
    pub created_unix: u64,
    /// What the volume was restored or cloned from.
    #[serde(default)]
    pub source: Option<ContentSource>,
    /// ControllerModifyVolume parameters in force.
    #[serde(default)]
    pub mutable: BTreeMap<String, String>,
    /// The image grew while no filesystem was mounted: grow the filesystem at the next stage.
    #[serde(default)]
    pub grow_fs_on_stage: bool,
}

/// The source of a restored or cloned volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: VolumeId,
    pub name: String,
    pub source_volume_id: VolumeId,
    pub kind: Kind,
    /// Pool holding the snapshot (tmpfs snapshots are kept in the default pool).
    pub pool: String,
    pub fs: Option<FileSystem>,
    /// The source volume's size: the smallest volume it can be restored into.
    pub size: u64,
    /// btrfs subvolume id of a dir or tmpfs snapshot.
    pub subvolume_id: Option<u64>,
    pub created_unix: u64,
    pub created_nanos: u32,
    /// The group snapshot this snapshot belongs to.
    #[serde(default)]
    pub group_id: Option<VolumeId>,
}

/// One volume group snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub id: VolumeId,
    pub name: String,
    pub snapshot_ids: Vec<VolumeId>,
    pub created_unix: u64,
    pub created_nanos: u32,
}

/// A volume made available to a node by ControllerPublishVolume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub volume_id: VolumeId,
    pub node_id: String,
    pub read_only: bool,
    pub capability: Capability,
}

/// A volume staged on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub volume_id: VolumeId,
    pub staging_path: PathBuf,
    pub capability: Capability,
}

/// A volume published at a target path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRecord {
    pub volume_id: VolumeId,
    pub target_path: PathBuf,
    pub read_only: bool,
    pub capability: Capability,
}

/// Everything the journal holds, loaded at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    pub volumes: BTreeMap<VolumeId, VolumeRecord>,
    pub stages: BTreeMap<VolumeId, StageRecord>,
    pub publishes: BTreeMap<(VolumeId, PathBuf), PublishRecord>,
    pub retired_qgroups: Vec<(String, u64)>,
    pub snapshots: BTreeMap<VolumeId, SnapshotRecord>,
    pub groups: BTreeMap<VolumeId, GroupRecord>,
    pub attachments: BTreeMap<(VolumeId, String), AttachmentRecord>,
}

/// The durable journal.
#[derive(Debug)]
pub struct Journal {
    db: redb::Database,
    path: PathBuf,
    group: Group,
    log: Mutex<Logged>,
}

/// The log, and its frames since the last checkpoint (sequence number and payload), which
/// redb does not hold yet.
#[derive(Debug)]
struct Logged {
    wal: Wal,
    unapplied: Vec<(u64, Vec<u8>)>,
}

/// One record written or removed; a mutation is a list of these, applied atomically.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    Put(Table, String, Vec<u8>),
    Remove(Table, String),
    PutPair(PairTable, String, String, Vec<u8>),
    RemovePair(PairTable, String, String),
    Retire(String, u64),
    Unretire(String, u64),
}

/// The tables keyed by one string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    Volumes = 0,
    Stages = 1,
    Snapshots = 2,
    Groups = 3,
}

/// The tables keyed by two strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PairTable {
    Publishes = 0,
    Attachments = 1,
}

impl Table {
    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Volumes => VOLUMES,
            Table::Stages => STAGES,
            Table::Snapshots => SNAPSHOTS,
            Table::Groups => GROUPS,
        }
    }
}

impl PairTable {
    fn def(self) -> TableDefinition<'static, (&'static str, &'static str), &'static [u8]> {
        match self {
            PairTable::Publishes => PUBLISHES,
            PairTable::Attachments => ATTACHMENTS,
        }
    }
}

fn apply<'a>(txn: &redb::WriteTransaction, changes: impl IntoIterator<Item = &'a Change>) -> Result<(), redb::Error> {
    for c in changes {
        match c {
            Change::Put(t, k, v) => {
                txn.open_table(t.def())?.insert(k.as_str(), v.as_slice())?;
            }
            Change::Remove(t, k) => {
                txn.open_table(t.def())?.remove(k.as_str())?;
            }
            Change::PutPair(t, a, b, v) => {
                txn.open_table(t.def())?
                    .insert((a.as_str(), b.as_str()), v.as_slice())?;
            }
            Change::RemovePair(t, a, b) => {
                txn.open_table(t.def())?.remove((a.as_str(), b.as_str()))?;
            }
            Change::Retire(pool, id) => {
                txn.open_table(RETIRED_QGROUPS)?.insert((pool.as_str(), *id), ())?;
            }
            Change::Unretire(pool, id) => {
                txn.open_table(RETIRED_QGROUPS)?.remove((pool.as_str(), *id))?;
            }
        }
    }
    Ok(())
}

impl Table {
    const ALL: [Table; 4] = [Table::Volumes, Table::Stages, Table::Snapshots, Table::Groups];
}

impl PairTable {
    const ALL: [PairTable; 2] = [PairTable::Publishes, PairTable::Attachments];
}

/// The changes of one batch, in order, as the payload of a log frame: a tag, then the table's
/// index and the fields, strings and bytes prefixed by their length (little endian).
fn encode_changes<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Vec<u8> {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        // Keys and records are far below 4 GiB.
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    let mut out = Vec::new();
    for c in changes {
        match c {
            Change::Put(t, k, v) => {
                out.extend([1, *t as u8]);
                bytes(&mut out, k.as_bytes());
                bytes(&mut out, v);
            }
            Change::Remove(t, k) => {
                out.extend([2, *t as u8]);
                bytes(&mut out, k.as_bytes());
            }
            Change::PutPair(t, a, b, v) => {
                out.extend([3, *t as u8]);
                bytes(&mut out, a.as_bytes());
                bytes(&mut out, b.as_bytes());
                bytes(&mut out, v);
            }
            Change::RemovePair(t, a, b) => {
                out.extend([4, *t as u8]);
                bytes(&mut out, a.as_bytes());
                bytes(&mut out, b.as_bytes());
            }
            Change::Retire(pool, id) | Change::Unretire(pool, id) => {
                out.push(if matches!(c, Change::Retire(..)) { 5 } else { 6 });
                bytes(&mut out, pool.as_bytes());
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    out
}

/// Reads back what [`encode_changes`] wrote.
fn decode_changes(payload: &[u8]) -> Result<Vec<Change>, String> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], String> {
            if self.0.len() < n {
                return Err(format!("{n} bytes wanted, {} left", self.0.len()));
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn byte(&mut self) -> Result<u8, String> {
            Ok(self.take(1)?[0])
        }
        fn bytes(&mut self) -> Result<Vec<u8>, String> {
            let mut len = [0u8; 4];
            len.copy_from_slice(self.take(4)?);
            Ok(self.take(u32::from_le_bytes(len) as usize)?.to_vec())
        }
        fn string(&mut self) -> Result<String, String> {
            String::from_utf8(self.bytes()?).map_err(|e| e.to_string())
        }
        fn u64(&mut self) -> Result<u64, String> {
            let mut n = [0u8; 8];
            n.copy_from_slice(self.take(8)?);
            Ok(u64::from_le_bytes(n))
        }
        fn table(&mut self) -> Result<Table, String> {
            let i = self.byte()?;
            Table::ALL.get(usize::from(i)).copied().ok_or(format!("no table {i}"))
        }
        fn pair_table(&mut self) -> Result<PairTable, String> {
            let i = self.byte()?;
            PairTable::ALL
                .get(usize::from(i))
                .copied()
                .ok_or(format!("no pair table {i}"))
        }
    }
    let mut r = Reader(payload);
    let mut changes = Vec::new();
    while !r.0.is_empty() {
        changes.push(match r.byte()? {
            1 => Change::Put(r.table()?, r.string()?, r.bytes()?),
            2 => Change::Remove(r.table()?, r.string()?),
            3 => Change::PutPair(r.pair_table()?, r.string()?, r.string()?, r.bytes()?),
            4 => Change::RemovePair(r.pair_table()?, r.string()?, r.string()?),
            5 => Change::Retire(r.string()?, r.u64()?),
            6 => Change::Unretire(r.string()?, r.u64()?),
            tag => return Err(format!("unknown change {tag}")),
        });
    }
    Ok(changes)
}

/// The group commit's shared state.
#[derive(Debug, Default)]
struct Group {
    state: Mutex<GroupState>,
    /// Signalled after every commit.
    committed: Condvar,
    /// Transactions committed so far.
    commits: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct GroupState {
    next_ticket: u64,
    /// Mutations waiting for the next commit, by ticket.
    queue: Vec<(u64, Vec<Change>)>,
    /// Whether a caller is committing now.
    committing: bool,
    /// Outcomes not yet collected by their callers.
    done: HashMap<u64, Result<(), JournalError>>,
}

impl Drop for Journal {
    /// A clean close leaves redb holding everything, so the next open has nothing to replay.
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint(std::iter::empty()) {
            tracing::warn!(error = %e, "journal: the closing checkpoint failed; the next open replays the log");
        }
    }
}

/// Held by the caller that commits; if the commit panics, its drop hands the turn on so that
/// the callers waiting do not wait forever.
struct Leader<'a> {
    group: &'a Group,
    path: &'a Path,
    tickets: Vec<u64>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut st = lock_group(&self.group.state);
        for t in self.tickets.drain(..) {
            st.done.insert(
                t,
                Err(JournalError::Interrupted {
                    path: self.path.to_owned(),
                }),
            );
        }
        st.committing = false;
        self.group.committed.notify_all();
    }
}

fn lock_group(m: &Mutex<GroupState>) -> MutexGuard<'_, GroupState> {
    // The state stays consistent across a panic (every update is a single assignment).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Journal {
    /// Opens (or creates) the journal; fails if another process owns it. Applies the log's
    /// frames written after the last checkpoint, and checkpoints them.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let db = redb::Database::create(path).map_err(|e| db_err(path, e))?;
        // Create the tables so read transactions find them, and read the checkpoint.
        let prepare = || -> Result<u64, redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(VOLUMES)?;
            txn.open_table(STAGES)?;
            txn.open_table(PUBLISHES)?;
            txn.open_table(RETIRED_QGROUPS)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(GROUPS)?;
            txn.open_table(ATTACHMENTS)?;
            let checkpoint = txn.open_table(META)?.get(CHECKPOINT)?.map_or(0, |v| v.value());
            txn.commit()?;
            Ok(checkpoint)
        };
        let checkpoint = prepare().map_err(|e| db_err(path, e))?;
        let log_path = path.with_extension("wal");
        let (wal, frames) = Wal::open(&log_path, LOG_SIZE, checkpoint).map_err(|source| JournalError::Log {
            path: log_path.clone(),
            source,
        })?;
        // The frames after the checkpoint are what a checkpoint at open applies.
        let replayed = frames.len();
        let mut log = Logged {
            wal,
            unapplied: frames.into_iter().map(|f| (f.seq, f.payload)).collect(),
        };
        if replayed > 0 {
            apply_checkpoint(&db, path, &mut log, std::iter::empty())?;
            tracing::info!(frames = replayed, last = log.wal.last_seq(), "journal log replayed");
        }
        Ok(Journal {
            db,
            path: path.to_owned(),
            group: Group::default(),
            log: Mutex::new(log),
        })
    }

    /// Reads every record.
    pub fn load(&self) -> Result<Records, JournalError> {
        // redb holds what was logged since the last checkpoint only after the next one.
        self.checkpoint(std::iter::empty())?;
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut records = Records::default();
        let volumes = txn.open_table(VOLUMES).map_err(|e| self.err(e))?;
        for entry in volumes.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let rec: VolumeRecord = decode(k.value(), v.value())?;
            records.volumes.insert(rec.id.clone(), rec);
        }
        let stages = txn.open_table(STAGES).map_err(|e| self.err(e))?;
        for entry in stages.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let rec: StageRecord = decode(k.value(), v.value())?;
            records.stages.insert(rec.volume_id.clone(), rec);
        }
        let publishes = txn.open_table(PUBLISHES).map_err(|e| self.err(e))?;
        for entry in publishes.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let rec: PublishRecord = decode(k.value().0, v.value())?;
            records
                .publishes
                .insert((rec.volume_id.clone(), rec.target_path.clone()), rec);
        }
        let retired = txn.open_table(RETIRED_QGROUPS).map_err(|e| self.err(e))?;
        for entry in retired.iter().map_err(|e| self.err(e))? {
            let (k, _) = entry.map_err(|e| self.err(e))?;
            let (pool, id) = k.value();
            records.retired_qgroups.push((pool.to_owned(), id));
        }
        let snapshots = txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
        for entry in snapshots.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let rec: SnapshotRecord = decode(k.value(), v.value())?;
            records.snapshots.insert(rec.id.clone(), rec);
        }
        let groups = txn.open_table(GROUPS).map_err(|e| self.err(e))?;
        for entry in groups.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let rec: GroupRecord = decode(k.value(), v.value())?;
            records.groups.insert(rec.id.clone(), rec);
        }
        let attachments = txn.open_table(ATTACHMENTS).map_err(|e| self.err(e))?;
        for entry in attachments.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let rec: AttachmentRecord = decode(k.value().0, v.value())?;
            records
                .attachments
                .insert((rec.volume_id.clone(), rec.node_id.clone()), rec);
        }
        Ok(records)
    }

    pub fn put_snapshot(&self, rec: &SnapshotRecord) -> Result<(), JournalError> {
        self.commit(vec![Change::Put(Table::Snapshots, rec.id.to_string(), encode(rec))])
    }

    /// Removes a snapshot's record, retiring its qgroup in the same transaction if needed.
    pub fn delete_snapshot(&self, id: &VolumeId, retire: Option<(&str, u64)>) -> Result<(), JournalError> {
        let mut changes = vec![Change::Remove(Table::Snapshots, id.to_string())];
        changes.extend(retire.map(|(pool, q)| Change::Retire(pool.to_owned(), q)));
        self.commit(changes)
    }

    /// Commits a group snapshot and its member snapshots in one transaction.
    pub fn put_group(&self, group: &GroupRecord, members: &[SnapshotRecord]) -> Result<(), JournalError> {
        let mut changes = vec![Change::Put(Table::Groups, group.id.to_string(), encode(group))];
        changes.extend(
            members
                .iter()
                .map(|m| Change::Put(Table::Snapshots, m.id.to_string(), encode(m))),
        );
        self.commit(changes)
    }

    pub fn delete_group(&self, id: &VolumeId) -> Result<(), JournalError> {
        self.commit(vec![Change::Remove(Table::Groups, id.to_string())])
    }

    pub fn put_attachment(&self, rec: &AttachmentRecord) -> Result<(), JournalError> {
        self.commit(vec![Change::PutPair(
            PairTable::Attachments,
            rec.volume_id.to_string(),
            rec.node_id.clone(),
            encode(rec),
        )])
    }

    pub fn delete_attachment(&self, id: &VolumeId, node: &str) -> Result<(), JournalError> {
        self.commit(vec![Change::RemovePair(
            PairTable::Attachments,
            id.to_string(),
            node.to_owned(),
        )])
    }

    pub fn put_volume(&self, rec: &VolumeRecord) -> Result<(), JournalError> {
        self.commit(vec![Change::Put(Table::Volumes, rec.id.to_string(), encode(rec))])
    }

    /// Removes a volume's record, and in the same transaction retires its qgroup if the kernel
    /// still holds it.
    pub fn delete_volume(&self, id: &VolumeId, retire: Option<(&str, u64)>) -> Result<(), JournalError> {
        let mut changes = vec![Change::Remove(Table::Volumes, id.to_string())];
        changes.extend(retire.map(|(pool, q)| Change::Retire(pool.to_owned(), q)));
        self.commit(changes)
    }

    pub fn retire_qgroup(&self, pool: &str, subvolume_id: u64) -> Result<(), JournalError> {
        self.commit(vec![Change::Retire(pool.to_owned(), subvolume_id)])
    }

    pub fn forget_retired_qgroup(&self, pool: &str, subvolume_id: u64) -> Result<(), JournalError> {
        self.commit(vec![Change::Unretire(pool.to_owned(), subvolume_id)])
    }

    pub fn put_stage(&self, rec: &StageRecord) -> Result<(), JournalError> {
        self.commit(vec![Change::Put(Table::Stages, rec.volume_id.to_string(), encode(rec))])
    }

    pub fn delete_stage(&self, id: &VolumeId) -> Result<(), JournalError> {
        self.commit(vec![Change::Remove(Table::Stages, id.to_string())])
    }

    pub fn put_publish(&self, rec: &PublishRecord) -> Result<(), JournalError> {
        self.commit(vec![Change::PutPair(
            PairTable::Publishes,
            rec.volume_id.to_string(),
            path_key(&rec.target_path),
            encode(rec),
        )])
    }

    pub fn delete_publish(&self, id: &VolumeId, target: &Path) -> Result<(), JournalError> {
        self.commit(vec![Change::RemovePair(
            PairTable::Publishes,
            id.to_string(),
            path_key(target),
        )])
    }

    /// Group commits made since the journal was opened (each may carry many mutations).
    pub fn commits(&self) -> u64 {
        self.group.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes `changes` durable, atomically, together with whatever other callers queued
    /// meanwhile; returns once they are on disk (or failed).
    fn commit(&self, changes: Vec<Change>) -> Result<(), JournalError> {
        let mut st = lock_group(&self.group.state);
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push((ticket, changes));
        loop {
            if let Some(outcome) = st.done.remove(&ticket) {
                return outcome;
            }
            if st.committing {
                st = self.group.committed.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // No commit is running: this caller commits everything queued (its own change is
            // among it unless an earlier commit took it, and then its outcome is in `done`).
            st.committing = true;
            let batch = std::mem::take(&mut st.queue);
            drop(st);
            let leader = Leader {
                group: &self.group,
                path: &self.path,
                tickets: batch.iter().map(|(t, _)| *t).collect(),
            };
            let outcomes = self.commit_batch(batch);
            st = lock_group(&self.group.state);
            st.done.extend(outcomes);
            st.committing = false;
            self.group.committed.notify_all();
            // Handed on above, with the outcomes in place.
            std::mem::forget(leader);
        }
    }

    /// One transaction for the whole batch. If it fails, each mutation is tried again in a
    /// transaction of its own, so that one bad change cannot fail the others.
    fn commit_batch(&self, batch: Vec<(u64, Vec<Change>)>) -> Vec<(u64, Result<(), JournalError>)> {
        if batch.is_empty() {
            return Vec::new();
        }
        match self.write(batch.iter().flat_map(|(_, c)| c)) {
            Ok(()) => batch.into_iter().map(|(t, _)| (t, Ok(()))).collect(),
            Err(e) if batch.len() == 1 => vec![(batch[0].0, Err(e))],
            Err(_) => batch
                .into_iter()
                .map(|(t, changes)| (t, self.write(&changes)))
                .collect(),
        }
    }

    /// Makes `changes` durable: as one log frame, or, when the log is due for a checkpoint or
    /// the changes would not fit in it, in the checkpoint's durable redb commit.
    fn write<'a>(&self, changes: impl IntoIterator<Item = &'a Change> + Clone) -> Result<(), JournalError> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let payload = encode_changes(changes.clone());
        if log.wal.checkpoint_due(payload.len()) {
            apply_checkpoint(&self.db, &self.path, &mut log, changes)?;
        } else {
            let seq = log.wal.append(&payload).map_err(|source| JournalError::Log {
                path: self.path.with_extension("wal"),
                source,
            })?;
            crate::crash::point("journal.after_log");
            log.unapplied.push((seq, payload));
        }
        self.group.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// A checkpoint, if anything was logged since the last one.
    fn checkpoint<'a>(&self, more: impl IntoIterator<Item = &'a Change>) -> Result<(), JournalError> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.unapplied.is_empty() {
            return Ok(());
        }
        apply_checkpoint(&self.db, &self.path, &mut log, more)
    }

    fn err(&self, e: impl Into<redb::Error>) -> JournalError {
        db_err(&self.path, e)
    }
}

/// One durable redb commit of every frame logged since the last checkpoint, then `more`, which
/// records the log's last frame as applied; the log then starts over. On failure nothing is
/// lost: the frames stay in the log (replayed at the next open) and in `unapplied` (tried
/// again at the next checkpoint).
fn apply_checkpoint<'a>(
    db: &redb::Database,
    path: &Path,
    log: &mut Logged,
    more: impl IntoIterator<Item = &'a Change>,
) -> Result<(), JournalError> {
    let mut logged = Vec::new();
    for (seq, payload) in &log.unapplied {
        logged.extend(decode_changes(payload).map_err(|reason| JournalError::Corrupt {
            path: path.with_extension("wal"),
            seq: *seq,
            reason,
        })?);
    }
    let last = log.wal.last_seq();
    let durable = || -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        apply(&txn, logged.iter())?;
        apply(&txn, more)?;
        txn.open_table(META)?.insert(CHECKPOINT, last)?;
        txn.commit()?;
        Ok(())
    };
    durable().map_err(|e| db_err(path, e))?;
    log.unapplied.clear();
    log.wal.checkpointed();
    Ok(())
}

fn db_err(path: &Path, e: impl Into<redb::Error>) -> JournalError {
    JournalError::Db {
        path: path.to_owned(),
        source: Box::new(e.into()),
    }
}

fn path_key(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, numbers, maps with string keys) cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, JournalError> {
    serde_json::from_slice(bytes).map_err(|source| JournalError::Decode {
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{AccessMode, AccessType};

    fn cap() -> Capability {
        Capability {
            access_type: AccessType::Mount,
            fs_type: String::new(),
            mount_flags: vec![],
            mode: AccessMode::SingleNodeWriter,
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        let id = VolumeId::generate().unwrap();
        let vol = VolumeRecord {
            id: id.clone(),
            name: "data".into(),
            kind: Kind::Dir,
            pool: "default".into(),
            fs: None,
            capacity: 1 << 20,
            parameters: BTreeMap::new(),
            capabilities: vec![cap()],
            subvolume_id: Some(257),
            state: VolumeState::Ready,
            created_unix: 1,
            source: None,
            mutable: BTreeMap::new(),
            grow_fs_on_stage: false,
        };
        let stage = StageRecord {
            volume_id: id.clone(),
            staging_path: "/stage".into(),
            capability: cap(),
        };
        let publish = PublishRecord {
            volume_id: id.clone(),
            target_path: "/t/1".into(),
            read_only: false,
            capability: cap(),
        };
        {
            let j = Journal::open(&path).unwrap();
            j.put_volume(&vol).unwrap();
            j.put_stage(&stage).unwrap();
            j.put_publish(&publish).unwrap();
            j.delete_volume(&VolumeId::generate().unwrap(), Some(("default", 300)))
                .unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let r = j.load().unwrap();
        assert_eq!(r.volumes.get(&id), Some(&vol));
        assert_eq!(r.stages.get(&id), Some(&stage));
        assert_eq!(r.publishes.len(), 1);
        assert_eq!(r.retired_qgroups, vec![("default".to_owned(), 300)]);
        j.delete_publish(&id, Path::new("/t/1")).unwrap();
        j.delete_stage(&id).unwrap();
        j.delete_volume(&id, None).unwrap();
        j.forget_retired_qgroup("default", 300).unwrap();
        assert_eq!(j.load().unwrap(), Records::default());
    }

    /// Parallel callers (which share commits) each get their record made durable.
    #[test]
    fn parallel_mutations_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        const THREADS: usize = 16;
        const EACH: usize = 40;
        let ids: Vec<Vec<VolumeId>> = (0..THREADS)
            .map(|_| (0..EACH).map(|_| VolumeId::generate().unwrap()).collect())
            .collect();
        let commits = {
            let j = Journal::open(&path).unwrap();
            std::thread::scope(|s| {
                for (t, mine) in ids.iter().enumerate() {
                    let j = &j;
                    s.spawn(move || {
                        for (i, id) in mine.iter().enumerate() {
                            j.put_stage(&StageRecord {
                                volume_id: id.clone(),
                                staging_path: format!("/stage/{t}/{i}").into(),
                                capability: cap(),
                            })
                            .unwrap();
                            if i % 2 == 1 {
                                j.delete_stage(id).unwrap();
                            }
                        }
                    });
                }
            });
            j.commits()
        };
        let writes = (THREADS * EACH * 3 / 2) as u64;
        assert!(
            commits >= 1 && commits <= writes,
            "{commits} commits for {writes} writes"
        );
        eprintln!("{writes} mutations from {THREADS} threads in {commits} commits");
        let r = Journal::open(&path).unwrap().load().unwrap();
        let kept: Vec<&VolumeId> = ids.iter().flat_map(|m| m.iter().step_by(2)).collect();
        assert_eq!(r.stages.len(), kept.len());
        for id in kept {
            assert!(r.stages.contains_key(id), "stage of {id:?} lost");
        }
    }

    fn stage(id: &VolumeId, path: &str) -> StageRecord {
        StageRecord {
            volume_id: id.clone(),
            staging_path: path.into(),
            capability: cap(),
        }
    }

    #[test]
    fn changes_round_trip_through_a_log_payload() {
        let changes = vec![
            Change::Put(Table::Volumes, "v".into(), b"{}".to_vec()),
            Change::Remove(Table::Groups, "g".into()),
            Change::PutPair(PairTable::Attachments, "v".into(), "node-1".into(), vec![0, 255]),
            Change::RemovePair(PairTable::Publishes, "v".into(), "/t/\u{e9}".into()),
            Change::Retire("default".into(), u64::MAX),
            Change::Unretire("other".into(), 257),
            Change::Put(Table::Snapshots, String::new(), vec![]),
        ];
        assert_eq!(decode_changes(&encode_changes(&changes)).unwrap(), changes);
        assert!(decode_changes(&[9]).is_err());
        assert!(decode_changes(&[1, 7, 0, 0, 0, 0]).is_err(), "table 7 does not exist");
        assert!(decode_changes(&[1, 0, 5, 0, 0, 0, b'a']).is_err(), "truncated key");
    }

    /// What redb held only in commits without an fsync is lost with the machine; the log brings
    /// it back at the next open.
    #[test]
    fn the_log_restores_what_redb_had_not_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        let saved = dir.path().join("saved.redb");
        drop(Journal::open(&path).unwrap());
        std::fs::copy(&path, &saved).unwrap();
        let (a, b) = (VolumeId::generate().unwrap(), VolumeId::generate().unwrap());
        {
            let j = Journal::open(&path).unwrap();
            j.put_stage(&stage(&a, "/a")).unwrap();
            j.put_stage(&stage(&b, "/b")).unwrap();
            j.retire_qgroup("default", 300).unwrap();
            j.delete_stage(&a).unwrap();
        }
        std::fs::copy(&saved, &path).unwrap();
        let j = Journal::open(&path).unwrap();
        let r = j.load().unwrap();
        assert_eq!(r.stages.keys().collect::<Vec<_>>(), vec![&b]);
        assert_eq!(r.retired_qgroups, vec![("default".to_owned(), 300)]);
        // The replay was checkpointed: opening again finds the same, and later changes follow.
        j.delete_stage(&b).unwrap();
        drop(j);
        let r = Journal::open(&path).unwrap().load().unwrap();
        assert!(r.stages.is_empty());
        assert_eq!(r.retired_qgroups.len(), 1);
    }

    /// Past `CHECKPOINT_EVERY` frames redb commits durably and the log starts over; nothing is
    /// lost across the turn, even if redb then loses its later commits.
    #[test]
    fn checkpoints_start_the_log_over_without_losing_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        let ids: Vec<VolumeId> = (0..berth_wal::CHECKPOINT_EVERY + 40)
            .map(|_| VolumeId::generate().unwrap())
            .collect();
        {
            let j = Journal::open(&path).unwrap();
            for (i, id) in ids.iter().enumerate() {
                j.put_stage(&stage(id, &format!("/s/{i}"))).unwrap();
            }
            assert_eq!(j.commits(), ids.len() as u64);
            assert!(
                j.log.lock().unwrap().wal.last_seq() < ids.len() as u64,
                "one commit was a checkpoint"
            );
        }
        let r = Journal::open(&path).unwrap().load().unwrap();
        assert_eq!(r.stages.len(), ids.len());
    }

    /// A batch that does not fit after the frames already written is committed durably by redb
    /// (a checkpoint), and one larger than the whole log too; the log starts over after each.
    #[test]
    fn a_full_log_or_an_oversized_batch_is_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        let seq = |j: &Journal| j.log.lock().unwrap().wal.last_seq() + 1;
        let big = |n: usize| vec![Change::Put(Table::Volumes, format!("v{n}"), vec![n as u8; 3 << 20])];
        {
            let j = Journal::open(&path).unwrap();
            j.commit(big(1)).unwrap();
            j.commit(big(2)).unwrap();
            assert_eq!(seq(&j), 3, "two frames in the log");
            j.commit(big(3)).unwrap();
            assert_eq!(seq(&j), 3, "the third did not fit: a durable commit, no frame");
            j.commit(big(4)).unwrap();
            assert_eq!(seq(&j), 4, "the log started over");
            j.commit(vec![Change::Put(Table::Volumes, "huge".into(), vec![9; 9 << 20])])
                .unwrap();
            assert_eq!(seq(&j), 4, "larger than the log: a durable commit");
        }
        let j = Journal::open(&path).unwrap();
        let txn = j.db.begin_read().unwrap();
        let volumes = txn.open_table(VOLUMES).unwrap();
        for (key, len) in [
            ("v1", 3 << 20),
            ("v2", 3 << 20),
            ("v3", 3 << 20),
            ("v4", 3 << 20),
            ("huge", 9 << 20),
        ] {
            assert_eq!(volumes.get(key).unwrap().map(|v| v.value().len()), Some(len), "{key}");
        }
    }

    #[test]
    fn a_log_frame_that_does_not_decode_stops_the_open() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        drop(Journal::open(&path).unwrap());
        let log = std::fs::OpenOptions::new()
            .write(true)
            .open(path.with_extension("wal"))
            .unwrap();
        log.write_all_at(&berth_wal::encode_frame(1, &[42, 0]), 0).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(matches!(err, JournalError::Corrupt { seq: 1, .. }), "{err}");
    }

    /// A logged change reaches redb at the next checkpoint, not on its caller's path; a load
    /// checkpoints first, so it sees every change.
    #[test]
    fn logged_changes_reach_redb_at_the_next_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.redb")).unwrap();
        let id = VolumeId::generate().unwrap();
        j.put_stage(&stage(&id, "/s")).unwrap();
        let in_redb = |j: &Journal| {
            let txn = j.db.begin_read().unwrap();
            txn.open_table(STAGES).unwrap().get(id.as_str()).unwrap().is_some()
        };
        assert!(!in_redb(&j), "only in the log so far");
        assert_eq!(j.log.lock().unwrap().unapplied.len(), 1);
        let r = j.load().unwrap();
        assert!(r.stages.contains_key(&id));
        assert!(in_redb(&j), "the load checkpointed");
        assert!(j.log.lock().unwrap().unapplied.is_empty());
    }

    #[test]
    fn a_second_owner_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        let _first = Journal::open(&path).unwrap();
        assert!(Journal::open(&path).is_err());
    }
}

//! The durable record of every volume, staging and publish: Berth's memory across crashes.
//!
//! One redb database per data dir. Every mutation is its own write transaction, committed with
//! redb's immediate durability (fsync) before the caller answers its client. redb holds an
//! exclusive lock on the file, which makes a data dir single-owner. Values are JSON so records
//! stay readable and can grow fields without a migration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::id::VolumeId;
use crate::spec::{Capability, Kind};
use berth_host::FileSystem;

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const STAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("stages");
const PUBLISHES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("publishes");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("group_snapshots");
const ATTACHMENTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("attachments");
/// Qgroups of deleted subvolumes that the kernel would not drop yet: (pool, subvolume id).
const RETIRED_QGROUPS: TableDefinition<(&str, u64), ()> = TableDefinition::new("retired_qgroups");

/// A journal failure: the disk under the data dir is failing or full.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
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
}

impl Journal {
    /// Opens (or creates) the journal; fails if another process owns it.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let db = redb::Database::create(path).map_err(|e| db_err(path, e))?;
        let journal = Journal {
            db,
            path: path.to_owned(),
        };
        // Create the tables so read transactions find them.
        journal.write(|txn| {
            txn.open_table(VOLUMES)?;
            txn.open_table(STAGES)?;
            txn.open_table(PUBLISHES)?;
            txn.open_table(RETIRED_QGROUPS)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(GROUPS)?;
            txn.open_table(ATTACHMENTS)?;
            Ok(())
        })?;
        Ok(journal)
    }

    /// Reads every record.
    pub fn load(&self) -> Result<Records, JournalError> {
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
        let value = encode(rec);
        self.write(|txn| {
            txn.open_table(SNAPSHOTS)?.insert(rec.id.as_str(), value.as_slice())?;
            Ok(())
        })
    }

    /// Removes a snapshot's record, retiring its qgroup in the same transaction if needed.
    pub fn delete_snapshot(&self, id: &VolumeId, retire: Option<(&str, u64)>) -> Result<(), JournalError> {
        self.write(|txn| {
            txn.open_table(SNAPSHOTS)?.remove(id.as_str())?;
            if let Some(q) = retire {
                txn.open_table(RETIRED_QGROUPS)?.insert(q, ())?;
            }
            Ok(())
        })
    }

    /// Commits a group snapshot and its member snapshots in one transaction.
    pub fn put_group(&self, group: &GroupRecord, members: &[SnapshotRecord]) -> Result<(), JournalError> {
        let value = encode(group);
        let members: Vec<(String, Vec<u8>)> = members.iter().map(|m| (m.id.to_string(), encode(m))).collect();
        self.write(|txn| {
            txn.open_table(GROUPS)?.insert(group.id.as_str(), value.as_slice())?;
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            for (id, v) in &members {
                snaps.insert(id.as_str(), v.as_slice())?;
            }
            Ok(())
        })
    }

    pub fn delete_group(&self, id: &VolumeId) -> Result<(), JournalError> {
        self.write(|txn| {
            txn.open_table(GROUPS)?.remove(id.as_str())?;
            Ok(())
        })
    }

    pub fn put_attachment(&self, rec: &AttachmentRecord) -> Result<(), JournalError> {
        let value = encode(rec);
        self.write(|txn| {
            txn.open_table(ATTACHMENTS)?
                .insert((rec.volume_id.as_str(), rec.node_id.as_str()), value.as_slice())?;
            Ok(())
        })
    }

    pub fn delete_attachment(&self, id: &VolumeId, node: &str) -> Result<(), JournalError> {
        self.write(|txn| {
            txn.open_table(ATTACHMENTS)?.remove((id.as_str(), node))?;
            Ok(())
        })
    }

    pub fn put_volume(&self, rec: &VolumeRecord) -> Result<(), JournalError> {
        let value = encode(rec);
        self.write(|txn| {
            txn.open_table(VOLUMES)?.insert(rec.id.as_str(), value.as_slice())?;
            Ok(())
        })
    }

    /// Removes a volume's record, and in the same transaction retires its qgroup if the kernel
    /// still holds it.
    pub fn delete_volume(&self, id: &VolumeId, retire: Option<(&str, u64)>) -> Result<(), JournalError> {
        self.write(|txn| {
            txn.open_table(VOLUMES)?.remove(id.as_str())?;
            if let Some(q) = retire {
                txn.open_table(RETIRED_QGROUPS)?.insert(q, ())?;
            }
            Ok(())
        })
    }

    pub fn retire_qgroup(&self, pool: &str, subvolume_id: u64) -> Result<(), JournalError> {
        self.write(|txn| {
            txn.open_table(RETIRED_QGROUPS)?.insert((pool, subvolume_id), ())?;
            Ok(())
        })
    }

    pub fn forget_retired_qgroup(&self, pool: &str, subvolume_id: u64) -> Result<(), JournalError> {
        self.write(|txn| {
            txn.open_table(RETIRED_QGROUPS)?.remove((pool, subvolume_id))?;
            Ok(())
        })
    }

    pub fn put_stage(&self, rec: &StageRecord) -> Result<(), JournalError> {
        let value = encode(rec);
        self.write(|txn| {
            txn.open_table(STAGES)?
                .insert(rec.volume_id.as_str(), value.as_slice())?;
            Ok(())
        })
    }

    pub fn delete_stage(&self, id: &VolumeId) -> Result<(), JournalError> {
        self.write(|txn| {
            txn.open_table(STAGES)?.remove(id.as_str())?;
            Ok(())
        })
    }

    pub fn put_publish(&self, rec: &PublishRecord) -> Result<(), JournalError> {
        let value = encode(rec);
        let target = path_key(&rec.target_path);
        self.write(|txn| {
            txn.open_table(PUBLISHES)?
                .insert((rec.volume_id.as_str(), target.as_str()), value.as_slice())?;
            Ok(())
        })
    }

    pub fn delete_publish(&self, id: &VolumeId, target: &Path) -> Result<(), JournalError> {
        let target = path_key(target);
        self.write(|txn| {
            txn.open_table(PUBLISHES)?.remove((id.as_str(), target.as_str()))?;
            Ok(())
        })
    }

    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>) -> Result<(), JournalError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    fn err(&self, e: impl Into<redb::Error>) -> JournalError {
        db_err(&self.path, e)
    }
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

    #[test]
    fn a_second_owner_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        let _first = Journal::open(&path).unwrap();
        assert!(Journal::open(&path).is_err());
    }
}

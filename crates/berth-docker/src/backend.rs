//! The few storage operations the Docker plugin needs, as a trait over Berth's engine.
//!
//! [`EngineBackend`] adapts [`berth_storage::Engine`]; unit tests use a fake. Every method
//! blocks (the engine formats filesystems and mounts), so callers run them off the async
//! reactor. Errors stay the engine's own [`EngineError`], so nothing is lost in translation.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_storage::Engine;
use berth_storage::engine::{CreateRequest, EngineError};
use berth_storage::id::VolumeId;
use berth_storage::journal::{ContentSource, SnapshotRecord, VolumeRecord};
use berth_storage::spec::{AccessMode, AccessType, Capability, CapacityRange};

/// What the plugin needs to know about an engine volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendVolume {
    /// The engine's id (32 hex digits; safe as a path component).
    pub id: String,
    pub name: String,
    pub kind: String,
    /// Empty for tmpfs.
    pub pool: String,
    pub fstype: Option<String>,
    pub capacity: u64,
    pub created_unix: u64,
}

impl From<VolumeRecord> for BackendVolume {
    fn from(r: VolumeRecord) -> Self {
        BackendVolume {
            id: r.id.to_string(),
            name: r.name,
            kind: r.kind.as_str().to_owned(),
            pool: r.pool,
            fstype: r.fs.map(|f| f.as_str().to_owned()),
            capacity: r.capacity,
            created_unix: r.created_unix,
        }
    }
}

/// Where a new volume's data comes from, by engine id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A clone of this volume.
    Volume(String),
    /// A restore of this snapshot.
    Snapshot(String),
}

/// What the plugin needs to know about an engine snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSnapshot {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub fstype: Option<String>,
    /// The smallest volume it can be restored into.
    pub size: u64,
    /// The engine id of the volume it was taken of.
    pub source_volume_id: String,
    pub created_unix: u64,
}

impl From<SnapshotRecord> for BackendSnapshot {
    fn from(r: SnapshotRecord) -> Self {
        BackendSnapshot {
            id: r.id.to_string(),
            name: r.name,
            kind: r.kind.as_str().to_owned(),
            fstype: r.fs.map(|f| f.as_str().to_owned()),
            size: r.size,
            source_volume_id: r.source_volume_id.to_string(),
            created_unix: r.created_unix,
        }
    }
}

/// Storage as the Docker plugin sees it. All methods block.
pub trait Backend: Send + Sync + Debug {
    /// Creates a volume (empty, or from `origin`), or returns the existing one of that name
    /// if it matches.
    fn create(
        &self,
        name: &str,
        parameters: BTreeMap<String, String>,
        size: Option<u64>,
        origin: Option<Origin>,
    ) -> Result<BackendVolume, EngineError>;
    /// A snapshot by id or, failing that, by name; `None` if there is none.
    fn snapshot(&self, id_or_name: &str) -> Result<Option<BackendSnapshot>, EngineError>;
    /// Snapshots a volume (crash-consistent while mounted); idempotent by name.
    fn create_snapshot(&self, name: &str, volume_id: &str) -> Result<BackendSnapshot, EngineError>;
    /// Snapshots of one volume, oldest first.
    fn snapshots_of(&self, volume_id: &str) -> Result<Vec<BackendSnapshot>, EngineError>;
    /// Deletes a snapshot; an unknown id is success.
    fn delete_snapshot(&self, id: &str) -> Result<(), EngineError>;
    /// A volume by id; `None` if it does not exist.
    fn volume(&self, id: &str) -> Result<Option<BackendVolume>, EngineError>;
    /// A volume by its (CSI) name, whoever made it.
    fn volume_by_name(&self, name: &str) -> Option<BackendVolume>;
    /// Deletes a volume; an unknown id is success.
    fn delete(&self, id: &str) -> Result<(), EngineError>;
    /// Mounts a volume's filesystem at `path` (created if missing); idempotent.
    fn stage(&self, id: &str, path: &Path) -> Result<(), EngineError>;
    /// Unmounts what [`Backend::stage`] mounted; idempotent.
    fn unstage(&self, id: &str, path: &Path) -> Result<(), EngineError>;
    /// Where the volume is staged, if it is.
    fn staged_at(&self, id: &str) -> Option<PathBuf>;
    /// Bytes in use in a volume, if the engine can tell (mounted or not for dir and tmpfs
    /// volumes; an fs volume only while it is mounted).
    fn used_bytes(&self, id: &str) -> Option<u64>;
}

/// The capability Docker volumes are created and staged with: a directory any number of
/// containers on this node may write.
fn capability(fstype: Option<&str>) -> Capability {
    Capability {
        access_type: AccessType::Mount,
        fs_type: fstype.unwrap_or_default().to_owned(),
        mount_flags: Vec::new(),
        mode: AccessMode::SingleNodeMultiWriter,
    }
}

/// [`Backend`] on Berth's storage engine.
#[derive(Debug, Clone)]
pub struct EngineBackend {
    engine: Arc<Engine>,
}

impl EngineBackend {
    pub fn new(engine: Arc<Engine>) -> Self {
        EngineBackend { engine }
    }
}

impl Backend for EngineBackend {
    fn create(
        &self,
        name: &str,
        parameters: BTreeMap<String, String>,
        size: Option<u64>,
        origin: Option<Origin>,
    ) -> Result<BackendVolume, EngineError> {
        let fstype = parameters.get(berth_storage::spec::PARAM_FSTYPE).cloned();
        let range = CapacityRange {
            required: size.unwrap_or(0),
            // No limit: the engine may round up to what the backend needs (4 KiB for images,
            // the mkfs minimum for xfs).
            limit: 0,
        };
        let rec = self.engine.create(CreateRequest {
            name: name.to_owned(),
            parameters,
            mutable: BTreeMap::new(),
            capabilities: vec![capability(fstype.as_deref())],
            range,
            source: origin.map(|o| match o {
                Origin::Volume(id) => ContentSource::Volume(id),
                Origin::Snapshot(id) => ContentSource::Snapshot(id),
            }),
        })?;
        Ok(rec.into())
    }

    fn snapshot(&self, id_or_name: &str) -> Result<Option<BackendSnapshot>, EngineError> {
        match self.engine.snapshot(id_or_name) {
            Ok(s) => return Ok(Some(s.into())),
            Err(EngineError::NotFound(_) | EngineError::Invalid { .. }) => {}
            Err(e) => return Err(e),
        }
        let (all, _) = self.engine.list_snapshots("", "", "", 0)?;
        Ok(all.into_iter().find(|s| s.name == id_or_name).map(Into::into))
    }

    fn create_snapshot(&self, name: &str, volume_id: &str) -> Result<BackendSnapshot, EngineError> {
        Ok(self.engine.create_snapshot(name, volume_id, &BTreeMap::new())?.into())
    }

    fn snapshots_of(&self, volume_id: &str) -> Result<Vec<BackendSnapshot>, EngineError> {
        let (mut all, _) = self.engine.list_snapshots("", volume_id, "", 0)?;
        all.sort_by_key(|s| (s.created_unix, s.created_nanos));
        Ok(all.into_iter().map(Into::into).collect())
    }

    fn delete_snapshot(&self, id: &str) -> Result<(), EngineError> {
        self.engine.delete_snapshot(id)
    }

    fn volume(&self, id: &str) -> Result<Option<BackendVolume>, EngineError> {
        match self.engine.volume(id) {
            Ok(rec) => Ok(Some(rec.into())),
            Err(EngineError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn volume_by_name(&self, name: &str) -> Option<BackendVolume> {
        self.engine.volume_by_name(name).map(Into::into)
    }

    fn delete(&self, id: &str) -> Result<(), EngineError> {
        self.engine.delete_volume(id)
    }

    fn stage(&self, id: &str, path: &Path) -> Result<(), EngineError> {
        let rec = self.engine.volume(id)?;
        let fstype = rec.fs.map(|f| f.as_str());
        self.engine.stage(id, path, capability(fstype))
    }

    fn unstage(&self, id: &str, path: &Path) -> Result<(), EngineError> {
        self.engine.unstage(id, path)
    }

    fn staged_at(&self, id: &str) -> Option<PathBuf> {
        VolumeId::parse(id).and_then(|id| self.engine.staging_path(&id))
    }

    fn used_bytes(&self, id: &str) -> Option<u64> {
        match self.engine.usage(id) {
            Ok(s) => s.used_bytes,
            Err(e) => {
                tracing::debug!(volume_id = id, error = %e, "no usage figures");
                None
            }
        }
    }
}

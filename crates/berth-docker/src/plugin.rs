//! Executes parsed [`Action`]s against the storage engine: Docker volumes, their backend
//! mount and their mount counts.
//!
//! Guarantees:
//! - a volume's backend is staged once, at `MOUNTS/<volume id>`, on its first Mount, and
//!   unstaged when the counts of all its mount IDs reach zero;
//! - counts are per (name, mount ID) and committed before Docker is answered, so they survive a
//!   plugin restart; an Unmount whose ID is unknown (lost state, a replay) only unstages when
//!   nothing else holds the volume;
//! - Create, Remove, Mount and Unmount of one name run one at a time; Get, Path and List never
//!   wait for them, so a name the plugin does not own is answered at once;
//! - at start, [`Plugin::open`] finishes or rolls back what a crash interrupted and makes the
//!   mounts agree with the counts (level-triggered, idempotent).
//!
//! Volume names are engine names only; paths are built from engine ids alone.

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use berth_storage::engine::EngineError;
use berth_storage::id::VolumeId;

use crate::backend::{Backend, BackendSnapshot, BackendVolume, Origin};
use crate::options::{Source, VolumeName, VolumeOptions, human_size};
use crate::request::{Action, MountId};
use crate::response::{ListItem, Reply, SnapshotInfo, VolumeInfo, rfc3339};
use crate::store::{Entry, EntryState, Store, StoreError};

/// Why an action failed. The message goes to the Docker user as `Err`.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("no such volume: {0}")]
    NoSuchVolume(String),
    #[error("volume {name} is in use ({mounts} mount(s) by containers); stop and remove those containers first")]
    InUse { name: String, mounts: u64 },
    #[error("the name {name} is taken by a Berth volume that is not a Docker volume ({id}); choose another name")]
    NameTaken { name: String, id: String },
    #[error("no such snapshot: {0} (give a snapshot id or name)")]
    NoSuchSnapshot(String),
    #[error("volume {name}: {why}")]
    Inconsistent { name: String, why: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T> = std::result::Result<T, PluginError>;

/// Engine parameters, size and origin of a volume to create.
type Plan = (BTreeMap<String, String>, Option<u64>, Option<Origin>);

/// Stripes of per-name locks: bounded memory whatever names Docker sends.
const STRIPES: usize = 64;

/// The Docker volume plugin's executor.
#[derive(Debug)]
pub struct Plugin {
    backend: Arc<dyn Backend>,
    store: Store,
    mounts_dir: PathBuf,
    stripes: Vec<Mutex<()>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Plugin {
    /// Opens the store at `store_path` and reconciles it with the engine. `mounts_dir` holds
    /// the backend mounts Docker binds into containers (for a managed plugin it must lie under
    /// the propagated mount).
    pub fn open(backend: Arc<dyn Backend>, store_path: &Path, mounts_dir: PathBuf) -> Result<Plugin> {
        if let Some(parent) = store_path.parent() {
            create_private_dir(parent)?;
        }
        let store = Store::open(store_path)?;
        let plugin = Plugin {
            backend,
            store,
            mounts_dir,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        };
        plugin.reconcile();
        Ok(plugin)
    }

    /// Where a volume's backend is mounted while containers use it.
    pub fn mountpoint(&self, volume_id: &str) -> Result<PathBuf> {
        // Ids come from the engine; one read back from the store is checked again before it
        // becomes a path component.
        let id = VolumeId::parse(volume_id).ok_or_else(|| PluginError::Inconsistent {
            name: String::new(),
            why: format!("recorded volume id {volume_id:?} is not a Berth id"),
        })?;
        Ok(self.mounts_dir.join(id.as_str()))
    }

    fn lock_name(&self, name: &str) -> MutexGuard<'_, ()> {
        // The modulo keeps the index below STRIPES, so the conversion cannot truncate.
        let i = usize::try_from(self.hasher.hash_one(name) % STRIPES as u64).unwrap_or(0);
        match self.stripes.get(i) {
            Some(m) => m.lock().unwrap_or_else(|e| e.into_inner()),
            None => self.stripes[0].lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Runs one action. Blocks: call it from a blocking thread.
    pub fn execute(&self, action: Action) -> Result<Reply> {
        match action {
            Action::Activate => Ok(Reply::Activate),
            Action::Capabilities => Ok(Reply::Capabilities),
            Action::Create { name, options } => self.create(&name, &options).map(|()| Reply::Done),
            Action::Remove { name } => self.remove(&name).map(|()| Reply::Done),
            Action::Mount { name, id } => self.mount(&name, &id).map(Reply::Mountpoint),
            Action::Unmount { name, id } => self.unmount(&name, &id).map(|()| Reply::Done),
            Action::Path { name } => self.path(&name).map(Reply::Mountpoint),
            Action::Get { name } => self.get(&name).map(Reply::Volume),
            Action::List => Ok(Reply::List(self.list())),
            Action::SnapshotCreate { volume, name } => self.create_snapshot(&volume, &name).map(Reply::Snapshot),
            Action::SnapshotList { volume } => self.snapshots(&volume).map(Reply::Snapshots),
            Action::SnapshotRemove { name } => self.remove_snapshot(&name).map(|()| Reply::Done),
        }
    }

    /// The Ready entry of a name, or "no such volume".
    fn ready(&self, name: &VolumeName) -> Result<Entry> {
        match self.store.entry(name.as_str()) {
            Some(e) if e.state == EntryState::Ready => Ok(e),
            _ => Err(PluginError::NoSuchVolume(name.to_string())),
        }
    }

    /// Engine parameters, size and origin of a new volume. A clone or restore takes its
    /// source's kind and filesystem (and, in the engine, its pool) and at least its size.
    fn plan(&self, options: &VolumeOptions) -> Result<Plan> {
        let like = |kind: &str, fstype: &Option<String>| {
            let mut p = BTreeMap::from([(berth_storage::spec::PARAM_KIND.to_owned(), kind.to_owned())]);
            if let Some(fs) = fstype {
                p.insert(berth_storage::spec::PARAM_FSTYPE.to_owned(), fs.clone());
            }
            p
        };
        match &options.source {
            Source::Empty => Ok((options.engine_parameters(), options.size, None)),
            Source::Volume(v) => {
                let entry = self
                    .ready(v)
                    .map_err(|_| PluginError::NoSuchVolume(format!("{v} (from={v})")))?;
                let src = self
                    .backend
                    .volume(&entry.volume_id)?
                    .ok_or_else(|| PluginError::NoSuchVolume(format!("{v} (from={v})")))?;
                Ok((
                    like(&src.kind, &src.fstype),
                    Some(options.size.unwrap_or(src.capacity)),
                    Some(Origin::Volume(src.id)),
                ))
            }
            Source::Snapshot(s) => {
                let snap = self
                    .backend
                    .snapshot(s)?
                    .ok_or_else(|| PluginError::NoSuchSnapshot(s.clone()))?;
                Ok((
                    like(&snap.kind, &snap.fstype),
                    Some(options.size.unwrap_or(snap.size)),
                    Some(Origin::Snapshot(snap.id)),
                ))
            }
        }
    }

    fn create(&self, name: &VolumeName, options: &VolumeOptions) -> Result<()> {
        let (parameters, size, origin) = self.plan(options)?;
        let _guard = self.lock_name(name.as_str());
        let _span = tracing::info_span!("docker_create", volume = %name).entered();
        let entry = self.store.entry(name.as_str());
        match entry.as_ref().map(|e| e.state) {
            // Docker asks Get first and never re-creates a name it knows; a repeat (two
            // daemons, a retry) gets the engine's idempotent answer: same options, same volume.
            Some(EntryState::Ready) => {
                self.backend.create(name.as_str(), parameters, size, origin)?;
                return Ok(());
            }
            Some(EntryState::Removing) => {
                return Err(PluginError::Inconsistent {
                    name: name.to_string(),
                    why: "it is being removed; retry when `docker volume rm` has finished".into(),
                });
            }
            Some(EntryState::Creating) | None => {}
        }
        if entry.is_none()
            && let Some(other) = self.backend.volume_by_name(name.as_str())
        {
            return Err(PluginError::NameTaken {
                name: name.to_string(),
                id: other.id,
            });
        }
        self.store.put_entry(
            name.as_str(),
            &Entry {
                state: EntryState::Creating,
                volume_id: String::new(),
            },
        )?;
        match self.backend.create(name.as_str(), parameters, size, origin) {
            Ok(v) => {
                self.store.put_entry(
                    name.as_str(),
                    &Entry {
                        state: EntryState::Ready,
                        volume_id: v.id.clone(),
                    },
                )?;
                tracing::info!(volume_id = %v.id, kind = %v.kind, size = v.capacity, "docker volume created");
                Ok(())
            }
            Err(e) => {
                // The engine made nothing (or rolled back); forget the name again.
                if let Err(se) = self.store.delete_entry(name.as_str()) {
                    tracing::error!(error = %se, "cannot forget a failed create; it is finished at the next start");
                }
                Err(e.into())
            }
        }
    }

    fn remove(&self, name: &VolumeName) -> Result<()> {
        let _guard = self.lock_name(name.as_str());
        let _span = tracing::info_span!("docker_remove", volume = %name).entered();
        let Some(entry) = self.store.entry(name.as_str()) else {
            // Already gone: Docker may retry a Remove that succeeded.
            return Ok(());
        };
        if entry.state == EntryState::Creating {
            return Err(PluginError::Inconsistent {
                name: name.to_string(),
                why: "it is still being created; retry".into(),
            });
        }
        let mounts = self.store.total_mounts(name.as_str());
        if mounts > 0 {
            return Err(PluginError::InUse {
                name: name.to_string(),
                mounts,
            });
        }
        if entry.state != EntryState::Removing {
            self.store.put_entry(
                name.as_str(),
                &Entry {
                    state: EntryState::Removing,
                    volume_id: entry.volume_id.clone(),
                },
            )?;
        }
        self.finish_remove(name.as_str(), &entry.volume_id)?;
        tracing::info!(volume_id = %entry.volume_id, "docker volume removed");
        Ok(())
    }

    /// Unstages (if needed) and deletes the engine volume, then forgets the name. Idempotent.
    fn finish_remove(&self, name: &str, volume_id: &str) -> Result<()> {
        if VolumeId::parse(volume_id).is_some() {
            self.release_backend(volume_id)?;
            self.backend.delete(volume_id)?;
        }
        self.store.delete_entry(name)?;
        Ok(())
    }

    fn mount(&self, name: &VolumeName, id: &MountId) -> Result<String> {
        let _guard = self.lock_name(name.as_str());
        let entry = self.ready(name)?;
        let _span = tracing::info_span!("docker_mount", volume = %name, volume_id = %entry.volume_id).entered();
        let mountpoint = self.mountpoint(&entry.volume_id)?;
        self.ensure_staged(&entry.volume_id, &mountpoint)?;
        let count = self.store.count(name.as_str(), id.as_str()) + 1;
        self.store.set_count(name.as_str(), id.as_str(), count)?;
        tracing::info!(
            mount_id = id.as_str(),
            count,
            total = self.store.total_mounts(name.as_str()),
            "mounted"
        );
        Ok(path_string(&mountpoint))
    }

    fn unmount(&self, name: &VolumeName, id: &MountId) -> Result<()> {
        let _guard = self.lock_name(name.as_str());
        let Some(entry) = self.store.entry(name.as_str()) else {
            tracing::warn!(volume = %name, mount_id = id.as_str(), "Unmount of a volume this plugin does not have; nothing to do");
            return Ok(());
        };
        let _span = tracing::info_span!("docker_unmount", volume = %name, volume_id = %entry.volume_id).entered();
        let count = self.store.count(name.as_str(), id.as_str());
        if count == 0 {
            // A mount ID we never counted (state lost, or a replay after it reached zero).
            // Never take counts from other IDs; only unstage when none is left.
            tracing::warn!(mount_id = id.as_str(), "Unmount with an unknown mount ID");
        } else {
            self.store.set_count(name.as_str(), id.as_str(), count - 1)?;
        }
        let total = self.store.total_mounts(name.as_str());
        tracing::info!(
            mount_id = id.as_str(),
            count = count.saturating_sub(1),
            total,
            "unmounted"
        );
        if total == 0 && entry.state == EntryState::Ready {
            self.release_backend(&entry.volume_id)?;
        }
        Ok(())
    }

    fn create_snapshot(&self, volume: &VolumeName, name: &str) -> Result<SnapshotInfo> {
        let _guard = self.lock_name(volume.as_str());
        let entry = self.ready(volume)?;
        let _span = tracing::info_span!("docker_snapshot", volume = %volume, volume_id = %entry.volume_id).entered();
        let snap = self.backend.create_snapshot(name, &entry.volume_id)?;
        tracing::info!(snapshot = name, snapshot_id = %snap.id, "snapshot taken");
        Ok(self.snapshot_info(snap))
    }

    fn snapshots(&self, volume: &VolumeName) -> Result<Vec<SnapshotInfo>> {
        let entry = self.ready(volume)?;
        Ok(self
            .backend
            .snapshots_of(&entry.volume_id)?
            .into_iter()
            .map(|s| self.snapshot_info(s))
            .collect())
    }

    fn remove_snapshot(&self, name: &str) -> Result<()> {
        let Some(snap) = self.backend.snapshot(name)? else {
            return Ok(());
        };
        self.backend.delete_snapshot(&snap.id)?;
        tracing::info!(snapshot = %snap.name, snapshot_id = %snap.id, "snapshot deleted");
        Ok(())
    }

    fn snapshot_info(&self, s: BackendSnapshot) -> SnapshotInfo {
        let volume = self
            .store
            .contents()
            .volumes
            .into_iter()
            .find(|(_, e)| e.volume_id == s.source_volume_id)
            .map(|(name, _)| name)
            .unwrap_or_default();
        SnapshotInfo {
            name: s.name,
            id: s.id,
            volume,
            size_bytes: s.size,
            created_at: rfc3339(s.created_unix),
        }
    }

    fn path(&self, name: &VolumeName) -> Result<String> {
        let entry = self.ready(name)?;
        Ok(self.current_mountpoint(&entry.volume_id))
    }

    fn get(&self, name: &VolumeName) -> Result<VolumeInfo> {
        let entry = self.ready(name)?;
        let vol = self
            .backend
            .volume(&entry.volume_id)?
            .ok_or_else(|| PluginError::NoSuchVolume(name.to_string()))?;
        let mountpoint = self.current_mountpoint(&entry.volume_id);
        let mounts = self.store.total_mounts(name.as_str());
        Ok(VolumeInfo {
            name: name.to_string(),
            created_at: rfc3339(vol.created_unix),
            status: self.status(&vol, &mountpoint, mounts),
            mountpoint,
        })
    }

    fn status(&self, vol: &BackendVolume, mountpoint: &str, mounts: u64) -> BTreeMap<String, serde_json::Value> {
        use serde_json::json;
        let mut s = BTreeMap::new();
        s.insert("volumeId".to_owned(), json!(vol.id));
        s.insert("kind".to_owned(), json!(vol.kind));
        s.insert(
            "pool".to_owned(),
            json!(if vol.pool.is_empty() {
                "(memory)"
            } else {
                vol.pool.as_str()
            }),
        );
        if let Some(fs) = &vol.fstype {
            s.insert("fstype".to_owned(), json!(fs));
        }
        s.insert("size".to_owned(), json!(human_size(vol.capacity)));
        s.insert("sizeBytes".to_owned(), json!(vol.capacity));
        s.insert("mounts".to_owned(), json!(mounts));
        match self.backend.snapshots_of(&vol.id) {
            Ok(snaps) => {
                let names: Vec<String> = snaps.into_iter().map(|s| s.name).collect();
                s.insert("snapshots".to_owned(), json!(names));
            }
            Err(e) => tracing::debug!(error = %e, "cannot list snapshots"),
        }
        match self.backend.used_bytes(&vol.id) {
            Some(used) => {
                s.insert("usage".to_owned(), json!(human_size(used)));
                s.insert("usageBytes".to_owned(), json!(used));
            }
            None if mountpoint.is_empty() => {
                s.insert("usage".to_owned(), json!("unknown while not mounted"));
            }
            None => {}
        }
        s
    }

    fn list(&self) -> Vec<ListItem> {
        self.store
            .contents()
            .volumes
            .into_iter()
            .filter(|(_, e)| e.state == EntryState::Ready)
            .map(|(name, e)| ListItem {
                mountpoint: self.current_mountpoint(&e.volume_id),
                name,
            })
            .collect()
    }

    /// The mount point while the volume is staged there; empty otherwise.
    fn current_mountpoint(&self, volume_id: &str) -> String {
        match (self.mountpoint(volume_id), self.backend.staged_at(volume_id)) {
            (Ok(mp), Some(staged)) if staged == mp => path_string(&mp),
            _ => String::new(),
        }
    }

    /// Stages the volume at `mountpoint` unless it is staged there already.
    fn ensure_staged(&self, volume_id: &str, mountpoint: &Path) -> Result<()> {
        match self.backend.staged_at(volume_id) {
            Some(p) if p == mountpoint => Ok(()),
            Some(p) => Err(PluginError::Inconsistent {
                name: volume_id.to_owned(),
                why: format!("it is mounted at {} by another user of Berth", p.display()),
            }),
            None => {
                create_private_dir(&self.mounts_dir)?;
                self.backend.stage(volume_id, mountpoint)?;
                tracing::info!(mountpoint = %mountpoint.display(), "backend mounted");
                Ok(())
            }
        }
    }

    /// Unstages the volume if it is staged at its mount point, and removes the directory.
    fn release_backend(&self, volume_id: &str) -> Result<()> {
        let mountpoint = self.mountpoint(volume_id)?;
        if self.backend.staged_at(volume_id).as_deref() == Some(mountpoint.as_path()) {
            self.backend.unstage(volume_id, &mountpoint)?;
            tracing::info!(mountpoint = %mountpoint.display(), "backend unmounted");
        }
        match std::fs::remove_dir(&mountpoint) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PluginError::Io {
                op: "removing mount point",
                path: mountpoint,
                source,
            }),
        }
    }

    /// Start-up repair; logs what it cannot fix and goes on, so the plugin still serves.
    fn reconcile(&self) {
        let contents = self.store.contents();
        for (name, entry) in &contents.volumes {
            let _span = tracing::info_span!("docker_reconcile", volume = %name, volume_id = %entry.volume_id).entered();
            if let Err(e) = self.reconcile_one(name, entry) {
                tracing::error!(error = %e, "cannot reconcile a Docker volume; it is retried at the next start");
            }
        }
        // Mount counts of names the store no longer has (cannot happen through this API, but
        // a count without a volume must not pin anything).
        let names: HashSet<&String> = contents.volumes.keys().collect();
        for (name, id) in contents.mounts.keys() {
            if !names.contains(name)
                && let Err(e) = self.store.set_count(name, id, 0)
            {
                tracing::error!(volume = %name, error = %e, "cannot drop a stray mount count");
            }
        }
        self.remove_stray_mountpoints();
    }

    fn reconcile_one(&self, name: &str, entry: &Entry) -> Result<()> {
        match entry.state {
            EntryState::Creating => match self.backend.volume_by_name(name) {
                // The engine made it but the crash came before the answer: keep it (it shows
                // in `docker volume ls` and can be removed), never delete what may hold data.
                Some(v) => {
                    tracing::warn!(volume_id = %v.id, "adopting a volume whose create was interrupted");
                    self.store.put_entry(
                        name,
                        &Entry {
                            state: EntryState::Ready,
                            volume_id: v.id,
                        },
                    )?;
                }
                None => {
                    tracing::warn!("forgetting a create that made nothing");
                    self.store.delete_entry(name)?;
                }
            },
            EntryState::Removing => {
                tracing::warn!("finishing an interrupted remove");
                self.finish_remove(name, &entry.volume_id)?;
            }
            EntryState::Ready => {
                if self.backend.volume(&entry.volume_id)?.is_none() {
                    tracing::warn!("the engine volume is gone; forgetting the Docker volume");
                    self.store.delete_entry(name)?;
                    return Ok(());
                }
                let total = self.store.total_mounts(name);
                let mountpoint = self.mountpoint(&entry.volume_id)?;
                if total > 0 {
                    self.ensure_staged(&entry.volume_id, &mountpoint)?;
                } else {
                    self.release_backend(&entry.volume_id)?;
                }
            }
        }
        Ok(())
    }

    /// Removes empty directories under the mounts dir that no staged volume uses.
    fn remove_stray_mountpoints(&self) {
        let Ok(dir) = std::fs::read_dir(&self.mounts_dir) else {
            return;
        };
        for child in dir.flatten() {
            let path = child.path();
            let staged = child
                .file_name()
                .to_str()
                .and_then(VolumeId::parse)
                .and_then(|id| self.backend.staged_at(id.as_str()))
                .is_some_and(|p| p == path);
            if !staged && child.file_type().is_ok_and(|t| t.is_dir()) {
                // rmdir never removes data: it fails on a mount point or a non-empty directory.
                if let Err(e) = std::fs::remove_dir(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "stray directory in the mounts dir");
                }
            }
        }
    }
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| PluginError::Io {
            op: "creating directory",
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
#[path = "plugin_tests.rs"]
mod tests;

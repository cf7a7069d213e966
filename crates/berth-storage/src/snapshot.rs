//! Snapshots, group snapshots, restores and clones.
//!
//! A snapshot is as cheap as the pool allows: a read-only btrfs snapshot of a dir volume, a
//! reflinked copy of an fs or block image (a sparse-aware full copy where reflinks are not
//! possible), or a copy of a tmpfs tree into a subvolume of the default pool. A mounted fs
//! volume is frozen around its snapshot so the copy is crash-consistent; a group snapshot
//! freezes all its members first, snapshots them, then thaws them.
//!
//! Snapshots are independent of their source: deleting a volume keeps its snapshots usable.
//! A restore or clone is always the same kind (and filesystem) as its source, in the same pool,
//! and at least as large.

use std::collections::BTreeMap;
use std::path::PathBuf;

use berth_host::HostOps;

use crate::crash;
use crate::engine::{CreateRequestOrigin, Engine, EngineError, Result, invalid, lock};
use crate::id::{self, VolumeId};
use crate::journal::{ContentSource, GroupRecord, SnapshotRecord, VolumeRecord};
use crate::spec::{self, Kind};

/// Thaws a frozen filesystem when dropped, so every exit path thaws.
pub(crate) struct Frozen<'a> {
    host: &'a dyn HostOps,
    mounts: Vec<PathBuf>,
}

impl<'a> Frozen<'a> {
    /// Freezes each mount in order; on failure thaws what was frozen.
    pub(crate) fn freeze(host: &'a dyn HostOps, mounts: Vec<PathBuf>) -> Result<Frozen<'a>> {
        let mut frozen = Frozen {
            host,
            mounts: Vec::new(),
        };
        for m in mounts {
            host.freeze(&m)?;
            frozen.mounts.push(m);
        }
        Ok(frozen)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            if let Err(e) = self.host.thaw(m) {
                tracing::error!(mount = %m.display(), error = %e, "could not thaw a filesystem; thaw it by hand (fsfreeze -u)");
            }
        }
    }
}

impl Engine {
    /// The pool a dir/fs/block snapshot of `rec` lives in; tmpfs snapshots use the default pool.
    fn snapshot_pool_name(rec: &VolumeRecord) -> String {
        if rec.kind == Kind::Tmpfs {
            crate::engine::DEFAULT_POOL.to_owned()
        } else {
            rec.pool.clone()
        }
    }

    /// Where a restore or clone copies from.
    pub(crate) fn origin(&self, src: &ContentSource) -> Result<CreateRequestOrigin> {
        match src {
            ContentSource::Snapshot(sid) => {
                let snap = self.snapshot(sid).map_err(|e| match e {
                    EngineError::NotFound(m) => EngineError::NotFound(format!("volume_content_source: {m}")),
                    e => e,
                })?;
                let pool = self.pool(&snap.pool)?;
                let path = match snap.kind {
                    Kind::Fs | Kind::Block => pool.snapshot_image_path(&snap.id),
                    Kind::Dir | Kind::Tmpfs => pool.snapshot_subvolume_path(&snap.id),
                };
                Ok(CreateRequestOrigin {
                    kind: snap.kind,
                    fs: snap.fs,
                    pool: if snap.kind == Kind::Tmpfs {
                        String::new()
                    } else {
                        snap.pool
                    },
                    size: snap.size,
                    path,
                    freeze: None,
                })
            }
            ContentSource::Volume(vid) => {
                let vol = self.volume(vid).map_err(|e| match e {
                    EngineError::NotFound(m) => EngineError::NotFound(format!("volume_content_source: {m}")),
                    e => e,
                })?;
                Ok(CreateRequestOrigin {
                    kind: vol.kind,
                    fs: vol.fs,
                    pool: vol.pool.clone(),
                    size: vol.capacity,
                    path: self.backend_path(&vol)?,
                    freeze: self.freeze_point(&vol),
                })
            }
        }
    }

    /// The subvolume, image or tmpfs directory holding a volume's data.
    pub(crate) fn backend_path(&self, vol: &VolumeRecord) -> Result<PathBuf> {
        Ok(match vol.kind {
            Kind::Dir => self.pool(&vol.pool)?.subvolume_path(&vol.id),
            Kind::Fs | Kind::Block => self.pool(&vol.pool)?.image_path(&vol.id),
            Kind::Tmpfs => self.tmpfs_path(&vol.id),
        })
    }

    /// The mount to freeze for a consistent copy of a volume: a staged fs volume's filesystem.
    fn freeze_point(&self, vol: &VolumeRecord) -> Option<PathBuf> {
        let staged = lock(&self.state).records.stages.contains_key(&vol.id);
        (vol.kind == Kind::Fs && staged).then(|| self.staged_path(&vol.id))
    }

    /// Makes a volume's backend as a copy of `origin`; returns a dir volume's subvolume id.
    pub(crate) fn make_from(
        &self,
        id: &VolumeId,
        spec: &spec::VolumeSpec,
        origin: &CreateRequestOrigin,
    ) -> Result<Option<u64>> {
        match spec.kind {
            Kind::Dir => {
                let pool = self.pool(&spec.pool)?;
                let sub = self
                    .host
                    .btrfs_snapshot(&origin.path, &pool.volumes_dir(), id.as_str(), false)?;
                self.limit_new_subvolume(pool, id, sub, spec.capacity)?;
                Ok(Some(sub))
            }
            Kind::Fs | Kind::Block => {
                let pool = self.pool(&spec.pool)?;
                let image = pool.image_path(id);
                {
                    let _frozen = Frozen::freeze(self.host.as_ref(), origin.freeze.iter().cloned().collect())?;
                    let method = self.host.clone_file(&origin.path, &image)?;
                    tracing::info!(?method, "copied the source image");
                }
                self.host.grow_image(&image, spec.capacity)?;
                Ok(None)
            }
            Kind::Tmpfs => {
                self.mount_tmpfs(id, spec.capacity)?;
                self.host.copy_tree(&origin.path, &self.tmpfs_path(id))?;
                Ok(None)
            }
        }
    }

    /// Looks up a snapshot by a client-supplied id.
    pub fn snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        id::check_client_id(id).map_err(|e| invalid("snapshot_id", e.to_string()))?;
        VolumeId::parse(id)
            .and_then(|id| lock(&self.state).records.snapshots.get(&id).cloned())
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {id} does not exist")))
    }

    /// CreateSnapshot: idempotent by name.
    pub fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: &BTreeMap<String, String>,
    ) -> Result<SnapshotRecord> {
        id::check_name(name).map_err(|e| invalid("name", e.to_string()))?;
        if source_volume_id.is_empty() {
            return Err(invalid("source_volume_id", "is required"));
        }
        check_snapshot_parameters(parameters)?;
        let _name_busy = self.wait_busy(&format!("snapshot:{name}"));
        let existing = lock(&self.state)
            .records
            .snapshots
            .values()
            .find(|s| s.name == name)
            .cloned();
        if let Some(snap) = existing {
            if snap.source_volume_id.as_str() != source_volume_id {
                return Err(EngineError::AlreadyExists(format!(
                    "snapshot {name:?} already exists ({}) of volume {}, not {source_volume_id}",
                    snap.id, snap.source_volume_id
                )));
            }
            return Ok(snap);
        }
        let vol = self.volume(source_volume_id)?;
        let _busy = self.try_busy(source_volume_id)?;
        let _frozen = Frozen::freeze(self.host.as_ref(), self.freeze_point(&vol).into_iter().collect())?;
        let snap = self.snapshot_backend(&vol, name, None)?;
        drop(_frozen);
        crash::point("create_snapshot.after_backend");
        self.journal.put_snapshot(&snap)?;
        lock(&self.state)
            .records
            .snapshots
            .insert(snap.id.clone(), snap.clone());
        tracing::info!(snapshot_id = %snap.id, volume_id = %vol.id, "snapshot created");
        Ok(snap)
    }

    /// Copies a volume into a new snapshot backend (the caller freezes and records).
    fn snapshot_backend(&self, vol: &VolumeRecord, name: &str, group: Option<&VolumeId>) -> Result<SnapshotRecord> {
        let sid = VolumeId::generate().map_err(|e| EngineError::Aborted(format!("no randomness: {e}")))?;
        let pool_name = Self::snapshot_pool_name(vol);
        let pool = self.pool(&pool_name)?;
        let started = std::time::Instant::now();
        let subvolume_id = match vol.kind {
            Kind::Dir => Some(self.host.btrfs_snapshot(
                &pool.subvolume_path(&vol.id),
                &pool.snapshots_dir(),
                sid.as_str(),
                true,
            )?),
            Kind::Fs | Kind::Block => {
                let method = self
                    .host
                    .clone_file(&pool.image_path(&vol.id), &pool.snapshot_image_path(&sid))?;
                tracing::info!(?method, "snapshot image copied");
                None
            }
            Kind::Tmpfs => {
                let sub = self.host.btrfs_subvolume_create(&pool.snapshots_dir(), sid.as_str())?;
                self.host
                    .copy_tree(&self.tmpfs_path(&vol.id), &pool.snapshot_subvolume_path(&sid))?;
                Some(sub)
            }
        };
        tracing::debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "snapshot backend made"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(SnapshotRecord {
            id: sid,
            name: name.to_owned(),
            source_volume_id: vol.id.clone(),
            kind: vol.kind,
            pool: pool_name,
            fs: vol.fs,
            size: vol.capacity,
            subvolume_id,
            created_unix: now.as_secs(),
            created_nanos: now.subsec_nanos(),
            group_id: group.cloned(),
        })
    }

    /// DeleteSnapshot: an unknown id is success; a member of a group snapshot is refused.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        id::check_client_id(id).map_err(|e| invalid("snapshot_id", e.to_string()))?;
        let Some(sid) = VolumeId::parse(id) else { return Ok(()) };
        let _busy = self.try_busy(&format!("snapshot-id:{id}"))?;
        let Some(snap) = lock(&self.state).records.snapshots.get(&sid).cloned() else {
            return Ok(());
        };
        if let Some(g) = &snap.group_id
            && lock(&self.state).records.groups.contains_key(g)
        {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {id} belongs to group snapshot {g}; delete the group snapshot"
            )));
        }
        self.remove_snapshot(&snap)
    }

    fn remove_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        let pool = self.pool(&snap.pool)?;
        let mut retire = None;
        match snap.kind {
            Kind::Dir | Kind::Tmpfs => {
                self.host
                    .btrfs_subvolume_delete(&pool.snapshots_dir(), snap.id.as_str())?;
                if let Some(sub) = snap.subvolume_id
                    && self.host.btrfs_qgroup_destroy(&pool.root, sub).is_err()
                {
                    retire = Some((pool.name.as_str(), sub));
                }
            }
            Kind::Fs | Kind::Block => self.host.remove_file(&pool.snapshot_image_path(&snap.id))?,
        }
        self.journal.delete_snapshot(&snap.id, retire)?;
        let mut state = lock(&self.state);
        state.records.snapshots.remove(&snap.id);
        if let Some((p, sub)) = retire {
            state.records.retired_qgroups.push((p.to_owned(), sub));
        }
        tracing::info!(snapshot_id = %snap.id, "snapshot deleted");
        Ok(())
    }

    /// Snapshots in id order, filtered, after `start_after`, at most `max` (0 = all).
    pub fn list_snapshots(
        &self,
        snapshot_id: &str,
        source_volume_id: &str,
        start_after: &str,
        max: usize,
    ) -> Result<(Vec<SnapshotRecord>, Option<String>)> {
        let after =
            match start_after {
                "" => None,
                t => Some(VolumeId::parse(t).ok_or_else(|| {
                    EngineError::Aborted(format!("starting_token {t:?} was not issued by this driver"))
                })?),
            };
        let state = lock(&self.state);
        let mut out: Vec<SnapshotRecord> = state
            .records
            .snapshots
            .values()
            .filter(|s| snapshot_id.is_empty() || s.id.as_str() == snapshot_id)
            .filter(|s| source_volume_id.is_empty() || s.source_volume_id.as_str() == source_volume_id)
            .filter(|s| after.as_ref().is_none_or(|a| &s.id > a))
            .take(if max == 0 { usize::MAX } else { max + 1 })
            .cloned()
            .collect();
        let next = if max != 0 && out.len() > max {
            out.truncate(max);
            out.last().map(|s| s.id.to_string())
        } else {
            None
        };
        Ok((out, next))
    }

    /// CreateVolumeGroupSnapshot: freezes every member, snapshots each, thaws; idempotent by name.
    pub fn create_group_snapshot(
        &self,
        name: &str,
        source_volume_ids: &[String],
        parameters: &BTreeMap<String, String>,
    ) -> Result<(GroupRecord, Vec<SnapshotRecord>)> {
        id::check_name(name).map_err(|e| invalid("name", e.to_string()))?;
        if source_volume_ids.is_empty() {
            return Err(invalid("source_volume_ids", "at least one volume is required"));
        }
        check_snapshot_parameters(parameters)?;
        let _name_busy = self.wait_busy(&format!("group:{name}"));
        let mut wanted: Vec<&str> = source_volume_ids.iter().map(String::as_str).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let existing = lock(&self.state)
            .records
            .groups
            .values()
            .find(|g| g.name == name)
            .cloned();
        if let Some(group) = existing {
            let members = self.group_members(&group);
            let mut have: Vec<&str> = members.iter().map(|s| s.source_volume_id.as_str()).collect();
            have.sort_unstable();
            if have != wanted {
                return Err(EngineError::AlreadyExists(format!(
                    "group snapshot {name:?} already exists ({}) of other volumes",
                    group.id
                )));
            }
            return Ok((group, members));
        }
        let vols: Vec<VolumeRecord> = wanted.iter().map(|v| self.volume(v)).collect::<Result<_>>()?;
        let _busy: Vec<_> = wanted.iter().map(|v| self.try_busy(v)).collect::<Result<_>>()?;
        let gid = VolumeId::generate().map_err(|e| EngineError::Aborted(format!("no randomness: {e}")))?;
        let mut members = Vec::new();
        {
            let _frozen = Frozen::freeze(
                self.host.as_ref(),
                vols.iter().filter_map(|v| self.freeze_point(v)).collect(),
            )?;
            for v in &vols {
                members.push(self.snapshot_backend(v, &format!("{gid}-{}", v.id), Some(&gid))?);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let group = GroupRecord {
            id: gid,
            name: name.to_owned(),
            snapshot_ids: members.iter().map(|m| m.id.clone()).collect(),
            created_unix: now.as_secs(),
            created_nanos: now.subsec_nanos(),
        };
        self.journal.put_group(&group, &members)?;
        let mut state = lock(&self.state);
        for m in &members {
            state.records.snapshots.insert(m.id.clone(), m.clone());
        }
        state.records.groups.insert(group.id.clone(), group.clone());
        tracing::info!(group_snapshot_id = %group.id, members = members.len(), "group snapshot created");
        Ok((group, members))
    }

    fn group_members(&self, group: &GroupRecord) -> Vec<SnapshotRecord> {
        let state = lock(&self.state);
        group
            .snapshot_ids
            .iter()
            .filter_map(|s| state.records.snapshots.get(s).cloned())
            .collect()
    }

    /// GetVolumeGroupSnapshot.
    pub fn group_snapshot(&self, id: &str) -> Result<(GroupRecord, Vec<SnapshotRecord>)> {
        id::check_client_id(id).map_err(|e| invalid("group_snapshot_id", e.to_string()))?;
        let group = VolumeId::parse(id)
            .and_then(|g| lock(&self.state).records.groups.get(&g).cloned())
            .ok_or_else(|| EngineError::NotFound(format!("group snapshot {id} does not exist")))?;
        let members = self.group_members(&group);
        Ok((group, members))
    }

    /// DeleteVolumeGroupSnapshot: deletes the members, then the group; unknown id is success.
    pub fn delete_group_snapshot(&self, id: &str) -> Result<()> {
        id::check_client_id(id).map_err(|e| invalid("group_snapshot_id", e.to_string()))?;
        let Some(gid) = VolumeId::parse(id) else { return Ok(()) };
        let _busy = self.try_busy(&format!("group-id:{id}"))?;
        let Some(group) = lock(&self.state).records.groups.get(&gid).cloned() else {
            return Ok(());
        };
        for m in self.group_members(&group) {
            self.remove_snapshot(&m)?;
        }
        self.journal.delete_group(&gid)?;
        lock(&self.state).records.groups.remove(&gid);
        Ok(())
    }
}

/// Snapshot parameters: only the ones a CO adds (`csi.storage.k8s.io/…`) are accepted.
fn check_snapshot_parameters(parameters: &BTreeMap<String, String>) -> Result<()> {
    for k in parameters.keys() {
        if !k.starts_with(spec::CO_PREFIX) {
            return Err(invalid(
                &format!("parameters.{k}"),
                "unknown snapshot parameter; Berth snapshots take none (csi.storage.k8s.io/* keys are accepted)",
            ));
        }
    }
    Ok(())
}

//! Start-up reconciliation: make the kernel agree with the journal.
//!
//! A crash can leave a kernel object without a record (it was made, the record was not yet
//! committed) or a record without its kernel object (a reboot drops mounts and loop devices).
//! At start Berth
//! 1. finishes deletions that were marked but not done;
//! 2. removes subvolumes, images, tmpfs mounts and private mounts no record owns, and the spare
//!    subvolumes an earlier run left (a spare is made again rather than trusted half-made);
//! 3. unmounts mounts of Berth's volumes that no stage or publish record owns (a crash between
//!    mount and commit: the client saw an error and will retry);
//! 4. re-makes recorded stages and publishes whose mounts are gone (after a reboot), and drops
//!    records whose paths vanished;
//! 5. detaches loop devices of Berth's images that no stage needs;
//! 6. destroys qgroups of deleted subvolumes the kernel could not drop before.
//!
//! Every step is idempotent, so a crash during reconciliation is repaired by the next start.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::engine::{Engine, Result};
use crate::id::VolumeId;
use crate::journal::VolumeState;
use crate::spec::Kind;

/// Says whether a record owns the private directory of a volume id.
type Owner<'a> = dyn Fn(&VolumeId) -> bool + 'a;

impl Engine {
    pub(crate) fn reconcile(&self) -> Result<()> {
        // 0. Forget stages and publishes whose paths are gone, so step 3 unmounts what they had.
        let records = self.records();
        for stage in records.stages.values() {
            if !self.host.exists(&stage.staging_path)? {
                tracing::warn!(volume_id = %stage.volume_id, path = %stage.staging_path.display(), "staging path is gone; forgetting the stage");
                self.forget_stage(&stage.volume_id)?;
            }
        }
        let records = self.records();
        for p in records.publishes.values() {
            let parent_gone = match p.target_path.parent() {
                Some(parent) => !self.host.exists(parent)?,
                None => true,
            };
            if parent_gone || !records.stages.contains_key(&p.volume_id) {
                tracing::warn!(volume_id = %p.volume_id, target = %p.target_path.display(), "publish target is gone; forgetting it");
                self.journal.delete_publish(&p.volume_id, &p.target_path)?;
                self.forget_publish(&p.volume_id, &p.target_path);
            }
        }

        // 1. Finish deletions.
        for rec in records.volumes.values().filter(|v| v.state == VolumeState::Deleting) {
            tracing::info!(volume_id = %rec.id, "finishing an interrupted delete");
            self.finish_delete(rec)?;
        }
        let records = self.records();
        let live = |id: &str| VolumeId::parse(id).is_some_and(|id| records.volumes.contains_key(&id));

        // 3 (first, while private mounts still tell whose device a bind shows). Mounts of our
        // volumes that no record owns.
        self.unmount_unrecorded()?;

        // 2. Orphaned backends.
        for pool in self.pools.values() {
            for name in self.host.list_dir(&pool.volumes_dir())? {
                if !live(&name) {
                    tracing::warn!(pool = %pool.name, subvolume = %name, "removing a subvolume no record owns");
                    let sub = self.host.btrfs_subvolume_id(&pool.volumes_dir().join(&name)).ok();
                    self.remove_subvolume(pool, &pool.volumes_dir(), &name, sub)?;
                }
            }
            // The refill thread has not started yet, so every spare here is an earlier run's.
            for name in self.host.list_dir(&pool.spares_dir())? {
                tracing::info!(pool = %pool.name, subvolume = %name, "removing a spare subvolume an earlier run left");
                let sub = self.host.btrfs_subvolume_id(&pool.spares_dir().join(&name)).ok();
                self.remove_subvolume(pool, &pool.spares_dir(), &name, sub)?;
            }
            let snapshot_live = |id: &str| VolumeId::parse(id).is_some_and(|id| records.snapshots.contains_key(&id));
            for name in self.host.list_dir(&pool.snapshots_dir())? {
                if let Some(id) = name.strip_suffix(".img") {
                    if !snapshot_live(id) {
                        tracing::warn!(pool = %pool.name, image = %name, "removing a snapshot image no record owns");
                        self.host.remove_file(&pool.snapshots_dir().join(&name))?;
                    }
                } else if !snapshot_live(&name) {
                    tracing::warn!(pool = %pool.name, subvolume = %name, "removing a snapshot no record owns");
                    let sub = self.host.btrfs_subvolume_id(&pool.snapshots_dir().join(&name)).ok();
                    self.remove_subvolume(pool, &pool.snapshots_dir(), &name, sub)?;
                }
            }
            let loops = self.host.loop_devices()?;
            for name in self.host.list_dir(&pool.images_dir())? {
                let id = name.strip_suffix(".img").unwrap_or(&name);
                if !live(id) {
                    tracing::warn!(pool = %pool.name, image = %name, "removing an image no record owns");
                    let path = pool.images_dir().join(&name);
                    for m in self.host.mountinfo()? {
                        if loops
                            .iter()
                            .any(|l| l.backing_file == path && m.source == l.device.to_string_lossy())
                        {
                            self.host.unmount(&m.mount_point)?;
                        }
                    }
                    for l in loops.iter().filter(|l| l.backing_file == path) {
                        self.host.loop_detach(l)?;
                    }
                    self.host.remove_file(&path)?;
                }
            }
        }
        let owned_tmpfs = |id: &VolumeId| records.volumes.get(id).is_some_and(|v| v.kind == Kind::Tmpfs);
        let owned_staged = |id: &VolumeId| records.stages.contains_key(id);
        let private: [(&str, &Owner); 2] = [("tmpfs", &owned_tmpfs), ("staged", &owned_staged)];
        for (dir, owned) in private {
            let base = self.cfg.data_dir.join(dir);
            for name in self.host.list_dir(&base)? {
                if !VolumeId::parse(&name).is_some_and(|id| owned(&id)) {
                    tracing::warn!(path = %base.join(&name).display(), "removing a mount no record owns");
                    while self.host.unmount(&base.join(&name))? == berth_host::Unmounted::Removed {}
                    self.host.remove_dir(&base.join(&name))?;
                }
            }
        }

        // 4. Re-make recorded state that the kernel lost.
        let records = self.records();
        for rec in records.volumes.values() {
            if rec.kind == Kind::Tmpfs && !self.mounted_at(&self.tmpfs_path(&rec.id))? {
                tracing::warn!(volume_id = %rec.id, "tmpfs volume was not mounted (reboot?); mounting it empty");
                self.reestablish_tmpfs(rec)?;
            }
        }
        for stage in records.stages.values() {
            let Some(rec) = records.volumes.get(&stage.volume_id) else {
                continue;
            };
            if let Err(e) = self.establish_stage(rec, &stage.staging_path, &stage.capability) {
                tracing::error!(volume_id = %rec.id, error = %e, "could not re-stage a volume");
            }
        }
        for p in records.publishes.values() {
            let Some(rec) = records.volumes.get(&p.volume_id) else {
                continue;
            };
            if let Err(e) = self.establish_publish(rec, &p.target_path, &p.capability, p.read_only) {
                tracing::error!(volume_id = %rec.id, error = %e, "could not re-publish a volume");
            }
        }

        // 5. Loop devices no stage needs.
        let records = self.records();
        let needed: HashSet<PathBuf> = records
            .stages
            .keys()
            .filter_map(|id| records.volumes.get(id))
            .filter(|v| matches!(v.kind, Kind::Fs | Kind::Block))
            .filter_map(|v| self.pools.get(&v.pool).map(|p| p.image_path(&v.id)))
            .collect();
        for l in self.host.loop_devices()? {
            let ours = self.pools.values().any(|p| l.backing_file.starts_with(p.images_dir()));
            if ours && !needed.contains(&l.backing_file) {
                tracing::warn!(device = %l.device.display(), "detaching a loop device no stage needs");
                self.host.loop_detach(&l)?;
            }
        }

        // 6. Qgroups of deleted subvolumes.
        self.reap_retired_qgroups()
    }

    fn reestablish_tmpfs(&self, rec: &crate::journal::VolumeRecord) -> Result<()> {
        let path = self.tmpfs_path(&rec.id);
        self.host.create_dir_all(&path, 0o700)?;
        self.host.mount(&berth_host::MountRequest {
            source: berth_host::MountSource::Tmpfs,
            target: path,
            read_only: false,
            options: vec![format!("size={}", rec.capacity), "mode=0755".into()],
        })?;
        Ok(())
    }

    /// Unmounts every mount that shows one of Berth's volumes but is not a recorded stage,
    /// publish or private mount.
    fn unmount_unrecorded(&self) -> Result<()> {
        let records = self.records();
        let mut expected: HashSet<PathBuf> = HashSet::new();
        for pool in self.pools.values() {
            expected.insert(pool.root.clone());
        }
        for v in records.volumes.values() {
            if v.kind == Kind::Tmpfs {
                expected.insert(self.tmpfs_path(&v.id));
            }
        }
        for s in records.stages.values() {
            expected.insert(s.staging_path.clone());
            expected.insert(self.staged_path(&s.volume_id));
        }
        for (_, target) in records.publishes.keys() {
            expected.insert(target.clone());
        }
        let mounts = self.host.mountinfo()?;
        let loops = self.host.loop_devices()?;
        // Devices of our pools (dir volumes are binds of a subvolume of them), of our images'
        // loop devices, and of our tmpfs volumes.
        let mut pool_devs = HashSet::new();
        let mut volume_devs = HashSet::new();
        for m in &mounts {
            let dev = (m.major, m.minor);
            if self
                .pools
                .values()
                .any(|p| p.root.starts_with(&m.mount_point) && m.mount_point != std::path::Path::new("/"))
            {
                pool_devs.insert(dev);
            }
            if m.mount_point.starts_with(self.cfg.data_dir.join("tmpfs")) {
                volume_devs.insert(dev);
            }
            let from_our_image = loops.iter().any(|l| {
                self.pools.values().any(|p| l.backing_file.starts_with(p.images_dir()))
                    && m.source == l.device.to_string_lossy()
            });
            if from_our_image {
                volume_devs.insert(dev);
            }
        }
        let our_loop_names: HashSet<String> = loops
            .iter()
            .filter(|l| self.pools.values().any(|p| l.backing_file.starts_with(p.images_dir())))
            .filter_map(|l| l.device.file_name().map(|n| format!("/{}", n.to_string_lossy())))
            .collect();
        let mut stray: Vec<PathBuf> = mounts
            .iter()
            .filter(|m| !expected.contains(&m.mount_point))
            .filter(|m| {
                let dev = (m.major, m.minor);
                (pool_devs.contains(&dev) && is_volume_root(&m.root))
                    || volume_devs.contains(&dev)
                    || (m.fs_type == "devtmpfs" && our_loop_names.contains(&m.root.to_string_lossy().into_owned()))
            })
            .map(|m| m.mount_point.clone())
            .collect();
        // Children before parents.
        stray.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        stray.dedup();
        for path in stray {
            tracing::warn!(path = %path.display(), "unmounting a volume mount no record owns");
            while self.host.unmount(&path)? == berth_host::Unmounted::Removed {}
        }
        Ok(())
    }
}

/// Whether a mount's root inside its filesystem is a dir volume (`…/volumes/<id>`).
fn is_volume_root(root: &std::path::Path) -> bool {
    let id = root.file_name().and_then(|n| n.to_str()).and_then(VolumeId::parse);
    let parent = root.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str());
    id.is_some() && parent == Some("volumes")
}

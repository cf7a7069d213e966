//! Expansion and modification of existing volumes.
//!
//! ControllerExpandVolume grows the quota (dir), the image file and its loop device (fs,
//! block), or the tmpfs size; an fs volume's filesystem then grows online in NodeExpandVolume,
//! or at its next stage if it was not staged. Shrinking is never done: a request at or below
//! the current size is answered with the current size. ControllerModifyVolume applies the
//! kind's mutable parameters (see `spec::check_mutable`) and leaves the volume unchanged when
//! any of them is invalid.

use std::collections::BTreeMap;
use std::path::Path;

use crate::engine::{Engine, EngineError, Result, lock};
use crate::journal::VolumeRecord;
use crate::spec::{self, CapacityRange, Kind};

impl Engine {
    /// ControllerExpandVolume: returns the capacity and whether the node must grow the fs.
    pub fn controller_expand(&self, volume_id: &str, range: CapacityRange) -> Result<(u64, bool)> {
        let mut rec = self.volume(volume_id)?;
        let node_step = rec.kind == Kind::Fs;
        let new = spec::size_for(rec.kind, None, range)?;
        if new <= rec.capacity {
            return Ok((rec.capacity, node_step));
        }
        let _busy = self.try_busy(volume_id)?;
        let _span =
            tracing::info_span!("controller_expand", volume_id = %rec.id, from = rec.capacity, to = new).entered();
        let grow = new - rec.capacity;
        match rec.kind {
            Kind::Dir => {
                let pool = self.pool(&rec.pool)?;
                let sub = rec.subvolume_id.ok_or_else(|| {
                    EngineError::FailedPrecondition(format!("volume {volume_id} has no subvolume id on record"))
                })?;
                self.host.btrfs_qgroup_limit(&pool.root, sub, Some(new))?;
            }
            Kind::Fs | Kind::Block => {
                let pool = self.pool(&rec.pool)?;
                let avail = pool.stats(self.host.as_ref())?.available_bytes;
                if grow > avail {
                    return Err(EngineError::ResourceExhausted(format!(
                        "pool {:?} has {avail} bytes free; growing volume {volume_id} needs {grow}",
                        pool.name
                    )));
                }
                self.host.grow_image(&pool.image_path(&rec.id), new)?;
                if let Some(dev) = self.loop_device_of(&rec)? {
                    self.host.loop_set_capacity(&dev)?;
                }
                if rec.kind == Kind::Fs && self.staging_path(&rec.id).is_none() {
                    rec.grow_fs_on_stage = true;
                }
            }
            Kind::Tmpfs => {
                let (free, _) = self.capacity(Kind::Tmpfs, None)?;
                if grow > free {
                    return Err(EngineError::ResourceExhausted(format!(
                        "tmpfs memory budget has {free} bytes left; growing volume {volume_id} needs {grow}"
                    )));
                }
                self.host
                    .reconfigure(&self.tmpfs_path(&rec.id), &[format!("size={new}")])?;
            }
        }
        rec.capacity = new;
        self.save_volume(&rec)?;
        tracing::info!("volume expanded");
        Ok((new, node_step))
    }

    /// NodeExpandVolume: grows a staged fs volume's filesystem to its image size.
    pub fn node_expand(&self, volume_id: &str, volume_path: &Path) -> Result<u64> {
        let mut rec = self.volume(volume_id)?;
        if !self.is_volume_path(&rec, volume_path) {
            return Err(EngineError::NotFound(format!(
                "volume {volume_id} is not staged or published at {}",
                volume_path.display()
            )));
        }
        if rec.kind == Kind::Fs {
            let _busy = self.try_busy(volume_id)?;
            let fs = rec.fs.unwrap_or(berth_host::FileSystem::Ext4);
            if !self.host.can_grow_online(fs) {
                // The image and loop device already have the new size; the filesystem grows
                // offline at the next stage.
                if !rec.grow_fs_on_stage {
                    rec.grow_fs_on_stage = true;
                    self.save_volume(&rec)?;
                }
                return Err(EngineError::FailedPrecondition(format!(
                    "this host does not allow growing a mounted {} filesystem (it lacks CAP_SYS_RESOURCE); \
                     volume {volume_id} grows when it is next staged: unstage and stage it, or use xfs or btrfs",
                    fs.as_str()
                )));
            }
            self.grow_fs(&rec)?;
            if rec.grow_fs_on_stage {
                rec.grow_fs_on_stage = false;
                self.save_volume(&rec)?;
            }
        }
        Ok(rec.capacity)
    }

    /// Grows the mounted filesystem of a staged fs volume to fill its loop device.
    pub(crate) fn grow_fs(&self, rec: &VolumeRecord) -> Result<()> {
        let dev = self
            .loop_device_of(rec)?
            .ok_or_else(|| EngineError::FailedPrecondition(format!("volume {} is not staged on this node", rec.id)))?;
        let fs = rec.fs.unwrap_or(berth_host::FileSystem::Ext4);
        self.host.grow_filesystem(fs, &dev, &self.staged_path(&rec.id))?;
        Ok(())
    }

    pub(crate) fn is_volume_path(&self, rec: &VolumeRecord, path: &Path) -> bool {
        let state = lock(&self.state);
        state
            .records
            .stages
            .get(&rec.id)
            .is_some_and(|s| s.staging_path == path)
            || state.records.publishes.contains_key(&(rec.id.clone(), path.to_owned()))
    }

    /// Commits a changed volume record and updates memory.
    pub(crate) fn save_volume(&self, rec: &VolumeRecord) -> Result<()> {
        self.journal.put_volume(rec)?;
        lock(&self.state).records.volumes.insert(rec.id.clone(), rec.clone());
        Ok(())
    }

    /// ControllerModifyVolume.
    pub fn modify(&self, volume_id: &str, mutable: &BTreeMap<String, String>) -> Result<()> {
        let mut rec = self.volume(volume_id)?;
        spec::check_mutable(rec.kind, mutable)?;
        let _busy = self.try_busy(volume_id)?;
        self.apply_mutable(&rec, mutable)?;
        rec.mutable.extend(mutable.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.save_volume(&rec)
    }

    /// Applies mutable parameters to the kernel objects that exist now. Values were checked.
    pub(crate) fn apply_mutable(&self, rec: &VolumeRecord, mutable: &BTreeMap<String, String>) -> Result<()> {
        for (k, v) in mutable {
            match (rec.kind, k.as_str()) {
                (Kind::Dir, "compression") => {
                    let path = self.pool(&rec.pool)?.subvolume_path(&rec.id);
                    // btrfs compresses only copy-on-write files, and refuses NOCOW while the
                    // property is set: clear one before setting the other. `none` resets the
                    // property (empty value) and restores the NOCOW default for new files.
                    if v == "none" {
                        self.host.set_xattr(&path, "btrfs.compression", b"")?;
                        self.host.set_nocow(&path, true)?;
                    } else {
                        self.host.set_nocow(&path, false)?;
                        self.host.set_xattr(&path, "btrfs.compression", v.as_bytes())?;
                    }
                }
                (Kind::Block, "readOnly") => {
                    if let Some(dev) = self.loop_device_of(rec)? {
                        self.host.set_block_read_only(&dev, v == "true")?;
                    }
                }
                (Kind::Fs, "readOnly") if self.staging_path(&rec.id).is_some() => {
                    let flag = if v == "true" { "ro" } else { "rw" };
                    self.host.reconfigure(&self.staged_path(&rec.id), &[flag.to_owned()])?;
                }
                (Kind::Tmpfs, "inodeLimit") => {
                    self.host
                        .reconfigure(&self.tmpfs_path(&rec.id), &[format!("nr_inodes={v}")])?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

//! Storage pools: where dir, fs and block volumes live.
//!
//! A pool is a btrfs filesystem with quotas (qgroups) enabled. If the pool's path already is
//! btrfs, Berth uses it as it is. Otherwise Berth makes one: `PATH/pool.img`, preallocated,
//! formatted btrfs, attached to a loop device with direct I/O and mounted at `PATH/fs`. Opening
//! a pool is idempotent: after a crash or a reboot it re-attaches and re-mounts the same image,
//! and it never formats an image that already holds anything.

use std::path::{Path, PathBuf};

use berth_host::{FileSystem, FsStats, HostError, HostOps, LoopOptions, MountRequest, MountSource, magic};

use crate::id::VolumeId;

/// Largest pool image Berth makes on its own.
const MAX_AUTO_SIZE: u64 = 100 << 30;
/// Smallest pool image worth making.
const MIN_SIZE: u64 = 256 << 20;

/// Why a pool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool {pool:?}: {source}")]
    Host {
        pool: String,
        #[source]
        source: HostError,
    },
    #[error("pool {pool:?}: {message}")]
    Unusable { pool: String, message: String },
}

/// One opened pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// The btrfs directory holding `volumes/`, `images/`, `snapshots/` and `spares/`.
    pub root: PathBuf,
    /// The image file backing the pool, when Berth made the filesystem.
    pub image: Option<PathBuf>,
}

impl Pool {
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Empty subvolumes made ahead of dir CreateVolume calls (see `spares.rs`).
    pub fn spares_dir(&self) -> PathBuf {
        self.root.join("spares")
    }

    /// The read-only subvolume of a dir or tmpfs snapshot.
    pub fn snapshot_subvolume_path(&self, id: &VolumeId) -> PathBuf {
        self.snapshots_dir().join(id.as_str())
    }

    /// The image of an fs or block snapshot.
    pub fn snapshot_image_path(&self, id: &VolumeId) -> PathBuf {
        self.snapshots_dir().join(format!("{id}.img"))
    }

    /// The subvolume of a dir volume.
    pub fn subvolume_path(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir().join(id.as_str())
    }

    /// The image file of an fs or block volume.
    pub fn image_path(&self, id: &VolumeId) -> PathBuf {
        self.images_dir().join(format!("{id}.img"))
    }

    /// Opens the pool at `path`, creating its filesystem if needed (see the module doc).
    /// `image_size` sizes a new pool image; by default half the free space, at most 100 GiB.
    pub fn open(host: &dyn HostOps, name: &str, path: &Path, image_size: Option<u64>) -> Result<Pool, PoolError> {
        let h = |source| PoolError::Host {
            pool: name.to_owned(),
            source,
        };
        let unusable = |message: String| PoolError::Unusable {
            pool: name.to_owned(),
            message,
        };
        host.create_dir_all(path, 0o700).map_err(h)?;
        let image = path.join("pool.img");
        let fsroot = path.join("fs");
        let mounted = host.is_mount_point(&fsroot).map_err(h)?;

        let (root, image) = if mounted {
            (fsroot, Some(image))
        } else if host.exists(&image).map_err(h)? {
            mount_image(host, &image, &fsroot, false).map_err(h)?;
            (fsroot, Some(image))
        } else if host.statfs(path).map_err(h)?.fs_type == magic::BTRFS {
            (path.to_owned(), None)
        } else {
            let free = host.statfs(path).map_err(h)?.available_bytes;
            let size = image_size.unwrap_or((free / 2).min(MAX_AUTO_SIZE)) & !((1 << 20) - 1);
            if size < MIN_SIZE {
                return Err(unusable(format!(
                    "{} is not btrfs and a pool image needs at least {MIN_SIZE} bytes (asked {size}, {free} free)",
                    path.display()
                )));
            }
            tracing::info!(pool = name, image = %image.display(), size, "creating pool image");
            host.create_image(&image, size, false).map_err(h)?;
            mount_image(host, &image, &fsroot, true).map_err(h)?;
            (fsroot, Some(image))
        };

        if host.statfs(&root).map_err(h)?.fs_type != magic::BTRFS {
            return Err(unusable(format!(
                "{} is not a btrfs filesystem; Berth needs btrfs qgroups to enforce dir volume sizes",
                root.display()
            )));
        }
        host.btrfs_quota_enable(&root).map_err(h)?;
        let pool = Pool {
            name: name.to_owned(),
            root,
            image,
        };
        host.create_dir_all(&pool.volumes_dir(), 0o700).map_err(h)?;
        host.create_dir_all(&pool.images_dir(), 0o700).map_err(h)?;
        host.create_dir_all(&pool.snapshots_dir(), 0o700).map_err(h)?;
        host.create_dir_all(&pool.spares_dir(), 0o700).map_err(h)?;
        Ok(pool)
    }

    pub fn stats(&self, host: &dyn HostOps) -> Result<FsStats, HostError> {
        host.statfs(&self.root)
    }
}

/// Attaches (or finds) the loop device of a pool image and mounts it. Formats only an image
/// that holds no filesystem signature at all, which is what a crash right after creating it
/// leaves.
fn mount_image(host: &dyn HostOps, image: &Path, fsroot: &Path, fresh: bool) -> Result<(), HostError> {
    let device = match host.loop_device_for(image)? {
        Some(l) => l.device,
        None => {
            host.loop_attach(
                image,
                LoopOptions {
                    read_only: false,
                    direct_io: true,
                    autoclear: false,
                },
            )?
            .device
        }
    };
    match host.probe_filesystem(&device)? {
        Some(fs) if fs == "btrfs" => {}
        Some(other) => {
            return Err(HostError::WrongType {
                path: image.to_owned(),
                reason: format!("pool image holds {other}, not btrfs; refusing to touch it"),
            });
        }
        None => {
            if !fresh {
                tracing::warn!(image = %image.display(), "pool image holds no filesystem yet; formatting it");
            }
            host.mkfs(&device, FileSystem::Btrfs)?;
        }
    }
    host.create_dir_all(fsroot, 0o700)?;
    host.mount(&MountRequest {
        source: MountSource::Device {
            device,
            fs: FileSystem::Btrfs,
        },
        target: fsroot.to_owned(),
        read_only: false,
        options: vec!["noatime".into()],
    })
}

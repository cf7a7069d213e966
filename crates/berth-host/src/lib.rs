//! The only place in Berth that talks to the kernel.
//!
//! Everything the storage engine does to the host (mounts, loop devices, btrfs subvolumes,
//! snapshots and qgroups, image files and their clones, mkfs, online growth, freezing, statfs,
//! mountinfo) goes through the [`HostOps`] trait. The real
//! implementation is [`LinuxHost`]; [`fake::RecordingHost`] keeps an in-memory model of the same
//! state and records every call, so the engine's logic can be unit-tested without root.
//!
//! Guarantees every implementation keeps:
//! - Every mutating call is idempotent where the doc says so ("already gone" is success).
//! - Paths handed in by a container orchestrator (target paths) are never followed through a
//!   final symlink: mounts are made through file descriptors opened with `O_NOFOLLOW`.
//! - Errors carry the operation, the path and the OS error, so a caller can say what to do.

use std::path::{Path, PathBuf};

pub mod fake;
mod linux;
pub mod mountinfo;

pub use linux::LinuxHost;
pub use mountinfo::MountEntry;

pub type Result<T> = std::result::Result<T, HostError>;

/// What went wrong at the host boundary.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A path that must not be a symlink is one (it could point anywhere).
    #[error("{path} is a symbolic link; refusing to follow it")]
    Symlink { path: PathBuf },
    /// A path exists but is the wrong kind of file (directory where a file is needed, ...).
    #[error("{path}: {reason}")]
    WrongType { path: PathBuf, reason: String },
    /// An external program (mkfs, blkid) failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },
    /// The host lacks a feature (for example btrfs quotas are off and cannot be enabled).
    #[error("{0}")]
    Unsupported(String),
}

impl HostError {
    /// The raw OS error number, when the error came from a system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HostError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Builds an [`HostError::Io`] from an errno-carrying error.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: impl Into<std::io::Error>) -> Self {
        HostError::Io {
            op,
            path: path.into(),
            source: source.into(),
        }
    }
}

/// A filesystem Berth can create on an image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileSystem {
    Ext4,
    Xfs,
    Btrfs,
}

impl FileSystem {
    /// The kernel's name for it, as used by mount(2) and mkfs.
    pub fn as_str(self) -> &'static str {
        match self {
            FileSystem::Ext4 => "ext4",
            FileSystem::Xfs => "xfs",
            FileSystem::Btrfs => "btrfs",
        }
    }

    /// Parses a CSI `fs_type` / `csi.storage.k8s.io/fstype` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ext4" => Some(FileSystem::Ext4),
            "xfs" => Some(FileSystem::Xfs),
            "btrfs" => Some(FileSystem::Btrfs),
            _ => None,
        }
    }

    /// The smallest filesystem mkfs accepts (mkfs.xfs refuses anything under 300 MiB:
    /// 314,572,800 bytes works, 512 bytes less does not).
    pub fn min_size(self) -> u64 {
        match self {
            FileSystem::Ext4 => 1 << 20,
            FileSystem::Xfs => 300 << 20,
            FileSystem::Btrfs => 114 << 20,
        }
    }
}

/// Well-known `statfs.f_type` magic numbers.
pub mod magic {
    pub const BTRFS: u64 = 0x9123_683e;
    pub const EXT4: u64 = 0xef53;
    pub const XFS: u64 = 0x5846_5342;
    pub const TMPFS: u64 = 0x0102_1994;
}

/// What statfs(2) says about a mounted filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// `f_type`, compare with [`magic`].
    pub fs_type: u64,
    pub block_size: u64,
    pub total_bytes: u64,
    /// Free bytes available to unprivileged users (`f_bavail`).
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

/// Usage and limit of one btrfs qgroup (level 0: one subvolume).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QgroupInfo {
    pub subvolume_id: u64,
    pub referenced_bytes: u64,
    pub exclusive_bytes: u64,
    /// `max_rfer`, `None` when unlimited.
    pub max_referenced: Option<u64>,
}

/// How to attach a loop device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopOptions {
    pub read_only: bool,
    /// `LO_FLAGS_DIRECT_IO`: no double caching of the image file in the page cache.
    pub direct_io: bool,
    /// `LO_FLAGS_AUTOCLEAR`: the kernel detaches the device on its last close, i.e. when the
    /// filesystem on it is unmounted. The kernel acts on *any* last close, so the implementation
    /// keeps the device open from `loop_attach` until a [`MountSource::Device`] mount of it
    /// succeeds (or until `loop_detach`, or the process exits, which then detaches it: nothing
    /// leaks after a crash). Use it for devices that will carry a mounted filesystem, not for
    /// raw block volumes, whose bind mounts do not hold the device open.
    pub autoclear: bool,
}

/// An attached loop device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`
    pub device: PathBuf,
    pub number: u32,
    /// Backing file as the kernel reports it (`/sys/block/loopN/loop/backing_file`).
    pub backing_file: PathBuf,
    pub direct_io: bool,
    pub autoclear: bool,
    pub read_only: bool,
}

/// What to mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountSource {
    /// A new instance of a block-device filesystem (ext4, xfs, btrfs) from this device.
    Device { device: PathBuf, fs: FileSystem },
    /// A new tmpfs.
    Tmpfs,
    /// A bind mount of an existing file or directory (trusted path, built by Berth).
    Bind { source: PathBuf },
}

/// A mount to make. `target` must exist; a final symlink is refused with [`HostError::Symlink`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRequest {
    pub source: MountSource,
    pub target: PathBuf,
    pub read_only: bool,
    /// Options in mount(8) syntax, e.g. `size=1048576`, `noatime`, `nosuid`, `discard`.
    /// Flags that are mount attributes (ro, nosuid, nodev, noexec, noatime, relatime, nodiratime)
    /// are applied as attributes; the rest go to the filesystem (fsconfig).
    pub options: Vec<String>,
}

/// The outcome of an unmount that did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// A mount was removed.
    Removed,
    /// Nothing was mounted there (or the path is gone): success for idempotent callers.
    NotMounted,
}

/// The kind of file a target path must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Directory,
    /// A regular file to bind a block device node onto.
    File,
}

/// How [`HostOps::clone_file`] copied a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneMethod {
    /// Extents are shared (FICLONE): instant, no space used until either side changes.
    Reflink,
    /// Data was copied (sparse-aware).
    Copy,
}

/// Every kernel-facing operation the storage engine needs.
///
/// Paths named "trusted" are built by Berth from validated ids beneath its own roots. Paths
/// named "target" come from a container orchestrator and are checked (no final symlink).
pub trait HostOps: Send + Sync + std::fmt::Debug {
    // ---- files and directories (trusted paths) ----

    /// `mkdir -p` with the given mode for created directories.
    fn create_dir_all(&self, path: &Path, mode: u32) -> Result<()>;
    /// Removes an empty directory; a missing one is success.
    fn remove_dir(&self, path: &Path) -> Result<()>;
    /// Names in a directory (not `.`/`..`); a missing directory yields an empty list.
    fn list_dir(&self, path: &Path) -> Result<Vec<String>>;
    /// Whether something exists at `path` (lstat: a dangling symlink exists).
    fn exists(&self, path: &Path) -> Result<bool>;
    /// Creates a preallocated image file of exactly `size` bytes (fallocate). With `nocow`, the
    /// file gets `FS_NOCOW_FL` before any data (on btrfs: overwrites in place). If a file already
    /// exists there with the same size this is success; with another size it is `WrongType`.
    fn create_image(&self, path: &Path, size: u64, nocow: bool) -> Result<()>;
    /// Size in bytes of a regular file, `None` if missing.
    fn file_size(&self, path: &Path) -> Result<Option<u64>>;
    /// Removes a file; a missing one is success.
    fn remove_file(&self, path: &Path) -> Result<()>;

    // ---- target paths (untrusted) ----

    /// Makes sure `target` exists as `kind`: creates it when missing (the parent must exist),
    /// accepts an existing one of the right kind, refuses a symlink with [`HostError::Symlink`]
    /// and the wrong kind with [`HostError::WrongType`]. For `File`, an existing *empty
    /// directory* is replaced by a file (COs create directories for block targets too). A `File`
    /// target that already has a device node bound onto it (it stats as a block device) is
    /// accepted, so a retried publish succeeds.
    fn prepare_target(&self, target: &Path, kind: TargetKind) -> Result<()>;
    /// Removes a target file or empty directory after unmounting; missing is success.
    /// Never follows or removes through a symlink: a symlink at `target` is itself unlinked.
    /// A target that is still a mount point fails with EBUSY.
    fn remove_target(&self, target: &Path) -> Result<()>;

    // ---- statfs ----

    fn statfs(&self, path: &Path) -> Result<FsStats>;

    // ---- btrfs (paths are trusted; `mount` is the btrfs mount point of the pool) ----

    /// Enables quotas (qgroups) on the filesystem; already enabled is success.
    fn btrfs_quota_enable(&self, mount: &Path) -> Result<()>;
    /// Creates subvolume `parent/name` and returns its id. If a subvolume already exists there,
    /// returns its id (idempotent).
    fn btrfs_subvolume_create(&self, parent: &Path, name: &str) -> Result<u64>;
    /// Subvolume id of the subvolume at `path`.
    fn btrfs_subvolume_id(&self, path: &Path) -> Result<u64>;
    /// Deletes subvolume `parent/name` (also when not empty); a missing one is success.
    fn btrfs_subvolume_delete(&self, parent: &Path, name: &str) -> Result<()>;
    /// Moves subvolume `from_parent/from_name` to `to_parent/to_name` on the same filesystem
    /// (renameat2 with `RENAME_NOREPLACE` between the two directories' fds). Names are single path
    /// components. An existing destination is `EEXIST` and is never replaced; a source that is
    /// not a subvolume root is `WrongType`; a missing source is `ENOENT` (not idempotent: the
    /// caller knows whether it moved it).
    fn btrfs_subvolume_rename(
        &self,
        from_parent: &Path,
        from_name: &str,
        to_parent: &Path,
        to_name: &str,
    ) -> Result<()>;
    /// Sets (or with `None` clears) the referenced-bytes limit of qgroup 0/`subvolume_id`.
    fn btrfs_qgroup_limit(&self, mount: &Path, subvolume_id: u64, max_referenced: Option<u64>) -> Result<()>;
    /// Level-0 qgroups with usage and limits.
    ///
    /// Usage is as of the last transaction commit: the kernel accounts extents to qgroups when
    /// it commits (every 30 s by default, see the `commit=` mount option), so data written since
    /// is not yet counted. Call [`HostOps::btrfs_sync`] first when the numbers must be current
    /// (capacity checks, tests); limits are enforced at write time regardless. Fails with
    /// ENOTCONN when quotas are not enabled.
    fn btrfs_qgroups(&self, mount: &Path) -> Result<Vec<QgroupInfo>>;
    /// Commits the filesystem's current transaction (`BTRFS_IOC_SYNC`), which brings qgroup
    /// usage up to date. Costs a transaction commit (milliseconds, more under write load): call
    /// it before reading usage that must be current, not on every hot path. The default does
    /// nothing, for implementations whose numbers are always current.
    fn btrfs_sync(&self, mount: &Path) -> Result<()> {
        let _ = mount;
        Ok(())
    }
    /// Destroys qgroup 0/`subvolume_id`; a missing one is success. EBUSY while the kernel still
    /// cleans a deleted subvolume is returned as an error (retry later).
    fn btrfs_qgroup_destroy(&self, mount: &Path, subvolume_id: u64) -> Result<()>;

    // ---- loop devices ----

    /// Attaches `backing` (trusted) to a free loop device with `LOOP_CONFIGURE`.
    fn loop_attach(&self, backing: &Path, options: LoopOptions) -> Result<LoopDevice>;
    /// Detaches `device.device` from `device.backing_file`. One already detached is success,
    /// and so is one attached to another file meanwhile: the number was free and someone else
    /// took it, so it is not ours to detach.
    fn loop_detach(&self, device: &LoopDevice) -> Result<()>;
    /// Every attached loop device with its backing file.
    fn loop_devices(&self) -> Result<Vec<LoopDevice>>;
    /// The loop device attached to `backing`, if any. Cheaper than [`HostOps::loop_devices`]:
    /// the real host remembers what it attached and scans the kernel's list only once.
    fn loop_device_for(&self, backing: &Path) -> Result<Option<LoopDevice>>;

    // ---- filesystems on devices ----

    /// The filesystem type found on a device (`Some("ext4")`), `None` if it holds none.
    fn probe_filesystem(&self, device: &Path) -> Result<Option<String>>;
    /// Formats a device or image file.
    fn mkfs(&self, device: &Path, fs: FileSystem) -> Result<()>;

    // ---- mounts ----

    fn mount(&self, request: &MountRequest) -> Result<()>;
    /// Unmounts the top mount at `target`. Not mounted (EINVAL) or missing (ENOENT) is
    /// `Ok(NotMounted)`. EBUSY is an error: never report success while the mount is there.
    fn unmount(&self, target: &Path) -> Result<Unmounted>;
    /// The current mount table of this process's mount namespace.
    fn mountinfo(&self) -> Result<Vec<MountEntry>>;
    /// Whether a mount's root is at `path` (a final symlink is not followed; a missing path is
    /// not a mount point). Costs one `statx`, not a read of the whole mount table.
    fn is_mount_point(&self, path: &Path) -> Result<bool>;

    // ---- snapshots, clones, expansion ----

    /// Snapshots subvolume `source` as `dest_parent/name` (BTRFS_IOC_SNAP_CREATE_V2) and returns
    /// the new subvolume's id. `read_only` for snapshots; writable for clones and restores. If a
    /// subvolume already exists at the destination, returns its id (idempotent).
    fn btrfs_snapshot(&self, source: &Path, dest_parent: &Path, name: &str, read_only: bool) -> Result<u64>;
    /// Copies the file `source` to `dest` (created with O_EXCL, mode 0600; an existing `dest` is
    /// an error), sharing extents with FICLONE where the filesystem can; otherwise a sparse-aware
    /// copy (SEEK_DATA/SEEK_HOLE, holes stay holes) that logs progress every 256 MiB. The result
    /// is fsynced. Returns how it was copied.
    fn clone_file(&self, source: &Path, dest: &Path) -> Result<CloneMethod>;
    /// Copies the tree under directory `source` into the existing, empty directory `dest`:
    /// regular files (reflinked where possible), directories, symlinks (never followed), modes,
    /// owners and timestamps. Other file types (devices, fifos, sockets) are skipped with a warning.
    fn copy_tree(&self, source: &Path, dest: &Path) -> Result<()>;
    /// FIFREEZE on the filesystem mounted at `mount`. Already frozen is success.
    fn freeze(&self, mount: &Path) -> Result<()>;
    /// FITHAW on the filesystem mounted at `mount`. Not frozen is success.
    fn thaw(&self, mount: &Path) -> Result<()>;
    /// Grows an image file to `size` bytes, reserving the new range with fallocate. A file
    /// already at least that large is left alone (never shrinks).
    fn grow_image(&self, path: &Path, size: u64) -> Result<()>;
    /// LOOP_SET_CAPACITY: makes an attached loop device pick up its backing file's new size.
    fn loop_set_capacity(&self, device: &Path) -> Result<()>;
    /// Grows the filesystem mounted at `mount` (on `device`) to fill the device, online:
    /// resize2fs for ext4, xfs_growfs for xfs, BTRFS_IOC_RESIZE ("max") for btrfs.
    fn grow_filesystem(&self, fs: FileSystem, device: &Path, mount: &Path) -> Result<()>;
    /// Whether [`HostOps::grow_filesystem`] can grow `fs` while it is mounted on this host.
    fn can_grow_online(&self, fs: FileSystem) -> bool {
        let _ = fs;
        true
    }
    /// Grows the UNMOUNTED ext4 filesystem on `device` to fill it (`e2fsck -f -p`, then `resize2fs`):
    /// the way to grow ext4 where online growth is not allowed (no CAP_SYS_RESOURCE). xfs and btrfs
    /// only grow mounted: `Unsupported`.
    fn grow_filesystem_offline(&self, fs: FileSystem, device: &Path) -> Result<()>;
    /// Changes filesystem options of the mount at `mount` in place (fspick, fsconfig,
    /// FSCONFIG_CMD_RECONFIGURE), e.g. `size=…` or `nr_inodes=…` of a tmpfs.
    fn reconfigure(&self, mount: &Path, options: &[String]) -> Result<()>;
    /// Sets an extended attribute on a trusted path (e.g. `btrfs.compression` = `zstd`).
    fn set_xattr(&self, path: &Path, name: &str, value: &[u8]) -> Result<()>;
    /// Sets or clears `FS_NOCOW_FL` on a directory: files created in it afterwards inherit it
    /// (on btrfs they are overwritten in place). Filesystems without the flag: success, no-op.
    fn set_nocow(&self, dir: &Path, on: bool) -> Result<()>;
    /// Reads an extended attribute; `None` when it is not set.
    fn get_xattr(&self, path: &Path, name: &str) -> Result<Option<Vec<u8>>>;
    /// Marks a block device read-only or read-write (BLKROSET).
    fn set_block_read_only(&self, device: &Path, read_only: bool) -> Result<()>;
    /// Logical size in bytes of a block device (BLKGETSIZE64).
    fn block_device_size(&self, device: &Path) -> Result<u64>;
}

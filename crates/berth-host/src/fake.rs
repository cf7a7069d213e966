//! [`RecordingHost`]: an in-memory [`HostOps`] for unit tests of the storage engine and the
//! node agent.
//!
//! It models just enough of a Linux host to be faithful to the contract in `lib.rs`: a tree of
//! directories, files (with sizes), symlinks and device nodes; btrfs subvolumes and qgroups;
//! loop devices with their backing files and capacities; filesystems written by mkfs (with
//! their sizes, for online growth); a stack of mounts, from which [`HostOps::mountinfo`] is
//! synthesized; snapshots (which copy the source's tree, read-only ones refuse writes with
//! `EROFS`), file clones and tree copies, frozen filesystems, extended attributes and
//! read-only block devices. Idempotency rules match the real host
//! ("already there" and "already gone" are success; busy things are `EBUSY`). Every call is
//! appended to [`RecordingHost::calls`] (failed ones too), so tests can assert exact sequences,
//! and [`RecordingHost::fail_next`] injects an error into the next call of an operation.
//! It never touches the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::{
    CloneMethod, FileSystem, FsStats, HostError, HostOps, LoopDevice, LoopOptions, MountEntry, MountRequest,
    MountSource, QgroupInfo, Result, TargetKind, Unmounted,
};

/// One recorded [`HostOps`] call, with its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    CreateDirAll {
        path: PathBuf,
        mode: u32,
    },
    RemoveDir {
        path: PathBuf,
    },
    ListDir {
        path: PathBuf,
    },
    Exists {
        path: PathBuf,
    },
    CreateImage {
        path: PathBuf,
        size: u64,
        nocow: bool,
    },
    FileSize {
        path: PathBuf,
    },
    RemoveFile {
        path: PathBuf,
    },
    PrepareTarget {
        target: PathBuf,
        kind: TargetKind,
    },
    RemoveTarget {
        target: PathBuf,
    },
    Statfs {
        path: PathBuf,
    },
    BtrfsQuotaEnable {
        mount: PathBuf,
    },
    BtrfsSubvolumeCreate {
        parent: PathBuf,
        name: String,
    },
    BtrfsSubvolumeId {
        path: PathBuf,
    },
    BtrfsSubvolumeDelete {
        parent: PathBuf,
        name: String,
    },
    BtrfsSubvolumeRename {
        from_parent: PathBuf,
        from_name: String,
        to_parent: PathBuf,
        to_name: String,
    },
    BtrfsQgroupLimit {
        mount: PathBuf,
        subvolume_id: u64,
        max_referenced: Option<u64>,
    },
    BtrfsQgroups {
        mount: PathBuf,
    },
    BtrfsQgroupDestroy {
        mount: PathBuf,
        subvolume_id: u64,
    },
    BtrfsSync {
        mount: PathBuf,
    },
    LoopAttach {
        backing: PathBuf,
        options: LoopOptions,
    },
    LoopDetach {
        device: PathBuf,
    },
    LoopDevices,
    ProbeFilesystem {
        device: PathBuf,
    },
    Mkfs {
        device: PathBuf,
        fs: FileSystem,
    },
    Mount {
        target: PathBuf,
        source: MountSource,
        read_only: bool,
        options: Vec<String>,
    },
    Unmount {
        target: PathBuf,
    },
    Mountinfo,
    IsMountPoint {
        path: PathBuf,
    },
    LoopDeviceFor {
        backing: PathBuf,
    },
    BtrfsSnapshot {
        source: PathBuf,
        dest_parent: PathBuf,
        name: String,
        read_only: bool,
    },
    CloneFile {
        source: PathBuf,
        dest: PathBuf,
    },
    CopyTree {
        source: PathBuf,
        dest: PathBuf,
    },
    Freeze {
        mount: PathBuf,
    },
    Thaw {
        mount: PathBuf,
    },
    GrowImage {
        path: PathBuf,
        size: u64,
    },
    LoopSetCapacity {
        device: PathBuf,
    },
    GrowFilesystem {
        fs: FileSystem,
        device: PathBuf,
        mount: PathBuf,
    },
    GrowFilesystemOffline {
        fs: FileSystem,
        device: PathBuf,
    },
    Reconfigure {
        mount: PathBuf,
        options: Vec<String>,
    },
    SetXattr {
        path: PathBuf,
        name: String,
        value: Vec<u8>,
    },
    SetNocow {
        path: PathBuf,
        on: bool,
    },
    GetXattr {
        path: PathBuf,
        name: String,
    },
    SetBlockReadOnly {
        device: PathBuf,
        read_only: bool,
    },
    BlockDeviceSize {
        device: PathBuf,
    },
}

/// The operation names [`RecordingHost::fail_next`] accepts: the [`HostOps`] method names.
pub const OPS: &[&str] = &[
    "create_dir_all",
    "remove_dir",
    "list_dir",
    "exists",
    "create_image",
    "file_size",
    "remove_file",
    "prepare_target",
    "remove_target",
    "statfs",
    "btrfs_quota_enable",
    "btrfs_subvolume_create",
    "btrfs_subvolume_id",
    "btrfs_subvolume_delete",
    "btrfs_subvolume_rename",
    "btrfs_qgroup_limit",
    "btrfs_qgroups",
    "btrfs_qgroup_destroy",
    "btrfs_sync",
    "loop_attach",
    "loop_detach",
    "loop_devices",
    "loop_device_for",
    "probe_filesystem",
    "mkfs",
    "mount",
    "unmount",
    "mountinfo",
    "is_mount_point",
    "btrfs_snapshot",
    "clone_file",
    "copy_tree",
    "freeze",
    "thaw",
    "grow_image",
    "loop_set_capacity",
    "grow_filesystem",
    "reconfigure",
    "set_xattr",
    "set_nocow",
    "get_xattr",
    "set_block_read_only",
    "block_device_size",
];

impl Call {
    /// The [`HostOps`] method this call was made through, e.g. `"mount"`.
    pub fn op(&self) -> &'static str {
        match self {
            Call::CreateDirAll { .. } => "create_dir_all",
            Call::RemoveDir { .. } => "remove_dir",
            Call::ListDir { .. } => "list_dir",
            Call::Exists { .. } => "exists",
            Call::CreateImage { .. } => "create_image",
            Call::FileSize { .. } => "file_size",
            Call::RemoveFile { .. } => "remove_file",
            Call::PrepareTarget { .. } => "prepare_target",
            Call::RemoveTarget { .. } => "remove_target",
            Call::Statfs { .. } => "statfs",
            Call::BtrfsQuotaEnable { .. } => "btrfs_quota_enable",
            Call::BtrfsSubvolumeCreate { .. } => "btrfs_subvolume_create",
            Call::BtrfsSubvolumeId { .. } => "btrfs_subvolume_id",
            Call::BtrfsSubvolumeDelete { .. } => "btrfs_subvolume_delete",
            Call::BtrfsSubvolumeRename { .. } => "btrfs_subvolume_rename",
            Call::BtrfsQgroupLimit { .. } => "btrfs_qgroup_limit",
            Call::BtrfsQgroups { .. } => "btrfs_qgroups",
            Call::BtrfsQgroupDestroy { .. } => "btrfs_qgroup_destroy",
            Call::BtrfsSync { .. } => "btrfs_sync",
            Call::LoopAttach { .. } => "loop_attach",
            Call::LoopDetach { .. } => "loop_detach",
            Call::LoopDevices => "loop_devices",
            Call::ProbeFilesystem { .. } => "probe_filesystem",
            Call::Mkfs { .. } => "mkfs",
            Call::Mount { .. } => "mount",
            Call::Unmount { .. } => "unmount",
            Call::Mountinfo => "mountinfo",
            Call::IsMountPoint { .. } => "is_mount_point",
            Call::LoopDeviceFor { .. } => "loop_device_for",
            Call::BtrfsSnapshot { .. } => "btrfs_snapshot",
            Call::CloneFile { .. } => "clone_file",
            Call::CopyTree { .. } => "copy_tree",
            Call::Freeze { .. } => "freeze",
            Call::Thaw { .. } => "thaw",
            Call::GrowImage { .. } => "grow_image",
            Call::LoopSetCapacity { .. } => "loop_set_capacity",
            Call::GrowFilesystem { .. } => "grow_filesystem",
            Call::GrowFilesystemOffline { .. } => "grow_filesystem_offline",
            Call::Reconfigure { .. } => "reconfigure",
            Call::SetXattr { .. } => "set_xattr",
            Call::SetNocow { .. } => "set_nocow",
            Call::GetXattr { .. } => "get_xattr",
            Call::SetBlockReadOnly { .. } => "set_block_read_only",
            Call::BlockDeviceSize { .. } => "block_device_size",
        }
    }

    /// The main path the call acted on (empty for calls without one).
    pub fn path(&self) -> PathBuf {
        match self {
            Call::CreateDirAll { path, .. }
            | Call::RemoveDir { path }
            | Call::ListDir { path }
            | Call::Exists { path }
            | Call::CreateImage { path, .. }
            | Call::FileSize { path }
            | Call::RemoveFile { path }
            | Call::Statfs { path }
            | Call::BtrfsSubvolumeId { path } => path.clone(),
            Call::PrepareTarget { target, .. } | Call::RemoveTarget { target } | Call::Unmount { target } => {
                target.clone()
            }
            Call::Mount { target, .. } => target.clone(),
            Call::BtrfsQuotaEnable { mount }
            | Call::BtrfsQgroupLimit { mount, .. }
            | Call::BtrfsQgroups { mount }
            | Call::BtrfsQgroupDestroy { mount, .. }
            | Call::BtrfsSync { mount } => mount.clone(),
            Call::BtrfsSubvolumeCreate { parent, name } | Call::BtrfsSubvolumeDelete { parent, name } => {
                parent.join(name)
            }
            Call::BtrfsSubvolumeRename {
                from_parent, from_name, ..
            } => from_parent.join(from_name),
            Call::LoopAttach { backing, .. } => backing.clone(),
            Call::LoopDetach { device } | Call::ProbeFilesystem { device } | Call::Mkfs { device, .. } => {
                device.clone()
            }
            Call::LoopDevices | Call::Mountinfo => PathBuf::new(),
            Call::IsMountPoint { path } => path.clone(),
            Call::LoopDeviceFor { backing } => backing.clone(),
            Call::BtrfsSnapshot { dest_parent, name, .. } => dest_parent.join(name),
            Call::CloneFile { dest, .. } | Call::CopyTree { dest, .. } => dest.clone(),
            Call::Freeze { mount }
            | Call::Thaw { mount }
            | Call::GrowFilesystem { mount, .. }
            | Call::Reconfigure { mount, .. } => mount.clone(),
            Call::GrowImage { path, .. }
            | Call::SetXattr { path, .. }
            | Call::SetNocow { path, .. }
            | Call::GetXattr { path, .. } => path.clone(),
            Call::LoopSetCapacity { device }
            | Call::GrowFilesystemOffline { device, .. }
            | Call::SetBlockReadOnly { device, .. }
            | Call::BlockDeviceSize { device } => device.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir { subvolume: Option<u64> },
    File { size: u64 },
    Symlink,
    BlockDevice { loop_number: u32 },
}

#[derive(Clone, Debug)]
struct Qgroup {
    mount: PathBuf,
    info: QgroupInfo,
}

#[derive(Clone, Debug)]
struct FakeMount {
    id: u32,
    request: MountRequest,
}

#[derive(Debug)]
struct State {
    calls: Vec<Call>,
    failures: Vec<(&'static str, i32)>,
    nodes: BTreeMap<PathBuf, Node>,
    next_subvolume_id: u64,
    quota_mounts: BTreeSet<PathBuf>,
    qgroups: BTreeMap<u64, Qgroup>,
    loops: BTreeMap<u32, LoopDevice>,
    /// Filesystem type by the file (or non-loop device) that holds it.
    filesystems: BTreeMap<PathBuf, String>,
    mounts: Vec<FakeMount>,
    next_mount_id: u32,
    statfs: BTreeMap<PathBuf, FsStats>,
    direct_io_supported: bool,
    /// Read-only subvolumes (read-only snapshots), by path.
    read_only_subvolumes: BTreeSet<PathBuf>,
    /// Snapshot path → the subvolume it was taken of.
    snapshot_sources: BTreeMap<PathBuf, PathBuf>,
    /// Mount points whose filesystem is frozen.
    frozen: BTreeSet<PathBuf>,
    /// Size of each attached loop device, as of attach or the last `loop_set_capacity`.
    loop_capacity: BTreeMap<u32, u64>,
    /// Loop devices marked read-only with `set_block_read_only`.
    block_read_only: BTreeSet<u32>,
    /// Size of each filesystem made by mkfs, by the file that holds it.
    fs_sizes: BTreeMap<PathBuf, u64>,
    xattrs: BTreeMap<PathBuf, BTreeMap<String, Vec<u8>>>,
    /// Directories with `FS_NOCOW_FL`.
    nocow: BTreeSet<PathBuf>,
    reflink_supported: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            calls: Vec::new(),
            failures: Vec::new(),
            nodes: BTreeMap::new(),
            next_subvolume_id: 256,
            quota_mounts: BTreeSet::new(),
            qgroups: BTreeMap::new(),
            loops: BTreeMap::new(),
            filesystems: BTreeMap::new(),
            mounts: Vec::new(),
            next_mount_id: 1000,
            statfs: BTreeMap::new(),
            direct_io_supported: true,
            read_only_subvolumes: BTreeSet::new(),
            snapshot_sources: BTreeMap::new(),
            frozen: BTreeSet::new(),
            loop_capacity: BTreeMap::new(),
            block_read_only: BTreeSet::new(),
            fs_sizes: BTreeMap::new(),
            xattrs: BTreeMap::new(),
            nocow: BTreeSet::new(),
            reflink_supported: true,
        }
    }
}

/// The statfs answer for paths without one set by [`RecordingHost::set_statfs`]: 100 GiB,
/// half used.
pub const DEFAULT_STATFS: FsStats = FsStats {
    fs_type: crate::magic::EXT4,
    block_size: 4096,
    total_bytes: 100 << 30,
    available_bytes: 50 << 30,
    used_bytes: 50 << 30,
    total_inodes: 1 << 20,
    free_inodes: 1 << 19,
    used_inodes: 1 << 19,
};

const ATTRIBUTE_OPTIONS: &[&str] = &[
    "nosuid",
    "nodev",
    "noexec",
    "noatime",
    "relatime",
    "nodiratime",
    "strictatime",
];

fn errno(op: &'static str, path: &Path, errno: i32) -> HostError {
    HostError::io(op, path, std::io::Error::from_raw_os_error(errno))
}

fn wrong_type(path: &Path, reason: &str) -> HostError {
    HostError::WrongType {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Whether `path` is "/" or empty: the root always exists.
fn is_root(path: &Path) -> bool {
    path.as_os_str().is_empty() || path == Path::new("/")
}

/// An in-memory host that records every call. Cheap to create; one per test.
#[derive(Debug, Default)]
pub struct RecordingHost {
    state: Mutex<State>,
}

impl RecordingHost {
    pub fn new() -> Self {
        RecordingHost::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves a consistent model behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `call` and fails it if a failure was injected for its operation.
    fn begin(&self, call: Call) -> Result<MutexGuard<'_, State>> {
        let mut st = self.lock();
        let op = call.op();
        let path = call.path();
        st.calls.push(call);
        if let Some(i) = st.failures.iter().position(|(o, _)| *o == op) {
            let (_, e) = st.failures.remove(i);
            return Err(errno(op, &path, e));
        }
        Ok(st)
    }

    // ---- call log and failure injection ----

    /// Every call made so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The calls made so far, without read-only ones (`exists`, `list_dir`, `file_size`,
    /// `statfs`, `btrfs_subvolume_id`, `btrfs_qgroups`, `loop_devices`, `probe_filesystem`,
    /// `mountinfo`, `get_xattr`, `block_device_size`): what changed the host.
    pub fn mutating_calls(&self) -> Vec<Call> {
        const READS: &[&str] = &[
            "exists",
            "list_dir",
            "file_size",
            "statfs",
            "btrfs_subvolume_id",
            "btrfs_qgroups",
            "loop_devices",
            "probe_filesystem",
            "mountinfo",
            "is_mount_point",
            "loop_device_for",
            "get_xattr",
            "block_device_size",
        ];
        self.calls().into_iter().filter(|c| !READS.contains(&c.op())).collect()
    }

    /// Forgets the calls recorded so far (the modelled state stays).
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Makes the next call of `op` (a [`HostOps`] method name, see [`OPS`]) fail with
    /// `HostError::Io` carrying `errno`, without changing any state. Several injections for
    /// the same op apply to successive calls.
    ///
    /// # Panics
    /// When `op` is not a [`HostOps`] method name (a typo in a test).
    pub fn fail_next(&self, op: &str, errno: i32) {
        let Some(&op) = OPS.iter().find(|o| **o == op) else {
            panic!("fail_next: {op:?} is not a HostOps operation; one of {OPS:?}");
        };
        self.lock().failures.push((op, errno));
    }

    // ---- state inspection ----

    /// Active mounts, oldest first (stacked mounts appear in mount order).
    pub fn mounts(&self) -> Vec<MountRequest> {
        self.lock().mounts.iter().map(|m| m.request.clone()).collect()
    }

    /// Attached loop devices by number.
    pub fn attached_loops(&self) -> Vec<LoopDevice> {
        let st = self.lock();
        st.loops.values().map(|l| st.reported_loop(l)).collect()
    }

    /// Subvolumes by path, with their ids.
    pub fn subvolumes(&self) -> BTreeMap<PathBuf, u64> {
        self.lock()
            .nodes
            .iter()
            .filter_map(|(p, n)| match n {
                Node::Dir { subvolume: Some(id) } => Some((p.clone(), *id)),
                _ => None,
            })
            .collect()
    }

    /// Regular files by path, with their sizes.
    pub fn files(&self) -> BTreeMap<PathBuf, u64> {
        self.lock()
            .nodes
            .iter()
            .filter_map(|(p, n)| match n {
                Node::File { size } => Some((p.clone(), *size)),
                _ => None,
            })
            .collect()
    }

    /// Directories (subvolumes included).
    pub fn dirs(&self) -> BTreeSet<PathBuf> {
        self.lock()
            .nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::Dir { .. }))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Every qgroup with its usage and limit, whatever filesystem it is on.
    pub fn qgroups(&self) -> Vec<QgroupInfo> {
        self.lock().qgroups.values().map(|q| q.info).collect()
    }

    /// The filesystem mkfs wrote into `file` (an image file or a non-loop device).
    pub fn filesystem_of(&self, file: &Path) -> Option<String> {
        self.lock().filesystems.get(file).cloned()
    }

    /// Size of the filesystem in `file`: its device's size at mkfs, or at the last
    /// `grow_filesystem`.
    pub fn filesystem_size(&self, file: &Path) -> Option<u64> {
        self.lock().fs_sizes.get(file).copied()
    }

    /// The subvolume a snapshot at `path` was taken of (`None` for anything else).
    pub fn snapshot_source(&self, path: &Path) -> Option<PathBuf> {
        self.lock().snapshot_sources.get(path).cloned()
    }

    /// Whether `path` is a read-only subvolume (a read-only snapshot).
    pub fn is_read_only_subvolume(&self, path: &Path) -> bool {
        self.lock().read_only_subvolumes.contains(path)
    }

    /// Mount points whose filesystem is frozen.
    pub fn frozen(&self) -> BTreeSet<PathBuf> {
        self.lock().frozen.clone()
    }

    /// Extended attributes set on `path`.
    pub fn xattrs(&self, path: &Path) -> BTreeMap<String, Vec<u8>> {
        self.lock().xattrs.get(path).cloned().unwrap_or_default()
    }

    /// Whether the directory at `path` has `FS_NOCOW_FL`.
    pub fn nocow(&self, path: &Path) -> bool {
        self.lock().nocow.contains(path)
    }

    // ---- setup (not recorded) ----

    /// Creates a directory and its parents.
    pub fn add_dir(&self, path: impl AsRef<Path>) {
        let mut st = self.lock();
        for p in path.as_ref().ancestors().filter(|p| !is_root(p)) {
            st.nodes.entry(p.to_owned()).or_insert(Node::Dir { subvolume: None });
        }
    }

    /// Creates a file of `size` bytes (and its parent directories).
    pub fn add_file(&self, path: impl AsRef<Path>, size: u64) {
        let path = path.as_ref();
        if let Some(parent) = path.parent() {
            self.add_dir(parent);
        }
        self.lock().nodes.insert(path.to_owned(), Node::File { size });
    }

    /// Creates a symlink (its destination is not modelled: it is never followed).
    pub fn add_symlink(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        if let Some(parent) = path.parent() {
            self.add_dir(parent);
        }
        self.lock().nodes.insert(path.to_owned(), Node::Symlink);
    }

    /// Sets what statfs reports for `path` and everything beneath it.
    pub fn set_statfs(&self, path: impl AsRef<Path>, stats: FsStats) {
        self.lock().statfs.insert(path.as_ref().to_owned(), stats);
    }

    /// Sets the usage btrfs would account to qgroup 0/`subvolume_id`.
    pub fn set_qgroup_usage(&self, subvolume_id: u64, referenced: u64, exclusive: u64) {
        if let Some(q) = self.lock().qgroups.get_mut(&subvolume_id) {
            q.info.referenced_bytes = referenced;
            q.info.exclusive_bytes = exclusive;
        }
    }

    /// Whether backing files accept direct I/O (default yes); when not, `loop_attach` falls
    /// back to buffered I/O like the real host.
    pub fn set_direct_io_supported(&self, supported: bool) {
        self.lock().direct_io_supported = supported;
    }

    /// Whether `clone_file` may share extents at all (default yes). When it may, it does so
    /// between files on the same btrfs or xfs filesystem: the same btrfs/xfs device mount, or
    /// the same path given a btrfs/xfs [`FsStats::fs_type`] with [`RecordingHost::set_statfs`].
    pub fn set_reflink_supported(&self, supported: bool) {
        self.lock().reflink_supported = supported;
    }
}

impl State {
    fn parent_is_dir(&self, path: &Path) -> bool {
        match path.parent() {
            None => true,
            Some(p) if is_root(p) => true,
            Some(p) => matches!(self.nodes.get(p), Some(Node::Dir { .. })),
        }
    }

    fn has_children(&self, path: &Path) -> bool {
        self.nodes.keys().any(|p| p.parent() == Some(path))
    }

    fn is_mount_target(&self, path: &Path) -> bool {
        self.mounts.iter().any(|m| m.request.target == path)
    }

    /// A mount at or beneath `path`.
    fn has_mount_within(&self, path: &Path) -> bool {
        self.mounts.iter().any(|m| m.request.target.starts_with(path))
    }

    fn remove_tree(&mut self, path: &Path) {
        self.nodes.retain(|p, _| !p.starts_with(path));
        self.forget(path);
    }

    /// Drops what the model knows about `path` and everything beneath it, once removed.
    fn forget(&mut self, path: &Path) {
        self.xattrs.retain(|p, _| !p.starts_with(path));
        self.nocow.retain(|p| !p.starts_with(path));
        self.read_only_subvolumes.retain(|p| !p.starts_with(path));
        self.snapshot_sources.retain(|p, _| !p.starts_with(path));
    }

    /// `EROFS` when `path` lies in (or is) a read-only subvolume.
    fn check_writable(&self, op: &'static str, path: &Path) -> Result<()> {
        if self.read_only_subvolumes.iter().any(|r| path.starts_with(r)) {
            return Err(errno(op, path, libc::EROFS));
        }
        Ok(())
    }

    /// A loop device as `loop_devices` reports it (the read-only flag includes BLKROSET).
    fn reported_loop(&self, l: &LoopDevice) -> LoopDevice {
        LoopDevice {
            read_only: l.read_only || self.block_read_only.contains(&l.number),
            ..l.clone()
        }
    }

    /// Size of the device (or plain file) at `device`: a loop device's capacity.
    fn device_size(&self, device: &Path) -> Option<u64> {
        match self.nodes.get(device) {
            Some(Node::BlockDevice { loop_number }) => self.loop_capacity.get(loop_number).copied(),
            Some(Node::File { size }) => Some(*size),
            _ => None,
        }
    }

    /// The filesystem `path` is on as far as the model knows (the deepest device or tmpfs
    /// mount, or `set_statfs` path, containing it) and whether it can share extents.
    fn filesystem_at(&self, path: &Path) -> Option<(PathBuf, bool)> {
        let reflink_magic = |t: u64| t == crate::magic::BTRFS || t == crate::magic::XFS;
        let mounts = self.mounts.iter().filter_map(|m| {
            let reflink = match &m.request.source {
                MountSource::Device { fs, .. } => matches!(fs, FileSystem::Btrfs | FileSystem::Xfs),
                MountSource::Tmpfs => false,
                // A bind mount shows a filesystem that is there already.
                MountSource::Bind { .. } => return None,
            };
            path.starts_with(&m.request.target)
                .then(|| (m.request.target.clone(), reflink))
        });
        let stats = self
            .statfs
            .iter()
            .filter(|(p, _)| path.starts_with(p))
            .map(|(p, s)| (p.clone(), reflink_magic(s.fs_type)));
        mounts
            .chain(stats)
            .max_by_key(|(p, reflink)| (p.components().count(), *reflink))
    }

    fn can_reflink(&self, source: &Path, dest: &Path) -> bool {
        if !self.reflink_supported {
            return false;
        }
        match (self.filesystem_at(source), self.filesystem_at(dest)) {
            (Some((a, true)), Some((b, true))) => a == b,
            _ => false,
        }
    }

    /// Copies the nodes beneath `source` to beneath `dest` (which must exist). Nested
    /// subvolumes become empty directories when `snapshot`, plain directories otherwise;
    /// device nodes are skipped; with `snapshot`, extended attributes go along.
    fn copy_nodes(&mut self, source: &Path, dest: &Path, snapshot: bool) -> Vec<PathBuf> {
        let under: Vec<(PathBuf, Node)> = self
            .nodes
            .range(source.to_owned()..)
            .take_while(|(p, _)| p.starts_with(source))
            .filter(|(p, _)| p.as_path() != source && !p.starts_with(dest))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect();
        let nested: Vec<PathBuf> = under
            .iter()
            .filter(|(_, n)| matches!(n, Node::Dir { subvolume: Some(_) }))
            .map(|(p, _)| p.clone())
            .collect();
        let mut skipped = Vec::new();
        for (path, node) in under {
            let Ok(rel) = path.strip_prefix(source) else { continue };
            let to = dest.join(rel);
            if snapshot && nested.iter().any(|n| path.starts_with(n) && path != *n) {
                continue;
            }
            let node = match node {
                Node::Dir { .. } => Node::Dir { subvolume: None },
                Node::BlockDevice { .. } => {
                    skipped.push(path);
                    continue;
                }
                other => other,
            };
            if let Some(fs) = self.filesystems.get(&path).cloned() {
                self.filesystems.insert(to.clone(), fs);
            }
            if let Some(size) = self.fs_sizes.get(&path).copied() {
                self.fs_sizes.insert(to.clone(), size);
            }
            if snapshot && let Some(x) = self.xattrs.get(&path).cloned() {
                self.xattrs.insert(to.clone(), x);
            }
            if snapshot && self.nocow.contains(&path) {
                self.nocow.insert(to.clone());
            }
            self.nodes.insert(to, node);
        }
        skipped
    }

    /// The snapshot model: `dest` gets a copy of the source's tree.
    fn snapshot(&mut self, source: &Path, dest_parent: &Path, name: &str, read_only: bool) -> Result<u64> {
        const OP: &str = "btrfs snapshot";
        let dest = dest_parent.join(name);
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.len() > 255 {
            return Err(wrong_type(&dest, "is not a valid subvolume name"));
        }
        match self.nodes.get(&dest) {
            Some(Node::Dir { subvolume: Some(id) }) => return Ok(*id),
            Some(_) => return Err(wrong_type(&dest, "exists but is not a btrfs subvolume")),
            None => {}
        }
        if !is_root(dest_parent) && !matches!(self.nodes.get(dest_parent), Some(Node::Dir { .. })) {
            return Err(errno(OP, dest_parent, libc::ENOENT));
        }
        let top_level = self.mounts.iter().any(|m| {
            m.request.target == source
                && matches!(
                    m.request.source,
                    MountSource::Device {
                        fs: FileSystem::Btrfs,
                        ..
                    }
                )
        });
        let source_id = match self.nodes.get(source) {
            _ if top_level => 5,
            Some(Node::Dir { subvolume: Some(id) }) => *id,
            Some(_) => return Err(wrong_type(source, "is not the root of a btrfs subvolume")),
            None => return Err(errno(OP, source, libc::ENOENT)),
        };
        self.check_writable(OP, &dest)?;
        let id = self.next_subvolume_id;
        self.next_subvolume_id += 1;
        self.nodes.insert(dest.clone(), Node::Dir { subvolume: Some(id) });
        if let Some(x) = self.xattrs.get(source).cloned() {
            self.xattrs.insert(dest.clone(), x);
        }
        if self.nocow.contains(source) {
            self.nocow.insert(dest.clone());
        }
        self.copy_nodes(source, &dest, true);
        if let Some(mount) = self.quota_mount_of(&dest) {
            let mut q = new_qgroup(mount, id);
            // Like the kernel: everything is shared with the source at first, and the source's
            // limit is copied.
            if let Some(src) = self.qgroups.get(&source_id) {
                q.info.referenced_bytes = src.info.referenced_bytes;
                q.info.max_referenced = src.info.max_referenced;
            }
            self.qgroups.insert(id, q);
        }
        if read_only {
            self.read_only_subvolumes.insert(dest.clone());
        }
        self.snapshot_sources.insert(dest, source.to_owned());
        Ok(id)
    }

    /// Checks that `path` is an existing directory for `copy_tree`.
    fn expect_dir(&self, op: &'static str, path: &Path) -> Result<()> {
        match self.nodes.get(path) {
            Some(Node::Dir { .. }) => Ok(()),
            None if is_root(path) => Ok(()),
            Some(Node::Symlink) => Err(HostError::Symlink { path: path.to_owned() }),
            Some(_) => Err(wrong_type(path, "is not a directory")),
            None => Err(errno(op, path, libc::ENOENT)),
        }
    }

    /// The mount point `mount` as freeze and thaw want it: the root of a mount.
    fn expect_mount_root(&self, op: &'static str, mount: &Path) -> Result<()> {
        if !is_root(mount) && !self.nodes.contains_key(mount) {
            return Err(errno(op, mount, libc::ENOENT));
        }
        if !self.is_mount_target(mount) {
            return Err(wrong_type(mount, &format!("{op}: is not the root of a mount")));
        }
        Ok(())
    }

    fn grow_filesystem(&mut self, fs: FileSystem, device: &Path, mount: &Path) -> Result<()> {
        const OP: &str = "grow filesystem";
        if !self.nodes.contains_key(device) {
            return Err(errno(OP, device, libc::ENOENT));
        }
        let mounted = self.mounts.iter().any(|m| {
            m.request.target == mount
                && matches!(&m.request.source, MountSource::Device { device: d, fs: f } if d == device && *f == fs)
        });
        if !mounted {
            return Err(wrong_type(
                mount,
                &format!("has no {} filesystem of {} mounted", fs.as_str(), device.display()),
            ));
        }
        let file = self.data_file(device);
        let device_size = self.device_size(device).unwrap_or(0);
        let old = self.fs_sizes.get(&file).copied().unwrap_or(device_size);
        if device_size <= old {
            return Ok(());
        }
        self.fs_sizes.insert(file, device_size);
        if let Some(stats) = self.statfs.get_mut(mount) {
            let grown = device_size - old;
            stats.total_bytes += grown;
            stats.available_bytes += grown;
        }
        Ok(())
    }

    /// Merges `options` into the topmost mount at `mount`, as a reconfigure leaves them.
    fn reconfigure(&mut self, mount: &Path, options: &[String]) -> Result<()> {
        let Some(m) = self.mounts.iter_mut().rev().find(|m| m.request.target == mount) else {
            // fspick on anything but the root of a mount.
            return Err(errno("reconfigure: fspick", mount, libc::EINVAL));
        };
        let mut have: Vec<String> = m
            .request
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .filter(|o| !o.is_empty())
            .map(str::to_owned)
            .collect();
        for option in options.iter().flat_map(|o| o.split(',')).map(str::trim) {
            match option {
                "" => {}
                "ro" => m.request.read_only = true,
                "rw" => {
                    m.request.read_only = false;
                    have.retain(|o| o != "ro");
                }
                _ => match option.split_once('=') {
                    Some((key, _)) => {
                        have.retain(|o| o.split_once('=').is_none_or(|(k, _)| k != key));
                        have.push(option.to_owned());
                    }
                    None if !have.iter().any(|o| o == option) => have.push(option.to_owned()),
                    None => {}
                },
            }
        }
        m.request.options = have;
        Ok(())
    }

    fn loop_number(&self, device: &Path) -> Option<u32> {
        match self.nodes.get(device) {
            Some(Node::BlockDevice { loop_number }) => Some(*loop_number),
            _ => None,
        }
    }

    /// The file that holds a device's data: a loop device's backing file, or the path itself.
    fn data_file(&self, device: &Path) -> PathBuf {
        self.loop_number(device)
            .and_then(|n| self.loops.get(&n))
            .map_or_else(|| device.to_owned(), |l| l.backing_file.clone())
    }

    fn device_in_use(&self, device: &Path) -> bool {
        self.mounts
            .iter()
            .any(|m| matches!(&m.request.source, MountSource::Device { device: d, .. } if d == device))
    }

    fn detach_loop(&mut self, number: u32) {
        if let Some(dev) = self.loops.remove(&number) {
            self.nodes.remove(&dev.device);
        }
        self.loop_capacity.remove(&number);
        self.block_read_only.remove(&number);
    }

    /// The topmost mount whose target contains `path`, excluding mount `except`.
    fn mount_containing(&self, path: &Path, except: Option<u32>) -> Option<&FakeMount> {
        self.mounts
            .iter()
            .filter(|m| Some(m.id) != except && path.starts_with(&m.request.target))
            .max_by_key(|m| (m.request.target.components().count(), m.id))
    }

    fn create_dir_all(&mut self, path: &Path) -> Result<()> {
        let mut ancestors: Vec<&Path> = path.ancestors().filter(|p| !is_root(p)).collect();
        ancestors.reverse();
        for p in ancestors {
            match self.nodes.get(p) {
                None => {
                    self.check_writable("create directory", p)?;
                    self.nodes.insert(p.to_owned(), Node::Dir { subvolume: None });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) if p == path => {
                    return Err(wrong_type(path, "exists and is not a directory"));
                }
                Some(_) => return Err(errno("create directory", p, libc::ENOTDIR)),
            }
        }
        Ok(())
    }

    fn prepare_target(&mut self, target: &Path, kind: TargetKind) -> Result<()> {
        const OP: &str = "prepare target";
        match (self.nodes.get(target).cloned(), kind) {
            (Some(Node::Symlink), _) => Err(HostError::Symlink {
                path: target.to_owned(),
            }),
            (Some(Node::Dir { .. }), TargetKind::Directory) => Ok(()),
            (Some(Node::File { .. } | Node::BlockDevice { .. }), TargetKind::File) => Ok(()),
            (Some(Node::Dir { .. }), TargetKind::File) => {
                if self.is_mount_target(target) {
                    return Err(errno(OP, target, libc::EBUSY));
                }
                if self.has_children(target) {
                    return Err(wrong_type(target, "is a non-empty directory where a file is needed"));
                }
                self.nodes.insert(target.to_owned(), Node::File { size: 0 });
                Ok(())
            }
            (Some(_), TargetKind::Directory) => Err(wrong_type(target, "is not a directory")),
            (None, kind) => {
                if !self.parent_is_dir(target) {
                    return Err(errno(OP, target, libc::ENOENT));
                }
                let node = match kind {
                    TargetKind::Directory => Node::Dir { subvolume: None },
                    TargetKind::File => Node::File { size: 0 },
                };
                self.nodes.insert(target.to_owned(), node);
                Ok(())
            }
        }
    }

    fn remove_entry(&mut self, op: &'static str, path: &Path) -> Result<()> {
        if self.is_mount_target(path) {
            return Err(errno(op, path, libc::EBUSY));
        }
        if self.has_children(path) {
            return Err(errno(op, path, libc::ENOTEMPTY));
        }
        self.check_writable(op, path)?;
        self.nodes.remove(path);
        self.forget(path);
        Ok(())
    }

    fn create_image(&mut self, path: &Path, size: u64) -> Result<()> {
        const OP: &str = "create image";
        if size == 0 {
            return Err(errno(OP, path, libc::EINVAL));
        }
        match self.nodes.get(path) {
            Some(Node::File { size: have }) if *have == size => return Ok(()),
            // An empty file is what a crash between create and fallocate leaves: finish it.
            Some(Node::File { size: 0 }) => {}
            Some(Node::File { size: have }) => {
                return Err(wrong_type(path, &format!("image exists with {have} bytes, not {size}")));
            }
            Some(_) => return Err(wrong_type(path, "exists and is not a regular file")),
            None if !self.parent_is_dir(path) => return Err(errno(OP, path, libc::ENOENT)),
            None => {}
        }
        self.check_writable(OP, path)?;
        self.nodes.insert(path.to_owned(), Node::File { size });
        Ok(())
    }

    fn quota_mount_of(&self, path: &Path) -> Option<PathBuf> {
        self.quota_mounts
            .iter()
            .filter(|m| path.starts_with(m))
            .max_by_key(|m| m.components().count())
            .cloned()
    }

    fn subvolume_create(&mut self, parent: &Path, name: &str) -> Result<u64> {
        const OP: &str = "btrfs subvolume create";
        let path = parent.join(name);
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.len() > 255 {
            return Err(wrong_type(&path, "is not a valid subvolume name"));
        }
        match self.nodes.get(&path) {
            Some(Node::Dir { subvolume: Some(id) }) => return Ok(*id),
            Some(_) => return Err(wrong_type(&path, "exists but is not a btrfs subvolume")),
            None => {}
        }
        if !is_root(parent) && !matches!(self.nodes.get(parent), Some(Node::Dir { .. })) {
            return Err(errno(OP, parent, libc::ENOENT));
        }
        self.check_writable(OP, &path)?;
        let id = self.next_subvolume_id;
        self.next_subvolume_id += 1;
        self.nodes.insert(path.clone(), Node::Dir { subvolume: Some(id) });
        if let Some(mount) = self.quota_mount_of(&path) {
            self.qgroups.insert(id, new_qgroup(mount, id));
        }
        Ok(id)
    }

    /// The rename model: the subtree at `from` and everything the model knows about it
    /// (nocow, xattrs, read-only flags, filesystems in files) move to `to`. Stricter than the
    /// kernel in one way: a subvolume with a mount at or beneath it is `EBUSY`, because the fake
    /// keeps mounts by path.
    fn subvolume_rename(&mut self, from_parent: &Path, from_name: &str, to_parent: &Path, to_name: &str) -> Result<()> {
        const OP: &str = "btrfs subvolume rename";
        let from = from_parent.join(from_name);
        let to = to_parent.join(to_name);
        for (path, name) in [(&from, from_name), (&to, to_name)] {
            if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.len() > 255 {
                return Err(wrong_type(path, "is not a valid subvolume name"));
            }
        }
        match self.nodes.get(&from) {
            Some(Node::Dir { subvolume: Some(_) }) => {}
            Some(_) => return Err(wrong_type(&from, "is not the root of a btrfs subvolume")),
            None => return Err(errno(OP, &from, libc::ENOENT)),
        }
        if !is_root(to_parent) && !matches!(self.nodes.get(to_parent), Some(Node::Dir { .. })) {
            return Err(errno(OP, to_parent, libc::ENOENT));
        }
        if self.nodes.contains_key(&to) || is_root(&to) {
            return Err(errno(OP, &to, libc::EEXIST));
        }
        if self.filesystem_at(&from).map(|f| f.0) != self.filesystem_at(&to).map(|f| f.0) {
            return Err(errno(OP, &to, libc::EXDEV));
        }
        if self.has_mount_within(&from) {
            return Err(errno(OP, &from, libc::EBUSY));
        }
        self.check_writable(OP, from_parent)?;
        self.check_writable(OP, &to)?;
        fn moved(p: &Path, from: &Path, to: &Path) -> PathBuf {
            p.strip_prefix(from).map_or_else(|_| p.to_owned(), |rel| to.join(rel))
        }
        fn rekey<V>(map: &mut BTreeMap<PathBuf, V>, from: &Path, to: &Path) {
            let keys: Vec<PathBuf> = map.keys().filter(|p| p.starts_with(from)).cloned().collect();
            for k in keys {
                if let Some(v) = map.remove(&k) {
                    map.insert(moved(&k, from, to), v);
                }
            }
        }
        fn reset(set: &mut BTreeSet<PathBuf>, from: &Path, to: &Path) {
            *set = set.iter().map(|p| moved(p, from, to)).collect();
        }
        rekey(&mut self.nodes, &from, &to);
        rekey(&mut self.xattrs, &from, &to);
        rekey(&mut self.filesystems, &from, &to);
        rekey(&mut self.fs_sizes, &from, &to);
        rekey(&mut self.snapshot_sources, &from, &to);
        for source in self.snapshot_sources.values_mut() {
            *source = moved(source, &from, &to);
        }
        reset(&mut self.nocow, &from, &to);
        reset(&mut self.read_only_subvolumes, &from, &to);
        Ok(())
    }

    fn mount(&mut self, request: &MountRequest) -> Result<()> {
        const OP: &str = "mount";
        let target = &request.target;
        let target_node = match self.nodes.get(target) {
            Some(Node::Symlink) => {
                return Err(HostError::Symlink { path: target.clone() });
            }
            Some(n) => n.clone(),
            None if is_root(target) => Node::Dir { subvolume: None },
            None => return Err(errno(OP, target, libc::ENOENT)),
        };
        let target_is_dir = matches!(target_node, Node::Dir { .. });
        match &request.source {
            MountSource::Device { device, fs } => {
                if !self.nodes.contains_key(device) {
                    return Err(errno(OP, device, libc::ENOENT));
                }
                let file = self.data_file(device);
                // Like the kernel: the wrong (or no) filesystem type does not mount.
                if self.filesystems.get(&file).map(String::as_str) != Some(fs.as_str()) {
                    return Err(errno(OP, target, libc::EINVAL));
                }
                if !target_is_dir {
                    return Err(errno(OP, target, libc::ENOTDIR));
                }
            }
            MountSource::Tmpfs if !target_is_dir => return Err(errno(OP, target, libc::ENOTDIR)),
            MountSource::Tmpfs => {}
            MountSource::Bind { source } => {
                let source_is_dir = match self.nodes.get(source) {
                    Some(n) => matches!(n, Node::Dir { .. }),
                    None if is_root(source) => true,
                    None => return Err(errno(OP, source, libc::ENOENT)),
                };
                if source_is_dir != target_is_dir {
                    return Err(errno(OP, target, libc::ENOTDIR));
                }
            }
        }
        let id = self.next_mount_id;
        self.next_mount_id += 1;
        self.mounts.push(FakeMount {
            id,
            request: request.clone(),
        });
        Ok(())
    }

    fn unmount(&mut self, target: &Path) -> Result<Unmounted> {
        let Some(index) = self.mounts.iter().rposition(|m| m.request.target == target) else {
            return Ok(Unmounted::NotMounted);
        };
        if self
            .mounts
            .iter()
            .any(|m| m.request.target != target && m.request.target.starts_with(target))
        {
            return Err(errno("unmount", target, libc::EBUSY));
        }
        let removed = self.mounts.remove(index);
        if !self.is_mount_target(target) {
            // The superblock went with its last mount there.
            self.frozen.remove(target);
        }
        if let MountSource::Device { device, .. } = &removed.request.source {
            // An autoclear loop device goes away with the last mount of it.
            if let Some(n) = self.loop_number(device)
                && !self.device_in_use(device)
                && self.loops.get(&n).is_some_and(|l| l.autoclear)
            {
                self.detach_loop(n);
            }
        }
        Ok(Unmounted::Removed)
    }

    fn mount_entry(&self, m: &FakeMount) -> MountEntry {
        let parent_id = self
            .mount_containing(&m.request.target, Some(m.id))
            .filter(|p| p.id < m.id)
            .map_or(1, |p| p.id);
        let attrs: Vec<&str> = m
            .request
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .filter(|o| ATTRIBUTE_OPTIONS.contains(o))
            .collect();
        let fs_options: Vec<&str> = m
            .request
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .filter(|o| {
                !o.is_empty() && !ATTRIBUTE_OPTIONS.contains(o) && !matches!(*o, "ro" | "rw" | "defaults" | "bind")
            })
            .collect();
        let read_only = m.request.read_only || m.request.options.iter().flat_map(|o| o.split(',')).any(|o| o == "ro");
        let mount_options = std::iter::once(if read_only { "ro" } else { "rw" })
            .chain(attrs)
            .collect::<Vec<_>>()
            .join(",");
        let super_rw = match &m.request.source {
            MountSource::Device { .. } if read_only => "ro",
            _ => "rw",
        };
        let super_options = std::iter::once(super_rw)
            .chain(fs_options)
            .collect::<Vec<_>>()
            .join(",");
        let (major, minor, root, fs_type, source) = match &m.request.source {
            MountSource::Device { device, fs } => {
                let (major, minor) = self.loop_number(device).map_or((8, 0), |n| (7, n));
                (
                    major,
                    minor,
                    PathBuf::from("/"),
                    fs.as_str().to_owned(),
                    device.to_string_lossy().into_owned(),
                )
            }
            MountSource::Tmpfs => (
                0,
                100 + m.id,
                PathBuf::from("/"),
                "tmpfs".to_owned(),
                "tmpfs".to_owned(),
            ),
            MountSource::Bind { source } => match self.mount_containing(source, Some(m.id)).filter(|c| c.id < m.id) {
                Some(c) => {
                    let inner = self.mount_entry(c);
                    let rel = source.strip_prefix(&c.request.target).unwrap_or(source);
                    let root = inner.root.join(rel);
                    (inner.major, inner.minor, root, inner.fs_type, inner.source)
                }
                None => (8, 1, source.clone(), "ext4".to_owned(), "/dev/root".to_owned()),
            },
        };
        MountEntry {
            mount_id: m.id,
            parent_id,
            major,
            minor,
            root,
            mount_point: m.request.target.clone(),
            mount_options,
            fs_type,
            source,
            super_options,
        }
    }
}

fn new_qgroup(mount: PathBuf, id: u64) -> Qgroup {
    Qgroup {
        mount,
        info: QgroupInfo {
            subvolume_id: id,
            // An empty subvolume references one 16 KiB tree block.
            referenced_bytes: 16384,
            exclusive_bytes: 16384,
            max_referenced: None,
        },
    }
}

impl HostOps for RecordingHost {
    fn create_dir_all(&self, path: &Path, mode: u32) -> Result<()> {
        let mut st = self.begin(Call::CreateDirAll {
            path: path.to_owned(),
            mode,
        })?;
        st.create_dir_all(path)
    }

    fn remove_dir(&self, path: &Path) -> Result<()> {
        let mut st = self.begin(Call::RemoveDir { path: path.to_owned() })?;
        match st.nodes.get(path) {
            None => Ok(()),
            Some(Node::Dir { .. }) => st.remove_entry("remove directory", path),
            Some(_) => Err(wrong_type(path, "is not a directory")),
        }
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>> {
        let st = self.begin(Call::ListDir { path: path.to_owned() })?;
        match st.nodes.get(path) {
            None if !is_root(path) => return Ok(Vec::new()),
            None | Some(Node::Dir { .. }) => {}
            Some(_) => return Err(errno("list directory", path, libc::ENOTDIR)),
        }
        let mut names: Vec<String> = st
            .nodes
            .keys()
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> Result<bool> {
        let st = self.begin(Call::Exists { path: path.to_owned() })?;
        Ok(is_root(path) || st.nodes.contains_key(path))
    }

    fn create_image(&self, path: &Path, size: u64, nocow: bool) -> Result<()> {
        let mut st = self.begin(Call::CreateImage {
            path: path.to_owned(),
            size,
            nocow,
        })?;
        st.create_image(path, size)
    }

    fn file_size(&self, path: &Path) -> Result<Option<u64>> {
        let st = self.begin(Call::FileSize { path: path.to_owned() })?;
        match st.nodes.get(path) {
            None => Ok(None),
            Some(Node::File { size }) => Ok(Some(*size)),
            Some(_) => Err(wrong_type(path, "is not a regular file")),
        }
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        let mut st = self.begin(Call::RemoveFile { path: path.to_owned() })?;
        match st.nodes.get(path) {
            None => Ok(()),
            Some(Node::Dir { .. }) => Err(wrong_type(path, "is a directory, not a file")),
            Some(_) => st.remove_entry("remove file", path),
        }
    }

    fn prepare_target(&self, target: &Path, kind: TargetKind) -> Result<()> {
        let mut st = self.begin(Call::PrepareTarget {
            target: target.to_owned(),
            kind,
        })?;
        st.prepare_target(target, kind)
    }

    fn remove_target(&self, target: &Path) -> Result<()> {
        let mut st = self.begin(Call::RemoveTarget {
            target: target.to_owned(),
        })?;
        if !st.nodes.contains_key(target) {
            return Ok(());
        }
        st.remove_entry("remove target", target)
    }

    fn statfs(&self, path: &Path) -> Result<FsStats> {
        let st = self.begin(Call::Statfs { path: path.to_owned() })?;
        if !is_root(path) && !st.nodes.contains_key(path) {
            return Err(errno("statfs", path, libc::ENOENT));
        }
        let set = st
            .statfs
            .iter()
            .filter(|(p, _)| path.starts_with(p))
            .max_by_key(|(p, _)| p.components().count())
            .map(|(_, s)| *s);
        Ok(set.unwrap_or(DEFAULT_STATFS))
    }

    fn btrfs_quota_enable(&self, mount: &Path) -> Result<()> {
        let mut st = self.begin(Call::BtrfsQuotaEnable {
            mount: mount.to_owned(),
        })?;
        if !st.nodes.contains_key(mount) && !is_root(mount) {
            return Err(errno("btrfs quota enable", mount, libc::ENOENT));
        }
        if st.quota_mounts.insert(mount.to_owned()) {
            // Enabling quotas creates a qgroup for every existing subvolume.
            let existing: Vec<u64> = st
                .nodes
                .iter()
                .filter(|(p, _)| p.starts_with(mount))
                .filter_map(|(_, n)| match n {
                    Node::Dir { subvolume: Some(id) } => Some(*id),
                    _ => None,
                })
                .collect();
            for id in existing {
                st.qgroups.entry(id).or_insert_with(|| new_qgroup(mount.to_owned(), id));
            }
        }
        Ok(())
    }

    fn btrfs_subvolume_create(&self, parent: &Path, name: &str) -> Result<u64> {
        let mut st = self.begin(Call::BtrfsSubvolumeCreate {
            parent: parent.to_owned(),
            name: name.to_owned(),
        })?;
        st.subvolume_create(parent, name)
    }

    fn btrfs_subvolume_id(&self, path: &Path) -> Result<u64> {
        let st = self.begin(Call::BtrfsSubvolumeId { path: path.to_owned() })?;
        let btrfs_mount = st.mounts.iter().any(|m| {
            m.request.target == path
                && matches!(
                    m.request.source,
                    MountSource::Device {
                        fs: FileSystem::Btrfs,
                        ..
                    }
                )
        });
        match st.nodes.get(path) {
            _ if btrfs_mount => Ok(5),
            Some(Node::Dir { subvolume: Some(id) }) => Ok(*id),
            Some(_) => Err(wrong_type(path, "is not the root of a btrfs subvolume")),
            None => Err(errno("btrfs subvolume id", path, libc::ENOENT)),
        }
    }

    fn btrfs_subvolume_delete(&self, parent: &Path, name: &str) -> Result<()> {
        let mut st = self.begin(Call::BtrfsSubvolumeDelete {
            parent: parent.to_owned(),
            name: name.to_owned(),
        })?;
        let path = parent.join(name);
        match st.nodes.get(&path) {
            None => Ok(()),
            Some(Node::Dir { subvolume: Some(_) }) => {
                if st.has_mount_within(&path) {
                    return Err(errno("btrfs subvolume delete", &path, libc::EBUSY));
                }
                st.remove_tree(&path);
                Ok(())
            }
            Some(_) => Err(wrong_type(&path, "exists but is not a btrfs subvolume")),
        }
    }

    fn btrfs_subvolume_rename(
        &self,
        from_parent: &Path,
        from_name: &str,
        to_parent: &Path,
        to_name: &str,
    ) -> Result<()> {
        let mut st = self.begin(Call::BtrfsSubvolumeRename {
            from_parent: from_parent.to_owned(),
            from_name: from_name.to_owned(),
            to_parent: to_parent.to_owned(),
            to_name: to_name.to_owned(),
        })?;
        st.subvolume_rename(from_parent, from_name, to_parent, to_name)
    }

    fn btrfs_qgroup_limit(&self, mount: &Path, subvolume_id: u64, max_referenced: Option<u64>) -> Result<()> {
        let mut st = self.begin(Call::BtrfsQgroupLimit {
            mount: mount.to_owned(),
            subvolume_id,
            max_referenced,
        })?;
        const OP: &str = "btrfs qgroup limit";
        if !st.quota_mounts.contains(mount) {
            return Err(errno(OP, mount, libc::ENOTCONN));
        }
        match st.qgroups.get_mut(&subvolume_id) {
            Some(q) if q.mount == mount => {
                q.info.max_referenced = max_referenced;
                Ok(())
            }
            _ => Err(errno(OP, &mount.join(format!("0/{subvolume_id}")), libc::ENOENT)),
        }
    }

    fn btrfs_qgroups(&self, mount: &Path) -> Result<Vec<QgroupInfo>> {
        let st = self.begin(Call::BtrfsQgroups {
            mount: mount.to_owned(),
        })?;
        if !st.quota_mounts.contains(mount) {
            return Err(errno("btrfs qgroup show", mount, libc::ENOTCONN));
        }
        Ok(st
            .qgroups
            .values()
            .filter(|q| q.mount == mount)
            .map(|q| q.info)
            .collect())
    }

    fn btrfs_qgroup_destroy(&self, mount: &Path, subvolume_id: u64) -> Result<()> {
        let mut st = self.begin(Call::BtrfsQgroupDestroy {
            mount: mount.to_owned(),
            subvolume_id,
        })?;
        if st.qgroups.get(&subvolume_id).is_none_or(|q| q.mount != mount) {
            return Ok(());
        }
        // The kernel refuses to destroy the qgroup of a subvolume that still exists.
        let live = st
            .nodes
            .values()
            .any(|n| matches!(n, Node::Dir { subvolume: Some(id) } if *id == subvolume_id));
        if live {
            return Err(errno(
                "btrfs qgroup destroy",
                &mount.join(format!("0/{subvolume_id}")),
                libc::EBUSY,
            ));
        }
        st.qgroups.remove(&subvolume_id);
        Ok(())
    }

    fn btrfs_sync(&self, mount: &Path) -> Result<()> {
        let st = self.begin(Call::BtrfsSync {
            mount: mount.to_owned(),
        })?;
        if !is_root(mount) && !st.nodes.contains_key(mount) {
            return Err(errno("btrfs sync", mount, libc::ENOENT));
        }
        Ok(())
    }

    fn loop_attach(&self, backing: &Path, options: LoopOptions) -> Result<LoopDevice> {
        let mut st = self.begin(Call::LoopAttach {
            backing: backing.to_owned(),
            options,
        })?;
        let size = match st.nodes.get(backing) {
            Some(Node::File { size }) => *size,
            Some(_) => {
                return Err(wrong_type(backing, "a loop device needs a regular file behind it"));
            }
            None => return Err(errno("loop attach", backing, libc::ENOENT)),
        };
        let number = (0..).find(|n| !st.loops.contains_key(n)).unwrap_or(u32::MAX);
        let device = LoopDevice {
            device: PathBuf::from(format!("/dev/loop{number}")),
            number,
            backing_file: backing.to_owned(),
            direct_io: options.direct_io && st.direct_io_supported,
            autoclear: options.autoclear,
            read_only: options.read_only,
        };
        st.nodes.insert(PathBuf::from("/dev"), Node::Dir { subvolume: None });
        st.nodes
            .insert(device.device.clone(), Node::BlockDevice { loop_number: number });
        st.loops.insert(number, device.clone());
        st.loop_capacity.insert(number, size);
        Ok(device)
    }

    fn loop_detach(&self, loop_device: &LoopDevice) -> Result<()> {
        let device = loop_device.device.as_path();
        let mut st = self.begin(Call::LoopDetach {
            device: device.to_owned(),
        })?;
        match st.nodes.get(device) {
            None => Ok(()),
            Some(Node::BlockDevice { loop_number }) => {
                let n = *loop_number;
                if st
                    .loops
                    .get(&n)
                    .is_some_and(|l| l.backing_file != loop_device.backing_file)
                {
                    // Reused for another file since: not ours.
                    return Ok(());
                }
                if st.device_in_use(device) {
                    // Like LOOP_CLR_FD on an open device: detached at the last unmount.
                    if let Some(l) = st.loops.get_mut(&n) {
                        l.autoclear = true;
                    }
                } else {
                    st.detach_loop(n);
                }
                Ok(())
            }
            Some(_) => Err(wrong_type(device, "is not a loop device")),
        }
    }

    fn loop_devices(&self) -> Result<Vec<LoopDevice>> {
        let st = self.begin(Call::LoopDevices)?;
        Ok(st.loops.values().map(|l| st.reported_loop(l)).collect())
    }

    fn loop_device_for(&self, backing: &Path) -> Result<Option<LoopDevice>> {
        let st = self.begin(Call::LoopDeviceFor {
            backing: backing.to_owned(),
        })?;
        Ok(st
            .loops
            .values()
            .find(|l| l.backing_file == backing)
            .map(|l| st.reported_loop(l)))
    }

    fn probe_filesystem(&self, device: &Path) -> Result<Option<String>> {
        let st = self.begin(Call::ProbeFilesystem {
            device: device.to_owned(),
        })?;
        if !st.nodes.contains_key(device) {
            return Err(errno("probe filesystem", device, libc::ENOENT));
        }
        Ok(st.filesystems.get(&st.data_file(device)).cloned())
    }

    fn mkfs(&self, device: &Path, fs: FileSystem) -> Result<()> {
        let mut st = self.begin(Call::Mkfs {
            device: device.to_owned(),
            fs,
        })?;
        if !st.nodes.contains_key(device) {
            return Err(errno("mkfs", device, libc::ENOENT));
        }
        let file = st.data_file(device);
        if let Some(Node::File { size }) = st.nodes.get(&file)
            && *size < fs.min_size()
        {
            return Err(HostError::Command {
                program: format!("mkfs.{}", fs.as_str()),
                status: "exit status: 1".into(),
                stderr: format!("{} bytes is below the minimum of {}", size, fs.min_size()),
            });
        }
        let size = st.device_size(device).unwrap_or(0);
        st.fs_sizes.insert(file.clone(), size);
        st.filesystems.insert(file, fs.as_str().to_owned());
        Ok(())
    }

    fn mount(&self, request: &MountRequest) -> Result<()> {
        let mut st = self.begin(Call::Mount {
            target: request.target.clone(),
            source: request.source.clone(),
            read_only: request.read_only,
            options: request.options.clone(),
        })?;
        st.mount(request)
    }

    fn unmount(&self, target: &Path) -> Result<Unmounted> {
        let mut st = self.begin(Call::Unmount {
            target: target.to_owned(),
        })?;
        st.unmount(target)
    }

    fn is_mount_point(&self, path: &Path) -> Result<bool> {
        let st = self.begin(Call::IsMountPoint { path: path.to_owned() })?;
        Ok(st.mounts.iter().any(|m| m.request.target == path))
    }

    fn mountinfo(&self) -> Result<Vec<MountEntry>> {
        let st = self.begin(Call::Mountinfo)?;
        let root = MountEntry {
            mount_id: 1,
            parent_id: 0,
            major: 8,
            minor: 1,
            root: PathBuf::from("/"),
            mount_point: PathBuf::from("/"),
            mount_options: "rw,relatime".into(),
            fs_type: "ext4".into(),
            source: "/dev/root".into(),
            super_options: "rw".into(),
        };
        Ok(std::iter::once(root)
            .chain(st.mounts.iter().map(|m| st.mount_entry(m)))
            .collect())
    }

    fn btrfs_snapshot(&self, source: &Path, dest_parent: &Path, name: &str, read_only: bool) -> Result<u64> {
        let mut st = self.begin(Call::BtrfsSnapshot {
            source: source.to_owned(),
            dest_parent: dest_parent.to_owned(),
            name: name.to_owned(),
            read_only,
        })?;
        st.snapshot(source, dest_parent, name, read_only)
    }

    fn clone_file(&self, source: &Path, dest: &Path) -> Result<CloneMethod> {
        const OP: &str = "clone file";
        let mut st = self.begin(Call::CloneFile {
            source: source.to_owned(),
            dest: dest.to_owned(),
        })?;
        let size = match st.nodes.get(source) {
            Some(Node::File { size }) => *size,
            Some(Node::Symlink) => {
                return Err(HostError::Symlink {
                    path: source.to_owned(),
                });
            }
            Some(_) => return Err(wrong_type(source, "is not a regular file")),
            None => return Err(errno(OP, source, libc::ENOENT)),
        };
        if st.nodes.contains_key(dest) || is_root(dest) {
            return Err(errno(OP, dest, libc::EEXIST));
        }
        if !st.parent_is_dir(dest) {
            return Err(errno(OP, dest, libc::ENOENT));
        }
        st.check_writable(OP, dest)?;
        st.nodes.insert(dest.to_owned(), Node::File { size });
        // The filesystem inside an image goes along with its bytes.
        match st.filesystems.get(source).cloned() {
            Some(fs) => st.filesystems.insert(dest.to_owned(), fs),
            None => st.filesystems.remove(dest),
        };
        match st.fs_sizes.get(source).copied() {
            Some(n) => st.fs_sizes.insert(dest.to_owned(), n),
            None => st.fs_sizes.remove(dest),
        };
        Ok(if st.can_reflink(source, dest) {
            CloneMethod::Reflink
        } else {
            CloneMethod::Copy
        })
    }

    fn copy_tree(&self, source: &Path, dest: &Path) -> Result<()> {
        const OP: &str = "copy tree";
        let mut st = self.begin(Call::CopyTree {
            source: source.to_owned(),
            dest: dest.to_owned(),
        })?;
        st.expect_dir(OP, source)?;
        st.expect_dir(OP, dest)?;
        if st.has_children(dest) {
            return Err(errno(OP, dest, libc::ENOTEMPTY));
        }
        st.check_writable(OP, dest)?;
        st.copy_nodes(source, dest, false);
        Ok(())
    }

    fn freeze(&self, mount: &Path) -> Result<()> {
        let mut st = self.begin(Call::Freeze {
            mount: mount.to_owned(),
        })?;
        st.expect_mount_root("freeze", mount)?;
        st.frozen.insert(mount.to_owned());
        Ok(())
    }

    fn thaw(&self, mount: &Path) -> Result<()> {
        let mut st = self.begin(Call::Thaw {
            mount: mount.to_owned(),
        })?;
        st.expect_mount_root("thaw", mount)?;
        st.frozen.remove(mount);
        Ok(())
    }

    fn grow_image(&self, path: &Path, size: u64) -> Result<()> {
        const OP: &str = "grow image";
        let mut st = self.begin(Call::GrowImage {
            path: path.to_owned(),
            size,
        })?;
        match st.nodes.get(path) {
            Some(Node::File { size: have }) if *have >= size => Ok(()),
            Some(Node::File { .. }) => {
                st.check_writable(OP, path)?;
                st.nodes.insert(path.to_owned(), Node::File { size });
                Ok(())
            }
            Some(Node::Symlink) => Err(HostError::Symlink { path: path.to_owned() }),
            Some(_) => Err(wrong_type(path, "is not a regular file")),
            None => Err(errno(OP, path, libc::ENOENT)),
        }
    }

    fn loop_set_capacity(&self, device: &Path) -> Result<()> {
        const OP: &str = "loop set capacity";
        let mut st = self.begin(Call::LoopSetCapacity {
            device: device.to_owned(),
        })?;
        match st.nodes.get(device) {
            Some(Node::BlockDevice { loop_number }) => {
                let n = *loop_number;
                let backing = st.data_file(device);
                if let Some(Node::File { size }) = st.nodes.get(&backing) {
                    let size = *size;
                    st.loop_capacity.insert(n, size);
                }
                Ok(())
            }
            Some(_) => Err(wrong_type(device, "is not a block device")),
            None => Err(errno(OP, device, libc::ENOENT)),
        }
    }

    fn grow_filesystem(&self, fs: FileSystem, device: &Path, mount: &Path) -> Result<()> {
        let mut st = self.begin(Call::GrowFilesystem {
            fs,
            device: device.to_owned(),
            mount: mount.to_owned(),
        })?;
        st.grow_filesystem(fs, device, mount)
    }

    fn grow_filesystem_offline(&self, fs: FileSystem, device: &Path) -> Result<()> {
        let st = self.begin(Call::GrowFilesystemOffline {
            fs,
            device: device.to_owned(),
        })?;
        if fs != FileSystem::Ext4 {
            return Err(HostError::Unsupported(format!("{} only grows mounted", fs.as_str())));
        }
        if !st.nodes.contains_key(device) {
            return Err(errno("grow filesystem offline", device, libc::ENOENT));
        }
        Ok(())
    }

    fn reconfigure(&self, mount: &Path, options: &[String]) -> Result<()> {
        let mut st = self.begin(Call::Reconfigure {
            mount: mount.to_owned(),
            options: options.to_vec(),
        })?;
        st.reconfigure(mount, options)
    }

    fn set_xattr(&self, path: &Path, name: &str, value: &[u8]) -> Result<()> {
        const OP: &str = "set xattr";
        let mut st = self.begin(Call::SetXattr {
            path: path.to_owned(),
            name: name.to_owned(),
            value: value.to_vec(),
        })?;
        if !is_root(path) && !st.nodes.contains_key(path) {
            return Err(errno(OP, path, libc::ENOENT));
        }
        if name.is_empty() || !name.contains('.') {
            // Names need a namespace prefix (`user.`, `trusted.`, `btrfs.`, ...).
            return Err(errno(OP, path, libc::EOPNOTSUPP));
        }
        st.check_writable(OP, path)?;
        if name == "btrfs.compression" {
            if value.is_empty() {
                // btrfs: an empty value resets the property.
                if let Some(x) = st.xattrs.get_mut(path) {
                    x.remove(name);
                }
                return Ok(());
            }
            if st.nocow.contains(path) {
                // btrfs refuses compression on a NOCOW inode.
                return Err(errno(OP, path, libc::EINVAL));
            }
        }
        st.xattrs
            .entry(path.to_owned())
            .or_default()
            .insert(name.to_owned(), value.to_vec());
        Ok(())
    }

    fn set_nocow(&self, dir: &Path, on: bool) -> Result<()> {
        const OP: &str = "set nocow";
        let mut st = self.begin(Call::SetNocow {
            path: dir.to_owned(),
            on,
        })?;
        if !matches!(st.nodes.get(dir), Some(Node::Dir { .. })) {
            return Err(errno(OP, dir, libc::ENOENT));
        }
        st.check_writable(OP, dir)?;
        if on {
            // btrfs refuses NOCOW while a compression property is set.
            if st.xattrs.get(dir).is_some_and(|x| x.contains_key("btrfs.compression")) {
                return Err(errno(OP, dir, libc::EINVAL));
            }
            st.nocow.insert(dir.to_owned());
        } else {
            st.nocow.remove(dir);
        }
        Ok(())
    }

    fn get_xattr(&self, path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
        let st = self.begin(Call::GetXattr {
            path: path.to_owned(),
            name: name.to_owned(),
        })?;
        if !is_root(path) && !st.nodes.contains_key(path) {
            return Err(errno("get xattr", path, libc::ENOENT));
        }
        Ok(st.xattrs.get(path).and_then(|x| x.get(name)).cloned())
    }

    fn set_block_read_only(&self, device: &Path, read_only: bool) -> Result<()> {
        let mut st = self.begin(Call::SetBlockReadOnly {
            device: device.to_owned(),
            read_only,
        })?;
        match st.nodes.get(device) {
            Some(Node::BlockDevice { loop_number }) => {
                let n = *loop_number;
                if read_only {
                    st.block_read_only.insert(n);
                } else {
                    st.block_read_only.remove(&n);
                }
                Ok(())
            }
            Some(_) => Err(wrong_type(device, "is not a block device")),
            None => Err(errno("set block device read-only", device, libc::ENOENT)),
        }
    }

    fn block_device_size(&self, device: &Path) -> Result<u64> {
        let st = self.begin(Call::BlockDeviceSize {
            device: device.to_owned(),
        })?;
        match st.nodes.get(device) {
            Some(Node::BlockDevice { .. }) => Ok(st.device_size(device).unwrap_or(0)),
            Some(_) => Err(wrong_type(device, "is not a block device")),
            None => Err(errno("block device size", device, libc::ENOENT)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn io_errno(r: Result<impl std::fmt::Debug>) -> Option<i32> {
        r.err().and_then(|e| e.errno())
    }

    #[test]
    fn records_calls_in_order_and_filters_reads() {
        let host = RecordingHost::new();
        host.create_dir_all(&p("/pool/a"), 0o700).unwrap();
        assert!(host.exists(&p("/pool/a")).unwrap());
        host.create_image(&p("/pool/a/img"), MIB, true).unwrap();
        assert_eq!(
            host.calls(),
            vec![
                Call::CreateDirAll {
                    path: p("/pool/a"),
                    mode: 0o700
                },
                Call::Exists { path: p("/pool/a") },
                Call::CreateImage {
                    path: p("/pool/a/img"),
                    size: MIB,
                    nocow: true
                },
            ]
        );
        assert_eq!(host.mutating_calls().len(), 2);
        host.clear_calls();
        assert!(host.calls().is_empty());
        assert_eq!(host.files(), BTreeMap::from([(p("/pool/a/img"), MIB)]));
        assert!(host.dirs().contains(&p("/pool")));
    }

    #[test]
    fn fail_next_fails_once_and_leaves_state_alone() {
        let host = RecordingHost::new();
        host.add_dir("/pool");
        host.fail_next("create_image", libc::ENOSPC);
        assert_eq!(
            io_errno(host.create_image(&p("/pool/img"), MIB, false)),
            Some(libc::ENOSPC)
        );
        assert!(host.files().is_empty());
        host.create_image(&p("/pool/img"), MIB, false).unwrap();
        assert_eq!(host.calls().len(), 2, "failed calls are recorded too");
    }

    #[test]
    #[should_panic(expected = "not a HostOps operation")]
    fn fail_next_rejects_unknown_ops() {
        RecordingHost::new().fail_next("mount_it", libc::EIO);
    }

    #[test]
    fn files_and_images_are_idempotent() {
        let host = RecordingHost::new();
        assert_eq!(
            io_errno(host.create_image(&p("/missing/img"), MIB, false)),
            Some(libc::ENOENT)
        );
        host.add_dir("/d");
        host.create_image(&p("/d/img"), MIB, false).unwrap();
        host.create_image(&p("/d/img"), MIB, false).unwrap();
        assert!(matches!(
            host.create_image(&p("/d/img"), 2 * MIB, false),
            Err(HostError::WrongType { .. })
        ));
        host.add_file("/d/crashed", 0);
        host.create_image(&p("/d/crashed"), MIB, false).unwrap();
        assert_eq!(host.file_size(&p("/d/crashed")).unwrap(), Some(MIB));
        assert_eq!(host.file_size(&p("/d/none")).unwrap(), None);
        assert!(host.file_size(&p("/d")).is_err());
        assert_eq!(host.list_dir(&p("/d")).unwrap(), vec!["crashed", "img"]);
        assert!(host.list_dir(&p("/nope")).unwrap().is_empty());
        assert_eq!(io_errno(host.remove_dir(&p("/d"))), Some(libc::ENOTEMPTY));
        host.remove_file(&p("/d/img")).unwrap();
        host.remove_file(&p("/d/img")).unwrap();
        host.remove_file(&p("/d/crashed")).unwrap();
        host.remove_dir(&p("/d")).unwrap();
        host.remove_dir(&p("/d")).unwrap();
        assert!(!host.exists(&p("/d")).unwrap());
    }

    #[test]
    fn targets_follow_the_contract() {
        let host = RecordingHost::new();
        host.add_dir("/pods/x");
        assert_eq!(
            io_errno(host.prepare_target(&p("/pods/nope/t"), TargetKind::Directory)),
            Some(libc::ENOENT)
        );
        host.prepare_target(&p("/pods/x/dir"), TargetKind::Directory).unwrap();
        host.prepare_target(&p("/pods/x/dir"), TargetKind::Directory).unwrap();
        // An empty directory becomes a file for a block target.
        host.prepare_target(&p("/pods/x/dir"), TargetKind::File).unwrap();
        assert!(host.files().contains_key(&p("/pods/x/dir")));
        assert!(matches!(
            host.prepare_target(&p("/pods/x/dir"), TargetKind::Directory),
            Err(HostError::WrongType { .. })
        ));
        host.add_file("/pods/x/full/f", 1);
        assert!(matches!(
            host.prepare_target(&p("/pods/x/full"), TargetKind::File),
            Err(HostError::WrongType { .. })
        ));
        host.add_symlink("/pods/x/link");
        assert!(matches!(
            host.prepare_target(&p("/pods/x/link"), TargetKind::Directory),
            Err(HostError::Symlink { .. })
        ));
        host.remove_target(&p("/pods/x/dir")).unwrap();
        host.remove_target(&p("/pods/x/dir")).unwrap();
        host.remove_target(&p("/pods/x/link")).unwrap();
    }

    #[test]
    fn subvolumes_and_qgroups() {
        let host = RecordingHost::new();
        host.add_dir("/pool");
        let before_quota = host.btrfs_subvolume_create(&p("/pool"), "old").unwrap();
        assert_eq!(
            io_errno(host.btrfs_qgroup_limit(&p("/pool"), before_quota, Some(MIB))),
            Some(libc::ENOTCONN)
        );
        host.btrfs_quota_enable(&p("/pool")).unwrap();
        host.btrfs_quota_enable(&p("/pool")).unwrap();
        let id = host.btrfs_subvolume_create(&p("/pool"), "v1").unwrap();
        assert_eq!(host.btrfs_subvolume_create(&p("/pool"), "v1").unwrap(), id);
        assert_ne!(id, before_quota);
        assert_eq!(host.btrfs_subvolume_id(&p("/pool/v1")).unwrap(), id);
        assert!(matches!(
            host.btrfs_subvolume_create(&p("/pool"), "a/b"),
            Err(HostError::WrongType { .. })
        ));

        host.btrfs_qgroup_limit(&p("/pool"), id, Some(10 * MIB)).unwrap();
        host.set_qgroup_usage(id, 3 * MIB, 2 * MIB);
        let groups = host.btrfs_qgroups(&p("/pool")).unwrap();
        assert_eq!(groups.len(), 2, "quota enable adopts existing subvolumes");
        let q = groups.iter().find(|q| q.subvolume_id == id).unwrap();
        assert_eq!(
            *q,
            QgroupInfo {
                subvolume_id: id,
                referenced_bytes: 3 * MIB,
                exclusive_bytes: 2 * MIB,
                max_referenced: Some(10 * MIB)
            }
        );
        assert_eq!(
            io_errno(host.btrfs_qgroup_limit(&p("/pool"), 999, None)),
            Some(libc::ENOENT)
        );

        host.add_file("/pool/v1/data/f", 5);
        assert_eq!(io_errno(host.btrfs_qgroup_destroy(&p("/pool"), id)), Some(libc::EBUSY));
        host.btrfs_subvolume_delete(&p("/pool"), "v1").unwrap();
        host.btrfs_subvolume_delete(&p("/pool"), "v1").unwrap();
        assert!(host.files().is_empty(), "delete removes the contents");
        assert_eq!(host.subvolumes(), BTreeMap::from([(p("/pool/old"), before_quota)]));
        host.btrfs_qgroup_destroy(&p("/pool"), id).unwrap();
        host.btrfs_qgroup_destroy(&p("/pool"), id).unwrap();
        assert_eq!(host.qgroups().len(), 1);
        host.add_dir("/pool/plain");
        assert!(matches!(
            host.btrfs_subvolume_delete(&p("/pool"), "plain"),
            Err(HostError::WrongType { .. })
        ));
    }

    #[test]
    fn subvolume_rename_moves_the_tree_and_keeps_the_qgroup() {
        let host = RecordingHost::new();
        host.add_dir("/pool/spares");
        host.add_dir("/pool/volumes");
        host.btrfs_quota_enable(&p("/pool")).unwrap();
        let id = host.btrfs_subvolume_create(&p("/pool/spares"), "s1").unwrap();
        host.set_nocow(&p("/pool/spares/s1"), true).unwrap();
        host.add_file("/pool/spares/s1/f", 5);
        host.btrfs_subvolume_rename(&p("/pool/spares"), "s1", &p("/pool/volumes"), "v1")
            .unwrap();
        assert_eq!(host.subvolumes(), BTreeMap::from([(p("/pool/volumes/v1"), id)]));
        assert!(host.nocow(&p("/pool/volumes/v1")) && !host.nocow(&p("/pool/spares/s1")));
        assert!(host.files().contains_key(&p("/pool/volumes/v1/f")));
        assert_eq!(host.btrfs_subvolume_id(&p("/pool/volumes/v1")).unwrap(), id);
        host.btrfs_qgroup_limit(&p("/pool"), id, Some(MIB)).unwrap();

        // Not idempotent, never replaces, only subvolumes, single names.
        let rename =
            |from: &str, to: &str| host.btrfs_subvolume_rename(&p("/pool/spares"), from, &p("/pool/volumes"), to);
        assert_eq!(io_errno(rename("s1", "v2")), Some(libc::ENOENT));
        host.btrfs_subvolume_create(&p("/pool/spares"), "s2").unwrap();
        assert_eq!(io_errno(rename("s2", "v1")), Some(libc::EEXIST));
        host.add_dir("/pool/spares/plain");
        assert!(matches!(rename("plain", "v3"), Err(HostError::WrongType { .. })));
        assert!(matches!(rename("s2", "../v3"), Err(HostError::WrongType { .. })));
        assert!(host.subvolumes().contains_key(&p("/pool/spares/s2")));
    }

    fn stage_ext4(host: &RecordingHost, autoclear: bool) -> (LoopDevice, PathBuf) {
        host.add_dir("/pool/vols");
        host.add_dir("/stage/v1");
        host.create_image(&p("/pool/vols/v1.img"), 64 * MIB, true).unwrap();
        let options = LoopOptions {
            read_only: false,
            direct_io: true,
            autoclear,
        };
        let dev = host.loop_attach(&p("/pool/vols/v1.img"), options).unwrap();
        if host.probe_filesystem(&dev.device).unwrap().is_none() {
            host.mkfs(&dev.device, FileSystem::Ext4).unwrap();
        }
        let target = p("/stage/v1");
        host.mount(&MountRequest {
            source: MountSource::Device {
                device: dev.device.clone(),
                fs: FileSystem::Ext4,
            },
            target: target.clone(),
            read_only: false,
            options: vec!["noatime".into()],
        })
        .unwrap();
        (dev, target)
    }

    #[test]
    fn loop_mkfs_mount_sequence() {
        let host = RecordingHost::new();
        let (dev, target) = stage_ext4(&host, false);
        assert_eq!(dev.device, p("/dev/loop0"));
        assert!(dev.direct_io);
        let ops: Vec<&str> = host.calls().iter().map(Call::op).collect();
        assert_eq!(
            ops,
            ["create_image", "loop_attach", "probe_filesystem", "mkfs", "mount"]
        );
        assert!(matches!(&host.calls()[4], Call::Mount { target: t, .. } if *t == target));
        assert_eq!(host.filesystem_of(&p("/pool/vols/v1.img")).as_deref(), Some("ext4"));
        assert_eq!(host.probe_filesystem(&dev.device).unwrap().as_deref(), Some("ext4"));

        // Mounting the wrong filesystem type fails like the kernel does.
        host.add_dir("/other");
        let wrong = MountRequest {
            source: MountSource::Device {
                device: dev.device.clone(),
                fs: FileSystem::Xfs,
            },
            target: p("/other"),
            read_only: false,
            options: vec![],
        };
        assert_eq!(io_errno(host.mount(&wrong)), Some(libc::EINVAL));

        // Detaching a mounted device is lazy: it goes with the unmount.
        host.loop_detach(&dev).unwrap();
        assert_eq!(host.attached_loops().len(), 1);
        assert_eq!(host.unmount(&target).unwrap(), Unmounted::Removed);
        assert_eq!(host.unmount(&target).unwrap(), Unmounted::NotMounted);
        assert!(host.attached_loops().is_empty());
        host.loop_detach(&dev).unwrap();
    }

    #[test]
    fn autoclear_devices_go_with_their_last_unmount() {
        let host = RecordingHost::new();
        let (dev, target) = stage_ext4(&host, true);
        assert_eq!(host.loop_devices().unwrap(), vec![dev.clone()]);
        host.unmount(&target).unwrap();
        assert!(host.loop_devices().unwrap().is_empty());
    }

    #[test]
    fn direct_io_fallback_is_reported() {
        let host = RecordingHost::new();
        host.set_direct_io_supported(false);
        host.add_file("/img", MIB);
        let options = LoopOptions {
            read_only: true,
            direct_io: true,
            autoclear: false,
        };
        let dev = host.loop_attach(&p("/img"), options).unwrap();
        assert!(!dev.direct_io && dev.read_only);
        assert_eq!(host.loop_attach(&p("/img"), options).unwrap().number, 1);
    }

    #[test]
    fn mkfs_refuses_too_small_xfs() {
        let host = RecordingHost::new();
        host.add_file("/small.img", 100 * MIB);
        assert!(matches!(
            host.mkfs(&p("/small.img"), FileSystem::Xfs),
            Err(HostError::Command { .. })
        ));
        host.mkfs(&p("/small.img"), FileSystem::Ext4).unwrap();
    }

    #[test]
    fn mounts_stack_and_mountinfo_follows() {
        let host = RecordingHost::new();
        let (dev, staged) = stage_ext4(&host, false);
        host.add_dir("/stage/v1/data");
        host.add_dir("/pods/a/vol");
        host.add_symlink("/pods/a/evil");
        let publish = |target: &str, read_only: bool| MountRequest {
            source: MountSource::Bind {
                source: p("/stage/v1/data"),
            },
            target: p(target),
            read_only,
            options: vec!["nosuid,nodev".into()],
        };
        assert!(matches!(
            host.mount(&publish("/pods/a/evil", false)),
            Err(HostError::Symlink { .. })
        ));
        host.mount(&publish("/pods/a/vol", true)).unwrap();
        host.mount(&MountRequest {
            source: MountSource::Tmpfs,
            target: p("/pods/a/vol"),
            read_only: false,
            options: vec!["size=1M".into()],
        })
        .unwrap();
        assert_eq!(host.mounts().len(), 3);

        let info = host.mountinfo().unwrap();
        let stage = info.iter().find(|e| e.mount_point == staged).unwrap();
        assert_eq!((stage.major, stage.minor), (7, dev.number));
        assert_eq!(stage.fs_type, "ext4");
        assert_eq!(stage.mount_options, "rw,noatime");
        let binds: Vec<&MountEntry> = info.iter().filter(|e| e.mount_point == p("/pods/a/vol")).collect();
        assert_eq!(binds.len(), 2);
        assert_eq!(binds[0].root, p("/data"));
        assert_eq!(binds[0].source, dev.device.to_string_lossy());
        assert!(binds[0].is_read_only() && binds[0].has_mount_option("nosuid"));
        assert_eq!(binds[1].fs_type, "tmpfs");
        assert_eq!(binds[1].parent_id, binds[0].mount_id);
        assert_eq!(binds[1].super_option("size"), Some("1M"));

        // Stacked mounts come off one at a time, newest first.
        assert_eq!(host.unmount(&p("/pods/a/vol")).unwrap(), Unmounted::Removed);
        assert_eq!(host.unmount(&p("/pods/a/vol")).unwrap(), Unmounted::Removed);
        assert_eq!(host.unmount(&p("/pods/a/vol")).unwrap(), Unmounted::NotMounted);
        host.add_dir("/stage/v1/inner");
        host.mount(&MountRequest {
            source: MountSource::Tmpfs,
            target: p("/stage/v1/inner"),
            read_only: false,
            options: vec![],
        })
        .unwrap();
        // A mount beneath keeps it busy; binds of it elsewhere (gone by now) would not.
        assert_eq!(io_errno(host.unmount(&staged)), Some(libc::EBUSY));
        assert_eq!(io_errno(host.remove_target(&p("/stage/v1/inner"))), Some(libc::EBUSY));
        host.unmount(&p("/stage/v1/inner")).unwrap();
        host.unmount(&staged).unwrap();
        assert_eq!(host.mountinfo().unwrap().len(), 1);
    }

    #[test]
    fn block_device_bind_onto_a_file() {
        let host = RecordingHost::new();
        host.add_file("/pool/blk.img", MIB);
        host.add_dir("/pods/b");
        let dev = host
            .loop_attach(
                &p("/pool/blk.img"),
                LoopOptions {
                    read_only: false,
                    direct_io: true,
                    autoclear: false,
                },
            )
            .unwrap();
        host.prepare_target(&p("/pods/b/dev"), TargetKind::File).unwrap();
        let bind = |target: &str| MountRequest {
            source: MountSource::Bind {
                source: dev.device.clone(),
            },
            target: p(target),
            read_only: false,
            options: vec![],
        };
        host.mount(&bind("/pods/b/dev")).unwrap();
        assert_eq!(io_errno(host.mount(&bind("/pods/b"))), Some(libc::ENOTDIR));
        assert_eq!(host.unmount(&p("/pods/b/dev")).unwrap(), Unmounted::Removed);
        host.remove_target(&p("/pods/b/dev")).unwrap();
    }

    #[test]
    fn statfs_uses_the_closest_setting() {
        let host = RecordingHost::new();
        host.add_dir("/pool/v1");
        let custom = FsStats {
            total_bytes: 7,
            ..DEFAULT_STATFS
        };
        host.set_statfs("/pool", custom);
        assert_eq!(host.statfs(&p("/pool/v1")).unwrap(), custom);
        assert_eq!(host.statfs(&p("/")).unwrap(), DEFAULT_STATFS);
        assert_eq!(io_errno(host.statfs(&p("/nope"))), Some(libc::ENOENT));
    }

    // ---- snapshots, clones, expansion ----

    /// A quota-enabled btrfs pool at /pool (by statfs) with subvolume v1 holding a file, a
    /// formatted image and a nested subvolume.
    fn pool_with_v1(host: &RecordingHost) -> u64 {
        host.add_dir("/pool");
        host.set_statfs(
            "/pool",
            FsStats {
                fs_type: crate::magic::BTRFS,
                ..DEFAULT_STATFS
            },
        );
        host.btrfs_quota_enable(&p("/pool")).unwrap();
        let id = host.btrfs_subvolume_create(&p("/pool"), "v1").unwrap();
        host.btrfs_qgroup_limit(&p("/pool"), id, Some(10 * MIB)).unwrap();
        host.add_file("/pool/v1/dir/file", 5);
        host.add_file("/pool/v1/disk.img", 64 * MIB);
        host.mkfs(&p("/pool/v1/disk.img"), FileSystem::Ext4).unwrap();
        host.btrfs_subvolume_create(&p("/pool/v1"), "nested").unwrap();
        host.add_file("/pool/v1/nested/inner", 1);
        id
    }

    #[test]
    fn snapshots_copy_the_tree_and_read_only_ones_refuse_writes() {
        let host = RecordingHost::new();
        let v1 = pool_with_v1(&host);
        host.set_xattr(&p("/pool/v1"), "btrfs.compression", b"zstd").unwrap();
        host.clear_calls();
        let snap = host.btrfs_snapshot(&p("/pool/v1"), &p("/pool"), "snap", true).unwrap();
        assert_eq!(
            host.btrfs_snapshot(&p("/pool/v1"), &p("/pool"), "snap", true).unwrap(),
            snap
        );
        assert_ne!(snap, v1);
        assert_eq!(
            host.calls()[0],
            Call::BtrfsSnapshot {
                source: p("/pool/v1"),
                dest_parent: p("/pool"),
                name: "snap".into(),
                read_only: true
            }
        );
        assert_eq!(host.btrfs_subvolume_id(&p("/pool/snap")).unwrap(), snap);
        assert_eq!(host.snapshot_source(&p("/pool/snap")), Some(p("/pool/v1")));
        assert!(host.is_read_only_subvolume(&p("/pool/snap")));
        assert_eq!(host.files().get(&p("/pool/snap/dir/file")), Some(&5));
        assert_eq!(host.filesystem_of(&p("/pool/snap/disk.img")).as_deref(), Some("ext4"));
        // Nested subvolumes are not part of a snapshot: an empty directory stands in.
        assert!(host.dirs().contains(&p("/pool/snap/nested")));
        assert!(!host.files().contains_key(&p("/pool/snap/nested/inner")));
        assert!(!host.subvolumes().contains_key(&p("/pool/snap/nested")));
        assert_eq!(
            host.get_xattr(&p("/pool/snap"), "btrfs.compression")
                .unwrap()
                .as_deref(),
            Some(&b"zstd"[..])
        );
        // The kernel gives the snapshot its own qgroup with the source's limit.
        let q = host.qgroups().into_iter().find(|q| q.subvolume_id == snap).unwrap();
        assert_eq!(q.max_referenced, Some(10 * MIB));

        for r in [
            host.create_image(&p("/pool/snap/new.img"), MIB, false).map(|_| ()),
            host.create_dir_all(&p("/pool/snap/newdir"), 0o700),
            host.remove_file(&p("/pool/snap/dir/file")),
            host.grow_image(&p("/pool/snap/disk.img"), 128 * MIB),
            host.clone_file(&p("/pool/v1/dir/file"), &p("/pool/snap/f2"))
                .map(|_| ()),
            host.set_xattr(&p("/pool/snap"), "user.x", b"1"),
        ] {
            assert_eq!(io_errno(r), Some(libc::EROFS));
        }
        // A writable snapshot (a clone) takes writes; the source is unchanged.
        let clone = host
            .btrfs_snapshot(&p("/pool/snap"), &p("/pool"), "clone", false)
            .unwrap();
        assert!(clone > snap && !host.is_read_only_subvolume(&p("/pool/clone")));
        host.create_image(&p("/pool/clone/new.img"), MIB, false).unwrap();
        host.remove_file(&p("/pool/clone/dir/file")).unwrap();
        assert!(host.files().contains_key(&p("/pool/v1/dir/file")));
        assert!(!host.files().contains_key(&p("/pool/v1/new.img")));

        // Deleting a read-only snapshot works and forgets it.
        host.btrfs_subvolume_delete(&p("/pool"), "snap").unwrap();
        assert!(!host.is_read_only_subvolume(&p("/pool/snap")));
        assert_eq!(host.snapshot_source(&p("/pool/snap")), None);

        assert!(matches!(
            host.btrfs_snapshot(&p("/pool/v1/dir"), &p("/pool"), "x", true),
            Err(HostError::WrongType { .. })
        ));
        host.add_dir("/pool/plain");
        assert!(matches!(
            host.btrfs_snapshot(&p("/pool/v1"), &p("/pool"), "plain", true),
            Err(HostError::WrongType { .. })
        ));
        assert_eq!(
            io_errno(host.btrfs_snapshot(&p("/pool/gone"), &p("/pool"), "y", true)),
            Some(libc::ENOENT)
        );
        host.fail_next("btrfs_snapshot", libc::ENOSPC);
        assert_eq!(
            io_errno(host.btrfs_snapshot(&p("/pool/v1"), &p("/pool"), "z", false)),
            Some(libc::ENOSPC)
        );
        assert!(!host.dirs().contains(&p("/pool/z")));
    }

    #[test]
    fn clone_file_reflinks_within_one_btrfs_and_copies_across() {
        let host = RecordingHost::new();
        pool_with_v1(&host);
        host.add_dir("/other");
        let src = p("/pool/v1/disk.img");
        assert_eq!(
            host.clone_file(&src, &p("/pool/copy.img")).unwrap(),
            CloneMethod::Reflink
        );
        assert_eq!(host.files().get(&p("/pool/copy.img")), Some(&(64 * MIB)));
        assert_eq!(host.filesystem_of(&p("/pool/copy.img")).as_deref(), Some("ext4"));
        assert_eq!(host.clone_file(&src, &p("/other/copy.img")).unwrap(), CloneMethod::Copy);
        assert_eq!(
            io_errno(host.clone_file(&src, &p("/pool/copy.img"))),
            Some(libc::EEXIST)
        );
        assert_eq!(
            io_errno(host.clone_file(&p("/pool/none"), &p("/pool/x"))),
            Some(libc::ENOENT)
        );
        assert_eq!(io_errno(host.clone_file(&src, &p("/nodir/x"))), Some(libc::ENOENT));
        assert!(matches!(
            host.clone_file(&p("/pool/v1"), &p("/pool/y")),
            Err(HostError::WrongType { .. })
        ));
        // A tmpfs mounted inside the pool is another filesystem.
        host.add_dir("/pool/tmp");
        host.mount(&MountRequest {
            source: MountSource::Tmpfs,
            target: p("/pool/tmp"),
            read_only: false,
            options: vec![],
        })
        .unwrap();
        assert_eq!(host.clone_file(&src, &p("/pool/tmp/c")).unwrap(), CloneMethod::Copy);
        host.set_reflink_supported(false);
        assert_eq!(host.clone_file(&src, &p("/pool/c2")).unwrap(), CloneMethod::Copy);
        host.fail_next("clone_file", libc::ENOSPC);
        assert_eq!(io_errno(host.clone_file(&src, &p("/pool/c3"))), Some(libc::ENOSPC));
        assert!(!host.files().contains_key(&p("/pool/c3")));
        assert!(matches!(
            host.calls().last(),
            Some(Call::CloneFile { dest, .. }) if *dest == p("/pool/c3")
        ));
    }

    #[test]
    fn copy_tree_copies_into_an_empty_directory() {
        let host = RecordingHost::new();
        host.add_file("/src/a/b/f", 3);
        host.add_symlink("/src/a/link");
        host.add_dir("/src/empty");
        host.add_dir("/dest");
        host.copy_tree(&p("/src"), &p("/dest")).unwrap();
        assert_eq!(host.files().get(&p("/dest/a/b/f")), Some(&3));
        assert!(host.dirs().contains(&p("/dest/empty")));
        assert_eq!(host.list_dir(&p("/dest/a")).unwrap(), vec!["b", "link"]);
        assert_eq!(io_errno(host.copy_tree(&p("/src"), &p("/dest"))), Some(libc::ENOTEMPTY));
        assert_eq!(io_errno(host.copy_tree(&p("/src"), &p("/missing"))), Some(libc::ENOENT));
        assert!(matches!(
            host.copy_tree(&p("/src/a/link"), &p("/dest")),
            Err(HostError::Symlink { .. })
        ));
    }

    #[test]
    fn freeze_and_thaw_are_idempotent_per_mount() {
        let host = RecordingHost::new();
        let (_, target) = stage_ext4(&host, false);
        assert!(matches!(host.freeze(&p("/stage")), Err(HostError::WrongType { .. })));
        host.freeze(&target).unwrap();
        host.freeze(&target).unwrap();
        assert_eq!(host.frozen(), BTreeSet::from([target.clone()]));
        host.thaw(&target).unwrap();
        host.thaw(&target).unwrap();
        assert!(host.frozen().is_empty());
        host.fail_next("thaw", libc::EIO);
        assert_eq!(io_errno(host.thaw(&target)), Some(libc::EIO));
        let ops: Vec<&str> = host.mutating_calls().iter().map(Call::op).collect();
        assert_eq!(
            ops[ops.len() - 6..],
            ["freeze", "freeze", "freeze", "thaw", "thaw", "thaw"]
        );
    }

    #[test]
    fn growing_an_image_its_loop_device_and_filesystem() {
        let host = RecordingHost::new();
        let (dev, target) = stage_ext4(&host, false);
        let image = p("/pool/vols/v1.img");
        host.set_statfs(&target, DEFAULT_STATFS);
        assert_eq!(host.block_device_size(&dev.device).unwrap(), 64 * MIB);
        assert_eq!(host.filesystem_size(&image), Some(64 * MIB));

        host.grow_image(&image, 128 * MIB).unwrap();
        host.grow_image(&image, 32 * MIB).unwrap();
        assert_eq!(host.file_size(&image).unwrap(), Some(128 * MIB));
        assert_eq!(host.block_device_size(&dev.device).unwrap(), 64 * MIB);
        // Nothing to grow into before the loop device sees the new size.
        host.grow_filesystem(FileSystem::Ext4, &dev.device, &target).unwrap();
        assert_eq!(host.filesystem_size(&image), Some(64 * MIB));
        host.loop_set_capacity(&dev.device).unwrap();
        assert_eq!(host.block_device_size(&dev.device).unwrap(), 128 * MIB);

        host.grow_filesystem(FileSystem::Ext4, &dev.device, &target).unwrap();
        host.grow_filesystem(FileSystem::Ext4, &dev.device, &target).unwrap();
        assert_eq!(host.filesystem_size(&image), Some(128 * MIB));
        let st = host.statfs(&target).unwrap();
        assert_eq!(st.total_bytes, DEFAULT_STATFS.total_bytes + 64 * MIB);
        assert!(matches!(
            host.grow_filesystem(FileSystem::Xfs, &dev.device, &target),
            Err(HostError::WrongType { .. })
        ));
        assert!(matches!(
            host.block_device_size(&image),
            Err(HostError::WrongType { .. })
        ));
        assert_eq!(io_errno(host.grow_image(&p("/pool/none"), MIB)), Some(libc::ENOENT));
        assert_eq!(io_errno(host.loop_set_capacity(&p("/dev/loop9"))), Some(libc::ENOENT));
    }

    #[test]
    fn reconfigure_merges_options_into_the_mount() {
        let host = RecordingHost::new();
        host.add_dir("/t");
        host.mount(&MountRequest {
            source: MountSource::Tmpfs,
            target: p("/t"),
            read_only: false,
            options: vec!["size=1M,mode=0750".into(), "nosuid".into()],
        })
        .unwrap();
        host.reconfigure(&p("/t"), &["size=4M".into(), "nr_inodes=100".into()])
            .unwrap();
        let entry = host
            .mountinfo()
            .unwrap()
            .into_iter()
            .find(|e| e.mount_point == p("/t"))
            .unwrap();
        assert_eq!(entry.super_option("size"), Some("4M"));
        assert_eq!(entry.super_option("nr_inodes"), Some("100"));
        assert_eq!(entry.super_option("mode"), Some("0750"));
        assert!(entry.has_mount_option("nosuid"));
        host.reconfigure(&p("/t"), &["ro".into()]).unwrap();
        assert!(
            host.mountinfo()
                .unwrap()
                .iter()
                .any(|e| e.mount_point == p("/t") && e.is_read_only())
        );
        host.reconfigure(&p("/t"), &["rw".into()]).unwrap();
        assert!(host.mounts()[0].options.iter().all(|o| o != "ro") && !host.mounts()[0].read_only);
        assert_eq!(
            io_errno(host.reconfigure(&p("/"), &["size=1M".into()])),
            Some(libc::EINVAL)
        );
        assert_eq!(
            host.calls()[1],
            Call::Reconfigure {
                mount: p("/t"),
                options: vec!["size=4M".into(), "nr_inodes=100".into()]
            }
        );
    }

    #[test]
    fn xattrs_round_trip() {
        let host = RecordingHost::new();
        host.add_dir("/pool/v");
        assert_eq!(host.get_xattr(&p("/pool/v"), "btrfs.compression").unwrap(), None);
        host.set_xattr(&p("/pool/v"), "btrfs.compression", b"zstd").unwrap();
        assert_eq!(
            host.get_xattr(&p("/pool/v"), "btrfs.compression").unwrap(),
            Some(b"zstd".to_vec())
        );
        assert_eq!(host.xattrs(&p("/pool/v")).len(), 1);
        assert_eq!(io_errno(host.get_xattr(&p("/nope"), "user.a")), Some(libc::ENOENT));
        assert_eq!(
            io_errno(host.set_xattr(&p("/pool/v"), "noprefix", b"")),
            Some(libc::EOPNOTSUPP)
        );
        host.remove_dir(&p("/pool/v")).unwrap();
        host.add_dir("/pool/v");
        assert!(host.xattrs(&p("/pool/v")).is_empty(), "a new directory has none");
        assert_eq!(
            host.mutating_calls().iter().filter(|c| c.op() == "get_xattr").count(),
            0
        );
    }

    #[test]
    fn block_devices_can_be_marked_read_only() {
        let host = RecordingHost::new();
        host.add_file("/img", 16 * MIB);
        let dev = host
            .loop_attach(
                &p("/img"),
                LoopOptions {
                    read_only: false,
                    direct_io: true,
                    autoclear: false,
                },
            )
            .unwrap();
        host.set_block_read_only(&dev.device, true).unwrap();
        assert!(host.loop_devices().unwrap()[0].read_only);
        assert!(host.attached_loops()[0].read_only);
        host.set_block_read_only(&dev.device, false).unwrap();
        assert!(!host.loop_devices().unwrap()[0].read_only);
        assert!(matches!(
            host.set_block_read_only(&p("/img"), true),
            Err(HostError::WrongType { .. })
        ));
        assert_eq!(host.block_device_size(&dev.device).unwrap(), 16 * MIB);
        host.fail_next("block_device_size", libc::EIO);
        assert_eq!(io_errno(host.block_device_size(&dev.device)), Some(libc::EIO));
    }

    #[test]
    fn every_op_can_be_failed() {
        // Every HostOps method (26 + 13 for snapshots, clones and expansion, + set_nocow,
        // is_mount_point, loop_device_for and btrfs_subvolume_rename) can be failed.
        for op in OPS {
            RecordingHost::new().fail_next(op, libc::EIO);
        }
        assert_eq!(OPS.len(), 43);
    }
}

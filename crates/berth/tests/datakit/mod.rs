//! Helpers of the data tests (`data.rs`, `expansion.rs`), on top of the shared harness in
//! `common`: a [`Tracker`] that makes volumes, snapshots and mounts and undoes whatever is left
//! when a test fails (its `Drop`), tree manifests compared byte for byte, block patterns, and a
//! guard for background processes.

#![allow(dead_code)] // each test binary uses its own part of the helpers
#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_csi::v1;
use berth_csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::common::{Csi, Daemon, Kind, call, mounts_under, path_str};

/// Where a restore or clone copies from.
#[derive(Clone, Debug)]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

impl Source {
    fn message(&self) -> v1::VolumeContentSource {
        v1::VolumeContentSource {
            r#type: Some(match self {
                Source::Snapshot(id) => Type::Snapshot(SnapshotSource {
                    snapshot_id: id.clone(),
                }),
                Source::Volume(id) => Type::Volume(VolumeSource { volume_id: id.clone() }),
            }),
        }
    }
}

/// A staged and published volume: where it is.
#[derive(Clone, Debug)]
pub struct Mounted {
    pub volume_id: String,
    pub kind: Kind,
    pub staging: PathBuf,
    pub target: PathBuf,
}

/// Something the test made that must be undone.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Undo {
    Delete(String),
    Unstage(String, PathBuf),
    Unpublish(String, PathBuf),
    DeleteSnapshot(String),
    DeleteGroup(String),
}

/// Makes volumes, snapshots and mounts through CSI and remembers how to undo each. The test
/// undoes them itself on its happy path (checking every answer); whatever is left when the
/// Tracker is dropped (a failed test) is undone best-effort on a thread of its own. Declare it
/// after the [`Daemon`], so that it is dropped first.
#[derive(Debug)]
pub struct Tracker {
    endpoint: String,
    pub csi: Csi,
    pub client: berth_csi::Client,
    undo: Vec<Undo>,
}

/// How long an unmount that the driver calls busy is retried.
const BUSY_RETRY: Duration = Duration::from_secs(5);

/// Runs `call` again while the driver answers FailedPrecondition for a mount still in use, up to
/// [`BUSY_RETRY`], printing the processes that hold something beneath `path` each time. A CO
/// retries such an unmount; a hold that outlasts the retries is the test's failure.
async fn retry_busy<F, Fut>(path: &Path, mut call: F) -> Result<(), Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>>,
{
    let deadline = Instant::now() + BUSY_RETRY;
    loop {
        match call().await {
            Err(s)
                if s.code() == tonic::Code::FailedPrecondition
                    && s.message().contains("still in use")
                    && Instant::now() < deadline =>
            {
                eprintln!(
                    "{} is busy ({}); holders: {:?}; retrying",
                    path.display(),
                    s.message(),
                    holders_of(path)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

/// Processes whose cwd, root or open files are at or beneath `path`: "pid comm: link".
pub fn holders_of(path: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = p.path();
        let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let mut links = vec![dir.join("cwd"), dir.join("root")];
        if let Ok(fds) = fs::read_dir(dir.join("fd")) {
            links.extend(fds.flatten().map(|f| f.path()));
        }
        for l in links {
            if let Ok(to) = fs::read_link(&l)
                && to.starts_with(path)
            {
                found.push(format!("{pid} {}: {} -> {}", comm.trim(), l.display(), to.display()));
            }
        }
    }
    found
}

fn ok<T>(what: &str, r: Result<T, Status>) -> T {
    r.unwrap_or_else(|s| panic!("{what}: {:?}: {}", s.code(), s.message()))
}

impl Tracker {
    pub async fn new(d: &Daemon) -> Tracker {
        let client = berth_csi::Client::connect(&d.endpoint)
            .await
            .expect("connect a CSI client");
        Tracker {
            endpoint: d.endpoint.clone(),
            csi: d.csi(),
            client,
            undo: Vec::new(),
        }
    }

    fn forget(&mut self, u: &Undo) {
        if let Some(i) = self.undo.iter().rposition(|x| x == u) {
            self.undo.remove(i);
        }
    }

    /// CreateVolume of an empty volume; checks the size.
    pub async fn create(&mut self, name: &str, kind: Kind, bytes: u64) -> v1::Volume {
        let vol = ok(
            &format!("CreateVolume {name} ({} bytes)", bytes),
            self.csi.create(name, kind, bytes).await,
        );
        self.undo.push(Undo::Delete(vol.volume_id.clone()));
        assert_eq!(vol.capacity_bytes as u64, bytes, "CreateVolume {name}: capacity");
        vol
    }

    /// CreateVolume with a content source, required == limit == `bytes`.
    pub async fn try_create_from(
        &mut self,
        name: &str,
        kind: Kind,
        bytes: u64,
        from: &Source,
    ) -> Result<v1::Volume, Status> {
        let mut req = Csi::create_request(name, kind, bytes);
        req.volume_content_source = Some(from.message());
        let vol = self.csi.create_with(req).await?;
        self.undo.push(Undo::Delete(vol.volume_id.clone()));
        Ok(vol)
    }

    /// Like [`Tracker::try_create_from`]; checks the size and the echoed content source.
    pub async fn create_from(&mut self, name: &str, kind: Kind, bytes: u64, from: &Source) -> v1::Volume {
        let vol = ok(
            &format!("CreateVolume {name} from {from:?} ({bytes} bytes)"),
            self.try_create_from(name, kind, bytes, from).await,
        );
        assert_eq!(
            vol.capacity_bytes as u64, bytes,
            "CreateVolume {name} from {from:?}: capacity"
        );
        assert_eq!(
            vol.content_source,
            Some(from.message()),
            "CreateVolume {name}: the volume should name its content source"
        );
        vol
    }

    pub async fn delete(&mut self, volume_id: &str) {
        ok(&format!("DeleteVolume {volume_id}"), self.csi.delete(volume_id).await);
        self.forget(&Undo::Delete(volume_id.to_owned()));
    }

    /// NodeStageVolume and NodePublishVolume at `<root>/staging/<label>`, `<root>/targets/<label>`.
    pub async fn mount(&mut self, d: &Daemon, vol: &v1::Volume, kind: Kind, label: &str) -> Mounted {
        let staging = d.stage_dir(label);
        let target = d.target_path(label);
        self.stage_publish(vol, kind, &staging, &target).await;
        Mounted {
            volume_id: vol.volume_id.clone(),
            kind,
            staging,
            target,
        }
    }

    pub async fn stage_publish(&mut self, vol: &v1::Volume, kind: Kind, staging: &Path, target: &Path) {
        let id = vol.volume_id.clone();
        ok(
            &format!("NodeStageVolume {id}"),
            self.csi.stage(vol, kind, staging).await,
        );
        self.undo.push(Undo::Unstage(id.clone(), staging.to_owned()));
        ok(
            &format!("NodePublishVolume {id}"),
            self.csi.publish(vol, kind, staging, target).await,
        );
        self.undo.push(Undo::Unpublish(id, target.to_owned()));
    }

    /// NodeUnpublishVolume and NodeUnstageVolume. A mount that is still busy is retried for a
    /// few seconds, as kubelet retries it; each busy answer prints who holds the path.
    pub async fn unmount(&mut self, m: &Mounted) {
        let r = retry_busy(&m.target, || self.csi.unpublish(&m.volume_id, &m.target)).await;
        ok(&format!("NodeUnpublishVolume {}", m.volume_id), r);
        self.forget(&Undo::Unpublish(m.volume_id.clone(), m.target.clone()));
        let r = retry_busy(&m.staging, || self.csi.unstage(&m.volume_id, &m.staging)).await;
        ok(&format!("NodeUnstageVolume {}", m.volume_id), r);
        self.forget(&Undo::Unstage(m.volume_id.clone(), m.staging.clone()));
    }

    /// Unmounts and mounts again at the same paths (a restage).
    pub async fn remount(&mut self, vol: &v1::Volume, m: &Mounted) {
        self.unmount(m).await;
        self.stage_publish(vol, m.kind, &m.staging, &m.target).await;
    }

    pub async fn snapshot(&mut self, name: &str, volume_id: &str) -> v1::Snapshot {
        let resp = ok(
            &format!("CreateSnapshot {name} of {volume_id}"),
            call(
                self.client
                    .controller
                    .clone()
                    .create_snapshot(v1::CreateSnapshotRequest {
                        source_volume_id: volume_id.to_owned(),
                        name: name.to_owned(),
                        ..Default::default()
                    }),
            )
            .await,
        );
        let snap = resp.snapshot.expect("CreateSnapshot answered without a snapshot");
        self.undo.push(Undo::DeleteSnapshot(snap.snapshot_id.clone()));
        assert_eq!(snap.source_volume_id, volume_id, "snapshot source");
        assert!(snap.ready_to_use, "a snapshot should be ready to use: {snap:?}");
        snap
    }

    pub async fn delete_snapshot(&mut self, id: &str) {
        ok(
            &format!("DeleteSnapshot {id}"),
            call(
                self.client
                    .controller
                    .clone()
                    .delete_snapshot(v1::DeleteSnapshotRequest {
                        snapshot_id: id.to_owned(),
                        ..Default::default()
                    }),
            )
            .await,
        );
        self.forget(&Undo::DeleteSnapshot(id.to_owned()));
    }

    pub async fn group_snapshot(&mut self, name: &str, volume_ids: &[String]) -> v1::VolumeGroupSnapshot {
        let resp = ok(
            &format!("CreateVolumeGroupSnapshot {name} of {volume_ids:?}"),
            call(self.client.group_controller.clone().create_volume_group_snapshot(
                v1::CreateVolumeGroupSnapshotRequest {
                    name: name.to_owned(),
                    source_volume_ids: volume_ids.to_vec(),
                    ..Default::default()
                },
            ))
            .await,
        );
        let group = resp
            .group_snapshot
            .expect("CreateVolumeGroupSnapshot answered without a group snapshot");
        self.undo.push(Undo::DeleteGroup(group.group_snapshot_id.clone()));
        group
    }

    pub async fn delete_group_snapshot(&mut self, id: &str, snapshot_ids: &[String]) {
        ok(
            &format!("DeleteVolumeGroupSnapshot {id}"),
            call(self.client.group_controller.clone().delete_volume_group_snapshot(
                v1::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: id.to_owned(),
                    snapshot_ids: snapshot_ids.to_vec(),
                    ..Default::default()
                },
            ))
            .await,
        );
        self.forget(&Undo::DeleteGroup(id.to_owned()));
    }

    /// Every snapshot ListSnapshots returns (all pages).
    pub async fn list_snapshot_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut token = String::new();
        loop {
            let resp = ok(
                "ListSnapshots",
                call(self.client.controller.clone().list_snapshots(v1::ListSnapshotsRequest {
                    max_entries: 5,
                    starting_token: token.clone(),
                    ..Default::default()
                }))
                .await,
            );
            ids.extend(
                resp.entries
                    .into_iter()
                    .filter_map(|e| e.snapshot)
                    .map(|s| s.snapshot_id),
            );
            if resp.next_token.is_empty() {
                return ids;
            }
            token = resp.next_token;
        }
    }

    pub async fn modify(&self, volume_id: &str, params: &[(&str, &str)]) -> Result<(), Status> {
        call(
            self.client
                .controller
                .clone()
                .controller_modify_volume(v1::ControllerModifyVolumeRequest {
                    volume_id: volume_id.to_owned(),
                    mutable_parameters: params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                    ..Default::default()
                }),
        )
        .await
        .map(drop)
    }

    /// Undoes everything still recorded, newest first, checking each answer. Then checks that
    /// no snapshot is listed and the pool's snapshot dir is empty (the harness's leak check
    /// does not look there).
    pub async fn finish(&mut self, d: &Daemon) {
        while let Some(u) = self.undo.last().cloned() {
            if let Err(e) = run_undo(&self.client, &u).await {
                panic!("cleanup {u:?}: {e}");
            }
            self.undo.pop();
        }
        let snaps = self.list_snapshot_ids().await;
        assert!(snaps.is_empty(), "snapshots left after cleanup: {snaps:?}");
        for dir in pool_dirs(d, "snapshots") {
            let left = crate::common::dir_names(&dir);
            assert!(left.is_empty(), "{} still holds {left:?}", dir.display());
        }
    }
}

async fn run_undo(c: &berth_csi::Client, u: &Undo) -> Result<(), String> {
    let r = match u {
        Undo::Delete(id) => call(c.controller.clone().delete_volume(v1::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .map(drop),
        Undo::Unstage(id, p) => call(c.node.clone().node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: path_str(p),
        }))
        .await
        .map(drop),
        Undo::Unpublish(id, p) => call(c.node.clone().node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: path_str(p),
        }))
        .await
        .map(drop),
        Undo::DeleteSnapshot(id) => call(c.controller.clone().delete_snapshot(v1::DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        }))
        .await
        .map(drop),
        Undo::DeleteGroup(id) => call(c.group_controller.clone().delete_volume_group_snapshot(
            v1::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .map(drop),
    };
    r.map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.undo.is_empty() {
            return;
        }
        let undo = std::mem::take(&mut self.undo);
        let endpoint = self.endpoint.clone();
        // Drop may run on a runtime thread: use a runtime of our own on a thread of our own.
        let worker = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return eprintln!("cleanup: no runtime: {e}"),
            };
            rt.block_on(async move {
                let c = match berth_csi::Client::connect(&endpoint).await {
                    Ok(c) => c,
                    Err(e) => return eprintln!("cleanup: connect {endpoint}: {e}"),
                };
                for u in undo.iter().rev() {
                    if let Err(e) = run_undo(&c, u).await {
                        eprintln!("cleanup {u:?}: {e}");
                    }
                }
            });
        });
        let _ = worker.join();
    }
}

/// `<pool>/<sub>` for every pool filesystem mounted under the data dir.
pub fn pool_dirs(d: &Daemon, sub: &str) -> Vec<PathBuf> {
    mounts_under(&d.data_dir)
        .into_iter()
        .filter(|m| m.fstype == "btrfs" && m.root == "/")
        .map(|m| m.mount_point.join(sub))
        .filter(|p| p.is_dir())
        .collect()
}

/// The image file of an fs or block volume.
pub fn image_of(d: &Daemon, volume_id: &str) -> PathBuf {
    pool_dirs(d, "images")
        .into_iter()
        .map(|p| p.join(format!("{volume_id}.img")))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no image of volume {volume_id} in any pool"))
}

/// A background process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    pub what: String,
    child: Option<Child>,
}

impl ChildGuard {
    pub fn spawn(what: &str, cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        ChildGuard {
            what: what.to_owned(),
            child: Some(child),
        }
    }

    /// The piped stderr of the process, once.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut().and_then(|c| c.stderr.take())
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits up to `timeout` for the process to end; returns its status.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("already waited");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "{} still runs after {timeout:?}", self.what);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One entry of a tree: what a restore must reproduce.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    File {
        mode: u32,
        uid: u32,
        gid: u32,
        data: Vec<u8>,
    },
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        target: PathBuf,
    },
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::File { mode, uid, gid, data } => write!(
                f,
                "file {mode:o} {uid}:{gid} {} bytes sha256 {}",
                data.len(),
                sha256_hex(data)
            ),
            Entry::Dir { mode, uid, gid } => write!(f, "dir {mode:o} {uid}:{gid}"),
            Entry::Symlink { target } => write!(f, "symlink -> {}", target.display()),
        }
    }
}

/// Every entry below `root` (not `root` itself, nor `lost+found` at the top), by relative path.
pub type Manifest = BTreeMap<String, Entry>;

pub fn manifest(root: &Path) -> Manifest {
    let mut out = Manifest::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Manifest) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = path
            .strip_prefix(root)
            .expect("below root")
            .to_string_lossy()
            .into_owned();
        if rel == "lost+found" {
            continue;
        }
        let meta = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        let (mode, uid, gid) = (meta.permissions().mode() & 0o7777, meta.uid(), meta.gid());
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).expect("readlink");
            out.insert(rel, Entry::Symlink { target });
        } else if ft.is_dir() {
            out.insert(rel, Entry::Dir { mode, uid, gid });
            walk(root, &path, out);
        } else {
            let data = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            out.insert(rel, Entry::File { mode, uid, gid, data });
        }
    }
}

/// Panics with the differences between two manifests (entries missing, extra, different;
/// the first differing byte of a file).
#[track_caller]
pub fn assert_same_tree(what: &str, got: &Manifest, want: &Manifest) {
    if got == want {
        return;
    }
    let mut diffs = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => diffs.push(format!("{k}: missing (want {w:?})")),
            Some(g) if g != w => {
                let mut line = format!("{k}: got {g:?}, want {w:?}");
                if let (Entry::File { data: gd, .. }, Entry::File { data: wd, .. }) = (g, w)
                    && let Some(i) = gd.iter().zip(wd.iter()).position(|(a, b)| a != b)
                {
                    line.push_str(&format!(" (first differing byte at offset {i})"));
                }
                diffs.push(line);
            }
            Some(_) => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            diffs.push(format!("{k}: unexpected ({g:?})"));
        }
    }
    panic!("{what}: trees differ:\n  {}", diffs.join("\n  "));
}

fn write_file(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Fills a tree of files of several shapes under `root`, without fsync: nested dirs, an
/// empty file, a multi-MiB file, a sparse file, modes, owners and a symlink. About 5 MiB.
pub fn populate(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).expect("mkdir a/b/c");
    write_file(&root.join("a/small.txt"), b"the quick brown fox\n");
    write_file(&root.join("a/b/c/deep.bin"), &pattern(1, 1 << 20));
    write_file(&root.join("big.bin"), &pattern(2, 3 << 20));
    write_file(&root.join("empty"), b"");
    let sparse = fs::File::create(root.join("sparse.bin")).expect("create sparse.bin");
    sparse
        .write_all_at(&pattern(3, 512 << 10), 0)
        .expect("write sparse head");
    sparse
        .write_all_at(&pattern(4, 512 << 10), 6 << 20)
        .expect("write sparse tail");
    let private = root.join("private");
    write_file(&private, &pattern(5, 4096 + 17));
    fs::set_permissions(&private, fs::Permissions::from_mode(0o640)).expect("chmod private");
    std::os::unix::fs::chown(&private, Some(1234), Some(5678)).expect("chown private");
    fs::create_dir(root.join("dir700")).expect("mkdir dir700");
    fs::set_permissions(root.join("dir700"), fs::Permissions::from_mode(0o700)).expect("chmod dir700");
    std::os::unix::fs::symlink("a/small.txt", root.join("link")).expect("symlink");
}

/// Changes the tree [`populate`] made: overwrites part of a file in place, appends, deletes,
/// creates, renames, chmods and repoints the symlink. Without fsync.
pub fn mutate(root: &Path) {
    let big = fs::OpenOptions::new()
        .write(true)
        .open(root.join("big.bin"))
        .expect("open big.bin");
    big.write_all_at(&pattern(10, 64 << 10), 1 << 20)
        .expect("overwrite big.bin");
    let mut small = fs::OpenOptions::new()
        .append(true)
        .open(root.join("a/small.txt"))
        .expect("open small.txt");
    small.write_all(b"jumps over the lazy dog\n").expect("append");
    fs::remove_file(root.join("a/b/c/deep.bin")).expect("rm deep.bin");
    write_file(&root.join("a/b/new.bin"), &pattern(11, 512 << 10));
    fs::rename(root.join("private"), root.join("renamed")).expect("rename");
    fs::set_permissions(root.join("dir700"), fs::Permissions::from_mode(0o755)).expect("chmod dir700");
    fs::remove_file(root.join("link")).expect("rm link");
    std::os::unix::fs::symlink("big.bin", root.join("link")).expect("symlink");
    let sparse = fs::OpenOptions::new()
        .write(true)
        .open(root.join("sparse.bin"))
        .expect("open sparse.bin");
    sparse.write_all_at(&pattern(12, 4096), 3 << 20).expect("fill a hole");
}

/// Size of a block device (or file) by seeking to its end.
pub fn device_size(dev: &Path) -> u64 {
    let mut f = fs::File::open(dev).unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
    f.seek(SeekFrom::End(0)).expect("seek to end")
}

/// Reads `len` bytes at offset 0 of a device with O_DIRECT, so the page cache cannot answer.
pub fn read_device(dev: &Path, len: u64) -> Vec<u8> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
    // O_DIRECT wants an aligned buffer: read through a page-aligned bounce buffer.
    let chunk = 1usize << 20;
    let mut raw = vec![0u8; chunk + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let want = chunk.min((len - out.len() as u64) as usize);
        let buf = &mut raw[off..off + want];
        f.read_exact(buf)
            .unwrap_or_else(|e| panic!("read {} at {}: {e}", dev.display(), out.len()));
        out.extend_from_slice(buf);
    }
    out
}

/// Block volume contents: patterns at the start, the middle and the last 4 KiB; fsynced.
pub fn populate_block(dev: &Path, size: u64) {
    let f = fs::OpenOptions::new().write(true).open(dev).expect("open block device");
    f.write_all_at(&pattern(21, 1 << 20), 0).expect("write head");
    f.write_all_at(&pattern(22, 1 << 20), size / 2).expect("write middle");
    f.write_all_at(&pattern(23, 4096), size - 4096).expect("write tail");
    f.sync_all().expect("fsync block device");
}

/// Overwrites the middle, zeroes the first 4 KiB ("deletes" it); fsynced.
pub fn mutate_block(dev: &Path, size: u64) {
    let f = fs::OpenOptions::new().write(true).open(dev).expect("open block device");
    f.write_all_at(&pattern(24, 1 << 20), size / 2)
        .expect("overwrite middle");
    f.write_all_at(&[0u8; 4096], 0).expect("zero head");
    f.sync_all().expect("fsync block device");
}

/// Total bytes of the filesystem at `path`, as statvfs (df) reports them.
pub fn statvfs_total(path: &Path) -> u64 {
    let s = rustix::fs::statvfs(path).unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    s.f_blocks * s.f_frsize
}

/// Runs a checker such as `e2fsck -fn IMAGE`; panics with its output unless it exits 0.
pub fn fsck_clean(program: &str, args: &[&str], image: &Path) {
    let out = Command::new(program)
        .args(args)
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} {} exited {}: the image is not a clean filesystem\n{}\n{}",
        image.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The checker of a filesystem kind, run read-only on an image that is not mounted.
pub fn fsck_image(kind: Kind, image: &Path) {
    match kind {
        Kind::Fs("ext4") => fsck_clean("e2fsck", &["-fn"], image),
        Kind::Fs("xfs") => fsck_clean("xfs_repair", &["-n", "-f"], image),
        _ => {}
    }
}

/// Writes `len` bytes to a new file and fsyncs; the io::Error of the first failure.
pub fn write_new(path: &Path, len: u64) -> io::Result<()> {
    let (written, err) = crate::common::fill_file(path, len);
    match err {
        Some(e) => Err(io::Error::new(e.kind(), format!("after {written} bytes: {e}"))),
        None => Ok(()),
    }
}

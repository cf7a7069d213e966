//! The data itself, end to end, through the real `berth csi` as root:
//! - snapshot, change, restore (also into a larger volume) and clone, compared byte for byte,
//!   for every kind;
//! - a group snapshot of two fs volumes taken while a writer keeps an invariant across them;
//! - ControllerModifyVolume's observable effects, and unknown parameters changing nothing.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

mod common;
mod datakit;

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, Kind, MIB, bytes_usage, skip_unless_root};
use datakit::{
    Manifest, Mounted, Source, Tracker, assert_same_tree, device_size, fsck_image, image_of, manifest, mutate,
    mutate_block, populate, populate_block, read_device, sha256_hex, statvfs_total, write_new,
};
use tonic::Code;

// ---------------------------------------------------------------------------------------------
// 1. snapshot, restore, clone, restore into a larger volume
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_snapshot_restore_clone() {
    snapshot_restore_clone(Kind::Dir, 16 * MIB, 32 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_ext4_snapshot_restore_clone() {
    snapshot_restore_clone(Kind::Fs("ext4"), 64 * MIB, 128 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_xfs_snapshot_restore_clone() {
    snapshot_restore_clone(Kind::Fs("xfs"), 300 * MIB, 400 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_snapshot_restore_clone() {
    snapshot_restore_clone(Kind::Block, 16 * MIB, 32 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmpfs_snapshot_restore_clone() {
    snapshot_restore_clone(Kind::Tmpfs, 16 * MIB, 32 * MIB).await;
}

/// What a volume holds: a tree of files, or the bytes of a block device.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Content {
    Tree(Manifest),
    Device { len: u64, sha256: String },
}

fn content(m: &Mounted, len: u64) -> Content {
    match m.kind {
        Kind::Block => {
            let data = read_device(&m.target, len);
            Content::Device {
                len,
                sha256: sha256_hex(&data),
            }
        }
        _ => Content::Tree(manifest(&m.target)),
    }
}

#[track_caller]
fn assert_content(what: &str, got: &Content, want: &Content) {
    match (got, want) {
        (Content::Tree(g), Content::Tree(w)) => assert_same_tree(what, g, w),
        _ => assert_eq!(got, want, "{what}: device contents differ"),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn snapshot_restore_clone(kind: Kind, size: u64, larger: u64) {
    let test = format!("data-{}", kind.label());
    if skip_unless_root(&test) {
        return;
    }
    let d = Daemon::start(&test).await;
    let mut t = Tracker::new(&d).await;

    let src = t.create("src", kind, size).await;
    let ms = t.mount(&d, &src, kind, "src").await;
    let target = ms.target.clone();
    // Files are written without fsync: a snapshot of a mounted volume must still hold them
    // (fs volumes are frozen, which flushes them). A block device is flushed by its writer.
    blocking(move || match kind {
        Kind::Block => populate_block(&target, size),
        _ => populate(&target),
    })
    .await;
    let original = content(&ms, size);

    let snap = t.snapshot("snap", &src.volume_id).await;
    assert_eq!(snap.size_bytes as u64, size, "snapshot size_bytes is the restore size");

    let target = ms.target.clone();
    blocking(move || match kind {
        Kind::Block => mutate_block(&target, size),
        _ => mutate(&target),
    })
    .await;
    let changed = content(&ms, size);
    assert_ne!(changed, original, "the change should change the content");

    // Restore: the snapshot's data, not the changed data.
    let from_snap = Source::Snapshot(snap.snapshot_id.clone());
    let restore = t.create_from("restore", kind, size, &from_snap).await;
    fsck_frozen_copy(&d, kind, &restore.volume_id).await;
    let mr = t.mount(&d, &restore, kind, "restore").await;
    assert_content(
        "restored volume vs the source at snapshot time",
        &content(&mr, size),
        &original,
    );
    assert_content("source after the restore", &content(&ms, size), &changed);
    // The restore is independent: writing into it leaves the source alone.
    let target = mr.target.clone();
    blocking(move || scribble(kind, &target)).await;
    assert_content("source after writing into the restore", &content(&ms, size), &changed);
    t.unmount(&mr).await;
    fsck_unmounted(&d, kind, &restore.volume_id).await;
    t.delete(&restore.volume_id).await;

    // Clone of the live (staged and published) source, taken after the change.
    let clone = t
        .create_from("clone", kind, size, &Source::Volume(src.volume_id.clone()))
        .await;
    fsck_frozen_copy(&d, kind, &clone.volume_id).await;
    let mc = t.mount(&d, &clone, kind, "clone").await;
    assert_content("clone vs its source", &content(&mc, size), &changed);
    let target = mc.target.clone();
    blocking(move || scribble(kind, &target)).await;
    assert_content("source after writing into the clone", &content(&ms, size), &changed);
    t.unmount(&mc).await;
    fsck_unmounted(&d, kind, &clone.volume_id).await;
    t.delete(&clone.volume_id).await;

    // Restore into a larger volume: the data, and the larger size seen from inside.
    let big = t.create_from("larger", kind, larger, &from_snap).await;
    fsck_frozen_copy(&d, kind, &big.volume_id).await;
    let ml = t.mount(&d, &big, kind, "larger").await;
    assert_content(
        "larger restore vs the source at snapshot time",
        &content(&ml, size),
        &original,
    );
    check_larger(&t, &ml, size, larger).await;
    t.unmount(&ml).await;
    fsck_unmounted(&d, kind, &big.volume_id).await;
    t.delete(&big.volume_id).await;

    t.unmount(&ms).await;
    t.delete(&src.volume_id).await;
    t.delete_snapshot(&snap.snapshot_id).await;
    t.finish(&d).await;
    d.assert_clean().await;
}

/// An ext4 image copied from a frozen filesystem is clean as it is: ext4's freeze flushes the
/// journal and clears needs_recovery. (XFS's freeze leaves its log to be replayed at mount, so
/// an XFS copy is checked after it was mounted, see [`fsck_unmounted`].)
async fn fsck_frozen_copy(d: &Daemon, kind: Kind, volume_id: &str) {
    if kind == Kind::Fs("ext4") {
        let image = image_of(d, volume_id);
        blocking(move || fsck_image(kind, &image)).await;
    }
}

/// After a volume was mounted and unstaged, its filesystem is clean.
async fn fsck_unmounted(d: &Daemon, kind: Kind, volume_id: &str) {
    if matches!(kind, Kind::Fs(_)) {
        let image = image_of(d, volume_id);
        blocking(move || fsck_image(kind, &image)).await;
    }
}

/// Writes something new into a volume (to show that its source does not see it).
fn scribble(kind: Kind, target: &Path) {
    match kind {
        Kind::Block => {
            let f = fs::OpenOptions::new().write(true).open(target).expect("open device");
            f.write_all_at(&[0xeeu8; 8192], 4 * MIB).expect("write device");
            f.sync_all().expect("fsync device");
        }
        _ => {
            fs::write(target.join("scribble"), b"only here").expect("write scribble");
            fs::remove_file(target.join("big.bin")).expect("rm big.bin");
        }
    }
}

/// A volume restored into `larger` bytes shows that size from inside, and takes data past the
/// source's size.
async fn check_larger(t: &Tracker, m: &Mounted, size: u64, larger: u64) {
    let stats = t.csi.stats(&m.volume_id, &m.target).await.expect("NodeGetVolumeStats");
    let total = bytes_usage(&stats).map(|u| u.total as u64);
    match m.kind {
        Kind::Block => {
            assert_eq!(
                device_size(&m.target),
                larger,
                "block device size of the larger restore"
            );
            let dev = m.target.clone();
            blocking(move || {
                let tail = read_device(&dev, larger);
                assert!(
                    tail[size as usize..].iter().all(|&b| b == 0),
                    "the grown part of a larger block restore should read as zeros"
                );
                let f = fs::OpenOptions::new().write(true).open(&dev).expect("open device");
                f.write_all_at(&[0x77u8; 4096], size)
                    .expect("write past the source's size");
                f.sync_all().expect("fsync device");
            })
            .await;
        }
        Kind::Dir => {
            assert_eq!(
                total,
                Some(larger),
                "NodeGetVolumeStats total of a larger dir restore: {stats:?}"
            );
        }
        Kind::Tmpfs => {
            assert_eq!(statvfs_total(&m.target), larger, "statvfs of a larger tmpfs restore");
            assert_eq!(total, Some(larger), "NodeGetVolumeStats total: {stats:?}");
        }
        Kind::Fs(_) => {
            let df = statvfs_total(&m.target);
            assert!(
                df > size && df <= larger,
                "statvfs total {df} of a {larger}-byte restore of a {size}-byte fs volume: the fs was not grown"
            );
            assert!(
                total.is_some_and(|t| t > size && t <= larger),
                "NodeGetVolumeStats total of the larger restore: {stats:?}"
            );
        }
    }
    if m.kind != Kind::Block {
        // Past the source's size: only the larger volume takes it.
        let file = m.target.join("beyond");
        blocking(move || {
            write_new(&file, size).unwrap_or_else(|e| {
                panic!("writing {size} more bytes into a {larger}-byte restore (data already there) failed: {e}")
            });
            fs::remove_file(&file).expect("rm beyond");
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. group snapshot under a writer keeping an invariant across two volumes
// ---------------------------------------------------------------------------------------------

const RECORD: usize = 64;
const BLOCK: usize = 4096;

/// A 64-byte log record for round `n`: n, a pattern of n, a checksum.
fn record(n: u64) -> Vec<u8> {
    let mut r = n.to_le_bytes().to_vec();
    r.extend_from_slice(&datakit::pattern(n, RECORD - 16));
    let sum = checksum(&r);
    r.extend_from_slice(&sum.to_le_bytes());
    r
}

/// A 4096-byte counter block for round `n`, with a checksum at its end.
fn counter_block(n: u64) -> Vec<u8> {
    let mut b = n.to_le_bytes().to_vec();
    b.extend_from_slice(&datakit::pattern(n ^ 0xabcd, BLOCK - 16));
    let sum = checksum(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

fn checksum(data: &[u8]) -> u64 {
    // FNV-1a
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Parses a record or counter block made above; None when torn or corrupt.
fn parse(buf: &[u8], make: fn(u64) -> Vec<u8>) -> Option<u64> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    (make(n) == buf).then_some(n)
}

/// What a restored member holds: rounds in its log, and its counter.
#[derive(Debug)]
struct Member {
    log_rounds: u64,
    counter: u64,
}

fn read_member(dir: &Path) -> Result<Member, String> {
    let log = fs::read(dir.join("log")).map_err(|e| format!("read log: {e}"))?;
    if log.len() % RECORD != 0 {
        return Err(format!(
            "log is {} bytes, not a whole number of records (torn)",
            log.len()
        ));
    }
    for (i, rec) in log.chunks(RECORD).enumerate() {
        match parse(rec, record) {
            Some(n) if n == i as u64 + 1 => {}
            other => return Err(format!("log record {i} is {other:?}, want round {} (corrupt)", i + 1)),
        }
    }
    let block = fs::read(dir.join("counter")).map_err(|e| format!("read counter: {e}"))?;
    let counter = parse(&block, counter_block).ok_or("the counter block is torn or corrupt")?;
    Ok(Member {
        log_rounds: (log.len() / RECORD) as u64,
        counter,
    })
}

/// Writes round after round, in lockstep: A's log and counter, fsync, then B's, fsync. So at
/// any instant counter(A) ∈ {counter(B), counter(B)+1} and each log has counter or counter+1
/// records. Stopped and joined when dropped.
struct LockstepWriter {
    stop: Arc<AtomicBool>,
    round: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<io::Result<u64>>>,
}

impl LockstepWriter {
    fn start(a: PathBuf, b: PathBuf) -> LockstepWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let round = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), round.clone());
        let handle = std::thread::spawn(move || -> io::Result<u64> {
            let open = |dir: &Path| -> io::Result<(fs::File, fs::File)> {
                let log = fs::OpenOptions::new().create(true).append(true).open(dir.join("log"))?;
                let counter = fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .open(dir.join("counter"))?;
                Ok((log, counter))
            };
            let mut members = [open(&a)?, open(&b)?];
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                for (log, counter) in &mut members {
                    log.write_all(&record(n))?;
                    counter.write_all_at(&counter_block(n), 0)?;
                    log.sync_data()?;
                    counter.sync_data()?;
                }
                r.store(n, Ordering::SeqCst);
            }
            Ok(n)
        });
        LockstepWriter {
            stop,
            round,
            handle: Some(handle),
        }
    }

    fn rounds(&self) -> u64 {
        self.round.load(Ordering::SeqCst)
    }

    fn finish(mut self) -> io::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("writer thread panicked")
    }
}

impl Drop for LockstepWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            // A writer stuck on a frozen filesystem is left behind rather than hanging the test.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                eprintln!("lockstep writer still blocked after 10 s; leaving it");
            }
        }
    }
}

/// Thaws filesystems when dropped, in case the driver left one frozen (best effort).
struct ThawGuard(Vec<PathBuf>);

impl Drop for ThawGuard {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::process::Command::new("fsfreeze")
                .arg("-u")
                .arg(p)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

async fn wait_rounds(w: &LockstepWriter, at_least: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.rounds() < at_least {
        assert!(
            Instant::now() < deadline,
            "{what}: the writer is stuck at round {} (filesystem left frozen?)",
            w.rounds()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshot_under_lockstep_writer_is_consistent() {
    let test = "data-group";
    if skip_unless_root(test) {
        return;
    }
    let kind = Kind::Fs("ext4");
    let size = 64 * MIB;
    let d = Daemon::start(test).await;
    let mut t = Tracker::new(&d).await;
    let a = t.create("a", kind, size).await;
    let b = t.create("b", kind, size).await;
    let ma = t.mount(&d, &a, kind, "a").await;
    let mb = t.mount(&d, &b, kind, "b").await;
    let writer = LockstepWriter::start(ma.target.clone(), mb.target.clone());
    // Dropped before the writer: a writer blocked on a filesystem left frozen can then stop.
    let _thaw = ThawGuard(vec![ma.target.clone(), mb.target.clone()]);
    wait_rounds(&writer, 50, "before the group snapshot").await;
    let before = writer.rounds();
    let ids = vec![a.volume_id.clone(), b.volume_id.clone()];
    let group = t.group_snapshot("group", &ids).await;
    let at_return = writer.rounds();
    // The writer goes on after the snapshot: both filesystems were thawed.
    wait_rounds(&writer, at_return + 20, "after the group snapshot").await;
    let last = writer.finish().expect("the writer hit an I/O error");

    assert!(group.ready_to_use, "group snapshot ready: {group:?}");
    assert_eq!(group.snapshots.len(), 2, "one snapshot per member: {group:?}");
    for s in &group.snapshots {
        assert_eq!(
            s.group_snapshot_id, group.group_snapshot_id,
            "member names its group: {s:?}"
        );
        assert_eq!(s.size_bytes as u64, size, "member size: {s:?}");
    }
    let member_of = |vol: &str| {
        group
            .snapshots
            .iter()
            .find(|s| s.source_volume_id == vol)
            .unwrap_or_else(|| panic!("no member snapshot of {vol}: {group:?}"))
            .snapshot_id
            .clone()
    };
    let (snap_a, snap_b) = (member_of(&a.volume_id), member_of(&b.volume_id));
    // A member belongs to its group: deleting it alone is refused (documented choice).
    let alone = t
        .client
        .controller
        .clone()
        .delete_snapshot(berth_csi::v1::DeleteSnapshotRequest {
            snapshot_id: snap_a.clone(),
            ..Default::default()
        })
        .await;
    common::expect_code("DeleteSnapshot of a group member", alone, &[Code::FailedPrecondition]);

    let mut restored = Vec::new();
    for (name, snap) in [("ra", &snap_a), ("rb", &snap_b)] {
        let vol = t.create_from(name, kind, size, &Source::Snapshot(snap.clone())).await;
        // Frozen when copied: the copy is a clean filesystem, no journal to replay.
        fsck_frozen_copy(&d, kind, &vol.volume_id).await;
        let m = t.mount(&d, &vol, kind, name).await;
        restored.push((vol, m));
    }
    let ra = read_member(&restored[0].1.target).unwrap_or_else(|e| panic!("restored member A: {e}"));
    let rb = read_member(&restored[1].1.target).unwrap_or_else(|e| panic!("restored member B: {e}"));
    eprintln!(
        "group snapshot: writer at round {before} before, {at_return} at return, {last} at the end; restored A {ra:?}, B {rb:?}"
    );
    for (name, m) in [("A", &ra), ("B", &rb)] {
        assert!(
            m.log_rounds == m.counter || m.log_rounds == m.counter + 1,
            "restored {name}: the log has {} rounds but the counter says {}",
            m.log_rounds,
            m.counter
        );
        assert!(
            m.counter >= before && m.counter <= at_return + 1,
            "restored {name}: counter {} is outside the snapshot call (rounds {before}..={})",
            m.counter,
            at_return + 1
        );
    }
    assert!(
        ra.counter == rb.counter || ra.counter == rb.counter + 1,
        "the group snapshot is not consistent across members: A's counter {} and B's {} \
         (the writer keeps A ∈ {{B, B+1}})",
        ra.counter,
        rb.counter
    );
    assert!(
        ra.log_rounds == rb.log_rounds || ra.log_rounds == rb.log_rounds + 1,
        "logs inconsistent across members: A {} rounds, B {}",
        ra.log_rounds,
        rb.log_rounds
    );

    for (vol, m) in &restored {
        t.unmount(m).await;
        fsck_unmounted(&d, kind, &vol.volume_id).await;
        t.delete(&vol.volume_id).await;
    }
    t.unmount(&ma).await;
    t.unmount(&mb).await;
    t.delete(&a.volume_id).await;
    t.delete(&b.volume_id).await;
    // The members stay usable after their sources are gone; the group is deleted as a whole.
    let got = t
        .client
        .group_controller
        .clone()
        .get_volume_group_snapshot(berth_csi::v1::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("GetVolumeGroupSnapshot")
        .into_inner();
    assert_eq!(
        got.group_snapshot.map(|g| g.snapshots.len()),
        Some(2),
        "GetVolumeGroupSnapshot after the sources were deleted"
    );
    t.delete_group_snapshot(&group.group_snapshot_id, &[snap_a, snap_b])
        .await;
    t.finish(&d).await;
    d.assert_clean().await;
}

// ---------------------------------------------------------------------------------------------
// 4. ControllerModifyVolume: observable effects; unknown parameters change nothing
// ---------------------------------------------------------------------------------------------

/// Whether the file has `FS_NOCOW_FL` (btrfs overwrites it in place).
fn nocow(path: &Path) -> bool {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let flags = rustix::fs::ioctl_getflags(&f).unwrap_or_else(|e| panic!("getflags {}: {e}", path.display()));
    flags.contains(rustix::fs::IFlags::NOCOW)
}

fn compression_xattr(path: &Path) -> Option<String> {
    let mut buf = [0u8; 64];
    match rustix::fs::getxattr(path, "btrfs.compression", &mut buf[..]) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {} btrfs.compression: {e}", path.display()),
    }
}

/// Writes `len` bytes of very compressible text and fsyncs.
fn write_text(path: &Path, len: usize) {
    let line = b"berth compresses this line very well, again and again and again.\n";
    let data: Vec<u8> = line.iter().copied().cycle().take(len).collect();
    let mut f = fs::File::create(path).expect("create text file");
    f.write_all(&data).expect("write text");
    f.sync_all().expect("fsync text");
}

async fn used(t: &Tracker, m: &Mounted) -> u64 {
    let stats = t.csi.stats(&m.volume_id, &m.target).await.expect("NodeGetVolumeStats");
    bytes_usage(&stats)
        .and_then(|u| u64::try_from(u.used).ok())
        .expect("used bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modify_dir_compression() {
    let test = "modify-dir";
    if skip_unless_root(test) {
        return;
    }
    let d = Daemon::start(test).await;
    let mut t = Tracker::new(&d).await;
    let kind = Kind::Dir;
    let vol = t.create("dir", kind, 64 * MIB).await;
    let m = t.mount(&d, &vol, kind, "dir").await;
    assert_eq!(
        compression_xattr(&m.target),
        None,
        "no compression property before any modify"
    );

    let text = 16 * MIB as usize;
    let p = m.target.join("plain.txt");
    blocking(move || write_text(&p, text)).await;
    assert!(
        nocow(&m.target.join("plain.txt")),
        "files of a dir volume overwrite in place"
    );
    let u0 = used(&t, &m).await;
    assert!(
        u0 >= text as u64,
        "uncompressed: {u0} bytes used for {text} bytes of text"
    );

    t.modify(&vol.volume_id, &[("compression", "zstd")])
        .await
        .expect("ControllerModifyVolume compression=zstd");
    assert_eq!(
        compression_xattr(&m.target).as_deref(),
        Some("zstd"),
        "btrfs.compression on the published dir"
    );
    let p = m.target.join("zstd.txt");
    blocking(move || write_text(&p, text)).await;
    assert!(
        !nocow(&m.target.join("zstd.txt")),
        "btrfs compresses copy-on-write files only"
    );
    let u1 = used(&t, &m).await;
    eprintln!(
        "compression: {text} bytes of text took {u0} bytes plain, {} bytes with zstd",
        u1 - u0
    );
    assert!(
        u1 - u0 < text as u64 / 4,
        "with compression=zstd, {text} bytes of text took {} bytes",
        u1 - u0
    );

    // Unknown parameter, next to a valid one, and an invalid value: INVALID_ARGUMENT, no change.
    for params in [
        &[("compression", "lzo"), ("bogus", "1")][..],
        &[("compression", "gzip")][..],
        &[("readOnly", "true")][..],
    ] {
        let r = t.modify(&vol.volume_id, params).await;
        common::expect_code(&format!("modify {params:?}"), r, &[Code::InvalidArgument]);
        assert_eq!(
            compression_xattr(&m.target).as_deref(),
            Some("zstd"),
            "after a refused modify {params:?}"
        );
    }
    // The setting outlives a restage.
    t.remount(&vol, &m).await;
    assert_eq!(compression_xattr(&m.target).as_deref(), Some("zstd"), "after a restage");

    t.modify(&vol.volume_id, &[("compression", "none")])
        .await
        .expect("ControllerModifyVolume compression=none");
    let before = used(&t, &m).await;
    let p = m.target.join("none.txt");
    blocking(move || write_text(&p, text)).await;
    assert!(nocow(&m.target.join("none.txt")), "compression=none restores NOCOW");
    let after = used(&t, &m).await;
    assert!(
        after - before >= text as u64 * 3 / 4,
        "with compression=none, {text} bytes of text took only {} bytes",
        after - before
    );

    t.unmount(&m).await;
    t.delete(&vol.volume_id).await;
    t.finish(&d).await;
    d.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modify_tmpfs_inode_limit() {
    let test = "modify-tmpfs";
    if skip_unless_root(test) {
        return;
    }
    let d = Daemon::start(test).await;
    let mut t = Tracker::new(&d).await;
    let kind = Kind::Tmpfs;
    let vol = t.create("tmpfs", kind, 16 * MIB).await;
    let m = t.mount(&d, &vol, kind, "tmpfs").await;
    fs::write(m.target.join("before"), b"x").expect("write a file");

    t.modify(&vol.volume_id, &[("inodeLimit", "100")])
        .await
        .expect("ControllerModifyVolume inodeLimit=100");
    let s = rustix::fs::statvfs(&m.target).expect("statvfs");
    assert_eq!(s.f_files, 100, "statvfs inode count after inodeLimit=100");
    let in_use = s.f_files - s.f_ffree; // the root and the file above
    let stats = t
        .csi
        .stats(&vol.volume_id, &m.target)
        .await
        .expect("NodeGetVolumeStats");
    let inodes = stats
        .usage
        .iter()
        .find(|u| u.unit == berth_csi::v1::volume_usage::Unit::Inodes as i32)
        .map(|u| u.total);
    assert_eq!(inodes, Some(100), "NodeGetVolumeStats inodes total: {stats:?}");

    let target = m.target.clone();
    let (made, err) = blocking(move || create_until_error(&target, 1000)).await;
    assert_eq!(
        made,
        100 - in_use,
        "with inodeLimit=100 and {in_use} inodes in use, {made} more files could be made"
    );
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "file {}: {err}", made + 1);

    for params in [
        &[("inodeLimit", "1000"), ("bogus", "1")][..],
        &[("inodeLimit", "0")][..],
        &[("inodeLimit", "lots")][..],
        &[("compression", "zstd")][..],
    ] {
        let r = t.modify(&vol.volume_id, params).await;
        common::expect_code(&format!("modify {params:?}"), r, &[Code::InvalidArgument]);
        let s = rustix::fs::statvfs(&m.target).expect("statvfs");
        assert_eq!(s.f_files, 100, "inode limit after a refused modify {params:?}");
        let e = fs::write(m.target.join("one-more"), b"x").expect_err("a file past the limit");
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOSPC),
            "after a refused modify {params:?}"
        );
    }

    t.modify(&vol.volume_id, &[("inodeLimit", "1000")])
        .await
        .expect("ControllerModifyVolume inodeLimit=1000");
    fs::write(m.target.join("one-more"), b"x").expect("a file once the limit was raised");

    t.unmount(&m).await;
    t.delete(&vol.volume_id).await;
    t.finish(&d).await;
    d.assert_clean().await;
}

/// Creates empty files `f0`, `f1`, ... until one fails; the count made and the error.
fn create_until_error(dir: &Path, max: u64) -> (u64, io::Error) {
    for i in 0..max {
        if let Err(e) = fs::File::create(dir.join(format!("f{i}"))) {
            return (i, e);
        }
    }
    panic!("made {max} files without an error");
}

/// Opens the device for writing, writes 4 KiB at offset 0 and fsyncs.
fn write_device(dev: &Path) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(dev)?;
    f.write_all_at(&[0x42u8; 4096], 0)?;
    f.sync_all()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modify_block_read_only() {
    let test = "modify-block";
    if skip_unless_root(test) {
        return;
    }
    let d = Daemon::start(test).await;
    let mut t = Tracker::new(&d).await;
    let kind = Kind::Block;
    let size = 16 * MIB;
    let vol = t.create("block", kind, size).await;
    let m = t.mount(&d, &vol, kind, "block").await;
    write_device(&m.target).expect("write a writable block volume");
    let before = sha256_hex(&read_device(&m.target, size));

    t.modify(&vol.volume_id, &[("readOnly", "true")])
        .await
        .expect("ControllerModifyVolume readOnly=true");
    t.remount(&vol, &m).await;
    let dev = m.target.clone();
    let r = blocking(move || write_device(&dev)).await;
    let e = r.expect_err("a write to a readOnly=true block volume after restage succeeded");
    eprintln!("readOnly=true block volume after restage: a write fails with {e}");
    assert_eq!(
        sha256_hex(&read_device(&m.target, size)),
        before,
        "a read-only block volume still reads, unchanged"
    );

    for params in [&[("readOnly", "false"), ("bogus", "1")][..], &[("readOnly", "yes")][..]] {
        let r = t.modify(&vol.volume_id, params).await;
        common::expect_code(&format!("modify {params:?}"), r, &[Code::InvalidArgument]);
        t.remount(&vol, &m).await;
        let dev = m.target.clone();
        let r = blocking(move || write_device(&dev)).await;
        assert!(
            r.is_err(),
            "after a refused modify {params:?} the volume became writable"
        );
    }

    t.modify(&vol.volume_id, &[("readOnly", "false")])
        .await
        .expect("ControllerModifyVolume readOnly=false");
    t.remount(&vol, &m).await;
    write_device(&m.target).expect("write after readOnly=false and a restage");

    t.unmount(&m).await;
    t.delete(&vol.volume_id).await;
    t.finish(&d).await;
    d.assert_clean().await;
}

/// Whether a new file can be written at `dir`: Ok, or the errno of the failure.
fn try_write(dir: &Path, name: &str) -> Result<(), Option<i32>> {
    fs::write(dir.join(name), b"x").map_err(|e| e.raw_os_error())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modify_fs_read_only() {
    let test = "modify-fs";
    if skip_unless_root(test) {
        return;
    }
    let d = Daemon::start(test).await;
    let mut t = Tracker::new(&d).await;
    let kind = Kind::Fs("ext4");
    let vol = t.create("fs", kind, 64 * MIB).await;
    let m = t.mount(&d, &vol, kind, "fs").await;
    try_write(&m.target, "before").expect("write a writable fs volume");
    // Every observation is recorded; the test fails at the end with all that went wrong.
    let mut wrong = Vec::new();
    let mut expect = |what: &str, got: Result<(), Option<i32>>, want: Result<(), Option<i32>>| {
        if got != want {
            wrong.push(format!(
                "{what}: write to the published target gave {got:?}, want {want:?}"
            ));
        }
    };
    let erofs = Err(Some(libc::EROFS));

    t.modify(&vol.volume_id, &[("readOnly", "true")])
        .await
        .expect("ControllerModifyVolume readOnly=true");
    expect(
        "right after readOnly=true (staged, published)",
        try_write(&m.target, "now"),
        erofs,
    );
    t.remount(&vol, &m).await;
    expect(
        "after readOnly=true and a restage",
        try_write(&m.target, "restaged"),
        erofs,
    );
    assert_eq!(fs::read(m.target.join("before")).expect("read"), b"x");

    let r = t.modify(&vol.volume_id, &[("readOnly", "false"), ("bogus", "1")]).await;
    common::expect_code("modify with an unknown key", r, &[Code::InvalidArgument]);
    expect("after a refused modify", try_write(&m.target, "refused"), erofs);

    t.modify(&vol.volume_id, &[("readOnly", "false")])
        .await
        .expect("ControllerModifyVolume readOnly=false");
    expect("right after readOnly=false", try_write(&m.target, "writable"), Ok(()));
    t.remount(&vol, &m).await;
    expect(
        "after readOnly=false and a restage",
        try_write(&m.target, "writable2"),
        Ok(()),
    );

    t.unmount(&m).await;
    t.delete(&vol.volume_id).await;
    t.finish(&d).await;
    d.assert_clean().await;
    assert!(wrong.is_empty(), "readOnly on an fs volume:\n  {}", wrong.join("\n  "));
}

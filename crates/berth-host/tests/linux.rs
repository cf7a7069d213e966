//! Privileged end-to-end tests of [`LinuxHost`] with real loop devices, filesystems and mounts.
//!
//! They need root and skip (with a message) otherwise. Each test works in its own temp dir and
//! registers every mount and loop device it makes with a [`Scratch`] guard, whose `Drop`
//! unmounts and detaches them even when an assertion fails midway.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_host::{
    CloneMethod, FileSystem, HostError, HostOps, LinuxHost, LoopDevice, LoopOptions, MountRequest, MountSource,
    TargetKind, Unmounted,
};

const MIB: u64 = 1 << 20;

/// A temp dir plus everything mounted and attached under it; torn down on drop.
struct Scratch {
    host: Arc<LinuxHost>,
    /// Filesystems a test froze: thawed first on drop, or nothing could be unmounted.
    frozen: Vec<PathBuf>,
    mounts: Vec<PathBuf>,
    loops: Vec<LoopDevice>,
    // Declared last: removed after the mounts and loops are gone.
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Option<Self> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: needs root");
            return None;
        }
        Some(Scratch {
            host: Arc::new(LinuxHost::new()),
            frozen: Vec::new(),
            mounts: Vec::new(),
            loops: Vec::new(),
            dir: tempfile::Builder::new().prefix("berth-host-").tempdir().unwrap(),
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn dir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        self.host.create_dir_all(&p, 0o755).unwrap();
        p
    }

    fn attach(&mut self, image: &Path, options: LoopOptions) -> LoopDevice {
        let dev = self.host.loop_attach(image, options).unwrap();
        self.loops.push(dev.clone());
        dev
    }

    /// An image of `size` bytes formatted with `fs` (mkfs on the image file itself).
    fn formatted(&mut self, name: &str, size: u64, fs: FileSystem) -> LoopDevice {
        let image = self.path(name);
        self.host.create_image(&image, size, true).unwrap();
        let dev = self.attach(&image, rw_dio());
        self.host.mkfs(&dev.device, fs).unwrap();
        dev
    }

    fn mount(&mut self, request: MountRequest) {
        self.host.mount(&request).unwrap();
        self.mounts.push(request.target);
    }

    fn mounted_at(&self, target: &Path) -> bool {
        self.host.mountinfo().unwrap().iter().any(|e| e.mount_point == target)
    }
}

impl Scratch {
    /// Unmounts everything registered at `target` (stacked mounts too); false if busy.
    fn unmount_all(&self, target: &Path) -> bool {
        for _ in 0..8 {
            match self.host.unmount(target) {
                Ok(Unmounted::Removed) => continue,
                Ok(Unmounted::NotMounted) => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for mount in &self.frozen {
            if let Err(e) = self.host.thaw(mount) {
                eprintln!("cleanup: thaw {}: {e}", mount.display());
            }
        }
        // Filesystems first (they hold their loop devices), then the loop devices (which may
        // hold image files inside other mounts), then whatever those kept busy.
        let busy: Vec<&PathBuf> = self.mounts.iter().rev().filter(|t| !self.unmount_all(t)).collect();
        for device in self.loops.iter().rev() {
            if let Err(e) = self.host.loop_detach(device) {
                eprintln!("cleanup: detach {}: {e}", device.device.display());
            }
        }
        for target in busy {
            if !self.unmount_all(target) {
                eprintln!("cleanup: {} is still mounted", target.display());
            }
        }
    }
}

fn rw_dio() -> LoopOptions {
    LoopOptions {
        read_only: false,
        direct_io: true,
        autoclear: false,
    }
}

fn device_mount(dev: &LoopDevice, fs: FileSystem, target: &Path) -> MountRequest {
    MountRequest {
        source: MountSource::Device {
            device: dev.device.clone(),
            fs,
        },
        target: target.to_owned(),
        read_only: false,
        options: vec![],
    }
}

/// Writes `total` bytes in 1 MiB chunks; returns the first error.
fn write_bytes(path: &Path, total: u64) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    let chunk = vec![0xabu8; MIB as usize];
    let mut written = 0;
    while written < total {
        f.write_all(&chunk)?;
        written += MIB;
    }
    f.sync_all()
}

fn errno(r: std::io::Result<()>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// A btrfs pool mounted at `pool`, quotas on.
fn btrfs_pool(s: &mut Scratch) -> PathBuf {
    btrfs_pool_sized(s, 256 * MIB)
}

fn btrfs_pool_sized(s: &mut Scratch, size: u64) -> PathBuf {
    let dev = s.formatted("pool.img", size, FileSystem::Btrfs);
    assert_eq!(s.host.probe_filesystem(&dev.device).unwrap().as_deref(), Some("btrfs"));
    let pool = s.dir("pool");
    s.mount(device_mount(&dev, FileSystem::Btrfs, &pool));
    s.host.btrfs_quota_enable(&pool).unwrap();
    s.host.btrfs_quota_enable(&pool).unwrap();
    pool
}

#[test]
fn btrfs_subvolume_qgroup_lifecycle() {
    let Some(mut s) = Scratch::new() else { return };
    let pool = btrfs_pool(&mut s);
    let host = s.host.clone();

    let id = host.btrfs_subvolume_create(&pool, "v1").unwrap();
    assert!(id >= 256, "{id}");
    assert_eq!(host.btrfs_subvolume_create(&pool, "v1").unwrap(), id);
    assert_eq!(host.btrfs_subvolume_id(&pool.join("v1")).unwrap(), id);
    assert_eq!(host.btrfs_subvolume_id(&pool).unwrap(), 5);

    host.btrfs_qgroup_limit(&pool, id, Some(10 * MIB)).unwrap();
    let err = write_bytes(&pool.join("v1/data"), 20 * MIB);
    assert_eq!(errno(err), Some(libc::EDQUOT));

    let stale = host.btrfs_qgroups(&pool).unwrap();
    host.btrfs_sync(&pool).unwrap();
    let groups = host.btrfs_qgroups(&pool).unwrap();
    let q = groups.iter().find(|q| q.subvolume_id == id).unwrap();
    eprintln!(
        "qgroup 0/{id}: before sync referenced={:?}, after sync {q:?}",
        stale.iter().find(|q| q.subvolume_id == id).map(|q| q.referenced_bytes)
    );
    assert_eq!(q.max_referenced, Some(10 * MIB));
    assert!(
        q.referenced_bytes > 5 * MIB && q.referenced_bytes <= 10 * MIB + MIB,
        "{q:?}"
    );
    assert!(q.exclusive_bytes > 5 * MIB, "{q:?}");

    host.btrfs_qgroup_limit(&pool, id, None).unwrap();
    let groups = host.btrfs_qgroups(&pool).unwrap();
    assert_eq!(
        groups.iter().find(|q| q.subvolume_id == id).unwrap().max_referenced,
        None
    );

    // Usage is accounted at transaction commit: fsync alone does not update it.
    let referenced = |host: &LinuxHost| {
        let groups = host.btrfs_qgroups(&pool).unwrap();
        groups.iter().find(|q| q.subvolume_id == id).unwrap().referenced_bytes
    };
    let before = referenced(&host);
    write_bytes(&pool.join("v1/more"), 20 * MIB).unwrap();
    let unsynced = referenced(&host);
    host.btrfs_sync(&pool).unwrap();
    let synced = referenced(&host);
    eprintln!("referenced: before write {before}, after write+fsync {unsynced}, after btrfs_sync {synced}");
    assert!(synced >= before + 20 * MIB, "{before} -> {synced}");

    // The qgroup of a live subvolume cannot go.
    let live = host.btrfs_qgroup_destroy(&pool, id).unwrap_err();
    assert_eq!(live.errno(), Some(libc::EBUSY), "{live}");

    // Not empty, with a nested directory: deleted all the same.
    fs::create_dir_all(pool.join("v1/a/b")).unwrap();
    host.btrfs_subvolume_delete(&pool, "v1").unwrap();
    host.btrfs_subvolume_delete(&pool, "v1").unwrap();
    assert!(!host.exists(&pool.join("v1")).unwrap());

    // The kernel keeps the qgroup busy until the cleaner has dropped the subvolume's tree.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        host.btrfs_sync(&pool).unwrap();
        match host.btrfs_qgroup_destroy(&pool, id) {
            Ok(()) => break,
            Err(e) if e.errno() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("qgroup destroy: {e}"),
        }
    }
    host.btrfs_qgroup_destroy(&pool, id).unwrap();
    assert!(!host.btrfs_qgroups(&pool).unwrap().iter().any(|q| q.subvolume_id == id));

    // A plain directory is not a subvolume.
    fs::create_dir(pool.join("plain")).unwrap();
    assert!(matches!(
        host.btrfs_subvolume_delete(&pool, "plain"),
        Err(HostError::WrongType { .. })
    ));
    assert!(matches!(
        host.btrfs_subvolume_create(&pool, "plain"),
        Err(HostError::WrongType { .. })
    ));
    assert!(matches!(
        host.btrfs_subvolume_create(&pool, "../x"),
        Err(HostError::WrongType { .. })
    ));
}

/// What a spare subvolume relies on: a rename keeps the subvolume (its id, its qgroup and the
/// NOCOW flag of its root), never replaces anything, and refuses what is not a subvolume.
#[test]
fn btrfs_subvolume_rename() {
    let Some(mut s) = Scratch::new() else { return };
    let pool = btrfs_pool(&mut s);
    let host = s.host.clone();
    let spares = pool.join("spares");
    let volumes = pool.join("volumes");
    fs::create_dir(&spares).unwrap();
    fs::create_dir(&volumes).unwrap();
    let id = host.btrfs_subvolume_create(&spares, "s1").unwrap();
    host.set_nocow(&spares.join("s1"), true).unwrap();
    let start = Instant::now();
    host.btrfs_subvolume_rename(&spares, "s1", &volumes, "v1").unwrap();
    let took = start.elapsed();
    assert!(!spares.join("s1").exists());
    assert_eq!(host.btrfs_subvolume_id(&volumes.join("v1")).unwrap(), id);
    let root = fs::File::open(volumes.join("v1")).unwrap();
    assert!(
        rustix::fs::ioctl_getflags(&root)
            .unwrap()
            .contains(rustix::fs::IFlags::NOCOW)
    );
    host.btrfs_qgroup_limit(&pool, id, Some(4 * MIB)).unwrap();
    assert_eq!(
        errno(write_bytes(&volumes.join("v1/data"), 8 * MIB)),
        Some(libc::EDQUOT)
    );
    eprintln!("rename of a subvolume took {took:?}");

    let rename = |from: &str, to: &str| host.btrfs_subvolume_rename(&spares, from, &volumes, to);
    assert_eq!(rename("s1", "v2").unwrap_err().errno(), Some(libc::ENOENT));
    let other = host.btrfs_subvolume_create(&spares, "s2").unwrap();
    assert_eq!(rename("s2", "v1").unwrap_err().errno(), Some(libc::EEXIST));
    assert_eq!(
        host.btrfs_subvolume_id(&volumes.join("v1")).unwrap(),
        id,
        "not replaced"
    );
    assert_eq!(host.btrfs_subvolume_id(&spares.join("s2")).unwrap(), other);
    fs::create_dir(spares.join("plain")).unwrap();
    assert!(matches!(rename("plain", "v3"), Err(HostError::WrongType { .. })));
    assert!(matches!(rename("s2", "../v3"), Err(HostError::WrongType { .. })));
    std::os::unix::fs::symlink(spares.join("s2"), spares.join("link")).unwrap();
    assert!(matches!(rename("link", "v3"), Err(HostError::WrongType { .. })));
    assert!(!volumes.join("v3").exists());
}

/// Not a timed assertion: prints the latency of the quota-volume hot path.
#[test]
fn btrfs_subvolume_create_and_limit_latency() {
    let Some(mut s) = Scratch::new() else { return };
    let pool = btrfs_pool(&mut s);
    let host = s.host.clone();
    let mut samples = Vec::with_capacity(200);
    for i in 0..200 {
        let name = format!("bench{i}");
        let start = Instant::now();
        let id = host.btrfs_subvolume_create(&pool, &name).unwrap();
        host.btrfs_qgroup_limit(&pool, id, Some(64 * MIB)).unwrap();
        samples.push(start.elapsed());
    }
    let mut deletes = Vec::with_capacity(200);
    for i in 0..200 {
        let start = Instant::now();
        host.btrfs_subvolume_delete(&pool, &format!("bench{i}")).unwrap();
        deletes.push(start.elapsed());
    }
    samples.sort();
    deletes.sort();
    eprintln!(
        "subvolume_create+qgroup_limit x200: p50 {:?} p90 {:?} max {:?}; subvolume_delete p50 {:?}",
        samples[100], samples[180], samples[199], deletes[100]
    );

    // A dir CreateVolume made inline (create, limit, NOCOW) against one from a spare made
    // beforehand (rename, limit).
    let (spares, volumes) = (pool.join("spares"), pool.join("volumes"));
    fs::create_dir(&spares).unwrap();
    fs::create_dir(&volumes).unwrap();
    let mut made = Vec::with_capacity(200);
    for i in 0..200 {
        let id = host.btrfs_subvolume_create(&spares, &format!("s{i}")).unwrap();
        host.set_nocow(&spares.join(format!("s{i}")), true).unwrap();
        made.push(id);
    }
    let (mut inline, mut from_spare) = (Vec::with_capacity(200), Vec::with_capacity(200));
    for (i, spare) in made.into_iter().enumerate() {
        let start = Instant::now();
        let id = host.btrfs_subvolume_create(&volumes, &format!("i{i}")).unwrap();
        host.btrfs_qgroup_limit(&pool, id, Some(64 * MIB)).unwrap();
        host.set_nocow(&volumes.join(format!("i{i}")), true).unwrap();
        inline.push(start.elapsed());
        let start = Instant::now();
        host.btrfs_subvolume_rename(&spares, &format!("s{i}"), &volumes, &format!("v{i}"))
            .unwrap();
        host.btrfs_qgroup_limit(&pool, spare, Some(64 * MIB)).unwrap();
        from_spare.push(start.elapsed());
    }
    inline.sort();
    from_spare.sort();
    eprintln!(
        "x200 inline create+limit+nocow: p50 {:?} p90 {:?}; spare rename+limit: p50 {:?} p90 {:?}",
        inline[100], inline[180], from_spare[100], from_spare[180]
    );
}

#[test]
fn ext4_on_a_direct_io_loop_device() {
    let Some(mut s) = Scratch::new() else { return };
    let host = s.host.clone();
    let image = s.path("ext4.img");
    host.create_image(&image, 64 * MIB, true).unwrap();
    host.create_image(&image, 64 * MIB, true).unwrap();
    assert_eq!(host.file_size(&image).unwrap(), Some(64 * MIB));
    // Preallocated, not sparse.
    assert!(fs::metadata(&image).unwrap().blocks() * 512 >= 64 * MIB);
    assert!(host.create_image(&image, 32 * MIB, true).is_err());

    let dev = s.attach(&image, rw_dio());
    assert!(dev.direct_io);
    let sys = format!("/sys/block/loop{}/loop/dio", dev.number);
    assert_eq!(fs::read_to_string(sys).unwrap().trim(), "1");
    let listed = host.loop_devices().unwrap();
    let entry = listed.iter().find(|d| d.device == dev.device).unwrap();
    assert_eq!(entry.backing_file, image);
    assert!(entry.direct_io && !entry.read_only && !entry.autoclear);

    assert_eq!(host.probe_filesystem(&dev.device).unwrap(), None);
    host.mkfs(&dev.device, FileSystem::Ext4).unwrap();
    assert_eq!(host.probe_filesystem(&dev.device).unwrap().as_deref(), Some("ext4"));

    let mnt = s.dir("mnt");
    let mut req = device_mount(&dev, FileSystem::Ext4, &mnt);
    req.options = vec!["noatime".into(), "nosuid".into()];
    s.mount(req);
    let entry = host
        .mountinfo()
        .unwrap()
        .into_iter()
        .find(|e| e.mount_point == mnt)
        .unwrap();
    assert_eq!(entry.fs_type, "ext4");
    assert_eq!(entry.source, dev.device.to_string_lossy());
    assert!(entry.has_mount_option("noatime") && entry.has_mount_option("nosuid"));
    let st = host.statfs(&mnt).unwrap();
    assert_eq!(st.fs_type, berth_host::magic::EXT4);
    assert_eq!(
        st.block_size, 4096,
        "a 64 MiB ext4 gets 4 KiB blocks, not mke2fs's small type"
    );
    assert!(st.total_bytes > 50 * MIB && st.available_bytes <= st.total_bytes);

    write_bytes(&mnt.join("hello"), 2 * MIB).unwrap();
    assert_eq!(host.unmount(&mnt).unwrap(), Unmounted::Removed);
    assert_eq!(host.unmount(&mnt).unwrap(), Unmounted::NotMounted);
    assert!(!s.mounted_at(&mnt));
    assert!(!mnt.join("hello").exists());

    host.loop_detach(&dev).unwrap();
    host.loop_detach(&dev).unwrap();
    assert!(!host.loop_devices().unwrap().iter().any(|d| d.backing_file == image));
}

#[test]
fn read_only_loop_and_read_only_mount() {
    let Some(mut s) = Scratch::new() else { return };
    let host = s.host.clone();
    let image = s.path("ro.img");
    host.create_image(&image, 32 * MIB, false).unwrap();
    host.mkfs(&image, FileSystem::Ext4).unwrap();
    let dev = s.attach(
        &image,
        LoopOptions {
            read_only: true,
            direct_io: false,
            autoclear: false,
        },
    );
    assert!(dev.read_only && !dev.direct_io);
    let mnt = s.dir("mnt");
    let mut req = device_mount(&dev, FileSystem::Ext4, &mnt);
    req.read_only = true;
    s.mount(req);
    let entry = host
        .mountinfo()
        .unwrap()
        .into_iter()
        .find(|e| e.mount_point == mnt)
        .unwrap();
    assert!(entry.is_read_only());
    assert_eq!(errno(write_bytes(&mnt.join("x"), MIB)), Some(libc::EROFS));
}

#[test]
fn xfs_needs_300_mb_and_mounts() {
    let Some(mut s) = Scratch::new() else { return };
    let dev = s.formatted(
        "xfs.img",
        FileSystem::Xfs.min_size().next_multiple_of(MIB),
        FileSystem::Xfs,
    );
    assert_eq!(s.host.probe_filesystem(&dev.device).unwrap().as_deref(), Some("xfs"));
    let mnt = s.dir("mnt");
    s.mount(device_mount(&dev, FileSystem::Xfs, &mnt));
    assert!(s.mounted_at(&mnt));
    assert_eq!(s.host.statfs(&mnt).unwrap().fs_type, berth_host::magic::XFS);
    write_bytes(&mnt.join("f"), MIB).unwrap();
    assert_eq!(s.host.unmount(&mnt).unwrap(), Unmounted::Removed);
    assert!(!s.mounted_at(&mnt));

    let small = s.path("small.img");
    s.host.create_image(&small, 64 * MIB, false).unwrap();
    match s.host.mkfs(&small, FileSystem::Xfs) {
        Err(HostError::Command { program, stderr, .. }) => {
            assert_eq!(program, "mkfs.xfs");
            assert!(!stderr.is_empty());
        }
        other => panic!("mkfs.xfs on 64 MiB: {other:?}"),
    }
}

#[test]
fn read_only_bind_mount_refuses_writes() {
    let Some(mut s) = Scratch::new() else { return };
    let src = s.dir("src");
    fs::write(src.join("file"), b"data").unwrap();
    let target = s.path("target");
    s.host.prepare_target(&target, TargetKind::Directory).unwrap();
    s.mount(MountRequest {
        source: MountSource::Bind { source: src.clone() },
        target: target.clone(),
        read_only: true,
        options: vec!["nodev".into(), "noexec".into()],
    });
    assert_eq!(fs::read(target.join("file")).unwrap(), b"data");
    let err = fs::write(target.join("file"), b"overwrite").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        fs::File::create(target.join("new")).unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    let entry = s
        .host
        .mountinfo()
        .unwrap()
        .into_iter()
        .find(|e| e.mount_point == target)
        .unwrap();
    assert!(entry.is_read_only() && entry.has_mount_option("noexec") && entry.has_mount_option("nodev"));
    // The source stays writable.
    fs::write(src.join("file"), b"changed").unwrap();

    assert_eq!(s.host.unmount(&target).unwrap(), Unmounted::Removed);
    assert_eq!(s.host.unmount(&target).unwrap(), Unmounted::NotMounted);
    assert!(!s.mounted_at(&target));
    s.host.remove_target(&target).unwrap();
    s.host.remove_target(&target).unwrap();
}

#[test]
fn bind_mount_a_loop_device_onto_a_file() {
    let Some(mut s) = Scratch::new() else { return };
    let image = s.path("block.img");
    s.host.create_image(&image, 16 * MIB, false).unwrap();
    let dev = s.attach(&image, rw_dio());
    let target = s.path("publish");
    // COs may create a directory for a block target; it becomes a file.
    fs::create_dir(&target).unwrap();
    s.host.prepare_target(&target, TargetKind::File).unwrap();
    s.host.prepare_target(&target, TargetKind::File).unwrap();
    s.mount(MountRequest {
        source: MountSource::Bind {
            source: dev.device.clone(),
        },
        target: target.clone(),
        read_only: false,
        options: vec![],
    });
    let meta = fs::metadata(&target).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "{} after the bind mount of {}: {:?}",
        target.display(),
        dev.device.display(),
        meta.file_type()
    );
    let want = fs::metadata(&dev.device).unwrap().rdev();
    assert_eq!(meta.rdev(), want, "device number seen through the bind mount");
    // Idempotent re-prepare of a published block target.
    s.host
        .prepare_target(&target, TargetKind::File)
        .unwrap_or_else(|e| panic!("re-prepare of a published block target: {e}"));
    assert!(s.mounted_at(&target), "{} is not in mountinfo", target.display());
    assert_eq!(s.host.unmount(&target).unwrap(), Unmounted::Removed);
    assert!(
        !s.mounted_at(&target),
        "{} still in mountinfo after unmount",
        target.display()
    );
    let after = fs::symlink_metadata(&target).unwrap();
    assert!(after.is_file(), "after unmount the target is {:?}", after.file_type());
    s.host.remove_target(&target).unwrap();
}

#[test]
fn tmpfs_size_is_enforced() {
    let Some(mut s) = Scratch::new() else { return };
    let mnt = s.dir("tmpfs");
    s.mount(MountRequest {
        source: MountSource::Tmpfs,
        target: mnt.clone(),
        read_only: false,
        options: vec!["size=1M".into(), "mode=0750".into(), "nosuid,nodev".into()],
    });
    let entry = s
        .host
        .mountinfo()
        .unwrap()
        .into_iter()
        .find(|e| e.mount_point == mnt)
        .unwrap();
    assert_eq!(entry.fs_type, "tmpfs");
    assert_eq!(entry.super_option("size"), Some("1024k"));
    assert_eq!(s.host.statfs(&mnt).unwrap().fs_type, berth_host::magic::TMPFS);
    assert_eq!(errno(write_bytes(&mnt.join("big"), 2 * MIB)), Some(libc::ENOSPC));
    assert_eq!(s.host.unmount(&mnt).unwrap(), Unmounted::Removed);
    assert!(!s.mounted_at(&mnt));
}

#[test]
fn symlink_targets_are_refused() {
    let Some(s) = Scratch::new() else { return };
    let real = s.dir("real");
    let link = s.path("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let r = s.host.mount(&MountRequest {
        source: MountSource::Tmpfs,
        target: link.clone(),
        read_only: false,
        options: vec![],
    });
    assert!(matches!(r, Err(HostError::Symlink { .. })), "{r:?}");
    assert!(!s.mounted_at(&real) && !s.mounted_at(&link));
    assert!(matches!(
        s.host.prepare_target(&link, TargetKind::Directory),
        Err(HostError::Symlink { .. })
    ));
    // UMOUNT_NOFOLLOW: a symlink is never unmounted through.
    assert_eq!(s.host.unmount(&link).unwrap(), Unmounted::NotMounted);
}

#[test]
fn busy_unmount_is_an_error() {
    let Some(mut s) = Scratch::new() else { return };
    let mnt = s.dir("busy");
    s.mount(MountRequest {
        source: MountSource::Tmpfs,
        target: mnt.clone(),
        read_only: false,
        options: vec![],
    });
    let open = fs::File::create(mnt.join("held")).unwrap();
    let err = s.host.unmount(&mnt).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EBUSY));
    assert!(s.mounted_at(&mnt));
    drop(open);
    assert_eq!(s.host.unmount(&mnt).unwrap(), Unmounted::Removed);
}

#[test]
fn autoclear_device_detaches_after_last_close() {
    let Some(mut s) = Scratch::new() else { return };
    let image = s.path("auto.img");
    s.host.create_image(&image, 32 * MIB, false).unwrap();
    let dev = s.attach(
        &image,
        LoopOptions {
            read_only: false,
            direct_io: true,
            autoclear: true,
        },
    );
    let attached = |s: &Scratch| s.host.loop_devices().unwrap().iter().any(|d| d.device == dev.device);
    // Held open by the host until mounted, so mkfs-then-mount works.
    assert!(attached(&s));
    s.host.mkfs(&dev.device, FileSystem::Ext4).unwrap();
    assert!(attached(&s));
    let mnt = s.dir("mnt");
    s.mount(device_mount(&dev, FileSystem::Ext4, &mnt));
    assert!(attached(&s));
    assert_eq!(s.host.unmount(&mnt).unwrap(), Unmounted::Removed);
    // The unmount was the last close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while attached(&s) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!attached(&s), "autoclear device still attached after unmount");
}

#[test]
fn loop_attach_races_with_other_attachers() {
    let Some(mut s) = Scratch::new() else { return };
    let images: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = s.path(&format!("race{i}.img"));
            s.host.create_image(&p, 4 * MIB, false).unwrap();
            p
        })
        .collect();
    let host = s.host.clone();
    let host = &*host;
    let devices: Vec<LoopDevice> = std::thread::scope(|scope| {
        let handles: Vec<_> = images
            .iter()
            .map(|p| scope.spawn(move || host.loop_attach(p, rw_dio())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Result<_, _>>()
    })
    .unwrap();
    s.loops.extend(devices.iter().cloned());
    let mut numbers: Vec<u32> = devices.iter().map(|d| d.number).collect();
    numbers.sort();
    numbers.dedup();
    assert_eq!(numbers.len(), 4);
    for (d, p) in devices.iter().zip(&images) {
        assert_eq!(&d.backing_file, p);
    }
}

#[test]
fn direct_io_is_reported_as_the_kernel_runs_it() {
    let Some(mut s) = Scratch::new() else { return };
    let mnt = s.dir("tmpfs");
    s.mount(MountRequest {
        source: MountSource::Tmpfs,
        target: mnt.clone(),
        read_only: false,
        options: vec!["size=64M".into()],
    });
    let image = mnt.join("img");
    s.host.create_image(&image, 16 * MIB, true).unwrap();
    let dev = s.attach(&image, rw_dio());
    let sys = fs::read_to_string(format!("/sys/block/loop{}/loop/dio", dev.number)).unwrap();
    eprintln!("loop on tmpfs: direct_io={} (sysfs dio={})", dev.direct_io, sys.trim());
    assert_eq!(dev.direct_io, sys.trim() == "1");
    // Usable either way.
    s.host.mkfs(&dev.device, FileSystem::Ext4).unwrap();
    assert_eq!(s.host.probe_filesystem(&dev.device).unwrap().as_deref(), Some("ext4"));
}

#[test]
fn direct_io_falls_back_to_buffered_when_refused() {
    let Some(mut s) = Scratch::new() else { return };
    // ramfs has no O_DIRECT: LOOP_CONFIGURE with LO_FLAGS_DIRECT_IO fails with EINVAL there.
    let mnt = s.dir("ramfs");
    let status = std::process::Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success());
    s.mounts.push(mnt.clone());
    let image = mnt.join("img");
    fs::write(&image, vec![0u8; 4 * MIB as usize]).unwrap();
    let dev = s.attach(&image, rw_dio());
    assert!(!dev.direct_io);
    let sys = fs::read_to_string(format!("/sys/block/loop{}/loop/dio", dev.number)).unwrap();
    assert_eq!(sys.trim(), "0");
}

// ---- snapshots, clones, expansion ----

#[test]
fn btrfs_snapshots_read_only_and_writable() {
    let Some(mut s) = Scratch::new() else { return };
    let pool = btrfs_pool(&mut s);
    let host = s.host.clone();
    let v1 = host.btrfs_subvolume_create(&pool, "v1").unwrap();
    host.btrfs_qgroup_limit(&pool, v1, Some(32 * MIB)).unwrap();
    fs::create_dir(pool.join("v1/dir")).unwrap();
    fs::write(pool.join("v1/dir/file"), b"original").unwrap();
    write_bytes(&pool.join("v1/data"), 4 * MIB).unwrap();

    // Read-only: a snapshot of a subvolume that has a qgroup limit.
    let start = Instant::now();
    let snap = host.btrfs_snapshot(&pool.join("v1"), &pool, "snap", true).unwrap();
    let took = start.elapsed();
    assert_ne!(snap, v1);
    assert_eq!(
        host.btrfs_snapshot(&pool.join("v1"), &pool, "snap", true).unwrap(),
        snap
    );
    assert_eq!(host.btrfs_subvolume_id(&pool.join("snap")).unwrap(), snap);
    assert_eq!(fs::read(pool.join("snap/dir/file")).unwrap(), b"original");
    let err = fs::write(pool.join("snap/dir/file"), b"changed").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(errno(write_bytes(&pool.join("snap/new"), MIB)), Some(libc::EROFS));

    // Writable: a clone diverges from its source.
    let clone = host.btrfs_snapshot(&pool.join("v1"), &pool, "clone", false).unwrap();
    assert!(clone != v1 && clone != snap);
    fs::write(pool.join("clone/dir/file"), b"changed").unwrap();
    write_bytes(&pool.join("clone/more"), 2 * MIB).unwrap();
    assert_eq!(fs::read(pool.join("v1/dir/file")).unwrap(), b"original");
    assert!(!pool.join("v1/more").exists());
    assert_eq!(
        host.btrfs_snapshot(&pool.join("v1"), &pool, "clone", false).unwrap(),
        clone
    );

    // Quotas on: each snapshot gets its own level-0 qgroup.
    host.btrfs_sync(&pool).unwrap();
    let groups = host.btrfs_qgroups(&pool).unwrap();
    let find = |id: u64| *groups.iter().find(|q| q.subvolume_id == id).unwrap();
    eprintln!(
        "snapshot took {took:?}; qgroups: v1 {:?}, snap {:?}, clone {:?}",
        find(v1),
        find(snap),
        find(clone)
    );
    // The kernel copies the source's limit to the snapshot's qgroup.
    assert_eq!(find(v1).max_referenced, Some(32 * MIB));
    assert_eq!(find(snap).max_referenced, Some(32 * MIB));
    assert_eq!(find(clone).max_referenced, Some(32 * MIB));
    assert!(find(snap).referenced_bytes >= 4 * MIB, "{:?}", find(snap));
    assert!(find(snap).exclusive_bytes < MIB, "shared, not copied: {:?}", find(snap));

    // Only a subvolume root can be snapshotted; a plain directory is not overwritten.
    assert!(matches!(
        host.btrfs_snapshot(&pool.join("v1/dir"), &pool, "wrong", true),
        Err(HostError::WrongType { .. })
    ));
    assert!(!pool.join("wrong").exists());
    fs::create_dir(pool.join("plain")).unwrap();
    assert!(matches!(
        host.btrfs_snapshot(&pool.join("v1"), &pool, "plain", true),
        Err(HostError::WrongType { .. })
    ));
    assert!(matches!(
        host.btrfs_snapshot(&pool.join("v1"), &pool, "a/b", true),
        Err(HostError::WrongType { .. })
    ));
    // A read-only snapshot can still be deleted, and snapshotted again into a writable clone.
    let restored = host
        .btrfs_snapshot(&pool.join("snap"), &pool, "restored", false)
        .unwrap();
    fs::write(pool.join("restored/dir/file"), b"restored").unwrap();
    assert!(restored > clone);
    host.btrfs_subvolume_delete(&pool, "snap").unwrap();
    assert!(!pool.join("snap").exists());
}

/// 1 GiB, sparse, with 500 MiB of data in 50 extents of 10 MiB each.
fn half_full_image(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.set_len(1024 * MIB).unwrap();
    let mut chunk = vec![0u8; 10 * MIB as usize];
    for i in 0..50u64 {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i as usize * 31 + j / 4096) as u8 | 1;
        }
        f.write_all_at(&chunk, i * 20 * MIB).unwrap();
    }
    f.sync_all().unwrap();
}

/// Compares two files 10 MiB at a time at a few offsets (reading 2 GiB would dominate the test).
fn same_content(a: &Path, b: &Path) {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    assert_eq!(fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    let (mut ba, mut bb) = (vec![0u8; 10 * MIB as usize], vec![0u8; 10 * MIB as usize]);
    for off in [0, 15 * MIB, 500 * MIB, 990 * MIB, 1014 * MIB] {
        fa.read_exact_at(&mut ba, off).unwrap();
        fb.read_exact_at(&mut bb, off).unwrap();
        assert!(ba == bb, "{} and {} differ at {off}", a.display(), b.display());
    }
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn clone_file_reflinks_on_btrfs_and_copies_elsewhere() {
    let Some(mut s) = Scratch::new() else { return };
    let pool = btrfs_pool_sized(&mut s, 1536 * MIB);
    let host = s.host.clone();
    let src = pool.join("src.img");
    half_full_image(&src);
    host.btrfs_sync(&pool).unwrap();
    let used_before = host.statfs(&pool).unwrap().used_bytes;

    let reflinked = pool.join("reflink.img");
    let start = Instant::now();
    assert_eq!(host.clone_file(&src, &reflinked).unwrap(), CloneMethod::Reflink);
    let reflink_time = start.elapsed();
    host.btrfs_sync(&pool).unwrap();
    let used_after = host.statfs(&pool).unwrap().used_bytes;
    same_content(&src, &reflinked);
    let meta = fs::metadata(&reflinked).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // The fallback: the destination is on another filesystem (the host's, under the temp dir).
    let copied = s.path("copy.img");
    let start = Instant::now();
    assert_eq!(host.clone_file(&src, &copied).unwrap(), CloneMethod::Copy);
    let copy_time = start.elapsed();
    same_content(&src, &copied);
    // And to a tmpfs.
    let tmpfs = s.dir("tmpfs");
    s.mount(MountRequest {
        source: MountSource::Tmpfs,
        target: tmpfs.clone(),
        read_only: false,
        options: vec!["size=1100M".into()],
    });
    let start = Instant::now();
    assert_eq!(
        host.clone_file(&src, &tmpfs.join("copy.img")).unwrap(),
        CloneMethod::Copy
    );
    let tmpfs_time = start.elapsed();
    eprintln!(
        "1 GiB image with 500 MiB of data: reflink {reflink_time:?} (pool used +{} KiB); \
         copy to host fs {copy_time:?} ({} MiB allocated); copy to tmpfs {tmpfs_time:?}",
        used_after.saturating_sub(used_before) >> 10,
        allocated(&copied) >> 20,
    );
    assert!(
        used_after < used_before + 50 * MIB,
        "a reflink shares extents: {used_before} -> {used_after}"
    );
    // Holes stay holes in the copy.
    assert!(
        (490 * MIB..600 * MIB).contains(&allocated(&copied)),
        "{}",
        allocated(&copied)
    );
    assert!(reflink_time * 10 < copy_time, "{reflink_time:?} vs {copy_time:?}");

    // Berth's images are NOCOW; the clone gets the flag too, so the reflink still works.
    let nocow = pool.join("nocow.img");
    host.create_image(&nocow, 64 * MIB, true).unwrap();
    write_bytes(&nocow, 8 * MIB).unwrap();
    assert_eq!(
        host.clone_file(&nocow, &pool.join("nocow-clone.img")).unwrap(),
        CloneMethod::Reflink
    );
    // A checksummed file cloned into a NOCOW directory (new files inherit NOCOW): still shared.
    let nocow_dir = pool.join("nocow-dir");
    fs::create_dir(&nocow_dir).unwrap();
    let nocow = |p: &Path| {
        let f = fs::File::open(p).unwrap();
        rustix::fs::ioctl_getflags(&f)
            .unwrap()
            .contains(rustix::fs::IFlags::NOCOW)
    };
    let chattr = std::process::Command::new("chattr").arg("+C").arg(&nocow_dir).status();
    assert!(chattr.unwrap().success());
    assert!(nocow(&nocow_dir));
    assert_eq!(
        host.clone_file(&reflinked, &nocow_dir.join("c.img")).unwrap(),
        CloneMethod::Reflink
    );
    assert!(!nocow(&nocow_dir.join("c.img")) && nocow(&pool.join("nocow-clone.img")));
    // An existing destination is an error, and is left as it was.
    let err = host.clone_file(&src, &reflinked).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
    same_content(&src, &reflinked);
}

#[test]
fn clone_file_on_ext4_copies_and_keeps_holes() {
    let Some(mut s) = Scratch::new() else { return };
    let dev = s.formatted("ext4.img", 128 * MIB, FileSystem::Ext4);
    let mnt = s.dir("mnt");
    s.mount(device_mount(&dev, FileSystem::Ext4, &mnt));
    let src = mnt.join("sparse");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&src).unwrap();
        f.set_len(64 * MIB).unwrap();
        f.write_all_at(&vec![7u8; 3 * MIB as usize], 10 * MIB).unwrap();
        f.write_all_at(&[9u8; 4096], 40 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    let dest = mnt.join("copy");
    assert_eq!(s.host.clone_file(&src, &dest).unwrap(), CloneMethod::Copy);
    assert_eq!(fs::metadata(&dest).unwrap().len(), 64 * MIB);
    assert!(
        allocated(&dest) < 4 * MIB,
        "holes kept: {} bytes allocated",
        allocated(&dest)
    );
    assert!(allocated(&dest) >= 3 * MIB);
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dest).unwrap());
    assert_eq!(s.host.clone_file(&src, &dest).unwrap_err().errno(), Some(libc::EEXIST));
    assert_eq!(
        s.host
            .clone_file(&mnt.join("missing"), &mnt.join("x"))
            .unwrap_err()
            .errno(),
        Some(libc::ENOENT)
    );
    assert!(!mnt.join("x").exists());
}

/// A tree with every kind of entry copy_tree handles.
fn build_tree(root: &Path) {
    use std::os::unix::fs::symlink;
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::write(root.join("a/b/file"), b"nested data").unwrap();
    fs::write(root.join("top"), vec![5u8; 3 * MIB as usize]).unwrap();
    fs::set_permissions(root.join("a/b/file"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("top"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(root.join("a/b/file"), Some(1234), Some(5678)).unwrap();
    symlink("b/file", root.join("a/rel-link")).unwrap();
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    std::os::unix::fs::lchown(root.join("dangling"), Some(42), Some(43)).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs::File::options()
        .write(true)
        .open(root.join("a/b/file"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let dir_times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 1_100_000_000,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 1_200_000_000,
            tv_nsec: 5,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        root.join("a/b"),
        &dir_times,
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
}

fn check_tree(src: &Path, dest: &Path) {
    for rel in ["a", "a/b", "a/b/c", "a/b/file", "top", "a/rel-link", "dangling"] {
        let (m1, m2) = (
            fs::symlink_metadata(src.join(rel)).unwrap(),
            fs::symlink_metadata(dest.join(rel)).unwrap(),
        );
        assert_eq!(m1.file_type(), m2.file_type(), "{rel}");
        assert_eq!(m1.uid(), m2.uid(), "{rel}");
        assert_eq!(m1.gid(), m2.gid(), "{rel}");
        assert_eq!(m1.mtime(), m2.mtime(), "{rel}");
        if !m1.file_type().is_symlink() {
            assert_eq!(m1.permissions().mode(), m2.permissions().mode(), "{rel}");
            assert_eq!(m1.mtime_nsec(), m2.mtime_nsec(), "{rel}");
        }
    }
    assert_eq!(fs::read(dest.join("a/b/file")).unwrap(), b"nested data");
    assert_eq!(fs::read(dest.join("a/rel-link")).unwrap(), b"nested data");
    assert_eq!(
        fs::read_link(dest.join("dangling")).unwrap(),
        Path::new("/nonexistent/target")
    );
    assert_eq!(fs::read_link(dest.join("a/rel-link")).unwrap(), Path::new("b/file"));
    assert_eq!(
        fs::symlink_metadata(dest.join("a/b/file"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o640
    );
    assert_eq!(
        fs::metadata(dest.join("top")).unwrap().permissions().mode() & 0o7777,
        0o4755
    );
    assert_eq!(fs::metadata(dest.join("a/b/file")).unwrap().uid(), 1234);
    assert!(!dest.join("fifo").exists(), "special files are skipped");
}

#[test]
fn copy_tree_keeps_structure_symlinks_modes_owners_and_times() {
    let Some(mut s) = Scratch::new() else { return };
    let pool = btrfs_pool(&mut s);
    let host = s.host.clone();
    // On btrfs (files reflinked) and on the host's filesystem (copied).
    for (src, dest) in [(pool.join("src"), pool.join("dest")), (s.path("src"), s.path("dest"))] {
        fs::create_dir(&src).unwrap();
        build_tree(&src);
        fs::create_dir(&dest).unwrap();
        host.copy_tree(&src, &dest).unwrap();
        check_tree(&src, &dest);
        // The destination must be empty.
        let err = host.copy_tree(&src, &dest).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOTEMPTY), "{err}");
    }
    // Across filesystems too.
    let cross = s.dir("cross");
    host.copy_tree(&pool.join("src"), &cross).unwrap();
    check_tree(&pool.join("src"), &cross);
    // A symlink is not followed as the source or the destination.
    std::os::unix::fs::symlink(pool.join("src"), s.path("link")).unwrap();
    assert!(matches!(
        host.copy_tree(&s.path("link"), &s.dir("empty")),
        Err(HostError::Symlink { .. })
    ));
}

#[test]
fn freeze_blocks_writers_until_thaw() {
    let Some(mut s) = Scratch::new() else { return };
    let dev = s.formatted("frozen.img", 64 * MIB, FileSystem::Ext4);
    let mnt = s.dir("mnt");
    s.mount(device_mount(&dev, FileSystem::Ext4, &mnt));
    fs::create_dir(mnt.join("sub")).unwrap();
    // Only the root of a mount: freezing the filesystem a stray path is on could be `/`.
    assert!(matches!(
        s.host.freeze(&mnt.join("sub")),
        Err(HostError::WrongType { .. })
    ));

    s.frozen.push(mnt.clone());
    s.host.freeze(&mnt).unwrap();
    s.host.freeze(&mnt).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let file = mnt.join("written-while-frozen");
    let writer = std::thread::spawn(move || {
        let r = fs::write(&file, b"data");
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(Duration::from_millis(700)) {
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        other => panic!("a write to a frozen filesystem finished: {other:?}"),
    }
    let thawed_at = Instant::now();
    s.host.thaw(&mnt).unwrap();
    let done = rx.recv_timeout(Duration::from_secs(2));
    eprintln!("blocked write finished {:?} after thaw", thawed_at.elapsed());
    assert_eq!(done, Ok(Ok(())));
    writer.join().unwrap();
    s.host.thaw(&mnt).unwrap();
    s.frozen.clear();
    assert_eq!(fs::read(mnt.join("written-while-frozen")).unwrap(), b"data");
}

/// Grows the image, the loop device and the mounted filesystem; checks each step.
fn grow_online(fs_type: FileSystem, from: u64, to: u64) {
    let Some(mut s) = Scratch::new() else { return };
    let host = s.host.clone();
    let dev = s.formatted("grow.img", from, fs_type);
    let image = s.path("grow.img");
    let mnt = s.dir("mnt");
    s.mount(device_mount(&dev, fs_type, &mnt));
    write_bytes(&mnt.join("before"), 4 * MIB).unwrap();
    let total_before = host.statfs(&mnt).unwrap().total_bytes;
    assert_eq!(host.block_device_size(&dev.device).unwrap(), from);

    // (mkfs discarded the device, which punched holes into the preallocated image.)
    let allocated_before = allocated(&image);
    host.grow_image(&image, to).unwrap();
    assert_eq!(host.file_size(&image).unwrap(), Some(to));
    assert!(
        allocated(&image) >= allocated_before + (to - from),
        "the new range is reserved: {allocated_before} -> {}",
        allocated(&image)
    );
    host.grow_image(&image, from).unwrap();
    assert_eq!(host.file_size(&image).unwrap(), Some(to), "never shrinks");
    assert_eq!(host.block_device_size(&dev.device).unwrap(), from);
    host.loop_set_capacity(&dev.device).unwrap();
    assert_eq!(host.block_device_size(&dev.device).unwrap(), to);

    let start = Instant::now();
    match host.grow_filesystem(fs_type, &dev.device, &mnt) {
        Ok(()) => {}
        // ext4 online resize needs CAP_SYS_RESOURCE, which some sandboxes drop even for root.
        Err(HostError::Unsupported(why)) if fs_type == FileSystem::Ext4 => {
            eprintln!("skipping the rest: {why}");
            return;
        }
        Err(e) => panic!("grow {}: {e}", fs_type.as_str()),
    }
    let took = start.elapsed();
    let total_after = host.statfs(&mnt).unwrap().total_bytes;
    eprintln!(
        "{}: {} -> {} MiB device; statfs total {} -> {} MiB in {took:?}",
        fs_type.as_str(),
        from >> 20,
        to >> 20,
        total_before >> 20,
        total_after >> 20
    );
    assert!(
        total_after >= total_before + (to - from) * 8 / 10,
        "{total_before} -> {total_after}"
    );
    host.grow_filesystem(fs_type, &dev.device, &mnt).unwrap();
    assert_eq!(host.statfs(&mnt).unwrap().total_bytes, total_after);
    write_bytes(&mnt.join("after"), 4 * MIB).unwrap();
    // The wrong filesystem type is refused before anything runs.
    let other = if fs_type == FileSystem::Ext4 {
        FileSystem::Xfs
    } else {
        FileSystem::Ext4
    };
    assert!(matches!(
        host.grow_filesystem(other, &dev.device, &mnt),
        Err(HostError::WrongType { .. })
    ));
}

#[test]
fn grow_ext4_online() {
    grow_online(FileSystem::Ext4, 64 * MIB, 192 * MIB);
}

#[test]
fn grow_xfs_online() {
    grow_online(FileSystem::Xfs, 300 * MIB, 512 * MIB);
}

#[test]
fn grow_btrfs_online() {
    grow_online(FileSystem::Btrfs, 256 * MIB, 512 * MIB);
}

#[test]
fn reconfigure_tmpfs_size_inodes_and_attributes() {
    let Some(mut s) = Scratch::new() else { return };
    let mnt = s.dir("tmpfs");
    s.mount(MountRequest {
        source: MountSource::Tmpfs,
        target: mnt.clone(),
        read_only: false,
        options: vec!["size=1M".into()],
    });
    assert_eq!(errno(write_bytes(&mnt.join("big"), 2 * MIB)), Some(libc::ENOSPC));
    fs::remove_file(mnt.join("big")).unwrap();

    s.host.reconfigure(&mnt, &["size=4M".into()]).unwrap();
    write_bytes(&mnt.join("big"), 2 * MIB).unwrap();
    assert_eq!(s.host.statfs(&mnt).unwrap().total_bytes, 4 * MIB);
    let entry = |s: &Scratch| {
        s.host
            .mountinfo()
            .unwrap()
            .into_iter()
            .find(|e| e.mount_point == mnt)
            .unwrap()
    };
    assert_eq!(entry(&s).super_option("size"), Some("4096k"));

    s.host.reconfigure(&mnt, &["nr_inodes=16".into()]).unwrap();
    let st = s.host.statfs(&mnt).unwrap();
    assert_eq!(st.total_inodes, 16);
    let made = (0..32)
        .take_while(|i| fs::write(mnt.join(format!("f{i}")), b"").is_ok())
        .count();
    assert!(made < 16, "created {made} files with nr_inodes=16");
    // Shrinking below what is used is refused, and the old size stays.
    let err = s.host.reconfigure(&mnt, &["size=1M".into()]).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert_eq!(s.host.statfs(&mnt).unwrap().total_bytes, 4 * MIB);

    // `ro`/`rw` change the superblock (every bind follows); other attributes this mount.
    s.host.reconfigure(&mnt, &["ro".into(), "noexec".into()]).unwrap();
    let e = entry(&s);
    assert!(e.super_options.split(',').any(|o| o == "ro"), "{e:?}");
    assert!(e.has_mount_option("noexec"), "{e:?}");
    assert_eq!(errno(fs::write(mnt.join("big"), b"x")), Some(libc::EROFS));
    s.host.reconfigure(&mnt, &["rw".into()]).unwrap();
    let e = entry(&s);
    assert!(e.super_options.split(',').any(|o| o == "rw"), "{e:?}");
    fs::write(mnt.join("big"), b"x").unwrap();

    // Only the root of a mount.
    fs::remove_file(mnt.join("f0")).unwrap();
    fs::create_dir(mnt.join("sub")).unwrap();
    let err = s.host.reconfigure(&mnt.join("sub"), &["size=8M".into()]).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
}

#[test]
fn xattrs_set_btrfs_compression() {
    let Some(mut s) = Scratch::new() else { return };
    let pool = btrfs_pool(&mut s);
    let host = s.host.clone();
    host.btrfs_subvolume_create(&pool, "v").unwrap();
    let v = pool.join("v");
    assert_eq!(host.get_xattr(&v, "btrfs.compression").unwrap(), None);
    host.set_xattr(&v, "btrfs.compression", b"zstd").unwrap();
    assert_eq!(
        host.get_xattr(&v, "btrfs.compression").unwrap().as_deref(),
        Some(&b"zstd"[..])
    );
    // New files inherit it.
    fs::write(v.join("f"), vec![0u8; 1 << 20]).unwrap();
    assert_eq!(
        host.get_xattr(&v.join("f"), "btrfs.compression").unwrap().as_deref(),
        Some(&b"zstd"[..])
    );
    assert!(host.set_xattr(&v, "btrfs.compression", b"bogus").is_err());
    host.set_xattr(&v.join("f"), "user.berth", b"").unwrap();
    assert_eq!(host.get_xattr(&v.join("f"), "user.berth").unwrap(), Some(Vec::new()));
    assert_eq!(
        host.get_xattr(&pool.join("missing"), "user.x").unwrap_err().errno(),
        Some(libc::ENOENT)
    );
}

#[test]
fn block_device_read_only_flag() {
    use std::os::unix::fs::FileExt;
    let Some(mut s) = Scratch::new() else { return };
    let image = s.path("ro-flag.img");
    s.host.create_image(&image, 16 * MIB, false).unwrap();
    let dev = s.attach(&image, rw_dio());
    assert_eq!(s.host.block_device_size(&dev.device).unwrap(), 16 * MIB);
    let open = fs::File::options().write(true).open(&dev.device).unwrap();
    open.write_all_at(&[1u8; 4096], 0).unwrap();

    s.host.set_block_read_only(&dev.device, true).unwrap();
    let err = open.write_all_at(&[2u8; 4096], 0).unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(libc::EPERM | libc::EROFS)), "{err}");
    let listed = s.host.loop_devices().unwrap();
    assert!(listed.iter().find(|d| d.device == dev.device).unwrap().read_only);

    s.host.set_block_read_only(&dev.device, false).unwrap();
    open.write_all_at(&[3u8; 4096], 0).unwrap();

    // The flag belongs to the device and would outlive a detach: loop_detach clears it.
    s.host.set_block_read_only(&dev.device, true).unwrap();
    drop(open);
    s.host.loop_detach(&dev).unwrap();
    let again = s.attach(&image, rw_dio());
    let f = fs::File::options().write(true).open(&again.device).unwrap();
    f.write_all_at(&[4u8; 4096], 0).unwrap();

    assert!(matches!(
        s.host.block_device_size(&image),
        Err(HostError::WrongType { .. })
    ));
}

#[test]
fn detach_leaves_a_reused_device_number_alone() {
    let Some(mut s) = Scratch::new() else { return };
    let (a, b) = (s.path("a.img"), s.path("b.img"));
    s.host.create_image(&a, 4 * MIB, false).unwrap();
    s.host.create_image(&b, 4 * MIB, false).unwrap();
    let old = s.host.loop_attach(&a, rw_dio()).unwrap();
    s.host.loop_detach(&old).unwrap();
    // The lowest free number comes back, unless another test took it meanwhile.
    let new = s.attach(&b, rw_dio());
    let stale = LoopDevice {
        device: new.device.clone(),
        number: new.number,
        ..old
    };
    s.host.loop_detach(&stale).unwrap();
    let listed = s.host.loop_devices().unwrap();
    assert!(
        listed.iter().any(|d| d.device == new.device && d.backing_file == b),
        "a detach meant for {} took {} from {}",
        a.display(),
        new.device.display(),
        b.display()
    );
}

#[test]
fn mount_points_and_loop_lookups_without_scans() {
    let Some(mut s) = Scratch::new() else { return };
    let mnt = s.dir("mnt");
    let missing = s.path("missing");
    let link = s.path("link");
    std::os::unix::fs::symlink(&mnt, &link).unwrap();
    assert!(!s.host.is_mount_point(&mnt).unwrap());
    assert!(!s.host.is_mount_point(&missing).unwrap());
    s.mount(MountRequest {
        source: MountSource::Tmpfs,
        target: mnt.clone(),
        read_only: false,
        options: vec!["size=1M".into()],
    });
    assert!(s.host.is_mount_point(&mnt).unwrap());
    assert!(
        !s.host.is_mount_point(&link).unwrap(),
        "a symlink to a mount point is not one"
    );
    assert!(!s.host.is_mount_point(s.dir.path()).unwrap());

    let image = s.path("l.img");
    s.host.create_image(&image, 4 * MIB, false).unwrap();
    assert_eq!(s.host.loop_device_for(&image).unwrap(), None);
    let dev = s.attach(&image, rw_dio());
    let found = s.host.loop_device_for(&image).unwrap().expect("attached");
    assert_eq!(
        (found.device.as_path(), found.number),
        (dev.device.as_path(), dev.number)
    );
    s.host.loop_detach(&dev).unwrap();
    assert_eq!(s.host.loop_device_for(&image).unwrap(), None, "after detach");
    // A fresh host (a restart) finds what an earlier one attached.
    let again = s.attach(&image, rw_dio());
    let fresh = LinuxHost::new();
    assert_eq!(
        fresh.loop_device_for(&image).unwrap().map(|d| d.number),
        Some(again.number)
    );
    assert_eq!(s.host.unmount(&mnt).unwrap(), Unmounted::Removed);
    assert!(!s.host.is_mount_point(&mnt).unwrap());
}

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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_host::{
    FileSystem, HostError, HostOps, LinuxHost, LoopDevice, LoopOptions, MountRequest, MountSource, TargetKind,
    Unmounted,
};

const MIB: u64 = 1 << 20;

/// A temp dir plus everything mounted and attached under it; torn down on drop.
struct Scratch {
    host: Arc<LinuxHost>,
    mounts: Vec<PathBuf>,
    loops: Vec<PathBuf>,
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
        self.loops.push(dev.device.clone());
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
        // Filesystems first (they hold their loop devices), then the loop devices (which may
        // hold image files inside other mounts), then whatever those kept busy.
        let busy: Vec<&PathBuf> = self.mounts.iter().rev().filter(|t| !self.unmount_all(t)).collect();
        for device in self.loops.iter().rev() {
            if let Err(e) = self.host.loop_detach(device) {
                eprintln!("cleanup: detach {}: {e}", device.display());
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
    let dev = s.formatted("pool.img", 256 * MIB, FileSystem::Btrfs);
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
    assert!(st.total_bytes > 50 * MIB && st.available_bytes <= st.total_bytes);

    write_bytes(&mnt.join("hello"), 2 * MIB).unwrap();
    assert_eq!(host.unmount(&mnt).unwrap(), Unmounted::Removed);
    assert_eq!(host.unmount(&mnt).unwrap(), Unmounted::NotMounted);
    assert!(!s.mounted_at(&mnt));
    assert!(!mnt.join("hello").exists());

    host.loop_detach(&dev.device).unwrap();
    host.loop_detach(&dev.device).unwrap();
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
    assert!(meta.file_type().is_block_device());
    assert_eq!(meta.rdev(), fs::metadata(&dev.device).unwrap().rdev());
    // Idempotent re-prepare of a published block target.
    s.host.prepare_target(&target, TargetKind::File).unwrap();
    assert!(s.mounted_at(&target));
    assert_eq!(s.host.unmount(&target).unwrap(), Unmounted::Removed);
    assert!(!s.mounted_at(&target));
    assert!(fs::symlink_metadata(&target).unwrap().is_file());
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
    s.loops.extend(devices.iter().map(|d| d.device.clone()));
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

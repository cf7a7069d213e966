//! Capacity really holds: writing past a volume's size fails with ENOSPC or EDQUOT for every kind,
//! and NodeGetVolumeStats reports what was written. Runs the real `berth csi` as root.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

mod common;

use std::fs;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::PathBuf;

use common::{Daemon, Kind, MIB, bytes_usage, fill_file, skip_unless_root};

/// Slack for filesystem metadata when comparing written bytes with reported usage.
const SLACK: u64 = MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_volume_refuses_writes_past_capacity() {
    mount_kind_capacity(Kind::Dir, 16 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_ext4_volume_refuses_writes_past_capacity() {
    mount_kind_capacity(Kind::Fs("ext4"), 64 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmpfs_volume_refuses_writes_past_capacity() {
    mount_kind_capacity(Kind::Tmpfs, 16 * MIB).await;
}

async fn mount_kind_capacity(kind: Kind, capacity: u64) {
    let test = format!("capacity-{}", kind.label());
    if skip_unless_root(&test) {
        return;
    }
    let d = Daemon::start(&test).await;
    let csi = d.csi();
    let vol = csi.create("capacity", kind, capacity).await.expect("CreateVolume");
    assert_eq!(
        vol.capacity_bytes as u64, capacity,
        "required == limit, so the volume has exactly that size"
    );
    let staging = d.stage_dir("capacity");
    let target = d.target_path("capacity");
    csi.stage(&vol, kind, &staging).await.expect("NodeStageVolume");
    csi.publish(&vol, kind, &staging, &target)
        .await
        .expect("NodePublishVolume");

    let file = target.join("fill");
    let (written, err) = tokio::task::spawn_blocking(move || fill_file(&file, 2 * capacity))
        .await
        .expect("writer thread");
    let err = err.unwrap_or_else(|| {
        panic!(
            "wrote {written} bytes (twice the {capacity}-byte capacity) into a {} volume without an error",
            kind.label()
        )
    });
    let errno = err.raw_os_error();
    assert!(
        errno == Some(libc::ENOSPC) || errno == Some(libc::EDQUOT),
        "writing past capacity failed with {err} (errno {errno:?}), expected ENOSPC or EDQUOT"
    );
    assert!(
        written <= capacity,
        "{written} bytes were accepted by a {capacity}-byte volume"
    );
    assert!(
        written >= capacity / 2,
        "only {written} bytes fit into a {capacity}-byte {} volume",
        kind.label()
    );

    let stats = csi.stats(&vol.volume_id, &target).await.expect("NodeGetVolumeStats");
    let usage = bytes_usage(&stats).unwrap_or_else(|| panic!("NodeGetVolumeStats has no BYTES usage: {stats:?}"));
    assert!(
        usage.used as u64 + SLACK >= written,
        "NodeGetVolumeStats says {} bytes used; {written} bytes were written",
        usage.used
    );
    assert!(
        usage.total > 0 && usage.total as u64 <= capacity + SLACK,
        "NodeGetVolumeStats total {} should describe the {capacity}-byte volume, not the pool",
        usage.total
    );

    fs::remove_file(target.join("fill")).expect("remove the fill file");
    csi.unpublish(&vol.volume_id, &target)
        .await
        .expect("NodeUnpublishVolume");
    csi.unstage(&vol.volume_id, &staging).await.expect("NodeUnstageVolume");
    csi.delete(&vol.volume_id).await.expect("DeleteVolume");
    assert!(csi.list_ids().await.expect("ListVolumes").is_empty());
    d.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_ends_at_capacity() {
    if skip_unless_root("capacity-block") {
        return;
    }
    let capacity = 16 * MIB;
    let kind = Kind::Block;
    let d = Daemon::start("capacity-block").await;
    let csi = d.csi();
    let vol = csi.create("capacity", kind, capacity).await.expect("CreateVolume");
    assert_eq!(vol.capacity_bytes as u64, capacity);
    let staging = d.stage_dir("capacity");
    let target = d.target_path("capacity");
    csi.stage(&vol, kind, &staging).await.expect("NodeStageVolume");
    csi.publish(&vol, kind, &staging, &target)
        .await
        .expect("NodePublishVolume");

    let dev: PathBuf = target.clone();
    tokio::task::spawn_blocking(move || {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .expect("open the published block device");
        let meta = fs::metadata(&dev).expect("stat target");
        assert!(
            meta.file_type().is_block_device(),
            "{} is not a block device",
            dev.display()
        );
        let size = (&f).seek(SeekFrom::End(0)).expect("seek to the device end");
        assert_eq!(size, capacity, "the block device should be exactly the volume's size");

        // A write that straddles the end is cut short at the end.
        let buf = vec![0x3cu8; 8192];
        match f.write_at(&buf, capacity - 4096) {
            Ok(n) => assert_eq!(n, 4096, "a write straddling the device end should stop at the end"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "straddling write: {e}"),
        }
        // Writes at or past the end fail with ENOSPC.
        for offset in [capacity, capacity + MIB] {
            let err = f
                .write_at(&buf[..4096], offset)
                .expect_err("a write past the end of the block device succeeded");
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "write at {offset}: {err}");
        }
        f.sync_all().expect("fsync the block device");
        let mut back = vec![0u8; 4096];
        f.read_exact_at(&mut back, capacity - 4096)
            .expect("read the last block");
        assert_eq!(back, buf[..4096], "the last block holds what was written");
    })
    .await
    .expect("block writer thread");

    let stats = csi.stats(&vol.volume_id, &target).await.expect("NodeGetVolumeStats");
    if let Some(usage) = bytes_usage(&stats) {
        assert_eq!(usage.total as u64, capacity, "block volume total bytes: {stats:?}");
    }

    csi.unpublish(&vol.volume_id, &target)
        .await
        .expect("NodeUnpublishVolume");
    csi.unstage(&vol.volume_id, &staging).await.expect("NodeUnstageVolume");
    csi.delete(&vol.volume_id).await.expect("DeleteVolume");
    assert!(csi.list_ids().await.expect("ListVolumes").is_empty());
    d.assert_clean().await;
}

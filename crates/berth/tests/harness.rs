//! The leak checker itself: it must see the kinds of leftovers the other tests rely on it to find
//! (a mount, a loop device, a stray image, a stray subvolume), and see nothing once they are gone.
//! Runs the real `berth csi` as root.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{Daemon, Kind, MIB, SPARES, mounts_under, skip_unless_root};

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("run a tool");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn assert_reported(leaks: &[String], needle: &str, what: &str) {
    assert!(
        leaks.iter().any(|l| l.contains(needle)),
        "the leak checker missed {what} ({needle}); it reported {leaks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_checker_sees_leftovers() {
    if skip_unless_root("harness-leak-checker") {
        return;
    }
    let d = Daemon::start("harness").await;
    let csi = d.csi();
    d.assert_clean().await;

    // A staged volume is a mount the checker must report.
    let vol = csi.create("harness", Kind::Dir, 16 * MIB).await.expect("CreateVolume");
    let staging = d.stage_dir("harness");
    csi.stage(&vol, Kind::Dir, &staging).await.expect("NodeStageVolume");
    assert_reported(&d.leaks().await, &staging.to_string_lossy(), "a staged mount");
    csi.unstage(&vol.volume_id, &staging).await.expect("NodeUnstageVolume");
    d.assert_clean().await;

    let pool = mounts_under(&d.data_dir)
        .into_iter()
        .find(|m| m.fstype == "btrfs")
        .expect("a pool mount")
        .mount_point;

    // A stray image file, then a loop device on it.
    let stray = pool.join("images").join("0000000000000000000000000000dead.img");
    fs::write(&stray, vec![0u8; MIB as usize]).expect("write stray image");
    assert_reported(
        &d.leaks().await,
        "0000000000000000000000000000dead.img",
        "a stray image",
    );
    let dev = sh("losetup", &["-f", "--show", &stray.to_string_lossy()]);
    assert_reported(&d.leaks().await, &format!("loop device {dev}"), "a stray loop device");
    sh("losetup", &["-d", &dev]);
    fs::remove_file(&stray).expect("remove stray image");

    // A loop device on a file beside the pool image (not inside any mount).
    let beside = d.data_dir.join("beside.img");
    fs::write(&beside, vec![0u8; MIB as usize]).expect("write image");
    let dev = sh("losetup", &["-f", "--show", &beside.to_string_lossy()]);
    assert_reported(
        &d.leaks().await,
        &format!("loop device {dev}"),
        "a loop device beside the pool",
    );
    sh("losetup", &["-d", &dev]);
    fs::remove_file(&beside).expect("remove image");

    // A subvolume no volume owns.
    let sub = pool.join("volumes").join("0000000000000000000000000000beef");
    sh("btrfs", &["subvolume", "create", &sub.to_string_lossy()]);
    let leaks = d.leaks().await;
    assert_reported(&leaks, "volumes/0000000000000000000000000000beef", "a stray subvolume");
    sh("btrfs", &["subvolume", "delete", &sub.to_string_lossy()]);

    // Spares are fine up to the daemon's target; one more, or one that is no subvolume, is not.
    d.wait_for_spares(SPARES).await;
    d.assert_clean().await;
    let extra = d.spares_dir().join("0000000000000000000000000000cafe");
    sh("btrfs", &["subvolume", "create", &extra.to_string_lossy()]);
    assert_reported(&d.leaks().await, &format!("more than the {SPARES}"), "a spare too many");
    sh("btrfs", &["subvolume", "delete", &extra.to_string_lossy()]);
    let plain = d.spares_dir().join("plain");
    fs::create_dir(&plain).expect("mkdir");
    assert_reported(
        &d.leaks().await,
        "spares/plain is not a subvolume",
        "a spare that is no subvolume",
    );
    fs::remove_dir(&plain).expect("rmdir");

    // A bind mount somewhere under the test dir.
    let src = d.root.join("bind-src");
    let dst = d.root.join("bind-dst");
    fs::create_dir_all(&src).expect("mkdir");
    fs::create_dir_all(&dst).expect("mkdir");
    sh("mount", &["--bind", &src.to_string_lossy(), &dst.to_string_lossy()]);
    assert_reported(&d.leaks().await, &dst.to_string_lossy(), "a bind mount");
    sh("umount", &[&dst.to_string_lossy()]);

    csi.delete(&vol.volume_id).await.expect("DeleteVolume");
    d.assert_clean().await;
    assert!(Path::new(&staging).exists());
}

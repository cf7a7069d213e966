//! Crash safety: `berth csi` SIGKILLs itself at a named point inside an RPC (`BERTH_CRASH_AT`),
//! is started again, and the same RPC repeated must succeed. The lifecycle is then finished and
//! the test checks from the kernel's side that no image, loop device, mount, subvolume or qgroup
//! leaked, and that a bystander volume made before the crash is still there.
//! Runs the real `berth csi` as root.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

mod common;

use std::path::PathBuf;

use berth_csi::v1;
use common::{Csi, Daemon, Kind, SPARES, btrfs_leaks, dir_names, mount_count, skip_unless_root, use_volume};

/// The RPC a crash point sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Create,
    Delete,
    Stage,
    Publish,
    Unpublish,
    Unstage,
}

fn step_of(point: &str) -> Step {
    match point.split('.').next() {
        Some("create_volume") => Step::Create,
        Some("delete_volume") => Step::Delete,
        Some("node_stage") => Step::Stage,
        Some("node_publish") => Step::Publish,
        Some("node_unpublish") => Step::Unpublish,
        Some("node_unstage") => Step::Unstage,
        _ => panic!("unknown crash point {point}"),
    }
}

struct Victim {
    vol: Option<v1::Volume>,
    staging: PathBuf,
    target: PathBuf,
}

/// Runs the lifecycle step `step` once.
async fn run_step(csi: &Csi, kind: Kind, step: Step, v: &mut Victim) -> Result<(), tonic::Status> {
    let id = v.vol.as_ref().map(|vol| vol.volume_id.clone()).unwrap_or_default();
    match step {
        Step::Create => {
            let vol = csi.create("victim", kind, kind.test_size()).await?;
            v.vol = Some(vol);
            Ok(())
        }
        Step::Stage => csi.stage(vol(v), kind, &v.staging).await,
        Step::Publish => csi.publish(vol(v), kind, &v.staging, &v.target).await,
        Step::Unpublish => csi.unpublish(&id, &v.target).await,
        Step::Unstage => csi.unstage(&id, &v.staging).await,
        Step::Delete => csi.delete(&id).await,
    }
}

fn vol(v: &Victim) -> &v1::Volume {
    v.vol.as_ref().expect("the victim volume exists by now")
}

const LIFECYCLE: [Step; 6] = [
    Step::Create,
    Step::Stage,
    Step::Publish,
    Step::Unpublish,
    Step::Unstage,
    Step::Delete,
];

async fn crash_at(point: &'static str, kind: Kind) {
    crash_in(point, step_of(point), kind).await;
}

async fn crash_in(point: &'static str, crash_step: Step, kind: Kind) {
    let test = format!("crash-{point}-{crash_step:?}-{}", kind.label());
    if skip_unless_root(&test) {
        return;
    }
    let mut d = Daemon::start(&format!(
        "{}-{}-{}",
        point.replace(['.', '_'], "-"),
        format!("{crash_step:?}").to_lowercase(),
        kind.label()
    ))
    .await;
    let bystander = d
        .csi()
        .create("bystander", kind, kind.test_size())
        .await
        .expect("CreateVolume bystander");
    let mut v = Victim {
        vol: None,
        staging: d.stage_dir("victim"),
        target: d.target_path("victim"),
    };

    // The steps before the crash run on a daemon without crash points...
    let crash_index = LIFECYCLE
        .iter()
        .position(|s| *s == crash_step)
        .expect("step in lifecycle");
    for step in &LIFECYCLE[..crash_index] {
        run_step(&d.csi(), kind, *step, &mut v)
            .await
            .unwrap_or_else(|s| panic!("{step:?} before the crash: {:?}: {}", s.code(), s.message()));
        if *step == Step::Publish {
            use_volume(kind, &v.target).expect("use the published volume");
        }
    }
    // ...which is then stopped with SIGTERM (leaving volumes staged and published) and started
    // again with the crash point armed.
    d.restart_with(Some(point)).await;
    if point == "create_volume.after_spare_rename" {
        // Reached only when a spare is ready. The daemon makes one at a time and lists it once
        // it is complete, so with two in spares/ at least one is.
        d.wait_for_spares(2).await;
    }
    let result = run_step(&d.csi(), kind, crash_step, &mut v).await;
    d.expect_crash_and_restart(point, result).await;

    // The same call again, on the restarted daemon, must succeed.
    let csi = d.csi();
    run_step(&csi, kind, crash_step, &mut v).await.unwrap_or_else(|s| {
        panic!(
            "{crash_step:?} repeated after the crash at {point}: {:?}: {}",
            s.code(),
            s.message()
        )
    });
    // And once more: still idempotent, and no mount stacked on the first.
    run_step(&csi, kind, crash_step, &mut v).await.unwrap_or_else(|s| {
        panic!(
            "{crash_step:?} repeated twice after {point}: {:?}: {}",
            s.code(),
            s.message()
        )
    });
    match crash_step {
        Step::Stage if kind != Kind::Block => assert_eq!(mount_count(&v.staging), 1, "mounts at the staging path"),
        Step::Publish => assert_eq!(mount_count(&v.target), 1, "mounts at the target path"),
        Step::Unpublish => assert_eq!(mount_count(&v.target), 0, "target still mounted"),
        Step::Unstage => assert_eq!(mount_count(&v.staging), 0, "staging path still mounted"),
        _ => {}
    }

    // Finish the lifecycle.
    for step in &LIFECYCLE[crash_index + 1..] {
        run_step(&csi, kind, *step, &mut v)
            .await
            .unwrap_or_else(|s| panic!("{step:?} after the crash at {point}: {:?}: {}", s.code(), s.message()));
        if *step == Step::Publish {
            use_volume(kind, &v.target).expect("use the published volume");
        }
    }

    // Nothing lost: the bystander is still listed (and the victim is gone).
    let ids = csi.list_ids().await.expect("ListVolumes");
    assert_eq!(
        ids,
        vec![bystander.volume_id.clone()],
        "after the crash at {point}, ListVolumes should hold only the bystander"
    );
    d.assert_clean().await;
    csi.delete(&bystander.volume_id).await.expect("DeleteVolume bystander");
    assert!(csi.list_ids().await.expect("ListVolumes").is_empty());
    d.assert_clean().await;
}

macro_rules! crash_tests {
    ($($name:ident: $point:literal, $kind:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crash_at($point, $kind).await;
            }
        )*
    };
}

crash_tests! {
    create_after_spare_rename_dir: "create_volume.after_spare_rename", Kind::Dir;
    create_after_backend_dir: "create_volume.after_backend", Kind::Dir;
    create_after_backend_fs: "create_volume.after_backend", Kind::Fs("ext4");
    create_after_backend_block: "create_volume.after_backend", Kind::Block;
    create_after_backend_tmpfs: "create_volume.after_backend", Kind::Tmpfs;
    create_after_journal_dir: "create_volume.after_journal", Kind::Dir;
    create_after_journal_fs: "create_volume.after_journal", Kind::Fs("ext4");
    create_after_journal_block: "create_volume.after_journal", Kind::Block;
    create_after_journal_tmpfs: "create_volume.after_journal", Kind::Tmpfs;
    delete_after_mark_dir: "delete_volume.after_mark", Kind::Dir;
    delete_after_mark_fs: "delete_volume.after_mark", Kind::Fs("ext4");
    delete_after_mark_block: "delete_volume.after_mark", Kind::Block;
    delete_after_mark_tmpfs: "delete_volume.after_mark", Kind::Tmpfs;
    delete_after_backend_dir: "delete_volume.after_backend", Kind::Dir;
    delete_after_backend_fs: "delete_volume.after_backend", Kind::Fs("ext4");
    delete_after_backend_block: "delete_volume.after_backend", Kind::Block;
    delete_after_backend_tmpfs: "delete_volume.after_backend", Kind::Tmpfs;
    stage_after_attach_fs: "node_stage.after_attach", Kind::Fs("ext4");
    stage_after_attach_block: "node_stage.after_attach", Kind::Block;
    stage_after_mount_dir: "node_stage.after_mount", Kind::Dir;
    stage_after_mount_fs: "node_stage.after_mount", Kind::Fs("ext4");
    stage_after_mount_block: "node_stage.after_mount", Kind::Block;
    stage_after_mount_tmpfs: "node_stage.after_mount", Kind::Tmpfs;
    publish_after_mount_dir: "node_publish.after_mount", Kind::Dir;
    publish_after_mount_fs: "node_publish.after_mount", Kind::Fs("ext4");
    publish_after_mount_block: "node_publish.after_mount", Kind::Block;
    publish_after_mount_tmpfs: "node_publish.after_mount", Kind::Tmpfs;
    unpublish_after_unmount_dir: "node_unpublish.after_unmount", Kind::Dir;
    unpublish_after_unmount_fs: "node_unpublish.after_unmount", Kind::Fs("ext4");
    unpublish_after_unmount_block: "node_unpublish.after_unmount", Kind::Block;
    unpublish_after_unmount_tmpfs: "node_unpublish.after_unmount", Kind::Tmpfs;
    unstage_after_unmount_dir: "node_unstage.after_unmount", Kind::Dir;
    unstage_after_unmount_fs: "node_unstage.after_unmount", Kind::Fs("ext4");
    unstage_after_unmount_block: "node_unstage.after_unmount", Kind::Block;
    unstage_after_unmount_tmpfs: "node_unstage.after_unmount", Kind::Tmpfs;
}

/// The journal's crash point sits in every call that writes a record, between the write-ahead
/// log's write and redb's commit: the restarted driver must find the record in the log.
macro_rules! log_crash_tests {
    ($($name:ident: $step:expr, $kind:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crash_in("journal.after_log", $step, $kind).await;
            }
        )*
    };
}

log_crash_tests! {
    create_after_log_dir: Step::Create, Kind::Dir;
    create_after_log_fs: Step::Create, Kind::Fs("ext4");
    stage_after_log_fs: Step::Stage, Kind::Fs("ext4");
    publish_after_log_dir: Step::Publish, Kind::Dir;
    unpublish_after_log_block: Step::Unpublish, Kind::Block;
    unstage_after_log_tmpfs: Step::Unstage, Kind::Tmpfs;
    delete_after_log_dir: Step::Delete, Kind::Dir;
}

/// Spare subvolumes are not data: a clean stop removes them, a SIGKILL leaves them for the next
/// start, and `berth teardown` removes them too, qgroups included (checked on the pool image
/// mounted again by hand after the teardown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_leave_nothing_after_a_stop_a_crash_or_a_teardown() {
    if skip_unless_root("crash-spares") {
        return;
    }
    let mut d = Daemon::start("spares").await;
    d.wait_for_spares(SPARES).await;
    let spares = d.spares_dir();
    let pool = spares.parent().expect("spares/ is in a pool").to_owned();
    let vol = d
        .csi()
        .create("kept", Kind::Dir, Kind::Dir.test_size())
        .await
        .expect("CreateVolume");
    d.wait_for_spares(SPARES).await;
    d.assert_clean().await;
    let live = std::collections::BTreeSet::from([vol.volume_id.clone()]);

    // SIGTERM: the spares go, the volume stays; nothing else is left in the pool.
    let status = d.stop().expect("the daemon was running");
    assert!(
        status.success(),
        "berth csi exited with {status}; log:\n{}",
        d.log_tail(30)
    );
    assert_eq!(dir_names(&spares), Vec::<String>::new(), "spares after a clean stop");
    assert_eq!(btrfs_leaks(&pool, &live), Vec::<String>::new());

    // SIGKILL leaves spares; the next start replaces them, no more than the target.
    d.restart().await;
    d.wait_for_spares(SPARES).await;
    let before_kill = dir_names(&spares);
    d.kill();
    assert_eq!(dir_names(&spares), before_kill, "a crash leaves the spares");
    d.restart().await;
    d.wait_for_spares(SPARES).await;
    assert!(
        dir_names(&spares).iter().all(|s| !before_kill.contains(s)),
        "an earlier run's spares are removed"
    );
    d.assert_clean().await;

    // SIGKILL, then teardown: no spare and no qgroup without its subvolume on the image.
    d.kill();
    let teardown = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("teardown")
        .arg("--data-dir")
        .arg(&d.data_dir)
        .status()
        .expect("run berth teardown");
    assert!(teardown.success(), "berth teardown: {teardown}");
    let image = d.data_dir.join("pools/default/pool.img");
    let look = d.root.join("look");
    std::fs::create_dir_all(&look).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&image)
        .arg(&look)
        .status()
        .expect("mount the pool image");
    assert!(mounted.success(), "mount -o loop {}", image.display());
    let found = (dir_names(&look.join("spares")), btrfs_leaks(&look, &live));
    let _ = std::process::Command::new("umount").arg(&look).status();
    assert_eq!(found, (vec![], vec![]), "spares or stray qgroups after berth teardown");

    // The volume is still there for the next start; it deletes cleanly.
    d.restart().await;
    assert_eq!(
        d.csi().list_ids().await.expect("ListVolumes"),
        vec![vol.volume_id.clone()]
    );
    d.csi().delete(&vol.volume_id).await.expect("DeleteVolume");
    d.assert_clean().await;
}

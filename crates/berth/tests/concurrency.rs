//! Concurrency: parallel CreateVolume calls with one name make exactly one volume, and parallel
//! operations on one volume are serialized or ABORTED, never leaving an inconsistent state.
//! Runs the real `berth csi` as root.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{Csi, Daemon, Kind, MIB, mount_count, skip_unless_root};
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tonic::Code;

const PARALLEL: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_name_creates_one_dir_volume() {
    same_name_creates_one_volume(Kind::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_name_creates_one_fs_volume() {
    same_name_creates_one_volume(Kind::Fs("ext4")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_name_creates_one_tmpfs_volume() {
    same_name_creates_one_volume(Kind::Tmpfs).await;
}

/// Each call on its own connection, all released at once.
async fn same_name_creates_one_volume(kind: Kind) {
    let test = format!("concurrent-create-{}", kind.label());
    if skip_unless_root(&test) {
        return;
    }
    let d = Daemon::start(&test).await;
    let barrier = Arc::new(Barrier::new(PARALLEL));
    let mut tasks = JoinSet::new();
    for _ in 0..PARALLEL {
        let csi = Csi::connect(&d.endpoint).await.expect("connect");
        let barrier = barrier.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            csi.create("one-name", kind, kind.test_size()).await
        });
    }
    let mut ids = BTreeSet::new();
    let mut errors = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("task") {
            Ok(vol) => {
                ids.insert(vol.volume_id);
            }
            Err(s) => errors.push(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    assert!(
        errors.is_empty(),
        "{} of {PARALLEL} CreateVolume calls with one name failed: {errors:?}",
        errors.len()
    );
    assert_eq!(
        ids.len(),
        1,
        "parallel CreateVolume with one name returned several volume ids: {ids:?}"
    );
    let csi = d.csi();
    let listed = csi.list_ids().await.expect("ListVolumes");
    assert_eq!(
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        ids,
        "ListVolumes shows exactly the one volume"
    );
    assert_eq!(listed.len(), 1);
    d.assert_clean().await;
    let id = ids.into_iter().next().expect("one id");
    csi.delete(&id).await.expect("DeleteVolume");
    d.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_names_in_parallel_make_distinct_volumes() {
    if skip_unless_root("concurrent-distinct") {
        return;
    }
    let d = Daemon::start("concurrent-distinct").await;
    let barrier = Arc::new(Barrier::new(PARALLEL));
    let mut tasks = JoinSet::new();
    for i in 0..PARALLEL {
        let csi = d.csi();
        let barrier = barrier.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            csi.create(&format!("vol-{i}"), Kind::Dir, 16 * MIB).await
        });
    }
    let mut ids = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let vol = joined
            .expect("task")
            .unwrap_or_else(|s| panic!("CreateVolume: {:?}: {}", s.code(), s.message()));
        ids.insert(vol.volume_id);
    }
    assert_eq!(ids.len(), PARALLEL, "distinct names must make distinct volumes");
    let csi = d.csi();
    let listed: BTreeSet<String> = csi.list_ids().await.expect("ListVolumes").into_iter().collect();
    assert_eq!(listed, ids);
    d.assert_clean().await;

    let mut tasks = JoinSet::new();
    for id in ids {
        let csi = d.csi();
        tasks.spawn(async move { csi.delete(&id).await });
    }
    while let Some(joined) = tasks.join_next().await {
        joined
            .expect("task")
            .unwrap_or_else(|s| panic!("DeleteVolume: {:?}: {}", s.code(), s.message()));
    }
    assert!(csi.list_ids().await.expect("ListVolumes").is_empty());
    d.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stage_racing_delete_dir() {
    stage_racing_delete(Kind::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stage_racing_delete_fs() {
    stage_racing_delete(Kind::Fs("ext4")).await;
}

/// 8 NodeStage calls (one staging path) and a DeleteVolume, released together, several rounds.
/// Every answer is OK or a refusal; afterwards the volume is either deleted and mounted nowhere,
/// or listed and staged at most once; after cleanup nothing is left.
async fn stage_racing_delete(kind: Kind) {
    let test = format!("race-stage-delete-{}", kind.label());
    if skip_unless_root(&test) {
        return;
    }
    let d = Daemon::start(&test).await;
    let csi = d.csi();
    for round in 0..4 {
        let vol = csi
            .create(&format!("race-{round}"), kind, kind.test_size())
            .await
            .expect("CreateVolume");
        let staging = d.stage_dir(&format!("race-{round}"));
        let barrier = Arc::new(Barrier::new(9));
        let mut stages = JoinSet::new();
        for _ in 0..8 {
            let (csi, vol, staging, barrier) = (d.csi(), vol.clone(), staging.clone(), barrier.clone());
            stages.spawn(async move {
                barrier.wait().await;
                csi.stage(&vol, kind, &staging).await
            });
        }
        let delete = {
            let (csi, id, barrier) = (d.csi(), vol.volume_id.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                csi.delete(&id).await
            })
        };
        let mut staged_ok = 0;
        while let Some(joined) = stages.join_next().await {
            match joined.expect("task") {
                Ok(()) => staged_ok += 1,
                Err(s) => assert!(
                    matches!(s.code(), Code::Aborted | Code::FailedPrecondition | Code::NotFound),
                    "round {round}: NodeStage racing DeleteVolume answered {:?}: {}",
                    s.code(),
                    s.message()
                ),
            }
        }
        let deleted = match delete.await.expect("task") {
            Ok(()) => true,
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Aborted | Code::FailedPrecondition),
                    "round {round}: DeleteVolume racing NodeStage answered {:?}: {}",
                    s.code(),
                    s.message()
                );
                false
            }
        };
        let listed = csi.list_ids().await.expect("ListVolumes").contains(&vol.volume_id);
        let mounts = mount_count(&staging);
        if deleted {
            assert!(
                !listed,
                "round {round}: DeleteVolume answered OK but the volume is still listed"
            );
            assert_eq!(
                mounts,
                0,
                "round {round}: the volume was deleted but is still staged at {}",
                staging.display()
            );
        } else {
            assert!(
                listed,
                "round {round}: DeleteVolume failed but the volume is gone from ListVolumes"
            );
            assert!(
                mounts <= 1,
                "round {round}: {mounts} mounts stacked at the staging path"
            );
            if staged_ok > 0 {
                assert_eq!(mounts, 1, "round {round}: NodeStage answered OK but nothing is mounted");
            }
            csi.unstage(&vol.volume_id, &staging).await.expect("NodeUnstageVolume");
            csi.delete(&vol.volume_id).await.expect("DeleteVolume");
        }
        eprintln!(
            "round {round} ({}): {staged_ok} of 8 NodeStage OK, DeleteVolume {}",
            kind.label(),
            if deleted { "OK" } else { "refused" }
        );
    }
    assert!(csi.list_ids().await.expect("ListVolumes").is_empty());
    d.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_racing_unpublish() {
    if skip_unless_root("race-publish-unpublish") {
        return;
    }
    let kind = Kind::Dir;
    let d = Daemon::start("race-publish").await;
    let csi = d.csi();
    let vol = csi.create("race", kind, 16 * MIB).await.expect("CreateVolume");
    let staging = d.stage_dir("race");
    let target = d.target_path("race");
    csi.stage(&vol, kind, &staging).await.expect("NodeStageVolume");
    for round in 0..4 {
        let barrier = Arc::new(Barrier::new(16));
        let mut tasks = JoinSet::new();
        for i in 0..16 {
            let (csi, vol, staging, target, barrier) =
                (d.csi(), vol.clone(), staging.clone(), target.clone(), barrier.clone());
            tasks.spawn(async move {
                barrier.wait().await;
                if i % 2 == 0 {
                    csi.publish(&vol, kind, &staging, &target).await
                } else {
                    csi.unpublish(&vol.volume_id, &target).await
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            if let Err(s) = joined.expect("task") {
                assert_eq!(
                    s.code(),
                    Code::Aborted,
                    "round {round}: racing publish/unpublish: {}",
                    s.message()
                );
            }
        }
        assert!(mount_count(&target) <= 1, "round {round}: mounts stacked at the target");
        csi.unpublish(&vol.volume_id, &target)
            .await
            .expect("NodeUnpublishVolume");
        assert_eq!(
            mount_count(&target),
            0,
            "round {round}: target still mounted after NodeUnpublish"
        );
    }
    csi.unstage(&vol.volume_id, &staging).await.expect("NodeUnstageVolume");
    csi.delete(&vol.volume_id).await.expect("DeleteVolume");
    d.assert_clean().await;
}

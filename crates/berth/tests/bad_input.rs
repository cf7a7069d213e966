//! Bad input gets the right gRPC code and leaves nothing behind: hostile ids and names, symlinked
//! target paths, sizes no pool can hold, missing volumes, and unmounts of unmounted paths.
//! Runs the real `berth csi` as root.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use berth_csi::v1;
use common::{Csi, Daemon, GIB, Kind, MIB, call, check_code, check_ok, mount_count, skip_unless_root};
use tonic::Code;

/// Ids and names that must never reach a path or a lookup.
fn hostile_strings() -> Vec<(&'static str, String)> {
    vec![
        ("dot-dot-slash", "../etc".to_owned()),
        ("deep dot-dot", "../../../../tmp/x".to_owned()),
        ("dot-dot", "..".to_owned()),
        ("absolute path", "/abs/path".to_owned()),
        ("root", "/".to_owned()),
        ("embedded slash", "a/b".to_owned()),
        ("NUL", "vol\0ume".to_owned()),
        ("300 bytes", "x".repeat(300)),
        ("empty", String::new()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_and_names_are_invalid_argument() {
    if skip_unless_root("bad-input-ids") {
        return;
    }
    let d = Daemon::start("bad-ids").await;
    let csi = d.csi();
    let staging = d.stage_dir("hostile");
    let target = d.target_path("hostile");
    let invalid = &[Code::InvalidArgument];
    let mut failures = Vec::new();

    for (label, s) in hostile_strings() {
        let kind = Kind::Dir;
        check_code(
            &mut failures,
            &format!("CreateVolume name {label}"),
            csi.create(&s, kind, 16 * MIB).await,
            invalid,
        );
        check_code(
            &mut failures,
            &format!("DeleteVolume id {label}"),
            csi.delete(&s).await,
            invalid,
        );
        check_code(
            &mut failures,
            &format!("ControllerGetVolume id {label}"),
            csi.get(&s).await,
            invalid,
        );
        check_code(
            &mut failures,
            &format!("ValidateVolumeCapabilities id {label}"),
            call(
                csi.controller()
                    .validate_volume_capabilities(v1::ValidateVolumeCapabilitiesRequest {
                        volume_id: s.clone(),
                        volume_capabilities: vec![kind.capability()],
                        ..Default::default()
                    }),
            )
            .await,
            invalid,
        );
        let fake = v1::Volume {
            volume_id: s.clone(),
            ..Default::default()
        };
        check_code(
            &mut failures,
            &format!("NodeStageVolume id {label}"),
            csi.stage(&fake, kind, &staging).await,
            invalid,
        );
        check_code(
            &mut failures,
            &format!("NodePublishVolume id {label}"),
            csi.publish(&fake, kind, &staging, &target).await,
            invalid,
        );
        check_code(
            &mut failures,
            &format!("NodeUnpublishVolume id {label}"),
            csi.unpublish(&s, &target).await,
            invalid,
        );
        check_code(
            &mut failures,
            &format!("NodeUnstageVolume id {label}"),
            csi.unstage(&s, &staging).await,
            invalid,
        );
        check_code(
            &mut failures,
            &format!("NodeGetVolumeStats id {label}"),
            csi.stats(&s, &target).await,
            invalid,
        );
    }

    // Parameters that name nothing Berth has.
    let bad_params: Vec<(&str, HashMap<String, String>)> = vec![
        ("kind=bogus", HashMap::from([("kind".to_owned(), "bogus".to_owned())])),
        (
            "fstype=ntfs",
            HashMap::from([
                ("kind".to_owned(), "fs".to_owned()),
                ("csi.storage.k8s.io/fstype".to_owned(), "ntfs".to_owned()),
            ]),
        ),
        ("pool=../x", HashMap::from([("pool".to_owned(), "../x".to_owned())])),
        ("pool=/abs", HashMap::from([("pool".to_owned(), "/abs".to_owned())])),
        (
            "parameters over 4 KiB",
            HashMap::from([("csi.storage.k8s.io/pvc/name".to_owned(), "y".repeat(5000))]),
        ),
    ];
    for (label, params) in bad_params {
        let mut req = Csi::create_request("bad-params", Kind::Dir, 16 * MIB);
        req.parameters.extend(params);
        check_code(
            &mut failures,
            &format!("CreateVolume with {label}"),
            csi.create_with(req).await,
            invalid,
        );
    }
    let mut req = Csi::create_request("no-capabilities", Kind::Dir, 16 * MIB);
    req.volume_capabilities.clear();
    check_code(
        &mut failures,
        "CreateVolume without capabilities",
        csi.create_with(req).await,
        invalid,
    );

    // Paths a CO would never send.
    let vol = csi.create("paths", Kind::Dir, 16 * MIB).await.expect("CreateVolume");
    for (label, path) in [("relative", "relative/path"), ("empty", "")] {
        let mut req = Csi::stage_request(&vol, Kind::Dir, &staging);
        req.staging_target_path = path.to_owned();
        check_code(
            &mut failures,
            &format!("NodeStageVolume {label} staging path"),
            csi.stage_with(req).await,
            invalid,
        );
        let mut req = Csi::publish_request(&vol, Kind::Dir, &staging, &target);
        req.target_path = path.to_owned();
        check_code(
            &mut failures,
            &format!("NodePublishVolume {label} target path"),
            csi.publish_with(req).await,
            invalid,
        );
    }
    csi.delete(&vol.volume_id).await.expect("DeleteVolume");

    assert!(
        failures.is_empty(),
        "wrong answers to bad input:\n  {}",
        failures.join("\n  ")
    );
    assert_eq!(csi.list_ids().await.expect("ListVolumes"), Vec::<String>::new());
    d.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_paths_are_refused() {
    if skip_unless_root("bad-input-symlink") {
        return;
    }
    let d = Daemon::start("bad-symlink").await;
    let csi = d.csi();
    let refused = &[Code::InvalidArgument, Code::FailedPrecondition];
    let mut failures = Vec::new();

    // Where the symlinks point: outside the CO's staging and target dirs, with a marker in it.
    let outside = d.root.join("outside");
    fs::create_dir_all(&outside).expect("mkdir outside");
    fs::write(outside.join("keep"), "do not touch").expect("write marker");
    let outside_file = d.root.join("outside-file");
    fs::write(&outside_file, "do not touch").expect("write outside file");

    for kind in [Kind::Dir, Kind::Block] {
        let label = kind.label();
        let vol = csi
            .create(&format!("symlink-{label}"), kind, 16 * MIB)
            .await
            .expect("CreateVolume");

        // Staging path that is a symlink.
        let stage_link = d.root.join("staging").join(format!("link-{label}"));
        fs::create_dir_all(stage_link.parent().expect("parent")).expect("mkdir staging");
        symlink(&outside, &stage_link).expect("symlink");
        check_code(
            &mut failures,
            &format!("NodeStageVolume {label} with a symlinked staging path"),
            csi.stage(&vol, kind, &stage_link).await,
            refused,
        );

        let staging = d.stage_dir(&label);
        csi.stage(&vol, kind, &staging).await.expect("NodeStageVolume");
        let target_link = d.target_path(&format!("link-{label}"));
        let dest: &Path = if kind == Kind::Block { &outside_file } else { &outside };
        symlink(dest, &target_link).expect("symlink");
        check_code(
            &mut failures,
            &format!("NodePublishVolume {label} to a symlink pointing outside"),
            csi.publish(&vol, kind, &staging, &target_link).await,
            refused,
        );
        // Cleaning up after a refused publish must not touch the destination either.
        let _ = csi.unpublish(&vol.volume_id, &target_link).await;
        let _ = csi.unstage(&vol.volume_id, &stage_link).await;

        for p in [&outside, &outside_file, &target_link, &stage_link] {
            if mount_count(p) != 0 {
                failures.push(format!("{label}: something got mounted at {}", p.display()));
            }
        }
        csi.unstage(&vol.volume_id, &staging).await.expect("NodeUnstageVolume");
        csi.delete(&vol.volume_id).await.expect("DeleteVolume");
    }

    let keep = fs::read_to_string(outside.join("keep")).unwrap_or_default();
    if keep != "do not touch" {
        failures.push(format!("the marker in {} was changed or removed", outside.display()));
    }
    if fs::read_to_string(&outside_file).unwrap_or_default() != "do not touch" {
        failures.push(format!("{} was changed or removed", outside_file.display()));
    }
    assert!(failures.is_empty(), "symlinked paths:\n  {}", failures.join("\n  "));
    d.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_no_pool_can_hold_are_refused() {
    if skip_unless_root("bad-input-size") {
        return;
    }
    let d = Daemon::start("bad-size").await;
    let csi = d.csi();
    let mut failures = Vec::new();
    let too_big = 1024 * GIB; // the pool is 1 GiB; tmpfs memory is far less
    for kind in [Kind::Dir, Kind::Fs("ext4"), Kind::Block, Kind::Tmpfs] {
        check_code(
            &mut failures,
            &format!("CreateVolume {} of 1 TiB", kind.label()),
            csi.create(&format!("huge-{}", kind.label()), kind, too_big).await,
            &[Code::OutOfRange, Code::ResourceExhausted],
        );
    }
    // mkfs.xfs cannot make a 16 MiB filesystem, and limit_bytes forbids rounding up.
    check_code(
        &mut failures,
        "CreateVolume fs-xfs with required == limit == 16 MiB",
        csi.create("tiny-xfs", Kind::Fs("xfs"), 16 * MIB).await,
        &[Code::OutOfRange],
    );
    // limit below required is a contradiction.
    let mut req = Csi::create_request("limit-below-required", Kind::Dir, 32 * MIB);
    if let Some(range) = req.capacity_range.as_mut() {
        range.limit_bytes = (16 * MIB) as i64;
    }
    check_code(
        &mut failures,
        "CreateVolume with limit < required",
        csi.create_with(req).await,
        &[Code::InvalidArgument, Code::OutOfRange],
    );
    assert!(failures.is_empty(), "oversized volumes:\n  {}", failures.join("\n  "));
    assert_eq!(csi.list_ids().await.expect("ListVolumes"), Vec::<String>::new());
    d.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_volumes_are_not_found() {
    if skip_unless_root("bad-input-missing") {
        return;
    }
    let d = Daemon::start("bad-missing").await;
    let csi = d.csi();
    let staging = d.stage_dir("missing");
    let target = d.target_path("missing");
    let mut failures = Vec::new();
    // One id in Berth's own format, one in csi-sanity's style.
    for id in ["0123456789abcdef0123456789abcdef", "reallyfakevolumeid"] {
        let fake = v1::Volume {
            volume_id: id.to_owned(),
            ..Default::default()
        };
        let nf = &[Code::NotFound];
        check_code(
            &mut failures,
            &format!("ControllerGetVolume {id}"),
            csi.get(id).await,
            nf,
        );
        check_code(
            &mut failures,
            &format!("NodeStageVolume {id}"),
            csi.stage(&fake, Kind::Dir, &staging).await,
            nf,
        );
        check_code(
            &mut failures,
            &format!("NodePublishVolume {id}"),
            csi.publish(&fake, Kind::Dir, &staging, &target).await,
            nf,
        );
        check_code(
            &mut failures,
            &format!("NodeGetVolumeStats {id}"),
            csi.stats(id, &target).await,
            nf,
        );
        check_code(
            &mut failures,
            &format!("ValidateVolumeCapabilities {id}"),
            call(
                csi.controller()
                    .validate_volume_capabilities(v1::ValidateVolumeCapabilitiesRequest {
                        volume_id: id.to_owned(),
                        volume_capabilities: vec![Kind::Dir.capability()],
                        ..Default::default()
                    }),
            )
            .await,
            nf,
        );
        if let Err(s) = csi.delete(id).await {
            failures.push(format!(
                "DeleteVolume of unknown {id}: expected OK, got {:?}: {}",
                s.code(),
                s.message()
            ));
        }
    }
    if mount_count(&staging) + mount_count(&target) != 0 {
        failures.push("a missing volume got mounted".to_owned());
    }
    assert!(failures.is_empty(), "missing volumes:\n  {}", failures.join("\n  "));
    d.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmounting_unmounted_paths_is_ok() {
    if skip_unless_root("bad-input-unmount") {
        return;
    }
    let d = Daemon::start("bad-unmount").await;
    let csi = d.csi();
    let mut failures = Vec::new();
    for kind in [Kind::Dir, Kind::Fs("ext4"), Kind::Block, Kind::Tmpfs] {
        let label = kind.label();
        let vol = csi
            .create(&format!("unmount-{label}"), kind, kind.test_size())
            .await
            .expect("CreateVolume");
        let id = vol.volume_id.clone();
        let never_dir = d.stage_dir(&format!("never-{label}"));
        let absent = d.target_path(&format!("absent-{label}"));
        check_ok(
            &mut failures,
            format!("{label}: NodeUnpublish of a never-mounted dir"),
            csi.unpublish(&id, &never_dir).await,
        );
        check_ok(
            &mut failures,
            format!("{label}: NodeUnpublish of a path that does not exist"),
            csi.unpublish(&id, &absent).await,
        );
        check_ok(
            &mut failures,
            format!("{label}: NodeUnstage of a never-mounted dir"),
            csi.unstage(&id, &never_dir).await,
        );
        check_ok(
            &mut failures,
            format!("{label}: NodeUnstage of a path that does not exist"),
            csi.unstage(&id, &absent).await,
        );

        // A full cycle, then every undo a second time.
        let staging = d.stage_dir(&label);
        let target = d.target_path(&label);
        csi.stage(&vol, kind, &staging).await.expect("NodeStageVolume");
        csi.publish(&vol, kind, &staging, &target)
            .await
            .expect("NodePublishVolume");
        csi.unpublish(&id, &target).await.expect("NodeUnpublishVolume");
        check_ok(
            &mut failures,
            format!("{label}: second NodeUnpublish"),
            csi.unpublish(&id, &target).await,
        );
        csi.unstage(&id, &staging).await.expect("NodeUnstageVolume");
        check_ok(
            &mut failures,
            format!("{label}: second NodeUnstage"),
            csi.unstage(&id, &staging).await,
        );
        if mount_count(&target) + mount_count(&staging) != 0 {
            failures.push(format!("{label}: still mounted after unpublish and unstage"));
        }
        csi.delete(&id).await.expect("DeleteVolume");
        check_ok(
            &mut failures,
            format!("{label}: second DeleteVolume"),
            csi.delete(&id).await,
        );
    }
    assert!(
        failures.is_empty(),
        "unmount of unmounted paths:\n  {}",
        failures.join("\n  ")
    );
    d.assert_clean().await;
}

//! Table tests of the snapshot controllers' steps.

#![allow(clippy::unwrap_used)]

use super::*;
use rstest::rstest;
use serde_json::{Value, json};

const DRIVER: &str = "csi.berth.dev";

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

fn obj<T: serde::de::DeserializeOwned>(mut base: Value, extra: Value) -> T {
    merge(&mut base, extra);
    serde_json::from_value(base).unwrap()
}

/// Snapshot `default/snap` (uid s1) of claim `data`, class `fast`, with both finalizers once
/// `extra` says so.
fn snap(extra: Value) -> VolumeSnapshot {
    obj(
        json!({"metadata": {"name": "snap", "namespace": "default", "uid": "s1"},
               "spec": {"source": {"persistentVolumeClaimName": "data"}, "volumeSnapshotClassName": "fast"}}),
        extra,
    )
}

fn claim(extra: Value) -> PersistentVolumeClaim {
    obj(
        json!({"metadata": {"name": "data", "namespace": "default", "uid": "c1"},
               "spec": {"volumeName": "pv1"}, "status": {"phase": "Bound"}}),
        extra,
    )
}

fn volume() -> PersistentVolume {
    obj(
        json!({"metadata": {"name": "pv1"},
               "spec": {"csi": {"driver": DRIVER, "volumeHandle": "vol-1"}, "volumeMode": "Filesystem",
                        "claimRef": {"namespace": "default", "name": "data", "uid": "c1"}}}),
        json!({}),
    )
}

fn class(name: &str, default: bool, extra: Value) -> VolumeSnapshotClass {
    let ann = if default {
        json!({DEFAULT_CLASS_ANNOTATION: "true"})
    } else {
        json!({})
    };
    obj(
        json!({"metadata": {"name": name, "annotations": ann}, "driver": DRIVER, "deletionPolicy": "Delete"}),
        extra,
    )
}

/// The content made for `snap()`.
fn content(extra: Value) -> VolumeSnapshotContent {
    obj(
        json!({"metadata": {"name": "snapcontent-s1"},
               "spec": {"volumeSnapshotRef": {"name": "snap", "namespace": "default", "uid": "s1"},
                        "deletionPolicy": "Delete", "driver": DRIVER, "volumeSnapshotClassName": "fast",
                        "source": {"volumeHandle": "vol-1"}}}),
        extra,
    )
}

const BOTH: [&str; 2] = [AS_SOURCE_FINALIZER, BOUND_FINALIZER];

struct World {
    snapshot: VolumeSnapshot,
    content: Option<VolumeSnapshotContent>,
    claim: Option<PersistentVolumeClaim>,
    volume: Option<PersistentVolume>,
    classes: Vec<VolumeSnapshotClass>,
    restoring: bool,
    others: bool,
}

impl World {
    fn new(snapshot: VolumeSnapshot) -> World {
        World {
            snapshot,
            content: None,
            claim: Some(claim(json!({"metadata": {"finalizers": [PVC_FINALIZER]}}))),
            volume: Some(volume()),
            classes: vec![class("fast", true, json!({}))],
            restoring: false,
            others: false,
        }
    }
    fn step(&self) -> SnapshotStep {
        let classes: Vec<&VolumeSnapshotClass> = self.classes.iter().collect();
        sync_snapshot(&SnapshotView {
            snapshot: &self.snapshot,
            content: self.content.as_ref(),
            claim: self.claim.as_ref(),
            volume: self.volume.as_ref(),
            classes: &classes,
            restoring: self.restoring,
            claim_used_by_others: self.others,
        })
    }
}

fn err_of(step: SnapshotStep) -> (&'static str, String) {
    match step {
        SnapshotStep::Error { reason, message, .. } => (reason, message),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn a_new_snapshot_gets_finalizer_claim_protection_then_its_content() {
    // Finalizer first.
    let mut w = World::new(snap(json!({})));
    w.claim = Some(claim(json!({})));
    let SnapshotStep::Finalizers(s) = w.step() else {
        panic!()
    };
    assert_eq!(
        s.metadata.finalizers.as_deref().unwrap(),
        [AS_SOURCE_FINALIZER.to_owned()]
    );
    // Then the claim is protected.
    w.snapshot = s;
    assert_eq!(w.step(), SnapshotStep::ProtectClaim);
    // Then the content.
    w.claim = Some(claim(json!({"metadata": {"finalizers": [PVC_FINALIZER]}})));
    let SnapshotStep::CreateContent(c) = w.step() else {
        panic!()
    };
    assert_eq!(c.metadata.name.as_deref(), Some("snapcontent-s1"));
    assert_eq!(c.spec.driver, DRIVER);
    assert_eq!(c.spec.deletion_policy, "Delete");
    assert_eq!(c.spec.volume_snapshot_class_name.as_deref(), Some("fast"));
    assert_eq!(c.spec.source.volume_handle.as_deref(), Some("vol-1"));
    assert_eq!(c.spec.source_volume_mode.as_deref(), Some("Filesystem"));
    let r = &c.spec.volume_snapshot_ref;
    assert_eq!(
        (
            r.kind.as_deref(),
            r.name.as_deref(),
            r.namespace.as_deref(),
            r.uid.as_deref()
        ),
        (Some("VolumeSnapshot"), Some("snap"), Some("default"), Some("s1"))
    );
    assert_eq!(c.metadata.annotations, None, "no snapshotter secret");
}

#[test]
fn the_status_follows_the_content() {
    let mut w = World::new(snap(json!({"metadata": {"finalizers": [AS_SOURCE_FINALIZER]}})));
    w.content = Some(content(json!({})));
    let SnapshotStep::Status(s, notes) = w.step() else {
        panic!()
    };
    let st = s.status.as_ref().unwrap();
    assert_eq!(st.bound_volume_snapshot_content_name.as_deref(), Some("snapcontent-s1"));
    assert_eq!(st.ready_to_use, Some(false));
    assert!(notes.is_empty());
    // Bound now: the bound finalizer (Delete policy).
    w.snapshot = s;
    let SnapshotStep::Finalizers(s) = w.step() else {
        panic!()
    };
    assert_eq!(s.metadata.finalizers.as_deref().unwrap(), BOTH.map(str::to_owned));
    // The driver cut it.
    w.snapshot = s;
    w.content = Some(content(json!({"status": {"snapshotHandle": "h1", "readyToUse": true,
        "creationTime": 1_767_225_600_000_000_000i64, "restoreSize": 33_554_432}})));
    let SnapshotStep::Status(s, notes) = w.step() else {
        panic!()
    };
    let st = s.status.as_ref().unwrap();
    assert_eq!(st.ready_to_use, Some(true));
    assert_eq!(st.restore_size.as_ref().unwrap().0, "32Mi");
    assert_eq!(
        serde_json::to_value(st).unwrap()["creationTime"],
        json!("2026-01-01T00:00:00Z")
    );
    let msgs: Vec<String> = notes.iter().map(|n| format!("{} {}", n.reason, n.message)).collect();
    assert_eq!(
        msgs,
        vec![
            "SnapshotCreated Snapshot default/snap was successfully created by the CSI driver.".to_owned(),
            "SnapshotReady Snapshot default/snap is ready to use.".to_owned()
        ]
    );
    // Ready and bound: the claim's finalizer goes, then nothing.
    w.snapshot = s;
    assert_eq!(w.step(), SnapshotStep::ReleaseClaim);
    w.claim = Some(claim(json!({})));
    assert_eq!(w.step(), SnapshotStep::Nothing);
}

#[test]
fn a_content_error_reaches_the_snapshot() {
    let mut w = World::new(snap(json!({"metadata": {"finalizers": [AS_SOURCE_FINALIZER]}})));
    w.content = Some(content(
        json!({"status": {"readyToUse": false, "error": {"message": "boom"}}}),
    ));
    let SnapshotStep::Status(s, _) = w.step() else { panic!() };
    assert_eq!(s.status.unwrap().error.unwrap().message.as_deref(), Some("boom"));
}

#[test]
fn the_claim_keeps_its_finalizer_while_any_snapshot_of_it_is_being_cut() {
    let ready = json!({"metadata": {"finalizers": BOTH},
        "status": {"boundVolumeSnapshotContentName": "snapcontent-s1", "readyToUse": true}});
    let mut w = World::new(snap(ready));
    w.content = Some(content(json!({"status": {"readyToUse": true}})));
    w.others = true;
    assert_eq!(w.step(), SnapshotStep::Nothing);
    w.others = false;
    assert_eq!(w.step(), SnapshotStep::ReleaseClaim);
}

#[rstest]
#[case::one_default(vec![class("fast", true, json!({})), class("slow", false, json!({}))], Ok("fast"))]
#[case::none(vec![class("slow", false, json!({}))], Err("cannot find default snapshot class"))]
#[case::two(vec![class("a", true, json!({})), class("b", true, json!({}))], Err("2 default snapshot classes were found"))]
#[case::other_driver(vec![class("a", true, json!({"driver": "other"}))], Err("cannot find default snapshot class"))]
fn the_default_class(#[case] classes: Vec<VolumeSnapshotClass>, #[case] want: Result<&str, &str>) {
    let mut w = World::new(snap(json!({"spec": {"volumeSnapshotClassName": null}})));
    w.classes = classes;
    let got = match w.step() {
        SnapshotStep::SetClass(c) => Ok(c),
        other => Err(err_of(other)),
    };
    match want {
        Ok(c) => assert_eq!(got, Ok(c.to_owned())),
        Err(m) => assert_eq!(
            got,
            Err((
                "SetDefaultSnapshotClassFailed",
                format!("Failed to set default snapshot class with error {m}")
            ))
        ),
    }
}

#[test]
fn the_default_class_needs_a_bound_claim() {
    let mut w = World::new(snap(json!({"spec": {"volumeSnapshotClassName": null}})));
    w.claim = Some(claim(json!({"status": {"phase": "Pending"}})));
    assert_eq!(
        err_of(w.step()).1,
        "Failed to set default snapshot class with error the PVC data is not yet bound to a PV, will not attempt to take a snapshot"
    );
}

#[rstest]
#[case::both_sources(
    json!({"spec": {"source": {"volumeSnapshotContentName": "c"}}}),
    "SnapshotValidationError", "Exactly one of PersistentVolumeClaimName and VolumeSnapshotContentName should be specified"
)]
#[case::unknown_class(
    json!({"metadata": {"finalizers": [AS_SOURCE_FINALIZER]}, "spec": {"volumeSnapshotClassName": "nope"}}),
    "SnapshotContentCreationFailed",
    "Failed to create snapshot content with error failed to get input parameters to create snapshot snap: \"volumesnapshotclass.snapshot.storage.k8s.io \\\"nope\\\" not found\""
)]
fn snapshot_errors(#[case] extra: Value, #[case] reason: &str, #[case] message: &str) {
    let w = World::new(snap(extra));
    assert_eq!(err_of(w.step()), (reason_static(reason), message.to_owned()));
}

fn reason_static(r: &str) -> &'static str {
    match r {
        "SnapshotValidationError" => "SnapshotValidationError",
        "SnapshotContentCreationFailed" => "SnapshotContentCreationFailed",
        other => panic!("{other}"),
    }
}

#[test]
fn a_content_bound_to_another_snapshot_is_refused() {
    let mut w = World::new(snap(json!({"metadata": {"finalizers": [AS_SOURCE_FINALIZER]}})));
    w.content = Some(content(json!({"spec": {"volumeSnapshotRef": {"uid": "other"}}})));
    assert_eq!(
        err_of(w.step()),
        (
            "SnapshotContentMisbound",
            "VolumeSnapshotContent [snapcontent-s1] is bound to a different snapshot".to_owned()
        )
    );
}

#[test]
fn the_claim_must_not_be_going_away() {
    let mut w = World::new(snap(json!({"metadata": {"finalizers": [AS_SOURCE_FINALIZER]}})));
    w.claim = Some(claim(
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
    ));
    assert_eq!(
        err_of(w.step()).1,
        "Failed to create snapshot content with error snapshot controller failed to update data on API server: cannot add finalizer on claim because it is being deleted"
    );
    w.claim = None;
    assert_eq!(
        err_of(w.step()).1,
        "Failed to create snapshot content with error snapshot controller failed to update snap on API server: cannot get claim from snapshot"
    );
}

fn pre_snap(extra: Value) -> VolumeSnapshot {
    let mut s = snap(json!({"metadata": {"finalizers": [AS_SOURCE_FINALIZER]}}));
    s.spec.source = berth_api::snapshot::VolumeSnapshotSource {
        persistent_volume_claim_name: None,
        volume_snapshot_content_name: Some("imported".into()),
    };
    s.spec.volume_snapshot_class_name = None;
    let mut v = serde_json::to_value(s).unwrap();
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn pre_content(extra: Value) -> VolumeSnapshotContent {
    obj(
        json!({"metadata": {"name": "imported"},
               "spec": {"volumeSnapshotRef": {"name": "snap", "namespace": "default"},
                        "deletionPolicy": "Retain", "driver": DRIVER,
                        "source": {"snapshotHandle": "h-9"}}}),
        extra,
    )
}

#[test]
fn a_preprovisioned_content_is_bound_then_followed() {
    let mut w = World::new(pre_snap(json!({})));
    w.claim = None;
    assert_eq!(
        err_of(w.step()),
        ("SnapshotContentMissing", "VolumeSnapshotContent is missing".to_owned())
    );
    w.content = Some(pre_content(json!({})));
    let SnapshotStep::UpdateContent(c) = w.step() else {
        panic!()
    };
    assert_eq!(c.spec.volume_snapshot_ref.uid.as_deref(), Some("s1"));
    w.content = Some(pre_content(
        json!({"spec": {"volumeSnapshotRef": {"uid": "s1"}, "volumeSnapshotClassName": "x"},
        "status": {"snapshotHandle": "h-9", "readyToUse": true, "restoreSize": 1_073_741_824}}),
    ));
    let SnapshotStep::Status(s, _) = w.step() else { panic!() };
    let st = s.status.unwrap();
    assert_eq!(st.bound_volume_snapshot_content_name.as_deref(), Some("imported"));
    assert_eq!(st.restore_size.unwrap().0, "1Gi");
    // A Retain content: no bound finalizer is needed.
    assert!(matches!(w.step(), SnapshotStep::Status(..)));
    w.content = Some(pre_content(
        json!({"spec": {"volumeSnapshotRef": {"name": "someone-else"}}}),
    ));
    assert_eq!(err_of(w.step()).0, "SnapshotContentMisbound");
    w.content = Some(content(json!({"metadata": {"name": "imported"}})));
    assert_eq!(err_of(w.step()).0, "SnapshotContentMismatch");
}

fn deleting(extra: Value) -> VolumeSnapshot {
    let mut base = json!({"metadata": {"finalizers": BOTH, "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"boundVolumeSnapshotContentName": "snapcontent-s1", "readyToUse": true}});
    merge(&mut base, extra);
    snap(base)
}

#[test]
fn deleting_a_snapshot_deletes_its_content_first() {
    let mut w = World::new(deleting(json!({})));
    w.claim = Some(claim(json!({})));
    w.content = Some(content(json!({"metadata": {"finalizers": [CONTENT_FINALIZER]}})));
    let SnapshotStep::UpdateContent(c) = w.step() else {
        panic!()
    };
    assert_eq!(c.metadata.annotations.as_ref().unwrap()[BEING_DELETED], "yes");
    w.content = Some(c);
    assert_eq!(w.step(), SnapshotStep::DeleteContent("snapcontent-s1".into()));
    // While the content is going, only the as-source finalizer goes.
    let mut going = w.content.clone().unwrap();
    going.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
    w.content = Some(going);
    let SnapshotStep::Finalizers(s) = w.step() else {
        panic!()
    };
    assert_eq!(s.metadata.finalizers.as_deref().unwrap(), [BOUND_FINALIZER.to_owned()]);
    // Once the content is gone, the bound one too.
    w.snapshot = s;
    w.content = None;
    let SnapshotStep::Finalizers(s) = w.step() else {
        panic!()
    };
    assert_eq!(s.metadata.finalizers.as_deref(), Some(&[][..]));
    w.snapshot = s;
    assert_eq!(w.step(), SnapshotStep::Nothing);
}

#[test]
fn deleting_a_snapshot_waits_while_a_claim_is_restored_from_it() {
    let mut w = World::new(deleting(json!({})));
    w.claim = Some(claim(json!({})));
    w.content = Some(content(json!({})));
    w.restoring = true;
    let SnapshotStep::Wait(n) = w.step() else { panic!() };
    assert_eq!(
        (n.reason, n.message.as_str()),
        ("SnapshotDeletePending", "Snapshot is being used to restore a PVC")
    );
}

#[test]
fn a_retained_content_outlives_its_snapshot() {
    let mut w = World::new(deleting(json!({})));
    w.claim = Some(claim(json!({})));
    w.content = Some(content(
        json!({"metadata": {"annotations": {BEING_DELETED: "yes"}}, "spec": {"deletionPolicy": "Retain"}}),
    ));
    let SnapshotStep::Finalizers(s) = w.step() else {
        panic!()
    };
    assert_eq!(s.metadata.finalizers.as_deref(), Some(&[][..]));
}

#[rstest]
#[case::no_secret(json!({}), Ok(None))]
#[case::templated(
    json!({SECRET_NAME_KEY: "${volumesnapshot.name}-creds", SECRET_NAMESPACE_KEY: "${volumesnapshot.namespace}"}),
    Ok(Some(("default".to_owned(), "snap-creds".to_owned())))
)]
#[case::content_name(
    json!({SECRET_NAME_KEY: "s-${volumesnapshotcontent.name}", SECRET_NAMESPACE_KEY: "kube-system"}),
    Ok(Some(("kube-system".to_owned(), "s-snapcontent-s1".to_owned())))
)]
#[case::only_name(
    json!({SECRET_NAME_KEY: "x"}),
    Err("failed to get name and namespace template from params: either name and namespace for Snapshotter secrets specified, Both must be specified".to_owned())
)]
#[case::bad_token(
    json!({SECRET_NAME_KEY: "x", SECRET_NAMESPACE_KEY: "${volumesnapshot.name}"}),
    Err("error resolving value \"${volumesnapshot.name}\": invalid tokens: [\"volumesnapshot.name\"]".to_owned())
)]
#[case::bad_name(
    json!({SECRET_NAME_KEY: "Bad_Name", SECRET_NAMESPACE_KEY: "ns"}),
    Err("\"Bad_Name\" is not a valid secret name".to_owned())
)]
fn snapshotter_secrets(#[case] params: Value, #[case] want: Result<Option<(String, String)>, String>) {
    let params: BTreeMap<String, String> = serde_json::from_value(params).unwrap();
    let s = snap(json!({}));
    assert_eq!(
        secret_ref(&params, SecretFor::Snapshotter, "snapcontent-s1", Some(&s)),
        want
    );
}

#[test]
fn a_class_secret_is_recorded_for_deletion() {
    let mut w = World::new(snap(json!({"metadata": {"finalizers": [AS_SOURCE_FINALIZER]}})));
    w.classes = vec![class(
        "fast",
        true,
        json!({"parameters": {SECRET_NAME_KEY: "creds", SECRET_NAMESPACE_KEY: "default", "tier": "gold"}}),
    )];
    let SnapshotStep::CreateContent(c) = w.step() else {
        panic!()
    };
    let a = c.metadata.annotations.unwrap();
    assert_eq!(
        (a[DELETION_SECRET_NAME].as_str(), a[DELETION_SECRET_NAMESPACE].as_str()),
        ("creds", "default")
    );
}

#[test]
fn driver_parameters_drop_the_prefixed_ones() {
    let p: BTreeMap<String, String> =
        serde_json::from_value(json!({SECRET_NAME_KEY: "x", SECRET_NAMESPACE_KEY: "y", "tier": "gold"})).unwrap();
    assert_eq!(
        driver_parameters(&p).unwrap(),
        HashMap::from([("tier".to_owned(), "gold".to_owned())])
    );
    let bad: BTreeMap<String, String> = serde_json::from_value(json!({"csi.storage.k8s.io/typo": "x"})).unwrap();
    assert_eq!(
        driver_parameters(&bad).unwrap_err(),
        "failed to remove CSI Parameters of prefixed keys: found unknown parameter key \"csi.storage.k8s.io/typo\" with reserved namespace csi.storage.k8s.io/"
    );
}

#[test]
fn names() {
    assert_eq!(content_name(&snap(json!({}))), "snapcontent-s1");
    assert_eq!(csi_snapshot_name("s1"), "snapshot-s1");
}

// ---- contents ----

#[rstest]
#[case::invalid(content(json!({"spec": {"source": {"snapshotHandle": "h"}}})), None, "invalid")]
#[case::unbound_preprovisioned(pre_content(json!({})), None, "nothing")]
#[case::needs_finalizer(content(json!({})), None, "finalizer")]
#[case::settled(content(json!({"metadata": {"finalizers": [CONTENT_FINALIZER]}})), Some(snap(json!({}))), "nothing")]
#[case::snapshot_deleted(
    content(json!({"metadata": {"finalizers": [CONTENT_FINALIZER]}})),
    Some(deleting(json!({}))),
    "being-deleted"
)]
#[case::other_snapshot_same_name(
    content(json!({"metadata": {"finalizers": [CONTENT_FINALIZER]}})),
    Some(deleting(json!({"metadata": {"uid": "s2"}}))),
    "nothing"
)]
fn common_content_steps(#[case] c: VolumeSnapshotContent, #[case] s: Option<VolumeSnapshot>, #[case] want: &str) {
    let got = match sync_content_common(&c, s.as_ref()) {
        ContentStep::Nothing => "nothing",
        ContentStep::Invalid(n) => {
            assert_eq!(
                n.message,
                "Exactly one of VolumeHandle and SnapshotHandle should be specified"
            );
            "invalid"
        }
        ContentStep::Update(new)
            if has_finalizer(&new.metadata, CONTENT_FINALIZER) && !has_finalizer(&c.metadata, CONTENT_FINALIZER) =>
        {
            "finalizer"
        }
        ContentStep::Update(new) if has_annotation(&new.metadata, BEING_DELETED) => "being-deleted",
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(got, want);
}

#[rstest]
#[case::cut_it(content(json!({})), "create")]
#[case::not_ready_yet(content(json!({"status": {"snapshotHandle": "h", "readyToUse": false}})), "create")]
#[case::ready(content(json!({"status": {"snapshotHandle": "h", "readyToUse": true}})), "nothing")]
#[case::ready_annotated(
    content(json!({"metadata": {"annotations": {BEING_CREATED: "yes"}}, "status": {"snapshotHandle": "h", "readyToUse": true}})),
    "drop-annotation"
)]
#[case::preprovisioned(pre_content(json!({"spec": {"volumeSnapshotRef": {"uid": "s1"}}})), "check")]
#[case::delete_in_driver(
    content(json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [CONTENT_FINALIZER],
                                "annotations": {BEING_DELETED: "yes"}},
                   "status": {"snapshotHandle": "h", "readyToUse": true}})),
    "delete"
)]
#[case::deleted_in_driver(
    content(json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [CONTENT_FINALIZER],
                                "annotations": {BEING_DELETED: "yes"}}, "status": {}})),
    "drop-finalizer"
)]
#[case::retain_keeps_the_snapshot(
    content(json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [CONTENT_FINALIZER],
                                "annotations": {BEING_DELETED: "yes"}},
                   "spec": {"deletionPolicy": "Retain"}, "status": {"snapshotHandle": "h"}})),
    "drop-finalizer"
)]
#[case::creation_in_flight_blocks_deletion(
    content(json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [CONTENT_FINALIZER],
                                "annotations": {BEING_DELETED: "yes", BEING_CREATED: "yes"}}})),
    "nothing"
)]
#[case::deleted_without_the_snapshot_being_deleted(
    content(json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [CONTENT_FINALIZER]}})),
    "nothing"
)]
#[case::unbound_preprovisioned_deleted(
    pre_content(json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [CONTENT_FINALIZER]}})),
    "drop-finalizer"
)]
fn sidecar_content_steps(#[case] c: VolumeSnapshotContent, #[case] want: &str) {
    let got = match sync_content_sidecar(&c) {
        ContentStep::Nothing => "nothing",
        ContentStep::CreateSnapshot => "create",
        ContentStep::CheckSnapshot { handle } => {
            assert_eq!(handle, "h-9");
            "check"
        }
        ContentStep::DeleteSnapshot { handle } => {
            assert_eq!(handle, "h");
            "delete"
        }
        ContentStep::Update(new)
            if has_annotation(&c.metadata, BEING_CREATED) && !has_annotation(&new.metadata, BEING_CREATED) =>
        {
            "drop-annotation"
        }
        ContentStep::Update(new) if !has_finalizer(&new.metadata, CONTENT_FINALIZER) => "drop-finalizer",
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(got, want);
}

#[test]
fn content_status_from_the_driver() {
    let c = content(json!({}));
    let cut = CutSnapshot {
        handle: "h".into(),
        ready: false,
        created: 5,
        size: 0,
    };
    let st = content_status(&c, &cut).unwrap();
    assert_eq!(
        (
            st.snapshot_handle.as_deref(),
            st.ready_to_use,
            st.creation_time,
            st.restore_size
        ),
        (Some("h"), Some(false), Some(5), None)
    );
    let mut c2 = c.clone();
    c2.status = Some(st);
    assert_eq!(content_status(&c2, &cut), None, "unchanged");
    let ready = CutSnapshot {
        ready: true,
        size: 10,
        created: 9,
        ..cut
    };
    let st = content_status(&c2, &ready).unwrap();
    assert_eq!(
        (st.ready_to_use, st.creation_time, st.restore_size),
        (Some(true), Some(5), Some(10))
    );

    let now = jiff::Timestamp::UNIX_EPOCH;
    let err = content_error(&c, "Failed to create snapshot: x", now).unwrap();
    assert_eq!(err.ready_to_use, Some(false));
    let mut c3 = c.clone();
    c3.status = Some(err);
    assert_eq!(content_error(&c3, "Failed to create snapshot: x", now), None);
    c3.status.as_mut().unwrap().snapshot_handle = Some("h".into());
    let cleared = cleared_status(&c3).unwrap();
    assert_eq!(cleared.snapshot_handle, None);
    assert!(cleared.error.is_some(), "only the snapshot's fields are cleared");
}

#[test]
fn being_created_annotation() {
    let c = content(json!({}));
    let marked = with_being_created(&c).unwrap();
    assert_eq!(with_being_created(&marked), None);
    assert!(!has_annotation(&without_being_created(&marked).metadata, BEING_CREATED));
}

#[test]
fn snapshot_errors_are_recorded_once() {
    let now = jiff::Timestamp::UNIX_EPOCH;
    let s = snap(json!({}));
    let e = with_error(&s, "x", true, now).unwrap();
    assert_eq!(e.status.as_ref().unwrap().ready_to_use, Some(false));
    assert_eq!(with_error(&e, "x", true, now), None);
    let kept = with_error(&snap(json!({"status": {"readyToUse": true}})), "y", false, now).unwrap();
    assert_eq!(kept.status.unwrap().ready_to_use, Some(true));
}

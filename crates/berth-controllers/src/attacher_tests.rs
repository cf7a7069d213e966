//! Table tests of the attach/detach decisions and external-attacher's steps.

#![allow(clippy::unwrap_used)]

use super::*;
use rstest::rstest;
use serde_json::{Value, json};

const DRIVER: &str = "csi.berth.dev";

fn pv(modes: &[&str]) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": "pv1"},
        "spec": {
            "accessModes": modes,
            "capacity": {"storage": "1Gi"},
            "csi": {"driver": DRIVER, "volumeHandle": "vol-1", "volumeAttributes": {"pool": "default"}},
            "claimRef": {"namespace": "default", "name": "data", "uid": "c1"},
        }
    }))
    .unwrap()
}

fn pod(name: &str, ns: &str, node: Option<&str>, phase: &str) -> Pod {
    let mut spec = json!({"containers": [{"name": "c", "image": "i"}],
                          "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": ns}, "spec": spec, "status": {"phase": phase}}),
    )
    .unwrap()
}

fn va_on(pv: &PersistentVolume, node: &str, extra: Value) -> VolumeAttachment {
    let mut v = serde_json::to_value(attachment_for(pv, node).unwrap()).unwrap();
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

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

fn names(vas: &[VolumeAttachment]) -> Vec<(String, String)> {
    vas.iter()
        .map(|v| (v.metadata.name.clone().unwrap(), v.spec.node_name.clone()))
        .collect()
}

#[rstest]
#[case::dots("csi.berth.dev", "external-attacher/csi-berth-dev")]
#[case::slash("example.com/disk", "external-attacher/example-com-disk")]
#[case::trailing("driver.", "external-attacher/driver-X")]
#[case::kept("hostpath-csi", "external-attacher/hostpath-csi")]
fn finalizer_names(#[case] driver: &str, #[case] want: &str) {
    assert_eq!(finalizer_name(driver), want);
}

#[rstest]
#[case::no_csidriver(None, true)]
#[case::unset(Some(json!({})), true)]
#[case::required(Some(json!({"attachRequired": true})), true)]
#[case::not_required(Some(json!({"attachRequired": false})), false)]
fn attach_required_by_csidriver(#[case] spec: Option<Value>, #[case] want: bool) {
    let d: Option<CSIDriver> =
        spec.map(|s| serde_json::from_value(json!({"metadata": {"name": DRIVER}, "spec": s})).unwrap());
    assert_eq!(attach_required(d.as_ref()), want);
}

#[rstest]
#[case::running(Some("n1"), "Running", Some("n1"))]
#[case::pending_scheduled(Some("n1"), "Pending", Some("n1"))]
#[case::unscheduled(None, "Pending", None)]
#[case::succeeded(Some("n1"), "Succeeded", None)]
#[case::failed(Some("n1"), "Failed", None)]
fn pods_need_volumes_while_scheduled_and_not_done(
    #[case] node: Option<&str>,
    #[case] phase: &str,
    #[case] want: Option<&str>,
) {
    assert_eq!(active_node(&pod("p", "default", node, phase)), want);
}

#[rstest]
#[case::rwo(&["ReadWriteOnce"], false)]
#[case::rwop(&["ReadWriteOncePod"], false)]
#[case::rwx(&["ReadWriteOnce", "ReadWriteMany"], true)]
#[case::rox(&["ReadOnlyMany"], true)]
#[case::none(&[], true)]
fn multi_attach(#[case] modes: &[&str], #[case] want: bool) {
    assert_eq!(multi_attach_allowed(&pv(modes)), want);
}

#[test]
fn the_attachment_is_named_and_shaped_as_kubernetes_makes_it() {
    let va = attachment_for(&pv(&["ReadWriteOnce"]), "n1").unwrap();
    assert_eq!(
        va.metadata.name.as_deref(),
        Some(attachment_name("vol-1", DRIVER, "n1").as_str())
    );
    assert_eq!(va.spec.attacher, DRIVER);
    assert_eq!(va.spec.node_name, "n1");
    assert_eq!(va.spec.source.persistent_volume_name.as_deref(), Some("pv1"));
    assert!(is_managed(&va, &pv(&["ReadWriteOnce"])));
    let mut other = va.clone();
    other.metadata.name = Some("user-made".into());
    assert!(!is_managed(&other, &pv(&["ReadWriteOnce"])));
}

/// (created (name, node), deleted names, event messages)
type Want = (Vec<String>, Vec<String>, Vec<String>);

fn run(modes: &[&str], required: bool, pods: &[Pod], vas: &[VolumeAttachment], in_use: &[&str]) -> Want {
    let pv = pv(modes);
    let pod_refs: Vec<&Pod> = pods.iter().collect();
    let va_refs: Vec<&VolumeAttachment> = vas.iter().collect();
    let plan = plan_attachments(
        &VolumeUse {
            pv: &pv,
            attach_required: required,
            pods: &pod_refs,
            attachments: &va_refs,
        },
        |node, unique| in_use.contains(&node) && unique == "kubernetes.io/csi/csi.berth.dev^vol-1",
    );
    (
        names(&plan.create).into_iter().map(|(_, n)| n).collect(),
        plan.delete,
        plan.notes
            .into_iter()
            .map(|(who, n)| format!("{} {} {}", who.name, n.reason, n.message))
            .collect(),
    )
}

fn name_on(node: &str) -> String {
    attachment_name("vol-1", DRIVER, node)
}

#[test]
fn a_scheduled_pod_gets_its_volume_attached_once() {
    let pods = [pod("p1", "default", Some("n1"), "Running")];
    assert_eq!(
        run(&["ReadWriteOnce"], true, &pods, &[], &[]),
        (vec!["n1".into()], vec![], vec![])
    );
    let vas = [va_on(&pv(&["ReadWriteOnce"]), "n1", json!({}))];
    assert_eq!(
        run(&["ReadWriteOnce"], true, &pods, &vas, &[]),
        (vec![], vec![], vec![])
    );
    // Two pods on one node: one attachment.
    let two = [
        pod("p1", "default", Some("n1"), "Running"),
        pod("p2", "default", Some("n1"), "Pending"),
    ];
    assert_eq!(
        run(&["ReadWriteOnce"], true, &two, &[], &[]),
        (vec!["n1".into()], vec![], vec![])
    );
}

#[rstest]
#[case::pod_gone(vec![], &[], vec![name_on("n1")])]
#[case::pod_succeeded(vec![pod("p1", "default", Some("n1"), "Succeeded")], &[], vec![name_on("n1")])]
#[case::pod_failed(vec![pod("p1", "default", Some("n1"), "Failed")], &[], vec![name_on("n1")])]
#[case::node_still_uses_it(vec![], &["n1"], vec![])]
#[case::another_node_uses_it_is_irrelevant(vec![], &["n2"], vec![name_on("n1")])]
#[case::pod_still_there(vec![pod("p1", "default", Some("n1"), "Running")], &[], vec![])]
fn detach_when_no_pod_on_the_node_needs_it(
    #[case] pods: Vec<Pod>,
    #[case] in_use: &[&str],
    #[case] deleted: Vec<String>,
) {
    let vas = [va_on(
        &pv(&["ReadWriteOnce"]),
        "n1",
        json!({"status": {"attached": true}}),
    )];
    assert_eq!(
        run(&["ReadWriteOnce"], true, &pods, &vas, in_use),
        (vec![], deleted, vec![])
    );
}

#[test]
fn only_managed_attachments_not_yet_deleting_are_deleted() {
    let pv = pv(&["ReadWriteOnce"]);
    let user_made = va_on(&pv, "n1", json!({"metadata": {"name": "user-made"}}));
    let deleting = va_on(
        &pv,
        "n2",
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
    );
    assert_eq!(
        run(&["ReadWriteOnce"], true, &[], &[user_made, deleting], &[]),
        (vec![], vec![], vec![])
    );
}

#[test]
fn attach_not_required_creates_nothing_and_cleans_up() {
    let pods = [pod("p1", "default", Some("n1"), "Running")];
    let vas = [va_on(&pv(&["ReadWriteOnce"]), "n1", json!({}))];
    assert_eq!(
        run(&["ReadWriteOnce"], false, &pods, &[], &[]),
        (vec![], vec![], vec![])
    );
    assert_eq!(
        run(&["ReadWriteOnce"], false, &pods, &vas, &[]),
        (vec![], vec![name_on("n1")], vec![])
    );
}

#[rstest]
#[case::same_namespace(
    vec![pod("p1", "default", Some("n1"), "Running"), pod("p2", "default", Some("n2"), "Running")],
    vec!["p2 FailedAttachVolume Multi-Attach error for volume \"pv1\" Volume is already used by pod(s) p1".to_owned()]
)]
#[case::other_namespace(
    vec![pod("p1", "other", Some("n1"), "Running"), pod("p2", "default", Some("n2"), "Running")],
    vec!["p2 FailedAttachVolume Multi-Attach error for volume \"pv1\" Volume is already used by 1 pod(s) in different namespaces".to_owned()]
)]
#[case::both(
    vec![pod("p1", "other", Some("n1"), "Running"), pod("p3", "default", Some("n1"), "Running"), pod("p2", "default", Some("n2"), "Running")],
    vec!["p2 FailedAttachVolume Multi-Attach error for volume \"pv1\" Volume is already used by pod(s) p3 and 1 pod(s) in different namespaces".to_owned()]
)]
fn a_read_write_once_volume_stays_on_one_node(#[case] pods: Vec<Pod>, #[case] notes: Vec<String>) {
    let vas = [va_on(
        &pv(&["ReadWriteOnce"]),
        "n1",
        json!({"status": {"attached": true}}),
    )];
    assert_eq!(run(&["ReadWriteOnce"], true, &pods, &vas, &[]), (vec![], vec![], notes));
    // ReadWriteMany goes to both.
    assert_eq!(run(&["ReadWriteMany"], true, &pods, &vas, &[]).0, vec!["n2".to_owned()]);
}

#[test]
fn a_stale_attachment_blocks_the_new_node_until_it_is_gone() {
    let pods = [pod("p2", "default", Some("n2"), "Running")];
    let vas = [va_on(
        &pv(&["ReadWriteOnce"]),
        "n1",
        json!({"status": {"attached": true}}),
    )];
    assert_eq!(
        run(&["ReadWriteOnce"], true, &pods, &vas, &[]),
        (
            vec![],
            vec![name_on("n1")],
            vec![
                "p2 FailedAttachVolume Multi-Attach error for volume \"pv1\" Volume is already exclusively attached to one node and can't be attached to another"
                    .to_owned()
            ]
        )
    );
}

#[test]
fn attach_events_follow_status_changes() {
    let pv = pv(&["ReadWriteOnce"]);
    let pending = va_on(&pv, "n1", json!({}));
    let attached = va_on(&pv, "n1", json!({"status": {"attached": true}}));
    let failed = va_on(
        &pv,
        "n1",
        json!({"status": {"attached": false, "attachError": {"message": "rpc error: code = NotFound desc = no volume"}}}),
    );
    let n = attach_note(Some(&pending), &attached, "pv1").unwrap();
    assert_eq!(
        (n.reason, n.message.as_str()),
        (
            "SuccessfulAttachVolume",
            "AttachVolume.Attach succeeded for volume \"pv1\""
        )
    );
    assert_eq!(attach_note(Some(&attached), &attached, "pv1"), None);
    let n = attach_note(Some(&pending), &failed, "pv1").unwrap();
    assert!(n.warning);
    assert_eq!(
        n.message,
        "AttachVolume.Attach failed for volume \"pv1\" : rpc error: code = NotFound desc = no volume"
    );
    assert_eq!(attach_note(Some(&failed), &failed, "pv1"), None);
}

#[test]
fn the_volume_spec_comes_from_the_pv_or_inline() {
    let pv = pv(&["ReadWriteOnce"]);
    let va = va_on(&pv, "n1", json!({}));
    assert!(volume_spec(&va, Some(&pv)).is_ok());
    assert_eq!(
        volume_spec(&va, None).unwrap_err().to_string(),
        "persistentvolume \"pv1\" not found"
    );
    let none = va_on(&pv, "n1", json!({"spec": {"source": {"persistentVolumeName": null}}}));
    assert_eq!(
        volume_spec(&none, None).unwrap_err().to_string(),
        "neither InlineCSIVolumeSource nor PersistentVolumeName specified in VA source"
    );
    let inline = va_on(
        &pv,
        "n1",
        json!({"spec": {"source": {"persistentVolumeName": null, "inlineVolumeSpec": {"csi": {"driver": DRIVER, "volumeHandle": "x"}}}}}),
    );
    assert_eq!(
        volume_spec(&inline, None).unwrap().csi.as_ref().unwrap().volume_handle,
        "x"
    );
    let mut not_csi = pv.clone();
    not_csi.spec.as_mut().unwrap().csi = None;
    assert_eq!(
        volume_spec(&va, Some(&not_csi)).unwrap_err().to_string(),
        "pv spec contained non-csi source that was not migrated"
    );
}

fn csinode(drivers: Value) -> CSINode {
    serde_json::from_value(json!({"metadata": {"name": "n1"}, "spec": {"drivers": drivers}})).unwrap()
}

fn info(node: &str) -> NodeInfo {
    NodeInfo {
        node_id: node.into(),
        max_volumes: 0,
        topology: Default::default(),
    }
}

#[rstest]
#[case::from_csinode(Some(csinode(json!([{"name": DRIVER, "nodeID": "id-1"}]))), None, None, Ok("id-1"))]
#[case::driver_missing(
    Some(csinode(json!([{"name": "other", "nodeID": "x"}]))), None, None,
    Err("CSINode n1 does not contain driver csi.berth.dev")
)]
#[case::no_csinode(None, None, None, Err("csinode.storage.k8s.io \"n1\" not found"))]
#[case::annotation_for_detach(None, Some("id-9"), None, Ok("id-9"))]
#[case::driver_serves_this_node(None, None, Some("n1"), Ok("n1"))]
#[case::driver_serves_another_node(None, None, Some("n2"), Err("csinode.storage.k8s.io \"n1\" not found"))]
fn node_ids(
    #[case] csi_node: Option<CSINode>,
    #[case] annotated: Option<&str>,
    #[case] local: Option<&str>,
    #[case] want: Result<&str, &str>,
) {
    let pv = pv(&["ReadWriteOnce"]);
    let va = annotated.map(|id| {
        va_on(
            &pv,
            "n1",
            json!({"metadata": {"annotations": {NODE_ID_ANNOTATION: id}}}),
        )
    });
    let local = local.map(info);
    let got = node_id(DRIVER, "n1", csi_node.as_ref(), va.as_ref(), local.as_ref()).map_err(|e| e.to_string());
    assert_eq!(got, want.map(str::to_owned).map_err(str::to_owned));
}

#[test]
fn the_publish_request_carries_the_volume() {
    let mut pv = pv(&["ReadWriteOnce"]);
    pv.spec.as_mut().unwrap().csi.as_mut().unwrap().read_only = Some(true);
    let spec = pv.spec.as_ref().unwrap();
    let secrets = HashMap::from([("k".to_owned(), "v".to_owned())]);
    let req = publish_request(spec, "id-1", PublishOptions::default(), secrets.clone()).unwrap();
    assert_eq!(req.volume_id, "vol-1");
    assert_eq!(req.node_id, "id-1");
    assert!(!req.readonly, "readonly needs PUBLISH_READONLY");
    assert_eq!(req.volume_context.get("pool").map(String::as_str), Some("default"));
    assert_eq!(req.secrets, secrets);
    let cap = req.volume_capability.unwrap();
    assert_eq!(
        cap.access_mode.unwrap().mode,
        i32::from(berth_csi::v1::volume_capability::access_mode::Mode::SingleNodeWriter)
    );
    let opts = PublishOptions {
        publish_readonly: true,
        single_node_multi_writer: true,
    };
    let req = publish_request(spec, "id-1", opts, HashMap::new()).unwrap();
    assert!(req.readonly);
    let un = unpublish_request(spec, "id-1", HashMap::new()).unwrap();
    assert_eq!((un.volume_id.as_str(), un.node_id.as_str()), ("vol-1", "id-1"));
}

#[rstest]
#[case::new_attach(json!({}), true, AttacherStep::Attach)]
#[case::attached(json!({"status": {"attached": true}}), true, AttacherStep::Nothing)]
#[case::failed_retries(json!({"status": {"attached": false, "attachError": {"message": "x"}}}), true, AttacherStep::Attach)]
#[case::deleting_with_finalizer(
    json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["external-attacher/csi-berth-dev"]}, "status": {"attached": true}}),
    true, AttacherStep::Detach
)]
#[case::deleting_without_finalizer(
    json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["other"]}}),
    true, AttacherStep::Nothing
)]
#[case::trivial_marks_attached(json!({}), false, AttacherStep::MarkAttached)]
#[case::trivial_done(json!({"status": {"attached": true}}), false, AttacherStep::Nothing)]
#[case::trivial_deleting(json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}), false, AttacherStep::Nothing)]
fn attacher_steps(#[case] extra: Value, #[case] publishes: bool, #[case] want: AttacherStep) {
    let va = va_on(&pv(&["ReadWriteOnce"]), "n1", extra);
    assert_eq!(attacher_step(&va, DRIVER, publishes), want);
}

#[test]
fn attachment_writes() {
    let pv = pv(&["ReadWriteOnce"]);
    let va = va_on(&pv, "n1", json!({"metadata": {"finalizers": ["other"]}}));
    let p = prepared(&va, DRIVER, "id-1").unwrap();
    assert_eq!(
        p.metadata.finalizers.as_deref().unwrap(),
        ["other".to_owned(), "external-attacher/csi-berth-dev".to_owned()]
    );
    assert_eq!(p.metadata.annotations.as_ref().unwrap()[NODE_ID_ANNOTATION], "id-1");
    assert_eq!(prepared(&p, DRIVER, "id-1"), None);

    let now = jiff::Timestamp::from_second(1_767_225_600).unwrap();
    let failed = with_attach_error(&p, "boom", now);
    let attached = marked_attached(&failed, BTreeMap::from([("k".into(), "v".into())])).unwrap();
    let s = attached.status.as_ref().unwrap();
    assert!(s.attached && s.attach_error.is_none());
    assert_eq!(s.attachment_metadata.as_ref().unwrap()["k"], "v");
    assert_eq!(
        marked_attached(&attached, BTreeMap::from([("k".into(), "v".into())])),
        None
    );
    let json = serde_json::to_value(&failed).unwrap();
    assert_eq!(json["status"]["attachError"]["message"], "boom");
    assert_eq!(json["status"]["attachError"]["time"], "2026-01-01T00:00:00Z");

    let gone = without_finalizer(&attached, DRIVER).unwrap();
    assert_eq!(gone.metadata.finalizers.as_deref().unwrap(), ["other".to_owned()]);
    assert_eq!(without_finalizer(&gone, DRIVER), None);
    let detached = marked_detached(&with_detach_error(&gone, "x", now)).unwrap();
    let s = detached.status.unwrap();
    assert!(!s.attached && s.attachment_metadata.is_none() && s.detach_error.is_none());
}

#[test]
fn the_volume_keeps_our_finalizer_while_attachments_name_it() {
    let pv = pv(&["ReadWriteOnce"]);
    let with = pv_with_finalizer(&pv, DRIVER).unwrap();
    assert_eq!(pv_with_finalizer(&with, DRIVER), None);
    assert_eq!(pv_released(&with, DRIVER, false), None, "not being deleted");
    let mut deleting = with.clone();
    deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
    assert_eq!(pv_released(&deleting, DRIVER, true), None, "still attached");
    let released = pv_released(&deleting, DRIVER, false).unwrap();
    assert_eq!(released.metadata.finalizers.as_deref(), Some(&[][..]));
}

#[test]
fn a_saved_error_alone_does_not_wake_the_attacher() {
    let pv = pv(&["ReadWriteOnce"]);
    let now = jiff::Timestamp::from_second(1_767_225_600).unwrap();
    let old = va_on(&pv, "n1", json!({"metadata": {"resourceVersion": "1"}}));
    let mut failed = with_attach_error(&old, "boom", now);
    failed.metadata.resource_version = Some("2".into());
    assert!(!should_enqueue(&old, &failed));
    let mut again = with_attach_error(&failed, "boom", jiff::Timestamp::from_second(1_767_225_700).unwrap());
    again.metadata.resource_version = Some("3".into());
    assert!(!should_enqueue(&failed, &again));
    let mut deleted = failed.clone();
    deleted.metadata.resource_version = Some("4".into());
    deleted.metadata.deletion_timestamp = Some(Time(now));
    assert!(should_enqueue(&failed, &deleted));
    assert!(should_enqueue(&old, &old), "a resync");
    let mut attached = marked_attached(&old, BTreeMap::new()).unwrap();
    attached.metadata.resource_version = Some("5".into());
    assert!(should_enqueue(&old, &attached));
}

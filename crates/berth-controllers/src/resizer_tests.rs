//! Table tests of the expansion decisions.

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

/// A claim of 1Gi bound with 1Gi, asking for `request`, handed to the driver already.
fn claim(request: &str, extra: Value) -> PersistentVolumeClaim {
    let mut v = json!({
        "metadata": {"name": "data", "namespace": "default", "uid": "c1",
                     "annotations": {RESIZER_ANNOTATION: DRIVER}},
        "spec": {"accessModes": ["ReadWriteOnce"], "volumeName": "pv1",
                 "resources": {"requests": {"storage": request}}},
        "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}},
    });
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn pv(capacity: &str) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": "pv1"},
        "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": capacity},
                 "csi": {"driver": DRIVER, "volumeHandle": "vol-1"},
                 "claimRef": {"namespace": "default", "name": "data", "uid": "c1"}},
    }))
    .unwrap()
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_767_225_600).unwrap()
}

fn cond_types(c: &PersistentVolumeClaim) -> Vec<String> {
    c.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| c.iter().map(|c| c.type_.clone()).collect())
        .unwrap_or_default()
}

#[rstest]
#[case::bigger("2Gi", json!({}), true)]
#[case::same("1Gi", json!({}), false)]
#[case::decimal_smaller_than_binary("1G", json!({}), false)]
#[case::pending("2Gi", json!({"status": {"phase": "Pending"}}), false)]
#[case::no_volume("2Gi", json!({"spec": {"volumeName": ""}}), false)]
fn which_claims_ask_for_expansion(#[case] request: &str, #[case] extra: Value, #[case] want: bool) {
    assert_eq!(needs_resize(&claim(request, extra)), want);
}

#[rstest]
#[case::ours(pv("1Gi"), DRIVER, true)]
#[case::other_driver(pv("1Gi"), "other", false)]
fn only_our_volumes_bound_to_the_claim(#[case] pv: PersistentVolume, #[case] driver: &str, #[case] want: bool) {
    assert_eq!(pv_belongs(&pv, &claim("2Gi", json!({})), driver), want);
    let mut other = pv.clone();
    other.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().uid = Some("c2".into());
    assert!(!pv_belongs(&other, &claim("2Gi", json!({})), driver));
}

#[test]
fn a_claim_is_handed_to_the_driver_first() {
    let c = claim("2Gi", json!({"metadata": {"annotations": null}}));
    let ResizeStep::HandOver(new) = plan_resize(&c, &pv("1Gi"), DRIVER, true, now()) else {
        panic!("expected a hand-over")
    };
    assert_eq!(new.metadata.annotations.unwrap()[RESIZER_ANNOTATION], DRIVER);
    assert_eq!(
        external_expanding_note().message,
        "waiting for an external controller to expand this PVC"
    );
}

/// The size planned and the claim status written: (size, allocatedResourceStatuses, condition types).
fn planned(c: &PersistentVolumeClaim, pv_cap: &str) -> Option<(String, Option<String>, Vec<String>)> {
    match plan_resize(c, &pv(pv_cap), DRIVER, true, now()) {
        ResizeStep::Expand { claim, size } => {
            let written = claim.unwrap_or_else(|| c.clone());
            let st = written.status.as_ref().unwrap();
            assert_eq!(st.allocated_resources.as_ref().unwrap()["storage"], size);
            Some((
                size.0,
                st.allocated_resource_statuses
                    .as_ref()
                    .and_then(|m| m.get("storage").cloned()),
                cond_types(&written),
            ))
        }
        ResizeStep::Nothing => None,
        other => panic!("unexpected {other:?}"),
    }
}

fn s(x: &str) -> String {
    x.to_owned()
}

#[rstest]
#[case::fresh("2Gi", "1Gi", json!({}), Some((s("2Gi"), Some(s(CONTROLLER_RESIZE_IN_PROGRESS)), vec![s(RESIZING)])))]
#[case::unfinished_controller_resize_goes_on_with_its_size(
    "3Gi", "1Gi",
    json!({"status": {"allocatedResources": {"storage": "2Gi"}, "allocatedResourceStatuses": {"storage": CONTROLLER_RESIZE_IN_PROGRESS}}}),
    Some((s("2Gi"), Some(s(CONTROLLER_RESIZE_IN_PROGRESS)), vec![s(RESIZING)]))
)]
#[case::pv_done_but_claim_not_recorded(
    "2Gi", "2Gi",
    json!({"status": {"allocatedResources": {"storage": "2Gi"}, "allocatedResourceStatuses": {"storage": CONTROLLER_RESIZE_IN_PROGRESS},
                      "conditions": [{"type": RESIZING, "status": "True"}]}}),
    Some((s("2Gi"), Some(s(CONTROLLER_RESIZE_IN_PROGRESS)), vec![s(RESIZING)]))
)]
#[case::node_expansion_pending_is_the_nodes(
    "2Gi", "2Gi",
    json!({"status": {"allocatedResources": {"storage": "2Gi"}, "allocatedResourceStatuses": {"storage": NODE_RESIZE_PENDING}}}),
    None
)]
#[case::node_pending_and_bigger_request_waits_for_the_node(
    "3Gi", "2Gi",
    json!({"status": {"allocatedResources": {"storage": "2Gi"}, "allocatedResourceStatuses": {"storage": NODE_RESIZE_PENDING}}}),
    None
)]
#[case::legacy_fs_pending_condition(
    "2Gi", "2Gi",
    json!({"status": {"conditions": [{"type": FS_RESIZE_PENDING, "status": "True"}]}}),
    None
)]
#[case::other_conditions_are_kept(
    "2Gi", "1Gi",
    json!({"status": {"conditions": [{"type": "ModifyingVolume", "status": "True"}, {"type": CONTROLLER_RESIZE_ERROR, "status": "True"}]}}),
    Some((s("2Gi"), Some(s(CONTROLLER_RESIZE_IN_PROGRESS)), vec![s("ModifyingVolume"), s(RESIZING)]))
)]
fn expansion_sizes(
    #[case] request: &str,
    #[case] pv_cap: &str,
    #[case] extra: Value,
    #[case] want: Option<(String, Option<String>, Vec<String>)>,
) {
    assert_eq!(planned(&claim(request, extra), pv_cap), want);
}

#[test]
fn an_infeasible_size_waits_before_it_is_tried_again() {
    let c = claim(
        "2Gi",
        json!({"status": {"allocatedResources": {"storage": "2Gi"}, "allocatedResourceStatuses": {"storage": CONTROLLER_RESIZE_INFEASIBLE}}}),
    );
    assert_eq!(plan_resize(&c, &pv("1Gi"), DRIVER, true, now()), ResizeStep::RetryLater);
    // A new request is a new attempt.
    let c = claim(
        "3Gi",
        json!({"status": {"allocatedResources": {"storage": "2Gi"}, "allocatedResourceStatuses": {"storage": CONTROLLER_RESIZE_INFEASIBLE}}}),
    );
    assert_eq!(planned(&c, "1Gi").unwrap().0, "3Gi");
}

#[test]
fn the_expand_request_names_the_volume_and_size() {
    let req = expand_request(&pv("1Gi"), 2 << 30, false, HashMap::new()).unwrap();
    assert_eq!(req.volume_id, "vol-1");
    assert_eq!(req.capacity_range.unwrap().required_bytes, 2 << 30);
    assert!(req.volume_capability.is_some());
}

#[test]
fn success_without_a_node_step_finishes_the_claim() {
    let c = claim(
        "2Gi",
        json!({"metadata": {"annotations": {RESIZER_ANNOTATION: DRIVER}},
               "status": {"allocatedResources": {"storage": "2Gi"}, "allocatedResourceStatuses": {"storage": CONTROLLER_RESIZE_IN_PROGRESS},
                          "conditions": [{"type": RESIZING, "status": "True"}]}}),
    );
    let (pv, claim, note) = expanded(&c, &pv("1Gi"), 2 << 30, false, now());
    assert_eq!(pv.spec.unwrap().capacity.unwrap()["storage"].0, "2Gi");
    let st = claim.status.as_ref().unwrap();
    assert_eq!(st.capacity.as_ref().unwrap()["storage"].0, "2Gi");
    assert_eq!(st.conditions, None);
    assert_eq!(st.allocated_resource_statuses, None);
    assert_eq!(st.allocated_resources.as_ref().unwrap()["storage"].0, "2Gi");
    assert_eq!(
        claim.metadata.annotations.as_ref().unwrap()[NODE_EXPANSION_NOT_REQUIRED],
        "true"
    );
    assert_eq!(
        (note.reason, note.message.as_str()),
        ("VolumeResizeSuccessful", "Resize volume succeeded")
    );
    assert!(!needs_resize(&claim));
}

#[test]
fn success_with_a_node_step_leaves_the_claim_pending() {
    let c = claim(
        "2Gi",
        json!({"status": {"allocatedResources": {"storage": "2Gi"}, "allocatedResourceStatuses": {"storage": CONTROLLER_RESIZE_IN_PROGRESS},
                          "conditions": [{"type": RESIZING, "status": "True"}]}}),
    );
    let (pv, claim, note) = expanded(&c, &pv("1Gi"), 2 << 30, true, now());
    assert_eq!(pv.spec.unwrap().capacity.unwrap()["storage"].0, "2Gi");
    let st = claim.status.as_ref().unwrap();
    assert_eq!(
        st.capacity.as_ref().unwrap()["storage"].0,
        "1Gi",
        "the node has not grown it yet"
    );
    assert_eq!(cond_types(&claim), vec![s(RESIZING), s(FS_RESIZE_PENDING)]);
    let pending = st
        .conditions
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.type_ == FS_RESIZE_PENDING)
        .unwrap();
    assert_eq!(pending.message.as_deref(), Some(FS_RESIZE_MESSAGE));
    assert_eq!(
        st.allocated_resource_statuses.as_ref().unwrap()["storage"],
        NODE_RESIZE_PENDING
    );
    assert_eq!(note.reason, "FileSystemResizeRequired");
    // And the controller leaves it to the node from now on.
    assert_eq!(
        plan_resize(&claim, &pv_of(&claim), DRIVER, true, now()),
        ResizeStep::Nothing
    );
}

fn pv_of(_c: &PersistentVolumeClaim) -> PersistentVolume {
    pv("2Gi")
}

#[rstest]
#[case::infeasible(Some(tonic::Code::OutOfRange), true, Some(CONTROLLER_RESIZE_INFEASIBLE))]
#[case::final_error(Some(tonic::Code::Internal), true, None)]
#[case::maybe_in_progress(Some(tonic::Code::DeadlineExceeded), false, None)]
#[case::not_grpc(None, false, None)]
fn failures(#[case] code: Option<tonic::Code>, #[case] written: bool, #[case] status: Option<&str>) {
    let c = claim(
        "2Gi",
        json!({"status": {"conditions": [{"type": RESIZING, "status": "True"}]}}),
    );
    let err = "rpc error: code = OutOfRange desc = too big";
    let (new, note) = failed(&c, "pv1", DRIVER, code, err, now());
    assert_eq!(
        note.message,
        "resize volume \"pv1\" by resizer \"csi.berth.dev\" failed: rpc error: code = OutOfRange desc = too big"
    );
    assert!(note.warning);
    assert_eq!(new.is_some(), written);
    if let Some(new) = new {
        assert_eq!(cond_types(&new), vec![s(RESIZING), s(CONTROLLER_RESIZE_ERROR)]);
        let st = new.status.unwrap();
        let e = st
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == CONTROLLER_RESIZE_ERROR)
            .unwrap();
        assert_eq!(e.message.unwrap(), format!("failed to expand pvc with {err}"));
        assert_eq!(
            st.allocated_resource_statuses
                .and_then(|m| m.get("storage").cloned())
                .as_deref(),
            status
        );
    }
}

#[test]
fn merging_conditions() {
    let c = |t: &str| PersistentVolumeClaimCondition {
        type_: t.into(),
        status: "True".into(),
        ..Default::default()
    };
    let old = vec![c("Other"), c(RESIZING), c(FS_RESIZE_PENDING)];
    let types = |v: Vec<PersistentVolumeClaimCondition>| v.into_iter().map(|c| c.type_).collect::<Vec<_>>();
    assert_eq!(
        types(merge_resize_conditions(&old, vec![c(RESIZING)], false)),
        vec!["Other", RESIZING]
    );
    assert_eq!(
        types(merge_resize_conditions(&old, vec![c(CONTROLLER_RESIZE_ERROR)], true)),
        vec!["Other", RESIZING, FS_RESIZE_PENDING, CONTROLLER_RESIZE_ERROR]
    );
    assert_eq!(types(merge_resize_conditions(&old, vec![], false)), vec!["Other"]);
}

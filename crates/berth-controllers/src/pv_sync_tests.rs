#![allow(clippy::unwrap_used)]

use super::*;
use rstest::rstest;
use serde_json::{Value, json};

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn pv(extra: Value) -> PersistentVolume {
    let mut v = json!({
        "metadata": {"name": "pv1"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/x"},
                 "persistentVolumeReclaimPolicy": "Retain"},
        "status": {"phase": "Available"},
    });
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn claim(extra: Value) -> PersistentVolumeClaim {
    let mut v = json!({
        "metadata": {"name": "data", "namespace": "default", "uid": "u-1", "resourceVersion": "7"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        "status": {"phase": "Pending"},
    });
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn class(mode: &str) -> StorageClass {
    serde_json::from_value(json!({
        "metadata": {"name": "fast"}, "provisioner": "berth.dev", "volumeBindingMode": mode,
    }))
    .unwrap()
}

const BOUND_REF: &str = r#"{"spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-1"}}}"#;

fn step(
    c: &PersistentVolumeClaim,
    vol: Option<PersistentVolume>,
    found: Option<PersistentVolume>,
    cls: Option<&StorageClass>,
) -> ClaimStep {
    sync_claim(
        c,
        |n| {
            vol.clone()
                .filter(|v| v.metadata.name.as_deref() == Some(n))
                .map(Box::new)
        },
        |_| Ok(found.map(Box::new)),
        cls,
    )
}

#[rstest]
#[case::a_match_binds(claim(json!({})), None, Some(pv(json!({}))), None, ClaimStep::Bind { volume: "pv1".into() })]
#[case::no_match_no_class(claim(json!({})), None, None, None,
    ClaimStep::Pending(Some(Note::normal("FailedBinding", "no persistent volumes available for this claim and no storage class is set"))))]
#[case::no_match_with_class_provisions(claim(json!({"spec": {"storageClassName": "fast"}})), None, None, Some(class("Immediate")),
    ClaimStep::Provision { provisioner: "berth.dev".into() })]
#[case::missing_class(claim(json!({"spec": {"storageClassName": "gone"}})), None, None, None,
    ClaimStep::Pending(Some(Note::warning("ProvisioningFailed", "storageclass.storage.k8s.io \"gone\" not found"))))]
#[case::wffc_waits(claim(json!({"spec": {"storageClassName": "fast"}})), None, None, Some(class("WaitForFirstConsumer")),
    ClaimStep::Pending(Some(Note::normal("WaitForFirstConsumer", "waiting for first consumer to be created before binding"))))]
#[case::wffc_with_selected_node_provisions(
    claim(json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": "n1"}}, "spec": {"storageClassName": "fast"}})),
    None, None, Some(class("WaitForFirstConsumer")), ClaimStep::Provision { provisioner: "berth.dev".into() })]
#[case::prebound_claim_missing_volume(claim(json!({"spec": {"volumeName": "pv1"}})), None, None, None, ClaimStep::Pending(None))]
#[case::prebound_claim_free_volume(claim(json!({"spec": {"volumeName": "pv1"}})), Some(pv(json!({}))), None, None, ClaimStep::Bind { volume: "pv1".into() })]
#[case::prebound_claim_too_small(claim(json!({"spec": {"volumeName": "pv1", "resources": {"requests": {"storage": "2Gi"}}}})), Some(pv(json!({}))), None, None,
    ClaimStep::Pending(Some(Note::warning("VolumeMismatch", "Cannot bind to requested volume \"pv1\": requested PV is too small"))))]
#[case::prebound_claim_class_differs(claim(json!({"spec": {"volumeName": "pv1", "storageClassName": "fast"}})), Some(pv(json!({}))), None, None,
    ClaimStep::Pending(Some(Note::warning("VolumeMismatch", "Cannot bind to requested volume \"pv1\": storageClassName does not match"))))]
#[case::prebound_claim_mode_differs(claim(json!({"spec": {"volumeName": "pv1", "volumeMode": "Block"}})), Some(pv(json!({}))), None, None,
    ClaimStep::Pending(Some(Note::warning("VolumeMismatch", "Cannot bind to requested volume \"pv1\": incompatible volumeMode"))))]
#[case::prebound_claim_access_differs(claim(json!({"spec": {"volumeName": "pv1", "accessModes": ["ReadWriteMany"]}})), Some(pv(json!({}))), None, None,
    ClaimStep::Pending(Some(Note::warning("VolumeMismatch", "Cannot bind to requested volume \"pv1\": incompatible accessMode"))))]
#[case::prebound_claim_volume_taken(claim(json!({"spec": {"volumeName": "pv1"}})),
    Some(pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "other", "uid": "u-9"}}}))), None, None,
    ClaimStep::Pending(Some(Note::warning("FailedBinding", "volume \"pv1\" already bound to a different claim."))))]
#[case::both_prebound(claim(json!({"spec": {"volumeName": "pv1"}})),
    Some(pv(serde_json::from_str(BOUND_REF).unwrap())), None, None, ClaimStep::Bind { volume: "pv1".into() })]
#[case::bound_claim_lost_reference(claim(json!({"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}}})), None, None, None,
    ClaimStep::Lost(Note::warning("ClaimLost", "Bound claim has lost reference to PersistentVolume. Data on the volume is lost!")))]
#[case::bound_claim_lost_volume(claim(json!({"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}}, "spec": {"volumeName": "pv1"}})), None, None, None,
    ClaimStep::Lost(Note::warning("ClaimLost", "Bound claim has lost its PersistentVolume. Data on the volume is lost!")))]
#[case::bound_claim_volume_unbound_is_fixed(claim(json!({"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}}, "spec": {"volumeName": "pv1"}})),
    Some(pv(json!({}))), None, None, ClaimStep::Bind { volume: "pv1".into() })]
#[case::bound_claim_misbound(claim(json!({"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}}, "spec": {"volumeName": "pv1"}})),
    Some(pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-2"}}}))), None, None,
    ClaimStep::Lost(Note::warning("ClaimMisbound", "Two claims are bound to the same volume, this one is bound incorrectly")))]
#[case::bound_claim_fine(claim(json!({"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}}, "spec": {"volumeName": "pv1"}})),
    Some(pv(serde_json::from_str(BOUND_REF).unwrap())), None, None, ClaimStep::Bind { volume: "pv1".into() })]
fn claim_steps(
    #[case] c: PersistentVolumeClaim,
    #[case] vol: Option<PersistentVolume>,
    #[case] found: Option<PersistentVolume>,
    #[case] cls: Option<StorageClass>,
    #[case] want: ClaimStep,
) {
    assert_eq!(step(&c, vol, found, cls.as_ref()), want);
}

#[test]
fn a_controller_bound_claim_whose_volume_went_elsewhere_is_an_error() {
    let c = claim(
        json!({"metadata": {"annotations": {"pv.kubernetes.io/bound-by-controller": "yes"}}, "spec": {"volumeName": "pv1"}}),
    );
    let v = pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "other", "uid": "u-9"}}}));
    assert!(
        matches!(step(&c, Some(v), None, None), ClaimStep::Fail(m) if m.contains("volume already claimed by \"default/other\""))
    );
}

#[test]
fn delay_binding_needs_wffc_and_no_selected_node() {
    let c = claim(json!({"spec": {"storageClassName": "fast"}}));
    assert!(delay_binding(&c, Some(&class("WaitForFirstConsumer"))));
    assert!(!delay_binding(&c, Some(&class("Immediate"))));
    assert!(!delay_binding(&c, None));
    let sel = claim(json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": "n"}}}));
    assert!(!delay_binding(&sel, Some(&class("WaitForFirstConsumer"))));
}

#[test]
fn binding_writes_both_sides_once() {
    let c = claim(json!({}));
    let v = pv(json!({}));
    let nv = bound_volume(&v, &c).unwrap();
    let r = nv.spec.as_ref().unwrap().claim_ref.as_ref().unwrap();
    assert_eq!(
        (r.name.as_deref(), r.uid.as_deref(), r.resource_version.as_deref()),
        (Some("data"), Some("u-1"), Some("7"))
    );
    assert_eq!(
        nv.metadata.annotations.as_ref().unwrap()[ANN_BOUND_BY_CONTROLLER],
        "yes"
    );
    assert_eq!(nv.status.as_ref().unwrap().phase.as_deref(), Some("Bound"));
    assert_eq!(bound_volume(&nv, &c), None, "binding again changes nothing");

    let nc = bound_claim(&c, &nv).unwrap();
    assert_eq!(nc.spec.as_ref().unwrap().volume_name.as_deref(), Some("pv1"));
    let ann = nc.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        (ann[ANN_BIND_COMPLETED].as_str(), ann[ANN_BOUND_BY_CONTROLLER].as_str()),
        ("yes", "yes")
    );
    let st = nc.status.as_ref().unwrap();
    assert_eq!(st.phase.as_deref(), Some("Bound"));
    assert_eq!(st.capacity.as_ref().unwrap()["storage"].0, "1Gi");
    assert_eq!(st.access_modes.as_deref(), Some(&["ReadWriteOnce".to_owned()][..]));
    assert_eq!(bound_claim(&nc, &nv), None);
}

#[test]
fn a_user_prebound_volume_keeps_its_reference_and_gets_the_uid() {
    let c = claim(json!({}));
    let v = pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "data"}}}));
    let nv = bound_volume(&v, &c).unwrap();
    assert_eq!(
        nv.spec.as_ref().unwrap().claim_ref.as_ref().unwrap().uid.as_deref(),
        Some("u-1")
    );
    assert!(nv.metadata.annotations.is_none(), "not bound by the controller");
    // A claim the user pre-bound is not marked bound-by-controller either.
    let c2 = claim(json!({"spec": {"volumeName": "pv1"}}));
    let nc = bound_claim(&c2, &nv).unwrap();
    assert!(
        !nc.metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key(ANN_BOUND_BY_CONTROLLER)
    );
}

#[test]
fn provisioner_annotations_are_set_once() {
    let c = claim(json!({}));
    let n = claim_for_provisioner(&c, "berth.dev").unwrap();
    assert_eq!(
        n.metadata.annotations.as_ref().unwrap()[ANN_STORAGE_PROVISIONER],
        "berth.dev"
    );
    assert_eq!(
        n.metadata.annotations.as_ref().unwrap()[ANN_BETA_STORAGE_PROVISIONER],
        "berth.dev"
    );
    assert_eq!(claim_for_provisioner(&n, "berth.dev"), None);
}

fn vstep(v: &PersistentVolume, c: Option<&PersistentVolumeClaim>) -> VolumeStep {
    sync_volume(v, c.map_or(ClaimSeen::Gone, ClaimSeen::Found))
}

fn released(policy: &str, extra: Value) -> PersistentVolume {
    let mut e = json!({"spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-1"}, "persistentVolumeReclaimPolicy": policy}, "status": {"phase": "Released"}});
    merge(&mut e, extra);
    pv(e)
}

#[rstest]
#[case::unclaimed_is_available(pv(json!({"status": {"phase": "Pending"}})), None, VolumeStep::Phase { phase: "Available", note: None })]
#[case::already_available(pv(json!({})), None, VolumeStep::Nothing)]
#[case::user_reserved_is_available(pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "data"}}, "status": {"phase": "Pending"}})), None,
    VolumeStep::Phase { phase: "Available", note: None })]
#[case::claim_gone_releases(pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-1"}}, "status": {"phase": "Bound"}})), None,
    VolumeStep::Phase { phase: "Released", note: None })]
#[case::retain_keeps(released("Retain", json!({})), None, VolumeStep::Nothing)]
#[case::provisioned_delete_waits_for_provisioner(released("Delete", json!({"metadata": {"annotations": {"pv.kubernetes.io/provisioned-by": "berth.dev"}}})), None, VolumeStep::Nothing)]
#[case::static_delete_fails(released("Delete", json!({})), None,
    VolumeStep::Phase { phase: "Failed", note: Some(Note::warning("VolumeFailedDelete", "error getting deleter volume plugin for volume \"pv1\": no deletable volume plugin matched")) })]
#[case::recycle_fails(released("Recycle", json!({})), None,
    VolumeStep::Phase { phase: "Failed", note: Some(Note::warning("VolumeFailedRecycle", "No recycler plugin found for the volume!")) })]
#[case::failed_is_not_released_again(released("Delete", json!({"status": {"phase": "Failed"}})), None, VolumeStep::Nothing)]
#[case::unknown_policy(released("Sometimes", json!({})), None,
    VolumeStep::Phase { phase: "Failed", note: Some(Note::warning("VolumeUnknownReclaimPolicy", "Volume has unrecognized PersistentVolumeReclaimPolicy")) })]
#[case::claim_not_yet_bound(pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-1"}}})), Some(claim(json!({}))),
    VolumeStep::SyncClaim("default/data".into()))]
#[case::claim_bound_here(pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-1"}}})), Some(claim(json!({"spec": {"volumeName": "pv1"}}))),
    VolumeStep::Phase { phase: "Bound", note: None })]
#[case::claim_bound_elsewhere_unbinds_controller_ref(
    pv(json!({"metadata": {"annotations": {"pv.kubernetes.io/bound-by-controller": "yes"}}, "spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-1"}}, "status": {"phase": "Bound"}})),
    Some(claim(json!({"spec": {"volumeName": "pv2"}}))), VolumeStep::Unbind { whole: true })]
#[case::claim_bound_elsewhere_unbinds_user_uid(
    pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-1"}}, "status": {"phase": "Bound"}})),
    Some(claim(json!({"spec": {"volumeName": "pv2"}}))), VolumeStep::Unbind { whole: false })]
#[case::claim_bound_elsewhere_provisioned_delete_is_released(
    pv(json!({"metadata": {"annotations": {"pv.kubernetes.io/provisioned-by": "berth.dev"}}, "spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-1"}, "persistentVolumeReclaimPolicy": "Delete"}, "status": {"phase": "Bound"}})),
    Some(claim(json!({"spec": {"volumeName": "pv2"}}))), VolumeStep::Phase { phase: "Released", note: None })]
fn volume_steps(#[case] v: PersistentVolume, #[case] c: Option<PersistentVolumeClaim>, #[case] want: VolumeStep) {
    assert_eq!(vstep(&v, c.as_ref()), want);
}

#[test]
fn unbinding_clears_what_the_controller_set() {
    let v = pv(
        json!({"metadata": {"annotations": {"pv.kubernetes.io/bound-by-controller": "yes"}}, "spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-1"}}, "status": {"phase": "Bound"}}),
    );
    let whole = unbound_volume(&v, true);
    assert!(whole.spec.as_ref().unwrap().claim_ref.is_none());
    assert!(
        !whole
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key(ANN_BOUND_BY_CONTROLLER)
    );
    assert_eq!(whole.status.as_ref().unwrap().phase.as_deref(), Some("Available"));
    let uid_only = unbound_volume(&v, false);
    let r = uid_only.spec.as_ref().unwrap().claim_ref.as_ref().unwrap();
    assert_eq!((r.name.as_deref(), r.uid.as_deref()), (Some("data"), None));
}

#[test]
fn failed_phase_carries_the_message() {
    let v = released("Delete", json!({}));
    let note = Note::warning("VolumeFailedDelete", "no deleter");
    let f = volume_in_phase(&v, "Failed", Some(&note)).unwrap();
    assert_eq!(f.status.as_ref().unwrap().message.as_deref(), Some("no deleter"));
    assert_eq!(volume_in_phase(&f, "Failed", Some(&note)), None);
}

#[rstest]
#[case::released_delete_mine(released("Delete", json!({"metadata": {"annotations": {"pv.kubernetes.io/provisioned-by": "berth.dev"}}})), true)]
#[case::other_driver(released("Delete", json!({"metadata": {"annotations": {"pv.kubernetes.io/provisioned-by": "x.dev"}}})), false)]
#[case::retain(released("Retain", json!({"metadata": {"annotations": {"pv.kubernetes.io/provisioned-by": "berth.dev"}}})), false)]
#[case::still_bound(released("Delete", json!({"metadata": {"annotations": {"pv.kubernetes.io/provisioned-by": "berth.dev"}}, "status": {"phase": "Bound"}})), false)]
fn provisioner_deletes_only_its_released_delete_volumes(#[case] v: PersistentVolume, #[case] want: bool) {
    assert_eq!(should_delete(&v, "berth.dev"), want);
}

#[test]
fn binding_drops_the_provisioning_finalizer() {
    let c = claim(json!({"metadata": {"finalizers": ["kubernetes.io/pvc-protection", PROVISIONING_FINALIZER]}}));
    let nv = bound_volume(&pv(json!({})), &c).unwrap();
    let nc = bound_claim(&c, &nv).unwrap();
    assert_eq!(
        nc.metadata.finalizers.as_deref(),
        Some(&["kubernetes.io/pvc-protection".to_owned()][..])
    );
}

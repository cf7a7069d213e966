#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use rstest::rstest;
use serde_json::{Value, json};

use super::*;
use crate::resources::RESOURCES;

fn res(kind: &str) -> &'static Resource {
    RESOURCES.iter().find(|r| r.kind == kind).unwrap()
}

fn smp(kind: &str, original: Value, patch: Value) -> Result<Value, PatchError> {
    apply(
        res(kind),
        PatchType::StrategicMerge,
        &original,
        patch.to_string().as_bytes(),
    )
}

fn pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "finalizers": ["a.io/x"], "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {"name": "app", "image": "nginx:1.25", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "sidecar", "image": "busybox"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}, {"name": "scratch", "emptyDir": {}}],
            "tolerations": [{"key": "a", "operator": "Exists"}]}})
}

#[test]
fn kubectl_apply_patch_with_last_applied_and_element_order() {
    // What kubectl 1.20 `apply` sends after the image of `app` changed in the manifest.
    let last = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"annotations":{},"name":"web","namespace":"default"},"spec":{"containers":[{"image":"nginx:1.27","name":"app"},{"image":"busybox","name":"sidecar"}]}}"#;
    let patch = json!({
        "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{last}\n")}},
        "spec": {"$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
                 "containers": [{"image": "nginx:1.27", "name": "app"}]}
    });
    let out = smp("Pod", pod(), patch).unwrap();
    assert_eq!(
        out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
        format!("{last}\n")
    );
    assert_eq!(out["spec"]["containers"][0]["image"], "nginx:1.27");
    assert_eq!(
        out["spec"]["containers"][0]["env"],
        pod()["spec"]["containers"][0]["env"],
        "merged, not replaced"
    );
    assert_eq!(out["spec"]["containers"][1], pod()["spec"]["containers"][1]);
    assert!(!out.to_string().contains('$'), "no directive leaks: {out}");
}

#[test]
fn element_order_interleaves_server_items_like_kubernetes() {
    // Live [a, s1, b, s2]; the patch names [b, a, c] and adds c. As in mergeSortedSlice, s1 (live
    // before b) comes first, s2 (live after everything named) last.
    let live = json!({"spec": {"containers": [{"name": "a"}, {"name": "s1"}, {"name": "b"}, {"name": "s2"}]}});
    let patch = json!({"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}, {"name": "c"}],
                                "containers": [{"name": "c", "image": "x"}]}});
    let out = smp("Pod", live, patch).unwrap();
    let names: Vec<&str> = out["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "b", "a", "c", "s2"]);
}

#[test]
fn merged_lists_follow_the_patch_order_like_kubernetes() {
    // Live [a, b]; the patch lists c then a: mergeSlice gives [c, a, b].
    let live = json!({"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]}});
    let patch = json!({"spec": {"containers": [{"name": "c", "image": "3"}, {"name": "a", "image": "4"}]}});
    let out = smp("Pod", live, patch).unwrap();
    let names: Vec<&str> = out["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c", "a", "b"]);
    assert_eq!(out["spec"]["containers"][1]["image"], "4");
}

#[test]
fn element_order_reorders_and_keeps_server_items() {
    let patch = json!({"spec": {"$setElementOrder/containers": [{"name": "sidecar"}, {"name": "app"}]}});
    let out = smp("Pod", pod(), patch).unwrap();
    let names: Vec<&str> = out["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sidecar", "app"]);
    let partial = json!({"spec": {"$setElementOrder/volumes": [{"name": "scratch"}]}});
    let out = smp("Pod", pod(), partial).unwrap();
    let names: Vec<&str> = out["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data", "scratch"], "server-only items keep their live place");
}

#[rstest]
#[case::env_merged_by_name(
    json!({"spec": {"containers": [{"name": "app", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}]}}),
    "/spec/containers/0/env",
    json!([{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}]))]
#[case::delete_list_item(
    json!({"spec": {"volumes": [{"$patch": "delete", "name": "scratch"}]}}),
    "/spec/volumes",
    json!([{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]))]
#[case::retain_keys_switches_volume_source(
    json!({"spec": {"volumes": [{"$retainKeys": ["name", "persistentVolumeClaim"], "name": "scratch", "persistentVolumeClaim": {"claimName": "c"}}]}}),
    "/spec/volumes/1",
    json!({"name": "scratch", "persistentVolumeClaim": {"claimName": "c"}}))]
#[case::mount_merged_by_path(
    json!({"spec": {"containers": [{"name": "app", "volumeMounts": [{"mountPath": "/data", "readOnly": true}]}]}}),
    "/spec/containers/0/volumeMounts",
    json!([{"name": "data", "mountPath": "/data", "readOnly": true}]))]
#[case::finalizers_union(
    json!({"metadata": {"finalizers": ["b.io/y", "a.io/x"]}}),
    "/metadata/finalizers",
    json!(["a.io/x", "b.io/y"]))]
#[case::delete_from_primitive_list(
    json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a.io/x"]}}),
    "/metadata/finalizers",
    json!([]))]
#[case::null_deletes(
    json!({"metadata": {"labels": {"app": null, "tier": "db"}}}),
    "/metadata/labels",
    json!({"tier": "db"}))]
#[case::tolerations_replace(
    json!({"spec": {"tolerations": [{"key": "b", "operator": "Exists"}]}}),
    "/spec/tolerations",
    json!([{"key": "b", "operator": "Exists"}]))]
#[case::map_replace_directive(
    json!({"metadata": {"labels": {"$patch": "replace", "only": "this"}}}),
    "/metadata/labels",
    json!({"only": "this"}))]
#[case::list_replace_directive(
    json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "solo", "image": "x"}]}}),
    "/spec/containers",
    json!([{"name": "solo", "image": "x"}]))]
#[case::map_delete_directive(
    json!({"spec": {"volumes": [{"name": "data", "persistentVolumeClaim": {"$patch": "delete"}, "emptyDir": {}}]}}),
    "/spec/volumes/0",
    json!({"name": "data", "emptyDir": {}}))]
#[case::new_container_goes_first_as_in_kubernetes(
    json!({"spec": {"containers": [{"name": "extra", "image": "x", "env": [{"$patch": "delete", "name": "gone"}]}]}}),
    "/spec/containers/0",
    json!({"name": "extra", "image": "x", "env": []}))]
fn pod_strategic_merge(#[case] patch: Value, #[case] pointer: &str, #[case] want: Value) {
    let out = smp("Pod", pod(), patch).unwrap();
    assert_eq!(out.pointer(pointer).unwrap(), &want, "{out}");
}

fn pv() -> Value {
    json!({"metadata": {"name": "pv1"}, "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce", "ReadOnlyMany"],
        "claimRef": {"name": "data", "namespace": "default"}}, "status": {"phase": "Bound", "conditions": [{"type": "A", "status": "True"}]}})
}

#[test]
fn kubectl_edit_patches_on_storage_kinds() {
    // kubectl edit sends the two-way diff as a strategic merge patch.
    let out = smp(
        "PersistentVolume",
        pv(),
        json!({"spec": {"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteMany"]}}),
    )
    .unwrap();
    assert_eq!(out["spec"]["capacity"]["storage"], "2Gi");
    assert_eq!(
        out["spec"]["accessModes"],
        json!(["ReadWriteMany"]),
        "access modes replace"
    );
    let out = smp("PersistentVolume", pv(), json!({"spec": {"claimRef": null}})).unwrap();
    assert!(out["spec"].get("claimRef").is_none());
    let out = smp(
        "PersistentVolume",
        pv(),
        json!({"status": {"conditions": [{"type": "B", "status": "False"}]}}),
    )
    .unwrap();
    assert_eq!(
        out["status"]["conditions"].as_array().unwrap().len(),
        2,
        "conditions merge by type"
    );
    let claim = json!({"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}});
    let out = smp(
        "PersistentVolumeClaim",
        claim,
        json!({"spec": {"resources": {"requests": {"storage": "5Gi"}}}}),
    )
    .unwrap();
    assert_eq!(out["spec"]["resources"]["requests"]["storage"], "5Gi");
    let node = json!({"metadata": {"name": "n"}, "spec": {"drivers": [{"name": "a", "nodeID": "1"}]}});
    let out = smp(
        "CSINode",
        node,
        json!({"spec": {"drivers": [{"name": "b", "nodeID": "2"}]}}),
    )
    .unwrap();
    assert_eq!(out["spec"]["drivers"].as_array().unwrap().len(), 2);
}

#[rstest]
#[case::missing_merge_key(json!({"spec": {"containers": [{"image": "x"}]}}), "does not contain declared merge key: name")]
#[case::unknown_directive(json!({"spec": {"$patch": "explode"}}), "unknown patch type")]
#[case::bad_order(json!({"spec": {"$setElementOrder/containers": 5}}), "must be a list")]
fn strategic_merge_errors(#[case] patch: Value, #[case] contains: &str) {
    let err = smp("Pod", pod(), patch).unwrap_err();
    assert!(matches!(&err, PatchError::Invalid(m) if m.contains(contains)), "{err}");
}

#[test]
fn malformed_bodies() {
    for t in [PatchType::Json, PatchType::Merge, PatchType::StrategicMerge] {
        let err = apply(res("Pod"), t, &pod(), b"{not json").unwrap_err();
        assert!(matches!(err, PatchError::Malformed(_)), "{t:?}");
    }
    assert!(matches!(
        apply(res("Pod"), PatchType::StrategicMerge, &pod(), b"[1]"),
        Err(PatchError::Malformed(_))
    ));
    assert!(matches!(
        apply(res("Pod"), PatchType::Json, &pod(), br#"{"op":"add"}"#),
        Err(PatchError::Malformed(_))
    ));
}

#[test]
fn json_patch_and_merge_patch() {
    let ops = br#"[{"op":"test","path":"/status/phase","value":"Bound"},{"op":"replace","path":"/spec/capacity/storage","value":"3Gi"},{"op":"add","path":"/metadata/labels","value":{"a":"b"}}]"#;
    let out = apply(res("PersistentVolume"), PatchType::Json, &pv(), ops).unwrap();
    assert_eq!(out["spec"]["capacity"]["storage"], "3Gi");
    assert_eq!(out["metadata"]["labels"]["a"], "b");
    let failing = br#"[{"op":"test","path":"/status/phase","value":"Available"}]"#;
    assert!(matches!(
        apply(res("PersistentVolume"), PatchType::Json, &pv(), failing),
        Err(PatchError::Invalid(_))
    ));

    let merge = br#"{"spec":{"accessModes":["ReadWriteOncePod"],"claimRef":null}}"#;
    let out = apply(res("PersistentVolume"), PatchType::Merge, &pv(), merge).unwrap();
    assert_eq!(out["spec"]["accessModes"], json!(["ReadWriteOncePod"]));
    assert!(out["spec"].get("claimRef").is_none());
}

#[test]
fn snapshot_kinds_refuse_strategic_merge_but_take_the_others() {
    let vs = json!({"metadata": {"name": "s"}, "spec": {"source": {"persistentVolumeClaimName": "a"}}});
    for kind in ["VolumeSnapshot", "VolumeSnapshotContent", "VolumeSnapshotClass"] {
        let err = apply(res(kind), PatchType::StrategicMerge, &vs, b"{}").unwrap_err();
        assert_eq!(err, PatchError::Invalid(CRD_STRATEGIC_MERGE_REFUSED.to_owned()));
    }
    let out = apply(
        res("VolumeSnapshot"),
        PatchType::Merge,
        &vs,
        br#"{"metadata":{"labels":{"a":"b"}}}"#,
    )
    .unwrap();
    assert_eq!(out["metadata"]["labels"]["a"], "b");
}

#[test]
fn content_types() {
    assert_eq!(
        PatchType::from_content_type("application/strategic-merge-patch+json; charset=utf-8"),
        Some(PatchType::StrategicMerge)
    );
    assert_eq!(PatchType::from_content_type("application/apply-patch+yaml"), None);
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[a-z$/]{0,8}".prop_map(Value::String),
        prop::sample::select(vec!["replace", "delete", "merge"]).prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "spec",
                    "containers",
                    "volumes",
                    "name",
                    "env",
                    "metadata",
                    "finalizers",
                    "$patch",
                    "$retainKeys",
                    "$setElementOrder/containers",
                    "$deleteFromPrimitiveList/finalizers",
                    "image",
                ]),
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    })
}

proptest! {
    #[test]
    fn strategic_merge_never_panics(patch in arb_json(), original in arb_json()) {
        let _ = apply(res("Pod"), PatchType::StrategicMerge, &original, patch.to_string().as_bytes());
        let _ = apply(res("Pod"), PatchType::StrategicMerge, &pod(), patch.to_string().as_bytes());
    }

    #[test]
    fn bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..64)) {
        for t in [PatchType::Json, PatchType::Merge, PatchType::StrategicMerge] {
            let _ = apply(res("PersistentVolume"), t, &pv(), &body);
        }
    }

    #[test]
    fn patch_without_directives_is_idempotent(labels in prop::collection::btree_map("[a-z]{1,5}", "[a-z]{0,5}", 0..4)) {
        let patch = json!({"metadata": {"labels": labels}});
        let once = smp("Pod", pod(), patch.clone()).unwrap();
        let twice = smp("Pod", once.clone(), patch).unwrap();
        prop_assert_eq!(once, twice);
    }
}

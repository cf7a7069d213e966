#![allow(clippy::unwrap_used)]

use rstest::rstest;
use serde_json::{Value, json};

use super::*;
use crate::resources::RESOURCES;

const NOW: &str = "2024-05-01T12:00:00Z";
const TEN_MIN_AGO: &str = "2024-05-01T11:50:00Z";

fn now() -> jiff::Timestamp {
    NOW.parse().unwrap()
}

fn res(kind: &str) -> &'static Resource {
    RESOURCES.iter().find(|r| r.kind == kind).unwrap()
}

fn row(kind: &str, obj: Value) -> Vec<Value> {
    let t = table(res(kind), &[obj], now(), IncludeObject::None);
    t["rows"][0]["cells"].as_array().unwrap().clone()
}

fn headers(kind: &str) -> Vec<(String, u64)> {
    let t = table(res(kind), &[], now(), IncludeObject::None);
    t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_uppercase(),
                c["priority"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[rstest]
#[case(0, "0s")]
#[case(1, "1s")]
#[case(119, "119s")]
#[case(120, "2m")]
#[case(200, "3m20s")]
#[case(600, "10m")]
#[case(179 * 60 + 59, "179m")]
#[case(3 * 3600, "3h")]
#[case(3 * 3600 + 25 * 60, "3h25m")]
#[case(8 * 3600 + 25 * 60, "8h")]
#[case(47 * 3600, "47h")]
#[case(49 * 3600, "2d1h")]
#[case(8 * 24 * 3600, "8d")]
#[case(400 * 24 * 3600, "400d")]
#[case(3 * 365 * 24 * 3600 + 24 * 3600, "3y1d")]
#[case(9 * 365 * 24 * 3600, "9y")]
#[case(-1, "0s")]
#[case(-2, "<invalid>")]
fn human_durations(#[case] secs: i128, #[case] want: &str) {
    assert_eq!(human_duration(secs * 1_000_000_000), want);
}

#[test]
fn ages() {
    assert_eq!(age("", now()), "<unknown>");
    assert_eq!(age(TEN_MIN_AGO, now()), "10m");
}

#[rstest]
#[case(json!(["ReadWriteMany", "ReadWriteOnce", "ReadWriteOnce"]), "RWO,RWX")]
#[case(json!(["ReadWriteOncePod"]), "RWOP")]
#[case(json!(["ReadOnlyMany", "ReadWriteOnce"]), "RWO,ROX")]
#[case(json!([]), "")]
fn access_mode_abbreviations(#[case] modes: Value, #[case] want: &str) {
    assert_eq!(access_modes(modes.as_array().unwrap()), want);
}

#[rstest]
#[case("PersistentVolume", &["NAME", "CAPACITY", "ACCESS MODES", "RECLAIM POLICY", "STATUS", "CLAIM", "STORAGECLASS", "VOLUMEATTRIBUTESCLASS", "REASON", "AGE", "VOLUMEMODE"], &[10])]
#[case("PersistentVolumeClaim", &["NAME", "STATUS", "VOLUME", "CAPACITY", "ACCESS MODES", "STORAGECLASS", "VOLUMEATTRIBUTESCLASS", "AGE", "VOLUMEMODE"], &[8])]
#[case("StorageClass", &["NAME", "PROVISIONER", "RECLAIMPOLICY", "VOLUMEBINDINGMODE", "ALLOWVOLUMEEXPANSION", "AGE"], &[])]
#[case("Pod", &["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE", "NOMINATED NODE", "READINESS GATES"], &[5, 6, 7, 8])]
#[case("Secret", &["NAME", "TYPE", "DATA", "AGE"], &[])]
#[case("ConfigMap", &["NAME", "DATA", "AGE"], &[])]
#[case("Namespace", &["NAME", "STATUS", "AGE"], &[])]
#[case("Node", &["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"], &[5, 6, 7, 8, 9])]
#[case("Event", &["LAST SEEN", "TYPE", "REASON", "OBJECT", "SUBOBJECT", "SOURCE", "MESSAGE", "FIRST SEEN", "COUNT", "NAME"], &[4, 5, 7, 8, 9])]
#[case("VolumeAttachment", &["NAME", "ATTACHER", "PV", "NODE", "ATTACHED", "AGE"], &[])]
#[case("CSIDriver", &["NAME", "ATTACHREQUIRED", "PODINFOONMOUNT", "STORAGECAPACITY", "TOKENREQUESTS", "REQUIRESREPUBLISH", "MODES", "AGE"], &[])]
#[case("CSINode", &["NAME", "DRIVERS", "AGE"], &[])]
#[case("CSIStorageCapacity", &["NAME", "STORAGECLASSNAME", "CAPACITY"], &[])]
#[case("VolumeSnapshot", &["NAME", "READYTOUSE", "SOURCEPVC", "SOURCESNAPSHOTCONTENT", "RESTORESIZE", "SNAPSHOTCLASS", "SNAPSHOTCONTENT", "CREATIONTIME", "AGE"], &[])]
#[case("VolumeSnapshotContent", &["NAME", "READYTOUSE", "RESTORESIZE", "DELETIONPOLICY", "DRIVER", "VOLUMESNAPSHOTCLASS", "VOLUMESNAPSHOT", "VOLUMESNAPSHOTNAMESPACE", "AGE"], &[])]
#[case("VolumeSnapshotClass", &["NAME", "DRIVER", "DELETIONPOLICY", "AGE"], &[])]
fn column_names_and_priorities(#[case] kind: &str, #[case] names: &[&str], #[case] wide: &[usize]) {
    let h = headers(kind);
    assert_eq!(h.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), names);
    let got_wide: Vec<usize> = h
        .iter()
        .enumerate()
        .filter(|(_, (_, p))| *p == 1)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(got_wide, wide);
}

#[rstest]
#[case::bound(json!({"metadata": {"name": "pv1", "creationTimestamp": TEN_MIN_AGO},
    "spec": {"capacity": {"storage": "1024Mi"}, "accessModes": ["ReadWriteOnce"], "persistentVolumeReclaimPolicy": "Retain",
             "claimRef": {"namespace": "default", "name": "data"}, "storageClassName": "fast", "volumeMode": "Filesystem"},
    "status": {"phase": "Bound"}}),
    json!(["pv1", "1Gi", "RWO", "Retain", "Bound", "default/data", "fast", "<unset>", "", "10m", "Filesystem"]))]
#[case::deleting_unclaimed(json!({"metadata": {"name": "pv2", "deletionTimestamp": NOW},
    "spec": {"accessModes": ["ReadWriteMany", "ReadOnlyMany"], "volumeAttributesClassName": "gold"},
    "status": {"phase": "Released", "reason": "Failed"}}),
    json!(["pv2", "0", "ROX,RWX", "", "Terminating", "", "", "gold", "Failed", "<unknown>", "<unset>"]))]
fn persistent_volume_rows(#[case] obj: Value, #[case] want: Value) {
    assert_eq!(Value::Array(row("PersistentVolume", obj)), want);
}

#[rstest]
#[case::bound(json!({"metadata": {"name": "data", "creationTimestamp": TEN_MIN_AGO},
    "spec": {"volumeName": "pv1", "storageClassName": "fast", "volumeMode": "Block", "resources": {"requests": {"storage": "1Gi"}}},
    "status": {"phase": "Bound", "capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"]}}),
    json!(["data", "Bound", "pv1", "2Gi", "RWO", "fast", "<unset>", "10m", "Block"]))]
#[case::pending(json!({"metadata": {"name": "data", "creationTimestamp": TEN_MIN_AGO,
        "annotations": {"volume.beta.kubernetes.io/storage-class": "beta"}},
    "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}, "accessModes": ["ReadWriteOnce"]},
    "status": {"phase": "Pending"}}),
    json!(["data", "Pending", "", "", "", "beta", "<unset>", "10m", "<unset>"]))]
fn persistent_volume_claim_rows(#[case] obj: Value, #[case] want: Value) {
    assert_eq!(Value::Array(row("PersistentVolumeClaim", obj)), want);
}

#[rstest]
#[case::default_class(json!({"metadata": {"name": "standard", "creationTimestamp": TEN_MIN_AGO,
        "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": "berth.csi.io", "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer", "allowVolumeExpansion": true}),
    json!(["standard (default)", "berth.csi.io", "Delete", "WaitForFirstConsumer", true, "10m"]))]
#[case::unset_fields(json!({"metadata": {"name": "slow"}, "provisioner": "x"}),
    json!(["slow", "x", "Delete", "Immediate", false, "<unknown>"]))]
fn storage_class_rows(#[case] obj: Value, #[case] want: Value) {
    assert_eq!(Value::Array(row("StorageClass", obj)), want);
}

#[rstest]
#[case::running(json!({"metadata": {"name": "web", "creationTimestamp": TEN_MIN_AGO},
    "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
    "status": {"phase": "Running", "podIP": "10.0.0.5", "containerStatuses": [
        {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}},
         "lastState": {"terminated": {"exitCode": 1, "finishedAt": "2024-05-01T11:55:00Z"}}},
        {"name": "b", "ready": true, "restartCount": 0, "state": {"running": {}}}]}}),
    json!(["web", "2/2", "Running", "2 (5m ago)", "10m", "10.0.0.5", "n1", "<none>", "<none>"]))]
#[case::crash_loop(json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "a"}]},
    "status": {"phase": "Running", "containerStatuses": [
        {"name": "a", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}}),
    json!(["web", "0/1", "CrashLoopBackOff", "0", "<unknown>", "<none>", "<none>", "<none>", "<none>"]))]
#[case::pending_unscheduled(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}], "readinessGates": [{"conditionType": "x"}]},
    "status": {"phase": "Pending"}}),
    json!(["p", "0/1", "Pending", "0", "<unknown>", "<none>", "<none>", "<none>", "0/1"]))]
#[case::init(json!({"metadata": {"name": "p"}, "spec": {"initContainers": [{"name": "i1"}, {"name": "i2"}], "containers": [{"name": "a"}]},
    "status": {"phase": "Pending", "initContainerStatuses": [
        {"name": "i1", "state": {"terminated": {"exitCode": 0}}},
        {"name": "i2", "state": {"running": {}}}]}}),
    json!(["p", "0/1", "Init:1/2", "0", "<unknown>", "<none>", "<none>", "<none>", "<none>"]))]
#[case::terminating(json!({"metadata": {"name": "p", "deletionTimestamp": NOW}, "spec": {"containers": [{"name": "a"}]},
    "status": {"phase": "Running"}}),
    json!(["p", "0/1", "Terminating", "0", "<unknown>", "<none>", "<none>", "<none>", "<none>"]))]
#[case::exit_code(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]},
    "status": {"phase": "Failed", "containerStatuses": [{"name": "a", "state": {"terminated": {"exitCode": 3}}}]}}),
    json!(["p", "0/1", "ExitCode:3", "0", "<unknown>", "<none>", "<none>", "<none>", "<none>"]))]
fn pod_rows(#[case] obj: Value, #[case] want: Value) {
    assert_eq!(Value::Array(row("Pod", obj)), want);
}

#[test]
fn finished_pods_carry_the_completed_condition() {
    let t = table(
        res("Pod"),
        &[json!({"metadata": {"name": "p"}, "status": {"phase": "Succeeded"}})],
        now(),
        IncludeObject::None,
    );
    assert_eq!(t["rows"][0]["conditions"][0]["reason"], "Succeeded");
}

#[rstest]
#[case("Secret", json!({"metadata": {"name": "s", "creationTimestamp": TEN_MIN_AGO}, "type": "Opaque", "data": {"a": "", "b": ""}}),
    json!(["s", "Opaque", 2, "10m"]))]
#[case("ConfigMap", json!({"metadata": {"name": "c", "creationTimestamp": TEN_MIN_AGO}, "data": {"a": ""}, "binaryData": {"b": ""}}),
    json!(["c", 2, "10m"]))]
#[case("Namespace", json!({"metadata": {"name": "default", "creationTimestamp": TEN_MIN_AGO}, "status": {"phase": "Active"}}),
    json!(["default", "Active", "10m"]))]
#[case("Node", json!({"metadata": {"name": "n1", "creationTimestamp": TEN_MIN_AGO, "labels": {"node-role.kubernetes.io/control-plane": ""}},
        "spec": {"unschedulable": true},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "nodeInfo": {"kubeletVersion": "berth-0.1.0", "osImage": "Debian"},
                   "addresses": [{"type": "InternalIP", "address": "192.168.1.2"}]}}),
    json!(["n1", "Ready,SchedulingDisabled", "control-plane", "10m", "berth-0.1.0", "192.168.1.2", "<none>", "Debian", "<unknown>", "<unknown>"]))]
#[case("Event", json!({"metadata": {"name": "data.17"}, "type": "Warning", "reason": "ProvisioningFailed",
        "involvedObject": {"kind": "PersistentVolumeClaim", "name": "data", "namespace": "default"},
        "message": " no space \n", "firstTimestamp": "2024-05-01T11:00:00Z", "lastTimestamp": TEN_MIN_AGO, "count": 4,
        "source": {"component": "berth-provisioner"}}),
    json!(["10m", "Warning", "ProvisioningFailed", "persistentvolumeclaim/data", "", "berth-provisioner", "no space", "60m", 4, "data.17"]))]
#[case("Event", json!({"metadata": {"name": "e"}, "type": "Normal", "reason": "Bound", "involvedObject": {"kind": "Node"},
        "eventTime": TEN_MIN_AGO, "reportingComponent": "binder", "reportingInstance": "n1"}),
    json!(["10m", "Normal", "Bound", "node", "", "binder, n1", "", "10m", 1, "e"]))]
#[case("VolumeAttachment", json!({"metadata": {"name": "csi-abc", "creationTimestamp": TEN_MIN_AGO},
        "spec": {"attacher": "berth.csi.io", "nodeName": "n1", "source": {"persistentVolumeName": "pv1"}}, "status": {"attached": true}}),
    json!(["csi-abc", "berth.csi.io", "pv1", "n1", true, "10m"]))]
#[case("CSIDriver", json!({"metadata": {"name": "berth.csi.io", "creationTimestamp": TEN_MIN_AGO},
        "spec": {"attachRequired": false, "podInfoOnMount": true, "storageCapacity": true, "requiresRepublish": false,
                 "volumeLifecycleModes": ["Persistent", "Ephemeral"]}}),
    json!(["berth.csi.io", false, true, true, "<unset>", false, "Persistent,Ephemeral", "10m"]))]
#[case("CSIDriver", json!({"metadata": {"name": "d"}, "spec": {"tokenRequests": [{"audience": "a"}, {"audience": "b"}]}}),
    json!(["d", true, false, false, "a,b", false, "<none>", "<unknown>"]))]
#[case("CSINode", json!({"metadata": {"name": "n1", "creationTimestamp": TEN_MIN_AGO}, "spec": {"drivers": [{"name": "a"}, {"name": "b"}]}}),
    json!(["n1", 2, "10m"]))]
#[case("CSIStorageCapacity", json!({"metadata": {"name": "csisc-1"}, "storageClassName": "fast", "capacity": "1073741824"}),
    json!(["csisc-1", "fast", "1073741824"]))]
#[case("CSIStorageCapacity", json!({"metadata": {"name": "csisc-1"}, "storageClassName": "fast"}),
    json!(["csisc-1", "fast", "<unset>"]))]
#[case("VolumeSnapshot", json!({"metadata": {"name": "s", "creationTimestamp": TEN_MIN_AGO},
        "spec": {"source": {"persistentVolumeClaimName": "data"}, "volumeSnapshotClassName": "c"},
        "status": {"readyToUse": true, "restoreSize": "1Gi", "boundVolumeSnapshotContentName": "snapcontent-1", "creationTime": "2024-05-01T11:55:00Z"}}),
    json!(["s", true, "data", null, "1Gi", "c", "snapcontent-1", "5m", "10m"]))]
#[case("VolumeSnapshotContent", json!({"metadata": {"name": "snapcontent-1", "creationTimestamp": TEN_MIN_AGO},
        "spec": {"deletionPolicy": "Delete", "driver": "berth.csi.io", "volumeSnapshotRef": {"name": "s", "namespace": "default"}},
        "status": {"readyToUse": false, "restoreSize": 1073741824}}),
    json!(["snapcontent-1", false, 1073741824, "Delete", "berth.csi.io", null, "s", "default", "10m"]))]
#[case("VolumeSnapshotClass", json!({"metadata": {"name": "c", "creationTimestamp": TEN_MIN_AGO}, "driver": "berth.csi.io", "deletionPolicy": "Retain"}),
    json!(["c", "berth.csi.io", "Retain", "10m"]))]
fn other_rows(#[case] kind: &str, #[case] obj: Value, #[case] want: Value) {
    assert_eq!(Value::Array(row(kind, obj)), want);
}

#[test]
fn table_shape_and_included_objects() {
    let obj =
        json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv1", "uid": "u1"}, "spec": {}});
    let t = table(
        res("PersistentVolume"),
        std::slice::from_ref(&obj),
        now(),
        IncludeObject::Metadata,
    );
    assert_eq!(t["kind"], "Table");
    assert_eq!(t["apiVersion"], "meta.k8s.io/v1");
    assert!(t["metadata"].is_object());
    assert_eq!(
        t["columnDefinitions"][0],
        json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace. Cannot be updated.", "priority": 0})
    );
    assert_eq!(
        t["rows"][0]["object"],
        json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": {"name": "pv1", "uid": "u1"}})
    );
    let full = table(
        res("PersistentVolume"),
        std::slice::from_ref(&obj),
        now(),
        IncludeObject::Object,
    );
    assert_eq!(full["rows"][0]["object"], obj);
    let none = table(res("PersistentVolume"), &[obj], now(), IncludeObject::None);
    assert!(none["rows"][0].get("object").is_none());
}

#[test]
fn every_kind_has_one_cell_per_column_even_for_empty_objects() {
    for r in RESOURCES {
        for obj in [
            json!({}),
            json!(null),
            json!({"metadata": 5, "spec": "x", "status": []}),
        ] {
            let t = table(r, &[obj], now(), IncludeObject::Metadata);
            assert_eq!(
                t["rows"][0]["cells"].as_array().unwrap().len(),
                t["columnDefinitions"].as_array().unwrap().len(),
                "{}",
                r.kind
            );
        }
    }
}

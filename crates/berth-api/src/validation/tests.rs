#![allow(clippy::unwrap_used)]

use rstest::rstest;
use serde_json::{Value, json};

use super::*;
use crate::resources::RESOURCES;

fn res(kind: &str) -> &'static Resource {
    RESOURCES.iter().find(|r| r.kind == kind).unwrap()
}

/// Defaults then validates, as the server does, and renders each error as Kubernetes would.
fn create(kind: &str, mut obj: Value) -> Vec<String> {
    crate::defaults::apply(res(kind), &mut obj);
    validate_create(res(kind), &obj)
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn update(kind: &str, mut new: Value, mut old: Value) -> Vec<String> {
    crate::defaults::apply(res(kind), &mut new);
    crate::defaults::apply(res(kind), &mut old);
    validate_update(res(kind), &new, &old)
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn pv() -> Value {
    json!({"metadata": {"name": "pv1"}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
        "csi": {"driver": "berth.csi.io", "volumeHandle": "vol-1"}}})
}

fn pvc() -> Value {
    json!({"metadata": {"name": "data", "namespace": "default"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
}

/// `base` with the value at `pointer` replaced (or added; removed when `v` is null).
fn with(mut base: Value, pointer: &str, v: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    match base.pointer_mut(parent).unwrap() {
        Value::Object(m) if v.is_null() => {
            m.remove(key);
        }
        Value::Object(m) => {
            m.insert(key.to_owned(), v);
        }
        Value::Array(a) => {
            let i: usize = key.parse().unwrap();
            if i == a.len() {
                a.push(v);
            } else {
                a[i] = v;
            }
        }
        _ => unreachable!(),
    }
    base
}

#[rstest]
#[case::valid(pv(), vec![])]
#[case::no_capacity(with(pv(), "/spec/capacity", Value::Null), vec!["spec.capacity: Required value"])]
#[case::capacity_zero(with(pv(), "/spec/capacity", json!({"storage": "0"})), vec!["spec.capacity[storage]: Invalid value: \"0\": must be greater than zero"])]
#[case::capacity_negative(with(pv(), "/spec/capacity", json!({"storage": "-1Gi"})), vec!["spec.capacity[storage]: Invalid value: -1073741824: must be a valid resource quantity", "spec.capacity[storage]: Invalid value: \"-1Gi\": must be greater than zero"])]
#[case::capacity_bad(with(pv(), "/spec/capacity", json!({"storage": "1Gb"})), vec!["spec.capacity[storage]: Invalid value: \"1Gb\": quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"])]
#[case::capacity_other_key(with(pv(), "/spec/capacity", json!({"cpu": "1"})), vec!["spec.capacity: Unsupported value: {\"cpu\":\"1\"}: supported values: \"storage\""])]
#[case::no_modes(with(pv(), "/spec/accessModes", json!([])), vec!["spec.accessModes: Required value"])]
#[case::bad_mode(with(pv(), "/spec/accessModes", json!(["ReadWriteSome"])), vec!["spec.accessModes: Unsupported value: \"ReadWriteSome\": supported values: \"ReadOnlyMany\", \"ReadWriteMany\", \"ReadWriteOnce\", \"ReadWriteOncePod\""])]
#[case::rwop_not_alone(with(pv(), "/spec/accessModes", json!(["ReadWriteOncePod", "ReadOnlyMany"])), vec!["spec.accessModes: Forbidden: may not use ReadWriteOncePod with other access modes"])]
#[case::no_source(with(pv(), "/spec/csi", Value::Null), vec!["spec: Required value: must specify a volume type"])]
#[case::two_sources(with(pv(), "/spec/hostPath", json!({"path": "/x"})), vec!["spec.csi: Forbidden: may not specify more than 1 volume type"])]
#[case::csi_fields(with(pv(), "/spec/csi", json!({"driver": "", "volumeHandle": ""})), vec!["spec.csi.driver: Required value", "spec.csi.driver: Invalid value: \"\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')", "spec.csi.volumeHandle: Required value"])]
#[case::reclaim(with(pv(), "/spec/persistentVolumeReclaimPolicy", json!("Keep")), vec!["spec.persistentVolumeReclaimPolicy: Unsupported value: \"Keep\": supported values: \"Delete\", \"Recycle\", \"Retain\""])]
#[case::local_needs_affinity(with(with(pv(), "/spec/csi", Value::Null), "/spec/local", json!({"path": "/mnt/d"})), vec!["spec.nodeAffinity: Required value: Local volume requires node affinity"])]
#[case::affinity_terms(with(pv(), "/spec/nodeAffinity", json!({"required": {"nodeSelectorTerms": []}})), vec!["spec.nodeAffinity.required.nodeSelectorTerms: Required value: must have at least one node selector term"])]
#[case::affinity_required(with(pv(), "/spec/nodeAffinity", json!({})), vec!["spec.nodeAffinity.required: Required value: must specify required node constraints"])]
#[case::name(with(pv(), "/metadata/name", json!("PV_1")), vec!["metadata.name: Invalid value: \"PV_1\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"])]
#[case::no_name(with(pv(), "/metadata", json!({})), vec!["metadata.name: Required value: name or generateName is required"])]
#[case::namespace_on_cluster_kind(with(pv(), "/metadata/namespace", json!("x")), vec!["metadata.namespace: Forbidden: not allowed on this type"])]
#[case::wrong_type(with(pv(), "/spec/accessModes", json!("ReadWriteOnce")), vec!["spec.accessModes: Invalid value: invalid type: string \"ReadWriteOnce\", expected a sequence"])]
fn persistent_volume_create(#[case] obj: Value, #[case] want: Vec<&str>) {
    assert_eq!(create("PersistentVolume", obj), want);
}

#[rstest]
#[case::valid(pvc(), vec![])]
#[case::no_modes(with(pvc(), "/spec/accessModes", Value::Null), vec!["spec.accessModes: Required value: at least 1 access mode is required"])]
#[case::no_storage(with(pvc(), "/spec/resources/requests", json!({})), vec!["spec.resources[storage]: Required value"])]
#[case::zero_storage(with(pvc(), "/spec/resources/requests/storage", json!("0")), vec!["spec.resources[storage]: Invalid value: \"0\": must be greater than zero"])]
#[case::no_namespace(with(pvc(), "/metadata/namespace", Value::Null), vec!["metadata.namespace: Required value"])]
#[case::bad_class(with(pvc(), "/spec/storageClassName", json!("Fast!")), vec!["spec.storageClassName: Invalid value: \"Fast!\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"])]
#[case::volume_mode(with(pvc(), "/spec/volumeMode", json!("Raw")), vec!["spec.volumeMode: Unsupported value: \"Raw\": supported values: \"Block\", \"Filesystem\""])]
#[case::data_source_kind(with(pvc(), "/spec/dataSource", json!({"kind": "Pod", "name": "x"})), vec!["spec.dataSource: Invalid value: \"Pod\": must be 'PersistentVolumeClaim' when referencing the default apiGroup", "spec.dataSourceRef: Invalid value: \"Pod\": must be 'PersistentVolumeClaim' when referencing the default apiGroup"])]
#[case::data_source_mismatch(with(with(pvc(), "/spec/dataSource", json!({"kind": "PersistentVolumeClaim", "name": "a"})), "/spec/dataSourceRef", json!({"kind": "PersistentVolumeClaim", "name": "b"})), vec!["spec: Invalid value: spec.dataSource: must match dataSourceRef"])]
#[case::snapshot_source(with(pvc(), "/spec/dataSourceRef", json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "s"})), vec![])]
#[case::selector(with(pvc(), "/spec/selector", json!({"matchExpressions": [{"key": "tier", "operator": "In"}]})), vec!["spec.selector.matchExpressions[0].values: Required value: must be specified when `operator` is 'In' or 'NotIn'"])]
#[case::label(with(pvc(), "/metadata/labels", json!({"app": "-x"})), vec!["metadata.labels: Invalid value: \"-x\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"])]
#[case::finalizer(with(pvc(), "/metadata/finalizers", json!(["pvc-protection"])), vec!["metadata.finalizers: Invalid value: \"pvc-protection\": name is neither a standard finalizer name nor is it fully qualified"])]
fn persistent_volume_claim_create(#[case] obj: Value, #[case] want: Vec<&str>) {
    assert_eq!(create("PersistentVolumeClaim", obj), want);
}

#[test]
fn annotations_total_size() {
    let obj = with(pvc(), "/metadata/annotations", json!({"a": "x".repeat(256 * 1024)}));
    assert_eq!(
        create("PersistentVolumeClaim", obj),
        vec!["metadata.annotations: Too long: may not be more than 262144 bytes"]
    );
}

fn bound(mut c: Value, req: &str, cap: &str) -> Value {
    c["spec"]["resources"]["requests"]["storage"] = json!(req);
    c["spec"]["volumeName"] = json!("pv1");
    c["status"] = json!({"phase": "Bound", "capacity": {"storage": cap}});
    c
}

#[rstest]
#[case::unchanged(bound(pvc(), "1Gi", "1Gi"), bound(pvc(), "1Gi", "1Gi"), vec![])]
#[case::grow_bound(bound(pvc(), "2Gi", "1Gi"), bound(pvc(), "1Gi", "1Gi"), vec![])]
#[case::shrink_to_capacity(bound(pvc(), "1Gi", "1Gi"), bound(pvc(), "2Gi", "1Gi"), vec!["spec.resources.requests.storage: Forbidden: field can not be less than status.capacity"])]
#[case::shrink_above_capacity(bound(pvc(), "2Gi", "1Gi"), bound(pvc(), "3Gi", "1Gi"), vec![])]
#[case::grow_unbound(with(pvc(), "/spec/resources/requests/storage", json!("2Gi")), pvc(), vec!["spec: Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims"])]
#[case::modes(with(bound(pvc(), "1Gi", "1Gi"), "/spec/accessModes", json!(["ReadWriteMany"])), bound(pvc(), "1Gi", "1Gi"), vec!["spec: Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims"])]
#[case::binder_sets_volume_name(with(pvc(), "/spec/volumeName", json!("pv1")), pvc(), vec![])]
#[case::retroactive_class(with(pvc(), "/spec/storageClassName", json!("standard")), pvc(), vec![])]
#[case::class_change(with(pvc(), "/spec/storageClassName", json!("b")), with(pvc(), "/spec/storageClassName", json!("a")), vec!["spec: Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims"])]
#[case::vac(with(pvc(), "/spec/volumeAttributesClassName", json!("gold")), pvc(), vec![])]
#[case::rename(with(pvc(), "/metadata/name", json!("other")), pvc(), vec!["metadata.name: Invalid value: \"other\": field is immutable"])]
fn persistent_volume_claim_update(#[case] new: Value, #[case] old: Value, #[case] want: Vec<&str>) {
    assert_eq!(update("PersistentVolumeClaim", new, old), want);
}

#[rstest]
#[case::claim_ref(with(pv(), "/spec/claimRef", json!({"name": "data", "namespace": "default"})), vec![])]
#[case::capacity(with(pv(), "/spec/capacity/storage", json!("2Gi")), vec![])]
#[case::source(with(pv(), "/spec/csi/volumeHandle", json!("vol-2")), vec!["spec.persistentvolumesource: Forbidden: spec.persistentvolumesource is immutable after creation"])]
#[case::mode(with(pv(), "/spec/volumeMode", json!("Block")), vec!["volumeMode: Invalid value: \"Block\": field is immutable"])]
fn persistent_volume_update(#[case] new: Value, #[case] want: Vec<&str>) {
    assert_eq!(update("PersistentVolume", new, pv()), want);
}

fn sc() -> Value {
    json!({"metadata": {"name": "fast"}, "provisioner": "berth.csi.io", "parameters": {"pool": "a"}})
}

#[rstest]
#[case::valid(sc(), vec![])]
#[case::no_provisioner(with(sc(), "/provisioner", json!("")), vec!["provisioner: Required value"])]
#[case::missing_provisioner(with(sc(), "/provisioner", Value::Null), vec!["provisioner: Required value"])]
#[case::reclaim(with(sc(), "/reclaimPolicy", json!("Recycle")), vec!["reclaimPolicy: Unsupported value: \"Recycle\": supported values: \"Delete\", \"Retain\""])]
#[case::binding(with(sc(), "/volumeBindingMode", json!("Later")), vec!["volumeBindingMode: Unsupported value: \"Later\": supported values: \"Immediate\", \"WaitForFirstConsumer\""])]
fn storage_class_create(#[case] obj: Value, #[case] want: Vec<&str>) {
    assert_eq!(create("StorageClass", obj), want);
}

#[rstest]
#[case::labels(with(sc(), "/metadata/labels", json!({"a": "b"})), vec![])]
#[case::expansion(with(sc(), "/allowVolumeExpansion", json!(true)), vec![])]
#[case::parameters(with(sc(), "/parameters/pool", json!("b")), vec!["parameters: Forbidden: updates to parameters are forbidden."])]
#[case::provisioner(with(sc(), "/provisioner", json!("other.csi")), vec!["provisioner: Forbidden: updates to provisioner are forbidden."])]
#[case::reclaim(with(sc(), "/reclaimPolicy", json!("Retain")), vec!["reclaimPolicy: Forbidden: updates to reclaimPolicy are forbidden."])]
#[case::binding(with(sc(), "/volumeBindingMode", json!("WaitForFirstConsumer")), vec!["volumeBindingMode: Invalid value: \"WaitForFirstConsumer\": field is immutable"])]
fn storage_class_update(#[case] new: Value, #[case] want: Vec<&str>) {
    assert_eq!(update("StorageClass", new, sc()), want);
}

fn pod() -> Value {
    json!({"metadata": {"name": "p", "namespace": "default"}, "spec": {
        "containers": [{"name": "app", "image": "busybox", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}})
}

#[rstest]
#[case::valid(pod(), vec![])]
#[case::no_containers(with(pod(), "/spec/containers", json!([])), vec!["spec.containers: Required value"])]
#[case::missing_containers(with(pod(), "/spec/containers", Value::Null), vec!["spec.containers: Required value"])]
#[case::no_image(with(pod(), "/spec/containers/0/image", json!("")), vec!["spec.containers[0].image: Required value"])]
#[case::missing_name(with(pod(), "/spec/containers/0/name", Value::Null), vec!["spec.containers[0].name: Required value"])]
#[case::claim_name(with(pod(), "/spec/volumes/0/persistentVolumeClaim/claimName", json!("")), vec!["spec.volumes[0].persistentVolumeClaim.claimName: Required value"])]
#[case::two_sources(with(pod(), "/spec/volumes/0/emptyDir", json!({})), vec!["spec.volumes[0].persistentVolumeClaim: Forbidden: may not specify more than 1 volume type"])]
#[case::dup_volume(with(pod(), "/spec/volumes/1", json!({"name": "data", "emptyDir": {}})), vec!["spec.volumes[1].name: Duplicate value: \"data\""])]
#[case::bad_volume_name(with(pod(), "/spec/volumes/0/name", json!("Data")), vec!["spec.volumes[0].name: Invalid value: \"Data\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')", "spec.containers[0].volumeMounts[0].name: Invalid value: \"data\": not found: no volume of this name in spec.volumes"])]
#[case::unknown_mount(with(pod(), "/spec/containers/0/volumeMounts/0/name", json!("other")), vec!["spec.containers[0].volumeMounts[0].name: Invalid value: \"other\": not found: no volume of this name in spec.volumes"])]
#[case::restart(with(pod(), "/spec/restartPolicy", json!("Sometimes")), vec!["spec.restartPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"Never\", \"OnFailure\""])]
fn pod_create(#[case] obj: Value, #[case] want: Vec<&str>) {
    assert_eq!(create("Pod", obj), want);
}

#[test]
fn pod_update_rules() {
    // Clients send back the stored (defaulted) object with their change.
    let mut stored = pod();
    crate::defaults::apply(res("Pod"), &mut stored);
    let image = with(stored.clone(), "/spec/containers/0/image", json!("busybox:2"));
    assert_eq!(update("Pod", image, stored), Vec::<String>::new());
    let node = with(pod(), "/spec/nodeName", json!("n1"));
    assert_eq!(update("Pod", node.clone(), pod()), Vec::<String>::new());
    let moved = with(node.clone(), "/spec/nodeName", json!("n2"));
    assert_eq!(update("Pod", moved, node).len(), 1);
    let vols = with(pod(), "/spec/volumes/0/persistentVolumeClaim/claimName", json!("other"));
    assert!(update("Pod", vols, pod())[0].starts_with("spec: Forbidden: pod updates may not change fields other than"));
}

#[rstest]
#[case::attacher(json!({"metadata": {"name": "csi-1"}, "spec": {"attacher": "", "nodeName": "n1", "source": {"persistentVolumeName": "pv1"}}}), vec!["spec.attacher: Required value", "spec.attacher: Required value", "spec.attacher: Invalid value: \"\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"])]
#[case::source(json!({"metadata": {"name": "csi-1"}, "spec": {"attacher": "berth.csi.io", "nodeName": "n1", "source": {}}}), vec!["spec.source: Required value: must specify exactly one of inlineVolumeSpec and persistentVolumeName"])]
#[case::valid(json!({"metadata": {"name": "csi-1"}, "spec": {"attacher": "berth.csi.io", "nodeName": "n1", "source": {"persistentVolumeName": "pv1"}}}), vec![])]
fn volume_attachment_create(#[case] obj: Value, #[case] want: Vec<&str>) {
    assert_eq!(create("VolumeAttachment", obj), want);
}

#[test]
fn volume_attachment_spec_is_immutable() {
    let old = json!({"metadata": {"name": "csi-1"}, "spec": {"attacher": "berth.csi.io", "nodeName": "n1", "source": {"persistentVolumeName": "pv1"}}});
    let new = with(old.clone(), "/spec/nodeName", json!("n2"));
    let errs = update("VolumeAttachment", new, old.clone());
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("spec: Invalid value: ") && errs[0].ends_with(": field is immutable"));
    let status = with(old.clone(), "/spec/attacher", json!("berth.csi.io"));
    assert!(update("VolumeAttachment", status, old).is_empty());
}

#[test]
fn csi_driver_rules() {
    let d = json!({"metadata": {"name": "berth.csi.io"}, "spec": {}});
    assert_eq!(create("CSIDriver", d.clone()), Vec::<String>::new());
    let bad = with(
        d.clone(),
        "/spec",
        json!({"fsGroupPolicy": "Some", "volumeLifecycleModes": ["Forever"]}),
    );
    assert_eq!(
        create("CSIDriver", bad),
        vec![
            "spec.fsGroupPolicy: Unsupported value: \"Some\": supported values: \"File\", \"None\", \"ReadWriteOnceWithFSType\"",
            "spec.volumeLifecycleModes: Unsupported value: \"Forever\": supported values: \"Persistent\", \"Ephemeral\""
        ]
    );
    let attach = with(d.clone(), "/spec", json!({"attachRequired": false}));
    assert_eq!(
        update("CSIDriver", attach, d.clone()),
        vec!["spec.attachedRequired: Invalid value: false: field is immutable"]
    );
    let pod_info = with(
        d.clone(),
        "/spec",
        json!({"podInfoOnMount": true, "storageCapacity": true}),
    );
    assert!(update("CSIDriver", pod_info, d).is_empty());
}

#[test]
fn csi_node_and_capacity() {
    let n = json!({"metadata": {"name": "n1"}, "spec": {"drivers": [{"name": "berth.csi.io", "nodeID": ""}, {"name": "berth.csi.io", "nodeID": "n1", "topologyKeys": ["topology.berth.io/node"]}]}});
    assert_eq!(
        create("CSINode", n),
        vec![
            "spec.drivers[0].nodeID: Required value",
            "spec.drivers[1].name: Duplicate value: \"berth.csi.io\""
        ]
    );
    let c =
        json!({"metadata": {"name": "c1", "namespace": "kube-system"}, "storageClassName": "fast", "capacity": "-1Gi"});
    assert_eq!(
        create("CSIStorageCapacity", c.clone()),
        vec!["capacity: Invalid value: \"-1Gi\": must be greater than or equal to 0"]
    );
    let ok = with(c.clone(), "/capacity", json!("10Gi"));
    let moved = with(ok.clone(), "/storageClassName", json!("slow"));
    assert_eq!(
        update("CSIStorageCapacity", moved, ok),
        vec!["storageClassName: Invalid value: \"slow\": field is immutable"]
    );
}

#[test]
fn secret_and_config_map() {
    let s =
        json!({"metadata": {"name": "s", "namespace": "d"}, "type": "kubernetes.io/tls", "data": {"bad key": "eA=="}});
    assert_eq!(
        create("Secret", s),
        vec![
            "data[bad key]: Invalid value: \"bad key\": a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
            "data[tls.key]: Required value",
            "data[tls.crt]: Required value"
        ]
    );
    let not_b64 = json!({"metadata": {"name": "s", "namespace": "d"}, "data": {"k": "***"}});
    let errs = create("Secret", not_b64);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("data.k: Invalid value: "), "{errs:?}");

    let old = json!({"metadata": {"name": "c", "namespace": "d"}, "immutable": true, "data": {"a": "1"}});
    let new = with(old.clone(), "/data/a", json!("2"));
    assert_eq!(
        update("ConfigMap", new, old.clone()),
        vec!["data: Forbidden: field is immutable when `immutable` is set"]
    );
    let unset = with(old.clone(), "/immutable", json!(false));
    assert_eq!(
        update("ConfigMap", unset, old),
        vec!["immutable: Forbidden: field is immutable when `immutable` is set"]
    );
    let ty = json!({"metadata": {"name": "s", "namespace": "d"}, "type": "Opaque"});
    let changed = with(ty.clone(), "/type", json!("kubernetes.io/basic-auth"));
    assert!(
        update("Secret", changed, ty)
            .contains(&"type: Invalid value: \"kubernetes.io/basic-auth\": field is immutable".to_owned())
    );
}

#[test]
fn namespace_name_is_a_label() {
    assert_eq!(
        create("Namespace", json!({"metadata": {"name": "a.b"}})),
        vec![
            "metadata.name: Invalid value: \"a.b\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        ]
    );
    assert!(create("Namespace", json!({"metadata": {"name": "team-a"}})).is_empty());
}

#[test]
fn event_namespace_must_match() {
    let e = json!({"metadata": {"name": "e.1", "namespace": "a"}, "involvedObject": {"kind": "Pod", "namespace": "b", "name": "p"}});
    assert_eq!(
        create("Event", e),
        vec!["involvedObject.namespace: Invalid value: \"b\": does not match event.namespace"]
    );
}

#[rstest]
#[case::valid(json!({"metadata": {"name": "s", "namespace": "d"}, "spec": {"source": {"persistentVolumeClaimName": "data"}}}), vec![])]
#[case::both(json!({"metadata": {"name": "s", "namespace": "d"}, "spec": {"source": {"persistentVolumeClaimName": "data", "volumeSnapshotContentName": "c"}}}), vec!["spec.source: Invalid value: \"object\": exactly one of volumeSnapshotContentName and persistentVolumeClaimName must be set"])]
#[case::neither(json!({"metadata": {"name": "s", "namespace": "d"}, "spec": {"source": {}}}), vec!["spec.source: Invalid value: \"object\": exactly one of volumeSnapshotContentName and persistentVolumeClaimName must be set"])]
#[case::no_spec(json!({"metadata": {"name": "s", "namespace": "d"}}), vec!["spec: Required value"])]
#[case::empty_class(json!({"metadata": {"name": "s", "namespace": "d"}, "spec": {"volumeSnapshotClassName": "", "source": {"persistentVolumeClaimName": "data"}}}), vec!["spec.volumeSnapshotClassName: Invalid value: \"\": volumeSnapshotClassName must not be the empty string when set"])]
#[case::wrong_type(json!({"metadata": {"name": "s", "namespace": "d"}, "spec": {"source": {"persistentVolumeClaimName": 5}}}), vec!["spec.source.persistentVolumeClaimName: Invalid value: invalid type: integer `5`, expected a string"])]
fn volume_snapshot_create(#[case] obj: Value, #[case] want: Vec<&str>) {
    assert_eq!(create("VolumeSnapshot", obj), want);
}

#[test]
fn volume_snapshot_source_is_immutable() {
    let old =
        json!({"metadata": {"name": "s", "namespace": "d"}, "spec": {"source": {"persistentVolumeClaimName": "a"}}});
    let new = with(old.clone(), "/spec/source/persistentVolumeClaimName", json!("b"));
    assert_eq!(
        update("VolumeSnapshot", new, old),
        vec!["spec.source.persistentVolumeClaimName: Invalid value: \"b\": persistentVolumeClaimName is immutable"]
    );
}

#[rstest]
#[case::valid(json!({"metadata": {"name": "snapcontent-1"}, "spec": {"deletionPolicy": "Delete", "driver": "berth.csi.io", "source": {"snapshotHandle": "h"}, "volumeSnapshotRef": {"name": "s", "namespace": "d"}}}), vec![])]
#[case::missing(json!({"metadata": {"name": "snapcontent-1"}, "spec": {"source": {"snapshotHandle": "h", "volumeHandle": "v"}, "volumeSnapshotRef": {"name": "s"}}}), vec![
    "spec.deletionPolicy: Required value", "spec.driver: Required value",
    "spec.source: Invalid value: \"object\": exactly one of volumeHandle and snapshotHandle must be set",
    "spec.volumeSnapshotRef: Invalid value: \"object\": both spec.volumeSnapshotRef.name and spec.volumeSnapshotRef.namespace must be set"])]
#[case::policy(json!({"metadata": {"name": "snapcontent-1"}, "spec": {"deletionPolicy": "Keep", "driver": "d", "source": {"snapshotHandle": "h"}, "volumeSnapshotRef": {"name": "s", "namespace": "d"}}}), vec!["spec.deletionPolicy: Unsupported value: \"Keep\": supported values: \"Delete\", \"Retain\""])]
fn volume_snapshot_content_create(#[case] obj: Value, #[case] want: Vec<&str>) {
    assert_eq!(create("VolumeSnapshotContent", obj), want);
}

#[test]
fn volume_snapshot_class_required() {
    assert_eq!(
        create("VolumeSnapshotClass", json!({"metadata": {"name": "c"}})),
        vec!["driver: Required value", "deletionPolicy: Required value"]
    );
    assert!(
        create(
            "VolumeSnapshotClass",
            json!({"metadata": {"name": "c"}, "driver": "d", "deletionPolicy": "Retain"})
        )
        .is_empty()
    );
}

#[test]
fn non_objects_do_not_panic() {
    for r in RESOURCES {
        for body in [
            json!(null),
            json!(1),
            json!("x"),
            json!([]),
            json!({"spec": 5}),
            json!({"metadata": []}),
        ] {
            let _ = validate_create(r, &body);
            let _ = validate_update(r, &body, &body);
            let _ = validate_status_update(r, &body, &body);
            let mut b = body.clone();
            crate::defaults::apply(r, &mut b);
        }
    }
}

#[test]
fn inline_volume_attachment_spec() {
    let va = json!({"metadata": {"name": "csi-1"}, "spec": {"attacher": "berth.csi.io", "nodeName": "n1",
        "source": {"inlineVolumeSpec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"},
                                        "persistentVolumeReclaimPolicy": "Delete",
                                        "csi": {"driver": "berth.csi.io", "volumeHandle": "v"}}}}});
    assert_eq!(
        create("VolumeAttachment", va),
        vec![
            "spec.source.inlineVolumeSpec.capacity: Forbidden: may not be specified in the context of inline volumes",
            "spec.source.inlineVolumeSpec.persistentVolumeReclaimPolicy: Forbidden: may only be Retain in the context of inline volumes",
        ]
    );
}

#[test]
fn persistent_volume_update_details() {
    let vac = with(pv(), "/spec/volumeAttributesClassName", json!("gold"));
    assert_eq!(
        update(
            "PersistentVolume",
            with(vac.clone(), "/spec/volumeAttributesClassName", Value::Null),
            vac
        ),
        vec!["spec.volumeAttributesClassName: Forbidden: update from non-nil value to nil is forbidden"]
    );
    let secret = with(
        pv(),
        "/spec/csi/controllerExpandSecretRef",
        json!({"name": "s", "namespace": "n"}),
    );
    assert_eq!(update("PersistentVolume", secret, pv()), Vec::<String>::new());
    let no_csi = with(
        with(pv(), "/spec/csi", Value::Null),
        "/spec/nfs",
        json!({"server": "s", "path": "/x"}),
    );
    assert_eq!(
        create(
            "PersistentVolume",
            with(no_csi, "/spec/volumeAttributesClassName", json!("gold"))
        ),
        vec!["spec.csi: Required value: has to be specified when using volumeAttributesClassName"]
    );
}

#[test]
fn persistent_volume_claim_update_details() {
    let block = with(pvc(), "/spec/volumeMode", json!("Block"));
    let errs = update("PersistentVolumeClaim", block, pvc());
    assert!(
        errs.contains(&"volumeMode: Invalid value: \"Block\": field is immutable".to_owned()),
        "{errs:?}"
    );
    let beta = with(
        pvc(),
        "/metadata/annotations",
        json!({"volume.beta.kubernetes.io/storage-class": "old"}),
    );
    // Upgrading from the beta annotation to the field, with the same class, is allowed.
    assert!(
        update(
            "PersistentVolumeClaim",
            with(beta.clone(), "/spec/storageClassName", json!("old")),
            beta.clone()
        )
        .is_empty()
    );
    let other = with(beta.clone(), "/spec/storageClassName", json!("new"));
    assert!(!update("PersistentVolumeClaim", other, beta).is_empty());
}

#[test]
fn new_style_events_need_reporting_fields() {
    let e = json!({"metadata": {"name": "e.1", "namespace": "default"}, "eventTime": "2024-05-01T12:00:00.000000Z",
                   "involvedObject": {"kind": "PersistentVolume", "name": "pv1"}, "reason": "Bound", "type": "Normal"});
    assert_eq!(
        create("Event", e.clone()),
        vec![
            "reportingController: Required value",
            "reportingController: Invalid value: \"\": name part must be non-empty",
            "reportingInstance: Required value",
            "action: Required value"
        ]
    );
    let ok = with(
        with(
            with(e, "/reportingComponent", json!("berth.io/binder")),
            "/reportingInstance",
            json!("n1"),
        ),
        "/action",
        json!("Binding"),
    );
    assert!(create("Event", ok).is_empty());
    // Legacy events are not held to object-name rules, as in Kubernetes.
    let legacy = json!({"metadata": {"name": "Data.17", "namespace": "default"}, "involvedObject": {"kind": "PersistentVolume", "name": "pv1"}});
    assert!(create("Event", legacy).is_empty());
}

mod never_panics {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use crate::admission::{self, Lookup, Operation};
    use crate::printing::{self, IncludeObject};
    use crate::resources::RESOURCES;

    struct NoClasses;

    impl Lookup for NoClasses {
        fn storage_classes(&self) -> Vec<Value> {
            vec![
                json!({"metadata": {"name": "x", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}}}),
                json!(5),
            ]
        }
    }

    /// JSON whose keys are the field names the rules look at, so the rules are exercised on
    /// every shape, not just rejected at the first missing field.
    fn arb_object() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            prop::sample::select(vec![
                "",
                "1Gi",
                "-1",
                "x",
                "ReadWriteOnce",
                "Bound",
                "a/b/c",
                "Block",
                "In",
                "true",
                "kubernetes.io/tls"
            ])
            .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "metadata",
                        "name",
                        "namespace",
                        "labels",
                        "finalizers",
                        "spec",
                        "status",
                        "capacity",
                        "storage",
                        "accessModes",
                        "csi",
                        "driver",
                        "volumeHandle",
                        "resources",
                        "requests",
                        "containers",
                        "volumes",
                        "volumeMounts",
                        "persistentVolumeClaim",
                        "claimName",
                        "source",
                        "phase",
                        "nodeAffinity",
                        "required",
                        "nodeSelectorTerms",
                        "matchExpressions",
                        "operator",
                        "values",
                        "key",
                        "data",
                        "type",
                        "immutable",
                        "selector",
                        "dataSource",
                        "dataSourceRef",
                        "kind",
                        "apiGroup",
                        "drivers",
                        "nodeID",
                        "eventTime",
                        "involvedObject",
                        "provisioner",
                        "parameters",
                        "allowedTopologies",
                        "matchLabelExpressions",
                        "persistentVolumeName",
                        "inlineVolumeSpec",
                        "volumeSnapshotRef",
                        "deletionPolicy",
                        "creationTimestamp",
                        "deletionTimestamp",
                        "annotations",
                        "hostPath",
                        "path",
                        "local",
                        "emptyDir",
                        "ephemeral",
                        "volumeClaimTemplate",
                        "initContainerStatuses",
                        "containerStatuses",
                        "state",
                        "terminated",
                    ]),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn every_entry_point_survives_any_body(a in arb_object(), b in arb_object()) {
            let now: jiff::Timestamp = "2024-05-01T12:00:00Z".parse().unwrap();
            for r in RESOURCES {
                let mut new = a.clone();
                let mut old = b.clone();
                crate::defaults::apply(r, &mut new);
                crate::defaults::apply(r, &mut old);
                let _ = super::validate_create(r, &new);
                let _ = super::validate_update(r, &new, &old);
                let _ = super::validate_status_update(r, &new, &old);
                // A spec+status write finds what the two separate checks find.
                let render = |errs: Vec<crate::FieldError>| {
                    let mut v: Vec<String> = errs.iter().map(ToString::to_string).collect();
                    v.sort();
                    v.dedup();
                    v
                };
                let mut separate = super::validate_update(r, &new, &old);
                separate.extend(super::validate_status_update(r, &new, &old));
                prop_assert_eq!(render(super::validate_update_all(r, &new, &old)), render(separate));
                // A typed object's encoding skips only the type check: for a body that decodes,
                // the same errors; for one that does not, the rules still run without panicking.
                for part in [super::UpdatePart::Main, super::UpdatePart::Status, super::UpdatePart::Both] {
                    let known = super::validate_update_of(r, part, &new, &old, super::Decodes::Known);
                    if super::decode_kind(r, &new).is_ok() {
                        let unknown = super::validate_update_of(r, part, &new, &old, super::Decodes::Unknown);
                        prop_assert_eq!(render(known), render(unknown));
                    }
                }
                for op in [Operation::Create, Operation::Update, Operation::UpdateStatus] {
                    let mut obj = new.clone();
                    let _ = admission::admit(r, op, &mut obj, Some(&old), &NoClasses);
                }
                let _ = printing::table(r, &[new.clone(), old.clone()], now, IncludeObject::Object);
            }
        }
    }
}

#[rstest]
#[case("PersistentVolumeClaim", json!({"metadata": {"name": "a", "labels": {"x": "y"}}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClas": "x",
    "resources": {"requests": {"storage": "1Gi"}, "limit": {}}, "selector": null}}), vec!["spec.resources.limit", "spec.storageClas"])]
#[case("Pod", json!({"spec": {"containers": [{"name": "a", "image": "x", "imagePullPolicyy": "Always"}], "volumes": [{"name": "v", "emptyDir": {}}]}}),
    vec!["spec.containers[0].imagePullPolicyy"])]
#[case("StorageClass", json!({"metadata": {"name": "a"}, "provisioner": "p", "reclaimpolicy": "Delete"}), vec!["reclaimpolicy"])]
#[case("VolumeSnapshot", json!({"metadata": {"name": "a"}, "spec": {"source": {"pvc": "x"}}, "status": {"readyToUse": true}}), vec!["spec.source.pvc"])]
#[case("Secret", json!({"metadata": {"name": "a"}, "data": {"k": "eA=="}, "type": "Opaque"}), vec![])]
fn strict_field_validation(#[case] kind: &str, #[case] obj: Value, #[case] want: Vec<&str>) {
    assert_eq!(unknown_fields(res(kind), &obj), want);
}

#[test]
fn well_formed_objects_have_no_unknown_fields() {
    let mut defaulted_pod = pod();
    crate::defaults::apply(res("Pod"), &mut defaulted_pod);
    for (kind, obj) in [
        ("PersistentVolume", pv()),
        ("PersistentVolumeClaim", bound(pvc(), "1Gi", "1Gi")),
        ("Pod", defaulted_pod),
        ("StorageClass", sc()),
        (
            "Namespace",
            json!({"metadata": {"name": "n", "labels": {}}, "spec": {"finalizers": []}, "status": {"phase": "Active"}}),
        ),
        (
            "VolumeSnapshotContent",
            json!({"metadata": {"name": "c"}, "spec": {"deletionPolicy": "Delete", "driver": "d",
            "source": {"snapshotHandle": "h"}, "volumeSnapshotRef": {"name": "s", "namespace": "n"}},
            "status": {"creationTime": 1, "restoreSize": 2, "readyToUse": true, "snapshotHandle": "h"}}),
        ),
    ] {
        assert_eq!(unknown_fields(res(kind), &obj), Vec::<String>::new(), "{kind}");
    }
}

#[test]
fn invalid_status_like_kubernetes() {
    let errs = validate_create(
        res("PersistentVolumeClaim"),
        &json!({"metadata": {"name": "data", "namespace": "d"}, "spec": {}}),
    );
    let st = invalid_status(res("PersistentVolumeClaim"), "data", &errs);
    assert_eq!(
        st["message"],
        "PersistentVolumeClaim \"data\" is invalid: [spec.accessModes: Required value: at least 1 access mode is required, spec.resources[storage]: Required value]"
    );
    assert_eq!(st["code"], 422);
    assert_eq!(
        st["details"]["causes"][1],
        json!({"reason": "FieldValueRequired", "message": "Required value", "field": "spec.resources[storage]"})
    );
    let one = validate_create(
        res("StorageClass"),
        &json!({"metadata": {"name": "fast"}, "provisioner": "", "volumeBindingMode": "Immediate"}),
    );
    let st = invalid_status(res("StorageClass"), "fast", &one);
    assert_eq!(
        st["message"],
        "StorageClass.storage.k8s.io \"fast\" is invalid: provisioner: Required value"
    );
    assert_eq!(st["details"]["group"], "storage.k8s.io");
}

#[test]
fn storage_class_allowed_topologies() {
    let zones = |v: Value| with(sc(), "/allowedTopologies", v);
    assert!(
        create(
            "StorageClass",
            zones(json!([{"matchLabelExpressions": [{"key": "topology.berth.io/node", "values": ["n1", "n2"]}]}, {}]))
        )
        .is_empty()
    );
    assert_eq!(
        create(
            "StorageClass",
            zones(
                json!([{"matchLabelExpressions": [{"key": "zone", "values": []}, {"key": "zone", "values": ["a", "a"]}]}])
            )
        ),
        vec![
            "allowedTopologies[0].matchLabelExpressions[0].values: Required value",
            "allowedTopologies[0].matchLabelExpressions[1].values[1]: Duplicate value: \"a\"",
            "allowedTopologies[0].matchLabelExpressions[1].key: Duplicate value: \"zone\"",
        ]
    );
    assert_eq!(
        create(
            "StorageClass",
            zones(
                json!([{"matchLabelExpressions": [{"key": "z", "values": ["a"]}]}, {"matchLabelExpressions": [{"key": "z", "values": ["a"]}]}])
            )
        ),
        vec!["allowedTopologies[1].matchLabelExpressions: Duplicate value: \"\""]
    );
}

#[test]
fn pod_update_narrow_fields() {
    let mut stored = pod();
    crate::defaults::apply(res("Pod"), &mut stored);
    let more = with(
        stored.clone(),
        "/spec/tolerations",
        json!([{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "Exists"}]),
    );
    let base = with(
        stored.clone(),
        "/spec/tolerations",
        json!([{"key": "a", "operator": "Exists"}]),
    );
    assert!(
        update("Pod", more.clone(), base.clone()).is_empty(),
        "adding a toleration"
    );
    assert_eq!(update("Pod", base, more).len(), 1, "removing one");
    let deadline = with(stored.clone(), "/spec/activeDeadlineSeconds", json!(60));
    assert!(
        update("Pod", deadline.clone(), stored.clone()).is_empty(),
        "setting a deadline"
    );
    assert!(
        update(
            "Pod",
            with(deadline.clone(), "/spec/activeDeadlineSeconds", json!(30)),
            deadline.clone()
        )
        .is_empty()
    );
    assert_eq!(
        update(
            "Pod",
            with(deadline.clone(), "/spec/activeDeadlineSeconds", json!(90)),
            deadline
        )
        .len(),
        1,
        "raising it"
    );
    assert_eq!(
        update(
            "Pod",
            with(stored.clone(), "/spec/terminationGracePeriodSeconds", json!(5)),
            stored
        )
        .len(),
        1
    );
}

#[rstest]
#[case("pvc-", true)]
#[case("data-", true)]
#[case("x.", false)]
#[case("Bad-", false)]
#[case("é-", false)]
#[case("-", false)]
fn generate_name_prefixes(#[case] prefix: &str, #[case] ok: bool) {
    let obj = with(
        with(pvc(), "/metadata/generateName", json!(prefix)),
        "/metadata/name",
        json!("data-abcde"),
    );
    assert_eq!(create("PersistentVolumeClaim", obj).is_empty(), ok, "{prefix}");
}

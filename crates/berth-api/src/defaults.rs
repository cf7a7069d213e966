//! Defaulting, as the Kubernetes API server does before validation (the `SetDefaults_*`
//! functions of `pkg/apis/*/v1` plus the create-time parts of each kind's strategy): for example a
//! PV's `persistentVolumeReclaimPolicy` (Retain) and `volumeMode` (Filesystem), a StorageClass's
//! `reclaimPolicy` (Delete) and `volumeBindingMode` (Immediate).
//!
//! Only fills what is missing, never overwrites a value the client set, so it is idempotent and
//! safe to run on updates too. Bodies of the wrong shape are left alone for validation to report.

use serde_json::{Map, Value, json};

use crate::Resource;

/// Fills in the defaults of `obj`, an object of kind `res`, in place.
pub fn apply(res: &Resource, obj: &mut Value) {
    if !obj.is_object() {
        return;
    }
    canonical_quantities(res.kind, obj);
    match res.kind {
        "PersistentVolume" => persistent_volume(obj),
        "PersistentVolumeClaim" => persistent_volume_claim(obj),
        "StorageClass" => {
            set(obj, &["reclaimPolicy"], json!("Delete"));
            set(obj, &["volumeBindingMode"], json!("Immediate"));
        }
        "CSIDriver" => {
            for (k, v) in [
                ("attachRequired", json!(true)),
                ("podInfoOnMount", json!(false)),
                ("volumeLifecycleModes", json!(["Persistent"])),
                ("fsGroupPolicy", json!("ReadWriteOnceWithFSType")),
                ("requiresRepublish", json!(false)),
                ("storageCapacity", json!(false)),
                ("seLinuxMount", json!(false)),
            ] {
                set(obj, &["spec", k], v);
            }
        }
        "Pod" => pod(obj),
        "Namespace" => {
            set(obj, &["spec", "finalizers"], json!(["kubernetes"]));
            set(obj, &["status", "phase"], json!("Active"));
            // Always the namespace's own name, whatever the client sent (SetDefaults_Namespace).
            if let Some(name) = obj.pointer("/metadata/name").and_then(Value::as_str).map(str::to_owned) {
                set(obj, &["metadata", "labels"], json!({}));
                if let Some(labels) = obj.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
                    labels.insert("kubernetes.io/metadata.name".to_owned(), json!(name));
                }
            }
        }
        "Secret" => secret(obj),
        "Node" => {
            if let Some(cap) = obj.pointer("/status/capacity").cloned() {
                set(obj, &["status", "allocatable"], cap);
            }
        }
        _ => {}
    }
}

/// Rewrites every quantity of the kind in Kubernetes' canonical form (`1024Mi` -> `1Gi`, a JSON
/// number -> its string), as Kubernetes stores and returns them. Values that do not parse are
/// left as they are, for validation to report.
fn canonical_quantities(kind: &str, obj: &mut Value) {
    fn scalar(v: Option<&mut Value>) {
        if let Some(v) = v
            && let Ok(q) = crate::quantity::from_json(v)
        {
            *v = Value::String(q.canonical());
        }
    }
    fn map(v: Option<&mut Value>) {
        if let Some(m) = v.and_then(Value::as_object_mut) {
            for q in m.values_mut() {
                scalar(Some(q));
            }
        }
    }
    fn resources(v: Option<&mut Value>) {
        if let Some(r) = v {
            map(r.get_mut("requests"));
            map(r.get_mut("limits"));
        }
    }
    match kind {
        "PersistentVolume" => map(obj.pointer_mut("/spec/capacity")),
        "PersistentVolumeClaim" => {
            resources(obj.pointer_mut("/spec/resources"));
            map(obj.pointer_mut("/status/capacity"));
            map(obj.pointer_mut("/status/allocatedResources"));
        }
        "Pod" => {
            for list in ["containers", "initContainers"] {
                if let Some(cs) = obj.pointer_mut(&format!("/spec/{list}")).and_then(Value::as_array_mut) {
                    for c in cs {
                        resources(c.get_mut("resources"));
                    }
                }
            }
            map(obj.pointer_mut("/spec/overhead"));
            if let Some(vs) = obj.pointer_mut("/spec/volumes").and_then(Value::as_array_mut) {
                for v in vs {
                    scalar(v.pointer_mut("/emptyDir/sizeLimit"));
                    resources(v.pointer_mut("/ephemeral/volumeClaimTemplate/spec/resources"));
                }
            }
        }
        "Node" => {
            map(obj.pointer_mut("/status/capacity"));
            map(obj.pointer_mut("/status/allocatable"));
        }
        "CSIStorageCapacity" => {
            scalar(obj.get_mut("capacity"));
            scalar(obj.get_mut("maximumVolumeSize"));
        }
        "VolumeSnapshot" => scalar(obj.pointer_mut("/status/restoreSize")),
        _ => {}
    }
}

/// Sets `path` to `value` unless something non-null is already there; creates objects on the
/// way. Does nothing if a step on the way is not an object.
fn set(obj: &mut Value, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for p in parents {
        let Some(m) = cur.as_object_mut() else {
            return;
        };
        let next = m.entry(*p).or_insert_with(|| Value::Object(Map::new()));
        if next.is_null() {
            *next = Value::Object(Map::new());
        }
        cur = next;
    }
    if let Some(m) = cur.as_object_mut() {
        let slot = m.entry(*last).or_insert(Value::Null);
        if slot.is_null() {
            *slot = value;
        }
    }
}

fn persistent_volume(obj: &mut Value) {
    set(obj, &["spec", "persistentVolumeReclaimPolicy"], json!("Retain"));
    set(obj, &["spec", "volumeMode"], json!("Filesystem"));
    set(obj, &["status", "phase"], json!("Pending"));
    if obj.pointer("/spec/hostPath").is_some_and(Value::is_object) {
        set(obj, &["spec", "hostPath", "type"], json!(""));
    }
}

fn persistent_volume_claim(obj: &mut Value) {
    set(obj, &["spec", "volumeMode"], json!("Filesystem"));
    set(obj, &["status", "phase"], json!("Pending"));
    claim_data_sources(obj.pointer_mut("/spec"));
}

/// `EnsureDataSourceAndDataSourceRef`: dataSource and dataSourceRef mirror each other when only
/// one is given (and dataSourceRef has no namespace).
fn claim_data_sources(spec: Option<&mut Value>) {
    let Some(spec) = spec.and_then(Value::as_object_mut) else {
        return;
    };
    let ds = spec.get("dataSource").filter(|v| v.is_object()).cloned();
    let dsr = spec.get("dataSourceRef").filter(|v| v.is_object()).cloned();
    match (ds, dsr) {
        (Some(ds), None) => {
            spec.insert("dataSourceRef".to_owned(), ds);
        }
        (None, Some(dsr)) if dsr.get("namespace").and_then(Value::as_str).unwrap_or("").is_empty() => {
            let mut ds = dsr;
            if let Some(m) = ds.as_object_mut() {
                m.remove("namespace");
            }
            spec.insert("dataSource".to_owned(), ds);
        }
        _ => {}
    }
}

/// `IfNotPresent` for a digest or a tag other than `latest`, else `Always`.
pub fn image_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, tag)) if tag != "latest" => "IfNotPresent",
        _ => "Always",
    }
}

fn pod(obj: &mut Value) {
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("dnsPolicy", json!("ClusterFirst")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("schedulerName", json!("default-scheduler")),
        ("securityContext", json!({})),
        ("enableServiceLinks", json!(true)),
    ] {
        set(obj, &["spec", k], v);
    }
    set(obj, &["status", "phase"], json!("Pending"));
    for list in ["containers", "initContainers"] {
        let Some(cs) = obj.pointer_mut(&format!("/spec/{list}")).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in cs.iter_mut().filter(|c| c.is_object()) {
            set(c, &["terminationMessagePath"], json!("/dev/termination-log"));
            set(c, &["terminationMessagePolicy"], json!("File"));
            set(c, &["resources"], json!({}));
            // Requests default to limits, per resource.
            if let Some(limits) = c.pointer("/resources/limits").and_then(Value::as_object).cloned() {
                for (k, v) in limits {
                    set(c, &["resources", "requests", &k], v);
                }
            }
            if let Some(img) = c.get("image").and_then(Value::as_str) {
                let policy = image_pull_policy(img);
                set(c, &["imagePullPolicy"], json!(policy));
            }
            if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter(|p| p.is_object()) {
                    set(p, &["protocol"], json!("TCP"));
                }
            }
        }
    }
    if obj.pointer("/status/qosClass").is_none() {
        let qos = pod_qos_class(obj);
        set(obj, &["status", "qosClass"], json!(qos));
    }
    let Some(vols) = obj.pointer_mut("/spec/volumes").and_then(Value::as_array_mut) else {
        return;
    };
    for v in vols.iter_mut() {
        let Some(m) = v.as_object_mut() else {
            continue;
        };
        // A volume with no source is an emptyDir.
        if m.keys().all(|k| k == "name") {
            m.insert("emptyDir".to_owned(), json!({}));
        }
        for key in ["secret", "configMap", "downwardAPI", "projected"] {
            if let Some(src) = m.get_mut(key).filter(|s| s.is_object()) {
                set(src, &["defaultMode"], json!(420));
            }
        }
        if v.get("hostPath").is_some_and(Value::is_object) {
            set(v, &["hostPath", "type"], json!(""));
        }
        if let Some(spec) = v
            .pointer_mut("/ephemeral/volumeClaimTemplate/spec")
            .filter(|s| s.is_object())
        {
            set(spec, &["volumeMode"], json!("Filesystem"));
            claim_data_sources(Some(spec));
        }
    }
}

/// `GetPodQOS`: BestEffort without any cpu/memory request or limit; Guaranteed when every
/// container limits both and requests equal limits; Burstable otherwise.
pub fn pod_qos_class(pod: &Value) -> &'static str {
    let positive = |v: &Value| crate::quantity::from_json(v).is_ok_and(|q| q.nanos() > 0);
    let mut requests: std::collections::BTreeMap<&str, i128> = Default::default();
    let mut limits: std::collections::BTreeMap<&str, i128> = Default::default();
    let mut guaranteed = true;
    for list in ["initContainers", "containers"] {
        let containers = pod.pointer(&format!("/spec/{list}")).and_then(Value::as_array);
        for c in containers.into_iter().flatten() {
            for res in ["cpu", "memory"] {
                if let Some(q) = c.pointer(&format!("/resources/requests/{res}")).filter(|q| positive(q)) {
                    let n = crate::quantity::from_json(q).map(|q| q.nanos()).unwrap_or(0);
                    *requests.entry(res).or_default() += n;
                }
            }
            let mut found = 0;
            for res in ["cpu", "memory"] {
                if let Some(q) = c.pointer(&format!("/resources/limits/{res}")).filter(|q| positive(q)) {
                    let n = crate::quantity::from_json(q).map(|q| q.nanos()).unwrap_or(0);
                    *limits.entry(res).or_default() += n;
                    found += 1;
                }
            }
            if found < 2 {
                guaranteed = false;
            }
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return "BestEffort";
    }
    if guaranteed && requests == limits {
        return "Guaranteed";
    }
    "Burstable"
}

fn secret(obj: &mut Value) {
    set(obj, &["type"], json!("Opaque"));
    // stringData is write-only: it is merged into data (winning over it) and dropped.
    let Some(m) = obj.as_object_mut() else {
        return;
    };
    let Some(Value::Object(sd)) = m.remove("stringData") else {
        return;
    };
    let data = m.entry("data").or_insert_with(|| Value::Object(Map::new()));
    if data.is_null() {
        *data = Value::Object(Map::new());
    }
    if let Some(d) = data.as_object_mut() {
        for (k, v) in sd {
            if let Some(s) = v.as_str() {
                d.insert(k, Value::String(base64(s.as_bytes())));
            }
        }
    }
}

/// Standard base64 with padding (RFC 4648), as Kubernetes encodes `[]byte` in JSON.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::by_kind;
    use rstest::rstest;

    fn res(kind: &str) -> &'static Resource {
        crate::resources::RESOURCES.iter().find(|r| r.kind == kind).unwrap()
    }

    #[test]
    fn persistent_volume() {
        let mut pv =
            json!({"metadata": {"name": "pv1"}, "spec": {"capacity": {"storage": "1Gi"}, "hostPath": {"path": "/x"}}});
        apply(res("PersistentVolume"), &mut pv);
        assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(pv["spec"]["volumeMode"], "Filesystem");
        assert_eq!(pv["spec"]["hostPath"]["type"], "");
        assert_eq!(pv["status"]["phase"], "Pending");
    }

    #[test]
    fn quantities_are_canonical() {
        let mut pvc = json!({"spec": {"resources": {"requests": {"storage": "1024Mi"}, "limits": {"storage": 2147483648u64}}},
                             "status": {"capacity": {"storage": "1Gb"}}});
        apply(res("PersistentVolumeClaim"), &mut pvc);
        assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "1Gi");
        assert_eq!(pvc["spec"]["resources"]["limits"]["storage"], "2147483648");
        assert_eq!(
            pvc["status"]["capacity"]["storage"], "1Gb",
            "invalid values are left for validation"
        );
        let mut pod = json!({"spec": {"containers": [{"name": "c", "image": "x", "resources": {"requests": {"cpu": "0.5"}}}],
                                      "volumes": [{"name": "t", "emptyDir": {"sizeLimit": "1000M"}}]}});
        apply(res("Pod"), &mut pod);
        assert_eq!(pod["spec"]["containers"][0]["resources"]["requests"]["cpu"], "500m");
        assert_eq!(pod["spec"]["volumes"][0]["emptyDir"]["sizeLimit"], "1G");
    }

    #[test]
    fn keeps_what_the_client_set() {
        let mut pv = json!({"spec": {"persistentVolumeReclaimPolicy": "Delete", "volumeMode": "Block"}, "status": {"phase": "Bound"}});
        apply(res("PersistentVolume"), &mut pv);
        assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete");
        assert_eq!(pv["spec"]["volumeMode"], "Block");
        assert_eq!(pv["status"]["phase"], "Bound");
    }

    #[test]
    fn idempotent_for_every_kind() {
        for r in crate::resources::RESOURCES {
            let mut v = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "busybox"}], "volumes": [{"name": "v"}]}});
            apply(r, &mut v);
            let once = v.clone();
            apply(r, &mut v);
            assert_eq!(v, once, "{}", r.kind);
        }
    }

    #[test]
    fn claim_and_class_and_driver() {
        let mut pvc = json!({"spec": {"dataSource": {"kind": "PersistentVolumeClaim", "name": "src"}}});
        apply(res("PersistentVolumeClaim"), &mut pvc);
        assert_eq!(pvc["spec"]["volumeMode"], "Filesystem");
        assert_eq!(pvc["status"]["phase"], "Pending");
        assert_eq!(pvc["spec"]["dataSourceRef"]["name"], "src");

        let mut sc = json!({"provisioner": "berth.csi"});
        apply(by_kind("storage.k8s.io/v1", "StorageClass").unwrap(), &mut sc);
        assert_eq!(sc["reclaimPolicy"], "Delete");
        assert_eq!(sc["volumeBindingMode"], "Immediate");

        let mut d = json!({"metadata": {"name": "berth.csi"}});
        apply(res("CSIDriver"), &mut d);
        assert_eq!(
            d["spec"],
            json!({"attachRequired": true, "podInfoOnMount": false, "volumeLifecycleModes": ["Persistent"],
                   "fsGroupPolicy": "ReadWriteOnceWithFSType", "requiresRepublish": false, "storageCapacity": false,
                   "seLinuxMount": false})
        );
    }

    #[test]
    fn pod_defaults() {
        let mut pod = json!({"spec": {"containers": [{"name": "c", "image": "nginx:1.27"}, {"name": "d", "image": "busybox"}],
                                       "volumes": [{"name": "scratch"}, {"name": "s", "secret": {"secretName": "x"}}]}});
        apply(res("Pod"), &mut pod);
        let s = &pod["spec"];
        assert_eq!(s["restartPolicy"], "Always");
        assert_eq!(s["dnsPolicy"], "ClusterFirst");
        assert_eq!(s["terminationGracePeriodSeconds"], 30);
        assert_eq!(s["schedulerName"], "default-scheduler");
        assert_eq!(s["containers"][0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(s["containers"][1]["imagePullPolicy"], "Always");
        assert_eq!(s["containers"][0]["terminationMessagePath"], "/dev/termination-log");
        assert_eq!(s["containers"][0]["terminationMessagePolicy"], "File");
        assert_eq!(s["volumes"][0]["emptyDir"], json!({}));
        assert_eq!(s["volumes"][1]["secret"]["defaultMode"], 420);
    }

    #[rstest]
    #[case::best_effort(json!([{"name": "a"}]), "BestEffort")]
    #[case::guaranteed_from_limits(json!([{"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]), "Guaranteed")]
    #[case::burstable(json!([{"name": "a", "resources": {"requests": {"cpu": "100m"}}}]), "Burstable")]
    #[case::unequal(json!([{"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}}}]), "Burstable")]
    #[case::one_container_unlimited(json!([{"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}, {"name": "b"}]), "Burstable")]
    fn qos_classes(#[case] containers: Value, #[case] want: &str) {
        let mut pod = json!({"spec": {"containers": containers}});
        apply(res("Pod"), &mut pod);
        assert_eq!(pod["status"]["qosClass"], want);
    }

    #[rstest]
    #[case("busybox", "Always")]
    #[case("busybox:latest", "Always")]
    #[case("busybox:1.36", "IfNotPresent")]
    #[case("localhost:5000/busybox", "Always")]
    #[case("localhost:5000/busybox:1", "IfNotPresent")]
    #[case("busybox@sha256:abcd", "IfNotPresent")]
    fn pull_policy(#[case] image: &str, #[case] want: &str) {
        assert_eq!(image_pull_policy(image), want);
    }

    #[test]
    fn namespace_and_secret() {
        let mut ns = json!({"metadata": {"name": "team"}});
        apply(res("Namespace"), &mut ns);
        assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
        assert_eq!(ns["status"]["phase"], "Active");
        assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "team");
        let mut spoofed =
            json!({"metadata": {"name": "team", "labels": {"kubernetes.io/metadata.name": "other", "a": "b"}}});
        apply(res("Namespace"), &mut spoofed);
        assert_eq!(
            spoofed["metadata"]["labels"],
            json!({"kubernetes.io/metadata.name": "team", "a": "b"})
        );

        let mut s = json!({"metadata": {"name": "s"}, "data": {"a": "eA=="}, "stringData": {"a": "hello", "b": "hi!"}});
        apply(res("Secret"), &mut s);
        assert_eq!(s["type"], "Opaque");
        assert_eq!(s["data"], json!({"a": "aGVsbG8=", "b": "aGkh"}));
        assert!(s.get("stringData").is_none());
    }

    #[test]
    fn base64_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}

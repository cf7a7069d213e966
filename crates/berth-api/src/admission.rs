//! Admission, after validation: the default StorageClass for claims without a class, the PVC
//! resize rules, and the `kubernetes.io/pvc-protection` / `kubernetes.io/pv-protection`
//! finalizers. Pure: what it needs to know about other objects comes through [`Lookup`].
//!
//! These are Kubernetes' `DefaultStorageClass`, `PersistentVolumeClaimResize` and
//! `StorageObjectInUseProtection` plugins with their decisions and messages. Each mutation is
//! idempotent (admitting an admitted object changes nothing).

use serde_json::Value;

use crate::Resource;
use crate::printing::is_default_class;
use crate::quantity;

/// What admission may read of the rest of the store.
pub trait Lookup {
    /// Every StorageClass, as stored.
    fn storage_classes(&self) -> Vec<Value>;
}

/// The operation being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    /// An update through the `status` subresource.
    UpdateStatus,
}

/// Why admission refused a request: the HTTP status (403 Forbidden, 422) and Kubernetes' message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

pub const PVC_PROTECTION_FINALIZER: &str = "kubernetes.io/pvc-protection";
pub const PV_PROTECTION_FINALIZER: &str = "kubernetes.io/pv-protection";
const BETA_CLASS_ANNOTATION: &str = "volume.beta.kubernetes.io/storage-class";

/// Mutates and checks `obj` (the new object) against `old` (for updates).
pub fn admit(
    res: &Resource,
    op: Operation,
    obj: &mut Value,
    old: Option<&Value>,
    lookup: &dyn Lookup,
) -> Result<(), Denied> {
    match (res.kind, op) {
        ("PersistentVolumeClaim", Operation::Create) => {
            set_default_class(obj, lookup);
            add_finalizer(obj, PVC_PROTECTION_FINALIZER);
            Ok(())
        }
        ("PersistentVolume", Operation::Create) => {
            add_finalizer(obj, PV_PROTECTION_FINALIZER);
            Ok(())
        }
        ("PersistentVolumeClaim", Operation::Update) => match old {
            Some(old) => check_resize(res, obj, old, lookup),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// The default StorageClass among `classes`: those annotated
/// `storageclass.kubernetes.io/is-default-class: "true"`, newest `creationTimestamp` first, then
/// the lowest name. Also what the binder needs for the retroactive default.
pub fn default_storage_class(classes: &[Value]) -> Option<&Value> {
    let created = |c: &Value| {
        c.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    };
    let name = |c: &Value| {
        c.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    classes
        .iter()
        .filter(|c| is_default_class(c))
        .min_by(|a, b| created(b).cmp(&created(a)).then_with(|| name(a).cmp(&name(b))))
}

/// The claim's class as Kubernetes reads it: the beta annotation wins over `spec.storageClassName`.
fn claim_class(pvc: &Value) -> Option<&str> {
    pvc.pointer("/metadata/annotations")
        .and_then(|a| a.get(BETA_CLASS_ANNOTATION))
        .and_then(Value::as_str)
        .or_else(|| pvc.pointer("/spec/storageClassName").and_then(Value::as_str))
}

/// DefaultStorageClass: a claim with no `spec.storageClassName` (and no beta annotation) gets the
/// default class, if there is one. An explicit `""` means "no class" and is kept.
fn set_default_class(pvc: &mut Value, lookup: &dyn Lookup) {
    let explicit = pvc.pointer("/spec/storageClassName").is_some_and(|v| !v.is_null())
        || pvc
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(BETA_CLASS_ANNOTATION))
            .is_some();
    if explicit {
        return;
    }
    let classes = lookup.storage_classes();
    let Some(name) = default_storage_class(&classes)
        .and_then(|c| c.pointer("/metadata/name"))
        .and_then(Value::as_str)
    else {
        return;
    };
    let Some(root) = pvc.as_object_mut() else {
        return;
    };
    let spec = root.entry("spec").or_insert_with(|| Value::Object(Default::default()));
    if let Some(spec) = spec.as_object_mut() {
        spec.insert("storageClassName".to_owned(), Value::String(name.to_owned()));
    }
}

/// Adds `finalizer` to `metadata.finalizers` unless it is already there.
fn add_finalizer(obj: &mut Value, finalizer: &str) {
    let Some(root) = obj.as_object_mut() else {
        return;
    };
    let meta = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let list = meta.entry("finalizers").or_insert_with(|| Value::Array(Vec::new()));
    if list.is_null() {
        *list = Value::Array(Vec::new());
    }
    if let Some(list) = list.as_array_mut()
        && !list.iter().any(|f| f.as_str() == Some(finalizer))
    {
        list.push(Value::String(finalizer.to_owned()));
    }
}

fn forbidden(res: &Resource, obj: &Value, msg: &str) -> Denied {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    Denied {
        code: 403,
        reason: "Forbidden",
        message: format!("{} \"{name}\" is forbidden: {msg}", res.plural),
    }
}

/// PersistentVolumeClaimResize: a claim may grow only when bound and when its class (unchanged)
/// has `allowVolumeExpansion: true`.
fn check_resize(res: &Resource, new: &Value, old: &Value, lookup: &dyn Lookup) -> Result<(), Denied> {
    let size = |v: &Value| {
        v.pointer("/spec/resources/requests/storage")
            .and_then(|q| quantity::from_json(q).ok())
    };
    let (Some(new_size), old_size) = (size(new), size(old)) else {
        return Ok(());
    };
    if old_size.is_some_and(|o| new_size <= o) {
        return Ok(());
    }
    if old.pointer("/status/phase").and_then(Value::as_str) != Some("Bound") {
        return Err(forbidden(
            res,
            new,
            "Only bound persistent volume claims can be expanded",
        ));
    }
    let class = claim_class(new).unwrap_or("");
    let old_class = claim_class(old).unwrap_or("");
    let allowed = !class.is_empty()
        && class == old_class
        && lookup.storage_classes().iter().any(|c| {
            c.pointer("/metadata/name").and_then(Value::as_str) == Some(class)
                && c.get("allowVolumeExpansion").and_then(Value::as_bool) == Some(true)
        });
    if allowed {
        Ok(())
    } else {
        Err(forbidden(
            res,
            new,
            "only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::resources::RESOURCES;
    use rstest::rstest;
    use serde_json::json;

    struct Classes(Vec<Value>);

    impl Lookup for Classes {
        fn storage_classes(&self) -> Vec<Value> {
            self.0.clone()
        }
    }

    fn res(kind: &str) -> &'static Resource {
        RESOURCES.iter().find(|r| r.kind == kind).unwrap()
    }

    fn class(name: &str, default: bool, created: &str, expand: bool) -> Value {
        let mut c = json!({"metadata": {"name": name, "creationTimestamp": created}, "provisioner": "berth.csi.io",
                           "allowVolumeExpansion": expand});
        if default {
            c["metadata"]["annotations"] = json!({"storageclass.kubernetes.io/is-default-class": "true"});
        }
        c
    }

    fn classes() -> Classes {
        Classes(vec![
            class("old-default", true, "2024-01-01T00:00:00Z", false),
            class("new-default", true, "2024-03-01T00:00:00Z", true),
            class("plain", false, "2024-05-01T00:00:00Z", true),
            class("fixed", false, "2024-05-01T00:00:00Z", false),
        ])
    }

    fn pvc(class: Option<&str>) -> Value {
        let mut p = json!({"metadata": {"name": "data", "namespace": "default"},
                           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}});
        if let Some(c) = class {
            p["spec"]["storageClassName"] = json!(c);
        }
        p
    }

    #[rstest]
    #[case::none_gets_newest_default(None, Some("new-default"))]
    #[case::explicit_kept(Some("plain"), Some("plain"))]
    #[case::empty_means_no_class(Some(""), Some(""))]
    fn default_class(#[case] given: Option<&str>, #[case] want: Option<&str>) {
        let mut p = pvc(given);
        admit(
            res("PersistentVolumeClaim"),
            Operation::Create,
            &mut p,
            None,
            &classes(),
        )
        .unwrap();
        assert_eq!(p["spec"]["storageClassName"].as_str(), want);
        assert_eq!(p["metadata"]["finalizers"], json!(["kubernetes.io/pvc-protection"]));
    }

    #[test]
    fn no_default_class_leaves_the_claim_alone() {
        let mut p = pvc(None);
        admit(
            res("PersistentVolumeClaim"),
            Operation::Create,
            &mut p,
            None,
            &Classes(vec![]),
        )
        .unwrap();
        assert!(p["spec"].get("storageClassName").is_none());
    }

    #[test]
    fn default_ties_break_by_lowest_name() {
        let same = "2024-01-01T00:00:00Z";
        let cs = vec![
            class("b", true, same, false),
            class("a", true, same, false),
            class("c", false, same, false),
        ];
        assert_eq!(default_storage_class(&cs).unwrap()["metadata"]["name"], "a");
        let beta = json!({"metadata": {"name": "beta", "annotations": {"storageclass.beta.kubernetes.io/is-default-class": "true"}}});
        assert_eq!(default_storage_class(&[beta]).unwrap()["metadata"]["name"], "beta");
    }

    #[test]
    fn finalizers_are_added_once() {
        let mut pv = json!({"metadata": {"name": "pv1", "finalizers": ["kubernetes.io/pv-protection"]}});
        admit(res("PersistentVolume"), Operation::Create, &mut pv, None, &classes()).unwrap();
        assert_eq!(pv["metadata"]["finalizers"], json!(["kubernetes.io/pv-protection"]));
        let mut fresh = json!({"metadata": {"name": "pv2"}});
        admit(res("PersistentVolume"), Operation::Create, &mut fresh, None, &classes()).unwrap();
        assert_eq!(fresh["metadata"]["finalizers"], json!(["kubernetes.io/pv-protection"]));
        let mut updated = json!({"metadata": {"name": "pv2"}});
        admit(
            res("PersistentVolume"),
            Operation::Update,
            &mut updated,
            Some(&fresh),
            &classes(),
        )
        .unwrap();
        assert!(updated["metadata"].get("finalizers").is_none());
    }

    fn bound(class: &str, size: &str) -> Value {
        let mut p = pvc(Some(class));
        p["spec"]["resources"]["requests"]["storage"] = json!(size);
        p["status"] = json!({"phase": "Bound", "capacity": {"storage": "1Gi"}});
        p
    }

    const RESIZE_MSG: &str = "persistentvolumeclaims \"data\" is forbidden: only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize";

    #[rstest]
    #[case::grow_allowed(bound("plain", "2Gi"), bound("plain", "1Gi"), None)]
    #[case::same_size(bound("fixed", "1Gi"), bound("fixed", "1Gi"), None)]
    #[case::shrink_is_validation_business(bound("fixed", "1Gi"), bound("fixed", "2Gi"), None)]
    #[case::class_forbids(bound("fixed", "2Gi"), bound("fixed", "1Gi"), Some(RESIZE_MSG))]
    #[case::unknown_class(bound("gone", "2Gi"), bound("gone", "1Gi"), Some(RESIZE_MSG))]
    #[case::no_class(bound("", "2Gi"), bound("", "1Gi"), Some(RESIZE_MSG))]
    #[case::unbound(
        with_phase(bound("plain", "2Gi"), "Pending"),
        with_phase(bound("plain", "1Gi"), "Pending"),
        Some("persistentvolumeclaims \"data\" is forbidden: Only bound persistent volume claims can be expanded")
    )]
    fn resize(#[case] mut new: Value, #[case] old: Value, #[case] want: Option<&str>) {
        let got = admit(
            res("PersistentVolumeClaim"),
            Operation::Update,
            &mut new,
            Some(&old),
            &classes(),
        );
        match want {
            None => assert_eq!(got, Ok(())),
            Some(msg) => {
                let d = got.unwrap_err();
                assert_eq!((d.code, d.reason, d.message.as_str()), (403, "Forbidden", msg));
            }
        }
    }

    fn with_phase(mut p: Value, phase: &str) -> Value {
        p["status"]["phase"] = json!(phase);
        p
    }

    #[test]
    fn status_updates_are_not_resize_checked() {
        let mut new = bound("fixed", "2Gi");
        let old = bound("fixed", "1Gi");
        assert!(
            admit(
                res("PersistentVolumeClaim"),
                Operation::UpdateStatus,
                &mut new,
                Some(&old),
                &classes()
            )
            .is_ok()
        );
    }
}

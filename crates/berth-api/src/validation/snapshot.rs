//! `snapshot.storage.k8s.io/v1` kinds, by the rules of the external-snapshotter CRD schemas
//! (required fields, enums, and their `x-kubernetes-validations` CEL rules and messages).

use serde_json::Value;

use super::{get, get_str, invalid, not_supported, quote, required};
use crate::FieldError;

const DELETION_POLICIES: &[&str] = &["Delete", "Retain"];

fn deletion_policy(v: Option<&str>, field: &str) -> Option<FieldError> {
    match v {
        None | Some("") => Some(required(field, "")),
        Some(p) if !DELETION_POLICIES.contains(&p) => Some(not_supported(field, p, DELETION_POLICIES)),
        Some(_) => None,
    }
}

fn set(v: &Value, path: &[&str]) -> bool {
    get(v, path).is_some_and(|x| !x.is_null())
}

fn class_name_not_empty(obj: &Value, path: &[&str], field: &str) -> Option<FieldError> {
    (get_str(obj, path) == Some("")).then(|| {
        invalid(
            field,
            quote(""),
            "volumeSnapshotClassName must not be the empty string when set",
        )
    })
}

/// A CEL rule failing on `field` reads `field: Invalid value: "object": <message>`.
fn cel(field: &str, message: &str) -> FieldError {
    invalid(field, quote("object"), message)
}

pub(crate) fn volume_snapshot(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if !set(obj, &["spec"]) {
        errs.push(required("spec", ""));
        return errs;
    }
    if !set(obj, &["spec", "source"]) {
        errs.push(required("spec.source", ""));
    } else {
        let pvc = set(obj, &["spec", "source", "persistentVolumeClaimName"]);
        let content = set(obj, &["spec", "source", "volumeSnapshotContentName"]);
        if pvc == content {
            errs.push(cel(
                "spec.source",
                "exactly one of volumeSnapshotContentName and persistentVolumeClaimName must be set",
            ));
        }
    }
    errs.extend(class_name_not_empty(
        obj,
        &["spec", "volumeSnapshotClassName"],
        "spec.volumeSnapshotClassName",
    ));
    errs
}

pub(crate) fn volume_snapshot_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for (key, msg_immutable, msg_required) in [
        (
            "persistentVolumeClaimName",
            "persistentVolumeClaimName is immutable",
            "persistentVolumeClaimName is required once set",
        ),
        (
            "volumeSnapshotContentName",
            "volumeSnapshotContentName is immutable",
            "volumeSnapshotContentName is required once set",
        ),
    ] {
        let n = get(new, &["spec", "source", key]).filter(|v| !v.is_null());
        let o = get(old, &["spec", "source", key]).filter(|v| !v.is_null());
        match (n, o) {
            (None, Some(_)) => errs.push(cel("spec.source", msg_required)),
            (Some(n), Some(o)) if n != o => {
                errs.push(invalid(format!("spec.source.{key}"), super::render(n), msg_immutable))
            }
            _ => {}
        }
    }
    errs
}

pub(crate) fn volume_snapshot_content(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if !set(obj, &["spec"]) {
        errs.push(required("spec", ""));
        return errs;
    }
    errs.extend(deletion_policy(
        get_str(obj, &["spec", "deletionPolicy"]),
        "spec.deletionPolicy",
    ));
    if get_str(obj, &["spec", "driver"]).unwrap_or("").is_empty() {
        errs.push(required("spec.driver", ""));
    }
    if !set(obj, &["spec", "source"]) {
        errs.push(required("spec.source", ""));
    } else {
        let vh = set(obj, &["spec", "source", "volumeHandle"]);
        let sh = set(obj, &["spec", "source", "snapshotHandle"]);
        if vh == sh {
            errs.push(cel(
                "spec.source",
                "exactly one of volumeHandle and snapshotHandle must be set",
            ));
        }
    }
    if !set(obj, &["spec", "volumeSnapshotRef"]) {
        errs.push(required("spec.volumeSnapshotRef", ""));
    } else if !set(obj, &["spec", "volumeSnapshotRef", "name"])
        || !set(obj, &["spec", "volumeSnapshotRef", "namespace"])
    {
        errs.push(cel(
            "spec.volumeSnapshotRef",
            "both spec.volumeSnapshotRef.name and spec.volumeSnapshotRef.namespace must be set",
        ));
    }
    if let Some(m) = get_str(obj, &["spec", "sourceVolumeMode"])
        && m != "Block"
        && m != "Filesystem"
    {
        errs.push(not_supported("spec.sourceVolumeMode", m, &["Block", "Filesystem"]));
    }
    errs.extend(class_name_not_empty(
        obj,
        &["spec", "volumeSnapshotClassName"],
        "spec.volumeSnapshotClassName",
    ));
    errs
}

pub(crate) fn volume_snapshot_content_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for (path, field, msg) in [
        (
            &["spec", "source", "volumeHandle"][..],
            "spec.source.volumeHandle",
            "volumeHandle is immutable",
        ),
        (
            &["spec", "source", "snapshotHandle"][..],
            "spec.source.snapshotHandle",
            "snapshotHandle is immutable",
        ),
        (
            &["spec", "sourceVolumeMode"][..],
            "spec.sourceVolumeMode",
            "sourceVolumeMode is immutable",
        ),
    ] {
        let o = get(old, path).filter(|v| !v.is_null());
        if o.is_some() && get(new, path) != o {
            errs.push(invalid(
                field,
                get(new, path).map(super::render).unwrap_or_else(|| "null".to_owned()),
                msg,
            ));
        }
    }
    errs
}

pub(crate) fn volume_snapshot_class(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if get_str(obj, &["driver"]).unwrap_or("").is_empty() {
        errs.push(required("driver", ""));
    }
    errs.extend(deletion_policy(get_str(obj, &["deletionPolicy"]), "deletionPolicy"));
    errs
}

pub(crate) fn volume_snapshot_class_update(_new: &Value, _old: &Value) -> Vec<FieldError> {
    Vec::new()
}

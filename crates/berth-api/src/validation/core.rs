//! Core kinds (`pkg/apis/core/validation`): PersistentVolume, PersistentVolumeClaim, the
//! storage-relevant parts of Pod, Secret, ConfigMap, Namespace, Node and Event.

use std::collections::BTreeSet;

use serde_json::Value;

use super::meta::validate_label_selector;
use super::{
    duplicate, forbidden, get, get_array, get_str, immutable, invalid, name_errors, not_supported, quote, render,
    required,
};
use crate::quantity::{self, Quantity};
use crate::{FieldError, FieldErrorKind, names};

const ACCESS_MODES: &[&str] = &["ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"];
const VOLUME_MODES: &[&str] = &["Block", "Filesystem"];
const RECLAIM_POLICIES: &[&str] = &["Delete", "Recycle", "Retain"];

/// `PersistentVolumeSource` members, in the order Kubernetes checks them.
pub(crate) const PV_SOURCES: &[&str] = &[
    "hostPath",
    "gcePersistentDisk",
    "awsElasticBlockStore",
    "glusterfs",
    "flocker",
    "nfs",
    "rbd",
    "quobyte",
    "cephfs",
    "iscsi",
    "cinder",
    "fc",
    "flexVolume",
    "azureFile",
    "vsphereVolume",
    "photonPersistentDisk",
    "portworxVolume",
    "azureDisk",
    "scaleIO",
    "local",
    "storageos",
    "csi",
];

/// `VolumeSource` members of a pod volume.
const POD_VOLUME_SOURCES: &[&str] = &[
    "hostPath",
    "emptyDir",
    "gitRepo",
    "glusterfs",
    "persistentVolumeClaim",
    "rbd",
    "quobyte",
    "flexVolume",
    "cinder",
    "cephfs",
    "flocker",
    "downwardAPI",
    "fc",
    "azureFile",
    "vsphereVolume",
    "photonPersistentDisk",
    "portworxVolume",
    "scaleIO",
    "azureDisk",
    "storageos",
    "projected",
    "configMap",
    "secret",
    "nfs",
    "iscsi",
    "csi",
    "ephemeral",
    "image",
    "gcePersistentDisk",
    "awsElasticBlockStore",
];

const MAX_SECRET_SIZE: usize = 1024 * 1024;
const BETA_CLASS: &str = "volume.beta.kubernetes.io/storage-class";
const CONFIG_KEY_MSG: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";

fn access_modes(spec: &Value, path: &str, required_detail: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let field = format!("{path}.accessModes");
    let modes: Vec<&str> = get_array(spec, &["accessModes"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if modes.is_empty() {
        errs.push(required(&field, required_detail));
    }
    for m in &modes {
        if !ACCESS_MODES.contains(m) {
            errs.push(not_supported(&field, m, ACCESS_MODES));
        }
    }
    if modes.contains(&"ReadWriteOncePod") && modes.len() > 1 {
        errs.push(forbidden(
            &field,
            "may not use ReadWriteOncePod with other access modes",
        ));
    }
    errs
}

fn volume_mode(spec: &Value, path: &str) -> Option<FieldError> {
    let m = get_str(spec, &["volumeMode"])?;
    (!VOLUME_MODES.contains(&m)).then(|| not_supported(format!("{path}.volumeMode"), m, VOLUME_MODES))
}

fn class_name(spec: &Value, path: &str) -> Vec<FieldError> {
    match get_str(spec, &["storageClassName"]) {
        Some(c) if !c.is_empty() => name_errors(&format!("{path}.storageClassName"), c, names::dns1123_subdomain(c)),
        _ => Vec::new(),
    }
}

/// A quantity that must parse and be > 0 (`ValidatePositiveQuantityValue`).
/// `ValidatePositiveQuantityValue`: a quantity that parses and is > 0. (A quantity that does
/// not parse is a decode error in Kubernetes; here it is reported on its field.)
fn positive_quantity(v: &Value, field: &str) -> Vec<FieldError> {
    match quantity::from_json(v) {
        Err(e) => vec![invalid(field, render(v), e.to_string())],
        Ok(q) if q.nanos() <= 0 => vec![invalid(field, quote(&q.canonical()), "must be greater than zero")],
        Ok(_) => Vec::new(),
    }
}

/// `validateBasicResource` (PV capacity): a negative value is first reported by its whole units.
fn basic_resource(v: &Value, field: &str) -> Vec<FieldError> {
    match quantity::from_json(v) {
        Ok(q) if q.is_negative() => vec![invalid(
            field,
            q.value_ceil().to_string(),
            "must be a valid resource quantity",
        )],
        _ => Vec::new(),
    }
}

fn non_negative_quantity(v: &Value, field: &str) -> Vec<FieldError> {
    match quantity::from_json(v) {
        Err(e) => vec![invalid(field, render(v), e.to_string())],
        Ok(q) if q.is_negative() => {
            vec![invalid(
                field,
                quote(&q.canonical()),
                "must be greater than or equal to 0",
            )]
        }
        Ok(_) => Vec::new(),
    }
}

/// `ValidateNodeSelector` (required node affinity terms).
pub(crate) fn node_selector(sel: &Value, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let terms = get_array(sel, &["nodeSelectorTerms"]);
    if terms.is_empty() {
        errs.push(required(
            format!("{path}.nodeSelectorTerms"),
            "must have at least one node selector term",
        ));
    }
    for (i, t) in terms.iter().enumerate() {
        for (j, e) in get_array(t, &["matchExpressions"]).iter().enumerate() {
            let p = format!("{path}.nodeSelectorTerms[{i}].matchExpressions[{j}]");
            let op = get_str(e, &["operator"]).unwrap_or("");
            let n = get_array(e, &["values"]).len();
            match op {
                "In" | "NotIn" if n == 0 => errs.push(required(
                    format!("{p}.values"),
                    "must be specified when `operator` is 'In' or 'NotIn'",
                )),
                "Exists" | "DoesNotExist" if n > 0 => errs.push(forbidden(
                    format!("{p}.values"),
                    "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                )),
                "Gt" | "Lt" if n != 1 => errs.push(required(
                    format!("{p}.values"),
                    "must be specified single value when `operator` is 'Lt' or 'Gt'",
                )),
                "In" | "NotIn" | "Exists" | "DoesNotExist" | "Gt" | "Lt" => {}
                _ => errs.push(not_supported(
                    format!("{p}.operator"),
                    op,
                    &["DoesNotExist", "Exists", "Gt", "In", "Lt", "NotIn"],
                )),
            }
            let key = get_str(e, &["key"]).unwrap_or("");
            errs.extend(name_errors(&format!("{p}.key"), key, names::qualified_name(key)));
        }
        for (j, f) in get_array(t, &["matchFields"]).iter().enumerate() {
            let key = get_str(f, &["key"]).unwrap_or("");
            if key != "metadata.name" {
                errs.push(not_supported(
                    format!("{path}.nodeSelectorTerms[{i}].matchFields[{j}].key"),
                    key,
                    &["metadata.name"],
                ));
            }
        }
    }
    errs
}

/// `ValidateCSIDriverName` as used inside volume sources: required, 63 characters, subdomain.
pub(crate) fn csi_driver_name(name: &str, field: &str) -> Vec<FieldError> {
    // As ValidateCSIDriverName: an empty name is both required and not a subdomain.
    let mut errs = Vec::new();
    if name.is_empty() {
        errs.push(required(field, ""));
    }
    if name.len() > 63 {
        errs.push(FieldError::new(
            FieldErrorKind::TooLong,
            field,
            "may not be more than 63 bytes",
        ));
    }
    errs.extend(name_errors(field, name, names::dns1123_subdomain(&name.to_lowercase())));
    errs
}

fn secret_ref(src: &Value, key: &str, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(r) = src.get(key).filter(|r| !r.is_null()) {
        for f in ["name", "namespace"] {
            if get_str(r, &[f]).unwrap_or("").is_empty() {
                errs.push(required(format!("{path}.{key}.{f}"), ""));
            }
        }
    }
    errs
}

fn pv_source(spec: &Value, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut found = 0;
    for key in PV_SOURCES {
        let Some(src) = spec.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        let p = format!("{path}.{key}");
        if found > 0 {
            errs.push(forbidden(p, "may not specify more than 1 volume type"));
            continue;
        }
        found += 1;
        match *key {
            "hostPath" => errs.extend(host_path(src, &p)),
            "local" => {
                if get_str(src, &["path"]).unwrap_or("").is_empty() {
                    errs.push(required(format!("{p}.path"), ""));
                }
                if spec.get("nodeAffinity").is_none_or(Value::is_null) {
                    errs.push(required(
                        format!("{path}.nodeAffinity"),
                        "Local volume requires node affinity",
                    ));
                }
            }
            "nfs" => errs.extend(nfs(src, &p)),
            "csi" => {
                errs.extend(csi_driver_name(
                    get_str(src, &["driver"]).unwrap_or(""),
                    &format!("{p}.driver"),
                ));
                if get_str(src, &["volumeHandle"]).unwrap_or("").is_empty() {
                    errs.push(required(format!("{p}.volumeHandle"), ""));
                }
                for r in [
                    "controllerPublishSecretRef",
                    "nodeStageSecretRef",
                    "nodePublishSecretRef",
                    "controllerExpandSecretRef",
                    "nodeExpandSecretRef",
                ] {
                    errs.extend(secret_ref(src, r, &p));
                }
            }
            _ => {}
        }
    }
    if found == 0 {
        errs.push(required(path, "must specify a volume type"));
    }
    errs
}

fn host_path(src: &Value, p: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if get_str(src, &["path"]).unwrap_or("").is_empty() {
        errs.push(required(format!("{p}.path"), ""));
    }
    const TYPES: &[&str] = &[
        "",
        "BlockDevice",
        "CharDevice",
        "Directory",
        "DirectoryOrCreate",
        "File",
        "FileOrCreate",
        "Socket",
    ];
    if let Some(t) = get_str(src, &["type"])
        && !TYPES.contains(&t)
    {
        errs.push(not_supported(format!("{p}.type"), t, TYPES));
    }
    errs
}

fn nfs(src: &Value, p: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if get_str(src, &["server"]).unwrap_or("").is_empty() {
        errs.push(required(format!("{p}.server"), ""));
    }
    let path = get_str(src, &["path"]).unwrap_or("");
    if path.is_empty() {
        errs.push(required(format!("{p}.path"), ""));
    } else if !path.starts_with('/') {
        errs.push(invalid(format!("{p}.path"), quote(path), "must be an absolute path"));
    }
    errs
}

pub(crate) fn pv(obj: &Value) -> Vec<FieldError> {
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    pv_spec(&spec, "spec", false)
}

/// `ValidatePersistentVolumeSpec`; `inline` is the VolumeAttachment `inlineVolumeSpec` case,
/// where capacity, claimRef, class and node affinity are forbidden and CSI is required.
pub(crate) fn pv_spec(spec: &Value, path: &str, inline: bool) -> Vec<FieldError> {
    const INLINE: &str = "may not be specified in the context of inline volumes";
    let mut errs = Vec::new();
    let present = |k: &str| spec.get(k).is_some_and(|v| !v.is_null());
    if inline {
        if present("claimRef") {
            errs.push(forbidden(format!("{path}.claimRef"), INLINE));
        }
        if get(spec, &["capacity"])
            .and_then(Value::as_object)
            .is_some_and(|c| !c.is_empty())
        {
            errs.push(forbidden(format!("{path}.capacity"), INLINE));
        }
        if !present("csi") {
            errs.push(required(
                format!("{path}.csi"),
                "has to be specified in the context of inline volumes",
            ));
        }
    }
    errs.extend(access_modes(spec, path, ""));
    let cap_field = format!("{path}.capacity");
    if !inline {
        match get(spec, &["capacity"]).and_then(Value::as_object) {
            None => errs.push(required(&cap_field, "")),
            Some(cap) if cap.is_empty() => errs.push(required(&cap_field, "")),
            Some(cap) => {
                if !cap.contains_key("storage") || cap.len() > 1 {
                    errs.push(
                        FieldError::new(
                            FieldErrorKind::NotSupported,
                            &cap_field,
                            "supported values: \"storage\"",
                        )
                        .with_value(Value::Object(cap.clone()).to_string()),
                    );
                }
                for (k, v) in cap {
                    errs.extend(basic_resource(v, &format!("{cap_field}[{k}]")));
                    errs.extend(positive_quantity(v, &format!("{cap_field}[{k}]")));
                }
            }
        }
    }
    if let Some(p) = get_str(spec, &["persistentVolumeReclaimPolicy"]).filter(|p| !p.is_empty()) {
        if inline {
            if p != "Retain" {
                errs.push(forbidden(
                    format!("{path}.persistentVolumeReclaimPolicy"),
                    "may only be Retain in the context of inline volumes",
                ));
            }
        } else if !RECLAIM_POLICIES.contains(&p) {
            errs.push(not_supported(
                format!("{path}.persistentVolumeReclaimPolicy"),
                p,
                RECLAIM_POLICIES,
            ));
        }
    }
    if let Some(na) = spec.get("nodeAffinity").filter(|v| !v.is_null()) {
        if inline {
            errs.push(forbidden(format!("{path}.nodeAffinity"), INLINE));
        } else {
            match na.get("required").filter(|v| !v.is_null()) {
                None => errs.push(required(
                    format!("{path}.nodeAffinity.required"),
                    "must specify required node constraints",
                )),
                Some(r) => errs.extend(node_selector(r, &format!("{path}.nodeAffinity.required"))),
            }
        }
    }
    errs.extend(pv_source(spec, path));
    let host_root =
        get_str(spec, &["hostPath", "path"]).is_some_and(|p| p.starts_with('/') && p.trim_matches('/').is_empty());
    if host_root && get_str(spec, &["persistentVolumeReclaimPolicy"]) == Some("Recycle") {
        errs.push(forbidden(
            format!("{path}.persistentVolumeReclaimPolicy"),
            "may not be 'recycle' for a hostPath mount of '/'",
        ));
    }
    if inline {
        if get_str(spec, &["storageClassName"]).is_some_and(|c| !c.is_empty()) {
            errs.push(forbidden(format!("{path}.storageClassName"), INLINE));
        }
        if get_str(spec, &["volumeMode"]).is_some_and(|m| m != "Filesystem") {
            errs.push(forbidden(
                format!("{path}.volumeMode"),
                "may not specify volumeMode other than Filesystem in the context of inline volumes",
            ));
        }
    } else {
        errs.extend(class_name(spec, path));
        errs.extend(volume_mode(spec, path));
    }
    if let Some(vac) = get_str(spec, &["volumeAttributesClassName"]) {
        if vac.is_empty() {
            errs.push(required(
                format!("{path}.volumeAttributesClassName"),
                "an empty string is disallowed",
            ));
        } else {
            errs.extend(name_errors(
                &format!("{path}.volumeAttributesClassName"),
                vac,
                names::dns1123_subdomain(vac),
            ));
        }
        if !present("csi") {
            errs.push(required(
                format!("{path}.csi"),
                "has to be specified when using volumeAttributesClassName",
            ));
        }
    }
    errs
}

fn pv_sources_of(spec: Option<&Value>) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(spec) = spec {
        for k in PV_SOURCES {
            if let Some(v) = spec.get(k).filter(|v| !v.is_null()) {
                m.insert((*k).to_owned(), v.clone());
            }
        }
    }
    Value::Object(m)
}

pub(crate) fn pv_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut new_sources = pv_sources_of(new.get("spec"));
    let old_sources = pv_sources_of(old.get("spec"));
    // A CSI volume may get a controllerExpandSecretRef after creation.
    if old_sources.pointer("/csi").is_some()
        && old_sources
            .pointer("/csi/controllerExpandSecretRef")
            .is_none_or(Value::is_null)
        && let Some(csi) = new_sources.get_mut("csi").and_then(Value::as_object_mut)
    {
        csi.remove("controllerExpandSecretRef");
    }
    if new_sources != old_sources {
        errs.push(forbidden(
            "spec.persistentvolumesource",
            "spec.persistentvolumesource is immutable after creation",
        ));
    }
    errs.extend(immutable(
        "volumeMode",
        get(new, &["spec", "volumeMode"]),
        get(old, &["spec", "volumeMode"]),
    ));
    if let Some(old_na) = get(old, &["spec", "nodeAffinity"]).filter(|v| !v.is_null()) {
        errs.extend(immutable(
            "nodeAffinity",
            get(new, &["spec", "nodeAffinity"]),
            Some(old_na),
        ));
    }
    errs.extend(vac_update(new, old, false));
    errs
}

/// A volumeAttributesClassName, once set, may change but not be removed (nor, on claims, emptied).
fn vac_update(new: &Value, old: &Value, claim: bool) -> Vec<FieldError> {
    let n = get(new, &["spec", "volumeAttributesClassName"]).filter(|v| !v.is_null());
    let o = get(old, &["spec", "volumeAttributesClassName"]).filter(|v| !v.is_null());
    match (o, n) {
        (Some(_), None) => vec![forbidden(
            "spec.volumeAttributesClassName",
            "update from non-nil value to nil is forbidden",
        )],
        (Some(_), Some(Value::String(s))) if claim && s.is_empty() => vec![forbidden(
            "spec.volumeAttributesClassName",
            "update from non-nil value to an empty string is forbidden",
        )],
        _ => Vec::new(),
    }
}

pub(crate) fn pv_status(obj: &Value) -> Vec<FieldError> {
    const PHASES: &[&str] = &["Available", "Bound", "Failed", "Pending", "Released"];
    match get_str(obj, &["status", "phase"]) {
        Some(p) if !PHASES.contains(&p) => vec![not_supported("status.phase", p, PHASES)],
        _ => Vec::new(),
    }
}

pub(crate) fn pvc(obj: &Value) -> Vec<FieldError> {
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    pvc_spec(&spec, "spec")
}

pub(crate) fn pvc_spec(spec: &Value, path: &str) -> Vec<FieldError> {
    let modes: Vec<&str> = get_array(spec, &["accessModes"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut errs = Vec::new();
    if modes.is_empty() {
        errs.push(required(
            format!("{path}.accessModes"),
            "at least 1 access mode is required",
        ));
    }
    errs.extend(validate_label_selector(
        spec.get("selector").filter(|v| !v.is_null()),
        &format!("{path}.selector"),
    ));
    if !modes.is_empty() {
        errs.extend(access_modes(spec, path, ""));
    }
    match get(spec, &["resources", "requests", "storage"]) {
        None => errs.push(required(format!("{path}.resources[storage]"), "")),
        Some(v) => errs.extend(positive_quantity(v, &format!("{path}.resources[storage]"))),
    }
    if let Some(limits) = get(spec, &["resources", "limits"]).and_then(Value::as_object) {
        for (k, v) in limits {
            errs.extend(non_negative_quantity(v, &format!("{path}.resources.limits[{k}]")));
        }
    }
    errs.extend(class_name(spec, path));
    errs.extend(volume_mode(spec, path));
    let ds = spec.get("dataSource").filter(|v| !v.is_null());
    let dsr = spec.get("dataSourceRef").filter(|v| !v.is_null());
    if let Some(ds) = ds {
        errs.extend(data_source(ds, &format!("{path}.dataSource")));
    }
    if let Some(dsr) = dsr {
        errs.extend(data_source(dsr, &format!("{path}.dataSourceRef")));
        if let Some(ns) = get_str(dsr, &["namespace"]).filter(|n| !n.is_empty()) {
            errs.extend(name_errors(
                &format!("{path}.dataSourceRef.namespace"),
                ns,
                names::dns1123_label(ns),
            ));
        }
    }
    if let (Some(ds), Some(dsr)) = (ds, dsr) {
        if get_str(dsr, &["namespace"]).is_some_and(|n| !n.is_empty()) {
            errs.push(invalid(
                path,
                format!("{path}.dataSource"),
                "may not be specified when dataSourceRef.namespace is specified",
            ));
        } else {
            let key = |v: &Value| {
                (
                    get_str(v, &["apiGroup"]).unwrap_or("").to_owned(),
                    get_str(v, &["kind"]).unwrap_or("").to_owned(),
                    get_str(v, &["name"]).unwrap_or("").to_owned(),
                )
            };
            if key(ds) != key(dsr) {
                errs.push(invalid(path, format!("{path}.dataSource"), "must match dataSourceRef"));
            }
        }
    }
    errs
}

fn data_source(ds: &Value, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if get_str(ds, &["name"]).unwrap_or("").is_empty() {
        errs.push(required(format!("{path}.name"), ""));
    }
    let kind = get_str(ds, &["kind"]).unwrap_or("");
    if kind.is_empty() {
        errs.push(required(format!("{path}.kind"), ""));
    }
    let group = get_str(ds, &["apiGroup"]).unwrap_or("");
    if group.is_empty() && kind != "PersistentVolumeClaim" {
        errs.push(invalid(
            path,
            quote(kind),
            "must be 'PersistentVolumeClaim' when referencing the default apiGroup",
        ));
    }
    if !group.is_empty() {
        errs.extend(name_errors(
            &format!("{path}.apiGroup"),
            group,
            names::dns1123_subdomain(group),
        ));
    }
    errs
}

fn storage_of(v: &Value, path: &[&str]) -> Option<Quantity> {
    get(v, path).and_then(|q| quantity::from_json(q).ok())
}

pub(crate) fn pvc_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut new_spec = new.get("spec").cloned().unwrap_or(Value::Null);
    let mut old_spec = old.get("spec").cloned().unwrap_or(Value::Null);
    // The binder may set volumeName once.
    if get_str(&old_spec, &["volumeName"]).unwrap_or("").is_empty()
        && let (Some(o), Some(n)) = (old_spec.as_object_mut(), new_spec.get("volumeName"))
    {
        o.insert("volumeName".to_owned(), n.clone());
    }
    // A claim without a class may get one later (retroactive default StorageClass, or the
    // upgrade from the beta annotation), if it agrees with the old annotation.
    let beta = |v: &Value| get_str(v, &["metadata", "annotations", BETA_CLASS]).map(str::to_owned);
    let new_class = get_str(&new_spec, &["storageClassName"]).map(str::to_owned);
    if old_spec.get("storageClassName").is_none_or(Value::is_null)
        && let Some(n) = &new_class
        && beta(old).is_none_or(|a| &a == n)
        && let Some(o) = old_spec.as_object_mut()
    {
        o.insert("storageClassName".to_owned(), Value::String(n.clone()));
    }
    if beta(old).is_some() && beta(new) != beta(old) {
        errs.push(invalid(
            format!("metadata.annotations[{BETA_CLASS}]"),
            quote(beta(new).as_deref().unwrap_or("")),
            "field is immutable",
        ));
    }
    let phase = get_str(new, &["status", "phase"]).or_else(|| get_str(old, &["status", "phase"]));
    if phase == Some("Bound") {
        let old_req = get(&old_spec, &["resources", "requests", "storage"]).cloned();
        if let Some(reqs) = new_spec
            .get_mut("resources")
            .and_then(|r| r.get_mut("requests"))
            .and_then(Value::as_object_mut)
        {
            match old_req {
                Some(o) => reqs.insert("storage".to_owned(), o),
                None => reqs.remove("storage"),
            };
        }
    }
    for (spec, from) in [(&mut new_spec, old.get("spec")), (&mut old_spec, old.get("spec"))] {
        if let Some(m) = spec.as_object_mut() {
            match from.and_then(|s| s.get("volumeAttributesClassName")) {
                Some(v) => m.insert("volumeAttributesClassName".to_owned(), v.clone()),
                None => m.remove("volumeAttributesClassName"),
            };
        }
    }
    if new_spec != old_spec {
        errs.push(forbidden(
            "spec",
            "spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
        ));
    }
    let new_size = storage_of(new, &["spec", "resources", "requests", "storage"]);
    let old_size = storage_of(old, &["spec", "resources", "requests", "storage"]);
    let status_size = storage_of(old, &["status", "capacity", "storage"])
        .unwrap_or(Quantity::from_units(0, quantity::Format::BinarySI));
    if let (Some(n), Some(o)) = (new_size, old_size)
        && n < o
        && n <= status_size
    {
        errs.push(forbidden(
            "spec.resources.requests.storage",
            "field can not be less than status.capacity",
        ));
    }
    errs.extend(immutable(
        "volumeMode",
        get(new, &["spec", "volumeMode"]),
        get(old, &["spec", "volumeMode"]),
    ));
    errs.extend(vac_update(new, old, true));
    errs
}

pub(crate) fn pvc_status(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for key in ["capacity", "allocatedResources"] {
        if let Some(m) = get(obj, &["status", key]).and_then(Value::as_object) {
            for (k, v) in m {
                errs.extend(non_negative_quantity(v, &format!("status.{key}[{k}]")));
            }
        }
    }
    const PHASES: &[&str] = &["Bound", "Lost", "Pending"];
    if let Some(p) = get_str(obj, &["status", "phase"])
        && !PHASES.contains(&p)
    {
        errs.push(not_supported("status.phase", p, PHASES));
    }
    errs
}

// ---- Pod ----

/// `path.key: Required value` when the string at `key` of `src` is missing or empty.
fn require_str(src: &Value, key: &str, path: &str) -> Option<FieldError> {
    get_str(src, &[key])
        .unwrap_or("")
        .is_empty()
        .then(|| required(format!("{path}.{key}"), ""))
}

fn pod_volume(v: &Value, p: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut found = 0;
    for key in POD_VOLUME_SOURCES {
        let Some(src) = v.get(key).filter(|s| !s.is_null()) else {
            continue;
        };
        let sp = format!("{p}.{key}");
        if found > 0 {
            errs.push(forbidden(sp, "may not specify more than 1 volume type"));
            continue;
        }
        found += 1;
        match *key {
            "persistentVolumeClaim" => errs.extend(require_str(src, "claimName", &sp)),
            "hostPath" => errs.extend(host_path(src, &sp)),
            "nfs" => errs.extend(nfs(src, &sp)),
            "secret" => errs.extend(require_str(src, "secretName", &sp)),
            "configMap" => errs.extend(require_str(src, "name", &sp)),
            "csi" => errs.extend(csi_driver_name(
                get_str(src, &["driver"]).unwrap_or(""),
                &format!("{sp}.driver"),
            )),
            "ephemeral" => match src.get("volumeClaimTemplate").filter(|t| !t.is_null()) {
                None => errs.push(required(format!("{sp}.volumeClaimTemplate"), "")),
                Some(t) => {
                    let spec = t.get("spec").cloned().unwrap_or(Value::Null);
                    errs.extend(pvc_spec(&spec, &format!("{sp}.volumeClaimTemplate.spec")));
                }
            },
            "emptyDir" => {
                if let Some(limit) = src.get("sizeLimit").filter(|l| !l.is_null()) {
                    errs.extend(non_negative_quantity(limit, &format!("{sp}.sizeLimit")));
                }
            }
            _ => {}
        }
    }
    if found == 0 {
        errs.push(required(p, "must specify a volume type"));
    }
    errs
}

fn containers(list: &[Value], path: &str, volumes: &BTreeSet<&str>, seen: &mut BTreeSet<String>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let name = get_str(c, &["name"]).unwrap_or("");
        if name.is_empty() {
            errs.push(required(format!("{p}.name"), ""));
        } else {
            errs.extend(name_errors(&format!("{p}.name"), name, names::dns1123_label(name)));
            if !seen.insert(name.to_owned()) {
                errs.push(duplicate(format!("{p}.name"), quote(name)));
            }
        }
        if get_str(c, &["image"]).unwrap_or("").trim().is_empty() {
            errs.push(required(format!("{p}.image"), ""));
        }
        if let Some(pp) = get_str(c, &["imagePullPolicy"]) {
            const PULL: &[&str] = &["Always", "IfNotPresent", "Never"];
            if !PULL.contains(&pp) {
                errs.push(not_supported(format!("{p}.imagePullPolicy"), pp, PULL));
            }
        }
        if let Some(tp) = get_str(c, &["terminationMessagePolicy"]) {
            const TMP: &[&str] = &["FallbackToLogsOnError", "File"];
            if !TMP.contains(&tp) {
                errs.push(not_supported(format!("{p}.terminationMessagePolicy"), tp, TMP));
            }
        }
        let mut paths = BTreeSet::new();
        for (j, m) in get_array(c, &["volumeMounts"]).iter().enumerate() {
            let mp = format!("{p}.volumeMounts[{j}]");
            let vname = get_str(m, &["name"]).unwrap_or("");
            if vname.is_empty() {
                errs.push(required(format!("{mp}.name"), ""));
            } else if !volumes.contains(vname) {
                // Kubernetes reports this as `Not found`; FieldErrorKind has no such kind.
                errs.push(invalid(
                    format!("{mp}.name"),
                    quote(vname),
                    "not found: no volume of this name in spec.volumes",
                ));
            }
            let mount_path = get_str(m, &["mountPath"]).unwrap_or("");
            if mount_path.is_empty() {
                errs.push(required(format!("{mp}.mountPath"), ""));
            } else if !paths.insert(mount_path.to_owned()) {
                errs.push(invalid(format!("{mp}.mountPath"), quote(mount_path), "must be unique"));
            }
            for key in ["subPath", "subPathExpr"] {
                let sub = get_str(m, &[key]).unwrap_or("");
                if sub.starts_with('/') {
                    errs.push(invalid(format!("{mp}.{key}"), quote(sub), "must be a relative path"));
                }
                if sub.split('/').any(|s| s == "..") {
                    errs.push(invalid(format!("{mp}.{key}"), quote(sub), "must not contain '..'"));
                }
            }
        }
        for (j, d) in get_array(c, &["volumeDevices"]).iter().enumerate() {
            let vname = get_str(d, &["name"]).unwrap_or("");
            if !vname.is_empty() && !volumes.contains(vname) {
                errs.push(invalid(
                    format!("{p}.volumeDevices[{j}].name"),
                    quote(vname),
                    "not found: no volume of this name in spec.volumes",
                ));
            }
            if get_str(d, &["devicePath"]).unwrap_or("").is_empty() {
                errs.push(required(format!("{p}.volumeDevices[{j}].devicePath"), ""));
            }
        }
    }
    errs
}

pub(crate) fn pod(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    let mut vol_names = BTreeSet::new();
    for (i, v) in get_array(&spec, &["volumes"]).iter().enumerate() {
        let p = format!("spec.volumes[{i}]");
        let name = get_str(v, &["name"]).unwrap_or("");
        if name.is_empty() {
            errs.push(required(format!("{p}.name"), ""));
        } else {
            errs.extend(name_errors(&format!("{p}.name"), name, names::dns1123_label(name)));
            if !vol_names.insert(name) {
                errs.push(duplicate(format!("{p}.name"), quote(name)));
            }
        }
        errs.extend(pod_volume(v, &p));
    }
    let list = get_array(&spec, &["containers"]);
    if list.is_empty() {
        errs.push(required("spec.containers", ""));
    }
    let mut seen = BTreeSet::new();
    errs.extend(containers(
        get_array(&spec, &["initContainers"]),
        "spec.initContainers",
        &vol_names,
        &mut seen,
    ));
    errs.extend(containers(list, "spec.containers", &vol_names, &mut seen));
    for (key, allowed) in [
        ("restartPolicy", &["Always", "Never", "OnFailure"][..]),
        (
            "dnsPolicy",
            &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"][..],
        ),
    ] {
        if let Some(v) = get_str(&spec, &[key])
            && !allowed.contains(&v)
        {
            errs.push(not_supported(format!("spec.{key}"), v, allowed));
        }
    }
    if let Some(t) = get(&spec, &["terminationGracePeriodSeconds"]).and_then(Value::as_i64)
        && t < 0
    {
        errs.push(invalid(
            "spec.terminationGracePeriodSeconds",
            t.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    if let Some(n) = get_str(&spec, &["nodeName"]).filter(|n| !n.is_empty()) {
        errs.extend(name_errors("spec.nodeName", n, names::dns1123_subdomain(n)));
    }
    errs
}

pub(crate) fn pod_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut n = new.get("spec").cloned().unwrap_or(Value::Null);
    let o = old.get("spec").cloned().unwrap_or(Value::Null);
    // Copy over what may change: images, activeDeadlineSeconds, tolerations, and (Berth has no
    // binding subresource) a nodeName set for the first time, and removed scheduling gates.
    for list in ["containers", "initContainers"] {
        if let (Some(nl), Some(ol)) = (
            n.get_mut(list).and_then(Value::as_array_mut),
            o.get(list).and_then(Value::as_array),
        ) {
            for (nc, oc) in nl.iter_mut().zip(ol) {
                if let (Some(m), Some(img)) = (nc.as_object_mut(), oc.get("image")) {
                    m.insert("image".to_owned(), img.clone());
                }
            }
        }
    }
    // Which of the narrowly mutable fields changed within what Kubernetes allows.
    let allowed = |key: &str| -> bool {
        let (nv, ov) = (n.get(key), o.get(key));
        match key {
            // Set once, or lowered; never removed.
            "activeDeadlineSeconds" => match (ov.and_then(Value::as_i64), nv.and_then(Value::as_i64)) {
                (None, None) => true,
                (None, Some(x)) => x > 0,
                (Some(o), Some(x)) => x > 0 && x <= o,
                (Some(_), None) => false,
            },
            // Only additions to the existing list.
            "tolerations" => {
                let olds = ov.and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
                let news = nv.and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
                olds.iter().all(|t| news.contains(t))
            }
            // Only from a negative value to 1.
            "terminationGracePeriodSeconds" => {
                nv == ov || (ov.and_then(Value::as_i64).is_some_and(|o| o < 0) && nv.and_then(Value::as_i64) == Some(1))
            }
            // Gates may only be removed.
            "schedulingGates" => {
                let olds = ov.and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
                let news = nv.and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
                news.iter().all(|g| olds.contains(g))
            }
            _ => false,
        }
    };
    let copy: Vec<&str> = [
        "activeDeadlineSeconds",
        "tolerations",
        "schedulingGates",
        "terminationGracePeriodSeconds",
    ]
    .into_iter()
    .filter(|k| allowed(k))
    .collect();
    if let Some(m) = n.as_object_mut() {
        for key in copy {
            match o.get(key) {
                Some(v) => m.insert(key.to_owned(), v.clone()),
                None => m.remove(key),
            };
        }
        if get_str(&o, &["nodeName"]).unwrap_or("").is_empty() {
            match o.get("nodeName") {
                Some(v) => m.insert("nodeName".to_owned(), v.clone()),
                None => m.remove("nodeName"),
            };
        }
    }
    if n != o {
        return vec![forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        )];
    }
    Vec::new()
}

// ---- Secret, ConfigMap ----

fn config_keys(map: Option<&Value>, field: &str) -> (Vec<FieldError>, usize) {
    let mut errs = Vec::new();
    let mut size = 0;
    if let Some(m) = map.and_then(Value::as_object) {
        for (k, v) in m {
            let p = format!("{field}[{k}]");
            let valid = !k.is_empty() && k.bytes().all(|c| c.is_ascii_alphanumeric() || b"-._".contains(&c));
            if !valid {
                errs.push(invalid(&p, quote(k), CONFIG_KEY_MSG));
            }
            if k.len() > 253 {
                errs.push(invalid(&p, quote(k), "must be no more than 253 characters"));
            }
            if k == "." || k == ".." {
                errs.push(invalid(&p, quote(k), format!("must not be '{k}'")));
            } else if k.starts_with("..") {
                errs.push(invalid(&p, quote(k), "must not start with '..'"));
            }
            size += v.as_str().map(str::len).unwrap_or(0);
        }
    }
    (errs, size)
}

pub(crate) fn secret(obj: &Value) -> Vec<FieldError> {
    let (mut errs, size) = config_keys(obj.get("data"), "data");
    // data is base64 in JSON; its decoded size is about 3/4 of that.
    if size / 4 * 3 > MAX_SECRET_SIZE {
        errs.push(FieldError::new(
            FieldErrorKind::TooLong,
            "data",
            format!("may not be more than {MAX_SECRET_SIZE} bytes"),
        ));
    }
    let has = |k: &str| get(obj, &["data", k]).is_some();
    let ty = get_str(obj, &["type"]).unwrap_or("Opaque");
    match ty {
        "kubernetes.io/service-account-token"
            if get_str(obj, &["metadata", "annotations", "kubernetes.io/service-account.name"])
                .unwrap_or("")
                .is_empty() =>
        {
            errs.push(required("metadata.annotations[kubernetes.io/service-account.name]", ""))
        }
        "kubernetes.io/dockercfg" if !has(".dockercfg") => errs.push(required("data[.dockercfg]", "")),
        "kubernetes.io/dockerconfigjson" if !has(".dockerconfigjson") => {
            errs.push(required("data[.dockerconfigjson]", ""))
        }
        "kubernetes.io/basic-auth" if !has("username") && !has("password") => {
            errs.push(required("data[username]", ""));
            errs.push(required("data[password]", ""));
        }
        "kubernetes.io/ssh-auth" if !has("ssh-privatekey") => errs.push(required("data[ssh-privatekey]", "")),
        "kubernetes.io/tls" => {
            if !has("tls.key") {
                errs.push(required("data[tls.key]", ""));
            }
            if !has("tls.crt") {
                errs.push(required("data[tls.crt]", ""));
            }
        }
        _ => {}
    }
    errs
}

fn immutable_data(new: &Value, old: &Value, keys: &[&str]) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if old.get("immutable").and_then(Value::as_bool) != Some(true) {
        return errs;
    }
    if new.get("immutable").and_then(Value::as_bool) != Some(true) {
        errs.push(forbidden("immutable", "field is immutable when `immutable` is set"));
    }
    for k in keys {
        if new.get(k) != old.get(k) {
            errs.push(forbidden(*k, "field is immutable when `immutable` is set"));
        }
    }
    errs
}

pub(crate) fn secret_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let ty = |v: &Value| Value::String(get_str(v, &["type"]).unwrap_or("Opaque").to_owned());
    let mut errs: Vec<FieldError> = immutable("type", Some(&ty(new)), Some(&ty(old))).into_iter().collect();
    errs.extend(immutable_data(new, old, &["data"]));
    errs
}

pub(crate) fn config_map(obj: &Value) -> Vec<FieldError> {
    let (mut errs, s1) = config_keys(obj.get("data"), "data");
    let (e2, s2) = config_keys(obj.get("binaryData"), "binaryData");
    errs.extend(e2);
    if let (Some(d), Some(b)) = (
        obj.get("data").and_then(Value::as_object),
        obj.get("binaryData").and_then(Value::as_object),
    ) {
        for k in d.keys().filter(|k| b.contains_key(*k)) {
            errs.push(invalid(
                format!("data[{k}]"),
                quote(k),
                "duplicate of key present in binaryData",
            ));
        }
    }
    if s1 + s2 / 4 * 3 > MAX_SECRET_SIZE {
        errs.push(FieldError::new(
            FieldErrorKind::TooLong,
            "data",
            format!("may not be more than {MAX_SECRET_SIZE} bytes"),
        ));
    }
    errs
}

pub(crate) fn config_map_update(new: &Value, old: &Value) -> Vec<FieldError> {
    immutable_data(new, old, &["data", "binaryData"])
}

// ---- Namespace, Node, Event ----

pub(crate) fn namespace(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for f in get_array(obj, &["spec", "finalizers"]).iter().filter_map(Value::as_str) {
        errs.extend(name_errors("spec.finalizers", f, names::qualified_name(f)));
        if !f.contains('/') && f != "kubernetes" {
            errs.push(invalid(
                "spec.finalizers",
                quote(f),
                "name is neither a standard finalizer name nor is it fully qualified",
            ));
        }
    }
    errs
}

pub(crate) fn node(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    const EFFECTS: &[&str] = &["NoExecute", "NoSchedule", "PreferNoSchedule"];
    for (i, t) in get_array(obj, &["spec", "taints"]).iter().enumerate() {
        let p = format!("spec.taints[{i}]");
        let key = get_str(t, &["key"]).unwrap_or("");
        errs.extend(name_errors(&format!("{p}.key"), key, names::qualified_name(key)));
        match get_str(t, &["effect"]).unwrap_or("") {
            "" => errs.push(required(format!("{p}.effect"), "")),
            e if !EFFECTS.contains(&e) => errs.push(not_supported(format!("{p}.effect"), e, EFFECTS)),
            _ => {}
        }
    }
    errs
}

pub(crate) fn node_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let old_cidr = get_str(old, &["spec", "podCIDR"]).unwrap_or("");
    if !old_cidr.is_empty() && get_str(new, &["spec", "podCIDR"]).unwrap_or("") != old_cidr {
        return vec![forbidden(
            "spec.podCIDRs",
            "node updates may not change podCIDR except from \"\" to valid",
        )];
    }
    Vec::new()
}

/// Core/v1 Events get no `metadata` validation in Kubernetes (only a name is needed to store
/// them); their own rules are `legacyValidateEvent`'s.
pub(crate) fn event_meta(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if get_str(obj, &["metadata", "name"]).unwrap_or("").is_empty() {
        errs.push(required("metadata.name", "name or generateName is required"));
    }
    if get_str(obj, &["metadata", "namespace"]).unwrap_or("").is_empty() {
        errs.push(required("metadata.namespace", ""));
    }
    errs
}

/// `legacyValidateEvent`: namespaces agree; events with `eventTime` (the events.k8s.io shape)
/// also need reportingController, reportingInstance, action and reason within their limits.
pub(crate) fn event(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let ns = get_str(obj, &["metadata", "namespace"]).unwrap_or("");
    let ino = get_str(obj, &["involvedObject", "namespace"]).unwrap_or("");
    let mismatch = || invalid("involvedObject.namespace", quote(ino), "does not match event.namespace");
    let new_style = get(obj, &["eventTime"]).is_some_and(|t| t.as_str().is_some_and(|t| !t.is_empty()));
    if !new_style {
        let ok = if ino.is_empty() {
            ns.is_empty() || ns == "default"
        } else {
            ns == ino
        };
        if !ok {
            errs.push(mismatch());
        }
    } else {
        if ino.is_empty() && ns != "default" && ns != "kube-system" {
            errs.push(mismatch());
        }
        let controller = get_str(obj, &["reportingComponent"]).unwrap_or("");
        if controller.is_empty() {
            errs.push(required("reportingController", ""));
        }
        errs.extend(name_errors(
            "reportingController",
            controller,
            names::qualified_name(controller),
        ));
        for (key, field, limit) in [
            ("reportingInstance", "reportingInstance", 128),
            ("action", "action", 128),
            ("reason", "reason", 128),
        ] {
            let v = get_str(obj, &[key]).unwrap_or("");
            if v.is_empty() {
                errs.push(required(field, ""));
            }
            if v.len() > limit {
                errs.push(invalid(
                    field,
                    quote(""),
                    format!("can have at most {limit} characters"),
                ));
            }
        }
        if get_str(obj, &["message"]).unwrap_or("").len() > 1024 {
            errs.push(invalid("message", quote(""), "can have at most 1024 characters"));
        }
    }
    errs.extend(name_errors("namespace", ns, names::dns1123_subdomain(ns)));
    errs
}

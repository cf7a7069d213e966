//! `storage.k8s.io/v1` kinds (`pkg/apis/storage/validation`): StorageClass, VolumeAttachment,
//! CSIDriver, CSINode, CSIStorageCapacity. Paths are relative to the object (StorageClass has no
//! `spec`), exactly as Kubernetes reports them, including its `spec.attachedRequired` spelling.

use std::collections::BTreeSet;

use serde_json::Value;

use super::core::{csi_driver_name, pv_spec};
use super::meta::validate_label_selector;
use super::{
    duplicate, forbidden, get, get_array, get_str, immutable, invalid, name_errors, not_supported, quote, render,
    required,
};
use crate::quantity;
use crate::{FieldError, FieldErrorKind, names};

const MAX_PARAMETERS: usize = 512;
const MAX_PARAMETERS_SIZE: usize = 256 * 1024;

pub(crate) fn storage_class(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let prov = get_str(obj, &["provisioner"]).unwrap_or("");
    if prov.is_empty() {
        errs.push(required("provisioner", ""));
    } else {
        errs.extend(name_errors(
            "provisioner",
            prov,
            names::qualified_name(&prov.to_lowercase()),
        ));
    }
    if let Some(params) = obj.get("parameters").and_then(Value::as_object) {
        if params.len() > MAX_PARAMETERS {
            errs.push(FieldError::new(
                FieldErrorKind::TooLong,
                "parameters",
                format!("may not have more than {MAX_PARAMETERS} items"),
            ));
        } else {
            let mut size = 0;
            for (k, v) in params {
                if k.is_empty() {
                    errs.push(invalid("parameters", quote(k), "field can not be empty."));
                }
                size += k.len() + v.as_str().map(str::len).unwrap_or(0);
            }
            if size > MAX_PARAMETERS_SIZE {
                errs.push(FieldError::new(
                    FieldErrorKind::TooLong,
                    "parameters",
                    format!("may not be more than {MAX_PARAMETERS_SIZE} bytes"),
                ));
            }
        }
    }
    if let Some(p) = get_str(obj, &["reclaimPolicy"])
        && !p.is_empty()
        && p != "Delete"
        && p != "Retain"
    {
        errs.push(not_supported("reclaimPolicy", p, &["Delete", "Retain"]));
    }
    match get_str(obj, &["volumeBindingMode"]) {
        None => errs.push(required("volumeBindingMode", "")),
        Some(m) if m != "Immediate" && m != "WaitForFirstConsumer" => errs.push(not_supported(
            "volumeBindingMode",
            m,
            &["Immediate", "WaitForFirstConsumer"],
        )),
        Some(_) => {}
    }
    // ValidateTopologySelectorTerm: per expression, values required and unique, then the key;
    // keys unique within a term; terms unique (compared as key -> value set).
    let mut seen: Vec<std::collections::BTreeMap<&str, BTreeSet<&str>>> = Vec::new();
    for (i, term) in get_array(obj, &["allowedTopologies"]).iter().enumerate() {
        let p = format!("allowedTopologies[{i}].matchLabelExpressions");
        let mut expr_map = std::collections::BTreeMap::new();
        for (j, e) in get_array(term, &["matchLabelExpressions"]).iter().enumerate() {
            let key = get_str(e, &["key"]).unwrap_or("");
            let values = get_array(e, &["values"]);
            if values.is_empty() {
                errs.push(required(format!("{p}[{j}].values"), ""));
            }
            let mut vs = BTreeSet::new();
            for (k, v) in values.iter().enumerate() {
                let s = v.as_str().unwrap_or("");
                if !vs.insert(s) {
                    errs.push(duplicate(format!("{p}[{j}].values[{k}]"), quote(s)));
                }
            }
            errs.extend(name_errors(&format!("{p}[{j}].key"), key, names::qualified_name(key)));
            if expr_map.insert(key, vs).is_some() {
                errs.push(duplicate(format!("{p}[{j}].key"), quote(key)));
            }
        }
        if seen.contains(&expr_map) {
            errs.push(duplicate(p, quote("")));
        }
        seen.push(expr_map);
    }
    errs
}

pub(crate) fn storage_class_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let params = |v: &Value| {
        v.get("parameters")
            .filter(|p| p.as_object().is_some_and(|m| !m.is_empty()))
            .cloned()
    };
    if params(new) != params(old) {
        errs.push(forbidden("parameters", "updates to parameters are forbidden."));
    }
    if get_str(new, &["provisioner"]) != get_str(old, &["provisioner"]) {
        errs.push(forbidden("provisioner", "updates to provisioner are forbidden."));
    }
    if get_str(new, &["reclaimPolicy"]) != get_str(old, &["reclaimPolicy"]) {
        errs.push(forbidden("reclaimPolicy", "updates to reclaimPolicy are forbidden."));
    }
    errs.extend(immutable(
        "volumeBindingMode",
        new.get("volumeBindingMode"),
        old.get("volumeBindingMode"),
    ));
    errs
}

pub(crate) fn volume_attachment(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let attacher = get_str(obj, &["spec", "attacher"]).unwrap_or("");
    if attacher.is_empty() {
        errs.push(required("spec.attacher", ""));
    }
    errs.extend(csi_driver_name(attacher, "spec.attacher"));
    let pv = get(obj, &["spec", "source", "persistentVolumeName"]).filter(|v| !v.is_null());
    let inline = get(obj, &["spec", "source", "inlineVolumeSpec"]).filter(|v| !v.is_null());
    const ONE: &str = "must specify exactly one of inlineVolumeSpec and persistentVolumeName";
    match (pv, inline) {
        (None, None) => errs.push(required("spec.source", ONE)),
        (Some(_), Some(_)) => errs.push(forbidden("spec.source", ONE)),
        (Some(pv), None) => {
            let name = pv.as_str().unwrap_or("");
            if name.is_empty() {
                errs.push(required(
                    "spec.source.persistentVolumeName",
                    "must specify non empty persistentVolumeName",
                ));
            } else {
                errs.extend(name_errors(
                    "spec.source.persistentVolumeName",
                    name,
                    names::dns1123_subdomain(name),
                ));
            }
        }
        (None, Some(spec)) => errs.extend(pv_spec(spec, "spec.source.inlineVolumeSpec", true)),
    }
    let node = get_str(obj, &["spec", "nodeName"]).unwrap_or("");
    errs.extend(name_errors("spec.nodeName", node, names::dns1123_subdomain(node)));
    if let Some(md) = get(obj, &["status", "attachmentMetadata"]).and_then(Value::as_object) {
        let size: usize = md
            .iter()
            .map(|(k, v)| k.len() + v.as_str().map(str::len).unwrap_or(0))
            .sum();
        if size > MAX_PARAMETERS_SIZE {
            errs.push(FieldError::new(
                FieldErrorKind::TooLong,
                "status.attachmentMetadata",
                format!("may not be more than {MAX_PARAMETERS_SIZE} bytes"),
            ));
        }
    }
    for key in ["attachError", "detachError"] {
        if let Some(msg) = get_str(obj, &["status", key, "message"])
            && msg.len() > 1024
        {
            errs.push(FieldError::new(
                FieldErrorKind::TooLong,
                format!("status.{key}.message"),
                "may not be more than 1024 bytes",
            ));
        }
    }
    errs
}

pub(crate) fn volume_attachment_update(new: &Value, old: &Value) -> Vec<FieldError> {
    match (new.get("spec"), old.get("spec")) {
        (n, o) if n == o => Vec::new(),
        (n, _) => vec![invalid("spec", n.map(render).unwrap_or_default(), "field is immutable")],
    }
}

pub(crate) fn csi_driver(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    for (key, path) in [
        ("attachRequired", "spec.attachedRequired"),
        ("podInfoOnMount", "spec.podInfoOnMount"),
        ("storageCapacity", "spec.storageCapacity"),
        ("seLinuxMount", "spec.seLinuxMount"),
    ] {
        if spec.get(key).is_none_or(Value::is_null) {
            errs.push(required(path, ""));
        }
    }
    if let Some(p) = get_str(&spec, &["fsGroupPolicy"]) {
        const P: &[&str] = &["File", "None", "ReadWriteOnceWithFSType"];
        if !P.contains(&p) {
            errs.push(not_supported("spec.fsGroupPolicy", p, P));
        }
    }
    let mut auds = BTreeSet::new();
    for (i, t) in get_array(&spec, &["tokenRequests"]).iter().enumerate() {
        let p = format!("spec.tokenRequests[{i}]");
        let aud = get_str(t, &["audience"]).unwrap_or("");
        if !auds.insert(aud) {
            errs.push(duplicate(format!("{p}.audience"), quote(aud)));
            continue;
        }
        if let Some(s) = t.get("expirationSeconds").and_then(Value::as_i64) {
            if s < 600 {
                errs.push(invalid(
                    format!("{p}.expirationSeconds"),
                    s.to_string(),
                    "may not specify a duration less than 10 minutes",
                ));
            }
            if s > 1 << 32 {
                errs.push(invalid(
                    format!("{p}.expirationSeconds"),
                    s.to_string(),
                    "may not specify a duration larger than 2^32 seconds",
                ));
            }
        }
    }
    for m in get_array(&spec, &["volumeLifecycleModes"])
        .iter()
        .filter_map(Value::as_str)
    {
        if m != "Persistent" && m != "Ephemeral" {
            errs.push(not_supported(
                "spec.volumeLifecycleModes",
                m,
                &["Persistent", "Ephemeral"],
            ));
        }
    }
    if let Some(p) = spec.get("nodeAllocatableUpdatePeriodSeconds").and_then(Value::as_i64)
        && p < 10
    {
        errs.push(invalid(
            "spec.nodeAllocatableUpdatePeriodSeconds",
            p.to_string(),
            "must be greater than or equal to 10 seconds",
        ));
    }
    errs
}

pub(crate) fn csi_driver_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    errs.extend(immutable(
        "spec.attachedRequired",
        get(new, &["spec", "attachRequired"]),
        get(old, &["spec", "attachRequired"]),
    ));
    errs.extend(immutable(
        "spec.volumeLifecycleModes",
        get(new, &["spec", "volumeLifecycleModes"]),
        get(old, &["spec", "volumeLifecycleModes"]),
    ));
    errs
}

pub(crate) fn csi_node(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut names_seen = BTreeSet::new();
    for (i, d) in get_array(obj, &["spec", "drivers"]).iter().enumerate() {
        let p = format!("spec.drivers[{i}]");
        let name = get_str(d, &["name"]).unwrap_or("");
        errs.extend(csi_driver_name(name, &format!("{p}.name")));
        let id = get_str(d, &["nodeID"]).unwrap_or("");
        if id.is_empty() {
            errs.push(required(format!("{p}.nodeID"), ""));
        }
        if id.len() > 192 {
            errs.push(invalid(
                format!("{p}.nodeID"),
                quote(id),
                "must be 192 characters or less",
            ));
        }
        if let Some(c) = get(d, &["allocatable", "count"]).and_then(Value::as_i64)
            && c < 0
        {
            errs.push(invalid(
                format!("{p}.allocatable.count"),
                c.to_string(),
                "must be greater than or equal to 0",
            ));
        }
        if !names_seen.insert(name) {
            errs.push(duplicate(format!("{p}.name"), quote(name)));
        }
        let mut keys = BTreeSet::new();
        for key in get_array(d, &["topologyKeys"]).iter().filter_map(Value::as_str) {
            if key.is_empty() {
                errs.push(required(&p, ""));
            }
            if !keys.insert(key) {
                errs.push(duplicate(&p, quote(key)));
            }
            errs.extend(name_errors(&p, key, names::qualified_name(key)));
        }
    }
    errs
}

pub(crate) fn csi_node_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let strip = |d: &Value| {
        let mut d = d.clone();
        if let Some(m) = d.as_object_mut() {
            m.remove("allocatable");
        }
        d
    };
    for od in get_array(old, &["spec", "drivers"]) {
        for nd in get_array(new, &["spec", "drivers"]) {
            if get_str(od, &["name"]) == get_str(nd, &["name"]) && strip(od) != strip(nd) {
                errs.push(invalid("spec.drivers", render(nd), "field is immutable"));
            }
        }
    }
    errs
}

pub(crate) fn csi_storage_capacity(obj: &Value) -> Vec<FieldError> {
    let mut errs = validate_label_selector(obj.get("nodeTopology").filter(|v| !v.is_null()), "nodeTopology");
    let class = get_str(obj, &["storageClassName"]).unwrap_or("");
    errs.extend(name_errors("storageClassName", class, names::dns1123_subdomain(class)));
    for key in ["capacity", "maximumVolumeSize"] {
        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
            match quantity::from_json(v) {
                Err(e) => errs.push(invalid(key, render(v), e.to_string())),
                Ok(q) if q.is_negative() => errs.push(invalid(
                    key,
                    quote(&q.canonical()),
                    "must be greater than or equal to 0",
                )),
                Ok(_) => {}
            }
        }
    }
    errs
}

pub(crate) fn csi_storage_capacity_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if new.get("nodeTopology") != old.get("nodeTopology") {
        errs.push(invalid(
            "nodeTopology",
            new.get("nodeTopology").map(render).unwrap_or_default(),
            "field is immutable",
        ));
    }
    if get_str(new, &["storageClassName"]) != get_str(old, &["storageClassName"]) {
        errs.push(invalid(
            "storageClassName",
            quote(get_str(new, &["storageClassName"]).unwrap_or("")),
            "field is immutable",
        ));
    }
    errs
}

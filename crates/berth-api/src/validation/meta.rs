//! `metadata` rules shared by every kind (`ValidateObjectMeta`, `ValidateObjectMetaUpdate`),
//! label maps and label selectors.

use serde_json::Value;

use super::{forbidden, get, get_array, get_str, immutable, invalid, name_errors, quote, required};
use crate::{FieldError, FieldErrorKind, Resource, names};

const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;
const STANDARD_FINALIZERS: &[&str] = &["kubernetes", "orphan", "foregroundDeletion"];

/// The name rule of a kind: Namespaces are RFC 1123 labels, everything else a subdomain.
fn name_rule(res: &Resource) -> fn(&str) -> Vec<String> {
    match res.kind {
        "Namespace" => names::dns1123_label,
        _ => names::dns1123_subdomain,
    }
}

pub(crate) fn validate_object_meta(res: &Resource, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let meta = obj.get("metadata").cloned().unwrap_or(Value::Null);
    let rule = name_rule(res);
    let name = get_str(&meta, &["name"]).unwrap_or("");
    let generate = get_str(&meta, &["generateName"]).unwrap_or("");
    if !generate.is_empty() {
        // A prefix may end in '-': Kubernetes' maskTrailingDash turns `x-` into a checkable name
        // (it drops the last two characters and appends `a`).
        // Bytes, as Kubernetes slices them; a cut through a multi-byte character becomes U+FFFD,
        // which the name rule refuses, as Kubernetes does.
        let bytes = generate.as_bytes();
        let probe = if bytes.len() > 1 && generate.ends_with('-') {
            let mut masked = bytes[..bytes.len() - 2].to_vec();
            masked.push(b'a');
            String::from_utf8_lossy(&masked).into_owned()
        } else {
            generate.to_owned()
        };
        errs.extend(name_errors("metadata.generateName", generate, rule(&probe)));
    }
    if name.is_empty() {
        errs.push(required("metadata.name", "name or generateName is required"));
    } else {
        errs.extend(name_errors("metadata.name", name, rule(name)));
    }
    let ns = get_str(&meta, &["namespace"]).unwrap_or("");
    if res.namespaced() {
        if ns.is_empty() {
            errs.push(required("metadata.namespace", ""));
        } else {
            errs.extend(name_errors("metadata.namespace", ns, names::dns1123_label(ns)));
        }
    } else if !ns.is_empty() {
        errs.push(forbidden("metadata.namespace", "not allowed on this type"));
    }
    if let Some(g) = get(&meta, &["generation"]).and_then(Value::as_i64)
        && g < 0
    {
        errs.push(invalid(
            "metadata.generation",
            g.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    errs.extend(validate_labels(get(&meta, &["labels"]), "metadata.labels"));
    errs.extend(validate_annotations(
        get(&meta, &["annotations"]),
        "metadata.annotations",
    ));
    errs.extend(validate_finalizers(
        get_array(&meta, &["finalizers"]),
        "metadata.finalizers",
    ));
    for (i, r) in get_array(&meta, &["ownerReferences"]).iter().enumerate() {
        let p = format!("metadata.ownerReferences[{i}]");
        for f in ["apiVersion", "kind", "name", "uid"] {
            if get_str(r, &[f]).unwrap_or("").is_empty() {
                errs.push(invalid(format!("{p}.{f}"), quote(""), format!("{f} must not be empty")));
            }
        }
    }
    errs
}

/// `ValidateLabels`: every key a qualified name, every value a label value.
pub fn validate_labels(labels: Option<&Value>, field: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let Some(map) = labels.and_then(Value::as_object) else {
        return errs;
    };
    for (k, v) in map {
        errs.extend(name_errors(field, k, names::qualified_name(k)));
        let v = v.as_str().unwrap_or("");
        errs.extend(name_errors(field, v, names::label_value(v)));
    }
    errs
}

fn validate_annotations(annotations: Option<&Value>, field: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let Some(map) = annotations.and_then(Value::as_object) else {
        return errs;
    };
    let mut total = 0usize;
    for (k, v) in map {
        errs.extend(name_errors(field, k, names::qualified_name(&k.to_lowercase())));
        total += k.len() + v.as_str().map(str::len).unwrap_or(0);
    }
    if total > TOTAL_ANNOTATION_SIZE_LIMIT {
        errs.push(FieldError::new(
            FieldErrorKind::TooLong,
            field,
            format!("may not be more than {TOTAL_ANNOTATION_SIZE_LIMIT} bytes"),
        ));
    }
    errs
}

fn validate_finalizers(finalizers: &[Value], field: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let names: Vec<&str> = finalizers.iter().filter_map(Value::as_str).collect();
    for f in &names {
        errs.extend(name_errors(field, f, names::qualified_name(f)));
        if !f.contains('/') && !STANDARD_FINALIZERS.contains(f) {
            errs.push(invalid(
                field,
                quote(f),
                "name is neither a standard finalizer name nor is it fully qualified",
            ));
        }
    }
    if names.contains(&"orphan") && names.contains(&"foregroundDeletion") {
        errs.push(invalid(
            field,
            serde_json::to_string(&names).unwrap_or_default(),
            "finalizer orphan and foregroundDeletion cannot be both set",
        ));
    }
    errs
}

pub(crate) fn validate_object_meta_update(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for f in ["name", "namespace", "uid", "creationTimestamp"] {
        let n = get(new, &["metadata", f]);
        let o = get(old, &["metadata", f]);
        // An unset uid or creationTimestamp in the new body means "keep": the server fills them.
        if n.is_none() && matches!(f, "uid" | "creationTimestamp") {
            continue;
        }
        errs.extend(immutable(&format!("metadata.{f}"), n, o));
    }
    if get(old, &["metadata", "deletionTimestamp"]).is_some() {
        let old_f: Vec<&Value> = get_array(old, &["metadata", "finalizers"]).iter().collect();
        let added: Vec<&str> = get_array(new, &["metadata", "finalizers"])
            .iter()
            .filter(|f| !old_f.contains(f))
            .filter_map(Value::as_str)
            .collect();
        if !added.is_empty() {
            errs.push(forbidden(
                "metadata.finalizers",
                format!(
                    "no new finalizers can be added if the object is being deleted, found new finalizers {}",
                    serde_json::to_string(&added).unwrap_or_default()
                ),
            ));
        }
    }
    errs
}

/// `ValidateLabelSelector` for a `metav1.LabelSelector` at `field`.
pub fn validate_label_selector(sel: Option<&Value>, field: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let Some(sel) = sel else {
        return errs;
    };
    for (i, e) in get_array(sel, &["matchExpressions"]).iter().enumerate() {
        let p = format!("{field}.matchExpressions[{i}]");
        let op = get_str(e, &["operator"]).unwrap_or("");
        let n_values = get_array(e, &["values"]).len();
        match op {
            "In" | "NotIn" if n_values == 0 => errs.push(required(
                format!("{p}.values"),
                "must be specified when `operator` is 'In' or 'NotIn'",
            )),
            "Exists" | "DoesNotExist" if n_values > 0 => errs.push(forbidden(
                format!("{p}.values"),
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            _ => errs.push(invalid(
                format!("{p}.operator"),
                quote(op),
                "not a valid selector operator",
            )),
        }
        let key = get_str(e, &["key"]).unwrap_or("");
        errs.extend(name_errors(&format!("{p}.key"), key, names::qualified_name(key)));
    }
    errs.extend(validate_labels(
        get(sel, &["matchLabels"]),
        &format!("{field}.matchLabels"),
    ));
    errs
}

//! Validation, as the Kubernetes API server does after defaulting: every error names its field
//! path; an empty list means valid. Immutable fields are checked on update.
//!
//! Each object is first read through its typed form (k8s-openapi, or [`crate::snapshot`]): a
//! body that does not fit the type gives `TypeInvalid` (or `Required` for a missing required
//! field) at the offending path, and no further rule runs. The rules then follow
//! `pkg/apis/core/validation`, `pkg/apis/storage/validation` and the external-snapshotter CRD
//! schemas, with their paths and messages. Never panics, whatever the input.

mod core;
mod meta;
mod snapshot;
mod storage;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{FieldError, FieldErrorKind, Resource};

pub use meta::{validate_label_selector, validate_labels};

/// Checks a new object (after defaulting).
pub fn validate_create(res: &Resource, obj: &Value) -> Vec<FieldError> {
    if let Err(errs) = decode_kind(res, obj) {
        return errs;
    }
    let mut errs = object_meta(res, obj);
    errs.extend(validate_kind(res, obj));
    errs
}

fn object_meta(res: &Resource, obj: &Value) -> Vec<FieldError> {
    match res.kind {
        "Event" => core::event_meta(obj),
        _ => meta::validate_object_meta(res, obj),
    }
}

/// Checks an update of the main resource: the new object's own rules plus immutable fields.
pub fn validate_update(res: &Resource, new: &Value, old: &Value) -> Vec<FieldError> {
    validate_update_of(res, UpdatePart::Main, new, old, Decodes::Unknown)
}

/// Which part of an object an update writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdatePart {
    /// Metadata and spec: [`validate_update`].
    Main,
    /// The `status` subresource: [`validate_status_update`].
    Status,
    /// Both at once (an in-process controller's write): [`validate_update_all`].
    Both,
}

/// Whether the new object is known to fit its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decodes {
    /// A request body: read through the typed form first.
    Unknown,
    /// The encoding of a typed object (an in-process controller's write), changed only by the
    /// server's own defaulting and system fields: it fits by construction, so only the rules run.
    Known,
}

/// The checks of an update of `part`; see [`Decodes`] for when the type check is skipped.
pub fn validate_update_of(
    res: &Resource,
    part: UpdatePart,
    new: &Value,
    old: &Value,
    decodes: Decodes,
) -> Vec<FieldError> {
    if decodes == Decodes::Unknown
        && let Err(errs) = decode_kind(res, new)
    {
        return errs;
    }
    match part {
        UpdatePart::Main => update_rules(res, new, old),
        UpdatePart::Status => {
            let mut errs = object_meta(res, new);
            errs.extend(meta::validate_object_meta_update(new, old));
            errs.extend(status_rules(res, new));
            errs
        }
        UpdatePart::Both => {
            let mut errs = update_rules(res, new, old);
            errs.extend(status_rules(res, new));
            errs
        }
    }
}

/// The rules of a status field, for an object that decodes.
fn status_rules(res: &Resource, new: &Value) -> Vec<FieldError> {
    match res.kind {
        "PersistentVolume" => core::pv_status(new),
        "PersistentVolumeClaim" => core::pvc_status(new),
        _ => Vec::new(),
    }
}

/// The rules of an update, for an object that decodes.
fn update_rules(res: &Resource, new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = object_meta(res, new);
    errs.extend(meta::validate_object_meta_update(new, old));
    errs.extend(validate_kind(res, new));
    errs.extend(validate_kind_update(res, new, old));
    errs
}

/// Checks a write of spec and status together (an in-process controller's update): the errors of
/// [`validate_update`] and of [`validate_status_update`], with the object decoded and its
/// metadata checked once.
pub fn validate_update_all(res: &Resource, new: &Value, old: &Value) -> Vec<FieldError> {
    validate_update_of(res, UpdatePart::Both, new, old, Decodes::Unknown)
}

/// Checks an update through the `status` subresource: the metadata rules of an update, and the
/// status fields' own rules. (The server keeps the old spec on status writes.)
pub fn validate_status_update(res: &Resource, new: &Value, old: &Value) -> Vec<FieldError> {
    validate_update_of(res, UpdatePart::Status, new, old, Decodes::Unknown)
}

fn validate_kind(res: &Resource, obj: &Value) -> Vec<FieldError> {
    match res.kind {
        "PersistentVolume" => core::pv(obj),
        "PersistentVolumeClaim" => core::pvc(obj),
        "Pod" => core::pod(obj),
        "Secret" => core::secret(obj),
        "ConfigMap" => core::config_map(obj),
        "Namespace" => core::namespace(obj),
        "Node" => core::node(obj),
        "Event" => core::event(obj),
        "StorageClass" => storage::storage_class(obj),
        "VolumeAttachment" => storage::volume_attachment(obj),
        "CSIDriver" => storage::csi_driver(obj),
        "CSINode" => storage::csi_node(obj),
        "CSIStorageCapacity" => storage::csi_storage_capacity(obj),
        "VolumeSnapshot" => snapshot::volume_snapshot(obj),
        "VolumeSnapshotContent" => snapshot::volume_snapshot_content(obj),
        "VolumeSnapshotClass" => snapshot::volume_snapshot_class(obj),
        _ => Vec::new(),
    }
}

fn validate_kind_update(res: &Resource, new: &Value, old: &Value) -> Vec<FieldError> {
    match res.kind {
        "PersistentVolume" => core::pv_update(new, old),
        "PersistentVolumeClaim" => core::pvc_update(new, old),
        "Pod" => core::pod_update(new, old),
        "Secret" => core::secret_update(new, old),
        "ConfigMap" => core::config_map_update(new, old),
        "Node" => core::node_update(new, old),
        "StorageClass" => storage::storage_class_update(new, old),
        "VolumeAttachment" => storage::volume_attachment_update(new, old),
        "CSIDriver" => storage::csi_driver_update(new, old),
        "CSINode" => storage::csi_node_update(new, old),
        "CSIStorageCapacity" => storage::csi_storage_capacity_update(new, old),
        "VolumeSnapshot" => snapshot::volume_snapshot_update(new, old),
        "VolumeSnapshotContent" => snapshot::volume_snapshot_content_update(new, old),
        "VolumeSnapshotClass" => snapshot::volume_snapshot_class_update(new, old),
        _ => Vec::new(),
    }
}

/// The `Status` (422 Invalid) Kubernetes answers with for `errs` on the object `name` of kind
/// `res`: message `PersistentVolumeClaim "data" is invalid: [spec.accessModes: Required value, ...]`
/// (one error unbracketed; duplicates once), and one `details.causes` entry per error.
pub fn invalid_status(res: &Resource, name: &str, errs: &[FieldError]) -> Value {
    let qualified = if res.group.is_empty() {
        res.kind.to_owned()
    } else {
        format!("{}.{}", res.kind, res.group)
    };
    let mut seen = std::collections::BTreeSet::new();
    let messages: Vec<String> = errs
        .iter()
        .map(ToString::to_string)
        .filter(|m| seen.insert(m.clone()))
        .collect();
    let aggregate = match messages.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let causes: Vec<Value> = errs
        .iter()
        .map(|e| {
            let full = e.to_string();
            let body = full.strip_prefix(&format!("{}: ", e.field)).unwrap_or(&full).to_owned();
            serde_json::json!({"reason": e.kind.reason(), "message": body, "field": e.field})
        })
        .collect();
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("{qualified} {} is invalid: {aggregate}", quote(name)),
        "reason": "Invalid",
        "details": {"name": name, "group": res.group, "kind": res.kind, "causes": causes},
        "code": 422,
    })
}

/// Reads `obj` through the typed form of `res`, reporting where it does not fit.
pub fn decode_kind(res: &Resource, obj: &Value) -> Result<(), Vec<FieldError>> {
    use k8s_openapi::api::{core::v1 as core, storage::v1 as st};
    if !obj.is_object() {
        return Err(vec![
            FieldError::new(FieldErrorKind::TypeInvalid, "<root>", "expected a JSON object").with_value(render(obj)),
        ]);
    }
    // The typed forms insist on apiVersion, kind and metadata; the server owns those, so they are
    // supplied here when missing rather than reported. Stored objects have all three, so the
    // copy is only made for the rare body that lacks one.
    let complete = ["apiVersion", "kind", "metadata"].iter().all(|k| obj.get(k).is_some());
    let filled;
    let v = if complete {
        obj
    } else {
        let mut c = obj.clone();
        if let Some(m) = c.as_object_mut() {
            m.entry("apiVersion")
                .or_insert_with(|| Value::String(res.api_version()));
            m.entry("kind").or_insert_with(|| Value::String(res.kind.to_owned()));
            m.entry("metadata").or_insert_with(|| Value::Object(Default::default()));
        }
        filled = c;
        &filled
    };
    match res.kind {
        "PersistentVolume" => decode::<core::PersistentVolume>(v),
        "PersistentVolumeClaim" => decode::<core::PersistentVolumeClaim>(v),
        "Pod" => decode::<core::Pod>(v),
        "Secret" => decode::<core::Secret>(v),
        "ConfigMap" => decode::<core::ConfigMap>(v),
        "Namespace" => decode::<core::Namespace>(v),
        "Node" => decode::<core::Node>(v),
        "Event" => decode::<core::Event>(v),
        "StorageClass" => decode::<st::StorageClass>(v),
        "VolumeAttachment" => decode::<st::VolumeAttachment>(v),
        "CSIDriver" => decode::<st::CSIDriver>(v),
        "CSINode" => decode::<st::CSINode>(v),
        "CSIStorageCapacity" => decode::<st::CSIStorageCapacity>(v),
        "VolumeSnapshot" => decode::<crate::snapshot::VolumeSnapshot>(v),
        "VolumeSnapshotContent" => decode::<crate::snapshot::VolumeSnapshotContent>(v),
        "VolumeSnapshotClass" => decode::<crate::snapshot::VolumeSnapshotClass>(v),
        _ => Ok(()),
    }
}

/// The fields of `obj` that its kind does not have, as Kubernetes' strict field validation
/// reports them (`spec.foo`, `spec.containers[0].imagePullPolicyy`), for `fieldValidation=Strict`
/// (400: `strict decoding error: unknown field "spec.foo"`) or `Warn`. Empty if the body does not
/// decode at all (validation reports that) or if every field is known. Explicit `null`s count as
/// known, as they do in Kubernetes.
pub fn unknown_fields(res: &Resource, obj: &Value) -> Vec<String> {
    use k8s_openapi::api::{core::v1 as core, storage::v1 as st};
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.entry("apiVersion")
            .or_insert_with(|| Value::String(res.api_version()));
        m.entry("kind").or_insert_with(|| Value::String(res.kind.to_owned()));
        m.entry("metadata").or_insert_with(|| Value::Object(Default::default()));
    }
    let known = match res.kind {
        "PersistentVolume" => roundtrip::<core::PersistentVolume>(&v),
        "PersistentVolumeClaim" => roundtrip::<core::PersistentVolumeClaim>(&v),
        "Pod" => roundtrip::<core::Pod>(&v),
        "Secret" => roundtrip::<core::Secret>(&v),
        "ConfigMap" => roundtrip::<core::ConfigMap>(&v),
        "Namespace" => roundtrip::<core::Namespace>(&v),
        "Node" => roundtrip::<core::Node>(&v),
        "Event" => roundtrip::<core::Event>(&v),
        "StorageClass" => roundtrip::<st::StorageClass>(&v),
        "VolumeAttachment" => roundtrip::<st::VolumeAttachment>(&v),
        "CSIDriver" => roundtrip::<st::CSIDriver>(&v),
        "CSINode" => roundtrip::<st::CSINode>(&v),
        "CSIStorageCapacity" => roundtrip::<st::CSIStorageCapacity>(&v),
        "VolumeSnapshot" => roundtrip::<crate::snapshot::VolumeSnapshot>(&v),
        "VolumeSnapshotContent" => roundtrip::<crate::snapshot::VolumeSnapshotContent>(&v),
        "VolumeSnapshotClass" => roundtrip::<crate::snapshot::VolumeSnapshotClass>(&v),
        _ => None,
    };
    let mut out = Vec::new();
    if let Some(known) = known {
        missing_keys(&v, &known, String::new(), &mut out);
    }
    out
}

fn roundtrip<T: DeserializeOwned + serde::Serialize>(v: &Value) -> Option<Value> {
    let typed: T = serde_json::from_value(v.clone()).ok()?;
    serde_json::to_value(typed).ok()
}

/// Keys of `given` (recursively) that `known` lacks.
fn missing_keys(given: &Value, known: &Value, path: String, out: &mut Vec<String>) {
    match (given, known) {
        (Value::Object(g), Value::Object(k)) => {
            for (key, gv) in g {
                let p = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match k.get(key) {
                    Some(kv) => missing_keys(gv, kv, p, out),
                    None if gv.is_null() => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(g), Value::Array(k)) => {
            for (i, (gv, kv)) in g.iter().zip(k).enumerate() {
                missing_keys(gv, kv, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Deserializes `v` into `T`, turning a serde error into one `FieldError` at its path.
pub(crate) fn decode<T: DeserializeOwned>(v: &Value) -> Result<(), Vec<FieldError>> {
    // Most bodies decode: check that without the path tracking, which copies out every key it
    // passes, and decode again with it only to say where a failure is.
    if T::deserialize(v).is_ok() {
        return Ok(());
    }
    match serde_path_to_error::deserialize::<_, T>(v) {
        Ok(_) => Ok(()),
        Err(e) => {
            let mut path = String::new();
            for seg in e.path().iter() {
                match seg {
                    serde_path_to_error::Segment::Seq { index } => path.push_str(&format!("[{index}]")),
                    serde_path_to_error::Segment::Map { key } => {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(key);
                    }
                    serde_path_to_error::Segment::Enum { variant } => {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(variant);
                    }
                    serde_path_to_error::Segment::Unknown => {}
                }
            }
            let msg = e.inner().to_string();
            if let Some(field) = msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
                let full = if path.is_empty() {
                    field.to_owned()
                } else {
                    format!("{path}.{field}")
                };
                return Err(vec![FieldError::new(FieldErrorKind::Required, full, "")]);
            }
            let path = if path.is_empty() { "<root>".to_owned() } else { path };
            Err(vec![FieldError::new(FieldErrorKind::TypeInvalid, path, msg)])
        }
    }
}

// ---- small accessors over JSON, shared by the rule modules ----

/// The value at `path` (object keys), if every step exists.
pub(crate) fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    Some(cur)
}

pub(crate) fn get_str<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path).and_then(Value::as_str)
}

pub(crate) fn get_array<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    get(v, path).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

/// A value rendered as Kubernetes puts it in a message: strings quoted, the rest as JSON.
pub(crate) fn render(v: &Value) -> String {
    match v {
        Value::String(s) => quote(s),
        other => other.to_string(),
    }
}

pub(crate) fn quote(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

pub(crate) fn required(field: impl Into<String>, detail: &str) -> FieldError {
    FieldError::new(FieldErrorKind::Required, field, detail)
}

pub(crate) fn invalid(field: impl Into<String>, value: String, detail: impl Into<String>) -> FieldError {
    FieldError::new(FieldErrorKind::Invalid, field, detail).with_value(value)
}

pub(crate) fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
    FieldError::new(FieldErrorKind::Forbidden, field, detail)
}

pub(crate) fn duplicate(field: impl Into<String>, value: String) -> FieldError {
    FieldError::new(FieldErrorKind::Duplicate, field, "").with_value(value)
}

/// `Unsupported value: "X": supported values: "A", "B"` (values listed as given, sorted by caller).
pub(crate) fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> FieldError {
    let list: Vec<String> = supported.iter().map(|s| quote(s)).collect();
    FieldError::new(
        FieldErrorKind::NotSupported,
        field,
        format!("supported values: {}", list.join(", ")),
    )
    .with_value(quote(value))
}

/// `ValidateImmutableField`: `field: Invalid value: <new>: field is immutable`.
pub(crate) fn immutable(field: &str, new: Option<&Value>, old: Option<&Value>) -> Option<FieldError> {
    if new == old {
        return None;
    }
    Some(invalid(
        field,
        new.map(render).unwrap_or_else(|| "null".to_owned()),
        "field is immutable",
    ))
}

/// Runs a name check (returning messages) and turns each into `Invalid` at `field`.
pub(crate) fn name_errors(field: &str, value: &str, msgs: Vec<String>) -> Vec<FieldError> {
    msgs.into_iter().map(|m| invalid(field, quote(value), m)).collect()
}

#[cfg(test)]
mod tests;

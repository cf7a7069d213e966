//! The request decoder: turns a request body into the object it names, or a 4xx. It never
//! panics and never answers 5xx, whatever the bytes (a proptest and a fuzz target feed it
//! arbitrary input).
//!
//! Steps, as Kubernetes takes them: size limit (413); content type (JSON or YAML; 415
//! otherwise); syntax (400); `apiVersion`/`kind` against the URL (400); the object read
//! through its k8s-openapi type and written back, which drops fields the type does not have
//! (reported as warnings, or 400 under `fieldValidation=Strict`) and rejects wrong types (400).

use berth_api::Resource;
use serde_json::Value;

use crate::error::ApiError;

/// Bodies above this get 413, as Kubernetes' 3 MiB request limit.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// What to do with fields the kind does not have (`?fieldValidation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        match s {
            "Ignore" => Ok(FieldValidation::Ignore),
            "Warn" | "" => Ok(FieldValidation::Warn),
            "Strict" => Ok(FieldValidation::Strict),
            other => Err(ApiError::BadRequest(format!(
                "fieldValidation must be one of Ignore, Warn or Strict, not {other:?}"
            ))),
        }
    }
}

/// A decoded object and the warnings to send with the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub object: Value,
    pub warnings: Vec<String>,
}

/// The syntax of a body, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    Json,
    Yaml,
}

impl Syntax {
    /// JSON when no Content-Type is given, as Kubernetes assumes.
    pub fn from_content_type(ct: Option<&str>) -> Result<Syntax, ApiError> {
        let Some(ct) = ct else { return Ok(Syntax::Json) };
        let media = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match media.as_str() {
            "application/json" | "" | "*/*" => Ok(Syntax::Json),
            "application/yaml" | "application/x-yaml" | "text/yaml" => Ok(Syntax::Yaml),
            _ => Err(ApiError::UnsupportedMediaType(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {media:?})"
            ))),
        }
    }
}

/// Parses `body` as a JSON value (JSON or YAML syntax).
pub fn parse(syntax: Syntax, body: &[u8]) -> Result<Value, ApiError> {
    if body.len() > MAX_BODY {
        return Err(ApiError::TooLarge(MAX_BODY));
    }
    let v: Value = match syntax {
        Syntax::Json => serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?,
        Syntax::Yaml => {
            let text = std::str::from_utf8(body)
                .map_err(|e| ApiError::BadRequest(format!("the body is not valid UTF-8 YAML: {e}")))?;
            serde_saphyr::from_str(text)
                .map_err(|e| ApiError::BadRequest(format!("the body is not valid YAML: {e}")))?
        }
    };
    Ok(v)
}

/// Decodes the body of a create or update of kind `res`.
pub fn decode_object(
    res: &Resource,
    content_type: Option<&str>,
    body: &[u8],
    validation: FieldValidation,
) -> Result<Decoded, ApiError> {
    let syntax = Syntax::from_content_type(content_type)?;
    let value = parse(syntax, body)?;
    check_object(res, value, validation)
}

/// The checks after parsing: kind, apiVersion, types, unknown fields.
pub fn check_object(res: &Resource, value: Value, validation: FieldValidation) -> Result<Decoded, ApiError> {
    let Value::Object(map) = &value else {
        return Err(ApiError::BadRequest(format!(
            "the body must be a JSON object (a {}), not {}",
            res.kind,
            type_name(&value)
        )));
    };
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if kind.is_empty() {
        return Err(ApiError::BadRequest(
            "Object 'Kind' is missing in the request body".into(),
        ));
    }
    if api_version.is_empty() {
        return Err(ApiError::BadRequest(
            "Object 'apiVersion' is missing in the request body".into(),
        ));
    }
    let expected = res.api_version();
    if api_version != expected {
        return Err(ApiError::BadRequest(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({expected})"
        )));
    }
    if kind != res.kind {
        return Err(ApiError::BadRequest(format!(
            "the kind in the data ({kind}) does not match the expected kind ({}) for {}",
            res.kind, res.plural
        )));
    }
    if let Some(m) = map.get("metadata")
        && !m.is_object()
        && !m.is_null()
    {
        return Err(ApiError::BadRequest(format!(
            "{kind} in version \"{}\" cannot be handled as a {kind}: metadata must be an object",
            res.version
        )));
    }
    let typed = match roundtrip(res, &value) {
        None => value.clone(),
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            return Err(ApiError::BadRequest(format!(
                "{kind} in version \"{}\" cannot be handled as a {kind}: {e}",
                res.version
            )));
        }
    };
    let mut unknown = Vec::new();
    unknown_fields(&value, &typed, &mut String::new(), &mut unknown);
    let warnings: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
    match validation {
        FieldValidation::Strict if !warnings.is_empty() => Err(ApiError::BadRequest(format!(
            "strict decoding error: {}",
            warnings.join(", ")
        ))),
        FieldValidation::Ignore => Ok(Decoded {
            object: typed,
            warnings: Vec::new(),
        }),
        _ => Ok(Decoded {
            object: typed,
            warnings,
        }),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads `v` through the k8s-openapi type of `res` and writes it back: the object as
/// Kubernetes would store it. `None` for kinds without a k8s-openapi type (the snapshot
/// kinds), which are kept as sent.
fn roundtrip(res: &Resource, v: &Value) -> Option<Result<Value, String>> {
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::storage::v1 as storage;
    fn rt<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<Value, String> {
        let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        serde_json::to_value(typed).map_err(|e| e.to_string())
    }
    let f = match (res.group, res.kind) {
        ("", "Namespace") => rt::<core::Namespace>,
        ("", "Node") => rt::<core::Node>,
        ("", "Pod") => rt::<core::Pod>,
        ("", "Event") => rt::<core::Event>,
        ("", "Secret") => rt::<core::Secret>,
        ("", "ConfigMap") => rt::<core::ConfigMap>,
        ("", "PersistentVolume") => rt::<core::PersistentVolume>,
        ("", "PersistentVolumeClaim") => rt::<core::PersistentVolumeClaim>,
        ("storage.k8s.io", "StorageClass") => rt::<storage::StorageClass>,
        ("storage.k8s.io", "VolumeAttachment") => rt::<storage::VolumeAttachment>,
        ("storage.k8s.io", "CSIDriver") => rt::<storage::CSIDriver>,
        ("storage.k8s.io", "CSINode") => rt::<storage::CSINode>,
        ("storage.k8s.io", "CSIStorageCapacity") => rt::<storage::CSIStorageCapacity>,
        _ => return None,
    };
    Some(f(v))
}

/// At most this many unknown fields are reported.
const MAX_UNKNOWN: usize = 32;

/// The paths (`spec.foo`, `spec.containers[0].bar`) present with a value in `input` and
/// absent from `typed`.
fn unknown_fields(input: &Value, typed: &Value, path: &mut String, out: &mut Vec<String>) {
    if out.len() >= MAX_UNKNOWN {
        return;
    }
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                if v.is_null() {
                    continue;
                }
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match b.get(k) {
                    None => out.push(path.clone()),
                    Some(t) => unknown_fields(v, t, path, out),
                }
                path.truncate(len);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, t)) in a.iter().zip(b).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                unknown_fields(v, t, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// The `DeleteOptions` a DELETE may carry: only preconditions matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

/// Parses a DELETE body (empty: defaults).
pub fn delete_options(content_type: Option<&str>, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DeleteOptions::default());
    }
    let v = parse(Syntax::from_content_type(content_type)?, body)?;
    if !v.is_object() {
        return Err(ApiError::BadRequest("DeleteOptions must be a JSON object".into()));
    }
    let pre = &v["preconditions"];
    let s = |x: &Value| x.as_str().map(str::to_owned);
    Ok(DeleteOptions {
        uid: s(&pre["uid"]),
        resource_version: s(&pre["resourceVersion"]),
        dry_run: v["dryRun"].as_array().is_some_and(|a| !a.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pv() -> &'static Resource {
        berth_api::resources::by_plural("", "v1", "persistentvolumes").unwrap()
    }

    #[test]
    fn json_and_yaml_decode_to_the_same_object() {
        let json = br#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"a"},"spec":{"capacity":{"storage":"1Gi"}}}"#;
        let yaml =
            b"apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: a\nspec:\n  capacity:\n    storage: 1Gi\n";
        let a = decode_object(pv(), Some("application/json"), json, FieldValidation::Warn).unwrap();
        let b = decode_object(pv(), Some("application/yaml"), yaml, FieldValidation::Warn).unwrap();
        assert_eq!(a, b);
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn unknown_fields_warn_or_fail() {
        let body = br#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"a"},"spec":{"colour":"blue","accessModes":["ReadWriteOnce"]}}"#;
        let d = decode_object(pv(), None, body, FieldValidation::Warn).unwrap();
        assert_eq!(d.warnings, vec!["unknown field \"spec.colour\"".to_owned()]);
        assert!(d.object["spec"].get("colour").is_none());
        let e = decode_object(pv(), None, body, FieldValidation::Strict).unwrap_err();
        assert_eq!(e.code_reason(), (400, "BadRequest"));
        assert!(e.to_string().contains("spec.colour"), "{e}");
        assert!(
            decode_object(pv(), None, body, FieldValidation::Ignore)
                .unwrap()
                .warnings
                .is_empty()
        );
    }

    #[test]
    fn wrong_kind_version_type_and_syntax_are_400() {
        let cases: &[(&[u8], &str)] = &[
            (
                br#"{"apiVersion":"storage.k8s.io/v1","kind":"PersistentVolume"}"#,
                "API version",
            ),
            (br#"{"apiVersion":"v1","kind":"StorageClass"}"#, "kind in the data"),
            (br#"{"apiVersion":"v1"}"#, "'Kind' is missing"),
            (
                br#"{"apiVersion":"v1","kind":"PersistentVolume","spec":{"capacity":5}}"#,
                "cannot be handled",
            ),
            (
                br#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":[]}"#,
                "metadata",
            ),
            (b"{", "not valid JSON"),
            (b"[1]", "must be a JSON object"),
        ];
        for (body, needle) in cases {
            let e = decode_object(pv(), None, body, FieldValidation::Warn).unwrap_err();
            assert_eq!(e.code_reason().0, 400, "{e}");
            assert!(e.to_string().contains(needle), "{e} should mention {needle}");
        }
        let e = decode_object(pv(), Some("application/yaml"), b"a: [", FieldValidation::Warn).unwrap_err();
        assert_eq!(e.code_reason().0, 400);
        let e = decode_object(pv(), Some("text/plain"), b"{}", FieldValidation::Warn).unwrap_err();
        assert_eq!(e.code_reason().0, 415);
        let big = vec![b' '; MAX_BODY + 1];
        assert_eq!(
            decode_object(pv(), None, &big, FieldValidation::Warn)
                .unwrap_err()
                .code_reason()
                .0,
            413
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary bytes and content types: always a 4xx or an object, never a panic.
        #[test]
        fn arbitrary_bodies_never_panic_or_5xx(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            ct in prop_oneof![Just(None), Just(Some("application/json")), Just(Some("application/yaml")), ".{0,20}".prop_map(|s| Some(Box::leak(s.into_boxed_str()) as &str))],
            strict in any::<bool>(),
        ) {
            let v = if strict { FieldValidation::Strict } else { FieldValidation::Warn };
            for res in berth_api::resources::RESOURCES {
                if let Err(e) = decode_object(res, ct, &body, v) {
                    let code = e.code_reason().0;
                    prop_assert!((400..500).contains(&code), "{code}: {e}");
                }
            }
        }

        /// Structured but wrong objects (right kind, random fields) never panic or 5xx.
        #[test]
        fn arbitrary_objects_never_panic_or_5xx(spec in arb_json(3)) {
            for res in berth_api::resources::RESOURCES {
                let obj = serde_json::json!({"apiVersion": res.api_version(), "kind": res.kind, "metadata": {"name": "x"}, "spec": spec.clone(), "status": spec.clone()});
                let body = serde_json::to_vec(&obj).unwrap();
                if let Err(e) = decode_object(res, None, &body, FieldValidation::Strict) {
                    let code = e.code_reason().0;
                    prop_assert!((400..500).contains(&code), "{code}: {e}");
                }
            }
        }
    }

    fn arb_json(depth: u32) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-zA-Z0-9]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(depth, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("capacity".to_owned()),
                        Just("accessModes".to_owned()),
                        Just("containers".to_owned()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}

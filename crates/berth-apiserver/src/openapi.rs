//! `/openapi/v2` as kubectl 1.20+ reads it: a gnostic `openapi.v2.Document` protobuf whose
//! definitions describe every served kind that has a k8s-openapi type, each top-level kind
//! marked with `x-kubernetes-group-version-kind`, so that `kubectl apply`/`create` validate
//! manifests client-side against the same schema Kubernetes publishes.
//!
//! The schemas come from k8s-openapi's JSON schemas (its `schemars` feature) and are
//! translated here to the protobuf shapes kube-openapi's parser accepts: every `$ref` points
//! at a definition that exists, arrays have exactly one item schema, and objects either list
//! properties (a kind) or additionalProperties (a map). Built once, at start-up.

use berth_api::resources::RESOURCES;
use prost::Message as _;
use schemars::generate::SchemaSettings;
use serde_json::Value;

/// The generated protobuf messages (from `proto/openapiv2.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/openapi.v2.rs"));
}

const GVK: &str = "x-kubernetes-group-version-kind";

/// The JSON schemas of every served kind with a k8s-openapi type, by definition name, plus the
/// name of each kind's own definition.
fn json_definitions() -> (
    serde_json::Map<String, Value>,
    Vec<(String, &'static berth_api::Resource)>,
) {
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::storage::v1 as storage;
    let mut generator = SchemaSettings::draft07().into_generator();
    let mut kinds = Vec::new();
    for res in RESOURCES {
        let schema = match (res.group, res.kind) {
            ("", "Namespace") => generator.subschema_for::<core::Namespace>(),
            ("", "Node") => generator.subschema_for::<core::Node>(),
            ("", "Pod") => generator.subschema_for::<core::Pod>(),
            ("", "Event") => generator.subschema_for::<core::Event>(),
            ("", "Secret") => generator.subschema_for::<core::Secret>(),
            ("", "ConfigMap") => generator.subschema_for::<core::ConfigMap>(),
            ("", "PersistentVolume") => generator.subschema_for::<core::PersistentVolume>(),
            ("", "PersistentVolumeClaim") => generator.subschema_for::<core::PersistentVolumeClaim>(),
            ("storage.k8s.io", "StorageClass") => generator.subschema_for::<storage::StorageClass>(),
            ("storage.k8s.io", "VolumeAttachment") => generator.subschema_for::<storage::VolumeAttachment>(),
            ("storage.k8s.io", "CSIDriver") => generator.subschema_for::<storage::CSIDriver>(),
            ("storage.k8s.io", "CSINode") => generator.subschema_for::<storage::CSINode>(),
            ("storage.k8s.io", "CSIStorageCapacity") => generator.subschema_for::<storage::CSIStorageCapacity>(),
            // The snapshot kinds have no k8s-openapi type: kubectl skips validation for
            // kinds the document does not name, as it does for CRDs without a schema.
            _ => continue,
        };
        if let Some(name) = schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/definitions/"))
        {
            kinds.push((name.to_owned(), res));
        }
    }
    (generator.take_definitions(true), kinds)
}

/// The document, encoded.
pub fn document() -> Vec<u8> {
    let (defs, kinds) = json_definitions();
    let mut named = Vec::with_capacity(defs.len());
    for (name, schema) in &defs {
        let mut s = convert(schema, &defs);
        if let Some((_, res)) = kinds.iter().find(|(n, _)| n == name) {
            s.vendor_extension.push(pb::NamedAny {
                name: GVK.into(),
                value: Some(pb::Any {
                    yaml: format!(
                        "- group: \"{}\"\n  kind: {}\n  version: {}\n",
                        res.group, res.kind, res.version
                    ),
                }),
            });
        }
        named.push(pb::NamedSchema {
            name: name.clone(),
            value: Some(s),
        });
    }
    pb::Document {
        swagger: "2.0".into(),
        info: Some(pb::Info {
            title: "Berth".into(),
            version: concat!("v1.34.0-berth.", env!("CARGO_PKG_VERSION")).into(),
        }),
        paths: Some(pb::Paths::default()),
        definitions: Some(pb::Definitions {
            additional_properties: named,
        }),
    }
    .encode_to_vec()
}

/// One JSON schema as a protobuf schema that kube-openapi parses.
fn convert(v: &Value, defs: &serde_json::Map<String, Value>) -> pb::Schema {
    let mut s = pb::Schema::default();
    let Some(o) = v.as_object() else {
        return s; // `true`: anything
    };
    // A `$ref` with a description comes as `allOf: [{$ref}]` in draft-07 output.
    let reference = o
        .get("$ref")
        .and_then(Value::as_str)
        .or_else(|| match o.get("allOf").and_then(Value::as_array) {
            Some(all) if all.len() == 1 => all[0].get("$ref").and_then(Value::as_str),
            _ => None,
        });
    if let Some(r) = reference {
        // A reference to a definition we do not have would fail kubectl's parse; leave it
        // arbitrary instead.
        if r.strip_prefix("#/definitions/").is_some_and(|n| defs.contains_key(n)) {
            s.r#ref = r.to_owned();
        }
        s.description = str_of(o.get("description"));
        return s;
    }
    s.description = str_of(o.get("description"));
    s.format = str_of(o.get("format"));
    let ty = match o.get("type") {
        Some(Value::String(t)) => Some(t.clone()),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .map(str::to_owned),
        _ => None,
    };
    match ty.as_deref() {
        Some("object") | None if o.contains_key("properties") => {
            s.r#type = Some(pb::TypeItem {
                value: vec!["object".into()],
            });
            let props = o.get("properties").and_then(Value::as_object);
            s.properties = Some(pb::Properties {
                additional_properties: props
                    .into_iter()
                    .flatten()
                    .map(|(k, p)| pb::NamedSchema {
                        name: k.clone(),
                        value: Some(convert(p, defs)),
                    })
                    .collect(),
            });
            s.required = o
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default();
        }
        Some("object") => {
            s.r#type = Some(pb::TypeItem {
                value: vec!["object".into()],
            });
            if let Some(ap) = o.get("additionalProperties").filter(|ap| ap.is_object()) {
                s.additional_properties = Some(Box::new(pb::AdditionalPropertiesItem {
                    oneof: Some(pb::additional_properties_item::Oneof::Schema(Box::new(convert(
                        ap, defs,
                    )))),
                }));
            }
        }
        Some("array") => {
            s.r#type = Some(pb::TypeItem {
                value: vec!["array".into()],
            });
            let item = o.get("items").map(|i| convert(i, defs)).unwrap_or_default();
            s.items = Some(pb::ItemsItem { schema: vec![item] });
        }
        Some(t @ ("string" | "integer" | "number" | "boolean")) => {
            s.r#type = Some(pb::TypeItem {
                value: vec![t.to_owned()],
            });
        }
        // No type and no properties (int-or-string, quantities, raw JSON): arbitrary.
        _ => {}
    }
    s
}

fn str_of(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ref_resolves_and_pv_has_its_gvk() {
        let doc = pb::Document::decode(document().as_slice()).unwrap();
        let defs = doc.definitions.unwrap().additional_properties;
        let names: std::collections::HashSet<_> = defs.iter().map(|d| d.name.clone()).collect();
        fn walk(s: &pb::Schema, names: &std::collections::HashSet<String>) {
            if !s.r#ref.is_empty() {
                assert!(
                    names.contains(s.r#ref.trim_start_matches("#/definitions/")),
                    "{}",
                    s.r#ref
                );
            }
            for p in s.properties.iter().flat_map(|p| &p.additional_properties) {
                walk(p.value.as_ref().unwrap(), names);
            }
            for i in s.items.iter().flat_map(|i| &i.schema) {
                walk(i, names);
            }
            if let Some(pb::additional_properties_item::Oneof::Schema(a)) =
                s.additional_properties.as_ref().and_then(|a| a.oneof.as_ref())
            {
                walk(a, names);
            }
            if let Some(items) = &s.items {
                assert_eq!(items.schema.len(), 1);
            }
        }
        for d in &defs {
            walk(d.value.as_ref().unwrap(), &names);
        }
        let pv = defs
            .iter()
            .find(|d| d.name == "io.k8s.api.core.v1.PersistentVolume")
            .unwrap();
        let props = &pv
            .value
            .as_ref()
            .unwrap()
            .properties
            .as_ref()
            .unwrap()
            .additional_properties;
        let spec = props.iter().find(|p| p.name == "spec").unwrap();
        assert_eq!(
            spec.value.as_ref().unwrap().r#ref,
            "#/definitions/io.k8s.api.core.v1.PersistentVolumeSpec"
        );
        let ext = &pv.value.as_ref().unwrap().vendor_extension;
        assert_eq!(ext[0].name, GVK);
        assert!(ext[0].value.as_ref().unwrap().yaml.contains("kind: PersistentVolume"));
        let sc = defs
            .iter()
            .find(|d| d.name == "io.k8s.api.storage.v1.StorageClass")
            .unwrap();
        assert!(
            sc.value.as_ref().unwrap().vendor_extension[0]
                .value
                .as_ref()
                .unwrap()
                .yaml
                .contains("group: \"storage.k8s.io\"")
        );
    }
}

//! Server-side printing for `kubectl get`: whether the client asked for a `meta.k8s.io/v1`
//! Table, and the Table itself from `berth_api::printing::table`. When that returns `Null`
//! (a kind it does not print), a minimal NAME/AGE Table is built here so that `kubectl get`
//! still works; that fallback is deliberately small.

use berth_api::Resource;
use berth_api::printing::IncludeObject;
use serde_json::{Value, json};

/// Whether an `Accept` header asks for a Table (`application/json;as=Table;v=v1;g=meta.k8s.io`).
pub fn wants_table(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|range| {
            let params: Vec<&str> = range.split(';').map(str::trim).collect();
            params.contains(&"as=Table")
                && params.contains(&"g=meta.k8s.io")
                && (params.contains(&"v=v1") || params.contains(&"v=v1beta1"))
        })
    })
}

/// The Table of `objects`, with `resource_version`/`continue` in its list metadata.
pub fn render(
    res: &Resource,
    objects: &[Value],
    include: IncludeObject,
    resource_version: Option<&str>,
    continue_token: Option<&str>,
) -> Value {
    let now = jiff::Timestamp::now();
    let mut table = berth_api::printing::table(res, objects, now, include);
    if table.is_null() {
        table = fallback(objects, now, include);
    }
    if let Some(meta) = table
        .as_object_mut()
        .map(|t| t.entry("metadata").or_insert_with(|| json!({})))
    {
        if let Some(rv) = resource_version {
            meta["resourceVersion"] = json!(rv);
        }
        if let Some(c) = continue_token {
            meta["continue"] = json!(c);
        }
    }
    table
}

/// NAME and AGE only.
fn fallback(objects: &[Value], now: jiff::Timestamp, include: IncludeObject) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            let age = o["metadata"]["creationTimestamp"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map(|t| short_duration(now.as_second().saturating_sub(t.as_second())))
                .unwrap_or_else(|| "<unknown>".into());
            let mut row = json!({ "cells": [name, age] });
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o["metadata"],
                    })
                }
                IncludeObject::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": [
            { "name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0 },
            { "name": "Age", "type": "string", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0 },
        ],
        "rows": rows,
    })
}

/// Kubernetes' short human durations: `45s`, `12m`, `5h`, `3d`, `2y`.
pub fn short_duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..120 => format!("{s}s"),
        120..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        86_400..=31_535_999 => format!("{}d", s / 86_400),
        _ => format!("{}y", s / 31_536_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_accept_header_asks_for_a_table() {
        assert!(wants_table(Some(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        )));
        assert!(!wants_table(Some("application/json")));
        assert!(!wants_table(None));
    }

    #[test]
    fn fallback_has_name_and_age() {
        let pv = berth_api::resources::by_plural("", "v1", "persistentvolumes").unwrap();
        let now = jiff::Timestamp::now();
        let created = now.checked_sub(jiff::SignedDuration::from_secs(300)).unwrap();
        let obj = json!({"metadata": {"name": "a", "creationTimestamp": created.to_string()}});
        let t = fallback(&[obj], now, IncludeObject::Metadata);
        assert_eq!(t["rows"][0]["cells"], json!(["a", "5m"]));
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let r = render(pv, &[], IncludeObject::None, Some("7"), None);
        assert_eq!(r["metadata"]["resourceVersion"], "7");
    }
}

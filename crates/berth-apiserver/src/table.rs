//! Server-side printing for `kubectl get`: whether the client asked for a `meta.k8s.io/v1`
//! Table, and the Table itself from `berth_api::printing::table`, with the list's
//! resourceVersion and continue token.

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
    fn render_fills_list_metadata() {
        let pv = berth_api::resources::by_plural("", "v1", "persistentvolumes").unwrap();
        let now = jiff::Timestamp::now();
        let created = now.checked_sub(jiff::SignedDuration::from_secs(300)).unwrap();
        let obj = json!({"metadata": {"name": "a", "creationTimestamp": created.to_string()}, "spec": {}});
        let t = render(pv, &[obj], IncludeObject::Metadata, Some("7"), Some("next"));
        assert_eq!(t["metadata"]["resourceVersion"], "7");
        assert_eq!(t["metadata"]["continue"], "next");
        assert_eq!(t["rows"][0]["cells"][0], "a");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}

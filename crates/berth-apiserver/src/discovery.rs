//! Discovery documents, built from `berth_api::resources::RESOURCES`: `/api` (APIVersions),
//! `/api/v1` and `/apis/{group}/{version}` (APIResourceList), `/apis` (APIGroupList),
//! `/apis/{group}` (APIGroup) and `/version`. Pure: the same table always gives the same JSON.

use berth_api::resources::{RESOURCES, groups};
use serde_json::{Value, json};

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

/// `/api`.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }],
    })
}

fn versions_of(group: &str) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group) {
        if !v.contains(&r.version) {
            v.push(r.version);
        }
    }
    v
}

/// `/apis/{group}`, or `None` for a group Berth does not serve.
pub fn api_group(group: &str) -> Option<Value> {
    let versions = versions_of(group);
    let first = versions.first()?;
    let gv = |v: &str| json!({ "groupVersion": format!("{group}/{v}"), "version": v });
    Some(json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": versions.iter().map(|v| gv(v)).collect::<Vec<_>>(),
        "preferredVersion": gv(first),
    }))
}

/// `/apis`.
pub fn api_group_list() -> Value {
    let mut groups_json: Vec<Value> = Vec::new();
    for g in groups() {
        if let Some(mut v) = api_group(g) {
            if let Some(o) = v.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            groups_json.push(v);
        }
    }
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups_json })
}

/// `/api/v1` (group `""`) or `/apis/{group}/{version}`; `None` when not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        let mut main = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced(),
            "kind": r.kind,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            main["shortNames"] = json!(r.short_names);
        }
        resources.push(main);
        if r.has_status {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced(),
                "kind": r.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// `/version`: the Kubernetes API level Berth's types follow (k8s-openapi's `v1_34`).
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": concat!("v1.34.0-berth.", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_v1_lists_pv_with_status_subresource() {
        let l = resource_list("", "v1").unwrap();
        let res = l["resources"].as_array().unwrap();
        let pv = res.iter().find(|r| r["name"] == "persistentvolumes").unwrap();
        assert_eq!(pv["namespaced"], false);
        assert_eq!(pv["shortNames"], json!(["pv"]));
        assert!(res.iter().any(|r| r["name"] == "persistentvolumes/status"));
        assert_eq!(l["groupVersion"], "v1");
        assert!(resource_list("nope", "v1").is_none());
    }

    #[test]
    fn groups_have_preferred_versions() {
        let g = api_group_list();
        let names: Vec<_> = g["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].clone())
            .collect();
        assert_eq!(names, vec![json!("storage.k8s.io"), json!("snapshot.storage.k8s.io")]);
        assert_eq!(g["groups"][0]["preferredVersion"]["groupVersion"], "storage.k8s.io/v1");
    }
}

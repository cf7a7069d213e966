//! PATCH bodies: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and the strategic merge
//! patch `kubectl apply` and `kubectl edit` send for built-in kinds (lists merged by their patch
//! merge key, `$patch`, `$retainKeys`, `$deleteFromPrimitiveList`, `$setElementOrder` directives).
//!
//! The strategic merge follows `k8s.io/apimachinery/pkg/util/strategicpatch` with the
//! `patchMergeKey`/`patchStrategy` tags of the `k8s.io/api` types Berth serves (see
//! [`list_strategy`]). Directives never leak into the result. The snapshot kinds are custom
//! resources in Kubernetes, which refuses strategic merge for them; so does this module. Patches
//! never panic, whatever the body; what the patched object then looks like (kind, name) is for
//! the server to check.

use serde_json::{Map, Value};

use crate::Resource;

/// A patch that cannot be applied; the server answers 422 (or 400 for a malformed body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("the patch is malformed: {0}")]
    Malformed(String),
    #[error("the patch cannot be applied: {0}")]
    Invalid(String),
}

/// Which PATCH body, from the request's Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json`
    Json,
    /// `application/merge-patch+json`
    Merge,
    /// `application/strategic-merge-patch+json`
    StrategicMerge,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        match ct.split(';').next().map(str::trim) {
            Some("application/json-patch+json") => Some(PatchType::Json),
            Some("application/merge-patch+json") => Some(PatchType::Merge),
            Some("application/strategic-merge-patch+json") => Some(PatchType::StrategicMerge),
            _ => None,
        }
    }
}

/// Kubernetes' answer (415 there) to a strategic merge patch on a custom resource.
pub const CRD_STRATEGIC_MERGE_REFUSED: &str = "strategic merge patch is not supported for custom resources (snapshot.storage.k8s.io): the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json";

/// Applies `patch` to `original`, an object of kind `res`, and returns the patched object.
pub fn apply(res: &Resource, kind: PatchType, original: &Value, patch: &[u8]) -> Result<Value, PatchError> {
    match kind {
        PatchType::Json => {
            let ops: json_patch::Patch =
                serde_json::from_slice(patch).map_err(|e| PatchError::Malformed(e.to_string()))?;
            let mut doc = original.clone();
            json_patch::patch(&mut doc, &ops).map_err(|e| PatchError::Invalid(e.to_string()))?;
            Ok(doc)
        }
        PatchType::Merge => {
            let p: Value = serde_json::from_slice(patch).map_err(|e| PatchError::Malformed(e.to_string()))?;
            let mut doc = original.clone();
            json_patch::merge(&mut doc, &p);
            Ok(doc)
        }
        PatchType::StrategicMerge => {
            if res.group == crate::snapshot::GROUP {
                return Err(PatchError::Invalid(CRD_STRATEGIC_MERGE_REFUSED.to_owned()));
            }
            let p: Value = serde_json::from_slice(patch).map_err(|e| PatchError::Malformed(e.to_string()))?;
            let Value::Object(p) = p else {
                return Err(PatchError::Malformed(
                    "a strategic merge patch must be a JSON object".to_owned(),
                ));
            };
            let orig = match original {
                Value::Object(m) => m.clone(),
                _ => Map::new(),
            };
            let mut path = Vec::new();
            match merge_map(res.kind, &mut path, orig, &p)? {
                Some(m) => Ok(Value::Object(m)),
                None => Err(PatchError::Invalid(
                    "the patch deletes the whole object ($patch: delete at the top)".into(),
                )),
            }
        }
    }
}

/// How a list field merges in a strategic merge patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListStrategy {
    /// No `patchStrategy`: the patch's list replaces the whole list.
    Replace,
    /// `patchStrategy: merge` on a list of scalars: union, order kept.
    MergePrimitives,
    /// `patchStrategy: merge` with `patchMergeKey`: items matched by that field and merged.
    MergeByKey(&'static str),
}

/// The patch strategy of the list at `path` (object keys from the root; list items add no
/// segment) in an object of `kind`, from the `k8s.io/api` struct tags.
pub fn list_strategy(kind: &str, path: &[String]) -> ListStrategy {
    use ListStrategy::{MergeByKey, MergePrimitives, Replace};
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["metadata", "finalizers"] => MergePrimitives,
        ["metadata", "ownerReferences"] => MergeByKey("uid"),
        ["status", "conditions"] => MergeByKey("type"),
        _ if kind == "Pod" => match p.as_slice() {
            ["spec", "containers" | "initContainers" | "ephemeralContainers"] => MergeByKey("name"),
            ["spec", "containers" | "initContainers" | "ephemeralContainers", "env"] => MergeByKey("name"),
            ["spec", "containers" | "initContainers" | "ephemeralContainers", "ports"] => MergeByKey("containerPort"),
            [
                "spec",
                "containers" | "initContainers" | "ephemeralContainers",
                "volumeMounts",
            ] => MergeByKey("mountPath"),
            [
                "spec",
                "containers" | "initContainers" | "ephemeralContainers",
                "volumeDevices",
            ] => MergeByKey("devicePath"),
            ["spec", "volumes"] => MergeByKey("name"),
            ["spec", "imagePullSecrets"] => MergeByKey("name"),
            ["spec", "hostAliases"] => MergeByKey("ip"),
            ["spec", "topologySpreadConstraints"] => MergeByKey("topologyKey"),
            ["spec", "schedulingGates"] => MergeByKey("name"),
            ["spec", "resourceClaims"] => MergeByKey("name"),
            ["status", "podIPs" | "hostIPs"] => MergeByKey("ip"),
            _ => Replace,
        },
        ["status", "addresses"] if kind == "Node" => MergeByKey("type"),
        ["spec", "podCIDRs"] if kind == "Node" => MergePrimitives,
        ["spec", "drivers"] if kind == "CSINode" => MergeByKey("name"),
        _ => Replace,
    }
}

const SET_ORDER: &str = "$setElementOrder/";
const DELETE_FROM: &str = "$deleteFromPrimitiveList/";

/// Merges `patch` into `orig`; `None` means the map is deleted (`$patch: delete`).
fn merge_map(
    kind: &str,
    path: &mut Vec<String>,
    mut out: Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<Option<Map<String, Value>>, PatchError> {
    match patch.get("$patch") {
        None => {}
        Some(Value::String(d)) if d == "merge" => {}
        Some(Value::String(d)) if d == "delete" => return Ok(None),
        Some(Value::String(d)) if d == "replace" => {
            let mut rest = patch.clone();
            rest.remove("$patch");
            return merge_map(kind, path, Map::new(), &rest);
        }
        Some(other) => return Err(PatchError::Invalid(format!("unknown patch type: {other} in map"))),
    }
    // The live lists the order directives refer to, before the merge changes them.
    let live_lists: Map<String, Value> = patch
        .keys()
        .filter_map(|k| k.strip_prefix(SET_ORDER))
        .filter_map(|f| out.get(f).map(|v| (f.to_owned(), v.clone())))
        .collect();
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix(DELETE_FROM) {
            let Value::Array(doomed) = v else {
                return Err(PatchError::Invalid(format!("{k} must be a list")));
            };
            if let Some(Value::Array(list)) = out.get_mut(field) {
                list.retain(|item| !doomed.contains(item));
            }
            continue;
        }
        if k.starts_with('$') {
            continue; // $patch, $retainKeys and $setElementOrder are applied around the merge
        }
        if v.is_null() {
            out.remove(k);
            continue;
        }
        path.push(k.clone());
        let merged = merge_value(kind, path, out.remove(k), v);
        path.pop();
        if let Some(m) = merged? {
            out.insert(k.clone(), m);
        }
    }
    for (k, order) in patch {
        if let Some(field) = k.strip_prefix(SET_ORDER) {
            let Value::Array(order) = order else {
                return Err(PatchError::Invalid(format!("{k} must be a list")));
            };
            path.push(field.to_owned());
            let strategy = list_strategy(kind, path);
            path.pop();
            let live = live_lists
                .get(field)
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if let Some(Value::Array(list)) = out.get_mut(field) {
                reorder(list, order, live, strategy);
            }
        }
    }
    if let Some(keep) = patch.get("$retainKeys") {
        let Value::Array(keep) = keep else {
            return Err(PatchError::Invalid("$retainKeys must be a list".into()));
        };
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(Some(out))
}

/// The result of patching `orig` (absent if the field is new) with `patch`; `None` deletes it.
fn merge_value(
    kind: &str,
    path: &mut Vec<String>,
    orig: Option<Value>,
    patch: &Value,
) -> Result<Option<Value>, PatchError> {
    match (orig, patch) {
        (Some(Value::Object(o)), Value::Object(p)) => Ok(merge_map(kind, path, o, p)?.map(Value::Object)),
        (None | Some(Value::Null), Value::Object(p)) => Ok(merge_map(kind, path, Map::new(), p)?.map(Value::Object)),
        (Some(Value::Array(o)), Value::Array(p)) => Ok(Some(Value::Array(merge_list(kind, path, o, p)?))),
        (None | Some(Value::Null), Value::Array(p)) => Ok(Some(Value::Array(merge_list(kind, path, Vec::new(), p)?))),
        // Scalars, and a change of type, replace (through the strip for nested directives).
        (_, Value::Array(p)) => Ok(Some(Value::Array(merge_list(kind, path, Vec::new(), p)?))),
        (_, Value::Object(p)) => Ok(merge_map(kind, path, Map::new(), p)?.map(Value::Object)),
        (_, scalar) => Ok(Some(scalar.clone())),
    }
}

fn is_directive_item(v: &Value, directive: &str) -> bool {
    v.get("$patch").and_then(Value::as_str) == Some(directive)
}

fn merge_list(kind: &str, path: &mut Vec<String>, orig: Vec<Value>, patch: &[Value]) -> Result<Vec<Value>, PatchError> {
    let strategy = list_strategy(kind, path);
    // `{"$patch": "replace"}` as an item replaces the whole list with the other items.
    let replace_all = patch.iter().any(|v| is_directive_item(v, "replace"));
    let live = orig.clone();
    let mut out = if replace_all || strategy == ListStrategy::Replace {
        Vec::new()
    } else {
        orig
    };
    for p in patch {
        if is_directive_item(p, "replace") {
            continue;
        }
        match strategy {
            ListStrategy::MergeByKey(key) if !replace_all => {
                let Value::Object(pm) = p else {
                    return Err(PatchError::Invalid(format!(
                        "{}: list items must be maps with the merge key {key:?}, found {p}",
                        path.join(".")
                    )));
                };
                let Some(kv) = pm.get(key) else {
                    return Err(PatchError::Invalid(format!(
                        "map: {p} does not contain declared merge key: {key}"
                    )));
                };
                let pos = out.iter().position(|o| o.get(key) == Some(kv));
                if is_directive_item(p, "delete") {
                    out.retain(|o| o.get(key) != Some(kv));
                    continue;
                }
                match pos {
                    Some(i) => {
                        let base = match std::mem::take(&mut out[i]) {
                            Value::Object(m) => m,
                            _ => Map::new(),
                        };
                        match merge_map(kind, path, base, pm)? {
                            Some(m) => out[i] = Value::Object(m),
                            None => {
                                out.remove(i);
                            }
                        }
                    }
                    None => {
                        if let Some(m) = merge_map(kind, path, Map::new(), pm)? {
                            out.push(Value::Object(m));
                        }
                    }
                }
            }
            ListStrategy::MergePrimitives if !replace_all => {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
            _ => {
                if let Some(v) = merge_value(kind, path, None, p)? {
                    out.push(v);
                }
            }
        }
    }
    // As mergeSlice does: the patch's items in the patch's order, the live-only ones in place.
    if let ListStrategy::MergeByKey(key) = strategy
        && !replace_all
    {
        let order: Vec<Value> = patch
            .iter()
            .filter(|p| p.get(key).is_some() && !is_directive_item(p, "delete"))
            .cloned()
            .collect();
        reorder(&mut out, &order, &live, strategy);
    }
    Ok(out)
}

/// `$setElementOrder` (`normalizeElementOrder`): the items the order names, sorted by it, are
/// interleaved with the items it does not name (the server's own), which keep their live order;
/// a server item goes before a named item when both were in the live list and it came first.
fn reorder(list: &mut Vec<Value>, order: &[Value], live: &[Value], strategy: ListStrategy) {
    let id = |v: &Value| -> Value {
        match strategy {
            ListStrategy::MergeByKey(key) => v.get(key).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let position = |within: &[Value], v: &Value| within.iter().position(|w| id(w) == id(v));
    let (mut named, mut server): (Vec<Value>, Vec<Value>) = std::mem::take(list)
        .into_iter()
        .partition(|v| position(order, v).is_some());
    named.sort_by_key(|v| position(order, v));
    server.sort_by_key(|v| position(live, v).unwrap_or(usize::MAX));
    let (mut l, mut r) = (server.into_iter().peekable(), named.into_iter().peekable());
    loop {
        let take_left = match (l.peek(), r.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => matches!((position(live, a), position(live, b)), (Some(x), Some(y)) if x < y),
        };
        let next = if take_left { l.next() } else { r.next() };
        list.extend(next);
    }
}

#[cfg(test)]
mod tests;

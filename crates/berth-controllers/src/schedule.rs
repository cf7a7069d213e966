//! Where a pod's volumes let it run: the Kubernetes scheduler's VolumeBinding plugin
//! (`pkg/scheduler/framework/plugins/volumebinding`) and the node checks it leans on (node
//! selectors and PV node affinity from `component-helpers/scheduling/corev1/nodeaffinity`, class
//! `allowedTopologies`, CSIStorageCapacity), plus the NodeUnschedulable and NodeAffinity filters
//! so that [`choose_node`] can place a pod and word its failure as kube-scheduler does.
//!
//! The flow, as the scheduler runs it for one pod:
//! - [`pre_filter`] once: every claim the pod uses must exist, not be Lost or being deleted, and
//!   every claim that is not bound must wait for its first consumer; it sorts the claims into
//!   bound ones and delayed (WaitForFirstConsumer) ones;
//! - [`filter`] for each node: bound claims' volumes must admit the node; each delayed claim gets
//!   an existing volume on that node ("static binding") or must be provisionable there;
//! - [`reserve`] for the chosen node: the writes that start binding (a `claimRef` on each chosen
//!   volume, `volume.kubernetes.io/selected-node` on each claim to provision). The runner writes
//!   volumes first, then claims, then waits (polling every second, up to 600 s) until every claim
//!   is bound.
//!
//! Everything here is pure: it reads the objects it is shown (through [`StorageObjects`]) and
//! returns decisions; it never writes, waits or logs, and no input makes it panic.

use std::collections::BTreeMap;

use berth_api::names;
use berth_api::selector::{LabelOp, Requirement};
use k8s_openapi::api::core::v1::{
    Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolume, Pod, TopologySelectorTerm,
};

/// The taint an unschedulable node carries; a pod that tolerates it may still go there.
pub const TAINT_NODE_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

// ---------------------------------------------------------------------------------------------
// Node selectors, PV node affinity, class topology

/// One `matchExpressions` entry as a label requirement, or `None` when Kubernetes'
/// `labels.NewRequirement` refuses it (bad key or value; In/NotIn without values; Exists or
/// DoesNotExist with values; Gt/Lt without exactly one integer; an unknown operator).
fn label_requirement(key: &str, operator: &str, values: &[String]) -> Option<Requirement> {
    if !names::qualified_name(key).is_empty() {
        return None;
    }
    let op = match operator {
        "In" => LabelOp::In,
        "NotIn" => LabelOp::NotIn,
        "Exists" => LabelOp::Exists,
        "DoesNotExist" => LabelOp::DoesNotExist,
        "Gt" => LabelOp::GreaterThan,
        "Lt" => LabelOp::LessThan,
        _ => return None,
    };
    let counts_ok = match op {
        LabelOp::In | LabelOp::NotIn => !values.is_empty(),
        LabelOp::Exists | LabelOp::DoesNotExist => values.is_empty(),
        LabelOp::GreaterThan | LabelOp::LessThan => {
            values.len() == 1 && values.iter().all(|v| v.parse::<i64>().is_ok())
        }
        LabelOp::Equals | LabelOp::NotEquals => false,
    };
    if !counts_ok || values.iter().any(|v| !names::label_value(v).is_empty()) {
        return None;
    }
    Some(Requirement {
        key: key.to_owned(),
        op,
        values: values.iter().cloned().collect(),
    })
}

/// Whether one `matchFields` entry admits a node named `name`. Only `metadata.name` has a
/// value; any other key reads as "". `None` when the entry does not parse (an operator other
/// than In/NotIn, or not exactly one value).
fn field_requirement_matches(r: &NodeSelectorRequirement, name: &str) -> Option<bool> {
    let values = r.values.as_deref().unwrap_or(&[]);
    let [value] = values else { return None };
    let have = if r.key == "metadata.name" { name } else { "" };
    match r.operator.as_str() {
        "In" => Some(have == value),
        "NotIn" => Some(have != value),
        _ => None,
    }
}

/// Whether a node with `labels` (and `name`, when known and non-empty) satisfies `term`.
fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>, name: Option<&str>) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or(&[]);
    let fields = term.match_fields.as_deref().unwrap_or(&[]);
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    let mut reqs = Vec::with_capacity(exprs.len());
    for e in exprs {
        match label_requirement(&e.key, &e.operator, e.values.as_deref().unwrap_or(&[])) {
            Some(r) => reqs.push(r),
            None => return false,
        }
    }
    let mut field_results = Vec::with_capacity(fields.len());
    for f in fields {
        match field_requirement_matches(f, name.unwrap_or("")) {
            Some(m) => field_results.push(m),
            None => return false,
        }
    }
    if !reqs.iter().all(|r| r.matches(labels)) {
        return false;
    }
    // Fields are only compared for a node that has a name (Kubernetes builds the field set
    // from `metadata.name` only when it is non-empty).
    if name.is_some_and(|n| !n.is_empty()) && field_results.contains(&false) {
        return false;
    }
    true
}

fn selector_matches(selector: &NodeSelector, labels: &BTreeMap<String, String>, name: Option<&str>) -> bool {
    selector
        .node_selector_terms
        .iter()
        .any(|t| term_matches(t, labels, name))
}

fn node_labels(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

/// Whether `node` satisfies `selector`: its terms are ORed and a term's requirements ANDed; a
/// term with no requirements, or with one that does not parse, matches nothing (so an empty
/// term list matches no node). `matchExpressions` test labels with In, NotIn (true when the
/// label is absent), Exists, DoesNotExist, Gt and Lt (integers; false when the label is absent
/// or not an integer); `matchFields` test `metadata.name` with In or NotIn and one value.
pub fn node_selector_matches(selector: &NodeSelector, node: &Node) -> bool {
    selector_matches(selector, &node_labels(node), node.metadata.name.as_deref())
}

/// Whether `pv`'s node affinity admits `node`: a volume without `nodeAffinity.required` admits
/// every node. As Kubernetes' `CheckNodeAffinity` does, only the node's labels are compared:
/// `matchFields` terms are not checked against the node's name.
pub fn pv_node_affinity_matches(pv: &PersistentVolume, node: &Node) -> bool {
    match pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
    {
        None => true,
        Some(required) => selector_matches(required, &node_labels(node), None),
    }
}

/// Whether a class's `allowedTopologies` admit `node`: an empty list admits every node;
/// otherwise some term must have all its `matchLabelExpressions` satisfied (the node's label
/// is one of the values). A term without expressions, or with one that does not parse (a bad
/// key or value, no values), matches nothing.
pub fn topology_allows(allowed: &[TopologySelectorTerm], node: &Node) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let labels = node_labels(node);
    allowed.iter().any(|term| {
        let exprs = term.match_label_expressions.as_deref().unwrap_or(&[]);
        if exprs.is_empty() {
            return false;
        }
        let reqs: Option<Vec<Requirement>> = exprs
            .iter()
            .map(|e| label_requirement(&e.key, "In", &e.values))
            .collect();
        reqs.is_some_and(|reqs| reqs.iter().all(|r| r.matches(&labels)))
    })
}

/// Whether the pod's `spec.nodeSelector` (every label equal) and
/// `spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution` (see
/// [`node_selector_matches`]) both admit `node`; either may be absent.
pub fn pod_node_affinity_matches(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = pod.spec.as_ref() else { return true };
    let labels = node_labels(node);
    if let Some(wanted) = spec.node_selector.as_ref()
        && !wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    match spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref())
    {
        Some(required) => selector_matches(required, &labels, node.metadata.name.as_deref()),
        None => true,
    }
}

/// Whether `node` refuses `pod` for being cordoned: `spec.unschedulable` is true and no
/// toleration of the pod tolerates the `node.kubernetes.io/unschedulable:NoSchedule` taint (a
/// toleration matches when its effect is empty or NoSchedule, its key is empty or the taint's,
/// and its operator is Exists, or Equal/empty with an empty value).
pub fn node_is_unschedulable_for(pod: &Pod, node: &Node) -> bool {
    if node.spec.as_ref().and_then(|s| s.unschedulable) != Some(true) {
        return false;
    }
    let tolerations = pod.spec.as_ref().and_then(|s| s.tolerations.as_deref()).unwrap_or(&[]);
    !tolerations.iter().any(|t| {
        let effect_ok = t.effect.as_deref().is_none_or(|e| e.is_empty() || e == "NoSchedule");
        let key_ok = t
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == TAINT_NODE_UNSCHEDULABLE);
        let op_ok = match t.operator.as_deref().unwrap_or("") {
            "Exists" => true,
            "" | "Equal" => t.value.as_deref().unwrap_or("").is_empty(),
            _ => false,
        };
        effect_ok && key_ok && op_ok
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::{Value, json};

    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn obj<T: k8s_openapi::serde::de::DeserializeOwned>(base: Value, extra: Value) -> T {
        let mut v = base;
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn node(name: &str, labels: Value) -> Node {
        obj(json!({"metadata": {"name": name, "labels": labels}}), json!({}))
    }

    fn selector(terms: Value) -> NodeSelector {
        obj(json!({"nodeSelectorTerms": terms}), json!({}))
    }

    fn pv(name: &str, size: &str, extra: Value) -> PersistentVolume {
        obj(
            json!({
                "metadata": {"name": name},
                "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                         "storageClassName": "local", "hostPath": {"path": "/x"}},
                "status": {"phase": "Available"},
            }),
            extra,
        )
    }

    fn on_node(host: &str) -> Value {
        json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [host]}]}
        ]}}}})
    }

    // --- node selectors ----------------------------------------------------------------------

    fn expr(key: &str, op: &str, values: Value) -> Value {
        json!({"matchExpressions": [{"key": key, "operator": op, "values": values}]})
    }

    #[rstest]
    #[case::in_matches(json!([expr("zone", "In", json!(["a", "b"]))]), true)]
    #[case::in_other_value(json!([expr("zone", "In", json!(["c"]))]), false)]
    #[case::in_label_absent(json!([expr("rack", "In", json!(["1"]))]), false)]
    #[case::not_in_listed(json!([expr("zone", "NotIn", json!(["a"]))]), false)]
    #[case::not_in_other(json!([expr("zone", "NotIn", json!(["b"]))]), true)]
    #[case::not_in_label_absent_matches(json!([expr("rack", "NotIn", json!(["1"]))]), true)]
    #[case::exists(json!([expr("zone", "Exists", json!(null))]), true)]
    #[case::exists_absent(json!([expr("rack", "Exists", json!(null))]), false)]
    #[case::does_not_exist(json!([expr("rack", "DoesNotExist", json!(null))]), true)]
    #[case::does_not_exist_present(json!([expr("zone", "DoesNotExist", json!(null))]), false)]
    #[case::gt_true(json!([expr("cpus", "Gt", json!(["7"]))]), true)]
    #[case::gt_equal_is_false(json!([expr("cpus", "Gt", json!(["8"]))]), false)]
    #[case::lt_true(json!([expr("cpus", "Lt", json!(["9"]))]), true)]
    #[case::lt_false(json!([expr("cpus", "Lt", json!(["8"]))]), false)]
    #[case::gt_on_a_non_integer_label(json!([expr("zone", "Gt", json!(["1"]))]), false)]
    #[case::gt_on_an_absent_label(json!([expr("rack", "Gt", json!(["1"]))]), false)]
    #[case::gt_with_two_values_does_not_parse(json!([expr("cpus", "Gt", json!(["1", "2"]))]), false)]
    #[case::gt_with_a_non_integer_value_does_not_parse(json!([expr("cpus", "Gt", json!(["x"]))]), false)]
    #[case::in_without_values_does_not_parse(json!([expr("zone", "NotIn", json!([]))]), false)]
    #[case::exists_with_values_does_not_parse(json!([expr("zone", "Exists", json!(["a"]))]), false)]
    #[case::unknown_operator(json!([expr("zone", "Equals", json!(["a"]))]), false)]
    #[case::invalid_key(json!([expr("bad key", "DoesNotExist", json!(null))]), false)]
    #[case::invalid_value(json!([expr("zone", "NotIn", json!(["not valid!"]))]), false)]
    #[case::expressions_are_anded(json!([{"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["a"]},
        {"key": "cpus", "operator": "Lt", "values": ["4"]}]}]), false)]
    #[case::terms_are_ored(json!([expr("zone", "In", json!(["b"])), expr("zone", "In", json!(["a"]))]), true)]
    #[case::a_bad_term_does_not_spoil_a_good_one(json!([expr("zone", "Gt", json!(["x"])), expr("zone", "In", json!(["a"]))]), true)]
    #[case::an_empty_term_matches_nothing(json!([{}]), false)]
    #[case::an_empty_term_list_matches_nothing(json!([]), false)]
    #[case::field_name_in(json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]), true)]
    #[case::field_name_in_other(json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]), false)]
    #[case::field_name_not_in(json!([{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n2"]}]}]), true)]
    #[case::field_with_two_values_does_not_parse(json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1", "n2"]}]}]), false)]
    #[case::field_exists_does_not_parse(json!([{"matchFields": [{"key": "metadata.name", "operator": "Exists"}]}]), false)]
    #[case::other_fields_read_as_empty(json!([{"matchFields": [{"key": "metadata.uid", "operator": "In", "values": ["n1"]}]}]), false)]
    #[case::other_fields_read_as_empty_for_not_in(json!([{"matchFields": [{"key": "metadata.uid", "operator": "NotIn", "values": ["n1"]}]}]), true)]
    #[case::fields_and_expressions_are_anded(json!([{
        "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}],
        "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]), false)]
    fn node_selector_rules(#[case] terms: Value, #[case] want: bool) {
        let n = node("n1", json!({"zone": "a", "cpus": "8"}));
        assert_eq!(node_selector_matches(&selector(terms), &n), want);
    }

    #[test]
    fn fields_are_not_compared_for_a_node_without_a_name() {
        let sel = selector(json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]));
        let unnamed: Node = obj(json!({"metadata": {"labels": {"zone": "a"}}}), json!({}));
        assert!(node_selector_matches(&sel, &unnamed));
    }

    #[rstest]
    #[case::no_affinity(json!({}), true)]
    #[case::affinity_without_required(json!({"spec": {"nodeAffinity": {}}}), true)]
    #[case::required_matches(on_node("n1"), true)]
    #[case::required_other_node(on_node("n2"), false)]
    #[case::required_without_terms(json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": []}}}}), false)]
    #[case::match_fields_are_ignored(json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]}}}}), true)]
    fn pv_node_affinity_rules(#[case] extra: Value, #[case] want: bool) {
        let n = node("n1", json!({"kubernetes.io/hostname": "n1"}));
        assert_eq!(pv_node_affinity_matches(&pv("v", "1Gi", extra), &n), want);
    }

    fn topo(terms: Value) -> Vec<TopologySelectorTerm> {
        serde_json::from_value(terms).unwrap()
    }

    #[rstest]
    #[case::empty_list_allows_all(json!([]), true)]
    #[case::label_in_values(json!([{"matchLabelExpressions": [{"key": "zone", "values": ["a", "b"]}]}]), true)]
    #[case::label_not_in_values(json!([{"matchLabelExpressions": [{"key": "zone", "values": ["b"]}]}]), false)]
    #[case::label_absent(json!([{"matchLabelExpressions": [{"key": "rack", "values": ["1"]}]}]), false)]
    #[case::expressions_are_anded(json!([{"matchLabelExpressions": [
        {"key": "zone", "values": ["a"]}, {"key": "region", "values": ["west"]}]}]), false)]
    #[case::terms_are_ored(json!([
        {"matchLabelExpressions": [{"key": "zone", "values": ["b"]}]},
        {"matchLabelExpressions": [{"key": "region", "values": ["east"]}]}]), true)]
    #[case::a_term_without_expressions_matches_nothing(json!([{}]), false)]
    #[case::no_values_does_not_parse(json!([{"matchLabelExpressions": [{"key": "zone", "values": []}]}]), false)]
    fn topology_rules(#[case] terms: Value, #[case] want: bool) {
        let n = node("n1", json!({"zone": "a", "region": "east"}));
        assert_eq!(topology_allows(&topo(terms), &n), want);
    }

    fn pod_with(spec: Value) -> Pod {
        obj(
            json!({"metadata": {"name": "web", "namespace": "default"},
                   "spec": {"containers": [{"name": "c", "image": "i"}]}}),
            json!({ "spec": spec }),
        )
    }

    fn required(terms: Value) -> Value {
        json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}})
    }

    #[rstest]
    #[case::nothing_asked(json!({}), true)]
    #[case::node_selector_equal(json!({"nodeSelector": {"zone": "a", "disk": "ssd"}}), true)]
    #[case::node_selector_one_differs(json!({"nodeSelector": {"zone": "a", "disk": "hdd"}}), false)]
    #[case::node_selector_label_absent(json!({"nodeSelector": {"gpu": "yes"}}), false)]
    #[case::required_affinity(required(json!([expr("zone", "In", json!(["a"]))])), true)]
    #[case::required_affinity_fails(required(json!([expr("zone", "NotIn", json!(["a"]))])), false)]
    #[case::required_affinity_by_name(required(json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}])), true)]
    #[case::required_affinity_by_other_name(required(json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n9"]}]}])), false)]
    #[case::both_must_hold({
        let mut s = required(json!([expr("zone", "In", json!(["a"]))]));
        merge(&mut s, json!({"nodeSelector": {"disk": "hdd"}}));
        s
    }, false)]
    fn pod_node_affinity_rules(#[case] spec: Value, #[case] want: bool) {
        let n = node("n1", json!({"zone": "a", "disk": "ssd"}));
        assert_eq!(pod_node_affinity_matches(&pod_with(spec), &n), want);
    }

    #[rstest]
    #[case::not_cordoned(false, json!([]), false)]
    #[case::cordoned(true, json!([]), true)]
    #[case::tolerates_the_taint(true, json!([{"key": TAINT_NODE_UNSCHEDULABLE, "operator": "Exists", "effect": "NoSchedule"}]), false)]
    #[case::tolerates_everything(true, json!([{"operator": "Exists"}]), false)]
    #[case::equal_with_empty_value(true, json!([{"key": TAINT_NODE_UNSCHEDULABLE, "operator": "Equal"}]), false)]
    #[case::equal_with_a_value(true, json!([{"key": TAINT_NODE_UNSCHEDULABLE, "operator": "Equal", "value": "x"}]), true)]
    #[case::other_effect(true, json!([{"key": TAINT_NODE_UNSCHEDULABLE, "operator": "Exists", "effect": "NoExecute"}]), true)]
    #[case::other_key(true, json!([{"key": "gpu", "operator": "Exists"}]), true)]
    fn cordon_rules(#[case] cordoned: bool, #[case] tolerations: Value, #[case] want: bool) {
        let mut n = node("n1", json!({}));
        n.spec = Some(obj(json!({"unschedulable": cordoned}), json!({})));
        let p = pod_with(json!({ "tolerations": tolerations }));
        assert_eq!(node_is_unschedulable_for(&p, &n), want);
    }
}

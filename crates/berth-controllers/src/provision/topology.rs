//! Where a new volume may live: the CSI `accessibility_requirements` of CreateVolume, and the
//! PersistentVolume node affinity made from the topology the driver answers with. The rules are
//! external-provisioner's (`pkg/controller/topology.go`); pure, over the nodes' topology the
//! caller gathered.
//!
//! - A driver without the VOLUME_ACCESSIBILITY_CONSTRAINTS capability gets no requirements and
//!   its volumes no node affinity.
//! - With a selected node (WaitForFirstConsumer) the driver's keys are the selected node's; the
//!   node must carry a label for every key. With strict topology only its segment is requisite.
//! - Otherwise requisite is the class's `allowedTopologies` flattened into segments (each term's
//!   OR of values distributed over its AND of keys), else the set of every node's segment for
//!   the driver's keys. Requisite is sorted (fewer keys first, then by keys and values) and
//!   duplicates are dropped.
//! - Preferred is requisite rotated so that the first segment the selected node lies in comes
//!   first; without a selected node the rotation is the StatefulSet spreading hash of the claim
//!   name (FNV-1 of the set name, offset by the replica ordinal).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use berth_csi::v1::{Topology, TopologyRequirement};
use k8s_openapi::api::core::v1::{
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, TopologySelectorTerm, VolumeNodeAffinity,
};

use super::ProvisionInput;

/// One topology segment: topology key to value, e.g. `topology.berth.io/node: n1`.
pub type Segments = BTreeMap<String, String>;

/// A segment as external-provisioner holds it: (key, value) pairs sorted by key. Unlike a map it
/// keeps two requirements on the same key from one `allowedTopologies` term, as Kubernetes does.
pub type Term = Vec<(String, String)>;

/// The cluster's topology for the driver, for a driver that has VOLUME_ACCESSIBILITY_CONSTRAINTS.
#[derive(Debug, Clone, Copy)]
pub struct ClusterTopology<'a> {
    /// The topology keys the driver registered in CSINode (`spec.drivers[].topologyKeys`): the
    /// selected node's with a selected node, else those of any node the driver runs on (empty
    /// when it runs on none yet).
    pub keys: &'a [String],
    /// Every node's segment for `keys`, as [`node_segment`] gives it; a segment lacking a key is
    /// ignored, as a node lacking the label is.
    pub segments: &'a [Segments],
}

/// Why no requirements could be made; the messages are external-provisioner's. Each is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// The selected node's CSINode has no keys for the driver (its plugin is not registered).
    #[error("no topology key found for node {0}")]
    NoKeysForNode(String),
    /// The selected node lacks a label for one of the driver's keys.
    #[error("topology labels from selected node {} does not match topology keys from CSINode {}", go_map(.labels), go_list(.keys))]
    SelectedNodeMissingKey {
        labels: BTreeMap<String, String>,
        keys: Vec<String>,
    },
    /// Strict topology: the selected node is outside the class's allowedTopologies.
    #[error("selected node '{node:?}' topology '{}' is not in allowed topologies: {}", go_term(.selected), go_terms(.allowed))]
    NotInAllowed {
        node: String,
        selected: Term,
        allowed: Vec<Term>,
    },
    /// No node has registered keys for the driver yet.
    #[error("no available topology found")]
    NoneAvailable,
    /// Keys are registered but no node carries labels for all of them.
    #[error("topologyKeys {} were not found on any nodes", go_list(.0))]
    KeysOnNoNode(Vec<String>),
    /// The selected node lies in no requisite segment.
    #[error("topology {} from selected node {node:?} is not in requisite: {}", go_term(.selected), go_terms(.requisite))]
    NotInRequisite {
        node: String,
        selected: Term,
        requisite: Vec<Term>,
    },
}

/// A node's segment for the driver's `keys`: its label value for each key, or `None` when it
/// lacks one (such a node is not in the driver's topology).
pub fn node_segment(labels: &BTreeMap<String, String>, keys: &[String]) -> Option<Segments> {
    keys.iter().map(|k| Some((k.clone(), labels.get(k)?.clone()))).collect()
}

fn term_of(labels: &BTreeMap<String, String>, keys: &[String]) -> Option<Term> {
    let mut term: Term = keys
        .iter()
        .map(|k| Some((k.clone(), labels.get(k)?.clone())))
        .collect::<Option<_>>()?;
    term.sort();
    Some(term)
}

/// `allowedTopologies` as a list of segments: each term's OR of values is distributed over its
/// AND of keys (zone in {a, b} and rack in {1} gives {a,1} and {b,1}); the terms are OR'd.
pub fn flatten(allowed: &[TopologySelectorTerm]) -> Vec<Term> {
    let mut out = Vec::new();
    for selector in allowed {
        let mut terms: Vec<Term> = Vec::new();
        for req in selector.match_label_expressions.as_deref().unwrap_or(&[]) {
            let mut next = Vec::new();
            for value in &req.values {
                if terms.is_empty() {
                    next.push(vec![(req.key.clone(), value.clone())]);
                } else {
                    for t in &terms {
                        let mut t = t.clone();
                        t.push((req.key.clone(), value.clone()));
                        next.push(t);
                    }
                }
            }
            terms = next;
        }
        out.extend(terms);
    }
    for t in &mut out {
        t.sort();
    }
    out
}

/// external-provisioner's order: fewer pairs first, then pair by pair.
fn compare(a: &Term, b: &Term) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Whether every pair of `t` is in `other` (both sorted by key); the empty term is in anything.
fn subset(t: &Term, other: &Term) -> bool {
    let mut want = t.iter().peekable();
    for (k, v) in other {
        let Some((wk, wv)) = want.peek() else { break };
        if wk != k {
            continue;
        }
        if wv != v {
            return false;
        }
        want.next();
    }
    want.peek().is_none()
}

/// The CreateVolume accessibility requirements for `input`, or `None` when the driver has no
/// topology, when nothing limits the volume and immediate topology is off, or when the class's
/// allowedTopologies hold only empty terms.
pub fn accessibility_requirements(input: &ProvisionInput<'_>) -> Result<Option<TopologyRequirement>, TopologyError> {
    let Some(cluster) = input.topology else {
        return Ok(None);
    };
    let config = input.config;
    let allowed = input.class.allowed_topologies.as_deref().unwrap_or(&[]);

    // 1. The selected node's segment (delayed binding).
    let mut selected: Option<(String, Term)> = None;
    let mut requisite: Vec<Term> = Vec::new();
    if let Some(node) = input.selected_node {
        let name = node.metadata.name.clone().unwrap_or_default();
        if cluster.keys.is_empty() {
            return Err(TopologyError::NoKeysForNode(name));
        }
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let Some(term) = term_of(&labels, cluster.keys) else {
            return Err(TopologyError::SelectedNodeMissingKey {
                labels,
                keys: cluster.keys.to_vec(),
            });
        };
        if config.strict_topology {
            if !allowed.is_empty() {
                let flat = flatten(allowed);
                if !flat.iter().any(|t| subset(t, &term)) {
                    return Err(TopologyError::NotInAllowed {
                        node: name,
                        selected: term,
                        allowed: flat,
                    });
                }
            }
            requisite.push(term.clone());
        }
        selected = Some((name, term));
    }

    // 2. Requisite: the class's allowedTopologies, else every node's segment.
    if requisite.is_empty() {
        if !allowed.is_empty() {
            requisite = flatten(allowed);
        } else {
            if selected.is_none() && !config.immediate_topology {
                return Ok(None);
            }
            if cluster.keys.is_empty() {
                return Err(TopologyError::NoneAvailable);
            }
            requisite = cluster
                .segments
                .iter()
                .filter_map(|s| term_of(s, cluster.keys))
                .filter(|t| !t.is_empty())
                .collect();
            if requisite.is_empty() {
                return Err(TopologyError::KeysOnNoNode(cluster.keys.to_vec()));
            }
        }
    }
    if requisite.is_empty() {
        return Ok(None);
    }
    requisite.sort_by(compare);
    requisite.dedup();

    // 3. Preferred: requisite rotated to start where the volume should go first.
    let preferred = match &selected {
        None => {
            let (hash, index) = name_hash_and_index(input.claim.metadata.name.as_deref().unwrap_or(""));
            // Rotating by a remainder of the length: the index is always in range.
            let len = u32::try_from(requisite.len()).unwrap_or(u32::MAX);
            let i = usize::try_from(hash.wrapping_add(index) % len).unwrap_or(0);
            rotate(&requisite, i)
        }
        Some(_) if config.strict_topology => requisite.clone(),
        Some((name, term)) => match requisite.iter().position(|t| subset(t, term)) {
            Some(i) => rotate(&requisite, i),
            None => {
                return Err(TopologyError::NotInRequisite {
                    node: name.clone(),
                    selected: term.clone(),
                    requisite,
                });
            }
        },
    };
    Ok(Some(TopologyRequirement {
        requisite: to_csi(&requisite),
        preferred: to_csi(&preferred),
    }))
}

fn rotate(terms: &[Term], i: usize) -> Vec<Term> {
    let mut out = terms.to_vec();
    out.rotate_left(i.min(terms.len()));
    out
}

fn to_csi(terms: &[Term]) -> Vec<Topology> {
    terms
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| Topology {
            segments: t.iter().cloned().collect(),
        })
        .collect()
}

/// The StatefulSet spreading hash of Kubernetes' `getPVCNameHashAndIndexOffset`: for a claim
/// named `<claim>-<set>-<ordinal>` the FNV-1 hash of `<set>` and the ordinal, so that one
/// replica's claims land together and successive replicas round-robin; for other names the hash
/// of the whole name and 0. (An empty name, which Kubernetes hashes randomly, hashes as "".)
fn name_hash_and_index(name: &str) -> (u32, u32) {
    let mut hashed = name;
    let mut index = 0;
    if let Some(dash) = name.rfind('-') {
        let ordinal = &name[dash + 1..];
        // Go's ParseUint(s, 10, 32): digits only, no sign, at most u32::MAX.
        if !ordinal.is_empty()
            && ordinal.bytes().all(|c| c.is_ascii_digit())
            && let Ok(n) = ordinal.parse::<u32>()
        {
            index = n;
            hashed = &name[..dash];
            if let Some(d) = hashed.rfind('-') {
                hashed = &hashed[d + 1..];
            }
        }
    }
    (fnv1_32(hashed.as_bytes()), index)
}

/// FNV-1 (not 1a), 32 bits: Go's `hash/fnv.New32`.
fn fnv1_32(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(2_166_136_261u32, |h, &b| h.wrapping_mul(16_777_619) ^ u32::from(b))
}

/// The PersistentVolume node affinity for the topology a driver says a volume is accessible
/// from: one required term per segment, each an `In` requirement per key (terms are OR'd, the
/// requirements of one term AND'd). No segments, no affinity: the volume is reachable anywhere.
/// (external-provisioner would write an affinity with no terms when every segment is empty,
/// which the API refuses; here that is no affinity.)
pub fn node_affinity(accessible: &[Topology]) -> Option<VolumeNodeAffinity> {
    let terms: Vec<NodeSelectorTerm> = accessible
        .iter()
        .filter(|t| !t.segments.is_empty())
        .map(|t| {
            let sorted: BTreeMap<&String, &String> = t.segments.iter().collect();
            NodeSelectorTerm {
                match_expressions: Some(
                    sorted
                        .into_iter()
                        .map(|(k, v)| NodeSelectorRequirement {
                            key: k.clone(),
                            operator: "In".to_owned(),
                            values: Some(vec![v.clone()]),
                        })
                        .collect(),
                ),
                match_fields: None,
            }
        })
        .collect();
    if terms.is_empty() {
        return None;
    }
    Some(VolumeNodeAffinity {
        required: Some(NodeSelector {
            node_selector_terms: terms,
        }),
    })
}

// Go's `%v` renderings, so that messages read as external-provisioner's do.

fn go_list(items: &[String]) -> String {
    format!("[{}]", items.join(" "))
}

fn go_map(map: &BTreeMap<String, String>) -> String {
    let mut out = String::from("map[");
    for (i, (k, v)) in map.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = write!(out, "{sep}{k}:{v}");
    }
    out.push(']');
    out
}

fn go_term(term: &Term) -> String {
    let pairs: Vec<String> = term.iter().map(|(k, v)| format!("{{{k} {v}}}")).collect();
    format!("[{}]", pairs.join(" "))
}

fn go_terms(terms: &[Term]) -> String {
    let inner: Vec<String> = terms.iter().map(go_term).collect();
    format!("[{}]", inner.join(" "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::provision::fixtures::{Fixture, segments};
    use rstest::rstest;
    use serde_json::json;

    const ZONE: &str = "topology.kubernetes.io/zone";
    const HOST: &str = "topology.berth.io/node";

    /// Segments as sorted `key=value,key=value` strings, for compact expectations.
    fn render(topologies: &[Topology]) -> Vec<String> {
        topologies
            .iter()
            .map(|t| {
                let s: BTreeMap<_, _> = t.segments.iter().collect();
                s.iter()
                    .map(|(k, v)| format!("{}={v}", k.rsplit('/').next().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    }

    type Want = Result<Option<(Vec<&'static str>, Vec<&'static str>)>, &'static str>;
    /// (requisite, preferred) rendered, or the error message.
    type Got = Result<Option<(Vec<String>, Vec<String>)>, String>;

    fn run(f: &Fixture) -> Got {
        accessibility_requirements(&f.input())
            .map(|r| r.map(|r| (render(&r.requisite), render(&r.preferred))))
            .map_err(|e| crate::provision::ProvisionError::from(e).to_string())
    }

    fn three_zone_cluster() -> Fixture {
        Fixture {
            keys: Some(vec![ZONE.to_owned()]),
            ..Fixture::default()
        }
        .with_nodes(vec![
            ("n1", json!({ZONE: "z1"})),
            ("n2", json!({ZONE: "z2"})),
            ("n3", json!({ZONE: "z3"})),
            ("n4", json!({ZONE: "z2"})),
            ("n5", json!({"unrelated": "x"})),
        ])
    }

    fn check(f: Fixture, want: Want) {
        let want = want
            .map(|o| {
                o.map(|(r, p)| {
                    (
                        r.into_iter().map(str::to_owned).collect(),
                        p.into_iter().map(str::to_owned).collect(),
                    )
                })
            })
            .map_err(str::to_owned);
        assert_eq!(run(&f), want);
    }

    #[rstest]
    #[case::driver_without_topology(Fixture { keys: None, ..three_zone_cluster() }, Ok(None))]
    #[case::selected_node_first_in_the_aggregate(
        three_zone_cluster().select("n2"),
        Ok(Some((vec!["zone=z1", "zone=z2", "zone=z3"], vec!["zone=z2", "zone=z3", "zone=z1"])))
    )]
    #[case::selected_node_already_first(
        three_zone_cluster().select("n1"),
        Ok(Some((vec!["zone=z1", "zone=z2", "zone=z3"], vec!["zone=z1", "zone=z2", "zone=z3"])))
    )]
    #[case::allowed_topologies_with_several_values(
        three_zone_cluster().class(json!({"allowedTopologies": [{"matchLabelExpressions": [{"key": ZONE, "values": ["z3", "z1"]}]}]})).select("n3"),
        Ok(Some((vec!["zone=z1", "zone=z3"], vec!["zone=z3", "zone=z1"])))
    )]
    #[case::allowed_topologies_distribute_or_over_and(
        Fixture { keys: Some(vec![ZONE.to_owned(), HOST.to_owned()]), ..three_zone_cluster() }
            .class(json!({"allowedTopologies": [
                {"matchLabelExpressions": [{"key": ZONE, "values": ["z1", "z2"]}, {"key": "rack", "values": ["r1", "r2"]}]},
                {"matchLabelExpressions": [{"key": ZONE, "values": ["z9"]}]},
            ]})),
        Ok(Some((
            vec!["zone=z9", "rack=r1,zone=z1", "rack=r1,zone=z2", "rack=r2,zone=z1", "rack=r2,zone=z2"],
            // "data" hashes to 0x74cb23bd, 3 mod 5: the rotation starts at the fourth segment.
            vec!["rack=r2,zone=z1", "rack=r2,zone=z2", "zone=z9", "rack=r1,zone=z1", "rack=r1,zone=z2"],
        )))
    )]
    #[case::selected_node_not_in_requisite(
        three_zone_cluster().class(json!({"allowedTopologies": [{"matchLabelExpressions": [{"key": ZONE, "values": ["z1", "z2"]}]}]})).select("n3"),
        Err("error generating accessibility requirements: topology [{topology.kubernetes.io/zone z3}] from selected node \"n3\" is not in requisite: [[{topology.kubernetes.io/zone z1}] [{topology.kubernetes.io/zone z2}]]")
    )]
    #[case::selected_node_without_registered_keys(
        Fixture { keys: Some(vec![]), ..three_zone_cluster() }.select("n1"),
        Err("error generating accessibility requirements: no topology key found for node n1")
    )]
    #[case::selected_node_missing_a_label(
        three_zone_cluster().select("n5"),
        Err("error generating accessibility requirements: topology labels from selected node map[unrelated:x] does not match topology keys from CSINode [topology.kubernetes.io/zone]")
    )]
    #[case::no_node_registered_yet(
        Fixture { keys: Some(vec![]), ..three_zone_cluster() },
        Err("error generating accessibility requirements: no available topology found")
    )]
    #[case::keys_on_no_node(
        Fixture { keys: Some(vec!["topology.example.com/rack".to_owned()]), ..three_zone_cluster() },
        Err("error generating accessibility requirements: topologyKeys [topology.example.com/rack] were not found on any nodes")
    )]
    #[case::immediate_topology_off_and_nothing_to_limit(
        three_zone_cluster().config(|c| c.immediate_topology = false),
        Ok(None)
    )]
    #[case::immediate_topology_off_still_honours_the_class(
        three_zone_cluster().config(|c| c.immediate_topology = false).claim(json!({"metadata": {"name": "data"}}))
            .class(json!({"allowedTopologies": [{"matchLabelExpressions": [{"key": ZONE, "values": ["z1"]}]}]})),
        Ok(Some((vec!["zone=z1"], vec!["zone=z1"])))
    )]
    #[case::only_empty_allowed_terms(
        three_zone_cluster().class(json!({"allowedTopologies": [{"matchLabelExpressions": [{"key": ZONE, "values": []}]}]})),
        Ok(None)
    )]
    #[case::strict_topology_passes_only_the_selected_node(
        three_zone_cluster().config(|c| c.strict_topology = true).select("n3"),
        Ok(Some((vec!["zone=z3"], vec!["zone=z3"])))
    )]
    #[case::strict_topology_outside_allowed(
        three_zone_cluster().config(|c| c.strict_topology = true)
            .class(json!({"allowedTopologies": [{"matchLabelExpressions": [{"key": ZONE, "values": ["z1"]}]}]})).select("n3"),
        Err("error generating accessibility requirements: selected node '\"n3\"' topology '[{topology.kubernetes.io/zone z3}]' is not in allowed topologies: [[{topology.kubernetes.io/zone z1}]]")
    )]
    fn requirements(#[case] f: Fixture, #[case] want: Want) {
        check(f, want);
    }

    #[rstest]
    // Expected rotations computed independently (a Python FNV-1): "data" hashes to 0x74cb23bd,
    // 0 mod 3; "web" to 0x46661985, 0 mod 3, so replica 0 starts at z1 and replica 1 at z2.
    #[case::plain_name("data", vec!["zone=z1", "zone=z2", "zone=z3"])]
    #[case::statefulset_replica_0("www-web-0", vec!["zone=z1", "zone=z2", "zone=z3"])]
    #[case::statefulset_replica_1("www-web-1", vec!["zone=z2", "zone=z3", "zone=z1"])]
    // Another claim of the same replica lands with it.
    #[case::other_claim_of_replica_1("logs-web-1", vec!["zone=z2", "zone=z3", "zone=z1"])]
    #[case::next_replica_wraps_around("www-web-2", vec!["zone=z3", "zone=z1", "zone=z2"])]
    fn immediate_binding_spreads_by_claim_name(#[case] name: &str, #[case] preferred: Vec<&str>) {
        let f = three_zone_cluster().claim(json!({"metadata": {"name": name}}));
        let (requisite, got) = run(&f).unwrap().unwrap();
        assert_eq!(requisite, vec!["zone=z1", "zone=z2", "zone=z3"]);
        assert_eq!(got, preferred);
    }

    #[rstest]
    #[case::plain("data", 0x74cb_23bd, 0)]
    #[case::statefulset("www-web-7", 0x4666_1985, 7)]
    #[case::name_dash_ordinal("web-3", 0x4666_1985, 3)]
    #[case::signed_ordinal_is_not_one("web-+3", fnv1_32(b"web-+3"), 0)]
    #[case::ordinal_beyond_u32("web-4294967296", fnv1_32(b"web-4294967296"), 0)]
    fn statefulset_hash(#[case] name: &str, #[case] hash: u32, #[case] index: u32) {
        assert_eq!(name_hash_and_index(name), (hash, index));
    }

    #[test]
    fn fnv1_vectors() {
        // Published FNV-1 32-bit test vectors.
        assert_eq!(fnv1_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1_32(b"a"), 0x050c_5d7e);
        assert_eq!(fnv1_32(b"foobar"), 0x31f0_b262);
    }

    #[test]
    fn node_segment_needs_every_key() {
        let labels = segments(&[(ZONE, "z1"), (HOST, "n1"), ("other", "x")]);
        assert_eq!(
            node_segment(&labels, &[ZONE.to_owned(), HOST.to_owned()]),
            Some(segments(&[(ZONE, "z1"), (HOST, "n1")]))
        );
        assert_eq!(node_segment(&labels, &["rack".to_owned()]), None);
    }

    #[test]
    fn affinity_has_one_term_per_segment() {
        let accessible = vec![
            Topology {
                segments: [(ZONE.to_owned(), "z1".to_owned()), (HOST.to_owned(), "n1".to_owned())]
                    .into_iter()
                    .collect(),
            },
            Topology::default(),
            Topology {
                segments: [(ZONE.to_owned(), "z2".to_owned())].into_iter().collect(),
            },
        ];
        let got = serde_json::to_value(node_affinity(&accessible)).unwrap();
        assert_eq!(
            got,
            json!({"required": {"nodeSelectorTerms": [
                {"matchExpressions": [
                    {"key": HOST, "operator": "In", "values": ["n1"]},
                    {"key": ZONE, "operator": "In", "values": ["z1"]},
                ]},
                {"matchExpressions": [{"key": ZONE, "operator": "In", "values": ["z2"]}]},
            ]}})
        );
        assert_eq!(node_affinity(&[]), None);
        assert_eq!(node_affinity(&[Topology::default()]), None);
    }

    #[test]
    fn subset_follows_external_provisioner() {
        let t = |pairs: &[(&str, &str)]| -> Term {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let node = t(&[("rack", "r1"), ("zone", "z1")]);
        assert!(subset(&t(&[]), &node));
        assert!(subset(&t(&[("zone", "z1")]), &node));
        assert!(subset(&node, &node));
        assert!(!subset(&t(&[("zone", "z2")]), &node));
        assert!(!subset(&t(&[("host", "h")]), &node));
    }
}

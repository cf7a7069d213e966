//! Which PersistentVolume a claim binds to: the rule of Kubernetes' `FindMatchingVolume`
//! (`pkg/controller/volume/persistentvolume/index.go`), as the PV controller applies it (no node,
//! no exclusion list: [`find_matching_volume`]) and as the scheduler applies it for one node
//! ([`find_matching_volume_on_node`]). Pure: it reads the volumes it is given and changes nothing.
//!
//! The rule, in Kubernetes' order:
//! - volumes are grouped by their set of access modes; only groups whose set contains the
//!   claim's modes are searched, fewest modes first, and the first group that yields a match
//!   wins (a 100Gi RWO volume beats a 1Gi RWO+RWX one for an RWO claim);
//! - in a group, a volume is skipped when its `claimRef` names another claim (namespace and name,
//!   and UID when the reference has one), when its capacity is below the request (exact quantity
//!   comparison: 1G < 1Gi), when its volumeMode differs (unset is Filesystem), when its
//!   VolumeAttributesClass differs, or when it is being deleted;
//! - a volume pre-bound to this claim is taken at once: its class, selector and phase are not
//!   checked;
//! - with delayed binding (WaitForFirstConsumer) unbound volumes wait for the scheduler;
//! - otherwise the volume must be Available, match the claim's label selector and have the same
//!   class (the beta annotation first; unset is ""), and the smallest such volume wins (ties:
//!   the first seen).

use std::cmp::Ordering;
use std::collections::BTreeSet;

use berth_api::quantity::Quantity;
use berth_api::selector::{LabelSelector, SelectorError};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};

/// The beta annotation that, when present, names the class instead of `storageClassName`.
pub const BETA_STORAGE_CLASS: &str = "volume.beta.kubernetes.io/storage-class";

/// Why a claim cannot be matched at all (the claim itself is malformed; validation normally
/// stops these before they are stored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    #[error("claim {0} has no storage request")]
    NoRequest(String),
    #[error("claim {claim}: invalid storage request {value:?}")]
    BadRequest { claim: String, value: String },
    #[error("claim {claim}: invalid selector: {source}")]
    BadSelector { claim: String, source: SelectorError },
}

/// A set of access modes, one bit per mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccessModes(u8);

impl AccessModes {
    /// The set of `modes`; unknown names are ignored (validation refuses them).
    pub fn of(modes: &[String]) -> AccessModes {
        AccessModes(modes.iter().fold(0, |bits, m| {
            bits | match m.as_str() {
                "ReadWriteOnce" => 1,
                "ReadOnlyMany" => 2,
                "ReadWriteMany" => 4,
                "ReadWriteOncePod" => 8,
                _ => 0,
            }
        }))
    }

    /// Whether every mode of `other` is in this set.
    pub fn contains(self, other: AccessModes) -> bool {
        self.0 & other.0 == other.0
    }

    /// How many modes the set holds.
    pub fn len(self) -> u32 {
        self.0.count_ones()
    }

    /// Whether the set holds no mode.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The class of a claim: the beta annotation, else `spec.storageClassName`, else "".
pub fn claim_class(claim: &PersistentVolumeClaim) -> &str {
    if let Some(c) = claim
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BETA_STORAGE_CLASS))
    {
        return c;
    }
    claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or("")
}

/// The class of a volume: the beta annotation, else `spec.storageClassName`, else "".
pub fn volume_class(pv: &PersistentVolume) -> &str {
    if let Some(c) = pv.metadata.annotations.as_ref().and_then(|a| a.get(BETA_STORAGE_CLASS)) {
        return c;
    }
    pv.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or("")
}

fn volume_modes(pv: &PersistentVolume) -> AccessModes {
    AccessModes::of(pv.spec.as_ref().and_then(|s| s.access_modes.as_deref()).unwrap_or(&[]))
}

fn volume_capacity(pv: &PersistentVolume) -> Option<Quantity> {
    let q = pv.spec.as_ref()?.capacity.as_ref()?.get("storage")?;
    Quantity::parse(&q.0).ok()
}

/// Whether `pv.spec.claimRef` names `claim` (its UID too, when the reference carries one).
pub fn is_bound_to(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let Some(r) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return false;
    };
    let same_uid = match (r.uid.as_deref(), claim.metadata.uid.as_deref()) {
        (None | Some(""), _) => true,
        (Some(a), Some(b)) => a == b,
        (Some(_), None) => false,
    };
    r.name == claim.metadata.name && r.namespace == claim.metadata.namespace && same_uid
}

fn claim_name(claim: &PersistentVolumeClaim) -> String {
    format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or(""),
        claim.metadata.name.as_deref().unwrap_or("")
    )
}

/// What a claim asks of a volume, read once per search.
struct Wants {
    request: Quantity,
    selector: Option<LabelSelector>,
    modes: AccessModes,
    volume_mode: String,
    vac: String,
    class: String,
}

impl Wants {
    fn of(claim: &PersistentVolumeClaim) -> Result<Wants, MatchError> {
        let spec = claim.spec.as_ref();
        let request = spec
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .ok_or_else(|| MatchError::NoRequest(claim_name(claim)))?;
        let request = Quantity::parse(&request.0).map_err(|_| MatchError::BadRequest {
            claim: claim_name(claim),
            value: request.0.clone(),
        })?;
        let selector = match spec.and_then(|s| s.selector.as_ref()) {
            Some(sel) => {
                let value = serde_json::to_value(sel).unwrap_or_default();
                Some(
                    LabelSelector::from_api(&value).map_err(|source| MatchError::BadSelector {
                        claim: claim_name(claim),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Ok(Wants {
            request,
            selector,
            modes: AccessModes::of(spec.and_then(|s| s.access_modes.as_deref()).unwrap_or(&[])),
            volume_mode: spec
                .and_then(|s| s.volume_mode.clone())
                .unwrap_or_else(|| "Filesystem".to_owned()),
            vac: spec
                .and_then(|s| s.volume_attributes_class_name.clone())
                .unwrap_or_default(),
            class: claim_class(claim).to_owned(),
        })
    }

    /// The filters every search applies before anything else (claimRef names another claim,
    /// capacity below the request, volumeMode or VolumeAttributesClass differs, being deleted).
    /// Returns the volume's capacity when it passes.
    fn admits(&self, pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> Option<Quantity> {
        let pv_spec = pv.spec.as_ref()?;
        if pv_spec.claim_ref.is_some() && !is_bound_to(pv, claim) {
            return None;
        }
        let capacity = volume_capacity(pv)?;
        if capacity < self.request {
            return None;
        }
        if pv_spec.volume_mode.as_deref().unwrap_or("Filesystem") != self.volume_mode {
            return None;
        }
        if pv_spec.volume_attributes_class_name.as_deref().unwrap_or("") != self.vac {
            return None;
        }
        if pv.metadata.deletion_timestamp.is_some() {
            return None;
        }
        Some(capacity)
    }

    /// The filters for a volume that is not pre-bound: Available, selector, class.
    fn takes_unbound(&self, pv: &PersistentVolume) -> bool {
        let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase != Some("Available") {
            return false;
        }
        if let Some(sel) = &self.selector
            && !sel.matches(&pv.metadata.labels.clone().unwrap_or_default())
        {
            return false;
        }
        volume_class(pv) == self.class
    }
}

/// The volume `claim` binds to, among `volumes`, or `None`. `delay_binding` is true when the
/// claim's class binds at the first consumer and no node has been selected yet.
pub fn find_matching_volume<'a>(
    claim: &PersistentVolumeClaim,
    volumes: &'a [PersistentVolume],
    delay_binding: bool,
) -> Result<Option<&'a PersistentVolume>, MatchError> {
    let wants = Wants::of(claim)?;

    // The groups to search, fewest modes first (then by set, so the order is stable).
    let mut groups: Vec<AccessModes> = volumes
        .iter()
        .map(volume_modes)
        .filter(|m| m.contains(wants.modes))
        .collect();
    groups.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
    groups.dedup();

    for group in groups {
        let mut best: Option<(&PersistentVolume, Quantity)> = None;
        for pv in volumes.iter().filter(|pv| volume_modes(pv) == group) {
            let Some(capacity) = wants.admits(pv, claim) else {
                continue;
            };
            if is_bound_to(pv, claim) {
                return Ok(Some(pv));
            }
            if delay_binding {
                continue;
            }
            if !wants.takes_unbound(pv) {
                continue;
            }
            if best.as_ref().is_none_or(|(_, c)| capacity.cmp(c) == Ordering::Less) {
                best = Some((pv, capacity));
            }
        }
        if let Some((pv, _)) = best {
            return Ok(Some(pv));
        }
    }
    Ok(None)
}

/// The volume `claim` binds to on `node`, as the scheduler's volume binding chooses it
/// (Kubernetes' `FindMatchingVolume` with a node and an exclusion list), or `None`.
///
/// The scheduler hands over a flat list (the volumes of the claim's class), so there are no
/// access-mode groups: among all volumes, the smallest that passes wins (ties: the first seen).
/// A volume is skipped when its name is in `excluded` (already chosen for another claim of the
/// same pod), then by the same filters as [`find_matching_volume`]. A volume pre-bound to this
/// claim is returned at once if its node affinity admits `node`, and ends the search with no
/// match if it does not. Unbound volumes are considered (the node is known now): they must be
/// Available, match the selector and the class, have node affinity admitting `node` (labels
/// only, see [`crate::schedule::pv_node_affinity_matches`]) and offer every access mode the
/// claim asks for.
pub fn find_matching_volume_on_node<'a>(
    claim: &PersistentVolumeClaim,
    volumes: impl IntoIterator<Item = &'a PersistentVolume>,
    node: &Node,
    excluded: &BTreeSet<String>,
) -> Result<Option<&'a PersistentVolume>, MatchError> {
    let wants = Wants::of(claim)?;
    let mut best: Option<(&PersistentVolume, Quantity)> = None;
    for pv in volumes {
        if pv.metadata.name.as_ref().is_some_and(|n| excluded.contains(n)) {
            continue;
        }
        let Some(capacity) = wants.admits(pv, claim) else {
            continue;
        };
        let fits_node = crate::schedule::pv_node_affinity_matches(pv, node);
        if is_bound_to(pv, claim) {
            return Ok(fits_node.then_some(pv));
        }
        if !wants.takes_unbound(pv) || !fits_node {
            continue;
        }
        if !volume_modes(pv).contains(wants.modes) {
            continue;
        }
        if best.as_ref().is_none_or(|(_, c)| capacity.cmp(c) == Ordering::Less) {
            best = Some((pv, capacity));
        }
    }
    Ok(best.map(|(pv, _)| pv))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::json;

    fn pv(name: &str, size: &str, modes: &[&str], extra: serde_json::Value) -> PersistentVolume {
        let mut v = json!({
            "metadata": {"name": name},
            "spec": {"capacity": {"storage": size}, "accessModes": modes, "hostPath": {"path": "/x"}},
            "status": {"phase": "Available"},
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn claim(size: &str, modes: &[&str], extra: serde_json::Value) -> PersistentVolumeClaim {
        let mut v = json!({
            "metadata": {"name": "data", "namespace": "default", "uid": "u-1"},
            "spec": {"accessModes": modes, "resources": {"requests": {"storage": size}}},
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn pick(c: &PersistentVolumeClaim, pvs: &[PersistentVolume], delay: bool) -> Option<String> {
        find_matching_volume(c, pvs, delay)
            .unwrap()
            .and_then(|p| p.metadata.name.clone())
    }

    const RWO: &[&str] = &["ReadWriteOnce"];

    #[rstest]
    #[case::smallest_that_fits(vec![pv("big", "10Gi", RWO, json!({})), pv("small", "2Gi", RWO, json!({})), pv("tiny", "1Gi", RWO, json!({}))], "2Gi", Some("small"))]
    #[case::exact_quantities_1g_is_less_than_1gi(vec![pv("g", "1G", RWO, json!({}))], "1Gi", None)]
    #[case::mebibytes_1024_are_1gi(vec![pv("mi", "1024Mi", RWO, json!({}))], "1Gi", Some("mi"))]
    #[case::ties_go_to_the_first_seen(vec![pv("a", "5Gi", RWO, json!({})), pv("b", "5Gi", RWO, json!({}))], "1Gi", Some("a"))]
    #[case::not_available(vec![pv("rel", "5Gi", RWO, json!({"status": {"phase": "Released"}}))], "1Gi", None)]
    #[case::being_deleted(vec![pv("del", "5Gi", RWO, json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}))], "1Gi", None)]
    #[case::bound_elsewhere(vec![pv("other", "5Gi", RWO, json!({"spec": {"claimRef": {"namespace": "default", "name": "other"}}}))], "1Gi", None)]
    #[case::block_volume_for_a_filesystem_claim(vec![pv("blk", "5Gi", RWO, json!({"spec": {"volumeMode": "Block"}}))], "1Gi", None)]
    #[case::unset_mode_is_filesystem(vec![pv("fs", "5Gi", RWO, json!({"spec": {"volumeMode": "Filesystem"}}))], "1Gi", Some("fs"))]
    #[case::class_must_be_equal(vec![pv("fast", "5Gi", RWO, json!({"spec": {"storageClassName": "fast"}}))], "1Gi", None)]
    #[case::attributes_class_must_be_equal(vec![pv("vac", "5Gi", RWO, json!({"spec": {"volumeAttributesClassName": "gold"}}))], "1Gi", None)]
    fn matching_rules(#[case] pvs: Vec<PersistentVolume>, #[case] request: &str, #[case] want: Option<&str>) {
        let c = claim(request, RWO, json!({}));
        assert_eq!(pick(&c, &pvs, false).as_deref(), want);
    }

    #[test]
    fn the_group_with_fewest_modes_wins_over_a_smaller_volume() {
        let pvs = vec![
            pv("rwx-small", "1Gi", &["ReadWriteOnce", "ReadWriteMany"], json!({})),
            pv("rwo-big", "100Gi", RWO, json!({})),
        ];
        assert_eq!(
            pick(&claim("1Gi", RWO, json!({})), &pvs, false).as_deref(),
            Some("rwo-big")
        );
        // A claim for RWX only finds the superset group.
        let rwx = claim("1Gi", &["ReadWriteMany"], json!({}));
        assert_eq!(pick(&rwx, &pvs, false).as_deref(), Some("rwx-small"));
        // Volumes without every wanted mode never match.
        let rwop = claim("1Gi", &["ReadWriteOncePod"], json!({}));
        assert_eq!(pick(&rwop, &pvs, false), None);
    }

    #[test]
    fn a_pre_bound_volume_is_taken_whatever_its_class_phase_or_selector() {
        let bound = json!({
            "spec": {"claimRef": {"namespace": "default", "name": "data"}, "storageClassName": "other"},
            "status": {"phase": "Bound"},
        });
        let pvs = vec![pv("cheap", "1Gi", RWO, json!({})), pv("mine", "9Gi", RWO, bound)];
        let c = claim(
            "1Gi",
            RWO,
            json!({"spec": {"selector": {"matchLabels": {"tier": "x"}}}}),
        );
        assert_eq!(pick(&c, &pvs, false).as_deref(), Some("mine"));
        // Also with delayed binding: the pre-bound volume does not wait for the scheduler.
        assert_eq!(pick(&c, &pvs, true).as_deref(), Some("mine"));
        // A claimRef with another UID is another claim of the same name.
        let stale = json!({"spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u-0"}}});
        let pvs = vec![pv("stale", "9Gi", RWO, stale)];
        assert_eq!(pick(&claim("1Gi", RWO, json!({})), &pvs, false), None);
    }

    #[test]
    fn delayed_binding_leaves_unbound_volumes_to_the_scheduler() {
        let pvs = vec![pv("free", "5Gi", RWO, json!({}))];
        assert_eq!(pick(&claim("1Gi", RWO, json!({})), &pvs, true), None);
    }

    #[test]
    fn selector_and_beta_class_annotation() {
        let pvs = vec![
            pv("slow", "1Gi", RWO, json!({"metadata": {"labels": {"tier": "slow"}}})),
            pv("fast", "2Gi", RWO, json!({"metadata": {"labels": {"tier": "fast"}}})),
        ];
        let c = claim(
            "1Gi",
            RWO,
            json!({"spec": {"selector": {"matchLabels": {"tier": "fast"}}}}),
        );
        assert_eq!(pick(&c, &pvs, false).as_deref(), Some("fast"));
        let expr = json!({"spec": {"selector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["slow"]}]}}});
        assert_eq!(pick(&claim("1Gi", RWO, expr), &pvs, false).as_deref(), Some("fast"));

        // The beta annotation overrides storageClassName, on either side.
        let annotated = json!({
            "metadata": {"annotations": {BETA_STORAGE_CLASS: "gold"}},
            "spec": {"storageClassName": "silver"},
        });
        let pvs = vec![pv("gold", "1Gi", RWO, annotated)];
        let c = claim("1Gi", RWO, json!({"spec": {"storageClassName": "gold"}}));
        assert_eq!(pick(&c, &pvs, false).as_deref(), Some("gold"));
        let c = claim("1Gi", RWO, json!({"spec": {"storageClassName": "silver"}}));
        assert_eq!(pick(&c, &pvs, false), None);
    }

    #[test]
    fn malformed_claims_are_errors_not_panics() {
        let pvs = vec![pv("a", "1Gi", RWO, json!({}))];
        let mut c = claim("1Gi", RWO, json!({}));
        c.spec.as_mut().unwrap().resources = None;
        assert!(matches!(
            find_matching_volume(&c, &pvs, false),
            Err(MatchError::NoRequest(_))
        ));
        let c = claim("lots", RWO, json!({}));
        assert!(matches!(
            find_matching_volume(&c, &pvs, false),
            Err(MatchError::BadRequest { .. })
        ));
    }

    fn node(host: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": host, "labels": {"kubernetes.io/hostname": host}}})).unwrap()
    }

    fn on(host: &str) -> serde_json::Value {
        json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [host]}]}
        ]}}}})
    }

    fn pick_on(c: &PersistentVolumeClaim, pvs: &[PersistentVolume], host: &str, excluded: &[&str]) -> Option<String> {
        let excluded: BTreeSet<String> = excluded.iter().map(|s| s.to_string()).collect();
        find_matching_volume_on_node(c, pvs, &node(host), &excluded)
            .unwrap()
            .and_then(|p| p.metadata.name.clone())
    }

    const RWX: &[&str] = &["ReadWriteOnce", "ReadWriteMany"];

    #[rstest]
    #[case::unbound_volumes_are_considered(vec![pv("free", "5Gi", RWO, json!({}))], &[], Some("free"))]
    #[case::node_affinity_admits(vec![pv("here", "5Gi", RWO, on("n1"))], &[], Some("here"))]
    #[case::node_affinity_excludes(vec![pv("there", "5Gi", RWO, on("n2"))], &[], None)]
    #[case::the_node_decides_between_volumes(vec![pv("there", "1Gi", RWO, on("n2")), pv("here", "9Gi", RWO, on("n1"))], &[], Some("here"))]
    #[case::excluded_volumes_are_skipped(vec![pv("a", "1Gi", RWO, json!({})), pv("b", "2Gi", RWO, json!({}))], &["a"], Some("b"))]
    #[case::no_access_mode_groups_smallest_wins(vec![pv("rwo-big", "100Gi", RWO, json!({})), pv("rwx-small", "1Gi", RWX, json!({}))], &[], Some("rwx-small"))]
    #[case::every_claimed_mode_is_needed(vec![pv("rox", "5Gi", &["ReadOnlyMany"], json!({}))], &[], None)]
    #[case::still_must_be_available(vec![pv("rel", "5Gi", RWO, json!({"status": {"phase": "Released"}}))], &[], None)]
    #[case::still_same_class(vec![pv("fast", "5Gi", RWO, json!({"spec": {"storageClassName": "fast"}}))], &[], None)]
    #[case::still_big_enough(vec![pv("small", "512Mi", RWO, json!({}))], &[], None)]
    #[case::still_not_bound_elsewhere(vec![pv("other", "5Gi", RWO, json!({"spec": {"claimRef": {"namespace": "default", "name": "other"}}}))], &[], None)]
    #[case::match_fields_in_volume_affinity_are_ignored(vec![pv("f", "5Gi", RWO, json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]}}}}))], &[], Some("f"))]
    fn matching_on_a_node(#[case] pvs: Vec<PersistentVolume>, #[case] excluded: &[&str], #[case] want: Option<&str>) {
        let c = claim("1Gi", RWO, json!({}));
        assert_eq!(pick_on(&c, &pvs, "n1", excluded).as_deref(), want);
    }

    #[test]
    fn a_pre_bound_volume_decides_the_node() {
        let mine = json!({"spec": {"claimRef": {"namespace": "default", "name": "data"}}});
        let mut elsewhere = on("n2");
        merge(&mut elsewhere, mine.clone());
        // Pre-bound to this claim but on another node: no match at all, even though a free
        // volume would fit.
        let pvs = vec![pv("mine", "5Gi", RWO, elsewhere), pv("free", "1Gi", RWO, json!({}))];
        let c = claim("1Gi", RWO, json!({}));
        assert_eq!(pick_on(&c, &pvs, "n1", &[]), None);
        // On its node it is taken, whatever the phase.
        assert_eq!(pick_on(&c, &pvs, "n2", &[]).as_deref(), Some("mine"));
        let mut here = on("n1");
        merge(&mut here, mine);
        merge(&mut here, json!({"status": {"phase": "Bound"}}));
        let pvs = vec![pv("free", "1Gi", RWO, json!({})), pv("mine", "5Gi", RWO, here)];
        assert_eq!(pick_on(&c, &pvs, "n1", &[]).as_deref(), Some("mine"));
    }
}

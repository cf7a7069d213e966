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

use std::collections::{BTreeMap, BTreeSet};

use berth_api::names;
use berth_api::quantity::Quantity;
use berth_api::selector::{LabelOp, LabelSelector, Requirement};
use k8s_openapi::api::core::v1::{
    Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, Pod, TopologySelectorTerm,
};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};

use crate::binder::{self, claim_class, is_bound_to, volume_class};

/// The binding annotations: `bind-completed` (set on a claim once the PV controller has bound
/// it; with `spec.volumeName` it makes the claim bound), `bound-by-controller` (on a volume or
/// claim whose binding the controller, not the user, made) and `selected-node` (set on a claim
/// by the scheduler: the node its volume is to be provisioned for).
pub use crate::pv_sync::{ANN_BIND_COMPLETED, ANN_BOUND_BY_CONTROLLER, ANN_SELECTED_NODE};
/// The provisioner of classes that cannot provision (local volumes made by hand).
pub const NO_PROVISIONER: &str = "kubernetes.io/no-provisioner";
/// The taint an unschedulable node carries; a pod that tolerates it may still go there.
pub const TAINT_NODE_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// The PreFilter message for a pod with a claim that should already be bound.
pub const ERR_UNBOUND_IMMEDIATE: &str = "pod has unbound immediate PersistentVolumeClaims";
/// NodeUnschedulable's reason (`ErrReasonUnschedulable`).
pub const ERR_NODE_UNSCHEDULABLE: &str = "node(s) were unschedulable";
/// NodeAffinity's reason (`ErrReasonPod`).
pub const ERR_NODE_AFFINITY: &str = "node(s) didn't match Pod's node affinity/selector";
/// The scheduler's answer when there is no node at all (`ErrNoNodesAvailable`).
pub const ERR_NO_NODES: &str = "no nodes available to schedule pods";

/// Why a node cannot take a pod's volumes: VolumeBinding's `ConflictReason`s, with their exact
/// text. A node may have several; they are listed in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConflictReason {
    /// A bound claim's volume has node affinity that excludes the node (`ErrReasonNodeConflict`).
    NodeConflict,
    /// A delayed claim has no volume on the node and cannot be provisioned there, or it was
    /// already provisioned for another node (`ErrReasonBindConflict`).
    BindConflict,
    /// A claim to provision does not fit any CSIStorageCapacity the node can reach
    /// (`ErrReasonNotEnoughSpace`).
    NotEnoughSpace,
    /// A bound claim names a volume that does not exist (`ErrReasonPVNotExist`).
    PvNotExist,
}

impl ConflictReason {
    /// Kubernetes' text for the reason, as counted in "0/N nodes are available: ...".
    pub const fn message(self) -> &'static str {
        match self {
            ConflictReason::NodeConflict => "node(s) had volume node affinity conflict",
            ConflictReason::BindConflict => "node(s) didn't find available persistent volumes to bind",
            ConflictReason::NotEnoughSpace => "node(s) did not have enough free storage",
            ConflictReason::PvNotExist => "node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)",
        }
    }
}

impl std::fmt::Display for ConflictReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// Why a pod cannot be scheduled, in the scheduler's two kinds of failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// UnschedulableAndUnresolvable: the pod stays Pending until one of the objects changes;
    /// the message is what kube-scheduler puts in the pod's PodScheduled condition and its
    /// FailedScheduling event.
    #[error("{0}")]
    Unschedulable(String),
    /// The framework's Error status: the objects are inconsistent (a class without a binding
    /// mode, a claim without a class that must be provisioned, ...); the pod is retried with
    /// backoff.
    #[error("{0}")]
    Internal(String),
}

/// Why one node was refused by [`filter`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// The node does not fit; each reason counts once in the scheduler's message.
    #[error("{}", .0.iter().map(|r| r.message()).collect::<Vec<_>>().join(", "))]
    Conflicts(Vec<ConflictReason>),
    /// The objects are inconsistent; the whole scheduling attempt fails with this error.
    #[error("{0}")]
    Internal(String),
}

/// The objects the decisions read. A runner implements it over its informer caches (with the
/// indexes it wants); [`Snapshot`] is a ready-made one.
pub trait StorageObjects {
    /// The claim `namespace/name`.
    fn claim(&self, namespace: &str, name: &str) -> Option<&PersistentVolumeClaim>;
    /// The volume `name`.
    fn volume(&self, name: &str) -> Option<&PersistentVolume>;
    /// Every volume whose class (beta annotation first, see [`binder::volume_class`]) is
    /// `class`, bound or not. Ties between equally small volumes go to the first listed.
    fn volumes_of_class(&self, class: &str) -> Vec<&PersistentVolume>;
    /// The StorageClass `name`.
    fn class(&self, name: &str) -> Option<&StorageClass>;
    /// The CSIDriver `name`.
    fn csi_driver(&self, name: &str) -> Option<&CSIDriver>;
    /// Every CSIStorageCapacity (of any namespace) whose `storageClassName` is `class`.
    fn capacities_of_class(&self, class: &str) -> Vec<&CSIStorageCapacity>;
}

/// A set of objects held in maps, with volumes indexed by class: the [`StorageObjects`] for
/// tests and for callers that have the objects at hand. Volumes of a class are listed by name.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    claims: BTreeMap<(String, String), PersistentVolumeClaim>,
    volumes: BTreeMap<String, PersistentVolume>,
    volumes_by_class: BTreeMap<String, BTreeSet<String>>,
    classes: BTreeMap<String, StorageClass>,
    drivers: BTreeMap<String, CSIDriver>,
    capacities: Vec<CSIStorageCapacity>,
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

impl Snapshot {
    /// Adds claims, keyed by namespace and name (a later one replaces an earlier one).
    pub fn with_claims(mut self, claims: impl IntoIterator<Item = PersistentVolumeClaim>) -> Self {
        for c in claims {
            let key = (c.metadata.namespace.clone().unwrap_or_default(), name_of(&c.metadata));
            self.claims.insert(key, c);
        }
        self
    }

    /// Adds volumes, keyed by name and indexed by class.
    pub fn with_volumes(mut self, volumes: impl IntoIterator<Item = PersistentVolume>) -> Self {
        for v in volumes {
            let name = name_of(&v.metadata);
            if let Some(old) = self.volumes.get(&name) {
                let old_class = volume_class(old).to_owned();
                if let Some(set) = self.volumes_by_class.get_mut(&old_class) {
                    set.remove(&name);
                }
            }
            self.volumes_by_class
                .entry(volume_class(&v).to_owned())
                .or_default()
                .insert(name.clone());
            self.volumes.insert(name, v);
        }
        self
    }

    /// Adds storage classes, keyed by name.
    pub fn with_classes(mut self, classes: impl IntoIterator<Item = StorageClass>) -> Self {
        for c in classes {
            self.classes.insert(name_of(&c.metadata), c);
        }
        self
    }

    /// Adds CSIDriver objects, keyed by name.
    pub fn with_csi_drivers(mut self, drivers: impl IntoIterator<Item = CSIDriver>) -> Self {
        for d in drivers {
            self.drivers.insert(name_of(&d.metadata), d);
        }
        self
    }

    /// Adds CSIStorageCapacity objects.
    pub fn with_capacities(mut self, capacities: impl IntoIterator<Item = CSIStorageCapacity>) -> Self {
        self.capacities.extend(capacities);
        self
    }
}

impl StorageObjects for Snapshot {
    fn claim(&self, namespace: &str, name: &str) -> Option<&PersistentVolumeClaim> {
        self.claims.get(&(namespace.to_owned(), name.to_owned()))
    }

    fn volume(&self, name: &str) -> Option<&PersistentVolume> {
        self.volumes.get(name)
    }

    fn volumes_of_class(&self, class: &str) -> Vec<&PersistentVolume> {
        self.volumes_by_class
            .get(class)
            .into_iter()
            .flatten()
            .filter_map(|n| self.volumes.get(n))
            .collect()
    }

    fn class(&self, name: &str) -> Option<&StorageClass> {
        self.classes.get(name)
    }

    fn csi_driver(&self, name: &str) -> Option<&CSIDriver> {
        self.drivers.get(name)
    }

    fn capacities_of_class(&self, class: &str) -> Vec<&CSIStorageCapacity> {
        self.capacities
            .iter()
            .filter(|c| c.storage_class_name == class)
            .collect()
    }
}

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

// ---------------------------------------------------------------------------------------------
// PreFilter

fn has_annotation(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> bool {
    meta.annotations.as_ref().is_some_and(|a| a.contains_key(key))
}

fn claim_volume_name(claim: &PersistentVolumeClaim) -> &str {
    claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()).unwrap_or("")
}

fn claim_key(claim: &PersistentVolumeClaim) -> String {
    format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or(""),
        claim.metadata.name.as_deref().unwrap_or("")
    )
}

/// Whether `claim` is bound: it names a volume (`spec.volumeName`) AND carries the
/// `pv.kubernetes.io/bind-completed` annotation (whatever its value). A claim that names a
/// volume without the annotation is pre-bound, not bound.
pub fn claim_is_bound(claim: &PersistentVolumeClaim) -> bool {
    !claim_volume_name(claim).is_empty() && crate::pv_sync::bind_completed(claim)
}

/// Whether `claim` waits for its first consumer: its class exists and has
/// `volumeBindingMode: WaitForFirstConsumer`. No class, or a class that does not exist, means
/// immediate binding; a class without a binding mode is an error (defaulting always sets one).
pub fn is_delay_binding<O: StorageObjects + ?Sized>(
    claim: &PersistentVolumeClaim,
    objects: &O,
) -> Result<bool, ScheduleError> {
    let name = claim_class(claim);
    if name.is_empty() {
        return Ok(false);
    }
    let Some(class) = objects.class(name) else {
        return Ok(false);
    };
    match class.volume_binding_mode.as_deref() {
        None => Err(ScheduleError::Internal(format!(
            "VolumeBindingMode not set for StorageClass {name:?}"
        ))),
        Some(mode) => Ok(mode == "WaitForFirstConsumer"),
    }
}

/// A pod's claims as PreFilter sorts them for Filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodClaims<'a> {
    /// Bound claims (see [`claim_is_bound`]), in the order of the pod's volumes.
    pub bound: Vec<&'a PersistentVolumeClaim>,
    /// Unbound claims whose class waits for the first consumer and that name no volume.
    pub delayed: Vec<&'a PersistentVolumeClaim>,
}

impl PodClaims<'_> {
    /// True for a pod without claims (the plugin has nothing to check).
    pub fn is_empty(&self) -> bool {
        self.bound.is_empty() && self.delayed.is_empty()
    }
}

/// The claims of `pod`, checked and sorted (VolumeBinding's PreFilter). A volume uses a claim
/// when it is a `persistentVolumeClaim` (the claim it names) or an `ephemeral` volume (the
/// claim `<pod name>-<volume name>`, which must be controlled by the pod). In the order of the
/// pod's volumes, the first claim that is missing, Lost or being deleted makes the pod
/// unschedulable with Kubernetes' message for it (`persistentvolumeclaim "data" not found`,
/// `waiting for ephemeral volume controller to create the persistentvolumeclaim "web-scratch"`,
/// `persistentvolumeclaim "data" bound to non-existent persistentvolume "pv-1"`,
/// `persistentvolumeclaim "data" is being deleted`, `PVC ns/web-scratch was not created for pod
/// ns/web (pod is not owner)`). Then a claim that is neither bound nor delayed (an Immediate
/// class, no class, a missing class, or a pre-bound `volumeName` not yet completed) makes it
/// unschedulable with "pod has unbound immediate PersistentVolumeClaims".
pub fn pre_filter<'a, O: StorageObjects + ?Sized>(pod: &Pod, objects: &'a O) -> Result<PodClaims<'a>, ScheduleError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("");
    let pod_name = pod.metadata.name.as_deref().unwrap_or("");
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_deref()).unwrap_or(&[]);

    let mut claims = Vec::new();
    for vol in volumes {
        let (claim_name, ephemeral) = if let Some(src) = &vol.persistent_volume_claim {
            (src.claim_name.clone(), false)
        } else if vol.ephemeral.is_some() {
            (format!("{pod_name}-{}", vol.name), true)
        } else {
            continue;
        };
        let Some(claim) = objects.claim(namespace, &claim_name) else {
            return Err(ScheduleError::Unschedulable(if ephemeral {
                format!("waiting for ephemeral volume controller to create the persistentvolumeclaim {claim_name:?}")
            } else {
                format!("persistentvolumeclaim {claim_name:?} not found")
            }));
        };
        if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Lost") {
            return Err(ScheduleError::Unschedulable(format!(
                "persistentvolumeclaim {claim_name:?} bound to non-existent persistentvolume {:?}",
                claim_volume_name(claim)
            )));
        }
        if claim.metadata.deletion_timestamp.is_some() {
            return Err(ScheduleError::Unschedulable(format!(
                "persistentvolumeclaim {claim_name:?} is being deleted"
            )));
        }
        if ephemeral && !is_controlled_by(claim, pod) {
            return Err(ScheduleError::Unschedulable(format!(
                "PVC {}/{claim_name} was not created for pod {namespace}/{pod_name} (pod is not owner)",
                claim.metadata.namespace.as_deref().unwrap_or("")
            )));
        }
        claims.push(claim);
    }

    let mut out = PodClaims::default();
    let mut immediate = false;
    for claim in claims {
        if claim_is_bound(claim) {
            out.bound.push(claim);
        } else if is_delay_binding(claim, objects)? && claim_volume_name(claim).is_empty() {
            out.delayed.push(claim);
        } else {
            immediate = true;
        }
    }
    if immediate {
        return Err(ScheduleError::Unschedulable(ERR_UNBOUND_IMMEDIATE.to_owned()));
    }
    Ok(out)
}

/// Whether the claim's controlling owner reference (the first with `controller: true`) is the
/// pod, by UID, and the claim is in the pod's namespace.
fn is_controlled_by(claim: &PersistentVolumeClaim, pod: &Pod) -> bool {
    if claim.metadata.namespace != pod.metadata.namespace {
        return false;
    }
    let controller = claim
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .find(|r| r.controller == Some(true));
    controller.is_some_and(|r| r.uid == pod.metadata.uid.as_deref().unwrap_or(""))
}

// ---------------------------------------------------------------------------------------------
// Filter

/// A delayed claim matched to an existing volume on the node.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticBinding<'a> {
    pub claim: &'a PersistentVolumeClaim,
    pub volume: &'a PersistentVolume,
}

/// What the pod's delayed claims need on one node (VolumeBinding's `PodVolumes`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodVolumes<'a> {
    /// Claims that bind to existing volumes, smallest request first.
    pub static_bindings: Vec<StaticBinding<'a>>,
    /// Claims to provision for this node.
    pub dynamic_provisions: Vec<&'a PersistentVolumeClaim>,
}

impl PodVolumes<'_> {
    /// True when nothing needs writing before the pod is bound to the node.
    pub fn is_empty(&self) -> bool {
        self.static_bindings.is_empty() && self.dynamic_provisions.is_empty()
    }
}

fn storage_request(claim: &PersistentVolumeClaim) -> Option<Result<Quantity, String>> {
    let q = claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    Some(Quantity::parse(&q.0).map_err(|_| q.0.clone()))
}

/// Whether `node` can take the pod's volumes (VolumeBinding's Filter, `FindPodVolumes`).
///
/// The rules, in Kubernetes' order; each failing rule adds its reason once:
/// - each bound claim's volume must exist ([`ConflictReason::PvNotExist`]) and its node
///   affinity admit the node ([`ConflictReason::NodeConflict`]); the first failure ends this
///   check;
/// - a delayed claim whose `volume.kubernetes.io/selected-node` names another node fails the
///   node at once ([`ConflictReason::BindConflict`]); one that names this node goes straight
///   to provisioning;
/// - the other delayed claims, smallest request first, each take a volume of their class with
///   [`binder::find_matching_volume_on_node`], never one already taken by an earlier claim;
/// - each claim left must be provisionable here: its class must exist (else an error), its
///   provisioner must not be empty or `kubernetes.io/no-provisioner`, and its
///   `allowedTopologies` must admit the node (else [`ConflictReason::BindConflict`]); when the
///   provisioner is a CSIDriver with `storageCapacity: true`, some CSIStorageCapacity of the
///   class whose `nodeTopology` selects the node must offer at least the request
///   (`maximumVolumeSize` if set, else `capacity`; else [`ConflictReason::NotEnoughSpace`]).
///   The first claim that fails ends the check. A claim left without a class is an error.
pub fn filter<'a, O: StorageObjects + ?Sized>(
    claims: &PodClaims<'a>,
    node: &Node,
    objects: &'a O,
) -> Result<PodVolumes<'a>, FilterError> {
    let mut bound_ok = true;
    let mut volumes_found = true;
    let mut unbound_ok = true;
    let mut sufficient = true;
    let mut out = PodVolumes::default();

    for claim in &claims.bound {
        match objects.volume(claim_volume_name(claim)) {
            None => {
                volumes_found = false;
                break;
            }
            Some(pv) if !pv_node_affinity_matches(pv, node) => {
                bound_ok = false;
                break;
            }
            Some(_) => {}
        }
    }

    'delayed: {
        if claims.delayed.is_empty() {
            break 'delayed;
        }
        let node_name = node.metadata.name.as_deref().unwrap_or("");
        let mut to_match = Vec::new();
        let mut to_provision = Vec::new();
        for &claim in &claims.delayed {
            match claim
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANN_SELECTED_NODE))
            {
                Some(selected) if selected != node_name => {
                    unbound_ok = false;
                    break 'delayed;
                }
                Some(_) => to_provision.push(claim),
                None => to_match.push(claim),
            }
        }

        if !to_match.is_empty() {
            // Smallest request first, so that small claims get the small volumes.
            to_match.sort_by_key(|c| storage_request(c).and_then(Result::ok));
            let mut chosen = BTreeSet::new();
            for claim in to_match {
                let candidates = objects.volumes_of_class(claim_class(claim));
                match binder::find_matching_volume_on_node(claim, candidates, node, &chosen) {
                    Err(binder::MatchError::BadSelector { claim, source }) => {
                        return Err(FilterError::Internal(format!(
                            "error creating internal label selector for claim: {claim}: {source}"
                        )));
                    }
                    Err(e) => return Err(FilterError::Internal(e.to_string())),
                    Ok(Some(volume)) => {
                        chosen.insert(volume.metadata.name.clone().unwrap_or_default());
                        out.static_bindings.push(StaticBinding { claim, volume });
                    }
                    Ok(None) => {
                        unbound_ok = false;
                        to_provision.push(claim);
                    }
                }
            }
        }

        if !to_provision.is_empty() {
            let (provisionable, enough) = check_provisions(&to_provision, node, objects)?;
            unbound_ok = provisionable;
            sufficient = enough;
            if provisionable && enough {
                out.dynamic_provisions = to_provision;
            }
        }
    }

    let mut reasons = Vec::new();
    if !bound_ok {
        reasons.push(ConflictReason::NodeConflict);
    }
    if !unbound_ok {
        reasons.push(ConflictReason::BindConflict);
    }
    if !sufficient {
        reasons.push(ConflictReason::NotEnoughSpace);
    }
    if !volumes_found {
        reasons.push(ConflictReason::PvNotExist);
    }
    if reasons.is_empty() {
        Ok(out)
    } else {
        Err(FilterError::Conflicts(reasons))
    }
}

/// `checkVolumeProvisions`: (every claim can be provisioned here, there is room for each).
fn check_provisions<O: StorageObjects + ?Sized>(
    claims: &[&PersistentVolumeClaim],
    node: &Node,
    objects: &O,
) -> Result<(bool, bool), FilterError> {
    for claim in claims {
        let class_name = claim_class(claim);
        if class_name.is_empty() {
            return Err(FilterError::Internal(format!(
                "no class for claim {:?}",
                claim_key(claim)
            )));
        }
        let Some(class) = objects.class(class_name) else {
            return Err(FilterError::Internal(format!(
                "failed to find storage class {class_name:?}"
            )));
        };
        if class.provisioner.is_empty() || class.provisioner == NO_PROVISIONER {
            return Ok((false, true));
        }
        if !topology_allows(class.allowed_topologies.as_deref().unwrap_or(&[]), node) {
            return Ok((false, true));
        }
        if !has_enough_capacity(claim, class, node, objects)? {
            return Ok((true, false));
        }
    }
    Ok((true, true))
}

/// Whether storage capacity tracking lets `claim` be provisioned for `node`: always when the
/// claim has no request or the provisioner is not a CSIDriver with `storageCapacity: true`.
/// Otherwise some CSIStorageCapacity of the class must have a `nodeTopology` selecting the
/// node and a limit (`maximumVolumeSize` if set, else `capacity`) of at least the request,
/// both rounded up to whole bytes as Kubernetes' `Value()` does.
pub fn has_enough_capacity<O: StorageObjects + ?Sized>(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    node: &Node,
    objects: &O,
) -> Result<bool, FilterError> {
    let request = match storage_request(claim) {
        None => return Ok(true),
        Some(Ok(q)) => q,
        Some(Err(value)) => {
            return Err(FilterError::Internal(format!(
                "claim {}: invalid storage request {value:?}",
                claim_key(claim)
            )));
        }
    };
    let Some(driver) = objects.csi_driver(&class.provisioner) else {
        return Ok(true);
    };
    if driver.spec.storage_capacity != Some(true) {
        return Ok(true);
    }
    let size = request.value_ceil();
    let labels = node_labels(node);
    let class_name = class.metadata.name.as_deref().unwrap_or("");
    Ok(objects.capacities_of_class(class_name).into_iter().any(|c| {
        let limit = c.maximum_volume_size.as_ref().or(c.capacity.as_ref());
        let fits = limit
            .and_then(|q| Quantity::parse(&q.0).ok())
            .is_some_and(|q| q.value_ceil() >= size);
        fits && capacity_reaches(c, &labels)
    }))
}

/// Whether a CSIStorageCapacity's `nodeTopology` selects a node with `labels` (no topology:
/// no node; an empty selector: every node).
fn capacity_reaches(capacity: &CSIStorageCapacity, labels: &BTreeMap<String, String>) -> bool {
    let Some(topology) = capacity.node_topology.as_ref() else {
        return false;
    };
    let Ok(value) = serde_json::to_value(topology) else {
        return false;
    };
    LabelSelector::from_api(&value).is_ok_and(|s| s.matches(labels))
}

// ---------------------------------------------------------------------------------------------
// Reserve

/// The writes that start binding a pod's volumes on the chosen node (VolumeBinding's Reserve
/// and PreBind). Write every volume first, then every claim; then the pod waits until each of
/// its claims is bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeWrites {
    /// Volumes with `spec.claimRef` set to their claim.
    pub volumes: Vec<PersistentVolume>,
    /// Claims with `volume.kubernetes.io/selected-node` set to the node, for the provisioner.
    pub claims: Vec<PersistentVolumeClaim>,
}

impl VolumeWrites {
    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty() && self.claims.is_empty()
    }
}

/// A reference to `claim` as Kubernetes writes it into `spec.claimRef`.
pub fn claim_reference(claim: &PersistentVolumeClaim) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("PersistentVolumeClaim".to_owned()),
        name: claim.metadata.name.clone(),
        namespace: claim.metadata.namespace.clone(),
        uid: claim.metadata.uid.clone(),
        resource_version: claim.metadata.resource_version.clone(),
        field_path: None,
    }
}

/// `volume` bound to `claim` (Kubernetes' `GetBindVolumeToClaim`), and whether anything
/// changed. The claimRef is replaced unless it already names the claim with its UID;
/// `pv.kubernetes.io/bound-by-controller: "yes"` is added unless the volume was pre-bound to
/// the claim by the user or already carries it.
pub fn bind_volume_to_claim(volume: &PersistentVolume, claim: &PersistentVolumeClaim) -> (PersistentVolume, bool) {
    let pre_bound = is_bound_to(volume, claim);
    let mut out = volume.clone();
    let mut changed = false;
    let current = volume.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    let same = current.is_some_and(|r| {
        r.name == claim.metadata.name
            && r.namespace == claim.metadata.namespace
            && r.uid.as_deref().unwrap_or("") == claim.metadata.uid.as_deref().unwrap_or("")
    });
    if !same {
        out.spec.get_or_insert_with(Default::default).claim_ref = Some(claim_reference(claim));
        changed = true;
    }
    if !pre_bound && !has_annotation(&out.metadata, ANN_BOUND_BY_CONTROLLER) {
        out.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANN_BOUND_BY_CONTROLLER.to_owned(), "yes".to_owned());
        changed = true;
    }
    (out, changed)
}

/// The writes for placing the pod on `node_name` with the volumes [`filter`] found there
/// (Kubernetes' `AssumePodVolumes`): every statically bound volume with its claimRef (written
/// even when already in place, as Kubernetes does), and every claim to provision with
/// `volume.kubernetes.io/selected-node: <node_name>`.
pub fn reserve(volumes: &PodVolumes<'_>, node_name: &str) -> VolumeWrites {
    VolumeWrites {
        volumes: volumes
            .static_bindings
            .iter()
            .map(|b| bind_volume_to_claim(b.volume, b.claim).0)
            .collect(),
        claims: volumes
            .dynamic_provisions
            .iter()
            .map(|&c| {
                let mut c = c.clone();
                c.metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(ANN_SELECTED_NODE.to_owned(), node_name.to_owned());
                c
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Choosing a node

/// The node a pod goes to, with what its volumes need there (pass it to [`reserve`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Placement<'a> {
    pub node: &'a Node,
    pub volumes: PodVolumes<'a>,
}

/// The scheduler's message when no node fits (its `FitError`): "0/N nodes are available:"
/// then, for a PreFilter failure, `" <message>."`; otherwise each distinct reason prefixed with
/// the number of nodes that gave it, these strings sorted as strings (so "10 ..." sorts before
/// "2 ...") and joined with ", ", then ".". `reasons` holds one entry per node per reason.
pub fn fit_error_message<'r>(
    num_nodes: usize,
    pre_filter: Option<&str>,
    reasons: impl IntoIterator<Item = &'r str>,
) -> String {
    let mut msg = format!("0/{num_nodes} nodes are available:");
    if let Some(m) = pre_filter {
        msg.push_str(&format!(" {m}."));
        return msg;
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in reasons {
        *counts.entry(r).or_default() += 1;
    }
    let mut parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    if !parts.is_empty() {
        msg.push_str(&format!(" {}.", parts.join(", ")));
    }
    msg
}

/// Where `pod` runs, among `nodes`, as far as cordons, node affinity and volumes decide.
///
/// With no nodes the pod is unschedulable with "no nodes available to schedule pods". A
/// [`pre_filter`] failure makes it unschedulable with `"0/N nodes are available: <message>."`.
/// Each node is then checked by the first failing of, in kube-scheduler's order:
/// NodeUnschedulable ("node(s) were unschedulable", see [`node_is_unschedulable_for`]),
/// NodeAffinity ("node(s) didn't match Pod's node affinity/selector", see
/// [`pod_node_affinity_matches`]) and VolumeBinding ([`filter`], whose reasons all count). An
/// internal error on any node fails the attempt with `running "VolumeBinding" filter plugin:
/// <error>` (or `running PreFilter plugin "VolumeBinding": <error>`). When no node fits, the
/// message is [`fit_error_message`]'s. Otherwise the first node that fits, in the order given,
/// is chosen: kube-scheduler would score the feasible nodes (resources, spreading, images),
/// which this does not reproduce, so callers order `nodes` by preference. Taints other than
/// the cordon, resources and pod (anti-)affinity are not checked here.
pub fn choose_node<'a, O: StorageObjects + ?Sized>(
    pod: &Pod,
    nodes: &'a [Node],
    objects: &'a O,
) -> Result<Placement<'a>, ScheduleError> {
    if nodes.is_empty() {
        return Err(ScheduleError::Unschedulable(ERR_NO_NODES.to_owned()));
    }
    let claims = match pre_filter(pod, objects) {
        Ok(c) => c,
        Err(ScheduleError::Unschedulable(m)) => {
            return Err(ScheduleError::Unschedulable(fit_error_message(
                nodes.len(),
                Some(&m),
                [],
            )));
        }
        Err(ScheduleError::Internal(m)) => {
            return Err(ScheduleError::Internal(format!(
                "running PreFilter plugin \"VolumeBinding\": {m}"
            )));
        }
    };

    let mut reasons: Vec<&'static str> = Vec::new();
    let mut chosen: Option<Placement<'a>> = None;
    for node in nodes {
        if node_is_unschedulable_for(pod, node) {
            reasons.push(ERR_NODE_UNSCHEDULABLE);
            continue;
        }
        if !pod_node_affinity_matches(pod, node) {
            reasons.push(ERR_NODE_AFFINITY);
            continue;
        }
        match filter(&claims, node, objects) {
            Ok(volumes) => {
                if chosen.is_none() {
                    chosen = Some(Placement { node, volumes });
                }
            }
            Err(FilterError::Conflicts(rs)) => reasons.extend(rs.iter().map(|r| r.message())),
            Err(FilterError::Internal(m)) => {
                return Err(ScheduleError::Internal(format!(
                    "running \"VolumeBinding\" filter plugin: {m}"
                )));
            }
        }
    }
    chosen.ok_or_else(|| ScheduleError::Unschedulable(fit_error_message(nodes.len(), None, reasons)))
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

    fn claim(name: &str, size: &str, extra: Value) -> PersistentVolumeClaim {
        obj(
            json!({
                "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                         "resources": {"requests": {"storage": size}}},
                "status": {"phase": "Pending"},
            }),
            extra,
        )
    }

    fn bound(name: &str, volume: &str) -> PersistentVolumeClaim {
        claim(
            name,
            "1Gi",
            json!({"metadata": {"annotations": {ANN_BIND_COMPLETED: "yes"}},
                   "spec": {"volumeName": volume}, "status": {"phase": "Bound"}}),
        )
    }

    fn class(name: &str, provisioner: &str, mode: &str, extra: Value) -> StorageClass {
        obj(
            json!({"metadata": {"name": name}, "provisioner": provisioner, "volumeBindingMode": mode}),
            extra,
        )
    }

    fn pod(claims: &[&str]) -> Pod {
        let volumes: Vec<Value> = claims
            .iter()
            .map(|c| json!({"name": format!("v-{c}"), "persistentVolumeClaim": {"claimName": c}}))
            .collect();
        obj(
            json!({"metadata": {"name": "web", "namespace": "default", "uid": "pod-uid"},
                   "spec": {"containers": [{"name": "c", "image": "i"}], "volumes": volumes}}),
            json!({}),
        )
    }

    fn names<'a>(it: impl IntoIterator<Item = &'a PersistentVolumeClaim>) -> Vec<String> {
        it.into_iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect()
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

    #[rstest]
    #[case::volume_name_and_annotation(json!({"metadata": {"annotations": {ANN_BIND_COMPLETED: "yes"}}, "spec": {"volumeName": "pv"}}), true)]
    #[case::any_annotation_value(json!({"metadata": {"annotations": {ANN_BIND_COMPLETED: ""}}, "spec": {"volumeName": "pv"}}), true)]
    #[case::volume_name_only_is_pre_bound(json!({"spec": {"volumeName": "pv"}}), false)]
    #[case::annotation_only(json!({"metadata": {"annotations": {ANN_BIND_COMPLETED: "yes"}}}), false)]
    #[case::neither(json!({}), false)]
    fn bound_claims(#[case] extra: Value, #[case] want: bool) {
        assert_eq!(claim_is_bound(&claim("data", "1Gi", extra)), want);
    }

    // --- PreFilter ---------------------------------------------------------------------------

    fn classes() -> Vec<StorageClass> {
        vec![
            class("local", NO_PROVISIONER, "WaitForFirstConsumer", json!({})),
            class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})),
            class("now", "csi.berth.dev", "Immediate", json!({})),
        ]
    }

    fn snapshot(claims: Vec<PersistentVolumeClaim>, volumes: Vec<PersistentVolume>) -> Snapshot {
        Snapshot::default()
            .with_claims(claims)
            .with_volumes(volumes)
            .with_classes(classes())
    }

    fn ephemeral_pod() -> Pod {
        let mut p = pod(&[]);
        p.spec.as_mut().unwrap().volumes = Some(vec![
            obj(json!({"name": "scratch", "ephemeral": {}}), json!({})),
            obj(json!({"name": "cfg", "emptyDir": {}}), json!({})),
        ]);
        p
    }

    fn owned_by(uid: &str) -> Value {
        json!({"metadata": {"ownerReferences": [
            {"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": uid, "controller": true}
        ]}})
    }

    fn delayed(name: &str, size: &str) -> PersistentVolumeClaim {
        claim(name, size, json!({}))
    }

    fn unschedulable(m: &str) -> Result<(Vec<String>, Vec<String>), ScheduleError> {
        Err(ScheduleError::Unschedulable(m.to_owned()))
    }

    fn sorted(bound: &[&str], delayed: &[&str]) -> Result<(Vec<String>, Vec<String>), ScheduleError> {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        Ok((v(bound), v(delayed)))
    }

    #[rstest]
    #[case::no_claims(pod(&[]), vec![], sorted(&[], &[]))]
    #[case::bound_and_delayed(pod(&["a", "b"]), vec![bound("a", "pv-a"), delayed("b", "1Gi")], sorted(&["a"], &["b"]))]
    #[case::missing(pod(&["gone"]), vec![], unschedulable(r#"persistentvolumeclaim "gone" not found"#))]
    #[case::lost(pod(&["a"]), vec![claim("a", "1Gi", json!({"spec": {"volumeName": "pv-a"}, "status": {"phase": "Lost"}}))],
        unschedulable(r#"persistentvolumeclaim "a" bound to non-existent persistentvolume "pv-a""#))]
    #[case::being_deleted(pod(&["a"]), vec![claim("a", "1Gi", json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}))],
        unschedulable(r#"persistentvolumeclaim "a" is being deleted"#))]
    #[case::lost_is_checked_before_deletion(pod(&["a"]), vec![claim("a", "1Gi", json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}, "status": {"phase": "Lost"}}))],
        unschedulable(r#"persistentvolumeclaim "a" bound to non-existent persistentvolume """#))]
    #[case::the_first_volume_in_order_decides(pod(&["a", "gone"]), vec![claim("a", "1Gi", json!({"status": {"phase": "Lost"}}))],
        unschedulable(r#"persistentvolumeclaim "a" bound to non-existent persistentvolume """#))]
    #[case::a_missing_claim_wins_over_an_unbound_one(pod(&["now", "gone"]), vec![claim("now", "1Gi", json!({"spec": {"storageClassName": "now"}}))],
        unschedulable(r#"persistentvolumeclaim "gone" not found"#))]
    #[case::immediate_class(pod(&["a"]), vec![claim("a", "1Gi", json!({"spec": {"storageClassName": "now"}}))], unschedulable(ERR_UNBOUND_IMMEDIATE))]
    #[case::no_class_is_immediate(pod(&["a"]), vec![claim("a", "1Gi", json!({"spec": {"storageClassName": null}}))], unschedulable(ERR_UNBOUND_IMMEDIATE))]
    #[case::empty_class_is_immediate(pod(&["a"]), vec![claim("a", "1Gi", json!({"spec": {"storageClassName": ""}}))], unschedulable(ERR_UNBOUND_IMMEDIATE))]
    #[case::missing_class_is_immediate(pod(&["a"]), vec![claim("a", "1Gi", json!({"spec": {"storageClassName": "nope"}}))], unschedulable(ERR_UNBOUND_IMMEDIATE))]
    #[case::beta_annotation_class(pod(&["a"]), vec![claim("a", "1Gi", json!({"metadata": {"annotations": {"volume.beta.kubernetes.io/storage-class": "now"}}}))],
        unschedulable(ERR_UNBOUND_IMMEDIATE))]
    #[case::pre_bound_but_not_completed(pod(&["a"]), vec![claim("a", "1Gi", json!({"spec": {"volumeName": "pv-a"}}))], unschedulable(ERR_UNBOUND_IMMEDIATE))]
    #[case::immediate_among_others(pod(&["a", "b"]), vec![delayed("a", "1Gi"), claim("b", "1Gi", json!({"spec": {"storageClassName": "now"}}))],
        unschedulable(ERR_UNBOUND_IMMEDIATE))]
    #[case::ephemeral_missing(ephemeral_pod(), vec![],
        unschedulable(r#"waiting for ephemeral volume controller to create the persistentvolumeclaim "web-scratch""#))]
    #[case::ephemeral_owned(ephemeral_pod(), vec![claim("web-scratch", "1Gi", owned_by("pod-uid"))], sorted(&[], &["web-scratch"]))]
    #[case::ephemeral_of_another_pod(ephemeral_pod(), vec![claim("web-scratch", "1Gi", owned_by("other"))],
        unschedulable("PVC default/web-scratch was not created for pod default/web (pod is not owner)"))]
    #[case::ephemeral_without_owner(ephemeral_pod(), vec![claim("web-scratch", "1Gi", json!({}))],
        unschedulable("PVC default/web-scratch was not created for pod default/web (pod is not owner)"))]
    fn pre_filter_rules(
        #[case] p: Pod,
        #[case] claims: Vec<PersistentVolumeClaim>,
        #[case] want: Result<(Vec<String>, Vec<String>), ScheduleError>,
    ) {
        let objects = snapshot(claims, vec![]);
        let got = pre_filter(&p, &objects).map(|c| (names(c.bound), names(c.delayed)));
        assert_eq!(got, want);
    }

    #[test]
    fn a_class_without_binding_mode_is_an_internal_error() {
        let mut broken = class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({}));
        broken.volume_binding_mode = None;
        let objects = Snapshot::default()
            .with_claims([claim("a", "1Gi", json!({"spec": {"storageClassName": "wffc"}}))])
            .with_classes([broken]);
        assert_eq!(
            pre_filter(&pod(&["a"]), &objects),
            Err(ScheduleError::Internal(
                r#"VolumeBindingMode not set for StorageClass "wffc""#.to_owned()
            ))
        );
    }

    // --- Filter ------------------------------------------------------------------------------

    /// What `filter` decided, in names: Ok((static "claim=pv" pairs, provisioned claims)).
    type Outcome = Result<(Vec<String>, Vec<String>), FilterError>;

    fn run_filter(p: &Pod, objects: &Snapshot, host: &str) -> Outcome {
        let claims = pre_filter(p, objects).unwrap();
        let n = node(host, json!({"kubernetes.io/hostname": host, "zone": "a"}));
        filter(&claims, &n, objects).map(|v| {
            (
                v.static_bindings
                    .iter()
                    .map(|b| {
                        format!(
                            "{}={}",
                            b.claim.metadata.name.as_deref().unwrap_or(""),
                            b.volume.metadata.name.as_deref().unwrap_or("")
                        )
                    })
                    .collect(),
                names(v.dynamic_provisions),
            )
        })
    }

    fn fits(statics: &[&str], provisions: &[&str]) -> Outcome {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        Ok((v(statics), v(provisions)))
    }

    fn conflicts(rs: &[ConflictReason]) -> Outcome {
        Err(FilterError::Conflicts(rs.to_vec()))
    }

    use ConflictReason::{BindConflict, NodeConflict, NotEnoughSpace, PvNotExist};

    fn wffc(name: &str, size: &str) -> PersistentVolumeClaim {
        claim(name, size, json!({"spec": {"storageClassName": "wffc"}}))
    }

    fn selected(name: &str, host: &str) -> PersistentVolumeClaim {
        claim(
            name,
            "1Gi",
            json!({"metadata": {"annotations": {ANN_SELECTED_NODE: host}}, "spec": {"storageClassName": "wffc"}}),
        )
    }

    #[rstest]
    #[case::no_claims(pod(&[]), vec![], vec![], fits(&[], &[]))]
    #[case::bound_volume_on_this_node(pod(&["a"]), vec![bound("a", "pv-a")], vec![pv("pv-a", "1Gi", on_node("n1"))], fits(&[], &[]))]
    #[case::bound_volume_without_affinity(pod(&["a"]), vec![bound("a", "pv-a")], vec![pv("pv-a", "1Gi", json!({}))], fits(&[], &[]))]
    #[case::bound_volume_on_another_node(pod(&["a"]), vec![bound("a", "pv-a")], vec![pv("pv-a", "1Gi", on_node("n2"))], conflicts(&[NodeConflict]))]
    #[case::bound_volume_missing(pod(&["a"]), vec![bound("a", "pv-a")], vec![], conflicts(&[PvNotExist]))]
    #[case::missing_volume_stops_the_bound_check(pod(&["a", "b"]), vec![bound("a", "gone"), bound("b", "pv-b")], vec![pv("pv-b", "1Gi", on_node("n2"))], conflicts(&[PvNotExist]))]
    #[case::static_binding_on_this_node(pod(&["a"]), vec![delayed("a", "1Gi")], vec![pv("pv-a", "1Gi", on_node("n1"))], fits(&["a=pv-a"], &[]))]
    #[case::only_volume_elsewhere_and_no_provisioner(pod(&["a"]), vec![delayed("a", "1Gi")], vec![pv("pv-a", "1Gi", on_node("n2"))], conflicts(&[BindConflict]))]
    #[case::volume_bound_to_another_claim(pod(&["a"]), vec![delayed("a", "1Gi")],
        vec![pv("pv-a", "1Gi", json!({"spec": {"claimRef": {"namespace": "default", "name": "x"}}}))], conflicts(&[BindConflict]))]
    #[case::volume_pre_bound_to_the_claim(pod(&["a"]), vec![delayed("a", "1Gi")],
        vec![pv("big", "9Gi", json!({"spec": {"claimRef": {"namespace": "default", "name": "a"}}})), pv("small", "1Gi", json!({}))], fits(&["a=big"], &[]))]
    #[case::volume_of_another_class_is_not_a_candidate(pod(&["a"]), vec![wffc("a", "1Gi")], vec![pv("pv-a", "1Gi", json!({}))], fits(&[], &["a"]))]
    #[case::no_volume_so_provision(pod(&["a"]), vec![wffc("a", "1Gi")], vec![], fits(&[], &["a"]))]
    #[case::selected_for_this_node(pod(&["a"]), vec![selected("a", "n1")], vec![], fits(&[], &["a"]))]
    #[case::selected_for_another_node(pod(&["a"]), vec![selected("a", "n2")], vec![], conflicts(&[BindConflict]))]
    #[case::selected_for_empty_node(pod(&["a"]), vec![selected("a", "")], vec![], conflicts(&[BindConflict]))]
    #[case::selected_node_skips_matching(pod(&["a"]), vec![claim("a", "1Gi", json!({"metadata": {"annotations": {ANN_SELECTED_NODE: "n1"}}}))],
        vec![pv("pv-a", "1Gi", json!({}))], conflicts(&[BindConflict]))]
    #[case::smallest_claim_first(pod(&["big", "small"]), vec![delayed("big", "5Gi"), delayed("small", "1Gi")],
        vec![pv("pv-5", "5Gi", json!({})), pv("pv-1", "1Gi", json!({}))], fits(&["small=pv-1", "big=pv-5"], &[]))]
    #[case::a_volume_serves_one_claim(pod(&["a", "b"]), vec![delayed("a", "1Gi"), delayed("b", "1Gi")],
        vec![pv("pv-9", "9Gi", json!({}))], conflicts(&[BindConflict]))]
    #[case::the_small_claim_takes_the_only_volume(pod(&["big", "small"]), vec![wffc("big", "1Gi"), wffc("small", "512Mi")],
        vec![pv("pv-1", "1Gi", json!({"spec": {"storageClassName": "wffc"}}))], fits(&["small=pv-1"], &["big"]))]
    #[case::bound_and_delayed_reasons_add_up(pod(&["a", "b"]), vec![bound("a", "pv-a"), delayed("b", "1Gi")],
        vec![pv("pv-a", "1Gi", on_node("n2"))], conflicts(&[NodeConflict, BindConflict]))]
    fn filter_rules(
        #[case] p: Pod,
        #[case] claims: Vec<PersistentVolumeClaim>,
        #[case] volumes: Vec<PersistentVolume>,
        #[case] want: Outcome,
    ) {
        assert_eq!(run_filter(&p, &snapshot(claims, volumes), "n1"), want);
    }

    fn capacity(class: &str, cap: Option<&str>, max: Option<&str>, topology: Value) -> CSIStorageCapacity {
        obj(
            json!({"metadata": {"name": "cap", "namespace": "berth"}, "storageClassName": class,
                   "capacity": cap, "maximumVolumeSize": max, "nodeTopology": topology}),
            json!({}),
        )
    }

    fn driver(storage_capacity: Option<bool>) -> CSIDriver {
        obj(
            json!({"metadata": {"name": "csi.berth.dev"}, "spec": {"storageCapacity": storage_capacity}}),
            json!({}),
        )
    }

    fn zone_a() -> Value {
        json!({"matchLabels": {"zone": "a"}})
    }

    #[rstest]
    #[case::empty_provisioner(class("wffc", "", "WaitForFirstConsumer", json!({})), None, vec![], conflicts(&[BindConflict]))]
    #[case::no_provisioner(class("wffc", NO_PROVISIONER, "WaitForFirstConsumer", json!({})), None, vec![], conflicts(&[BindConflict]))]
    #[case::topology_admits(class("wffc", "csi.berth.dev", "WaitForFirstConsumer",
        json!({"allowedTopologies": [{"matchLabelExpressions": [{"key": "zone", "values": ["a"]}]}]})), None, vec![], fits(&[], &["a"]))]
    #[case::topology_excludes(class("wffc", "csi.berth.dev", "WaitForFirstConsumer",
        json!({"allowedTopologies": [{"matchLabelExpressions": [{"key": "zone", "values": ["b"]}]}]})), None, vec![], conflicts(&[BindConflict]))]
    #[case::no_csi_driver_object(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), None, vec![], fits(&[], &["a"]))]
    #[case::driver_without_capacity_tracking(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(false))), vec![], fits(&[], &["a"]))]
    #[case::driver_with_unset_capacity_tracking(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(None)), vec![], fits(&[], &["a"]))]
    #[case::tracked_but_no_capacity_objects(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))), vec![], conflicts(&[NotEnoughSpace]))]
    #[case::enough_capacity(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", Some("2Gi"), None, zone_a())], fits(&[], &["a"]))]
    #[case::exactly_enough(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", Some("1Gi"), None, zone_a())], fits(&[], &["a"]))]
    #[case::not_enough_capacity(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", Some("1G"), None, zone_a())], conflicts(&[NotEnoughSpace]))]
    #[case::maximum_volume_size_wins_over_capacity(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", Some("100Gi"), Some("512Mi"), zone_a())], conflicts(&[NotEnoughSpace]))]
    #[case::maximum_volume_size_alone(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", None, Some("1Gi"), zone_a())], fits(&[], &["a"]))]
    #[case::no_limit_at_all(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", None, None, zone_a())], conflicts(&[NotEnoughSpace]))]
    #[case::capacity_of_another_topology(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", Some("9Gi"), None, json!({"matchLabels": {"zone": "b"}}))], conflicts(&[NotEnoughSpace]))]
    #[case::capacity_without_topology_reaches_no_node(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", Some("9Gi"), None, json!(null))], conflicts(&[NotEnoughSpace]))]
    #[case::empty_topology_reaches_every_node(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", Some("9Gi"), None, json!({}))], fits(&[], &["a"]))]
    #[case::capacity_of_another_class(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("local", Some("9Gi"), None, zone_a())], conflicts(&[NotEnoughSpace]))]
    #[case::any_fitting_capacity_will_do(class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({})), Some(driver(Some(true))),
        vec![capacity("wffc", Some("1Mi"), None, zone_a()), capacity("wffc", Some("5Gi"), None, zone_a())], fits(&[], &["a"]))]
    fn provisioning_rules(
        #[case] c: StorageClass,
        #[case] d: Option<CSIDriver>,
        #[case] caps: Vec<CSIStorageCapacity>,
        #[case] want: Outcome,
    ) {
        let objects = Snapshot::default()
            .with_claims([wffc("a", "1Gi")])
            .with_classes([c])
            .with_csi_drivers(d)
            .with_capacities(caps);
        assert_eq!(run_filter(&pod(&["a"]), &objects, "n1"), want);
    }

    #[test]
    fn capacity_is_compared_in_whole_bytes_rounded_up() {
        // 1.5 bytes asks for 2 bytes; a 1.6-byte limit is also 2 bytes, so it fits.
        let objects = Snapshot::default()
            .with_claims([wffc("a", "1500m")])
            .with_classes([class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({}))])
            .with_csi_drivers([driver(Some(true))])
            .with_capacities([capacity("wffc", Some("1600m"), None, zone_a())]);
        assert_eq!(run_filter(&pod(&["a"]), &objects, "n1"), fits(&[], &["a"]));
    }

    #[test]
    fn the_first_unprovisionable_claim_ends_the_check() {
        // "a" is too big for the capacity, "b" has a class that cannot provision: only the
        // first reason (in request order) is reported.
        let objects = Snapshot::default()
            .with_claims([
                wffc("a", "1Gi"),
                claim("b", "2Gi", json!({"spec": {"storageClassName": "local"}})),
            ])
            .with_classes(classes())
            .with_csi_drivers([driver(Some(true))])
            .with_capacities([capacity("wffc", Some("1Mi"), None, zone_a())]);
        assert_eq!(
            run_filter(&pod(&["b", "a"]), &objects, "n1"),
            conflicts(&[NotEnoughSpace])
        );
    }

    #[test]
    fn a_class_gone_by_filter_time_is_an_internal_error() {
        let c = wffc("a", "1Gi");
        let claims = PodClaims {
            bound: vec![],
            delayed: vec![&c],
        };
        let n = node("n1", json!({}));
        assert_eq!(
            filter(&claims, &n, &Snapshot::default()),
            Err(FilterError::Internal(
                r#"failed to find storage class "wffc""#.to_owned()
            ))
        );
        // With the class present the same claim is provisioned.
        let objects = Snapshot::default().with_classes(classes());
        assert_eq!(filter(&claims, &n, &objects).map(|v| v.dynamic_provisions.len()), Ok(1));
    }

    #[test]
    fn a_claim_without_class_cannot_be_provisioned() {
        let c = claim("a", "1Gi", json!({"spec": {"storageClassName": null}}));
        let claims = PodClaims {
            bound: vec![],
            delayed: vec![&c],
        };
        assert_eq!(
            filter(&claims, &node("n1", json!({})), &Snapshot::default()),
            Err(FilterError::Internal(r#"no class for claim "default/a""#.to_owned()))
        );
    }

    #[test]
    fn a_malformed_selector_is_an_internal_error() {
        let c = claim(
            "a",
            "1Gi",
            json!({"spec": {"selector": {"matchExpressions": [{"key": "k", "operator": "Near"}]}}}),
        );
        let claims = PodClaims {
            bound: vec![],
            delayed: vec![&c],
        };
        let objects = snapshot(vec![], vec![pv("pv", "1Gi", json!({}))]);
        assert_eq!(
            filter(&claims, &node("n1", json!({})), &objects),
            Err(FilterError::Internal(
                r#"error creating internal label selector for claim: default/a: "Near" is not a valid label selector operator"#.to_owned()
            ))
        );
    }

    #[test]
    fn reasons_read_as_kubernetes_writes_them() {
        assert_eq!(
            FilterError::Conflicts(vec![NodeConflict, BindConflict, NotEnoughSpace, PvNotExist]).to_string(),
            "node(s) had volume node affinity conflict, \
             node(s) didn't find available persistent volumes to bind, \
             node(s) did not have enough free storage, \
             node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)"
        );
    }

    // --- Reserve -----------------------------------------------------------------------------

    #[test]
    fn reserve_binds_volumes_and_selects_the_node_for_provisioning() {
        let mut a = delayed("a", "1Gi");
        a.metadata.resource_version = Some("42".to_owned());
        let objects = Snapshot::default()
            .with_claims([a, wffc("b", "1Gi")])
            .with_volumes([pv("pv-a", "1Gi", on_node("n1"))])
            .with_classes(classes());
        let claims = pre_filter(&pod(&["a", "b"]), &objects).unwrap();
        let n = node("n1", json!({"kubernetes.io/hostname": "n1"}));
        let volumes = filter(&claims, &n, &objects).unwrap();
        let writes = reserve(&volumes, "n1");

        let [v] = writes.volumes.as_slice() else {
            panic!("{writes:?}")
        };
        let want: ObjectReference = obj(
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "a",
                   "namespace": "default", "uid": "uid-a", "resourceVersion": "42"}),
            json!({}),
        );
        assert_eq!(v.spec.as_ref().unwrap().claim_ref.as_ref(), Some(&want));
        assert_eq!(
            v.metadata.annotations.as_ref().unwrap().get(ANN_BOUND_BY_CONTROLLER),
            Some(&"yes".to_owned())
        );

        let [c] = writes.claims.as_slice() else {
            panic!("{writes:?}")
        };
        assert_eq!(c.metadata.name.as_deref(), Some("b"));
        assert_eq!(
            c.metadata.annotations.as_ref().unwrap().get(ANN_SELECTED_NODE),
            Some(&"n1".to_owned())
        );
        // Nothing else about the claim changes.
        let mut back = c.clone();
        back.metadata.annotations = None;
        assert_eq!(back, wffc("b", "1Gi"));
    }

    #[test]
    fn reserve_with_nothing_to_bind_writes_nothing() {
        assert!(reserve(&PodVolumes::default(), "n1").is_empty());
    }

    #[rstest]
    #[case::unbound_volume(json!({}), true, true)]
    #[case::pre_bound_by_name_gets_the_uid(json!({"spec": {"claimRef": {"namespace": "default", "name": "a"}}}), false, true)]
    #[case::pre_bound_with_uid_is_unchanged(json!({"spec": {"claimRef": {"namespace": "default", "name": "a", "uid": "uid-a"}}}), false, false)]
    #[case::annotation_already_there(json!({"metadata": {"annotations": {ANN_BOUND_BY_CONTROLLER: "yes"}},
        "spec": {"claimRef": {"namespace": "default", "name": "a", "uid": "uid-a"}}}), true, false)]
    fn binding_a_volume(#[case] extra: Value, #[case] annotated: bool, #[case] changed: bool) {
        let c = delayed("a", "1Gi");
        let (v, dirty) = bind_volume_to_claim(&pv("pv", "1Gi", extra), &c);
        assert_eq!(dirty, changed);
        assert!(is_bound_to(&v, &c));
        assert_eq!(
            v.spec.as_ref().unwrap().claim_ref.as_ref().unwrap().uid.as_deref(),
            Some("uid-a")
        );
        assert_eq!(has_annotation(&v.metadata, ANN_BOUND_BY_CONTROLLER), annotated);
    }

    // --- Choosing a node ---------------------------------------------------------------------

    #[rstest]
    #[case::counts_sorted_as_strings(
        5, None, vec![ERR_NODE_UNSCHEDULABLE, BindConflict.message(), ERR_NODE_UNSCHEDULABLE, NodeConflict.message(), BindConflict.message()],
        "0/5 nodes are available: 1 node(s) had volume node affinity conflict, 2 node(s) didn't find available persistent volumes to bind, 2 node(s) were unschedulable."
    )]
    #[case::ten_sorts_before_two(
        12, None, [vec!["b"; 10], vec!["a"; 2]].concat(),
        "0/12 nodes are available: 10 b, 2 a."
    )]
    #[case::pre_filter_message(3, Some(ERR_UNBOUND_IMMEDIATE), vec![],
        "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims.")]
    #[case::no_reasons(1, None, vec![], "0/1 nodes are available:")]
    fn fit_errors(#[case] n: usize, #[case] pre: Option<&str>, #[case] reasons: Vec<&str>, #[case] want: &str) {
        assert_eq!(fit_error_message(n, pre, reasons), want);
    }

    fn cluster() -> Vec<Node> {
        let mut cordoned = node("n0", json!({"kubernetes.io/hostname": "n0", "zone": "a"}));
        cordoned.spec = Some(obj(json!({"unschedulable": true}), json!({})));
        vec![
            cordoned,
            node("n1", json!({"kubernetes.io/hostname": "n1", "zone": "a"})),
            node("n2", json!({"kubernetes.io/hostname": "n2", "zone": "a"})),
            node("n3", json!({"kubernetes.io/hostname": "n3", "zone": "b"})),
        ]
    }

    fn in_zone(p: Pod, zone: &str) -> Pod {
        let mut p = p;
        p.spec.as_mut().unwrap().node_selector = Some([("zone".to_owned(), zone.to_owned())].into());
        p
    }

    #[rstest]
    #[case::the_volume_picks_the_node(pod(&["a"]), vec![delayed("a", "1Gi")], vec![pv("pv-a", "1Gi", on_node("n2"))], Ok("n2"))]
    #[case::first_fitting_node_in_order(pod(&["a"]), vec![wffc("a", "1Gi")], vec![], Ok("n1"))]
    #[case::no_volumes_at_all(pod(&[]), vec![], vec![], Ok("n1"))]
    #[case::node_selector_applies(in_zone(pod(&["a"]), "b"), vec![wffc("a", "1Gi")], vec![], Ok("n3"))]
    #[case::volume_affinity_and_selector_disagree(in_zone(pod(&["a"]), "a"), vec![bound("a", "pv-a")], vec![pv("pv-a", "1Gi", on_node("n3"))],
        Err(ScheduleError::Unschedulable("0/4 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, \
            1 node(s) were unschedulable, 2 node(s) had volume node affinity conflict.".to_owned())))]
    #[case::no_volume_anywhere(pod(&["a"]), vec![delayed("a", "1Gi")], vec![pv("pv-a", "1Gi", on_node("n0"))],
        Err(ScheduleError::Unschedulable("0/4 nodes are available: 1 node(s) were unschedulable, \
            3 node(s) didn't find available persistent volumes to bind.".to_owned())))]
    #[case::pre_filter_failure(pod(&["gone"]), vec![], vec![],
        Err(ScheduleError::Unschedulable(r#"0/4 nodes are available: persistentvolumeclaim "gone" not found."#.to_owned())))]
    #[case::immediate_claim(pod(&["a"]), vec![claim("a", "1Gi", json!({"spec": {"storageClassName": "now"}}))], vec![],
        Err(ScheduleError::Unschedulable("0/4 nodes are available: pod has unbound immediate PersistentVolumeClaims.".to_owned())))]
    fn choosing_a_node(
        #[case] p: Pod,
        #[case] claims: Vec<PersistentVolumeClaim>,
        #[case] volumes: Vec<PersistentVolume>,
        #[case] want: Result<&str, ScheduleError>,
    ) {
        let nodes = cluster();
        let objects = snapshot(claims, volumes);
        let got = choose_node(&p, &nodes, &objects).map(|pl| pl.node.metadata.name.as_deref().unwrap_or(""));
        assert_eq!(got, want);
    }

    #[test]
    fn choose_node_returns_what_reserve_needs() {
        let nodes = cluster();
        let objects = snapshot(vec![delayed("a", "1Gi")], vec![pv("pv-a", "1Gi", on_node("n2"))]);
        let placement = choose_node(&pod(&["a"]), &nodes, &objects).unwrap();
        let writes = reserve(&placement.volumes, "n2");
        assert_eq!(writes.volumes.len(), 1);
        assert!(writes.claims.is_empty());
    }

    #[test]
    fn a_pod_tolerating_the_cordon_may_use_a_cordoned_node() {
        let nodes = cluster();
        let objects = snapshot(vec![delayed("a", "1Gi")], vec![pv("pv-a", "1Gi", on_node("n0"))]);
        let mut p = pod(&["a"]);
        p.spec.as_mut().unwrap().tolerations = Some(vec![obj(
            json!({"key": TAINT_NODE_UNSCHEDULABLE, "operator": "Exists"}),
            json!({}),
        )]);
        let got = choose_node(&p, &nodes, &objects).unwrap();
        assert_eq!(got.node.metadata.name.as_deref(), Some("n0"));
    }

    #[test]
    fn no_nodes_at_all() {
        assert_eq!(
            choose_node(&pod(&["gone"]), &[], &Snapshot::default()),
            Err(ScheduleError::Unschedulable(ERR_NO_NODES.to_owned()))
        );
    }

    #[test]
    fn internal_errors_name_the_plugin() {
        let nodes = cluster();
        let mut broken = class("wffc", "csi.berth.dev", "WaitForFirstConsumer", json!({}));
        broken.volume_binding_mode = None;
        let objects = Snapshot::default()
            .with_claims([wffc("a", "1Gi")])
            .with_classes([broken]);
        assert_eq!(
            choose_node(&pod(&["a"]), &nodes, &objects),
            Err(ScheduleError::Internal(
                r#"running PreFilter plugin "VolumeBinding": VolumeBindingMode not set for StorageClass "wffc""#
                    .to_owned()
            ))
        );
        // A Filter error ends the attempt.
        let c = claim(
            "a",
            "1Gi",
            json!({"spec": {"selector": {"matchExpressions": [{"key": "k", "operator": "Near"}]}}}),
        );
        let objects = snapshot(vec![c], vec![pv("pv", "1Gi", json!({}))]);
        assert_eq!(
            choose_node(&pod(&["a"]), &nodes, &objects),
            Err(ScheduleError::Internal(
                r#"running "VolumeBinding" filter plugin: error creating internal label selector for claim: default/a: "Near" is not a valid label selector operator"#.to_owned()
            ))
        );
    }

    #[test]
    fn snapshot_reindexes_a_volume_that_changes_class() {
        let objects = Snapshot::default()
            .with_volumes([pv("v", "1Gi", json!({}))])
            .with_volumes([pv("v", "1Gi", json!({"spec": {"storageClassName": "fast"}}))]);
        assert!(objects.volumes_of_class("local").is_empty());
        assert_eq!(objects.volumes_of_class("fast").len(), 1);
    }
}

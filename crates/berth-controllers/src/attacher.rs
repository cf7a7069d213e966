//! Attach and detach of CSI volumes, in two parts as in Kubernetes:
//!
//! - the attach/detach controller's part (kube-controller-manager
//!   `pkg/controller/volume/attachdetach`): every scheduled pod that is not done needs the CSI
//!   volumes of its bound claims attached to its node, so a VolumeAttachment named
//!   [`crate::attach::attachment_name`] exists for each (volume, node) pair in use, and the ones
//!   this controller made go away once no pod on that node needs the volume (and the node no
//!   longer reports it in `status.volumesInUse`). A driver whose CSIDriver says
//!   `attachRequired: false` gets none; a missing CSIDriver means attach is required. A
//!   ReadWriteOnce volume is not attached to a second node ("Multi-Attach error");
//! - external-attacher's part (`kubernetes-csi/external-attacher`): a VolumeAttachment whose
//!   attacher is a registered driver gets the `external-attacher/<driver>` finalizer (and the
//!   volume the same finalizer), ControllerPublishVolume, then `status.attached` with the
//!   publish context; failures land in `status.attachError`. Deleting it calls
//!   ControllerUnpublishVolume before the finalizer goes. A driver without
//!   PUBLISH_UNPUBLISH_VOLUME is marked attached at once, with no finalizer.
//!
//! The decisions are pure functions over the objects; [`Attacher`] is the runner. Every step
//! can be repeated: the VolumeAttachment name is a function of the volume, driver and node, and
//! the CSI calls are idempotent. This never attaches a volume to a node its driver does not
//! know (no node id from the node's CSINode, the attachment's annotation, or the driver
//! serving that node itself).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_csi::v1::controller_service_capability::rpc::Type as ControllerCap;
use berth_csi::v1::{ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec, Pod};
use k8s_openapi::api::storage::v1::{
    CSIDriver, CSINode, VolumeAttachment, VolumeAttachmentSource, VolumeAttachmentSpec, VolumeAttachmentStatus,
    VolumeError,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use tokio::sync::watch;

use crate::Informers;
use crate::api::{Api, ApiError, Part, Typed, kinds};
use crate::attach::attachment_name;
use crate::drivers::{Drivers, NodeInfo};
use crate::events::{Involved, Recorder};
use crate::informer::Change;
use crate::protection::pod_claims;
use crate::pv_controller::{assumed, retry_after};
use crate::pv_sync::Note;
use crate::queue::{Outcome, Queue};
use crate::sidecar::{self, CapabilityError};

/// The annotation external-attacher records the node id it published to, so that a detach
/// still finds it after the node's CSINode is gone.
pub const NODE_ID_ANNOTATION: &str = "csi.alpha.kubernetes.io/node-id";

/// How often every CSI volume is looked at again regardless of events: catches what no event
/// announces (a driver that registered after its attachments appeared).
pub const RESYNC: Duration = Duration::from_secs(30);

/// external-attacher's finalizer for `driver`: `external-attacher/` and the driver name with
/// every character outside `[a-zA-Z0-9-]` replaced by `-` (an `X` appended when that leaves a
/// trailing `-`), as its `SanitizeDriverName` makes it.
pub fn finalizer_name(driver: &str) -> String {
    let mut name: String = driver
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    if name.is_empty() || name.ends_with('-') {
        name.push('X');
    }
    format!("external-attacher/{name}")
}

/// The unique volume name the kubelet reports in a node's `status.volumesInUse`.
pub fn unique_volume_name(driver: &str, handle: &str) -> String {
    format!("kubernetes.io/csi/{driver}^{handle}")
}

/// Whether volumes of the driver need attaching: unless its CSIDriver says
/// `attachRequired: false` (no CSIDriver at all means yes, as in Kubernetes).
pub fn attach_required(csi_driver: Option<&CSIDriver>) -> bool {
    csi_driver.and_then(|d| d.spec.attach_required).unwrap_or(true)
}

/// The node a pod runs on, when it is scheduled and not done (Succeeded or Failed pods no longer
/// need their volumes attached; deleted pods are gone from the cache).
pub fn active_node(pod: &Pod) -> Option<&str> {
    let node = pod.spec.as_ref()?.node_name.as_deref().filter(|n| !n.is_empty())?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    (!matches!(phase, Some("Succeeded" | "Failed"))).then_some(node)
}

/// Whether the volume may be attached to several nodes at once: when it has ReadWriteMany or
/// ReadOnlyMany, or no access modes at all (then the driver decides), as `IsMultiAttachAllowed`.
pub fn multi_attach_allowed(pv: &PersistentVolume) -> bool {
    match pv.spec.as_ref().and_then(|s| s.access_modes.as_deref()) {
        None | Some([]) => true,
        Some(modes) => modes.iter().any(|m| m == "ReadWriteMany" || m == "ReadOnlyMany"),
    }
}

fn csi_of(pv: &PersistentVolume) -> Option<(&str, &str)> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    Some((csi.driver.as_str(), csi.volume_handle.as_str()))
}

fn va_pv_name(va: &VolumeAttachment) -> Option<&str> {
    va.spec.source.persistent_volume_name.as_deref()
}

fn is_attached(va: &VolumeAttachment) -> bool {
    va.status.as_ref().is_some_and(|s| s.attached)
}

/// Whether `va` is one the attach/detach controller made for `pv`: it names the volume, the
/// volume's driver as attacher, and has the name derived from them and its node.
pub fn is_managed(va: &VolumeAttachment, pv: &PersistentVolume) -> bool {
    let Some((driver, handle)) = csi_of(pv) else {
        return false;
    };
    va_pv_name(va) == pv.metadata.name.as_deref()
        && va.spec.attacher == driver
        && va.metadata.name.as_deref() == Some(attachment_name(handle, driver, &va.spec.node_name).as_str())
}

/// The VolumeAttachment that attaches `pv` to `node` (None for a volume that is not CSI).
pub fn attachment_for(pv: &PersistentVolume, node: &str) -> Option<VolumeAttachment> {
    let (driver, handle) = csi_of(pv)?;
    Some(VolumeAttachment {
        metadata: ObjectMeta {
            name: Some(attachment_name(handle, driver, node)),
            ..ObjectMeta::default()
        },
        spec: VolumeAttachmentSpec {
            attacher: driver.to_owned(),
            node_name: node.to_owned(),
            source: VolumeAttachmentSource {
                persistent_volume_name: pv.metadata.name.clone(),
                inline_volume_spec: None,
            },
        },
        status: None,
    })
}

/// What the attach/detach controller sees of one volume.
#[derive(Debug, Clone, Copy)]
pub struct VolumeUse<'a> {
    pub pv: &'a PersistentVolume,
    /// [`attach_required`] for the volume's driver.
    pub attach_required: bool,
    /// The pods that use the volume through the claim bound to it (any state; filtered here).
    pub pods: &'a [&'a Pod],
    /// The VolumeAttachments that name the volume.
    pub attachments: &'a [&'a VolumeAttachment],
}

/// What to do about one volume's attachments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttachPlan {
    pub create: Vec<VolumeAttachment>,
    /// Names of attachments to delete.
    pub delete: Vec<String>,
    /// Events for pods (`namespace/name` key and the event).
    pub notes: Vec<(Involved, Note)>,
}

fn pod_involved(pod: &Pod) -> Involved {
    Involved::of("v1", "Pod", &pod.metadata)
}

/// The attach/detach decision for one volume:
/// - nodes in use: the nodes of [`active_node`] pods, when attach is required;
/// - each node in use without an attachment gets one, unless the volume cannot be attached to
///   several nodes and an attachment for another node exists: then its pods get the
///   Multi-Attach FailedAttachVolume event with Kubernetes' wording;
/// - each attachment this controller made ([`is_managed`]) for a node no longer in use is
///   deleted, unless it is being deleted already or the node still reports the volume in use
///   (`in_use_on(node, unique volume name)`, from its `status.volumesInUse`).
pub fn plan_attachments(v: &VolumeUse<'_>, in_use_on: impl Fn(&str, &str) -> bool) -> AttachPlan {
    let mut plan = AttachPlan::default();
    let pv_name = v.pv.metadata.name.clone().unwrap_or_default();
    let mut wanted: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    if v.attach_required && csi_of(v.pv).is_some() {
        for pod in v.pods {
            if let Some(node) = active_node(pod) {
                wanted.entry(node).or_default().push(pod);
            }
        }
    }
    let managed: Vec<&VolumeAttachment> = v
        .attachments
        .iter()
        .copied()
        .filter(|va| is_managed(va, v.pv))
        .collect();
    let has: BTreeSet<&str> = managed.iter().map(|va| va.spec.node_name.as_str()).collect();
    let exclusive = !multi_attach_allowed(v.pv);
    for (node, pods) in &wanted {
        if has.contains(node) {
            continue;
        }
        let elsewhere: Vec<&str> = has.iter().copied().filter(|n| n != node).collect();
        if exclusive && !elsewhere.is_empty() {
            let users: Vec<&Pod> = elsewhere
                .iter()
                .flat_map(|n| wanted.get(n).into_iter().flatten().copied())
                .collect();
            for pod in pods {
                let note = Note::warning(
                    "FailedAttachVolume",
                    format!(
                        "Multi-Attach error for volume {pv_name:?} {}",
                        multi_attach_reason(pod, &users)
                    ),
                );
                plan.notes.push((pod_involved(pod), note));
            }
            continue;
        }
        if let Some(va) = attachment_for(v.pv, node) {
            plan.create.push(va);
        }
    }
    let unique = csi_of(v.pv).map(|(d, h)| unique_volume_name(d, h)).unwrap_or_default();
    for va in managed {
        let node = va.spec.node_name.as_str();
        if wanted.contains_key(node) || va.metadata.deletion_timestamp.is_some() || in_use_on(node, &unique) {
            continue;
        }
        if let Some(n) = &va.metadata.name {
            plan.delete.push(n.clone());
        }
    }
    plan
}

/// The suffix of the Multi-Attach event for `pod` (`reportMultiAttachError`): the pods on the
/// other nodes in the pod's namespace by name, the others counted.
fn multi_attach_reason(pod: &Pod, users: &[&Pod]) -> String {
    if users.is_empty() {
        return "Volume is already exclusively attached to one node and can't be attached to another".to_owned();
    }
    let ns = pod.metadata.namespace.as_deref();
    let local: Vec<&str> = users
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == ns)
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    let others = users.len() - local.len();
    match (local.is_empty(), others) {
        (false, 0) => format!("Volume is already used by pod(s) {}", local.join(", ")),
        (false, n) => format!(
            "Volume is already used by pod(s) {} and {n} pod(s) in different namespaces",
            local.join(", ")
        ),
        (true, n) => format!("Volume is already used by {n} pod(s) in different namespaces"),
    }
}

/// The event for the pods on an attachment's node when its status changes: SuccessfulAttachVolume
/// once it is attached, FailedAttachVolume when a new attach error appears.
pub fn attach_note(old: Option<&VolumeAttachment>, new: &VolumeAttachment, pv_name: &str) -> Option<Note> {
    if is_attached(new) && !old.is_some_and(is_attached) {
        return Some(Note::normal(
            "SuccessfulAttachVolume",
            format!("AttachVolume.Attach succeeded for volume {pv_name:?}"),
        ));
    }
    let msg = |va: &VolumeAttachment| {
        va.status
            .as_ref()
            .and_then(|s| s.attach_error.as_ref())
            .and_then(|e| e.message.clone())
    };
    match msg(new) {
        Some(m) if old.and_then(msg).as_ref() != Some(&m) => Some(Note::warning(
            "FailedAttachVolume",
            format!("AttachVolume.Attach failed for volume {pv_name:?} : {m}"),
        )),
        _ => None,
    }
}

// ---- external-attacher ----

/// Whether a changed attachment needs another look by external-attacher
/// (`shouldEnqueueVAChange`): not when the only change is the attach or detach error it just
/// saved (its own retry with backoff takes care of that), so a failing driver is not called in
/// a tight loop.
pub fn should_enqueue(old: &VolumeAttachment, new: &VolumeAttachment) -> bool {
    if old.metadata.resource_version == new.metadata.resource_version {
        return true;
    }
    let errors = |va: &VolumeAttachment| {
        va.status
            .as_ref()
            .is_some_and(|s| s.attach_error.is_some() || s.detach_error.is_some())
    };
    if !errors(old) && !errors(new) {
        return true;
    }
    let mut sanitized = new.clone();
    sanitized.metadata.resource_version = old.metadata.resource_version.clone();
    let (ae, de) = old
        .status
        .as_ref()
        .map(|s| (s.attach_error.clone(), s.detach_error.clone()))
        .unwrap_or_default();
    if let Some(s) = sanitized.status.as_mut() {
        s.attach_error = ae;
        s.detach_error = de;
    }
    // An empty status is no status (Go's is a struct, not a pointer).
    let plain = |mut va: VolumeAttachment| {
        if va
            .status
            .as_ref()
            .is_some_and(|s| *s == VolumeAttachmentStatus::default())
        {
            va.status = None;
        }
        va
    };
    plain(sanitized) != plain(old.clone())
}

/// Why a VolumeAttachment cannot be attached or detached (yet); the messages are
/// external-attacher's and end up in `status.attachError`/`detachError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("neither InlineCSIVolumeSource nor PersistentVolumeName specified in VA source")]
    NoSource,
    #[error("both InlineCSIVolumeSource and PersistentVolumeName specified in VA source")]
    BothSources,
    #[error("persistentvolume {0:?} not found")]
    VolumeNotFound(String),
    #[error("PersistentVolume {0:?} is marked for deletion")]
    VolumeDeleting(String),
    #[error("pv spec contained non-csi source that was not migrated")]
    NotCsi,
    #[error("inline volume spec contains nil CSI source")]
    InlineNotCsi,
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    #[error("csinode.storage.k8s.io {0:?} not found")]
    NoCsiNode(String),
    #[error("CSINode {node} does not contain driver {driver}")]
    DriverNotOnNode { node: String, driver: String },
    #[error("failed to load secret \"{namespace}/{name}\": {error}")]
    Secret {
        namespace: String,
        name: String,
        error: String,
    },
}

/// The volume spec an attachment is about: its PV's (which must exist) or its inline spec.
pub fn volume_spec<'a>(
    va: &'a VolumeAttachment,
    pv: Option<&'a PersistentVolume>,
) -> Result<&'a PersistentVolumeSpec, AttachError> {
    let src = &va.spec.source;
    match (&src.persistent_volume_name, &src.inline_volume_spec) {
        (Some(_), Some(_)) => Err(AttachError::BothSources),
        (Some(name), None) => {
            let pv = pv.ok_or_else(|| AttachError::VolumeNotFound(name.clone()))?;
            let spec = pv
                .spec
                .as_ref()
                .filter(|s| s.csi.is_some())
                .ok_or(AttachError::NotCsi)?;
            Ok(spec)
        }
        (None, Some(spec)) if spec.csi.is_some() => Ok(spec),
        (None, Some(_)) => Err(AttachError::InlineNotCsi),
        (None, None) => Err(AttachError::NoSource),
    }
}

/// The node id to publish to (`getNodeID`): the node's CSINode entry for the driver; failing
/// that, for a detach (`va` given), the id recorded on the attachment; failing that, the
/// driver's own `NodeGetInfo` when it serves that very node (Berth's all-in-one server, before
/// a node agent has registered the CSINode).
pub fn node_id(
    driver: &str,
    node: &str,
    csi_node: Option<&CSINode>,
    va: Option<&VolumeAttachment>,
    local: Option<&NodeInfo>,
) -> Result<String, AttachError> {
    let err = match csi_node {
        Some(n) => {
            if let Some(d) = n.spec.drivers.iter().find(|d| d.name == driver) {
                return Ok(d.node_id.clone());
            }
            AttachError::DriverNotOnNode {
                node: node.to_owned(),
                driver: driver.to_owned(),
            }
        }
        None => AttachError::NoCsiNode(node.to_owned()),
    };
    if let Some(id) = va.and_then(|v| v.metadata.annotations.as_ref()?.get(NODE_ID_ANNOTATION)) {
        return Ok(id.clone());
    }
    match local {
        Some(info) if info.node_id == node => Ok(info.node_id.clone()),
        _ => Err(err),
    }
}

/// What a driver advertises that changes the publish request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// PUBLISH_READONLY: without it `readonly` must be false.
    pub publish_readonly: bool,
    /// SINGLE_NODE_MULTI_WRITER: changes how ReadWriteOnce maps.
    pub single_node_multi_writer: bool,
}

/// ControllerPublishVolume for the volume on `node_id` (`csiAttach`): the handle, the
/// capability [`sidecar::volume_capability`] makes, `readonly` from the volume (only when the
/// driver has PUBLISH_READONLY), the volume attributes as context and the secrets.
pub fn publish_request(
    spec: &PersistentVolumeSpec,
    node_id: &str,
    opts: PublishOptions,
    secrets: HashMap<String, String>,
) -> Result<ControllerPublishVolumeRequest, AttachError> {
    let csi = spec.csi.as_ref().ok_or(AttachError::NotCsi)?;
    let cap = sidecar::volume_capability(spec, opts.single_node_multi_writer, "")?;
    Ok(ControllerPublishVolumeRequest {
        volume_id: csi.volume_handle.clone(),
        node_id: node_id.to_owned(),
        volume_capability: Some(cap),
        readonly: opts.publish_readonly && csi.read_only == Some(true),
        secrets,
        volume_context: csi.volume_attributes.clone().unwrap_or_default().into_iter().collect(),
    })
}

/// ControllerUnpublishVolume for the volume on `node_id`.
pub fn unpublish_request(
    spec: &PersistentVolumeSpec,
    node_id: &str,
    secrets: HashMap<String, String>,
) -> Result<ControllerUnpublishVolumeRequest, AttachError> {
    let csi = spec.csi.as_ref().ok_or(AttachError::NotCsi)?;
    Ok(ControllerUnpublishVolumeRequest {
        volume_id: csi.volume_handle.clone(),
        node_id: node_id.to_owned(),
        secrets,
    })
}

/// What external-attacher does next with an attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttacherStep {
    /// Nothing to do (attached; or deleted and already detached; or no finalizer of ours).
    Nothing,
    /// A driver without ControllerPublish: mark it attached, no finalizer, no call.
    MarkAttached,
    /// Finalizer, ControllerPublishVolume, attached.
    Attach,
    /// ControllerUnpublishVolume, then finalizer off.
    Detach,
}

/// The step for `va` of `driver`, which has ControllerPublish when `publishes` is true.
pub fn attacher_step(va: &VolumeAttachment, driver: &str, publishes: bool) -> AttacherStep {
    let deleting = va.metadata.deletion_timestamp.is_some();
    if !publishes {
        return if !deleting && !is_attached(va) {
            AttacherStep::MarkAttached
        } else {
            AttacherStep::Nothing
        };
    }
    if deleting {
        let fin = finalizer_name(driver);
        if va.metadata.finalizers.as_ref().is_some_and(|f| f.contains(&fin)) {
            AttacherStep::Detach
        } else {
            AttacherStep::Nothing
        }
    } else if is_attached(va) {
        AttacherStep::Nothing
    } else {
        AttacherStep::Attach
    }
}

/// The attachment with our finalizer and the node-id annotation; `None` when it has both.
pub fn prepared(va: &VolumeAttachment, driver: &str, node_id: &str) -> Option<VolumeAttachment> {
    let fin = finalizer_name(driver);
    let mut new = va.clone();
    let f = new.metadata.finalizers.get_or_insert_with(Vec::new);
    if !f.contains(&fin) {
        f.push(fin);
    }
    new.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(NODE_ID_ANNOTATION.to_owned(), node_id.to_owned());
    (new != *va).then_some(new)
}

/// The attachment marked attached with `metadata` (the publish context), its attach error
/// cleared; `None` when it already is.
pub fn marked_attached(va: &VolumeAttachment, metadata: BTreeMap<String, String>) -> Option<VolumeAttachment> {
    let mut new = va.clone();
    let s = new.status.get_or_insert_with(VolumeAttachmentStatus::default);
    s.attached = true;
    s.attachment_metadata = (!metadata.is_empty()).then_some(metadata);
    s.attach_error = None;
    (new != *va).then_some(new)
}

fn volume_error(message: &str, now: jiff::Timestamp) -> VolumeError {
    VolumeError {
        message: Some(message.to_owned()),
        time: Some(Time(now)),
        ..VolumeError::default()
    }
}

/// The attachment with `message` as its attach error.
pub fn with_attach_error(va: &VolumeAttachment, message: &str, now: jiff::Timestamp) -> VolumeAttachment {
    let mut new = va.clone();
    new.status
        .get_or_insert_with(VolumeAttachmentStatus::default)
        .attach_error = Some(volume_error(message, now));
    new
}

/// The attachment with `message` as its detach error.
pub fn with_detach_error(va: &VolumeAttachment, message: &str, now: jiff::Timestamp) -> VolumeAttachment {
    let mut new = va.clone();
    new.status
        .get_or_insert_with(VolumeAttachmentStatus::default)
        .detach_error = Some(volume_error(message, now));
    new
}

/// The attachment without our finalizer (external-attacher removes it before marking the
/// attachment detached, so that a detached one is never unpublished twice); `None` when it
/// has none.
pub fn without_finalizer(va: &VolumeAttachment, driver: &str) -> Option<VolumeAttachment> {
    let fin = finalizer_name(driver);
    let f = va.metadata.finalizers.as_ref()?;
    if !f.contains(&fin) {
        return None;
    }
    let mut new = va.clone();
    new.metadata.finalizers = Some(f.iter().filter(|x| **x != fin).cloned().collect());
    Some(new)
}

/// The attachment marked detached (no metadata, no detach error); `None` when it already is.
pub fn marked_detached(va: &VolumeAttachment) -> Option<VolumeAttachment> {
    let mut new = va.clone();
    let s = new.status.get_or_insert_with(VolumeAttachmentStatus::default);
    s.attached = false;
    s.attachment_metadata = None;
    s.detach_error = None;
    (new != *va).then_some(new)
}

/// The volume with our finalizer, which keeps it until no attachment names it; `None` when
/// it has it.
pub fn pv_with_finalizer(pv: &PersistentVolume, driver: &str) -> Option<PersistentVolume> {
    let fin = finalizer_name(driver);
    if pv.metadata.finalizers.as_ref().is_some_and(|f| f.contains(&fin)) {
        return None;
    }
    let mut new = pv.clone();
    new.metadata.finalizers.get_or_insert_with(Vec::new).push(fin);
    Some(new)
}

/// The deleted volume without our finalizer once no attachment names it; `None` otherwise
/// (external-attacher leaves a volume that is not being deleted alone).
pub fn pv_released(pv: &PersistentVolume, driver: &str, referenced: bool) -> Option<PersistentVolume> {
    if pv.metadata.deletion_timestamp.is_none() || referenced {
        return None;
    }
    let fin = finalizer_name(driver);
    let f = pv.metadata.finalizers.as_ref()?;
    if !f.contains(&fin) {
        return None;
    }
    let mut new = pv.clone();
    new.metadata.finalizers = Some(f.iter().filter(|x| **x != fin).cloned().collect());
    Some(new)
}

// ---- the runner ----

/// Indexes the runner keeps from the informers' events.
#[derive(Debug, Default)]
struct Index {
    /// claim key -> pods naming it.
    pods_by_claim: HashMap<String, HashSet<String>>,
    /// pod key -> the claims it names (to undo the above).
    claims_of_pod: HashMap<String, Vec<String>>,
    /// PV name -> attachments naming it.
    attachments_by_pv: HashMap<String, HashSet<String>>,
}

/// Both controllers' runner: `volumes` holds PV names for the attach/detach part,
/// `attachments` holds `va/<name>` and `pv/<name>` keys for external-attacher's.
#[derive(Debug)]
pub struct Attacher {
    api: Arc<dyn Api>,
    inf: Arc<Informers>,
    drivers: Arc<Drivers>,
    events: Recorder,
    index: Mutex<Index>,
    volumes: Arc<Queue>,
    attachments: Arc<Queue>,
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

impl Attacher {
    /// Builds the runner and hooks it to the informers (before they run).
    pub fn new(api: Arc<dyn Api>, inf: Arc<Informers>, drivers: Arc<Drivers>, events: &Recorder) -> Arc<Self> {
        let a = Arc::new(Attacher {
            api,
            inf: inf.clone(),
            drivers,
            events: events.for_component("attachdetach-controller"),
            index: Mutex::new(Index::default()),
            volumes: Queue::new("attach-detach"),
            attachments: Queue::new("external-attacher"),
        });
        let c = a.clone();
        inf.pods.on_change(move |change| {
            let (pod, gone) = match change {
                Change::Upsert { new, .. } => (new, false),
                Change::Delete(old) => (old, true),
            };
            let key = pod_key(pod);
            let ns = pod.metadata.namespace.as_deref().unwrap_or("");
            let claims: Vec<String> = if gone {
                Vec::new()
            } else {
                pod_claims(pod).into_iter().map(|c| format!("{ns}/{c}")).collect()
            };
            let touched = {
                let mut ix = c.index();
                let old = ix.claims_of_pod.remove(&key).unwrap_or_default();
                for claim in &old {
                    if let Some(set) = ix.pods_by_claim.get_mut(claim) {
                        set.remove(&key);
                        if set.is_empty() {
                            ix.pods_by_claim.remove(claim);
                        }
                    }
                }
                for claim in &claims {
                    ix.pods_by_claim.entry(claim.clone()).or_default().insert(key.clone());
                }
                if !claims.is_empty() {
                    ix.claims_of_pod.insert(key, claims.clone());
                }
                let mut all = old;
                all.extend(claims);
                all
            };
            for claim in touched {
                c.queue_claim_volume(&claim);
            }
        });
        let c = a.clone();
        inf.pvcs.on_change(move |change| {
            let claim = match change {
                Change::Upsert { new, .. } => new,
                Change::Delete(old) => old,
            };
            if let Some(v) = claim
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .filter(|v| !v.is_empty())
            {
                c.volumes.add(v.to_owned());
            }
        });
        let c = a.clone();
        inf.pvs.on_change(move |change| {
            let (pv, deleting) = match change {
                Change::Upsert { new, .. } => (new, new.metadata.deletion_timestamp.is_some()),
                Change::Delete(old) => (old, false),
            };
            if let Some(n) = &pv.metadata.name {
                c.volumes.add(n.clone());
                if deleting {
                    c.attachments.add(format!("pv/{n}"));
                }
                let vas: Vec<String> = c
                    .index()
                    .attachments_by_pv
                    .get(n)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                for va in vas {
                    c.attachments.add(format!("va/{va}"));
                }
            }
        });
        let c = a.clone();
        inf.attachments.on_change(move |change| {
            let (old, va, gone) = match change {
                Change::Upsert { old, new } => (old.map(|o| &**o), new, false),
                Change::Delete(old) => (None, old, true),
            };
            let Some(name) = va.metadata.name.clone() else { return };
            if let Some(pv) = va_pv_name(va) {
                {
                    let mut ix = c.index();
                    let set = ix.attachments_by_pv.entry(pv.to_owned()).or_default();
                    if gone {
                        set.remove(&name);
                        if set.is_empty() {
                            ix.attachments_by_pv.remove(pv);
                        }
                    } else {
                        set.insert(name.clone());
                    }
                }
                c.volumes.add(pv.to_owned());
                if gone {
                    c.attachments.add(format!("pv/{pv}"));
                } else if let Some(note) = attach_note(old, va, pv) {
                    c.note_pods_on_node(pv, &va.spec.node_name, &note);
                }
            }
            if !gone && old.is_none_or(|o| should_enqueue(o, va)) {
                c.attachments.add(format!("va/{name}"));
            }
        });
        let c = a.clone();
        inf.csi_drivers.on_change(move |change| {
            let d = match change {
                Change::Upsert { new, .. } => new,
                Change::Delete(old) => old,
            };
            let name = d.metadata.name.as_deref().unwrap_or("");
            for pv in c.inf.pvs.list() {
                if csi_of(&pv).is_some_and(|(drv, _)| drv == name)
                    && let Some(n) = &pv.metadata.name
                {
                    c.volumes.add(n.clone());
                }
            }
        });
        let c = a.clone();
        inf.nodes.on_change(move |change| {
            let Change::Upsert { old, new } = change else { return };
            let in_use = |n: &Node| n.status.as_ref().and_then(|s| s.volumes_in_use.clone());
            if old.is_some_and(|o| in_use(o) == in_use(new)) {
                return;
            }
            let node = new.metadata.name.as_deref().unwrap_or("");
            for va in c.inf.attachments.list() {
                if va.spec.node_name == node
                    && let Some(pv) = va_pv_name(&va)
                {
                    c.volumes.add(pv.to_owned());
                }
            }
        });
        a
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn queue_claim_volume(&self, claim_key: &str) {
        if let Some(claim) = self.inf.pvcs.get(claim_key)
            && let Some(v) = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref())
            && !v.is_empty()
        {
            self.volumes.add(v.to_owned());
        }
    }

    /// The claim bound to `pv` (both ways), if any.
    fn bound_claim(&self, pv: &PersistentVolume) -> Option<Arc<PersistentVolumeClaim>> {
        let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
        let key = format!("{}/{}", r.namespace.as_deref()?, r.name.as_deref()?);
        let claim = self.inf.pvcs.get(&key)?;
        let uid_ok = r.uid.is_none() || r.uid == claim.metadata.uid;
        let names_pv = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()) == pv.metadata.name.as_deref();
        (uid_ok && names_pv).then_some(claim)
    }

    fn pods_of_claim(&self, claim: &PersistentVolumeClaim) -> Vec<Arc<Pod>> {
        let key = format!(
            "{}/{}",
            claim.metadata.namespace.as_deref().unwrap_or(""),
            claim.metadata.name.as_deref().unwrap_or("")
        );
        let keys: Vec<String> = self
            .index()
            .pods_by_claim
            .get(&key)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        keys.iter().filter_map(|k| self.inf.pods.get(k)).collect()
    }

    fn note_pods_on_node(&self, pv_name: &str, node: &str, note: &Note) {
        let Some(pv) = self.inf.pvs.get(pv_name) else { return };
        let Some(claim) = self.bound_claim(&pv) else { return };
        for pod in self.pods_of_claim(&claim) {
            if active_node(&pod) == Some(node) {
                self.events.record(pod_involved(&pod), note.clone());
            }
        }
    }

    /// Runs both parts with `workers` workers each until `stop`.
    pub async fn run(self: Arc<Self>, workers: usize, stop: watch::Receiver<bool>) {
        self.inf.wait_synced().await;
        let c = self.clone();
        let volumes = tokio::spawn(self.volumes.clone().run(
            workers,
            move |key| {
                let c = c.clone();
                async move { c.sync_volume(&key).await }
            },
            stop.clone(),
        ));
        let c = self.clone();
        let attachments = tokio::spawn(self.attachments.clone().run(
            workers,
            move |key| {
                let c = c.clone();
                async move {
                    if let Some(name) = key.strip_prefix("va/") {
                        c.sync_attachment(name).await
                    } else if let Some(name) = key.strip_prefix("pv/") {
                        c.sync_pv_finalizer(name).await
                    } else {
                        Outcome::Done
                    }
                }
            },
            stop.clone(),
        ));
        // Attachments that waited for their driver go on as soon as it registers.
        let c = self.clone();
        let mut registered = self.drivers.subscribe();
        let mut stop3 = stop.clone();
        let on_register = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = registered.changed() => if r.is_err() { return },
                    _ = stop3.wait_for(|s| *s) => return,
                }
                for va in c.inf.attachments.list() {
                    c.attachments
                        .add(format!("va/{}", va.metadata.name.as_deref().unwrap_or("")));
                }
            }
        });
        let c = self.clone();
        let mut stop2 = stop.clone();
        let resync = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(RESYNC) => {}
                    _ = stop2.wait_for(|s| *s) => return,
                }
                for pv in c.inf.pvs.list() {
                    if csi_of(&pv).is_some()
                        && let Some(n) = &pv.metadata.name
                    {
                        c.volumes.add(n.clone());
                    }
                }
                for va in c.inf.attachments.list() {
                    if !is_attached(&va) || va.metadata.deletion_timestamp.is_some() {
                        c.attachments
                            .add(format!("va/{}", va.metadata.name.as_deref().unwrap_or("")));
                    }
                }
            }
        });
        let _ = tokio::join!(volumes, attachments, resync, on_register);
    }

    /// The attach/detach part for one volume.
    async fn sync_volume(&self, name: &str) -> Outcome {
        let Some(pv) = self.inf.pvs.get(name) else {
            return Outcome::Done;
        };
        let Some((driver, _)) = csi_of(&pv) else {
            return Outcome::Done;
        };
        let pods = self
            .bound_claim(&pv)
            .map(|c| self.pods_of_claim(&c))
            .unwrap_or_default();
        let vas: Vec<Arc<VolumeAttachment>> = {
            let names: Vec<String> = self
                .index()
                .attachments_by_pv
                .get(name)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            names.iter().filter_map(|n| self.inf.attachments.get(n)).collect()
        };
        let pod_refs: Vec<&Pod> = pods.iter().map(|p| &**p).collect();
        let va_refs: Vec<&VolumeAttachment> = vas.iter().map(|v| &**v).collect();
        let csi_driver = self.inf.csi_drivers.get(driver);
        let plan = plan_attachments(
            &VolumeUse {
                pv: &pv,
                attach_required: attach_required(csi_driver.as_deref()),
                pods: &pod_refs,
                attachments: &va_refs,
            },
            |node, unique| {
                self.inf.nodes.get(node).is_some_and(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.volumes_in_use.as_ref())
                        .is_some_and(|v| v.iter().any(|x| x == unique))
                })
            },
        );
        for (pod, note) in plan.notes {
            self.events.record(pod, note);
        }
        let mut outcome = Outcome::Done;
        for va in plan.create {
            let Ok(value) = va.to_value() else {
                return Outcome::Retry;
            };
            match self.api.create(kinds::volume_attachments(), value).await {
                Ok(stored) => {
                    tracing::info!(volume = name, node = %va.spec.node_name, "attaching");
                    self.inf.attachments.assume(stored);
                }
                Err(ApiError::AlreadyExists(_)) => {}
                Err(e) => {
                    tracing::warn!(volume = name, error = %e, "creating a VolumeAttachment");
                    outcome = retry_after(&e);
                }
            }
        }
        for va in plan.delete {
            match self.api.delete(kinds::volume_attachments(), None, &va, None).await {
                Ok(()) => tracing::info!(volume = name, attachment = %va, "detaching"),
                Err(ApiError::NotFound(_)) => {}
                Err(e) => outcome = retry_after(&e),
            }
        }
        outcome
    }

    /// external-attacher for one VolumeAttachment.
    async fn sync_attachment(&self, name: &str) -> Outcome {
        let Some(va) = self.inf.attachments.get(name) else {
            return Outcome::Done;
        };
        let driver_name = va.spec.attacher.clone();
        let Some(driver) = self.drivers.get(&driver_name) else {
            // Not (yet) registered: the built-in driver connects moments after start.
            return Outcome::Retry;
        };
        let publishes = driver.controller(ControllerCap::PublishUnpublishVolume);
        match attacher_step(&va, &driver_name, publishes) {
            AttacherStep::Nothing => Outcome::Done,
            AttacherStep::MarkAttached => match marked_attached(&va, BTreeMap::new()) {
                Some(new) => self
                    .write_va(new, Part::Status)
                    .await
                    .map_or_else(|o| o, |_| Outcome::Done),
                None => Outcome::Done,
            },
            AttacherStep::Attach => self.attach(&va, &driver).await,
            AttacherStep::Detach => self.detach(&va, &driver).await,
        }
    }

    async fn write_va(&self, va: VolumeAttachment, part: Part) -> Result<VolumeAttachment, Outcome> {
        let value = va.to_value().map_err(|_| Outcome::Retry)?;
        match self.api.update(kinds::volume_attachments(), value, part).await {
            Ok(stored) if sidecar::deleted_by_write(&stored) => Err(Outcome::Done),
            answer => assumed(&self.inf.attachments, answer).map(Arc::unwrap_or_clone),
        }
    }

    async fn controller_secrets(&self, spec: &PersistentVolumeSpec) -> Result<HashMap<String, String>, AttachError> {
        let Some(r) = spec.csi.as_ref().and_then(|c| c.controller_publish_secret_ref.as_ref()) else {
            return Ok(HashMap::new());
        };
        let namespace = r.namespace.clone().unwrap_or_default();
        let name = r.name.clone().unwrap_or_default();
        sidecar::load_secret(&*self.api, &namespace, &name)
            .await
            .map_err(|e| AttachError::Secret {
                namespace,
                name,
                error: e.to_string(),
            })
    }

    async fn save_attach_error(&self, va: &VolumeAttachment, message: &str) -> Outcome {
        tracing::warn!(
            attachment = va.metadata.name.as_deref().unwrap_or(""),
            "attach failed: {message}"
        );
        let _ = self
            .write_va(with_attach_error(va, message, jiff::Timestamp::now()), Part::Status)
            .await;
        Outcome::Retry
    }

    async fn attach(&self, va: &VolumeAttachment, driver: &crate::drivers::Driver) -> Outcome {
        let pv = va_pv_name(va).and_then(|n| self.inf.pvs.get(n));
        let spec = match volume_spec(va, pv.as_deref()) {
            Ok(s) => s.clone(),
            Err(e) => return self.save_attach_error(va, &e.to_string()).await,
        };
        if let Some(pv) = &pv {
            if pv.metadata.deletion_timestamp.is_some() {
                let e = AttachError::VolumeDeleting(pv.metadata.name.clone().unwrap_or_default());
                return self.save_attach_error(va, &e.to_string()).await;
            }
            if let Some(new) = pv_with_finalizer(pv, &driver.name) {
                let Ok(value) = new.to_value() else {
                    return Outcome::Retry;
                };
                match self.api.update(kinds::pvs(), value, Part::Main).await {
                    Ok(stored) => self.inf.pvs.assume(stored),
                    Err(e) => {
                        let msg = format!("could not add PersistentVolume finalizer: {e}");
                        return self.save_attach_error(va, &msg).await;
                    }
                }
            }
        }
        let secrets = match self.controller_secrets(&spec).await {
            Ok(s) => s,
            Err(e) => return self.save_attach_error(va, &e.to_string()).await,
        };
        let csi_node = self.inf.csi_nodes.get(&va.spec.node_name);
        let node = match node_id(
            &driver.name,
            &va.spec.node_name,
            csi_node.as_deref(),
            None,
            driver.node.as_ref(),
        ) {
            Ok(n) => n,
            Err(e) => return self.save_attach_error(va, &e.to_string()).await,
        };
        let opts = PublishOptions {
            publish_readonly: driver.controller(ControllerCap::PublishReadonly),
            single_node_multi_writer: driver.controller(ControllerCap::SingleNodeMultiWriter),
        };
        let req = match publish_request(&spec, &node, opts, secrets) {
            Ok(r) => r,
            Err(e) => return self.save_attach_error(va, &e.to_string()).await,
        };
        let va = match prepared(va, &driver.name, &node) {
            Some(new) => match self.write_va(new, Part::Main).await {
                Ok(v) => v,
                Err(o) => return o,
            },
            None => va.clone(),
        };
        let mut client = driver.client.controller.clone();
        match client.controller_publish_volume(req).await {
            Ok(resp) => {
                let metadata: BTreeMap<String, String> = resp.into_inner().publish_context.into_iter().collect();
                match marked_attached(&va, metadata) {
                    Some(new) => match self.write_va(new, Part::Status).await {
                        Ok(_) => {
                            tracing::info!(attachment = va.metadata.name.as_deref().unwrap_or(""), node = %node, "attached");
                            Outcome::Done
                        }
                        Err(o) => o,
                    },
                    None => Outcome::Done,
                }
            }
            Err(status) => self.save_attach_error(&va, &sidecar::rpc_error(&status)).await,
        }
    }

    async fn detach(&self, va: &VolumeAttachment, driver: &crate::drivers::Driver) -> Outcome {
        let pv = va_pv_name(va).and_then(|n| self.inf.pvs.get(n));
        let fail = |msg: String| async move {
            tracing::warn!(
                attachment = va.metadata.name.as_deref().unwrap_or(""),
                "detach failed: {msg}"
            );
            let _ = self
                .write_va(with_detach_error(va, &msg, jiff::Timestamp::now()), Part::Status)
                .await;
            Outcome::Retry
        };
        let spec = match volume_spec(va, pv.as_deref()) {
            Ok(s) => s.clone(),
            Err(e) => return fail(e.to_string()).await,
        };
        let secrets = match self.controller_secrets(&spec).await {
            Ok(s) => s,
            Err(e) => return fail(e.to_string()).await,
        };
        let csi_node = self.inf.csi_nodes.get(&va.spec.node_name);
        let node = match node_id(
            &driver.name,
            &va.spec.node_name,
            csi_node.as_deref(),
            Some(va),
            driver.node.as_ref(),
        ) {
            Ok(n) => n,
            Err(e) => return fail(e.to_string()).await,
        };
        let req = match unpublish_request(&spec, &node, secrets) {
            Ok(r) => r,
            Err(e) => return fail(e.to_string()).await,
        };
        let mut client = driver.client.controller.clone();
        if let Err(status) = client.controller_unpublish_volume(req).await {
            return fail(sidecar::rpc_error(&status)).await;
        }
        tracing::info!(attachment = va.metadata.name.as_deref().unwrap_or(""), node = %node, "detached");
        let va = match without_finalizer(va, &driver.name) {
            Some(new) => match self.write_va(new, Part::Main).await {
                Ok(v) => v,
                // Gone once the last finalizer went (or already gone): detached.
                Err(Outcome::Done) => return Outcome::Done,
                Err(o) => return o,
            },
            None => va.clone(),
        };
        if let Some(new) = marked_detached(&va) {
            let _ = self.write_va(new, Part::Status).await;
        }
        Outcome::Done
    }

    /// Removes our finalizer from a deleted volume no attachment names any more.
    async fn sync_pv_finalizer(&self, name: &str) -> Outcome {
        let Some(pv) = self.inf.pvs.get(name) else {
            return Outcome::Done;
        };
        let Some((driver, _)) = csi_of(&pv) else {
            return Outcome::Done;
        };
        let referenced = self.index().attachments_by_pv.get(name).is_some_and(|s| !s.is_empty());
        let Some(new) = pv_released(&pv, driver, referenced) else {
            return Outcome::Done;
        };
        let Ok(value) = new.to_value() else {
            return Outcome::Retry;
        };
        match self.api.update(kinds::pvs(), value, Part::Main).await {
            Ok(_) => Outcome::Done,
            Err(e) => retry_after(&e),
        }
    }
}

#[cfg(test)]
#[path = "attacher_tests.rs"]
mod tests;

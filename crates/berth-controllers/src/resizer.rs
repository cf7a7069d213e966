//! Volume expansion, as kubernetes-csi external-resizer does it (`pkg/controller`, the
//! RecoverVolumeExpansionFailure flow that is GA in Kubernetes 1.34): a Bound claim whose
//! storage request exceeds its `status.capacity` gets the Resizing condition and
//! `status.allocatedResources`, its driver's ControllerExpandVolume, then the volume's new
//! `spec.capacity`; the claim is finished (`status.capacity`, conditions cleared) or, when the
//! driver asks for node expansion, left FileSystemResizePending with `allocatedResourceStatuses`
//! NodeResizePending. Events are external-resizer's: Resizing, VolumeResizeSuccessful,
//! FileSystemResizeRequired, VolumeResizeFailed. Before that the claim is handed to the driver
//! with `volume.kubernetes.io/storage-resizer` and an ExternalExpanding event, as
//! kube-controller-manager's expand controller does.
//!
//! The node half (NodeExpandVolume, which needs the volume staged or published on its node) is
//! the node agent's: this controller never pretends it happened. A claim of a driver that needs
//! it stays FileSystemResizePending until then (Berth's own driver grows the filesystem of an
//! unstaged volume at its next stage; directory volumes need no node step at all).
//!
//! Pure decisions ([`plan_resize`], [`expanded`], [`failed`]) and the runner [`Resizer`].
//! ControllerExpandVolume is idempotent (expanding to a size reached answers OK), so every step
//! may be repeated after a crash.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use berth_csi::v1::controller_service_capability::rpc::Type as ControllerCap;
use berth_csi::v1::node_service_capability::rpc::Type as NodeCap;
use berth_csi::v1::{CapacityRange, ControllerExpandVolumeRequest};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimCondition};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as ApiQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;

use crate::Informers;
use crate::api::{Api, Part, Typed, kinds};
use crate::drivers::{Driver, Drivers};
use crate::events::{Involved, Recorder};
use crate::informer::Change;
use crate::pv_controller::{assumed, retry_after};
use crate::pv_sync::{Note, claim_key};
use crate::queue::{Outcome, Queue};
use crate::sidecar::{self, CapabilityError};

/// The claim annotation naming the driver that expands it.
pub const RESIZER_ANNOTATION: &str = "volume.kubernetes.io/storage-resizer";
/// Set on a claim whose expansion finished without a node step, so the kubelet skips it.
pub const NODE_EXPANSION_NOT_REQUIRED: &str = "volume.kubernetes.io/node-expansion-not-required";

/// Claim condition types of a resize.
pub const RESIZING: &str = "Resizing";
pub const FS_RESIZE_PENDING: &str = "FileSystemResizePending";
pub const CONTROLLER_RESIZE_ERROR: &str = "ControllerResizeError";
pub const NODE_RESIZE_ERROR: &str = "NodeResizeError";
const RESIZE_CONDITIONS: [&str; 4] = [RESIZING, FS_RESIZE_PENDING, CONTROLLER_RESIZE_ERROR, NODE_RESIZE_ERROR];

/// `status.allocatedResourceStatuses["storage"]` values.
pub const CONTROLLER_RESIZE_IN_PROGRESS: &str = "ControllerResizeInProgress";
pub const CONTROLLER_RESIZE_INFEASIBLE: &str = "ControllerResizeInfeasible";
pub const NODE_RESIZE_PENDING: &str = "NodeResizePending";
pub const NODE_RESIZE_IN_PROGRESS: &str = "NodeResizeInProgress";
pub const NODE_RESIZE_INFEASIBLE: &str = "NodeResizeInfeasible";

/// The message of the FileSystemResizePending condition.
pub const FS_RESIZE_MESSAGE: &str =
    "Waiting for user to (re-)start a pod to finish file system resize of volume on node.";

/// How long an infeasible expansion waits before it is tried again with the same size
/// (external-resizer's slow set, `--retry-interval-max`).
pub const INFEASIBLE_RETRY: Duration = Duration::from_secs(300);

const STORAGE: &str = "storage";

/// How a driver expands volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expansion {
    /// ControllerExpandVolume (EXPAND_VOLUME controller capability).
    Controller,
    /// Only NodeExpandVolume: the volume is taken as expanded to the request and the node
    /// finishes it (external-resizer's trivial resizer).
    NodeOnly,
    /// Neither: no resizer runs for this driver.
    Unsupported,
}

/// How `driver` expands volumes.
pub fn expansion_of(driver: &Driver) -> Expansion {
    if driver.controller(ControllerCap::ExpandVolume) {
        Expansion::Controller
    } else if driver.node_cap(NodeCap::ExpandVolume) {
        Expansion::NodeOnly
    } else {
        Expansion::Unsupported
    }
}

fn storage_of(map: Option<&BTreeMap<String, ApiQuantity>>) -> Option<&ApiQuantity> {
    map?.get(STORAGE)
}

fn bytes(q: Option<&ApiQuantity>) -> Option<i128> {
    q.and_then(|q| berth_api::quantity::Quantity::parse(&q.0).ok())
        .map(|q| q.value_ceil())
}

fn request(claim: &PersistentVolumeClaim) -> Option<&ApiQuantity> {
    storage_of(claim.spec.as_ref()?.resources.as_ref()?.requests.as_ref())
}

fn status_capacity(claim: &PersistentVolumeClaim) -> Option<&ApiQuantity> {
    storage_of(claim.status.as_ref()?.capacity.as_ref())
}

fn pv_capacity(pv: &PersistentVolume) -> Option<&ApiQuantity> {
    storage_of(pv.spec.as_ref()?.capacity.as_ref())
}

fn resize_status(claim: &PersistentVolumeClaim) -> &str {
    claim
        .status
        .as_ref()
        .and_then(|s| s.allocated_resource_statuses.as_ref())
        .and_then(|m| m.get(STORAGE))
        .map_or("", String::as_str)
}

fn allocated(claim: &PersistentVolumeClaim) -> Option<&ApiQuantity> {
    storage_of(claim.status.as_ref()?.allocated_resources.as_ref())
}

fn has_condition(claim: &PersistentVolumeClaim, kind: &str) -> bool {
    claim
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind))
}

/// Whether the claim asks for expansion (`pvcNeedResize`): Bound, with a volume, and a storage
/// request larger than its `status.capacity`.
pub fn needs_resize(claim: &PersistentVolumeClaim) -> bool {
    let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let has_volume = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty());
    bound && has_volume && bytes(request(claim)) > bytes(status_capacity(claim)).or(Some(0))
}

/// Whether `pv` is a volume of `driver` bound to exactly this claim (`pvCanBeExpanded`).
pub fn pv_belongs(pv: &PersistentVolume, claim: &PersistentVolumeClaim, driver: &str) -> bool {
    let Some(spec) = pv.spec.as_ref() else { return false };
    let ours = spec.csi.as_ref().is_some_and(|c| c.driver == driver);
    let r = spec.claim_ref.as_ref();
    ours && r.is_some_and(|r| r.namespace == claim.metadata.namespace && r.uid == claim.metadata.uid)
}

/// Resize conditions replaced by `new` (same type), other resize conditions kept only with
/// `keep_old`, non-resize conditions always kept (`MergeResizeConditionsOfPVC`).
pub fn merge_resize_conditions(
    old: &[PersistentVolumeClaimCondition],
    new: Vec<PersistentVolumeClaimCondition>,
    keep_old: bool,
) -> Vec<PersistentVolumeClaimCondition> {
    let mut pending: Vec<Option<PersistentVolumeClaimCondition>> = new.into_iter().map(Some).collect();
    let mut out = Vec::new();
    for c in old {
        if !RESIZE_CONDITIONS.contains(&c.type_.as_str()) {
            out.push(c.clone());
            continue;
        }
        if let Some(slot) = pending
            .iter_mut()
            .find(|n| n.as_ref().is_some_and(|n| n.type_ == c.type_))
        {
            out.extend(slot.take());
        } else if keep_old {
            out.push(c.clone());
        }
    }
    out.extend(pending.into_iter().flatten());
    out
}

fn condition(kind: &str, message: Option<String>, now: jiff::Timestamp) -> PersistentVolumeClaimCondition {
    PersistentVolumeClaimCondition {
        type_: kind.to_owned(),
        status: "True".to_owned(),
        last_transition_time: Some(Time(now)),
        message,
        ..PersistentVolumeClaimCondition::default()
    }
}

/// What to do with a claim.
#[derive(Debug, Clone, PartialEq)]
pub enum ResizeStep {
    /// No expansion asked for, or the node has it now.
    Nothing,
    /// Hand the claim to the driver first (annotation; ExternalExpanding event).
    HandOver(PersistentVolumeClaim),
    /// The last attempt was infeasible with this very size: try again later.
    RetryLater,
    /// Write `claim` (when it changed: Resizing, allocatedResources) and expand to `size`.
    Expand {
        claim: Option<PersistentVolumeClaim>,
        size: ApiQuantity,
    },
}

/// The event recorded when the claim is handed to an external resizer.
pub fn external_expanding_note() -> Note {
    Note::warning(
        "ExternalExpanding",
        "waiting for an external controller to expand this PVC",
    )
}

/// The next step for `claim`, bound to `pv`, of `driver` (`expandAndRecover`): the size to
/// expand to is the request, except while an earlier expansion is unfinished (then the size
/// recorded in `allocatedResources` is finished first); a volume already large enough whose node
/// expansion is pending needs nothing here.
pub fn plan_resize(
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    driver: &str,
    node_expansion_possible: bool,
    now: jiff::Timestamp,
) -> ResizeStep {
    if !needs_resize(claim) || !pv_belongs(pv, claim, driver) {
        return ResizeStep::Nothing;
    }
    let ann = claim.metadata.annotations.as_ref();
    if ann.and_then(|a| a.get(RESIZER_ANNOTATION)).map(String::as_str) != Some(driver) {
        let mut new = claim.clone();
        new.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(RESIZER_ANNOTATION.to_owned(), driver.to_owned());
        return ResizeStep::HandOver(new);
    }
    let Some(spec_size) = request(claim).cloned() else {
        return ResizeStep::Nothing;
    };
    let status = resize_status(claim);
    let allocated_size = allocated(claim).cloned();
    let pv_bytes = bytes(pv_capacity(pv)).unwrap_or(0);
    let spec_bytes = bytes(Some(&spec_size)).unwrap_or(0);
    let mut new_size = spec_size.clone();
    if pv_bytes < spec_bytes {
        match status {
            NODE_RESIZE_INFEASIBLE | CONTROLLER_RESIZE_IN_PROGRESS => {
                if let Some(a) = &allocated_size {
                    new_size = a.clone();
                }
            }
            NODE_RESIZE_PENDING | NODE_RESIZE_IN_PROGRESS => {
                if let Some(a) = &allocated_size {
                    new_size = a.clone();
                }
                if pv_bytes >= bytes(Some(&new_size)).unwrap_or(0) {
                    return ResizeStep::Nothing;
                }
            }
            _ => {}
        }
    } else {
        match status {
            NODE_RESIZE_IN_PROGRESS | NODE_RESIZE_PENDING => return ResizeStep::Nothing,
            NODE_RESIZE_INFEASIBLE => {
                if node_expansion_possible && let Some(a) = &allocated_size {
                    new_size = a.clone();
                }
            }
            CONTROLLER_RESIZE_IN_PROGRESS | CONTROLLER_RESIZE_INFEASIBLE => {
                if let Some(a) = &allocated_size {
                    new_size = a.clone();
                }
            }
            _ => {
                if let Some(a) = &allocated_size {
                    new_size = a.clone();
                } else if has_condition(claim, FS_RESIZE_PENDING) {
                    return ResizeStep::Nothing;
                }
            }
        }
    }
    let same = allocated_size
        .as_ref()
        .is_some_and(|a| bytes(Some(a)) == bytes(Some(&new_size)));
    if same && status == CONTROLLER_RESIZE_INFEASIBLE {
        return ResizeStep::RetryLater;
    }
    let update_status = !same;
    let mut new = claim.clone();
    if let Some(a) = new.metadata.annotations.as_mut() {
        a.remove(NODE_EXPANSION_NOT_REQUIRED);
    }
    let st = new.status.get_or_insert_with(Default::default);
    let old_conditions = st.conditions.take().unwrap_or_default();
    st.conditions = Some(merge_resize_conditions(
        &old_conditions,
        vec![condition(RESIZING, None, now)],
        !update_status,
    ));
    if update_status {
        st.allocated_resource_statuses
            .get_or_insert_with(BTreeMap::new)
            .insert(STORAGE.to_owned(), CONTROLLER_RESIZE_IN_PROGRESS.to_owned());
    }
    st.allocated_resources
        .get_or_insert_with(BTreeMap::new)
        .insert(STORAGE.to_owned(), new_size.clone());
    ResizeStep::Expand {
        claim: (new != *claim).then_some(new),
        size: new_size,
    }
}

/// ControllerExpandVolume to `bytes` for `pv`: its handle, the capability
/// [`sidecar::volume_capability`] makes, and the controller-expand secrets.
pub fn expand_request(
    pv: &PersistentVolume,
    bytes: i64,
    single_node_multi_writer: bool,
    secrets: HashMap<String, String>,
) -> Result<ControllerExpandVolumeRequest, CapabilityError> {
    let spec = pv.spec.as_ref().ok_or(CapabilityError::NotCsi)?;
    let csi = spec.csi.as_ref().ok_or(CapabilityError::NotCsi)?;
    Ok(ControllerExpandVolumeRequest {
        volume_id: csi.volume_handle.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        secrets,
        volume_capability: Some(sidecar::volume_capability(spec, single_node_multi_writer, "")?),
    })
}

/// The event before the driver is called.
pub fn resizing_note(pv_name: &str) -> Note {
    Note::normal("Resizing", format!("External resizer is resizing volume {pv_name}"))
}

/// After a successful expansion to `new_bytes`: the volume with its new capacity, the claim
/// finished (`status.capacity`, resize conditions and status cleared, node expansion marked
/// not required) or, when `node_expansion_required`, FileSystemResizePending with
/// NodeResizePending; and the event.
pub fn expanded(
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    new_bytes: i64,
    node_expansion_required: bool,
    now: jiff::Timestamp,
) -> (PersistentVolume, PersistentVolumeClaim, Note) {
    let size = sidecar::binary_quantity(new_bytes);
    let mut new_pv = pv.clone();
    new_pv
        .spec
        .get_or_insert_with(Default::default)
        .capacity
        .get_or_insert_with(BTreeMap::new)
        .insert(STORAGE.to_owned(), size.clone());
    let mut new = claim.clone();
    let st = new.status.get_or_insert_with(Default::default);
    let old_conditions = st.conditions.take().unwrap_or_default();
    if node_expansion_required {
        st.conditions = Some(merge_resize_conditions(
            &old_conditions,
            vec![condition(FS_RESIZE_PENDING, Some(FS_RESIZE_MESSAGE.to_owned()), now)],
            true,
        ));
        st.allocated_resource_statuses
            .get_or_insert_with(BTreeMap::new)
            .insert(STORAGE.to_owned(), NODE_RESIZE_PENDING.to_owned());
        if let Some(a) = new.metadata.annotations.as_mut() {
            a.remove(NODE_EXPANSION_NOT_REQUIRED);
        }
        let note = Note::normal(
            "FileSystemResizeRequired",
            "Require file system resize of volume on node",
        );
        return (new_pv, new, note);
    }
    st.capacity
        .get_or_insert_with(BTreeMap::new)
        .insert(STORAGE.to_owned(), size);
    let conditions = merge_resize_conditions(&old_conditions, Vec::new(), false);
    st.conditions = (!conditions.is_empty()).then_some(conditions);
    if let Some(m) = st.allocated_resource_statuses.as_mut() {
        m.remove(STORAGE);
        if m.is_empty() {
            st.allocated_resource_statuses = None;
        }
    }
    new.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(NODE_EXPANSION_NOT_REQUIRED.to_owned(), "true".to_owned());
    (
        new_pv,
        new,
        Note::normal("VolumeResizeSuccessful", "Resize volume succeeded"),
    )
}

/// After ControllerExpandVolume failed with `code` and `error` (as [`sidecar::rpc_error`]
/// prints it): the VolumeResizeFailed event, and for a final failure the claim with the
/// ControllerResizeError condition (and ControllerResizeInfeasible for InvalidArgument,
/// OutOfRange and NotFound, which a retry of the same size cannot fix).
pub fn failed(
    claim: &PersistentVolumeClaim,
    pv_name: &str,
    driver: &str,
    code: Option<tonic::Code>,
    error: &str,
    now: jiff::Timestamp,
) -> (Option<PersistentVolumeClaim>, Note) {
    let note = Note::warning(
        "VolumeResizeFailed",
        format!("resize volume {pv_name:?} by resizer {driver:?} failed: {error}"),
    );
    let Some(code) = code.filter(|c| sidecar::is_final(*c)) else {
        return (None, note);
    };
    let mut new = claim.clone();
    let st = new.status.get_or_insert_with(Default::default);
    use tonic::Code;
    if matches!(code, Code::InvalidArgument | Code::OutOfRange | Code::NotFound) {
        st.allocated_resource_statuses
            .get_or_insert_with(BTreeMap::new)
            .insert(STORAGE.to_owned(), CONTROLLER_RESIZE_INFEASIBLE.to_owned());
    }
    let old_conditions = st.conditions.take().unwrap_or_default();
    st.conditions = Some(merge_resize_conditions(
        &old_conditions,
        vec![condition(
            CONTROLLER_RESIZE_ERROR,
            Some(format!("failed to expand pvc with {error}")),
            now,
        )],
        true,
    ));
    (Some(new), note)
}

// ---- the runner ----

/// The runner: one queue of claim keys.
#[derive(Debug)]
pub struct Resizer {
    api: Arc<dyn Api>,
    inf: Arc<Informers>,
    drivers: Arc<Drivers>,
    events: Recorder,
    claims: Arc<Queue>,
}

fn involved(c: &PersistentVolumeClaim) -> Involved {
    Involved::of("v1", "PersistentVolumeClaim", &c.metadata)
}

impl Resizer {
    /// Builds the runner and hooks it to the informers (before they run).
    pub fn new(api: Arc<dyn Api>, inf: Arc<Informers>, drivers: Arc<Drivers>, events: &Recorder) -> Arc<Self> {
        let r = Arc::new(Resizer {
            api,
            inf: inf.clone(),
            drivers,
            events: events.for_component("external-resizer"),
            claims: Queue::new("resizer"),
        });
        let q = r.claims.clone();
        inf.pvcs.on_change(move |change| {
            if let Change::Upsert { new, .. } = change
                && needs_resize(new)
            {
                q.add(claim_key(new));
            }
        });
        let c = r.clone();
        inf.pvs.on_change(move |change| {
            if let Change::Upsert { new, .. } = change
                && let Some(key) = crate::pv_controller::claim_ref_key(new)
                && c.inf.pvcs.get(&key).is_some_and(|claim| needs_resize(&claim))
            {
                c.claims.add(key);
            }
        });
        r
    }

    /// Runs `workers` workers until `stop`.
    pub async fn run(self: Arc<Self>, workers: usize, stop: watch::Receiver<bool>) {
        self.inf.wait_synced().await;
        let c = self.clone();
        let mut registered = self.drivers.subscribe();
        let mut stop2 = stop.clone();
        let on_register = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = registered.changed() => if r.is_err() { return },
                    _ = stop2.wait_for(|s| *s) => return,
                }
                for claim in c.inf.pvcs.list() {
                    if needs_resize(&claim) {
                        c.claims.add(claim_key(&claim));
                    }
                }
            }
        });
        let c = self.clone();
        self.claims
            .clone()
            .run(
                workers,
                move |key| {
                    let c = c.clone();
                    async move { c.sync(&key).await }
                },
                stop,
            )
            .await;
        on_register.abort();
    }

    async fn sync(&self, key: &str) -> Outcome {
        let Some(claim) = self.inf.pvcs.get(key) else {
            return Outcome::Done;
        };
        if !needs_resize(&claim) {
            return Outcome::Done;
        }
        let volume = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .unwrap_or_default();
        let Some(pv) = self.inf.pvs.get(&volume) else {
            // The informer has not seen the volume yet.
            return Outcome::Retry;
        };
        let Some(driver_name) = pv.spec.as_ref().and_then(|s| s.csi.as_ref()).map(|c| c.driver.clone()) else {
            return Outcome::Done;
        };
        let Some(driver) = self.drivers.get(&driver_name) else {
            // Looked at again when the driver registers.
            return Outcome::Done;
        };
        let expansion = expansion_of(&driver);
        if expansion == Expansion::Unsupported {
            return Outcome::Done;
        }
        let now = jiff::Timestamp::now();
        match plan_resize(&claim, &pv, &driver_name, driver.node_cap(NodeCap::ExpandVolume), now) {
            ResizeStep::Nothing => Outcome::Done,
            ResizeStep::RetryLater => Outcome::After(INFEASIBLE_RETRY),
            ResizeStep::HandOver(new) => {
                self.events.record(involved(&claim), external_expanding_note());
                match self.write_claim(new, Part::Main).await {
                    Ok(_) => Outcome::Done,
                    Err(o) => o,
                }
            }
            ResizeStep::Expand { claim: marked, size } => {
                let claim = match marked {
                    Some(new) => match self.write_claim(new, Part::Both).await {
                        Ok(c) => c,
                        Err(o) => return o,
                    },
                    None => (*claim).clone(),
                };
                self.expand(&claim, &pv, &driver, expansion, &size, now).await
            }
        }
    }

    async fn expand(
        &self,
        claim: &PersistentVolumeClaim,
        pv: &PersistentVolume,
        driver: &Driver,
        expansion: Expansion,
        size: &ApiQuantity,
        now: jiff::Timestamp,
    ) -> Outcome {
        let pv_name = pv.metadata.name.clone().unwrap_or_default();
        self.events.record(involved(claim), resizing_note(&pv_name));
        let Some(want) = sidecar::quantity_bytes(size) else {
            return Outcome::Done;
        };
        let result = match expansion {
            Expansion::NodeOnly => Ok((want, true)),
            _ => self.controller_expand(pv, driver, want).await,
        };
        match result {
            Ok((got, node)) => {
                let got = if got == 0 { want } else { got };
                let (new_pv, new_claim, note) = expanded(claim, pv, got, node, now);
                tracing::info!(claim = %claim_key(claim), volume = %pv_name, bytes = got, node_expansion = node, "volume expanded");
                if new_pv != *pv {
                    let Ok(value) = new_pv.to_value() else {
                        return Outcome::Retry;
                    };
                    match self.api.update(kinds::pvs(), value, Part::Main).await {
                        Ok(stored) => self.inf.pvs.assume(stored),
                        Err(e) => {
                            let msg = format!("error updating pv {pv_name:?} by resizer: {e}");
                            self.events.record(
                                involved(claim),
                                failed(claim, &pv_name, &driver.name, None, &msg, now).1,
                            );
                            return retry_after(&e);
                        }
                    }
                }
                match self.write_claim(new_claim, Part::Both).await {
                    Ok(_) => {
                        self.events.record(involved(claim), note);
                        Outcome::Done
                    }
                    Err(o) => o,
                }
            }
            Err((code, error)) => {
                tracing::warn!(claim = %claim_key(claim), volume = %pv_name, "expansion failed: {error}");
                let (new, note) = failed(claim, &pv_name, &driver.name, code, &error, now);
                self.events.record(involved(claim), note);
                if let Some(new) = new {
                    let _ = self.write_claim(new, Part::Status).await;
                }
                Outcome::Retry
            }
        }
    }

    /// ControllerExpandVolume; the error as (gRPC code, message).
    async fn controller_expand(
        &self,
        pv: &PersistentVolume,
        driver: &Driver,
        bytes: i64,
    ) -> Result<(i64, bool), (Option<tonic::Code>, String)> {
        let csi = pv.spec.as_ref().and_then(|s| s.csi.as_ref());
        let secrets = match csi.and_then(|c| c.controller_expand_secret_ref.as_ref()) {
            None => HashMap::new(),
            Some(r) => {
                let (ns, name) = (
                    r.namespace.clone().unwrap_or_default(),
                    r.name.clone().unwrap_or_default(),
                );
                sidecar::load_secret(&*self.api, &ns, &name)
                    .await
                    .map_err(|e| (None, format!("error getting secret {name} in namespace {ns}: {e}")))?
            }
        };
        let req = expand_request(
            pv,
            bytes,
            driver.controller(ControllerCap::SingleNodeMultiWriter),
            secrets,
        )
        .map_err(|e| {
            let name = pv.metadata.name.as_deref().unwrap_or("");
            (None, format!("failed to get capabilities of volume {name} with {e}"))
        })?;
        let mut client = driver.client.controller.clone();
        match client.controller_expand_volume(req).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok((r.capacity_bytes, r.node_expansion_required))
            }
            Err(s) => Err((Some(s.code()), sidecar::rpc_error(&s))),
        }
    }

    async fn write_claim(&self, new: PersistentVolumeClaim, part: Part) -> Result<PersistentVolumeClaim, Outcome> {
        let value = new.to_value().map_err(|_| Outcome::Retry)?;
        assumed(&self.inf.pvcs, self.api.update(kinds::pvcs(), value, part).await).map(Arc::unwrap_or_clone)
    }
}

#[cfg(test)]
#[path = "resizer_tests.rs"]
mod tests;

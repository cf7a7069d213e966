//! The PersistentVolume controller's decisions (Kubernetes' `syncClaim` and `syncVolume`,
//! `pkg/controller/volume/persistentvolume/pv_controller.go`), as pure functions: given a claim
//! or a volume and what the caches say about its counterpart, what to write next.
//!
//! Claims:
//! - unbound, no `volumeName`: bind the matching volume; else wait for the first consumer
//!   (WaitForFirstConsumer without a selected node), hand the claim to its class's provisioner,
//!   or stay Pending ("no persistent volumes available for this claim and no storage class is set");
//! - unbound, with `volumeName` (pre-bound by the user): bind when the volume exists, is free or
//!   reserved for this claim, and satisfies it (VolumeMismatch otherwise); a volume bound
//!   elsewhere leaves the claim Pending (FailedBinding);
//! - bound (`pv.kubernetes.io/bind-completed`): Lost when the volume or the reference is gone
//!   (ClaimLost) or the volume names another claim (ClaimMisbound); otherwise re-assert the bind.
//!
//! Volumes:
//! - no `claimRef`, or one without a UID (reserved for a claim by the user): Available;
//! - claim gone (or a new claim with the same name): Released, then reclaim: Retain keeps it;
//!   Delete of a provisioned volume is left to its provisioner, and of any other volume fails
//!   (no deleter); Recycle fails (no recycler for these volume types); unknown policies fail;
//! - claim bound to it: Bound; claim not yet bound: let the claim's sync finish;
//! - claim bound elsewhere: a provisioned Delete volume is Released and reclaimed, any other is
//!   unbound (the whole reference if the controller set it, else just the UID).

use std::collections::BTreeMap;

use berth_api::quantity::Quantity;
use k8s_openapi::api::core::v1::{
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimStatus, PersistentVolumeStatus,
};
use k8s_openapi::api::storage::v1::StorageClass;

use crate::binder::{AccessModes, MatchError, claim_class, is_bound_to, volume_class};

pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
pub const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const ANN_MIGRATED_PROVISIONED_BY: &str = "pv.kubernetes.io/migrated-to";
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
pub const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const NO_PROVISIONER: &str = "kubernetes.io/no-provisioner";
/// Marks a claim whose backend volume may exist before its PV does (see
/// [`crate::provisioner`]). Binding the claim to its PV drops it: the PV carries the volume.
pub const PROVISIONING_FINALIZER: &str = "csi.berth.dev/provisioning-protection";

/// An event to record on the object being synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Note {
        Note {
            warning: false,
            reason,
            message: message.into(),
        }
    }
    pub fn warning(reason: &'static str, message: impl Into<String>) -> Note {
        Note {
            warning: true,
            reason,
            message: message.into(),
        }
    }
}

/// What to do with a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimStep {
    /// Keep it Pending (write the phase if it is not), recording `note`.
    Pending(Option<Note>),
    /// Ask the class's provisioner for a volume: annotate the claim.
    Provision { provisioner: String },
    /// Bind it to this volume (both objects), or finish a half-done bind.
    Bind { volume: String },
    /// The claim lost its volume.
    Lost(Note),
    /// Something that should not happen; retry later.
    Fail(String),
}

fn annotation<'a>(meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
}

fn has_annotation(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> bool {
    annotation(meta, key).is_some()
}

/// Whether the PV controller has finished binding the claim (`pv.kubernetes.io/bind-completed`,
/// whatever its value).
pub fn bind_completed(claim: &PersistentVolumeClaim) -> bool {
    has_annotation(&claim.metadata, ANN_BIND_COMPLETED)
}

/// The claim's `spec.volumeName`, "" when unset.
pub fn claim_volume_name(claim: &PersistentVolumeClaim) -> &str {
    claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()).unwrap_or("")
}

/// Whether the claim waits for a consumer before binding: its class binds at the first
/// consumer and the scheduler has not selected a node yet.
pub fn delay_binding(claim: &PersistentVolumeClaim, class: Option<&StorageClass>) -> bool {
    if has_annotation(&claim.metadata, ANN_SELECTED_NODE) {
        return false;
    }
    class.is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"))
}

/// Why `volume` cannot serve a claim that names it (Kubernetes' `checkVolumeSatisfyClaim`).
pub fn volume_satisfies(volume: &PersistentVolume, claim: &PersistentVolumeClaim) -> Result<(), String> {
    let spec = volume.spec.as_ref();
    let cspec = claim.spec.as_ref();
    let request = cspec
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| Quantity::parse(&q.0).ok());
    let capacity = spec
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| Quantity::parse(&q.0).ok());
    if let (Some(r), Some(c)) = (request, capacity)
        && c.nanos() < r.nanos()
    {
        return Err("requested PV is too small".into());
    }
    if volume_class(volume) != claim_class(claim) {
        return Err("storageClassName does not match".into());
    }
    let vmode = spec.and_then(|s| s.volume_mode.as_deref()).unwrap_or("Filesystem");
    let cmode = cspec.and_then(|s| s.volume_mode.as_deref()).unwrap_or("Filesystem");
    if vmode != cmode {
        return Err("incompatible volumeMode".into());
    }
    let vmodes = AccessModes::of(spec.and_then(|s| s.access_modes.as_deref()).unwrap_or(&[]));
    let cmodes = AccessModes::of(cspec.and_then(|s| s.access_modes.as_deref()).unwrap_or(&[]));
    if !vmodes.contains(cmodes) {
        return Err("incompatible accessMode".into());
    }
    Ok(())
}

/// The next step for `claim`. `volume` looks a volume up by name (the cache); `find` runs the
/// matching rule with the given delay-binding flag; `class` is the claim's class, if it exists.
pub fn sync_claim<V>(
    claim: &PersistentVolumeClaim,
    volume: impl Fn(&str) -> Option<V>,
    find: impl FnOnce(bool) -> Result<Option<V>, MatchError>,
    class: Option<&StorageClass>,
) -> ClaimStep
where
    V: std::ops::Deref<Target = PersistentVolume>,
{
    if claim.metadata.deletion_timestamp.is_some() && claim_volume_name(claim).is_empty() {
        // A deleted claim that never bound: nothing to bind any more.
        return ClaimStep::Pending(None);
    }
    if !bind_completed(claim) {
        return sync_unbound_claim(claim, volume, find, class);
    }
    let name = claim_volume_name(claim);
    if name.is_empty() {
        return ClaimStep::Lost(Note::warning(
            "ClaimLost",
            "Bound claim has lost reference to PersistentVolume. Data on the volume is lost!",
        ));
    }
    let Some(pv) = volume(name) else {
        return ClaimStep::Lost(Note::warning(
            "ClaimLost",
            "Bound claim has lost its PersistentVolume. Data on the volume is lost!",
        ));
    };
    match pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) {
        None => ClaimStep::Bind {
            volume: name.to_owned(),
        },
        Some(_) if is_bound_to(&pv, claim) => ClaimStep::Bind {
            volume: name.to_owned(),
        },
        Some(_) => ClaimStep::Lost(Note::warning(
            "ClaimMisbound",
            "Two claims are bound to the same volume, this one is bound incorrectly",
        )),
    }
}

fn sync_unbound_claim<V>(
    claim: &PersistentVolumeClaim,
    volume: impl Fn(&str) -> Option<V>,
    find: impl FnOnce(bool) -> Result<Option<V>, MatchError>,
    class: Option<&StorageClass>,
) -> ClaimStep
where
    V: std::ops::Deref<Target = PersistentVolume>,
{
    let name = claim_volume_name(claim);
    if name.is_empty() {
        let delay = delay_binding(claim, class);
        let found = match find(delay) {
            Ok(f) => f,
            Err(e) => return ClaimStep::Fail(e.to_string()),
        };
        if let Some(pv) = found {
            return match &pv.metadata.name {
                Some(n) => ClaimStep::Bind { volume: n.clone() },
                None => ClaimStep::Fail("matched a volume without a name".into()),
            };
        }
        if delay {
            return ClaimStep::Pending(Some(Note::normal(
                "WaitForFirstConsumer",
                "waiting for first consumer to be created before binding",
            )));
        }
        let class_name = claim_class(claim);
        if !class_name.is_empty() {
            return match class {
                Some(c) => ClaimStep::Provision {
                    provisioner: c.provisioner.clone(),
                },
                None => ClaimStep::Pending(Some(Note::warning(
                    "ProvisioningFailed",
                    format!("storageclass.storage.k8s.io \"{class_name}\" not found"),
                ))),
            };
        }
        return ClaimStep::Pending(Some(Note::normal(
            "FailedBinding",
            "no persistent volumes available for this claim and no storage class is set",
        )));
    }
    let Some(pv) = volume(name) else {
        // The user asked for a volume that does not exist (yet).
        return ClaimStep::Pending(None);
    };
    match pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) {
        None => match volume_satisfies(&pv, claim) {
            Ok(()) => ClaimStep::Bind {
                volume: name.to_owned(),
            },
            Err(why) => ClaimStep::Pending(Some(Note::warning(
                "VolumeMismatch",
                format!("Cannot bind to requested volume \"{name}\": {why}"),
            ))),
        },
        Some(_) if is_bound_to(&pv, claim) => ClaimStep::Bind {
            volume: name.to_owned(),
        },
        Some(r) => {
            if has_annotation(&claim.metadata, ANN_BOUND_BY_CONTROLLER) {
                ClaimStep::Fail(format!(
                    "invalid binding of claim {:?} to volume {name:?}: volume already claimed by \"{}/{}\"",
                    claim_key(claim),
                    r.namespace.as_deref().unwrap_or(""),
                    r.name.as_deref().unwrap_or("")
                ))
            } else {
                ClaimStep::Pending(Some(Note::warning(
                    "FailedBinding",
                    format!("volume \"{name}\" already bound to a different claim."),
                )))
            }
        }
    }
}

/// `namespace/name` of a claim.
pub fn claim_key(claim: &PersistentVolumeClaim) -> String {
    format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or(""),
        claim.metadata.name.as_deref().unwrap_or("")
    )
}

/// The volume written for a bind: `claimRef` to the claim (marked bound-by-controller when
/// this controller made the reference) and phase Bound. `None` when nothing changes.
pub fn bound_volume(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> Option<PersistentVolume> {
    let mut new = pv.clone();
    let spec = new.spec.get_or_insert_with(Default::default);
    let already = is_bound_to(pv, claim);
    let fresh_ref = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: claim.metadata.namespace.clone(),
        name: claim.metadata.name.clone(),
        uid: claim.metadata.uid.clone(),
        resource_version: claim.metadata.resource_version.clone(),
        field_path: None,
    };
    match spec.claim_ref.as_mut() {
        Some(r) if already => {
            // Pre-bound by the user without a UID: fill it in.
            if r.uid.as_deref().unwrap_or("").is_empty() {
                *r = fresh_ref;
            }
        }
        _ => {
            spec.claim_ref = Some(fresh_ref);
            new.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(ANN_BOUND_BY_CONTROLLER.into(), "yes".into());
        }
    }
    let status = new.status.get_or_insert_with(PersistentVolumeStatus::default);
    if status.phase.as_deref() != Some("Bound") {
        status.phase = Some("Bound".into());
        status.message = None;
        status.reason = None;
    }
    (new != *pv).then_some(new)
}

/// The claim written for a bind: `volumeName`, the bind-completed annotation (and
/// bound-by-controller when this controller chose the volume), phase Bound with the volume's
/// access modes and capacity. `None` when nothing changes.
pub fn bound_claim(claim: &PersistentVolumeClaim, pv: &PersistentVolume) -> Option<PersistentVolumeClaim> {
    let mut new = claim.clone();
    let name = pv.metadata.name.clone().unwrap_or_default();
    let spec = new.spec.get_or_insert_with(Default::default);
    let ann = new.metadata.annotations.get_or_insert_with(BTreeMap::new);
    if spec.volume_name.as_deref() != Some(name.as_str()) {
        spec.volume_name = Some(name);
        ann.insert(ANN_BOUND_BY_CONTROLLER.into(), "yes".into());
    }
    if let Some(f) = new.metadata.finalizers.as_mut() {
        f.retain(|x| x != PROVISIONING_FINALIZER);
    }
    ann.entry(ANN_BIND_COMPLETED.into()).or_insert_with(|| "yes".into());
    let status = new.status.get_or_insert_with(PersistentVolumeClaimStatus::default);
    let pv_spec = pv.spec.as_ref();
    let becoming_bound = status.phase.as_deref() != Some("Bound");
    status.phase = Some("Bound".into());
    status.access_modes = pv_spec.and_then(|s| s.access_modes.clone());
    if becoming_bound || status.capacity.as_ref().is_none_or(BTreeMap::is_empty) {
        status.capacity = pv_spec.and_then(|s| s.capacity.clone());
    }
    (new != *claim).then_some(new)
}

/// The claim with `phase` in its status; `None` when it already has it.
pub fn claim_in_phase(claim: &PersistentVolumeClaim, phase: &str) -> Option<PersistentVolumeClaim> {
    if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase) {
        return None;
    }
    let mut new = claim.clone();
    new.status.get_or_insert_with(Default::default).phase = Some(phase.into());
    Some(new)
}

/// The claim handed to `provisioner` (both the GA and the beta annotation); `None` when it
/// already is.
pub fn claim_for_provisioner(claim: &PersistentVolumeClaim, provisioner: &str) -> Option<PersistentVolumeClaim> {
    if annotation(&claim.metadata, ANN_STORAGE_PROVISIONER) == Some(provisioner)
        && annotation(&claim.metadata, ANN_BETA_STORAGE_PROVISIONER) == Some(provisioner)
    {
        return None;
    }
    let mut new = claim.clone();
    let ann = new.metadata.annotations.get_or_insert_with(BTreeMap::new);
    ann.insert(ANN_STORAGE_PROVISIONER.into(), provisioner.into());
    ann.insert(ANN_BETA_STORAGE_PROVISIONER.into(), provisioner.into());
    Some(new)
}

/// The event recorded when a claim is handed to an external provisioner.
pub fn external_provisioning_note(provisioner: &str) -> Note {
    Note::normal(
        "ExternalProvisioning",
        format!(
            "Waiting for a volume to be created either by the external provisioner '{provisioner}' or manually by the system administrator. If volume creation is delayed, please verify that the provisioner is running and correctly registered."
        ),
    )
}

/// What the volume's sync found about its claim.
#[derive(Debug, Clone, Copy)]
pub enum ClaimSeen<'a> {
    /// The volume has no claimRef, or one without a UID: no lookup needed.
    NotNeeded,
    /// The claim named by the claimRef, with the same UID (fresh from the API when the cache
    /// disagreed).
    Found(&'a PersistentVolumeClaim),
    /// No claim with that name and UID exists.
    Gone,
}

/// What to do with a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeStep {
    /// Nothing.
    Nothing,
    /// Write this phase (with a message and an event for Failed).
    Phase { phase: &'static str, note: Option<Note> },
    /// The claim's sync finishes the bind; queue it.
    SyncClaim(String),
    /// Clear the reference: the whole `claimRef` (`whole`) or only its UID.
    Unbind { whole: bool },
}

/// Whether the volume's claimRef has a UID (a real binding, not a user's reservation).
pub fn claim_ref_uid(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.uid.as_deref())
        .filter(|u| !u.is_empty())
}

/// The next step for `volume`, given what its claim lookup found.
pub fn sync_volume(pv: &PersistentVolume, claim: ClaimSeen<'_>) -> VolumeStep {
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    let set = |p: &'static str| {
        if phase == p {
            VolumeStep::Nothing
        } else {
            VolumeStep::Phase { phase: p, note: None }
        }
    };
    if claim_ref_uid(pv).is_none() {
        return set("Available");
    }
    let claim = match claim {
        ClaimSeen::Found(c) => c,
        ClaimSeen::Gone | ClaimSeen::NotNeeded => {
            if phase != "Released" && phase != "Failed" {
                return VolumeStep::Phase {
                    phase: "Released",
                    note: None,
                };
            }
            return reclaim(pv);
        }
    };
    let name = pv.metadata.name.as_deref().unwrap_or("");
    let bound_to = claim_volume_name(claim);
    if bound_to.is_empty() {
        return VolumeStep::SyncClaim(claim_key(claim));
    }
    if bound_to == name {
        return set("Bound");
    }
    // The claim is bound to another volume.
    let provisioned = has_annotation(&pv.metadata, ANN_PROVISIONED_BY);
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or("Retain");
    if provisioned && policy == "Delete" {
        if phase != "Released" && phase != "Failed" {
            return VolumeStep::Phase {
                phase: "Released",
                note: None,
            };
        }
        return reclaim(pv);
    }
    VolumeStep::Unbind {
        whole: has_annotation(&pv.metadata, ANN_BOUND_BY_CONTROLLER),
    }
}

/// Reclaiming a Released (or Failed) volume, as far as the PV controller goes.
fn reclaim(pv: &PersistentVolume) -> VolumeStep {
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    let failed = |reason: &'static str, message: String| {
        if phase == "Failed" {
            VolumeStep::Nothing
        } else {
            VolumeStep::Phase {
                phase: "Failed",
                note: Some(Note::warning(reason, message)),
            }
        }
    };
    let name = pv.metadata.name.as_deref().unwrap_or("");
    match pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or("Retain")
    {
        "Retain" => VolumeStep::Nothing,
        // A provisioner (Berth's, for any CSI driver) deletes what it provisioned.
        "Delete" if has_annotation(&pv.metadata, ANN_PROVISIONED_BY) => VolumeStep::Nothing,
        "Delete" => failed(
            "VolumeFailedDelete",
            format!("error getting deleter volume plugin for volume \"{name}\": no deletable volume plugin matched"),
        ),
        "Recycle" => failed("VolumeFailedRecycle", "No recycler plugin found for the volume!".into()),
        _ => failed(
            "VolumeUnknownReclaimPolicy",
            "Volume has unrecognized PersistentVolumeReclaimPolicy".into(),
        ),
    }
}

/// The volume with `phase` (and the note's message for Failed).
pub fn volume_in_phase(pv: &PersistentVolume, phase: &str, note: Option<&Note>) -> Option<PersistentVolume> {
    let mut new = pv.clone();
    let status = new.status.get_or_insert_with(PersistentVolumeStatus::default);
    status.phase = Some(phase.into());
    status.message = note.filter(|_| phase == "Failed").map(|n| n.message.clone());
    status.reason = None;
    (new != *pv).then_some(new)
}

/// The volume after an unbind: without its claimRef (and the bound-by-controller annotation),
/// or with only the UID cleared; phase Available.
pub fn unbound_volume(pv: &PersistentVolume, whole: bool) -> PersistentVolume {
    let mut new = pv.clone();
    if let Some(spec) = new.spec.as_mut() {
        if whole {
            spec.claim_ref = None;
        } else if let Some(r) = spec.claim_ref.as_mut() {
            r.uid = None;
            r.resource_version = None;
        }
    }
    if let Some(a) = new.metadata.annotations.as_mut() {
        a.remove(ANN_BOUND_BY_CONTROLLER);
    }
    new.status.get_or_insert_with(PersistentVolumeStatus::default).phase = Some("Available".into());
    new
}

/// Whether a provisioner should delete this volume now: Released with policy Delete,
/// provisioned by `driver`, and not being deleted already.
pub fn should_delete(pv: &PersistentVolume, driver: &str) -> bool {
    pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released")
        && pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            == Some("Delete")
        && (annotation(&pv.metadata, ANN_PROVISIONED_BY) == Some(driver)
            || annotation(&pv.metadata, ANN_MIGRATED_PROVISIONED_BY) == Some(driver))
}

#[cfg(test)]
#[path = "pv_sync_tests.rs"]
mod tests;

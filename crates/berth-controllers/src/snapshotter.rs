//! Volume snapshots, as kubernetes-csi external-snapshotter's two controllers do them, run
//! here as one:
//!
//! - the common snapshot-controller (`pkg/common-controller`): a VolumeSnapshot of a claim gets
//!   its class (the driver's default class, by `snapshot.storage.kubernetes.io/is-default-class`,
//!   when it names none), finalizers, and a VolumeSnapshotContent `snapcontent-<snapshot uid>`
//!   with the class's deletion policy and driver; a snapshot naming a pre-provisioned content is
//!   bound to it; the snapshot's status follows its content's (bound name, creationTime,
//!   readyToUse, restoreSize, error). Deleting a snapshot deletes its content when the policy is
//!   Delete, and waits while a claim is being restored from it;
//! - csi-snapshotter (`pkg/sidecar-controller`): a content of a registered driver gets
//!   CreateSnapshot (`snapshot-<snapshot uid>`, the class's parameters minus the
//!   `csi.storage.k8s.io/` ones, the snapshotter secret) or, for a pre-provisioned one,
//!   ListSnapshots, and its status; deleting a Delete-policy content calls DeleteSnapshot before
//!   its finalizer goes.
//!
//! The finalizers are the real ones, used as the real controllers use them:
//! `volumesnapshot-as-source-protection` and `volumesnapshot-bound-protection` on snapshots,
//! `volumesnapshotcontent-bound-protection` on contents, `pvc-as-source-protection` on a claim
//! while a snapshot of it is being cut. Messages and event reasons are external-snapshotter's.
//!
//! Each sync takes one step (pure: [`sync_snapshot`], [`sync_content`]), writes it, and is run
//! again by the watch event of its own write, so a crash between steps resumes where it
//! stopped. CreateSnapshot is idempotent by name and DeleteSnapshot of an unknown id is OK.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_api::names::{dns1123_label, dns1123_subdomain};
use berth_api::snapshot::{
    API_VERSION, VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent, VolumeSnapshotContentSource,
    VolumeSnapshotContentSpec, VolumeSnapshotContentStatus, VolumeSnapshotError, VolumeSnapshotStatus,
};
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use tokio::sync::watch;

use crate::Informers;
use crate::api::{Api, ApiError, Part, Typed, kinds};
use crate::drivers::Drivers;
use crate::events::{Involved, Recorder};
use crate::informer::{Change, Informer};
use crate::pv_controller::retry_after;
use crate::pv_sync::Note;
use crate::queue::{Outcome, Queue};
use crate::sidecar;

pub const CONTENT_FINALIZER: &str = "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
pub const BOUND_FINALIZER: &str = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection";
pub const AS_SOURCE_FINALIZER: &str = "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection";
pub const PVC_FINALIZER: &str = "snapshot.storage.kubernetes.io/pvc-as-source-protection";
pub const DEFAULT_CLASS_ANNOTATION: &str = "snapshot.storage.kubernetes.io/is-default-class";
pub const BEING_DELETED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";
pub const BEING_CREATED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-created";
pub const DELETION_SECRET_NAME: &str = "snapshot.storage.kubernetes.io/deletion-secret-name";
pub const DELETION_SECRET_NAMESPACE: &str = "snapshot.storage.kubernetes.io/deletion-secret-namespace";

const PREFIX: &str = "csi.storage.k8s.io/";
pub const SECRET_NAME_KEY: &str = "csi.storage.k8s.io/snapshotter-secret-name";
pub const SECRET_NAMESPACE_KEY: &str = "csi.storage.k8s.io/snapshotter-secret-namespace";
pub const LIST_SECRET_NAME_KEY: &str = "csi.storage.k8s.io/snapshotter-list-secret-name";
pub const LIST_SECRET_NAMESPACE_KEY: &str = "csi.storage.k8s.io/snapshotter-list-secret-namespace";
/// The prefixed class parameters csi-snapshotter knows (and strips); any other is an error.
const KNOWN_PREFIXED: [&str; 8] = [
    SECRET_NAME_KEY,
    SECRET_NAMESPACE_KEY,
    LIST_SECRET_NAME_KEY,
    LIST_SECRET_NAMESPACE_KEY,
    "csi.storage.k8s.io/group-snapshotter-get-secret-name",
    "csi.storage.k8s.io/group-snapshotter-get-secret-namespace",
    "csi.storage.k8s.io/group-snapshotter-secret-name",
    "csi.storage.k8s.io/group-snapshotter-secret-namespace",
];

/// How often a content that is not ready yet is asked about again.
pub const READY_POLL: Duration = Duration::from_secs(2);

/// The content dynamically made for a snapshot: `snapcontent-<snapshot uid>`.
pub fn content_name(snapshot: &VolumeSnapshot) -> String {
    format!("snapcontent-{}", snapshot.metadata.uid.as_deref().unwrap_or(""))
}

/// The name CreateSnapshot gets: `snapshot-<snapshot uid>` (csi-snapshotter's default prefix,
/// the UID not truncated), so a repeated call names the same snapshot.
pub fn csi_snapshot_name(snapshot_uid: &str) -> String {
    format!("snapshot-{snapshot_uid}")
}

fn has_finalizer(meta: &ObjectMeta, f: &str) -> bool {
    meta.finalizers.as_ref().is_some_and(|v| v.iter().any(|x| x == f))
}

fn has_annotation(meta: &ObjectMeta, a: &str) -> bool {
    meta.annotations.as_ref().is_some_and(|m| m.contains_key(a))
}

fn snapshot_key(s: &VolumeSnapshot) -> String {
    format!(
        "{}/{}",
        s.metadata.namespace.as_deref().unwrap_or(""),
        s.metadata.name.as_deref().unwrap_or("")
    )
}

fn is_ready(s: &VolumeSnapshot) -> bool {
    s.status.as_ref().and_then(|s| s.ready_to_use) == Some(true)
}

fn bound_name(s: &VolumeSnapshot) -> Option<&str> {
    s.status
        .as_ref()
        .and_then(|s| s.bound_volume_snapshot_content_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn content_ready(c: &VolumeSnapshotContent) -> bool {
    c.status.as_ref().and_then(|s| s.ready_to_use) == Some(true)
}

/// The content a snapshot is about: the pre-provisioned one it names, else the one it is bound
/// to, else `snapcontent-<uid>`.
pub fn content_name_for(s: &VolumeSnapshot) -> String {
    if let Some(n) = &s.spec.source.volume_snapshot_content_name {
        return n.clone();
    }
    bound_name(s).map_or_else(|| content_name(s), str::to_owned)
}

/// Whether the content points back to exactly this snapshot (name, namespace and UID).
pub fn points_back(c: &VolumeSnapshotContent, s: &VolumeSnapshot) -> bool {
    let r = &c.spec.volume_snapshot_ref;
    r.name == s.metadata.name && r.namespace == s.metadata.namespace && r.uid == s.metadata.uid
}

/// Whether a deleted snapshot still holds one of its finalizers.
fn deletion_candidate(s: &VolumeSnapshot) -> bool {
    s.metadata.deletion_timestamp.is_some()
        && (has_finalizer(&s.metadata, AS_SOURCE_FINALIZER) || has_finalizer(&s.metadata, BOUND_FINALIZER))
}

/// What the common controller sees of one snapshot.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotView<'a> {
    pub snapshot: &'a VolumeSnapshot,
    /// The content named by [`content_name_for`], if it exists.
    pub content: Option<&'a VolumeSnapshotContent>,
    /// The claim a dynamic snapshot is taken of, if it exists.
    pub claim: Option<&'a PersistentVolumeClaim>,
    /// That claim's volume, if it exists.
    pub volume: Option<&'a PersistentVolume>,
    pub classes: &'a [&'a VolumeSnapshotClass],
    /// A Pending claim in the namespace is being restored from this snapshot.
    pub restoring: bool,
    /// Another snapshot of the same claim is not ready yet (it keeps the claim's finalizer).
    pub claim_used_by_others: bool,
}

/// The common controller's next step for a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotStep {
    Nothing,
    /// Remove [`PVC_FINALIZER`] from the source claim: no snapshot of it is being cut.
    ReleaseClaim,
    /// Record an error in the snapshot's status (readyToUse false when `unready`) and as a
    /// Warning event; retried.
    Error {
        reason: &'static str,
        message: String,
        unready: bool,
    },
    /// Write `spec.volumeSnapshotClassName` (the default class).
    SetClass(String),
    /// Write the snapshot with finalizers added or removed.
    Finalizers(VolumeSnapshot),
    /// Add [`PVC_FINALIZER`] to the source claim before the content is made.
    ProtectClaim,
    /// Create the content (CreatingSnapshot event).
    CreateContent(VolumeSnapshotContent),
    /// Write the content (bound to the snapshot, or marked being deleted).
    UpdateContent(VolumeSnapshotContent),
    /// Delete the content (its finalizer holds it until the snapshot is deleted in the driver).
    DeleteContent(String),
    /// Write the snapshot's status, then record the events.
    Status(VolumeSnapshot, Vec<Note>),
    /// Record the event and look again later.
    Wait(Note),
}

fn error(reason: &'static str, message: impl Into<String>, unready: bool) -> SnapshotStep {
    SnapshotStep::Error {
        reason,
        message: message.into(),
        unready,
    }
}

/// The source volume of a dynamic snapshot, checked as `getVolumeFromVolumeSnapshot` checks it.
fn source_volume<'a>(v: &SnapshotView<'a>) -> Result<&'a PersistentVolume, String> {
    let claim_name = v
        .snapshot
        .spec
        .source
        .persistent_volume_claim_name
        .as_deref()
        .unwrap_or("");
    let claim = v.claim.ok_or_else(|| {
        format!("failed to retrieve PVC {claim_name} from the lister: \"persistentvolumeclaim \\\"{claim_name}\\\" not found\"")
    })?;
    if claim.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
        return Err(format!(
            "the PVC {claim_name} is not yet bound to a PV, will not attempt to take a snapshot"
        ));
    }
    let pv_name = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()).unwrap_or("");
    let pv = v.volume.ok_or_else(|| {
        format!(
            "failed to retrieve PV {pv_name} from the API server: \"persistentvolumes \\\"{pv_name}\\\" not found\""
        )
    })?;
    let bound = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()).is_some_and(|r| {
        r.name == claim.metadata.name
            && r.namespace == claim.metadata.namespace
            && (r.uid.as_deref().unwrap_or("").is_empty() || r.uid == claim.metadata.uid)
    });
    if !bound {
        return Err("claim in dataSource not bound or invalid".to_owned());
    }
    Ok(pv)
}

fn pv_driver(pv: &PersistentVolume) -> Option<&str> {
    pv.spec.as_ref()?.csi.as_ref().map(|c| c.driver.as_str())
}

/// The default class for a dynamic snapshot: the one class annotated default whose driver is the
/// source volume's driver.
pub fn default_class(v: &SnapshotView<'_>) -> Result<String, String> {
    let pv = source_volume(v)?;
    let s = v.snapshot;
    let driver = pv_driver(pv).ok_or_else(|| {
        format!(
            "snapshotting non-CSI volumes is not supported, snapshot:{}/{}",
            s.metadata.namespace.as_deref().unwrap_or(""),
            s.metadata.name.as_deref().unwrap_or("")
        )
    })?;
    let defaults: Vec<&&VolumeSnapshotClass> = v
        .classes
        .iter()
        .filter(|c| {
            c.driver == driver
                && c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                    .map(String::as_str)
                    == Some("true")
        })
        .collect();
    match defaults.as_slice() {
        [] => Err("cannot find default snapshot class".to_owned()),
        [one] => Ok(one.metadata.name.clone().unwrap_or_default()),
        many => Err(format!("{} default snapshot classes were found", many.len())),
    }
}

/// Expands `${token}` and `$token` as Go's `os.Expand`, failing with every unknown token.
fn resolve_template(template: &str, params: &HashMap<&str, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut missing: Vec<String> = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, used) = if let Some(body) = after.strip_prefix('{') {
            match body.find('}') {
                Some(j) => (&body[..j], j + 2),
                None => ("", 1),
            }
        } else {
            let n = after
                .bytes()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_')
                .count();
            (&after[..n], n)
        };
        if name.is_empty() && used == 0 {
            out.push('$');
        } else if let Some(v) = params.get(name) {
            out.push_str(v);
        } else if !name.is_empty() {
            missing.push(name.to_owned());
        }
        rest = &after[used..];
    }
    out.push_str(rest);
    if missing.is_empty() {
        return Ok(out);
    }
    missing.sort();
    missing.dedup();
    let quoted: Vec<String> = missing.iter().map(|m| format!("{m:?}")).collect();
    Err(format!(
        "error resolving value {template:?}: invalid tokens: [{}]",
        quoted.join(" ")
    ))
}

/// The Secret a class names with one pair of parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretFor {
    /// CreateSnapshot and DeleteSnapshot: `snapshotter-secret-name`/`-namespace`.
    Snapshotter,
    /// ListSnapshots: `snapshotter-list-secret-name`/`-namespace`.
    List,
}

/// The Secret `(namespace, name)` a class names for a content (`GetSecretReference`), `None`
/// when it names none. Templates may use `${volumesnapshotcontent.name}`,
/// `${volumesnapshot.namespace}` and, in the name only, `${volumesnapshot.name}` (the snapshot
/// ones only when the snapshot is known).
pub fn secret_ref(
    params: &BTreeMap<String, String>,
    which: SecretFor,
    content: &str,
    snapshot: Option<&VolumeSnapshot>,
) -> Result<Option<(String, String)>, String> {
    let (name_key, ns_key, label) = match which {
        SecretFor::Snapshotter => (SECRET_NAME_KEY, SECRET_NAMESPACE_KEY, "Snapshotter"),
        SecretFor::List => (LIST_SECRET_NAME_KEY, LIST_SECRET_NAMESPACE_KEY, "SnapshotterList"),
    };
    let wrap = |e: String| format!("failed to get name and namespace template from params: {e}");
    let (name_t, ns_t) = match (params.get(name_key), params.get(ns_key)) {
        (None, None) => return Ok(None),
        (Some(n), Some(ns)) if !n.is_empty() && !ns.is_empty() => (n, ns),
        (Some(_), Some(_)) => {
            return Err(wrap(format!(
                "{label} secrets specified in parameters but value of either namespace or name is empty"
            )));
        }
        _ => {
            return Err(wrap(format!(
                "either name and namespace for {label} secrets specified, Both must be specified"
            )));
        }
    };
    let mut p = HashMap::from([("volumesnapshotcontent.name", content.to_owned())]);
    if let Some(s) = snapshot {
        p.insert(
            "volumesnapshot.namespace",
            s.metadata.namespace.clone().unwrap_or_default(),
        );
    }
    let namespace = resolve_template(ns_t, &p)?;
    if !dns1123_label(&namespace).is_empty() {
        return Err(if *ns_t == namespace {
            format!("{ns_t:?} is not a valid namespace name")
        } else {
            format!("{ns_t:?} resolved to {namespace:?} which is not a valid namespace name")
        });
    }
    if let Some(s) = snapshot {
        p.insert("volumesnapshot.name", s.metadata.name.clone().unwrap_or_default());
    }
    let name = resolve_template(name_t, &p)?;
    if !dns1123_subdomain(&name).is_empty() {
        return Err(if *name_t == name {
            format!("{name_t:?} is not a valid secret name")
        } else {
            format!("{name_t:?} resolved to {name:?} which is not a valid secret name")
        });
    }
    Ok(Some((namespace, name)))
}

/// The class parameters for CreateSnapshot: every key outside `csi.storage.k8s.io/`; a prefixed
/// key csi-snapshotter does not know is an error (`RemovePrefixedParameters`).
pub fn driver_parameters(params: &BTreeMap<String, String>) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (k, v) in params {
        if k.starts_with(PREFIX) {
            if !KNOWN_PREFIXED.contains(&k.as_str()) {
                return Err(format!(
                    "failed to remove CSI Parameters of prefixed keys: found unknown parameter key \"{k}\" with reserved namespace {PREFIX}"
                ));
            }
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    Ok(out)
}

/// The content for a dynamic snapshot (`createSnapshotContent`): bound to the snapshot by
/// reference (with its UID), the source volume's handle and mode, the class's driver and
/// deletion policy, and the snapshotter secret recorded for deletion.
fn new_content(
    s: &VolumeSnapshot,
    class: &VolumeSnapshotClass,
    pv: &PersistentVolume,
    secret: Option<(String, String)>,
) -> Option<VolumeSnapshotContent> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    let annotations = secret.map(|(ns, name)| {
        BTreeMap::from([
            (DELETION_SECRET_NAME.to_owned(), name),
            (DELETION_SECRET_NAMESPACE.to_owned(), ns),
        ])
    });
    Some(VolumeSnapshotContent {
        api_version: Some(API_VERSION.to_owned()),
        kind: Some("VolumeSnapshotContent".to_owned()),
        metadata: ObjectMeta {
            name: Some(content_name(s)),
            annotations,
            ..ObjectMeta::default()
        },
        spec: VolumeSnapshotContentSpec {
            volume_snapshot_ref: ObjectReference {
                api_version: Some(API_VERSION.to_owned()),
                kind: Some("VolumeSnapshot".to_owned()),
                namespace: s.metadata.namespace.clone(),
                name: s.metadata.name.clone(),
                uid: s.metadata.uid.clone(),
                resource_version: s.metadata.resource_version.clone(),
                field_path: None,
            },
            deletion_policy: class.deletion_policy.clone(),
            driver: class.driver.clone(),
            volume_snapshot_class_name: class.metadata.name.clone(),
            source: VolumeSnapshotContentSource {
                volume_handle: Some(csi.volume_handle.clone()),
                snapshot_handle: None,
            },
            source_volume_mode: pv.spec.as_ref()?.volume_mode.clone(),
        },
        status: None,
    })
}

/// The snapshot's status brought up to its content's (`updateSnapshotStatus`), with the
/// SnapshotCreated and SnapshotReady events when they first become true; `None` when unchanged.
pub fn status_from_content(s: &VolumeSnapshot, c: &VolumeSnapshotContent) -> Option<(VolumeSnapshot, Vec<Note>)> {
    let cs = c.status.as_ref();
    let created = cs.and_then(|x| x.creation_time).and_then(sidecar::time_of_nanos);
    let size = cs.and_then(|x| x.restore_size);
    let ready = cs.and_then(|x| x.ready_to_use).unwrap_or(false);
    let err = cs.and_then(|x| x.error.clone());
    let mut new = s.clone();
    let st = new.status.get_or_insert_with(VolumeSnapshotStatus::default);
    if st.bound_volume_snapshot_content_name.is_none() {
        st.bound_volume_snapshot_content_name = c.metadata.name.clone();
    }
    if st.creation_time.is_none()
        && let Some(t) = created.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok())
    {
        st.creation_time = Some(Time(t));
    }
    if st.ready_to_use != Some(ready) {
        st.ready_to_use = Some(ready);
        if ready {
            st.error = None;
        }
    }
    let zero = st
        .restore_size
        .as_ref()
        .is_some_and(|q| sidecar::quantity_bytes(q) == Some(0));
    if let Some(size) = size
        && (st.restore_size.is_none() || zero && size > 0)
    {
        st.restore_size = Some(sidecar::binary_quantity(size));
    }
    if st.error != err {
        st.error = err;
    }
    if new == *s {
        return None;
    }
    let key = snapshot_key(s);
    let mut notes = Vec::new();
    let was_created = s.status.as_ref().is_some_and(|x| x.creation_time.is_some());
    if !was_created && new.status.as_ref().is_some_and(|x| x.creation_time.is_some()) {
        notes.push(Note::normal(
            "SnapshotCreated",
            format!("Snapshot {key} was successfully created by the CSI driver."),
        ));
    }
    if !is_ready(s) && is_ready(&new) {
        notes.push(Note::normal(
            "SnapshotReady",
            format!("Snapshot {key} is ready to use."),
        ));
    }
    Some((new, notes))
}

/// The snapshot with `message` as its status error (readyToUse false when `unready`); `None`
/// when that error is already recorded (`updateSnapshotErrorStatusWithEvent`).
pub fn with_error(s: &VolumeSnapshot, message: &str, unready: bool, now: jiff::Timestamp) -> Option<VolumeSnapshot> {
    let same = s
        .status
        .as_ref()
        .and_then(|x| x.error.as_ref())
        .and_then(|e| e.message.as_deref())
        == Some(message);
    if same {
        return None;
    }
    let mut new = s.clone();
    let st = new.status.get_or_insert_with(VolumeSnapshotStatus::default);
    st.error = Some(VolumeSnapshotError {
        message: Some(message.to_owned()),
        time: Some(Time(now)),
    });
    if unready {
        st.ready_to_use = Some(false);
    }
    Some(new)
}

fn with_finalizers(s: &VolumeSnapshot, add: &[&str], remove: &[&str]) -> Option<VolumeSnapshot> {
    let mut new = s.clone();
    let f = new.metadata.finalizers.get_or_insert_with(Vec::new);
    f.retain(|x| !remove.contains(&x.as_str()));
    for a in add {
        if !f.iter().any(|x| x == a) {
            f.push((*a).to_owned());
        }
    }
    (new != *s).then_some(new)
}

/// The common controller's step for a snapshot (`syncSnapshot`), in its order: release the
/// source claim's finalizer when no snapshot of it is being cut; a deleted snapshot marks and
/// deletes its content (Delete policy) and drops its finalizers, the bound one only once the
/// content is gone; then validation, the default class, the finalizers, and binding to the
/// content (made here for a claim) with the status following the content's.
pub fn sync_snapshot(v: &SnapshotView<'_>) -> SnapshotStep {
    let s = v.snapshot;
    let deleting = s.metadata.deletion_timestamp.is_some();
    let dynamic = s.spec.source.persistent_volume_claim_name.is_some();
    if dynamic
        && let Some(claim) = v.claim
        && has_finalizer(&claim.metadata, PVC_FINALIZER)
    {
        let this_one_cutting = !deleting && !is_ready(s);
        if !v.claim_used_by_others && !this_one_cutting {
            return SnapshotStep::ReleaseClaim;
        }
    }
    if deleting {
        return sync_deleted(v);
    }
    let src = &s.spec.source;
    if src.persistent_volume_claim_name.is_some() == src.volume_snapshot_content_name.is_some() {
        return error(
            "SnapshotValidationError",
            "Exactly one of PersistentVolumeClaimName and VolumeSnapshotContentName should be specified",
            true,
        );
    }
    if dynamic && s.spec.volume_snapshot_class_name.is_none() {
        return match default_class(v) {
            Ok(c) => SnapshotStep::SetClass(c),
            Err(e) => error(
                "SetDefaultSnapshotClassFailed",
                format!("Failed to set default snapshot class with error {e}"),
                false,
            ),
        };
    }
    // The content must be of the right kind and point back (a pre-provisioned one may not know
    // the snapshot's UID yet).
    let name = content_name_for(s);
    if let Some(c) = v.content {
        let r = &c.spec.volume_snapshot_ref;
        if dynamic {
            if c.spec.source.volume_handle.is_none() {
                return error(
                    "SnapshotContentMismatch",
                    format!(
                        "VolumeSnapshotContent {name} is pre-provisioned while expecting a dynamically provisioned one"
                    ),
                    true,
                );
            }
            if !points_back(c, s) {
                return error(
                    "SnapshotContentMisbound",
                    format!("VolumeSnapshotContent [{name}] is bound to a different snapshot"),
                    true,
                );
            }
        } else if !dynamic {
            if c.spec.source.snapshot_handle.is_none() {
                return error(
                    "SnapshotContentMismatch",
                    "VolumeSnapshotContent is dynamically provisioned while expecting a pre-provisioned one",
                    true,
                );
            }
            let uid_ok = r.uid.as_deref().unwrap_or("").is_empty() || r.uid == s.metadata.uid;
            if r.name != s.metadata.name || r.namespace != s.metadata.namespace || !uid_ok {
                return error(
                    "SnapshotContentMisbound",
                    format!("VolumeSnapshotContent [{name}] is bound to a different snapshot"),
                    true,
                );
            }
        }
    }
    let add_source = !has_finalizer(&s.metadata, AS_SOURCE_FINALIZER);
    let add_bound = v.content.is_some_and(|c| c.spec.deletion_policy == "Delete")
        && bound_name(s).is_some()
        && !has_finalizer(&s.metadata, BOUND_FINALIZER);
    let mut add = Vec::new();
    if add_source {
        add.push(AS_SOURCE_FINALIZER);
    }
    if add_bound {
        add.push(BOUND_FINALIZER);
    }
    if let Some(new) = with_finalizers(s, &add, &[]) {
        return SnapshotStep::Finalizers(new);
    }
    if is_ready(s) && bound_name(s).is_some() {
        return match v.content {
            None => error("SnapshotContentMissing", "VolumeSnapshotContent is missing", true),
            Some(c) if !points_back(c, s) => error(
                "SnapshotMisbound",
                "VolumeSnapshotContent is not bound to the VolumeSnapshot correctly",
                true,
            ),
            Some(_) => SnapshotStep::Nothing,
        };
    }
    if !dynamic {
        return sync_preprovisioned(v);
    }
    let key = snapshot_key(s);
    if let Some(c) = v.content {
        if c.spec.source.snapshot_handle.is_some() {
            return error(
                "SnapshotHandleSet",
                format!("Snapshot handle should not be set in content {key} for dynamic provisioning"),
                true,
            );
        }
        return status_from_content(s, c)
            .map_or(SnapshotStep::Nothing, |(new, notes)| SnapshotStep::Status(new, notes));
    }
    create_content(v)
}

fn sync_preprovisioned(v: &SnapshotView<'_>) -> SnapshotStep {
    let s = v.snapshot;
    let Some(c) = v.content else {
        return error("SnapshotContentMissing", "VolumeSnapshotContent is missing", true);
    };
    let r = &c.spec.volume_snapshot_ref;
    let sname = s.metadata.name.as_deref().unwrap_or("");
    let cname = c.metadata.name.as_deref().unwrap_or("");
    if r.name != s.metadata.name || (!r.uid.as_deref().unwrap_or("").is_empty() && r.uid != s.metadata.uid) {
        return error(
            "SnapshotBindFailed",
            format!(
                "Snapshot failed to bind VolumeSnapshotContent, Could not bind snapshot {sname} and content {cname}, the VolumeSnapshotRef does not match"
            ),
            true,
        );
    }
    if r.uid.as_deref().unwrap_or("").is_empty() || c.spec.volume_snapshot_class_name.is_none() {
        let mut new = c.clone();
        new.spec.volume_snapshot_ref.uid = s.metadata.uid.clone();
        if let Some(class) = &s.spec.volume_snapshot_class_name {
            new.spec.volume_snapshot_class_name = Some(class.clone());
        }
        if new != *c {
            return SnapshotStep::UpdateContent(new);
        }
    }
    status_from_content(s, c).map_or(SnapshotStep::Nothing, |(new, notes)| SnapshotStep::Status(new, notes))
}

fn create_content(v: &SnapshotView<'_>) -> SnapshotStep {
    let s = v.snapshot;
    let sname = s.metadata.name.as_deref().unwrap_or("");
    let failed = |e: String| {
        error(
            "SnapshotContentCreationFailed",
            format!("Failed to create snapshot content with error {e}"),
            true,
        )
    };
    let update_failed =
        |who: &str, e: &str| failed(format!("snapshot controller failed to update {who} on API server: {e}"));
    match v.claim {
        None => return update_failed(sname, "cannot get claim from snapshot"),
        Some(claim) if !has_finalizer(&claim.metadata, PVC_FINALIZER) => {
            if claim.metadata.deletion_timestamp.is_some() {
                let cname = claim.metadata.name.as_deref().unwrap_or("");
                return update_failed(cname, "cannot add finalizer on claim because it is being deleted");
            }
            return SnapshotStep::ProtectClaim;
        }
        Some(_) => {}
    }
    let input = |e: String| {
        failed(format!(
            "failed to get input parameters to create snapshot {sname}: {e:?}"
        ))
    };
    let Some(class_name) = s.spec.volume_snapshot_class_name.as_deref() else {
        return input(format!("failed to take snapshot {sname} without a snapshot class"));
    };
    let Some(class) = v
        .classes
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(class_name))
    else {
        return input(format!(
            "volumesnapshotclass.snapshot.storage.k8s.io {class_name:?} not found"
        ));
    };
    let pv = match source_volume(v) {
        Ok(pv) => pv,
        Err(e) => return input(e),
    };
    let params = class.parameters.clone().unwrap_or_default();
    let secret = match secret_ref(&params, SecretFor::Snapshotter, &content_name(s), Some(s)) {
        Ok(r) => r,
        Err(e) => return input(e),
    };
    match new_content(s, class, pv, secret) {
        Some(c) => SnapshotStep::CreateContent(c),
        None => failed(format!(
            "cannot find CSI PersistentVolumeSource for volume {}",
            pv.metadata.name.as_deref().unwrap_or("")
        )),
    }
}

fn sync_deleted(v: &SnapshotView<'_>) -> SnapshotStep {
    let s = v.snapshot;
    if !deletion_candidate(s) {
        return SnapshotStep::Nothing;
    }
    let content = v.content.filter(|c| points_back(c, s));
    if content.is_some() && v.restoring {
        return SnapshotStep::Wait(Note::warning(
            "SnapshotDeletePending",
            "Snapshot is being used to restore a PVC",
        ));
    }
    if let Some(c) = content
        && !has_annotation(&c.metadata, BEING_DELETED)
    {
        let mut new = c.clone();
        new.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(BEING_DELETED.to_owned(), "yes".to_owned());
        return SnapshotStep::UpdateContent(new);
    }
    let delete_content = content.filter(|c| c.spec.deletion_policy == "Delete");
    if let Some(c) = delete_content
        && c.metadata.deletion_timestamp.is_none()
    {
        return SnapshotStep::DeleteContent(c.metadata.name.clone().unwrap_or_default());
    }
    let mut remove = vec![AS_SOURCE_FINALIZER];
    if delete_content.is_none() {
        remove.push(BOUND_FINALIZER);
    }
    with_finalizers(s, &[], &remove).map_or(SnapshotStep::Nothing, SnapshotStep::Finalizers)
}

// ---- the content: the common controller's part, then csi-snapshotter's ----

/// The next step for a content.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentStep {
    Nothing,
    /// A content with no or both sources: a Warning event, retried.
    Invalid(Note),
    /// Write the content (finalizer added or removed, annotation set or removed).
    Update(Box<VolumeSnapshotContent>),
    /// DeleteSnapshot of `handle`, then clear the status.
    DeleteSnapshot {
        handle: String,
    },
    /// Mark it being created, CreateSnapshot, record the status.
    CreateSnapshot,
    /// ListSnapshots of the pre-provisioned handle, record the status.
    CheckSnapshot {
        handle: String,
    },
}

/// The common controller's step for a content (`syncContent`): validation, its finalizer once
/// it is bound, and the being-deleted annotation when its snapshot is being deleted. `snapshot`
/// is the snapshot its reference names, if it exists with that UID.
pub fn sync_content_common(c: &VolumeSnapshotContent, snapshot: Option<&VolumeSnapshot>) -> ContentStep {
    let src = &c.spec.source;
    if src.volume_handle.is_some() == src.snapshot_handle.is_some() {
        return ContentStep::Invalid(Note::warning(
            "ContentValidationError",
            "Exactly one of VolumeHandle and SnapshotHandle should be specified",
        ));
    }
    if c.spec.volume_snapshot_ref.uid.as_deref().unwrap_or("").is_empty() {
        return ContentStep::Nothing;
    }
    if c.metadata.deletion_timestamp.is_none() && !has_finalizer(&c.metadata, CONTENT_FINALIZER) {
        let mut new = c.clone();
        new.metadata
            .finalizers
            .get_or_insert_with(Vec::new)
            .push(CONTENT_FINALIZER.to_owned());
        return ContentStep::Update(Box::new(new));
    }
    if let Some(s) = snapshot.filter(|s| s.metadata.uid == c.spec.volume_snapshot_ref.uid)
        && deletion_candidate(s)
        && !has_annotation(&c.metadata, BEING_DELETED)
    {
        let mut new = c.clone();
        new.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(BEING_DELETED.to_owned(), "yes".to_owned());
        return ContentStep::Update(Box::new(new));
    }
    ContentStep::Nothing
}

/// csi-snapshotter's step for a content of its driver (`syncContent`): a deleted content whose
/// snapshot is being deleted (or an unbound pre-provisioned one) has its snapshot deleted in
/// the driver (Delete policy) and then loses its finalizer, unless a CreateSnapshot may still be
/// running; a dynamic content without status is cut; a ready one only loses the being-created
/// annotation; others are asked about again.
pub fn sync_content_sidecar(c: &VolumeSnapshotContent) -> ContentStep {
    let meta = &c.metadata;
    let unbound_preprovisioned =
        c.spec.source.snapshot_handle.is_some() && c.spec.volume_snapshot_ref.uid.as_deref().unwrap_or("").is_empty();
    let should_delete = meta.deletion_timestamp.is_some()
        && (unbound_preprovisioned || !has_annotation(meta, BEING_CREATED) && has_annotation(meta, BEING_DELETED));
    if should_delete {
        let handle = c.status.as_ref().and_then(|s| s.snapshot_handle.clone());
        if c.spec.deletion_policy == "Delete"
            && let Some(handle) = handle
        {
            return ContentStep::DeleteSnapshot { handle };
        }
        if has_finalizer(meta, CONTENT_FINALIZER) {
            let mut new = c.clone();
            if let Some(f) = new.metadata.finalizers.as_mut() {
                f.retain(|x| x != CONTENT_FINALIZER);
            }
            return ContentStep::Update(Box::new(new));
        }
        return ContentStep::Nothing;
    }
    if meta.deletion_timestamp.is_some() {
        return ContentStep::Nothing;
    }
    if c.spec.source.volume_handle.is_some() && c.status.is_none() {
        return ContentStep::CreateSnapshot;
    }
    if content_ready(c) {
        if has_annotation(meta, BEING_CREATED) {
            return ContentStep::Update(Box::new(without_being_created(c)));
        }
        return ContentStep::Nothing;
    }
    if let Some(h) = &c.spec.source.snapshot_handle {
        return ContentStep::CheckSnapshot { handle: h.clone() };
    }
    ContentStep::CreateSnapshot
}

/// The content without the being-created annotation.
pub fn without_being_created(c: &VolumeSnapshotContent) -> VolumeSnapshotContent {
    let mut new = c.clone();
    if let Some(a) = new.metadata.annotations.as_mut() {
        a.remove(BEING_CREATED);
    }
    new
}

/// The content marked being created (set before CreateSnapshot, so a deletion waits for the
/// driver's answer instead of leaking a snapshot); `None` when it is.
pub fn with_being_created(c: &VolumeSnapshotContent) -> Option<VolumeSnapshotContent> {
    if has_annotation(&c.metadata, BEING_CREATED) {
        return None;
    }
    let mut new = c.clone();
    new.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(BEING_CREATED.to_owned(), "yes".to_owned());
    Some(new)
}

/// What the driver said about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutSnapshot {
    pub handle: String,
    pub ready: bool,
    /// Nanoseconds since the epoch (0: unknown, then now).
    pub created: i64,
    pub size: i64,
}

/// The content's status after the driver answered (`updateSnapshotContentStatus`); `None` when
/// unchanged.
pub fn content_status(c: &VolumeSnapshotContent, cut: &CutSnapshot) -> Option<VolumeSnapshotContentStatus> {
    let mut st = c.status.clone().unwrap_or_default();
    let old = st.clone();
    if st.snapshot_handle.is_none() {
        st.snapshot_handle = Some(cut.handle.clone());
    }
    if st.ready_to_use != Some(cut.ready) {
        st.ready_to_use = Some(cut.ready);
        if cut.ready {
            st.error = None;
        }
    }
    if st.creation_time.is_none() {
        st.creation_time = Some(cut.created);
    }
    if st.restore_size.is_none() && cut.size > 0 {
        st.restore_size = Some(cut.size);
    }
    (c.status.is_none() || st != old).then_some(st)
}

/// The content's status with an error (`updateContentErrorStatusWithEvent`): readyToUse false;
/// `None` when that error is recorded already.
pub fn content_error(
    c: &VolumeSnapshotContent,
    message: &str,
    now: jiff::Timestamp,
) -> Option<VolumeSnapshotContentStatus> {
    let same = c
        .status
        .as_ref()
        .and_then(|s| s.error.as_ref())
        .and_then(|e| e.message.as_deref())
        == Some(message);
    if same {
        return None;
    }
    let mut st = c.status.clone().unwrap_or_default();
    st.ready_to_use = Some(false);
    st.error = Some(VolumeSnapshotError {
        message: Some(message.to_owned()),
        time: Some(Time(now)),
    });
    Some(st)
}

/// The content's status once its snapshot is deleted in the driver (`clearVolumeContentStatus`).
pub fn cleared_status(c: &VolumeSnapshotContent) -> Option<VolumeSnapshotContentStatus> {
    let mut st = c.status.clone()?;
    st.snapshot_handle = None;
    st.ready_to_use = None;
    st.creation_time = None;
    st.restore_size = None;
    Some(st)
}

// ---- the runner ----

/// The runner: its own informers for the snapshot kinds, one queue with `vs/<ns>/<name>` and
/// `vsc/<name>` keys.
#[derive(Debug)]
pub struct Snapshotter {
    api: Arc<dyn Api>,
    inf: Arc<Informers>,
    snapshots: Arc<Informer<VolumeSnapshot>>,
    contents: Arc<Informer<VolumeSnapshotContent>>,
    classes: Arc<Informer<VolumeSnapshotClass>>,
    drivers: Arc<Drivers>,
    events: Recorder,
    sidecar_events: Recorder,
    queue: Arc<Queue>,
    /// claim key -> snapshots of it.
    by_claim: Mutex<HashMap<String, HashSet<String>>>,
}

fn vs_involved(s: &VolumeSnapshot) -> Involved {
    Involved::of(API_VERSION, "VolumeSnapshot", &s.metadata)
}

fn vsc_involved(c: &VolumeSnapshotContent) -> Involved {
    Involved::of(API_VERSION, "VolumeSnapshotContent", &c.metadata)
}

impl Snapshotter {
    /// Builds the runner and hooks it to the shared informers (before they run); its own
    /// informers start in [`Snapshotter::run`].
    pub fn new(api: Arc<dyn Api>, inf: Arc<Informers>, drivers: Arc<Drivers>, events: &Recorder) -> Arc<Self> {
        let sn = Arc::new(Snapshotter {
            api,
            inf: inf.clone(),
            snapshots: Informer::new(kinds::snapshots()),
            contents: Informer::new(kinds::snapshot_contents()),
            classes: Informer::new(kinds::snapshot_classes()),
            drivers,
            events: events.for_component("snapshot-controller"),
            sidecar_events: events.for_component("csi-snapshotter"),
            queue: Queue::new("snapshots"),
            by_claim: Mutex::new(HashMap::new()),
        });
        let c = sn.clone();
        sn.snapshots.on_change(move |change| {
            let (s, gone) = match change {
                Change::Upsert { new, .. } => (new, false),
                Change::Delete(old) => (old, true),
            };
            let key = snapshot_key(s);
            if let Some(claim) = &s.spec.source.persistent_volume_claim_name {
                let ck = format!("{}/{claim}", s.metadata.namespace.as_deref().unwrap_or(""));
                {
                    let mut m = c.by_claim();
                    let set = m.entry(ck.clone()).or_default();
                    if gone {
                        set.remove(&key);
                    } else {
                        set.insert(key.clone());
                    }
                    if set.is_empty() {
                        m.remove(&ck);
                    }
                }
                // The claim's finalizer may go now: its other snapshots look again.
                c.queue_snapshots_of(&ck);
            }
            if !gone {
                c.queue.add(format!("vs/{key}"));
            }
            c.queue.add(format!("vsc/{}", content_name_for(s)));
        });
        let c = sn.clone();
        sn.contents.on_change(move |change| {
            let ct = match change {
                Change::Upsert { new, .. } => new,
                Change::Delete(old) => old,
            };
            let r = &ct.spec.volume_snapshot_ref;
            if let (Some(ns), Some(n)) = (&r.namespace, &r.name) {
                c.queue.add(format!("vs/{ns}/{n}"));
            }
            if let Change::Upsert { new, .. } = change {
                c.queue
                    .add(format!("vsc/{}", new.metadata.name.as_deref().unwrap_or("")));
            }
        });
        let c = sn.clone();
        sn.classes.on_change(move |_| {
            for s in c.snapshots.list() {
                if !is_ready(&s) {
                    c.queue.add(format!("vs/{}", snapshot_key(&s)));
                }
            }
        });
        let c = sn.clone();
        inf.pvcs.on_change(move |change| {
            let claim = match change {
                Change::Upsert { new, .. } => new,
                Change::Delete(old) => old,
            };
            let ns = claim.metadata.namespace.as_deref().unwrap_or("");
            c.queue_snapshots_of(&format!("{ns}/{}", claim.metadata.name.as_deref().unwrap_or("")));
            // A claim restored from a snapshot that left Pending may release its deletion.
            if let Some(ds) = claim.spec.as_ref().and_then(|s| s.data_source.as_ref())
                && ds.kind == "VolumeSnapshot"
            {
                c.queue.add(format!("vs/{ns}/{}", ds.name));
            }
        });
        sn
    }

    fn by_claim(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.by_claim.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn queue_snapshots_of(&self, claim_key: &str) {
        let keys: Vec<String> = self
            .by_claim()
            .get(claim_key)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for k in keys {
            self.queue.add(format!("vs/{k}"));
        }
    }

    /// Starts the snapshot informers and runs `workers` workers until `stop`.
    pub async fn run(self: Arc<Self>, workers: usize, stop: watch::Receiver<bool>) {
        tokio::spawn(self.snapshots.clone().run(self.api.clone(), stop.clone()));
        tokio::spawn(self.contents.clone().run(self.api.clone(), stop.clone()));
        tokio::spawn(self.classes.clone().run(self.api.clone(), stop.clone()));
        self.inf.wait_synced().await;
        self.snapshots.wait_synced().await;
        self.contents.wait_synced().await;
        self.classes.wait_synced().await;
        let c = self.clone();
        let mut registered = self.drivers.subscribe();
        let mut stop2 = stop.clone();
        let on_register = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = registered.changed() => if r.is_err() { return },
                    _ = stop2.wait_for(|s| *s) => return,
                }
                for k in c.contents.keys() {
                    c.queue.add(format!("vsc/{k}"));
                }
            }
        });
        let c = self.clone();
        self.queue
            .clone()
            .run(
                workers,
                move |key| {
                    let c = c.clone();
                    async move {
                        if let Some(k) = key.strip_prefix("vs/") {
                            c.sync_snapshot(k).await
                        } else if let Some(k) = key.strip_prefix("vsc/") {
                            c.sync_content(k).await
                        } else {
                            Outcome::Done
                        }
                    }
                },
                stop,
            )
            .await;
        on_register.abort();
    }

    async fn write<T: Typed>(&self, res: &'static berth_api::Resource, obj: &T, part: Part) -> Result<T, Outcome> {
        let value = obj.to_value().map_err(|_| Outcome::Retry)?;
        match self.api.update(res, value, part).await {
            Ok(stored) if sidecar::deleted_by_write(&stored) => Err(Outcome::Done),
            Ok(stored) => {
                if std::ptr::eq(res, kinds::snapshots()) {
                    self.snapshots.assume(stored.clone());
                } else if std::ptr::eq(res, kinds::snapshot_contents()) {
                    self.contents.assume(stored.clone());
                } else if std::ptr::eq(res, kinds::pvcs()) {
                    self.inf.pvcs.assume(stored.clone());
                }
                T::from_value(stored).map_err(|_| Outcome::Retry)
            }
            Err(e) => Err(retry_after(&e)),
        }
    }

    async fn sync_snapshot(&self, key: &str) -> Outcome {
        let Some(s) = self.snapshots.get(key) else {
            return Outcome::Done;
        };
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let content = self.contents.get(&content_name_for(&s));
        let claim = s
            .spec
            .source
            .persistent_volume_claim_name
            .as_ref()
            .and_then(|c| self.inf.pvcs.get(&format!("{ns}/{c}")));
        let volume = claim
            .as_ref()
            .and_then(|c| c.spec.as_ref()?.volume_name.clone())
            .and_then(|v| self.inf.pvs.get(&v));
        let classes = self.classes.list();
        let class_refs: Vec<&VolumeSnapshotClass> = classes.iter().map(|c| &**c).collect();
        let name = s.metadata.name.as_deref().unwrap_or("");
        let restoring = s.metadata.deletion_timestamp.is_some()
            && self.inf.pvcs.list().iter().any(|c| {
                c.metadata.namespace.as_deref() == Some(ns.as_str())
                    && c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
                    && c.spec.as_ref().and_then(|s| s.data_source.as_ref()).is_some_and(|d| {
                        d.kind == "VolumeSnapshot"
                            && d.name == name
                            && d.api_group.as_deref() == Some(berth_api::snapshot::GROUP)
                    })
            });
        let claim_used_by_others = claim.as_ref().is_some_and(|c| {
            let ck = format!("{ns}/{}", c.metadata.name.as_deref().unwrap_or(""));
            let others: Vec<String> = self
                .by_claim()
                .get(&ck)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            others
                .iter()
                .filter(|k| **k != key)
                .filter_map(|k| self.snapshots.get(k))
                .any(|o| !is_ready(&o))
        });
        let view = SnapshotView {
            snapshot: &s,
            content: content.as_deref(),
            claim: claim.as_deref(),
            volume: volume.as_deref(),
            classes: &class_refs,
            restoring,
            claim_used_by_others,
        };
        let step = sync_snapshot(&view);
        let now = jiff::Timestamp::now();
        match step {
            SnapshotStep::Nothing => Outcome::Done,
            SnapshotStep::ReleaseClaim | SnapshotStep::ProtectClaim => {
                let Some(claim) = claim else { return Outcome::Retry };
                let mut new = (*claim).clone();
                let f = new.metadata.finalizers.get_or_insert_with(Vec::new);
                if matches!(step, SnapshotStep::ReleaseClaim) {
                    f.retain(|x| x != PVC_FINALIZER);
                } else {
                    f.push(PVC_FINALIZER.to_owned());
                }
                self.write(kinds::pvcs(), &new, Part::Main)
                    .await
                    .err()
                    .unwrap_or(Outcome::Done)
            }
            SnapshotStep::Error {
                reason,
                message,
                unready,
            } => {
                tracing::warn!(snapshot = key, "{reason}: {message}");
                if let Some(new) = with_error(&s, &message, unready, now) {
                    self.events.record(vs_involved(&s), Note::warning(reason, message));
                    if let Err(o) = self.write(kinds::snapshots(), &new, Part::Status).await {
                        return o;
                    }
                }
                Outcome::Retry
            }
            SnapshotStep::SetClass(class) => {
                let mut new = (*s).clone();
                new.spec.volume_snapshot_class_name = Some(class);
                self.write(kinds::snapshots(), &new, Part::Main)
                    .await
                    .err()
                    .unwrap_or(Outcome::Done)
            }
            SnapshotStep::Finalizers(new) => self
                .write(kinds::snapshots(), &new, Part::Main)
                .await
                .err()
                .unwrap_or(Outcome::Done),
            SnapshotStep::CreateContent(c) => {
                let Ok(value) = c.to_value() else { return Outcome::Retry };
                match self.api.create(kinds::snapshot_contents(), value).await {
                    Ok(stored) => self.contents.assume(stored),
                    Err(ApiError::AlreadyExists(_)) => {}
                    Err(e) => {
                        let msg = format!("Error creating volume snapshot content object for snapshot {key}: {e}.");
                        self.events
                            .record(vs_involved(&s), Note::warning("CreateSnapshotContentFailed", msg));
                        return retry_after(&e);
                    }
                }
                self.events.record(
                    vs_involved(&s),
                    Note::normal(
                        "CreatingSnapshot",
                        format!("Waiting for a snapshot {key} to be created by the CSI driver."),
                    ),
                );
                self.queue.add(format!("vs/{key}"));
                Outcome::Done
            }
            SnapshotStep::UpdateContent(c) => self
                .write(kinds::snapshot_contents(), &c, Part::Main)
                .await
                .err()
                .unwrap_or(Outcome::Done),
            SnapshotStep::DeleteContent(name) => {
                match self.api.delete(kinds::snapshot_contents(), None, &name, None).await {
                    Ok(()) | Err(ApiError::NotFound(_)) => Outcome::Done,
                    Err(e) => {
                        self.events.record(
                            vs_involved(&s),
                            Note::warning(
                                "SnapshotContentObjectDeleteError",
                                "Failed to delete snapshot content API object",
                            ),
                        );
                        retry_after(&e)
                    }
                }
            }
            SnapshotStep::Status(new, notes) => match self.write(kinds::snapshots(), &new, Part::Status).await {
                Ok(_) => {
                    for n in notes {
                        self.events.record(vs_involved(&s), n);
                    }
                    Outcome::Done
                }
                Err(o) => o,
            },
            SnapshotStep::Wait(note) => {
                self.events.record(vs_involved(&s), note);
                Outcome::Retry
            }
        }
    }

    async fn sync_content(&self, name: &str) -> Outcome {
        let Some(c) = self.contents.get(name) else {
            return Outcome::Done;
        };
        let r = &c.spec.volume_snapshot_ref;
        let snapshot = match (&r.namespace, &r.name) {
            (Some(ns), Some(n)) => self.snapshots.get(&format!("{ns}/{n}")),
            _ => None,
        };
        match sync_content_common(&c, snapshot.as_deref()) {
            ContentStep::Nothing => {}
            ContentStep::Invalid(note) => {
                self.events.record(vsc_involved(&c), note);
                return Outcome::Retry;
            }
            ContentStep::Update(new) => {
                return self
                    .write(kinds::snapshot_contents(), &new, Part::Main)
                    .await
                    .err()
                    .unwrap_or(Outcome::Done);
            }
            other => {
                tracing::debug!(content = name, "unexpected common step {other:?}");
                return Outcome::Done;
            }
        }
        // csi-snapshotter: contents of a registered driver whose class (if any) is of that driver.
        let Some(driver) = self.drivers.get(&c.spec.driver) else {
            return Outcome::Done;
        };
        let class = c
            .spec
            .volume_snapshot_class_name
            .as_ref()
            .and_then(|n| self.classes.get(n));
        if class.as_ref().is_some_and(|cl| cl.driver != c.spec.driver) {
            return Outcome::Done;
        }
        let now = jiff::Timestamp::now();
        match sync_content_sidecar(&c) {
            ContentStep::Nothing | ContentStep::Invalid(_) => Outcome::Done,
            ContentStep::Update(new) => self
                .write(kinds::snapshot_contents(), &new, Part::Main)
                .await
                .err()
                .unwrap_or(Outcome::Done),
            ContentStep::DeleteSnapshot { handle } => {
                let secrets = match self.deletion_secrets(&c).await {
                    Ok(s) => s,
                    Err(msg) => {
                        self.sidecar_events.record(
                            vsc_involved(&c),
                            Note::warning("SnapshotDeleteError", "Failed to get snapshot credentials"),
                        );
                        tracing::warn!(content = name, "{msg}");
                        return Outcome::Retry;
                    }
                };
                let mut client = driver.client.controller.clone();
                let req = berth_csi::v1::DeleteSnapshotRequest {
                    snapshot_id: handle.clone(),
                    secrets,
                };
                if let Err(st) = client.delete_snapshot(req).await {
                    tracing::warn!(content = name, "DeleteSnapshot failed: {}", sidecar::rpc_error(&st));
                    self.sidecar_events.record(
                        vsc_involved(&c),
                        Note::warning("SnapshotDeleteError", "Failed to delete snapshot"),
                    );
                    return Outcome::Retry;
                }
                tracing::info!(content = name, snapshot = %handle, "snapshot deleted in the driver");
                let Some(st) = cleared_status(&c) else {
                    return Outcome::Done;
                };
                let mut new = (*c).clone();
                new.status = Some(st);
                match self.write(kinds::snapshot_contents(), &new, Part::Status).await {
                    Ok(_) => Outcome::Done,
                    Err(o) => {
                        self.sidecar_events.record(
                            vsc_involved(&c),
                            Note::warning("SnapshotDeleteError", "Failed to clear content status"),
                        );
                        o
                    }
                }
            }
            ContentStep::CreateSnapshot => self.create_snapshot(&c, class.as_deref(), &driver, now).await,
            ContentStep::CheckSnapshot { handle } => {
                self.check_snapshot(&c, class.as_deref(), &driver, &handle, now).await
            }
        }
    }

    async fn deletion_secrets(&self, c: &VolumeSnapshotContent) -> Result<HashMap<String, String>, String> {
        let ann = c.metadata.annotations.as_ref();
        let (Some(name), Some(ns)) = (
            ann.and_then(|a| a.get(DELETION_SECRET_NAME)),
            ann.and_then(|a| a.get(DELETION_SECRET_NAMESPACE)),
        ) else {
            return Ok(HashMap::new());
        };
        let cname = c.metadata.name.as_deref().unwrap_or("");
        if name.is_empty() || ns.is_empty() {
            return Err(format!(
                "cannot retrieve secrets for snapshot content {cname:?}, err: secret name or namespace not specified"
            ));
        }
        sidecar::load_secret(&*self.api, ns, name)
            .await
            .map_err(|_| format!("cannot get credentials for snapshot content {cname:?}"))
    }

    async fn record_content_error(
        &self,
        c: &VolumeSnapshotContent,
        reason: &'static str,
        message: String,
        now: jiff::Timestamp,
    ) -> Outcome {
        tracing::warn!(
            content = c.metadata.name.as_deref().unwrap_or(""),
            "{reason}: {message}"
        );
        if let Some(st) = content_error(c, &message, now) {
            self.sidecar_events
                .record(vsc_involved(c), Note::warning(reason, message));
            let mut new = c.clone();
            new.status = Some(st);
            let _ = self.write(kinds::snapshot_contents(), &new, Part::Status).await;
        }
        Outcome::Retry
    }

    async fn create_snapshot(
        &self,
        c: &VolumeSnapshotContent,
        class: Option<&VolumeSnapshotClass>,
        driver: &crate::drivers::Driver,
        now: jiff::Timestamp,
    ) -> Outcome {
        let name = c.metadata.name.clone().unwrap_or_default();
        let fail = |e: String| format!("Failed to create snapshot: {e}");
        let input = |e: String| {
            fail(format!(
                "failed to get input parameters to create snapshot for content {name}: {e:?}"
            ))
        };
        let Some(class) = class else {
            let msg = input(format!("failed to take snapshot {name} without a snapshot class"));
            return self.record_content_error(c, "SnapshotCreationFailed", msg, now).await;
        };
        let secrets = match self.deletion_secrets(c).await {
            Ok(s) => s,
            Err(e) => {
                return self
                    .record_content_error(c, "SnapshotCreationFailed", input(e), now)
                    .await;
            }
        };
        let c = match with_being_created(c) {
            Some(new) => match self.write(kinds::snapshot_contents(), &new, Part::Main).await {
                Ok(v) => v,
                Err(o) => return o,
            },
            None => c.clone(),
        };
        let parameters = match driver_parameters(class.parameters.as_ref().unwrap_or(&BTreeMap::new())) {
            Ok(p) => p,
            Err(e) => {
                return self
                    .record_content_error(&c, "SnapshotCreationFailed", fail(e), now)
                    .await;
            }
        };
        let uid = c.spec.volume_snapshot_ref.uid.clone().unwrap_or_default();
        let source = c.spec.source.volume_handle.clone().unwrap_or_default();
        if uid.is_empty() {
            let msg = fail(format!(
                "cannot create snapshot. Snapshot content {name} not bound to a snapshot"
            ));
            return self.record_content_error(&c, "SnapshotCreationFailed", msg, now).await;
        }
        let req = berth_csi::v1::CreateSnapshotRequest {
            source_volume_id: source.clone(),
            name: csi_snapshot_name(&uid),
            secrets,
            parameters,
        };
        let mut client = driver.client.controller.clone();
        match client.create_snapshot(req).await {
            Ok(resp) => {
                let Some(snap) = resp.into_inner().snapshot else {
                    let msg = fail(format!(
                        "failed to take snapshot of the volume {source}: \"CreateSnapshot answered without a snapshot\""
                    ));
                    return self.record_content_error(&c, "SnapshotCreationFailed", msg, now).await;
                };
                let created = snap
                    .creation_time
                    .map(|t| {
                        t.seconds
                            .saturating_mul(1_000_000_000)
                            .saturating_add(i64::from(t.nanos))
                    })
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| i64::try_from(now.as_nanosecond()).unwrap_or(0));
                let cut = CutSnapshot {
                    handle: snap.snapshot_id,
                    ready: snap.ready_to_use,
                    created,
                    size: snap.size_bytes,
                };
                tracing::info!(content = %name, snapshot = %cut.handle, ready = cut.ready, "snapshot cut");
                self.finish_status(&c, &cut, true).await
            }
            Err(st) => {
                if sidecar::is_final(st.code())
                    && let Err(o) = self
                        .write(kinds::snapshot_contents(), &without_being_created(&c), Part::Main)
                        .await
                {
                    return o;
                }
                let msg = fail(format!(
                    "failed to take snapshot of the volume {source}: {:?}",
                    sidecar::rpc_error(&st)
                ));
                let latest = self.contents.get(&name).map_or_else(|| c.clone(), |x| (*x).clone());
                self.record_content_error(&latest, "SnapshotCreationFailed", msg, now)
                    .await
            }
        }
    }

    async fn check_snapshot(
        &self,
        c: &VolumeSnapshotContent,
        class: Option<&VolumeSnapshotClass>,
        driver: &crate::drivers::Driver,
        handle: &str,
        now: jiff::Timestamp,
    ) -> Outcome {
        use berth_csi::v1::controller_service_capability::rpc::Type as Cap;
        let name = c.metadata.name.clone().unwrap_or_default();
        let fail = |e: String| format!("Failed to check and update snapshot content: {e}");
        let cut = if driver.controller(Cap::ListSnapshots) {
            let params = class.and_then(|cl| cl.parameters.clone()).unwrap_or_default();
            let secrets = match secret_ref(&params, SecretFor::List, &name, None) {
                Ok(None) => HashMap::new(),
                Ok(Some((ns, n))) => match sidecar::load_secret(&*self.api, &ns, &n).await {
                    Ok(s) => s,
                    Err(e) => {
                        let msg = fail(format!("failed to get credentials for snapshot content {name}: {e}"));
                        return self
                            .record_content_error(c, "SnapshotContentCheckandUpdateFailed", msg, now)
                            .await;
                    }
                },
                Err(e) => {
                    let msg = fail(format!(
                        "failed to get secret reference for snapshot content {name}: {e}"
                    ));
                    return self
                        .record_content_error(c, "SnapshotContentCheckandUpdateFailed", msg, now)
                        .await;
                }
            };
            let mut client = driver.client.controller.clone();
            let req = berth_csi::v1::ListSnapshotsRequest {
                snapshot_id: handle.to_owned(),
                secrets,
                ..Default::default()
            };
            match client.list_snapshots(req).await {
                Ok(r) => match r.into_inner().entries.into_iter().find_map(|e| e.snapshot) {
                    Some(s) => CutSnapshot {
                        handle: handle.to_owned(),
                        ready: s.ready_to_use,
                        created: s
                            .creation_time
                            .map(|t| {
                                t.seconds
                                    .saturating_mul(1_000_000_000)
                                    .saturating_add(i64::from(t.nanos))
                            })
                            .filter(|n| *n > 0)
                            .unwrap_or_else(|| i64::try_from(now.as_nanosecond()).unwrap_or(0)),
                        size: s.size_bytes,
                    },
                    None => {
                        let msg = fail(format!(
                            "failed to list snapshot for content {name}: \"can not find snapshot for snapshotID {handle}\""
                        ));
                        return self
                            .record_content_error(c, "SnapshotContentCheckandUpdateFailed", msg, now)
                            .await;
                    }
                },
                Err(st) => {
                    let msg = fail(format!(
                        "failed to list snapshot for content {name}: {:?}",
                        sidecar::rpc_error(&st)
                    ));
                    return self
                        .record_content_error(c, "SnapshotContentCheckandUpdateFailed", msg, now)
                        .await;
                }
            }
        } else {
            // Without ListSnapshots the handle is taken as valid and ready.
            CutSnapshot {
                handle: handle.to_owned(),
                ready: true,
                created: i64::try_from(now.as_nanosecond()).unwrap_or(0),
                size: 0,
            }
        };
        self.finish_status(c, &cut, false).await
    }

    /// Records what the driver said; removes the being-created annotation after a cut.
    async fn finish_status(&self, c: &VolumeSnapshotContent, cut: &CutSnapshot, created: bool) -> Outcome {
        let mut c = c.clone();
        if let Some(st) = content_status(&c, cut) {
            c.status = Some(st);
            c = match self.write(kinds::snapshot_contents(), &c, Part::Status).await {
                Ok(v) => v,
                Err(o) => return o,
            };
        }
        if created
            && has_annotation(&c.metadata, BEING_CREATED)
            && let Err(o) = self
                .write(kinds::snapshot_contents(), &without_being_created(&c), Part::Main)
                .await
        {
            return o;
        }
        if cut.ready {
            Outcome::Done
        } else {
            Outcome::After(READY_POLL)
        }
    }
}

#[cfg(test)]
#[path = "snapshotter_tests.rs"]
mod tests;

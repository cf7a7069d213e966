//! Dynamic provisioning through any CSI driver: what to ask the driver for, what to make of its
//! answer, and how to retry when it fails. The rules are kubernetes-csi external-provisioner's
//! (`pkg/controller/controller.go`, with sig-storage-lib-external-provisioner around it), so that
//! a StorageClass written for Kubernetes provisions the same volume here.
//!
//! Pure: every function reads the objects it is shown and returns a request, an object or an
//! error. Reading Secrets, listing nodes and calling the driver are the runner's. Given the same
//! inputs the functions give the same request (same name, the claim's UID), so a CreateVolume
//! repeated after a crash or a timeout is the idempotent retry the CSI spec asks for.
//!
//! - [`create_volume_request`] makes the CreateVolume request for a claim and its class;
//! - [`persistent_volume`] makes the PersistentVolume from the driver's answer;
//! - [`classify`] says how to retry a failed CreateVolume;
//! - [`resolve_secret_ref`] names the Secret a class asks for, per CSI call;
//! - [`check_clone_source`] and [`check_snapshot_source`] vet a claim's data source.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use berth_api::quantity::{Format, Quantity};
use berth_csi::v1::volume_capability::access_mode::Mode;
use berth_csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use berth_csi::v1::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use berth_csi::v1::{CapacityRange, CreateVolumeRequest, CreateVolumeResponse, VolumeCapability, VolumeContentSource};
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec,
    SecretReference,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as ApiQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::binder::claim_class;

mod secrets;
mod source;
mod topology;

pub use secrets::{ParamsProblem, SecretError, SecretKind, resolve_secret_ref};
pub use source::{DataSourceError, check_clone_source, check_snapshot_source};
pub use topology::{
    ClusterTopology, Segments, Term, TopologyError, accessibility_requirements, flatten, node_affinity, node_segment,
};

/// The reserved prefix of StorageClass parameters meant for the provisioner, not the driver.
pub const PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";
/// The filesystem a Filesystem-mode volume is formatted with.
pub const FSTYPE_KEY: &str = "csi.storage.k8s.io/fstype";
/// Extra metadata passed to the driver when [`ProvisionerConfig::extra_create_metadata`] is set.
pub const PVC_NAME_KEY: &str = "csi.storage.k8s.io/pvc/name";
pub const PVC_NAMESPACE_KEY: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PV_NAME_KEY: &str = "csi.storage.k8s.io/pv/name";
/// The volume attribute naming the provisioner instance that made a volume.
pub const PROVISIONER_IDENTITY_KEY: &str = "storage.kubernetes.io/csiProvisionerIdentity";
/// The PV annotation naming the provisioner that made it; deletion goes back to it.
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// The PV finalizer that holds a Delete-policy volume until the driver has deleted it.
pub const PV_FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";
/// PV annotations keeping the provisioner secret, for DeleteVolume after the claim is gone.
pub const DELETION_SECRET_NAME: &str = "volume.kubernetes.io/provisioner-deletion-secret-name";
pub const DELETION_SECRET_NAMESPACE: &str = "volume.kubernetes.io/provisioner-deletion-secret-namespace";
/// PV annotations keeping the controller-modify secret, for ControllerModifyVolume.
pub const MODIFY_SECRET_NAME: &str = "volume.kubernetes.io/controller-modify-secret-name";
pub const MODIFY_SECRET_NAMESPACE: &str = "volume.kubernetes.io/controller-modify-secret-namespace";

/// The `csi.storage.k8s.io/` parameters external-provisioner knows; any other key with that
/// prefix is refused rather than passed to the driver.
pub const KNOWN_PREFIXED_PARAMETERS: [&str; 17] = [
    FSTYPE_KEY,
    "csi.storage.k8s.io/provisioner-secret-name",
    "csi.storage.k8s.io/provisioner-secret-namespace",
    "csi.storage.k8s.io/controller-publish-secret-name",
    "csi.storage.k8s.io/controller-publish-secret-namespace",
    "csi.storage.k8s.io/node-stage-secret-name",
    "csi.storage.k8s.io/node-stage-secret-namespace",
    "csi.storage.k8s.io/node-publish-secret-name",
    "csi.storage.k8s.io/node-publish-secret-namespace",
    "csi.storage.k8s.io/controller-expand-secret-name",
    "csi.storage.k8s.io/controller-expand-secret-namespace",
    "csi.storage.k8s.io/secret-name",
    "csi.storage.k8s.io/secret-namespace",
    "csi.storage.k8s.io/node-expand-secret-name",
    "csi.storage.k8s.io/node-expand-secret-namespace",
    "csi.storage.k8s.io/controller-modify-secret-name",
    "csi.storage.k8s.io/controller-modify-secret-namespace",
];

/// How one provisioner instance is set up: its driver, what the driver advertises, and the
/// external-provisioner flags that change the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionerConfig {
    /// The CSI driver's name (GetPluginInfo), which StorageClasses name as their provisioner.
    pub driver: String,
    /// Whether the driver advertises the SINGLE_NODE_MULTI_WRITER controller capability, which
    /// changes how ReadWriteOnce and ReadWriteOncePod map to CSI.
    pub single_node_multi_writer: bool,
    /// `--extra-create-metadata`: pass the claim's name and namespace and the PV name as
    /// parameters.
    pub extra_create_metadata: bool,
    /// `--default-fstype`: the filesystem when the class names none ("" leaves it to the driver).
    pub default_fs_type: String,
    /// `--strict-topology`: with a selected node, ask for that node's segment only.
    pub strict_topology: bool,
    /// `--immediate-topology` (on by default): without a selected node, still pass every node's
    /// segment; off, pass no requirements unless the class limits the topology.
    pub immediate_topology: bool,
    /// `--controller-publish-readonly`: a ReadOnlyMany-only volume is published read-only.
    pub controller_publish_read_only: bool,
    /// This instance's identity, recorded in each volume's attributes ("" records none).
    pub identity: String,
}

impl ProvisionerConfig {
    /// The configuration external-provisioner has with no flags, for `driver`.
    pub fn new(driver: impl Into<String>) -> ProvisionerConfig {
        ProvisionerConfig {
            driver: driver.into(),
            single_node_multi_writer: false,
            extra_create_metadata: false,
            default_fs_type: String::new(),
            strict_topology: false,
            immediate_topology: true,
            controller_publish_read_only: false,
            identity: String::new(),
        }
    }
}

/// Where a new volume's data comes from, as the runner resolved the claim's data source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentSource {
    /// Restore from a snapshot: the VolumeSnapshotContent's `status.snapshotHandle`.
    Snapshot(String),
    /// Clone a volume: the source PV's `spec.csi.volumeHandle`.
    Volume(String),
}

/// Everything one provisioning decision reads.
#[derive(Clone, Copy)]
pub struct ProvisionInput<'a> {
    pub config: &'a ProvisionerConfig,
    pub claim: &'a PersistentVolumeClaim,
    pub class: &'a StorageClass,
    /// The node named by the claim's `volume.kubernetes.io/selected-node` (WaitForFirstConsumer).
    pub selected_node: Option<&'a Node>,
    /// The driver's topology in the cluster; `None` when the driver lacks the
    /// VOLUME_ACCESSIBILITY_CONSTRAINTS capability.
    pub topology: Option<ClusterTopology<'a>>,
    /// The data of the provisioner Secret [`resolve_secret_ref`] named (empty when none).
    pub provisioner_secrets: &'a BTreeMap<String, String>,
    /// The resolved data source, when the claim has one.
    pub content_source: Option<&'a ContentSource>,
}

impl fmt::Debug for ProvisionInput<'_> {
    /// Secrets are never printed: only how many keys there are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisionInput")
            .field("config", self.config)
            .field("claim", &self.claim.metadata.name)
            .field("class", &self.class.metadata.name)
            .field("selected_node", &self.selected_node.map(|n| &n.metadata.name))
            .field("topology", &self.topology)
            .field(
                "provisioner_secrets",
                &format_args!("<{} redacted>", self.provisioner_secrets.len()),
            )
            .field("content_source", &self.content_source)
            .finish()
    }
}

/// Why a volume cannot be provisioned (yet). The messages are external-provisioner's, so the
/// ProvisioningFailed events read as they do in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionError {
    /// The claim has no UID to name its volume after.
    #[error("corrupted PVC object, it is missing UID")]
    MissingUid,
    /// A dynamically provisioned volume cannot honour a label selector.
    #[error("claim Selector is not supported")]
    SelectorNotSupported,
    /// The class gives the filesystem twice.
    #[error("fstype specified in parameters with both \"fstype\" and \"{FSTYPE_KEY}\" keys")]
    FsTypeTwice,
    /// The claim requests no storage (validation refuses such claims).
    #[error("spec.resources[storage]: Required value")]
    NoRequest,
    /// The claim's storage request is not a quantity of bytes CSI can carry.
    #[error("spec.resources[storage]: Invalid value: {0:?}: must be a quantity of bytes below 2^63")]
    BadRequest(String),
    /// A mode, or a combination of modes, that CSI cannot express.
    #[error("{0}")]
    AccessModes(AccessModeError),
    /// A `csi.storage.k8s.io/` parameter this provisioner does not know.
    #[error(
        "failed to strip CSI Parameters of prefixed keys: found unknown parameter key \"{0}\" with reserved namespace {PARAMETER_PREFIX}"
    )]
    UnknownPrefixedParameter(String),
    /// A secret reference in the class is unusable.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// No accessibility requirements could be made.
    #[error("error generating accessibility requirements: {0}")]
    Topology(#[from] TopologyError),
    /// CreateVolume answered without a volume.
    #[error("CreateVolume response has no volume")]
    NoVolume,
    /// The driver made a smaller volume than requested: delete it and retry in the background.
    #[error("created volume capacity {created} less than requested capacity {requested}")]
    CapacityTooSmall { created: i64, requested: i64 },
    /// The claim has a data source but the driver did not say it used it: delete the volume
    /// and retry in the background.
    #[error("volume content source missing")]
    ContentSourceMissing,
    /// A data source that cannot be used; see [`check_clone_source`] and
    /// [`check_snapshot_source`].
    #[error(transparent)]
    DataSource(#[from] DataSourceError),
}

/// Access modes CSI cannot express; the messages are csi-lib-utils'.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessModeError {
    #[error("Kubernetes does not support use of ReadWriteOncePod with other access modes on the same PersistentVolume")]
    OncePodWithOthers,
    #[error("CSI does not support ReadOnlyMany and ReadWriteOnce on the same PersistentVolume")]
    OnceAndReadOnlyMany,
    #[error("unsupported AccessMode combination: [{}]", .0.join(" "))]
    Unsupported(Vec<String>),
}

/// The PV name for a claim: `pvc-<claim UID>` (external-provisioner's default prefix, UID not
/// truncated), so a retried provisioning names the same volume.
pub fn pv_name(claim: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", claim.metadata.uid.as_deref().unwrap_or(""))
}

/// The CSI access mode for a set of Kubernetes access modes (csi-lib-utils' `ToCSIAccessMode`).
/// ReadWriteMany wins over the others; ReadWriteOncePod must be alone; ReadWriteOnce and
/// ReadOnlyMany together are not expressible. Without SINGLE_NODE_MULTI_WRITER, ReadWriteOnce
/// and ReadWriteOncePod are both SINGLE_NODE_WRITER; with it they are SINGLE_NODE_MULTI_WRITER
/// and SINGLE_NODE_SINGLE_WRITER.
pub fn csi_access_mode(modes: &[String], single_node_multi_writer: bool) -> Result<Mode, AccessModeError> {
    let has = |m: &str| modes.iter().any(|x| x == m);
    let distinct = {
        let mut d: Vec<&String> = modes.iter().collect();
        d.sort();
        d.dedup();
        d.len()
    };
    if has("ReadWriteOncePod") {
        if distinct > 1 {
            return Err(AccessModeError::OncePodWithOthers);
        }
        return Ok(if single_node_multi_writer {
            Mode::SingleNodeSingleWriter
        } else {
            Mode::SingleNodeWriter
        });
    }
    if has("ReadWriteMany") {
        return Ok(Mode::MultiNodeMultiWriter);
    }
    match (has("ReadWriteOnce"), has("ReadOnlyMany")) {
        (true, true) => Err(AccessModeError::OnceAndReadOnlyMany),
        (false, true) => Ok(Mode::MultiNodeReaderOnly),
        (true, false) if single_node_multi_writer => Ok(Mode::SingleNodeMultiWriter),
        (true, false) => Ok(Mode::SingleNodeWriter),
        (false, false) => Err(AccessModeError::Unsupported(modes.to_vec())),
    }
}

fn claim_modes(claim: &PersistentVolumeClaim) -> &[String] {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_deref())
        .unwrap_or(&[])
}

fn claim_is_block(claim: &PersistentVolumeClaim) -> bool {
    claim.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block")
}

fn class_params(class: &StorageClass) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    class.parameters.as_ref().unwrap_or(&EMPTY)
}

/// The claim's storage request in bytes, rounded up as Kubernetes' `Value()` rounds.
fn request_bytes(claim: &PersistentVolumeClaim) -> Result<i64, ProvisionError> {
    let q = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .ok_or(ProvisionError::NoRequest)?;
    let bad = || ProvisionError::BadRequest(q.0.clone());
    let parsed = Quantity::parse(&q.0).map_err(|_| bad())?;
    i64::try_from(parsed.value_ceil()).map_err(|_| bad())
}

/// The filesystem for the volume: `csi.storage.k8s.io/fstype`, or the deprecated `fstype` key
/// (any case), else the provisioner's default. Giving both is an error.
fn fs_type(input: &ProvisionInput<'_>) -> Result<String, ProvisionError> {
    let mut found = Vec::new();
    for (k, v) in class_params(input.class) {
        if k.eq_ignore_ascii_case("fstype") || k == FSTYPE_KEY {
            found.push(v);
        }
    }
    match found.as_slice() {
        [] => Ok(input.config.default_fs_type.clone()),
        [v] if v.is_empty() => Ok(input.config.default_fs_type.clone()),
        [v] => Ok((*v).clone()),
        _ => Err(ProvisionError::FsTypeTwice),
    }
}

/// One capability per access mode of the claim, each mapped alone (so ReadWriteOnce and
/// ReadOnlyMany together give two capabilities, not an error): Block for a Block claim, else
/// Mount with the filesystem and the class's mount options.
fn volume_capabilities(input: &ProvisionInput<'_>, fs_type: &str) -> Result<Vec<VolumeCapability>, ProvisionError> {
    let block = claim_is_block(input.claim);
    let mount_flags = input.class.mount_options.clone().unwrap_or_default();
    claim_modes(input.claim)
        .iter()
        .map(|m| {
            let mode = csi_access_mode(std::slice::from_ref(m), input.config.single_node_multi_writer)
                .map_err(ProvisionError::AccessModes)?;
            let access_type = if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: fs_type.to_owned(),
                    mount_flags: mount_flags.clone(),
                    volume_mount_group: String::new(),
                })
            };
            Ok(VolumeCapability {
                access_mode: Some(AccessMode { mode: mode.into() }),
                access_type: Some(access_type),
            })
        })
        .collect()
}

/// The class parameters for the driver: every key outside `csi.storage.k8s.io/` (the deprecated
/// unprefixed secret keys included, as external-provisioner keeps them); a prefixed key it does
/// not know is an error.
fn driver_parameters(class: &StorageClass) -> Result<HashMap<String, String>, ProvisionError> {
    let mut out = HashMap::new();
    for (k, v) in class_params(class) {
        if k.starts_with(PARAMETER_PREFIX) {
            if !KNOWN_PREFIXED_PARAMETERS.contains(&k.as_str()) {
                return Err(ProvisionError::UnknownPrefixedParameter(k.clone()));
            }
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    Ok(out)
}

/// What both the request and the PV need, checked in external-provisioner's order.
struct Prepared {
    name: String,
    fs_type: String,
    required_bytes: i64,
    capabilities: Vec<VolumeCapability>,
}

fn prepare(input: &ProvisionInput<'_>) -> Result<Prepared, ProvisionError> {
    if input.claim.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some() {
        return Err(ProvisionError::SelectorNotSupported);
    }
    if input.claim.metadata.uid.as_deref().unwrap_or("").is_empty() {
        return Err(ProvisionError::MissingUid);
    }
    let name = pv_name(input.claim);
    let fs_type = fs_type(input)?;
    let required_bytes = request_bytes(input.claim)?;
    let capabilities = volume_capabilities(input, &fs_type)?;
    Ok(Prepared {
        name,
        fs_type,
        required_bytes,
        capabilities,
    })
}

/// Every secret reference the class makes, resolved (the first unusable one is the error).
fn secret_refs(
    input: &ProvisionInput<'_>,
    pv_name: &str,
) -> Result<BTreeMap<SecretKind, SecretReference>, ProvisionError> {
    let mut out = BTreeMap::new();
    for kind in SecretKind::ALL {
        if let Some((namespace, name)) = resolve_secret_ref(class_params(input.class), kind, pv_name, input.claim)? {
            out.insert(
                kind,
                SecretReference {
                    name: Some(name),
                    namespace: Some(namespace),
                },
            );
        }
    }
    Ok(out)
}

/// The CreateVolume request for the claim (external-provisioner's `prepareProvision`):
/// - refused for a claim with a label selector;
/// - name: the PV name, `pvc-<claim UID>`, which makes retries idempotent;
/// - capacity: the exact request in bytes (rounded up), as required bytes, no limit;
/// - capabilities: one per access mode of the claim (see [`csi_access_mode`]), Block or Mount;
/// - parameters: the class's minus the `csi.storage.k8s.io/` ones, plus the claim and PV names
///   when extra metadata is on;
/// - secrets: the provisioner Secret's data; every secret reference of the class must resolve;
/// - content source: the resolved snapshot or volume;
/// - accessibility requirements: see [`accessibility_requirements`].
pub fn create_volume_request(input: &ProvisionInput<'_>) -> Result<CreateVolumeRequest, ProvisionError> {
    let prepared = prepare(input)?;
    let volume_content_source = input.content_source.map(|s| VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => SourceType::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => SourceType::Volume(VolumeSource { volume_id: id.clone() }),
        }),
    });
    let accessibility_requirements = accessibility_requirements(input)?;
    secret_refs(input, &prepared.name)?;
    let mut parameters = driver_parameters(input.class)?;
    if input.config.extra_create_metadata {
        let meta = &input.claim.metadata;
        parameters.insert(PVC_NAME_KEY.to_owned(), meta.name.clone().unwrap_or_default());
        parameters.insert(PVC_NAMESPACE_KEY.to_owned(), meta.namespace.clone().unwrap_or_default());
        parameters.insert(PV_NAME_KEY.to_owned(), prepared.name.clone());
    }
    Ok(CreateVolumeRequest {
        name: prepared.name,
        capacity_range: Some(CapacityRange {
            required_bytes: prepared.required_bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: prepared.capabilities,
        parameters,
        secrets: input
            .provisioner_secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        volume_content_source,
        accessibility_requirements,
        mutable_parameters: HashMap::new(),
    })
}

/// The PersistentVolume for a volume the driver created for `input` (external-provisioner's
/// `Provision` after CreateVolume, and the library's `provisionClaimOperation`):
/// - name `pvc-<claim UID>`; access modes and volumeMode from the claim; mount options from the
///   class; reclaim policy from the class (Delete when unset, as class defaulting sets it);
/// - capacity: the driver's, or the request when the driver says 0 (unknown); a volume smaller
///   than the request is an error, and the caller deletes it and retries in the background;
/// - a claim with a data source needs the driver to report a content source, likewise;
/// - `spec.csi`: the driver, the volume handle, the volume context as attributes (plus the
///   provisioner identity), the filesystem unless Block, read-only for a ReadOnlyMany-only claim
///   when configured, and the class's controller-publish, node-stage, node-publish,
///   controller-expand and node-expand secret references;
/// - node affinity from the volume's accessible topology, when the driver has topology;
/// - `claimRef` to the claim (kind, apiVersion, namespace, name, UID, resourceVersion) so the
///   binder binds it to this claim only; the claim's class;
/// - annotations: provisioned-by the class's provisioner, and the provisioner secret (empty
///   when none) and controller-modify secret for later calls that outlive the claim;
/// - the provisioner finalizer when the policy is Delete (external-provisioner adds it on
///   creation and removes it at the next sync for Retain and Recycle; this is that settled state).
pub fn persistent_volume(
    input: &ProvisionInput<'_>,
    response: &CreateVolumeResponse,
) -> Result<PersistentVolume, ProvisionError> {
    let prepared = prepare(input)?;
    let volume = response.volume.as_ref().ok_or(ProvisionError::NoVolume)?;
    let capacity = match volume.capacity_bytes {
        0 => prepared.required_bytes,
        c if c < prepared.required_bytes => {
            return Err(ProvisionError::CapacityTooSmall {
                created: c,
                requested: prepared.required_bytes,
            });
        }
        c => c,
    };
    if input.content_source.is_some() && volume.content_source.is_none() {
        return Err(ProvisionError::ContentSourceMissing);
    }
    let mut refs = secret_refs(input, &prepared.name)?;
    let claim = input.claim;
    let class = input.class;

    let mut attributes = BTreeMap::new();
    if !input.config.identity.is_empty() {
        attributes.insert(PROVISIONER_IDENTITY_KEY.to_owned(), input.config.identity.clone());
    }
    attributes.extend(volume.volume_context.iter().map(|(k, v)| (k.clone(), v.clone())));
    let read_only = input.config.controller_publish_read_only
        && matches!(prepared.capabilities.as_slice(),
            [only] if only.access_mode.as_ref().map(|m| m.mode) == Some(Mode::MultiNodeReaderOnly.into()));
    let block = claim_is_block(claim);

    let reclaim = class.reclaim_policy.clone().unwrap_or_else(|| "Delete".to_owned());
    let mut annotations = BTreeMap::from([(PROVISIONED_BY.to_owned(), class.provisioner.clone())]);
    let deletion = refs.get(&SecretKind::Provisioner).cloned().unwrap_or_default();
    annotations.insert(DELETION_SECRET_NAME.to_owned(), deletion.name.unwrap_or_default());
    annotations.insert(
        DELETION_SECRET_NAMESPACE.to_owned(),
        deletion.namespace.unwrap_or_default(),
    );
    if let Some(modify) = refs.get(&SecretKind::ControllerModify) {
        annotations.insert(MODIFY_SECRET_NAME.to_owned(), modify.name.clone().unwrap_or_default());
        annotations.insert(
            MODIFY_SECRET_NAMESPACE.to_owned(),
            modify.namespace.clone().unwrap_or_default(),
        );
    }
    let class_name = claim_class(claim);

    Ok(PersistentVolume {
        metadata: ObjectMeta {
            name: Some(prepared.name),
            annotations: Some(annotations),
            finalizers: (reclaim == "Delete").then(|| vec![PV_FINALIZER.to_owned()]),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(claim_modes(claim).to_vec()),
            mount_options: class.mount_options.clone(),
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                ApiQuantity(Quantity::from_units(capacity, Format::BinarySI).canonical()),
            )])),
            csi: Some(CSIPersistentVolumeSource {
                driver: input.config.driver.clone(),
                volume_handle: volume.volume_id.clone(),
                volume_attributes: Some(attributes),
                fs_type: (!block && !prepared.fs_type.is_empty()).then_some(prepared.fs_type),
                read_only: read_only.then_some(true),
                controller_publish_secret_ref: refs.remove(&SecretKind::ControllerPublish),
                node_stage_secret_ref: refs.remove(&SecretKind::NodeStage),
                node_publish_secret_ref: refs.remove(&SecretKind::NodePublish),
                controller_expand_secret_ref: refs.remove(&SecretKind::ControllerExpand),
                node_expand_secret_ref: refs.remove(&SecretKind::NodeExpand),
            }),
            persistent_volume_reclaim_policy: Some(reclaim),
            node_affinity: input.topology.and_then(|_| node_affinity(&volume.accessible_topology)),
            volume_mode: claim.spec.as_ref().and_then(|s| s.volume_mode.clone()),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("PersistentVolumeClaim".to_owned()),
                namespace: claim.metadata.namespace.clone(),
                name: claim.metadata.name.clone(),
                uid: claim.metadata.uid.clone(),
                resource_version: claim.metadata.resource_version.clone(),
                field_path: None,
            }),
            storage_class_name: (!class_name.is_empty()).then(|| class_name.to_owned()),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    })
}

/// What to do after CreateVolume failed, by its gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The driver could not place the volume where the scheduler chose: remove the claim's
    /// `volume.kubernetes.io/selected-node` so the scheduler picks again.
    Reschedule,
    /// CreateVolume may still be running in the driver: keep calling it with the same request
    /// (it is idempotent by name) until it answers for good, even if the claim changes.
    Background,
    /// Provisioning failed and is not in progress: report ProvisioningFailed and retry with the
    /// usual backoff.
    Final,
    /// The driver refused the request itself (InvalidArgument): report it and retry slowly, as a
    /// retry can only succeed once the claim or class is changed.
    Infeasible,
}

/// How to retry a failed CreateVolume (external-provisioner's `checkError`, and the library's
/// infeasible rule for InvalidArgument). `may_reschedule` is true when the claim has a selected
/// node and the driver has topology, the only case where another node could help: then
/// ResourceExhausted reschedules; otherwise it is final. Canceled, DeadlineExceeded, Unavailable
/// and Aborted leave the call possibly in progress. A failure with no gRPC status at all (the
/// call never reached the driver) is [`Retry::Background`] too; the caller decides that.
pub fn classify(code: tonic::Code, may_reschedule: bool) -> Retry {
    use tonic::Code;
    match code {
        Code::ResourceExhausted if may_reschedule => Retry::Reschedule,
        Code::Cancelled | Code::DeadlineExceeded | Code::Unavailable | Code::Aborted => Retry::Background,
        Code::InvalidArgument => Retry::Infeasible,
        _ => Retry::Final,
    }
}

/// Go's `%q` of a string list, `["a" "b"]`.
fn go_quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod fixtures {
    //! Objects for the provisioning tests: a 1Gi ReadWriteOnce claim `default/data` (UID `u-1`)
    //! of class `fast`, provisioned by `berth.csi.io`, with JSON overrides merged in.

    use super::*;
    use serde_json::{Value, json};

    pub const DRIVER: &str = "berth.csi.io";

    pub fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn merged<T: k8s_openapi::serde::Serialize + k8s_openapi::serde::de::DeserializeOwned>(
        base: &T,
        extra: Value,
    ) -> T {
        let mut v = serde_json::to_value(base).unwrap();
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    pub fn claim(extra: Value) -> PersistentVolumeClaim {
        let mut v = json!({
            "metadata": {"name": "data", "namespace": "default", "uid": "u-1", "resourceVersion": "7"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
                "storageClassName": "fast",
            },
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    pub fn class(extra: Value) -> StorageClass {
        let mut v = json!({
            "metadata": {"name": "fast"},
            "provisioner": DRIVER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    pub fn node(name: &str, labels: Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    pub fn segments(pairs: &[(&str, &str)]) -> Segments {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// Owns everything a [`ProvisionInput`] borrows.
    #[derive(Debug, Clone)]
    pub struct Fixture {
        pub config: ProvisionerConfig,
        pub claim: PersistentVolumeClaim,
        pub class: StorageClass,
        pub nodes: Vec<Node>,
        pub selected: Option<String>,
        /// `None`: the driver has no topology.
        pub keys: Option<Vec<String>>,
        pub secrets: BTreeMap<String, String>,
        pub source: Option<ContentSource>,
        pub segments: Vec<Segments>,
    }

    impl Default for Fixture {
        fn default() -> Fixture {
            Fixture {
                config: ProvisionerConfig::new(DRIVER),
                claim: claim(json!({})),
                class: class(json!({})),
                nodes: Vec::new(),
                selected: None,
                keys: None,
                secrets: BTreeMap::new(),
                source: None,
                segments: Vec::new(),
            }
        }
    }

    impl Fixture {
        pub fn claim(mut self, extra: Value) -> Fixture {
            self.claim = merged(&self.claim, extra);
            self
        }

        pub fn class(mut self, extra: Value) -> Fixture {
            self.class = merged(&self.class, extra);
            self
        }

        pub fn config(mut self, f: impl FnOnce(&mut ProvisionerConfig)) -> Fixture {
            f(&mut self.config);
            self
        }

        pub fn select(mut self, node: &str) -> Fixture {
            self.selected = Some(node.to_owned());
            self
        }

        /// Nodes with their labels; every node's labels are offered as its segment (the
        /// decision keeps only the driver's keys).
        pub fn with_nodes(mut self, nodes: Vec<(&str, Value)>) -> Fixture {
            self.nodes = nodes.into_iter().map(|(n, l)| node(n, l)).collect();
            self.segments = self
                .nodes
                .iter()
                .map(|n| n.metadata.labels.clone().unwrap_or_default())
                .collect();
            self
        }

        pub fn input(&self) -> ProvisionInput<'_> {
            ProvisionInput {
                config: &self.config,
                claim: &self.claim,
                class: &self.class,
                selected_node: self
                    .selected
                    .as_deref()
                    .and_then(|s| self.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(s))),
                topology: self.keys.as_deref().map(|keys| ClusterTopology {
                    keys,
                    segments: &self.segments,
                }),
                provisioner_secrets: &self.secrets,
                content_source: self.source.as_ref(),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use berth_csi::v1::{Topology, Volume};
    use rstest::rstest;
    use serde_json::json;

    fn modes(m: &[&str]) -> Vec<String> {
        m.iter().map(|s| (*s).to_owned()).collect()
    }

    #[rstest]
    #[case::rwo(&["ReadWriteOnce"], false, Ok(Mode::SingleNodeWriter))]
    #[case::rwo_multi_writer_driver(&["ReadWriteOnce"], true, Ok(Mode::SingleNodeMultiWriter))]
    #[case::rox(&["ReadOnlyMany"], false, Ok(Mode::MultiNodeReaderOnly))]
    #[case::rox_multi_writer_driver(&["ReadOnlyMany"], true, Ok(Mode::MultiNodeReaderOnly))]
    #[case::rwx(&["ReadWriteMany"], false, Ok(Mode::MultiNodeMultiWriter))]
    #[case::rwx_multi_writer_driver(&["ReadWriteMany"], true, Ok(Mode::MultiNodeMultiWriter))]
    #[case::rwop(&["ReadWriteOncePod"], true, Ok(Mode::SingleNodeSingleWriter))]
    #[case::rwop_without_multi_writer_is_single_node_writer(&["ReadWriteOncePod"], false, Ok(Mode::SingleNodeWriter))]
    #[case::rwx_wins(&["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"], false, Ok(Mode::MultiNodeMultiWriter))]
    #[case::repeated_rwop_is_alone(&["ReadWriteOncePod", "ReadWriteOncePod"], false, Ok(Mode::SingleNodeWriter))]
    #[case::rwo_and_rox(&["ReadWriteOnce", "ReadOnlyMany"], false, Err(AccessModeError::OnceAndReadOnlyMany))]
    #[case::rwop_and_rwx(&["ReadWriteOncePod", "ReadWriteMany"], true, Err(AccessModeError::OncePodWithOthers))]
    #[case::none(&[], false, Err(AccessModeError::Unsupported(vec![])))]
    #[case::unknown(&["ReadSometimes"], false, Err(AccessModeError::Unsupported(modes(&["ReadSometimes"]))))]
    fn access_mode_mapping(#[case] m: &[&str], #[case] snmw: bool, #[case] want: Result<Mode, AccessModeError>) {
        assert_eq!(csi_access_mode(&modes(m), snmw), want);
    }

    #[test]
    fn access_mode_messages_are_csi_lib_utils() {
        assert_eq!(
            AccessModeError::OnceAndReadOnlyMany.to_string(),
            "CSI does not support ReadOnlyMany and ReadWriteOnce on the same PersistentVolume"
        );
        assert_eq!(
            AccessModeError::Unsupported(modes(&["ReadWriteOnce", "X"])).to_string(),
            "unsupported AccessMode combination: [ReadWriteOnce X]"
        );
    }

    #[test]
    fn pv_name_is_the_claim_uid() {
        assert_eq!(pv_name(&claim(json!({"metadata": {"uid": "0a1b-2c"}}))), "pvc-0a1b-2c");
    }

    fn request(f: &Fixture) -> Result<CreateVolumeRequest, String> {
        create_volume_request(&f.input()).map_err(|e| e.to_string())
    }

    /// (fs_type, mount_flags) per capability, or "block", with the access mode.
    fn caps(req: &CreateVolumeRequest) -> Vec<(String, Mode)> {
        req.volume_capabilities
            .iter()
            .map(|c| {
                let mode = Mode::try_from(c.access_mode.as_ref().unwrap().mode).unwrap();
                let ty = match c.access_type.as_ref().unwrap() {
                    AccessType::Block(_) => "block".to_owned(),
                    AccessType::Mount(m) => format!("mount:{}:{}", m.fs_type, m.mount_flags.join(",")),
                };
                (ty, mode)
            })
            .collect()
    }

    #[test]
    fn the_plain_request() {
        let req = request(&Fixture::default()).unwrap();
        assert_eq!(
            req,
            CreateVolumeRequest {
                name: "pvc-u-1".to_owned(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 1 << 30,
                    limit_bytes: 0
                }),
                volume_capabilities: vec![VolumeCapability {
                    access_mode: Some(AccessMode {
                        mode: Mode::SingleNodeWriter.into()
                    }),
                    access_type: Some(AccessType::Mount(MountVolume::default())),
                }],
                ..CreateVolumeRequest::default()
            }
        );
    }

    type CapsWant = Vec<(&'static str, Mode)>;

    #[rstest]
    #[case::fstype_absent(Fixture::default(), vec![("mount::", Mode::SingleNodeWriter)])]
    #[case::fstype_and_mount_options(
        Fixture::default().class(json!({"parameters": {FSTYPE_KEY: "xfs"}, "mountOptions": ["noatime", "nodiscard"]})),
        vec![("mount:xfs:noatime,nodiscard", Mode::SingleNodeWriter)]
    )]
    #[case::deprecated_fstype_key(Fixture::default().class(json!({"parameters": {"fsType": "ext3"}})), vec![("mount:ext3:", Mode::SingleNodeWriter)])]
    #[case::default_fstype(Fixture::default().config(|c| c.default_fs_type = "ext4".to_owned()), vec![("mount:ext4:", Mode::SingleNodeWriter)])]
    #[case::class_beats_default_fstype(
        Fixture::default().config(|c| c.default_fs_type = "ext4".to_owned()).class(json!({"parameters": {FSTYPE_KEY: "xfs"}})),
        vec![("mount:xfs:", Mode::SingleNodeWriter)]
    )]
    #[case::block_ignores_fstype_and_mount_options(
        Fixture::default().claim(json!({"spec": {"volumeMode": "Block"}})).class(json!({"parameters": {FSTYPE_KEY: "xfs"}, "mountOptions": ["noatime"]})),
        vec![("block", Mode::SingleNodeWriter)]
    )]
    #[case::rwo_and_rox_give_two_capabilities(
        Fixture::default().claim(json!({"spec": {"accessModes": ["ReadWriteOnce", "ReadOnlyMany"]}})),
        vec![("mount::", Mode::SingleNodeWriter), ("mount::", Mode::MultiNodeReaderOnly)]
    )]
    #[case::multi_writer_driver(
        Fixture::default().config(|c| c.single_node_multi_writer = true).claim(json!({"spec": {"accessModes": ["ReadWriteOnce", "ReadWriteMany"]}})),
        vec![("mount::", Mode::SingleNodeMultiWriter), ("mount::", Mode::MultiNodeMultiWriter)]
    )]
    #[case::rwop(
        Fixture::default().config(|c| c.single_node_multi_writer = true).claim(json!({"spec": {"accessModes": ["ReadWriteOncePod"]}})),
        vec![("mount::", Mode::SingleNodeSingleWriter)]
    )]
    fn capabilities(#[case] f: Fixture, #[case] want: CapsWant) {
        let got = caps(&request(&f).unwrap());
        let want: Vec<(String, Mode)> = want.into_iter().map(|(t, m)| (t.to_owned(), m)).collect();
        assert_eq!(got, want);
    }

    #[rstest]
    #[case::gibibyte("1Gi", 1 << 30)]
    #[case::exact_decimal("1G", 1_000_000_000)]
    #[case::fraction_rounds_up("1.5Ki", 1536)]
    #[case::millibytes_round_up("1500m", 2)]
    fn required_bytes(#[case] size: &str, #[case] bytes: i64) {
        let f = Fixture::default().claim(json!({"spec": {"resources": {"requests": {"storage": size}}}}));
        assert_eq!(
            request(&f).unwrap().capacity_range,
            Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0
            })
        );
    }

    #[rstest]
    #[case::selector(
        Fixture::default().claim(json!({"spec": {"selector": {"matchLabels": {"a": "b"}}}})),
        "claim Selector is not supported"
    )]
    #[case::missing_uid(Fixture::default().claim(json!({"metadata": {"uid": null}})), "corrupted PVC object, it is missing UID")]
    #[case::missing_request(Fixture::default().claim(json!({"spec": {"resources": {"requests": null}}})), "spec.resources[storage]: Required value")]
    #[case::request_too_large(
        Fixture::default().claim(json!({"spec": {"resources": {"requests": {"storage": "9Ei"}}}})),
        "spec.resources[storage]: Invalid value: \"9Ei\": must be a quantity of bytes below 2^63"
    )]
    #[case::fstype_twice(
        Fixture::default().class(json!({"parameters": {FSTYPE_KEY: "xfs", "fstype": "ext4"}})),
        "fstype specified in parameters with both \"fstype\" and \"csi.storage.k8s.io/fstype\" keys"
    )]
    #[case::unknown_prefixed_parameter(
        Fixture::default().class(json!({"parameters": {"csi.storage.k8s.io/fs-type": "xfs"}})),
        "failed to strip CSI Parameters of prefixed keys: found unknown parameter key \"csi.storage.k8s.io/fs-type\" with reserved namespace csi.storage.k8s.io/"
    )]
    #[case::unknown_access_mode(
        Fixture::default().claim(json!({"spec": {"accessModes": ["ReadWriteOnce", "ReadSometimes"]}})),
        "unsupported AccessMode combination: [ReadSometimes]"
    )]
    #[case::broken_node_stage_secret(
        Fixture::default().class(json!({"parameters": {"csi.storage.k8s.io/node-stage-secret-name": "s"}})),
        "failed to get name and namespace template from params: either name and namespace for NodeStage secrets specified, Both must be specified"
    )]
    #[case::topology_before_secrets(
        Fixture { keys: Some(vec![]), ..Fixture::default() }.class(json!({"parameters": {"csi.storage.k8s.io/node-stage-secret-name": "s"}})),
        "error generating accessibility requirements: no available topology found"
    )]
    fn refused(#[case] f: Fixture, #[case] want: &str) {
        assert_eq!(request(&f).unwrap_err(), want);
    }

    #[test]
    fn parameters_lose_the_reserved_prefix() {
        let f = Fixture::default().class(json!({"parameters": {
            "pool": "fast",
            FSTYPE_KEY: "xfs",
            "csi.storage.k8s.io/provisioner-secret-name": "creds",
            "csi.storage.k8s.io/provisioner-secret-namespace": "kube-system",
            "csiNodePublishSecretName": "np",
            "csiNodePublishSecretNamespace": "kube-system",
        }}));
        let got: BTreeMap<_, _> = request(&f).unwrap().parameters.into_iter().collect();
        assert_eq!(
            got,
            BTreeMap::from([
                ("csiNodePublishSecretName".to_owned(), "np".to_owned()),
                ("csiNodePublishSecretNamespace".to_owned(), "kube-system".to_owned()),
                ("pool".to_owned(), "fast".to_owned()),
            ])
        );
    }

    #[test]
    fn extra_metadata_names_the_claim_and_volume() {
        let f = Fixture::default()
            .config(|c| c.extra_create_metadata = true)
            .class(json!({"parameters": {"pool": "fast"}}));
        let got: BTreeMap<_, _> = request(&f).unwrap().parameters.into_iter().collect();
        assert_eq!(
            got,
            BTreeMap::from([
                (PV_NAME_KEY.to_owned(), "pvc-u-1".to_owned()),
                (PVC_NAME_KEY.to_owned(), "data".to_owned()),
                (PVC_NAMESPACE_KEY.to_owned(), "default".to_owned()),
                ("pool".to_owned(), "fast".to_owned()),
            ])
        );
        // Off by default.
        let plain = request(&Fixture::default()).unwrap();
        assert!(plain.parameters.is_empty());
    }

    #[test]
    fn secrets_and_content_source_are_passed_through() {
        let mut f = Fixture {
            secrets: BTreeMap::from([("password".to_owned(), "hunter2".to_owned())]),
            source: Some(ContentSource::Snapshot("snap-1".to_owned())),
            ..Fixture::default()
        };
        let req = request(&f).unwrap();
        assert_eq!(req.secrets.get("password").map(String::as_str), Some("hunter2"));
        assert_eq!(
            req.volume_content_source,
            Some(VolumeContentSource {
                r#type: Some(SourceType::Snapshot(SnapshotSource {
                    snapshot_id: "snap-1".to_owned()
                }))
            })
        );
        f.source = Some(ContentSource::Volume("vol-9".to_owned()));
        assert_eq!(
            request(&f).unwrap().volume_content_source,
            Some(VolumeContentSource {
                r#type: Some(SourceType::Volume(VolumeSource {
                    volume_id: "vol-9".to_owned()
                }))
            })
        );
        // Neither the input's nor the request's Debug shows the secret.
        assert!(!format!("{:?}", f.input()).contains("hunter2"));
        assert!(!format!("{req:?}").contains("hunter2"));
    }

    #[test]
    fn topology_goes_into_the_request() {
        let f = Fixture {
            keys: Some(vec!["zone".to_owned()]),
            ..Fixture::default()
        }
        .with_nodes(vec![("n1", json!({"zone": "a"})), ("n2", json!({"zone": "b"}))])
        .select("n2");
        let req = request(&f).unwrap().accessibility_requirements.unwrap();
        let zone = |z: &str| Topology {
            segments: HashMap::from([("zone".to_owned(), z.to_owned())]),
        };
        assert_eq!(req.requisite, vec![zone("a"), zone("b")]);
        assert_eq!(req.preferred, vec![zone("b"), zone("a")]);
        // No topology capability: no requirements, whatever the nodes say.
        let f = Fixture { keys: None, ..f };
        assert_eq!(request(&f).unwrap().accessibility_requirements, None);
    }

    fn response(capacity: i64, extra: impl FnOnce(&mut Volume)) -> CreateVolumeResponse {
        let mut volume = Volume {
            capacity_bytes: capacity,
            volume_id: "vol-1".to_owned(),
            volume_context: HashMap::from([("pool".to_owned(), "fast".to_owned())]),
            ..Volume::default()
        };
        extra(&mut volume);
        CreateVolumeResponse { volume: Some(volume) }
    }

    fn pv_json(f: &Fixture, resp: &CreateVolumeResponse) -> serde_json::Value {
        serde_json::to_value(persistent_volume(&f.input(), resp).unwrap()).unwrap()
    }

    #[test]
    fn the_plain_volume() {
        let f = Fixture::default().class(json!({"mountOptions": ["noatime"], "parameters": {FSTYPE_KEY: "ext4"}}));
        assert_eq!(
            pv_json(&f, &response(2 << 30, |_| {})),
            json!({
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {
                    "name": "pvc-u-1",
                    "annotations": {
                        PROVISIONED_BY: DRIVER,
                        DELETION_SECRET_NAME: "",
                        DELETION_SECRET_NAMESPACE: "",
                    },
                    "finalizers": [PV_FINALIZER],
                },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "capacity": {"storage": "2Gi"},
                    "claimRef": {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "namespace": "default",
                        "name": "data",
                        "uid": "u-1",
                        "resourceVersion": "7",
                    },
                    "csi": {
                        "driver": DRIVER,
                        "volumeHandle": "vol-1",
                        "volumeAttributes": {"pool": "fast"},
                        "fsType": "ext4",
                    },
                    "mountOptions": ["noatime"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": "fast",
                },
            })
        );
    }

    #[rstest]
    #[case::driver_capacity(2 << 30, Ok("2Gi"))]
    #[case::exact_request(1 << 30, Ok("1Gi"))]
    #[case::zero_is_the_request(0, Ok("1Gi"))]
    #[case::odd_bytes(1_073_741_825, Ok("1073741825"))]
    #[case::below_request(512 << 20, Err("created volume capacity 536870912 less than requested capacity 1073741824"))]
    fn capacity(#[case] bytes: i64, #[case] want: Result<&str, &str>) {
        let f = Fixture::default();
        let got = persistent_volume(&f.input(), &response(bytes, |_| {}))
            .map(|pv| pv.spec.unwrap().capacity.unwrap()["storage"].0.clone())
            .map_err(|e| e.to_string());
        assert_eq!(got, want.map(str::to_owned).map_err(str::to_owned));
    }

    #[rstest]
    #[case::delete_keeps_the_finalizer(json!({}), "Delete", Some(vec![PV_FINALIZER]))]
    #[case::unset_is_delete(json!({"reclaimPolicy": null}), "Delete", Some(vec![PV_FINALIZER]))]
    #[case::retain_has_none(json!({"reclaimPolicy": "Retain"}), "Retain", None)]
    fn reclaim_policy(#[case] class: serde_json::Value, #[case] policy: &str, #[case] finalizers: Option<Vec<&str>>) {
        let f = Fixture::default().class(class);
        let pv = persistent_volume(&f.input(), &response(0, |_| {})).unwrap();
        assert_eq!(
            pv.spec.unwrap().persistent_volume_reclaim_policy.as_deref(),
            Some(policy)
        );
        assert_eq!(
            pv.metadata.finalizers,
            finalizers.map(|v| v.into_iter().map(str::to_owned).collect())
        );
    }

    #[test]
    fn block_volume_has_no_filesystem() {
        let f = Fixture::default()
            .claim(json!({"spec": {"volumeMode": "Block"}}))
            .class(json!({"parameters": {FSTYPE_KEY: "xfs"}}));
        let pv = pv_json(&f, &response(0, |_| {}));
        assert_eq!(pv["spec"]["volumeMode"], "Block");
        assert_eq!(pv["spec"]["csi"].get("fsType"), None);
    }

    #[test]
    fn secret_references_go_into_the_volume() {
        let f = Fixture::default().class(json!({"parameters": {
            "csi.storage.k8s.io/provisioner-secret-name": "${pvc.name}-prov",
            "csi.storage.k8s.io/provisioner-secret-namespace": "${pvc.namespace}",
            "csi.storage.k8s.io/secret-name": "shared",
            "csi.storage.k8s.io/secret-namespace": "kube-system",
            "csi.storage.k8s.io/node-stage-secret-name": "${pv.name}",
            "csi.storage.k8s.io/node-stage-secret-namespace": "stage",
            "csi.storage.k8s.io/controller-modify-secret-name": "mod",
            "csi.storage.k8s.io/controller-modify-secret-namespace": "kube-system",
        }}));
        let pv = pv_json(&f, &response(0, |_| {}));
        let shared = json!({"name": "shared", "namespace": "kube-system"});
        assert_eq!(
            pv["spec"]["csi"],
            json!({
                "driver": DRIVER,
                "volumeHandle": "vol-1",
                "volumeAttributes": {"pool": "fast"},
                "controllerPublishSecretRef": shared,
                "nodeStageSecretRef": {"name": "pvc-u-1", "namespace": "stage"},
                "nodePublishSecretRef": shared,
                "controllerExpandSecretRef": shared,
                "nodeExpandSecretRef": shared,
            })
        );
        let ann = &pv["metadata"]["annotations"];
        assert_eq!(ann[DELETION_SECRET_NAME], "data-prov");
        assert_eq!(ann[DELETION_SECRET_NAMESPACE], "default");
        assert_eq!(ann[MODIFY_SECRET_NAME], "mod");
        assert_eq!(ann[MODIFY_SECRET_NAMESPACE], "kube-system");
    }

    #[test]
    fn identity_read_only_and_volume_context() {
        let f = Fixture::default()
            .config(|c| {
                c.identity = "1700000000000-1234-berth.csi.io".to_owned();
                c.controller_publish_read_only = true;
            })
            .claim(json!({"spec": {"accessModes": ["ReadOnlyMany"]}}));
        let pv = pv_json(&f, &response(0, |_| {}));
        assert_eq!(
            pv["spec"]["csi"]["volumeAttributes"],
            json!({PROVISIONER_IDENTITY_KEY: "1700000000000-1234-berth.csi.io", "pool": "fast"})
        );
        assert_eq!(pv["spec"]["csi"]["readOnly"], true);
        assert_eq!(pv["spec"]["accessModes"], json!(["ReadOnlyMany"]));
        // Read-only only for a ReadOnlyMany-only claim.
        let f = f.claim(json!({"spec": {"accessModes": ["ReadOnlyMany", "ReadWriteMany"]}}));
        assert_eq!(pv_json(&f, &response(0, |_| {}))["spec"]["csi"].get("readOnly"), None);
    }

    #[test]
    fn node_affinity_follows_the_accessible_topology() {
        let accessible = |v: &mut Volume| {
            v.accessible_topology = vec![Topology {
                segments: HashMap::from([("zone".to_owned(), "b".to_owned())]),
            }];
        };
        let f = Fixture {
            keys: Some(vec!["zone".to_owned()]),
            ..Fixture::default()
        };
        let pv = pv_json(&f, &response(0, accessible));
        assert_eq!(
            pv["spec"]["nodeAffinity"],
            json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}]}})
        );
        // A driver without topology gets no affinity even if it reports some.
        let f = Fixture { keys: None, ..f };
        assert_eq!(pv_json(&f, &response(0, accessible))["spec"].get("nodeAffinity"), None);
    }

    #[test]
    fn beta_class_annotation_names_the_class() {
        let f = Fixture::default().claim(json!({
            "metadata": {"annotations": {"volume.beta.kubernetes.io/storage-class": "gold"}},
        }));
        assert_eq!(pv_json(&f, &response(0, |_| {}))["spec"]["storageClassName"], "gold");
    }

    #[rstest]
    #[case::no_volume(CreateVolumeResponse { volume: None }, None, "CreateVolume response has no volume")]
    #[case::content_source_missing(response(0, |_| {}), Some(ContentSource::Volume("src".to_owned())), "volume content source missing")]
    fn unusable_responses(
        #[case] resp: CreateVolumeResponse,
        #[case] source: Option<ContentSource>,
        #[case] want: &str,
    ) {
        let f = Fixture {
            source,
            ..Fixture::default()
        };
        assert_eq!(persistent_volume(&f.input(), &resp).unwrap_err().to_string(), want);
    }

    #[test]
    fn content_source_reported() {
        let f = Fixture {
            source: Some(ContentSource::Volume("src".to_owned())),
            ..Fixture::default()
        };
        let resp = response(0, |v| {
            v.content_source = Some(VolumeContentSource {
                r#type: Some(SourceType::Volume(VolumeSource {
                    volume_id: "src".to_owned(),
                })),
            });
        });
        assert!(persistent_volume(&f.input(), &resp).is_ok());
    }

    #[rstest]
    #[case::exhausted_on_selected_node(tonic::Code::ResourceExhausted, true, Retry::Reschedule)]
    #[case::exhausted_without_selected_node(tonic::Code::ResourceExhausted, false, Retry::Final)]
    #[case::cancelled(tonic::Code::Cancelled, true, Retry::Background)]
    #[case::deadline(tonic::Code::DeadlineExceeded, false, Retry::Background)]
    #[case::unavailable(tonic::Code::Unavailable, false, Retry::Background)]
    #[case::aborted(tonic::Code::Aborted, true, Retry::Background)]
    #[case::invalid_argument(tonic::Code::InvalidArgument, true, Retry::Infeasible)]
    #[case::internal(tonic::Code::Internal, false, Retry::Final)]
    #[case::not_found(tonic::Code::NotFound, true, Retry::Final)]
    #[case::unimplemented(tonic::Code::Unimplemented, false, Retry::Final)]
    #[case::out_of_range(tonic::Code::OutOfRange, false, Retry::Final)]
    fn retry_classification(#[case] code: tonic::Code, #[case] may_reschedule: bool, #[case] want: Retry) {
        assert_eq!(classify(code, may_reschedule), want);
    }
}

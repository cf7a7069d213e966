//! Dynamic provisioning through any CSI driver: what to ask the driver for. The rules are
//! kubernetes-csi external-provisioner's (`pkg/controller/controller.go`), so that a
//! StorageClass written for Kubernetes provisions the same volume here.
//!
//! Pure: every function reads the objects it is shown and returns a request, an object or an
//! error. Reading Secrets, listing nodes and calling the driver are the runner's. Given the same
//! inputs the functions give the same request (same name, the claim's UID), so a CreateVolume
//! repeated after a crash or a timeout is the idempotent retry the CSI spec asks for.
//!
//! - [`create_volume_request`] makes the CreateVolume request for a claim and its class;
//! - [`resolve_secret_ref`] names the Secret a class asks for, per CSI call.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use berth_api::quantity::Quantity;
use berth_csi::v1::volume_capability::access_mode::Mode;
use berth_csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use berth_csi::v1::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use berth_csi::v1::{CapacityRange, CreateVolumeRequest, VolumeCapability, VolumeContentSource};
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, SecretReference};
use k8s_openapi::api::storage::v1::StorageClass;

mod secrets;
mod topology;

pub use secrets::{ParamsProblem, SecretError, SecretKind, resolve_secret_ref};
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
    use berth_csi::v1::Topology;
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
}

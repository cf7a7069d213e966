//! Node registration: what kubelet and node-driver-registrar do for the one node a `berth server`
//! runs, and the CSIStorageCapacity objects external-provisioner publishes for it.
//!
//! - the Node: created when missing, labelled `kubernetes.io/hostname`, `kubernetes.io/os`,
//!   `kubernetes.io/arch` and every registered driver's topology segment (as kubelet's CSI node
//!   info manager labels it), with a Ready condition;
//! - the CSINode of the same name, listing each registered driver that serves this node (its
//!   node id, topology keys and volume limit);
//! - a CSIDriver object per registered driver when none exists (an administrator's own is left
//!   as it is);
//! - per StorageClass of a driver that reports capacity (`GET_CAPACITY`, and its CSIDriver says
//!   `storageCapacity: true`), one CSIStorageCapacity in `kube-system` for this node's topology
//!   segment, refreshed every minute and on class changes, and deleted with the class.
//!
//! Level-triggered: each object is compared with what it should be and written only when it
//! differs, so a second run, a restart or a user's edit converges without duplicates (capacity
//! objects have names derived from class, driver and segment). It never removes labels,
//! drivers or objects it did not make.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use berth_api::quantity::{Format, Quantity};
use berth_csi::v1::controller_service_capability::rpc::Type as ControllerCap;
use berth_csi::v1::volume_capability::access_mode::Mode;
use berth_csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use berth_csi::v1::{GetCapacityRequest, Topology, VolumeCapability};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::api::storage::v1::{
    CSIDriver, CSIDriverSpec, CSINode, CSINodeDriver, CSINodeSpec, CSIStorageCapacity, StorageClass,
    VolumeNodeResources,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as ApiQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference, Time};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::Informers;
use crate::api::{Api, ApiError, Part, Typed, kinds};
use crate::drivers::{Driver, Drivers, NodeInfo};
use crate::informer::Change;
use crate::pv_controller::retry_after;
use crate::queue::{Outcome, Queue};

/// Where CSIStorageCapacity objects are kept (a namespace every cluster has).
pub const CAPACITY_NAMESPACE: &str = "kube-system";
/// external-provisioner's label naming the driver of a CSIStorageCapacity.
pub const LABEL_DRIVER: &str = "csi.storage.k8s.io/drivername";
/// external-provisioner's label naming who manages a CSIStorageCapacity.
pub const LABEL_MANAGED_BY: &str = "csi.storage.k8s.io/managed-by";
/// The managed-by value of the capacities Berth publishes.
pub const MANAGED_BY: &str = "berth";
pub const LABEL_HOSTNAME: &str = "kubernetes.io/hostname";
pub const LABEL_OS: &str = "kubernetes.io/os";
pub const LABEL_ARCH: &str = "kubernetes.io/arch";
/// The StorageClass parameters meant for the provisioner, not the driver.
const PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";
const FSTYPE_KEY: &str = "csi.storage.k8s.io/fstype";
/// Pods a node takes, as kubelet's default `--max-pods`.
const MAX_PODS: &str = "110";
/// What the Node's `kubeletVersion` says (kubectl prints it as VERSION).
const AGENT_VERSION: &str = concat!("berth-", env!("CARGO_PKG_VERSION"));

/// How often capacities are asked again, and everything compared again (external-provisioner's
/// `--capacity-poll-interval`).
pub const REFRESH: Duration = Duration::from_secs(60);

/// What registration needs to know of one connected driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverFacts {
    pub name: String,
    /// The controller publishes volumes to nodes (`PUBLISH_UNPUBLISH_VOLUME`).
    pub attach_required: bool,
    /// The controller reports capacity (`GET_CAPACITY`).
    pub get_capacity: bool,
    /// The plugin reports topology constraints (`VOLUME_ACCESSIBILITY_CONSTRAINTS`).
    pub has_topology: bool,
    /// `NodeGetInfo`, when the driver serves this node.
    pub node: Option<NodeInfo>,
}

impl DriverFacts {
    pub fn of(d: &Driver) -> DriverFacts {
        DriverFacts {
            name: d.name.clone(),
            attach_required: d.controller(ControllerCap::PublishUnpublishVolume),
            get_capacity: d.controller(ControllerCap::GetCapacity),
            has_topology: d.has_topology(),
            node: d.node.clone(),
        }
    }
}

/// What the host says about itself, for the Node's `status.nodeInfo` and capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Go's name for the architecture (`amd64`, `arm64`), as Kubernetes labels nodes.
    pub architecture: String,
    pub kernel_version: String,
    pub os_image: String,
    pub cpus: u32,
}

impl HostFacts {
    /// Reads this host's facts (best effort: what cannot be read stays empty).
    pub fn read() -> HostFacts {
        let os_image = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_owned())
            })
            .unwrap_or_default();
        HostFacts {
            architecture: go_arch(std::env::consts::ARCH).to_owned(),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            os_image,
            cpus: std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1),
        }
    }
}

/// Go's `GOARCH` for Rust's `target_arch`.
pub fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// The node's name: `given` when set; otherwise the node id of the first of `endpoints`
/// whose driver serves this node, decided only once every endpoint before it has connected
/// (so that another driver answering first cannot name the node). `registered` says, per
/// endpoint, `None` while it has not connected and `Some(node id)` once it has.
pub fn node_name(
    given: Option<&str>,
    endpoints: &[String],
    registered: impl Fn(&str) -> Option<Option<String>>,
) -> Option<String> {
    if let Some(n) = given.filter(|n| !n.is_empty()) {
        return Some(n.to_owned());
    }
    for e in endpoints {
        match registered(e)? {
            Some(id) if !id.is_empty() => return Some(id),
            _ => {}
        }
    }
    None
}

fn valid_label(key: &str, value: &str) -> bool {
    berth_api::names::qualified_name(key).is_empty() && berth_api::names::label_value(value).is_empty()
}

/// The labels the Node must carry: hostname, OS and architecture as kubelet sets them, and
/// each driver's topology segment (a pair that is not a valid label is left out).
pub fn node_labels(name: &str, host: &HostFacts, drivers: &[DriverFacts]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        if valid_label(k, v) {
            out.insert(k.to_owned(), v.to_owned());
        }
    };
    put(LABEL_HOSTNAME, name);
    put(LABEL_OS, "linux");
    if !host.architecture.is_empty() {
        put(LABEL_ARCH, &host.architecture);
    }
    for d in drivers {
        for (k, v) in d.node.iter().flat_map(|n| n.topology.iter()) {
            put(k, v);
        }
    }
    out
}

fn api_quantity(units: i64) -> ApiQuantity {
    ApiQuantity(Quantity::from_units(units.max(0), Format::BinarySI).canonical())
}

/// The Node as it should be, from `existing` (None: a new one), or `None` when `existing` is
/// already right. Labels are added (never removed); the Ready condition is made True
/// (`now` stamps a change); capacity, allocatable, addresses and nodeInfo are filled in when
/// missing, and kept when present.
pub fn desired_node(
    existing: Option<&Node>,
    name: &str,
    labels: &BTreeMap<String, String>,
    host: &HostFacts,
    now: &Time,
) -> Option<Node> {
    let mut node = existing.cloned().unwrap_or_else(|| Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    });
    let have = node.metadata.labels.get_or_insert_with(BTreeMap::new);
    for (k, v) in labels {
        have.insert(k.clone(), v.clone());
    }
    let status = node.status.get_or_insert_with(NodeStatus::default);
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    let ready = NodeCondition {
        type_: "Ready".to_owned(),
        status: "True".to_owned(),
        reason: Some("KubeletReady".to_owned()),
        message: Some("kubelet is posting ready status".to_owned()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    };
    match conditions.iter_mut().find(|c| c.type_ == "Ready") {
        Some(c) if c.status == "True" => {}
        Some(c) => *c = ready,
        None => conditions.push(ready),
    }
    if status.capacity.is_none() {
        status.capacity = Some(BTreeMap::from([
            ("cpu".to_owned(), api_quantity(i64::from(host.cpus.max(1)))),
            ("pods".to_owned(), ApiQuantity(MAX_PODS.to_owned())),
        ]));
    }
    if status.allocatable.is_none() {
        status.allocatable = status.capacity.clone();
    }
    if status.addresses.is_none() {
        status.addresses = Some(vec![NodeAddress {
            type_: "Hostname".to_owned(),
            address: name.to_owned(),
        }]);
    }
    if status.node_info.is_none() {
        status.node_info = Some(NodeSystemInfo {
            architecture: host.architecture.clone(),
            kernel_version: host.kernel_version.clone(),
            os_image: host.os_image.clone(),
            operating_system: "linux".to_owned(),
            kubelet_version: AGENT_VERSION.to_owned(),
            ..NodeSystemInfo::default()
        });
    }
    (existing != Some(&node)).then_some(node)
}

/// The CSINode entry of a driver that serves this node: its node id, its topology keys
/// (sorted) and, when it reports one, its volume limit.
pub fn csi_node_driver(d: &DriverFacts) -> Option<CSINodeDriver> {
    let n = d.node.as_ref()?;
    Some(CSINodeDriver {
        name: d.name.clone(),
        node_id: n.node_id.clone(),
        topology_keys: (!n.topology.is_empty()).then(|| n.topology.keys().cloned().collect()),
        allocatable: (n.max_volumes > 0).then(|| VolumeNodeResources {
            count: Some(i32::try_from(n.max_volumes).unwrap_or(i32::MAX)),
        }),
    })
}

fn same_registration(a: &CSINodeDriver, b: &CSINodeDriver) -> bool {
    let keys = |d: &CSINodeDriver| {
        let mut k = d.topology_keys.clone().unwrap_or_default();
        k.sort();
        k
    };
    a.node_id == b.node_id && keys(a) == keys(b)
}

/// The CSINode `node` should have, from `existing` (None: a new one, owned by the Node when
/// `node_uid` is known), or `None` when `existing` is already right. Each driver that serves
/// this node is listed; drivers listed but not registered now are kept (they may still be
/// connecting). An entry whose node id or topology keys changed cannot be edited in place
/// (the API refuses it), so this round drops it and the next one adds it back.
pub fn desired_csi_node(
    existing: Option<&CSINode>,
    node: &str,
    node_uid: Option<&str>,
    drivers: &[DriverFacts],
) -> Option<CSINode> {
    let mut out = existing.cloned().unwrap_or_else(|| CSINode {
        metadata: ObjectMeta {
            name: Some(node.to_owned()),
            owner_references: node_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".to_owned(),
                    kind: "Node".to_owned(),
                    name: node.to_owned(),
                    uid: uid.to_owned(),
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        },
        spec: CSINodeSpec::default(),
    });
    let list = &mut out.spec.drivers;
    for want in drivers.iter().filter_map(csi_node_driver) {
        match list.iter().position(|d| d.name == want.name) {
            None => list.push(want),
            Some(i) if same_registration(&list[i], &want) => list[i].allocatable = want.allocatable,
            Some(i) => {
                list.remove(i);
            }
        }
    }
    (existing != Some(&out)).then_some(out)
}

/// The CSIDriver object for a driver that has none: attach is required when the controller
/// publishes volumes, capacity is tracked when it reports capacity; no pod info on mount;
/// persistent volumes only.
pub fn csi_driver_object(d: &DriverFacts) -> CSIDriver {
    CSIDriver {
        metadata: ObjectMeta {
            name: Some(d.name.clone()),
            ..ObjectMeta::default()
        },
        spec: CSIDriverSpec {
            attach_required: Some(d.attach_required),
            pod_info_on_mount: Some(false),
            storage_capacity: Some(d.get_capacity),
            volume_lifecycle_modes: Some(vec!["Persistent".to_owned()]),
            ..CSIDriverSpec::default()
        },
    }
}

/// The topology segment this node's capacity is published for: the driver's segment here;
/// an empty one (every node) for a driver without topology; `None` for a driver with
/// topology that does not serve this node.
pub fn capacity_segment(d: &DriverFacts) -> Option<BTreeMap<String, String>> {
    match &d.node {
        Some(n) => Some(n.topology.clone()),
        None if !d.has_topology => Some(BTreeMap::new()),
        None => None,
    }
}

/// Whether capacity is published for `class`: its provisioner is the registered driver `d`,
/// which reports capacity, and the driver's CSIDriver object asks for capacity tracking.
pub fn publishes_capacity(class: &StorageClass, d: &DriverFacts, object: Option<&CSIDriver>) -> bool {
    class.provisioner == d.name && d.get_capacity && object.is_some_and(|o| o.spec.storage_capacity == Some(true))
}

/// The GetCapacity request for `class` in `segment`: the class's parameters minus the
/// `csi.storage.k8s.io/` ones, one single-node-writer mount capability (with the class's
/// filesystem and mount options), and the segment as accessible topology (none when empty).
pub fn capacity_request(class: &StorageClass, segment: &BTreeMap<String, String>) -> GetCapacityRequest {
    let params = class.parameters.clone().unwrap_or_default();
    let fs_type = params.get(FSTYPE_KEY).cloned().unwrap_or_default();
    GetCapacityRequest {
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter.into(),
            }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type,
                mount_flags: class.mount_options.clone().unwrap_or_default(),
                volume_mount_group: String::new(),
            })),
        }],
        parameters: params
            .into_iter()
            .filter(|(k, _)| !k.starts_with(PARAMETER_PREFIX))
            .collect(),
        accessible_topology: (!segment.is_empty()).then(|| Topology {
            segments: segment.clone().into_iter().collect(),
        }),
    }
}

/// The name of the CSIStorageCapacity for (`class`, `driver`, `segment`): `csisc-` and 16 hex
/// digits of a SHA-256 over them, so every run names the same object.
pub fn capacity_name(class: &str, driver: &str, segment: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    h.update(class.as_bytes());
    h.update([0]);
    h.update(driver.as_bytes());
    for (k, v) in segment {
        h.update([0]);
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("csisc-{hex}")
}

/// The `nodeTopology` of a segment's capacity: its labels (empty: every node).
pub fn capacity_topology(segment: &BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: (!segment.is_empty()).then(|| segment.clone()),
        match_expressions: None,
    }
}

/// Whether Berth published `c` for `driver` in `segment`.
pub fn published_here(c: &CSIStorageCapacity, driver: &str, segment: &BTreeMap<String, String>) -> bool {
    let labels = c.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    label(LABEL_MANAGED_BY) == Some(MANAGED_BY)
        && label(LABEL_DRIVER) == Some(driver)
        && c.node_topology.as_ref() == Some(&capacity_topology(segment))
}

/// What GetCapacity answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    pub available: i64,
    pub maximum_volume_size: Option<i64>,
}

/// The CSIStorageCapacity for `class` in `segment` as it should be, from `existing` (None: a
/// new one), or `None` when `existing` is already right.
pub fn desired_capacity(
    existing: Option<&CSIStorageCapacity>,
    class: &str,
    driver: &str,
    segment: &BTreeMap<String, String>,
    reported: Reported,
) -> Option<CSIStorageCapacity> {
    let mut out = existing.cloned().unwrap_or_else(|| CSIStorageCapacity {
        metadata: ObjectMeta {
            name: Some(capacity_name(class, driver, segment)),
            namespace: Some(CAPACITY_NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        storage_class_name: class.to_owned(),
        node_topology: Some(capacity_topology(segment)),
        capacity: None,
        maximum_volume_size: None,
    });
    let labels = out.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(LABEL_DRIVER.to_owned(), driver.to_owned());
    labels.insert(LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned());
    out.capacity = Some(api_quantity(reported.available));
    out.maximum_volume_size = reported.maximum_volume_size.map(api_quantity);
    (existing != Some(&out)).then_some(out)
}

// ---------------------------------------------------------------------------------------------
// The runner

/// The runner (one queue: `node`, `csinode`, `driver/<name>`, `class/<name>` keys).
#[derive(Debug)]
pub struct Registration {
    api: Arc<dyn Api>,
    inf: Arc<Informers>,
    drivers: Arc<Drivers>,
    given_name: Option<String>,
    endpoints: Vec<String>,
    name: OnceLock<String>,
    host: HostFacts,
    queue: Arc<Queue>,
}

const NODE: &str = "node";
const CSI_NODE: &str = "csinode";

impl Registration {
    /// Registers this node under `name`, or under the node id the first of `endpoints` (the
    /// built-in driver) reports; `endpoints` are the drivers expected to connect. Hooks itself
    /// to the informers (before they run).
    pub fn new(
        api: Arc<dyn Api>,
        inf: Arc<Informers>,
        drivers: Arc<Drivers>,
        name: Option<String>,
        endpoints: Vec<String>,
    ) -> Arc<Self> {
        let r = Arc::new(Registration {
            api,
            inf: inf.clone(),
            drivers,
            given_name: name,
            endpoints,
            name: OnceLock::new(),
            host: HostFacts::read(),
            queue: Queue::new("registration"),
        });
        let me = r.clone();
        inf.nodes.on_change(move |c| {
            let (Change::Upsert { new: n, .. } | Change::Delete(n)) = c;
            if me.is_this_node(n.metadata.name.as_deref()) {
                me.queue.add(NODE);
                me.queue.add(CSI_NODE);
            }
        });
        let me = r.clone();
        inf.csi_nodes.on_change(move |c| {
            let (Change::Upsert { new: n, .. } | Change::Delete(n)) = c;
            if me.is_this_node(n.metadata.name.as_deref()) {
                me.queue.add(CSI_NODE);
            }
        });
        let me = r.clone();
        inf.csi_drivers.on_change(move |c| {
            let (Change::Upsert { new: d, .. } | Change::Delete(d)) = c;
            let name = d.metadata.name.as_deref().unwrap_or("");
            if me.drivers.get(name).is_some() {
                me.queue.add(format!("driver/{name}"));
                for class in me.inf.classes.list() {
                    if class.provisioner == name {
                        me.queue.add(class_key(&class));
                    }
                }
            }
        });
        let me = r.clone();
        inf.classes.on_change(move |c| {
            let (Change::Upsert { new: class, .. } | Change::Delete(class)) = c;
            me.queue.add(class_key(class));
        });
        let me = r.clone();
        inf.capacities.on_change(move |c| {
            // Someone deleted one of ours: publish it again.
            if let Change::Delete(old) = c
                && old
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_MANAGED_BY))
                    .map(String::as_str)
                    == Some(MANAGED_BY)
            {
                me.queue.add(format!("class/{}", old.storage_class_name));
            }
        });
        r
    }

    fn is_this_node(&self, name: Option<&str>) -> bool {
        name.is_some() && self.name.get().map(String::as_str) == name
    }

    /// The registered drivers, by name.
    fn facts(&self) -> Vec<DriverFacts> {
        let mut v: Vec<DriverFacts> = self.drivers.all().iter().map(|d| DriverFacts::of(d)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Queues every key: the node, its CSINode, each driver and each class (and each class a
    /// capacity of ours names, so that capacities of deleted classes go).
    fn queue_all(&self) {
        self.queue.add(NODE);
        self.queue.add(CSI_NODE);
        for d in self.drivers.all() {
            self.queue.add(format!("driver/{}", d.name));
        }
        for c in self.inf.classes.list() {
            self.queue.add(class_key(&c));
        }
        for c in self.inf.capacities.list() {
            if c.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_MANAGED_BY))
                .map(String::as_str)
                == Some(MANAGED_BY)
            {
                self.queue.add(format!("class/{}", c.storage_class_name));
            }
        }
    }

    /// Runs until `stop`: looks at everything when a driver registers, and again every
    /// [`REFRESH`].
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.given_name.is_none() && self.endpoints.is_empty() {
            tracing::info!("no node to register: no node name and no CSI driver");
            return;
        }
        self.inf.wait_synced().await;
        let me = self.clone();
        let worker = tokio::spawn(self.queue.clone().run(
            2,
            move |key| {
                let me = me.clone();
                async move { me.sync(&key).await }
            },
            stop.clone(),
        ));
        let mut registered = self.drivers.subscribe();
        loop {
            if self.name.get().is_none() {
                let drivers = self.drivers.all();
                let by_endpoint = |e: &str| {
                    drivers
                        .iter()
                        .find(|d| d.endpoint == e)
                        .map(|d| d.node.as_ref().map(|n| n.node_id.clone()))
                };
                if let Some(n) = node_name(self.given_name.as_deref(), &self.endpoints, by_endpoint) {
                    tracing::info!(node = %n, "registering this node");
                    let _ = self.name.set(n);
                }
            }
            self.queue_all();
            tokio::select! {
                r = registered.changed() => {
                    if r.is_err() {
                        // The registry is gone (shutting down).
                        break;
                    }
                }
                () = tokio::time::sleep(REFRESH) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let _ = worker.await;
    }

    async fn sync(&self, key: &str) -> Outcome {
        let Some(name) = self.name.get() else {
            return Outcome::Done;
        };
        match key {
            NODE => self.sync_node(name).await,
            CSI_NODE => self.sync_csi_node(name).await,
            _ => {
                if let Some(d) = key.strip_prefix("driver/") {
                    self.sync_csi_driver(d).await
                } else if let Some(c) = key.strip_prefix("class/") {
                    self.sync_capacity(c).await
                } else {
                    Outcome::Done
                }
            }
        }
    }

    async fn sync_node(&self, name: &str) -> Outcome {
        let labels = node_labels(name, &self.host, &self.facts());
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let existing = self.inf.nodes.get(name);
        let Some(want) = desired_node(existing.as_deref(), name, &labels, &self.host, &now) else {
            return Outcome::Done;
        };
        let Ok(value) = want.to_value() else {
            return Outcome::Retry;
        };
        if existing.is_none() {
            // Created without status (the API keeps status for its subresource); the status
            // is written next, on the object as stored.
            let stored = match self.api.create(kinds::nodes(), value).await {
                Ok(v) => v,
                Err(ApiError::AlreadyExists(_)) => return Outcome::After(Duration::from_millis(20)),
                Err(e) => return retry_after(&e),
            };
            self.inf.nodes.assume(stored.clone());
            tracing::info!(node = name, "created the Node");
            let Ok(node) = Node::from_value(stored) else {
                return Outcome::Retry;
            };
            return match desired_node(Some(&node), name, &labels, &self.host, &now) {
                Some(n) => self.write(kinds::nodes(), n, Part::Both).await,
                None => Outcome::Done,
            };
        }
        self.write(kinds::nodes(), want, Part::Both).await
    }

    async fn sync_csi_node(&self, name: &str) -> Outcome {
        let existing = self.inf.csi_nodes.get(name);
        let node = self.inf.nodes.get(name);
        if existing.is_none() && node.is_none() {
            // Made with its owner, once the Node is there (its creation queues this again).
            return Outcome::Done;
        }
        let uid = node.as_ref().and_then(|n| n.metadata.uid.clone());
        let Some(want) = desired_csi_node(existing.as_deref(), name, uid.as_deref(), &self.facts()) else {
            return Outcome::Done;
        };
        if existing.is_some() {
            return self.write(kinds::csi_nodes(), want, Part::Main).await;
        }
        let Ok(value) = want.to_value() else {
            return Outcome::Retry;
        };
        match self.api.create(kinds::csi_nodes(), value).await {
            Ok(stored) => {
                self.inf.csi_nodes.assume(stored);
                Outcome::Done
            }
            Err(ApiError::AlreadyExists(_)) => Outcome::After(Duration::from_millis(20)),
            Err(e) => retry_after(&e),
        }
    }

    async fn sync_csi_driver(&self, name: &str) -> Outcome {
        if self.inf.csi_drivers.get(name).is_some() {
            return Outcome::Done;
        }
        let Some(d) = self.drivers.get(name) else {
            return Outcome::Done;
        };
        let Ok(value) = csi_driver_object(&DriverFacts::of(&d)).to_value() else {
            return Outcome::Retry;
        };
        match self.api.create(kinds::csi_drivers(), value).await {
            Ok(stored) => {
                tracing::info!(driver = name, "created the CSIDriver");
                self.inf.csi_drivers.assume(stored);
                Outcome::Done
            }
            Err(ApiError::AlreadyExists(_)) => Outcome::Done,
            Err(e) => retry_after(&e),
        }
    }

    /// Publishes the capacity of `class` for this node, or deletes what was published when
    /// the class is gone or no longer tracks capacity.
    async fn sync_capacity(&self, class_name: &str) -> Outcome {
        let facts: HashMap<String, DriverFacts> = self.facts().into_iter().map(|d| (d.name.clone(), d)).collect();
        let class = self.inf.classes.get(class_name);
        let publish = class.as_ref().and_then(|c| {
            let d = facts.get(&c.provisioner)?;
            let object = self.inf.csi_drivers.get(&d.name);
            if !publishes_capacity(c, d, object.as_deref()) {
                return None;
            }
            Some((c.clone(), d.clone(), capacity_segment(d)?))
        });
        let mut keep = None;
        if let Some((class, d, segment)) = publish {
            let Some(driver) = self.drivers.get(&d.name) else {
                return Outcome::Done;
            };
            let mut client = driver.client.clone();
            let answer = match client.controller.get_capacity(capacity_request(&class, &segment)).await {
                Ok(a) => a.into_inner(),
                Err(status) => {
                    tracing::warn!(class = class_name, driver = %d.name, error = %status.message(), "GetCapacity failed");
                    return Outcome::Retry;
                }
            };
            let reported = Reported {
                available: answer.available_capacity,
                maximum_volume_size: answer.maximum_volume_size,
            };
            let name = capacity_name(class_name, &d.name, &segment);
            let existing = self.inf.capacities.get(&format!("{CAPACITY_NAMESPACE}/{name}"));
            if let Some(want) = desired_capacity(existing.as_deref(), class_name, &d.name, &segment, reported) {
                let out = if existing.is_some() {
                    self.write(kinds::capacities(), want, Part::Main).await
                } else {
                    self.create_capacity(want).await
                };
                if out != Outcome::Done {
                    return out;
                }
            }
            keep = Some(name);
        }
        // Capacities of this class published here that should not be (any more).
        for c in self.inf.capacities.list() {
            if c.storage_class_name != class_name || c.metadata.name == keep {
                continue;
            }
            let driver = c.metadata.labels.as_ref().and_then(|l| l.get(LABEL_DRIVER));
            let Some(segment) = driver.and_then(|d| facts.get(d)).and_then(capacity_segment) else {
                continue;
            };
            if !published_here(&c, driver.map_or("", String::as_str), &segment) {
                continue;
            }
            let name = c.metadata.name.as_deref().unwrap_or("");
            match self
                .api
                .delete(
                    kinds::capacities(),
                    c.metadata.namespace.as_deref(),
                    name,
                    c.metadata.uid.as_deref(),
                )
                .await
            {
                Ok(()) | Err(ApiError::NotFound(_)) => {}
                Err(e) => return retry_after(&e),
            }
        }
        Outcome::Done
    }

    async fn create_capacity(&self, want: CSIStorageCapacity) -> Outcome {
        let Ok(value) = want.to_value() else {
            return Outcome::Retry;
        };
        match self.api.create(kinds::capacities(), value.clone()).await {
            Ok(stored) => {
                self.inf.capacities.assume(stored);
                Outcome::Done
            }
            Err(ApiError::AlreadyExists(_)) => Outcome::After(Duration::from_millis(20)),
            Err(ApiError::NotFound(_)) => {
                // The namespace is missing: make it, then try again.
                let ns = serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": CAPACITY_NAMESPACE},
                });
                match self.api.create(kinds::namespaces(), ns).await {
                    Ok(_) | Err(ApiError::AlreadyExists(_)) => Outcome::After(Duration::from_millis(20)),
                    Err(e) => retry_after(&e),
                }
            }
            Err(e) => retry_after(&e),
        }
    }

    async fn write<T: Typed>(&self, res: &'static berth_api::Resource, obj: T, part: Part) -> Outcome {
        let Ok(value) = obj.to_value() else {
            return Outcome::Retry;
        };
        match self.api.update(res, value, part).await {
            Ok(stored) => {
                match res.kind {
                    "Node" => self.inf.nodes.assume(stored),
                    "CSINode" => self.inf.csi_nodes.assume(stored),
                    "CSIStorageCapacity" => self.inf.capacities.assume(stored),
                    _ => {}
                }
                Outcome::Done
            }
            Err(e) => retry_after(&e),
        }
    }
}

fn class_key(class: &StorageClass) -> String {
    format!("class/{}", class.metadata.name.as_deref().unwrap_or(""))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::{Value, json};

    fn obj<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    /// A node id, a volume limit and a topology segment.
    type Served<'a> = (&'a str, i64, &'a [(&'a str, &'a str)]);

    fn facts(name: &str, node: Option<Served<'_>>) -> DriverFacts {
        DriverFacts {
            name: name.to_owned(),
            attach_required: true,
            get_capacity: true,
            has_topology: true,
            node: node.map(|(id, max, topo)| NodeInfo {
                node_id: id.to_owned(),
                max_volumes: max,
                topology: topo.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            }),
        }
    }

    fn berth() -> DriverFacts {
        facts("csi.berth.dev", Some(("n1", 0, &[("topology.berth.dev/node", "n1")])))
    }

    fn host() -> HostFacts {
        HostFacts {
            architecture: "amd64".into(),
            kernel_version: "6.1.0".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            cpus: 2,
        }
    }

    fn now() -> Time {
        Time("2026-01-31T12:00:00Z".parse().unwrap())
    }

    fn later() -> Time {
        Time("2026-01-31T13:00:00Z".parse().unwrap())
    }

    #[rstest]
    #[case::given_name_wins(Some("me"), &["a"], &[], Some("me"))]
    #[case::first_endpoints_node_id(None, &["a", "b"], &[("a", Some("n1")), ("b", Some("n2"))], Some("n1"))]
    #[case::waits_for_the_first_endpoint(None, &["a", "b"], &[("b", Some("n2"))], None)]
    #[case::skips_a_driver_without_node_service(None, &["a", "b"], &[("a", None), ("b", Some("n2"))], Some("n2"))]
    #[case::nothing_registered(None, &["a"], &[], None)]
    #[case::empty_given_name_is_no_name(Some(""), &["a"], &[("a", Some("n1"))], Some("n1"))]
    fn naming_the_node(
        #[case] given: Option<&str>,
        #[case] endpoints: &[&str],
        #[case] registered: &[(&str, Option<&str>)],
        #[case] want: Option<&str>,
    ) {
        let endpoints: Vec<String> = endpoints.iter().map(|e| (*e).to_owned()).collect();
        let lookup = |e: &str| {
            registered
                .iter()
                .find(|(x, _)| *x == e)
                .map(|(_, id)| id.map(str::to_owned))
        };
        assert_eq!(node_name(given, &endpoints, lookup).as_deref(), want);
    }

    #[rstest]
    #[case::x86("x86_64", "amd64")]
    #[case::arm("aarch64", "arm64")]
    #[case::same("s390x", "s390x")]
    fn architectures_are_named_as_go_does(#[case] rust: &str, #[case] go: &str) {
        assert_eq!(go_arch(rust), go);
    }

    #[test]
    fn node_labels_carry_hostname_platform_and_topology() {
        let labels = node_labels("n1", &host(), &[berth(), facts("other.csi", None)]);
        assert_eq!(
            labels,
            BTreeMap::from([
                (LABEL_ARCH.to_owned(), "amd64".to_owned()),
                (LABEL_HOSTNAME.to_owned(), "n1".to_owned()),
                (LABEL_OS.to_owned(), "linux".to_owned()),
                ("topology.berth.dev/node".to_owned(), "n1".to_owned()),
            ])
        );
        // A name too long for a label value is not a hostname label.
        let long = "n".repeat(64);
        assert!(!node_labels(&long, &host(), &[]).contains_key(LABEL_HOSTNAME));
    }

    #[test]
    fn a_new_node_is_ready_with_minimal_status() {
        let labels = node_labels("n1", &host(), &[berth()]);
        let node = desired_node(None, "n1", &labels, &host(), &now()).unwrap();
        let v = serde_json::to_value(&node).unwrap();
        assert_eq!(v["metadata"]["name"], "n1");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        assert_eq!(v["metadata"]["labels"]["topology.berth.dev/node"], "n1");
        let ready = &v["status"]["conditions"][0];
        assert_eq!(
            (ready["type"].as_str(), ready["status"].as_str()),
            (Some("Ready"), Some("True"))
        );
        assert_eq!(ready["reason"], "KubeletReady");
        assert_eq!(v["status"]["capacity"], json!({"cpu": "2", "pods": "110"}));
        assert_eq!(v["status"]["allocatable"], v["status"]["capacity"]);
        assert_eq!(v["status"]["addresses"], json!([{"type": "Hostname", "address": "n1"}]));
        assert_eq!(v["status"]["nodeInfo"]["operatingSystem"], "linux");
        assert_eq!(v["status"]["nodeInfo"]["architecture"], "amd64");
    }

    #[rstest]
    // Already right: nothing to write, even at another time.
    #[case::up_to_date(json!({}), false)]
    // A label of ours is missing.
    #[case::label_missing(json!({"metadata": {"labels": {"topology.berth.dev/node": null}}}), true)]
    // Not Ready: made Ready.
    #[case::not_ready(json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}), true)]
    // Someone else's label and capacity are kept as they are.
    #[case::others_kept(json!({"metadata": {"labels": {"team": "a"}}, "status": {"capacity": {"cpu": "64", "pods": "10"}}}), false)]
    fn an_existing_node_is_completed_not_replaced(#[case] patch: Value, #[case] changes: bool) {
        let labels = node_labels("n1", &host(), &[berth()]);
        let current = desired_node(None, "n1", &labels, &host(), &now()).unwrap();
        let mut v = serde_json::to_value(&current).unwrap();
        merge(&mut v, patch.clone());
        let existing: Node = obj(v.clone());
        let got = desired_node(Some(&existing), "n1", &labels, &host(), &later());
        assert_eq!(got.is_some(), changes, "{got:?}");
        if let Some(n) = got {
            let out = serde_json::to_value(&n).unwrap();
            assert_eq!(out["status"]["conditions"][0]["status"], "True");
            assert_eq!(out["metadata"]["labels"]["topology.berth.dev/node"], "n1");
            if patch["status"]["conditions"].is_array() {
                // The condition changed now.
                assert_eq!(
                    out["status"]["conditions"][0]["lastTransitionTime"],
                    "2026-01-31T13:00:00Z"
                );
            }
        }
    }

    fn merge(base: &mut Value, patch: Value) {
        match (base, patch) {
            (Value::Object(b), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        b.remove(&k);
                    } else {
                        merge(b.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
            (b, p) => *b = p,
        }
    }

    #[rstest]
    #[case::with_topology_and_limit(
        facts("d", Some(("n1", 16, &[("zone", "a"), ("node", "n1")]))),
        Some(json!({"name": "d", "nodeID": "n1", "topologyKeys": ["node", "zone"], "allocatable": {"count": 16}}))
    )]
    #[case::no_limit_no_topology(facts("d", Some(("n1", 0, &[]))), Some(json!({"name": "d", "nodeID": "n1"})))]
    #[case::not_on_this_node(facts("d", None), None)]
    fn csi_node_entries(#[case] d: DriverFacts, #[case] want: Option<Value>) {
        assert_eq!(csi_node_driver(&d).map(|e| serde_json::to_value(e).unwrap()), want);
    }

    fn csi_node(drivers: Value) -> CSINode {
        obj(json!({"metadata": {"name": "n1"}, "spec": {"drivers": drivers}}))
    }

    #[rstest]
    #[case::new_entry(json!([]), Some(json!([{"name": "csi.berth.dev", "nodeID": "n1", "topologyKeys": ["topology.berth.dev/node"]}])))]
    #[case::same_entry(json!([{"name": "csi.berth.dev", "nodeID": "n1", "topologyKeys": ["topology.berth.dev/node"]}]), None)]
    #[case::others_kept(json!([{"name": "other", "nodeID": "x"}]),
        Some(json!([{"name": "other", "nodeID": "x"}, {"name": "csi.berth.dev", "nodeID": "n1", "topologyKeys": ["topology.berth.dev/node"]}])))]
    #[case::changed_id_is_dropped_first(json!([{"name": "csi.berth.dev", "nodeID": "old", "topologyKeys": ["topology.berth.dev/node"]}]), Some(json!([])))]
    #[case::allocatable_updated_in_place(json!([{"name": "csi.berth.dev", "nodeID": "n1", "topologyKeys": ["topology.berth.dev/node"], "allocatable": {"count": 3}}]),
        Some(json!([{"name": "csi.berth.dev", "nodeID": "n1", "topologyKeys": ["topology.berth.dev/node"]}])))]
    fn csi_node_converges(#[case] existing: Value, #[case] want: Option<Value>) {
        let existing = csi_node(existing);
        let got = desired_csi_node(Some(&existing), "n1", Some("uid-1"), &[berth()]);
        assert_eq!(got.map(|c| serde_json::to_value(c.spec.drivers).unwrap()), want);
    }

    #[test]
    fn a_new_csi_node_is_owned_by_its_node() {
        let c = desired_csi_node(None, "n1", Some("uid-1"), &[berth(), facts("ctl-only", None)]).unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v["metadata"]["ownerReferences"],
            json!([{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "uid-1"}])
        );
        assert_eq!(v["spec"]["drivers"].as_array().unwrap().len(), 1);
        // Applying the result again changes nothing.
        assert_eq!(desired_csi_node(Some(&c), "n1", Some("uid-1"), &[berth()]), None);
    }

    #[rstest]
    #[case::full(true, true, json!({"attachRequired": true, "podInfoOnMount": false, "storageCapacity": true, "volumeLifecycleModes": ["Persistent"]}))]
    #[case::no_attach_no_capacity(false, false, json!({"attachRequired": false, "podInfoOnMount": false, "storageCapacity": false, "volumeLifecycleModes": ["Persistent"]}))]
    fn csi_driver_objects(#[case] attach: bool, #[case] capacity: bool, #[case] spec: Value) {
        let mut d = berth();
        d.attach_required = attach;
        d.get_capacity = capacity;
        let v = serde_json::to_value(csi_driver_object(&d)).unwrap();
        assert_eq!(v["metadata"]["name"], "csi.berth.dev");
        assert_eq!(v["spec"], spec);
    }

    fn class(provisioner: &str, params: Value) -> StorageClass {
        obj(
            json!({"metadata": {"name": "fast"}, "provisioner": provisioner, "parameters": params,
                   "mountOptions": ["noatime"]}),
        )
    }

    fn driver_object(capacity: Option<bool>) -> CSIDriver {
        obj(json!({"metadata": {"name": "csi.berth.dev"}, "spec": {"storageCapacity": capacity}}))
    }

    #[rstest]
    #[case::tracked(class("csi.berth.dev", json!({})), berth(), Some(driver_object(Some(true))), true)]
    #[case::object_says_no(class("csi.berth.dev", json!({})), berth(), Some(driver_object(Some(false))), false)]
    #[case::no_object_yet(class("csi.berth.dev", json!({})), berth(), None, false)]
    #[case::other_provisioner(class("other", json!({})), berth(), Some(driver_object(Some(true))), false)]
    #[case::driver_without_get_capacity(class("csi.berth.dev", json!({})), DriverFacts { get_capacity: false, ..berth() }, Some(driver_object(Some(true))), false)]
    fn which_classes_get_capacity(
        #[case] c: StorageClass,
        #[case] d: DriverFacts,
        #[case] object: Option<CSIDriver>,
        #[case] want: bool,
    ) {
        assert_eq!(publishes_capacity(&c, &d, object.as_ref()), want);
    }

    #[rstest]
    #[case::serves_here(berth(), Some(&[("topology.berth.dev/node", "n1")][..]))]
    #[case::no_topology_means_everywhere(DriverFacts { has_topology: false, node: None, ..berth() }, Some(&[][..]))]
    #[case::topology_but_not_here(DriverFacts { node: None, ..berth() }, None)]
    fn capacity_segments(#[case] d: DriverFacts, #[case] want: Option<&[(&str, &str)]>) {
        let want = want.map(|w| w.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        assert_eq!(capacity_segment(&d), want);
    }

    #[test]
    fn the_capacity_request_drops_provisioner_parameters() {
        let c = class(
            "csi.berth.dev",
            json!({"pool": "fast", "csi.storage.k8s.io/fstype": "xfs",
                   "csi.storage.k8s.io/provisioner-secret-name": "s"}),
        );
        let segment = BTreeMap::from([("topology.berth.dev/node".to_owned(), "n1".to_owned())]);
        let req = capacity_request(&c, &segment);
        assert_eq!(req.parameters, HashMap::from([("pool".to_owned(), "fast".to_owned())]));
        let [cap] = req.volume_capabilities.as_slice() else {
            panic!("{req:?}")
        };
        assert_eq!(
            cap.access_mode.as_ref().map(|m| m.mode),
            Some(Mode::SingleNodeWriter as i32)
        );
        assert_eq!(
            cap.access_type,
            Some(AccessType::Mount(MountVolume {
                fs_type: "xfs".into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: String::new(),
            }))
        );
        assert_eq!(
            req.accessible_topology.unwrap().segments,
            HashMap::from([("topology.berth.dev/node".to_owned(), "n1".to_owned())])
        );
        assert_eq!(capacity_request(&c, &BTreeMap::new()).accessible_topology, None);
    }

    #[test]
    fn capacity_names_are_stable_and_distinct() {
        let seg = |v: &str| BTreeMap::from([("k".to_owned(), v.to_owned())]);
        let a = capacity_name("fast", "d", &seg("n1"));
        assert_eq!(a, capacity_name("fast", "d", &seg("n1")));
        assert!(a.starts_with("csisc-") && a.len() == 22, "{a}");
        assert!(berth_api::names::dns1123_subdomain(&a).is_empty());
        for other in [
            capacity_name("fast", "d", &seg("n2")),
            capacity_name("slow", "d", &seg("n1")),
            capacity_name("fast", "e", &seg("n1")),
            capacity_name("fast", "d", &BTreeMap::new()),
        ] {
            assert_ne!(a, other);
        }
    }

    #[rstest]
    #[case::new(None, Reported { available: 2 << 30, maximum_volume_size: Some(1 << 30) }, Some(("2Gi", Some("1Gi"))))]
    #[case::unchanged(Some(("2Gi", Some("1Gi"))), Reported { available: 2 << 30, maximum_volume_size: Some(1 << 30) }, None)]
    #[case::less_free(Some(("2Gi", Some("1Gi"))), Reported { available: 1 << 30, maximum_volume_size: Some(1 << 30) }, Some(("1Gi", Some("1Gi"))))]
    #[case::no_maximum(Some(("2Gi", Some("1Gi"))), Reported { available: 2 << 30, maximum_volume_size: None }, Some(("2Gi", None)))]
    #[case::negative_is_zero(None, Reported { available: -5, maximum_volume_size: None }, Some(("0", None)))]
    fn capacities_follow_the_driver(
        #[case] existing: Option<(&str, Option<&str>)>,
        #[case] reported: Reported,
        #[case] want: Option<(&str, Option<&str>)>,
    ) {
        let segment = BTreeMap::from([("topology.berth.dev/node".to_owned(), "n1".to_owned())]);
        let existing = existing.map(|(cap, max)| {
            let mut c = desired_capacity(
                None,
                "fast",
                "csi.berth.dev",
                &segment,
                Reported {
                    available: 0,
                    maximum_volume_size: None,
                },
            )
            .unwrap();
            c.capacity = Some(ApiQuantity(cap.to_owned()));
            c.maximum_volume_size = max.map(|m| ApiQuantity(m.to_owned()));
            c
        });
        let got = desired_capacity(existing.as_ref(), "fast", "csi.berth.dev", &segment, reported);
        assert_eq!(
            got.as_ref().map(|c| (
                c.capacity.as_ref().unwrap().0.as_str(),
                c.maximum_volume_size.as_ref().map(|q| q.0.as_str())
            )),
            want
        );
        if let Some(c) = got {
            assert_eq!(c.metadata.namespace.as_deref(), Some(CAPACITY_NAMESPACE));
            assert_eq!(c.storage_class_name, "fast");
            assert!(published_here(&c, "csi.berth.dev", &segment));
            assert!(!published_here(&c, "csi.berth.dev", &BTreeMap::new()));
            assert!(!published_here(&c, "other", &segment));
            let v = serde_json::to_value(&c).unwrap();
            assert_eq!(
                v["nodeTopology"],
                json!({"matchLabels": {"topology.berth.dev/node": "n1"}})
            );
        }
    }

    #[test]
    fn an_empty_segment_reaches_every_node() {
        assert_eq!(
            serde_json::to_value(capacity_topology(&BTreeMap::new())).unwrap(),
            json!({})
        );
    }
}

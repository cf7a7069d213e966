//! Server-side printing: the `meta.k8s.io/v1` `Table` that `kubectl get` asks for, with the same
//! columns and cells as Kubernetes 1.34 (`pkg/printers/internalversion/printers.go`; for PVs:
//! NAME, CAPACITY, ACCESS MODES, RECLAIM POLICY, STATUS, CLAIM, STORAGECLASS,
//! VOLUMEATTRIBUTESCLASS, REASON, AGE, and VOLUMEMODE with priority 1). The snapshot kinds are
//! printed as a CRD is, from the external-snapshotter `additionalPrinterColumns`.
//!
//! Like kube-apiserver, every column is filled (the "wide" ones too); kubectl hides priority-1
//! columns unless `-o wide`. Cells keep Kubernetes' JSON types (strings, integers, booleans) and
//! its placeholders (`<none>`, `<unset>`, `<unknown>`, `<invalid>`). Never panics on odd objects.

use serde_json::{Map, Value, json};

use crate::Resource;
use crate::quantity;

/// Builds the Table (as JSON, ready to send) for `objects` of kind `res`. `now` computes AGE.
/// `include_object` is the request's `includeObject` (None, Metadata or Object).
/// `metadata.resourceVersion` is left for the server to fill.
pub fn table(res: &Resource, objects: &[Value], now: jiff::Timestamp, include_object: IncludeObject) -> Value {
    let columns: Vec<Value> = columns(res.kind)
        .iter()
        .map(|c| {
            json!({"name": c.name, "type": c.ty, "format": c.format, "description": c.description, "priority": c.priority})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let (cells, conditions) = cells(res.kind, obj, now);
            let mut row = Map::new();
            row.insert("cells".into(), Value::Array(cells));
            if let Some(c) = conditions {
                row.insert("conditions".into(), c);
            }
            match include_object {
                IncludeObject::None => {}
                IncludeObject::Object => {
                    row.insert("object".into(), obj.clone());
                }
                IncludeObject::Metadata => {
                    row.insert(
                        "object".into(),
                        json!({
                            "kind": "PartialObjectMetadata",
                            "apiVersion": "meta.k8s.io/v1",
                            "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
                        }),
                    );
                }
            }
            Value::Object(row)
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// What each row carries in `object`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    None,
    /// A `PartialObjectMetadata` (kubectl's default).
    #[default]
    Metadata,
    Object,
}

/// One column of a Table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    /// `string`, `integer`, `boolean`, `date`, `number`
    pub ty: &'static str,
    /// `name` for the name column, else empty.
    pub format: &'static str,
    pub description: &'static str,
    /// 0: always shown; 1: only with `-o wide`.
    pub priority: u8,
}

const fn col(name: &'static str, ty: &'static str, description: &'static str) -> Column {
    Column {
        name,
        ty,
        format: "",
        description,
        priority: 0,
    }
}

const fn wide(name: &'static str, ty: &'static str, description: &'static str) -> Column {
    Column {
        name,
        ty,
        format: "",
        description,
        priority: 1,
    }
}

const NAME: Column = Column {
    name: "Name",
    ty: "string",
    format: "name",
    description: "Name must be unique within a namespace. Cannot be updated.",
    priority: 0,
};
const AGE: Column = col(
    "Age",
    "string",
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);
/// A CRD's `date` Age column (`.metadata.creationTimestamp`).
const CRD_AGE: Column = col("Age", "date", "");

/// The columns of `kind`, in order.
pub fn columns(kind: &str) -> Vec<Column> {
    match kind {
        "PersistentVolume" => vec![
            NAME,
            col(
                "Capacity",
                "string",
                "capacity is the description of the persistent volume's resources and capacity.",
            ),
            col(
                "Access Modes",
                "string",
                "accessModes contains all ways the volume can be mounted.",
            ),
            col(
                "Reclaim Policy",
                "string",
                "persistentVolumeReclaimPolicy defines what happens to a persistent volume when released from its claim.",
            ),
            col(
                "Status",
                "string",
                "phase indicates if a volume is available, bound to a claim, or released by a claim.",
            ),
            col(
                "Claim",
                "string",
                "claimRef is part of a bi-directional binding between PersistentVolume and PersistentVolumeClaim.",
            ),
            col("StorageClass", "string", "StorageClass of the pv"),
            col("VolumeAttributesClass", "string", "VolumeAttributesClass of the pv"),
            col(
                "Reason",
                "string",
                "reason is a brief CamelCase string that describes any failure.",
            ),
            AGE,
            wide(
                "VolumeMode",
                "string",
                "volumeMode defines if a volume is intended to be used with a formatted filesystem or to remain in raw block state.",
            ),
        ],
        "PersistentVolumeClaim" => vec![
            NAME,
            col(
                "Status",
                "string",
                "phase represents the current phase of PersistentVolumeClaim.",
            ),
            col(
                "Volume",
                "string",
                "volumeName is the binding reference to the PersistentVolume backing this claim.",
            ),
            col(
                "Capacity",
                "string",
                "capacity represents the actual resources of the underlying volume.",
            ),
            col(
                "Access Modes",
                "string",
                "accessModes contains the actual access modes the volume backing the PVC has.",
            ),
            col("StorageClass", "string", "StorageClass of the pvc"),
            col("VolumeAttributesClass", "string", "VolumeAttributesClass of the pvc"),
            AGE,
            wide(
                "VolumeMode",
                "string",
                "volumeMode defines what type of volume is required by the claim.",
            ),
        ],
        "StorageClass" => vec![
            NAME,
            col(
                "Provisioner",
                "string",
                "provisioner indicates the type of the provisioner.",
            ),
            col(
                "ReclaimPolicy",
                "string",
                "reclaimPolicy controls the reclaimPolicy for dynamically provisioned PersistentVolumes of this storage class.",
            ),
            col(
                "VolumeBindingMode",
                "string",
                "volumeBindingMode indicates how PersistentVolumeClaims should be provisioned and bound.",
            ),
            col(
                "AllowVolumeExpansion",
                "string",
                "allowVolumeExpansion shows whether the storage class allow volume expand.",
            ),
            AGE,
        ],
        "VolumeAttachment" => vec![
            NAME,
            Column {
                format: "name",
                ..col(
                    "Attacher",
                    "string",
                    "attacher indicates the name of the volume driver that MUST handle this request.",
                )
            },
            col(
                "PV",
                "string",
                "persistentVolumeName represents the name of the persistent volume to attach.",
            ),
            col(
                "Node",
                "string",
                "nodeName represents the node that the volume should be attached to.",
            ),
            col(
                "Attached",
                "boolean",
                "attached indicates the volume is successfully attached.",
            ),
            AGE,
        ],
        "CSIDriver" => vec![
            NAME,
            col(
                "AttachRequired",
                "boolean",
                "attachRequired indicates this CSI volume driver requires an attach operation.",
            ),
            col(
                "PodInfoOnMount",
                "boolean",
                "podInfoOnMount indicates this CSI volume driver requires additional pod information during mount operations.",
            ),
            col(
                "StorageCapacity",
                "boolean",
                "storageCapacity indicates that the CSI volume driver wants pod scheduling to consider the storage capacity that the driver deployment will report.",
            ),
            col(
                "TokenRequests",
                "string",
                "tokenRequests indicates the CSI driver needs pods' service account tokens it is mounting volume for to do necessary authentication.",
            ),
            col(
                "RequiresRepublish",
                "boolean",
                "requiresRepublish indicates the CSI driver wants NodePublishVolume being periodically called to reflect any possible change in the mounted volume.",
            ),
            col(
                "Modes",
                "string",
                "volumeLifecycleModes defines what kind of volumes this CSI volume driver supports.",
            ),
            AGE,
        ],
        "CSINode" => vec![
            NAME,
            col(
                "Drivers",
                "integer",
                "Drivers indicates the number of CSI drivers registered on the node",
            ),
            AGE,
        ],
        "CSIStorageCapacity" => vec![
            NAME,
            col(
                "StorageClassName",
                "string",
                "storageClassName represents the name of the StorageClass that the reported capacity applies to.",
            ),
            col(
                "Capacity",
                "string",
                "capacity is the value reported by the CSI driver in its GetCapacityResponse for a GetCapacityRequest with topology and parameters that match the previous fields.",
            ),
        ],
        "Pod" => vec![
            NAME,
            col(
                "Ready",
                "string",
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            AGE,
            wide("IP", "string", "podIP address allocated to the pod."),
            wide(
                "Node",
                "string",
                "NodeName indicates in which node this pod is scheduled.",
            ),
            wide(
                "Nominated Node",
                "string",
                "nominatedNodeName is set only when this pod preempts other pods on the node.",
            ),
            wide(
                "Readiness Gates",
                "string",
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ],
        "Secret" => vec![
            NAME,
            col(
                "Type",
                "string",
                "Used to facilitate programmatic handling of secret data.",
            ),
            col("Data", "string", "Data contains the secret data."),
            AGE,
        ],
        "ConfigMap" => vec![
            NAME,
            col("Data", "string", "Data contains the configuration data."),
            AGE,
        ],
        "Namespace" => vec![NAME, col("Status", "string", "The status of the namespace"), AGE],
        "Node" => vec![
            NAME,
            col("Status", "string", "The status of the node"),
            col("Roles", "string", "The roles of the node"),
            AGE,
            col("Version", "string", "Kubelet Version reported by the node."),
            wide("Internal-IP", "string", "List of addresses reachable to the node."),
            wide("External-IP", "string", "List of addresses reachable to the node."),
            wide(
                "OS-Image",
                "string",
                "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
            ),
            wide(
                "Kernel-Version",
                "string",
                "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
            ),
            wide(
                "Container-Runtime",
                "string",
                "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
            ),
        ],
        "Event" => vec![
            col(
                "Last Seen",
                "string",
                "The time at which the most recent occurrence of this event was recorded.",
            ),
            col(
                "Type",
                "string",
                "Type of this event (Normal, Warning), new types could be added in the future",
            ),
            col(
                "Reason",
                "string",
                "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
            ),
            col("Object", "string", "The object that this event is about."),
            wide(
                "Subobject",
                "string",
                "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement.",
            ),
            wide("Source", "string", "The component reporting this event."),
            col(
                "Message",
                "string",
                "A human-readable description of the status of this operation.",
            ),
            wide(
                "First Seen",
                "string",
                "The time at which the event was first recorded.",
            ),
            wide("Count", "string", "The number of times this event has occurred."),
            Column {
                format: "name",
                ..wide(
                    "Name",
                    "string",
                    "Name must be unique within a namespace. Cannot be updated.",
                )
            },
        ],
        "VolumeSnapshot" => vec![
            NAME,
            col(
                "ReadyToUse",
                "boolean",
                "Indicates if the snapshot is ready to be used to restore a volume.",
            ),
            col(
                "SourcePVC",
                "string",
                "If a new snapshot needs to be created, this contains the name of the source PVC from which this snapshot was (or will be) created.",
            ),
            col(
                "SourceSnapshotContent",
                "string",
                "If a snapshot already exists, this contains the name of the existing VolumeSnapshotContent object representing the existing snapshot.",
            ),
            col(
                "RestoreSize",
                "string",
                "Represents the minimum size of volume required to rehydrate from this snapshot.",
            ),
            col(
                "SnapshotClass",
                "string",
                "The name of the VolumeSnapshotClass requested by the VolumeSnapshot.",
            ),
            col(
                "SnapshotContent",
                "string",
                "Name of the VolumeSnapshotContent object to which the VolumeSnapshot object intends to bind to. Please note that verification of binding actually requires checking both VolumeSnapshot and VolumeSnapshotContent to ensure both are pointing at each other. Binding MUST be verified prior to usage of this object.",
            ),
            col(
                "CreationTime",
                "date",
                "Timestamp when the point-in-time snapshot was taken by the underlying storage system.",
            ),
            CRD_AGE,
        ],
        "VolumeSnapshotContent" => vec![
            NAME,
            col(
                "ReadyToUse",
                "boolean",
                "Indicates if a snapshot is ready to be used to restore a volume.",
            ),
            col(
                "RestoreSize",
                "integer",
                "Represents the complete size of the snapshot in bytes",
            ),
            col(
                "DeletionPolicy",
                "string",
                "Determines whether this VolumeSnapshotContent and its physical snapshot on the underlying storage system should be deleted when its bound VolumeSnapshot is deleted.",
            ),
            col(
                "Driver",
                "string",
                "Name of the CSI driver used to create the physical snapshot on the underlying storage system.",
            ),
            col(
                "VolumeSnapshotClass",
                "string",
                "Name of the VolumeSnapshotClass to which this snapshot belongs.",
            ),
            col(
                "VolumeSnapshot",
                "string",
                "Name of the VolumeSnapshot object to which this VolumeSnapshotContent object is bound.",
            ),
            col(
                "VolumeSnapshotNamespace",
                "string",
                "Namespace of the VolumeSnapshot object to which this VolumeSnapshotContent object is bound.",
            ),
            CRD_AGE,
        ],
        "VolumeSnapshotClass" => vec![
            NAME,
            col("Driver", "string", ""),
            col(
                "DeletionPolicy",
                "string",
                "Determines whether a VolumeSnapshotContent created through the VolumeSnapshotClass should be deleted when its bound VolumeSnapshot is deleted.",
            ),
            CRD_AGE,
        ],
        _ => vec![NAME, AGE],
    }
}

// ---- small readers ----

fn s<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn b(obj: &Value, ptr: &str) -> Option<bool> {
    obj.pointer(ptr).and_then(Value::as_bool)
}

fn i(obj: &Value, ptr: &str) -> i64 {
    obj.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn arr<'a>(obj: &'a Value, ptr: &str) -> &'a [Value] {
    obj.pointer(ptr)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn len_of(obj: &Value, ptr: &str) -> usize {
    match obj.pointer(ptr) {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    }
}

fn or<'a>(v: &'a str, placeholder: &'a str) -> &'a str {
    if v.is_empty() { placeholder } else { v }
}

fn timestamp(v: &str) -> Option<jiff::Timestamp> {
    v.parse::<jiff::Timestamp>().ok()
}

/// `translateTimestampSince`: `<unknown>` for an unset time, else [`human_duration`].
pub fn age(ts: &str, now: jiff::Timestamp) -> String {
    match timestamp(ts) {
        None => "<unknown>".to_owned(),
        Some(t) => human_duration(now.as_nanosecond() - t.as_nanosecond()),
    }
}

/// `k8s.io/apimachinery/pkg/util/duration.HumanDuration`, from a signed nanosecond count:
/// exact seconds below 2 minutes, minutes and seconds below 10 minutes, and so on up to years;
/// `<invalid>` more than a second in the future.
pub fn human_duration(nanos: i128) -> String {
    const S: i128 = 1_000_000_000;
    let seconds = nanos / S;
    if seconds < -1 {
        return "<invalid>".to_owned();
    } else if seconds < 0 {
        return "0s".to_owned();
    } else if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = nanos / (60 * S);
    if minutes < 10 {
        let sec = seconds % 60;
        return if sec == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{sec}s")
        };
    } else if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = nanos / (3600 * S);
    if hours < 8 {
        let m = minutes % 60;
        if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        let h = hours % 24;
        if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        }
    } else if hours < 24 * 365 * 2 {
        format!("{}d", hours / 24)
    } else if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        }
    } else {
        format!("{}y", hours / 24 / 365)
    }
}

/// `GetAccessModesAsString`: RWO, ROX, RWX, RWOP in that order, each once.
pub fn access_modes(modes: &[Value]) -> String {
    let has = |m: &str| modes.iter().any(|v| v.as_str() == Some(m));
    [
        ("ReadWriteOnce", "RWO"),
        ("ReadOnlyMany", "ROX"),
        ("ReadWriteMany", "RWX"),
        ("ReadWriteOncePod", "RWOP"),
    ]
    .iter()
    .filter(|(m, _)| has(m))
    .map(|(_, short)| *short)
    .collect::<Vec<_>>()
    .join(",")
}

/// A quantity as Kubernetes' `Quantity.String()` prints it (`0` when unset).
fn quantity_string(v: Option<&Value>) -> String {
    match v.map(quantity::from_json) {
        Some(Ok(q)) => q.canonical(),
        Some(Err(_)) => v.and_then(Value::as_str).unwrap_or("").to_owned(),
        None => "0".to_owned(),
    }
}

/// The beta annotation wins over `spec.storageClassName`, as in Kubernetes' helpers.
fn class_of(obj: &Value) -> String {
    match obj
        .pointer("/metadata/annotations/volume.beta.kubernetes.io~1storage-class")
        .and_then(Value::as_str)
    {
        Some(c) => c.to_owned(),
        None => s(obj, "/spec/storageClassName").to_owned(),
    }
}

/// Whether a StorageClass is annotated as the default one (GA or beta annotation).
pub fn is_default_class(obj: &Value) -> bool {
    let ann = |k: &str| {
        obj.get("metadata")
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get(k))
            .and_then(Value::as_str)
            == Some("true")
    };
    ann("storageclass.kubernetes.io/is-default-class") || ann("storageclass.beta.kubernetes.io/is-default-class")
}

fn deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null())
}

fn cells(kind: &str, obj: &Value, now: jiff::Timestamp) -> (Vec<Value>, Option<Value>) {
    let name = s(obj, "/metadata/name");
    let created = age(s(obj, "/metadata/creationTimestamp"), now);
    let cells = match kind {
        "PersistentVolume" => {
            let claim = match obj.pointer("/spec/claimRef").filter(|c| c.is_object()) {
                Some(c) => format!("{}/{}", s(c, "/namespace"), s(c, "/name")),
                None => String::new(),
            };
            let phase = if deleting(obj) {
                "Terminating"
            } else {
                s(obj, "/status/phase")
            };
            vec![
                json!(name),
                json!(quantity_string(obj.pointer("/spec/capacity/storage"))),
                json!(access_modes(arr(obj, "/spec/accessModes"))),
                json!(s(obj, "/spec/persistentVolumeReclaimPolicy")),
                json!(phase),
                json!(claim),
                json!(class_of(obj)),
                json!(or(s(obj, "/spec/volumeAttributesClassName"), "<unset>")),
                json!(s(obj, "/status/reason")),
                json!(created),
                json!(or(s(obj, "/spec/volumeMode"), "<unset>")),
            ]
        }
        "PersistentVolumeClaim" => {
            let phase = if deleting(obj) {
                "Terminating"
            } else {
                s(obj, "/status/phase")
            };
            let bound = !s(obj, "/spec/volumeName").is_empty();
            let (capacity, modes) = if bound {
                (
                    quantity_string(obj.pointer("/status/capacity/storage")),
                    access_modes(arr(obj, "/status/accessModes")),
                )
            } else {
                (String::new(), String::new())
            };
            vec![
                json!(name),
                json!(phase),
                json!(s(obj, "/spec/volumeName")),
                json!(capacity),
                json!(modes),
                json!(class_of(obj)),
                json!(or(s(obj, "/spec/volumeAttributesClassName"), "<unset>")),
                json!(created),
                json!(or(s(obj, "/spec/volumeMode"), "<unset>")),
            ]
        }
        "StorageClass" => {
            let shown = if is_default_class(obj) {
                format!("{name} (default)")
            } else {
                name.to_owned()
            };
            vec![
                json!(shown),
                json!(s(obj, "/provisioner")),
                json!(or(s(obj, "/reclaimPolicy"), "Delete")),
                json!(or(s(obj, "/volumeBindingMode"), "Immediate")),
                json!(b(obj, "/allowVolumeExpansion").unwrap_or(false)),
                json!(created),
            ]
        }
        "VolumeAttachment" => vec![
            json!(name),
            json!(s(obj, "/spec/attacher")),
            json!(s(obj, "/spec/source/persistentVolumeName")),
            json!(s(obj, "/spec/nodeName")),
            json!(b(obj, "/status/attached").unwrap_or(false)),
            json!(created),
        ],
        "CSIDriver" => {
            let tokens = match obj.pointer("/spec/tokenRequests").and_then(Value::as_array) {
                Some(t) => t.iter().map(|t| s(t, "/audience")).collect::<Vec<_>>().join(","),
                None => "<unset>".to_owned(),
            };
            let modes: Vec<&str> = arr(obj, "/spec/volumeLifecycleModes")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            vec![
                json!(name),
                json!(b(obj, "/spec/attachRequired").unwrap_or(true)),
                json!(b(obj, "/spec/podInfoOnMount").unwrap_or(false)),
                json!(b(obj, "/spec/storageCapacity").unwrap_or(false)),
                json!(tokens),
                json!(b(obj, "/spec/requiresRepublish").unwrap_or(false)),
                json!(or(&modes.join(","), "<none>")),
                json!(created),
            ]
        }
        "CSINode" => vec![json!(name), json!(len_of(obj, "/spec/drivers")), json!(created)],
        "CSIStorageCapacity" => {
            let capacity = match obj.get("capacity").filter(|c| !c.is_null()) {
                Some(c) => quantity_string(Some(c)),
                None => "<unset>".to_owned(),
            };
            vec![json!(name), json!(s(obj, "/storageClassName")), json!(capacity)]
        }
        "Pod" => return pod_cells(obj, now),
        "Secret" => vec![
            json!(name),
            json!(s(obj, "/type")),
            json!(len_of(obj, "/data")),
            json!(created),
        ],
        "ConfigMap" => vec![
            json!(name),
            json!(len_of(obj, "/data") + len_of(obj, "/binaryData")),
            json!(created),
        ],
        "Namespace" => vec![json!(name), json!(s(obj, "/status/phase")), json!(created)],
        "Node" => node_cells(obj, &created),
        "Event" => event_cells(obj, now),
        "VolumeSnapshot" => vec![
            json!(name),
            crd_cell(obj, "/status/readyToUse"),
            crd_cell(obj, "/spec/source/persistentVolumeClaimName"),
            crd_cell(obj, "/spec/source/volumeSnapshotContentName"),
            crd_cell(obj, "/status/restoreSize"),
            crd_cell(obj, "/spec/volumeSnapshotClassName"),
            crd_cell(obj, "/status/boundVolumeSnapshotContentName"),
            crd_date(obj, "/status/creationTime", now),
            crd_date(obj, "/metadata/creationTimestamp", now),
        ],
        "VolumeSnapshotContent" => vec![
            json!(name),
            crd_cell(obj, "/status/readyToUse"),
            crd_cell(obj, "/status/restoreSize"),
            crd_cell(obj, "/spec/deletionPolicy"),
            crd_cell(obj, "/spec/driver"),
            crd_cell(obj, "/spec/volumeSnapshotClassName"),
            crd_cell(obj, "/spec/volumeSnapshotRef/name"),
            crd_cell(obj, "/spec/volumeSnapshotRef/namespace"),
            crd_date(obj, "/metadata/creationTimestamp", now),
        ],
        "VolumeSnapshotClass" => vec![
            json!(name),
            crd_cell(obj, "/driver"),
            crd_cell(obj, "/deletionPolicy"),
            crd_date(obj, "/metadata/creationTimestamp", now),
        ],
        _ => vec![json!(name), json!(created)],
    };
    (cells, None)
}

/// A CRD column cell: the value at the JSON path, or null (kubectl shows `<none>`).
fn crd_cell(obj: &Value, ptr: &str) -> Value {
    obj.pointer(ptr).cloned().unwrap_or(Value::Null)
}

/// A CRD `date` column: the age of the timestamp, `<invalid>` if it does not parse.
fn crd_date(obj: &Value, ptr: &str, now: jiff::Timestamp) -> Value {
    match obj.pointer(ptr).and_then(Value::as_str) {
        None => Value::Null,
        Some(t) => match timestamp(t) {
            Some(ts) => json!(human_duration(now.as_nanosecond() - ts.as_nanosecond())),
            None => json!("<invalid>"),
        },
    }
}

fn node_cells(obj: &Value, created: &str) -> Vec<Value> {
    let mut status: Vec<String> = Vec::new();
    if let Some(c) = arr(obj, "/status/conditions")
        .iter()
        .rev()
        .find(|c| s(c, "/type") == "Ready")
    {
        status.push(if s(c, "/status") == "True" {
            "Ready".into()
        } else {
            "NotReady".into()
        });
    }
    if status.is_empty() {
        status.push("Unknown".into());
    }
    if b(obj, "/spec/unschedulable") == Some(true) {
        status.push("SchedulingDisabled".into());
    }
    let mut roles = std::collections::BTreeSet::new();
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/").filter(|r| !r.is_empty()) {
                roles.insert(role.to_owned());
            } else if k == "kubernetes.io/role" && v.as_str().is_some_and(|v| !v.is_empty()) {
                roles.insert(v.as_str().unwrap_or("").to_owned());
            }
        }
    }
    let roles = roles.into_iter().collect::<Vec<_>>().join(",");
    let address = |ty: &str| {
        arr(obj, "/status/addresses")
            .iter()
            .find(|a| s(a, "/type") == ty)
            .map(|a| s(a, "/address").to_owned())
            .unwrap_or_else(|| "<none>".to_owned())
    };
    vec![
        json!(s(obj, "/metadata/name")),
        json!(status.join(",")),
        json!(or(&roles, "<none>")),
        json!(created),
        json!(s(obj, "/status/nodeInfo/kubeletVersion")),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(or(s(obj, "/status/nodeInfo/osImage"), "<unknown>")),
        json!(or(s(obj, "/status/nodeInfo/kernelVersion"), "<unknown>")),
        json!(or(s(obj, "/status/nodeInfo/containerRuntimeVersion"), "<unknown>")),
    ]
}

fn event_cells(obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let first_ts = s(obj, "/firstTimestamp");
    let first = if timestamp(first_ts).is_some() {
        age(first_ts, now)
    } else {
        age(s(obj, "/eventTime"), now)
    };
    let last_ts = s(obj, "/lastTimestamp");
    let mut last = if timestamp(last_ts).is_some() {
        age(last_ts, now)
    } else {
        first.clone()
    };
    let mut count = i(obj, "/count");
    if obj.get("series").is_some_and(Value::is_object) {
        last = age(s(obj, "/series/lastObservedTime"), now);
        count = i(obj, "/series/count");
    } else if count == 0 {
        count = 1;
    }
    let kind = s(obj, "/involvedObject/kind").to_lowercase();
    let target = match s(obj, "/involvedObject/name") {
        "" => kind,
        n => format!("{kind}/{n}"),
    };
    let component = or(s(obj, "/source/component"), s(obj, "/reportingComponent"));
    let instance = or(s(obj, "/source/host"), s(obj, "/reportingInstance"));
    let source = if instance.is_empty() {
        component.to_owned()
    } else {
        format!("{component}, {instance}")
    };
    vec![
        json!(last),
        json!(s(obj, "/type")),
        json!(s(obj, "/reason")),
        json!(target),
        json!(s(obj, "/involvedObject/fieldPath")),
        json!(source),
        json!(s(obj, "/message").trim()),
        json!(first),
        json!(count),
        json!(s(obj, "/metadata/name")),
    ]
}

fn terminated_reason(t: &Value, prefix: &str) -> String {
    let reason = s(t, "/reason");
    if !reason.is_empty() {
        return format!("{prefix}{reason}");
    }
    let signal = i(t, "/signal");
    if signal != 0 {
        format!("{prefix}Signal:{signal}")
    } else {
        format!("{prefix}ExitCode:{}", i(t, "/exitCode"))
    }
}

/// `printPod`: READY counts, the STATUS reason (init progress, waiting/terminated reasons,
/// Terminating), RESTARTS with the time since the last one, and the wide columns.
fn pod_cells(pod: &Value, now: jiff::Timestamp) -> (Vec<Value>, Option<Value>) {
    let phase = s(pod, "/status/phase");
    let mut reason = or(s(pod, "/status/reason"), phase).to_owned();
    if arr(pod, "/status/conditions")
        .iter()
        .any(|c| s(c, "/type") == "PodScheduled" && s(c, "/reason") == "SchedulingGated")
    {
        reason = "SchedulingGated".into();
    }
    let init_specs = arr(pod, "/spec/initContainers");
    let restartable = |name: &str| {
        init_specs
            .iter()
            .any(|c| s(c, "/name") == name && s(c, "/restartPolicy") == "Always")
    };
    let mut total = arr(pod, "/spec/containers").len();
    total += init_specs.iter().filter(|c| s(c, "/restartPolicy") == "Always").count();
    let mut ready = 0usize;
    let mut restarts = 0i64;
    let mut sidecar_restarts = 0i64;
    let mut last_restart: Option<jiff::Timestamp> = None;
    let mut last_sidecar_restart: Option<jiff::Timestamp> = None;
    let later = |a: Option<jiff::Timestamp>, b: Option<jiff::Timestamp>| match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    let init_statuses = arr(pod, "/status/initContainerStatuses");
    let mut initializing = false;
    for (idx, c) in init_statuses.iter().enumerate() {
        let finished = timestamp(s(c, "/lastState/terminated/finishedAt"));
        restarts += i(c, "/restartCount");
        last_restart = later(last_restart, finished);
        let sidecar = restartable(s(c, "/name"));
        if sidecar {
            sidecar_restarts += i(c, "/restartCount");
            last_sidecar_restart = later(last_sidecar_restart, finished);
        }
        let terminated = c.pointer("/state/terminated").filter(|t| t.is_object());
        let waiting_reason = s(c, "/state/waiting/reason");
        if terminated.is_some_and(|t| i(t, "/exitCode") == 0) {
            continue;
        }
        if sidecar && b(c, "/started") == Some(true) {
            if b(c, "/ready") == Some(true) {
                ready += 1;
            }
            continue;
        }
        reason = if let Some(t) = terminated {
            terminated_reason(t, "Init:")
        } else if !waiting_reason.is_empty() && waiting_reason != "PodInitializing" {
            format!("Init:{waiting_reason}")
        } else {
            format!("Init:{idx}/{}", init_specs.len())
        };
        initializing = true;
        break;
    }
    let initialized = arr(pod, "/status/conditions")
        .iter()
        .any(|c| s(c, "/type") == "Initialized" && s(c, "/status") == "True");
    if !initializing || initialized {
        restarts = sidecar_restarts;
        last_restart = last_sidecar_restart;
        let mut has_running = false;
        for c in arr(pod, "/status/containerStatuses").iter().rev() {
            restarts += i(c, "/restartCount");
            last_restart = later(last_restart, timestamp(s(c, "/lastState/terminated/finishedAt")));
            let waiting = s(c, "/state/waiting/reason");
            let terminated = c.pointer("/state/terminated").filter(|t| t.is_object());
            if !waiting.is_empty() {
                reason = waiting.to_owned();
            } else if let Some(t) = terminated {
                reason = terminated_reason(t, "");
            } else if b(c, "/ready") == Some(true) && c.pointer("/state/running").is_some_and(Value::is_object) {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            let pod_ready = arr(pod, "/status/conditions")
                .iter()
                .any(|c| s(c, "/type") == "Ready" && s(c, "/status") == "True");
            reason = if pod_ready { "Running".into() } else { "NotReady".into() };
        }
    }
    if deleting(pod) && s(pod, "/status/reason") == "NodeLost" {
        reason = "Unknown".into();
    } else if deleting(pod) && phase != "Succeeded" && phase != "Failed" {
        reason = "Terminating".into();
    }
    let restarts_str = match last_restart {
        Some(t) if restarts != 0 => format!(
            "{restarts} ({} ago)",
            human_duration(now.as_nanosecond() - t.as_nanosecond())
        ),
        _ => restarts.to_string(),
    };
    let ip = arr(pod, "/status/podIPs")
        .first()
        .map(|p| s(p, "/ip"))
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| s(pod, "/status/podIP"));
    let gates = arr(pod, "/spec/readinessGates");
    let gates_str = if gates.is_empty() {
        "<none>".to_owned()
    } else {
        let conds = arr(pod, "/status/conditions");
        let true_count = gates
            .iter()
            .filter(|g| {
                conds
                    .iter()
                    .find(|c| s(c, "/type") == s(g, "/conditionType"))
                    .is_some_and(|c| s(c, "/status") == "True")
            })
            .count();
        format!("{true_count}/{}", gates.len())
    };
    let conditions = match phase {
        "Succeeded" => Some(
            json!([{"type": "Completed", "status": "True", "reason": "Succeeded", "message": "The pod has completed successfully."}]),
        ),
        "Failed" => {
            Some(json!([{"type": "Completed", "status": "True", "reason": "Failed", "message": "The pod failed."}]))
        }
        _ => None,
    };
    (
        vec![
            json!(s(pod, "/metadata/name")),
            json!(format!("{ready}/{total}")),
            json!(reason),
            json!(restarts_str),
            json!(age(s(pod, "/metadata/creationTimestamp"), now)),
            json!(or(ip, "<none>")),
            json!(or(s(pod, "/spec/nodeName"), "<none>")),
            json!(or(s(pod, "/status/nominatedNodeName"), "<none>")),
            json!(gates_str),
        ],
        conditions,
    )
}

#[cfg(test)]
mod tests;

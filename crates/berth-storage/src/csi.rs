//! Berth's built-in CSI driver: the engine behind `berth_csi::Driver`.
//!
//! This module only translates: it checks the fields CSI requires, turns messages into engine
//! calls (run on the blocking pool, since they do system calls), and maps [`EngineError`] to a
//! CSI error in exactly one place. Decisions stay in the engine and in `spec`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use berth_csi::v1::{
    self, controller_service_capability as ccap, node_service_capability as ncap, plugin_capability as pcap,
};
use berth_csi::{CsiError, Driver};

use crate::engine::CreateRequest;
use crate::engine::{Condition, Engine, EngineError};
use crate::journal::{ContentSource, GroupRecord, SnapshotRecord, VolumeRecord};
use crate::spec::{AccessMode, AccessType, Capability, CapacityRange, Kind};

/// The driver name Berth registers (CSIDriver object name).
pub const DRIVER_NAME: &str = "csi.berth.dev";
/// The topology key naming the node a volume lives on.
pub const TOPOLOGY_KEY: &str = "topology.berth.dev/node";

/// The built-in driver.
#[derive(Debug, Clone)]
pub struct BerthDriver {
    engine: Arc<Engine>,
}

impl BerthDriver {
    pub fn new(engine: Arc<Engine>) -> Self {
        BerthDriver { engine }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, CsiError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| CsiError::Internal(format!("engine task failed: {e}")))?
            .map_err(to_csi)
    }

    fn topology(&self) -> v1::Topology {
        v1::Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), self.engine.node_id().to_owned())]),
        }
    }

    fn on_this_node(&self, t: &v1::Topology) -> bool {
        t.segments.get(TOPOLOGY_KEY).map(String::as_str) == Some(self.engine.node_id())
    }

    fn snapshot_message(s: &SnapshotRecord) -> v1::Snapshot {
        v1::Snapshot {
            size_bytes: i64_of(s.size),
            snapshot_id: s.id.to_string(),
            source_volume_id: s.source_volume_id.to_string(),
            creation_time: Some(prost_types::Timestamp {
                seconds: i64_of(s.created_unix),
                nanos: i32::try_from(s.created_nanos).unwrap_or(0),
            }),
            ready_to_use: true,
            group_snapshot_id: s.group_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        }
    }

    fn group_message(g: &GroupRecord, members: &[SnapshotRecord]) -> v1::VolumeGroupSnapshot {
        v1::VolumeGroupSnapshot {
            group_snapshot_id: g.id.to_string(),
            snapshots: members.iter().map(Self::snapshot_message).collect(),
            creation_time: Some(prost_types::Timestamp {
                seconds: i64_of(g.created_unix),
                nanos: i32::try_from(g.created_nanos).unwrap_or(0),
            }),
            ready_to_use: true,
        }
    }

    fn volume_message(&self, rec: &VolumeRecord) -> v1::Volume {
        v1::Volume {
            capacity_bytes: i64::try_from(rec.capacity).unwrap_or(i64::MAX),
            volume_id: rec.id.to_string(),
            volume_context: HashMap::from([
                ("kind".to_owned(), rec.kind.as_str().to_owned()),
                ("pool".to_owned(), rec.pool.clone()),
            ]),
            content_source: rec.source.as_ref().map(|src| {
                use v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
                v1::VolumeContentSource {
                    r#type: Some(match src {
                        ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                            snapshot_id: id.clone(),
                        }),
                        ContentSource::Volume(id) => Type::Volume(VolumeSource { volume_id: id.clone() }),
                    }),
                }
            }),
            accessible_topology: vec![self.topology()],
        }
    }
}

/// The one mapping from engine errors to CSI codes.
fn to_csi(e: EngineError) -> CsiError {
    match e {
        EngineError::Invalid { field, message } => CsiError::InvalidArgument { field, message },
        EngineError::NotFound(m) => CsiError::NotFound(m),
        EngineError::AlreadyExists(m) => CsiError::AlreadyExists(m),
        EngineError::OutOfRange(m) => CsiError::OutOfRange(m),
        EngineError::ResourceExhausted(m) => CsiError::ResourceExhausted(m),
        EngineError::FailedPrecondition(m) => CsiError::FailedPrecondition(m),
        EngineError::Aborted(m) => CsiError::Aborted(m),
        EngineError::Host(berth_host::HostError::Symlink { path }) => CsiError::invalid(
            "target_path",
            format!("{} is a symbolic link; refusing to mount through it", path.display()),
        ),
        EngineError::Host(berth_host::HostError::WrongType { path, reason }) => {
            CsiError::FailedPrecondition(format!("{}: {reason}", path.display()))
        }
        EngineError::Host(e) if e.errno() == Some(libc::EBUSY) => {
            CsiError::FailedPrecondition(format!("{e}; still in use"))
        }
        EngineError::Host(e) if matches!(e.errno(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
            CsiError::ResourceExhausted(e.to_string())
        }
        e @ (EngineError::Host(_) | EngineError::Journal(_) | EngineError::Pool(_)) => {
            CsiError::Internal(e.to_string())
        }
    }
}

fn require<'a>(field: &str, value: &'a str) -> Result<&'a str, CsiError> {
    if value.is_empty() {
        return Err(CsiError::invalid(field, "is required"));
    }
    Ok(value)
}

fn require_path(field: &str, value: &str) -> Result<PathBuf, CsiError> {
    let p = PathBuf::from(require(field, value)?);
    if !p.is_absolute() || value.contains('\0') {
        return Err(CsiError::invalid(field, format!("{value:?} must be an absolute path")));
    }
    Ok(p)
}

/// Decodes one CSI capability.
fn capability(field: &str, cap: &v1::VolumeCapability) -> Result<Capability, CsiError> {
    use v1::volume_capability::AccessType as T;
    use v1::volume_capability::access_mode::Mode;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| CsiError::invalid(format!("{field}.access_mode"), "is required"))?
        .mode;
    let mode = match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        _ => AccessMode::Unsupported(mode),
    };
    match cap.access_type.as_ref() {
        Some(T::Block(_)) => Ok(Capability {
            access_type: AccessType::Block,
            fs_type: String::new(),
            mount_flags: vec![],
            mode,
        }),
        Some(T::Mount(m)) => Ok(Capability {
            access_type: AccessType::Mount,
            fs_type: m.fs_type.clone(),
            mount_flags: m.mount_flags.clone(),
            mode,
        }),
        None => Err(CsiError::invalid(
            format!("{field}.access_type"),
            "is required (block or mount)",
        )),
    }
}

fn capabilities(caps: &[v1::VolumeCapability]) -> Result<Vec<Capability>, CsiError> {
    if caps.is_empty() {
        return Err(CsiError::invalid(
            "volume_capabilities",
            "at least one capability is required",
        ));
    }
    caps.iter().map(|c| capability("volume_capabilities", c)).collect()
}

fn bytes(field: &str, v: i64) -> Result<u64, CsiError> {
    u64::try_from(v).map_err(|_| CsiError::invalid(field, format!("{v} is negative")))
}

fn condition(c: Condition) -> v1::VolumeCondition {
    v1::VolumeCondition {
        abnormal: c.abnormal,
        message: c.message,
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn controller_caps() -> Vec<v1::ControllerServiceCapability> {
    use ccap::rpc::Type;
    [
        Type::CreateDeleteVolume,
        Type::PublishUnpublishVolume,
        Type::ListVolumes,
        Type::GetCapacity,
        Type::CreateDeleteSnapshot,
        Type::ListSnapshots,
        Type::CloneVolume,
        Type::PublishReadonly,
        Type::ExpandVolume,
        Type::ListVolumesPublishedNodes,
        Type::VolumeCondition,
        Type::GetVolume,
        Type::SingleNodeMultiWriter,
        Type::ModifyVolume,
        Type::GetSnapshot,
    ]
    .into_iter()
    .map(|t| v1::ControllerServiceCapability {
        r#type: Some(ccap::Type::Rpc(ccap::Rpc { r#type: t as i32 })),
    })
    .collect()
}

fn node_caps() -> Vec<v1::NodeServiceCapability> {
    use ncap::rpc::Type;
    [
        Type::StageUnstageVolume,
        Type::GetVolumeStats,
        Type::ExpandVolume,
        Type::VolumeCondition,
        Type::SingleNodeMultiWriter,
    ]
    .into_iter()
    .map(|t| v1::NodeServiceCapability {
        r#type: Some(ncap::Type::Rpc(ncap::Rpc { r#type: t as i32 })),
    })
    .collect()
}

impl Driver for BerthDriver {
    async fn get_plugin_info(&self, _req: v1::GetPluginInfoRequest) -> Result<v1::GetPluginInfoResponse, CsiError> {
        Ok(v1::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::new(),
        })
    }

    async fn get_plugin_capabilities(
        &self,
        _req: v1::GetPluginCapabilitiesRequest,
    ) -> Result<v1::GetPluginCapabilitiesResponse, CsiError> {
        use pcap::service::Type;
        let mut capabilities: Vec<v1::PluginCapability> = [
            Type::ControllerService,
            Type::VolumeAccessibilityConstraints,
            Type::GroupControllerService,
        ]
        .into_iter()
        .map(|t| v1::PluginCapability {
            r#type: Some(pcap::Type::Service(pcap::Service { r#type: t as i32 })),
        })
        .collect();
        capabilities.push(v1::PluginCapability {
            r#type: Some(pcap::Type::VolumeExpansion(pcap::VolumeExpansion {
                r#type: pcap::volume_expansion::Type::Online as i32,
            })),
        });
        Ok(v1::GetPluginCapabilitiesResponse { capabilities })
    }

    async fn probe(&self, _req: v1::ProbeRequest) -> Result<v1::ProbeResponse, CsiError> {
        let ready = self.run(|e| e.capacity(Kind::Dir, None)).await.is_ok();
        Ok(v1::ProbeResponse { ready: Some(ready) })
    }

    async fn create_volume(&self, req: v1::CreateVolumeRequest) -> Result<v1::CreateVolumeResponse, CsiError> {
        require("name", &req.name)?;
        let caps = capabilities(&req.volume_capabilities)?;
        let source = match req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            None => None,
            Some(v1::volume_content_source::Type::Snapshot(s)) => Some(ContentSource::Snapshot(
                require("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?.to_owned(),
            )),
            Some(v1::volume_content_source::Type::Volume(v)) => Some(ContentSource::Volume(
                require("volume_content_source.volume.volume_id", &v.volume_id)?.to_owned(),
            )),
        };
        if let Some(reqs) = &req.accessibility_requirements
            && !reqs.requisite.is_empty()
            && !reqs.requisite.iter().any(|t| self.on_this_node(t))
        {
            return Err(CsiError::ResourceExhausted(format!(
                "accessibility_requirements.requisite does not include {TOPOLOGY_KEY}={}; this driver only serves its own node",
                self.engine.node_id()
            )));
        }
        let range = match &req.capacity_range {
            Some(r) => CapacityRange {
                required: bytes("capacity_range.required_bytes", r.required_bytes)?,
                limit: bytes("capacity_range.limit_bytes", r.limit_bytes)?,
            },
            None => CapacityRange::default(),
        };
        let create = CreateRequest {
            name: req.name,
            parameters: req.parameters.into_iter().collect(),
            mutable: req.mutable_parameters.into_iter().collect(),
            capabilities: caps,
            range,
            source,
        };
        let rec = self.run(move |e| e.create(create)).await?;
        Ok(v1::CreateVolumeResponse {
            volume: Some(self.volume_message(&rec)),
        })
    }

    async fn delete_volume(&self, req: v1::DeleteVolumeRequest) -> Result<v1::DeleteVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        self.run(move |e| e.delete_volume(&id)).await?;
        Ok(v1::DeleteVolumeResponse {})
    }

    async fn validate_volume_capabilities(
        &self,
        req: v1::ValidateVolumeCapabilitiesRequest,
    ) -> Result<v1::ValidateVolumeCapabilitiesResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let caps = capabilities(&req.volume_capabilities)?;
        let rec = self.run(move |e| e.volume(&id)).await?;
        Ok(match crate::spec::check_capabilities(rec.kind, &caps) {
            Ok(()) => v1::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(v1::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(e) => v1::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        })
    }

    async fn list_volumes(&self, req: v1::ListVolumesRequest) -> Result<v1::ListVolumesResponse, CsiError> {
        let max = usize::try_from(req.max_entries)
            .map_err(|_| CsiError::invalid("max_entries", format!("{} is negative", req.max_entries)))?;
        let token = req.starting_token;
        let (vols, next) = self
            .run(move |e| {
                let (vols, next) = e.list_volumes(Some(&token), max)?;
                let with_condition = vols
                    .into_iter()
                    .map(|v| {
                        let c = e.condition(&v);
                        let nodes = e.published_nodes(&v.id);
                        (v, c, nodes)
                    })
                    .collect::<Vec<_>>();
                Ok((with_condition, next))
            })
            .await?;
        let entries = vols
            .into_iter()
            .map(|(v, c, nodes)| v1::list_volumes_response::Entry {
                volume: Some(self.volume_message(&v)),
                status: Some(v1::list_volumes_response::VolumeStatus {
                    published_node_ids: nodes,
                    volume_condition: Some(condition(c)),
                }),
            })
            .collect();
        Ok(v1::ListVolumesResponse {
            entries,
            next_token: next.unwrap_or_default(),
        })
    }

    async fn get_capacity(&self, req: v1::GetCapacityRequest) -> Result<v1::GetCapacityResponse, CsiError> {
        if let Some(t) = &req.accessible_topology
            && !self.on_this_node(t)
        {
            return Ok(v1::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: None,
            });
        }
        let caps: Vec<Capability> = req
            .volume_capabilities
            .iter()
            .map(|c| capability("volume_capabilities", c))
            .collect::<Result<_, _>>()?;
        let params: BTreeMap<String, String> = req.parameters.into_iter().collect();
        // Same rules as CreateVolume; an empty capability list means "a plain mount volume".
        let probe_caps = if caps.is_empty() {
            vec![Capability {
                access_type: AccessType::Mount,
                fs_type: String::new(),
                mount_flags: vec![],
                mode: AccessMode::SingleNodeWriter,
            }]
        } else {
            caps
        };
        let (available, max, min) = self
            .run(move |e| {
                let spec = crate::spec::resolve(
                    &params,
                    &probe_caps,
                    CapacityRange { required: 1, limit: 0 },
                    e.default_pool(),
                )?;
                let pool = (spec.kind != Kind::Tmpfs).then_some(spec.pool.as_str());
                let (available, max) = e.capacity(spec.kind, pool)?;
                Ok((available, max, spec.fs.map(berth_host::FileSystem::min_size)))
            })
            .await?;
        Ok(v1::GetCapacityResponse {
            available_capacity: i64_of(available),
            maximum_volume_size: Some(i64_of(max)),
            minimum_volume_size: min.map(i64_of),
        })
    }

    async fn controller_get_capabilities(
        &self,
        _req: v1::ControllerGetCapabilitiesRequest,
    ) -> Result<v1::ControllerGetCapabilitiesResponse, CsiError> {
        Ok(v1::ControllerGetCapabilitiesResponse {
            capabilities: controller_caps(),
        })
    }

    async fn controller_get_volume(
        &self,
        req: v1::ControllerGetVolumeRequest,
    ) -> Result<v1::ControllerGetVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let (rec, c, nodes) = self
            .run(move |e| {
                let rec = e.volume(&id)?;
                let c = e.condition(&rec);
                let nodes = e.published_nodes(&rec.id);
                Ok((rec, c, nodes))
            })
            .await?;
        Ok(v1::ControllerGetVolumeResponse {
            volume: Some(self.volume_message(&rec)),
            status: Some(v1::controller_get_volume_response::VolumeStatus {
                published_node_ids: nodes,
                volume_condition: Some(condition(c)),
            }),
        })
    }

    async fn controller_publish_volume(
        &self,
        req: v1::ControllerPublishVolumeRequest,
    ) -> Result<v1::ControllerPublishVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let node = require("node_id", &req.node_id)?.to_owned();
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability", "is required"))?;
        let cap = capability("volume_capability", cap)?;
        let read_only = req.readonly;
        let publish_context = self
            .run(move |e| e.controller_publish(&id, &node, cap, read_only))
            .await?;
        Ok(v1::ControllerPublishVolumeResponse { publish_context })
    }

    async fn controller_unpublish_volume(
        &self,
        req: v1::ControllerUnpublishVolumeRequest,
    ) -> Result<v1::ControllerUnpublishVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let node = req.node_id;
        self.run(move |e| e.controller_unpublish(&id, &node)).await?;
        Ok(v1::ControllerUnpublishVolumeResponse {})
    }

    async fn controller_expand_volume(
        &self,
        req: v1::ControllerExpandVolumeRequest,
    ) -> Result<v1::ControllerExpandVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let r = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| CsiError::invalid("capacity_range", "is required"))?;
        let range = CapacityRange {
            required: bytes("capacity_range.required_bytes", r.required_bytes)?,
            limit: bytes("capacity_range.limit_bytes", r.limit_bytes)?,
        };
        if let Some(cap) = &req.volume_capability {
            capability("volume_capability", cap)?;
        }
        let (capacity, node) = self.run(move |e| e.controller_expand(&id, range)).await?;
        Ok(v1::ControllerExpandVolumeResponse {
            capacity_bytes: i64_of(capacity),
            node_expansion_required: node,
        })
    }

    async fn controller_modify_volume(
        &self,
        req: v1::ControllerModifyVolumeRequest,
    ) -> Result<v1::ControllerModifyVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let mutable: BTreeMap<String, String> = req.mutable_parameters.into_iter().collect();
        self.run(move |e| e.modify(&id, &mutable)).await?;
        Ok(v1::ControllerModifyVolumeResponse {})
    }

    async fn create_snapshot(&self, req: v1::CreateSnapshotRequest) -> Result<v1::CreateSnapshotResponse, CsiError> {
        require("name", &req.name)?;
        require("source_volume_id", &req.source_volume_id)?;
        let params: BTreeMap<String, String> = req.parameters.into_iter().collect();
        let (name, source) = (req.name, req.source_volume_id);
        let snap = self.run(move |e| e.create_snapshot(&name, &source, &params)).await?;
        Ok(v1::CreateSnapshotResponse {
            snapshot: Some(Self::snapshot_message(&snap)),
        })
    }

    async fn delete_snapshot(&self, req: v1::DeleteSnapshotRequest) -> Result<v1::DeleteSnapshotResponse, CsiError> {
        let id = require("snapshot_id", &req.snapshot_id)?.to_owned();
        self.run(move |e| e.delete_snapshot(&id)).await?;
        Ok(v1::DeleteSnapshotResponse {})
    }

    async fn list_snapshots(&self, req: v1::ListSnapshotsRequest) -> Result<v1::ListSnapshotsResponse, CsiError> {
        let max = usize::try_from(req.max_entries)
            .map_err(|_| CsiError::invalid("max_entries", format!("{} is negative", req.max_entries)))?;
        let (snaps, next) = self
            .run(move |e| e.list_snapshots(&req.snapshot_id, &req.source_volume_id, &req.starting_token, max))
            .await?;
        Ok(v1::ListSnapshotsResponse {
            entries: snaps
                .iter()
                .map(|s| v1::list_snapshots_response::Entry {
                    snapshot: Some(Self::snapshot_message(s)),
                })
                .collect(),
            next_token: next.unwrap_or_default(),
        })
    }

    async fn get_snapshot(&self, req: v1::GetSnapshotRequest) -> Result<v1::GetSnapshotResponse, CsiError> {
        let id = require("snapshot_id", &req.snapshot_id)?.to_owned();
        let snap = self.run(move |e| e.snapshot(&id)).await?;
        Ok(v1::GetSnapshotResponse {
            snapshot: Some(Self::snapshot_message(&snap)),
        })
    }

    async fn group_controller_get_capabilities(
        &self,
        _req: v1::GroupControllerGetCapabilitiesRequest,
    ) -> Result<v1::GroupControllerGetCapabilitiesResponse, CsiError> {
        use v1::group_controller_service_capability as g;
        Ok(v1::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![v1::GroupControllerServiceCapability {
                r#type: Some(g::Type::Rpc(g::Rpc {
                    r#type: g::rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        })
    }

    async fn create_volume_group_snapshot(
        &self,
        req: v1::CreateVolumeGroupSnapshotRequest,
    ) -> Result<v1::CreateVolumeGroupSnapshotResponse, CsiError> {
        require("name", &req.name)?;
        let params: BTreeMap<String, String> = req.parameters.into_iter().collect();
        let (name, sources) = (req.name, req.source_volume_ids);
        let (group, members) = self
            .run(move |e| e.create_group_snapshot(&name, &sources, &params))
            .await?;
        Ok(v1::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(Self::group_message(&group, &members)),
        })
    }

    async fn get_volume_group_snapshot(
        &self,
        req: v1::GetVolumeGroupSnapshotRequest,
    ) -> Result<v1::GetVolumeGroupSnapshotResponse, CsiError> {
        let id = require("group_snapshot_id", &req.group_snapshot_id)?.to_owned();
        let (group, members) = self.run(move |e| e.group_snapshot(&id)).await?;
        Ok(v1::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(Self::group_message(&group, &members)),
        })
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: v1::DeleteVolumeGroupSnapshotRequest,
    ) -> Result<v1::DeleteVolumeGroupSnapshotResponse, CsiError> {
        let id = require("group_snapshot_id", &req.group_snapshot_id)?.to_owned();
        self.run(move |e| e.delete_group_snapshot(&id)).await?;
        Ok(v1::DeleteVolumeGroupSnapshotResponse {})
    }

    async fn node_expand_volume(
        &self,
        req: v1::NodeExpandVolumeRequest,
    ) -> Result<v1::NodeExpandVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let path = PathBuf::from(require("volume_path", &req.volume_path)?);
        let capacity = self.run(move |e| e.node_expand(&id, &path)).await?;
        Ok(v1::NodeExpandVolumeResponse {
            capacity_bytes: i64_of(capacity),
        })
    }

    async fn node_stage_volume(
        &self,
        req: v1::NodeStageVolumeRequest,
    ) -> Result<v1::NodeStageVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let staging = require_path("staging_target_path", &req.staging_target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability", "is required"))?;
        let cap = capability("volume_capability", cap)?;
        self.run(move |e| e.stage(&id, &staging, cap)).await?;
        Ok(v1::NodeStageVolumeResponse {})
    }

    async fn node_unstage_volume(
        &self,
        req: v1::NodeUnstageVolumeRequest,
    ) -> Result<v1::NodeUnstageVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let staging = require_path("staging_target_path", &req.staging_target_path)?;
        self.run(move |e| e.unstage(&id, &staging)).await?;
        Ok(v1::NodeUnstageVolumeResponse {})
    }

    async fn node_publish_volume(
        &self,
        req: v1::NodePublishVolumeRequest,
    ) -> Result<v1::NodePublishVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let target = require_path("target_path", &req.target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability", "is required"))?;
        let cap = capability("volume_capability", cap)?;
        let staging = require_path("staging_target_path", &req.staging_target_path)?;
        let read_only = req.readonly;
        self.run(move |e| e.publish(&id, &target, &staging, cap, read_only))
            .await?;
        Ok(v1::NodePublishVolumeResponse {})
    }

    async fn node_unpublish_volume(
        &self,
        req: v1::NodeUnpublishVolumeRequest,
    ) -> Result<v1::NodeUnpublishVolumeResponse, CsiError> {
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let target = require_path("target_path", &req.target_path)?;
        self.run(move |e| e.unpublish(&id, &target)).await?;
        Ok(v1::NodeUnpublishVolumeResponse {})
    }

    async fn node_get_volume_stats(
        &self,
        req: v1::NodeGetVolumeStatsRequest,
    ) -> Result<v1::NodeGetVolumeStatsResponse, CsiError> {
        use v1::volume_usage::Unit;
        let id = require("volume_id", &req.volume_id)?.to_owned();
        let path = PathBuf::from(require("volume_path", &req.volume_path)?);
        let stats = self.run(move |e| e.stats(&id, &path)).await?;
        let mut usage = vec![v1::VolumeUsage {
            available: stats.available_bytes.map_or(0, i64_of),
            total: i64_of(stats.total_bytes),
            used: stats.used_bytes.map_or(0, i64_of),
            unit: Unit::Bytes as i32,
        }];
        if let Some((total, used, free)) = stats.inodes {
            usage.push(v1::VolumeUsage {
                available: i64_of(free),
                total: i64_of(total),
                used: i64_of(used),
                unit: Unit::Inodes as i32,
            });
        }
        Ok(v1::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition(stats.condition)),
        })
    }

    async fn node_get_capabilities(
        &self,
        _req: v1::NodeGetCapabilitiesRequest,
    ) -> Result<v1::NodeGetCapabilitiesResponse, CsiError> {
        Ok(v1::NodeGetCapabilitiesResponse {
            capabilities: node_caps(),
        })
    }

    async fn node_get_info(&self, _req: v1::NodeGetInfoRequest) -> Result<v1::NodeGetInfoResponse, CsiError> {
        Ok(v1::NodeGetInfoResponse {
            node_id: self.engine.node_id().to_owned(),
            max_volumes_per_node: self.engine.max_volumes_per_node(),
            accessible_topology: Some(self.topology()),
        })
    }
}

//! The `Driver` trait: what a CSI storage backend implements.
//!
//! One async method per RPC of the Identity, Controller, GroupController and Node services, taking the
//! generated request message and returning the response or a [`CsiError`]. Every method has a default
//! that answers `UNIMPLEMENTED`, so a driver overrides only what it supports (and advertises in its
//! capabilities). The adapter in `server` has already enforced the spec's size limits; field-specific
//! requirements are the driver's to check, with the helpers in [`crate::validate`].
//!
//! Every mutating method must be idempotent: the CO retries after timeouts and crashes.

use std::future::Future;

use crate::{CsiError, v1};

/// The default answer for an RPC a driver does not override.
fn unimplemented<T: Send>(rpc: &str) -> impl Future<Output = Result<T, CsiError>> + Send + use<T> {
    std::future::ready(Err(CsiError::Unimplemented(format!(
        "{rpc} is not implemented by this driver"
    ))))
}

/// A CSI storage backend. Implement the RPCs you support; the rest answer `UNIMPLEMENTED`.
///
/// Methods may be written as `async fn` in the impl; the futures must be `Send`.
pub trait Driver: Send + Sync + 'static {
    // --- Identity ---

    /// `GetPluginInfo`: Name and version; both must be non-empty.
    fn get_plugin_info(
        &self,
        _req: v1::GetPluginInfoRequest,
    ) -> impl Future<Output = Result<v1::GetPluginInfoResponse, CsiError>> + Send {
        unimplemented("GetPluginInfo")
    }

    /// `GetPluginCapabilities`: Which optional services and constraints the plugin has.
    fn get_plugin_capabilities(
        &self,
        _req: v1::GetPluginCapabilitiesRequest,
    ) -> impl Future<Output = Result<v1::GetPluginCapabilitiesResponse, CsiError>> + Send {
        unimplemented("GetPluginCapabilities")
    }

    /// `Probe`: Health; report `ready = false` rather than an error when the backend is unusable.
    fn probe(&self, _req: v1::ProbeRequest) -> impl Future<Output = Result<v1::ProbeResponse, CsiError>> + Send {
        unimplemented("Probe")
    }

    // --- Controller ---

    /// `CreateVolume`: Provision a volume; idempotent by `name`.
    fn create_volume(
        &self,
        _req: v1::CreateVolumeRequest,
    ) -> impl Future<Output = Result<v1::CreateVolumeResponse, CsiError>> + Send {
        unimplemented("CreateVolume")
    }

    /// `DeleteVolume`: Delete a volume; an unknown id is success.
    fn delete_volume(
        &self,
        _req: v1::DeleteVolumeRequest,
    ) -> impl Future<Output = Result<v1::DeleteVolumeResponse, CsiError>> + Send {
        unimplemented("DeleteVolume")
    }

    /// `ControllerPublishVolume`: Make a volume available on a node.
    fn controller_publish_volume(
        &self,
        _req: v1::ControllerPublishVolumeRequest,
    ) -> impl Future<Output = Result<v1::ControllerPublishVolumeResponse, CsiError>> + Send {
        unimplemented("ControllerPublishVolume")
    }

    /// `ControllerUnpublishVolume`: Undo a publish; not published is success.
    fn controller_unpublish_volume(
        &self,
        _req: v1::ControllerUnpublishVolumeRequest,
    ) -> impl Future<Output = Result<v1::ControllerUnpublishVolumeResponse, CsiError>> + Send {
        unimplemented("ControllerUnpublishVolume")
    }

    /// `ValidateVolumeCapabilities`: Confirm a volume supports the given capabilities.
    fn validate_volume_capabilities(
        &self,
        _req: v1::ValidateVolumeCapabilitiesRequest,
    ) -> impl Future<Output = Result<v1::ValidateVolumeCapabilitiesResponse, CsiError>> + Send {
        unimplemented("ValidateVolumeCapabilities")
    }

    /// `ListVolumes`: Page through volumes; a bad `starting_token` is `Aborted`.
    fn list_volumes(
        &self,
        _req: v1::ListVolumesRequest,
    ) -> impl Future<Output = Result<v1::ListVolumesResponse, CsiError>> + Send {
        unimplemented("ListVolumes")
    }

    /// `GetCapacity`: Free capacity for the given parameters and topology.
    fn get_capacity(
        &self,
        _req: v1::GetCapacityRequest,
    ) -> impl Future<Output = Result<v1::GetCapacityResponse, CsiError>> + Send {
        unimplemented("GetCapacity")
    }

    /// `ControllerGetCapabilities`: Which controller RPCs the driver supports.
    fn controller_get_capabilities(
        &self,
        _req: v1::ControllerGetCapabilitiesRequest,
    ) -> impl Future<Output = Result<v1::ControllerGetCapabilitiesResponse, CsiError>> + Send {
        unimplemented("ControllerGetCapabilities")
    }

    /// `CreateSnapshot`: Snapshot a volume; idempotent by `name`.
    fn create_snapshot(
        &self,
        _req: v1::CreateSnapshotRequest,
    ) -> impl Future<Output = Result<v1::CreateSnapshotResponse, CsiError>> + Send {
        unimplemented("CreateSnapshot")
    }

    /// `DeleteSnapshot`: Delete a snapshot; an unknown id is success.
    fn delete_snapshot(
        &self,
        _req: v1::DeleteSnapshotRequest,
    ) -> impl Future<Output = Result<v1::DeleteSnapshotResponse, CsiError>> + Send {
        unimplemented("DeleteSnapshot")
    }

    /// `ListSnapshots`: Page through snapshots, optionally filtered.
    fn list_snapshots(
        &self,
        _req: v1::ListSnapshotsRequest,
    ) -> impl Future<Output = Result<v1::ListSnapshotsResponse, CsiError>> + Send {
        unimplemented("ListSnapshots")
    }

    /// `GetSnapshot`: One snapshot by id.
    fn get_snapshot(
        &self,
        _req: v1::GetSnapshotRequest,
    ) -> impl Future<Output = Result<v1::GetSnapshotResponse, CsiError>> + Send {
        unimplemented("GetSnapshot")
    }

    /// `ControllerExpandVolume`: Grow a volume; a size already reached is success.
    fn controller_expand_volume(
        &self,
        _req: v1::ControllerExpandVolumeRequest,
    ) -> impl Future<Output = Result<v1::ControllerExpandVolumeResponse, CsiError>> + Send {
        unimplemented("ControllerExpandVolume")
    }

    /// `ControllerGetVolume`: One volume with its publish state and condition.
    fn controller_get_volume(
        &self,
        _req: v1::ControllerGetVolumeRequest,
    ) -> impl Future<Output = Result<v1::ControllerGetVolumeResponse, CsiError>> + Send {
        unimplemented("ControllerGetVolume")
    }

    /// `ControllerModifyVolume`: Apply mutable parameters to a volume.
    fn controller_modify_volume(
        &self,
        _req: v1::ControllerModifyVolumeRequest,
    ) -> impl Future<Output = Result<v1::ControllerModifyVolumeResponse, CsiError>> + Send {
        unimplemented("ControllerModifyVolume")
    }

    // --- GroupController ---

    /// `GroupControllerGetCapabilities`: Which group-controller RPCs the driver supports.
    fn group_controller_get_capabilities(
        &self,
        _req: v1::GroupControllerGetCapabilitiesRequest,
    ) -> impl Future<Output = Result<v1::GroupControllerGetCapabilitiesResponse, CsiError>> + Send {
        unimplemented("GroupControllerGetCapabilities")
    }

    /// `CreateVolumeGroupSnapshot`: Snapshot several volumes together; idempotent by `name`.
    fn create_volume_group_snapshot(
        &self,
        _req: v1::CreateVolumeGroupSnapshotRequest,
    ) -> impl Future<Output = Result<v1::CreateVolumeGroupSnapshotResponse, CsiError>> + Send {
        unimplemented("CreateVolumeGroupSnapshot")
    }

    /// `DeleteVolumeGroupSnapshot`: Delete a group snapshot and its members.
    fn delete_volume_group_snapshot(
        &self,
        _req: v1::DeleteVolumeGroupSnapshotRequest,
    ) -> impl Future<Output = Result<v1::DeleteVolumeGroupSnapshotResponse, CsiError>> + Send {
        unimplemented("DeleteVolumeGroupSnapshot")
    }

    /// `GetVolumeGroupSnapshot`: One group snapshot by id.
    fn get_volume_group_snapshot(
        &self,
        _req: v1::GetVolumeGroupSnapshotRequest,
    ) -> impl Future<Output = Result<v1::GetVolumeGroupSnapshotResponse, CsiError>> + Send {
        unimplemented("GetVolumeGroupSnapshot")
    }

    // --- Node ---

    /// `NodeStageVolume`: Mount or attach a volume at the node-global staging path.
    fn node_stage_volume(
        &self,
        _req: v1::NodeStageVolumeRequest,
    ) -> impl Future<Output = Result<v1::NodeStageVolumeResponse, CsiError>> + Send {
        unimplemented("NodeStageVolume")
    }

    /// `NodeUnstageVolume`: Undo a stage; not staged is success, a busy mount is not.
    fn node_unstage_volume(
        &self,
        _req: v1::NodeUnstageVolumeRequest,
    ) -> impl Future<Output = Result<v1::NodeUnstageVolumeResponse, CsiError>> + Send {
        unimplemented("NodeUnstageVolume")
    }

    /// `NodePublishVolume`: Make a volume visible at the workload's target path.
    fn node_publish_volume(
        &self,
        _req: v1::NodePublishVolumeRequest,
    ) -> impl Future<Output = Result<v1::NodePublishVolumeResponse, CsiError>> + Send {
        unimplemented("NodePublishVolume")
    }

    /// `NodeUnpublishVolume`: Undo a publish; not published is success, a busy mount is not.
    fn node_unpublish_volume(
        &self,
        _req: v1::NodeUnpublishVolumeRequest,
    ) -> impl Future<Output = Result<v1::NodeUnpublishVolumeResponse, CsiError>> + Send {
        unimplemented("NodeUnpublishVolume")
    }

    /// `NodeGetVolumeStats`: Usage and condition of a published volume; unknown path is `NotFound`.
    fn node_get_volume_stats(
        &self,
        _req: v1::NodeGetVolumeStatsRequest,
    ) -> impl Future<Output = Result<v1::NodeGetVolumeStatsResponse, CsiError>> + Send {
        unimplemented("NodeGetVolumeStats")
    }

    /// `NodeExpandVolume`: Grow the filesystem on the node after a controller expand.
    fn node_expand_volume(
        &self,
        _req: v1::NodeExpandVolumeRequest,
    ) -> impl Future<Output = Result<v1::NodeExpandVolumeResponse, CsiError>> + Send {
        unimplemented("NodeExpandVolume")
    }

    /// `NodeGetCapabilities`: Which node RPCs the driver supports.
    fn node_get_capabilities(
        &self,
        _req: v1::NodeGetCapabilitiesRequest,
    ) -> impl Future<Output = Result<v1::NodeGetCapabilitiesResponse, CsiError>> + Send {
        unimplemented("NodeGetCapabilities")
    }

    /// `NodeGetInfo`: Node id, volume limit and topology.
    fn node_get_info(
        &self,
        _req: v1::NodeGetInfoRequest,
    ) -> impl Future<Output = Result<v1::NodeGetInfoResponse, CsiError>> + Send {
        unimplemented("NodeGetInfo")
    }
}

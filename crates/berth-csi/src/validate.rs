//! Request validation that the CSI spec makes common to every RPC, in one place.
//!
//! Owns the size limits: strings at most 128 bytes (node ids 256), `map<string, string>` fields and
//! `mount_flags` at most 4 KiB in total. [`SpecLimits`] applies them to each request before the
//! driver sees it; a violation is `InvalidArgument` naming the field. Paths (`target_path`,
//! `staging_target_path`, `volume_path`) are exempt because the spec lets them be longer, and paging
//! tokens are exempt because a bad token must be `ABORTED`, which is the driver's call.
//!
//! "Required" rules differ per RPC and belong to the driver, which uses [`require_nonempty`] and
//! friends. Everything here is a pure function.

use std::collections::HashMap;

use crate::{CsiError, v1};

/// Size limit of a string field, in bytes.
pub const MAX_STRING_BYTES: usize = 128;
/// Size limit of `node_id`, which the spec raises above the general string limit.
pub const MAX_NODE_ID_BYTES: usize = 256;
/// Size limit of a `map<string, string>` (keys plus values) or of `mount_flags`, in bytes.
pub const MAX_MAP_BYTES: usize = 4096;

/// `field` must be set (non-empty).
pub fn require_nonempty(field: &str, value: &str) -> Result<(), CsiError> {
    if value.is_empty() {
        return Err(CsiError::invalid(field, "must not be empty"));
    }
    Ok(())
}

/// `field` must be set: `Some`, or for repeated fields, non-empty.
pub fn require_some<'a, T>(field: &str, value: Option<&'a T>) -> Result<&'a T, CsiError> {
    value.ok_or_else(|| CsiError::invalid(field, "must be set"))
}

/// `field` fits the general string limit of 128 bytes.
pub fn check_len(field: &str, value: &str) -> Result<(), CsiError> {
    check_bytes(field, value.len(), MAX_STRING_BYTES)
}

/// `field` fits the 4 KiB limit, counting every key and value.
pub fn check_map(field: &str, map: &HashMap<String, String>) -> Result<(), CsiError> {
    let total = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    check_bytes(field, total, MAX_MAP_BYTES)
}

fn check_node_id(field: &str, value: &str) -> Result<(), CsiError> {
    check_bytes(field, value.len(), MAX_NODE_ID_BYTES)
}

fn check_bytes(field: &str, len: usize, max: usize) -> Result<(), CsiError> {
    if len > max {
        return Err(CsiError::invalid(
            field,
            format!("is {len} bytes; CSI allows at most {max}"),
        ));
    }
    Ok(())
}

fn check_each(field: &str, values: &[String]) -> Result<(), CsiError> {
    for (i, value) in values.iter().enumerate() {
        check_len(&format!("{field}[{i}]"), value)?;
    }
    Ok(())
}

fn check_capability(field: &str, cap: Option<&v1::VolumeCapability>) -> Result<(), CsiError> {
    use v1::volume_capability::AccessType;
    let Some(cap) = cap else { return Ok(()) };
    if let Some(AccessType::Mount(mount)) = &cap.access_type {
        check_len(&format!("{field}.mount.fs_type"), &mount.fs_type)?;
        check_len(&format!("{field}.mount.volume_mount_group"), &mount.volume_mount_group)?;
        let flags: usize = mount.mount_flags.iter().map(String::len).sum();
        check_bytes(&format!("{field}.mount.mount_flags"), flags, MAX_MAP_BYTES)?;
    }
    Ok(())
}

fn check_capabilities(field: &str, caps: &[v1::VolumeCapability]) -> Result<(), CsiError> {
    for (i, cap) in caps.iter().enumerate() {
        check_capability(&format!("{field}[{i}]"), Some(cap))?;
    }
    Ok(())
}

fn check_topologies(field: &str, topologies: &[v1::Topology]) -> Result<(), CsiError> {
    for (i, topology) in topologies.iter().enumerate() {
        check_map(&format!("{field}[{i}].segments"), &topology.segments)?;
    }
    Ok(())
}

fn check_content_source(field: &str, source: Option<&v1::VolumeContentSource>) -> Result<(), CsiError> {
    use v1::volume_content_source::Type;
    match source.and_then(|s| s.r#type.as_ref()) {
        Some(Type::Snapshot(s)) => check_len(&format!("{field}.snapshot.snapshot_id"), &s.snapshot_id),
        Some(Type::Volume(v)) => check_len(&format!("{field}.volume.volume_id"), &v.volume_id),
        None => Ok(()),
    }
}

/// The spec's size limits, applied to a whole request by the server adapter.
pub trait SpecLimits {
    /// `Ok` when every limited field is within its limit; else `InvalidArgument` naming the field.
    fn check_limits(&self) -> Result<(), CsiError>;
}

macro_rules! nothing_to_check {
    ($($ty:ident),* $(,)?) => {
        $(impl SpecLimits for v1::$ty {
            fn check_limits(&self) -> Result<(), CsiError> {
                Ok(())
            }
        })*
    };
}

nothing_to_check!(
    GetPluginInfoRequest,
    GetPluginCapabilitiesRequest,
    ProbeRequest,
    ControllerGetCapabilitiesRequest,
    GroupControllerGetCapabilitiesRequest,
    NodeGetCapabilitiesRequest,
    NodeGetInfoRequest,
    ListVolumesRequest,
);

impl SpecLimits for v1::CreateVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("name", &self.name)?;
        check_capabilities("volume_capabilities", &self.volume_capabilities)?;
        check_map("parameters", &self.parameters)?;
        check_map("secrets", &self.secrets)?;
        check_map("mutable_parameters", &self.mutable_parameters)?;
        check_content_source("volume_content_source", self.volume_content_source.as_ref())?;
        if let Some(req) = &self.accessibility_requirements {
            check_topologies("accessibility_requirements.requisite", &req.requisite)?;
            check_topologies("accessibility_requirements.preferred", &req.preferred)?;
        }
        Ok(())
    }
}

impl SpecLimits for v1::DeleteVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)?;
        check_map("secrets", &self.secrets)
    }
}

impl SpecLimits for v1::ControllerPublishVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)?;
        check_node_id("node_id", &self.node_id)?;
        check_capability("volume_capability", self.volume_capability.as_ref())?;
        check_map("secrets", &self.secrets)?;
        check_map("volume_context", &self.volume_context)
    }
}

impl SpecLimits for v1::ControllerUnpublishVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)?;
        check_node_id("node_id", &self.node_id)?;
        check_map("secrets", &self.secrets)
    }
}

impl SpecLimits for v1::ValidateVolumeCapabilitiesRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)?;
        check_map("volume_context", &self.volume_context)?;
        check_capabilities("volume_capabilities", &self.volume_capabilities)?;
        check_map("parameters", &self.parameters)?;
        check_map("secrets", &self.secrets)?;
        check_map("mutable_parameters", &self.mutable_parameters)
    }
}

impl SpecLimits for v1::GetCapacityRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_capabilities("volume_capabilities", &self.volume_capabilities)?;
        check_map("parameters", &self.parameters)?;
        if let Some(topology) = &self.accessible_topology {
            check_map("accessible_topology.segments", &topology.segments)?;
        }
        Ok(())
    }
}

impl SpecLimits for v1::CreateSnapshotRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("source_volume_id", &self.source_volume_id)?;
        check_len("name", &self.name)?;
        check_map("secrets", &self.secrets)?;
        check_map("parameters", &self.parameters)
    }
}

impl SpecLimits for v1::DeleteSnapshotRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("snapshot_id", &self.snapshot_id)?;
        check_map("secrets", &self.secrets)
    }
}

impl SpecLimits for v1::ListSnapshotsRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("source_volume_id", &self.source_volume_id)?;
        check_len("snapshot_id", &self.snapshot_id)?;
        check_map("secrets", &self.secrets)
    }
}

impl SpecLimits for v1::GetSnapshotRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("snapshot_id", &self.snapshot_id)?;
        check_map("secrets", &self.secrets)
    }
}

impl SpecLimits for v1::ControllerExpandVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)?;
        check_map("secrets", &self.secrets)?;
        check_capability("volume_capability", self.volume_capability.as_ref())
    }
}

impl SpecLimits for v1::ControllerGetVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)
    }
}

impl SpecLimits for v1::ControllerModifyVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)?;
        check_map("secrets", &self.secrets)?;
        check_map("mutable_parameters", &self.mutable_parameters)
    }
}

impl SpecLimits for v1::CreateVolumeGroupSnapshotRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("name", &self.name)?;
        check_each("source_volume_ids", &self.source_volume_ids)?;
        check_map("secrets", &self.secrets)?;
        check_map("parameters", &self.parameters)
    }
}

impl SpecLimits for v1::DeleteVolumeGroupSnapshotRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("group_snapshot_id", &self.group_snapshot_id)?;
        check_each("snapshot_ids", &self.snapshot_ids)?;
        check_map("secrets", &self.secrets)
    }
}

impl SpecLimits for v1::GetVolumeGroupSnapshotRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("group_snapshot_id", &self.group_snapshot_id)?;
        check_each("snapshot_ids", &self.snapshot_ids)?;
        check_map("secrets", &self.secrets)
    }
}

impl SpecLimits for v1::NodeStageVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)?;
        check_map("publish_context", &self.publish_context)?;
        check_capability("volume_capability", self.volume_capability.as_ref())?;
        check_map("secrets", &self.secrets)?;
        check_map("volume_context", &self.volume_context)
    }
}

impl SpecLimits for v1::NodeUnstageVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)
    }
}

impl SpecLimits for v1::NodePublishVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)?;
        check_map("publish_context", &self.publish_context)?;
        check_capability("volume_capability", self.volume_capability.as_ref())?;
        check_map("secrets", &self.secrets)?;
        check_map("volume_context", &self.volume_context)
    }
}

impl SpecLimits for v1::NodeUnpublishVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)
    }
}

impl SpecLimits for v1::NodeGetVolumeStatsRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)
    }
}

impl SpecLimits for v1::NodeExpandVolumeRequest {
    fn check_limits(&self) -> Result<(), CsiError> {
        check_len("volume_id", &self.volume_id)?;
        check_capability("volume_capability", self.volume_capability.as_ref())?;
        check_map("secrets", &self.secrets)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn invalid_field(result: Result<(), CsiError>) -> Option<String> {
        match result {
            Ok(()) => None,
            Err(CsiError::InvalidArgument { field, .. }) => Some(field),
            Err(other) => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    fn map_of(bytes: usize) -> HashMap<String, String> {
        // One key of 4 bytes plus a value making up the rest.
        HashMap::from([("key1".to_owned(), "v".repeat(bytes - 4))])
    }

    #[rstest]
    #[case("", true)]
    #[case("x", false)]
    fn require_nonempty_table(#[case] value: &str, #[case] fails: bool) {
        let result = require_nonempty("volume_id", value);
        assert_eq!(invalid_field(result).is_some(), fails);
    }

    #[test]
    fn require_nonempty_message_names_field() {
        let err = require_nonempty("volume_id", "").unwrap_err();
        assert_eq!(err.to_string(), "volume_id: must not be empty");
    }

    #[test]
    fn require_some_returns_value_or_names_field() {
        assert_eq!(require_some("x", Some(&3)).ok(), Some(&3));
        let err = require_some::<u8>("volume_capability", None).unwrap_err();
        assert_eq!(err.to_string(), "volume_capability: must be set");
    }

    #[rstest]
    #[case(0, false)]
    #[case(128, false)]
    #[case(129, true)]
    #[case(4096, true)]
    fn check_len_table(#[case] len: usize, #[case] fails: bool) {
        let result = check_len("name", &"a".repeat(len));
        assert_eq!(invalid_field(result), fails.then(|| "name".to_owned()));
    }

    #[test]
    fn check_len_counts_bytes_not_chars() {
        // 43 three-byte characters = 129 bytes.
        let value = "€".repeat(43);
        assert!(check_len("name", &value).is_err());
    }

    #[rstest]
    #[case(4, false)]
    #[case(4096, false)]
    #[case(4097, true)]
    fn check_map_table(#[case] bytes: usize, #[case] fails: bool) {
        let result = check_map("parameters", &map_of(bytes));
        assert_eq!(invalid_field(result), fails.then(|| "parameters".to_owned()));
    }

    #[test]
    fn check_map_message_tells_sizes() {
        let err = check_map("secrets", &map_of(5000)).unwrap_err();
        assert_eq!(err.to_string(), "secrets: is 5000 bytes; CSI allows at most 4096");
    }

    fn mount_cap(flags: Vec<String>) -> v1::VolumeCapability {
        v1::VolumeCapability {
            access_type: Some(v1::volume_capability::AccessType::Mount(
                v1::volume_capability::MountVolume {
                    mount_flags: flags,
                    ..Default::default()
                },
            )),
            access_mode: None,
        }
    }

    #[rstest]
    #[case::ok(v1::CreateVolumeRequest { name: "pvc-1".into(), ..Default::default() }, None)]
    #[case::long_name(
        v1::CreateVolumeRequest { name: "n".repeat(129), ..Default::default() },
        Some("name")
    )]
    #[case::big_secrets(
        v1::CreateVolumeRequest { secrets: map_of(4097), ..Default::default() },
        Some("secrets")
    )]
    #[case::big_parameters(
        v1::CreateVolumeRequest { parameters: map_of(4097), ..Default::default() },
        Some("parameters")
    )]
    #[case::big_mutable_parameters(
        v1::CreateVolumeRequest { mutable_parameters: map_of(4097), ..Default::default() },
        Some("mutable_parameters")
    )]
    #[case::long_source_snapshot(
        v1::CreateVolumeRequest {
            volume_content_source: Some(v1::VolumeContentSource {
                r#type: Some(v1::volume_content_source::Type::Snapshot(
                    v1::volume_content_source::SnapshotSource { snapshot_id: "s".repeat(200) },
                )),
            }),
            ..Default::default()
        },
        Some("volume_content_source.snapshot.snapshot_id")
    )]
    #[case::big_mount_flags(
        v1::CreateVolumeRequest {
            volume_capabilities: vec![mount_cap(vec![]), mount_cap(vec!["o".repeat(4097)])],
            ..Default::default()
        },
        Some("volume_capabilities[1].mount.mount_flags")
    )]
    #[case::big_topology(
        v1::CreateVolumeRequest {
            accessibility_requirements: Some(v1::TopologyRequirement {
                requisite: vec![],
                preferred: vec![v1::Topology { segments: map_of(4097) }],
            }),
            ..Default::default()
        },
        Some("accessibility_requirements.preferred[0].segments")
    )]
    fn create_volume_limits(#[case] req: v1::CreateVolumeRequest, #[case] field: Option<&str>) {
        assert_eq!(invalid_field(req.check_limits()).as_deref(), field);
    }

    #[test]
    fn node_id_may_be_256_bytes() {
        let ok = v1::ControllerPublishVolumeRequest {
            node_id: "n".repeat(256),
            ..Default::default()
        };
        assert!(ok.check_limits().is_ok());
        let long = v1::ControllerPublishVolumeRequest {
            node_id: "n".repeat(257),
            ..Default::default()
        };
        assert_eq!(invalid_field(long.check_limits()).as_deref(), Some("node_id"));
    }

    #[test]
    fn paths_and_tokens_are_not_limited_to_128_bytes() {
        let path = format!("/var/lib/kubelet/pods/{}/mount", "p".repeat(300));
        let publish = v1::NodePublishVolumeRequest {
            volume_id: "v".into(),
            target_path: path.clone(),
            staging_target_path: path.clone(),
            ..Default::default()
        };
        assert!(publish.check_limits().is_ok());
        let stats = v1::NodeGetVolumeStatsRequest {
            volume_id: "v".into(),
            volume_path: path,
            ..Default::default()
        };
        assert!(stats.check_limits().is_ok());
        let list = v1::ListVolumesRequest {
            max_entries: 0,
            starting_token: "t".repeat(300),
        };
        assert!(list.check_limits().is_ok());
    }

    #[rstest]
    #[case::delete_volume(v1::DeleteVolumeRequest { volume_id: "v".repeat(129), ..Default::default() }.check_limits(), "volume_id")]
    #[case::unstage(v1::NodeUnstageVolumeRequest { volume_id: "v".repeat(129), ..Default::default() }.check_limits(), "volume_id")]
    #[case::stage_ctx(v1::NodeStageVolumeRequest { publish_context: map_of(5000), ..Default::default() }.check_limits(), "publish_context")]
    #[case::snapshot_name(v1::CreateSnapshotRequest { name: "s".repeat(129), ..Default::default() }.check_limits(), "name")]
    #[case::group_ids(v1::DeleteVolumeGroupSnapshotRequest { snapshot_ids: vec!["a".into(), "b".repeat(129)], ..Default::default() }.check_limits(), "snapshot_ids[1]")]
    #[case::modify(v1::ControllerModifyVolumeRequest { mutable_parameters: map_of(5000), ..Default::default() }.check_limits(), "mutable_parameters")]
    #[case::capacity_topology(v1::GetCapacityRequest { accessible_topology: Some(v1::Topology { segments: map_of(5000) }), ..Default::default() }.check_limits(), "accessible_topology.segments")]
    fn other_requests_name_the_offending_field(#[case] result: Result<(), CsiError>, #[case] field: &str) {
        assert_eq!(invalid_field(result).as_deref(), Some(field));
    }
}

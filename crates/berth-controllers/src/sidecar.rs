//! What the CSI sidecars' counterparts here (the [`crate::attacher`], [`crate::resizer`] and
//! [`crate::snapshotter`]) share: the volume capability a PersistentVolume stands for, how a
//! failed CSI call reads in a status or an event, which failures are final, and reading the
//! Secret a volume or class names.
//!
//! Pure except [`load_secret`], which reads one Secret through [`Api`]. Secret data is returned
//! to the caller for the CSI request only; nothing here logs it.

use std::collections::HashMap;

use berth_api::quantity::{Format, Quantity};
use berth_csi::v1::VolumeCapability;
use berth_csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use k8s_openapi::api::core::v1::{PersistentVolumeSpec, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as ApiQuantity;

use crate::api::{Api, ApiError, Typed, kinds};
use crate::provision::{AccessModeError, csi_access_mode};

/// Why a PersistentVolume stands for no CSI capability; the messages are the sidecars'.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("CSI volume source was nil")]
    NotCsi,
    #[error(transparent)]
    AccessModes(#[from] AccessModeError),
}

/// The one capability external-attacher and external-resizer pass for a volume
/// (`GetVolumeCapabilities`): Block for a Block volume, else Mount with the volume's fsType
/// (or `default_fs_type` when it has none) and its mount options; the access mode maps all of
/// the volume's modes together, as csi-lib-utils' `ToCSIAccessMode` does.
pub fn volume_capability(
    spec: &PersistentVolumeSpec,
    single_node_multi_writer: bool,
    default_fs_type: &str,
) -> Result<VolumeCapability, CapabilityError> {
    let csi = spec.csi.as_ref().ok_or(CapabilityError::NotCsi)?;
    let access_type = if spec.volume_mode.as_deref() == Some("Block") {
        AccessType::Block(BlockVolume {})
    } else {
        let fs_type = csi.fs_type.clone().filter(|f| !f.is_empty());
        AccessType::Mount(MountVolume {
            fs_type: fs_type.unwrap_or_else(|| default_fs_type.to_owned()),
            mount_flags: spec.mount_options.clone().unwrap_or_default(),
            volume_mount_group: String::new(),
        })
    };
    let modes = spec.access_modes.as_deref().unwrap_or(&[]);
    let mode = csi_access_mode(modes, single_node_multi_writer)?;
    Ok(VolumeCapability {
        access_mode: Some(AccessMode { mode: mode.into() }),
        access_type: Some(access_type),
    })
}

/// Go's name of a gRPC code, as `status.Error` prints it (`Canceled` with one `l`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// A failed CSI call as the Go sidecars print it: `rpc error: code = NotFound desc = ...`, so
/// statuses and events read as they do in Kubernetes.
pub fn rpc_error(status: &tonic::Status) -> String {
    format!(
        "rpc error: code = {} desc = {}",
        code_name(status.code()),
        status.message()
    )
}

/// Whether a failed CSI call has certainly ended: every code but the ones that leave the
/// operation possibly running in the driver (Canceled, DeadlineExceeded, Unavailable,
/// ResourceExhausted, Aborted), as external-snapshotter's `isCSIFinalError` and
/// external-resizer's `IsFinalError` decide.
pub fn is_final(code: tonic::Code) -> bool {
    use tonic::Code;
    !matches!(
        code,
        Code::Cancelled | Code::DeadlineExceeded | Code::Unavailable | Code::ResourceExhausted | Code::Aborted
    )
}

/// `bytes` as Kubernetes' `resource.NewQuantity(bytes, BinarySI)` prints it (`2Gi`, `1k`).
pub fn binary_quantity(bytes: i64) -> ApiQuantity {
    ApiQuantity(Quantity::from_units(bytes, Format::BinarySI).canonical())
}

/// The bytes of a quantity, rounded up as Kubernetes' `Value()` rounds; `None` when it does not
/// parse or does not fit.
pub fn quantity_bytes(q: &ApiQuantity) -> Option<i64> {
    Quantity::parse(&q.0)
        .ok()
        .and_then(|p| i64::try_from(p.value_ceil()).ok())
}

/// `metav1.Time` of a CSI timestamp in nanoseconds since the epoch (whole seconds, UTC).
pub fn time_of_nanos(nanos: i64) -> Option<String> {
    jiff::Timestamp::from_nanosecond(i128::from(nanos))
        .ok()
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// Whether an object a write returned is one that write deleted (it was Terminating and lost its
/// last finalizer). Such a copy must not be put into a cache: the deletion's watch event may
/// already have removed it, and it would come back as a ghost.
pub fn deleted_by_write(v: &serde_json::Value) -> bool {
    let m = &v["metadata"];
    !m["deletionTimestamp"].is_null() && m["finalizers"].as_array().is_none_or(Vec::is_empty)
}

/// The data of Secret `namespace/name`, as strings (for a CSI request's `secrets`).
pub async fn load_secret(api: &dyn Api, namespace: &str, name: &str) -> Result<HashMap<String, String>, ApiError> {
    let secret = Secret::from_value(api.get(kinds::secrets(), Some(namespace), name).await?)?;
    Ok(secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use berth_csi::v1::volume_capability::access_mode::Mode;
    use rstest::rstest;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> PersistentVolumeSpec {
        serde_json::from_value(v).unwrap()
    }

    #[rstest]
    #[case::mount_with_fs_and_options(
        json!({"accessModes": ["ReadWriteOnce"], "mountOptions": ["noatime"], "csi": {"driver": "d", "volumeHandle": "h", "fsType": "xfs"}}),
        false, "", Mode::SingleNodeWriter, Some("xfs")
    )]
    #[case::default_fs_when_none(
        json!({"accessModes": ["ReadWriteOnce"], "csi": {"driver": "d", "volumeHandle": "h"}}),
        true, "ext4", Mode::SingleNodeMultiWriter, Some("ext4")
    )]
    #[case::block(
        json!({"accessModes": ["ReadWriteMany"], "volumeMode": "Block", "csi": {"driver": "d", "volumeHandle": "h"}}),
        false, "ext4", Mode::MultiNodeMultiWriter, None
    )]
    fn capabilities_follow_the_volume(
        #[case] s: serde_json::Value,
        #[case] snmw: bool,
        #[case] default_fs: &str,
        #[case] mode: Mode,
        #[case] fs: Option<&str>,
    ) {
        let cap = volume_capability(&spec(s), snmw, default_fs).unwrap();
        assert_eq!(cap.access_mode.unwrap().mode, i32::from(mode));
        match cap.access_type.unwrap() {
            AccessType::Mount(m) => {
                assert_eq!(Some(m.fs_type.as_str()), fs);
            }
            AccessType::Block(_) => assert_eq!(fs, None),
        }
    }

    #[test]
    fn capabilities_need_a_csi_volume_and_expressible_modes() {
        assert_eq!(
            volume_capability(&spec(json!({"accessModes": ["ReadWriteOnce"]})), false, ""),
            Err(CapabilityError::NotCsi)
        );
        let err = volume_capability(
            &spec(
                json!({"accessModes": ["ReadWriteOnce", "ReadOnlyMany"], "csi": {"driver": "d", "volumeHandle": "h"}}),
            ),
            false,
            "",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "CSI does not support ReadOnlyMany and ReadWriteOnce on the same PersistentVolume"
        );
    }

    #[test]
    fn rpc_errors_read_like_go() {
        let s = tonic::Status::not_found("volume v1 not found");
        assert_eq!(rpc_error(&s), "rpc error: code = NotFound desc = volume v1 not found");
        assert_eq!(
            rpc_error(&tonic::Status::cancelled("x")),
            "rpc error: code = Canceled desc = x"
        );
    }

    #[rstest]
    #[case(tonic::Code::NotFound, true)]
    #[case(tonic::Code::InvalidArgument, true)]
    #[case(tonic::Code::Internal, true)]
    #[case(tonic::Code::Aborted, false)]
    #[case(tonic::Code::DeadlineExceeded, false)]
    #[case(tonic::Code::ResourceExhausted, false)]
    fn finality(#[case] code: tonic::Code, #[case] want: bool) {
        assert_eq!(is_final(code), want);
    }

    #[test]
    fn writes_that_complete_a_deletion() {
        let v = |m: serde_json::Value| json!({"metadata": m});
        assert!(deleted_by_write(&v(
            json!({"deletionTimestamp": "2026-01-01T00:00:00Z"})
        )));
        assert!(deleted_by_write(&v(
            json!({"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": []})
        )));
        assert!(!deleted_by_write(&v(
            json!({"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["f"]})
        )));
        assert!(!deleted_by_write(&v(json!({"finalizers": []}))));
    }

    #[test]
    fn quantities_and_times() {
        assert_eq!(binary_quantity(2 << 30).0, "2Gi");
        assert_eq!(binary_quantity(1000).0, "1k", "below 1024 Kubernetes prints decimal");
        assert_eq!(quantity_bytes(&ApiQuantity("1Gi".into())), Some(1 << 30));
        assert_eq!(quantity_bytes(&ApiQuantity("x".into())), None);
        assert_eq!(
            time_of_nanos(1_700_000_000_500_000_000).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
    }
}

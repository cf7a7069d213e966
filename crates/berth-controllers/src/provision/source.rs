//! Whether a claim's data source can be used to fill its new volume: a claim to clone
//! (external-provisioner's `getPVCSource`) or a snapshot to restore (`getSnapshotSource`). Pure:
//! the runner fetches the source objects and passes what these rules read. The messages are
//! external-provisioner's; each error leaves the claim Pending and is retried.

use berth_api::quantity::Quantity;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as ApiQuantity;

use super::ProvisionError;

/// Why a data source cannot fill the new volume (yet); the messages are external-provisioner's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataSourceError {
    /// The claim to clone is not bound to a volume yet.
    #[error("the PVC DataSource {source_claim} must have a status of Bound.  Got {phase}")]
    SourceNotBound { source_claim: String, phase: String },
    /// The claim to clone is being deleted.
    #[error("the PVC DataSource {source_claim} is currently being deleted")]
    SourceDeleting { source_claim: String },
    /// The claim to clone has no `spec.storageClassName`.
    #[error("the source PVC ({source_claim}) storageclass cannot be empty")]
    SourceWithoutClass { source_claim: String },
    /// The new claim has no `spec.storageClassName`.
    #[error("the requested PVC ({claim}) storageclass cannot be empty")]
    ClaimWithoutClass { claim: String },
    /// The new claim requests less than the claim it clones.
    #[error(
        "error, new PVC request must be greater than or equal in size to the specified PVC data source, requested {requested} but source is {source_size}"
    )]
    CloneTooSmall { requested: i128, source_size: i128 },
    /// The claim to clone names no volume.
    #[error("volume name is empty in source PVC {source_claim}")]
    SourceWithoutVolume { source_claim: String },
    /// The volume to clone is not a CSI volume of this driver.
    #[error("claim in dataSource not bound or invalid")]
    SourceOfOtherDriver,
    /// The clone would change the volume mode.
    #[error(
        "the source PVC and destination PVCs must have the same volume mode for cloning.  Source is {source_mode}, but new PVC requested {claim_mode}"
    )]
    VolumeModeMismatch {
        source_mode: &'static str,
        claim_mode: &'static str,
    },
    /// The snapshot to restore is not ready to use.
    #[error("snapshot {snapshot} is not Ready")]
    SnapshotNotReady { snapshot: String },
    /// The snapshot states a restore size but the claim requests no storage.
    #[error("error getting capacity for PVC {claim} when creating snapshot {snapshot}")]
    NoCapacity { claim: String, snapshot: String },
    /// The claim requests less than the snapshot's restore size.
    #[error("requested volume size {requested} is less than the size {restore} for the source snapshot {snapshot}")]
    RestoreTooSmall {
        requested: i128,
        restore: i128,
        snapshot: String,
    },
    /// The snapshot's restore size is not a quantity.
    #[error("snapshot {snapshot} has an invalid restoreSize {value:?}")]
    BadRestoreSize { snapshot: String, value: String },
}

/// Bytes of a claim's storage request (rounded up), `None` when it has none.
fn request_bytes(claim: &PersistentVolumeClaim) -> Result<Option<i128>, ProvisionError> {
    let Some(q) = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
    else {
        return Ok(None);
    };
    Quantity::parse(&q.0)
        .map(|p| Some(p.value_ceil()))
        .map_err(|_| ProvisionError::BadRequest(q.0.clone()))
}

fn name(claim: &PersistentVolumeClaim) -> String {
    claim.metadata.name.clone().unwrap_or_default()
}

fn mode(claim: &PersistentVolumeClaim) -> &'static str {
    match claim.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) {
        Some("Block") => "Block",
        _ => "Filesystem",
    }
}

/// Whether `claim` can be provisioned as a clone of `source`, the claim its data source names:
/// - the source must be Bound and not being deleted;
/// - both claims must name a class (`spec.storageClassName`);
/// - the new request must be at least the source's (a missing request counts as 0);
/// - the source must have its volume, made by `driver` (`source_driver` is the source PV's
///   `spec.csi.driver`, `None` when it is not a CSI volume);
/// - both must have the same volumeMode (unset is Filesystem). external-provisioner reads the
///   source PV's mode; the binder only binds a claim to a volume of its own mode, so the source
///   claim's is the same.
pub fn check_clone_source(
    claim: &PersistentVolumeClaim,
    source: &PersistentVolumeClaim,
    source_driver: Option<&str>,
    driver: &str,
) -> Result<(), ProvisionError> {
    let source_claim = name(source);
    let phase = source.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    if phase != "Bound" {
        return Err(DataSourceError::SourceNotBound { source_claim, phase }.into());
    }
    if source.metadata.deletion_timestamp.is_some() {
        return Err(DataSourceError::SourceDeleting { source_claim }.into());
    }
    let has_class = |c: &PersistentVolumeClaim| c.spec.as_ref().is_some_and(|s| s.storage_class_name.is_some());
    if !has_class(source) {
        return Err(DataSourceError::SourceWithoutClass { source_claim }.into());
    }
    if !has_class(claim) {
        return Err(DataSourceError::ClaimWithoutClass { claim: name(claim) }.into());
    }
    let requested = request_bytes(claim)?.unwrap_or(0);
    let source_size = request_bytes(source)?.unwrap_or(0);
    if requested < source_size {
        return Err(DataSourceError::CloneTooSmall { requested, source_size }.into());
    }
    let volume_name = source.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    if volume_name.unwrap_or("").is_empty() {
        return Err(DataSourceError::SourceWithoutVolume { source_claim }.into());
    }
    if source_driver != Some(driver) {
        return Err(DataSourceError::SourceOfOtherDriver.into());
    }
    let (source_mode, claim_mode) = (mode(source), mode(claim));
    if source_mode != claim_mode {
        return Err(DataSourceError::VolumeModeMismatch {
            source_mode,
            claim_mode,
        }
        .into());
    }
    Ok(())
}

/// The name of the object the claim's data source (or, failing that, data source ref) names.
fn data_source_name(claim: &PersistentVolumeClaim) -> String {
    let spec = claim.spec.as_ref();
    spec.and_then(|s| s.data_source.as_ref())
        .map(|d| d.name.clone())
        .or_else(|| spec.and_then(|s| s.data_source_ref.as_ref()).map(|d| d.name.clone()))
        .unwrap_or_default()
}

/// Whether `claim` can be restored from the snapshot its data source names: the snapshot must
/// be ready to use (`status.readyToUse`), and when it states a restore size the claim must
/// request at least that (a larger request is allowed: the driver expands the restored volume).
pub fn check_snapshot_source(
    claim: &PersistentVolumeClaim,
    restore_size: Option<&ApiQuantity>,
    ready: bool,
) -> Result<(), ProvisionError> {
    let snapshot = data_source_name(claim);
    if !ready {
        return Err(DataSourceError::SnapshotNotReady { snapshot }.into());
    }
    let Some(size) = restore_size else {
        return Ok(());
    };
    let restore = Quantity::parse(&size.0)
        .map_err(|_| DataSourceError::BadRestoreSize {
            snapshot: snapshot.clone(),
            value: size.0.clone(),
        })?
        .value_ceil();
    let Some(requested) = request_bytes(claim)? else {
        return Err(DataSourceError::NoCapacity {
            claim: name(claim),
            snapshot,
        }
        .into());
    };
    if requested < restore {
        return Err(DataSourceError::RestoreTooSmall {
            requested,
            restore,
            snapshot,
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::provision::fixtures::claim;
    use rstest::rstest;
    use serde_json::{Value, json};

    const DRIVER: &str = "berth.csi.io";

    fn source(extra: Value) -> PersistentVolumeClaim {
        let mut base = json!({
            "metadata": {"name": "src", "uid": "u-src"},
            "spec": {"volumeName": "pvc-u-src"},
            "status": {"phase": "Bound"},
        });
        crate::provision::fixtures::merge(&mut base, extra);
        claim(base)
    }

    fn clone(extra: Value) -> PersistentVolumeClaim {
        merged(
            claim(json!({"spec": {"dataSource": {"kind": "PersistentVolumeClaim", "name": "src"}}})),
            extra,
        )
    }

    fn merged(c: PersistentVolumeClaim, extra: Value) -> PersistentVolumeClaim {
        let mut v = serde_json::to_value(c).unwrap();
        crate::provision::fixtures::merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    #[rstest]
    #[case::same_size(clone(json!({})), source(json!({})), Some(DRIVER), Ok(()))]
    #[case::larger_request(clone(json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}})), source(json!({})), Some(DRIVER), Ok(()))]
    #[case::both_block(clone(json!({"spec": {"volumeMode": "Block"}})), source(json!({"spec": {"volumeMode": "Block"}})), Some(DRIVER), Ok(()))]
    #[case::explicit_filesystem_is_unset(clone(json!({"spec": {"volumeMode": "Filesystem"}})), source(json!({})), Some(DRIVER), Ok(()))]
    #[case::source_pending(clone(json!({})), source(json!({"status": {"phase": "Pending"}})), Some(DRIVER), Err("the PVC DataSource src must have a status of Bound.  Got Pending"))]
    #[case::source_deleting(clone(json!({})), source(json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})), Some(DRIVER), Err("the PVC DataSource src is currently being deleted"))]
    #[case::source_without_class(clone(json!({})), source(json!({"spec": {"storageClassName": null}})), Some(DRIVER), Err("the source PVC (src) storageclass cannot be empty"))]
    #[case::claim_without_class(clone(json!({"spec": {"storageClassName": null}})), source(json!({})), Some(DRIVER), Err("the requested PVC (data) storageclass cannot be empty"))]
    #[case::smaller_request(clone(json!({"spec": {"resources": {"requests": {"storage": "1G"}}}})), source(json!({})), Some(DRIVER), Err("error, new PVC request must be greater than or equal in size to the specified PVC data source, requested 1000000000 but source is 1073741824"))]
    #[case::source_without_volume(clone(json!({})), source(json!({"spec": {"volumeName": null}})), Some(DRIVER), Err("volume name is empty in source PVC src"))]
    #[case::other_driver(clone(json!({})), source(json!({})), Some("other.csi.io"), Err("claim in dataSource not bound or invalid"))]
    #[case::not_a_csi_volume(clone(json!({})), source(json!({})), None, Err("claim in dataSource not bound or invalid"))]
    #[case::block_from_filesystem(clone(json!({"spec": {"volumeMode": "Block"}})), source(json!({})), Some(DRIVER), Err("the source PVC and destination PVCs must have the same volume mode for cloning.  Source is Filesystem, but new PVC requested Block"))]
    #[case::filesystem_from_block(clone(json!({})), source(json!({"spec": {"volumeMode": "Block"}})), Some(DRIVER), Err("the source PVC and destination PVCs must have the same volume mode for cloning.  Source is Block, but new PVC requested Filesystem"))]
    fn clone_sources(
        #[case] c: PersistentVolumeClaim,
        #[case] src: PersistentVolumeClaim,
        #[case] source_driver: Option<&str>,
        #[case] want: Result<(), &str>,
    ) {
        let got = check_clone_source(&c, &src, source_driver, DRIVER).map_err(|e| e.to_string());
        assert_eq!(got, want.map_err(str::to_owned));
    }

    fn restore(extra: Value) -> PersistentVolumeClaim {
        merged(
            claim(
                json!({"spec": {"dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}}}),
            ),
            extra,
        )
    }

    #[rstest]
    #[case::ready_same_size(restore(json!({})), Some("1Gi"), true, Ok(()))]
    #[case::larger_request(restore(json!({})), Some("512Mi"), true, Ok(()))]
    #[case::no_restore_size(restore(json!({})), None, true, Ok(()))]
    #[case::not_ready(restore(json!({})), Some("1Gi"), false, Err("snapshot snap is not Ready"))]
    #[case::smaller_request(restore(json!({})), Some("2Gi"), true, Err("requested volume size 1073741824 is less than the size 2147483648 for the source snapshot snap"))]
    #[case::data_source_ref(
        claim(json!({"spec": {"dataSourceRef": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "ref-snap"}}})),
        Some("1Gi"), false, Err("snapshot ref-snap is not Ready")
    )]
    #[case::no_request(restore(json!({"spec": {"resources": {"requests": null}}})), Some("1Gi"), true, Err("error getting capacity for PVC data when creating snapshot snap"))]
    #[case::bad_restore_size(restore(json!({})), Some("lots"), true, Err("snapshot snap has an invalid restoreSize \"lots\""))]
    fn snapshot_sources(
        #[case] c: PersistentVolumeClaim,
        #[case] restore_size: Option<&str>,
        #[case] ready: bool,
        #[case] want: Result<(), &str>,
    ) {
        let size = restore_size.map(|s| ApiQuantity(s.to_owned()));
        let got = check_snapshot_source(&c, size.as_ref(), ready).map_err(|e| e.to_string());
        assert_eq!(got, want.map_err(str::to_owned));
    }
}

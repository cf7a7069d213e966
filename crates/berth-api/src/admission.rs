//! Admission, after validation: the default StorageClass for claims without a class, the PVC
//! resize rules, and the `kubernetes.io/pvc-protection` / `kubernetes.io/pv-protection`
//! finalizers. Pure: what it needs to know about other objects comes through [`Lookup`].

use serde_json::Value;

use crate::Resource;

/// What admission may read of the rest of the store.
pub trait Lookup {
    /// Every StorageClass, as stored.
    fn storage_classes(&self) -> Vec<Value>;
}

/// The operation being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    /// An update through the `status` subresource.
    UpdateStatus,
}

/// Why admission refused a request: the HTTP status (403 Forbidden, 422) and Kubernetes' message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

/// Mutates and checks `obj` (the new object) against `old` (for updates).
pub fn admit(
    _res: &Resource,
    _op: Operation,
    _obj: &mut Value,
    _old: Option<&Value>,
    _lookup: &dyn Lookup,
) -> Result<(), Denied> {
    Ok(())
}

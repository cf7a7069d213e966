//! Server-side printing: the `meta.k8s.io/v1` `Table` that `kubectl get` asks for, with the same
//! columns as Kubernetes (for PVs: NAME, CAPACITY, ACCESS MODES, RECLAIM POLICY, STATUS, CLAIM,
//! STORAGECLASS, REASON, AGE; wide columns have priority 1).

use serde_json::Value;

use crate::Resource;

/// Builds the Table (as JSON, ready to send) for `objects` of kind `res`. `now` computes AGE.
/// `include_object` is the request's `includeObject` (None, Metadata or Object).
pub fn table(res: &Resource, objects: &[Value], now: jiff::Timestamp, include_object: IncludeObject) -> Value {
    let _ = (res, objects, now, include_object);
    Value::Null
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

//! Validation, as the Kubernetes API server does after defaulting: every error names its field
//! path; an empty list means valid. Immutable fields are checked on update.

use serde_json::Value;

use crate::{FieldError, Resource};

/// Checks a new object (after defaulting).
pub fn validate_create(_res: &Resource, _obj: &Value) -> Vec<FieldError> {
    Vec::new()
}

/// Checks an update of the main resource: the new object's own rules plus immutable fields.
pub fn validate_update(_res: &Resource, _new: &Value, _old: &Value) -> Vec<FieldError> {
    Vec::new()
}

/// Checks an update through the `status` subresource.
pub fn validate_status_update(_res: &Resource, _new: &Value, _old: &Value) -> Vec<FieldError> {
    Vec::new()
}

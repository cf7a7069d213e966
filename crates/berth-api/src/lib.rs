//! Berth's API objects, with no I/O: which kinds exist ([`resources`]), and the pure functions the
//! API server runs on every request: defaulting, validation, admission, label and field
//! selectors, patches, and the tables `kubectl get` prints.
//!
//! Objects travel as `serde_json::Value` between the server and these functions, so that one
//! code path serves every kind; inside, each kind is read through its k8s-openapi type (or
//! Berth's own for the snapshot kinds), so that YAML written for Kubernetes round-trips exactly.

pub mod admission;
pub mod defaults;
pub mod error;
pub mod names;
pub mod patch;
pub mod printing;
pub mod quantity;
pub mod resources;
pub mod selector;
pub mod snapshot;
pub mod validation;

pub use error::{FieldError, FieldErrorKind};
pub use resources::{Resource, Scope};

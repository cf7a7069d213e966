//! Berth's API objects, with no I/O: which kinds exist ([`resources`]), and the pure functions the
//! API server runs on every request: defaulting, validation, admission, label and field
//! selectors, patches, and the tables `kubectl get` prints.
//!
//! Objects travel as `serde_json::Value` between the server and these functions, so that one
//! code path serves every kind; inside, each kind is read through its k8s-openapi type (or
//! Berth's own for the snapshot kinds), so that YAML written for Kubernetes round-trips exactly.
//!
//! The order the API server is expected to follow, as kube-apiserver does:
//!
//! - create: fill server fields (name from `generateName`, namespace from the URL, uid,
//!   creationTimestamp), then [`defaults::apply`], then [`validation::validate_create`] (422 with
//!   the errors as `details.causes`), then [`admission::admit`] with `Operation::Create`.
//! - update: carry the server-owned fields over from the stored object (and the stored `status`
//!   for kinds with a status subresource), then [`defaults::apply`],
//!   [`validation::validate_update`], [`admission::admit`] with `Operation::Update`.
//! - status update: keep the stored spec, then [`validation::validate_status_update`].
//! - patch: [`patch::apply`] on the stored object, then as an update.
//! - list/watch: [`selector::LabelSelector`] and [`selector::FieldSelector`]; tables for
//!   `kubectl get` from [`printing::table`].
//!
//! Every function here is pure and total: any JSON body gives errors, never a panic.

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

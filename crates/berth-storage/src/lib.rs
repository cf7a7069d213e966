//! Berth's node-local storage engine and its built-in CSI driver.
//!
//! - [`engine`]: volumes (dir, fs, block, tmpfs) in pools, staged and published on this node;
//!   idempotent, crash-safe, serialized per volume.
//! - [`pool`]: btrfs pools with qgroups, made from an image file when the host cannot enforce
//!   per-directory limits itself.
//! - [`journal`]: the durable records (redb), committed before any client is answered.
//! - [`reconcile`]: start-up repair that makes the kernel agree with the journal.
//! - [`spares`]: empty subvolumes made ahead of time, so a dir CreateVolume is a rename.
//! - [`spec`]: pure decisions about what a request asks for.
//! - [`csi`]: the engine served as a CSI driver.
//!
//! All kernel access goes through [`berth_host::HostOps`].

pub mod attach;
pub mod crash;
pub mod csi;
pub mod engine;
mod expand;
pub mod id;
pub mod journal;
pub mod pool;
mod reconcile;
mod snapshot;
mod spares;
pub mod spec;
pub mod teardown;

pub use csi::{BerthDriver, DRIVER_NAME, TOPOLOGY_KEY};
pub use engine::{DEFAULT_POOL, Engine, EngineConfig, EngineError};

#[cfg(test)]
mod engine_tests;

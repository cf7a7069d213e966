//! Berth's Docker volume plugin: `docker volume create -d berth` on Berth's storage engine.
//!
//! The protocol (moby's volume-plugin API, HTTP/1.1 POSTs over a unix socket) is handled in
//! three steps that never mix:
//! - [`request`]: bytes → [`request::Action`], pure; [`options`] validates names and `-o`
//!   options the same way;
//! - [`plugin`]: executes an action against a [`backend::Backend`] (the engine), keeping mount
//!   counts per (volume, mount ID) in its own redb file ([`store`]);
//! - [`server`] and [`response`]: the socket, HTTP, and the JSON answers.
//!
//! [`client`] talks to a running plugin for `berth volume snapshot|snapshots|rm-snapshot`.
//!
//! Docker names are only ever engine names; every path is built from an engine id.

pub mod backend;
pub mod client;
pub mod options;
pub mod plugin;
pub mod request;
pub mod response;
pub mod server;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use backend::{Backend, EngineBackend};
pub use plugin::{Plugin, PluginError};
pub use server::{ServeError, bind, serve};

/// The socket Docker discovers a plugin named `berth` at.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/berth.sock";

/// The plugin's state file under an engine data dir.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("docker.redb")
}

/// Where backend mounts live under an engine data dir. For a managed plugin the data dir is
/// under the propagated mount, so these are too.
pub fn mounts_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("docker").join("mounts")
}

/// Opens the plugin on an engine, with its state and mounts under the engine's data dir.
pub fn open(engine: Arc<berth_storage::Engine>) -> Result<Plugin, PluginError> {
    let data_dir = engine.data_dir().to_owned();
    let backend: Arc<dyn Backend> = Arc::new(EngineBackend::new(engine));
    Plugin::open(backend, &store_path(&data_dir), mounts_dir(&data_dir))
}

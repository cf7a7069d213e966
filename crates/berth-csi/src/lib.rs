//! CSI v1.12 for Berth: the protocol, a server adapter for drivers, and a client for any driver.
//!
//! - [`v1`]: prost messages and tonic clients/servers generated from `proto/csi.proto`, which is
//!   written in this crate from the spec's field list. Secret fields never appear in `Debug`.
//! - [`Driver`]: the trait a storage backend implements, one async method per RPC; anything it does
//!   not override answers `UNIMPLEMENTED`.
//! - [`serve_unix`]: serves a driver on a unix socket (mode 0600) until a shutdown future resolves.
//! - [`client`]: connects to any CSI driver's socket and probes what it advertises.
//!
//! This crate never decides storage policy; it validates only what the spec makes common to every
//! RPC (size limits) and leaves per-field requirements to the driver via [`validate`] helpers.

pub mod client;
mod driver;
mod error;
pub mod redact;
mod server;
pub mod validate;

pub use client::{Capabilities, Client, connect};
pub use driver::Driver;
pub use error::CsiError;
pub use server::{CsiService, ServeError, parse_endpoint, serve_unix};

/// Generated CSI v1 types and services (package `csi.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
    include!(concat!(env!("OUT_DIR"), "/csi_redacted_debug.rs"));
}

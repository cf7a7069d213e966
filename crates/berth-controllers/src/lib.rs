//! Berth's storage controllers, as `../shared/ARCHITECTURE.md` lays them out: each is a pure
//! decision over the objects it is shown, plus a thin runner that feeds it watch events and
//! writes back what it decides. The decisions reproduce Kubernetes' own (the PV controller, the
//! scheduler's volume binding, the external provisioner, attacher, resizer and snapshotter), so
//! that manifests written for Kubernetes mean the same thing here.
//!
//! So far: the binder's matching rule ([`binder`]); the provisioner's CreateVolume request, PV,
//! retry classification and data-source checks ([`provision`]); and the VolumeAttachment name
//! ([`attach`]).

pub mod attach;
pub mod binder;
pub mod provision;

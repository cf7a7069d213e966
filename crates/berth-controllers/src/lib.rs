//! Berth's storage controllers, as `../shared/ARCHITECTURE.md` lays them out: each is a pure
//! decision over the objects it is shown, plus a thin runner that feeds it watch events and
//! writes back what it decides. The decisions reproduce Kubernetes' own (the PV controller, the
//! scheduler's volume binding, the external provisioner, attacher, resizer and snapshotter), so
//! that manifests written for Kubernetes mean the same thing here.
//!
//! Pure decisions: [`binder`] (the matching rule), [`index`] (the same rule at O(log n)),
//! [`pv_sync`] (claim and volume phases, binding, reclaim), [`protection`] (finalizers),
//! [`schedule`] (the scheduler's volume binding), [`provision`] (CreateVolume requests and
//! the PVs they make), [`attach`] (VolumeAttachment names).
//! Runners: [`pv_controller`], [`provisioner`], [`protection`], [`registration`] (this node's
//! Node, CSINode, CSIDrivers and CSIStorageCapacities), [`scheduler`] (places pods), over
//! [`informer`]s and [`queue`]s, writing through [`api::Api`] and recording [`events`].
//! Both, each module its decisions then its runner: [`attacher`] (attach/detach and
//! external-attacher), [`resizer`] (external-resizer), [`snapshotter`] (snapshot-controller and
//! csi-snapshotter), with what those sidecars share in [`sidecar`].

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, CSIStorageCapacity, StorageClass, VolumeAttachment};
use tokio::sync::watch;

pub mod api;
pub mod attach;
pub mod attacher;
pub mod binder;
pub mod drivers;
pub mod events;
pub mod index;
pub mod informer;
pub mod protection;
pub mod provision;
pub mod provisioner;
pub mod pv_controller;
pub mod pv_sync;
pub mod queue;
pub mod registration;
pub mod resizer;
pub mod schedule;
pub mod scheduler;
pub mod sidecar;
pub mod snapshotter;

use api::{Api, kinds};
use informer::Informer;

/// The caches every controller reads, one per kind, shared.
#[derive(Debug)]
pub struct Informers {
    pub pvs: Arc<Informer<PersistentVolume>>,
    pub pvcs: Arc<Informer<PersistentVolumeClaim>>,
    pub classes: Arc<Informer<StorageClass>>,
    pub pods: Arc<Informer<Pod>>,
    pub nodes: Arc<Informer<Node>>,
    pub csi_drivers: Arc<Informer<CSIDriver>>,
    pub csi_nodes: Arc<Informer<CSINode>>,
    pub attachments: Arc<Informer<VolumeAttachment>>,
    pub capacities: Arc<Informer<CSIStorageCapacity>>,
}

impl Informers {
    pub fn new() -> Arc<Self> {
        Arc::new(Informers {
            pvs: Informer::new(kinds::pvs()),
            pvcs: Informer::new(kinds::pvcs()),
            classes: Informer::new(kinds::storage_classes()),
            pods: Informer::new(kinds::pods()),
            nodes: Informer::new(kinds::nodes()),
            csi_drivers: Informer::new(kinds::csi_drivers()),
            csi_nodes: Informer::new(kinds::csi_nodes()),
            attachments: Informer::new(kinds::volume_attachments()),
            capacities: Informer::new(kinds::capacities()),
        })
    }

    /// Starts every informer (register handlers first).
    pub fn start(&self, api: &Arc<dyn Api>, stop: &watch::Receiver<bool>) {
        macro_rules! go {
            ($($f:ident),*) => {$(
                tokio::spawn(self.$f.clone().run(api.clone(), stop.clone()));
            )*};
        }
        go!(
            pvs,
            pvcs,
            classes,
            pods,
            nodes,
            csi_drivers,
            csi_nodes,
            attachments,
            capacities
        );
    }

    /// Waits until every cache holds its first list.
    pub async fn wait_synced(&self) {
        self.pvs.wait_synced().await;
        self.pvcs.wait_synced().await;
        self.classes.wait_synced().await;
        self.pods.wait_synced().await;
        self.nodes.wait_synced().await;
        self.csi_drivers.wait_synced().await;
        self.csi_nodes.wait_synced().await;
        self.attachments.wait_synced().await;
        self.capacities.wait_synced().await;
    }
}

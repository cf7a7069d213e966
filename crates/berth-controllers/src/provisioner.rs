//! The provisioner's runner (kubernetes-csi external-provisioner, for every registered driver
//! at once): claims handed to a driver (`volume.kubernetes.io/storage-provisioner`) get a volume
//! through CreateVolume and a PV pre-bound to them; Released volumes it provisioned with policy
//! Delete are deleted through DeleteVolume, then their PV.
//!
//! Crash safety: before the first CreateVolume for a claim, the claim gets the finalizer
//! [`PROVISIONING_FINALIZER`] (a durable note that a backend volume may exist). It is removed
//! once the PV exists (from then on the PV carries the volume). If the claim is deleted in
//! between, it stays Terminating until the provisioner has called CreateVolume again (idempotent
//! by name, so it answers with the same volume) and DeleteVolume on its answer. So a kill at any
//! point neither leaks a backend volume nor makes two.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use tokio::sync::watch;

use crate::Informers;
use crate::api::{Api, ApiError, Part, Typed, kinds};
use crate::binder::claim_class;
use crate::drivers::{Driver, Drivers};
use crate::events::{Involved, Recorder};
use crate::informer::Change;
use crate::provision::{
    self, ClusterTopology, ContentSource, ProvisionError, ProvisionInput, ProvisionerConfig, Retry, SecretKind,
};
use crate::pv_controller::retry_after;
use crate::pv_sync::{
    ANN_BETA_STORAGE_PROVISIONER, ANN_SELECTED_NODE, ANN_STORAGE_PROVISIONER, Note, claim_key, claim_volume_name,
    should_delete,
};
use crate::queue::{Outcome, Queue};

pub use crate::pv_sync::PROVISIONING_FINALIZER;
/// How long one CreateVolume or DeleteVolume may take before it is retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The runner.
#[derive(Debug)]
pub struct Provisioner {
    api: Arc<dyn Api>,
    inf: Arc<Informers>,
    drivers: Arc<Drivers>,
    claims: Arc<Queue>,
    volumes: Arc<Queue>,
    events: Recorder,
    /// `<start, ms since the epoch>-<0..9999>`: with the driver's name, this instance's
    /// identity in every PV it writes (`storage.kubernetes.io/csiProvisionerIdentity`), as
    /// external-provisioner records its own.
    identity: String,
}

/// The start and a random number below 10,000, as external-provisioner makes its identity.
fn identity_prefix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish() % 10_000;
    format!("{ms}-{random}")
}

fn provisioner_of(claim: &PersistentVolumeClaim) -> Option<&str> {
    let a = claim.metadata.annotations.as_ref()?;
    a.get(ANN_STORAGE_PROVISIONER)
        .or_else(|| a.get(ANN_BETA_STORAGE_PROVISIONER))
        .map(String::as_str)
}

fn has_finalizer(claim: &PersistentVolumeClaim) -> bool {
    claim
        .metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == PROVISIONING_FINALIZER))
}

fn grpc(call: &str, s: &tonic::Status) -> String {
    format!("rpc error: code = {:?} desc = {} ({call})", s.code(), s.message())
}

impl Provisioner {
    pub fn new(api: Arc<dyn Api>, inf: Arc<Informers>, drivers: Arc<Drivers>, events: &Recorder) -> Arc<Self> {
        let p = Arc::new(Provisioner {
            api,
            inf: inf.clone(),
            drivers,
            claims: Queue::new("provision"),
            volumes: Queue::new("delete"),
            events: events.for_component("external-provisioner"),
            identity: identity_prefix(),
        });
        let q = p.claims.clone();
        inf.pvcs.on_change(move |c| {
            if let Change::Upsert { new, .. } = c
                && (provisioner_of(new).is_some() || has_finalizer(new))
            {
                q.add(claim_key(new));
            }
        });
        let (q, claims) = (p.volumes.clone(), p.claims.clone());
        inf.pvs.on_change(move |c| match c {
            Change::Upsert { new, .. } => {
                if let Some(n) = &new.metadata.name {
                    q.add(n.clone());
                }
                // A new PV lets its claim drop the provisioning finalizer.
                if let Some(k) = crate::pv_controller::claim_ref_key(new) {
                    claims.add(k);
                }
            }
            Change::Delete(_) => {}
        });
        p
    }

    pub async fn run(self: Arc<Self>, workers: usize, stop: watch::Receiver<bool>) {
        self.inf.wait_synced().await;
        // Claims that waited for a driver to register look again when one does.
        let me = self.clone();
        let mut registered = self.drivers.subscribe();
        let mut stop2 = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = registered.changed() => if r.is_err() { return },
                    _ = stop2.wait_for(|s| *s) => return,
                }
                for c in me.inf.pvcs.list() {
                    if provisioner_of(&c).is_some() && claim_volume_name(&c).is_empty() {
                        me.claims.add(claim_key(&c));
                    }
                }
                for v in me.inf.pvs.list() {
                    if let Some(n) = &v.metadata.name {
                        me.volumes.add(n.clone());
                    }
                }
            }
        });
        let p = self.clone();
        let claims = tokio::spawn(self.claims.clone().run(
            workers,
            move |key| {
                let p = p.clone();
                async move { p.sync_claim(&key).await }
            },
            stop.clone(),
        ));
        let p = self.clone();
        let volumes = tokio::spawn(self.volumes.clone().run(
            workers,
            move |key| {
                let p = p.clone();
                async move { p.sync_volume(&key).await }
            },
            stop,
        ));
        let _ = tokio::join!(claims, volumes);
    }

    fn note(&self, claim: &PersistentVolumeClaim, note: Note) {
        self.events
            .record(Involved::of("v1", "PersistentVolumeClaim", &claim.metadata), note);
    }

    /// Writes `new` over `old`, the cached claim it was made from.
    async fn write_claim(&self, old: &PersistentVolumeClaim, new: PersistentVolumeClaim) -> Result<(), Outcome> {
        let old = old.to_value().map_err(|_| Outcome::Retry)?;
        let v = new.to_value().map_err(|_| Outcome::Retry)?;
        match self.api.update_over(kinds::pvcs(), old, v, Part::Main).await {
            Ok(stored) => {
                self.inf.pvcs.assume(stored);
                Ok(())
            }
            Err(e) => Err(retry_after(&e)),
        }
    }

    async fn sync_claim(&self, key: &str) -> Outcome {
        let Some(claim) = self.inf.pvcs.get(key) else {
            return Outcome::Done;
        };
        let pv_name = provision::pv_name(&claim);
        let pv_exists = self.inf.pvs.get(&pv_name).is_some();
        if has_finalizer(&claim) && (pv_exists || !claim_volume_name(&claim).is_empty()) {
            // The PV carries the volume now.
            let mut new = (*claim).clone();
            crate::protection::drop_finalizer(&mut new.metadata, PROVISIONING_FINALIZER);
            return self.write_claim(&claim, new).await.err().unwrap_or(Outcome::Done);
        }
        let Some(driver_name) = provisioner_of(&claim).map(str::to_owned) else {
            return Outcome::Done;
        };
        if pv_exists || !claim_volume_name(&claim).is_empty() {
            return Outcome::Done;
        }
        let Some(driver) = self.drivers.get(&driver_name) else {
            // Not a driver registered here (yet): a registration requeues it.
            return if has_finalizer(&claim) {
                Outcome::After(Duration::from_secs(2))
            } else {
                Outcome::Done
            };
        };
        let deleting = claim.metadata.deletion_timestamp.is_some();
        if deleting && !has_finalizer(&claim) {
            return Outcome::Done;
        }
        let class_name = claim_class(&claim).to_owned();
        let Some(class) = self.inf.classes.get(&class_name) else {
            self.note(
                &claim,
                Note::warning(
                    "ProvisioningFailed",
                    format!("storageclass.storage.k8s.io \"{class_name}\" not found"),
                ),
            );
            return Outcome::Retry;
        };
        let selected = claim
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_SELECTED_NODE))
            .cloned();
        if !deleting && class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") && selected.is_none() {
            return Outcome::Done;
        }
        let node: Option<Arc<Node>> = match &selected {
            Some(n) => match self.inf.nodes.get(n) {
                Some(node) => Some(node),
                None => {
                    self.note(
                        &claim,
                        Note::warning(
                            "ProvisioningFailed",
                            format!("failed to get target node: node \"{n}\" not found"),
                        ),
                    );
                    return Outcome::Retry;
                }
            },
            None => None,
        };
        match self
            .provision(&claim, &class, &driver, node.as_deref(), &pv_name, deleting)
            .await
        {
            Ok(()) => Outcome::Done,
            Err(o) => o,
        }
    }

    /// The driver's topology keys and every node's segment for them.
    fn topology(&self, driver: &Driver, node: Option<&Node>) -> (Vec<String>, Vec<provision::Segments>) {
        let keys_of = |csinode: &k8s_openapi::api::storage::v1::CSINode| {
            csinode
                .spec
                .drivers
                .iter()
                .find(|d| d.name == driver.name)
                .and_then(|d| d.topology_keys.clone())
        };
        let mut keys = match node.and_then(|n| n.metadata.name.as_deref()) {
            Some(n) => self.inf.csi_nodes.get(n).and_then(|c| keys_of(&c)),
            None => self.inf.csi_nodes.list().iter().find_map(|c| keys_of(c)),
        }
        .unwrap_or_default();
        if keys.is_empty()
            && let Some(info) = &driver.node
        {
            // Berth's own driver before its CSINode is written: what NodeGetInfo reported.
            keys = info.topology.keys().cloned().collect();
        }
        let mut segments: Vec<_> = self
            .inf
            .nodes
            .list()
            .iter()
            .filter_map(|n| provision::node_segment(&n.metadata.labels.clone().unwrap_or_default(), &keys))
            .collect();
        if segments.is_empty()
            && let Some(info) = &driver.node
            && !info.topology.is_empty()
        {
            segments.push(info.topology.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        }
        (keys, segments)
    }

    async fn secret_data(&self, ns: &str, name: &str) -> Result<BTreeMap<String, String>, String> {
        crate::sidecar::load_secret(&*self.api, ns, name)
            .await
            .map(|m| m.into_iter().collect())
            .map_err(|e| format!("failed to get secret {ns}/{name}: {e}"))
    }

    /// The claim's data source as the driver sees it, checked.
    async fn content_source(
        &self,
        claim: &PersistentVolumeClaim,
        driver: &str,
    ) -> Result<Option<ContentSource>, String> {
        let Some(ds) = claim.spec.as_ref().and_then(|s| {
            s.data_source_ref
                .as_ref()
                .map(|r| (r.kind.clone(), r.name.clone(), r.api_group.clone()))
                .or_else(|| {
                    s.data_source
                        .as_ref()
                        .map(|r| (r.kind.clone(), r.name.clone(), r.api_group.clone()))
                })
        }) else {
            return Ok(None);
        };
        let ns = claim.metadata.namespace.clone().unwrap_or_default();
        match (ds.0.as_str(), ds.2.as_deref().unwrap_or("")) {
            ("PersistentVolumeClaim", "") => {
                let source = self
                    .inf
                    .pvcs
                    .get(&format!("{ns}/{}", ds.1))
                    .ok_or_else(|| format!("error getting PVC {ns}/{} from api server: not found", ds.1))?;
                let source_pv = self.inf.pvs.get(claim_volume_name(&source));
                let source_driver = source_pv
                    .as_ref()
                    .and_then(|p| p.spec.as_ref()?.csi.as_ref())
                    .map(|c| c.driver.clone());
                provision::check_clone_source(claim, &source, source_driver.as_deref(), driver)
                    .map_err(|e| e.to_string())?;
                let handle = source_pv
                    .and_then(|p| p.spec.as_ref()?.csi.as_ref().map(|c| c.volume_handle.clone()))
                    .ok_or_else(|| format!("volume of claim {ns}/{} has no CSI handle", ds.1))?;
                Ok(Some(ContentSource::Volume(handle)))
            }
            ("VolumeSnapshot", "snapshot.storage.k8s.io") => {
                let snap: berth_api::snapshot::VolumeSnapshot = Typed::from_value(
                    self.api
                        .get(kinds::snapshots(), Some(&ns), &ds.1)
                        .await
                        .map_err(|e| format!("error getting snapshot {} from api server: {e}", ds.1))?,
                )
                .map_err(|e| e.to_string())?;
                let status = snap.status.clone().unwrap_or_default();
                provision::check_snapshot_source(
                    claim,
                    status.restore_size.as_ref(),
                    status.ready_to_use.unwrap_or(false),
                )
                .map_err(|e| e.to_string())?;
                let content_name = status
                    .bound_volume_snapshot_content_name
                    .ok_or_else(|| format!("snapshot {} not bound", ds.1))?;
                let content: berth_api::snapshot::VolumeSnapshotContent = Typed::from_value(
                    self.api
                        .get(kinds::snapshot_contents(), None, &content_name)
                        .await
                        .map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())?;
                let handle = content
                    .status
                    .and_then(|s| s.snapshot_handle)
                    .ok_or_else(|| format!("snapshot content {content_name} has no snapshot handle"))?;
                Ok(Some(ContentSource::Snapshot(handle)))
            }
            (kind, group) => Err(format!("unsupported data source {group}/{kind}")),
        }
    }

    async fn provision(
        &self,
        claim: &PersistentVolumeClaim,
        class: &k8s_openapi::api::storage::v1::StorageClass,
        driver: &Driver,
        node: Option<&Node>,
        pv_name: &str,
        deleting: bool,
    ) -> Result<(), Outcome> {
        let fail = |msg: String| {
            self.note(claim, Note::warning("ProvisioningFailed", msg));
            Outcome::Retry
        };
        let class_name = class.metadata.name.clone().unwrap_or_default();
        let params = class.parameters.clone().unwrap_or_default();
        let secrets = match provision::resolve_secret_ref(&params, SecretKind::Provisioner, pv_name, claim) {
            Ok(Some((ns, name))) => self.secret_data(&ns, &name).await.map_err(fail)?,
            Ok(None) => BTreeMap::new(),
            Err(e) => return Err(fail(e.to_string())),
        };
        let source = self.content_source(claim, &driver.name).await.map_err(|m| {
            fail(format!(
                "failed to provision volume with StorageClass \"{class_name}\": {m}"
            ))
        })?;
        let mut config = ProvisionerConfig::new(driver.name.clone());
        config.identity = format!("{}-{}", self.identity, driver.name);
        config.single_node_multi_writer =
            driver.controller(berth_csi::v1::controller_service_capability::rpc::Type::SingleNodeMultiWriter);
        let (keys, segments) = self.topology(driver, node);
        let input = ProvisionInput {
            config: &config,
            claim,
            class,
            selected_node: node,
            topology: driver.has_topology().then_some(ClusterTopology {
                keys: &keys,
                segments: &segments,
            }),
            provisioner_secrets: &secrets,
            content_source: source.as_ref(),
        };
        let request = provision::create_volume_request(&input).map_err(|e| {
            fail(format!(
                "failed to provision volume with StorageClass \"{class_name}\": {e}"
            ))
        })?;
        if !has_finalizer(claim) {
            // Durable before the backend volume can exist.
            let mut new = claim.clone();
            new.metadata
                .finalizers
                .get_or_insert_with(Vec::new)
                .push(PROVISIONING_FINALIZER.into());
            self.write_claim(claim, new).await?;
        }
        self.note(
            claim,
            Note::normal(
                "Provisioning",
                format!(
                    "External provisioner is provisioning volume for claim \"{}\"",
                    claim_key(claim)
                ),
            ),
        );
        let mut client = driver.client.controller.clone();
        let mut req = tonic::Request::new(request);
        req.set_timeout(CALL_TIMEOUT);
        let response = match client.create_volume(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let may_reschedule = node.is_some() && driver.has_topology();
                let msg = format!(
                    "failed to provision volume with StorageClass \"{class_name}\": {}",
                    grpc("CreateVolume", &s)
                );
                let retry = provision::classify(s.code(), may_reschedule);
                if deleting && retry != Retry::Background {
                    // A definite failure: no volume exists, so nothing is left to undo.
                    let mut new = claim.clone();
                    crate::protection::drop_finalizer(&mut new.metadata, PROVISIONING_FINALIZER);
                    return self.write_claim(claim, new).await;
                }
                return Err(match retry {
                    Retry::Reschedule => {
                        let mut new = claim.clone();
                        if let Some(a) = new.metadata.annotations.as_mut() {
                            a.remove(ANN_SELECTED_NODE);
                        }
                        self.note(claim, Note::warning("ProvisioningFailed", msg));
                        self.write_claim(claim, new).await.err().unwrap_or(Outcome::Done)
                    }
                    Retry::Background => Outcome::After(Duration::from_millis(500)),
                    _ => fail(msg),
                });
            }
        };
        let handle = response
            .volume
            .as_ref()
            .map(|v| v.volume_id.clone())
            .unwrap_or_default();
        if deleting {
            // The claim went away while its volume was being made: undo it.
            self.delete_backend(driver, &handle, &secrets).await.map_err(|m| {
                self.note(claim, Note::warning("ProvisioningFailed", m));
                Outcome::Retry
            })?;
            let mut new = claim.clone();
            crate::protection::drop_finalizer(&mut new.metadata, PROVISIONING_FINALIZER);
            return self.write_claim(claim, new).await;
        }
        let pv = match provision::persistent_volume(&input, &response) {
            Ok(pv) => pv,
            Err(e @ (ProvisionError::CapacityTooSmall { .. } | ProvisionError::ContentSourceMissing)) => {
                let _ = self.delete_backend(driver, &handle, &secrets).await;
                return Err(fail(format!(
                    "failed to provision volume with StorageClass \"{class_name}\": {e}"
                )));
            }
            Err(e) => {
                return Err(fail(format!(
                    "failed to provision volume with StorageClass \"{class_name}\": {e}"
                )));
            }
        };
        let value = pv.to_value().map_err(|_| Outcome::Retry)?;
        match self.api.create(kinds::pvs(), value).await {
            Ok(stored) => {
                self.inf.pvs.assume(stored);
                self.note(
                    claim,
                    Note::normal(
                        "ProvisioningSucceeded",
                        format!("Successfully provisioned volume {pv_name}"),
                    ),
                );
                Ok(())
            }
            Err(ApiError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(retry_after(&e)),
        }
    }

    async fn delete_backend(
        &self,
        driver: &Driver,
        handle: &str,
        secrets: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let mut client = driver.client.controller.clone();
        let mut req = tonic::Request::new(berth_csi::v1::DeleteVolumeRequest {
            volume_id: handle.to_owned(),
            secrets: secrets.clone().into_iter().collect(),
        });
        req.set_timeout(CALL_TIMEOUT);
        match client.delete_volume(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(grpc("DeleteVolume", &s)),
        }
    }

    async fn sync_volume(&self, name: &str) -> Outcome {
        let Some(pv) = self.inf.pvs.get(name) else {
            return Outcome::Done;
        };
        let Some(csi) = pv.spec.as_ref().and_then(|s| s.csi.as_ref()) else {
            return Outcome::Done;
        };
        let Some(driver) = self.drivers.get(&csi.driver) else {
            return Outcome::Done;
        };
        if !should_delete(&pv, &driver.name) {
            return Outcome::Done;
        }
        let ours = pv
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|x| x == provision::PV_FINALIZER));
        if pv.metadata.deletion_timestamp.is_some() && !ours {
            // Deleted already: the backend volume went before our finalizer did.
            return Outcome::Done;
        }
        let note = |n: Note| {
            self.events
                .record(Involved::of("v1", "PersistentVolume", &pv.metadata), n);
        };
        let ann = pv.metadata.annotations.clone().unwrap_or_default();
        let secrets = match (
            ann.get(provision::DELETION_SECRET_NAMESPACE).filter(|s| !s.is_empty()),
            ann.get(provision::DELETION_SECRET_NAME).filter(|s| !s.is_empty()),
        ) {
            (Some(ns), Some(n)) => match self.secret_data(ns, n).await {
                Ok(s) => s,
                Err(m) => {
                    note(Note::warning("VolumeFailedDelete", m));
                    return Outcome::Retry;
                }
            },
            _ => BTreeMap::new(),
        };
        if let Err(m) = self.delete_backend(&driver, &csi.volume_handle, &secrets).await {
            note(Note::warning("VolumeFailedDelete", m));
            return Outcome::Retry;
        }
        // The backend volume is gone: drop our finalizer, then the PV.
        let mut new: PersistentVolume = (*pv).clone();
        crate::protection::drop_finalizer(&mut new.metadata, provision::PV_FINALIZER);
        if new != *pv {
            let Ok(v) = new.to_value() else { return Outcome::Retry };
            if let Err(e) = self.api.update(kinds::pvs(), v, Part::Main).await {
                return retry_after(&e);
            }
        }
        match self
            .api
            .delete(kinds::pvs(), None, name, pv.metadata.uid.as_deref())
            .await
        {
            Ok(()) | Err(ApiError::NotFound(_)) => Outcome::Done,
            Err(e) => retry_after(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_start_millis_and_a_number_below_ten_thousand() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let id = identity_prefix();
        let (ms, random) = id.split_once('-').unwrap();
        let ms: u128 = ms.parse().unwrap();
        assert!(ms >= before && ms < before + 60_000, "{id}");
        assert!(random.parse::<u16>().unwrap() < 10_000, "{id}");
    }
}

//! Storage object in use protection (Kubernetes' pvc-protection and pv-protection controllers).
//!
//! The API server's admission adds `kubernetes.io/pvc-protection` to every claim and
//! `kubernetes.io/pv-protection` to every volume. Deleting one only marks it Terminating; these
//! controllers remove the finalizer once the object is no longer in use, and the deletion then
//! completes:
//! - a claim is in use while a pod scheduled to a node (`spec.nodeName` set) names it, through a
//!   `persistentVolumeClaim` volume or a generic ephemeral volume (claim `<pod>-<volume>`).
//!   Pods that have completed still count, as in Kubernetes; unscheduled pods do not;
//! - a volume is in use while it is Bound.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::watch;

use crate::Informers;
use crate::api::{Api, Part, Typed, kinds};
use crate::informer::Change;
use crate::pv_controller::retry_after;
use crate::pv_sync::claim_key;
use crate::queue::{Outcome, Queue};

pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
pub const PV_PROTECTION: &str = "kubernetes.io/pv-protection";

/// The claims a pod names (persistentVolumeClaim volumes and its ephemeral volumes' claims).
pub fn pod_claims(pod: &Pod) -> Vec<String> {
    let pod_name = pod.metadata.name.as_deref().unwrap_or("");
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| {
            if let Some(c) = &v.persistent_volume_claim {
                Some(c.claim_name.clone())
            } else {
                v.ephemeral.as_ref().map(|_| format!("{pod_name}-{}", v.name))
            }
        })
        .collect()
}

/// Whether `pod` keeps the claim `name` (in the pod's namespace) in use.
pub fn pod_uses_claim(pod: &Pod, name: &str) -> bool {
    let scheduled = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    scheduled && pod_claims(pod).iter().any(|c| c == name)
}

fn terminating_with(meta: &ObjectMeta, finalizer: &str) -> bool {
    meta.deletion_timestamp.is_some()
        && meta
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|x| x == finalizer))
}

/// Whether the claim's protection finalizer can go: it is being deleted and no pod of its
/// namespace in `pods` uses it.
pub fn claim_releasable<'a>(claim: &PersistentVolumeClaim, pods: impl IntoIterator<Item = &'a Pod>) -> bool {
    let ns = claim.metadata.namespace.as_deref();
    let name = claim.metadata.name.as_deref().unwrap_or("");
    terminating_with(&claim.metadata, PVC_PROTECTION)
        && !pods
            .into_iter()
            .any(|p| p.metadata.namespace.as_deref() == ns && pod_uses_claim(p, name))
}

/// Whether the volume's protection finalizer can go: it is being deleted and is not Bound.
pub fn volume_releasable(pv: &PersistentVolume) -> bool {
    terminating_with(&pv.metadata, PV_PROTECTION)
        && pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound")
}

/// `meta` without `finalizer`.
pub fn drop_finalizer(meta: &mut ObjectMeta, finalizer: &str) {
    if let Some(f) = meta.finalizers.as_mut() {
        f.retain(|x| x != finalizer);
    }
}

/// The runner of both controllers (one queue: `pvc/<ns>/<name>` and `pv/<name>` keys).
#[derive(Debug)]
pub struct Protection {
    api: Arc<dyn Api>,
    inf: Arc<Informers>,
    queue: Arc<Queue>,
}

impl Protection {
    pub fn new(api: Arc<dyn Api>, inf: Arc<Informers>) -> Arc<Self> {
        let p = Arc::new(Protection {
            api,
            inf: inf.clone(),
            queue: Queue::new("protection"),
        });
        let q = p.queue.clone();
        inf.pvcs.on_change(move |c| {
            if let Change::Upsert { new, .. } = c
                && terminating_with(&new.metadata, PVC_PROTECTION)
            {
                q.add(format!("pvc/{}", claim_key(new)));
            }
        });
        let q = p.queue.clone();
        inf.pvs.on_change(move |c| {
            if let Change::Upsert { new, .. } = c
                && terminating_with(&new.metadata, PV_PROTECTION)
                && let Some(n) = &new.metadata.name
            {
                q.add(format!("pv/{n}"));
            }
        });
        let q = p.queue.clone();
        inf.pods.on_change(move |c| {
            let (Change::Upsert { new: pod, .. } | Change::Delete(pod)) = c;
            let ns = pod.metadata.namespace.as_deref().unwrap_or("");
            for claim in pod_claims(pod) {
                q.add(format!("pvc/{ns}/{claim}"));
            }
        });
        p
    }

    pub async fn run(self: Arc<Self>, workers: usize, stop: watch::Receiver<bool>) {
        self.inf.wait_synced().await;
        let p = self.clone();
        self.queue
            .clone()
            .run(
                workers,
                move |key| {
                    let p = p.clone();
                    async move { p.sync(&key).await }
                },
                stop,
            )
            .await;
    }

    async fn sync(&self, key: &str) -> Outcome {
        if let Some(claim_key) = key.strip_prefix("pvc/") {
            let Some(claim) = self.inf.pvcs.get(claim_key) else {
                return Outcome::Done;
            };
            if !claim_releasable(&claim, self.inf.pods.list().iter().map(|p| &**p)) {
                return Outcome::Done;
            }
            let mut new = (*claim).clone();
            drop_finalizer(&mut new.metadata, PVC_PROTECTION);
            self.write(kinds::pvcs(), new.to_value()).await
        } else if let Some(name) = key.strip_prefix("pv/") {
            let Some(pv) = self.inf.pvs.get(name) else {
                return Outcome::Done;
            };
            if !volume_releasable(&pv) {
                return Outcome::Done;
            }
            let mut new = (*pv).clone();
            drop_finalizer(&mut new.metadata, PV_PROTECTION);
            self.write(kinds::pvs(), new.to_value()).await
        } else {
            Outcome::Done
        }
    }

    async fn write(
        &self,
        res: &'static berth_api::Resource,
        value: Result<serde_json::Value, crate::api::ApiError>,
    ) -> Outcome {
        let Ok(value) = value else { return Outcome::Retry };
        match self.api.update(res, value, Part::Main).await {
            Ok(_) => Outcome::Done,
            Err(e) => retry_after(&e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::json;

    fn pod(node: Option<&str>, volumes: serde_json::Value, phase: &str) -> Pod {
        let mut spec = json!({"containers": [{"name": "c", "image": "i"}], "volumes": volumes});
        if let Some(n) = node {
            spec["nodeName"] = json!(n);
        }
        serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "default"}, "spec": spec, "status": {"phase": phase}}),
        )
        .unwrap()
    }

    fn claim(deleting: bool, finalizers: &[&str]) -> PersistentVolumeClaim {
        let mut v = json!({"metadata": {"name": "data", "namespace": "default", "finalizers": finalizers}, "spec": {}});
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(v).unwrap()
    }

    fn pvc_vol(name: &str) -> serde_json::Value {
        json!([{"name": "v", "persistentVolumeClaim": {"claimName": name}}])
    }

    #[rstest]
    #[case::no_pods(vec![], true)]
    #[case::scheduled_pod_uses_it(vec![pod(Some("n1"), pvc_vol("data"), "Running")], false)]
    #[case::completed_pod_still_blocks(vec![pod(Some("n1"), pvc_vol("data"), "Succeeded")], false)]
    #[case::unscheduled_pod_does_not(vec![pod(None, pvc_vol("data"), "Pending")], true)]
    #[case::other_claim(vec![pod(Some("n1"), pvc_vol("logs"), "Running")], true)]
    #[case::ephemeral_claim(vec![pod(Some("n1"), json!([{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]), "Running")], true)]
    fn claim_protection(#[case] pods: Vec<Pod>, #[case] releasable: bool) {
        assert_eq!(claim_releasable(&claim(true, &[PVC_PROTECTION]), &pods), releasable);
    }

    #[test]
    fn an_ephemeral_volume_names_its_generated_claim() {
        let p = pod(
            Some("n1"),
            json!([{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]),
            "Running",
        );
        assert_eq!(pod_claims(&p), vec!["web-data".to_owned()]);
        assert!(pod_uses_claim(&p, "web-data"));
    }

    #[test]
    fn only_terminating_claims_with_the_finalizer_are_released() {
        assert!(!claim_releasable(&claim(false, &[PVC_PROTECTION]), &[]));
        assert!(!claim_releasable(&claim(true, &["other"]), &[]));
    }

    #[rstest]
    #[case::bound("Bound", true, false)]
    #[case::released("Released", true, true)]
    #[case::available("Available", true, true)]
    #[case::not_deleting("Released", false, false)]
    fn volume_protection(#[case] phase: &str, #[case] deleting: bool, #[case] want: bool) {
        let mut v =
            json!({"metadata": {"name": "pv1", "finalizers": [PV_PROTECTION]}, "spec": {}, "status": {"phase": phase}});
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        let pv: PersistentVolume = serde_json::from_value(v).unwrap();
        assert_eq!(volume_releasable(&pv), want);
    }
}

//! The scheduler's runner: places each pod that names no node (and asks for the default
//! scheduler) with [`crate::schedule::choose_node`], then does what kube-scheduler's
//! VolumeBinding plugin does between choosing and binding, and binds the pod.
//!
//! For one pod, each time it is looked at:
//! - choose a node over the cached Nodes, claims, volumes (indexed by class), classes,
//!   CSIDrivers and CSIStorageCapacities;
//! - failing that, set the pod's `PodScheduled` condition to False (`Unschedulable`, or
//!   `SchedulerError` for inconsistent objects) with the scheduler's message, and record a
//!   `FailedScheduling` event when the message changed. An unschedulable pod is looked at
//!   again when a volume, claim, node, class, CSIDriver or capacity changes (after its
//!   backoff), and every minute; a pod that hit an error is retried after its backoff;
//! - Reserve and PreBind: write each chosen volume's `claimRef`, then each claim to provision
//!   with `volume.kubernetes.io/selected-node`, each only when it changes the cached copy (with
//!   compare-and-swap, so a stale decision fails instead of overwriting);
//! - wait, level-triggered, until every claim of the pod is bound (the PV controller and the
//!   provisioner finish the binding): the pod is looked at again when one of its claims
//!   changes, and every second. A claim whose `selected-node` the provisioner removed
//!   (provisioning failed, reschedule) fails this attempt; the next one chooses again;
//! - bind: set `spec.nodeName` and `PodScheduled=True` in one write, and record `Scheduled`.
//!
//! Every step is decided again from the caches, so a crash or a conflict at any point is
//! repaired by the next look; nothing is remembered that the objects cannot rebuild, except
//! backoff counters and the claims a pod is waiting for.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod, PodCondition};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::{Notify, watch};

use crate::Informers;
use crate::api::{Api, Part, Typed, kinds};
use crate::binder::{claim_class, volume_class};
use crate::events::{Involved, Recorder};
use crate::informer::Change;
use crate::protection::pod_claims;
use crate::pv_controller::{claim_ref_key, retry_after};
use crate::pv_sync::{Note, claim_key};
use crate::queue::{Outcome, Queue};
use crate::schedule::{ANN_SELECTED_NODE, ScheduleError, StorageObjects, choose_node, claim_is_bound, reserve};

/// The scheduler name pods ask for (an empty one means this one too).
pub const SCHEDULER_NAME: &str = "default-scheduler";
/// How often a pod waiting for its claims to bind is looked at (Kubernetes polls every second).
pub const BIND_POLL: Duration = Duration::from_secs(1);
/// How long a pod waits for its claims before the attempt is reported failed (Kubernetes'
/// `bindTimeoutSeconds`).
pub const BIND_TIMEOUT: Duration = Duration::from_secs(600);
/// How often every unschedulable pod is tried again regardless of events.
pub const FLUSH: Duration = Duration::from_secs(60);
/// Events that may make pods schedulable are gathered for this long before the pods are woken.
const WAKE_DELAY: Duration = Duration::from_millis(50);
/// kube-scheduler's per-pod backoff: 1 s doubling up to 10 s.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";
pub const REASON_SCHEDULER_ERROR: &str = "SchedulerError";

/// Whether this scheduler should place `pod`: no node yet, asks for the default scheduler (or
/// none), not being deleted, not finished, and no scheduling gates left.
pub fn wants_scheduling(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else { return false };
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    spec.node_name.as_deref().unwrap_or("").is_empty()
        && spec
            .scheduler_name
            .as_deref()
            .is_none_or(|n| n.is_empty() || n == SCHEDULER_NAME)
        && pod.metadata.deletion_timestamp.is_none()
        && phase != "Succeeded"
        && phase != "Failed"
        && spec.scheduling_gates.as_ref().is_none_or(Vec::is_empty)
}

/// The delay before the `n`th retry (n ≥ 1) of a pod.
pub fn pod_backoff(n: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1 << n.saturating_sub(1).min(8))
        .min(BACKOFF_MAX)
}

/// `pod` with its `PodScheduled` condition set to `status`/`reason`/`message`, or `None` when
/// it already says so. The transition time is `now` when the status changes, else kept; other
/// conditions are left alone.
pub fn with_scheduled_condition(
    pod: &Pod,
    status: &str,
    reason: Option<&str>,
    message: Option<&str>,
    now: &Time,
) -> Option<Pod> {
    let mut out = pod.clone();
    let conditions = out
        .status
        .get_or_insert_with(Default::default)
        .conditions
        .get_or_insert_with(Vec::new);
    let want = |transition: Option<Time>| PodCondition {
        type_: "PodScheduled".to_owned(),
        status: status.to_owned(),
        reason: reason.map(str::to_owned),
        message: message.map(str::to_owned),
        last_transition_time: transition,
        last_probe_time: None,
        observed_generation: None,
    };
    match conditions.iter_mut().find(|c| c.type_ == "PodScheduled") {
        Some(c) if c.status == status && c.reason.as_deref() == reason && c.message.as_deref() == message => {
            return None;
        }
        Some(c) => {
            let transition = if c.status == status {
                c.last_transition_time.clone()
            } else {
                Some(now.clone())
            };
            *c = want(transition);
        }
        None => conditions.push(want(Some(now.clone()))),
    }
    Some(out)
}

/// The claim of `pod` whose `selected-node` was removed while it is still unbound (the
/// provisioner gave the node back: provisioning failed there), among the claims this
/// scheduler selected a node for.
pub fn reset_claim<C>(selected: &[String], claim: impl Fn(&str) -> Option<C>) -> Option<&str>
where
    C: std::ops::Deref<Target = PersistentVolumeClaim>,
{
    selected.iter().map(String::as_str).find(|key| {
        claim(key).is_some_and(|c| {
            !claim_is_bound(&c)
                && !c
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(ANN_SELECTED_NODE))
        })
    })
}

/// The claim keys (`namespace/name`) `pod` uses.
pub fn claim_keys(pod: &Pod) -> Vec<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("");
    pod_claims(pod).into_iter().map(|c| format!("{ns}/{c}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The objects one decision reads, from the caches

/// Volume names by class, kept by the volume informer's handler.
#[derive(Debug, Default)]
struct ClassIndex {
    by_class: HashMap<String, BTreeSet<String>>,
    class_of: HashMap<String, String>,
}

impl ClassIndex {
    fn upsert(&mut self, pv: &PersistentVolume) {
        let Some(name) = pv.metadata.name.clone() else { return };
        let class = volume_class(pv).to_owned();
        if let Some(old) = self.class_of.insert(name.clone(), class.clone())
            && old != class
            && let Some(set) = self.by_class.get_mut(&old)
        {
            set.remove(&name);
        }
        self.by_class.entry(class).or_default().insert(name);
    }

    fn remove(&mut self, pv: &PersistentVolume) {
        let Some(name) = pv.metadata.name.as_deref() else {
            return;
        };
        if let Some(class) = self.class_of.remove(name)
            && let Some(set) = self.by_class.get_mut(&class)
        {
            set.remove(name);
            if set.is_empty() {
                self.by_class.remove(&class);
            }
        }
    }
}

/// The cached objects one pod's decision needs: its claims, the volumes they are bound to,
/// every volume of the classes of its unbound claims, and all classes, CSIDrivers and
/// capacities (few).
#[derive(Debug, Default)]
struct View {
    claims: HashMap<(String, String), Arc<PersistentVolumeClaim>>,
    volumes: HashMap<String, Arc<PersistentVolume>>,
    by_class: HashMap<String, Vec<String>>,
    classes: HashMap<String, Arc<StorageClass>>,
    drivers: HashMap<String, Arc<CSIDriver>>,
    capacities: Vec<Arc<CSIStorageCapacity>>,
}

impl StorageObjects for View {
    fn claim(&self, namespace: &str, name: &str) -> Option<&PersistentVolumeClaim> {
        self.claims.get(&(namespace.to_owned(), name.to_owned())).map(|c| &**c)
    }

    fn volume(&self, name: &str) -> Option<&PersistentVolume> {
        self.volumes.get(name).map(|v| &**v)
    }

    fn volumes_of_class(&self, class: &str) -> Vec<&PersistentVolume> {
        self.by_class
            .get(class)
            .into_iter()
            .flatten()
            .filter_map(|n| self.volumes.get(n).map(|v| &**v))
            .collect()
    }

    fn class(&self, name: &str) -> Option<&StorageClass> {
        self.classes.get(name).map(|c| &**c)
    }

    fn csi_driver(&self, name: &str) -> Option<&CSIDriver> {
        self.drivers.get(name).map(|d| &**d)
    }

    fn capacities_of_class(&self, class: &str) -> Vec<&CSIStorageCapacity> {
        self.capacities
            .iter()
            .filter(|c| c.storage_class_name == class)
            .map(|c| &**c)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The runner

/// A pod whose volumes are being bound for a node.
#[derive(Debug, Clone)]
struct Reserved {
    since: Instant,
    /// The claims this scheduler selected the node for.
    selected: Vec<String>,
}

/// A pod that could not be scheduled.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    not_before: Instant,
    /// A retry is already due (a timer or an error's requeue): events need not wake it.
    armed: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Claim key -> the pods waiting to be scheduled that use it.
    by_claim: HashMap<String, HashSet<String>>,
    claims_of: HashMap<String, Vec<String>>,
    unschedulable: HashMap<String, Backoff>,
    failures: HashMap<String, u32>,
    reserved: HashMap<String, Reserved>,
}

impl State {
    fn track(&mut self, key: &str, claims: Vec<String>) {
        if self.claims_of.get(key) == Some(&claims) {
            return;
        }
        self.untrack_claims(key);
        for c in &claims {
            self.by_claim.entry(c.clone()).or_default().insert(key.to_owned());
        }
        self.claims_of.insert(key.to_owned(), claims);
    }

    fn untrack_claims(&mut self, key: &str) {
        for c in self.claims_of.remove(key).unwrap_or_default() {
            if let Some(pods) = self.by_claim.get_mut(&c) {
                pods.remove(key);
                if pods.is_empty() {
                    self.by_claim.remove(&c);
                }
            }
        }
    }

    fn forget(&mut self, key: &str) {
        self.untrack_claims(key);
        self.unschedulable.remove(key);
        self.failures.remove(key);
        self.reserved.remove(key);
    }
}

/// The scheduler.
#[derive(Debug)]
pub struct Scheduler {
    api: Arc<dyn Api>,
    inf: Arc<Informers>,
    queue: Arc<Queue>,
    events: Recorder,
    index: Mutex<ClassIndex>,
    state: Mutex<State>,
    wake: Notify,
}

fn pod_involved(p: &Pod) -> Involved {
    Involved::of("v1", "Pod", &p.metadata)
}

fn pod_key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

impl Scheduler {
    /// Builds the scheduler and hooks it to the informers (before they run).
    pub fn new(api: Arc<dyn Api>, inf: Arc<Informers>, events: &Recorder) -> Arc<Self> {
        let s = Arc::new(Scheduler {
            api,
            inf: inf.clone(),
            queue: Queue::new("scheduler"),
            events: events.for_component("default-scheduler"),
            index: Mutex::new(ClassIndex::default()),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        let me = s.clone();
        inf.pods.on_change(move |c| match c {
            Change::Upsert { old, new } => {
                let key = pod_key(new);
                if !wants_scheduling(new) {
                    me.state().forget(&key);
                    return;
                }
                me.state().track(&key, claim_keys(new));
                // Its own status writes (the condition) change nothing to decide on.
                if old.is_none_or(|o| o.spec != new.spec || o.metadata.annotations != new.metadata.annotations) {
                    me.queue.add(key);
                }
            }
            Change::Delete(old) => me.state().forget(&pod_key(old)),
        });
        let me = s.clone();
        inf.pvcs.on_change(move |c| {
            let (Change::Upsert { new: claim, .. } | Change::Delete(claim)) = c;
            me.queue_users_of(&claim_key(claim));
        });
        let me = s.clone();
        inf.pvs.on_change(move |c| {
            match c {
                Change::Upsert { new, .. } => {
                    me.index().upsert(new);
                    if let Some(k) = claim_ref_key(new) {
                        me.queue_users_of(&k);
                    }
                }
                Change::Delete(old) => me.index().remove(old),
            }
            me.wake.notify_one();
        });
        macro_rules! wakes {
            ($($f:ident),*) => {$(
                let me = s.clone();
                inf.$f.on_change(move |_| me.wake.notify_one());
            )*};
        }
        wakes!(nodes, classes, csi_drivers, csi_nodes, capacities);
        s
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, ClassIndex> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues the pods waiting to be scheduled that use the claim `key`.
    fn queue_users_of(&self, key: &str) {
        let pods: Vec<String> = self
            .state()
            .by_claim
            .get(key)
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default();
        for p in pods {
            self.queue.add(p);
        }
    }

    /// Queues every unschedulable pod whose backoff is over; arms a timer for the others.
    fn wake_unschedulable(&self) {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut later = Vec::new();
        {
            let mut st = self.state();
            for (key, b) in st.unschedulable.iter_mut() {
                if b.not_before <= now {
                    due.push(key.clone());
                } else if !b.armed {
                    b.armed = true;
                    later.push((key.clone(), b.not_before - now));
                }
            }
        }
        for key in due {
            self.queue.add(key);
        }
        for (key, delay) in later {
            self.queue.add_after(key, delay);
        }
    }

    /// Runs `workers` workers until `stop`.
    pub async fn run(self: Arc<Self>, workers: usize, stop: watch::Receiver<bool>) {
        self.inf.wait_synced().await;
        for pod in self.inf.pods.list() {
            if wants_scheduling(&pod) {
                let key = pod_key(&pod);
                self.state().track(&key, claim_keys(&pod));
                self.queue.add(key);
            }
        }
        let me = self.clone();
        let mut stop2 = stop.clone();
        let waker = tokio::spawn(async move {
            loop {
                let woken = tokio::select! {
                    () = me.wake.notified() => true,
                    () = tokio::time::sleep(FLUSH) => false,
                    _ = stop2.wait_for(|s| *s) => return,
                };
                if woken {
                    // Gather a burst of changes into one wake-up.
                    tokio::time::sleep(WAKE_DELAY).await;
                }
                me.wake_unschedulable();
            }
        });
        let me = self.clone();
        self.queue
            .clone()
            .run(
                workers,
                move |key| {
                    let me = me.clone();
                    async move { me.sync(&key).await }
                },
                stop,
            )
            .await;
        let _ = waker.await;
    }

    /// The objects `pod`'s decision reads.
    fn view(&self, pod: &Pod) -> View {
        let mut v = View::default();
        let ns = pod.metadata.namespace.as_deref().unwrap_or("");
        let mut classes_needed = BTreeSet::new();
        for name in pod_claims(pod) {
            let Some(claim) = self.inf.pvcs.get(&format!("{ns}/{name}")) else {
                continue;
            };
            let volume = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()).unwrap_or("");
            if !volume.is_empty() {
                if let Some(pv) = self.inf.pvs.get(volume) {
                    v.volumes.insert(volume.to_owned(), pv);
                }
            } else {
                classes_needed.insert(claim_class(&claim).to_owned());
            }
            v.claims.insert((ns.to_owned(), name), claim);
        }
        for class in classes_needed {
            let names: Vec<String> = self
                .index()
                .by_class
                .get(&class)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            let mut listed = Vec::with_capacity(names.len());
            for n in names {
                if let Some(pv) = self.inf.pvs.get(&n) {
                    v.volumes.insert(n.clone(), pv);
                    listed.push(n);
                }
            }
            v.by_class.insert(class, listed);
        }
        for c in self.inf.classes.list() {
            v.classes.insert(c.metadata.name.clone().unwrap_or_default(), c);
        }
        for d in self.inf.csi_drivers.list() {
            v.drivers.insert(d.metadata.name.clone().unwrap_or_default(), d);
        }
        v.capacities = self.inf.capacities.list();
        v
    }

    /// The nodes, by name (choose_node takes the first that fits).
    fn nodes(&self) -> Vec<Node> {
        let mut nodes: Vec<Node> = self.inf.nodes.list().iter().map(|n| (**n).clone()).collect();
        nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        nodes
    }

    async fn sync(&self, key: &str) -> Outcome {
        let Some(pod) = self.inf.pods.get(key) else {
            self.state().forget(key);
            return Outcome::Done;
        };
        if !wants_scheduling(&pod) {
            self.state().forget(key);
            return Outcome::Done;
        }
        let reserved = {
            let mut st = self.state();
            st.unschedulable.remove(key);
            st.reserved.get(key).cloned()
        };
        if let Some(r) = &reserved {
            if let Some(claim) = reset_claim(&r.selected, |k| self.inf.pvcs.get(k)) {
                self.state().reserved.remove(key);
                let name = claim.split_once('/').map_or(claim, |(_, n)| n);
                let msg = format!(
                    "running PreBind plugin \"VolumeBinding\": binding volumes: provisioning failed for PVC {name:?}"
                );
                return self.failed(&pod, REASON_SCHEDULER_ERROR, &msg, true).await;
            }
            if r.since.elapsed() > BIND_TIMEOUT {
                self.state().reserved.remove(key);
                let msg = "running PreBind plugin \"VolumeBinding\": binding volumes: context deadline exceeded";
                return self.failed(&pod, REASON_SCHEDULER_ERROR, msg, true).await;
            }
        }

        let nodes = self.nodes();
        let view = self.view(&pod);
        let placement = match choose_node(&pod, &nodes, &view) {
            Ok(p) => p,
            Err(ScheduleError::Unschedulable(msg)) => {
                return self.failed(&pod, REASON_UNSCHEDULABLE, &msg, false).await;
            }
            Err(ScheduleError::Internal(msg)) => {
                return self.failed(&pod, REASON_SCHEDULER_ERROR, &msg, true).await;
            }
        };
        let node = placement.node.metadata.name.clone().unwrap_or_default();
        if placement.volumes.is_empty() {
            // Every claim is bound (PreFilter put unbound ones in the placement's volumes).
            return self.bind(&pod, &node).await;
        }

        // Reserve + PreBind: volumes first, then claims; each only when it changes.
        let writes = reserve(&placement.volumes, &node);
        for pv in writes.volumes {
            let name = pv.metadata.name.clone().unwrap_or_default();
            if view.volume(&name) == Some(&pv) {
                continue;
            }
            let Ok(value) = pv.to_value() else {
                return Outcome::Retry;
            };
            match self.api.update(kinds::pvs(), value, Part::Main).await {
                Ok(stored) => self.inf.pvs.assume(stored),
                Err(e) => return retry_after(&e),
            }
        }
        let mut selected = Vec::new();
        for claim in writes.claims {
            let ckey = claim_key(&claim);
            selected.push(ckey.clone());
            if self.inf.pvcs.get(&ckey).as_deref() == Some(&claim) {
                continue;
            }
            let Ok(value) = claim.to_value() else {
                return Outcome::Retry;
            };
            match self.api.update(kinds::pvcs(), value, Part::Main).await {
                Ok(stored) => self.inf.pvcs.assume(stored),
                Err(e) => return retry_after(&e),
            }
        }
        {
            let mut st = self.state();
            let r = st.reserved.entry(key.to_owned()).or_insert_with(|| Reserved {
                since: Instant::now(),
                selected: Vec::new(),
            });
            for c in selected {
                if !r.selected.contains(&c) {
                    r.selected.push(c);
                }
            }
        }
        tracing::debug!(pod = key, node = %node, "waiting for the pod's claims to bind");
        Outcome::After(BIND_POLL)
    }

    /// Binds the pod to `node`: `spec.nodeName` and `PodScheduled=True` in one write.
    async fn bind(&self, pod: &Pod, node: &str) -> Outcome {
        let key = pod_key(pod);
        let mut bound = with_scheduled_condition(pod, "True", None, None, &now()).unwrap_or_else(|| pod.clone());
        bound.spec.get_or_insert_with(Default::default).node_name = Some(node.to_owned());
        let Ok(value) = bound.to_value() else {
            return Outcome::Retry;
        };
        match self.api.update(kinds::pods(), value, Part::Both).await {
            Ok(stored) => {
                self.inf.pods.assume(stored);
                self.state().forget(&key);
                self.events.record(
                    pod_involved(pod),
                    Note::normal("Scheduled", format!("Successfully assigned {key} to {node}")),
                );
                tracing::info!(pod = %key, node, "scheduled");
                Outcome::Done
            }
            Err(e) => retry_after(&e),
        }
    }

    /// Records a failed attempt: the condition and an event when the message changed, then
    /// the backoff. An error is retried after the backoff; an unschedulable pod waits for a
    /// change (or the flush).
    async fn failed(&self, pod: &Pod, reason: &str, msg: &str, error: bool) -> Outcome {
        let key = pod_key(pod);
        let delay = {
            let mut st = self.state();
            // A failed attempt gives up its reservation; the next one reserves afresh.
            st.reserved.remove(&key);
            let n = st.failures.entry(key.clone()).or_insert(0);
            *n += 1;
            let delay = pod_backoff(*n);
            st.unschedulable.insert(
                key.clone(),
                Backoff {
                    not_before: Instant::now() + delay,
                    armed: error,
                },
            );
            delay
        };
        if let Some(new) = with_scheduled_condition(pod, "False", Some(reason), Some(msg), &now()) {
            self.events
                .record(pod_involved(pod), Note::warning("FailedScheduling", msg.to_owned()));
            tracing::debug!(pod = %key, reason, "{msg}");
            let Ok(value) = new.to_value() else {
                return Outcome::Retry;
            };
            match self.api.update(kinds::pods(), value, Part::Status).await {
                Ok(stored) => self.inf.pods.assume(stored),
                Err(e) => return retry_after(&e),
            }
        }
        if error { Outcome::After(delay) } else { Outcome::Done }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::{Value, json};

    fn pod(extra_spec: Value, extra: Value) -> Pod {
        let mut v = json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u-web"},
            "spec": {"containers": [{"name": "c", "image": "i"}],
                     "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}},
                                 {"name": "s", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
                                 {"name": "e", "emptyDir": {}}]},
            "status": {"phase": "Pending"},
        });
        merge(&mut v["spec"], extra_spec);
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(base: &mut Value, patch: Value) {
        match (base, patch) {
            (Value::Object(b), Value::Object(p)) => {
                for (k, v) in p {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    #[rstest]
    #[case::pending(json!({}), json!({}), true)]
    #[case::default_scheduler(json!({"schedulerName": "default-scheduler"}), json!({}), true)]
    #[case::empty_scheduler_name(json!({"schedulerName": ""}), json!({}), true)]
    #[case::another_scheduler(json!({"schedulerName": "volcano"}), json!({}), false)]
    #[case::already_placed(json!({"nodeName": "n1"}), json!({}), false)]
    #[case::being_deleted(json!({}), json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}), false)]
    #[case::finished(json!({}), json!({"status": {"phase": "Succeeded"}}), false)]
    #[case::failed(json!({}), json!({"status": {"phase": "Failed"}}), false)]
    #[case::gated(json!({"schedulingGates": [{"name": "wait"}]}), json!({}), false)]
    #[case::gates_removed(json!({"schedulingGates": []}), json!({}), true)]
    fn which_pods_are_scheduled(#[case] spec: Value, #[case] extra: Value, #[case] want: bool) {
        assert_eq!(wants_scheduling(&pod(spec, extra)), want);
    }

    #[test]
    fn a_pods_claims_include_its_ephemeral_ones() {
        assert_eq!(
            claim_keys(&pod(json!({}), json!({}))),
            vec!["default/data".to_owned(), "default/web-s".to_owned()]
        );
    }

    #[rstest]
    #[case(1, 1)]
    #[case(2, 2)]
    #[case(3, 4)]
    #[case(4, 8)]
    #[case(5, 10)]
    #[case(40, 10)]
    fn backoff_is_kube_schedulers(#[case] n: u32, #[case] secs: u64) {
        assert_eq!(pod_backoff(n), Duration::from_secs(secs));
    }

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn condition(p: &Pod) -> Value {
        serde_json::to_value(&p.status.as_ref().unwrap().conditions.as_ref().unwrap()[0]).unwrap()
    }

    #[rstest]
    // No condition yet: added, with the time.
    #[case::first(json!(null), "False", Some("Unschedulable"), Some("m1"),
        Some(json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "m1", "lastTransitionTime": "2026-01-31T13:00:00Z"})))]
    // Same status, reason and message: nothing to write (no event either).
    #[case::same(json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "m1", "lastTransitionTime": "2026-01-31T12:00:00Z"}),
        "False", Some("Unschedulable"), Some("m1"), None)]
    // Another message: rewritten, the transition time kept (the status did not change).
    #[case::new_message(json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "m1", "lastTransitionTime": "2026-01-31T12:00:00Z"}),
        "False", Some("Unschedulable"), Some("m2"),
        Some(json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "m2", "lastTransitionTime": "2026-01-31T12:00:00Z"})))]
    // Scheduled at last: True, without reason or message, the time now.
    #[case::scheduled(json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "m1", "lastTransitionTime": "2026-01-31T12:00:00Z"}),
        "True", None, None,
        Some(json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-31T13:00:00Z"})))]
    fn the_pod_scheduled_condition(
        #[case] existing: Value,
        #[case] status: &str,
        #[case] reason: Option<&str>,
        #[case] message: Option<&str>,
        #[case] want: Option<Value>,
    ) {
        let conditions = if existing.is_null() {
            json!([])
        } else {
            json!([existing])
        };
        let p = pod(json!({}), json!({"status": {"conditions": conditions}}));
        let got = with_scheduled_condition(&p, status, reason, message, &t("2026-01-31T13:00:00Z"));
        assert_eq!(got.as_ref().map(condition), want);
    }

    #[test]
    fn other_conditions_are_kept() {
        let p = pod(
            json!({}),
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        );
        let got = with_scheduled_condition(
            &p,
            "False",
            Some("Unschedulable"),
            Some("m"),
            &t("2026-01-31T13:00:00Z"),
        )
        .unwrap();
        let types: Vec<&str> = got
            .status
            .as_ref()
            .unwrap()
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, ["Ready", "PodScheduled"]);
    }

    fn claim(name: &str, annotations: Value, volume: Option<&str>) -> Arc<PersistentVolumeClaim> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "annotations": annotations},
                "spec": {"volumeName": volume},
            }))
            .unwrap(),
        )
    }

    #[rstest]
    #[case::still_selected(vec![claim("a", json!({ANN_SELECTED_NODE: "n1"}), None)], None)]
    #[case::selection_removed(vec![claim("a", json!({}), None)], Some("default/a"))]
    #[case::bound_meanwhile(vec![claim("a", json!({"pv.kubernetes.io/bind-completed": "yes"}), Some("pv-a"))], None)]
    #[case::claim_gone(vec![], None)]
    #[case::second_one_reset(vec![claim("a", json!({ANN_SELECTED_NODE: "n1"}), None), claim("b", json!({}), None)], Some("default/b"))]
    fn provisioning_failures_are_noticed(#[case] claims: Vec<Arc<PersistentVolumeClaim>>, #[case] want: Option<&str>) {
        let selected = vec!["default/a".to_owned(), "default/b".to_owned()];
        let lookup = |k: &str| claims.iter().find(|c| claim_key(c) == k).cloned();
        assert_eq!(reset_claim(&selected, lookup), want);
    }

    fn pv(name: &str, class: &str) -> PersistentVolume {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"storageClassName": class}})).unwrap()
    }

    #[test]
    fn the_class_index_follows_volumes() {
        let mut idx = ClassIndex::default();
        idx.upsert(&pv("a", "fast"));
        idx.upsert(&pv("b", "fast"));
        idx.upsert(&pv("a", "slow"));
        assert_eq!(idx.by_class["fast"], BTreeSet::from(["b".to_owned()]));
        assert_eq!(idx.by_class["slow"], BTreeSet::from(["a".to_owned()]));
        idx.remove(&pv("b", "fast"));
        assert!(!idx.by_class.contains_key("fast"));
    }

    #[test]
    fn pods_are_tracked_by_claim() {
        let mut st = State::default();
        st.track("default/web", vec!["default/data".into(), "default/logs".into()]);
        st.track("default/api", vec!["default/data".into()]);
        assert_eq!(st.by_claim["default/data"].len(), 2);
        st.track("default/web", vec!["default/other".into()]);
        assert!(!st.by_claim.contains_key("default/logs"));
        st.forget("default/api");
        st.forget("default/web");
        assert!(st.by_claim.is_empty() && st.claims_of.is_empty());
    }

    #[test]
    fn the_view_answers_as_a_snapshot() {
        let mut v = View::default();
        v.volumes.insert("a".into(), Arc::new(pv("a", "fast")));
        v.volumes.insert("b".into(), Arc::new(pv("b", "fast")));
        v.by_class
            .insert("fast".into(), vec!["a".into(), "b".into(), "gone".into()]);
        let names: Vec<_> = v
            .volumes_of_class("fast")
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(v.volumes_of_class("slow").is_empty());
        assert!(v.claim("default", "x").is_none());
    }
}

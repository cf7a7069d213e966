//! The PersistentVolume controller's runner: claim and volume queues fed by the informers,
//! [`crate::pv_sync`] deciding, and this module writing what was decided.
//!
//! Binding is two writes (the volume, then the claim), each carrying spec and status together.
//! A volume chosen for a claim is reserved in the [`VolumeIndex`] until its write lands, so
//! parallel claim workers never pick the same one; the compare-and-swap on each write makes a
//! stale decision fail (Conflict) instead of overwriting anything. A crash between the two
//! writes leaves a volume whose claimRef names a claim without `volumeName`: the claim's next
//! sync finds that volume pre-bound to it and finishes the bind.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use tokio::sync::watch;

use crate::Informers;
use crate::api::{Api, ApiError, Part, Typed, kinds};
use crate::binder::claim_class;
use crate::events::{Involved, Recorder};
use crate::index::VolumeIndex;
use crate::informer::Change;
use crate::pv_sync::{self, ClaimSeen, ClaimStep, Note, VolumeStep, claim_key, claim_ref_uid, claim_volume_name};
use crate::queue::{Outcome, Queue};

/// How often every claim and volume is looked at again regardless of events (Kubernetes: 15 s).
/// Events drive the happy path; this only catches what no event announces (a class created
/// after its claims, a provisioner that appeared).
pub const RESYNC: Duration = Duration::from_secs(15);

/// After a start, each stage (pre-bound claims, then the volumes' first sync) holds the next
/// one back until it is done, or until its queue has not shrunk for this long: a stage that
/// makes no progress does not hold up the rest. A large stage that keeps progressing is waited
/// for, however long it takes.
const STARTUP_SETTLE: Duration = Duration::from_secs(10);

/// Waits until `done` holds, `stop` is set, or `queue` has not shrunk for [`STARTUP_SETTLE`].
async fn settle(queue: &Queue, done: impl Fn() -> bool, stop: &watch::Receiver<bool>) {
    let mut left = queue.len();
    let mut deadline = std::time::Instant::now() + STARTUP_SETTLE;
    while !done() && !*stop.borrow() {
        let now = std::time::Instant::now();
        let len = queue.len();
        if len < left {
            left = len;
            deadline = now + STARTUP_SETTLE;
        } else if now >= deadline {
            tracing::warn!(
                queue = queue.name(),
                waiting = len,
                "pv controller: a start-up stage stalled; going on"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The runner.
#[derive(Debug)]
pub struct PvController {
    api: Arc<dyn Api>,
    inf: Arc<Informers>,
    index: Mutex<VolumeIndex>,
    claims: Arc<Queue>,
    volumes: Arc<Queue>,
    events: Recorder,
    waiting: Mutex<Waiting>,
    /// The CSI drivers this process provisions with, if any.
    drivers: Option<Arc<crate::drivers::Drivers>>,
}

/// Unbound claims that found no volume, per class, oldest first: a volume that becomes
/// Available wakes the first one it can serve, so a claim created before its volume binds as
/// soon as the volume is ready instead of at the next resync.
#[derive(Debug, Default)]
struct Waiting {
    by_class: HashMap<String, VecDeque<String>>,
    members: HashSet<String>,
}

/// How many waiting claims one volume looks at before leaving the rest to the resync.
const WAKE_SCAN: usize = 64;

fn pvc_involved(c: &PersistentVolumeClaim) -> Involved {
    Involved::of("v1", "PersistentVolumeClaim", &c.metadata)
}

fn pv_involved(v: &PersistentVolume) -> Involved {
    Involved::of("v1", "PersistentVolume", &v.metadata)
}

impl PvController {
    /// Builds the controller and hooks it to the informers (before they run).
    /// `drivers`: the CSI drivers whose provisioner runs in this process.
    pub fn new(
        api: Arc<dyn Api>,
        inf: Arc<Informers>,
        events: &Recorder,
        drivers: Option<Arc<crate::drivers::Drivers>>,
    ) -> Arc<Self> {
        let ctl = Arc::new(PvController {
            api,
            inf: inf.clone(),
            index: Mutex::new(VolumeIndex::new()),
            claims: Queue::new("claims"),
            volumes: Queue::new("volumes"),
            events: events.for_component("persistentvolume-controller"),
            waiting: Mutex::new(Waiting::default()),
            drivers,
        });
        let c = ctl.clone();
        inf.pvs.on_change(move |change| match change {
            Change::Upsert { old, new } => {
                c.index().upsert((*new).clone());
                let available = |v: &PersistentVolume| {
                    v.spec.as_ref().is_some_and(|s| s.claim_ref.is_none())
                        && v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Available")
                };
                if available(new) && !old.is_some_and(|o| available(o)) {
                    c.wake_for(new);
                }
                if let Some(n) = &new.metadata.name {
                    c.volumes.add(n.clone());
                }
                if let Some(k) = claim_ref_key(new) {
                    c.claims.add(k);
                }
            }
            Change::Delete(old) => {
                if let Some(n) = &old.metadata.name {
                    c.index().remove(n);
                }
                if let Some(k) = claim_ref_key(old) {
                    c.claims.add(k);
                }
            }
        });
        let c = ctl.clone();
        inf.pvcs.on_change(move |change| match change {
            Change::Upsert { new, .. } => c.claims.add(claim_key(new)),
            Change::Delete(old) => {
                // Its volumes become Released.
                let name = claim_volume_name(old);
                if !name.is_empty() {
                    c.volumes.add(name.to_owned());
                }
                for v in c.index().claimed_by(&claim_key(old)) {
                    c.volumes.add(v);
                }
            }
        });
        let c = ctl.clone();
        inf.classes.on_change(move |change| {
            // Claims of a new or changed class may now provision or bind.
            if let Change::Upsert { new, .. } = change {
                let class = new.metadata.name.as_deref().unwrap_or("");
                for claim in c.inf.pvcs.list() {
                    if claim_volume_name(&claim).is_empty() && claim_class(&claim) == class {
                        c.claims.add(claim_key(&claim));
                    }
                }
            }
        });
        ctl
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers an unbound claim without a volume until a volume may serve it.
    fn wait(&self, claim: &PersistentVolumeClaim) {
        if !claim_volume_name(claim).is_empty() {
            return;
        }
        let key = claim_key(claim);
        let mut w = self.waiting();
        if w.members.insert(key.clone()) {
            w.by_class
                .entry(claim_class(claim).to_owned())
                .or_default()
                .push_back(key);
        }
    }

    /// Queues the oldest waiting claim that `pv` (just Available) can serve.
    fn wake_for(&self, pv: &PersistentVolume) {
        let class = crate::binder::volume_class(pv).to_owned();
        let mut w = self.waiting();
        let Waiting { by_class, members } = &mut *w;
        let Some(queue) = by_class.get_mut(&class) else { return };
        let mut i = 0;
        let mut scanned = 0;
        while i < queue.len() && scanned < WAKE_SCAN {
            scanned += 1;
            let key = &queue[i];
            let claim = self.inf.pvcs.get(key);
            let live = members.contains(key) && claim.as_ref().is_some_and(|c| claim_volume_name(c).is_empty());
            if !live {
                if let Some(k) = queue.remove(i) {
                    members.remove(&k);
                }
                continue;
            }
            if claim.is_some_and(|c| pv_sync::volume_satisfies(pv, &c).is_ok()) {
                if let Some(k) = queue.remove(i) {
                    members.remove(&k);
                    self.claims.add(k);
                }
                return;
            }
            i += 1;
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, VolumeIndex> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `workers` claim workers and as many volume workers until `stop`.
    pub async fn run(self: Arc<Self>, workers: usize, stop: watch::Receiver<bool>) {
        let began = std::time::Instant::now();
        self.inf.wait_synced().await;
        tracing::info!(
            after = ?began.elapsed(),
            volumes = self.inf.pvs.len(),
            claims = self.inf.pvcs.len(),
            "pv controller: caches synced; syncing volumes first"
        );
        self.clone().bind_prebound_first(workers, &stop).await;
        let c = self.clone();
        let volumes = tokio::spawn(self.volumes.clone().run(
            workers,
            move |key| {
                let c = c.clone();
                async move { c.sync_volume(&key).await }
            },
            stop.clone(),
        ));
        // Volumes first: after a start, volumes created while no controller ran are still
        // Pending; once they are Available, a claim binds in its first sync instead of going
        // Pending (a write and an event) and waiting to be woken. The claims start once every
        // volume has been taken up by a worker: the last few volume writes overlap the first
        // claims instead of leaving the cores idle while they finish.
        settle(&self.volumes, || self.volumes.is_empty(), &stop).await;
        tracing::info!(after = ?began.elapsed(), "pv controller: volumes synced; syncing claims");
        let c = self.clone();
        let claims = tokio::spawn(self.claims.clone().run(
            workers,
            move |key| {
                let c = c.clone();
                async move { c.sync_claim(&key).await }
            },
            stop.clone(),
        ));
        let c = self.clone();
        let mut stop2 = stop.clone();
        let resync = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(RESYNC) => {}
                    _ = stop2.wait_for(|s| *s) => return,
                }
                for claim in c.inf.pvcs.list() {
                    if claim.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
                        c.claims.add(claim_key(&claim));
                    }
                }
                for pv in c.inf.pvs.list() {
                    if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound")
                        && let Some(n) = &pv.metadata.name
                    {
                        c.volumes.add(n.clone());
                    }
                }
            }
        });
        let _ = tokio::join!(claims, volumes, resync);
    }

    /// The first stage after a start: the unbound claims that are pre-bound (the claim names its
    /// volume, or a volume's claimRef names the claim) bind before the volumes' first sync,
    /// because binding them needs no Available volume (phase is not checked for a pre-bound
    /// pair). Their volumes then go from Pending to Bound in the bind's own write, instead of a
    /// first write to Available and a second to Bound; Kubernetes' claim and volume workers run
    /// side by side, so either order is one it can take. The keys stay in the claims queue too;
    /// their later sync finds them bound and writes nothing.
    async fn bind_prebound_first(self: Arc<Self>, workers: usize, stop: &watch::Receiver<bool>) {
        let began = std::time::Instant::now();
        let keys: Vec<String> = {
            let index = self.index();
            self.inf
                .pvcs
                .list()
                .iter()
                .filter(|c| {
                    !pv_sync::bind_completed(c)
                        && c.metadata.deletion_timestamp.is_none()
                        && (!claim_volume_name(c).is_empty() || !index.claimed_by(&claim_key(c)).is_empty())
                })
                .map(|c| claim_key(c))
                .collect()
        };
        if keys.is_empty() {
            return;
        }
        let count = keys.len();
        let early = Queue::new("claims");
        for k in keys {
            early.add(k);
        }
        let (quit, quit_rx) = watch::channel(false);
        let c = self.clone();
        let running = tokio::spawn(early.clone().run(
            workers,
            move |key| {
                let c = c.clone();
                async move { c.sync_claim(&key).await }
            },
            quit_rx,
        ));
        // Until every key is done; a key that must be retried is left to the claims queue.
        settle(&early, || early.is_idle(), stop).await;
        let _ = quit.send(true);
        let _ = running.await;
        tracing::info!(after = ?began.elapsed(), claims = count, "pv controller: pre-bound claims synced first");
    }

    async fn sync_claim(&self, key: &str) -> Outcome {
        let Some(claim) = self.inf.pvcs.get(key) else {
            return Outcome::Done;
        };
        let class = self.inf.classes.get(claim_class(&claim));
        let mut reserved = None;
        let step = pv_sync::sync_claim(
            &claim,
            |n| self.index().get(n),
            |delay| {
                let found = self.index().find(&claim, delay, true)?;
                reserved = found.as_ref().and_then(|v| v.metadata.name.clone());
                Ok(found)
            },
            class.as_deref(),
        );
        let outcome = match step {
            ClaimStep::Bind { volume } => self.bind(&claim, &volume).await,
            ClaimStep::Pending(note) => {
                if let Some(n) = note {
                    self.events.record(pvc_involved(&claim), n);
                }
                self.wait(&claim);
                self.claim_phase(&claim, "Pending").await
            }
            ClaimStep::Provision { provisioner } => {
                self.wait(&claim);
                self.hand_to_provisioner(&claim, &provisioner).await
            }
            ClaimStep::Lost(note) => {
                self.events.record(pvc_involved(&claim), note);
                self.claim_phase(&claim, "Lost").await
            }
            ClaimStep::Fail(msg) => {
                tracing::warn!(claim = key, "{msg}");
                Outcome::Retry
            }
        };
        if let Some(v) = reserved {
            self.index().release(&v);
        }
        outcome
    }

    async fn claim_phase(&self, claim: &PersistentVolumeClaim, phase: &str) -> Outcome {
        match pv_sync::claim_in_phase(claim, phase) {
            Some(new) => self.write_claim(claim, new, Part::Status).await,
            None => Outcome::Done,
        }
    }

    async fn hand_to_provisioner(&self, claim: &PersistentVolumeClaim, provisioner: &str) -> Outcome {
        let Some(mut new) = pv_sync::claim_for_provisioner(claim, provisioner) else {
            return self.claim_phase(claim, "Pending").await;
        };
        self.events
            .record(pvc_involved(claim), pv_sync::external_provisioning_note(provisioner));
        if self.drivers.as_ref().is_some_and(|d| d.get(provisioner).is_some()) {
            // A provisioner of this process will call CreateVolume next: write the finalizer it
            // needs first in this same write (see crate::provisioner).
            let f = new.metadata.finalizers.get_or_insert_with(Vec::new);
            if !f.iter().any(|x| x == pv_sync::PROVISIONING_FINALIZER) {
                f.push(pv_sync::PROVISIONING_FINALIZER.into());
            }
        }
        // Annotations and phase in one write.
        new.status.get_or_insert_with(Default::default).phase = Some("Pending".into());
        self.write_claim(claim, new, Part::Both).await
    }

    /// Writes `new` over `old`, the cached claim it was made from.
    async fn write_claim(&self, old: &PersistentVolumeClaim, new: PersistentVolumeClaim, part: Part) -> Outcome {
        let (old, value) = match (old.to_value(), new.to_value()) {
            (Ok(o), Ok(v)) => (o, v),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "encoding a claim");
                return Outcome::Retry;
            }
        };
        match self.api.update_over(kinds::pvcs(), old, value, part).await {
            Ok(stored) => {
                self.inf.pvcs.assume(stored);
                Outcome::Done
            }
            Err(e) => retry_after(&e),
        }
    }

    /// Writes `new` over `old`, the cached volume it was made from.
    async fn write_volume(
        &self,
        old: &PersistentVolume,
        new: PersistentVolume,
        part: Part,
    ) -> Result<Arc<PersistentVolume>, Outcome> {
        let old = old.to_value().map_err(|_| Outcome::Retry)?;
        let value = new.to_value().map_err(|_| Outcome::Retry)?;
        assumed(
            &self.inf.pvs,
            self.api.update_over(kinds::pvs(), old, value, part).await,
        )
    }

    /// Binds `claim` to `volume`: the volume first, then the claim.
    async fn bind(&self, claim: &PersistentVolumeClaim, volume: &str) -> Outcome {
        let Some(pv) = self.index().get(volume) else {
            return Outcome::Retry;
        };
        let pv = match pv_sync::bound_volume(&pv, claim) {
            Some(new) => match self.write_volume(&pv, new, Part::Both).await {
                Ok(v) => v,
                Err(o) => return o,
            },
            None => pv,
        };
        match pv_sync::bound_claim(claim, &pv) {
            Some(new) => self.write_claim(claim, new, Part::Both).await,
            None => Outcome::Done,
        }
    }

    async fn sync_volume(&self, name: &str) -> Outcome {
        let Some(pv) = self.inf.pvs.get(name) else {
            return Outcome::Done;
        };
        let fresh;
        let seen = match claim_ref_uid(&pv) {
            None => ClaimSeen::NotNeeded,
            Some(uid) => {
                let r = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
                let ns = r.and_then(|r| r.namespace.clone()).unwrap_or_default();
                let cname = r.and_then(|r| r.name.clone()).unwrap_or_default();
                match self.inf.pvcs.get(&format!("{ns}/{cname}")) {
                    Some(c) if c.metadata.uid.as_deref() == Some(uid) => {
                        fresh = c;
                        ClaimSeen::Found(&fresh)
                    }
                    // The cache may be behind: ask the store before calling the claim gone.
                    _ => match self.api.get(kinds::pvcs(), Some(&ns), &cname).await {
                        Ok(v) => match PersistentVolumeClaim::from_value(v) {
                            Ok(c) if c.metadata.uid.as_deref() == Some(uid) => {
                                fresh = Arc::new(c);
                                ClaimSeen::Found(&fresh)
                            }
                            Ok(_) => ClaimSeen::Gone,
                            Err(_) => return Outcome::Retry,
                        },
                        Err(ApiError::NotFound(_)) => ClaimSeen::Gone,
                        Err(e) => return retry_after(&e),
                    },
                }
            }
        };
        match pv_sync::sync_volume(&pv, seen) {
            VolumeStep::Nothing => Outcome::Done,
            VolumeStep::SyncClaim(key) => {
                self.claims.add(key);
                Outcome::Done
            }
            VolumeStep::Phase { phase, note } => {
                if let Some(n) = &note {
                    self.events.record(pv_involved(&pv), n.clone());
                }
                match pv_sync::volume_in_phase(&pv, phase, note.as_ref()) {
                    Some(new) => match self.write_volume(&pv, new, Part::Status).await {
                        Ok(_) => Outcome::Done,
                        Err(o) => o,
                    },
                    None => Outcome::Done,
                }
            }
            VolumeStep::Unbind { whole } => {
                match self
                    .write_volume(&pv, pv_sync::unbound_volume(&pv, whole), Part::Both)
                    .await
                {
                    Ok(_) => Outcome::Done,
                    Err(o) => o,
                }
            }
        }
    }

    /// Records an event about a volume (for the other controllers sharing this recorder).
    pub fn note_volume(&self, pv: &PersistentVolume, note: Note) {
        self.events.record(pv_involved(pv), note);
    }
}

/// How soon to look again after a failed write: at once after a conflict (the cache is about
/// to catch up), never for a gone object, with backoff otherwise.
/// A controller's update, answered: the stored object decoded once, for the informer's cache and
/// for the caller; or the retry its error calls for.
pub fn assumed<T: Typed + Send + Sync + 'static>(
    inf: &crate::informer::Informer<T>,
    answer: Result<serde_json::Value, ApiError>,
) -> Result<Arc<T>, Outcome> {
    match answer {
        Ok(stored) => inf.assume_decoded(stored).map_err(|_| Outcome::Retry),
        Err(e) => Err(retry_after(&e)),
    }
}

pub fn retry_after(e: &ApiError) -> Outcome {
    match e {
        ApiError::NotFound(_) => Outcome::Done,
        ApiError::Conflict(_) => Outcome::After(Duration::from_millis(20)),
        ApiError::Invalid(msg) => {
            tracing::warn!("a controller write was refused: {msg}");
            Outcome::Retry
        }
        _ => Outcome::Retry,
    }
}

/// The key of a claim named by a volume's claimRef.
pub fn claim_ref_key(pv: &PersistentVolume) -> Option<String> {
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    Some(format!(
        "{}/{}",
        r.namespace.as_deref().unwrap_or(""),
        r.name.as_deref().unwrap_or("")
    ))
}

//! Spare subvolumes: a few empty subvolumes per pool, made ahead of time in `<pool>/spares/`,
//! so that CreateVolume of a dir volume moves one into `volumes/<id>` (a rename, tens of
//! microseconds) instead of creating a subvolume while the client waits.
//!
//! A spare is listed as ready once its root is NOCOW, as a new dir volume's is. It has no qgroup
//! limit: the volume that takes it sets its own. A background thread tops every pool up to the
//! target again, but only while no CreateVolume runs ([`Spares::hold`]): beside a create, making
//! a spare costs more than it saves. A spare is either listed or handed out, never both:
//! [`Spares::take`] unlists it under the lock the thread lists it under, and the thread never
//! touches a spare once it is listed.
//!
//! Spares are not data and no record owns them. At start, reconciliation removes whatever a
//! crash left in `spares/`, before the thread starts; when the engine is dropped the thread stops
//! and the engine removes the spares still listed; `berth teardown` removes any that are left.
//! This module never sets a limit and never touches `volumes/`.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use berth_host::{HostError, HostOps};

use crate::engine::lock;
use crate::id::VolumeId;
use crate::pool::Pool;

/// After a failure to make a spare in a pool, wait this long before trying that pool again,
/// doubling up to [`LAST_RETRY`]: a full pool must not keep the thread spinning.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

/// An empty, NOCOW subvolume at `<pool>/spares/<name>`, with qgroup 0/`subvolume_id` and no limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Spare {
    pub(crate) name: String,
    pub(crate) subvolume_id: u64,
}

/// A create in progress: no spare is made until it ends (see [`Spares::hold`]).
pub(crate) struct Hold<'a> {
    shared: &'a Shared,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut free = lock(&self.shared.free);
        free.holds = free.holds.saturating_sub(1);
        if free.holds == 0 {
            self.shared.wake.notify_all();
        }
    }
}

/// The spares of every pool and the thread that makes them.
#[derive(Debug)]
pub(crate) struct Spares {
    shared: Arc<Shared>,
    refill: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    host: Arc<dyn HostOps>,
    pools: Vec<Pool>,
    target: usize,
    free: Mutex<Free>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Free {
    /// Ready spares by pool name.
    ready: BTreeMap<String, Vec<Spare>>,
    /// By pool: a subvolume made whose NOCOW flag could not be set yet. It is finished before a
    /// new one is made, so repeated failures never pile up subvolumes.
    unfinished: BTreeMap<String, Spare>,
    /// By pool: when to try again after a failure, and the delay that was waited.
    retry: BTreeMap<String, (Instant, Duration)>,
    /// A spare is being made (outside the lock).
    making: bool,
    /// Creates in progress ([`Hold`]s): the thread waits for none.
    holds: usize,
    stop: bool,
}

impl Spares {
    /// Keeps `target` spares in each of `pools` (0: none; creates make their own subvolume).
    /// Nothing is made until [`Spares::start`].
    pub(crate) fn new(host: Arc<dyn HostOps>, pools: Vec<Pool>, target: usize) -> Spares {
        Spares {
            shared: Arc::new(Shared {
                host,
                pools,
                target,
                free: Mutex::new(Free::default()),
                wake: Condvar::new(),
            }),
            refill: Mutex::new(None),
        }
    }

    /// Starts the refill thread (none when the target is 0). Call once, after reconciliation
    /// has removed the spares of an earlier run.
    pub(crate) fn start(&self) {
        if self.shared.target == 0 {
            return;
        }
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("berth-spares".into())
            .spawn(move || shared.refill());
        match spawned {
            Ok(handle) => {
                tracing::info!(target = self.shared.target, "keeping spare subvolumes for dir volumes");
                *lock(&self.refill) = Some(handle);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the spare subvolume thread; every dir CreateVolume makes its own subvolume")
            }
        }
    }

    /// Hands out a ready spare of `pool`, if there is one. The caller owns it from here on: it
    /// must move it into place or remove it. The thread replaces it once no create runs.
    pub(crate) fn take(&self, pool: &str) -> Option<Spare> {
        lock(&self.shared.free).ready.get_mut(pool)?.pop()
    }

    /// Holds the thread back until the returned guard (and every other) is dropped: hold it
    /// across a whole CreateVolume. A spare made beside a create costs that create more than a
    /// spare saves it: its subvolume create made the create's journal commit about 90 us
    /// slower (p50) on the development VM, while the rename saves about 75 us.
    pub(crate) fn hold(&self) -> Hold<'_> {
        lock(&self.shared.free).holds += 1;
        Hold { shared: &self.shared }
    }

    /// Stops the thread (waiting for a spare it is making) and hands back every spare it made
    /// that nobody took, with its pool's name, for the caller to remove. Idempotent.
    pub(crate) fn stop(&self) -> Vec<(String, Spare)> {
        lock(&self.shared.free).stop = true;
        self.shared.wake.notify_all();
        if let Some(handle) = lock(&self.refill).take()
            && handle.join().is_err()
        {
            tracing::error!("the spare subvolume thread panicked");
        }
        let mut free = lock(&self.shared.free);
        let mut out = Vec::new();
        for (pool, spares) in std::mem::take(&mut free.ready) {
            out.extend(spares.into_iter().map(|s| (pool.clone(), s)));
        }
        out.extend(std::mem::take(&mut free.unfinished));
        out
    }

    /// Makes spares in the caller's thread until every pool has its target or one attempt fails.
    /// For tests that open the engine without the thread and need the host calls in a fixed order.
    #[cfg(test)]
    pub(crate) fn top_up(&self) {
        while let Some(Ok(())) = self.shared.make_one() {}
    }

    /// Ready spares of `pool`.
    #[cfg(test)]
    pub(crate) fn ready(&self, pool: &str) -> Vec<Spare> {
        lock(&self.shared.free).ready.get(pool).cloned().unwrap_or_default()
    }
}

impl Shared {
    /// The refill thread: makes a spare whenever a pool is short, sleeps otherwise. A take
    /// notifies under the lock this loop picks under, so no wake-up is missed.
    fn refill(&self) {
        let mut free = lock(&self.free);
        loop {
            if free.stop {
                return;
            }
            if let Some(pool) = self.pick(&free) {
                free.making = true;
                let unfinished = free.unfinished.remove(&pool.name);
                drop(free);
                let made = self.make(pool, unfinished);
                free = lock(&self.free);
                let _ = self.finish(&mut free, pool, made);
                continue;
            }
            // Woken when the last create in progress ends, or by stop; or when the earliest
            // retry is due.
            let now = Instant::now();
            let due = free
                .retry
                .values()
                .map(|(at, _)| at.saturating_duration_since(now))
                .min();
            free = match due {
                Some(d) => self.wake.wait_timeout(free, d).unwrap_or_else(|e| e.into_inner()).0,
                None => self.wake.wait(free).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    /// Makes (or finishes) one spare in the caller's thread; `None` when no pool needs one.
    #[cfg(test)]
    fn make_one(&self) -> Option<Result<(), HostError>> {
        let (pool, unfinished) = {
            let mut free = lock(&self.free);
            if free.stop || free.making {
                return None;
            }
            let pool = self.pick(&free)?;
            free.making = true;
            (pool, free.unfinished.remove(&pool.name))
        };
        let made = self.make(pool, unfinished);
        Some(self.finish(&mut lock(&self.free), pool, made))
    }

    /// The pool shortest of its target, among those not waiting out a failure; none while a
    /// create runs.
    fn pick(&self, free: &Free) -> Option<&Pool> {
        if free.holds > 0 {
            return None;
        }
        let now = Instant::now();
        let ready = |pool: &Pool| free.ready.get(&pool.name).map_or(0, Vec::len);
        self.pools
            .iter()
            .filter(|p| ready(p) < self.target)
            .filter(|p| free.retry.get(&p.name).is_none_or(|(at, _)| *at <= now))
            .min_by_key(|p| ready(p))
    }

    /// Lists a spare just made, or keeps what a failed attempt left and schedules a retry.
    fn finish(
        &self,
        free: &mut Free,
        pool: &Pool,
        made: Result<Spare, (HostError, Option<Spare>)>,
    ) -> Result<(), HostError> {
        free.making = false;
        match made {
            Ok(spare) => {
                free.ready.entry(pool.name.clone()).or_default().push(spare);
                free.retry.remove(&pool.name);
                Ok(())
            }
            Err((e, unfinished)) => {
                if let Some(spare) = unfinished {
                    free.unfinished.insert(pool.name.clone(), spare);
                }
                let delay = free
                    .retry
                    .get(&pool.name)
                    .map_or(FIRST_RETRY, |(_, d)| (*d * 2).min(LAST_RETRY));
                free.retry.insert(pool.name.clone(), (Instant::now() + delay, delay));
                tracing::warn!(pool = %pool.name, error = %e, ?delay, "could not make a spare subvolume; dir CreateVolume makes its own meanwhile");
                Err(e)
            }
        }
    }

    /// One spare in `pool`: a new subvolume (or the unfinished one), then NOCOW on its root,
    /// exactly what `Engine::make_empty` does to a subvolume it makes inline. On failure, the
    /// subvolume made so far comes back with the error.
    fn make(&self, pool: &Pool, unfinished: Option<Spare>) -> Result<Spare, (HostError, Option<Spare>)> {
        let dir = pool.spares_dir();
        let spare = match unfinished {
            Some(spare) => spare,
            None => {
                let name = VolumeId::generate()
                    .map_err(|e| {
                        (
                            HostError::io("getrandom", "", std::io::Error::other(e.to_string())),
                            None,
                        )
                    })?
                    .to_string();
                let subvolume_id = self.host.btrfs_subvolume_create(&dir, &name).map_err(|e| (e, None))?;
                Spare { name, subvolume_id }
            }
        };
        match self.host.set_nocow(&dir.join(&spare.name), true) {
            Ok(()) => Ok(spare),
            Err(e) => Err((e, Some(spare))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use berth_host::fake::RecordingHost;

    use super::*;

    fn pool(host: &RecordingHost, name: &str) -> Pool {
        let root = PathBuf::from(format!("/pools/{name}"));
        host.add_dir(root.join("spares"));
        host.btrfs_quota_enable(&root).unwrap();
        Pool {
            name: name.into(),
            root,
            image: None,
        }
    }

    fn count(host: &RecordingHost, op: &str) -> usize {
        host.calls().iter().filter(|c| c.op() == op).count()
    }

    #[test]
    fn each_spare_is_handed_out_once_and_stop_returns_the_rest() {
        let host = Arc::new(RecordingHost::new());
        let pools = vec![pool(&host, "a"), pool(&host, "b")];
        let spares = Spares::new(host.clone(), pools, 2);
        spares.top_up();
        assert_eq!((spares.ready("a").len(), spares.ready("b").len()), (2, 2));
        assert_eq!(host.subvolumes().len(), 4);
        let first = spares.take("a").unwrap();
        let second = spares.take("a").unwrap();
        assert_ne!(first, second);
        assert_eq!(spares.take("a"), None);
        assert_eq!(spares.take("nope"), None);
        for s in [&first, &second] {
            assert!(host.nocow(&PathBuf::from("/pools/a/spares").join(&s.name)));
        }
        let rest = spares.stop();
        assert_eq!(rest.len(), 2);
        assert!(rest.iter().all(|(pool, _)| pool == "b"));
        assert!(spares.stop().is_empty(), "stop is idempotent");
        host.clear_calls();
        spares.top_up();
        assert!(host.calls().is_empty(), "nothing is made after stop");
    }

    #[test]
    fn a_failure_keeps_the_half_made_spare_and_waits_before_trying_again() {
        let host = Arc::new(RecordingHost::new());
        let spares = Spares::new(host.clone(), vec![pool(&host, "a")], 2);
        host.fail_next("set_nocow", libc::EIO);
        spares.top_up();
        assert!(spares.ready("a").is_empty());
        assert_eq!(host.subvolumes().len(), 1, "the subvolume made before the failure");
        // Not again until the retry is due.
        host.clear_calls();
        spares.top_up();
        assert!(host.calls().is_empty());
        lock(&spares.shared.free).retry.clear();
        spares.top_up();
        assert_eq!(spares.ready("a").len(), 2);
        assert_eq!(
            count(&host, "btrfs_subvolume_create"),
            1,
            "the half-made one was finished, not replaced"
        );
        assert_eq!(host.subvolumes().len(), 2);
        assert_eq!(spares.stop().len(), 2);
    }

    #[test]
    fn the_thread_refills_after_each_take_and_stops() {
        let host = Arc::new(RecordingHost::new());
        let spares = Spares::new(host.clone(), vec![pool(&host, "a")], 3);
        spares.start();
        let settle = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while spares.ready("a").len() != n {
                assert!(Instant::now() < deadline, "never reached {n} spares");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        settle(3);
        let mut taken = Vec::new();
        for _ in 0..10 {
            let _hold = spares.hold();
            if let Some(s) = spares.take("a") {
                taken.push(s);
            }
        }
        settle(3);
        assert!(taken.len() >= 3);
        let left = spares.stop();
        assert_eq!(left.len(), 3);
        assert_eq!(
            host.subvolumes().len(),
            taken.len() + 3,
            "every spare made is taken or returned"
        );
    }

    #[test]
    fn no_spare_is_made_while_a_create_holds_the_thread() {
        let host = Arc::new(RecordingHost::new());
        let spares = Spares::new(host.clone(), vec![pool(&host, "a")], 2);
        let hold = spares.hold();
        let second = spares.hold();
        host.clear_calls();
        spares.top_up();
        assert!(host.calls().is_empty(), "nothing made under a hold");
        spares.start();
        std::thread::sleep(Duration::from_millis(50));
        assert!(host.subvolumes().is_empty(), "the thread waits too");
        drop(hold);
        std::thread::sleep(Duration::from_millis(50));
        assert!(host.subvolumes().is_empty(), "until the last hold ends");
        drop(second);
        let deadline = Instant::now() + Duration::from_secs(10);
        while spares.ready("a").len() != 2 {
            assert!(Instant::now() < deadline, "the thread never made its spares");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(spares.stop().len(), 2);
    }
}

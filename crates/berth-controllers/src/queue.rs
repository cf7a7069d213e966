//! A work queue of object keys with client-go's semantics: a key is queued at most once, is
//! never handed to two workers at once (a key added while it is being processed is queued again
//! when the worker is done), and failures are retried with per-key exponential backoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// The first retry's delay; it doubles per failure up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(5);
/// The longest delay between retries of one key.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<String>,
    /// Keys waiting in `queue`, or to be queued again when their processing ends.
    dirty: HashSet<String>,
    processing: HashSet<String>,
    failures: HashMap<String, u32>,
    shut: bool,
}

/// A named queue (the name appears in logs).
#[derive(Debug)]
pub struct Queue {
    name: &'static str,
    state: Mutex<State>,
    ready: Notify,
}

/// What a worker's step asks of the queue afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: forget the key's failures.
    Done,
    /// Try again after the key's backoff (which grows).
    Retry,
    /// Look again after this delay (not a failure: waiting for something outside).
    After(Duration),
}

impl Queue {
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Queue {
            name,
            state: Mutex::new(State::default()),
            ready: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `key` unless it is already waiting.
    pub fn add(&self, key: impl Into<String>) {
        let key = key.into();
        let mut s = self.state();
        if s.shut || s.dirty.contains(&key) {
            return;
        }
        s.dirty.insert(key.clone());
        if s.processing.contains(&key) {
            return;
        }
        s.queue.push_back(key);
        drop(s);
        self.ready.notify_one();
    }

    /// Queues `key` after `delay`.
    pub fn add_after(self: &Arc<Self>, key: impl Into<String>, delay: Duration) {
        let key = key.into();
        if delay.is_zero() {
            return self.add(key);
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(key);
        });
    }

    /// Queues `key` after its backoff, counting one more failure.
    pub fn retry(self: &Arc<Self>, key: &str) {
        let n = {
            let mut s = self.state();
            let n = s.failures.entry(key.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        self.add_after(key.to_owned(), backoff(n));
    }

    /// Forgets the key's failures.
    pub fn forget(&self, key: &str) {
        self.state().failures.remove(key);
    }

    /// How many times the key has failed in a row.
    pub fn failures(&self, key: &str) -> u32 {
        self.state().failures.get(key).copied().unwrap_or(0)
    }

    /// Whether no key is waiting or being processed.
    pub fn is_idle(&self) -> bool {
        let s = self.state();
        s.queue.is_empty() && s.processing.is_empty()
    }

    /// The queue's name, for logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The number of keys waiting.
    pub fn len(&self) -> usize {
        self.state().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next key to work on; `None` once the queue is shut down.
    pub async fn get(&self) -> Option<String> {
        loop {
            let notified = self.ready.notified();
            {
                let mut s = self.state();
                if s.shut {
                    return None;
                }
                if let Some(key) = s.queue.pop_front() {
                    s.dirty.remove(&key);
                    s.processing.insert(key.clone());
                    if !s.queue.is_empty() {
                        // Wake another worker for the rest.
                        self.ready.notify_one();
                    }
                    return Some(key);
                }
            }
            notified.await;
        }
    }

    /// Marks `key` processed; queues it again if it was added meanwhile.
    pub fn done(&self, key: &str) {
        let mut s = self.state();
        s.processing.remove(key);
        if s.dirty.contains(key) {
            s.queue.push_back(key.to_owned());
            drop(s);
            self.ready.notify_one();
        }
    }

    /// Stops handing out keys; workers return.
    pub fn shut_down(&self) {
        self.state().shut = true;
        self.ready.notify_waiters();
    }

    /// Runs `workers` workers calling `step` for each key until `stop`; each step's
    /// [`Outcome`] decides the key's next turn.
    pub async fn run<F, Fut>(self: Arc<Self>, workers: usize, step: F, mut stop: watch::Receiver<bool>)
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let step = Arc::new(step);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let q = self.clone();
            let step = step.clone();
            set.spawn(async move {
                while let Some(key) = q.get().await {
                    let outcome = step(key.clone()).await;
                    match outcome {
                        Outcome::Done => q.forget(&key),
                        Outcome::Retry => {
                            tracing::debug!(queue = q.name, %key, failures = q.failures(&key) + 1, "retrying");
                            q.retry(&key);
                        }
                        Outcome::After(d) => q.add_after(key.clone(), d),
                    }
                    q.done(&key);
                }
            });
        }
        let _ = stop.wait_for(|s| *s).await;
        self.shut_down();
        while set.join_next().await.is_some() {}
    }
}

/// The delay before the `n`th retry (n ≥ 1): 5 ms doubling, at most five minutes.
pub fn backoff(n: u32) -> Duration {
    let shift = n.saturating_sub(1).min(20);
    BASE_BACKOFF.saturating_mul(1 << shift).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_is_queued_once_and_requeued_when_added_during_processing() {
        let q = Queue::new("t");
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        let a = q.get().await;
        assert_eq!(a.as_deref(), Some("a"));
        // Added while processing: not handed out now ...
        q.add("a");
        assert_eq!(q.get().await.as_deref(), Some("b"));
        assert!(q.is_empty());
        // ... but queued again once the worker is done.
        q.done("a");
        assert_eq!(q.get().await.as_deref(), Some("a"));
        q.done("a");
        q.done("b");
        assert!(q.is_empty());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(5));
        assert_eq!(backoff(2), Duration::from_millis(10));
        assert_eq!(backoff(5), Duration::from_millis(80));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn failures_count_until_forgotten() {
        let q = Queue::new("t");
        q.retry("k");
        q.retry("k");
        assert_eq!(q.failures("k"), 2);
        q.forget("k");
        assert_eq!(q.failures("k"), 0);
    }

    #[tokio::test]
    async fn shut_down_wakes_waiting_workers() {
        let q = Queue::new("t");
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.get().await });
        tokio::task::yield_now().await;
        q.shut_down();
        assert_eq!(waiter.await.ok().flatten(), None);
    }
}

//! Informers: one in-memory copy of every object of a kind, kept current by list-then-watch,
//! with callbacks on every change (which enqueue keys for the runners).
//!
//! A watch that falls behind the store's compaction (410 Gone) or breaks lists again; keys that
//! vanished meanwhile are reported as deletions. The cache is level-triggered truth for the
//! runners: they read objects here and write through [`Api`], never keeping state of their own
//! that the cache cannot rebuild.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use berth_api::Resource;
use serde_json::Value;
use tokio::sync::watch;

use crate::api::{Api, ApiError, Event, Listed, Typed, object_key};

/// One change, as handlers see it.
#[derive(Debug)]
pub enum Change<'a, T> {
    /// Added or modified; `old` is the previous cached copy, if any.
    Upsert { old: Option<&'a Arc<T>>, new: &'a Arc<T> },
    /// Deleted; the last known copy.
    Delete(&'a Arc<T>),
}

type Handler<T> = Box<dyn Fn(&Change<'_, T>) + Send + Sync>;

/// A cached object and the revision it was read at.
#[derive(Debug)]
struct Entry<T> {
    rev: u64,
    obj: Arc<T>,
}

/// The cache of one kind.
pub struct Informer<T> {
    res: &'static Resource,
    cache: RwLock<HashMap<String, Entry<T>>>,
    handlers: Mutex<Vec<Handler<T>>>,
    synced: watch::Sender<bool>,
}

impl<T> std::fmt::Debug for Informer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Informer")
            .field("kind", &self.res.kind)
            .finish_non_exhaustive()
    }
}

/// The revision stamped in `metadata.resourceVersion` (0 when absent).
pub fn revision_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl<T: Typed + Send + Sync + 'static> Informer<T> {
    pub fn new(res: &'static Resource) -> Arc<Self> {
        Arc::new(Informer {
            res,
            cache: RwLock::new(HashMap::new()),
            handlers: Mutex::new(Vec::new()),
            synced: watch::channel(false).0,
        })
    }

    pub fn resource(&self) -> &'static Resource {
        self.res
    }

    /// Calls `f` on every change from now on (register before [`Informer::run`]).
    pub fn on_change(&self, f: impl Fn(&Change<'_, T>) + Send + Sync + 'static) {
        lock(&self.handlers).push(Box::new(f));
    }

    /// The cached object under `key` (`ns/name` or `name`).
    pub fn get(&self, key: &str) -> Option<Arc<T>> {
        read(&self.cache).get(key).map(|e| e.obj.clone())
    }

    /// Every cached object.
    pub fn list(&self) -> Vec<Arc<T>> {
        read(&self.cache).values().map(|e| e.obj.clone()).collect()
    }

    /// Every cached key.
    pub fn keys(&self) -> Vec<String> {
        read(&self.cache).keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        read(&self.cache).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the first list has been loaded.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Puts a copy this process just wrote into the cache before its watch event arrives, so
    /// the next decision sees it. Older copies than the cached one are ignored.
    /// A copy whose write completed its deletion (Terminating, last finalizer gone) leaves
    /// the cache instead: re-adding it would bring back a ghost whose deletion event has passed.
    pub fn assume(&self, v: Value) {
        if crate::sidecar::deleted_by_write(&v) {
            self.apply(Event::Deleted(v));
        } else {
            self.apply(Event::Modified(v));
        }
    }

    /// [`Informer::assume`], returning the decoded object: one decode serves the cache and the
    /// caller.
    pub fn assume_decoded(&self, v: Value) -> Result<Arc<T>, ApiError> {
        if crate::sidecar::deleted_by_write(&v) {
            let obj = Arc::new(T::from_value(v.clone())?);
            self.apply(Event::Deleted(v));
            return Ok(obj);
        }
        let (key, rev) = (object_key(&v), revision_of(&v));
        let obj = Arc::new(T::from_value(v)?);
        self.upsert(key, rev, obj.clone());
        Ok(obj)
    }

    fn apply(&self, ev: Event) {
        let (deleted, v) = match ev {
            Event::Added(v) | Event::Modified(v) => (false, v),
            Event::Deleted(v) => (true, v),
            Event::Changed(lazy) => {
                if self.holds(&lazy.key, lazy.revision) {
                    // Already held (an assumed copy of our own write): not even parsed.
                    return;
                }
                match (lazy.decode)() {
                    Ok(json) => self.upsert_json(lazy.key, lazy.revision, &json),
                    Err(e) => {
                        tracing::warn!(kind = self.res.kind, key = %lazy.key, error = %e, "skipping an object that does not decode");
                    }
                }
                return;
            }
        };
        let key = object_key(&v);
        let rev = revision_of(&v);
        if deleted {
            let gone = {
                let mut cache = write(&self.cache);
                match cache.get(&key) {
                    // A newer copy (from an assume) replaced it; the deletion is older.
                    Some(e) if e.rev > rev && rev != 0 => None,
                    _ => cache.remove(&key),
                }
            };
            if let Some(e) = gone {
                self.notify(&Change::Delete(&e.obj));
            }
            return;
        }
        if rev != 0 && read(&self.cache).get(&key).is_some_and(|e| e.rev >= rev) {
            // Already seen (an assumed copy of our own write): skip the decode.
            return;
        }
        let obj = match T::from_value(v) {
            Ok(o) => Arc::new(o),
            Err(e) => {
                tracing::warn!(kind = self.res.kind, %key, error = %e, "skipping an object that does not decode");
                return;
            }
        };
        self.upsert(key, rev, obj);
    }

    /// Whether the cache holds `key` at `rev` or newer (`rev` 0: unknown, never held).
    fn holds(&self, key: &str, rev: u64) -> bool {
        rev != 0 && read(&self.cache).get(key).is_some_and(|e| e.rev >= rev)
    }

    /// Decodes `json` (the object under `key` at `rev`) straight into `T` and caches it.
    fn upsert_json(&self, key: String, rev: u64, json: &[u8]) {
        match T::from_json(json) {
            Ok(obj) => self.upsert(key, rev, Arc::new(obj)),
            Err(e) => {
                tracing::warn!(kind = self.res.kind, %key, error = %e, "skipping an object that does not decode");
            }
        }
    }

    /// Caches `obj` at `rev` unless a copy as new is held, and tells the handlers.
    fn upsert(&self, key: String, rev: u64, obj: Arc<T>) {
        let old = {
            let mut cache = write(&self.cache);
            match cache.get(&key) {
                Some(e) if e.rev >= rev && rev != 0 => return,
                _ => cache.insert(key, Entry { rev, obj: obj.clone() }),
            }
        };
        self.notify(&Change::Upsert {
            old: old.as_ref().map(|e| &e.obj),
            new: &obj,
        });
    }

    fn notify(&self, change: &Change<'_, T>) {
        for h in lock(&self.handlers).iter() {
            h(change);
        }
    }

    /// Replaces the cache with a fresh list, reporting what changed.
    fn replace(&self, items: Vec<Listed>) {
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        for item in items {
            seen.insert(item.key.clone());
            if !self.holds(&item.key, item.revision) {
                self.upsert_json(item.key, item.revision, &item.json);
            }
        }
        let stale: Vec<String> = read(&self.cache)
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in stale {
            let gone = write(&self.cache).remove(&k);
            if let Some(e) = gone {
                self.notify(&Change::Delete(&e.obj));
            }
        }
    }

    /// Lists and watches until `stop` resolves; lists again after a broken watch.
    pub async fn run(self: Arc<Self>, api: Arc<dyn Api>, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            if *stop.borrow() {
                return;
            }
            let result = tokio::select! {
                r = self.list_and_watch(&*api) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match result {
                Err(ApiError::Gone(_)) => backoff = Duration::from_millis(50),
                Err(e) => {
                    tracing::warn!(kind = self.res.kind, error = %e, "watch broke; listing again");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Ok(()) => {}
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    async fn list_and_watch(&self, api: &dyn Api) -> Result<(), ApiError> {
        let (items, rev) = api.list_json(self.res).await?;
        self.replace(items);
        self.synced.send_replace(true);
        let mut events = api.watch(self.res, rev).await?;
        while let Some(ev) = events.recv().await {
            self.apply(ev?);
        }
        Err(ApiError::Other("watch ended".into()))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use k8s_openapi::api::core::v1::PersistentVolume;
    use serde_json::json;

    use super::*;
    use crate::api::{Lazy, kinds};

    fn pv(name: &str, rev: u64, phase: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "resourceVersion": rev.to_string()},
            "status": {"phase": phase},
        })
    }

    /// A lazy event for `v`, counting how often it is decoded.
    fn lazy(v: Value, decoded: &Arc<AtomicUsize>) -> Event {
        let decoded = decoded.clone();
        Event::Changed(Lazy {
            key: object_key(&v),
            revision: revision_of(&v),
            decode: Box::new(move || {
                decoded.fetch_add(1, Ordering::SeqCst);
                Ok(serde_json::to_vec(&v).unwrap())
            }),
        })
    }

    fn phase(inf: &Informer<PersistentVolume>, key: &str) -> Option<String> {
        inf.get(key)?.status.as_ref()?.phase.clone()
    }

    #[test]
    fn a_revision_already_held_is_not_decoded() {
        let inf = Informer::<PersistentVolume>::new(kinds::pvs());
        let decoded = Arc::new(AtomicUsize::new(0));
        // Our own write, assumed before its watch event arrives.
        inf.assume(pv("a", 7, "Bound"));
        inf.apply(lazy(pv("a", 7, "Bound"), &decoded));
        inf.apply(lazy(pv("a", 6, "Available"), &decoded));
        assert_eq!(decoded.load(Ordering::SeqCst), 0, "held revisions must not be parsed");
        assert_eq!(phase(&inf, "a").as_deref(), Some("Bound"));
        // Someone else's newer write is decoded and replaces the copy.
        inf.apply(lazy(pv("a", 9, "Released"), &decoded));
        assert_eq!(decoded.load(Ordering::SeqCst), 1);
        assert_eq!(phase(&inf, "a").as_deref(), Some("Released"));
        // A new object too.
        inf.apply(lazy(pv("b", 10, "Pending"), &decoded));
        assert_eq!(decoded.load(Ordering::SeqCst), 2);
        assert_eq!(phase(&inf, "b").as_deref(), Some("Pending"));
    }

    /// A list's JSON items are decoded into the cache; keys the list no longer has are deleted,
    /// and an item that does not decode is skipped, not cached.
    #[test]
    fn a_list_replaces_the_cache() {
        let inf = Informer::<PersistentVolume>::new(kinds::pvs());
        let deleted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let d = deleted.clone();
        inf.on_change(move |c| {
            if let Change::Delete(pv) = c {
                d.lock().unwrap().push(pv.metadata.name.clone().unwrap_or_default());
            }
        });
        let item = |name: &str, rev: u64, phase: &str| Listed {
            key: name.into(),
            revision: rev,
            json: serde_json::to_vec(&pv(name, rev, phase)).unwrap(),
        };
        inf.replace(vec![item("a", 5, "Available"), item("b", 6, "Bound")]);
        assert_eq!(phase(&inf, "a").as_deref(), Some("Available"));
        assert_eq!(phase(&inf, "b").as_deref(), Some("Bound"));
        let bad = Listed {
            key: "c".into(),
            revision: 8,
            json: br#"{"spec":{"capacity":7}}"#.to_vec(),
        };
        inf.replace(vec![item("a", 7, "Released"), bad]);
        assert_eq!(phase(&inf, "a").as_deref(), Some("Released"));
        assert!(inf.get("b").is_none() && inf.get("c").is_none());
        assert_eq!(*deleted.lock().unwrap(), vec!["b".to_owned()]);
    }

    #[test]
    fn an_event_that_does_not_decode_is_skipped() {
        let inf = Informer::<PersistentVolume>::new(kinds::pvs());
        inf.assume(pv("a", 3, "Available"));
        inf.apply(Event::Changed(Lazy {
            key: "a".into(),
            revision: 4,
            decode: Box::new(|| Err(ApiError::Other("stored object is not JSON".into()))),
        }));
        assert_eq!(phase(&inf, "a").as_deref(), Some("Available"));
    }

    /// The decoded copy a write returns is the one cached; a newer copy already held stays, and
    /// a body that is not the kind's type is an error, not a cache entry.
    #[test]
    fn assume_decoded_caches_and_returns_one_copy() {
        let inf = Informer::<PersistentVolume>::new(kinds::pvs());
        let got = inf.assume_decoded(pv("a", 5, "Bound")).unwrap();
        assert!(Arc::ptr_eq(&got, &inf.get("a").unwrap()), "one decoded copy for both");
        inf.assume(pv("a", 8, "Released"));
        let older = inf.assume_decoded(pv("a", 6, "Available")).unwrap();
        assert_eq!(older.status.as_ref().unwrap().phase.as_deref(), Some("Available"));
        assert_eq!(phase(&inf, "a").as_deref(), Some("Released"), "the newer copy stays");
        let mut bad = pv("b", 9, "Bound");
        bad["spec"] = json!({"capacity": 7});
        assert!(inf.assume_decoded(bad).is_err());
        assert!(inf.get("b").is_none());
    }
}

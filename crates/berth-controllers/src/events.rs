//! Events, as `kubectl describe` shows them: best effort, written off the controllers' hot path
//! by one background task, and aggregated so that a repeated event bumps `count` on one Event
//! object instead of creating another.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::{Api, ApiError, Part, kinds};
use crate::pv_sync::Note;

/// Events waiting to be written; beyond this, new ones are dropped (and counted in the log).
const BACKLOG: usize = 4096;
/// How many distinct events the aggregator remembers.
const REMEMBER: usize = 8192;

/// The object an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Involved {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
}

impl Involved {
    /// From an object's JSON or typed metadata.
    pub fn of(
        api_version: &str,
        kind: &str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Involved {
        Involved {
            api_version: api_version.into(),
            kind: kind.into(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
        }
    }
}

#[derive(Debug)]
struct Record {
    component: &'static str,
    about: Involved,
    note: Note,
}

/// Hands events to the writer task.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Record>,
    component: &'static str,
}

impl Recorder {
    /// A recorder for `component` (the event's `source.component`) over a shared writer.
    pub fn for_component(&self, component: &'static str) -> Recorder {
        Recorder {
            tx: self.tx.clone(),
            component,
        }
    }

    /// Records `note` about `about`; never waits.
    pub fn record(&self, about: Involved, note: Note) {
        let rec = Record {
            component: self.component,
            about,
            note,
        };
        if self.tx.try_send(rec).is_err() {
            tracing::debug!("event backlog full; dropping an event");
        }
    }
}

/// An event's identity for aggregation: the object, the reason and the message.
type Seen = (Involved, &'static str, String);
/// Where an aggregated event was written (name, namespace) and its count.
type Written = (String, Option<String>, i64);

/// Events written at once; more wait their turn in the backlog.
const WRITERS: usize = 16;

/// Starts the writer; it ends when every [`Recorder`] is dropped.
pub fn start(api: Arc<dyn Api>) -> Recorder {
    let (tx, mut rx) = mpsc::channel::<Record>(BACKLOG);
    tokio::spawn(async move {
        let mut seen: HashMap<Seen, Written> = HashMap::new();
        let permits = Arc::new(tokio::sync::Semaphore::new(WRITERS));
        while let Some(rec) = rx.recv().await {
            if seen.len() > REMEMBER {
                seen.clear();
            }
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let key = (rec.about.clone(), rec.note.reason, rec.note.message.clone());
            let now = now();
            let api = api.clone();
            if let Some((name, ns, count)) = seen.get_mut(&key) {
                // The same event again: bump its count.
                *count += 1;
                let (name, ns, count) = (name.clone(), ns.clone(), *count);
                tokio::spawn(async move {
                    if let Ok(mut ev) = api.get(kinds::events(), ns.as_deref(), &name).await {
                        ev["count"] = json!(count);
                        ev["lastTimestamp"] = json!(now);
                        let _ = api.update(kinds::events(), ev, Part::Main).await;
                    }
                    drop(permit);
                });
                continue;
            }
            let ns = rec.about.namespace.clone().unwrap_or_else(|| "default".into());
            let name = format!("{}.{:x}", rec.about.name, unique());
            let ev = event(&rec, &ns, &name, &now);
            seen.insert(key, (name, Some(ns), 1));
            tokio::spawn(async move {
                match api.create(kinds::events(), ev).await {
                    Ok(_) | Err(ApiError::NotFound(_)) => {} // NotFound: the namespace is gone
                    Err(e) => tracing::debug!(error = %e, "could not write an event"),
                }
                drop(permit);
            });
        }
    });
    Recorder {
        tx,
        component: "berth-controllers",
    }
}

fn event(rec: &Record, ns: &str, name: &str, now: &str) -> Value {
    let mut involved = json!({
        "apiVersion": rec.about.api_version,
        "kind": rec.about.kind,
        "name": rec.about.name,
        "uid": rec.about.uid,
    });
    if let Some(n) = &rec.about.namespace {
        involved["namespace"] = json!(n);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": ns},
        "involvedObject": involved,
        "reason": rec.note.reason,
        "message": rec.note.message,
        "type": if rec.note.warning { "Warning" } else { "Normal" },
        "source": {"component": rec.component},
        "reportingComponent": rec.component,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    })
}

/// `2026-01-31T12:00:00Z`, as Kubernetes writes times (seconds).
pub fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn unique() -> u128 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    nanos + u128::from(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

//! The etcd backend, for `berth controller` replicas sharing one etcd cluster.
//!
//! Revisions are etcd's own (an object's revision is its `mod_revision`). Preconditions are etcd
//! transactions, so they hold across every client of the cluster: create compares
//! `create_revision == 0`, update and delete compare `mod_revision == expected`. All keys live
//! under a configurable root (`/registry` by default), which is stripped from what callers see.
//!
//! Watches use etcd's watch with `prev_kv` (a deletion carries the last value) and progress
//! notifications; bookmarks carry the newest revision the watch is known to be complete up to.
//! etcd acknowledges a write once a quorum has it in its fsynced log.

use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, EventType, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::sync::mpsc;

use crate::{
    DEFAULT_BOOKMARK_INTERVAL, ListOptions, ListPage, Object, Result, Store, StoreError, WATCH_CHANNEL, Watch,
    WatchEvent,
};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of every key in etcd, e.g. `/registry`. Empty for none.
    pub root: String,
    /// How often watches send a bookmark.
    pub bookmark_interval: Duration,
}

impl EtcdOptions {
    /// Options for `endpoints` with the default root `/registry`.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdOptions {
            endpoints,
            root: "/registry".into(),
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
        }
    }
}

/// The store on an etcd v3 cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    root: String,
    bookmark_interval: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

const COMPACTED: &str = "required revision has been compacted";
const FUTURE: &str = "required revision is a future revision";

fn etcd_err(context: &str, e: etcd_client::Error) -> StoreError {
    StoreError::backend(context, e)
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn etcd_rev(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key.
    vec![0]
}

impl EtcdStore {
    /// Connects to etcd. Fails when no endpoint answers.
    pub async fn connect(options: EtcdOptions) -> Result<Self> {
        let client = Client::connect(&options.endpoints, None)
            .await
            .map_err(|e| etcd_err(&format!("connecting to etcd at {:?}", options.endpoints), e))?;
        let store = EtcdStore {
            client,
            root: options.root,
            bookmark_interval: options.bookmark_interval,
        };
        // Fail now rather than at the first request.
        store
            .current_revision()
            .await
            .map_err(|e| StoreError::Backend(format!("etcd at {:?}: {e}", options.endpoints)))?;
        Ok(store)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.root)
    }

    fn object(&self, kv: &KeyValue, mod_revision: u64) -> Result<Object> {
        let key = kv.key_str().map_err(|e| etcd_err("a key that is not UTF-8", e))?;
        let key = key.strip_prefix(self.root.as_str()).unwrap_or(key);
        Ok(Object {
            key: key.to_owned(),
            value: Bytes::copy_from_slice(kv.value()),
            mod_revision,
        })
    }

    /// Maps etcd's revision errors to `Gone`/`FutureRevision`.
    async fn revision_err(&self, e: etcd_client::Error, requested: u64, context: &str) -> StoreError {
        let msg = e.to_string();
        if msg.contains(COMPACTED) {
            StoreError::Gone {
                requested,
                compacted: 0,
            }
        } else if msg.contains(FUTURE) {
            StoreError::FutureRevision {
                requested,
                current: self.current_revision().await.unwrap_or(0),
            }
        } else {
            etcd_err(context, e)
        }
    }

    /// Runs `when -> then`, else reads the key to say why it failed.
    async fn guarded(&self, key: &str, when: Vec<Compare>, then: TxnOp, expected: Option<u64>) -> Result<u64> {
        let full = self.full(key);
        let txn = Txn::new().when(when).and_then([then]).or_else([TxnOp::get(full, None)]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| etcd_err(&format!("writing {key}"), e))?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| rev(h.revision())));
        }
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| rev(kv.mod_revision())),
            _ => None,
        });
        Err(match (current, expected) {
            (None, _) => StoreError::NotFound { key: key.into() },
            (Some(actual), Some(expected)) => StoreError::Conflict {
                key: key.into(),
                expected,
                actual,
            },
            (Some(_), None) => StoreError::AlreadyExists { key: key.into() },
        })
    }

    /// Converts one etcd event; `None` (logged) for a key that is not UTF-8.
    fn event(&self, ev: &etcd_client::Event) -> Option<WatchEvent> {
        let kv = ev.kv()?;
        let r = rev(kv.mod_revision());
        let converted = match ev.event_type() {
            EventType::Put => self.object(kv, r).map(|o| {
                if kv.create_revision() == kv.mod_revision() {
                    WatchEvent::Added(o)
                } else {
                    WatchEvent::Modified(o)
                }
            }),
            // The deletion's kv has no value; prev_kv has the last one.
            EventType::Delete => self.object(ev.prev_kv().unwrap_or(kv), r).map(WatchEvent::Deleted),
        };
        converted
            .inspect_err(|e| tracing::warn!(error = %e, revision = r, "skipping an etcd event"))
            .ok()
    }

    fn preconditions(&self, key: &str, expected: Option<u64>) -> Vec<Compare> {
        let full = self.full(key);
        let mut when = vec![Compare::create_revision(full.clone(), CompareOp::Greater, 0)];
        if let Some(e) = expected {
            when.push(Compare::mod_revision(full, CompareOp::Equal, etcd_rev(e)));
        }
        when
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>> {
        let resp = self
            .client
            .kv_client()
            .get(self.full(key), None)
            .await
            .map_err(|e| etcd_err(&format!("reading {key}"), e))?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (Bytes::copy_from_slice(kv.value()), rev(kv.mod_revision()))))
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage> {
        let full_prefix = self.full(prefix);
        let mut start = full_prefix.clone().into_bytes();
        if let Some(after) = opts.continue_after.as_deref() {
            let mut next = self.full(after).into_bytes();
            next.push(0);
            start = start.max(next);
        }
        let mut get = GetOptions::new().with_range(prefix_end(full_prefix.as_bytes()));
        if let Some(limit) = opts.limit.filter(|l| *l > 0) {
            get = get.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let at = opts.at_revision.filter(|r| *r > 0);
        if let Some(at) = at {
            get = get.with_revision(etcd_rev(at));
        }
        let resp = match self.client.kv_client().get(start, Some(get)).await {
            Ok(resp) => resp,
            Err(e) => {
                return Err(self
                    .revision_err(e, at.unwrap_or(0), &format!("listing {prefix}"))
                    .await);
            }
        };
        let items = resp
            .kvs()
            .iter()
            .map(|kv| self.object(kv, rev(kv.mod_revision())))
            .collect::<Result<Vec<_>>>()?;
        let next = if resp.more() {
            items.last().map(|o| o.key.clone())
        } else {
            None
        };
        let revision = at.unwrap_or_else(|| resp.header().map_or(0, |h| rev(h.revision())));
        Ok(ListPage { items, revision, next })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64> {
        let full = self.full(key);
        let when = vec![Compare::create_revision(full.clone(), CompareOp::Equal, 0)];
        let put = TxnOp::put(full, value.to_vec(), None);
        self.guarded(key, when, put, None).await
    }

    async fn update(&self, key: &str, value: Bytes, expected: Option<u64>) -> Result<u64> {
        let when = self.preconditions(key, expected);
        let put = TxnOp::put(self.full(key), value.to_vec(), None);
        self.guarded(key, when, put, expected).await.map_err(|e| match e {
            // Without an expected revision the only failing compare is "exists".
            StoreError::AlreadyExists { key } => StoreError::NotFound { key },
            e => e,
        })
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<u64> {
        let when = self.preconditions(key, expected);
        let del = TxnOp::delete(self.full(key), None);
        self.guarded(key, when, del, expected).await.map_err(|e| match e {
            StoreError::AlreadyExists { key } => StoreError::NotFound { key },
            e => e,
        })
    }

    async fn watch(&self, prefix: &str, from: u64) -> Result<Watch> {
        let full = self.full(prefix);
        let mut options = WatchOptions::new()
            .with_range(prefix_end(full.as_bytes()))
            .with_prev_key()
            .with_progress_notify();
        if from > 0 {
            // etcd's start revision is inclusive; ours is "after".
            options = options.with_start_revision(etcd_rev(from.saturating_add(1)));
        }
        let mut stream = self
            .client
            .watch_client()
            .watch(full, Some(options))
            .await
            .map_err(|e| etcd_err(&format!("watching {prefix}"), e))?;
        let created = stream
            .message()
            .await
            .map_err(|e| etcd_err(&format!("watching {prefix}"), e))?
            .ok_or_else(|| StoreError::Backend(format!("etcd closed the watch on {prefix}")))?;
        if created.compact_revision() > 0 {
            return Err(StoreError::Gone {
                requested: from,
                compacted: rev(created.compact_revision()),
            });
        }
        if !created.created() || created.canceled() {
            return Err(StoreError::Backend(format!(
                "etcd refused the watch on {prefix}: {}",
                created.cancel_reason()
            )));
        }
        let mut last = if from == 0 {
            created.header().map_or(0, |h| rev(h.revision()))
        } else {
            from
        };
        let store = self.clone();
        let interval = self.bookmark_interval;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        let task = tokio::spawn(async move {
            // Keep the request side open: dropping it would end the watch.
            let (_requests, mut responses) = stream.split();
            let start = tokio::time::Instant::now() + interval;
            let mut ticker = tokio::time::interval_at(start, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    msg = responses.message() => {
                        let resp = match msg {
                            Ok(Some(resp)) => resp,
                            Ok(None) => {
                                let _ = tx.send(Err(StoreError::Backend("etcd ended the watch".into()))).await;
                                return;
                            }
                            Err(e) => {
                                let _ = tx.send(Err(etcd_err("watching", e))).await;
                                return;
                            }
                        };
                        if resp.compact_revision() > 0 {
                            let _ = tx.send(Err(StoreError::Gone {
                                requested: from,
                                compacted: rev(resp.compact_revision()),
                            })).await;
                            return;
                        }
                        if resp.canceled() {
                            let reason = format!("etcd canceled the watch: {}", resp.cancel_reason());
                            let _ = tx.send(Err(StoreError::Backend(reason))).await;
                            return;
                        }
                        if resp.events().is_empty() {
                            // A progress notification: everything up to the header is delivered.
                            if let Some(h) = resp.header() {
                                last = last.max(rev(h.revision()));
                            }
                            continue;
                        }
                        for ev in resp.events() {
                            let Some(event) = store.event(ev) else { continue };
                            last = last.max(event.revision());
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    }
                    _ = ticker.tick() => {
                        if tx.send(Ok(WatchEvent::Bookmark(last))).await.is_err() {
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Watch::new(rx, task))
    }

    async fn compact(&self, revision: u64) -> Result<()> {
        let options = CompactionOptions::new().with_physical();
        match self.client.kv_client().compact(etcd_rev(revision), Some(options)).await {
            Ok(_) => Ok(()),
            Err(e) => match self.revision_err(e, revision, "compacting").await {
                // Already compacted at or past it: nothing to do.
                StoreError::Gone { .. } => Ok(()),
                e => Err(e),
            },
        }
    }

    async fn current_revision(&self) -> Result<u64> {
        let resp = self
            .client
            .kv_client()
            .get(self.full("/"), Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| etcd_err("reading the revision", e))?;
        Ok(resp.header().map_or(0, |h| rev(h.revision())))
    }
}

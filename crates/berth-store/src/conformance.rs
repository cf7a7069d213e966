//! The conformance suite every [`Store`] backend must pass: one async function per behaviour,
//! each taking a fresh, empty store. Backends' tests call them (see `tests/redb.rs` and
//! `tests/etcd.rs`); nothing here is for production use.
//!
//! Stores under test must send bookmarks at least every second.

// Test code: a failed expectation is a panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{ListOptions, ListPage, Object, Store, StoreError, Watch, WatchEvent};

/// Longest wait for one expected watch event.
const WAIT: Duration = Duration::from_secs(10);

fn val(s: &str) -> Bytes {
    Bytes::from(s.to_owned())
}

/// The next event that is not a bookmark.
pub async fn next_change(w: &mut Watch) -> WatchEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, w.recv()).await {
            Err(_) => panic!("no watch event within {WAIT:?}"),
            Ok(None) => panic!("watch ended unexpectedly"),
            Ok(Some(Err(e))) => panic!("watch failed: {e}"),
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => continue,
            Ok(Some(Ok(ev))) => return ev,
        }
    }
}

fn object(key: &str, value: &str, rev: u64) -> Object {
    Object {
        key: key.into(),
        value: val(value),
        mod_revision: rev,
    }
}

async fn list_all(store: &dyn Store, prefix: &str, at: Option<u64>, limit: usize) -> Vec<Object> {
    let mut out = Vec::new();
    let mut opts = ListOptions {
        limit: Some(limit),
        continue_after: None,
        at_revision: at,
    };
    loop {
        let page = store.list(prefix, opts.clone()).await.unwrap();
        assert!(page.items.len() <= limit, "page longer than its limit");
        out.extend(page.items);
        match page.next {
            Some(next) => {
                opts.continue_after = Some(next);
                opts.at_revision = Some(page.revision);
            }
            None => return out,
        }
    }
}

/// Create, get, update, delete; revisions returned match what get and list report.
pub async fn crud(store: Arc<dyn Store>) {
    let k = "/core/pv/one";
    assert_eq!(store.get(k).await.unwrap(), None);
    let r1 = store.create(k, val("v1")).await.unwrap();
    assert_eq!(store.get(k).await.unwrap(), Some((val("v1"), r1)));
    let r2 = store.update(k, val("v2"), Some(r1)).await.unwrap();
    assert!(r2 > r1, "update revision {r2} not after create {r1}");
    assert_eq!(store.get(k).await.unwrap(), Some((val("v2"), r2)));
    let r3 = store.update(k, val("v3"), None).await.unwrap();
    assert!(r3 > r2);
    let page = store.list("/core/pv/", ListOptions::default()).await.unwrap();
    assert_eq!(page.items, vec![object(k, "v3", r3)]);
    assert!(page.revision >= r3);
    assert_eq!(page.next, None);
    let r4 = store.delete(k, Some(r3)).await.unwrap();
    assert!(r4 > r3);
    assert_eq!(store.get(k).await.unwrap(), None);
    assert!(store.current_revision().await.unwrap() >= r4);
    // A deleted key can be created again, with a new revision.
    let r5 = store.create(k, val("again")).await.unwrap();
    assert!(r5 > r4);
    assert_eq!(store.get(k).await.unwrap(), Some((val("again"), r5)));
}

/// AlreadyExists, NotFound and Conflict, and that a failed write changes nothing.
pub async fn conflicts(store: Arc<dyn Store>) {
    let k = "/core/pvc/ns/claim";
    let r1 = store.create(k, val("a")).await.unwrap();
    assert_eq!(
        store.create(k, val("b")).await,
        Err(StoreError::AlreadyExists { key: k.into() })
    );
    let r2 = store.update(k, val("b"), Some(r1)).await.unwrap();
    assert_eq!(
        store.update(k, val("c"), Some(r1)).await,
        Err(StoreError::Conflict {
            key: k.into(),
            expected: r1,
            actual: r2
        })
    );
    assert_eq!(
        store.delete(k, Some(r1)).await,
        Err(StoreError::Conflict {
            key: k.into(),
            expected: r1,
            actual: r2
        })
    );
    assert_eq!(store.get(k).await.unwrap(), Some((val("b"), r2)));
    let missing = "/core/pvc/ns/missing";
    let nf = Err(StoreError::NotFound { key: missing.into() });
    assert_eq!(store.update(missing, val("x"), None).await, nf);
    assert_eq!(store.update(missing, val("x"), Some(r2)).await, nf);
    assert_eq!(store.update(missing, val("x"), Some(0)).await, nf);
    assert_eq!(store.delete(missing, None).await, nf);
    assert_eq!(store.get(missing).await.unwrap(), None);
    // Failed writes did not consume revisions visible as changes.
    assert_eq!(store.get(k).await.unwrap(), Some((val("b"), r2)));
    store.delete(k, None).await.unwrap();
    assert_eq!(store.delete(k, None).await, Err(StoreError::NotFound { key: k.into() }));
}

/// Lists page with limit/continue at one revision, whatever is written between pages; a list
/// at a past revision shows that revision's state; prefixes do not leak into each other.
pub async fn list_pages(store: Arc<dyn Store>) {
    let mut expected = Vec::new();
    for i in 0..25 {
        let key = format!("/core/pv/p{i:02}");
        let rev = store.create(&key, val(&format!("v{i}"))).await.unwrap();
        expected.push(object(&key, &format!("v{i}"), rev));
    }
    // Neighbours that a "/core/pv/" prefix must not see.
    store.create("/core/pv", val("no")).await.unwrap();
    store.create("/core/pvc/x", val("no")).await.unwrap();
    store.create("/core/pu/x", val("no")).await.unwrap();

    let first = store
        .list(
            "/core/pv/",
            ListOptions {
                limit: Some(10),
                ..ListOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first.items, expected[..10]);
    assert_eq!(first.next.as_deref(), Some("/core/pv/p09"));
    let at = first.revision;

    // Change the keyspace between pages: the following pages must not see it.
    store.update("/core/pv/p12", val("changed"), None).await.unwrap();
    store.delete("/core/pv/p20", None).await.unwrap();
    store.create("/core/pv/p15a", val("new")).await.unwrap();
    store.delete("/core/pv/p03", None).await.unwrap();

    let mut rest = Vec::new();
    let mut after = first.next.clone();
    while let Some(a) = after {
        let page: ListPage = store
            .list(
                "/core/pv/",
                ListOptions {
                    limit: Some(10),
                    continue_after: Some(a),
                    at_revision: Some(at),
                },
            )
            .await
            .unwrap();
        assert_eq!(page.revision, at, "pages must share the first page's revision");
        rest.extend(page.items);
        after = page.next;
    }
    assert_eq!(rest, expected[10..]);

    // The newest state reflects the changes.
    let now = list_all(&*store, "/core/pv/", None, 7).await;
    let keys: Vec<&str> = now.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys.len(), 24);
    assert!(keys.contains(&"/core/pv/p15a"));
    assert!(!keys.contains(&"/core/pv/p20"));
    assert!(!keys.contains(&"/core/pv/p03"));
    let p12 = now.iter().find(|o| o.key == "/core/pv/p12").unwrap();
    assert_eq!(p12.value, val("changed"));
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "list not in key order");

    // The whole list at the old revision, in pages of 4, is still the original.
    assert_eq!(list_all(&*store, "/core/pv/", Some(at), 4).await, expected);
    // Unlimited.
    let all = store
        .list(
            "/core/pv/",
            ListOptions {
                at_revision: Some(at),
                ..ListOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(all.items, expected);
    assert_eq!(all.next, None);

    // A page that ends exactly at the last item says there is no more.
    let exact = store
        .list(
            "/core/pv/",
            ListOptions {
                limit: Some(25),
                at_revision: Some(at),
                ..ListOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(exact.items.len(), 25);
    assert_eq!(exact.next, None);

    // Nothing under an unknown prefix.
    let empty = store.list("/nothing/", ListOptions::default()).await.unwrap();
    assert!(empty.items.is_empty());
    assert_eq!(empty.next, None);

    // A revision in the future is refused.
    let current = store.current_revision().await.unwrap();
    let future = store
        .list(
            "/core/pv/",
            ListOptions {
                at_revision: Some(current + 1000),
                ..ListOptions::default()
            },
        )
        .await;
    assert!(
        matches!(future, Err(StoreError::FutureRevision { requested, .. }) if requested == current + 1000),
        "list at a future revision: {future:?}"
    );
}

/// A watch from revision 0 sees what happens after it starts, under its prefix only, in order;
/// a deletion carries the last value.
pub async fn watch_from_now(store: Arc<dyn Store>) {
    store.create("/w/before", val("old")).await.unwrap();
    let mut w = store.watch("/w/", 0).await.unwrap();
    let r1 = store.create("/w/a", val("1")).await.unwrap();
    store.create("/other/x", val("no")).await.unwrap();
    let r2 = store.update("/w/a", val("2"), Some(r1)).await.unwrap();
    let r3 = store.delete("/w/a", Some(r2)).await.unwrap();
    assert_eq!(next_change(&mut w).await, WatchEvent::Added(object("/w/a", "1", r1)));
    assert_eq!(next_change(&mut w).await, WatchEvent::Modified(object("/w/a", "2", r2)));
    assert_eq!(next_change(&mut w).await, WatchEvent::Deleted(object("/w/a", "2", r3)));
}

/// A watch from a past revision replays everything after it, then follows live changes.
pub async fn watch_replays(store: Arc<dyn Store>) {
    let start = store.create("/r/zero", val("0")).await.unwrap();
    let r1 = store.create("/r/a", val("a1")).await.unwrap();
    let r2 = store.update("/r/a", val("a2"), None).await.unwrap();
    store.create("/x/other", val("no")).await.unwrap();
    let r3 = store.delete("/r/zero", None).await.unwrap();
    let mut w = store.watch("/r/", start).await.unwrap();
    assert_eq!(next_change(&mut w).await, WatchEvent::Added(object("/r/a", "a1", r1)));
    assert_eq!(
        next_change(&mut w).await,
        WatchEvent::Modified(object("/r/a", "a2", r2))
    );
    assert_eq!(
        next_change(&mut w).await,
        WatchEvent::Deleted(object("/r/zero", "0", r3))
    );
    let r4 = store.create("/r/live", val("l")).await.unwrap();
    assert_eq!(next_change(&mut w).await, WatchEvent::Added(object("/r/live", "l", r4)));
    // A list followed by a watch from its revision misses nothing and repeats nothing.
    let page = store.list("/r/", ListOptions::default()).await.unwrap();
    let mut w2 = store.watch("/r/", page.revision).await.unwrap();
    let r5 = store.update("/r/live", val("l2"), Some(r4)).await.unwrap();
    assert_eq!(
        next_change(&mut w2).await,
        WatchEvent::Modified(object("/r/live", "l2", r5))
    );
}

/// Concurrent writers: every watcher sees every acknowledged write exactly once, in strictly
/// increasing revision order, and revisions are unique.
pub async fn watch_ordering(store: Arc<dyn Store>) {
    const WRITERS: usize = 8;
    const EACH: usize = 25;
    let mut w = store.watch("/o/", 0).await.unwrap();
    let mut w_all = store.watch("/", 0).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            let key = format!("/o/{t}");
            let mut rev = store.create(&key, val("0")).await.unwrap();
            acks.push(rev);
            for i in 1..EACH {
                let next = store.update(&key, val(&i.to_string()), Some(rev)).await.unwrap();
                assert!(next > rev, "a writer's revisions must increase");
                rev = next;
                acks.push(rev);
            }
            acks
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    acked.sort_unstable();
    let before = acked.len();
    acked.dedup();
    assert_eq!(acked.len(), before, "two writes got the same revision");
    for watch in [&mut w, &mut w_all] {
        let mut seen = Vec::new();
        while seen.len() < acked.len() {
            seen.push(next_change(watch).await.revision());
        }
        assert!(
            seen.windows(2).all(|p| p[0] < p[1]),
            "watch revisions not strictly increasing"
        );
        assert_eq!(seen, acked);
    }
}

/// An idle watch sends bookmarks; a bookmark is never behind an event already delivered, and
/// it advances when other prefixes are written.
pub async fn bookmarks(store: Arc<dyn Store>) {
    let mut w = store.watch("/idle/", 0).await.unwrap();
    let r = store.create("/idle/a", val("a")).await.unwrap();
    let busy = store.create("/busy/x", val("b")).await.unwrap();
    assert!(busy > r);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last_event = 0;
    loop {
        let ev = tokio::time::timeout_at(deadline, w.recv())
            .await
            .unwrap_or_else(|_| panic!("no bookmark at or after {busy} within {WAIT:?}"))
            .expect("watch ended")
            .expect("watch failed");
        match ev {
            WatchEvent::Bookmark(b) => {
                assert!(b >= last_event, "bookmark {b} behind event {last_event}");
                if b >= busy {
                    break;
                }
            }
            other => last_event = other.revision(),
        }
    }
    assert_eq!(last_event, r);
}

/// Compaction: lists and watches before the compaction point get Gone; at or after it they
/// work; compacting backwards does nothing; compacting into the future is refused.
pub async fn gone_after_compaction(store: Arc<dyn Store>) {
    let r1 = store.create("/g/a", val("1")).await.unwrap();
    let r2 = store.update("/g/a", val("2"), None).await.unwrap();
    store.create("/g/b", val("b")).await.unwrap();
    let r4 = store.create("/g/c", val("c")).await.unwrap();
    let r5 = store.update("/g/c", val("c2"), None).await.unwrap();
    let r6 = store.delete("/g/b", None).await.unwrap();
    store.compact(r4).await.unwrap();

    let gone = store
        .list(
            "/g/",
            ListOptions {
                at_revision: Some(r1),
                ..ListOptions::default()
            },
        )
        .await;
    assert!(
        matches!(gone, Err(StoreError::Gone { requested, .. }) if requested == r1),
        "list at compacted revision {r1}: {gone:?}"
    );
    expect_gone(store.watch("/g/", r1).await, r1).await;

    // At the compaction point, the state is still there (newest version of each key kept).
    let at = list_all(&*store, "/g/", Some(r4), 1).await;
    let keys: Vec<&str> = at.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["/g/a", "/g/b", "/g/c"]);
    assert_eq!(at[0], object("/g/a", "2", r2));
    // A watch from the compaction point replays what came after it.
    let mut w = store.watch("/g/", r4).await.unwrap();
    assert_eq!(
        next_change(&mut w).await,
        WatchEvent::Modified(object("/g/c", "c2", r5))
    );
    assert_eq!(next_change(&mut w).await, WatchEvent::Deleted(object("/g/b", "b", r6)));
    // Compacting backwards is a no-op; into the future is refused.
    store.compact(r2).await.unwrap();
    let current = store.current_revision().await.unwrap();
    let future = store.compact(current + 100).await;
    assert!(
        matches!(future, Err(StoreError::FutureRevision { .. })),
        "compact into the future: {future:?}"
    );
    // Compact again past a deletion: the deleted key is gone from lists at that point.
    let r7 = store.create("/g/d", val("d")).await.unwrap();
    store.compact(r7).await.unwrap();
    let now = list_all(&*store, "/g/", Some(r7), 2).await;
    let keys: Vec<&str> = now.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["/g/a", "/g/c", "/g/d"]);
    expect_gone(store.watch("/g/", r4).await, r4).await;
}

/// A watch started before the compaction point fails with Gone, from the call or as its first
/// item (etcd reports it on the stream).
async fn expect_gone(watch: Result<Watch, StoreError>, requested: u64) {
    let err = match watch {
        Err(e) => e,
        Ok(mut w) => {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                match tokio::time::timeout_at(deadline, w.recv()).await {
                    Err(_) => {
                        panic!("watch from compacted revision {requested}: no Gone within {WAIT:?}")
                    }
                    Ok(None) => {
                        panic!("watch from compacted revision {requested} ended without Gone")
                    }
                    Ok(Some(Ok(WatchEvent::Bookmark(_)))) => continue,
                    Ok(Some(Ok(ev))) => {
                        panic!("watch from compacted revision {requested} delivered {ev:?}")
                    }
                    Ok(Some(Err(e))) => break e,
                }
            }
        }
    };
    assert!(
        matches!(err, StoreError::Gone { requested: r, .. } if r == requested),
        "watch from compacted revision {requested}: {err:?}"
    );
}

/// Many concurrent creates of one key: exactly one wins, the rest get AlreadyExists, and the
/// stored value is the winner's.
pub async fn concurrent_create_one_winner(store: Arc<dyn Store>) {
    const CONTENDERS: usize = 32;
    let key = "/core/ns/contended";
    let mut tasks = Vec::new();
    for i in 0..CONTENDERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            (i, store.create(key, val(&format!("writer {i}"))).await)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (i, Ok(rev)) => winners.push((i, rev)),
            (_, Err(StoreError::AlreadyExists { .. })) => {}
            (i, Err(e)) => panic!("contender {i}: unexpected {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one create must win: {winners:?}");
    let (i, rev) = winners[0];
    assert_eq!(store.get(key).await.unwrap(), Some((val(&format!("writer {i}")), rev)));
}

/// Every successful write gets a revision greater than all before it, including across
/// different keys and operations, and current_revision keeps up.
pub async fn revisions_increase(store: Arc<dyn Store>) {
    let mut last = store.current_revision().await.unwrap();
    for i in 0..20 {
        let key = format!("/inc/{}", i % 3);
        let rev = match store.get(&key).await.unwrap() {
            None => store.create(&key, val("c")).await.unwrap(),
            Some((_, r)) if i % 2 == 0 => store.update(&key, val("u"), Some(r)).await.unwrap(),
            Some((_, r)) => store.delete(&key, Some(r)).await.unwrap(),
        };
        assert!(rev > last, "revision {rev} not after {last}");
        assert!(store.current_revision().await.unwrap() >= rev);
        last = rev;
    }
    // A failed write does not move anything backwards.
    let _ = store.create("/inc/0", val("x")).await;
    let _ = store.create("/inc/0", val("x")).await;
    let rev = store.create("/inc/new", val("n")).await.unwrap();
    assert!(rev > last);
}

/// Every acknowledged write survives closing and reopening the store (`reopen` gets the only
/// handle, must drop it, and returns a new one over the same data), and the revision goes on
/// from where it was.
pub async fn durable_across_reopen<F, Fut>(store: Arc<dyn Store>, reopen: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    const WRITERS: usize = 16;
    const EACH: usize = 20;
    let mut tasks = Vec::new();
    for t in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..EACH {
                let key = format!("/d/{t}/{i}");
                let rev = store.create(&key, val(&key)).await.unwrap();
                acks.push((key, rev));
            }
            let rev = store.update(&format!("/d/{t}/0"), val("updated"), None).await.unwrap();
            acks[0].1 = rev;
            acks
        }));
    }
    let mut acked = BTreeMap::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let max = acked.values().copied().max().unwrap();
    let store = reopen(store).await;
    assert!(store.current_revision().await.unwrap() >= max);
    for (key, rev) in &acked {
        let (value, got) = store
            .get(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged {key} lost"));
        assert_eq!(got, *rev, "{key}");
        let expect = if key.ends_with("/0") { val("updated") } else { val(key) };
        assert_eq!(value, expect, "{key}");
    }
    let next = store.create("/d/after", val("x")).await.unwrap();
    assert!(next > max, "revision went backwards after reopen: {next} <= {max}");
}

/// Generates one `#[tokio::test]` per conformance case. `$fresh` is an async fn returning
/// `(Arc<dyn Store>, guard)`: a fresh, empty store and whatever must live as long as it.
#[macro_export]
#[doc(hidden)]
macro_rules! conformance_tests {
    ($fresh:path) => {
        $crate::conformance_tests!(@cases $fresh;
            crud,
            conflicts,
            list_pages,
            watch_from_now,
            watch_replays,
            watch_ordering,
            bookmarks,
            gone_after_compaction,
            concurrent_create_one_winner,
            revisions_increase
        );
    };
    (@cases $fresh:path; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _guard) = $fresh().await;
                $crate::conformance::$case(store).await;
            }
        )*
    };
}

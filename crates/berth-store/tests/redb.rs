//! The conformance suite and the redb-specific behaviour (group commit, lagging watchers,
//! durability across reopen, the file lock).
#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_store::conformance::next_change;
use berth_store::{RedbOptions, RedbStore, Store, StoreError, WatchEvent};
use bytes::Bytes;
use tempfile::TempDir;

fn options() -> RedbOptions {
    RedbOptions {
        bookmark_interval: Duration::from_millis(200),
        // Every test makes its own store; a small log keeps that cheap.
        log_size: 1 << 20,
        ..RedbOptions::default()
    }
}

fn open(path: &Path, options: RedbOptions) -> Arc<dyn Store> {
    Arc::new(RedbStore::open(path, options).expect("open the store"))
}

async fn fresh() -> (Arc<dyn Store>, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    (open(&dir.path().join("store.redb"), options()), dir)
}

berth_store::conformance_tests!(fresh);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_across_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    let store = open(&path, options());
    berth_store::conformance::durable_across_reopen(store, |store| async move {
        drop(store);
        open(&path, options())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_open_of_one_file_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    let _first = RedbStore::open(&path, options()).expect("first open");
    let second = RedbStore::open(&path, options());
    assert!(
        matches!(&second, Err(StoreError::Backend(m)) if m.contains("already open")),
        "{second:?}"
    );
}

/// A watcher far behind the broadcast buffer is re-fed from the log and misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_catches_up_from_the_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(
        &dir.path().join("store.redb"),
        RedbOptions {
            watch_buffer: 1,
            ..options()
        },
    );
    let mut w = store.watch("/lag/", 0).await.expect("watch");
    let mut acked = Vec::new();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..200 {
                let key = format!("/lag/{t}/{i}");
                revs.push(store.create(&key, Bytes::from(key.clone())).await.expect("create"));
            }
            revs
        }));
    }
    for t in tasks {
        acked.extend(t.await.expect("writer"));
    }
    acked.sort_unstable();
    let mut seen = Vec::new();
    while seen.len() < acked.len() {
        seen.push(next_change(&mut w).await.revision());
    }
    assert_eq!(seen, acked);
}

/// A watcher that fell behind a compaction gets Gone as its last item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_behind_compaction_gets_gone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(
        &dir.path().join("store.redb"),
        RedbOptions {
            watch_buffer: 1,
            bookmark_interval: Duration::from_secs(3600),
            ..options()
        },
    );
    let mut w = store.watch("/c/", 0).await.expect("watch");
    // Fill the watch's own channel and the broadcast, then compact past it all.
    let mut last = 0;
    for i in 0..1500 {
        last = store
            .create(&format!("/c/{i}"), Bytes::from_static(b"x"))
            .await
            .expect("create");
    }
    store.compact(last).await.expect("compact");
    let mut got = 0;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), w.recv()).await {
            Ok(Some(Ok(_))) => got += 1,
            Ok(Some(Err(e))) => break e,
            other => panic!("expected Gone after {got} events, got {other:?}"),
        }
    };
    assert!(
        matches!(err, StoreError::Gone { compacted, .. } if compacted == last),
        "{err:?}"
    );
    assert!(got < 1500);
    assert!(w.recv().await.is_none(), "Gone must be the last item");
}

/// One request's failed precondition does not fail the others committed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_in_a_batch_are_per_request() {
    let (store, _dir) = fresh().await;
    let base = store
        .create("/b/exists", Bytes::from_static(b"x"))
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                store.create("/b/exists", Bytes::from_static(b"y")).await
            } else {
                store.create(&format!("/b/{i}"), Bytes::from_static(b"y")).await
            }
        }));
    }
    let mut ok = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("task") {
            Ok(rev) => ok.push(rev),
            Err(StoreError::AlreadyExists { .. }) if i % 2 == 0 => {}
            other => panic!("request {i}: {other:?}"),
        }
    }
    ok.sort_unstable();
    let expected: Vec<u64> = (base + 1..=base + 32).collect();
    assert_eq!(ok, expected, "successful writes get consecutive revisions");
    assert_eq!(store.current_revision().await.expect("revision"), base + 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_deletion_with_last_value_after_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    let store = open(&path, options());
    let r0 = store.create("/k/0", Bytes::from_static(b"0")).await.expect("create");
    let r1 = store.create("/k/a", Bytes::from_static(b"1")).await.expect("create");
    let r2 = store.delete("/k/a", None).await.expect("delete");
    drop(store);
    let store = open(&path, options());
    let mut w = store.watch("/k/a", r0).await.expect("watch");
    assert!(matches!(next_change(&mut w).await, WatchEvent::Added(o) if o.mod_revision == r1));
    assert!(
        matches!(next_change(&mut w).await, WatchEvent::Deleted(o) if o.mod_revision == r2 && o.value == Bytes::from_static(b"1"))
    );
}

/// What redb held only in commits without an fsync is lost with the machine (here: the file is
/// put back as it was before the writes); the log brings every acknowledged write back, at its
/// revision, with its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_restores_writes_that_redb_had_not_made_durable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    let saved = dir.path().join("saved.redb");
    drop(open(&path, options()));
    std::fs::copy(&path, &saved).expect("save the empty file");
    let store = open(&path, options());
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                store
                    .create(&format!("/w/{w}/{i}"), Bytes::from(format!("{w}-{i}")))
                    .await
                    .expect("create");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    store
        .update("/w/0/0", Bytes::from_static(b"changed"), None)
        .await
        .expect("update");
    let deleted = store.delete("/w/1/1", None).await.expect("delete");
    store.compact(deleted - 10).await.expect("compact");
    let last = store.create("/w/last", Bytes::from_static(b"z")).await.expect("create");
    let before = store.list("/w/", Default::default()).await.expect("list");
    drop(store);
    std::fs::copy(&saved, &path).expect("lose redb's commits");
    let store = open(&path, options());
    assert_eq!(store.current_revision().await.expect("revision"), last);
    let after = store.list("/w/", Default::default()).await.expect("list");
    assert_eq!(after.items, before.items);
    assert_eq!(after.items.len(), 200);
    assert_eq!(
        store.get("/w/0/0").await.expect("get").map(|(v, _)| v),
        Some(Bytes::from_static(b"changed"))
    );
    // The compaction came back too: older revisions are gone, later ones replay.
    assert!(matches!(store.watch("/w/", 1).await, Err(StoreError::Gone { .. })));
    let mut w = store.watch("/w/1/1", deleted - 1).await.expect("watch");
    assert!(matches!(next_change(&mut w).await, WatchEvent::Deleted(o) if o.mod_revision == deleted));
    // Writes go on from there, and a second open finds the same.
    let next = store.create("/w/next", Bytes::from_static(b"n")).await.expect("create");
    assert_eq!(next, last + 1);
    drop(store);
    let store = open(&path, options());
    assert_eq!(store.current_revision().await.expect("revision"), next);
}

/// A small log fills again and again: each time redb commits durably (a checkpoint) and the log
/// starts over; a value larger than the whole log is committed durably at once. Nothing is lost
/// across the turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_is_a_checkpoint_and_nothing_is_lost() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    let small = || RedbOptions {
        log_size: 64 << 10,
        ..options()
    };
    let store = open(&path, small());
    let value = Bytes::from(vec![7u8; 9000]);
    for i in 0..100 {
        store.create(&format!("/f/{i}"), value.clone()).await.expect("create");
    }
    let huge = Bytes::from(vec![1u8; 200 << 10]);
    let last = store.create("/f/huge", huge.clone()).await.expect("create oversized");
    drop(store);
    let store = open(&path, small());
    assert_eq!(store.current_revision().await.expect("revision"), last);
    for i in 0..100 {
        assert_eq!(
            store.get(&format!("/f/{i}")).await.expect("get").map(|(v, _)| v),
            Some(value.clone())
        );
    }
    assert_eq!(store.get("/f/huge").await.expect("get").map(|(v, _)| v), Some(huge));
}

//! Crash durability of the redb store: a child process writes as fast as it can and prints
//! each acknowledged write; the parent SIGKILLs it mid-flight, reopens the file, and checks
//! that every acknowledged write is there and that revisions never go backwards.
#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_store::{RedbOptions, RedbStore, Store};
use bytes::Bytes;

/// Set (to the database path) in the child's environment.
const CHILD_ENV: &str = "BERTH_STORE_CRASH_CHILD";
const WRITERS: usize = 32;

/// The child: writes until killed (or 60 s at most). Each line is printed only after the
/// write was acknowledged: `create W I REV` or `update W I REV` (key `/crash/counter/W`
/// set to I).
#[test]
#[ignore = "child process of sigkill_keeps_acknowledged_writes, which runs it"]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = Arc::new(RedbStore::open(&path, RedbOptions::default()).expect("open"));
        let stop = Instant::now() + Duration::from_secs(60);
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                let counter = format!("/crash/counter/{w}");
                let _ = store.create(&counter, Bytes::from_static(b"0")).await;
                while Instant::now() < stop {
                    i += 1;
                    let key = format!("/crash/{w}/{}-{i}", std::process::id());
                    let rev = store.create(&key, Bytes::from(key.clone())).await.expect("create");
                    writeln!(std::io::stdout(), "create {w} {key} {rev}").expect("stdout");
                    if i.is_multiple_of(4) {
                        let rev = store
                            .update(&counter, Bytes::from(i.to_string()), None)
                            .await
                            .expect("update");
                        writeln!(std::io::stdout(), "update {w} {i} {rev}").expect("stdout");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
    });
}

#[derive(Default)]
struct Acks {
    creates: BTreeMap<String, u64>,
    /// Per writer: the last acknowledged counter value and its revision.
    counters: BTreeMap<usize, (u64, u64)>,
    max: u64,
}

fn run_child(path: &Path, min_acks: usize) -> Acks {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                // A line cut short by the kill was never acknowledged to anyone.
                Ok(n) if n > 0 && line.ends_with('\n') => {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
    });
    let mut acks = Acks::default();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while n < min_acks {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => n += usize::from(record(&line, &mut acks)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(e) => panic!("child stopped acknowledging after {n} writes: {e}"),
        }
    }
    // Mid-flight: 32 writers have requests queued and a batch is committing.
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    assert!(!status.success(), "the child must have been killed, not finished");
    reader.join().expect("reader");
    // Lines the child printed before it died are acknowledged writes too.
    for line in rx.try_iter() {
        record(&line, &mut acks);
    }
    acks
}

/// Records one line of the child's output; whether it was an acknowledgement.
fn record(line: &str, acks: &mut Acks) -> bool {
    let parts: Vec<&str> = line.split_whitespace().collect();
    match parts.as_slice() {
        ["create", _, key, rev] => {
            let rev: u64 = rev.parse().expect("revision");
            acks.creates.insert((*key).to_owned(), rev);
            acks.max = acks.max.max(rev);
            true
        }
        ["update", w, i, rev] => {
            let (w, i, rev): (usize, u64, u64) =
                (w.parse().expect("w"), i.parse().expect("i"), rev.parse().expect("rev"));
            let last = acks.counters.entry(w).or_default();
            assert!(rev > last.1, "writer {w}: update revision went backwards");
            *last = (i, rev);
            acks.max = acks.max.max(rev);
            true
        }
        _ => false, // libtest's own lines
    }
}

#[test]
fn sigkill_keeps_acknowledged_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut previous_max = 0;
    let mut all_creates = BTreeMap::new();
    for round in 0..3 {
        let acks = run_child(&path, 3000);
        assert!(
            acks.max > previous_max,
            "round {round}: revisions went backwards ({} <= {previous_max})",
            acks.max
        );
        all_creates.extend(acks.creates.clone());
        rt.block_on(async {
            let store = RedbStore::open(&path, RedbOptions::default()).expect("reopen after SIGKILL");
            let current = store.current_revision().await.expect("revision");
            assert!(
                current >= acks.max,
                "round {round}: store at {current}, acked {}",
                acks.max
            );
            for (key, rev) in &all_creates {
                let got = store.get(key).await.expect("get");
                assert_eq!(
                    got,
                    Some((Bytes::from(key.clone()), *rev)),
                    "round {round}: acknowledged create of {key} at {rev}"
                );
            }
            for (w, (i, rev)) in &acks.counters {
                let (value, got_rev) = store
                    .get(&format!("/crash/counter/{w}"))
                    .await
                    .expect("get")
                    .expect("counter present");
                let value: u64 = std::str::from_utf8(&value).expect("utf8").parse().expect("number");
                assert!(
                    value >= *i && got_rev >= *rev,
                    "round {round}: counter {w} at {value}@{got_rev}, acked {i}@{rev}"
                );
            }
            let next = store
                .create(&format!("/crash/after/{round}"), Bytes::from_static(b"x"))
                .await
                .expect("write after reopen");
            assert!(
                next > acks.max,
                "round {round}: new revision {next} <= acked {}",
                acks.max
            );
            previous_max = next;
            eprintln!(
                "round {round}: {} acknowledged writes survived SIGKILL; store at revision {current}",
                acks.creates.len() + acks.counters.len()
            );
        });
    }
}

//! Write throughput of the store backends: N creates (default 10,000; `BENCH_WRITES`), once
//! sequentially and once from 64 concurrent writers, each durable before it is acknowledged.
//! `cargo bench -p berth-store --bench writes [-- redb|etcd]`. The database goes under
//! `BENCH_DIR` (default: the system temp dir). etcd runs when its binary is installed.

#![allow(clippy::expect_used)] // a benchmark: a failed write is a failed run

use std::sync::Arc;
use std::time::Instant;

use berth_store::{RedbOptions, RedbStore, Store};
use bytes::Bytes;

const CONCURRENCY: usize = 64;

fn value(i: usize) -> Bytes {
    // About the size of a PersistentVolume's JSON.
    Bytes::from(format!(
        r#"{{"apiVersion":"v1","kind":"PersistentVolume","metadata":{{"name":"pv-{i:06}","labels":{{"bench":"yes"}}}},"spec":{{"capacity":{{"storage":"10Gi"}},"accessModes":["ReadWriteOnce"],"persistentVolumeReclaimPolicy":"Delete","storageClassName":"standard","csi":{{"driver":"berth.io","volumeHandle":"vol-{i:06}"}}}}}}"#
    ))
}

async fn sequential(store: &dyn Store, n: usize) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        store
            .create(&format!("/core/persistentvolumes/seq-{i:06}"), value(i))
            .await
            .expect("create");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn concurrent(store: Arc<dyn Store>, n: usize) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                store
                    .create(&format!("/core/persistentvolumes/con-{i:06}"), value(i))
                    .await
                    .expect("create");
                i += CONCURRENCY;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn run(name: &str, store: Arc<dyn Store>, n: usize) {
    let seq = sequential(&*store, n).await;
    println!("{name:5} sequential      {n} creates: {seq:>8.0} writes/s");
    let con = concurrent(Arc::clone(&store), n).await;
    println!("{name:5} {CONCURRENCY} concurrent   {n} creates: {con:>8.0} writes/s");
}

fn main() {
    let n: usize = std::env::var("BENCH_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted = |b: &str| only.is_empty() || only.iter().any(|o| o == b);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        if wanted("redb") {
            let dir = match std::env::var_os("BENCH_DIR") {
                Some(d) => tempfile::tempdir_in(d),
                None => tempfile::tempdir(),
            }
            .expect("temp dir");
            let store: Arc<dyn Store> =
                Arc::new(RedbStore::open(dir.path().join("bench.redb"), RedbOptions::default()).expect("open"));
            run("redb", store, n).await;
        }
        #[cfg(feature = "etcd")]
        if wanted("etcd") {
            match berth_store::etcd_server::EtcdServer::start().await {
                Ok(server) => {
                    let store: Arc<dyn Store> = Arc::new(server.store().await.expect("connect"));
                    run("etcd", store, n).await;
                }
                Err(e) => println!("etcd  skipped: {e}"),
            }
        }
    });
}

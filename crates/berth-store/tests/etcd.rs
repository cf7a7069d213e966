//! The conformance suite against a real etcd (Debian's `etcd-server`), one server per test.
//! A missing etcd binary fails these tests: CI installs it (scripts/ci-install.sh).
#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test
#![cfg(feature = "etcd")]

use std::sync::Arc;

use berth_store::Store;
use berth_store::etcd_server::EtcdServer;

async fn fresh() -> (Arc<dyn Store>, EtcdServer) {
    let server = EtcdServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot run the etcd conformance tests: {e}"));
    let store = server.store().await.expect("connect to etcd");
    (Arc::new(store), server)
}

berth_store::conformance_tests!(fresh);

/// Every acknowledged write survives SIGKILL of etcd and a restart on the same data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_across_etcd_crash() {
    let (store, mut server) = fresh().await;
    let server = &mut server;
    berth_store::conformance::durable_across_reopen(store, move |store| async move {
        drop(store);
        server.crash_and_restart().await.expect("restart etcd on its data dir");
        let store: Arc<dyn Store> = Arc::new(server.store().await.expect("reconnect"));
        store
    })
    .await;
}

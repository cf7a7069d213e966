//! Durability of `berth server` (issue 4, must-show 3): SIGKILL the real binary while clients
//! are writing; after a restart on the same data dir every acknowledged write is present with
//! the resourceVersion it was acknowledged with, and resourceVersions never go backwards.
//! Needs no root: only the API server runs.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The API alone: the PV controller would move the new PVs to Available, changing the
/// resourceVersions this test checks; it is about the store's durability.
/// The server child, killed when dropped: a failing assertion must not leave it running (it
/// holds the test's stderr, and with it the pipe CI reads).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(data: &Path) -> Server {
    let _ = std::fs::remove_file(data.join("admin.kubeconfig"));
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "server",
            "--api-only",
            "--no-controllers",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data)
        .env("BERTH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(Server)
        .unwrap()
}

/// A client once the server answers.
async fn connect(data: &Path) -> kube::Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "berth server did not come up");
        if let Ok(kc) = Kubeconfig::read_from(data.join("admin.kubeconfig"))
            && let Ok(config) = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await
            && let Ok(client) = kube::Client::try_from(config)
            && client.apiserver_version().await.is_ok()
        {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pv(name: &str) -> PersistentVolume {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": name },
        "spec": { "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"], "hostPath": { "path": "/srv/x" } },
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // name -> resourceVersion it was acknowledged with.
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut floor = 0u64;

    for round in 0..3 {
        let mut child = start(&data);
        let client = connect(&data).await;
        let pvs: Api<PersistentVolume> = Api::all(client);

        // After a restart: everything acknowledged is there, unchanged, and nothing went back.
        let list = pvs.list(&ListParams::default()).await.unwrap();
        let list_rv: u64 = list.metadata.resource_version.as_deref().unwrap().parse().unwrap();
        assert!(
            list_rv >= floor,
            "round {round}: list resourceVersion {list_rv} < {floor} before the kill"
        );
        let present: BTreeMap<String, u64> = list
            .items
            .iter()
            .map(|p| {
                (
                    p.metadata.name.clone().unwrap(),
                    p.metadata.resource_version.as_deref().unwrap().parse().unwrap(),
                )
            })
            .collect();
        for (name, rv) in acked.lock().unwrap().iter() {
            assert_eq!(
                present.get(name),
                Some(rv),
                "round {round}: acknowledged {name}@{rv} lost or changed"
            );
        }

        // Writers: 16 at a time; kill the server while they run.
        let mut writers = Vec::new();
        for w in 0..16 {
            let pvs = pvs.clone();
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let name = format!("r{round}-w{w}-{i}");
                    match pvs.create(&PostParams::default(), &pv(&name)).await {
                        Ok(created) => {
                            let rv = created.metadata.resource_version.unwrap().parse().unwrap();
                            acked.lock().unwrap().insert(name, rv);
                        }
                        Err(_) => return, // the server is gone
                    }
                }
            }));
        }
        let start = Instant::now();
        while acked.lock().unwrap().len() < (round + 1) * 300 && start.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        for w in writers {
            let _ = w.await;
        }
        floor = acked.lock().unwrap().values().copied().max().unwrap_or(0);
        assert!(
            acked.lock().unwrap().len() >= (round + 1) * 300,
            "writes were too slow to test anything"
        );
    }

    // One more start: the last round's writes are there too, and a new write goes forward.
    let mut child = start(&data);
    let pvs: Api<PersistentVolume> = Api::all(connect(&data).await);
    let list = pvs.list(&ListParams::default()).await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(list.items.len() >= acked.len());
    for (name, rv) in &acked {
        let got = pvs.get(name).await.unwrap();
        assert_eq!(
            got.metadata.resource_version.unwrap().parse::<u64>().unwrap(),
            *rv,
            "{name}"
        );
    }
    let next = pvs
        .create(&PostParams::default(), &pv("after-the-crashes"))
        .await
        .unwrap();
    let next_rv: u64 = next.metadata.resource_version.unwrap().parse().unwrap();
    assert!(
        next_rv > floor,
        "a write after restart got {next_rv}, not above {floor}"
    );
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}

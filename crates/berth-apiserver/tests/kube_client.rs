//! The Kubernetes Rust client (kube-rs) against an in-process Berth API server, over real TLS
//! with the admin kubeconfig `berth server` writes: create, get, list with limit/continue,
//! watch, update with optimistic concurrency, the status subresource, patch, and delete with
//! a finalizer.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

mod common;

use common::TestServer;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

async fn client(server: &TestServer) -> kube::Client {
    let kc = Kubeconfig::read_from(server.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn pv(name: &str, size: &str) -> PersistentVolume {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": { "name": name, "labels": { "tier": "fast" } },
        "spec": {
            "capacity": { "storage": size },
            "accessModes": ["ReadWriteOnce"],
            "hostPath": { "path": format!("/srv/{name}") },
        },
    }))
    .unwrap()
}

fn pvc(name: &str) -> PersistentVolumeClaim {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": { "name": name },
        "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "1Gi" } } },
    }))
    .unwrap()
}

fn api_error(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn create_get_list_update_and_conflict() {
    let server = TestServer::start().await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client(&server).await);

    let created = pvs.create(&PostParams::default(), &pv("pv-a", "1Gi")).await.unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.name.as_deref(), Some("pv-a"));
    assert_eq!(meta.uid.as_ref().map(String::len), Some(36));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    let rv1: u64 = meta.resource_version.as_deref().unwrap().parse().unwrap();

    let e = pvs
        .create(&PostParams::default(), &pv("pv-a", "1Gi"))
        .await
        .unwrap_err();
    assert_eq!(
        api_error(e),
        (
            409,
            "AlreadyExists".into(),
            "persistentvolumes \"pv-a\" already exists".into()
        )
    );

    let got = pvs.get("pv-a").await.unwrap();
    assert_eq!(got.metadata.uid, created.metadata.uid);
    assert_eq!(
        got.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"].0,
        "1Gi"
    );

    for i in 0..5 {
        pvs.create(&PostParams::default(), &pv(&format!("pv-page-{i}"), "2Gi"))
            .await
            .unwrap();
    }
    // Pages of 2 with opaque continue tokens; together they are the whole list, once each.
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut lp = ListParams::default().limit(2);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = pvs.list(&lp).await.unwrap();
        assert!(page.items.len() <= 2);
        pages += 1;
        names.extend(page.items.iter().map(|p| p.metadata.name.clone().unwrap()));
        token = page.metadata.continue_.filter(|c| !c.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 6);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");

    // Update with the current resourceVersion; then again with the stale one: 409.
    let mut changed = got.clone();
    changed.spec.as_mut().unwrap().capacity.as_mut().unwrap().insert(
        "storage".into(),
        k8s_openapi::apimachinery::pkg::api::resource::Quantity("2Gi".into()),
    );
    let updated = pvs.replace("pv-a", &PostParams::default(), &changed).await.unwrap();
    let rv2: u64 = updated.metadata.resource_version.as_deref().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    assert_eq!(updated.metadata.generation, Some(2), "a spec change bumps generation");
    assert_eq!(updated.metadata.uid, created.metadata.uid, "uid is the server's");
    let e = pvs.replace("pv-a", &PostParams::default(), &changed).await.unwrap_err();
    assert_eq!(
        api_error(e),
        (
            409,
            "Conflict".into(),
            "Operation cannot be fulfilled on persistentvolumes \"pv-a\": the object has been modified; please apply your changes to the latest version and try again".into()
        )
    );

    let e = pvs.get("nope").await.unwrap_err();
    assert_eq!(
        api_error(e),
        (404, "NotFound".into(), "persistentvolumes \"nope\" not found".into())
    );
}

#[tokio::test]
async fn status_subresource_and_main_resource_ignore_each_other() {
    let server = TestServer::start().await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client(&server).await);
    let created = pvs.create(&PostParams::default(), &pv("pv-s", "1Gi")).await.unwrap();

    let mut with_status = created.clone();
    with_status.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
        phase: Some("Available".into()),
        ..Default::default()
    });
    // A main-resource write does not change status...
    let after_main = pvs.replace("pv-s", &PostParams::default(), &with_status).await.unwrap();
    assert_ne!(
        after_main.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Available")
    );
    // ...the status subresource does, and leaves spec alone.
    let mut status_write = after_main.clone();
    status_write.status = with_status.status.clone();
    status_write.spec.as_mut().unwrap().capacity.as_mut().unwrap().insert(
        "storage".into(),
        k8s_openapi::apimachinery::pkg::api::resource::Quantity("9Gi".into()),
    );
    let after_status = pvs
        .replace_status("pv-s", &PostParams::default(), &status_write)
        .await
        .unwrap();
    assert_eq!(
        after_status.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Available")
    );
    assert_eq!(
        after_status.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"].0,
        "1Gi"
    );
}

#[tokio::test]
async fn claims_in_namespaces_watch_and_finalizers() {
    let server = TestServer::start().await.unwrap();
    let client = client(&server).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let all_claims: Api<PersistentVolumeClaim> = Api::all(client.clone());

    let first = claims.create(&PostParams::default(), &pvc("data-0")).await.unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();

    // A watch from the create's revision sees the next create, an update and the deletion, in
    // order. Admission may add the pvc-protection finalizer, which holds the claim Terminating
    // until an update empties its finalizers (nothing here uses the claim).
    let mut events = claims.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    claims.create(&PostParams::default(), &pvc("data-1")).await.unwrap();
    let mut c = claims.get("data-1").await.unwrap();
    c.metadata.labels = Some([("watched".to_owned(), "yes".to_owned())].into());
    claims.replace("data-1", &PostParams::default(), &c).await.unwrap();
    claims.delete("data-1", &DeleteParams::default()).await.unwrap();
    if let Ok(mut held) = claims.get("data-1").await {
        assert!(
            held.metadata.deletion_timestamp.is_some(),
            "still there, so Terminating"
        );
        held.metadata.finalizers = Some(Vec::new());
        claims.replace("data-1", &PostParams::default(), &held).await.unwrap();
    }
    let mut seen: Vec<String> = Vec::new();
    while seen.last().is_none_or(|s| !s.starts_with("DELETED")) {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(10), events.try_next())
            .await
            .expect("watch event within 10 s")
            .unwrap()
            .unwrap();
        match ev {
            WatchEvent::Added(c) => seen.push(format!("ADDED {}", c.metadata.name.unwrap())),
            WatchEvent::Modified(c) => seen.push(format!("MODIFIED {}", c.metadata.name.unwrap())),
            WatchEvent::Deleted(c) => seen.push(format!("DELETED {}", c.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen.first().map(String::as_str), Some("ADDED data-1"), "{seen:?}");
    assert_eq!(seen.get(1).map(String::as_str), Some("MODIFIED data-1"), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("DELETED data-1"), "{seen:?}");
    assert!(seen.len() <= 4, "{seen:?}");

    // A watch from "0" starts with the current objects.
    let mut from_zero = all_claims.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    match tokio::time::timeout(std::time::Duration::from_secs(10), from_zero.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Added(c) => assert_eq!(c.metadata.name.as_deref(), Some("data-0")),
        other => panic!("unexpected {other:?}"),
    }

    // The cross-namespace list; and a namespace that does not exist.
    assert_eq!(all_claims.list(&ListParams::default()).await.unwrap().items.len(), 1);
    let nowhere: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "nowhere");
    let e = nowhere.create(&PostParams::default(), &pvc("x")).await.unwrap_err();
    assert_eq!(
        api_error(e),
        (404, "NotFound".into(), "namespaces \"nowhere\" not found".into())
    );

    // generateName.
    let mut generated = pvc("");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let g = claims.create(&PostParams::default(), &generated).await.unwrap();
    let name = g.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    // Delete with a finalizer: Terminating until an update empties the finalizers.
    let mut held = pvc("held");
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    claims.create(&PostParams::default(), &held).await.unwrap();
    let answer = claims.delete("held", &DeleteParams::default()).await.unwrap();
    let terminating = answer.left().expect("a held object comes back, not a Status");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(0));
    let mut still = claims.get("held").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());
    still.metadata.finalizers = Some(Vec::new());
    claims.replace("held", &PostParams::default(), &still).await.unwrap();
    assert_eq!(api_error(claims.get("held").await.unwrap_err()).0, 404);
}

/// PATCH goes through `berth_api::patch::apply`: these assertions hold once the berth-api
/// branch (with its patch implementation) is merged; before, patches are no-ops.
#[tokio::test]
async fn patches_merge_and_strategic() {
    let server = TestServer::start().await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client(&server).await);
    pvs.create(&PostParams::default(), &pv("pv-p", "1Gi")).await.unwrap();
    let merged = pvs
        .patch(
            "pv-p",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"m": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.metadata.labels.as_ref().unwrap()["m"], "1");
    let strategic = pvs
        .patch(
            "pv-p",
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({"spec": {"accessModes": ["ReadWriteMany"]}})),
        )
        .await
        .unwrap();
    assert_eq!(
        strategic.spec.unwrap().access_modes.unwrap(),
        vec!["ReadWriteMany".to_owned()]
    );
    let e = pvs
        .patch("nope", &PatchParams::default(), &Patch::Merge(serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(api_error(e).0, 404);
}

/// The same API over the etcd backend (Debian's etcd-server, as the store's own tests use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backend_serves_the_same_api() {
    let etcd = berth_store::etcd_server::EtcdServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot run the etcd API test: {e}"));
    let store = std::sync::Arc::new(etcd.store().await.unwrap());
    let server = TestServer::start_on(tempfile::tempdir().unwrap(), store).await.unwrap();
    let client = client(&server).await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let created = pvs.create(&PostParams::default(), &pv("pv-etcd", "1Gi")).await.unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    let mut events = pvs.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    let mut stale = created.clone();
    stale.metadata.labels = Some([("a".to_owned(), "b".to_owned())].into());
    pvs.replace("pv-etcd", &PostParams::default(), &stale).await.unwrap();
    assert_eq!(
        api_error(
            pvs.replace("pv-etcd", &PostParams::default(), &stale)
                .await
                .unwrap_err()
        )
        .0,
        409
    );
    match tokio::time::timeout(std::time::Duration::from_secs(10), events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Modified(p) => assert_eq!(p.metadata.labels.unwrap()["a"], "b"),
        other => panic!("unexpected {other:?}"),
    }
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    assert_eq!(namespaces.list(&ListParams::default()).await.unwrap().items.len(), 3);
}

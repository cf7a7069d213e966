//! Bad input over real HTTPS: every case gets a 4xx `Status` with a message that says what is
//! wrong, never a 5xx, and the server keeps serving.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

mod common;

use common::{TestServer, raw};
use serde_json::{Value, json};

const PVS: &str = "/api/v1/persistentvolumes";

fn pv_body(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": { "name": name },
        "spec": { "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"], "hostPath": { "path": "/srv/x" } },
    })
}

async fn status_of(
    server: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Value, hyper::HeaderMap) {
    let token = server.admin_token.clone();
    let (code, h, b) = raw(server, method, path, Some(&token), headers, body).await.unwrap();
    let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
    (code, v, h)
}

/// A 4xx Status with this code and reason whose message contains `needle`.
fn assert_status(got: &(u16, Value, hyper::HeaderMap), code: u16, reason: &str, needle: &str) {
    let (c, v, _) = got;
    assert_eq!(*c, code, "{v}");
    assert_eq!(v["kind"], "Status", "{v}");
    assert_eq!(v["status"], "Failure", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["reason"], reason, "{v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "message {msg:?} should contain {needle:?}");
}

const JSON: (&str, &str) = ("content-type", "application/json");
const YAML: (&str, &str) = ("content-type", "application/yaml");

#[tokio::test]
async fn malformed_wrong_unknown_huge_and_invalid_bodies_get_4xx() {
    let s = TestServer::start().await.unwrap();

    let r = status_of(&s, "POST", PVS, &[JSON], b"{\"apiVersion\": \"v1\", \"kind\":".to_vec()).await;
    assert_status(&r, 400, "BadRequest", "not valid JSON");
    let r = status_of(
        &s,
        "POST",
        PVS,
        &[YAML],
        b"apiVersion: v1\nkind: [PersistentVolume\n".to_vec(),
    )
    .await;
    assert_status(&r, 400, "BadRequest", "not valid YAML");
    let r = status_of(&s, "POST", PVS, &[("content-type", "text/plain")], b"hello".to_vec()).await;
    assert_status(&r, 415, "UnsupportedMediaType", "application/json");

    // A StorageClass posted where PersistentVolumes live.
    let sc = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "x"}, "provisioner": "p"});
    let r = status_of(&s, "POST", PVS, &[JSON], serde_json::to_vec(&sc).unwrap()).await;
    assert_status(&r, 400, "BadRequest", "API version in the data (storage.k8s.io/v1)");
    let mut wrong_kind = pv_body("x");
    wrong_kind["kind"] = json!("Secret");
    let r = status_of(&s, "POST", PVS, &[JSON], serde_json::to_vec(&wrong_kind).unwrap()).await;
    assert_status(&r, 400, "BadRequest", "kind in the data (Secret)");
    let mut wrong_type = pv_body("x");
    wrong_type["spec"]["accessModes"] = json!("ReadWriteOnce");
    let r = status_of(&s, "POST", PVS, &[JSON], serde_json::to_vec(&wrong_type).unwrap()).await;
    assert_status(&r, 400, "BadRequest", "cannot be handled as a PersistentVolume");

    // Unknown fields: dropped with a Warning header by default, refused under Strict.
    let mut unknown = pv_body("pv-unknown");
    unknown["spec"]["colour"] = json!("blue");
    let body = serde_json::to_vec(&unknown).unwrap();
    let r = status_of(
        &s,
        "POST",
        &format!("{PVS}?fieldValidation=Strict"),
        &[JSON],
        body.clone(),
    )
    .await;
    assert_status(&r, 400, "BadRequest", "unknown field \"spec.colour\"");
    let (code, v, h) = status_of(&s, "POST", PVS, &[JSON], body).await;
    assert_eq!(code, 201, "{v}");
    assert!(v["spec"].get("colour").is_none());
    let warning = h.get("warning").unwrap().to_str().unwrap();
    assert_eq!(warning, "299 - \"unknown field \\\"spec.colour\\\"\"");

    // Names: invalid, missing, and a body that names another object than the URL.
    for bad in ["Bad_Name", "a/b", "..", "-x", &"n".repeat(300)] {
        let r = status_of(&s, "POST", PVS, &[JSON], serde_json::to_vec(&pv_body(bad)).unwrap()).await;
        assert_status(&r, 422, "Invalid", "metadata.name: Invalid value");
        assert_eq!(r.1["details"]["causes"][0]["field"], "metadata.name");
    }
    let mut nameless = pv_body("x");
    nameless["metadata"] = json!({});
    let r = status_of(&s, "POST", PVS, &[JSON], serde_json::to_vec(&nameless).unwrap()).await;
    assert_status(&r, 422, "Invalid", "name or generateName is required");
    let r = status_of(
        &s,
        "PUT",
        &format!("{PVS}/other"),
        &[JSON],
        serde_json::to_vec(&pv_body("pv-unknown")).unwrap(),
    )
    .await;
    assert_status(&r, 400, "BadRequest", "does not match the name on the URL");

    // Over 3 MiB: 413.
    let mut huge = pv_body("huge");
    huge["metadata"]["annotations"] = json!({ "a": "x".repeat(4 << 20) });
    let r = status_of(&s, "POST", PVS, &[JSON], serde_json::to_vec(&huge).unwrap()).await;
    assert_status(&r, 413, "RequestEntityTooLarge", "limit");

    // Patches: an unknown patch type, and a server-side apply (not served).
    let r = status_of(&s, "PATCH", &format!("{PVS}/pv-unknown"), &[JSON], b"{}".to_vec()).await;
    assert_status(&r, 415, "UnsupportedMediaType", "merge-patch");
    let r = status_of(
        &s,
        "PATCH",
        &format!("{PVS}/pv-unknown"),
        &[("content-type", "application/apply-patch+yaml")],
        b"{}".to_vec(),
    )
    .await;
    assert_status(&r, 415, "UnsupportedMediaType", "apply-patch");

    // Queries and paths.
    let r = status_of(&s, "GET", &format!("{PVS}?limit=many"), &[], vec![]).await;
    assert_status(&r, 400, "BadRequest", "limit");
    let r = status_of(&s, "GET", &format!("{PVS}?watch=1&resourceVersion=abc"), &[], vec![]).await;
    assert_status(&r, 400, "BadRequest", "resourceVersion");
    let r = status_of(&s, "GET", &format!("{PVS}?continue=zz"), &[], vec![]).await;
    assert_status(&r, 400, "BadRequest", "continue");
    let r = status_of(&s, "GET", "/api/v1/widgets", &[], vec![]).await;
    assert_status(&r, 404, "NotFound", "could not find the requested resource");
    let r = status_of(&s, "GET", "/api/v1/namespaces/default/persistentvolumes", &[], vec![]).await;
    assert_status(&r, 404, "NotFound", "");
    let r = status_of(&s, "POST", "/api", &[JSON], b"{}".to_vec()).await;
    assert_status(&r, 405, "MethodNotAllowed", "POST");
    let r = status_of(&s, "DELETE", &format!("{PVS}/pv-unknown"), &[JSON], b"[1,2]".to_vec()).await;
    assert_status(&r, 400, "BadRequest", "DeleteOptions");

    // Still serving.
    let (code, _, _) = status_of(&s, "GET", &format!("{PVS}/pv-unknown"), &[], vec![]).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn tokens_401_and_read_only_403() {
    let s = TestServer::start().await.unwrap();
    let (code, _, b) = raw(&s, "GET", PVS, None, &[], vec![]).await.unwrap();
    assert_eq!(code, 401);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (v["reason"].as_str(), v["code"].as_u64()),
        (Some("Unauthorized"), Some(401))
    );
    let (code, _, _) = raw(&s, "GET", PVS, Some("not-a-token"), &[], vec![]).await.unwrap();
    assert_eq!(code, 401);
    let (code, _, _) = raw(&s, "GET", "/healthz", None, &[], vec![]).await.unwrap();
    assert_eq!(code, 200, "health needs no token");

    let ro = s.readonly_token.clone();
    let (code, _, _) = raw(&s, "GET", PVS, Some(&ro), &[], vec![]).await.unwrap();
    assert_eq!(code, 200);
    let (code, _, b) = raw(
        &s,
        "POST",
        PVS,
        Some(&ro),
        &[JSON],
        serde_json::to_vec(&pv_body("x")).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(code, 403);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["reason"], "Forbidden");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("cannot create resource \"persistentvolumes\""),
        "{v}"
    );
}

/// Random bodies, content types and paths: 4xx or success, never 5xx; the server survives.
#[tokio::test]
async fn random_requests_never_5xx() {
    let s = TestServer::start().await.unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let paths = [
        "/api/v1/persistentvolumes",
        "/api/v1/namespaces/default/persistentvolumeclaims",
        "/apis/storage.k8s.io/v1/storageclasses",
        "/api/v1/namespaces/default/pods",
        "/apis/snapshot.storage.k8s.io/v1/namespaces/default/volumesnapshots",
    ];
    let cts = [
        "application/json",
        "application/yaml",
        "application/merge-patch+json",
        "application/json-patch+json",
    ];
    let seeds: [&[u8]; 4] = [
        br#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"a"},"spec":{}}"#,
        b"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i}]}\n",
        br#"{"apiVersion":"snapshot.storage.k8s.io/v1","kind":"VolumeSnapshot","metadata":{"name":"s"}}"#,
        b"&a [*a, *a]",
    ];
    for _ in 0..300 {
        let path = paths[(next() % paths.len() as u64) as usize];
        let ct = cts[(next() % cts.len() as u64) as usize];
        let mut body = seeds[(next() % seeds.len() as u64) as usize].to_vec();
        // Flip, drop or insert a few bytes.
        for _ in 0..(next() % 4) {
            if body.is_empty() {
                break;
            }
            let i = (next() % body.len() as u64) as usize;
            match next() % 3 {
                0 => body[i] = next() as u8,
                1 => {
                    body.remove(i);
                }
                _ => body.insert(i, next() as u8),
            }
        }
        let (method, path) = match next() % 3 {
            0 => ("POST", path.to_owned()),
            1 => ("PUT", format!("{path}/a")),
            _ => ("PATCH", format!("{path}/a")),
        };
        let token = s.admin_token.clone();
        let (code, _, b) = raw(&s, method, &path, Some(&token), &[("content-type", ct)], body.clone())
            .await
            .unwrap();
        assert!(
            code < 500,
            "{method} {path} {ct} {:?} -> {code} {}",
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&b)
        );
    }
    let token = s.admin_token.clone();
    let (code, _, _) = raw(&s, "GET", "/api/v1/persistentvolumes", Some(&token), &[], vec![])
        .await
        .unwrap();
    assert_eq!(code, 200);
}

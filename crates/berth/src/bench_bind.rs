//! `berth bench bind`: how fast the controllers bind pre-created PV/PVC pairs.
//!
//! 1. Starts `berth server --api-only --no-controllers` on a fresh data dir and creates
//!    `--pairs` PVs and as many claims (1Gi, RWO, class `bench`; with `--prebound` each PV names
//!    its claim and each claim its PV, as Kubernetes' own benchmark does; otherwise the binder
//!    matches them), then kills it.
//! 2. Starts it again with the controllers and watches the claims, from the revision the fill
//!    ended at, until every one is Bound. Time-to-bound is measured from that start, so it
//!    includes the server's start and the informers' first list.
//! 3. Checks the result through the API: every volume Bound, to distinct claims, and each
//!    claim's `volumeName` naming a volume whose claimRef names it back.
//!
//! Prints figures; asserts nothing beyond the check in 3. Removes its data dir at the end.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::BodyExt as _;

use crate::bench_api::{create_many, histogram, micros, ms, rss_kib, start_server_with, target};

#[derive(Debug, clap::Args)]
pub struct BindArgs {
    /// PV/PVC pairs (default 10000; 300 with --smoke).
    #[arg(long)]
    pairs: Option<usize>,
    /// Pre-bind each pair (PV claimRef and claim volumeName), as Kubernetes' benchmark does.
    #[arg(long)]
    prebound: bool,
    /// Concurrent writers while filling.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Small numbers, for CI.
    #[arg(long)]
    smoke: bool,
    /// Instead of pairs: this many claims of a class provisioned by Berth's own driver
    /// (`kind: dir`), created while the all-in-one server runs (needs root).
    #[arg(long)]
    dynamic: Option<usize>,
}

fn pv_body(name: &str, prebound: bool) -> Vec<u8> {
    let i = name.trim_start_matches("bp-");
    let mut v = serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": name },
        "spec": { "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "bench",
                  "hostPath": { "path": format!("/srv/bench/{name}") } },
    });
    if prebound {
        v["spec"]["claimRef"] = serde_json::json!({"namespace": "default", "name": format!("bc-{i}")});
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

fn pvc_body(name: &str, prebound: bool) -> Vec<u8> {
    let i = name.trim_start_matches("bc-");
    let mut v = serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": { "name": name },
        "spec": { "accessModes": ["ReadWriteOnce"], "storageClassName": "bench",
                  "resources": { "requests": { "storage": "1Gi" } } },
    });
    if prebound {
        v["spec"]["volumeName"] = serde_json::json!(format!("bp-{i}"));
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

pub fn run(args: BindArgs) -> Result<()> {
    if let Some(n) = args.dynamic {
        return run_dynamic(&args, if args.smoke { n.min(100) } else { n });
    }
    let pairs = args.pairs.unwrap_or(if args.smoke { 300 } else { 10_000 });
    let work = tempfile::Builder::new()
        .prefix("berth-bench-bind.")
        .tempdir_in("/var/tmp")?;
    let data = work.path().join("data");
    let runtime = tokio::runtime::Runtime::new()?;
    println!("berth bench bind: {}", crate::bench::machine_line());
    let mode = if args.prebound {
        "pre-bound"
    } else {
        "matched by the binder"
    };
    println!("{pairs} PV/PVC pairs, {mode}");
    runtime.block_on(async {
        // 1. Fill without controllers.
        let filled_at = {
            let server = start_server_with(&data, &["--api-only", "--no-controllers"])?;
            let t = target(&data).await?;
            let (pv_time, _) = if args.prebound {
                create_many(
                    &t,
                    "/api/v1/persistentvolumes",
                    "bp-",
                    pairs,
                    args.concurrency,
                    |n| pv_body(n, true),
                    None,
                )
                .await?
            } else {
                create_many(
                    &t,
                    "/api/v1/persistentvolumes",
                    "bp-",
                    pairs,
                    args.concurrency,
                    |n| pv_body(n, false),
                    None,
                )
                .await?
            };
            let (pvc_time, _) = if args.prebound {
                create_many(
                    &t,
                    "/api/v1/namespaces/default/persistentvolumeclaims",
                    "bc-",
                    pairs,
                    args.concurrency,
                    |n| pvc_body(n, true),
                    None,
                )
                .await?
            } else {
                create_many(
                    &t,
                    "/api/v1/namespaces/default/persistentvolumeclaims",
                    "bc-",
                    pairs,
                    args.concurrency,
                    |n| pvc_body(n, false),
                    None,
                )
                .await?
            };
            // The controllers' watch starts after the fill: no initial event per claim to send and
            // parse while the server binds, and no Bound event can come before this revision.
            let (code, list) = conn_get(&t, "/api/v1/persistentvolumeclaims?limit=1").await?;
            let filled_at = list["metadata"]["resourceVersion"].as_str().unwrap_or("").to_owned();
            if code != 200 || filled_at.is_empty() {
                bail!("reading the revision after the fill: HTTP {code}");
            }
            println!(
                "filled in {:.1} s (PVs {:.1} s, claims {:.1} s), controllers off",
                (pv_time + pvc_time).as_secs_f64(),
                pv_time.as_secs_f64(),
                pvc_time.as_secs_f64()
            );
            server.stop()?;
            filled_at
        };
        // The next start writes a kubeconfig with its own port.
        let _ = std::fs::remove_file(data.join("admin.kubeconfig"));

        // 2. Start with controllers; watch until every claim is Bound.
        let started = Instant::now();
        let server = start_server_with(&data, &["--api-only"])?;
        let pid = server.child.id();
        let t = target(&data).await?;
        let up = started.elapsed();
        let left = Duration::from_secs(args.timeout).saturating_sub(started.elapsed());
        let bound: HashMap<String, Duration> = watch_bound(&t, &filled_at, pairs, left)
            .await?
            .into_iter()
            .map(|(name, at)| (name, at.saturating_duration_since(started)))
            .collect();
        let mut h = histogram()?;
        for d in bound.values() {
            h.saturating_record(micros(*d));
        }
        let first = bound.values().min().copied().unwrap_or_default();
        let last = bound.values().max().copied().unwrap_or_default();
        let binding = last.saturating_sub(first).as_secs_f64().max(1e-6);
        println!(
            "server up (API answering) after {:.2} s; first claim Bound after {:.2} s",
            up.as_secs_f64(),
            first.as_secs_f64()
        );
        println!(
            "all {pairs} Bound after {:.2} s: {:.0} binds/s overall, {:.0} binds/s from the first bind to the last",
            last.as_secs_f64(),
            pairs as f64 / last.as_secs_f64().max(1e-6),
            pairs as f64 / binding
        );
        print_latency_and_rss("time to Bound from the server's start", &h, pid, pairs)?;

        // 3. Check the bindings.
        let (code, pvs) = conn_get(&t, "/api/v1/persistentvolumes").await?;
        let (code2, pvcs) = conn_get(&t, "/api/v1/persistentvolumeclaims").await?;
        if code != 200 || code2 != 200 {
            bail!("listing for the check: HTTP {code}/{code2}");
        }
        let mut claimed = HashSet::new();
        let mut refs = HashMap::new();
        for pv in pvs["items"].as_array().into_iter().flatten() {
            if pv["status"]["phase"] != "Bound" {
                bail!("{} is {}, not Bound", pv["metadata"]["name"], pv["status"]["phase"]);
            }
            let claim = pv["spec"]["claimRef"]["name"].as_str().unwrap_or("").to_owned();
            if !claimed.insert(claim.clone()) {
                bail!("two volumes name claim {claim}");
            }
            refs.insert(pv["metadata"]["name"].as_str().unwrap_or("").to_owned(), claim);
        }
        for c in pvcs["items"].as_array().into_iter().flatten() {
            let name = c["metadata"]["name"].as_str().unwrap_or("");
            let vol = c["spec"]["volumeName"].as_str().unwrap_or("");
            if refs.get(vol).map(String::as_str) != Some(name) {
                bail!("claim {name} names {vol}, whose claimRef does not name it back");
            }
        }
        println!(
            "checked: {} volumes Bound to {} distinct claims, each naming its volume back",
            refs.len(),
            claimed.len()
        );
        drop(server);
        Ok::<_, anyhow::Error>(())
    })
}

async fn conn_get(t: &crate::bench_api::Target, path: &str) -> Result<(u16, serde_json::Value)> {
    let mut c = t.connect().await?;
    let (code, body) = c.call("GET", path, "application/json", Vec::new()).await?;
    Ok((code, serde_json::from_slice(&body)?))
}

fn dyn_claim(name: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": { "name": name },
        "spec": { "accessModes": ["ReadWriteOnce"], "storageClassName": "bench-dir",
                  "resources": { "requests": { "storage": "16Mi" } } },
    }))
    .unwrap_or_default()
}

/// Watches claims from `from` on until `n` are Bound; returns when each was first seen Bound.
async fn watch_bound(
    t: &crate::bench_api::Target,
    from: &str,
    n: usize,
    timeout: Duration,
) -> Result<HashMap<String, Instant>> {
    let mut conn = t.connect().await?;
    let path = format!("/api/v1/persistentvolumeclaims?watch=1&resourceVersion={from}");
    let req = conn.request("GET", &path, "application/json", Vec::new())?;
    conn.send.ready().await?;
    let resp = conn.send.send_request(req).await?;
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut bound = HashMap::with_capacity(n);
    let deadline = Instant::now() + timeout;
    while bound.len() < n {
        let frame = tokio::time::timeout_at(deadline.into(), body.frame())
            .await
            .with_context(|| format!("only {} of {n} claims Bound in time", bound.len()))?;
        let Some(frame) = frame else { bail!("the watch ended") };
        let Ok(chunk) = frame?.into_data() else { continue };
        buf.extend_from_slice(&chunk);
        // Every whole line in the buffer, then one drain: the client reads only the two
        // fields it needs, so that its own share of the machine stays small.
        let mut at = 0;
        while let Some(len) = buf[at..].iter().position(|b| *b == b'\n') {
            let event: ClaimEvent<'_> = serde_json::from_slice(&buf[at..at + len])?;
            if event.object.status.phase == Some("Bound") {
                bound
                    .entry(event.object.metadata.name.to_owned())
                    .or_insert_with(Instant::now);
            }
            at += len + 1;
        }
        buf.drain(..at);
    }
    Ok(bound)
}

/// The part of a claim's watch event that the bench reads; everything else is skipped unparsed.
#[derive(serde::Deserialize)]
struct ClaimEvent<'a> {
    #[serde(borrow)]
    object: ClaimFields<'a>,
}

#[derive(serde::Deserialize)]
struct ClaimFields<'a> {
    #[serde(borrow)]
    metadata: NameOnly<'a>,
    #[serde(borrow, default)]
    status: PhaseOnly<'a>,
}

#[derive(serde::Deserialize)]
struct NameOnly<'a> {
    name: &'a str,
}

#[derive(serde::Deserialize, Default)]
struct PhaseOnly<'a> {
    #[serde(borrow)]
    phase: Option<&'a str>,
}

/// `--dynamic N`: claims provisioned by Berth's own driver while the all-in-one server runs.
fn run_dynamic(args: &BindArgs, n: usize) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("berth bench bind --dynamic runs the all-in-one server, which needs root");
    }
    let work = tempfile::Builder::new()
        .prefix("berth-bench-dyn.")
        .tempdir_in("/var/tmp")?;
    let data = work.path().join("data");
    let csi = format!("unix://{}", work.path().join("csi.sock").display());
    let docker = work.path().join("docker.sock");
    let runtime = tokio::runtime::Runtime::new()?;
    println!("berth bench bind --dynamic: {}", crate::bench::machine_line());
    println!(
        "{n} claims of a kind=dir class provisioned by csi.berth.dev, created by {} writers",
        args.concurrency
    );
    let result = runtime.block_on(async {
        let docker = docker.display().to_string();
        let server = start_server_with(
            &data,
            &[
                "--default-pool-size",
                "4G",
                "--csi-endpoint",
                &csi,
                "--docker-socket",
                &docker,
            ],
        )?;
        let pid = server.child.id();
        let t = target(&data).await?;
        let mut c = t.connect().await?;
        let class = serde_json::to_vec(&serde_json::json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "bench-dir"}, "provisioner": "csi.berth.dev",
            "parameters": {"kind": "dir"}, "reclaimPolicy": "Delete",
        }))?;
        let (code, body) = c
            .call(
                "POST",
                "/apis/storage.k8s.io/v1/storageclasses",
                "application/json",
                class,
            )
            .await?;
        if code != 201 {
            bail!("creating the class: HTTP {code}: {}", String::from_utf8_lossy(&body));
        }
        let (_, list) = c
            .call("GET", "/api/v1/persistentvolumeclaims", "application/json", Vec::new())
            .await?;
        let rv: serde_json::Value = serde_json::from_slice(&list)?;
        let rv = rv["metadata"]["resourceVersion"].as_str().unwrap_or("0").to_owned();
        let t2 = t.clone();
        let watcher = tokio::spawn(async move { watch_bound(&t2, &rv, n, Duration::from_secs(1800)).await });
        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let started = Instant::now();
        let (create_time, _) = create_many(
            &t,
            "/api/v1/namespaces/default/persistentvolumeclaims",
            "dyn-",
            n,
            args.concurrency,
            dyn_claim,
            Some(sent.clone()),
        )
        .await?;
        let bound = watcher.await??;
        let last = bound.values().max().copied().unwrap_or(started);
        let elapsed = last.saturating_duration_since(started).as_secs_f64().max(1e-6);
        let mut h = histogram()?;
        if let Ok(sent) = sent.lock() {
            for (name, at) in bound.iter() {
                if let Some(s) = sent.get(name) {
                    h.saturating_record(micros(at.saturating_duration_since(*s)));
                }
            }
        }
        println!("created {n} claims in {:.2} s", create_time.as_secs_f64());
        println!(
            "all {n} Bound {elapsed:.2} s after the first create: {:.0} provisions/s",
            n as f64 / elapsed
        );
        print_latency_and_rss("create to Bound", &h, pid, n)?;
        let (code, pvs) = conn_get(&t, "/api/v1/persistentvolumes").await?;
        if code != 200 {
            bail!("listing PVs: HTTP {code}");
        }
        let handles: HashSet<&str> = pvs["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["spec"]["csi"]["volumeHandle"].as_str())
            .collect();
        if handles.len() != n {
            bail!("{} distinct CSI volumes for {n} claims", handles.len());
        }
        println!("checked: {n} PVs with {n} distinct backend volumes");
        drop(server);
        Ok::<_, anyhow::Error>(())
    });
    let host = berth_host::LinuxHost::default();
    berth_storage::teardown::teardown(&host, &data).context("tearing down the bench's data dir")?;
    result
}

/// Prints `label`'s p50/p99/max, the server's RSS, and the CPU time it has used since its start
/// (in all and per one of `items`): on a shared VM whose speed drifts, the CPU per item varies
/// less than the wall-clock figures.
fn print_latency_and_rss(label: &str, h: &hdrhistogram::Histogram<u64>, pid: u32, items: usize) -> Result<()> {
    println!(
        "{label}: p50 {} p99 {} max {}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    );
    println!(
        "server RSS {} MiB (peak {} MiB)",
        rss_kib(pid, "VmRSS:")? / 1024,
        rss_kib(pid, "VmHWM:")? / 1024
    );
    let cpu = cpu_seconds(pid)?;
    println!(
        "server CPU {cpu:.2} s since its start (user+system), {:.0} µs per item",
        cpu * 1e6 / items.max(1) as f64
    );
    Ok(())
}

/// User plus system CPU time of process `pid`, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3, the state.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("no CPU time in /proc/{pid}/stat"))
    };
    // utime and stime are fields 14 and 15, so 11 and 12 after the state.
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

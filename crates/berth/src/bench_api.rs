//! `berth bench api`: the Kubernetes API server under load, measured from outside.
//!
//! Starts the real `berth server` (this binary) as a child on a fresh data dir and a loopback
//! port, and drives it over HTTPS with the admin token, each worker on its own connection:
//! - create throughput: `--objects` PVs by `--concurrency` writers (each acknowledged write is
//!   durable), objects/s and p50/p99 latency;
//! - list latency on those PVs along the `kubectl get` path: Table Accept header, pages of 500,
//!   and the plain JSON list; optionally real `kubectl get pv` wall time (`--kubectl`);
//! - `--watchers` concurrent watches of PVCs while claims are created: events delivered/s and
//!   the lag from a create's request to each watcher's receipt (p50/p99/max);
//! - the server's RSS after growing the store to `--rss-objects` PV+PVC objects.
//!
//! Prints figures; asserts nothing. Removes its data dir at the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use rustls::pki_types::pem::PemObject as _;

const TABLE_ACCEPT: &str =
    "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// PVs created for the throughput and list figures (default 10000; 500 with --smoke).
    #[arg(long)]
    objects: Option<usize>,
    /// Concurrent writers (connections).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Concurrent watchers (default 100; 10 with --smoke).
    #[arg(long)]
    watchers: Option<usize>,
    /// Claims created while the watchers watch (default 2000; 100 with --smoke).
    #[arg(long)]
    watch_events: Option<usize>,
    /// Total PV+PVC objects before RSS is read (default 100000; 2000 with --smoke).
    #[arg(long)]
    rss_objects: Option<usize>,
    /// Also time real `kubectl get pv` with this kubectl.
    #[arg(long)]
    kubectl: Option<PathBuf>,
    /// Small numbers, for CI: checks that the bench runs, not what it measures.
    #[arg(long)]
    smoke: bool,
}

/// One HTTP/1.1 connection over TLS with the admin token.
pub(crate) struct Conn {
    pub(crate) send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    token: Arc<str>,
}

#[derive(Clone)]
pub(crate) struct Target {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    token: Arc<str>,
}

impl Target {
    pub(crate) async fn connect(&self) -> Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(Conn {
            send,
            host: self.addr.clone(),
            token: self.token.clone(),
        })
    }
}

impl Conn {
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        accept: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Request<Full<Bytes>>> {
        Ok(hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", accept)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?)
    }

    pub(crate) async fn call(&mut self, method: &str, path: &str, accept: &str, body: Vec<u8>) -> Result<(u16, Bytes)> {
        let req = self.request(method, path, accept, body)?;
        self.send.ready().await?;
        let resp = self.send.send_request(req).await?;
        let code = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((code, body))
    }
}

fn pv(name: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": name, "labels": { "bench": "api" } },
        "spec": { "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "bench",
                  "hostPath": { "path": format!("/srv/bench/{name}") } },
    }))
    .unwrap_or_default()
}

fn pvc(name: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": { "name": name, "labels": { "bench": "api" } },
        "spec": { "accessModes": ["ReadWriteOnce"], "storageClassName": "bench",
                  "resources": { "requests": { "storage": "1Gi" } } },
    }))
    .unwrap_or_default()
}

pub(crate) fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("latency histogram")
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

pub(crate) fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

pub(crate) fn rss_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// The server child; killed on drop.
pub(crate) struct Server {
    pub(crate) child: Child,
}

impl Server {
    /// Stops the server as an operator would (SIGTERM), waiting up to 60 s for it to exit.
    pub(crate) fn stop(mut self) -> Result<()> {
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("server pid")?;
        // Not yet waited for, so the pid is still our child's.
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).context("SIGTERM to the server")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the server did not stop within 60 s of SIGTERM")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(data: &Path) -> Result<Server> {
    start_server_with(data, &["--api-only", "--no-controllers"])
}

/// Starts `berth server` on `data` with `flags`, on any free loopback port.
pub(crate) fn start_server_with(data: &Path, flags: &[&str]) -> Result<Server> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .arg("server")
        .args(flags)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        // BERTH_SERVER_LOG shows the server's own log during a benchmark.
        .env(
            "BERTH_LOG",
            std::env::var("BERTH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting berth server")?;
    Ok(Server { child })
}

pub(crate) async fn target(data: &Path) -> Result<Target> {
    let kubeconfig = data.join("admin.kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&kubeconfig) {
            break t;
        }
        if Instant::now() > deadline {
            bail!("berth server wrote no {} within 60 s", kubeconfig.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(k).map(str::to_owned))
            .ok_or_else(|| anyhow!("{k} missing from {}", kubeconfig.display()))
    };
    let addr = field("server: https://")?;
    let token: Arc<str> = field("token: ")?.into();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(data.join("pki/ca.crt"))? {
        roots.add(c?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let t = Target {
        addr,
        tls: Arc::new(tls),
        token,
    };
    loop {
        if let Ok(mut c) = t.connect().await
            && let Ok((200, _)) = c.call("GET", "/version", "application/json", Vec::new()).await
        {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("berth server does not answer");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates `count` objects named `{prefix}{i}` at `path` with `concurrency` connections;
/// returns the elapsed time and the latency histogram.
pub(crate) async fn create_many(
    t: &Target,
    path: &'static str,
    prefix: &str,
    count: usize,
    concurrency: usize,
    body: fn(&str) -> Vec<u8>,
    sent: Option<Arc<Mutex<HashMap<String, Instant>>>>,
) -> Result<(Duration, Histogram<u64>)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let t = t.clone();
        let next = next.clone();
        let prefix = prefix.to_owned();
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let mut conn = t.connect().await?;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(h);
                }
                let name = format!("{prefix}{i}");
                let b = body(&name);
                let s = Instant::now();
                if let Some(sent) = &sent
                    && let Ok(mut m) = sent.lock()
                {
                    m.insert(name.clone(), s);
                }
                let (code, resp) = conn.call("POST", path, "application/json", b).await?;
                if code != 201 {
                    bail!("create {name}: HTTP {code}: {}", String::from_utf8_lossy(&resp));
                }
                h.saturating_record(micros(s.elapsed()));
            }
        }));
    }
    let mut all = histogram()?;
    for task in tasks {
        all.add(task.await??)?;
    }
    Ok((started.elapsed(), all))
}

pub fn run(args: ApiArgs) -> Result<()> {
    let objects = args.objects.unwrap_or(if args.smoke { 500 } else { 10_000 });
    let watchers = args.watchers.unwrap_or(if args.smoke { 10 } else { 100 });
    let watch_events = args.watch_events.unwrap_or(if args.smoke { 100 } else { 2_000 });
    let rss_objects = args.rss_objects.unwrap_or(if args.smoke { 2_000 } else { 100_000 });
    let work = tempfile::Builder::new()
        .prefix("berth-bench-api.")
        .tempdir_in("/var/tmp")?;
    let data = work.path().join("data");
    let server = start_server(&data)?;
    let pid = server.child.id();
    let runtime = tokio::runtime::Runtime::new()?;
    println!("berth bench api: {}", crate::bench::machine_line());
    println!("server pid {pid}, store redb in {}", data.display());
    let result = runtime.block_on(async {
        let t = target(&data).await?;
        println!("idle RSS: {} MiB", rss_kib(pid, "VmRSS:")? / 1024);

        // 1. Create throughput.
        let (elapsed, h) =
            create_many(&t, "/api/v1/persistentvolumes", "pv-", objects, args.concurrency, pv, None).await?;
        println!(
            "create {objects} PVs, {} writers: {:.0} objects/s ({:.2} s); latency p50 {} p99 {} max {}",
            args.concurrency,
            objects as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max())
        );

        // 2. List latency: the kubectl get path (Table, pages of 500) and a plain JSON list.
        let mut conn = t.connect().await?;
        let rounds = if args.smoke { 3 } else { 20 };
        let mut table_h = histogram()?;
        let mut json_h = histogram()?;
        let mut rows = 0;
        for _ in 0..rounds {
            let s = Instant::now();
            let mut cont = String::new();
            rows = 0;
            loop {
                let path = if cont.is_empty() {
                    "/api/v1/persistentvolumes?limit=500".to_owned()
                } else {
                    format!("/api/v1/persistentvolumes?limit=500&continue={cont}")
                };
                let (code, body) = conn.call("GET", &path, TABLE_ACCEPT, Vec::new()).await?;
                if code != 200 {
                    bail!("list: HTTP {code}");
                }
                let v: serde_json::Value = serde_json::from_slice(&body)?;
                rows += v["rows"].as_array().map_or(0, Vec::len);
                cont = v["metadata"]["continue"].as_str().unwrap_or_default().to_owned();
                if cont.is_empty() {
                    break;
                }
            }
            table_h.saturating_record(micros(s.elapsed()));
            let s = Instant::now();
            let (code, _) = conn.call("GET", "/api/v1/persistentvolumes", "application/json", Vec::new()).await?;
            if code != 200 {
                bail!("list: HTTP {code}");
            }
            json_h.saturating_record(micros(s.elapsed()));
        }
        println!(
            "list {rows} PVs as kubectl get does (Table, pages of 500), {rounds} rounds: p50 {} p99 {}",
            ms(table_h.value_at_quantile(0.5)),
            ms(table_h.value_at_quantile(0.99))
        );
        println!(
            "list {objects} PVs as one JSON PersistentVolumeList, {rounds} rounds: p50 {} p99 {}",
            ms(json_h.value_at_quantile(0.5)),
            ms(json_h.value_at_quantile(0.99))
        );
        if let Some(kubectl) = &args.kubectl {
            let mut kh = histogram()?;
            for _ in 0..rounds.min(10) {
                let s = Instant::now();
                let out = tokio::process::Command::new(kubectl)
                    .args(["get", "pv", "--no-headers"])
                    .env("KUBECONFIG", data.join("admin.kubeconfig"))
                    .env("HOME", work.path())
                    .output()
                    .await?;
                if !out.status.success() {
                    bail!("kubectl get pv: {}", String::from_utf8_lossy(&out.stderr));
                }
                kh.saturating_record(micros(s.elapsed()));
                rows = out.stdout.iter().filter(|b| **b == b'\n').count();
            }
            println!(
                "real `{} get pv` ({rows} rows, process start included): p50 {} p99 {}",
                kubectl.display(),
                ms(kh.value_at_quantile(0.5)),
                ms(kh.value_at_quantile(0.99))
            );
        }

        // 3. Watchers keeping up.
        let mut c = t.connect().await?;
        let (_, body) = c.call("GET", "/api/v1/namespaces/default/persistentvolumeclaims?limit=1", "application/json", Vec::new()).await?;
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let rv = v["metadata"]["resourceVersion"].as_str().unwrap_or("0").to_owned();
        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let lags: Arc<Mutex<Histogram<u64>>> = Arc::new(Mutex::new(histogram()?));
        let mut watch_tasks = Vec::new();
        for _ in 0..watchers {
            let conn = t.connect().await?;
            let path = format!("/api/v1/namespaces/default/persistentvolumeclaims?watch=1&resourceVersion={rv}");
            let sent = sent.clone();
            let lags = lags.clone();
            watch_tasks.push(tokio::spawn(async move {
                let mut conn = conn;
                let req = conn.request("GET", &path, "application/json", Vec::new())?;
                conn.send.ready().await?;
                let resp = conn.send.send_request(req).await?;
                let mut body = resp.into_body();
                let mut buf = Vec::new();
                let mut seen = 0usize;
                let mut local = histogram()?;
                while seen < watch_events {
                    let Some(frame) = body.frame().await else { break };
                    let Ok(data) = frame?.into_data() else { continue };
                    buf.extend_from_slice(&data);
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        let now = Instant::now();
                        let v: serde_json::Value = serde_json::from_slice(&line)?;
                        if v["type"] != "ADDED" {
                            continue;
                        }
                        seen += 1;
                        let name = v["object"]["metadata"]["name"].as_str().unwrap_or_default();
                        let at = sent.lock().ok().and_then(|m| m.get(name).copied());
                        if let Some(at) = at {
                            local.saturating_record(micros(now.saturating_duration_since(at)));
                        }
                    }
                }
                if let Ok(mut l) = lags.lock() {
                    l.add(&local)?;
                }
                Ok::<_, anyhow::Error>(seen)
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let (write_elapsed, _) = create_many(
            &t,
            "/api/v1/namespaces/default/persistentvolumeclaims",
            "claim-",
            watch_events,
            16,
            pvc,
            Some(sent.clone()),
        )
        .await?;
        let mut delivered = 0;
        for w in watch_tasks {
            delivered += tokio::time::timeout(Duration::from_secs(300), w).await???;
        }
        let elapsed = started.elapsed();
        let lag = lags.lock().map_err(|_| anyhow!("lag histogram poisoned"))?.clone();
        println!(
            "{watchers} watchers x {watch_events} claims: {delivered} events in {:.2} s ({:.0} events/s; writes took {:.2} s); lag p50 {} p99 {} max {}",
            elapsed.as_secs_f64(),
            delivered as f64 / elapsed.as_secs_f64(),
            write_elapsed.as_secs_f64(),
            ms(lag.value_at_quantile(0.5)),
            ms(lag.value_at_quantile(0.99)),
            ms(lag.max())
        );

        // 4. RSS with many objects: PVs up to half, claims up to the other half.
        let have_pv = objects;
        let have_pvc = watch_events;
        let half = rss_objects / 2;
        let s = Instant::now();
        if half > have_pv {
            create_many(&t, "/api/v1/persistentvolumes", "rss-pv-", half - have_pv, args.concurrency, pv, None).await?;
        }
        if rss_objects - half > have_pvc {
            create_many(
                &t,
                "/api/v1/namespaces/default/persistentvolumeclaims",
                "rss-claim-",
                rss_objects - half - have_pvc,
                args.concurrency,
                pvc,
                None,
            )
            .await?;
        }
        let fill = s.elapsed();
        let rss_after_writes = rss_kib(pid, "VmRSS:")?;
        // One full list of each kind, as a controller's informer does at start.
        let (_, b1) = conn.call("GET", "/api/v1/persistentvolumes", "application/json", Vec::new()).await?;
        let (_, b2) = conn.call("GET", "/api/v1/persistentvolumeclaims", "application/json", Vec::new()).await?;
        let listed = b1.len() + b2.len();
        drop((b1, b2));
        println!(
            "{rss_objects} PV+PVC objects (filled in {:.1} s): RSS {} MiB after the writes, {} MiB after listing both kinds in full ({} MiB of JSON); peak {} MiB; store file {} MiB",
            fill.as_secs_f64(),
            rss_after_writes / 1024,
            rss_kib(pid, "VmRSS:")? / 1024,
            listed >> 20,
            rss_kib(pid, "VmHWM:")? / 1024,
            std::fs::metadata(data.join("store.redb")).map(|m| m.len() >> 20).unwrap_or(0)
        );
        Ok(())
    });
    drop(server);
    result
}

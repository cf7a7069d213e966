//! `berth bench`: latency of CSI calls through the real gRPC server, and the data path under fio.
//!
//! Both benchmarks start the storage engine and the real CSI server in this process, on a unix
//! socket in a fresh scratch dir under `/var/tmp`, and drive it through the real CSI client:
//! - `berth bench csi` times every CreateVolume, NodeStage, NodePublish, NodeUnpublish,
//!   NodeUnstage and DeleteVolume call of `count` volumes per kind and prints p50/p99/max;
//! - `berth bench fio` runs fio on the pool filesystem itself, on a published dir volume and on a
//!   published fs volume, and prints IOPS, bandwidth and each volume's ratio to the pool;
//! - `berth bench snapshot` times snapshots, restores, clones and expansions of full volumes
//!   (see `snapshot.rs`).
//!
//! It prints figures and asserts nothing. It never touches a data dir it did not make (a given
//! `--data-dir` must be empty), and it always cleans up, on error and on Ctrl-C too: everything
//! mounted or attached for the data dir is taken down (`berth teardown`), and the scratch and data
//! dirs are removed only once nothing is mounted beneath them any more.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use berth_csi::{Client, v1};
use berth_host::{FileSystem, HostOps, LinuxHost, magic};
use berth_storage::BerthDriver;
use clap::{Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde::Deserialize;

use crate::{NodeOpts, engine_config, open_engine, parse_size};

mod snapshot;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Where scratch dirs go: on disk (not tmpfs), like a real data dir.
const SCRATCH_PARENT: &str = "/var/tmp";
/// A call that takes longer than this is reported as a failure instead of hanging the bench.
const RPC_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Latency of each CSI call (p50/p99/max) over many volumes of each kind.
    Csi(CsiArgs),
    /// fio on a dir and an fs volume, as a ratio to the pool filesystem itself.
    Fio(FioArgs),
    /// Snapshot, restore, clone and expansion times of full volumes, and the copy fallback.
    Snapshot(snapshot::SnapshotArgs),
    /// The Kubernetes API server: create throughput, list latency, watchers, RSS.
    Api(crate::bench_api::ApiArgs),
    /// The controllers: pre-created PV/PVC pairs until every claim is Bound.
    Bind(crate::bench_bind::BindArgs),
}

#[derive(Debug, clap::Args)]
struct CsiArgs {
    /// Volume kinds to measure, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [VolumeKind::Dir, VolumeKind::Fs, VolumeKind::Block, VolumeKind::Tmpfs])]
    kinds: Vec<VolumeKind>,
    /// Volumes per kind (default 1000; 20 with --smoke).
    #[arg(long)]
    count: Option<usize>,
    /// Size of each volume (K, M, G suffixes).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    size: u64,
    /// Filesystem of fs volumes (xfs needs --size 300M or more).
    #[arg(long, value_enum, default_value_t = FsType::Ext4)]
    fs: FsType,
    /// Engine data dir; must be absent or empty, and is removed afterwards. Default: a fresh
    /// dir under /var/tmp.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Size of the pool image (default: room for every fs/block volume of one kind, at least 2G).
    #[arg(long, value_parser = parse_size)]
    pool_size: Option<u64>,
    /// Quick run for CI: 20 volumes per kind.
    #[arg(long)]
    smoke: bool,
    /// Spare subvolumes per pool (0: every dir create makes its own subvolume) [default: 4].
    #[arg(long)]
    spare_subvolumes: Option<usize>,
}

#[derive(Debug, clap::Args)]
struct FioArgs {
    /// Size of the file fio works on, per target (default 1G; 128M with --smoke).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Seconds each fio job runs (default 20; 2 with --smoke).
    #[arg(long)]
    runtime: Option<u64>,
    /// Times to run every job on every target; each cell reports the median.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Filesystem of the fs volume.
    #[arg(long, value_enum, default_value_t = FsType::Ext4)]
    fs: FsType,
    /// fio ioengine; auto picks io_uring when the kernel allows it, libaio otherwise.
    #[arg(long, value_enum, default_value_t = IoEngine::Auto)]
    ioengine: IoEngine,
    /// Engine data dir; must be absent or empty, and is removed afterwards. Default: a fresh
    /// dir under /var/tmp.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Quick run for CI: 2 s per job on a 128M file.
    #[arg(long)]
    smoke: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VolumeKind {
    Dir,
    Fs,
    Block,
    Tmpfs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    fn filesystem(self) -> FileSystem {
        match self {
            FsType::Ext4 => FileSystem::Ext4,
            FsType::Xfs => FileSystem::Xfs,
            FsType::Btrfs => FileSystem::Btrfs,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IoEngine {
    Auto,
    IoUring,
    Libaio,
}

/// A kind of volume as CreateVolume asks for it.
#[derive(Debug, Clone, Copy)]
struct VolumeClass {
    kind: VolumeKind,
    fs: FsType,
}

impl VolumeClass {
    fn label(self) -> String {
        match self.kind {
            VolumeKind::Dir => "dir".into(),
            VolumeKind::Fs => format!("fs-{}", self.fs.filesystem().as_str()),
            VolumeKind::Block => "block".into(),
            VolumeKind::Tmpfs => "tmpfs".into(),
        }
    }

    fn parameters(self) -> HashMap<String, String> {
        let kind = match self.kind {
            VolumeKind::Dir => "dir",
            VolumeKind::Fs => "fs",
            VolumeKind::Block => "block",
            VolumeKind::Tmpfs => "tmpfs",
        };
        let mut p = HashMap::from([("kind".to_owned(), kind.to_owned())]);
        if self.kind == VolumeKind::Fs {
            p.insert("csi.storage.k8s.io/fstype".into(), self.fs.filesystem().as_str().into());
        }
        p
    }

    fn capability(self) -> v1::VolumeCapability {
        use v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode};
        let access_type = match self.kind {
            VolumeKind::Block => AccessType::Block(BlockVolume {}),
            VolumeKind::Fs => AccessType::Mount(MountVolume {
                fs_type: self.fs.filesystem().as_str().into(),
                ..Default::default()
            }),
            VolumeKind::Dir | VolumeKind::Tmpfs => AccessType::Mount(MountVolume::default()),
        };
        v1::VolumeCapability {
            access_type: Some(access_type),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchCommand::Csi(a) => run_csi(a),
        BenchCommand::Fio(a) => run_fio(a),
        BenchCommand::Snapshot(a) => snapshot::run(a),
        BenchCommand::Api(a) => crate::bench_api::run(a),
        BenchCommand::Bind(a) => crate::bench_bind::run(a),
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch space, engine and server

/// The bench's own directories. Dropping it cleans up if [`Scratch::cleanup`] was not called.
#[derive(Debug)]
struct Scratch {
    /// Fresh dir under /var/tmp: socket, staging and target paths, fio output.
    work: PathBuf,
    /// Canonical engine data dir (inside `work` unless `--data-dir` was given).
    data_dir: PathBuf,
    cleaned: bool,
}

impl Scratch {
    fn create(data_dir: Option<PathBuf>) -> Result<Scratch> {
        let work = tempfile::Builder::new()
            .prefix("berth-bench-")
            .tempdir_in(SCRATCH_PARENT)
            .with_context(|| format!("creating a scratch dir under {SCRATCH_PARENT}"))?
            .keep();
        let work = std::fs::canonicalize(&work).with_context(|| format!("resolving {}", work.display()))?;
        // From here on the guard owns `work`, so an error below still removes it.
        let mut scratch = Scratch {
            data_dir: work.join("data"),
            work,
            cleaned: false,
        };
        if let Some(dir) = data_dir {
            match std::fs::read_dir(&dir) {
                Ok(mut entries) => {
                    if entries.next().is_some() {
                        bail!(
                            "--data-dir {} is not empty; the bench removes its data dir afterwards, so give it an absent or empty one",
                            dir.display()
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                Err(e) => return Err(e).with_context(|| format!("reading --data-dir {}", dir.display())),
            }
            scratch.data_dir = std::fs::canonicalize(&dir).with_context(|| format!("resolving {}", dir.display()))?;
        }
        if !scratch.data_dir.exists() {
            std::fs::create_dir(&scratch.data_dir)
                .with_context(|| format!("creating {}", scratch.data_dir.display()))?;
        }
        for sub in ["stage", "publish"] {
            let p = scratch.work.join(sub);
            std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        Ok(scratch)
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.work.join("csi.sock").display())
    }

    fn staging_path(&self, name: &str) -> PathBuf {
        self.work.join("stage").join(name)
    }

    fn target_path(&self, name: &str) -> PathBuf {
        self.work.join("publish").join(name)
    }

    /// Tears down everything of the data dir, then removes the dirs unless something is still
    /// mounted beneath them (removing through a mount would delete a volume's data).
    fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        let host = LinuxHost::default();
        if self.data_dir.exists() {
            berth_storage::teardown::teardown(&host, &self.data_dir)
                .with_context(|| format!("tearing down {}", self.data_dir.display()))?;
        }
        let left: Vec<PathBuf> = host
            .mountinfo()?
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&self.work) || p.starts_with(&self.data_dir))
            .collect();
        if !left.is_empty() {
            bail!(
                "still mounted after teardown, so {} is left in place: {:?}",
                self.work.display(),
                left
            );
        }
        if !self.data_dir.starts_with(&self.work) && self.data_dir.exists() {
            std::fs::remove_dir_all(&self.data_dir).with_context(|| format!("removing {}", self.data_dir.display()))?;
        }
        std::fs::remove_dir_all(&self.work).with_context(|| format!("removing {}", self.work.display()))?;
        self.cleaned = true;
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("berth bench: cleanup failed: {e:#}");
        }
    }
}

/// What the bench's engine is opened with, besides its scratch data dir (`None`: the default).
#[derive(Clone, Copy, Debug, Default)]
struct EngineSizes {
    pool_size: Option<u64>,
    tmpfs_budget: Option<u64>,
    spare_subvolumes: Option<usize>,
}

/// Runs `body` with the engine served on the scratch socket and a connected client, then stops
/// the server and cleans the scratch space up, whatever happened. Ctrl-C ends the body early.
fn with_driver<T, F, Fut>(scratch: Scratch, sizes: EngineSizes, body: F) -> Result<T>
where
    F: FnOnce(Client, Arc<Scratch>) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let scratch = Arc::new(scratch);
    let outcome = serve_and_run(&scratch, sizes, body);
    // Every clone of the scratch handle lived inside the runtime, which is gone by now.
    let cleaned = match Arc::try_unwrap(scratch) {
        Ok(mut s) => s.cleanup(),
        Err(_) => Err(anyhow!("scratch space still in use; it is removed at exit")),
    };
    match (outcome, cleaned) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(e)) => Err(e.context("the bench ran, but cleaning up failed")),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(c)) => Err(e.context(format!("cleaning up failed too: {c:#}"))),
    }
}

fn serve_and_run<T, F, Fut>(scratch: &Arc<Scratch>, sizes: EngineSizes, body: F) -> Result<T>
where
    F: FnOnce(Client, Arc<Scratch>) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let cfg = engine_config(NodeOpts {
        data_dir: Some(scratch.data_dir.clone()),
        node_id: Some("bench".into()),
        default_pool_size: sizes.pool_size,
        tmpfs_budget: sizes.tmpfs_budget,
        spare_subvolumes: sizes.spare_subvolumes,
        ..NodeOpts::default()
    })?;
    let engine = open_engine(cfg)?;
    // The server runs as `berth csi` runs it, on a multi-threaded runtime. The client has a
    // runtime of its own on this thread, as an outside client (kubelet, a sidecar) would: on a
    // shared runtime every call paid for the client's tasks queueing behind the server's.
    let server_rt = tokio::runtime::Runtime::new().context("starting the server's tokio runtime")?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client's tokio runtime")?;
    let endpoint = scratch.endpoint();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let driver = Arc::new(BerthDriver::new(engine));
    let ep = endpoint.clone();
    let server = server_rt.spawn(async move {
        berth_csi::serve_unix(&ep, driver, async {
            let _ = stopped.await;
        })
        .await
    });
    let outcome = client_rt.block_on(async {
        let client = connect(&endpoint).await?;
        tokio::select! {
            r = body(client, scratch.clone()) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    drop(client_rt);
    let _ = stop.send(());
    let served = match server_rt.block_on(server) {
        Ok(r) => r.context("CSI server"),
        Err(e) => Err(anyhow!("CSI server task failed: {e}")),
    };
    match (outcome, served) {
        (Ok(v), Ok(())) => Ok(v),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e),
    }
}

async fn connect(endpoint: &str) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(endpoint).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context("the in-process CSI server did not come up");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Awaits one RPC with a deadline; the error names the call.
async fn call<T>(
    what: impl FnOnce() -> String,
    rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(RPC_TIMEOUT, rpc).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(anyhow!("{}: {:?}: {}", what(), status.code(), status.message())),
        Err(_) => Err(anyhow!("{}: no answer within {RPC_TIMEOUT:?}", what())),
    }
}

fn mebibytes(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

fn i64_of(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| anyhow!("{v} bytes is too large"))
}

/// One line about the machine, printed above every table.
pub(crate) fn machine_line() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let uname = rustix::system::uname();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    format!(
        "{cpus} CPUs, kernel {}, load average {load}",
        uname.release().to_string_lossy()
    )
}

// ---------------------------------------------------------------------------------------------
// berth bench csi

/// The calls timed, in the order they run.
const CSI_OPS: [&str; 6] = [
    "CreateVolume",
    "NodeStage",
    "NodePublish",
    "NodeUnpublish",
    "NodeUnstage",
    "DeleteVolume",
];

/// Latencies of one call for one kind, in microseconds.
#[derive(Debug)]
struct OpLatency {
    kind: String,
    op: &'static str,
    micros: Histogram<u64>,
}

impl OpLatency {
    fn new(kind: &str, op: &'static str) -> Result<Self> {
        // 1 µs to 1 h at 3 significant digits.
        let micros = Histogram::new_with_bounds(1, 3_600_000_000, 3).context("latency histogram")?;
        Ok(OpLatency {
            kind: kind.to_owned(),
            op,
            micros,
        })
    }

    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.micros.saturating_record(us.max(1));
    }
}

fn ms(micros: u64) -> String {
    format!("{:.3}", micros as f64 / 1000.0)
}

fn latency_table(rows: &[OpLatency]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<14} {:>6} {:>10} {:>10} {:>10}",
        "kind", "op", "n", "p50 ms", "p99 ms", "max ms"
    );
    for r in rows {
        let h = &r.micros;
        let _ = writeln!(
            out,
            "{:<10} {:<14} {:>6} {:>10} {:>10} {:>10}",
            r.kind,
            r.op,
            h.len(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
        );
    }
    out
}

/// Pool image size: every image-backed volume of one kind at once, plus room for metadata.
fn csi_pool_size(kinds: &[VolumeKind], count: usize, size: u64) -> u64 {
    let images = kinds.iter().any(|k| matches!(k, VolumeKind::Fs | VolumeKind::Block));
    let aligned = size.div_ceil(MIB).saturating_mul(MIB);
    let need = if images {
        aligned.saturating_mul(count as u64).saturating_add(GIB)
    } else {
        0
    };
    need.max(2 * GIB)
}

fn run_csi(args: CsiArgs) -> Result<()> {
    let count = args.count.unwrap_or(if args.smoke { 20 } else { 1000 });
    if count == 0 {
        bail!("--count must be at least 1");
    }
    if args.kinds.is_empty() {
        bail!("--kinds names no kind");
    }
    let min = args.fs.filesystem().min_size();
    if args.kinds.contains(&VolumeKind::Fs) && args.size < min {
        bail!(
            "{} volumes need at least {}; pass --size {}M or more",
            args.fs.filesystem().as_str(),
            mebibytes(min),
            min.div_ceil(MIB)
        );
    }
    let pool_size = args.pool_size.unwrap_or(csi_pool_size(&args.kinds, count, args.size));
    let tmpfs_budget = args.size.saturating_mul(count as u64).max(GIB);
    let scratch = Scratch::create(args.data_dir)?;
    check_room(&scratch.data_dir, pool_size)?;

    let classes: Vec<VolumeClass> = args
        .kinds
        .iter()
        .map(|&kind| VolumeClass { kind, fs: args.fs })
        .collect();
    println!(
        "berth bench csi: {count} volumes of {} per kind, one call at a time, {} spare subvolumes; {}",
        mebibytes(args.size),
        args.spare_subvolumes
            .unwrap_or(berth_storage::engine::DEFAULT_SPARE_SUBVOLUMES),
        machine_line()
    );
    let size = args.size;
    let sizes = EngineSizes {
        pool_size: Some(pool_size),
        tmpfs_budget: Some(tmpfs_budget),
        spare_subvolumes: args.spare_subvolumes,
    };
    let rows = with_driver(scratch, sizes, |mut client, scratch| async move {
        let mut rows = Vec::new();
        for class in classes {
            let started = Instant::now();
            let kind_rows = bench_kind(&mut client, &scratch, class, count, size).await?;
            eprintln!(
                "berth bench csi: {} done in {:.1} s",
                class.label(),
                started.elapsed().as_secs_f64()
            );
            eprint!("{}", latency_table(&kind_rows));
            rows.extend(kind_rows);
        }
        Ok(rows)
    })?;
    println!("at the end: {}", machine_line());
    print!("{}", latency_table(&rows));
    Ok(())
}

/// Fails early, with advice, when the data dir's filesystem cannot hold the pool image.
fn check_room(data_dir: &Path, pool_size: u64) -> Result<()> {
    let stats = LinuxHost::default().statfs(data_dir)?;
    if stats.fs_type != magic::BTRFS && pool_size > stats.available_bytes {
        bail!(
            "the pool image needs {}, but {} has {} free; use a smaller --size or --count, or --pool-size",
            mebibytes(pool_size),
            data_dir.display(),
            mebibytes(stats.available_bytes)
        );
    }
    Ok(())
}

/// `count` CreateVolume calls, then NodeStage of each, NodePublish, NodeUnpublish, NodeUnstage and
/// DeleteVolume of each; one call at a time, each timed at the client.
async fn bench_kind(
    client: &mut Client,
    scratch: &Scratch,
    class: VolumeClass,
    count: usize,
    size: u64,
) -> Result<Vec<OpLatency>> {
    let label = class.label();
    let mut rows: Vec<OpLatency> = CSI_OPS
        .iter()
        .map(|op| OpLatency::new(&label, op))
        .collect::<Result<_>>()?;
    let cap = class.capability();
    let params = class.parameters();
    let required = i64_of(size)?;
    let names: Vec<String> = (0..count).map(|i| format!("bench-{label}-{i:05}")).collect();
    let path = |p: PathBuf| p.to_string_lossy().into_owned();

    let mut ids = Vec::with_capacity(count);
    for name in &names {
        let req = v1::CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: required,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            parameters: params.clone(),
            ..Default::default()
        };
        let t = Instant::now();
        let resp = call(|| format!("CreateVolume {name}"), client.controller.create_volume(req)).await?;
        rows[0].record(t.elapsed());
        let id = resp
            .volume
            .map(|v| v.volume_id)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| anyhow!("CreateVolume {name} answered without a volume id"))?;
        ids.push(id);
    }
    for (id, name) in ids.iter().zip(&names) {
        let req = v1::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: path(scratch.staging_path(name)),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        let t = Instant::now();
        call(|| format!("NodeStageVolume {name}"), client.node.node_stage_volume(req)).await?;
        rows[1].record(t.elapsed());
    }
    for (id, name) in ids.iter().zip(&names) {
        let req = v1::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: path(scratch.staging_path(name)),
            target_path: path(scratch.target_path(name)),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        let t = Instant::now();
        call(
            || format!("NodePublishVolume {name}"),
            client.node.node_publish_volume(req),
        )
        .await?;
        rows[2].record(t.elapsed());
    }
    for (id, name) in ids.iter().zip(&names) {
        let req = v1::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: path(scratch.target_path(name)),
        };
        let t = Instant::now();
        call(
            || format!("NodeUnpublishVolume {name}"),
            client.node.node_unpublish_volume(req),
        )
        .await?;
        rows[3].record(t.elapsed());
    }
    for (id, name) in ids.iter().zip(&names) {
        let req = v1::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: path(scratch.staging_path(name)),
        };
        let t = Instant::now();
        call(
            || format!("NodeUnstageVolume {name}"),
            client.node.node_unstage_volume(req),
        )
        .await?;
        rows[4].record(t.elapsed());
        // The staging dir is the CO's to remove; clear it so the next kind starts clean.
        let _ = std::fs::remove_dir(scratch.staging_path(name));
    }
    for (id, name) in ids.iter().zip(&names) {
        let req = v1::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        };
        let t = Instant::now();
        call(|| format!("DeleteVolume {name}"), client.controller.delete_volume(req)).await?;
        rows[5].record(t.elapsed());
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// berth bench fio

/// One fio workload.
#[derive(Debug, Clone, Copy)]
struct FioJob {
    name: &'static str,
    rw: &'static str,
    block_size: &'static str,
    iodepth: u32,
}

const FIO_JOBS: [FioJob; 3] = [
    FioJob {
        name: "randwrite 4k",
        rw: "randwrite",
        block_size: "4k",
        iodepth: 32,
    },
    FioJob {
        name: "randread 4k",
        rw: "randread",
        block_size: "4k",
        iodepth: 32,
    },
    FioJob {
        name: "seqwrite 1M",
        rw: "write",
        block_size: "1M",
        iodepth: 8,
    },
];

impl FioJob {
    fn reads(self) -> bool {
        self.rw.contains("read")
    }
}

/// What fio measured for one job.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FioResult {
    iops: f64,
    bytes_per_sec: f64,
}

#[derive(Debug, Deserialize)]
struct FioOutput {
    jobs: Vec<FioJobOutput>,
}

#[derive(Debug, Deserialize)]
struct FioJobOutput {
    #[serde(default)]
    error: i64,
    read: FioSide,
    write: FioSide,
}

#[derive(Debug, Deserialize)]
struct FioSide {
    iops: f64,
    /// KiB/s.
    bw: f64,
    #[serde(default)]
    bw_bytes: Option<f64>,
}

/// Reads the one job of fio's `--output-format=json`; `reads` picks the side that was measured.
fn parse_fio(json: &str, reads: bool) -> Result<FioResult> {
    let out: FioOutput = serde_json::from_str(json).context("fio's JSON output")?;
    let [job] = out.jobs.as_slice() else {
        bail!("fio reported {} jobs, expected one", out.jobs.len());
    };
    if job.error != 0 {
        bail!("fio job failed with error {}", job.error);
    }
    let side = if reads { &job.read } else { &job.write };
    Ok(FioResult {
        iops: side.iops,
        bytes_per_sec: side.bw_bytes.unwrap_or(side.bw * 1024.0),
    })
}

/// Runs fio once; `args` come after the common ones. Killed if the bench is interrupted.
async fn fio(args: &[String], output: &Path) -> Result<String> {
    let out = tokio::process::Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .arg(format!("--output={}", output.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!("fio is not installed (apt-get install fio)"),
            _ => anyhow!("running fio: {e}"),
        })?;
    if !out.status.success() {
        bail!("fio {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::read_to_string(output).with_context(|| format!("reading {}", output.display()))
}

/// io_uring when a tiny direct-I/O fio run with it works here, libaio otherwise.
async fn pick_ioengine(choice: IoEngine, dir: &Path, work: &Path) -> Result<&'static str> {
    match choice {
        IoEngine::IoUring => return Ok("io_uring"),
        IoEngine::Libaio => return Ok("libaio"),
        IoEngine::Auto => {}
    }
    let file = dir.join("ioengine-probe.dat");
    let args: Vec<String> = [
        "--name=probe",
        "--ioengine=io_uring",
        "--rw=write",
        "--bs=4k",
        "--size=1M",
        "--direct=1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([format!("--filename={}", file.display())])
    .collect();
    let works = fio(&args, &work.join("probe.json")).await.is_ok();
    let _ = std::fs::remove_file(&file);
    Ok(if works { "io_uring" } else { "libaio" })
}

/// Where fio runs.
#[derive(Debug)]
struct FioTarget {
    label: String,
    dir: PathBuf,
}

impl FioTarget {
    fn file(&self) -> PathBuf {
        self.dir.join("fio.dat")
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// `results[job][target][round]`. IOPS and MiB/s are medians over rounds; the ratio pairs each
/// round with the pool's run of the same round (they ran back to back), so slow drift of a shared
/// machine cancels out, and its range shows how far single rounds spread.
fn fio_table(targets: &[FioTarget], results: &[Vec<Vec<FioResult>>]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<13} {:<14} {:>10} {:>10} {:>8} {:>15}",
        "job", "target", "IOPS", "MiB/s", "ratio", "ratio min-max"
    );
    for (job, per_target) in FIO_JOBS.iter().zip(results) {
        let Some(pool) = per_target.first() else { continue };
        for (target, samples) in targets.iter().zip(per_target) {
            let iops = median(&samples.iter().map(|r| r.iops).collect::<Vec<_>>());
            let bw = median(&samples.iter().map(|r| r.bytes_per_sec).collect::<Vec<_>>());
            let ratios: Vec<f64> = samples
                .iter()
                .zip(pool)
                .map(|(t, p)| if p.iops > 0.0 { t.iops / p.iops } else { 0.0 })
                .collect();
            let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ratios.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "{:<13} {:<14} {:>10.0} {:>10.1} {:>8.3} {:>15}",
                job.name,
                target.label,
                iops,
                bw / MIB as f64,
                median(&ratios),
                format!("{lo:.2}-{hi:.2}"),
            );
        }
    }
    out
}

/// Root of the default pool's btrfs: its image mount, or the pool dir when that is btrfs itself.
fn pool_root(data_dir: &Path) -> Result<PathBuf> {
    let host = LinuxHost::default();
    let pool = data_dir.join("pools").join(berth_storage::DEFAULT_POOL);
    let image_mount = pool.join("fs");
    let root = if host.mountinfo()?.iter().any(|m| m.mount_point == image_mount) {
        image_mount
    } else {
        pool
    };
    if host.statfs(&root)?.fs_type != magic::BTRFS {
        bail!("the pool at {} is not btrfs", root.display());
    }
    Ok(root)
}

fn run_fio(args: FioArgs) -> Result<()> {
    let size = args.size.unwrap_or(if args.smoke { 128 * MIB } else { GIB });
    let runtime = args.runtime.unwrap_or(if args.smoke { 2 } else { 20 });
    if size < 16 * MIB {
        bail!("--size must be at least 16M");
    }
    if runtime == 0 || args.rounds == 0 {
        bail!("--runtime and --rounds must be at least 1");
    }
    // A dir volume's qgroup counts whole extents that random overwrites only partly replaced,
    // so it gets room for the file twice over; the fs volume only needs the file plus metadata.
    let dir_capacity = size.saturating_mul(3);
    let fs_capacity = (size + size / 4 + 64 * MIB)
        .max(args.fs.filesystem().min_size())
        .div_ceil(MIB)
        * MIB;
    let pool_size = (size.saturating_mul(2) + dir_capacity + fs_capacity + 2 * GIB).div_ceil(MIB) * MIB;
    let scratch = Scratch::create(args.data_dir)?;
    check_room(&scratch.data_dir, pool_size)?;
    let fs = args.fs;
    let (rounds, choice) = (args.rounds, args.ioengine);

    let sizes = EngineSizes {
        pool_size: Some(pool_size),
        ..EngineSizes::default()
    };
    with_driver(scratch, sizes, |mut client, scratch| async move {
        let baseline = pool_root(&scratch.data_dir)?.join("bench-baseline");
        std::fs::create_dir_all(&baseline).with_context(|| format!("creating {}", baseline.display()))?;
        let ioengine = pick_ioengine(choice, &baseline, &scratch.work).await?;
        let dir_class = VolumeClass {
            kind: VolumeKind::Dir,
            fs,
        };
        let fs_class = VolumeClass {
            kind: VolumeKind::Fs,
            fs,
        };
        let mut targets = vec![FioTarget {
            label: "pool fs".into(),
            dir: baseline,
        }];
        let mut volumes = Vec::new();
        for (class, capacity) in [(dir_class, dir_capacity), (fs_class, fs_capacity)] {
            let (id, dir) = publish_one(&mut client, &scratch, class, capacity).await?;
            targets.push(FioTarget {
                label: format!("{} volume", class.label()),
                dir,
            });
            volumes.push((id, class.label()));
        }
        println!(
            "berth bench fio: {} file per target, {runtime} s per job, {rounds} round(s), ioengine {ioengine}, direct=1, iodepth 32 (seqwrite 8); {}",
            mebibytes(size),
            machine_line()
        );
        let common = |t: &FioTarget| -> Vec<String> {
            vec![
                "--name=berth".into(),
                format!("--filename={}", t.file().display()),
                format!("--size={size}"),
                format!("--ioengine={ioengine}"),
                "--direct=1".into(),
                "--numjobs=1".into(),
            ]
        };
        let pool_root = pool_root(&scratch.data_dir)?;
        let host = LinuxHost::default();
        // Every target starts from a fully written file, so no job measures first allocation.
        for t in &targets {
            let mut a = common(t);
            a.extend(["--rw=write", "--bs=1M", "--iodepth=8", "--end_fsync=1"].map(String::from));
            fio(&a, &scratch.work.join("fill.json"))
                .await
                .with_context(|| format!("filling {}", t.file().display()))?;
        }
        let mut results = vec![vec![Vec::new(); targets.len()]; FIO_JOBS.len()];
        for round in 0..rounds {
            for (j, job) in FIO_JOBS.iter().enumerate() {
                for (i, t) in targets.iter().enumerate() {
                    // Start each run without the previous one's dirty data in flight.
                    host.btrfs_sync(&pool_root)?;
                    let mut a = common(t);
                    a.extend([
                        format!("--rw={}", job.rw),
                        format!("--bs={}", job.block_size),
                        format!("--iodepth={}", job.iodepth),
                        "--time_based".into(),
                        format!("--runtime={runtime}"),
                    ]);
                    let out = scratch.work.join(format!("fio-{round}-{j}-{i}.json"));
                    let json = fio(&a, &out)
                        .await
                        .with_context(|| format!("fio {} on {}", job.name, t.label))?;
                    let r =
                        parse_fio(&json, job.reads()).with_context(|| format!("fio {} on {}", job.name, t.label))?;
                    eprintln!(
                        "berth bench fio: round {} {} on {}: {:.0} IOPS",
                        round + 1,
                        job.name,
                        t.label,
                        r.iops
                    );
                    results[j][i].push(r);
                }
            }
        }
        print!("{}", fio_table(&targets, &results));
        for (id, label) in &volumes {
            let name = format!("fio-{label}");
            call(
                || format!("NodeUnpublishVolume {name}"),
                client.node.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: scratch.target_path(&name).to_string_lossy().into_owned(),
                }),
            )
            .await?;
            call(
                || format!("NodeUnstageVolume {name}"),
                client.node.node_unstage_volume(v1::NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: scratch.staging_path(&name).to_string_lossy().into_owned(),
                }),
            )
            .await?;
            call(
                || format!("DeleteVolume {name}"),
                client.controller.delete_volume(v1::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                }),
            )
            .await?;
        }
        Ok(())
    })
}

/// Creates, stages and publishes one volume named `fio-<label>`; returns its id and target.
async fn publish_one(
    client: &mut Client,
    scratch: &Scratch,
    class: VolumeClass,
    capacity: u64,
) -> Result<(String, PathBuf)> {
    let name = format!("fio-{}", class.label());
    let cap = class.capability();
    let resp = call(
        || format!("CreateVolume {name}"),
        client.controller.create_volume(v1::CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: i64_of(capacity)?,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            parameters: class.parameters(),
            ..Default::default()
        }),
    )
    .await?;
    let id = resp
        .volume
        .map(|v| v.volume_id)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| anyhow!("CreateVolume {name} answered without a volume id"))?;
    let staging = scratch.staging_path(&name).to_string_lossy().into_owned();
    let target = scratch.target_path(&name);
    call(
        || format!("NodeStageVolume {name}"),
        client.node.node_stage_volume(v1::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        }),
    )
    .await?;
    call(
        || format!("NodePublishVolume {name}"),
        client.node.node_publish_volume(v1::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging,
            target_path: target.to_string_lossy().into_owned(),
            volume_capability: Some(cap),
            ..Default::default()
        }),
    )
    .await?;
    Ok((id, target))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn csi_defaults_and_smoke() {
        let cli = Cli::try_parse_from(["bench", "csi"]).unwrap();
        let BenchCommand::Csi(a) = cli.bench.what else {
            panic!("not csi")
        };
        assert_eq!(
            a.kinds,
            [VolumeKind::Dir, VolumeKind::Fs, VolumeKind::Block, VolumeKind::Tmpfs]
        );
        assert_eq!(a.size, 64 * MIB);
        assert_eq!(a.fs, FsType::Ext4);
        assert_eq!(a.count, None);

        let cli = Cli::try_parse_from([
            "bench", "csi", "--kinds", "fs,dir", "--smoke", "--fs", "xfs", "--size", "300M",
        ])
        .unwrap();
        let BenchCommand::Csi(a) = cli.bench.what else {
            panic!("not csi")
        };
        assert_eq!(a.kinds, [VolumeKind::Fs, VolumeKind::Dir]);
        assert!(a.smoke);
        assert_eq!(a.fs, FsType::Xfs);
        assert!(Cli::try_parse_from(["bench", "csi", "--kinds", "nfs"]).is_err());
    }

    #[test]
    fn classes_ask_for_their_kind() {
        let fs = VolumeClass {
            kind: VolumeKind::Fs,
            fs: FsType::Xfs,
        };
        assert_eq!(fs.label(), "fs-xfs");
        assert_eq!(fs.parameters()["kind"], "fs");
        assert_eq!(fs.parameters()["csi.storage.k8s.io/fstype"], "xfs");
        let block = VolumeClass {
            kind: VolumeKind::Block,
            fs: FsType::Ext4,
        };
        assert_eq!(block.parameters().len(), 1);
        assert!(matches!(
            block.capability().access_type,
            Some(v1::volume_capability::AccessType::Block(_))
        ));
    }

    #[test]
    fn pool_fits_every_image_of_one_kind() {
        assert_eq!(
            csi_pool_size(&[VolumeKind::Dir, VolumeKind::Tmpfs], 1000, 64 * MIB),
            2 * GIB
        );
        assert_eq!(csi_pool_size(&[VolumeKind::Fs], 1000, 16 * MIB), 16_000 * MIB + GIB);
        assert_eq!(csi_pool_size(&[VolumeKind::Block], 1, 1), 2 * GIB);
    }

    #[test]
    fn latency_table_prints_milliseconds() {
        let mut row = OpLatency::new("dir", "CreateVolume").unwrap();
        for us in [400, 500, 600, 700] {
            row.record(Duration::from_micros(us));
        }
        row.record(Duration::ZERO);
        let table = latency_table(&[row]);
        let line = table.lines().nth(1).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols, ["dir", "CreateVolume", "5", "0.500", "0.700", "0.700"]);
    }

    const FIO_JSON: &str = r#"{
      "fio version" : "fio-3.33",
      "jobs" : [ {
        "jobname" : "berth", "error" : 0,
        "read" : { "io_bytes" : 0, "bw_bytes" : 0, "bw" : 0, "iops" : 0.000000 },
        "write" : { "io_bytes" : 104857600, "bw_bytes" : 52428800, "bw" : 51200, "iops" : 12800.5 }
      } ]
    }"#;

    #[test]
    fn parses_fio_json() {
        let r = parse_fio(FIO_JSON, false).unwrap();
        assert_eq!(
            r,
            FioResult {
                iops: 12800.5,
                bytes_per_sec: 52_428_800.0
            }
        );
        assert_eq!(parse_fio(FIO_JSON, true).unwrap().iops, 0.0);
        let old = FIO_JSON.replace(r#""bw_bytes" : 52428800, "#, "");
        assert_eq!(parse_fio(&old, false).unwrap().bytes_per_sec, 52_428_800.0);
        assert!(parse_fio(&FIO_JSON.replace(r#""error" : 0"#, r#""error" : 5"#), false).is_err());
        assert!(parse_fio("fio: something went wrong", false).is_err());
        assert!(parse_fio(r#"{"jobs": []}"#, false).is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn fio_table_gives_ratios_to_the_pool() {
        let targets = ["pool fs", "dir volume", "fs-ext4 volume"].map(|l| FioTarget {
            label: l.into(),
            dir: PathBuf::new(),
        });
        let r = |iops: f64| FioResult {
            iops,
            bytes_per_sec: iops * 4096.0,
        };
        // The pool is slow in round 2, and so is the dir volume: the paired ratio stays near 1.
        let results: Vec<Vec<Vec<FioResult>>> = (0..3)
            .map(|_| {
                vec![
                    vec![r(1000.0), r(500.0), r(1000.0)],
                    vec![r(950.0), r(490.0), r(900.0)],
                    vec![r(500.0), r(250.0), r(500.0)],
                ]
            })
            .collect();
        let table = fio_table(&targets, &results);
        let cols = |n: usize| {
            table
                .lines()
                .nth(n)
                .unwrap()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(cols(1)[cols(1).len() - 2..], ["1.000", "1.00-1.00"]);
        assert_eq!(cols(2)[cols(2).len() - 2..], ["0.950", "0.90-0.98"]);
        assert_eq!(cols(2)[cols(2).len() - 4], "900");
        assert_eq!(cols(3)[cols(3).len() - 2..], ["0.500", "0.50-0.50"]);
    }
}

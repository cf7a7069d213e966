//! `berth`: one binary, a subcommand per role.
//!
//! Parses the command line, sets up logging, wires the engine to its servers and handles
//! signals. Decisions live in the library crates.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use berth_host::{HostOps, LinuxHost};
use berth_storage::{BerthDriver, Engine, EngineConfig};

/// mimalloc: the control plane allocates many small JSON values per write, and glibc's malloc
/// was a quarter of the server's CPU while binding (perf, 10k pairs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_api;
mod bench_bind;
mod control;
mod docker_cli;
mod server;

#[derive(Debug, Parser)]
#[command(name = "berth", version, about = "Persistent storage for containers")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BERTH_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Options shared by every role that owns a data dir. Flags override the config file.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct NodeOpts {
    /// A YAML config file (see docs/config.md): dataDir, nodeId, pools, defaultPoolSize,
    /// tmpfsBudget, maxVolumesPerNode, spareSubvolumes.
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Where Berth keeps its journal and its default pool [default: /var/lib/berth].
    #[arg(long, env = "BERTH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// This node's name (topology `topology.berth.dev/node`). Default: the host name.
    #[arg(long, env = "BERTH_NODE_ID")]
    node_id: Option<String>,
    /// An extra pool, NAME=PATH; repeatable. PATH on btrfs is used as is, elsewhere Berth makes
    /// a btrfs image in it.
    #[arg(long = "pool", value_parser = parse_pool)]
    pools: Vec<(String, PathBuf)>,
    /// Size of a pool image Berth creates (bytes; K, M, G, T suffixes). Default: half the free
    /// space, at most 100G.
    #[arg(long, value_parser = parse_size)]
    default_pool_size: Option<u64>,
    /// Memory all tmpfs volumes may use together (default: the size of /dev/shm).
    #[arg(long, value_parser = parse_size)]
    tmpfs_budget: Option<u64>,
    /// Volumes this node accepts (0: no limit), reported in NodeGetInfo.
    #[arg(long)]
    max_volumes_per_node: Option<i64>,
    /// Empty subvolumes each pool keeps ready so that a dir CreateVolume is a rename
    /// (0: every create makes its own) [default: 4].
    #[arg(long)]
    spare_subvolumes: Option<usize>,
}

/// The config file. Unknown keys are refused, so a typo is not silently ignored.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    node_id: Option<String>,
    #[serde(default)]
    pools: Vec<PoolEntry>,
    default_pool_size: Option<String>,
    tmpfs_budget: Option<String>,
    max_volumes_per_node: Option<i64>,
    spare_subvolumes: Option<usize>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolEntry {
    name: String,
    path: PathBuf,
}

impl NodeOpts {
    /// Applies the config file under the flags.
    fn merged(mut self) -> Result<NodeOpts> {
        let Some(path) = self.config.take() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: ConfigFile = serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let size = |field: &str, v: Option<String>| -> Result<Option<u64>> {
            v.map(|v| parse_size(&v).map_err(|e| anyhow::anyhow!("{}: {field}: {e}", path.display())))
                .transpose()
        };
        let mut pools = Vec::new();
        for p in file.pools {
            pools.push(
                parse_pool(&format!("{}={}", p.name, p.path.display()))
                    .map_err(|e| anyhow::anyhow!("{}: pools: {e}", path.display()))?,
            );
        }
        pools.append(&mut self.pools);
        Ok(NodeOpts {
            config: None,
            data_dir: self.data_dir.or(file.data_dir),
            node_id: self.node_id.or(file.node_id),
            pools,
            default_pool_size: self
                .default_pool_size
                .or(size("defaultPoolSize", file.default_pool_size)?),
            tmpfs_budget: self.tmpfs_budget.or(size("tmpfsBudget", file.tmpfs_budget)?),
            max_volumes_per_node: self.max_volumes_per_node.or(file.max_volumes_per_node),
            spare_subvolumes: self.spare_subvolumes.or(file.spare_subvolumes),
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the built-in storage engine as a CSI driver (controller and node).
    Csi {
        /// unix:///path/to/csi.sock
        #[arg(long, default_value = "unix:///run/berth/csi.sock", env = "CSI_ENDPOINT")]
        endpoint: String,
        #[command(flatten)]
        node: NodeOpts,
    },
    /// Unmount everything Berth mounted for a data dir and detach its loop devices (data stays).
    Teardown {
        #[arg(long, default_value = "/var/lib/berth")]
        data_dir: PathBuf,
    },
    /// The all-in-one control plane: the Kubernetes API (kubectl is the client) over TLS,
    /// backed by the embedded store in --data-dir; writes DATA/admin.kubeconfig.
    Server(server::ServerArgs),
    /// Measure CSI call latencies and the data path; prints figures.
    Bench(bench::BenchArgs),
    /// Snapshots of Docker volumes: snapshot, snapshots, rm-snapshot (asks the running plugin).
    Volume {
        #[command(subcommand)]
        command: docker_cli::VolumeCommand,
    },
    /// Serve the Docker volume-plugin protocol (`docker volume create -d berth`).
    DockerPlugin {
        /// The unix socket Docker finds the plugin at (mode 0600; the parent is created).
        #[arg(long, default_value = berth_docker::DEFAULT_SOCKET, env = "BERTH_DOCKER_SOCKET")]
        socket: PathBuf,
        #[command(flatten)]
        node: NodeOpts,
    },
}

fn parse_pool(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or("expected NAME=PATH")?;
    berth_storage::id::check_client_id(name).map_err(|e| format!("pool name {name:?} {e}"))?;
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!("pool path {} must be absolute", path.display()));
    }
    Ok((name.to_owned(), path))
}

/// Parses `4294967296`, `512M`, `4G`, `1Ti`.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let shift = match unit.trim_end_matches(['i', 'B']) {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colour codes when stderr is a file or a pipe (dockerd logs a managed plugin's stderr).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub(crate) fn engine_config(node: NodeOpts) -> Result<EngineConfig> {
    let node = node.merged()?;
    let data_dir = node.data_dir.unwrap_or_else(|| PathBuf::from("/var/lib/berth"));
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating data dir {}", data_dir.display()))?;
    // Paths are compared with what the kernel reports (mountinfo, loop backing files), which
    // are canonical.
    let data_dir =
        std::fs::canonicalize(&data_dir).with_context(|| format!("resolving data dir {}", data_dir.display()))?;
    let node_id = match node.node_id {
        Some(n) => n,
        None => rustix::system::uname().nodename().to_string_lossy().into_owned(),
    };
    if node_id.is_empty() || node_id.len() > 128 {
        bail!("--node-id must be 1 to 128 bytes");
    }
    let mut pools = Vec::new();
    for (name, path) in node.pools {
        std::fs::create_dir_all(&path).with_context(|| format!("creating pool dir {}", path.display()))?;
        pools.push((name, std::fs::canonicalize(&path)?));
    }
    Ok(EngineConfig {
        data_dir,
        node_id,
        pools,
        pool_image_size: node.default_pool_size,
        tmpfs_budget: node.tmpfs_budget,
        max_volumes_per_node: node.max_volumes_per_node.unwrap_or(0),
        spare_subvolumes: node
            .spare_subvolumes
            .unwrap_or(berth_storage::engine::DEFAULT_SPARE_SUBVOLUMES),
    })
}

pub(crate) fn open_engine(cfg: EngineConfig) -> Result<Arc<Engine>> {
    let host: Arc<dyn HostOps> = Arc::new(LinuxHost::default());
    Ok(Arc::new(
        Engine::open(host, cfg).context("starting the storage engine")?,
    ))
}

/// `berth docker-plugin`: the engine served to Docker until SIGTERM; mounts stay (containers
/// may be running), and the next start picks up the recorded mount counts.
fn docker_plugin(socket: PathBuf, node: NodeOpts) -> Result<()> {
    let engine = open_engine(engine_config(node)?)?;
    let plugin = Arc::new(berth_docker::open(engine).context("opening the Docker plugin state")?);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = berth_docker::bind(&socket)?;
        tracing::info!(socket = %socket.display(), "serving the Docker volume plugin");
        berth_docker::serve(listener, plugin, shutdown_signal()).await;
        // Docker finds plugins by their socket: leave none behind that answers nothing.
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Csi { endpoint, node } => {
            let cfg = engine_config(node)?;
            let engine = open_engine(cfg)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let driver = Arc::new(BerthDriver::new(engine));
                tracing::info!(%endpoint, "serving CSI");
                berth_csi::serve_unix(&endpoint, driver, shutdown_signal())
                    .await
                    .context("serving CSI")
            })
        }
        Command::Teardown { data_dir } => {
            let data_dir = std::fs::canonicalize(&data_dir)
                .with_context(|| format!("resolving data dir {}", data_dir.display()))?;
            berth_storage::teardown::teardown(&LinuxHost::default(), &data_dir)?;
            Ok(())
        }
        Command::Server(args) => server::run(args, shutdown_signal()),
        Command::Bench(args) => bench::run(args),
        Command::DockerPlugin { socket, node } => docker_plugin(socket, node),
        Command::Volume { command } => docker_cli::run(command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4294967296"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4Gi"), Ok(4 << 30));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn config_file_fills_in_under_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.yaml");
        std::fs::write(
            &path,
            "dataDir: /srv/berth\nnodeId: n7\ndefaultPoolSize: 8G\nspareSubvolumes: 2\npools:\n  - name: fast\n    path: /mnt/fast\n",
        )
        .unwrap();
        let opts = NodeOpts {
            config: Some(path.clone()),
            node_id: Some("flag-wins".into()),
            ..NodeOpts::default()
        }
        .merged()
        .unwrap();
        assert_eq!(opts.data_dir, Some(PathBuf::from("/srv/berth")));
        assert_eq!(opts.node_id.as_deref(), Some("flag-wins"));
        assert_eq!(opts.default_pool_size, Some(8 << 30));
        assert_eq!(opts.spare_subvolumes, Some(2));
        assert_eq!(opts.pools, vec![("fast".to_owned(), PathBuf::from("/mnt/fast"))]);

        std::fs::write(&path, "dataDir: /x\ncolour: blue\n").unwrap();
        let err = NodeOpts {
            config: Some(path),
            ..NodeOpts::default()
        }
        .merged()
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn pools_parse() {
        assert_eq!(
            parse_pool("fast=/mnt/fast"),
            Ok(("fast".into(), PathBuf::from("/mnt/fast")))
        );
        assert!(parse_pool("fast").is_err());
        assert!(parse_pool("../x=/mnt").is_err());
        assert!(parse_pool("fast=rel").is_err());
    }
}

//! `berth server`: the all-in-one role's control plane on one host. It owns its data dir
//! (an exclusive lock), opens the embedded redb store (or etcd with `--store etcd://…`),
//! makes the CA, server certificate, tokens and kubeconfigs on first start, and serves the
//! Kubernetes API over TLS until SIGTERM/SIGINT.
//!
//! With `--csi-endpoint` and/or `--docker-socket` it also serves the built-in storage engine
//! in the same process (one engine, as ARCHITECTURE.md asks of roles sharing pools), as
//! `berth csi` and `berth docker-plugin` do; those need root.
//!
//! Safe to SIGKILL at any moment: every acknowledged write is already durable in the store,
//! and the next start reuses the certificates and tokens it finds.

use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use berth_store::{RedbOptions, RedbStore, Store};

/// Flags of `berth server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Where the store, certificates and kubeconfigs live.
    #[arg(long, default_value = "/var/lib/berth", env = "BERTH_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address to serve HTTPS on (port 0: any free port; the kubeconfig names the real one).
    #[arg(long, default_value = "127.0.0.1:6443", env = "BERTH_LISTEN")]
    pub listen: SocketAddr,
    /// `redb` (embedded, in the data dir) or `etcd://HOST:PORT[,HOST:PORT…]`.
    #[arg(long, default_value = "redb", env = "BERTH_STORE")]
    pub store: String,
    /// An extra DNS name or IP for the server certificate (first start only); repeatable.
    #[arg(long = "tls-san")]
    pub tls_sans: Vec<String>,
    /// Where the built-in CSI driver is served (the storage roles need root).
    #[arg(long, default_value = "unix:///run/berth/csi.sock")]
    pub csi_endpoint: String,
    /// Where the Docker volume plugin is served.
    #[arg(long, default_value = "/run/docker/plugins/berth.sock")]
    pub docker_socket: PathBuf,
    /// Serve the API alone: no storage engine, no pool, no CSI driver, no Docker plugin.
    #[arg(long)]
    pub api_only: bool,
    /// Do not run the storage controllers (binder, provisioner, ...): the API and the
    /// storage roles only, for measuring the API server alone.
    #[arg(long)]
    pub no_controllers: bool,
    /// Another CSI driver's endpoint (`unix:///path`) for the controllers to provision, attach,
    /// expand and snapshot with, under the name it reports; repeatable. Berth's own driver is
    /// always included when the storage roles run.
    #[arg(long = "csi-driver")]
    pub csi_drivers: Vec<String>,
    /// The storage engine's pools (its data dir is --data-dir).
    #[arg(long = "pool", value_parser = crate::parse_pool)]
    pub pools: Vec<(String, PathBuf)>,
    /// Size of a pool image the engine creates (K, M, G, T suffixes).
    #[arg(long, value_parser = crate::parse_size)]
    pub default_pool_size: Option<u64>,
}

/// Holds the data dir's lock for as long as it lives.
#[derive(Debug)]
struct DataDirLock {
    _file: std::fs::File,
}

fn lock_data_dir(dir: &std::path::Path) -> Result<DataDirLock> {
    let path = dir.join("server.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        bail!(
            "{} is in use by another berth server (lock {} is held); stop it or pass another --data-dir",
            dir.display(),
            path.display()
        );
    }
    Ok(DataDirLock { _file: file })
}

async fn open_store(spec: &str, data_dir: &std::path::Path) -> Result<Arc<dyn Store>> {
    if spec == "redb" {
        let path = data_dir.join("store.redb");
        let store = RedbStore::open(&path, RedbOptions::default())
            .with_context(|| format!("opening the object store {}", path.display()))?;
        return Ok(Arc::new(store));
    }
    if let Some(rest) = spec.strip_prefix("etcd://") {
        let endpoints: Vec<String> = rest.split(',').map(|e| format!("http://{e}")).collect();
        let store = berth_store::EtcdStore::connect(berth_store::EtcdOptions {
            endpoints,
            root: "/berth".into(),
            bookmark_interval: berth_store::DEFAULT_BOOKMARK_INTERVAL,
        })
        .await
        .context("connecting to etcd")?;
        return Ok(Arc::new(store));
    }
    bail!("--store must be `redb` or `etcd://HOST:PORT`, not {spec:?}")
}

/// Runs the server until `shutdown` completes.
pub fn run(args: ServerArgs, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    std::fs::set_permissions(&args.data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("restricting {}", args.data_dir.display()))?;
    let _lock = lock_data_dir(&args.data_dir)?;
    let engine = if !args.api_only {
        if !rustix::process::geteuid().is_root() {
            bail!(
                "berth server serves the CSI driver and the Docker plugin, which need root (mounts, loop devices); run it as root, or pass --api-only to serve the API alone"
            );
        }
        let node = crate::NodeOpts {
            data_dir: Some(args.data_dir.clone()),
            pools: args.pools.clone(),
            default_pool_size: args.default_pool_size,
            ..crate::NodeOpts::default()
        };
        Some(crate::open_engine(crate::engine_config(node)?)?)
    } else {
        None
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        // One shutdown signal for every role served here.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let controllers_stop = stop_rx.clone();
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut roles = tokio::task::JoinSet::new();
        if let Some(engine) = &engine {
            let endpoint = args.csi_endpoint.clone();
            let driver = Arc::new(berth_storage::BerthDriver::new(engine.clone()));
            let stop = stopped();
            tracing::info!(%endpoint, "serving CSI");
            roles.spawn(async move {
                berth_csi::serve_unix(&endpoint, driver, stop)
                    .await
                    .context("serving CSI")
            });
        }
        if let Some(engine) = &engine {
            let socket = args.docker_socket.clone();
            let plugin = Arc::new(berth_docker::open(engine.clone()).context("opening the Docker plugin state")?);
            let listener = berth_docker::bind(&socket)?;
            let stop = stopped();
            tracing::info!(socket = %socket.display(), "serving the Docker volume plugin");
            roles.spawn(async move {
                berth_docker::serve(listener, plugin, stop).await;
                let _ = std::fs::remove_file(&socket);
                Ok(())
            });
        }
        let store = open_store(&args.store, &args.data_dir).await?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let url = match addr {
            SocketAddr::V4(a) => format!("https://{}:{}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("https://[{}]:{}", a.ip(), a.port()),
        };
        let pki =
            berth_apiserver::pki::ensure(&args.data_dir, &url, &args.tls_sans).context("preparing TLS and tokens")?;
        let server = berth_apiserver::ApiServer::new(store.clone(), pki.tokens.clone(), addr.to_string())
            .await
            .map_err(|e| anyhow::anyhow!("starting the API server: {e}"))?;
        if !args.no_controllers {
            let mut endpoints = args.csi_drivers.clone();
            if engine.is_some() {
                endpoints.insert(0, args.csi_endpoint.clone());
            }
            crate::control::start(berth_apiserver::objects::Objects { store }, endpoints, controllers_stop);
            tracing::info!("running the storage controllers");
        }
        tracing::info!(
            %url,
            kubeconfig = %args.data_dir.join("admin.kubeconfig").display(),
            "serving the Kubernetes API"
        );
        let api = berth_apiserver::serve(listener, pki.tls, server.router(), stopped());
        tokio::pin!(api);
        loop {
            tokio::select! {
                _ = &mut api => break,
                // A role that fails takes the server down with its error.
                Some(done) = roles.join_next() => done??,
            }
        }
        while let Some(done) = roles.join_next().await {
            done??;
        }
        Ok(())
    })
}

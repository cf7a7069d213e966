//! A throwaway etcd server for tests and benchmarks: Debian's `etcd` binary on 127.0.0.1 with
//! free ports and a temporary data dir, killed (and its dir removed) when dropped. Not for
//! production use.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{EtcdOptions, EtcdStore, Result, StoreError};

/// A running etcd child process.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    binary: PathBuf,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

/// Where the etcd binary is: `$ETCD_BIN`, else `etcd` on `PATH`.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ETCD_BIN") {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| StoreError::backend("finding a free port", e))
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Fails with a message saying how to install etcd
    /// when the binary is missing.
    pub async fn start() -> Result<Self> {
        let binary = etcd_binary().ok_or_else(|| {
            StoreError::Backend(
                "the etcd binary was not found (looked at $ETCD_BIN and PATH): install Debian's \
                 etcd-server (`apt-get install -y etcd-server`, as scripts/ci-install.sh does)"
                    .into(),
            )
        })?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let data_dir = std::env::temp_dir().join(format!("berth-store-etcd-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| StoreError::backend(&format!("creating {}", data_dir.display()), e))?;
        let mut server = EtcdServer {
            child: None,
            binary,
            data_dir,
            client_port: free_port()?,
            peer_port: free_port()?,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Options for a store on this server, with 200 ms bookmarks.
    pub fn options(&self) -> EtcdOptions {
        EtcdOptions {
            bookmark_interval: Duration::from_millis(200),
            ..EtcdOptions::new(vec![self.endpoint()])
        }
    }

    /// A store on this server.
    pub async fn store(&self) -> Result<EtcdStore> {
        EtcdStore::connect(self.options()).await
    }

    /// SIGKILLs etcd and starts it again on the same data dir and ports.
    pub async fn crash_and_restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<()> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.data_dir.join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| StoreError::backend(&format!("opening {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| StoreError::backend("duplicating the log file", e))?;
        let child = Command::new(&self.binary)
            .arg("--name=berth-test")
            .arg(format!("--data-dir={}", self.data_dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=berth-test={peer}"))
            .arg("--experimental-watch-progress-notify-interval=200ms")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| StoreError::backend(&format!("starting {}", self.binary.display()), e))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(StoreError::Backend(format!(
                    "etcd exited with {status} while starting; its log:\n{log}"
                )));
            }
            let probe = EtcdOptions {
                endpoints: vec![client.clone()],
                ..EtcdOptions::new(Vec::new())
            };
            match tokio::time::timeout(Duration::from_secs(2), EtcdStore::connect(probe)).await {
                Ok(Ok(_)) => return Ok(()),
                _ if Instant::now() > deadline => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    return Err(StoreError::Backend(format!(
                        "etcd did not answer on {client} within 30 s; its log:\n{log}"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL; the process may already be gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

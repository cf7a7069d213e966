//! Harness for Berth's end-to-end tests: runs the real `berth csi` binary as root against real
//! mounts, loop devices and btrfs, and checks from the kernel's side that nothing leaked.
//!
//! Each test gets its own [`Daemon`]: its own temp dir (`$TMPDIR/berth-e2e-*`), data dir, socket,
//! node id and a small default pool. Dropping the `Daemon` stops the process and tears down
//! everything mounted or attached under the temp dir, even when the test failed; a temp dir whose
//! mounts cannot be removed is left in place (and reported) rather than deleted through a mount.
//!
//! Layout the leak checker relies on (what `berth csi` makes under its data dir `D`):
//! - pool filesystems are btrfs on loop devices whose image lies under `D` but on no other mount
//!   under the temp dir; inside a pool, `volumes/<id>` are subvolumes and `images/<id>.img` images;
//! - `spares/<name>` in a pool are spare subvolumes the daemon keeps for dir CreateVolume: at
//!   most [`SPARES`] per pool while it runs (none once it stopped cleanly), each a subvolume;
//! - `D/tmpfs/<id>` holds the tmpfs mount of a tmpfs volume, `D/staged/<id>` the private mount
//!   of a staged fs volume.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth_csi::v1;
use berth_csi::v1::controller_client::ControllerClient;
use berth_csi::v1::identity_client::IdentityClient;
use berth_csi::v1::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Default pool image of a test daemon: small, but fits a few 64 MiB fs volumes.
pub const POOL_SIZE: u64 = GIB;
/// Spare subvolumes the test daemon keeps per pool (`--spare-subvolumes`), Berth's default.
pub const SPARES: usize = 4;
/// Longest any single RPC may take before the test fails instead of hanging.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(90);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const BERTH: &str = env!("CARGO_BIN_EXE_berth");

/// True when the tests can do what they need (mounts, loop devices): root. Prints why otherwise.
pub fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        eprintln!("SKIPPED {test}: needs root (real mounts, loop devices and btrfs qgroups); CI runs as root");
        return true;
    }
    false
}

/// A volume kind and the parameters and capability that ask for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    Fs(&'static str),
    Block,
    Tmpfs,
}

impl Kind {
    pub fn label(self) -> String {
        match self {
            Kind::Dir => "dir".into(),
            Kind::Fs(fs) => format!("fs-{fs}"),
            Kind::Block => "block".into(),
            Kind::Tmpfs => "tmpfs".into(),
        }
    }

    pub fn params(self) -> HashMap<String, String> {
        let mut p = HashMap::new();
        let kind = match self {
            Kind::Dir => "dir",
            Kind::Fs(fs) => {
                p.insert("csi.storage.k8s.io/fstype".into(), fs.into());
                "fs"
            }
            Kind::Block => "block",
            Kind::Tmpfs => "tmpfs",
        };
        p.insert("kind".into(), kind.into());
        p
    }

    pub fn capability(self) -> v1::VolumeCapability {
        match self {
            Kind::Block => block_capability(),
            Kind::Fs(fs) => mount_capability(fs),
            Kind::Dir | Kind::Tmpfs => mount_capability(""),
        }
    }

    /// A size that suits the kind in these tests.
    pub fn test_size(self) -> u64 {
        match self {
            Kind::Fs("xfs") => 300 * MIB,
            Kind::Fs(_) => 64 * MIB,
            Kind::Dir | Kind::Block | Kind::Tmpfs => 16 * MIB,
        }
    }
}

fn access_mode() -> Option<v1::volume_capability::AccessMode> {
    Some(v1::volume_capability::AccessMode {
        mode: v1::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
    })
}

pub fn mount_capability(fs_type: &str) -> v1::VolumeCapability {
    v1::VolumeCapability {
        access_type: Some(v1::volume_capability::AccessType::Mount(
            v1::volume_capability::MountVolume {
                fs_type: fs_type.into(),
                ..Default::default()
            },
        )),
        access_mode: access_mode(),
    }
}

pub fn block_capability() -> v1::VolumeCapability {
    v1::VolumeCapability {
        access_type: Some(v1::volume_capability::AccessType::Block(
            v1::volume_capability::BlockVolume {},
        )),
        access_mode: access_mode(),
    }
}

/// Runs one RPC with a deadline, so that a hung driver fails the test instead of hanging it.
pub async fn call<T>(rpc: impl Future<Output = Result<tonic::Response<T>, Status>>) -> Result<T, Status> {
    match tokio::time::timeout(RPC_TIMEOUT, rpc).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "test harness: no answer within {RPC_TIMEOUT:?}"
        ))),
    }
}

/// Asserts that `result` failed with one of `codes`; returns the status.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(what: &str, result: Result<T, Status>, codes: &[Code]) -> Status {
    match result {
        Ok(v) => panic!("{what}: expected {codes:?}, got OK: {v:?}"),
        Err(s) if codes.contains(&s.code()) => s,
        Err(s) => panic!("{what}: expected {codes:?}, got {:?}: {}", s.code(), s.message()),
    }
}

/// Like [`expect_code`], but records a mismatch in `failures` instead of panicking.
pub fn check_code<T: std::fmt::Debug>(
    failures: &mut Vec<String>,
    what: &str,
    result: Result<T, Status>,
    codes: &[Code],
) {
    match result {
        Ok(v) => failures.push(format!("{what}: expected {codes:?}, got OK: {v:?}")),
        Err(s) if codes.contains(&s.code()) => {}
        Err(s) => failures.push(format!(
            "{what}: expected {codes:?}, got {:?}: {}",
            s.code(),
            s.message()
        )),
    }
}

/// Records in `failures` when `result` is not OK.
pub fn check_ok<T>(failures: &mut Vec<String>, what: String, result: Result<T, Status>) {
    if let Err(s) = result {
        failures.push(format!("{what}: expected OK, got {:?}: {}", s.code(), s.message()));
    }
}

/// CSI clients on one connection, with the calls the tests make. Cheap to clone into tasks.
#[derive(Clone, Debug)]
pub struct Csi {
    channel: Channel,
}

impl Csi {
    pub async fn connect(endpoint: &str) -> Result<Csi, String> {
        let channel = berth_csi::client::connect(endpoint).await.map_err(|e| format!("{e}"))?;
        Ok(Csi { channel })
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    /// Probe: `ready` unset means ready.
    pub async fn probe(&self) -> Result<bool, Status> {
        let resp = call(self.identity().probe(v1::ProbeRequest {})).await?;
        Ok(resp.ready.unwrap_or(true))
    }

    /// The CreateVolume a CO sends for `kind` with required == limit == `bytes`.
    pub fn create_request(name: &str, kind: Kind, bytes: u64) -> v1::CreateVolumeRequest {
        v1::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: bytes as i64,
            }),
            volume_capabilities: vec![kind.capability()],
            parameters: kind.params(),
            ..Default::default()
        }
    }

    pub async fn create(&self, name: &str, kind: Kind, bytes: u64) -> Result<v1::Volume, Status> {
        self.create_with(Self::create_request(name, kind, bytes)).await
    }

    pub async fn create_with(&self, req: v1::CreateVolumeRequest) -> Result<v1::Volume, Status> {
        let resp = call(self.controller().create_volume(req)).await?;
        resp.volume
            .ok_or_else(|| Status::internal("test harness: CreateVolume answered OK without a volume"))
    }

    pub async fn delete(&self, volume_id: &str) -> Result<(), Status> {
        call(self.controller().delete_volume(v1::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        }))
        .await
        .map(drop)
    }

    pub async fn get(&self, volume_id: &str) -> Result<v1::ControllerGetVolumeResponse, Status> {
        call(self.controller().controller_get_volume(v1::ControllerGetVolumeRequest {
            volume_id: volume_id.into(),
        }))
        .await
    }

    /// Every volume id ListVolumes returns, following next_token in small pages.
    pub async fn list_ids(&self) -> Result<Vec<String>, Status> {
        let mut ids = Vec::new();
        let mut token = String::new();
        for _ in 0..10_000 {
            let resp = call(self.controller().list_volumes(v1::ListVolumesRequest {
                max_entries: 7,
                starting_token: token.clone(),
            }))
            .await?;
            ids.extend(resp.entries.into_iter().filter_map(|e| e.volume).map(|v| v.volume_id));
            if resp.next_token.is_empty() {
                return Ok(ids);
            }
            token = resp.next_token;
        }
        Err(Status::internal("test harness: ListVolumes pagination never ended"))
    }

    pub fn stage_request(vol: &v1::Volume, kind: Kind, staging: &Path) -> v1::NodeStageVolumeRequest {
        v1::NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: path_str(staging),
            volume_capability: Some(kind.capability()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        }
    }

    pub async fn stage(&self, vol: &v1::Volume, kind: Kind, staging: &Path) -> Result<(), Status> {
        self.stage_with(Self::stage_request(vol, kind, staging)).await
    }

    pub async fn stage_with(&self, req: v1::NodeStageVolumeRequest) -> Result<(), Status> {
        call(self.node().node_stage_volume(req)).await.map(drop)
    }

    pub async fn unstage(&self, volume_id: &str, staging: &Path) -> Result<(), Status> {
        call(self.node().node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: path_str(staging),
        }))
        .await
        .map(drop)
    }

    pub fn publish_request(
        vol: &v1::Volume,
        kind: Kind,
        staging: &Path,
        target: &Path,
    ) -> v1::NodePublishVolumeRequest {
        v1::NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: path_str(staging),
            target_path: path_str(target),
            volume_capability: Some(kind.capability()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        }
    }

    pub async fn publish(&self, vol: &v1::Volume, kind: Kind, staging: &Path, target: &Path) -> Result<(), Status> {
        self.publish_with(Self::publish_request(vol, kind, staging, target))
            .await
    }

    pub async fn publish_with(&self, req: v1::NodePublishVolumeRequest) -> Result<(), Status> {
        call(self.node().node_publish_volume(req)).await.map(drop)
    }

    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), Status> {
        call(self.node().node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: path_str(target),
        }))
        .await
        .map(drop)
    }

    pub async fn stats(&self, volume_id: &str, path: &Path) -> Result<v1::NodeGetVolumeStatsResponse, Status> {
        call(self.node().node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
            volume_id: volume_id.into(),
            volume_path: path_str(path),
            ..Default::default()
        }))
        .await
    }
}

/// The BYTES entry of a NodeGetVolumeStats answer.
pub fn bytes_usage(resp: &v1::NodeGetVolumeStatsResponse) -> Option<v1::VolumeUsage> {
    resp.usage
        .iter()
        .find(|u| u.unit == v1::volume_usage::Unit::Bytes as i32)
        .cloned()
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// One running (or stopped) `berth csi`, its temp dir, and everything it made there.
#[derive(Debug)]
pub struct Daemon {
    /// The test's temp dir: data dir, socket, staging and target paths, logs.
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub endpoint: String,
    pub node_id: String,
    child: Option<Child>,
    starts: u32,
    csi: Option<Csi>,
}

impl Daemon {
    /// Starts `berth csi` in a fresh temp dir and waits until Probe says ready.
    pub async fn start(name: &str) -> Daemon {
        Self::start_with(name, None).await
    }

    /// Like [`Daemon::start`], with `BERTH_CRASH_AT=crash_at` when given.
    pub async fn start_with(name: &str, crash_at: Option<&str>) -> Daemon {
        let root = tempfile::Builder::new()
            .prefix("berth-e2e-")
            .tempdir()
            .expect("create temp dir")
            .keep();
        let root = fs::canonicalize(&root).expect("canonicalize temp dir");
        write_owner(&root);
        let mut d = Daemon {
            data_dir: root.join("data"),
            socket: root.join("csi.sock"),
            endpoint: format!("unix://{}", root.join("csi.sock").display()),
            node_id: format!("e2e-{name}"),
            root,
            child: None,
            starts: 0,
            csi: None,
        };
        d.spawn(crash_at);
        d.wait_ready().await;
        d
    }

    fn spawn(&mut self, crash_at: Option<&str>) {
        self.starts += 1;
        let log_path = self.root.join(format!("berth.{}.log", self.starts));
        let log = fs::File::create(&log_path).expect("create daemon log");
        let err = log.try_clone().expect("clone log fd");
        let mut cmd = Command::new(BERTH);
        cmd.arg("csi")
            .arg("--endpoint")
            .arg(&self.endpoint)
            .arg("--node-id")
            .arg(&self.node_id)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--default-pool-size")
            .arg(POOL_SIZE.to_string())
            .arg("--spare-subvolumes")
            .arg(SPARES.to_string())
            .env_remove("BERTH_CRASH_AT")
            .env_remove("BERTH_CONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if let Some(point) = crash_at {
            cmd.env("BERTH_CRASH_AT", point);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {BERTH}: {e}"));
        self.child = Some(child);
        self.csi = None;
    }

    /// Waits until the socket answers Probe with ready, failing if the process exits first.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("socket not there yet");
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "berth csi exited before it was ready ({status}); log:\n{}",
                    self.log_tail(40)
                );
            }
            if self.socket.exists() {
                match Csi::connect(&self.endpoint).await {
                    Ok(csi) => match csi.probe().await {
                        Ok(true) => {
                            self.csi = Some(csi);
                            return;
                        }
                        Ok(false) => last = "Probe says not ready".into(),
                        Err(s) => last = format!("Probe: {:?}: {}", s.code(), s.message()),
                    },
                    Err(e) => last = format!("connect: {e}"),
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "berth csi not ready within {READY_TIMEOUT:?} ({last}); log:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clients on the current connection (a new one after every restart).
    pub fn csi(&self) -> Csi {
        self.csi.clone().expect("daemon is not running")
    }

    /// Stops the daemon with SIGTERM (volumes stay staged and published) and starts it again.
    pub async fn restart(&mut self) {
        self.restart_with(None).await;
    }

    pub async fn restart_with(&mut self, crash_at: Option<&str>) {
        let status = self.stop();
        if let Some(status) = status {
            assert!(
                status.success(),
                "berth csi exited with {status} on SIGTERM; log:\n{}",
                self.log_tail(40)
            );
        }
        self.spawn(crash_at);
        self.wait_ready().await;
    }

    /// After an RPC that was to reach a crash point: asserts the process killed itself with
    /// SIGKILL and that the RPC did not report success, then starts it again without crash points.
    pub async fn expect_crash_and_restart<T: std::fmt::Debug>(&mut self, point: &str, result: Result<T, Status>) {
        match &result {
            Ok(v) => panic!("{point}: the RPC answered OK ({v:?}) although the driver was to die there"),
            Err(s) => assert!(
                matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled),
                "{point}: expected the RPC to fail as the process died (Unavailable/Unknown), got {:?}: {}",
                s.code(),
                s.message()
            ),
        }
        let status = self.wait_exit(Duration::from_secs(30));
        match status {
            Some(st) => assert_eq!(
                st.signal(),
                Some(libc::SIGKILL),
                "{point}: berth should have killed itself with SIGKILL, exited with {st}; log:\n{}",
                self.log_tail(40)
            ),
            None => panic!(
                "{point}: berth is still running after the RPC failed; log:\n{}",
                self.log_tail(40)
            ),
        }
        self.child = None;
        self.spawn(None);
        self.wait_ready().await;
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }

    /// The default pool's `spares/` directory.
    pub fn spares_dir(&self) -> PathBuf {
        let pool = self.data_dir.join("pools").join("default");
        let on_image = pool.join("fs").join("spares");
        if on_image.exists() {
            on_image
        } else {
            pool.join("spares")
        }
    }

    /// Waits until the default pool holds at least `n` spare subvolumes (the daemon makes them
    /// in the background after it starts).
    pub async fn wait_for_spares(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while dir_names(&self.spares_dir()).len() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} spare subvolumes in {} after 30 s; log:\n{}",
                self.spares_dir().display(),
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the daemon with SIGKILL, as a crash would, and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.csi = None;
    }

    /// Sends SIGTERM and waits (SIGKILL after 15 s). Returns how the process ended.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        if let Ok(Some(st)) = child.try_wait() {
            self.child = None;
            return Some(st);
        }
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let status = match self.wait_exit(Duration::from_secs(15)) {
            Some(st) => Some(st),
            None => {
                eprintln!("berth csi (pid {pid}) ignored SIGTERM for 15 s; killing it");
                let child = self.child.as_mut()?;
                let _ = child.kill();
                child.wait().ok()
            }
        };
        self.child = None;
        self.csi = None;
        status
    }

    /// A directory for a staging path (the CO creates staging dirs).
    pub fn stage_dir(&self, name: &str) -> PathBuf {
        let p = self.root.join("staging").join(name);
        fs::create_dir_all(&p).expect("create staging dir");
        p
    }

    /// A target path whose parent exists; the driver creates the target itself.
    pub fn target_path(&self, name: &str) -> PathBuf {
        let parent = self.root.join("targets");
        fs::create_dir_all(&parent).expect("create targets dir");
        parent.join(name)
    }

    /// The last `n` lines of every log this daemon wrote.
    pub fn log_tail(&self, n: usize) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            let path = self.root.join(format!("berth.{i}.log"));
            let text = fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} (last {n} lines)\n", path.display()));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Everything the daemon left that no live volume explains, plus live volumes without a
    /// backing object. Call it when no volume is staged or published.
    pub async fn leaks(&self) -> Vec<String> {
        let live: BTreeSet<String> = self
            .csi()
            .list_ids()
            .await
            .unwrap_or_else(|s| panic!("ListVolumes: {:?}: {}", s.code(), s.message()))
            .into_iter()
            .collect();
        let mut leaks = Vec::new();
        let mounts = mounts_under(&self.root);
        let loops = loops_under(&self.root);

        // A pool is a loop device whose image sits under the data dir but on no mount under the
        // temp dir, and whose filesystem is mounted.
        let pool_loops: BTreeSet<String> = loops
            .iter()
            .filter(|l| !mounts.iter().any(|m| l.backing.starts_with(&m.mount_point)))
            .filter(|l| mounts.iter().any(|m| m.source == l.device))
            .map(|l| l.device.clone())
            .collect();
        let mut pool_roots = Vec::new();
        let mut seen = BTreeMap::<PathBuf, usize>::new();
        let tmpfs_dir = self.data_dir.join("tmpfs");
        for m in &mounts {
            *seen.entry(m.mount_point.clone()).or_default() += 1;
            if pool_loops.contains(&m.source) && m.root == "/" && !pool_roots.contains(&m.mount_point) {
                pool_roots.push(m.mount_point.clone());
                continue;
            }
            let is_live_tmpfs = m.fstype == "tmpfs"
                && m.mount_point.parent() == Some(tmpfs_dir.as_path())
                && file_name(&m.mount_point).is_some_and(|n| live.contains(&n));
            if !is_live_tmpfs {
                leaks.push(format!(
                    "mount {} ({} from {}, root {})",
                    m.mount_point.display(),
                    m.fstype,
                    m.source,
                    m.root
                ));
            }
        }
        for (mp, n) in seen {
            if n > 1 {
                leaks.push(format!("{n} mounts stacked at {}", mp.display()));
            }
        }
        for l in &loops {
            if !pool_loops.contains(&l.device) {
                leaks.push(format!("loop device {} backed by {}", l.device, l.backing.display()));
            }
        }
        if pool_roots.is_empty() {
            leaks.push(format!("no pool filesystem mounted under {}", self.data_dir.display()));
        }

        let mut backed = BTreeSet::new();
        for pool in &pool_roots {
            for name in dir_names(&pool.join("volumes")) {
                if !live.contains(&name) {
                    leaks.push(format!(
                        "subvolume dir {}/volumes/{name} of no listed volume",
                        pool.display()
                    ));
                }
                backed.insert(name);
            }
            for name in dir_names(&pool.join("images")) {
                match name.strip_suffix(".img") {
                    Some(id) if live.contains(id) => {
                        backed.insert(id.to_owned());
                    }
                    _ => leaks.push(format!("image {}/images/{name} of no listed volume", pool.display())),
                }
            }
            leaks.extend(btrfs_leaks(pool, &live));
        }
        for name in dir_names(&tmpfs_dir) {
            if !live.contains(&name) {
                leaks.push(format!("{}/{name} of no listed volume", tmpfs_dir.display()));
            }
            backed.insert(name);
        }
        for name in dir_names(&self.data_dir.join("staged")) {
            leaks.push(format!(
                "{}/staged/{name} although nothing is staged",
                self.data_dir.display()
            ));
        }
        for id in &live {
            if !backed.contains(id) {
                leaks.push(format!("listed volume {id} has no subvolume, image or tmpfs (lost)"));
            }
        }
        leaks
    }

    /// Panics with the list of leaks, if any (see [`Daemon::leaks`]).
    pub async fn assert_clean(&self) {
        let leaks = self.leaks().await;
        assert!(
            leaks.is_empty(),
            "berth left state behind:\n  {}\nlog:\n{}",
            leaks.join("\n  "),
            self.log_tail(30)
        );
    }

    /// Unmounts and detaches everything under the temp dir; true when nothing is left.
    fn teardown(&mut self) -> bool {
        let _ = Command::new(BERTH)
            .arg("teardown")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for round in 1..=6u64 {
            let mut mounts: Vec<PathBuf> = mounts_under(&self.root).into_iter().map(|m| m.mount_point).collect();
            mounts.sort();
            for mp in mounts.iter().rev() {
                let _ = Command::new("umount").arg(mp).stderr(Stdio::null()).status();
            }
            for l in loops_under(&self.root) {
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(&l.device)
                    .stderr(Stdio::null())
                    .status();
            }
            if mounts_under(&self.root).is_empty() && loops_under(&self.root).is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100 * round));
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; daemon logs:\n{}", self.log_tail(30));
        }
        self.stop();
        if self.teardown() {
            if let Err(e) = fs::remove_dir_all(&self.root) {
                eprintln!("could not remove {}: {e}", self.root.display());
            }
        } else {
            eprintln!(
                "teardown left mounts or loop devices under {}; leaving it in place:\n  mounts: {:?}\n  loops: {:?}",
                self.root.display(),
                mounts_under(&self.root)
                    .iter()
                    .map(|m| m.mount_point.clone())
                    .collect::<Vec<_>>(),
                loops_under(&self.root)
            );
        }
    }
}

/// Records this test process as the owner of `dir`, so `scripts/teardown.sh --stray` leaves the
/// dir alone while the process lives and cleans it up after.
fn write_owner(dir: &Path) {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let start = after_comm.split_whitespace().nth(19).unwrap_or("0");
    let _ = fs::write(dir.join(".owner"), format!("{} {start}\n", std::process::id()));
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Names in a directory (empty when it does not exist).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// btrfs subvolumes outside `volumes/<live id>` and `spares/`, more than [`SPARES`] spares or a
/// spare that is no subvolume, and level-0 qgroups without a subvolume, after the cleaner has
/// dropped deleted subvolumes.
pub fn btrfs_leaks(pool: &Path, live: &BTreeSet<String>) -> Vec<String> {
    // The kernel drops a deleted subvolume, and with it its qgroup, in the background: look
    // again for a few seconds before calling anything a leak.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let leaks = btrfs_leaks_now(pool, live);
        if leaks.is_empty() || Instant::now() > deadline {
            return leaks;
        }
        eprintln!("btrfs leak check, will look again: {leaks:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn btrfs_leaks_now(pool: &Path, live: &BTreeSet<String>) -> Vec<String> {
    let mut leaks = Vec::new();
    // A commit wakes the cleaner; without it `subvolume sync` can wait a whole commit interval.
    let _ = Command::new("btrfs").args(["filesystem", "sync"]).arg(pool).output();
    let _ = Command::new("btrfs").args(["subvolume", "sync"]).arg(pool).output();
    let list = match run("btrfs", &["subvolume", "list"], pool) {
        Ok(out) => out,
        Err(e) => return vec![e],
    };
    let mut ids = BTreeSet::new();
    let mut spares = BTreeSet::new();
    for line in list.lines() {
        // "ID 257 gen 9 top level 5 path volumes/<id>"
        let mut words = line.split_whitespace();
        let id = words.nth(1).unwrap_or("").to_owned();
        let path = line.split_once(" path ").map_or("", |(_, p)| p).trim();
        ids.insert(id.clone());
        if let Some(spare) = path.strip_prefix("spares/").filter(|s| !s.contains('/')) {
            spares.insert(spare.to_owned());
            continue;
        }
        let ok = path.strip_prefix("volumes/").is_some_and(|v| live.contains(v));
        if !ok {
            leaks.push(format!(
                "btrfs subvolume {path} (id {id}) in {} of no listed volume",
                pool.display()
            ));
        }
    }
    if spares.len() > SPARES {
        leaks.push(format!(
            "{} spare subvolumes in {}/spares, more than the {SPARES} the daemon keeps",
            spares.len(),
            pool.display()
        ));
    }
    for name in dir_names(&pool.join("spares")) {
        if !spares.contains(&name) {
            leaks.push(format!("{}/spares/{name} is not a subvolume", pool.display()));
        }
    }
    match run("btrfs", &["qgroup", "show", "--raw"], pool) {
        Ok(out) => {
            for word in out.lines().filter_map(|l| l.split_whitespace().next()) {
                if let Some(id) = word.strip_prefix("0/")
                    && id.chars().all(|c| c.is_ascii_digit())
                    && id != "5"
                    && !ids.contains(id)
                {
                    leaks.push(format!("btrfs qgroup 0/{id} in {} without a subvolume", pool.display()));
                }
            }
        }
        Err(e) => leaks.push(e),
    }
    leaks
}

fn run(program: &str, args: &[&str], path: &Path) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| format!("{program} {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?} {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    /// The path inside the source filesystem that is mounted ("/" for a whole filesystem).
    pub root: String,
    pub fstype: String,
    pub source: String,
}

/// Every mount in this mount namespace.
pub fn mounts() -> Vec<Mount> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (head, tail) = line.split_once(" - ")?;
    let head: Vec<&str> = head.split(' ').collect();
    let mut tail = tail.split(' ');
    Some(Mount {
        root: unescape(head.get(3)?),
        mount_point: PathBuf::from(unescape(head.get(4)?)),
        fstype: tail.next()?.to_owned(),
        source: unescape(tail.next()?),
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<Mount> {
    mounts()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect()
}

/// How many mounts sit exactly at `path`.
pub fn mount_count(path: &Path) -> usize {
    mounts().iter().filter(|m| m.mount_point == path).count()
}

/// A bound loop device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loop {
    pub device: String,
    pub backing: PathBuf,
}

/// Loop devices whose backing file is below `dir`.
pub fn loops_under(dir: &Path) -> Vec<Loop> {
    let mut out = Vec::new();
    for name in dir_names(Path::new("/sys/block")) {
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim_end_matches('\n');
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        let backing = PathBuf::from(backing);
        if backing.starts_with(dir) {
            out.push(Loop {
                device: format!("/dev/{name}"),
                backing,
            });
        }
    }
    out
}

/// Writes `pattern` bytes to a new file at `path` in 1 MiB writes until `max` bytes or an error.
/// Returns the bytes the kernel accepted and the error that stopped it (a write or the final
/// fsync), if any.
pub fn fill_file(path: &Path, max: u64) -> (u64, Option<io::Error>) {
    let mut f = match fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => return (0, Some(e)),
    };
    let buf = vec![0xa5u8; MIB as usize];
    let mut written = 0u64;
    while written < max {
        let want = ((max - written) as usize).min(buf.len());
        match f.write(&buf[..want]) {
            Ok(0) => return (written, Some(io::Error::from_raw_os_error(libc::ENOSPC))),
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Some(e)),
        }
    }
    match f.sync_all() {
        Ok(()) => (written, None),
        Err(e) => (written, Some(e)),
    }
}

/// Writes a small marker file into a published mount and reads it back.
pub fn write_marker(dir: &Path, text: &str) -> io::Result<()> {
    let path = dir.join("marker");
    let mut f = fs::File::create(&path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    let mut back = String::new();
    fs::File::open(&path)?.read_to_string(&mut back)?;
    if back != text {
        return Err(io::Error::other(format!("read back {back:?}, wrote {text:?}")));
    }
    Ok(())
}

/// Writes and reads back one 4 KiB block at offset 0 of a published block device.
pub fn write_block_marker(dev: &Path) -> io::Result<()> {
    let f = fs::OpenOptions::new().read(true).write(true).open(dev)?;
    let block = vec![0x5au8; 4096];
    f.write_all_at(&block, 0)?;
    f.sync_all()?;
    let mut back = vec![0u8; 4096];
    f.read_exact_at(&mut back, 0)?;
    if back != block {
        return Err(io::Error::other("block read back differs"));
    }
    Ok(())
}

/// Writes a marker into whatever was published at `target`, as the kind's user would.
pub fn use_volume(kind: Kind, target: &Path) -> io::Result<()> {
    match kind {
        Kind::Block => write_block_marker(target),
        _ => write_marker(target, "berth e2e"),
    }
}

//! Online expansion while fio writes to the volume, through the real `berth csi` as root:
//! ControllerExpandVolume (and NodeExpandVolume when the driver asks for it) in the middle of a
//! fio run; fio must end without an I/O error and the mount (or device) must show the new size.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests: a failed expectation is a failed test

mod common;
mod datakit;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_csi::v1;
use common::{Daemon, Kind, MIB, bytes_usage, call, path_str, skip_unless_root};
use datakit::{ChildGuard, Mounted, Tracker, device_size, statvfs_total, write_new};

const FIO_RUNTIME_S: u64 = 10;
/// fio runs this long before the expansion.
const EXPAND_AFTER: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_ext4_grows_online_under_fio() {
    grow_under_fio(Kind::Fs("ext4"), 64 * MIB, 128 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_xfs_grows_online_under_fio() {
    grow_under_fio(Kind::Fs("xfs"), 300 * MIB, 400 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_grows_online_under_fio() {
    grow_under_fio(Kind::Dir, 64 * MIB, 128 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_grows_online_under_fio() {
    grow_under_fio(Kind::Block, 64 * MIB, 128 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmpfs_grows_online_under_fio() {
    grow_under_fio(Kind::Tmpfs, 64 * MIB, 128 * MIB).await;
}

fn fio_command(kind: Kind, m: &Mounted, size: u64, output: &Path) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=w",
        "--rw=randwrite",
        "--bs=4k",
        "--time_based",
        "--end_fsync=1",
        "--fsync=256",
        "--output-format=json",
    ])
    .arg(format!("--runtime={FIO_RUNTIME_S}"))
    .arg(format!("--size={size}"))
    .arg(format!("--output={}", output.display()))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    match kind {
        Kind::Block => cmd.arg(format!("--filename={}", m.target.display())),
        _ => cmd.arg(format!("--directory={}", m.target.display())),
    };
    cmd
}

/// Checks fio's JSON report: every job has error 0 and wrote something. Returns bytes written.
fn check_fio_report(path: &Path) -> u64 {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read fio output {}: {e}", path.display()));
    // fio may print notes before the JSON document.
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in fio output:\n{text}"));
    let report: serde_json::Value =
        serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("fio JSON: {e}\n{text}"));
    let jobs = report["jobs"].as_array().expect("fio JSON has jobs");
    assert!(!jobs.is_empty(), "fio ran no job:\n{text}");
    let mut written = 0;
    for job in jobs {
        assert_eq!(
            job["error"].as_i64(),
            Some(0),
            "fio job {} reported an I/O error:\n{text}",
            job["jobname"]
        );
        written += job["write"]["io_bytes"].as_u64().expect("write.io_bytes");
    }
    assert!(written > 0, "fio wrote nothing:\n{text}");
    written
}

async fn grow_under_fio(kind: Kind, old: u64, new: u64) {
    let test = format!("expand-{}", kind.label());
    if skip_unless_root(&test) {
        return;
    }
    let d = Daemon::start(&test).await;
    let mut t = Tracker::new(&d).await;
    let vol = t.create("grow", kind, old).await;
    let m = t.mount(&d, &vol, kind, "grow").await;
    if matches!(kind, Kind::Fs(_) | Kind::Tmpfs) {
        let df = statvfs_total(&m.target);
        assert!(df <= old, "before: statvfs total {df} of a {old}-byte volume");
    }

    let report = d.root.join("fio.json");
    let mut fio = ChildGuard::spawn("fio", &mut fio_command(kind, &m, old / 2, &report));
    tokio::time::sleep(EXPAND_AFTER).await;
    assert!(
        fio.running(),
        "fio ended before the expansion; see {}",
        report.display()
    );

    let started = Instant::now();
    let resp = call(
        t.client
            .controller
            .clone()
            .controller_expand_volume(v1::ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                capacity_range: Some(v1::CapacityRange {
                    required_bytes: new as i64,
                    limit_bytes: 0,
                }),
                volume_capability: Some(kind.capability()),
                ..Default::default()
            }),
    )
    .await
    .unwrap_or_else(|s| panic!("ControllerExpandVolume: {:?}: {}", s.code(), s.message()));
    assert_eq!(resp.capacity_bytes as u64, new, "ControllerExpandVolume capacity");
    assert_eq!(
        resp.node_expansion_required,
        matches!(kind, Kind::Fs(_)),
        "node_expansion_required for a {} volume",
        kind.label()
    );
    // Growing a mounted ext4 needs CAP_SYS_RESOURCE (EXT4_IOC_RESIZE_FS); without it the node
    // step must fail with a message that says so, and fio must not notice.
    let no_online_ext4 = kind == Kind::Fs("ext4") && !has_cap_sys_resource();
    if resp.node_expansion_required && no_online_ext4 {
        let r = call(
            t.client
                .node
                .clone()
                .node_expand_volume(node_expand_request(&vol, &m, kind, new)),
        )
        .await;
        let s = common::expect_code(
            "NodeExpandVolume of ext4 without CAP_SYS_RESOURCE",
            r,
            &[tonic::Code::Internal, tonic::Code::FailedPrecondition],
        );
        assert!(s.message().contains("CAP_SYS_RESOURCE"), "{}", s.message());
    } else if resp.node_expansion_required {
        let node = call(
            t.client
                .node
                .clone()
                .node_expand_volume(node_expand_request(&vol, &m, kind, new)),
        )
        .await
        .unwrap_or_else(|s| panic!("NodeExpandVolume: {:?}: {}", s.code(), s.message()));
        assert_eq!(node.capacity_bytes as u64, new, "NodeExpandVolume capacity");
    }
    let took = started.elapsed();
    assert!(
        fio.running(),
        "fio ended before the expansion finished ({took:?}): the expansion was not online under load"
    );

    let status = fio.wait(Duration::from_secs(FIO_RUNTIME_S + 60));
    let stderr = {
        // fio is done: whatever it printed on stderr is in the pipe.
        let mut s = String::new();
        if let Some(mut e) = fio.take_stderr() {
            use std::io::Read;
            let _ = e.read_to_string(&mut s);
        }
        s
    };
    assert!(status.success(), "fio exited {status}:\n{stderr}");
    let written = check_fio_report(&report);
    eprintln!(
        "{}: expansion {old} -> {new} answered in {took:?} while fio wrote {} MiB without an error",
        kind.label(),
        written / MIB
    );

    if no_online_ext4 {
        // The driver promised to grow the filesystem at the next stage (offline).
        eprintln!("{test}: no CAP_SYS_RESOURCE here; checking the size after a restage only");
        t.remount(&vol, &m).await;
    }
    check_new_size(&t, &m, old, new).await;
    // And after a restage.
    t.remount(&vol, &m).await;
    check_new_size(&t, &m, old, new).await;
    let got = t.csi.get(&vol.volume_id).await.expect("ControllerGetVolume");
    assert_eq!(
        got.volume.map(|v| v.capacity_bytes as u64),
        Some(new),
        "ControllerGetVolume capacity after the expansion"
    );

    t.unmount(&m).await;
    t.delete(&vol.volume_id).await;
    t.finish(&d).await;
    d.assert_clean().await;
}

fn node_expand_request(vol: &v1::Volume, m: &Mounted, kind: Kind, new: u64) -> v1::NodeExpandVolumeRequest {
    v1::NodeExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        volume_path: path_str(&m.target),
        staging_target_path: path_str(&m.staging),
        capacity_range: Some(v1::CapacityRange {
            required_bytes: new as i64,
            limit_bytes: 0,
        }),
        volume_capability: Some(kind.capability()),
        ..Default::default()
    }
}

/// Whether this process (and so the `berth csi` it starts) has CAP_SYS_RESOURCE.
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The size seen from inside is the new one, and data past the old size fits.
async fn check_new_size(t: &Tracker, m: &Mounted, old: u64, new: u64) {
    let stats = t.csi.stats(&m.volume_id, &m.target).await.expect("NodeGetVolumeStats");
    let total = bytes_usage(&stats).map(|u| u.total as u64);
    match m.kind {
        Kind::Block => {
            assert_eq!(device_size(&m.target), new, "block device size after the expansion");
            let f = fs::OpenOptions::new().write(true).open(&m.target).expect("open device");
            f.write_all_at(&[0x5au8; 4096], new - 4096)
                .expect("write the last block of the grown device");
            f.sync_all().expect("fsync device");
            return;
        }
        Kind::Fs(_) => {
            let df = statvfs_total(&m.target);
            assert!(
                df > old && df <= new,
                "df of the {} volume after growing {old} -> {new}: {df} bytes",
                m.kind.label()
            );
            assert!(
                total.is_some_and(|t| t > old && t <= new),
                "NodeGetVolumeStats total after growing {old} -> {new}: {stats:?}"
            );
        }
        Kind::Tmpfs => {
            assert_eq!(
                statvfs_total(&m.target),
                new,
                "df of the tmpfs volume after the expansion"
            );
            assert_eq!(total, Some(new), "NodeGetVolumeStats total: {stats:?}");
        }
        Kind::Dir => {
            assert_eq!(
                total,
                Some(new),
                "NodeGetVolumeStats total of the dir volume: {stats:?}"
            );
        }
    }
    // Past the old size: fio's file out of the way, old + 8 MiB must fit.
    for name in common::dir_names(&m.target) {
        if name.starts_with("w.") {
            fs::remove_file(m.target.join(name)).expect("rm fio file");
        }
    }
    let file = m.target.join("beyond-old-size");
    let len = old + 8 * MIB;
    tokio::task::spawn_blocking({
        let file = file.clone();
        move || write_new(&file, len)
    })
    .await
    .expect("writer")
    .unwrap_or_else(|e| panic!("writing {len} bytes into a volume grown {old} -> {new}: {e}"));
    fs::remove_file(&file).expect("rm beyond-old-size");
}

//! `berth bench snapshot`: how long snapshots, restores, clones and expansions take on full
//! volumes, through the real CSI server, and what the copy fallback costs where reflinks are not
//! available.
//!
//! Per kind, one volume of `--size` is created, published and filled with incompressible data
//! until it is full (or, for block, to its last byte). Each round then times CreateSnapshot, a
//! restore (CreateVolume from the snapshot), a clone (CreateVolume from the volume),
//! DeleteSnapshot, and an expansion by a quarter of the size (ControllerExpandVolume, then
//! NodeExpandVolume when the driver asks for it). The restore and the clone are deleted again
//! in the same round. A last table times `HostOps::clone_file` of an image with the same amount
//! of data on the scratch dir's own filesystem (ext4 here, no reflink: the sparse-aware copy)
//! and on the pool (btrfs, reflink), which is the step a restore of an fs or block volume runs.

use std::io::Write as _;

use berth_csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};

use super::*;

#[derive(Debug, clap::Args)]
pub(super) struct SnapshotArgs {
    /// Volume kinds to measure, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [VolumeKind::Dir, VolumeKind::Fs, VolumeKind::Block, VolumeKind::Tmpfs])]
    kinds: Vec<VolumeKind>,
    /// Size of each volume, filled with data (default 1G; 64M with --smoke).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Rounds per kind; each cell is the median (default 5; 1 with --smoke).
    #[arg(long)]
    rounds: Option<usize>,
    /// Filesystem of fs volumes.
    #[arg(long, value_enum, default_value_t = FsType::Ext4)]
    fs: FsType,
    /// Engine data dir; must be absent or empty, and is removed afterwards.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Quick run for CI: 64M volumes, one round.
    #[arg(long)]
    smoke: bool,
}

/// The calls timed per round, in the order they run.
const OPS: [&str; 6] = [
    "CreateSnapshot",
    "Restore",
    "Clone",
    "DeleteSnapshot",
    "Expand (ctrl)",
    "Expand (node)",
];

pub(super) fn run(args: SnapshotArgs) -> Result<()> {
    let size = args.size.unwrap_or(if args.smoke { 64 * MIB } else { GIB });
    let rounds = args.rounds.unwrap_or(if args.smoke { 1 } else { 5 });
    if size < 16 * MIB || rounds == 0 {
        bail!("--size must be at least 16M and --rounds at least 1");
    }
    let grow = size / 4;
    // Every image volume grows by a quarter per round; restores and clones share extents.
    let pool_size = (size + grow * rounds as u64).saturating_mul(3).max(4 * GIB);
    let tmpfs_budget = args
        .kinds
        .contains(&VolumeKind::Tmpfs)
        .then(|| (size + grow * rounds as u64).saturating_mul(3));
    let scratch = Scratch::create(args.data_dir.clone())?;
    check_room(&scratch.data_dir, pool_size + 2 * size)?;
    println!("berth bench snapshot: {}", machine_line());
    println!(
        "{} volumes full of data, {rounds} round(s), expansion by {} per round",
        mebibytes(size),
        mebibytes(grow)
    );
    let fs = args.fs;
    let kinds = args.kinds.clone();
    let sizes = EngineSizes {
        pool_size: Some(pool_size),
        tmpfs_budget,
        ..EngineSizes::default()
    };
    with_driver(scratch, sizes, move |mut client, scratch| async move {
        let mut rows = Vec::new();
        let mut notes = Vec::new();
        for kind in kinds {
            let class = VolumeClass { kind, fs };
            bench_kind(&mut client, &scratch, class, size, rounds, &mut rows, &mut notes).await?;
        }
        println!();
        print!("{}", latency_table(&rows));
        for n in &notes {
            println!("note: {n}");
        }
        println!();
        print!("{}", copy_table(&scratch, size, rounds).await?);
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
async fn bench_kind(
    client: &mut Client,
    scratch: &Scratch,
    class: VolumeClass,
    size: u64,
    rounds: usize,
    rows: &mut Vec<OpLatency>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let label = class.label();
    let (id, target) = publish_one(client, scratch, class, size).await?;
    let name = format!("fio-{label}");
    let staging = scratch.staging_path(&name).to_string_lossy().into_owned();
    let written = {
        let target = target.clone();
        let block = class.kind == VolumeKind::Block;
        // A little past the capacity: the volume must stop the writes, not this limit.
        tokio::task::spawn_blocking(move || fill(&target, block, size + 16 * MIB))
            .await
            .map_err(|e| anyhow!("fill task: {e}"))??
    };
    println!("{label}: wrote {} of data", mebibytes(written / MIB * MIB));
    let mut lat: Vec<OpLatency> = OPS.iter().map(|op| OpLatency::new(&label, op)).collect::<Result<_>>()?;
    let mut capacity = size;
    for round in 0..rounds {
        let snap_name = format!("snap-{label}-{round}");
        let t = Instant::now();
        let snap = call(
            || format!("CreateSnapshot {snap_name}"),
            client.controller.create_snapshot(v1::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: snap_name.clone(),
                ..Default::default()
            }),
        )
        .await?;
        lat[0].record(t.elapsed());
        let snap_id = snap
            .snapshot
            .map(|s| s.snapshot_id)
            .ok_or_else(|| anyhow!("CreateSnapshot {snap_name} answered without a snapshot"))?;

        for (i, source) in [
            Type::Snapshot(SnapshotSource {
                snapshot_id: snap_id.clone(),
            }),
            Type::Volume(VolumeSource { volume_id: id.clone() }),
        ]
        .into_iter()
        .enumerate()
        {
            let vname = format!("{}-{label}-{round}", if i == 0 { "restore" } else { "clone" });
            let t = Instant::now();
            let made = call(
                || format!("CreateVolume {vname}"),
                client.controller.create_volume(v1::CreateVolumeRequest {
                    name: vname.clone(),
                    capacity_range: Some(v1::CapacityRange {
                        required_bytes: i64_of(capacity)?,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![class.capability()],
                    parameters: class.parameters(),
                    volume_content_source: Some(v1::VolumeContentSource { r#type: Some(source) }),
                    ..Default::default()
                }),
            )
            .await?;
            lat[1 + i].record(t.elapsed());
            let vid = made
                .volume
                .map(|v| v.volume_id)
                .ok_or_else(|| anyhow!("CreateVolume {vname} answered without a volume"))?;
            call(
                || format!("DeleteVolume {vname}"),
                client.controller.delete_volume(v1::DeleteVolumeRequest {
                    volume_id: vid,
                    ..Default::default()
                }),
            )
            .await?;
        }

        let t = Instant::now();
        call(
            || format!("DeleteSnapshot {snap_name}"),
            client.controller.delete_snapshot(v1::DeleteSnapshotRequest {
                snapshot_id: snap_id,
                ..Default::default()
            }),
        )
        .await?;
        lat[3].record(t.elapsed());

        capacity += size / 4;
        let t = Instant::now();
        let grown = call(
            || format!("ControllerExpandVolume {label} to {capacity}"),
            client
                .controller
                .controller_expand_volume(v1::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(v1::CapacityRange {
                        required_bytes: i64_of(capacity)?,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(class.capability()),
                    ..Default::default()
                }),
        )
        .await?;
        lat[4].record(t.elapsed());
        if grown.node_expansion_required {
            let t = Instant::now();
            let r = call(
                || format!("NodeExpandVolume {label} to {capacity}"),
                client.node.node_expand_volume(v1::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: target.to_string_lossy().into_owned(),
                    staging_target_path: staging.clone(),
                    capacity_range: Some(v1::CapacityRange {
                        required_bytes: i64_of(capacity)?,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(class.capability()),
                    ..Default::default()
                }),
            )
            .await;
            match r {
                Ok(_) => lat[5].record(t.elapsed()),
                // ext4 cannot grow online without CAP_SYS_RESOURCE; say so and go on.
                Err(e) if round == 0 => notes.push(format!("{label} NodeExpand failed: {e:#}")),
                Err(_) => {}
            }
        }
    }
    unpublish_and_delete(client, &id, &staging, &target).await?;
    rows.extend(lat.into_iter().filter(|l| !l.micros.is_empty()));
    Ok(())
}

async fn unpublish_and_delete(client: &mut Client, id: &str, staging: &str, target: &Path) -> Result<()> {
    call(
        || format!("NodeUnpublishVolume {id}"),
        client.node.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: id.to_owned(),
            target_path: target.to_string_lossy().into_owned(),
        }),
    )
    .await?;
    call(
        || format!("NodeUnstageVolume {id}"),
        client.node.node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: id.to_owned(),
            staging_target_path: staging.to_owned(),
        }),
    )
    .await?;
    call(
        || format!("DeleteVolume {id}"),
        client.controller.delete_volume(v1::DeleteVolumeRequest {
            volume_id: id.to_owned(),
            ..Default::default()
        }),
    )
    .await?;
    Ok(())
}

/// 1 MiB of pseudo-random bytes, different for every `seed`: nothing compresses or dedupes.
fn chunk(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
}

/// ENOSPC or EDQUOT.
fn full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
}

/// Writes data into a published volume until it is full or `limit` bytes are written (a file
/// in a mount, or `target` itself for a device or an image), then syncs. Returns the bytes written.
fn fill(target: &Path, block: bool, limit: u64) -> Result<u64> {
    let path = if block { target.to_owned() } else { target.join("data") };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(!block)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut written = 0u64;
    for seed in 0..limit.div_ceil(MIB) {
        chunk(seed, &mut buf);
        let want = (limit - written).min(MIB) as usize;
        match f.write(&buf[..want]) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if full(&e) => break,
            Err(e) => return Err(e).with_context(|| format!("writing {}", path.display())),
        }
    }
    match f.sync_all() {
        Ok(()) => {}
        // The last partial write can fail only at the flush on a quota-limited dir.
        Err(e) if full(&e) => {}
        Err(e) => return Err(e).with_context(|| format!("syncing {}", path.display())),
    }
    Ok(written)
}

/// Times `clone_file` of a full image on the scratch dir's filesystem and on the pool.
async fn copy_table(scratch: &Scratch, size: u64, rounds: usize) -> Result<String> {
    let host = LinuxHost::default();
    let pool = pool_root(&scratch.data_dir)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:>8} {:>5} {:>10} {:>10}",
        "clone_file of a full image", "method", "n", "p50 ms", "max ms"
    );
    for (label, dir) in [
        ("scratch dir (ext4 here)", scratch.work.clone()),
        ("pool (btrfs)", pool),
    ] {
        let fstype = host.statfs(&dir)?.fs_type;
        let src = dir.join("copy-src.img");
        host.create_image(&src, size, true)?;
        {
            let src = src.clone();
            tokio::task::spawn_blocking(move || fill(&src, true, size))
                .await
                .map_err(|e| anyhow!("fill task: {e}"))??;
        }
        let mut lat = OpLatency::new(label, "clone_file")?;
        let mut method = None;
        for round in 0..rounds {
            let dst = dir.join(format!("copy-dst-{round}.img"));
            let (s, d) = (src.clone(), dst.clone());
            let t = Instant::now();
            let m = tokio::task::spawn_blocking(move || LinuxHost::default().clone_file(&s, &d))
                .await
                .map_err(|e| anyhow!("clone task: {e}"))??;
            lat.record(t.elapsed());
            method = Some(m);
            host.remove_file(&dst)?;
        }
        host.remove_file(&src)?;
        let fsname = match fstype {
            magic::BTRFS => "btrfs",
            magic::EXT4 => "ext4",
            magic::XFS => "xfs",
            _ => "other",
        };
        let _ = writeln!(
            out,
            "{:<34} {:>8} {:>5} {:>10} {:>10}",
            format!("{label} [{fsname}]"),
            method.map_or("-".into(), |m| format!("{m:?}")),
            lat.micros.len(),
            ms(lat.micros.value_at_quantile(0.5)),
            ms(lat.micros.max()),
        );
    }
    Ok(out)
}

//! `berth teardown`: take everything Berth mounted for a data dir off the machine.
//!
//! Unmounts every mount of the data dir's pools, images and tmpfs volumes (including stage and
//! publish binds outside the data dir) and detaches the loop devices backed by files under it.
//! Data stays on disk; a later start mounts it all again. For uninstalling and for tests.
//!
//! Spare subvolumes (`spares.rs`) are not data: a stopped engine removes its own, and teardown
//! first removes any a crash left in the data dir's pools, so that nothing Berth made for itself
//! outlives it. (Spares in extra pools outside the data dir are removed by the next start.)

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use berth_host::{HostError, HostOps, Unmounted};

/// Unmounts and detaches everything that belongs to `data_dir`. Idempotent.
pub fn teardown(host: &dyn HostOps, data_dir: &Path) -> Result<(), HostError> {
    if let Err(e) = remove_spares(host, data_dir) {
        // Not a reason to leave anything mounted: the next start removes spares too.
        tracing::warn!(error = %e, "could not remove spare subvolumes; the next start will");
    }
    let mut loops: Vec<_> = host
        .loop_devices()?
        .into_iter()
        .filter(|l| l.backing_file.starts_with(data_dir))
        .collect();
    // Devices attached from another mount namespace (a managed plugin before its restart) show
    // another path in sysfs: find those by the identity of the data dir's image files.
    for image in images(host, data_dir)? {
        if let Some(l) = host.loop_device_for(&image)?
            && !loops.iter().any(|k| k.device == l.device)
        {
            loops.push(l);
        }
    }
    let loop_sources: HashSet<String> = loops.iter().map(|l| l.device.to_string_lossy().into_owned()).collect();
    let loop_roots: HashSet<String> = loops
        .iter()
        .filter_map(|l| l.device.file_name().map(|n| format!("/{}", n.to_string_lossy())))
        .collect();
    let mounts = host.mountinfo()?;
    let devices: HashSet<(u32, u32)> = mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(data_dir) || loop_sources.contains(&m.source))
        .map(|m| (m.major, m.minor))
        .collect();
    let mut targets: Vec<PathBuf> = mounts
        .iter()
        .filter(|m| {
            devices.contains(&(m.major, m.minor))
                || (m.fs_type == "devtmpfs" && loop_roots.contains(&m.root.to_string_lossy().into_owned()))
        })
        .map(|m| m.mount_point.clone())
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    targets.dedup();
    for t in targets {
        while host.unmount(&t)? == Unmounted::Removed {}
    }
    for l in loops {
        host.loop_detach(&l)?;
    }
    Ok(())
}

/// Deletes the subvolumes in `spares/` of the data dir's own pools (mounted at `pools/NAME/fs`,
/// or `pools/NAME` itself on a btrfs data dir). Their qgroups need no destroy here: the kernel
/// drops a deleted subvolume's level-0 qgroup along with the subvolume (seen on 6.18, also when
/// the pool is unmounted right after the delete).
fn remove_spares(host: &dyn HostOps, data_dir: &Path) -> Result<(), HostError> {
    let pools = data_dir.join("pools");
    for name in host.list_dir(&pools)? {
        for root in [pools.join(&name).join("fs"), pools.join(&name)] {
            let spares = root.join("spares");
            for spare in host.list_dir(&spares)? {
                host.btrfs_subvolume_delete(&spares, &spare)?;
            }
        }
    }
    Ok(())
}

/// The pool images and volume images of the data dir's own pools (a missing dir lists empty).
fn images(host: &dyn HostOps, data_dir: &Path) -> Result<Vec<PathBuf>, HostError> {
    let pools = data_dir.join("pools");
    let mut out = Vec::new();
    for name in host.list_dir(&pools)? {
        let pool = pools.join(name);
        out.push(pool.join("pool.img"));
        for dir in [pool.join("fs").join("images"), pool.join("images")] {
            out.extend(host.list_dir(&dir)?.into_iter().map(|f| dir.join(f)));
        }
    }
    Ok(out)
}

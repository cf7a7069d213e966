//! btrfs subvolumes, snapshots, qgroups and online resize through the btrfs ioctls (no `btrfs`
//! CLI).
//!
//! The argument structures and ioctl numbers are transcribed from the kernel's
//! `include/uapi/linux/btrfs.h` and `btrfs_tree.h`; their sizes are checked at compile time.
//! Every call is a handful of syscalls: creating a subvolume and limiting its qgroup does not
//! commit a transaction. The flip side is that qgroup *usage* is only brought up to date by a
//! transaction commit (see [`sync`]).

use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use rustix::ioctl::{self, NoArg, Updater, opcode};

use crate::{HostError, QgroupInfo, Result};

const MAGIC: u8 = 0x94;
/// Inode number of the root directory of every subvolume.
const FIRST_FREE_OBJECTID: u64 = 256;
const QUOTA_TREE_OBJECTID: u64 = 8;
const QGROUP_INFO_KEY: u32 = 242;
const QGROUP_LIMIT_KEY: u32 = 244;
const QUOTA_CTL_ENABLE: u64 = 1;
const QGROUP_LIMIT_MAX_RFER: u64 = 1;
/// `max_rfer` value that clears the limit (the kernel's `CLEAR_VALUE`).
const CLEAR_VALUE: u64 = u64::MAX;
const VOL_NAME_MAX: usize = 255;

/// `BTRFS_SUBVOL_RDONLY`, in `btrfs_ioctl_vol_args_v2.flags`.
const SUBVOL_RDONLY: u64 = 1 << 1;

const PATH_NAME_MAX: usize = 4087;
const SUBVOL_NAME_MAX: usize = 4039;
const INO_LOOKUP_PATH_MAX: usize = 4080;
const SEARCH_ARGS_BUFSIZE: usize = 4096 - size_of::<SearchKey>();

/// `struct btrfs_ioctl_vol_args`
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2` (the `size`/`qgroup_inherit` union is left zero: the new
/// subvolume gets a fresh level-0 qgroup and inherits no limit).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; SUBVOL_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_ino_lookup_args`
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; INO_LOOKUP_PATH_MAX],
}

/// `struct btrfs_ioctl_search_key`
#[repr(C)]
#[derive(Default)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: u64,
    unused2: u64,
    unused3: u64,
    unused4: u64,
}

/// `struct btrfs_ioctl_search_args`
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; SEARCH_ARGS_BUFSIZE],
}

/// `struct btrfs_ioctl_search_header` (host byte order), followed by `len` bytes of item.
const SEARCH_HEADER_LEN: usize = 32;

/// `struct btrfs_ioctl_quota_ctl_args`
#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `struct btrfs_ioctl_qgroup_create_args`
#[repr(C)]
struct QgroupCreateArgs {
    create: u64,
    qgroupid: u64,
}

/// `struct btrfs_qgroup_limit`
#[repr(C)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// `struct btrfs_ioctl_qgroup_limit_args`
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}

const _: () = assert!(size_of::<VolArgs>() == 4096);
const _: () = assert!(size_of::<VolArgsV2>() == 4096);
const _: () = assert!(size_of::<InoLookupArgs>() == 4096);
const _: () = assert!(size_of::<SearchKey>() == 104);
const _: () = assert!(size_of::<SearchArgs>() == 4096);
const _: () = assert!(size_of::<QgroupLimitArgs>() == 48);

const IOC_RESIZE: ioctl::Opcode = opcode::write::<VolArgs>(MAGIC, 3);
const IOC_SYNC: ioctl::Opcode = opcode::none(MAGIC, 8);
const IOC_SUBVOL_CREATE: ioctl::Opcode = opcode::write::<VolArgs>(MAGIC, 14);
const IOC_SNAP_DESTROY: ioctl::Opcode = opcode::write::<VolArgs>(MAGIC, 15);
const IOC_TREE_SEARCH: ioctl::Opcode = opcode::read_write::<SearchArgs>(MAGIC, 17);
const IOC_INO_LOOKUP: ioctl::Opcode = opcode::read_write::<InoLookupArgs>(MAGIC, 18);
const IOC_SNAP_CREATE_V2: ioctl::Opcode = opcode::write::<VolArgsV2>(MAGIC, 23);
const IOC_QUOTA_CTL: ioctl::Opcode = opcode::read_write::<QuotaCtlArgs>(MAGIC, 40);
const IOC_QGROUP_CREATE: ioctl::Opcode = opcode::write::<QgroupCreateArgs>(MAGIC, 42);
// The kernel declares QGROUP_LIMIT as _IOR although it only reads the argument.
const IOC_QGROUP_LIMIT: ioctl::Opcode = opcode::read::<QgroupLimitArgs>(MAGIC, 43);

fn open_dir(op: &'static str, path: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| HostError::io(op, path, e))
}

/// A single path component of at most 255 bytes, as the kernel takes for a subvolume name.
fn check_name(op: &'static str, path: &Path, name: &str) -> Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() > VOL_NAME_MAX
        || name == "."
        || name == ".."
        || bytes.contains(&b'/')
        || bytes.contains(&0)
    {
        return Err(HostError::WrongType {
            path: path.to_owned(),
            reason: format!("{op}: {name:?} is not a valid subvolume name"),
        });
    }
    Ok(())
}

fn vol_args(op: &'static str, path: &Path, name: &str) -> Result<Box<VolArgs>> {
    check_name(op, path, name)?;
    let bytes = name.as_bytes();
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; PATH_NAME_MAX + 1],
    });
    args.name[..bytes.len()].copy_from_slice(bytes);
    Ok(args)
}

/// Whether `parent/name` is a subvolume root, `None` when nothing is there.
fn subvolume_at(op: &'static str, parent: &OwnedFd, path: &Path, name: &str) -> Result<Option<()>> {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(HostError::io(op, path, e)),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory && st.st_ino == FIRST_FREE_OBJECTID => {
            Ok(Some(()))
        }
        Ok(_) => Err(HostError::WrongType {
            path: path.to_owned(),
            reason: "exists but is not a btrfs subvolume".into(),
        }),
    }
}

pub(super) fn subvolume_create(parent: &Path, name: &str) -> Result<u64> {
    const OP: &str = "btrfs subvolume create";
    let path = parent.join(name);
    let mut args = vol_args(OP, &path, name)?;
    let dir = open_dir(OP, parent)?;
    // SAFETY: IOC_SUBVOL_CREATE takes a `struct btrfs_ioctl_vol_args`, which `VolArgs`
    // reproduces (size checked above); the name is NUL-terminated by the zeroed tail.
    let created = unsafe { ioctl::ioctl(&dir, Updater::<IOC_SUBVOL_CREATE, VolArgs>::new(&mut args)) };
    match created {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(HostError::io(OP, &path, e)),
    }
    if subvolume_at(OP, &dir, &path, name)?.is_none() {
        // Deleted between the create and the check: report it rather than guess.
        return Err(HostError::io(OP, &path, Errno::NOENT));
    }
    let sub = rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| HostError::io(OP, &path, e))?;
    tree_id(OP, &sub, &path)
}

/// The id of the subvolume (tree) that `fd` lives in.
fn tree_id(op: &'static str, fd: &OwnedFd, path: &Path) -> Result<u64> {
    let mut args = Box::new(InoLookupArgs {
        treeid: 0,
        objectid: FIRST_FREE_OBJECTID,
        name: [0; INO_LOOKUP_PATH_MAX],
    });
    // SAFETY: IOC_INO_LOOKUP takes a `struct btrfs_ioctl_ino_lookup_args` (size checked above)
    // and writes only inside it.
    unsafe { ioctl::ioctl(fd, Updater::<IOC_INO_LOOKUP, InoLookupArgs>::new(&mut args)) }
        .map_err(|e| HostError::io(op, path, e))?;
    Ok(args.treeid)
}

pub(super) fn subvolume_id(path: &Path) -> Result<u64> {
    const OP: &str = "btrfs subvolume id";
    let fd = open_dir(OP, path)?;
    let st = rustix::fs::fstat(&fd).map_err(|e| HostError::io(OP, path, e))?;
    if st.st_ino != FIRST_FREE_OBJECTID {
        return Err(HostError::WrongType {
            path: path.to_owned(),
            reason: "is not the root of a btrfs subvolume".into(),
        });
    }
    tree_id(OP, &fd, path)
}

pub(super) fn subvolume_delete(parent: &Path, name: &str) -> Result<()> {
    const OP: &str = "btrfs subvolume delete";
    let path = parent.join(name);
    let mut args = vol_args(OP, &path, name)?;
    let dir = match open_dir(OP, parent) {
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(()),
        other => other?,
    };
    if subvolume_at(OP, &dir, &path, name)?.is_none() {
        return Ok(());
    }
    // SAFETY: IOC_SNAP_DESTROY takes a `struct btrfs_ioctl_vol_args` (size checked above).
    // As CAP_SYS_ADMIN this removes non-empty subvolumes too.
    let destroyed = unsafe { ioctl::ioctl(&dir, Updater::<IOC_SNAP_DESTROY, VolArgs>::new(&mut args)) };
    match destroyed {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(HostError::io(OP, &path, e)),
    }
}

pub(super) fn subvolume_rename(from_parent: &Path, from_name: &str, to_parent: &Path, to_name: &str) -> Result<()> {
    const OP: &str = "btrfs subvolume rename";
    let from = from_parent.join(from_name);
    let to = to_parent.join(to_name);
    check_name(OP, &from, from_name)?;
    check_name(OP, &to, to_name)?;
    let source_dir = open_dir(OP, from_parent)?;
    let dest_dir = open_dir(OP, to_parent)?;
    if subvolume_at(OP, &source_dir, &from, from_name)?.is_none() {
        return Err(HostError::io(OP, &from, Errno::NOENT));
    }
    // Both names resolve in directories opened without following symlinks, and NOREPLACE
    // never lets the move land on (and drop) something already at the destination.
    rustix::fs::renameat_with(&source_dir, from_name, &dest_dir, to_name, RenameFlags::NOREPLACE).map_err(|e| {
        let path = if e == Errno::EXIST { &to } else { &from };
        HostError::io(OP, path, e)
    })
}

/// Opens `path` as a subvolume root (inode 256), refusing anything else: the snapshot ioctl
/// would otherwise quietly snapshot the whole subvolume that contains the directory.
fn open_subvolume_root(op: &'static str, path: &Path) -> Result<OwnedFd> {
    let fd = open_dir(op, path)?;
    let st = rustix::fs::fstat(&fd).map_err(|e| HostError::io(op, path, e))?;
    if st.st_ino != FIRST_FREE_OBJECTID {
        return Err(HostError::WrongType {
            path: path.to_owned(),
            reason: "is not the root of a btrfs subvolume".into(),
        });
    }
    Ok(fd)
}

pub(super) fn snapshot(source: &Path, dest_parent: &Path, name: &str, read_only: bool) -> Result<u64> {
    const OP: &str = "btrfs snapshot";
    let path = dest_parent.join(name);
    check_name(OP, &path, name)?;
    let dir = open_dir(OP, dest_parent)?;
    let open_existing = |dir: &OwnedFd| -> Result<Option<u64>> {
        if subvolume_at(OP, dir, &path, name)?.is_none() {
            return Ok(None);
        }
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| HostError::io(OP, &path, e))?;
        tree_id(OP, &sub, &path).map(Some)
    };
    // Retried after a crash: the snapshot is there already (the source may be gone by now).
    if let Some(id) = open_existing(&dir)? {
        return Ok(id);
    }
    let src = open_subvolume_root(OP, source)?;
    let mut args = Box::new(VolArgsV2 {
        fd: i64::from(src.as_raw_fd()),
        transid: 0,
        flags: if read_only { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; SUBVOL_NAME_MAX + 1],
    });
    let bytes = name.as_bytes();
    args.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: IOC_SNAP_CREATE_V2 takes a `struct btrfs_ioctl_vol_args_v2`, which `VolArgsV2`
    // reproduces (size checked above); the name is NUL-terminated by the zeroed tail (it is at
    // most 255 bytes), and `fd` is an open descriptor of the source that outlives the call.
    let created = unsafe { ioctl::ioctl(&dir, Updater::<IOC_SNAP_CREATE_V2, VolArgsV2>::new(&mut args)) };
    match created {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(HostError::io(OP, &path, e)),
    }
    match open_existing(&dir)? {
        Some(id) => {
            tracing::debug!(source = %source.display(), dest = %path.display(), id, read_only, "snapshot created");
            Ok(id)
        }
        // Deleted between the create and the check: report it rather than guess.
        None => Err(HostError::io(OP, &path, Errno::NOENT)),
    }
}

/// `BTRFS_IOC_RESIZE` to `max` of device 1: the filesystem grows to fill its (single) device.
/// Already at the maximum is success.
pub(super) fn resize_max(mount: &Path) -> Result<()> {
    const OP: &str = "btrfs resize";
    let fd = open_dir(OP, mount)?;
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; PATH_NAME_MAX + 1],
    });
    args.name[..3].copy_from_slice(b"max");
    // SAFETY: IOC_RESIZE takes a `struct btrfs_ioctl_vol_args` (size checked above) whose name
    // holds the NUL-terminated size string.
    unsafe { ioctl::ioctl(&fd, Updater::<IOC_RESIZE, VolArgs>::new(&mut args)) }
        .map_err(|e| HostError::io(OP, mount, e))
}

pub(super) fn quota_enable(mount: &Path) -> Result<()> {
    const OP: &str = "btrfs quota enable";
    let fd = open_dir(OP, mount)?;
    let mut args = QuotaCtlArgs {
        cmd: QUOTA_CTL_ENABLE,
        status: 0,
    };
    // SAFETY: IOC_QUOTA_CTL takes a `struct btrfs_ioctl_quota_ctl_args`; enabling twice is a
    // no-op in the kernel.
    unsafe { ioctl::ioctl(&fd, Updater::<IOC_QUOTA_CTL, QuotaCtlArgs>::new(&mut args)) }
        .map_err(|e| HostError::io(OP, mount, e))
}

pub(super) fn qgroup_limit(mount: &Path, subvolume_id: u64, max_referenced: Option<u64>) -> Result<()> {
    const OP: &str = "btrfs qgroup limit";
    let fd = open_dir(OP, mount)?;
    let mut args = QgroupLimitArgs {
        qgroupid: subvolume_id,
        lim: QgroupLimit {
            flags: QGROUP_LIMIT_MAX_RFER,
            max_rfer: max_referenced.unwrap_or(CLEAR_VALUE),
            max_excl: 0,
            rsv_rfer: 0,
            rsv_excl: 0,
        },
    };
    // SAFETY: IOC_QGROUP_LIMIT takes a `struct btrfs_ioctl_qgroup_limit_args` (size checked).
    unsafe { ioctl::ioctl(&fd, Updater::<IOC_QGROUP_LIMIT, QgroupLimitArgs>::new(&mut args)) }
        .map_err(|e| HostError::io(OP, mount.join(format!("0/{subvolume_id}")), e))
}

pub(super) fn qgroup_destroy(mount: &Path, subvolume_id: u64) -> Result<()> {
    const OP: &str = "btrfs qgroup destroy";
    let fd = open_dir(OP, mount)?;
    let mut args = QgroupCreateArgs {
        create: 0,
        qgroupid: subvolume_id,
    };
    // SAFETY: IOC_QGROUP_CREATE takes a `struct btrfs_ioctl_qgroup_create_args`.
    let r = unsafe { ioctl::ioctl(&fd, Updater::<IOC_QGROUP_CREATE, QgroupCreateArgs>::new(&mut args)) };
    match r {
        // ENOTCONN: quotas are off, so no qgroup exists.
        Ok(()) | Err(Errno::NOENT) | Err(Errno::NOTCONN) => Ok(()),
        Err(e) => Err(HostError::io(OP, mount.join(format!("0/{subvolume_id}")), e)),
    }
}

/// Commits the current transaction (`BTRFS_IOC_SYNC`), which also brings qgroup usage up to date.
pub(super) fn sync(mount: &Path) -> Result<()> {
    const OP: &str = "btrfs sync";
    let fd = open_dir(OP, mount)?;
    // SAFETY: IOC_SYNC takes no argument.
    unsafe { ioctl::ioctl(&fd, NoArg::<IOC_SYNC>::new()) }.map_err(|e| HostError::io(OP, mount, e))
}

pub(super) fn qgroups(mount: &Path) -> Result<Vec<QgroupInfo>> {
    const OP: &str = "btrfs qgroup show";
    let fd = open_dir(OP, mount)?;
    let mut found: std::collections::BTreeMap<u64, QgroupInfo> = Default::default();
    let mut args = Box::new(SearchArgs {
        key: SearchKey::default(),
        buf: [0; SEARCH_ARGS_BUFSIZE],
    });
    // Info and limit items live at key (0, type, qgroupid); relations have objectid != 0.
    let (mut min_type, mut min_offset) = (QGROUP_INFO_KEY, 0u64);
    loop {
        args.key = SearchKey {
            tree_id: QUOTA_TREE_OBJECTID,
            min_objectid: 0,
            max_objectid: 0,
            min_type,
            max_type: QGROUP_LIMIT_KEY,
            min_offset,
            max_offset: u64::MAX,
            min_transid: 0,
            max_transid: u64::MAX,
            nr_items: 4096,
            ..SearchKey::default()
        };
        // SAFETY: IOC_TREE_SEARCH takes a `struct btrfs_ioctl_search_args` (4096 bytes, size
        // checked above); the kernel writes at most `buf.len()` bytes of results into `buf`.
        let r = unsafe { ioctl::ioctl(&fd, Updater::<IOC_TREE_SEARCH, SearchArgs>::new(&mut args)) };
        match r {
            Ok(()) => {}
            // No quota tree: quotas are not enabled. Say so the way QGROUP_LIMIT does.
            Err(Errno::NOENT) => return Err(HostError::io(OP, mount, Errno::NOTCONN)),
            Err(e) => return Err(HostError::io(OP, mount, e)),
        }
        let items = parse_search_items(&args.buf, args.key.nr_items);
        let Some(&(last_type, last_offset, _)) = items.last() else {
            break;
        };
        for (item_type, qgroupid, data) in items {
            // Level-0 qgroups only: the level sits in the top 16 bits of the id.
            if qgroupid >> 48 != 0 {
                continue;
            }
            let entry = found.entry(qgroupid).or_insert(QgroupInfo {
                subvolume_id: qgroupid,
                ..QgroupInfo::default()
            });
            match item_type {
                // btrfs_qgroup_info_item: generation, rfer, rfer_cmpr, excl, excl_cmpr (le64).
                QGROUP_INFO_KEY => {
                    entry.referenced_bytes = le64(data, 8);
                    entry.exclusive_bytes = le64(data, 24);
                }
                // btrfs_qgroup_limit_item: flags, max_rfer, max_excl, rsv_rfer, rsv_excl.
                QGROUP_LIMIT_KEY => {
                    let flags = le64(data, 0);
                    entry.max_referenced = (flags & QGROUP_LIMIT_MAX_RFER != 0).then(|| le64(data, 8));
                }
                _ => {}
            }
        }
        // Continue after the last key returned.
        match last_offset.checked_add(1) {
            Some(o) => (min_type, min_offset) = (last_type, o),
            None if last_type < QGROUP_LIMIT_KEY => (min_type, min_offset) = (last_type + 1, 0),
            None => break,
        }
    }
    Ok(found.into_values().collect())
}

/// Splits the result buffer of a tree search into (type, offset, item bytes).
fn parse_search_items(buf: &[u8], nr_items: u32) -> Vec<(u32, u64, &[u8])> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..nr_items {
        let Some(header) = buf.get(pos..pos + SEARCH_HEADER_LEN) else {
            break;
        };
        let ne64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        let ne32 = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[at..at + 4]);
            u32::from_ne_bytes(b)
        };
        let (offset, item_type, len) = (ne64(16), ne32(24), ne32(28) as usize);
        let start = pos + SEARCH_HEADER_LEN;
        let Some(data) = buf.get(start..start + len) else {
            break;
        };
        out.push((item_type, offset, data));
        pos = start + len;
    }
    out
}

/// Little-endian u64 at `at`, 0 when the item is too short.
fn le64(data: &[u8], at: usize) -> u64 {
    data.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_match_the_kernel_headers() {
        // _IOC(dir, 0x94, nr, size) as the kernel headers expand them.
        assert_eq!(IOC_SUBVOL_CREATE as u64, 0x5000_940e);
        assert_eq!(IOC_SNAP_DESTROY as u64, 0x5000_940f);
        assert_eq!(IOC_TREE_SEARCH as u64, 0xd000_9411);
        assert_eq!(IOC_INO_LOOKUP as u64, 0xd000_9412);
        assert_eq!(IOC_QUOTA_CTL as u64, 0xc010_9428);
        assert_eq!(IOC_QGROUP_CREATE as u64, 0x4010_942a);
        assert_eq!(IOC_QGROUP_LIMIT as u64, 0x8030_942b);
        assert_eq!(IOC_SYNC as u64, 0x9408);
        assert_eq!(IOC_RESIZE as u64, 0x5000_9403);
        assert_eq!(IOC_SNAP_CREATE_V2 as u64, 0x5000_9417);
    }

    #[test]
    fn parses_search_results_and_stops_at_truncation() {
        // Room for two items and part of a third header.
        let mut buf = vec![0u8; 150];
        let mut put = |pos: usize, offset: u64, ty: u32, data: &[u8]| {
            buf[pos + 16..pos + 24].copy_from_slice(&offset.to_ne_bytes());
            buf[pos + 24..pos + 28].copy_from_slice(&ty.to_ne_bytes());
            buf[pos + 28..pos + 32].copy_from_slice(&(data.len() as u32).to_ne_bytes());
            buf[pos + 32..pos + 32 + data.len()].copy_from_slice(data);
        };
        put(0, 256, QGROUP_INFO_KEY, &[1; 40]);
        put(72, 257, QGROUP_LIMIT_KEY, &[2; 40]);
        let items = parse_search_items(&buf, 3);
        assert_eq!(items.len(), 2);
        assert_eq!((items[0].0, items[0].1), (QGROUP_INFO_KEY, 256));
        assert_eq!((items[1].0, items[1].1), (QGROUP_LIMIT_KEY, 257));
        assert_eq!(le64(items[1].2, 8), 0x0202_0202_0202_0202);
        assert_eq!(le64(&[1, 2], 0), 0);
    }
}

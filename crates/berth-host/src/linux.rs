//! [`LinuxHost`]: the real [`HostOps`], straight onto Linux system calls.
//!
//! Owns every syscall Berth makes. Mounts go through file descriptors ([`mount`]), loop devices
//! through `LOOP_CONFIGURE` ([`loopdev`]), btrfs subvolumes, snapshots, qgroups and resizes
//! through ioctls ([`btrfs`]), file clones through `FICLONE` with a sparse copy fallback
//! ([`copy`]), freezing and block-device flags through ioctls ([`device`]); only mkfs, blkid,
//! resize2fs and xfs_growfs run external programs. Target paths are never followed
//! through a final symlink (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `UMOUNT_NOFOLLOW`). Every
//! operation the trait calls idempotent is: "already there" and "already gone" are success, so
//! callers can retry after a crash.

mod btrfs;
mod copy;
mod device;
mod loopdev;
pub(crate) mod mount;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use rustix::fs::{AtFlags, CWD, FallocateFlags, FileType, IFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::{
    CloneMethod, FileSystem, FsStats, HostError, HostOps, LoopDevice, LoopOptions, MountEntry, MountRequest,
    MountSource, QgroupInfo, Result, TargetKind, Unmounted,
};

/// The host itself. Every call goes to the kernel; the only state is the open descriptors of
/// autoclear loop devices that are not mounted yet (see [`LoopOptions::autoclear`]).
#[derive(Debug, Default)]
pub struct LinuxHost {
    /// Autoclear loop devices held open until their filesystem is mounted, by `st_rdev`.
    pinned_loops: Mutex<HashMap<u64, OwnedFd>>,
    /// Loop device number by the identity (st_dev, st_ino) of its backing file: filled by one
    /// scan of the kernel's list at the first lookup, then kept by attach and detach. Each hit
    /// is checked on the device; the data dir's single owner is the only one attaching its
    /// images, so a miss means "not attached". Identities, unlike sysfs paths, also match
    /// devices attached from another mount namespace (a restarted managed plugin).
    loops_by_file: Mutex<Option<HashMap<loopdev::FileId, u32>>>,
}

impl LinuxHost {
    pub fn new() -> Self {
        LinuxHost::default()
    }

    fn pinned(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OwnedFd>> {
        // The map stays consistent even if a holder panicked: insert/remove are single steps.
        self.pinned_loops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn loop_index(&self) -> std::sync::MutexGuard<'_, Option<HashMap<loopdev::FileId, u32>>> {
        // Same reasoning as `pinned`.
        self.loops_by_file.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases the pin of the device at `device`, if any.
    fn unpin(&self, device: &Path) {
        if let Ok(st) = rustix::fs::stat(device)
            && kind_of(&st) == FileType::BlockDevice
            && self.pinned().remove(&st.st_rdev).is_some()
        {
            tracing::debug!(device = %device.display(), "autoclear loop device released");
        }
    }
}

/// `statfs.f_type` as an unsigned 32-bit magic, whatever width and sign the platform gives it.
pub(crate) fn fs_magic<T: Into<i128>>(f_type: T) -> u64 {
    // Truncation is the point: magics are 32-bit, some platforms sign-extend them.
    (f_type.into() as u64) & 0xffff_ffff
}

fn to_u64<T: Into<i128>>(v: T) -> u64 {
    u64::try_from(v.into()).unwrap_or(0)
}

/// What is at `path`, without following a final symlink; `None` when nothing is.
fn lstat_kind(op: &'static str, path: &Path) -> Result<Option<rustix::fs::Stat>> {
    match rustix::fs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(HostError::io(op, path, e)),
    }
}

fn kind_of(st: &rustix::fs::Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

fn wrong_type(path: &Path, reason: impl Into<String>) -> HostError {
    HostError::WrongType {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn mkdir_exact(path: &Path, mode: u32) -> std::result::Result<(), Errno> {
    let mode = Mode::from_raw_mode(mode);
    rustix::fs::mkdirat(CWD, path, mode)?;
    // The umask may have narrowed the mode; the caller asked for exactly this one.
    rustix::fs::chmodat(CWD, path, mode, AtFlags::empty())
}

fn create_dir_all(path: &Path, mode: u32) -> Result<()> {
    const OP: &str = "create directory";
    match mkdir_exact(path, mode) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => match rustix::fs::stat(path) {
            Ok(st) if kind_of(&st) == FileType::Directory => Ok(()),
            Ok(_) => Err(wrong_type(path, "exists and is not a directory")),
            Err(e) => Err(HostError::io(OP, path, e)),
        },
        Err(Errno::NOENT) => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .ok_or_else(|| HostError::io(OP, path, Errno::NOENT))?;
            create_dir_all(parent, mode)?;
            match mkdir_exact(path, mode) {
                Ok(()) | Err(Errno::EXIST) => Ok(()),
                Err(e) => Err(HostError::io(OP, path, e)),
            }
        }
        Err(e) => Err(HostError::io(OP, path, e)),
    }
}

fn create_image(path: &Path, size: u64, nocow: bool) -> Result<()> {
    const OP: &str = "create image";
    if size == 0 {
        return Err(HostError::io(OP, path, Errno::INVAL));
    }
    let fd = match rustix::fs::open(
        path,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => fd,
        Err(Errno::EXIST) => {
            let st = lstat_kind(OP, path)?.ok_or_else(|| HostError::io(OP, path, Errno::NOENT))?;
            if kind_of(&st) != FileType::RegularFile {
                return Err(wrong_type(path, "exists and is not a regular file"));
            }
            let have = to_u64(st.st_size);
            if have == size {
                return Ok(());
            }
            if have != 0 {
                return Err(wrong_type(path, format!("image exists with {have} bytes, not {size}")));
            }
            // Empty: left behind by a crash between create and fallocate. Finish it.
            rustix::fs::open(path, OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty())
                .map_err(|e| HostError::io(OP, path, e))?
        }
        Err(e) => return Err(HostError::io(OP, path, e)),
    };
    let fill = || -> Result<()> {
        if nocow {
            set_nocow(&fd, path)?;
        }
        rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size)
            .map_err(|e| HostError::io("create image: fallocate", path, e))?;
        rustix::fs::fsync(&fd).map_err(|e| HostError::io("create image: fsync", path, e))
    };
    let filled = fill();
    if filled.is_err() {
        // Leave nothing half-made behind (e.g. after ENOSPC).
        let _ = rustix::fs::unlinkat(CWD, path, AtFlags::empty());
    }
    filled
}

/// `FS_NOCOW_FL` must be set while the file is empty. Filesystems without the flag (ext4,
/// xfs, tmpfs) answer EOPNOTSUPP, ENOTTY or EINVAL: there is nothing to turn off there.
fn set_nocow(fd: &std::os::fd::OwnedFd, path: &Path) -> Result<()> {
    change_nocow(fd, path, true, false)
}

/// Sets or clears `FS_NOCOW_FL`. With `strict`, EINVAL is an error (btrfs says EINVAL when a
/// compression property forbids NOCOW); EOPNOTSUPP and ENOTTY always mean "no such flag here".
fn change_nocow(fd: &std::os::fd::OwnedFd, path: &Path, on: bool, strict: bool) -> Result<()> {
    let ignore = |e: Errno| matches!(e, Errno::OPNOTSUPP | Errno::NOTTY) || (!strict && e == Errno::INVAL);
    let flags = match rustix::fs::ioctl_getflags(fd) {
        Ok(f) => f,
        Err(e) if ignore(e) => return Ok(()),
        Err(e) => return Err(HostError::io("get inode flags", path, e)),
    };
    let want = if on {
        flags | IFlags::NOCOW
    } else {
        flags - IFlags::NOCOW
    };
    if want == flags {
        return Ok(());
    }
    match rustix::fs::ioctl_setflags(fd, want) {
        Ok(()) => Ok(()),
        Err(e) if ignore(e) => Ok(()),
        Err(e) => Err(HostError::io("set nocow", path, e)),
    }
}

fn set_dir_nocow(dir: &Path, on: bool) -> Result<()> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| HostError::io("set nocow", dir, e))?;
    change_nocow(&fd, dir, on, true)
}

fn prepare_target(target: &Path, kind: TargetKind) -> Result<()> {
    const OP: &str = "prepare target";
    let existing = lstat_kind(OP, target)?;
    let existing_kind = existing.as_ref().map(kind_of);
    match (existing_kind, kind) {
        (Some(FileType::Symlink), _) => Err(HostError::Symlink {
            path: target.to_owned(),
        }),
        (Some(FileType::Directory), TargetKind::Directory) => Ok(()),
        // A file target that already has a device node bound onto it shows the node's type.
        (Some(FileType::RegularFile | FileType::BlockDevice), TargetKind::File) => Ok(()),
        (Some(FileType::Directory), TargetKind::File) => {
            // COs create directories for block targets too: replace an empty one.
            match rustix::fs::unlinkat(CWD, target, AtFlags::REMOVEDIR) {
                Ok(()) => create_target_file(target),
                Err(Errno::NOTEMPTY | Errno::EXIST) => {
                    Err(wrong_type(target, "is a non-empty directory where a file is needed"))
                }
                Err(e) => Err(HostError::io(OP, target, e)),
            }
        }
        (Some(other), TargetKind::Directory) => Err(wrong_type(target, format!("is a {other:?}, not a directory"))),
        (Some(other), TargetKind::File) => Err(wrong_type(target, format!("is a {other:?}, not a regular file"))),
        (None, TargetKind::Directory) => {
            match rustix::fs::mkdirat(CWD, target, Mode::from_raw_mode(0o750)) {
                Ok(()) => Ok(()),
                // Raced with another creator: judge what is there now.
                Err(Errno::EXIST) => prepare_existing(target, kind),
                Err(e) => Err(HostError::io(OP, target, e)),
            }
        }
        (None, TargetKind::File) => create_target_file(target),
    }
}

fn prepare_existing(target: &Path, kind: TargetKind) -> Result<()> {
    match lstat_kind("prepare target", target)? {
        Some(_) => prepare_target(target, kind),
        None => Err(HostError::io("prepare target", target, Errno::NOENT)),
    }
}

fn create_target_file(target: &Path) -> Result<()> {
    match rustix::fs::open(
        target,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o640),
    ) {
        Ok(_fd) => Ok(()),
        Err(Errno::EXIST) => prepare_existing(target, TargetKind::File),
        Err(e) => Err(HostError::io("prepare target", target, e)),
    }
}

fn remove_target(target: &Path) -> Result<()> {
    const OP: &str = "remove target";
    let Some(st) = lstat_kind(OP, target)? else {
        return Ok(());
    };
    // unlink/rmdir act on the final component itself: a symlink is removed, never followed.
    let flags = if kind_of(&st) == FileType::Directory {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    match rustix::fs::unlinkat(CWD, target, flags) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(HostError::io(OP, target, e)),
    }
}

fn statfs(path: &Path) -> Result<FsStats> {
    let s = rustix::fs::statfs(path).map_err(|e| HostError::io("statfs", path, e))?;
    // f_blocks and friends count fragments (f_frsize); fall back to f_bsize when it is 0.
    let frsize = match to_u64(s.f_frsize) {
        0 => to_u64(s.f_bsize),
        n => n,
    };
    let blocks = to_u64(s.f_blocks);
    let bfree = to_u64(s.f_bfree);
    let files = to_u64(s.f_files);
    let ffree = to_u64(s.f_ffree);
    Ok(FsStats {
        fs_type: fs_magic(s.f_type),
        block_size: to_u64(s.f_bsize),
        total_bytes: blocks.saturating_mul(frsize),
        available_bytes: to_u64(s.f_bavail).saturating_mul(frsize),
        used_bytes: blocks.saturating_sub(bfree).saturating_mul(frsize),
        total_inodes: files,
        free_inodes: ffree,
        used_inodes: files.saturating_sub(ffree),
    })
}

/// Runs a program to completion; a non-zero exit is a [`HostError::Command`] with its stderr.
fn run(program: &str, args: &[&str], device: &Path) -> Result<std::process::Output> {
    let output = Command::new(program)
        .args(args)
        .arg(device)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => {
                HostError::Unsupported(format!("{program} is not installed (needed for {})", device.display()))
            }
            _ => HostError::io("spawn", program, e),
        })?;
    Ok(output)
}

fn command_error(program: &str, output: &std::process::Output) -> HostError {
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    // Keep errors readable in logs and CSI messages.
    if stderr.len() > 2000 {
        let mut cut = 2000;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        stderr.push_str(" ...");
    }
    HostError::Command {
        program: program.to_owned(),
        status: output.status.to_string(),
        stderr,
    }
}

/// Formats without discarding: a discard would punch holes into a preallocated image and give back
/// the space its volume was promised. ext4 always gets 4 KiB blocks: below 512 MiB mke2fs's
/// "small" type would choose 1 KiB blocks, which cost small volumes half their write speed.
fn mkfs(device: &Path, fs: FileSystem) -> Result<()> {
    let (program, args): (&str, &[&str]) = match fs {
        FileSystem::Ext4 => (
            "mkfs.ext4",
            &[
                "-F",
                "-q",
                "-b",
                "4096",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ],
        ),
        FileSystem::Xfs => ("mkfs.xfs", &["-f", "-q", "-K"]),
        FileSystem::Btrfs => ("mkfs.btrfs", &["-f", "-q", "-K"]),
    };
    let output = run(program, args, device)?;
    if !output.status.success() {
        return Err(command_error(program, &output));
    }
    tracing::debug!(device = %device.display(), fs = fs.as_str(), "formatted");
    Ok(())
}

/// `blkid -p` (low-level probe, no cache). A partition table counts as content too, so a
/// caller never formats over it: it is reported as its `PTTYPE` (e.g. `"gpt"`).
fn probe_filesystem(device: &Path) -> Result<Option<String>> {
    if lstat_kind("probe filesystem", device)?.is_none() {
        return Err(HostError::io("probe filesystem", device, Errno::NOENT));
    }
    let output = run("blkid", &["-p", "-o", "export"], device)?;
    match output.status.code() {
        Some(0) => Ok(parse_blkid_export(&String::from_utf8_lossy(&output.stdout))),
        // 2: nothing was found on the device.
        Some(2) => Ok(None),
        _ => Err(command_error("blkid", &output)),
    }
}

fn parse_blkid_export(text: &str) -> Option<String> {
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .filter(|v| !v.is_empty())
    };
    value("TYPE").or_else(|| value("PTTYPE"))
}

fn mountinfo() -> Result<Vec<MountEntry>> {
    const PATH: &str = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(PATH).map_err(|e| HostError::io("read mountinfo", PATH, e))?;
    crate::mountinfo::parse(&text)
        .map_err(|e| HostError::io("parse mountinfo", PATH, std::io::Error::new(ErrorKind::InvalidData, e)))
}

/// Grows a regular file to `size` bytes with fallocate (reserving the new range); never shrinks.
fn grow_image(path: &Path, size: u64) -> Result<()> {
    const OP: &str = "grow image";
    let fd = rustix::fs::open(path, OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty()).map_err(
        |e| match e {
            Errno::LOOP => HostError::Symlink { path: path.to_owned() },
            e => HostError::io(OP, path, e),
        },
    )?;
    let st = rustix::fs::fstat(&fd).map_err(|e| HostError::io(OP, path, e))?;
    if kind_of(&st) != FileType::RegularFile {
        return Err(wrong_type(path, "is not a regular file"));
    }
    let have = to_u64(st.st_size);
    if have >= size {
        return Ok(());
    }
    rustix::fs::fallocate(&fd, FallocateFlags::empty(), have, size - have)
        .map_err(|e| HostError::io("grow image: fallocate", path, e))?;
    rustix::fs::fsync(&fd).map_err(|e| HostError::io("grow image: fsync", path, e))?;
    tracing::info!(path = %path.display(), from = have, to = size, "image grown");
    Ok(())
}

/// `CAP_SYS_RESOURCE`, needed for online ext4 resizing.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has capability `cap` in its effective set (`CapEff` of
/// /proc/self/status); when that cannot be read, assume it does and let the kernel decide.
fn has_capability(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << cap) != 0)
}

/// Offline growth of an unmounted ext4 filesystem: a forced check first, as resize2fs demands.
fn grow_filesystem_offline(fs: FileSystem, device: &Path) -> Result<()> {
    if fs != FileSystem::Ext4 {
        return Err(HostError::Unsupported(format!(
            "{} grows only while mounted; stage the volume and expand it",
            fs.as_str()
        )));
    }
    let check = run("e2fsck", &["-f", "-p"], device)?;
    // e2fsck exit codes 0 and 1 mean clean or corrected.
    if !matches!(check.status.code(), Some(0 | 1)) {
        return Err(command_error("e2fsck", &check));
    }
    let output = run("resize2fs", &[], device)?;
    if !output.status.success() {
        return Err(command_error("resize2fs", &output));
    }
    tracing::info!(device = %device.display(), "ext4 filesystem grown offline");
    Ok(())
}

/// Online growth of a mounted filesystem to the size of its device.
fn grow_filesystem(fs: FileSystem, device: &Path, mount: &Path) -> Result<()> {
    // Aiming resize2fs or xfs_growfs at the wrong filesystem must not happen: check what is
    // mounted there first.
    let want = match fs {
        FileSystem::Ext4 => crate::magic::EXT4,
        FileSystem::Xfs => crate::magic::XFS,
        FileSystem::Btrfs => crate::magic::BTRFS,
    };
    let found = statfs(mount)?.fs_type;
    if found != want {
        return Err(wrong_type(
            mount,
            format!("holds filesystem magic {found:#x}, not {}", fs.as_str()),
        ));
    }
    if fs == FileSystem::Ext4 && !has_capability(CAP_SYS_RESOURCE) {
        // The kernel's EXT4_IOC_RESIZE_FS checks it (resize2fs says only "Permission denied").
        return Err(HostError::Unsupported(format!(
            "growing the ext4 filesystem on {} online needs CAP_SYS_RESOURCE, which this process lacks",
            mount.display()
        )));
    }
    let (program, args, operand): (&str, &[&str], &Path) = match fs {
        // With the filesystem mounted, resize2fs asks the kernel to resize it online.
        FileSystem::Ext4 => ("resize2fs", &[], device),
        FileSystem::Xfs => ("xfs_growfs", &["-d"], mount),
        FileSystem::Btrfs => return btrfs::resize_max(mount),
    };
    let output = run(program, args, operand)?;
    if !output.status.success() {
        return Err(command_error(program, &output));
    }
    tracing::info!(device = %device.display(), mount = %mount.display(), fs = fs.as_str(), "filesystem grown");
    Ok(())
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .map_err(|e| HostError::io("set xattr", path, e))
}

fn get_xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    const OP: &str = "get xattr";
    // The value can change size between the query and the read: retry on ERANGE.
    for _ in 0..8 {
        let size = match rustix::fs::lgetxattr_query(path, name) {
            Ok(n) => n,
            Err(Errno::NODATA) => return Ok(None),
            Err(e) => return Err(HostError::io(OP, path, e)),
        };
        let mut buf = vec![0u8; size];
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(Errno::RANGE) => continue,
            Err(Errno::NODATA) => return Ok(None),
            Err(e) => return Err(HostError::io(OP, path, e)),
        }
    }
    Err(HostError::io(OP, path, Errno::RANGE))
}

impl HostOps for LinuxHost {
    fn create_dir_all(&self, path: &Path, mode: u32) -> Result<()> {
        create_dir_all(path, mode)
    }

    fn remove_dir(&self, path: &Path) -> Result<()> {
        match rustix::fs::unlinkat(CWD, path, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::NOTDIR) => Err(wrong_type(path, "is not a directory")),
            Err(e) => Err(HostError::io("remove directory", path, e)),
        }
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(path) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HostError::io("list directory", path, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| HostError::io("list directory", path, e))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> Result<bool> {
        match rustix::fs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT | Errno::NOTDIR) => Ok(false),
            Err(e) => Err(HostError::io("stat", path, e)),
        }
    }

    fn create_image(&self, path: &Path, size: u64, nocow: bool) -> Result<()> {
        create_image(path, size, nocow)
    }

    fn file_size(&self, path: &Path) -> Result<Option<u64>> {
        match lstat_kind("stat", path)? {
            None => Ok(None),
            Some(st) if kind_of(&st) == FileType::RegularFile => Ok(Some(to_u64(st.st_size))),
            Some(_) => Err(wrong_type(path, "is not a regular file")),
        }
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        match rustix::fs::unlinkat(CWD, path, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::ISDIR) => Err(wrong_type(path, "is a directory, not a file")),
            Err(e) => Err(HostError::io("remove file", path, e)),
        }
    }

    fn prepare_target(&self, target: &Path, kind: TargetKind) -> Result<()> {
        prepare_target(target, kind)
    }

    fn remove_target(&self, target: &Path) -> Result<()> {
        remove_target(target)
    }

    fn statfs(&self, path: &Path) -> Result<FsStats> {
        statfs(path)
    }

    fn btrfs_quota_enable(&self, mount: &Path) -> Result<()> {
        btrfs::quota_enable(mount)
    }

    fn btrfs_subvolume_create(&self, parent: &Path, name: &str) -> Result<u64> {
        btrfs::subvolume_create(parent, name)
    }

    fn btrfs_subvolume_id(&self, path: &Path) -> Result<u64> {
        btrfs::subvolume_id(path)
    }

    fn btrfs_subvolume_delete(&self, parent: &Path, name: &str) -> Result<()> {
        btrfs::subvolume_delete(parent, name)
    }

    fn btrfs_subvolume_rename(
        &self,
        from_parent: &Path,
        from_name: &str,
        to_parent: &Path,
        to_name: &str,
    ) -> Result<()> {
        btrfs::subvolume_rename(from_parent, from_name, to_parent, to_name)
    }

    fn btrfs_qgroup_limit(&self, mount: &Path, subvolume_id: u64, max_referenced: Option<u64>) -> Result<()> {
        btrfs::qgroup_limit(mount, subvolume_id, max_referenced)
    }

    fn btrfs_qgroups(&self, mount: &Path) -> Result<Vec<QgroupInfo>> {
        btrfs::qgroups(mount)
    }

    fn btrfs_qgroup_destroy(&self, mount: &Path, subvolume_id: u64) -> Result<()> {
        btrfs::qgroup_destroy(mount, subvolume_id)
    }

    fn btrfs_sync(&self, mount: &Path) -> Result<()> {
        btrfs::sync(mount)
    }

    fn loop_attach(&self, backing: &Path, options: LoopOptions) -> Result<LoopDevice> {
        let (device, fd) = loopdev::attach(backing, options)?;
        if options.autoclear {
            let st = rustix::fs::fstat(&fd).map_err(|e| HostError::io("loop attach", &device.device, e))?;
            self.pinned().insert(st.st_rdev, fd);
        }
        if let Some(index) = self.loop_index().as_mut()
            && let Some(id) = loopdev::file_id(backing)?
        {
            index.insert(id, device.number);
        }
        Ok(device)
    }

    fn loop_detach(&self, device: &LoopDevice) -> Result<()> {
        loopdev::detach(&device.device, &device.backing_file, || self.unpin(&device.device))?;
        if let Some(index) = self.loop_index().as_mut() {
            index.retain(|_, n| *n != device.number);
        }
        Ok(())
    }

    fn loop_device_for(&self, backing: &Path) -> Result<Option<LoopDevice>> {
        let Some(id) = loopdev::file_id(backing)? else {
            return Ok(None);
        };
        let mut guard = self.loop_index();
        let index = match guard.as_mut() {
            Some(index) => index,
            None => guard.insert(loopdev::ids()?.into_iter().collect()),
        };
        let Some(&number) = index.get(&id) else {
            return Ok(None);
        };
        match loopdev::status_if(number, id, backing) {
            Some(d) => Ok(Some(d)),
            // Detached behind our back (autoclear) or reused: forget it.
            None => {
                index.remove(&id);
                Ok(None)
            }
        }
    }

    fn loop_devices(&self) -> Result<Vec<LoopDevice>> {
        loopdev::list()
    }

    fn probe_filesystem(&self, device: &Path) -> Result<Option<String>> {
        probe_filesystem(device)
    }

    fn mkfs(&self, device: &Path, fs: FileSystem) -> Result<()> {
        mkfs(device, fs)
    }

    fn mount(&self, request: &MountRequest) -> Result<()> {
        mount::mount(request)?;
        if let MountSource::Device { device, .. } = &request.source {
            // The filesystem now holds the device: its unmount is the last close.
            self.unpin(device);
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<Unmounted> {
        mount::unmount(target)
    }

    fn is_mount_point(&self, path: &Path) -> Result<bool> {
        use rustix::fs::StatxAttributes;
        let flags = AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT;
        match rustix::fs::statx(CWD, path, flags, rustix::fs::StatxFlags::empty()) {
            Ok(stx) if stx.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) => {
                Ok(stx.stx_attributes.contains(StatxAttributes::MOUNT_ROOT))
            }
            // Kernels before 5.8 do not report the attribute.
            Ok(_) => Ok(self.mountinfo()?.iter().any(|m| m.mount_point == path)),
            Err(Errno::NOENT | Errno::NOTDIR) => Ok(false),
            Err(e) => Err(HostError::io("is mount point", path, e)),
        }
    }

    fn mountinfo(&self) -> Result<Vec<MountEntry>> {
        mountinfo()
    }

    fn btrfs_snapshot(&self, source: &Path, dest_parent: &Path, name: &str, read_only: bool) -> Result<u64> {
        btrfs::snapshot(source, dest_parent, name, read_only)
    }

    fn clone_file(&self, source: &Path, dest: &Path) -> Result<CloneMethod> {
        copy::clone_file(source, dest)
    }

    fn copy_tree(&self, source: &Path, dest: &Path) -> Result<()> {
        copy::copy_tree(source, dest)
    }

    fn freeze(&self, mount: &Path) -> Result<()> {
        device::freeze(mount)
    }

    fn thaw(&self, mount: &Path) -> Result<()> {
        device::thaw(mount)
    }

    fn grow_image(&self, path: &Path, size: u64) -> Result<()> {
        grow_image(path, size)
    }

    fn loop_set_capacity(&self, device: &Path) -> Result<()> {
        loopdev::set_capacity(device)
    }

    fn grow_filesystem(&self, fs: FileSystem, device: &Path, mount: &Path) -> Result<()> {
        grow_filesystem(fs, device, mount)
    }

    fn can_grow_online(&self, fs: FileSystem) -> bool {
        fs != FileSystem::Ext4 || has_capability(CAP_SYS_RESOURCE)
    }

    fn grow_filesystem_offline(&self, fs: FileSystem, device: &Path) -> Result<()> {
        grow_filesystem_offline(fs, device)
    }

    fn reconfigure(&self, mount: &Path, options: &[String]) -> Result<()> {
        mount::reconfigure(mount, options)
    }

    fn set_xattr(&self, path: &Path, name: &str, value: &[u8]) -> Result<()> {
        set_xattr(path, name, value)
    }

    fn set_nocow(&self, dir: &Path, on: bool) -> Result<()> {
        set_dir_nocow(dir, on)
    }

    fn get_xattr(&self, path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
        get_xattr(path, name)
    }

    fn set_block_read_only(&self, device: &Path, read_only: bool) -> Result<()> {
        device::set_read_only(device, read_only)
    }

    fn block_device_size(&self, device: &Path) -> Result<u64> {
        device::size(device)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::ext4("DEVNAME=/dev/loop3\nUUID=ab\nBLOCK_SIZE=1024\nTYPE=ext4\n", Some("ext4"))]
    #[case::gpt("DEVNAME=/dev/loop3\nPTUUID=x\nPTTYPE=gpt\n", Some("gpt"))]
    #[case::both("PTTYPE=dos\nTYPE=vfat\n", Some("vfat"))]
    #[case::nothing("DEVNAME=/dev/loop3\n", None)]
    #[case::empty_type("TYPE=\n", None)]
    fn parses_blkid(#[case] text: &str, #[case] expected: Option<&str>) {
        assert_eq!(parse_blkid_export(text).as_deref(), expected);
    }

    #[test]
    fn magic_handles_sign_extension() {
        assert_eq!(fs_magic(0x9123_683e_i64), crate::magic::BTRFS);
        assert_eq!(fs_magic(0x9123_683e_u32 as i32), crate::magic::BTRFS);
    }

    #[test]
    fn files_and_targets_in_a_temp_dir() {
        let host = LinuxHost::new();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();

        let deep = root.join("a/b/c");
        host.create_dir_all(&deep, 0o700).unwrap();
        host.create_dir_all(&deep, 0o700).unwrap();
        assert_eq!(std::fs::metadata(&deep).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(host.list_dir(&root.join("a")).unwrap(), vec!["b"]);
        assert_eq!(host.list_dir(&root.join("missing")).unwrap(), Vec::<String>::new());

        let image = root.join("img");
        host.create_image(&image, 1 << 20, true).unwrap();
        host.create_image(&image, 1 << 20, true).unwrap();
        assert_eq!(host.file_size(&image).unwrap(), Some(1 << 20));
        assert!(matches!(
            host.create_image(&image, 2 << 20, true),
            Err(HostError::WrongType { .. })
        ));
        // A crash between create and fallocate leaves an empty file: finishing it is success.
        let empty = root.join("empty");
        std::fs::File::create(&empty).unwrap();
        host.create_image(&empty, 4096, false).unwrap();
        assert_eq!(host.file_size(&empty).unwrap(), Some(4096));
        host.remove_file(&image).unwrap();
        host.remove_file(&image).unwrap();
        assert_eq!(host.file_size(&image).unwrap(), None);

        let t = root.join("target");
        host.prepare_target(&t, TargetKind::Directory).unwrap();
        host.prepare_target(&t, TargetKind::Directory).unwrap();
        // An empty directory is replaced by a file for block targets.
        host.prepare_target(&t, TargetKind::File).unwrap();
        assert!(std::fs::symlink_metadata(&t).unwrap().is_file());
        assert!(matches!(
            host.prepare_target(&t, TargetKind::Directory),
            Err(HostError::WrongType { .. })
        ));
        host.remove_target(&t).unwrap();
        host.remove_target(&t).unwrap();
        assert!(!host.exists(&t).unwrap());

        let full = root.join("full");
        host.create_dir_all(&full.join("x"), 0o755).unwrap();
        assert!(matches!(
            host.prepare_target(&full, TargetKind::File),
            Err(HostError::WrongType { .. })
        ));

        let link = root.join("link");
        std::os::unix::fs::symlink(&deep, &link).unwrap();
        assert!(matches!(
            host.prepare_target(&link, TargetKind::Directory),
            Err(HostError::Symlink { .. })
        ));
        assert!(host.exists(&link).unwrap());
        host.remove_target(&link).unwrap();
        assert!(
            deep.exists(),
            "removing a symlink target must not touch what it points to"
        );

        host.remove_dir(&deep).unwrap();
        host.remove_dir(&deep).unwrap();
        let stats = host.statfs(root).unwrap();
        assert!(stats.total_bytes > 0 && stats.total_inodes >= stats.free_inodes);
    }

    use std::os::unix::fs::PermissionsExt;
}

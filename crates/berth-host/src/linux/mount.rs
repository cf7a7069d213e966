//! Mounts through file descriptors (the "new mount API").
//!
//! A mount is built detached (fsopen → fsconfig → fsmount for a new filesystem, open_tree
//! clone → mount_setattr for a bind) and then attached with move_mount to a target that was
//! opened with `O_PATH | O_NOFOLLOW`: the target is checked and used through the same fd, so a
//! symlink swapped in at the last component can never redirect the mount. Nothing is attached
//! when any step fails. An existing mount is changed in place with fspick → fsconfig →
//! `FSCONFIG_CMD_RECONFIGURE` (filesystem parameters) and mount_setattr (mount attributes).

use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{CWD, FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, FsPickFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};

use crate::{HostError, MountRequest, MountSource, Result, Unmounted};

const ATTR_RDONLY: u64 = MountAttrFlags::MOUNT_ATTR_RDONLY.bits() as u64;
const ATTR_NOSUID: u64 = MountAttrFlags::MOUNT_ATTR_NOSUID.bits() as u64;
const ATTR_NODEV: u64 = MountAttrFlags::MOUNT_ATTR_NODEV.bits() as u64;
const ATTR_NOEXEC: u64 = MountAttrFlags::MOUNT_ATTR_NOEXEC.bits() as u64;
const ATTR_ATIME_MASK: u64 = MountAttrFlags::MOUNT_ATTR__ATIME.bits() as u64;
const ATTR_RELATIME: u64 = MountAttrFlags::MOUNT_ATTR_RELATIME.bits() as u64;
const ATTR_NOATIME: u64 = MountAttrFlags::MOUNT_ATTR_NOATIME.bits() as u64;
const ATTR_STRICTATIME: u64 = MountAttrFlags::MOUNT_ATTR_STRICTATIME.bits() as u64;
const ATTR_NODIRATIME: u64 = MountAttrFlags::MOUNT_ATTR_NODIRATIME.bits() as u64;
const ATTR_NOSYMFOLLOW: u64 = MountAttrFlags::MOUNT_ATTR_NOSYMFOLLOW.bits() as u64;

/// Mount options split into mount attributes and filesystem parameters.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SplitOptions {
    pub read_only: bool,
    /// `MOUNT_ATTR_*` bits to set (without the atime mode).
    pub attr_set: u64,
    /// `MOUNT_ATTR_*` bits to clear (`suid`, `dev`, ...: meaningful for bind mounts).
    pub attr_clr: u64,
    /// The atime mode (`MOUNT_ATTR_RELATIME`, `_NOATIME`, `_STRICTATIME`) when one was given.
    pub atime: Option<u64>,
    /// Filesystem parameters for fsconfig: `key` (flag) or `key=value` (string).
    pub fs: Vec<(String, Option<String>)>,
}

impl SplitOptions {
    /// Attributes for fsmount / mount_setattr: (set, clear).
    fn attributes(&self) -> (u64, u64) {
        let mut set = self.attr_set | self.atime.unwrap_or(0);
        let mut clr = self.attr_clr;
        if self.read_only {
            set |= ATTR_RDONLY;
        }
        if self.atime.is_some() {
            clr |= ATTR_ATIME_MASK;
        }
        (set, clr)
    }
}

/// Sorts mount(8)-style options. Entries may themselves hold comma-separated lists.
pub(crate) fn split_options(options: &[String], read_only: bool) -> SplitOptions {
    let mut out = SplitOptions {
        read_only,
        ..SplitOptions::default()
    };
    for option in options.iter().flat_map(|o| o.split(',')) {
        let option = option.trim();
        match option {
            "" | "defaults" | "rw" | "bind" | "rbind" => {}
            "ro" => out.read_only = true,
            "nosuid" => out.attr_set |= ATTR_NOSUID,
            "nodev" => out.attr_set |= ATTR_NODEV,
            "noexec" => out.attr_set |= ATTR_NOEXEC,
            "nodiratime" => out.attr_set |= ATTR_NODIRATIME,
            "nosymfollow" => out.attr_set |= ATTR_NOSYMFOLLOW,
            "suid" => out.attr_clr |= ATTR_NOSUID,
            "dev" => out.attr_clr |= ATTR_NODEV,
            "exec" => out.attr_clr |= ATTR_NOEXEC,
            "diratime" => out.attr_clr |= ATTR_NODIRATIME,
            "relatime" => out.atime = Some(ATTR_RELATIME),
            "noatime" => out.atime = Some(ATTR_NOATIME),
            "strictatime" => out.atime = Some(ATTR_STRICTATIME),
            other => match other.split_once('=') {
                Some((k, v)) => out.fs.push((k.to_owned(), Some(v.to_owned()))),
                None => out.fs.push((other.to_owned(), None)),
            },
        }
    }
    // Given both ways ("nosuid" and "suid"), the restrictive one wins.
    out.attr_clr &= !out.attr_set;
    out
}

/// Opens a mount target without following a final symlink.
fn open_target(target: &Path) -> Result<OwnedFd> {
    const OP: &str = "mount: open target";
    let fd = rustix::fs::open(target, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| HostError::io(OP, target, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| HostError::io(OP, target, e))?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        return Err(HostError::Symlink {
            path: target.to_owned(),
        });
    }
    Ok(fd)
}

pub(super) fn mount(request: &MountRequest) -> Result<()> {
    let target = &request.target;
    let options = split_options(&request.options, request.read_only);
    let target_fd = open_target(target)?;
    let detached = match &request.source {
        MountSource::Device { device, fs } => new_filesystem(fs.as_str(), &device.to_string_lossy(), &options, target)?,
        MountSource::Tmpfs => new_filesystem("tmpfs", "tmpfs", &options, target)?,
        MountSource::Bind { source } => bind(source, &options, target)?,
    };
    rustix::mount::move_mount(
        &detached,
        "",
        &target_fd,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| HostError::io("mount: move_mount", target, e))?;
    tracing::debug!(target = %target.display(), source = ?request.source, "mounted");
    Ok(())
}

fn new_filesystem(fs_type: &str, source: &str, options: &SplitOptions, target: &Path) -> Result<OwnedFd> {
    let fs_fd = rustix::mount::fsopen(fs_type, FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| HostError::io("mount: fsopen", target, e))?;
    let configure = || -> std::result::Result<(), (&'static str, Errno)> {
        rustix::mount::fsconfig_set_string(&fs_fd, "source", source).map_err(|e| ("mount: fsconfig source", e))?;
        if options.read_only {
            // A read-only device (loop with LO_FLAGS_READ_ONLY) cannot back a read-write superblock.
            rustix::mount::fsconfig_set_flag(&fs_fd, "ro").map_err(|e| ("mount: fsconfig ro", e))?;
        }
        for (key, value) in &options.fs {
            match value {
                Some(v) => rustix::mount::fsconfig_set_string(&fs_fd, key.as_str(), v.as_str()),
                None => rustix::mount::fsconfig_set_flag(&fs_fd, key.as_str()),
            }
            .map_err(|e| ("mount: fsconfig option", e))?;
        }
        rustix::mount::fsconfig_create(&fs_fd).map_err(|e| ("mount: fsconfig create", e))
    };
    if let Err((op, e)) = configure() {
        let log = kernel_log(&fs_fd);
        tracing::warn!(target = %target.display(), fs_type, source, kernel = %log, "{op} failed: {e}");
        return Err(HostError::io(op, target, e));
    }
    let (set, _) = options.attributes();
    let attrs = MountAttrFlags::from_bits_retain(u32::try_from(set).unwrap_or(0));
    rustix::mount::fsmount(&fs_fd, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(|e| HostError::io("mount: fsmount", target, e))
}

/// Messages the kernel queued on an fs context ("e ext4: ..."), for the log.
fn kernel_log(fs_fd: &OwnedFd) -> String {
    let mut lines = Vec::new();
    let mut buf = [0u8; 512];
    // Each read returns one message; ENODATA when none are left. Bounded in case of a flood.
    for _ in 0..16 {
        match rustix::io::read(fs_fd, &mut buf) {
            Ok(n) if n > 0 => lines.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()),
            _ => break,
        }
    }
    lines.join("; ")
}

fn bind(source: &Path, options: &SplitOptions, target: &Path) -> Result<OwnedFd> {
    if !options.fs.is_empty() {
        // mount(8) ignores filesystem options on a bind mount too; the filesystem is shared.
        tracing::warn!(
            target = %target.display(),
            ignored = ?options.fs,
            "filesystem options do not apply to a bind mount; ignoring them"
        );
    }
    let tree = rustix::mount::open_tree(
        CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|e| HostError::io("mount: open_tree", source, e))?;
    let (set, clr) = options.attributes();
    if set != 0 || clr != 0 {
        mount_setattr(&tree, set, clr).map_err(|e| HostError::io("mount: mount_setattr", target, e))?;
    }
    Ok(tree)
}

/// `struct mount_attr`
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const _: () = assert!(size_of::<MountAttr>() == 32);

fn mount_setattr(fd: &OwnedFd, set: u64, clr: u64) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clr,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(dfd, path, flags, uattr, usize) reads `usize` bytes from `uattr`,
    // which points to a live `struct mount_attr` of exactly that size; the path is a static
    // NUL-terminated empty string used with AT_EMPTY_PATH to address `fd` itself.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets filesystem parameters (`size=2M`, `nr_inodes=100`) of the filesystem mounted at
/// `mount` and reconfigures it; mount attributes among `options` (`ro`/`rw`, `nosuid`,
/// `noatime`, ...) are applied to this mount only, as [`mount`] does.
pub(super) fn reconfigure(mount: &Path, options: &[String]) -> Result<()> {
    // `ro` and `rw` change the superblock, so every bind of the filesystem (staging path,
    // targets) follows; they are not attributes of this one mount here.
    let (sb_flags, options): (Vec<String>, Vec<String>) = options
        .iter()
        .flat_map(|o| o.split(','))
        .map(|o| o.trim().to_owned())
        .filter(|o| !o.is_empty())
        .partition(|o| o == "ro" || o == "rw");
    let options = options.as_slice();
    let mut split = split_options(options, false);
    split.fs.extend(sb_flags.into_iter().map(|f| (f, None)));
    if !split.fs.is_empty() {
        // fspick refuses (EINVAL) anything but the root of a mount; a final symlink is not
        // followed.
        let fs_fd = rustix::mount::fspick(
            CWD,
            mount,
            FsPickFlags::FSPICK_CLOEXEC | FsPickFlags::FSPICK_SYMLINK_NOFOLLOW | FsPickFlags::FSPICK_NO_AUTOMOUNT,
        )
        .map_err(|e| HostError::io("reconfigure: fspick", mount, e))?;
        let configure = || -> std::result::Result<(), (&'static str, Errno)> {
            for (key, value) in &split.fs {
                match value {
                    Some(v) => rustix::mount::fsconfig_set_string(&fs_fd, key.as_str(), v.as_str()),
                    None => rustix::mount::fsconfig_set_flag(&fs_fd, key.as_str()),
                }
                .map_err(|e| ("reconfigure: fsconfig option", e))?;
            }
            rustix::mount::fsconfig_reconfigure(&fs_fd).map_err(|e| ("reconfigure: fsconfig reconfigure", e))
        };
        if let Err((op, e)) = configure() {
            let log = kernel_log(&fs_fd);
            tracing::warn!(mount = %mount.display(), ?options, kernel = %log, "{op} failed: {e}");
            return Err(HostError::io(op, mount, e));
        }
    }
    let (set, clr) = split.attributes();
    if set != 0 || clr != 0 {
        let fd = open_target(mount)?;
        mount_setattr(&fd, set, clr).map_err(|e| HostError::io("reconfigure: mount_setattr", mount, e))?;
    }
    tracing::debug!(mount = %mount.display(), ?options, "reconfigured");
    Ok(())
}

pub(super) fn unmount(target: &Path) -> Result<Unmounted> {
    match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
        Ok(()) => {
            tracing::debug!(target = %target.display(), "unmounted");
            Ok(Unmounted::Removed)
        }
        // EINVAL: not a mount point (or a symlink, which UMOUNT_NOFOLLOW refuses to follow).
        Err(Errno::INVAL | Errno::NOENT) => Ok(Unmounted::NotMounted),
        Err(e) => Err(HostError::io("unmount", target, e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn opts(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[rstest]
    #[case::empty(&[], false, SplitOptions::default())]
    #[case::ro_flag(&["ro"], false, SplitOptions { read_only: true, ..Default::default() })]
    #[case::ro_request(&["rw"], true, SplitOptions { read_only: true, ..Default::default() })]
    #[case::attrs(&["nosuid,nodev", "noexec"], false,
        SplitOptions { attr_set: ATTR_NOSUID | ATTR_NODEV | ATTR_NOEXEC, ..Default::default() })]
    #[case::atime(&["relatime", "noatime", "nodiratime"], false,
        SplitOptions { atime: Some(ATTR_NOATIME), attr_set: ATTR_NODIRATIME, ..Default::default() })]
    #[case::fs(&["size=1M", "discard", "mode=0755"], false, SplitOptions {
        fs: vec![("size".into(), Some("1M".into())), ("discard".into(), None), ("mode".into(), Some("0755".into()))],
        ..Default::default()
    })]
    #[case::clear(&["suid", "exec"], false,
        SplitOptions { attr_clr: ATTR_NOSUID | ATTR_NOEXEC, ..Default::default() })]
    fn splits(#[case] input: &[&str], #[case] read_only: bool, #[case] expected: SplitOptions) {
        assert_eq!(split_options(&opts(input), read_only), expected);
    }

    #[test]
    fn attributes_clear_the_atime_field_when_an_atime_mode_is_given() {
        let s = split_options(&opts(&["ro", "relatime"]), false);
        assert_eq!(s.attributes(), (ATTR_RDONLY | ATTR_RELATIME, ATTR_ATIME_MASK));
        let s = split_options(&opts(&["nosuid"]), false);
        assert_eq!(s.attributes(), (ATTR_NOSUID, 0));
    }
}

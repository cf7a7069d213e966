//! Block-device and filesystem-wide ioctls: freeze/thaw, read-only flag, size.
//!
//! Freezing is host-wide and dangerous if aimed at the wrong filesystem (freezing `/` stalls
//! the machine), so [`freeze`] only acts on a path that is the root of a mount.

use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxAttributes, StatxFlags};
use rustix::io::Errno;
use rustix::ioctl::{self, Getter, Setter, Updater, opcode};

use crate::{HostError, Result};

/// `FIFREEZE`: `_IOWR('X', 119, int)`.
const FIFREEZE: ioctl::Opcode = opcode::read_write::<libc::c_int>(b'X', 119);
/// `FITHAW`: `_IOWR('X', 120, int)`.
const FITHAW: ioctl::Opcode = opcode::read_write::<libc::c_int>(b'X', 120);
/// `BLKROSET`: `_IO(0x12, 93)`, although it reads an `int` through its argument.
const BLKROSET: ioctl::Opcode = opcode::none(0x12, 93);
/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`; the kernel writes a u64 whatever `size_t` is.
const BLKGETSIZE64: ioctl::Opcode = opcode::read::<libc::size_t>(0x12, 114);

/// Opens the root directory of the mount at `mount`; anything else is `WrongType`.
fn open_mount_root(op: &'static str, mount: &Path) -> Result<OwnedFd> {
    let fd = rustix::fs::open(
        mount,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| HostError::io(op, mount, e))?;
    let stx = rustix::fs::statx(&fd, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)
        .map_err(|e| HostError::io(op, mount, e))?;
    // Kernels before 5.8 do not report the attribute: then the ioctl has to be trusted.
    if stx.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
        && !stx.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
    {
        return Err(HostError::WrongType {
            path: mount.to_owned(),
            reason: format!("{op}: is not the root of a mount"),
        });
    }
    Ok(fd)
}

pub(super) fn freeze(mount: &Path) -> Result<()> {
    const OP: &str = "freeze";
    let fd = open_mount_root(OP, mount)?;
    let mut unused: libc::c_int = 0;
    // SAFETY: FIFREEZE ignores its argument; a live int is passed for the declared type.
    match unsafe { ioctl::ioctl(&fd, Updater::<FIFREEZE, libc::c_int>::new(&mut unused)) } {
        Ok(()) => {
            tracing::info!(mount = %mount.display(), "filesystem frozen");
            Ok(())
        }
        // Already frozen (by us or by fsfreeze): the state the caller wants.
        Err(Errno::BUSY) => Ok(()),
        Err(e) => Err(HostError::io(OP, mount, e)),
    }
}

pub(super) fn thaw(mount: &Path) -> Result<()> {
    const OP: &str = "thaw";
    let fd = open_mount_root(OP, mount)?;
    let mut unused: libc::c_int = 0;
    // SAFETY: FITHAW ignores its argument; a live int is passed for the declared type.
    match unsafe { ioctl::ioctl(&fd, Updater::<FITHAW, libc::c_int>::new(&mut unused)) } {
        Ok(()) => {
            tracing::info!(mount = %mount.display(), "filesystem thawed");
            Ok(())
        }
        // Not frozen.
        Err(Errno::INVAL) => Ok(()),
        Err(e) => Err(HostError::io(OP, mount, e)),
    }
}

/// Opens a block device node (not following a symlink); other file types are `WrongType`.
pub(super) fn open_block_device(op: &'static str, device: &Path) -> Result<OwnedFd> {
    let fd = rustix::fs::open(
        device,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| HostError::io(op, device, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| HostError::io(op, device, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::BlockDevice {
        return Err(HostError::WrongType {
            path: device.to_owned(),
            reason: "is not a block device".into(),
        });
    }
    Ok(fd)
}

/// BLKROSET on an open block device. The flag belongs to the device, not to what is attached
/// to it: on a loop device it outlives a detach and applies to the next backing file.
pub(super) fn set_read_only_fd(fd: &OwnedFd, read_only: bool) -> std::result::Result<(), Errno> {
    let flag: libc::c_int = read_only.into();
    // SAFETY: BLKROSET reads one `int` through its pointer argument, which Setter passes.
    unsafe { ioctl::ioctl(fd, Setter::<BLKROSET, libc::c_int>::new(flag)) }
}

pub(super) fn set_read_only(device: &Path, read_only: bool) -> Result<()> {
    const OP: &str = "set block device read-only";
    let fd = open_block_device(OP, device)?;
    set_read_only_fd(&fd, read_only).map_err(|e| HostError::io(OP, device, e))?;
    tracing::debug!(device = %device.display(), read_only, "block device flag set");
    Ok(())
}

pub(super) fn size(device: &Path) -> Result<u64> {
    const OP: &str = "block device size";
    let fd = open_block_device(OP, device)?;
    // SAFETY: BLKGETSIZE64 writes one u64 (`size_t` on 64-bit) into the Getter's buffer.
    unsafe { ioctl::ioctl(&fd, Getter::<BLKGETSIZE64, u64>::new()) }.map_err(|e| HostError::io(OP, device, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_match_the_kernel_headers() {
        assert_eq!(FIFREEZE as u64, 0xc004_5877);
        assert_eq!(FITHAW as u64, 0xc004_5878);
        assert_eq!(BLKROSET as u64, 0x125d);
        assert_eq!(BLKGETSIZE64 as u64, 0x8008_1272);
    }
}

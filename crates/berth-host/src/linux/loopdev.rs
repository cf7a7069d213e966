//! Loop devices: attach with `LOOP_CONFIGURE`, detach with `LOOP_CLR_FD`, resize with
//! `LOOP_SET_CAPACITY`, list from sysfs.
//!
//! Attaching races with every other attacher on the host (losetup, mount -o loop, other Berth
//! threads): a device handed out by `LOOP_CTL_GET_FREE` may be taken before we configure it, so
//! `EBUSY` moves on to the next free device. Direct I/O is asked for and verified through sysfs;
//! when the backing filesystem refuses it the device falls back to buffered I/O and says so.

use std::fs;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxFlags};
use rustix::io::Errno;
use rustix::ioctl::{self, NoArg, Updater};

use crate::{HostError, LoopDevice, LoopOptions, Result};

const LOOP_CLR_FD: ioctl::Opcode = 0x4C01;
const LOOP_SET_CAPACITY: ioctl::Opcode = 0x4C07;
const LOOP_CONFIGURE: ioctl::Opcode = 0x4C0A;
const LOOP_GET_STATUS64: ioctl::Opcode = 0x4C05;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// How many free devices to try before giving up on a busy host.
const ATTACH_ATTEMPTS: usize = 64;

/// `struct loop_info64`
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(size_of::<LoopInfo64>() == 232);
const _: () = assert!(size_of::<LoopConfig>() == 304);

fn loop_config(backing_fd: &OwnedFd, backing: &Path, block_size: u32, flags: u32) -> Result<LoopConfig> {
    let fd = u32::try_from(backing_fd.as_raw_fd()).map_err(|_| HostError::io("loop attach", backing, Errno::BADF))?;
    let mut name = [0u8; LO_NAME_SIZE];
    let bytes = backing.as_os_str().as_bytes();
    // Informational only (losetup shows it); truncated, always NUL-terminated.
    let n = bytes.len().min(LO_NAME_SIZE - 1);
    name[..n].copy_from_slice(&bytes[..n]);
    Ok(LoopConfig {
        fd,
        block_size,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    })
}

/// Logical block size for direct I/O: the backing file's direct-I/O alignment (`statx`
/// `STATX_DIOALIGN`), so that the device's requests can go to the file unbuffered. 0 lets the
/// kernel choose (512 without direct I/O).
fn dio_block_size(backing_fd: &OwnedFd) -> u32 {
    match rustix::fs::statx(backing_fd, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(stx) if stx.stx_mask & StatxFlags::DIOALIGN.bits() != 0 => {
            let align = stx.stx_dio_offset_align;
            if align.is_power_of_two() && (512..=4096).contains(&align) {
                align
            } else {
                0
            }
        }
        _ => 0,
    }
}

/// Attaches `backing`; also returns the open device, which keeps an autoclear device alive.
pub(super) fn attach(backing: &Path, options: LoopOptions) -> Result<(LoopDevice, OwnedFd)> {
    const OP: &str = "loop attach";
    let access = if options.read_only {
        OFlags::RDONLY
    } else {
        OFlags::RDWR
    };
    let backing_fd = rustix::fs::open(backing, access | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty())
        .map_err(|e| HostError::io(OP, backing, e))?;
    let st = rustix::fs::fstat(&backing_fd).map_err(|e| HostError::io(OP, backing, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(HostError::WrongType {
            path: backing.to_owned(),
            reason: "a loop device needs a regular file behind it".into(),
        });
    }
    let block_size = if options.direct_io {
        dio_block_size(&backing_fd)
    } else {
        0
    };
    let mut flags = 0;
    if options.read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    if options.autoclear {
        flags |= LO_FLAGS_AUTOCLEAR;
    }
    let mut want_dio = options.direct_io;

    let control = rustix::fs::open("/dev/loop-control", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| HostError::io(OP, "/dev/loop-control", e))?;
    let mut last_busy = None;
    for _ in 0..ATTACH_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(HostError::io(OP, "/dev/loop-control", std::io::Error::last_os_error()));
        }
        let number = n.unsigned_abs();
        let device = PathBuf::from(format!("/dev/loop{number}"));
        let dev_fd = match rustix::fs::open(&device, access | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            // The node can lag behind its creation, or the device was just removed: try another.
            Err(e @ (Errno::NOENT | Errno::NXIO)) => {
                last_busy = Some(HostError::io(OP, &device, e));
                continue;
            }
            Err(e) => return Err(HostError::io(OP, &device, e)),
        };
        loop {
            let lo_flags = if want_dio { flags | LO_FLAGS_DIRECT_IO } else { flags };
            let mut config = loop_config(&backing_fd, backing, block_size, lo_flags)?;
            // SAFETY: LOOP_CONFIGURE takes a `struct loop_config` (layout and size checked
            // above); the kernel only reads it and takes its own reference to the backing fd.
            let r = unsafe { ioctl::ioctl(&dev_fd, Updater::<LOOP_CONFIGURE, LoopConfig>::new(&mut config)) };
            match r {
                Ok(()) => {
                    if !options.read_only {
                        clear_stale_read_only(&dev_fd, &device);
                    }
                    return Ok(finish(number, device, backing, options, want_dio, dev_fd));
                }
                Err(Errno::BUSY) => {
                    last_busy = Some(HostError::io(OP, &device, Errno::BUSY));
                    break;
                }
                Err(Errno::INVAL) if want_dio => {
                    tracing::warn!(
                        backing = %backing.display(),
                        "direct I/O refused for loop device backing file; falling back to buffered I/O"
                    );
                    want_dio = false;
                }
                Err(e) => return Err(HostError::io(OP, &device, e)),
            }
        }
    }
    Err(last_busy.unwrap_or_else(|| HostError::io(OP, backing, Errno::BUSY)))
}

/// A BLKROSET left on the device by its previous user (the flag survives LOOP_CLR_FD) would
/// make this read-write attachment refuse every write with EPERM.
fn clear_stale_read_only(dev_fd: &OwnedFd, device: &Path) {
    if let Err(e) = super::device::set_read_only_fd(dev_fd, false) {
        tracing::warn!(device = %device.display(), "could not clear the read-only flag of the loop device: {e}");
    }
}

fn finish(
    number: u32,
    device: PathBuf,
    backing: &Path,
    options: LoopOptions,
    asked_dio: bool,
    dev_fd: OwnedFd,
) -> (LoopDevice, OwnedFd) {
    let status = read_status(number);
    // The kernel may quietly keep buffered I/O (older kernels, unaligned backing files).
    let direct_io = match &status {
        Some(s) => s.direct_io,
        None => asked_dio,
    };
    if asked_dio && !direct_io {
        tracing::warn!(
            device = %device.display(),
            backing = %backing.display(),
            "loop device runs with buffered I/O: the backing filesystem did not accept direct I/O"
        );
    }
    let dev = LoopDevice {
        device,
        number,
        backing_file: status
            .as_ref()
            .map_or_else(|| backing.to_owned(), |s| s.backing_file.clone()),
        direct_io,
        autoclear: options.autoclear,
        read_only: status.as_ref().map_or(options.read_only, |s| s.read_only),
    };
    tracing::debug!(device = %dev.device.display(), backing = %backing.display(), dio = dev.direct_io, "loop device attached");
    (dev, dev_fd)
}

/// The identity `(st_dev, st_ino)` of a file, as `LOOP_GET_STATUS64` reports a backing file's.
pub(super) type FileId = (u64, u64);

/// `(st_dev, st_ino)` of `path`; `None` if it is gone.
pub(super) fn file_id(path: &Path) -> Result<Option<FileId>> {
    match rustix::fs::stat(path) {
        Ok(st) => Ok(Some((st.st_dev, st.st_ino))),
        Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
        Err(e) => Err(HostError::io("stat backing file", path, e)),
    }
}

/// The identity of the file behind an open loop device; `None` when nothing is attached.
/// Unlike sysfs's `backing_file` (a path as the attaching process's mount namespace saw it),
/// it means the same in every namespace.
fn backing_id(dev_fd: &OwnedFd) -> Option<FileId> {
    // SAFETY: all-zero bytes are a valid `LoopInfo64` (integers and byte arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 fills a `struct loop_info64` (layout and size checked above).
    unsafe { ioctl::ioctl(dev_fd, Updater::<LOOP_GET_STATUS64, LoopInfo64>::new(&mut info)) }.ok()?;
    Some((info.lo_device, info.lo_inode))
}

fn open_device(number: u32) -> Option<OwnedFd> {
    let path = format!("/dev/loop{number}");
    rustix::fs::open(
        path.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .ok()
}

/// Every attached loop device by the identity of its backing file.
pub(super) fn ids() -> Result<Vec<(FileId, u32)>> {
    Ok(list()?
        .into_iter()
        .filter_map(|d| Some((backing_id(&open_device(d.number)?)?, d.number)))
        .collect())
}

/// `loopN` if it is attached to the file `id` (the one at `backing`), reported with `backing`
/// as its backing file.
pub(super) fn status_if(number: u32, id: FileId, backing: &Path) -> Option<LoopDevice> {
    let fd = open_device(number)?;
    if backing_id(&fd)? != id {
        return None;
    }
    let mut d = status(number)?;
    d.backing_file = backing.to_owned();
    Some(d)
}

/// Detaches `device` if `backing` is still what it is attached to; `unpin` runs just before.
pub(super) fn detach(device: &Path, backing: &Path, unpin: impl FnOnce()) -> Result<()> {
    const OP: &str = "loop detach";
    let fd = match rustix::fs::open(
        device,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::NXIO) => return Ok(()),
        Err(e) => return Err(HostError::io(OP, device, e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| HostError::io(OP, device, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::BlockDevice {
        return Err(HostError::WrongType {
            path: device.to_owned(),
            reason: "is not a block device".into(),
        });
    }
    // The fd pins the device: it cannot be detached and handed to someone else while we look.
    let Some(attached) = backing_id(&fd) else {
        unpin();
        return Ok(());
    };
    let ours = match file_id(backing)? {
        Some(id) => id == attached,
        // The image is gone (a condition check's subject): only its old path can tell.
        None => read_status(rustix::fs::minor(st.st_rdev)).is_some_and(|s| same_backing(&s.backing_file, backing)),
    };
    if !ours {
        tracing::debug!(device = %device.display(), backing = %backing.display(), "loop device now holds another file: not detaching");
        return Ok(());
    }
    unpin();
    // SAFETY: LOOP_CLR_FD takes no argument.
    let cleared = unsafe { ioctl::ioctl(&fd, NoArg::<LOOP_CLR_FD>::new()) };
    if cleared.is_ok() {
        // Do not hand a read-only flag (set_block_read_only) on to the device's next user.
        let _ = super::device::set_read_only_fd(&fd, false);
    }
    match cleared {
        // ENXIO: not attached. A device still open elsewhere (mounted) is detached by the kernel
        // on its last close.
        Ok(()) | Err(Errno::NXIO) => Ok(()),
        Err(Errno::NOTTY | Errno::INVAL) => Err(HostError::WrongType {
            path: device.to_owned(),
            reason: "is not a loop device".into(),
        }),
        Err(e) => Err(HostError::io(OP, device, e)),
    }
}

/// Makes the device re-read its backing file's size (after the file grew).
pub(super) fn set_capacity(device: &Path) -> Result<()> {
    const OP: &str = "loop set capacity";
    let fd = super::device::open_block_device(OP, device)?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    match unsafe { ioctl::ioctl(&fd, NoArg::<LOOP_SET_CAPACITY>::new()) } {
        Ok(()) => Ok(()),
        Err(Errno::NOTTY | Errno::INVAL) => Err(HostError::WrongType {
            path: device.to_owned(),
            reason: "is not a loop device".into(),
        }),
        // ENXIO: nothing is attached to it.
        Err(e) => Err(HostError::io(OP, device, e)),
    }
}

/// Whether sysfs's `backing_file` names `want` (sysfs appends " (deleted)" once it is unlinked).
fn same_backing(sysfs: &Path, want: &Path) -> bool {
    let s = sysfs.as_os_str().as_bytes();
    s == want.as_os_str().as_bytes() || s.strip_suffix(b" (deleted)") == Some(want.as_os_str().as_bytes())
}

struct Status {
    backing_file: PathBuf,
    direct_io: bool,
    autoclear: bool,
    read_only: bool,
}

/// sysfs view of `loopN`; `None` when it is not attached.
fn read_status(number: u32) -> Option<Status> {
    let base = PathBuf::from(format!("/sys/block/loop{number}"));
    let backing = fs::read(base.join("loop/backing_file")).ok()?;
    let flag = |rel: &str| fs::read_to_string(base.join(rel)).is_ok_and(|s| s.trim() == "1");
    let backing = backing.strip_suffix(b"\n").unwrap_or(&backing);
    Some(Status {
        backing_file: PathBuf::from(std::ffi::OsStr::from_bytes(backing)),
        direct_io: flag("loop/dio"),
        autoclear: flag("loop/autoclear"),
        read_only: flag("ro"),
    })
}

pub(super) fn list() -> Result<Vec<LoopDevice>> {
    let entries = match fs::read_dir("/sys/block") {
        Ok(e) => e,
        Err(e) => return Err(HostError::io("list loop devices", "/sys/block", e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        out.extend(status(number));
    }
    out.sort_by_key(|d| d.number);
    Ok(out)
}

/// `loopN` as sysfs shows it now; `None` when nothing is attached to it.
pub(super) fn status(number: u32) -> Option<LoopDevice> {
    let s = read_status(number)?;
    Some(LoopDevice {
        device: PathBuf::from(format!("/dev/loop{number}")),
        number,
        backing_file: s.backing_file,
        direct_io: s.direct_io,
        autoclear: s.autoclear,
        read_only: s.read_only,
    })
}

//! File clones and tree copies.
//!
//! A clone first asks the filesystem to share extents (`FICLONE`: btrfs, XFS with reflink),
//! which is instant and costs no space until either side changes. Where it cannot (ext4, tmpfs,
//! across filesystems) the data is copied, sparse-aware: only the ranges `SEEK_DATA`/`SEEK_HOLE`
//! report as data are read and written, so holes stay holes. Note that btrfs, ext4 and XFS all
//! report *preallocated but unwritten* ranges as holes, so a copied image is sparse even when
//! its source was fully preallocated.
//!
//! Everything works through file descriptors opened with `O_NOFOLLOW`: a symlink is never
//! followed, in the source or in the destination.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, CWD, Dir, FileType, IFlags, Mode, OFlags, SeekFrom, Timespec, Timestamps};
use rustix::io::Errno;

use crate::{CloneMethod, HostError, Result};

/// Bytes per read/write of the copy fallback.
const CHUNK: usize = 1 << 20;
/// The copy fallback logs its progress every this many bytes.
const PROGRESS_EVERY: u64 = 256 << 20;

/// Whether [`clone_fd`] may try `FICLONE` first (tests force the copy path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Strategy {
    ReflinkOrCopy,
    #[cfg_attr(not(test), allow(dead_code))]
    CopyOnly,
}

fn kind(st: &rustix::fs::Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

fn open_regular(op: &'static str, dir: impl AsFd, name: &Path, path: &Path) -> Result<(OwnedFd, rustix::fs::Stat)> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::LOOP => HostError::Symlink { path: path.to_owned() },
        e => HostError::io(op, path, e),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| HostError::io(op, path, e))?;
    if kind(&st) != FileType::RegularFile {
        return Err(HostError::WrongType {
            path: path.to_owned(),
            reason: "is not a regular file".into(),
        });
    }
    Ok((fd, st))
}

fn create_exclusive(op: &'static str, dir: impl AsFd, name: &Path, path: &Path) -> Result<OwnedFd> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| HostError::io(op, path, e))?;
    // The umask may have narrowed the mode; the contract says 0600.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600)).map_err(|e| HostError::io(op, path, e))?;
    Ok(fd)
}

pub(super) fn clone_file(source: &Path, dest: &Path) -> Result<CloneMethod> {
    clone_file_with(source, dest, Strategy::ReflinkOrCopy)
}

/// [`clone_file`] with a choice of strategy; a failed clone leaves no `dest` behind.
pub(super) fn clone_file_with(source: &Path, dest: &Path, strategy: Strategy) -> Result<CloneMethod> {
    const OP: &str = "clone file";
    let (src, _) = open_regular(OP, CWD, source, source)?;
    let dst = create_exclusive(OP, CWD, dest, dest)?;
    let cloned = clone_fd(&src, source, &dst, dest, strategy).and_then(|method| {
        rustix::fs::fsync(&dst)
            .map(|()| method)
            .map_err(|e| HostError::io(OP, dest, e))
    });
    match cloned {
        Ok(method) => {
            tracing::debug!(source = %source.display(), dest = %dest.display(), ?method, "file cloned");
            Ok(method)
        }
        Err(e) => {
            // We created it (O_EXCL): nothing half-copied stays behind.
            let _ = rustix::fs::unlinkat(CWD, dest, AtFlags::empty());
            Err(e)
        }
    }
}

/// Copies the open regular file `src` into the empty, writable `dst`.
fn clone_fd(src: &OwnedFd, source: &Path, dst: &OwnedFd, dest: &Path, strategy: Strategy) -> Result<CloneMethod> {
    match_nocow(src, dst);
    if strategy == Strategy::ReflinkOrCopy {
        match rustix::fs::ioctl_ficlone(dst, src) {
            Ok(()) => return Ok(CloneMethod::Reflink),
            // The filesystem cannot share extents here: another filesystem (EXDEV), none of its
            // own (EOPNOTSUPP, ENOTTY), or not between these two files (EINVAL: e.g. btrfs
            // between a NOCOW file and a checksummed one).
            Err(e @ (Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY | Errno::NOSYS)) => {
                tracing::debug!(source = %source.display(), dest = %dest.display(), "no reflink ({e}); copying");
            }
            Err(e) => return Err(HostError::io("clone file: FICLONE", dest, e)),
        }
    }
    sparse_copy(src, source, dst, dest)?;
    Ok(CloneMethod::Copy)
}

/// Gives the still empty `dst` the source's `FS_NOCOW_FL`, set or clear. On btrfs, FICLONE
/// refuses (EINVAL) to share extents between a NOCOW (unchecksummed) file and a checksummed
/// one; Berth's images are NOCOW, and a new file inherits NOCOW from its directory. Best
/// effort: filesystems without the flag have nothing to match.
fn match_nocow(src: &OwnedFd, dst: &OwnedFd) {
    let (Ok(want), Ok(have)) = (rustix::fs::ioctl_getflags(src), rustix::fs::ioctl_getflags(dst)) else {
        return;
    };
    if want.contains(IFlags::NOCOW) != have.contains(IFlags::NOCOW) {
        let _ = rustix::fs::ioctl_setflags(dst, have ^ IFlags::NOCOW);
    }
}

/// Copies the data ranges of `src` into `dst` and gives `dst` the source's size; holes are
/// skipped, so they stay holes.
pub(super) fn sparse_copy(src: &OwnedFd, source: &Path, dst: &OwnedFd, dest: &Path) -> Result<u64> {
    const OP: &str = "clone file: copy";
    let read_err = |e: Errno| HostError::io(OP, source, e);
    let write_err = |e: Errno| HostError::io(OP, dest, e);
    let size = u64::try_from(rustix::fs::fstat(src).map_err(read_err)?.st_size).unwrap_or(0);
    let mut buf = vec![0u8; CHUNK];
    let (mut offset, mut copied, mut next_report) = (0u64, 0u64, PROGRESS_EVERY);
    while offset < size {
        let start = match rustix::fs::seek(src, SeekFrom::Data(offset)) {
            Ok(o) => o,
            // No data after `offset`: the rest is a hole.
            Err(Errno::NXIO) => break,
            Err(e) => return Err(read_err(e)),
        };
        let end = match rustix::fs::seek(src, SeekFrom::Hole(start)) {
            Ok(o) => o.min(size),
            Err(Errno::NXIO) => size,
            Err(e) => return Err(read_err(e)),
        };
        let mut pos = start;
        while pos < end {
            let want = usize::try_from(end - pos).unwrap_or(CHUNK).min(CHUNK);
            let n = rustix::io::pread(src, &mut buf[..want], pos).map_err(read_err)?;
            if n == 0 {
                // The source shrank under us; its new size is set below.
                break;
            }
            write_all_at(dst, &buf[..n], pos).map_err(write_err)?;
            pos += n as u64;
            copied += n as u64;
            if copied >= next_report {
                next_report += PROGRESS_EVERY;
                tracing::info!(
                    source = %source.display(),
                    dest = %dest.display(),
                    copied_mib = copied >> 20,
                    at_mib = pos >> 20,
                    size_mib = size >> 20,
                    "copying file (no reflink)"
                );
            }
        }
        if pos == start {
            break;
        }
        offset = pos;
    }
    // A trailing hole has no data to write: the size makes it.
    rustix::fs::ftruncate(dst, size).map_err(write_err)?;
    Ok(copied)
}

fn write_all_at(fd: &OwnedFd, mut data: &[u8], mut at: u64) -> std::result::Result<(), Errno> {
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, at) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => {
                data = &data[n..];
                at += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What [`copy_tree`] did, for the log.
#[derive(Debug, Default)]
struct TreeStats {
    reflinked: u64,
    copied: u64,
    dirs: u64,
    symlinks: u64,
    skipped: u64,
}

fn open_dir_at(op: &'static str, dir: impl AsFd, name: &Path, path: &Path) -> Result<OwnedFd> {
    rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        // O_NOFOLLOW with O_DIRECTORY answers ENOTDIR for a symlink.
        Errno::LOOP | Errno::NOTDIR => match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if kind(&st) == FileType::Symlink => HostError::Symlink { path: path.to_owned() },
            _ => HostError::WrongType {
                path: path.to_owned(),
                reason: "is not a directory".into(),
            },
        },
        e => HostError::io(op, path, e),
    })
}

pub(super) fn copy_tree(source: &Path, dest: &Path) -> Result<()> {
    const OP: &str = "copy tree";
    let src = open_dir_at(OP, CWD, source, source)?;
    let dst = open_dir_at(OP, CWD, dest, dest)?;
    let src_st = rustix::fs::fstat(&src).map_err(|e| HostError::io(OP, source, e))?;
    let dst_st = rustix::fs::fstat(&dst).map_err(|e| HostError::io(OP, dest, e))?;
    let mut entries = Dir::read_from(&dst).map_err(|e| HostError::io(OP, dest, e))?;
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(|e| HostError::io(OP, dest, e))?;
        if !is_dot(entry.file_name()) {
            return Err(HostError::io(OP, dest, Errno::NOTEMPTY));
        }
    }
    let mut stats = TreeStats::default();
    let walk = Walk {
        dest_id: (dst_st.st_dev, dst_st.st_ino),
    };
    walk.copy_contents(src, source, &dst, dest, &mut stats)?;
    set_metadata(&dst, &src_st).map_err(|e| HostError::io(OP, dest, e))?;
    // One flush for the whole tree instead of an fsync per file.
    rustix::fs::syncfs(&dst).map_err(|e| HostError::io("copy tree: syncfs", dest, e))?;
    tracing::info!(source = %source.display(), dest = %dest.display(), ?stats, "tree copied");
    Ok(())
}

fn is_dot(name: &CStr) -> bool {
    matches!(name.to_bytes(), b"." | b"..")
}

struct Walk {
    /// `dest` itself, which is never descended into should it lie inside `source`.
    dest_id: (u64, u64),
}

impl Walk {
    fn copy_contents(
        &self,
        src: OwnedFd,
        source: &Path,
        dst: &OwnedFd,
        dest: &Path,
        stats: &mut TreeStats,
    ) -> Result<()> {
        const OP: &str = "copy tree";
        let mut dir = Dir::new(src).map_err(|e| HostError::io(OP, source, e))?;
        let mut names = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| HostError::io(OP, source, e))?;
            if !is_dot(entry.file_name()) {
                names.push(entry.file_name().to_owned());
            }
        }
        let src_dir = dir.fd().map_err(|e| HostError::io(OP, source, e))?;
        for name in names {
            let rel = Path::new(OsStr::from_bytes(name.to_bytes()));
            let (from, to) = (source.join(rel), dest.join(rel));
            let st = match rustix::fs::statat(src_dir, rel, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                // Removed since the directory was read.
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(HostError::io(OP, &from, e)),
            };
            match kind(&st) {
                FileType::RegularFile => {
                    let (s, _) = open_regular(OP, src_dir, rel, &from)?;
                    let d = create_exclusive(OP, dst, rel, &to)?;
                    match clone_fd(&s, &from, &d, &to, Strategy::ReflinkOrCopy)? {
                        CloneMethod::Reflink => stats.reflinked += 1,
                        CloneMethod::Copy => stats.copied += 1,
                    }
                    set_metadata(&d, &st).map_err(|e| HostError::io(OP, &to, e))?;
                }
                FileType::Directory => {
                    if (st.st_dev, st.st_ino) == self.dest_id {
                        tracing::warn!(dir = %from.display(), "not copying the destination into itself");
                        stats.skipped += 1;
                        continue;
                    }
                    rustix::fs::mkdirat(dst, rel, Mode::from_raw_mode(0o700)).map_err(|e| HostError::io(OP, &to, e))?;
                    let s = open_dir_at(OP, src_dir, rel, &from)?;
                    let d = open_dir_at(OP, dst, rel, &to)?;
                    self.copy_contents(s, &from, &d, &to, stats)?;
                    // After the children: creating them changed the directory's times.
                    set_metadata(&d, &st).map_err(|e| HostError::io(OP, &to, e))?;
                    stats.dirs += 1;
                }
                FileType::Symlink => {
                    let target =
                        rustix::fs::readlinkat(src_dir, rel, Vec::new()).map_err(|e| HostError::io(OP, &from, e))?;
                    rustix::fs::symlinkat(target.as_c_str(), dst, rel).map_err(|e| HostError::io(OP, &to, e))?;
                    let (uid, gid) = owner(&st);
                    rustix::fs::chownat(dst, rel, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| HostError::io(OP, &to, e))?;
                    rustix::fs::utimensat(dst, rel, &timestamps(&st), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| HostError::io(OP, &to, e))?;
                    stats.symlinks += 1;
                }
                other => {
                    tracing::warn!(path = %from.display(), kind = ?other, "copy tree: skipping a special file");
                    stats.skipped += 1;
                }
            }
        }
        Ok(())
    }
}

fn owner(st: &rustix::fs::Stat) -> (rustix::fs::Uid, rustix::fs::Gid) {
    (
        rustix::fs::Uid::from_raw(st.st_uid),
        rustix::fs::Gid::from_raw(st.st_gid),
    )
}

fn timestamps(st: &rustix::fs::Stat) -> Timestamps {
    // The field types differ between architectures; the values always fit.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let ts = |sec, nsec| Timespec {
        tv_sec: sec as i64,
        tv_nsec: nsec as _,
    };
    Timestamps {
        last_access: ts(st.st_atime, st.st_atime_nsec),
        last_modification: ts(st.st_mtime, st.st_mtime_nsec),
    }
}

/// Owner, then mode (a chown clears set-id bits), then times (both change ctime only).
fn set_metadata(fd: &OwnedFd, st: &rustix::fs::Stat) -> std::result::Result<(), Errno> {
    let (uid, gid) = owner(st);
    rustix::fs::fchown(fd, Some(uid), Some(gid))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    rustix::fs::futimens(fd, &timestamps(st))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const MIB: u64 = 1 << 20;

    /// A 64 MiB file with 3 MiB of data in two places and a trailing hole.
    fn sparse_source(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("src");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 * MIB).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&vec![1u8; MIB as usize], 0).unwrap();
        f.write_all_at(&vec![2u8; 2 * MIB as usize], 20 * MIB).unwrap();
        f.sync_all().unwrap();
        path
    }

    #[test]
    fn copy_keeps_holes_data_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path());
        let dest = dir.path().join("dest");
        let method = clone_file_with(&src, &dest, Strategy::CopyOnly).unwrap();
        assert_eq!(method, CloneMethod::Copy);
        let meta = std::fs::metadata(&dest).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            meta.blocks() * 512 < 8 * MIB,
            "holes were filled: {} blocks",
            meta.blocks()
        );
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dest).unwrap());
        // An existing destination is an error and is left alone.
        let again = clone_file_with(&src, &dest, Strategy::CopyOnly).unwrap_err();
        assert_eq!(again.errno(), Some(libc::EEXIST));
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 64 * MIB);
    }

    #[test]
    fn empty_and_all_hole_files_copy() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::File::create(&empty).unwrap();
        clone_file(&empty, &dir.path().join("e2")).unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("e2")).unwrap().len(), 0);
        let holes = dir.path().join("holes");
        std::fs::File::create(&holes).unwrap().set_len(5 * MIB + 7).unwrap();
        clone_file_with(&holes, &dir.path().join("h2"), Strategy::CopyOnly).unwrap();
        let meta = std::fs::metadata(dir.path().join("h2")).unwrap();
        assert_eq!((meta.len(), meta.blocks()), (5 * MIB + 7, 0));
    }

    #[test]
    fn refuses_symlinks_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        assert!(matches!(
            clone_file(&link, &dir.path().join("x")),
            Err(HostError::Symlink { .. })
        ));
        assert!(matches!(
            clone_file(dir.path(), &dir.path().join("y")),
            Err(HostError::WrongType { .. })
        ));
        // A dangling symlink at the destination is not written through.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert_eq!(clone_file(&src, &dangling).unwrap_err().errno(), Some(libc::EEXIST));
        assert!(!dir.path().join("nowhere").exists());
        assert!(!dir.path().join("x").exists() && !dir.path().join("y").exists());
    }
}

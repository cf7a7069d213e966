//! A write-ahead log for a redb database: one synchronous write per group commit.
//!
//! Used by the storage journal and by the object store. A durable redb commit costs about
//! 0.5 ms here: it writes the header and every page the transaction touched (seven 4 KiB pages
//! for one journal record), then `fdatasync`s. The log instead writes the batch once, as one
//! frame, with `O_DSYNC` into a file whose blocks were written when it was made (so the write
//! changes no file metadata), and redb commits the same batch without an fsync. Every so often, and whenever the log is full, redb commits durably and
//! records the last frame it holds (a checkpoint); the log then starts again at its beginning.
//!
//! Frames are written with `O_DIRECT` where the filesystem allows it (not through the page
//! cache: less kernel work per write, and no copy left behind to evict), else buffered.
//!
//! The caller owns the database side: [`Wal::checkpoint_due`] says whether a batch goes into the
//! log or into a durable redb commit that records [`Wal::last_seq`] as its checkpoint (then
//! [`Wal::checkpointed`]). A batch whose frame is written but whose redb commit then fails leaves
//! the two disagreeing until the next open replays the log, so the caller [`Wal::halt`]s: later
//! frames would otherwise be replayed after one that redb never applied and whose callers were
//! told it failed.
//!
//! A frame is `magic, crc32, seq, length, payload`, padded to 4 KiB. At open, the frames after
//! the checkpoint are those from offset 0 whose sequence numbers follow it without a gap and
//! whose checksums hold; the first that does not ends the log. A frame torn by a crash was
//! never acknowledged, and the frames of earlier rounds carry older sequence numbers, so neither
//! is mistaken for a live one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The unit of every write.
pub const BLOCK: usize = 4096;
/// Log frames between two durable redb commits, at most: bounds the replay at open and the
/// pages redb cannot reuse until it commits durably.
pub const CHECKPOINT_EVERY: u32 = 1024;
const MAGIC: [u8; 4] = *b"BJW1";
const HEADER: usize = 24;

/// The log file, open for synchronous writes.
#[derive(Debug)]
pub struct Wal {
    file: File,
    size: u64,
    /// Where the next frame goes.
    tail: u64,
    /// Frames are built here, at a block-aligned offset (as `O_DIRECT` needs).
    buf: Vec<u8>,
    /// Sequence number of the next frame.
    next_seq: u64,
    /// Frames written since the last checkpoint.
    since_checkpoint: u32,
    halted: bool,
}

/// A frame found at open, after the checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub seq: u64,
    pub payload: Vec<u8>,
}

impl Wal {
    /// Opens the log at `path` (making it `size` bytes, written through, if missing or
    /// shorter) and returns the frames that follow `checkpoint`. `size` is rounded up to whole
    /// blocks.
    pub fn open(path: &Path, size: u64, checkpoint: u64) -> io::Result<(Wal, Vec<Frame>)> {
        let size = size.max(1).div_ceil(BLOCK as u64) * BLOCK as u64;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_DSYNC | libc::O_CLOEXEC)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut content = vec![0u8; usize::try_from(len.min(size)).unwrap_or(0)];
        file.read_exact_at(&mut content, 0)?;
        let frames = scan(&content, checkpoint);
        if len < size {
            // Write the blocks out once so that later writes only overwrite them.
            let zeros = vec![0u8; 1 << 20];
            let mut at = len - len % BLOCK as u64;
            while at < size {
                let n = (size - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        // The appends go through a second descriptor, direct if the filesystem takes it.
        let writer = |direct: bool| {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DSYNC | libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 })
                .open(path)
        };
        let file = match writer(true) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => writer(false)?,
            Err(e) => return Err(e),
        };
        Ok((
            Wal {
                file,
                size,
                tail: 0,
                buf: Vec::new(),
                next_seq: frames.last().map_or(checkpoint, |f| f.seq) + 1,
                since_checkpoint: 0,
                halted: false,
            },
            frames,
        ))
    }

    /// Whether a batch of `payload_len` bytes must be a durable commit (a checkpoint) instead of
    /// a frame: every `CHECKPOINT_EVERY` frames, and whenever it does not fit after the frames
    /// already written.
    pub fn checkpoint_due(&self, payload_len: usize) -> bool {
        self.since_checkpoint >= CHECKPOINT_EVERY || self.tail + frame_len(payload_len) as u64 > self.size
    }

    /// The last frame written (or replayed): what a checkpoint made now holds.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// A durable commit recording [`Wal::last_seq`] is done: the log starts again at its
    /// beginning.
    pub fn checkpointed(&mut self) {
        self.tail = 0;
        self.since_checkpoint = 0;
    }

    /// A written frame's redb commit failed: refuse everything until a restart replays the log.
    pub fn halt(&mut self) {
        self.halted = true;
    }

    pub fn halted(&self) -> bool {
        self.halted
    }

    /// Writes `payload` as the next frame; it is on disk when this returns. Returns the frame's
    /// sequence number.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        let seq = self.next_seq;
        let len = frame_len(payload.len());
        if self.buf.len() < len + BLOCK {
            self.buf = vec![0u8; len + BLOCK];
        }
        let at = self.buf.as_ptr().align_offset(BLOCK);
        let frame = &mut self.buf[at..at + len];
        fill_frame(frame, seq, payload);
        self.file.write_all_at(frame, self.tail)?;
        self.tail += len as u64;
        self.next_seq += 1;
        self.since_checkpoint += 1;
        Ok(seq)
    }
}

fn frame_len(payload_len: usize) -> usize {
    (HEADER + payload_len).div_ceil(BLOCK) * BLOCK
}

/// One frame, padded to whole blocks.
pub fn encode_frame(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; frame_len(payload.len())];
    fill_frame(&mut frame, seq, payload);
    frame
}

/// Writes the frame of `payload` into `frame` (`frame_len` bytes), padding included.
fn fill_frame(frame: &mut [u8], seq: u64, payload: &[u8]) {
    frame[HEADER + payload.len()..].fill(0);
    frame[0..4].copy_from_slice(&MAGIC);
    frame[8..16].copy_from_slice(&seq.to_le_bytes());
    // Payloads fit in the log, far below 4 GiB.
    frame[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    frame[HEADER..HEADER + payload.len()].copy_from_slice(payload);
    let crc = crc32fast::hash(&frame[8..HEADER + payload.len()]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// The frames from offset 0 that continue `checkpoint` without a gap.
fn scan(content: &[u8], checkpoint: u64) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut at = 0usize;
    let mut expected = checkpoint + 1;
    while let Some(header) = content.get(at..at + HEADER) {
        if header[0..4] != MAGIC {
            break;
        }
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&header[8..16]);
        let seq = u64::from_le_bytes(seq);
        let len = u32::from_le_bytes([header[16], header[17], header[18], header[19]]) as usize;
        let Some(body) = content.get(at + 8..at + HEADER + len) else {
            break;
        };
        if seq != expected || crc32fast::hash(body) != crc {
            break;
        }
        frames.push(Frame {
            seq,
            payload: body[HEADER - 8..].to_vec(),
        });
        expected += 1;
        at += frame_len(len);
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(frames: &[(u64, &[u8])]) -> Vec<u8> {
        frames.iter().flat_map(|(s, p)| encode_frame(*s, p)).collect()
    }

    #[test]
    fn frames_after_the_checkpoint_are_found_in_order() {
        let big = vec![7u8; 5000];
        let mut content = log(&[(4, b"a"), (5, &big), (6, b"")]);
        content.resize(content.len() + 3 * BLOCK, 0);
        let frames = scan(&content, 3);
        assert_eq!(
            frames,
            vec![
                Frame {
                    seq: 4,
                    payload: b"a".to_vec()
                },
                Frame { seq: 5, payload: big },
                Frame {
                    seq: 6,
                    payload: vec![]
                },
            ]
        );
    }

    #[test]
    fn a_gap_or_an_older_round_ends_the_log() {
        // A new round (8, 9) written over an older one (2..=5): frame 4 follows but is older.
        let mut content = log(&[(2, b"x"), (3, b"x"), (4, b"x"), (5, b"x")]);
        let new = log(&[(8, b"new"), (9, b"new")]);
        content[..new.len()].copy_from_slice(&new);
        let seqs: Vec<u64> = scan(&content, 7).iter().map(|f| f.seq).collect();
        assert_eq!(seqs, vec![8, 9]);
        // Frames of the round the checkpoint already holds are not replayed.
        assert!(scan(&content, 9).is_empty());
        assert!(
            scan(&log(&[(2, b"x")]), 0).is_empty(),
            "seq 2 does not follow checkpoint 0"
        );
    }

    #[test]
    fn a_torn_or_corrupt_frame_ends_the_log() {
        let big = vec![1u8; 6000];
        let content = log(&[(1, b"kept"), (2, &big), (3, b"after")]);
        // The second frame's second block never reached the disk.
        let mut torn = content.clone();
        torn[2 * BLOCK..3 * BLOCK].fill(0);
        let seqs: Vec<u64> = scan(&torn, 0).iter().map(|f| f.seq).collect();
        assert_eq!(seqs, vec![1]);
        // One flipped bit in a payload.
        let mut flipped = content.clone();
        flipped[BLOCK + HEADER + 10] ^= 1;
        assert_eq!(scan(&flipped, 0).len(), 1);
        // A length running past the end of the file.
        let mut long = content;
        long[BLOCK + 16..BLOCK + 20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(scan(&long, 0).len(), 1);
        assert!(scan(&[], 0).is_empty());
    }

    #[test]
    fn the_file_is_made_full_size_and_frames_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.wal");
        const SIZE: u64 = 1 << 20;
        let (mut wal, frames) = Wal::open(&path, SIZE, 0).unwrap();
        assert!(frames.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
        assert_eq!(wal.append(b"one").unwrap(), 1);
        assert_eq!(wal.append(&vec![2u8; 9000]).unwrap(), 2);
        assert!(!wal.checkpoint_due(0));
        assert!(
            wal.checkpoint_due(SIZE as usize - 4 * BLOCK),
            "does not fit after the frames"
        );
        assert!(wal.checkpoint_due(SIZE as usize), "does not fit at all");
        drop(wal);
        let (mut wal, frames) = Wal::open(&path, SIZE, 0).unwrap();
        assert_eq!(frames.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(frames[1].payload.len(), 9000);
        assert_eq!(wal.last_seq(), 2, "numbering goes on after the replayed frames");
        // After a checkpoint at 2 the log starts over; the frames written before are not live.
        wal.checkpointed();
        assert!(!wal.checkpoint_due(SIZE as usize - 4 * BLOCK), "the log is empty again");
        assert_eq!(wal.append(b"three").unwrap(), 3);
        drop(wal);
        let (_, frames) = Wal::open(&path, SIZE, 2).unwrap();
        assert_eq!(frames.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn a_checkpoint_is_due_every_checkpoint_every_frames() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(&dir.path().join("j.wal"), 8 << 20, 41).unwrap();
        for n in 0..CHECKPOINT_EVERY {
            assert!(!wal.checkpoint_due(1), "frame {n}");
            wal.append(b"x").unwrap();
        }
        assert!(wal.checkpoint_due(1));
        assert_eq!(wal.last_seq(), 41 + u64::from(CHECKPOINT_EVERY));
        wal.checkpointed();
        assert!(!wal.checkpoint_due(1));
        assert!(!wal.halted());
        wal.halt();
        assert!(wal.halted());
    }
}

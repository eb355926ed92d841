//! The output log: the pump that copies a job's pipe to it, and reads.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nix::fcntl::{FcntlArg, fcntl};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{PUMP_BUFFER, Progress};
use crate::sys::ReadFrom;

/// A pipe's capacity unless asked otherwise (Linux).
const DEFAULT_PIPE: usize = 64 * 1024;

/// When the write of the log that a pump waits for began, so that a
/// supervisor that gives up waiting for the pump can tell output cut by a
/// stalled disk (one write under way for long) from a pipe that a process
/// the kill could not find holds open (no write, or a quick one).
#[derive(Debug)]
pub(super) struct Writing {
    epoch: Instant,
    /// Milliseconds from `epoch` to the write's start, plus one; 0: none.
    began: AtomicU64,
}

impl Default for Writing {
    fn default() -> Self {
        Writing {
            epoch: Instant::now(),
            began: AtomicU64::new(0),
        }
    }
}

impl Writing {
    fn begin(&self) {
        let since = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.began.store(since + 1, Ordering::Release);
    }

    fn end(&self) {
        self.began.store(0, Ordering::Release);
    }

    /// How long the write under way has taken so far.
    pub(super) fn under_way_for(&self) -> Option<Duration> {
        match self.began.load(Ordering::Acquire) {
            0 => None,
            began => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(began - 1)),
            ),
        }
    }
}

/// How a pump ended: the bytes kept in the log, and why writing stopped
/// if it could not go on.
#[derive(Debug)]
pub(super) struct Pumped {
    pub(super) len: u64,
    pub(super) write_error: Option<String>,
}

/// Copies the job's output pipe to its log and publishes each new length.
/// Ends at EOF, that is when every process of the job has closed the pipe.
/// With `limit`, at most that many bytes are kept; reaching it fires
/// `over_limit` and the rest is drained and dropped until the job is gone.
/// If the log cannot be written (a full disk, an I/O error), the log is cut
/// back to the last whole write, `write_failed` fires (the supervisor ends
/// the job) and the rest is drained and dropped.
pub(super) async fn pump(
    mut reader: pipe::Receiver,
    file: std::fs::File,
    progress: watch::Sender<Progress>,
    limit: Option<u64>,
    over_limit: CancellationToken,
    write_failed: CancellationToken,
    writing: Arc<Writing>,
) -> Pumped {
    let file = Arc::new(file);
    // Each piece read is split off this buffer and, while the job is
    // followed, published as it is (`Progress::tail`); the buffer fills on
    // behind it, and when a quarter is left `reserve` takes the whole
    // memory back if no piece holds it any more, or a new buffer if one
    // does (the old one goes with the next piece published).
    let mut buf = BytesMut::with_capacity(PUMP_BUFFER);
    let mut len = 0u64;
    let mut write_error = None;
    let mut enlarged = false;
    loop {
        buf.clear();
        // A job writing little at a time fills one buffer piece by piece;
        // a new one is only taken when too little is left for a full read.
        if buf.capacity() < PUMP_BUFFER / 4 {
            buf.reserve(PUMP_BUFFER);
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                // Only a job whose output fills the default pipe gets a
                // larger one: unprivileged, enlarged pipes count against
                // the user's pipe quota (fs.pipe-user-pages-soft), past
                // which the kernel gives every new pipe of the user 8 KiB.
                if n >= DEFAULT_PIPE && !enlarged {
                    enlarged = true;
                    let size = i32::try_from(PUMP_BUFFER).unwrap_or(i32::MAX);
                    if let Err(error) = fcntl(&reader, FcntlArg::F_SETPIPE_SZ(size)) {
                        // A smaller pipe only costs speed.
                        tracing::debug!(%error, "cannot enlarge the job's output pipe");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading job output failed");
                break;
            }
        }
        if write_error.is_some() || over_limit.is_cancelled() {
            // Keep draining so the job never blocks on a full pipe.
            continue;
        }
        if let Some(limit) = limit
            && len + buf.len() as u64 > limit
        {
            buf.truncate((limit - len) as usize);
            over_limit.cancel();
        }
        let piece = buf.split().freeze();
        let f = file.clone();
        let b = piece.clone();
        let offset = len;
        // File writes block; they go to the blocking pool, one piece at a time.
        writing.begin();
        let result = tokio::task::spawn_blocking(move || {
            let r = f.write_all_at(&b, offset);
            if r.is_err() {
                // A partial write leaves bytes no one was told of; the log
                // keeps exactly what was published.
                let _ = f.set_len(offset);
            }
            r
        })
        .await;
        match result {
            Ok(Ok(())) => {
                crate::metrics::output_written(piece.len());
                len += piece.len() as u64;
                // Kept only while someone may follow (a stream's
                // subscription, or a request looking at the length for a
                // moment); otherwise the piece goes now and the next
                // `reserve` takes its memory back.
                let tail = match progress.receiver_count() {
                    0 => Bytes::new(),
                    _ => piece,
                };
                let mut last = Bytes::new();
                progress.send_modify(|p| {
                    p.len = len;
                    last = std::mem::replace(&mut p.tail, tail);
                });
                // Freed (it may be a whole buffer) outside the channel's lock.
                drop(last);
            }
            Ok(Err(error)) => {
                tracing::error!(%error, kept = len, "writing job output failed; ending the job");
                write_error = Some(error.to_string());
                write_failed.cancel();
            }
            Err(error) => {
                tracing::error!(%error, "output writer task failed; ending the job");
                write_error = Some(error.to_string());
                write_failed.cancel();
            }
        }
        // Only now: a supervisor that sees no write under way sees its
        // piece published.
        writing.end();
    }
    Pumped { len, write_error }
}

/// Opens a job's log to read it back, without access times: with
/// `relatime`, reading a log that is still being written would update its
/// access time on nearly every piece, a journal write that can wait, on
/// the stream's thread. `O_NOATIME` is allowed to the file's owner
/// (workerd, which created it); anyone else gets a plain open.
pub(crate) fn open_log(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOATIME)
        .open(path)
    {
        Err(error) if error.raw_os_error() == Some(nix::libc::EPERM) => std::fs::File::open(path),
        opened => opened,
    }
}

/// Reads `max` bytes of a log at `offset` (fewer only at its end): from
/// the page cache on this thread when it holds them all, otherwise on the
/// blocking pool. A log read back soon after it was written is in the
/// cache, and a trip to the blocking pool for each piece (a thread woken,
/// then this one) cost more than the copy. The log is opened by
/// [`open_log`], so the read has no access time to write either.
pub(crate) async fn read_at(
    file: Arc<std::fs::File>,
    offset: u64,
    max: usize,
) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(max);
    // A whole piece from the cache is the answer. Anything else (part of
    // it cached, none, the end of the file, a filesystem without
    // RWF_NOWAIT) goes on from what was read on the blocking pool, which
    // tells those apart: a piece is `max` bytes unless the log ends.
    if let Err(error) = crate::sys::pread_spare(&file, &mut buf, offset, max, ReadFrom::Cache) {
        tracing::trace!(%error, "log piece not read from the page cache");
    }
    if buf.len() == max {
        return Ok(buf.freeze());
    }
    tokio::task::spawn_blocking(move || {
        while buf.len() < max {
            let at = offset + buf.len() as u64;
            let rest = max - buf.len();
            match crate::sys::pread_spare(&file, &mut buf, at, rest, ReadFrom::Disk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf.freeze())
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use super::*;

    /// A log read back gets its bytes, in whole pieces, whether the page
    /// cache holds all of them (read on the caller's thread), part of them
    /// or none (the blocking pool).
    #[tokio::test]
    async fn a_log_reads_back_the_same_from_the_cache_and_from_the_disk() {
        const PIECE: usize = 256 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let bytes: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&bytes).unwrap();
        file.sync_all().unwrap();
        let file = Arc::new(open_log(&path).unwrap());
        let total = bytes.len();

        let read_all = |file: Arc<std::fs::File>| async move {
            let mut got = Vec::new();
            loop {
                let piece = read_at(file.clone(), got.len() as u64, PIECE)
                    .await
                    .unwrap();
                if piece.is_empty() {
                    return got;
                }
                assert!(
                    piece.len() == PIECE || got.len() + piece.len() == total,
                    "a short piece ({} bytes at {}) before the end",
                    piece.len(),
                    got.len()
                );
                got.extend_from_slice(&piece);
            }
        };
        let cached = |file: &std::fs::File, at: u64| {
            crate::sys::pread_spare(file, &mut BytesMut::new(), at, 4096, ReadFrom::Cache)
        };
        match cached(&file, 0) {
            Ok(4096) => {}
            other => {
                // tmpfs before Linux 5.x, overlayfs: every read is a
                // blocking one, which the reads below still check.
                eprintln!("no read from the page cache here ({other:?})");
            }
        }
        assert!(read_all(file.clone()).await == bytes, "from the cache");

        // Synced pages can be dropped by anyone who can read the file; with
        // readahead off, a read caches only what it reads.
        let advise = |advice| nix::fcntl::posix_fadvise(&*file, 0, 0, advice).unwrap();
        advise(nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM);
        for cached_before in [300_000, 0] {
            advise(nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
            let dropped = cached(&file, 0);
            if !matches!(&dropped, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                eprintln!(
                    "the page cache kept the log ({dropped:?}): the disk read is not exercised"
                );
            }
            // The first time, the second piece is partly cached.
            let mut head = vec![0u8; cached_before];
            file.read_exact_at(&mut head, 0).unwrap();
            assert!(
                read_all(file.clone()).await == bytes,
                "{cached_before} bytes cached"
            );
        }
    }
}

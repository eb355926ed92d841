//! Job directories made ahead of demand: a start moves one into place with
//! a single rename instead of creating a directory and three files.
//!
//! Creating files is most of a start's disk work, and on ext4 it costs more
//! the more files were deleted lately (a new inode skips recently deleted
//! ones, reading their table blocks). Made here, off the start's path,
//! while the worker waits for the next start. Spares live in
//! `state_dir/spare`, on the jobs' filesystem (a rename cannot cross one),
//! and never in `jobs/`, so nothing that reads jobs sees them; leftovers of
//! an earlier run are deleted at start.
//!
//! A spare's files are synced in the pauses between starts (the space held
//! for its final record, with its blocks, and its names), so that a job
//! that takes a synced one makes its end durable with two syncs side by
//! side instead of two in a row (`record::write_final`). Not while starts
//! come one after another (a start that comes during a spare's sync only
//! meets that one): synced as they were made, beside the starts that asked
//! for them, the syncs competed with those starts for the disk (7 % fewer
//! starts per second at 16 clients, measured), and a burst's jobs take
//! spares faster than they could be synced anyway.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::record::{FINAL, final_size, make_job_dir, reserve, sync_held};

/// Spares kept ready: starts that come faster than the refill fall back to
/// making their files themselves, so this is a burst, not a limit.
const KEPT: usize = 16;
/// Bytes a spare holds for its job's final record: enough for the record
/// of a job with a few KiB of arguments; a start that needs more grows it.
const SPARE_RESERVE: usize = 8 * 1024;
/// How long no start must come before the ready spares are synced: longer
/// than the gap between the starts of a burst, or of a client that runs
/// one job after another.
const SYNC_AFTER_IDLE: Duration = Duration::from_millis(20);

/// A spare ready to be taken.
#[derive(Debug)]
struct Ready {
    path: PathBuf,
    /// Its files are synced ([`sync_held`]).
    synced: bool,
}

/// A spare moved into place as a job's directory.
#[derive(Debug)]
pub(super) struct Taken {
    /// Where it was, for [`Spares::put_back`].
    pub(super) spare: PathBuf,
    /// Its files were synced while it was ready, and its reservation was
    /// not grown since: `record::write_final` may write the final record
    /// in place.
    pub(super) synced: bool,
}

/// The spare directories of one worker.
#[derive(Debug)]
pub(super) struct Spares {
    dir: PathBuf,
    ready: Mutex<Vec<Ready>>,
    made: AtomicU64,
    wanted: Notify,
    /// Spares taken so far, and news of each: syncing waits for a pause.
    takes: AtomicU64,
    taken: Notify,
    /// Set once a spare could not be moved into place for a reason that
    /// would repeat (another filesystem, a kernel or filesystem without
    /// `renameat2` flags): no more are made.
    off: AtomicBool,
}

impl Spares {
    fn ready(&self) -> std::sync::MutexGuard<'_, Vec<Ready>> {
        // Poisoning only follows a panic elsewhere; the list is still whole.
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the spares are (`state_dir/spare`).
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn new(state_dir: &Path) -> Self {
        Spares {
            dir: state_dir.join("spare"),
            ready: Mutex::new(Vec::with_capacity(KEPT)),
            made: AtomicU64::new(0),
            wanted: Notify::new(),
            takes: AtomicU64::new(0),
            taken: Notify::new(),
            off: AtomicBool::new(false),
        }
    }

    /// Moves a spare into place as the job directory `dir`, its final
    /// record's reservation grown to fit a record of `record_len` bytes.
    /// `None` when no spare could be used (none ready, spares turned off,
    /// or the rename failed): the caller makes the files itself.
    /// `Some(Err)` with `AlreadyExists` when `dir` exists, or the error of
    /// growing the reservation (the spare then went back).
    pub(super) fn take(&self, dir: &Path, record_len: usize) -> Option<std::io::Result<Taken>> {
        if self.off.load(Ordering::Acquire) {
            return None;
        }
        let Ready {
            path: spare,
            synced,
        } = {
            // Counted under the lock, so that a sync that saw no take saw
            // every spare stay where it was (`sync_while_idle`).
            let mut ready = self.ready();
            let taken = ready.pop()?;
            self.takes.fetch_add(1, Ordering::AcqRel);
            taken
        };
        self.taken.notify_one();
        // A spare needs one block for the record where a start without
        // one needs several: without this a start on a disk too full for
        // those would run, where the next write fails.
        let needed = final_size(record_len) + record_len + 2 * 4096;
        if !self.room_for(needed) {
            self.ready().push(Ready {
                path: spare,
                synced,
            });
            return Some(Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC)));
        }
        let mut moved = crate::sys::rename_noreplace(&spare, dir);
        // The first job of a new state directory makes `jobs/`.
        if let (Err(e), Some(jobs)) = (&moved, dir.parent())
            && e.kind() == std::io::ErrorKind::NotFound
            && std::fs::create_dir_all(jobs).is_ok()
        {
            moved = crate::sys::rename_noreplace(&spare, dir);
        }
        match moved {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                self.ready().push(Ready {
                    path: spare,
                    synced,
                });
                return Some(Err(e));
            }
            // Another filesystem, or no renameat2 flags: every rename would
            // fail the same way.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(nix::libc::EXDEV | nix::libc::EINVAL | nix::libc::ENOSYS)
                ) =>
            {
                // The spares made stay until workerd starts again.
                if !self.off.swap(true, Ordering::AcqRel) {
                    tracing::warn!(%error, spare = %spare.display(), "spare job directories cannot be moved into place; starts make their own from now on");
                }
                return None;
            }
            // A full disk, a missing jobs directory that cannot be made:
            // the caller's own path meets it again and reports it.
            Err(_) => {
                if spare.exists() {
                    self.ready().push(Ready {
                        path: spare,
                        synced,
                    });
                }
                return None;
            }
        }
        let size = final_size(record_len);
        let grown = size > SPARE_RESERVE;
        if grown && let Err(error) = reserve(&dir.join(FINAL), size, false) {
            self.put_back(dir, spare);
            return Some(Err(error));
        }
        Some(Ok(Taken {
            spare,
            synced: synced && !grown,
        }))
    }

    /// Whether the filesystem of the spares (that of the jobs) has `bytes`
    /// free for workerd (root may use the blocks reserved for it). A
    /// filesystem that cannot say is taken to have room: the writes that
    /// follow meet whatever is wrong.
    fn room_for(&self, bytes: usize) -> bool {
        let Ok(fs) = nix::sys::statvfs::statvfs(&self.dir) else {
            return true;
        };
        let blocks = if nix::unistd::geteuid().is_root() {
            fs.blocks_free()
        } else {
            fs.blocks_available()
        };
        u128::from(blocks) * u128::from(fs.fragment_size()) >= bytes as u128
    }

    /// Moves a taken spare at `dir` back to where it was, after the start
    /// that took it failed: deleting it would free its reservation, and on
    /// a full disk the next start would write its record into that space
    /// and run where nothing else can be written. What cannot go back is
    /// left for the caller to remove.
    pub(super) fn put_back(&self, dir: &Path, spare: PathBuf) {
        // Not known synced: the failed start may have written into it.
        if crate::sys::rename_noreplace(dir, &spare).is_ok() {
            self.ready().push(Ready {
                path: spare,
                synced: false,
            });
        }
    }

    /// Asks for a refill once half the spares are taken. Called after a
    /// start's spawn, not when it takes its spare: a refill running beside
    /// a start would compete with it for the CPU (the start waited for it
    /// on a busy two-core machine), and making several at once costs one
    /// thread hand-off instead of one per start.
    pub(super) fn refill_if_low(&self) {
        if self.off.load(Ordering::Acquire) {
            return;
        }
        if self.ready().len() <= KEPT / 2 {
            self.wanted.notify_one();
        }
    }

    /// Keeps [`KEPT`] spares ready until `stop`: deletes what an earlier
    /// run left, then makes spares whenever asked, and syncs them once
    /// starts pause. A disk that refuses them (full, read-only) is logged
    /// once until it takes one again; starts then make their own files and
    /// report the error.
    pub(super) async fn refill(self: Arc<Self>, stop: CancellationToken) {
        let mut failing = false;
        let mut first = true;
        loop {
            let spares = self.clone();
            let clear = std::mem::take(&mut first);
            let filled = tokio::task::spawn_blocking(move || {
                if clear {
                    spares.clear()?;
                }
                spares.fill()
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
            match filled {
                Ok(()) => failing = false,
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, dir = %self.dir.display(), "cannot make spare job directories; starts make their own");
                }
                Err(_) => {}
            }
            // A disk that refuses a sync is not asked again before the
            // next refill; spares that are not synced only cost a sync.
            let mut sync_failed = false;
            loop {
                let unsynced = !sync_failed && self.ready().iter().any(|r| !r.synced);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.wanted.notified() => break,
                    // A start came: wait for the next pause.
                    () = self.taken.notified(), if unsynced => {}
                    () = tokio::time::sleep(SYNC_AFTER_IDLE), if unsynced => {
                        if let Err(error) = self.sync_while_idle(&stop).await {
                            tracing::debug!(%error, dir = %self.dir.display(), "cannot sync spare job directories");
                            sync_failed = true;
                        }
                    }
                }
            }
        }
    }

    /// Syncs ready spares, the next to be taken first, until none is left,
    /// a start comes or the worker stops (between two spares: a sync under
    /// way ends on its blocking thread).
    async fn sync_while_idle(&self, stop: &CancellationToken) -> std::io::Result<()> {
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let takes = self.takes.load(Ordering::Acquire);
            let next = self
                .ready()
                .iter()
                .rev()
                .find(|r| !r.synced)
                .map(|r| r.path.clone());
            let Some(path) = next else { return Ok(()) };
            let synced = path.clone();
            match tokio::task::spawn_blocking(move || sync_held(&synced))
                .await
                .map_err(std::io::Error::other)?
            {
                Ok(()) => {}
                // Taken meanwhile: moved into place by its start.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
            // A start meanwhile may have taken this spare (it went as not
            // synced) and put it back changed (a grown reservation): only
            // a spare no start could touch is marked.
            let mut ready = self.ready();
            if self.takes.load(Ordering::Acquire) != takes {
                return Ok(());
            }
            if let Some(spare) = ready.iter_mut().find(|r| r.path == path) {
                spare.synced = true;
            }
        }
    }

    fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir(&self.dir)
    }

    fn fill(&self) -> std::io::Result<()> {
        while !self.off.load(Ordering::Acquire) && self.ready().len() < KEPT {
            let spare = self.make()?;
            self.ready().push(Ready {
                path: spare,
                synced: false,
            });
        }
        Ok(())
    }

    /// A directory with what a new job's directory holds before its first
    /// record.
    fn make(&self) -> std::io::Result<PathBuf> {
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(n.to_string());
        make_job_dir(&dir, SPARE_RESERVE)?;
        Ok(dir)
    }
}

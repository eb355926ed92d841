//! Group commit for the SQLite store: one `fdatasync` of the write-ahead
//! log makes every commit before it durable, so concurrent writers share
//! one sync instead of paying one each.
//!
//! The writer connection runs with `synchronous = NORMAL`: each commit
//! writes its frames into the `-wal` file (surviving a crash of this
//! process) without syncing it. A commit is durable (surviving a power
//! loss) once the `-wal` file has been synced after it, which is what
//! `synchronous = FULL` would do inside every commit. SQLite syncs the log
//! itself before each checkpoint and the database file after it, so frames
//! a checkpoint has moved out of the log are durable too.
//!
//! Under `FULL` a commit became visible to readers only after its sync;
//! here readers see it at once, so a read waits for every commit begun
//! before it ended ([`GroupSync::begun`]) to be durable: nothing the API
//! shows can be undone by a power loss.
//!
//! A writer syncs from its own (blocking) thread when no sync is under way
//! ([`GroupSync::try_sync_through`]), so a write costs no hand-off to
//! another thread and back, which on a VM whose idle vCPUs halt is two
//! wake-ups of tens of microseconds each. Otherwise it waits on the async
//! side ([`GroupSync::durable`]) like a reader, and the sync thread runs
//! the next sync: a stalled disk holds one thread in `fdatasync`, never
//! one per waiting writer. Syncs never overlap: whoever syncs marks it.
//!
//! The log is synced through one descriptor opened when the store opens,
//! before anything is acknowledged: a writeback error is reported to every
//! descriptor open when it happened, so none can be missed (a descriptor
//! opened later would not see an error SQLite's own sync already took).
//!
//! Hand-written because the sync has to follow SQLite's own commits; no
//! kept crate offers group commit over rusqlite.

use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

/// What the sync thread has made durable so far.
#[derive(Debug, Clone, Default)]
struct Synced {
    /// Every commit numbered up to this one is durable.
    upto: u64,
    /// A sync failed: after a failed `fdatasync` the kernel may have
    /// dropped the dirty pages, so nothing written since can be promised.
    failed: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Commits begun (numbered in the writer's order; a commit's number is
    /// the count of commits begun, itself included).
    begun: u64,
    /// Commits ended; the ones up to here are written, maybe not synced.
    committed: u64,
    /// The highest commit someone waits for.
    wanted: u64,
    /// A sync is running (on the sync thread or a writer's).
    syncing: bool,
    closed: bool,
}

#[derive(Debug)]
pub(crate) struct GroupSync {
    pending: Mutex<Pending>,
    /// The sync thread's: someone waits for a commit that has ended.
    work: Condvar,
    synced: watch::Sender<Synced>,
    wal: File,
    /// Syncs run, for the store's tests.
    #[cfg(test)]
    pub(crate) syncs: std::sync::atomic::AtomicU64,
}

impl GroupSync {
    /// Starts the sync thread for the log open as `wal`, which the caller
    /// synced first: commit numbers start from a durable log, which a
    /// commit that wrote nothing relies on ([`Self::ended_unwritten`]).
    pub(crate) fn start(wal: File) -> std::io::Result<Arc<GroupSync>> {
        let sync = Arc::new(GroupSync {
            pending: Mutex::new(Pending::default()),
            work: Condvar::new(),
            synced: watch::Sender::new(Synced::default()),
            wal,
            #[cfg(test)]
            syncs: Default::default(),
        });
        let worker = sync.clone();
        std::thread::Builder::new()
            .name("store-sync".into())
            .spawn(move || worker.run())?;
        Ok(sync)
    }

    /// Numbers a commit about to run; call while holding the writer
    /// connection, before the commit. Refused once a sync has failed.
    pub(crate) fn begin(&self) -> std::io::Result<u64> {
        if let Some(why) = &self.synced.borrow().failed {
            return Err(failed(why));
        }
        let mut pending = self.lock();
        pending.begun += 1;
        Ok(pending.begun)
    }

    /// Marks the commit numbered `seq` ended (committed or rolled back);
    /// call while still holding the writer connection.
    pub(crate) fn ended(&self, seq: u64) {
        let mut pending = self.lock();
        pending.committed = seq;
        if pending.wanted >= seq {
            self.work.notify_one();
        }
    }

    /// Marks the commit numbered `seq` ended having written nothing (a
    /// pass that found nothing to change): it is durable as soon as every
    /// commit before it is, so once they are it needs no sync of its own.
    /// On this VM each `fdatasync` is a flush request to the host, and the
    /// dispatcher's passes after jobs' ends each asked for one.
    pub(crate) fn ended_unwritten(&self, seq: u64) {
        self.ended(seq);
        self.synced.send_if_modified(|s| {
            let covered = s.failed.is_none() && s.upto < seq && s.upto + 1 >= seq;
            if covered {
                s.upto = seq;
            }
            covered
        });
    }

    /// Makes commit `seq` (ended) and every one before it durable from the
    /// calling thread, which blocks in the sync: true once a sync covered
    /// it (an earlier one, or the next one, run here over every commit
    /// ended by then). False, at once, while another sync is under way:
    /// the caller then waits with [`Self::durable`].
    pub(crate) fn try_sync_through(&self, seq: u64) -> std::io::Result<bool> {
        loop {
            let mut pending = self.lock();
            {
                let synced = self.synced.borrow();
                if let Some(why) = &synced.failed {
                    return Err(failed(why));
                }
                if synced.upto >= seq {
                    return Ok(true);
                }
            }
            if pending.syncing {
                return Ok(false);
            }
            pending.syncing = true;
            let target = pending.committed;
            drop(pending);
            self.sync(target);
        }
    }

    /// The number of the last commit begun: a reader waits for it after
    /// reading, as it may have seen that commit.
    pub(crate) fn begun(&self) -> u64 {
        self.lock().begun
    }

    /// Waits until commit `seq` (and every one before it) is durable.
    pub(crate) async fn durable(&self, seq: u64) -> std::io::Result<()> {
        {
            let synced = self.synced.borrow();
            if synced.failed.is_none() && synced.upto >= seq {
                return Ok(());
            }
        }
        {
            let mut pending = self.lock();
            if pending.wanted < seq {
                pending.wanted = seq;
                self.work.notify_one();
            }
        }
        let mut synced = self.synced.subscribe();
        let state = synced
            .wait_for(|s| s.upto >= seq || s.failed.is_some())
            .await
            .map_err(|_| std::io::Error::other("the store's sync thread has stopped"))?;
        match &state.failed {
            Some(why) => Err(failed(why)),
            None => Ok(()),
        }
    }

    /// Ends the sync thread once it has nothing left to do.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.work.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sync thread: syncs for the readers waiting in [`Self::durable`].
    fn run(&self) {
        loop {
            let target = {
                let mut pending = self.lock();
                loop {
                    let synced = self.synced.borrow();
                    if synced.failed.is_some() {
                        return;
                    }
                    // Someone waits, a commit they wait for has ended (one
                    // still running is waited for: no sync can cover it
                    // yet), and no writer is syncing (its sync may cover it).
                    if pending.wanted > synced.upto
                        && pending.committed > synced.upto
                        && !pending.syncing
                    {
                        break;
                    }
                    drop(synced);
                    if pending.closed {
                        return;
                    }
                    pending = self.work.wait(pending).unwrap_or_else(|e| e.into_inner());
                }
                pending.syncing = true;
                // Everything ended by now rides on this one sync.
                pending.committed
            };
            self.sync(target);
        }
    }

    /// One `fdatasync` covering every commit up to `target`, marked as
    /// running by the caller; tells everyone who waits.
    fn sync(&self, target: u64) {
        #[cfg(test)]
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.wal.sync_data() {
            Ok(()) => self.synced.send_modify(|s| s.upto = s.upto.max(target)),
            Err(error) => {
                tracing::error!(%error, "the database log could not be synced; nothing more is acknowledged");
                self.synced
                    .send_modify(|s| s.failed = Some(error.to_string().into()));
            }
        }
        // After the news, so that whoever wakes sees what this sync covered.
        let mut pending = self.lock();
        pending.syncing = false;
        // The sync thread only when someone still waits past this sync (it
        // held back while this one ran): on this VM every wake-up of an
        // idle thread costs tens of microseconds.
        let synced = self.synced.borrow();
        if synced.failed.is_some() || pending.wanted > synced.upto {
            self.work.notify_one();
        }
    }
}

fn failed(why: &str) -> std::io::Error {
    std::io::Error::other(format!(
        "the database log could not be synced earlier ({why}); restart the scheduler"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_syncs_and_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("db-wal");
        std::fs::write(&wal, b"frames").unwrap();
        let sync = GroupSync::start(File::open(&wal).unwrap()).unwrap();
        // The store's writer connection: commits are numbered and ended in
        // turn under it. Without it a commit could end after a later one
        // and leave the later one never counted as ended (a hang).
        let writer = Arc::new(Mutex::new(()));
        let waiters: Vec<_> = (0..64)
            .map(|_| {
                let (sync, writer) = (sync.clone(), writer.clone());
                tokio::spawn(async move {
                    let seq = {
                        let _writer = writer.lock().unwrap();
                        let seq = sync.begin().unwrap();
                        sync.ended(seq);
                        seq
                    };
                    sync.durable(seq).await
                })
            })
            .collect();
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
        assert_eq!(sync.synced.borrow().upto, 64);
        sync.durable(sync.begun()).await.unwrap();
        sync.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_syncing_on_their_own_threads_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("db-wal");
        std::fs::write(&wal, b"frames").unwrap();
        let sync = GroupSync::start(File::open(&wal).unwrap()).unwrap();
        // The store's writer connection: commits are numbered and ended
        // under it, one at a time; the syncs happen outside it.
        let writer = Arc::new(Mutex::new(()));
        let writers: Vec<_> = (0..16)
            .map(|_| {
                let (sync, writer) = (sync.clone(), writer.clone());
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let (s, w) = (sync.clone(), writer.clone());
                        let (seq, synced) = tokio::task::spawn_blocking(move || {
                            let seq = {
                                let _writer = w.lock().unwrap();
                                let seq = s.begin().unwrap();
                                s.ended(seq);
                                seq
                            };
                            (seq, s.try_sync_through(seq).unwrap())
                        })
                        .await
                        .unwrap();
                        if !synced {
                            sync.durable(seq).await.unwrap();
                        }
                        assert!(sync.synced.borrow().upto >= seq);
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        assert!(!sync.lock().syncing, "a sync left marked as running");
        sync.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_still_running_is_waited_for_not_synced_around() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("db-wal");
        std::fs::write(&wal, b"frames").unwrap();
        let sync = GroupSync::start(File::open(&wal).unwrap()).unwrap();
        let seq = sync.begin().unwrap();
        // A reader that may have seen the running commit waits for it.
        let reader = {
            let sync = sync.clone();
            let seen = sync.begun();
            tokio::spawn(async move { sync.durable(seen).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "durable before the commit ended");
        sync.ended(seq);
        reader.await.unwrap().unwrap();
        sync.close();
    }

    /// A group sync over a pipe, which cannot be synced (EINVAL): any sync
    /// attempted fails. The pipe's other end goes with the caller's.
    fn unsyncable() -> (Arc<GroupSync>, std::io::PipeWriter) {
        let (reader, writer) = std::io::pipe().unwrap();
        let sync = GroupSync::start(File::from(std::os::fd::OwnedFd::from(reader))).unwrap();
        (sync, writer)
    }

    #[tokio::test]
    async fn a_commit_that_wrote_nothing_needs_no_sync_once_those_before_are_durable() {
        let (sync, _writer) = unsyncable();
        let first = sync.begin().unwrap();
        sync.ended_unwritten(first);
        assert!(sync.try_sync_through(first).unwrap(), "covered at once");
        sync.durable(first).await.unwrap();
        // One that wrote, then one that did not: the second is durable only
        // with the first, which takes a sync (here, a failed one).
        let wrote = sync.begin().unwrap();
        sync.ended(wrote);
        let unwritten = sync.begin().unwrap();
        sync.ended_unwritten(unwritten);
        assert!(sync.try_sync_through(unwritten).is_err());
        assert!(sync.durable(unwritten).await.is_err());
        sync.close();
    }

    #[tokio::test]
    async fn a_failed_sync_fails_every_wait_and_refuses_commits_after_it() {
        let (sync, _writer) = unsyncable();
        let first = sync.begin().unwrap();
        sync.ended(first);
        assert!(sync.try_sync_through(first).is_err());
        assert!(sync.durable(first).await.is_err());
        let error = sync.begin().unwrap_err();
        assert!(
            error.to_string().contains("restart the scheduler"),
            "{error}"
        );
        sync.close();
    }
}

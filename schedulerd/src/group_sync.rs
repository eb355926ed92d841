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
//! Hand-written because the sync has to follow SQLite's own commits; no
//! kept crate offers group commit over rusqlite.

use std::path::PathBuf;
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
    /// The number of the last commit (numbered in commit order).
    committed: u64,
    /// The highest commit a caller waits for.
    wanted: u64,
    closed: bool,
}

#[derive(Debug)]
pub(crate) struct GroupSync {
    pending: Mutex<Pending>,
    wake: Condvar,
    synced: watch::Sender<Synced>,
}

impl GroupSync {
    /// Starts the sync thread for the log at `wal`.
    pub(crate) fn start(wal: PathBuf) -> std::io::Result<Arc<GroupSync>> {
        let sync = Arc::new(GroupSync {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            synced: watch::Sender::new(Synced::default()),
        });
        let worker = sync.clone();
        std::thread::Builder::new()
            .name("store-sync".into())
            .spawn(move || worker.run(&wal))?;
        Ok(sync)
    }

    /// Numbers a commit; call while holding the writer connection, right
    /// after the commit, so numbers follow commit order.
    pub(crate) fn committed(&self) -> u64 {
        let mut pending = self.lock();
        pending.committed += 1;
        pending.committed
    }

    /// Waits until commit `seq` (and every one before it) is durable.
    pub(crate) async fn durable(&self, seq: u64) -> std::io::Result<()> {
        {
            let mut pending = self.lock();
            if pending.wanted < seq {
                pending.wanted = seq;
                self.wake.notify_one();
            }
        }
        let mut synced = self.synced.subscribe();
        let state = synced
            .wait_for(|s| s.upto >= seq || s.failed.is_some())
            .await
            .map_err(|_| std::io::Error::other("the store's sync thread has stopped"))?;
        match &state.failed {
            Some(why) => Err(std::io::Error::other(format!(
                "the database log could not be synced earlier ({why}); restart the scheduler"
            ))),
            None => Ok(()),
        }
    }

    /// Waits until every commit made so far is durable.
    pub(crate) async fn flush(&self) -> std::io::Result<()> {
        let seq = self.lock().committed;
        self.durable(seq).await
    }

    /// Ends the sync thread once it has nothing left to do.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, wal: &std::path::Path) {
        loop {
            let target = {
                let mut pending = self.lock();
                loop {
                    let upto = self.synced.borrow().upto;
                    if pending.wanted > upto {
                        break;
                    }
                    if pending.closed {
                        return;
                    }
                    pending = self.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
                }
                // Everything committed by now rides on this one sync.
                pending.committed
            };
            match sync_file(wal) {
                Ok(()) => self.synced.send_modify(|s| s.upto = s.upto.max(target)),
                Err(error) => {
                    tracing::error!(%error, wal = %wal.display(), "the database log could not be synced; nothing more is acknowledged");
                    self.synced
                        .send_modify(|s| s.failed = Some(error.to_string().into()));
                    return;
                }
            }
        }
    }
}

fn sync_file(path: &std::path::Path) -> std::io::Result<()> {
    // Opened for each sync: SQLite may replace the file (it deletes the log
    // when its last connection closes, after checkpointing it into the
    // database and syncing that).
    match std::fs::File::open(path) {
        Ok(file) => file.sync_data(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_syncs_and_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("db-wal");
        std::fs::write(&wal, b"frames").unwrap();
        let sync = GroupSync::start(wal).unwrap();
        let waiters: Vec<_> = (0..64)
            .map(|_| {
                let sync = sync.clone();
                tokio::spawn(async move {
                    let seq = sync.committed();
                    sync.durable(seq).await
                })
            })
            .collect();
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
        assert_eq!(sync.synced.borrow().upto, 64);
        sync.flush().await.unwrap();
        sync.close();
    }

    #[tokio::test]
    async fn a_failed_sync_fails_every_wait_after_it() {
        let dir = tempfile::tempdir().unwrap();
        // A path under a plain file cannot be opened: the sync fails.
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let sync = GroupSync::start(dir.path().join("file/db-wal")).unwrap();
        let first = sync.committed();
        assert!(sync.durable(first).await.is_err());
        let later = sync.committed();
        let error = sync.durable(later).await.unwrap_err();
        assert!(
            error.to_string().contains("restart the scheduler"),
            "{error}"
        );
        sync.close();
    }
}

//! Syncs of a directory shared by everyone who needs one at once.
//!
//! Every job's end makes its entry in `jobs/` durable (and, for a job that
//! took a spare, the spare's removal from `spare/`): a sync of the whole
//! directory, which covers every change made in it before the sync began.
//! Under load many jobs end at once, each wanting a sync of the same two
//! directories; one sync that begins after all their changes serves them
//! all. Each `fsync` is a flush request to the disk, and a blocking thread
//! woken and put back to sleep.
//!
//! Keyed by the directory's path, process-wide: a sync of a directory
//! serves whoever changed it, whichever part of the worker that was. An
//! entry lives only while syncs of its directory are wanted.
//!
//! Hand-written: the sharing has to follow the callers' own changes, which
//! no kept crate knows of.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use tokio::sync::watch;

use super::record::sync_dir;

/// The directories whose syncs a task runs now (one task each, which
/// removes its entry when it ends), with the sync not begun yet that
/// callers wait for: it begins after every one of their changes.
static SHARED: LazyLock<Mutex<HashMap<PathBuf, Option<Arc<Outcome>>>>> =
    LazyLock::new(Default::default);

/// One sync, and everyone who waits for it: its outcome is theirs alone.
/// A failed sync is never answered for by a later one that succeeded (the
/// kernel may have dropped what the failed one was to write).
type Outcome = watch::Sender<Option<Result<(), Arc<str>>>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only follows a panic elsewhere; what is guarded stays whole.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes every change made in `dir` before this call durable: returns once
/// a sync of `dir` that began after the call ended, shared with every
/// caller who came while the sync before it ran.
pub(super) async fn sync_dir_shared(dir: &Path) -> std::io::Result<()> {
    let (outcome, start) = {
        let mut map = lock(&SHARED);
        let start = !map.contains_key(dir);
        // A sync under way may have begun before the caller's change: the
        // next one to begin is the first sure to cover it.
        let next = map.entry(dir.to_owned()).or_default();
        (next.get_or_insert_with(Default::default).clone(), start)
    };
    if start {
        tokio::spawn(run(dir.to_owned()));
    }
    // The caller holds the sender too: the wait ends only with an outcome.
    let told = outcome
        .subscribe()
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|told| told.clone());
    told.unwrap_or_else(|| Err(Arc::from("its sync was dropped")))
        .map_err(|why| std::io::Error::other(format!("syncing {} failed: {why}", dir.display())))
}

/// Runs the syncs of `dir` one after another while any is wanted.
async fn run(dir: PathBuf) {
    // Ended early (the runtime shutting down), it tells whoever waits and
    // lets the next caller start afresh.
    let mut guard = Running {
        dir: dir.clone(),
        current: None,
        told_all: false,
    };
    loop {
        let outcome = {
            let mut map = lock(&SHARED);
            match map.get_mut(&dir).and_then(Option::take) {
                Some(outcome) => outcome,
                None => {
                    // Everyone who came has been told.
                    map.remove(&dir);
                    guard.told_all = true;
                    return;
                }
            }
        };
        guard.current = Some(outcome.clone());
        #[cfg(test)]
        tests::before_sync(&dir).await;
        let path = dir.clone();
        let result = match tokio::task::spawn_blocking(move || sync_dir(&path)).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        };
        outcome.send_replace(Some(result.map_err(|e| e.to_string().into())));
        guard.current = None;
    }
}

/// The syncing task of a directory, as long as it runs.
struct Running {
    dir: PathBuf,
    /// The sync under way.
    current: Option<Arc<Outcome>>,
    /// The task ended having told everyone who came.
    told_all: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.told_all {
            return;
        }
        let dropped = || Some(Err(Arc::from("the worker is stopping")));
        if let Some(current) = self.current.take() {
            current.send_replace(dropped());
        }
        if let Some(Some(next)) = lock(&SHARED).remove(&self.dir) {
            next.send_replace(dropped());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    /// Every sync run, by directory.
    static SYNCED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    /// Directories whose syncs each wait for a permit first.
    static GATES: LazyLock<Mutex<HashMap<PathBuf, Arc<Semaphore>>>> =
        LazyLock::new(Default::default);

    pub(super) async fn before_sync(dir: &Path) {
        lock(&SYNCED).push(dir.to_owned());
        let gate = lock(&GATES).get(dir).cloned();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
    }

    fn syncs(dir: &Path) -> usize {
        lock(&SYNCED).iter().filter(|d| *d == dir).count()
    }

    fn gated(dir: &Path) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        lock(&GATES).insert(dir.to_owned(), gate.clone());
        gate
    }

    /// Waits (10 s at most) until `holds` does: what is watched here is
    /// the syncing task's inner state, which tells no one.
    async fn until(holds: impl Fn() -> bool) {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !holds() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap();
    }

    /// Waits until `n` syncs of `dir` have begun.
    async fn begun(dir: &Path, n: usize) {
        until(|| syncs(dir) >= n).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_who_come_while_a_sync_runs_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let gate = gated(&path);
        let first = tokio::spawn({
            let path = path.clone();
            async move { sync_dir_shared(&path).await }
        });
        begun(&path, 1).await;
        // These come while the first sync runs: it may have begun before
        // their changes, so they wait for the next one, all of them.
        let later: Vec<_> = (0..16)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move { sync_dir_shared(&path).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        gate.add_permits(1);
        first.await.unwrap().unwrap();
        begun(&path, 2).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            later.iter().all(|c| !c.is_finished()),
            "told by the first sync"
        );
        gate.add_permits(1);
        for call in later {
            call.await.unwrap().unwrap();
        }
        assert_eq!(syncs(&path), 2);
        // All told: the directory's entry goes once its task ends.
        until(|| !lock(&SHARED).contains_key(&path)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_fails_its_callers_though_the_next_one_succeeds() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("d");
        std::fs::create_dir(&path).unwrap();
        let gate = gated(&path);
        let first = tokio::spawn({
            let path = path.clone();
            async move { sync_dir_shared(&path).await }
        });
        begun(&path, 1).await;
        let second = tokio::spawn({
            let path = path.clone();
            async move { sync_dir_shared(&path).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // The first sync finds the directory gone; the second, back.
        std::fs::remove_dir(&path).unwrap();
        gate.add_permits(1);
        begun(&path, 2).await;
        std::fs::create_dir(&path).unwrap();
        gate.add_permits(1);
        second.await.unwrap().unwrap();
        let error = first.await.unwrap().unwrap_err();
        assert!(error.to_string().contains("No such file"), "{error}");
    }
}

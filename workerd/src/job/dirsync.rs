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
static SHARED: LazyLock<Mutex<HashMap<PathBuf, Option<Outcome>>>> = LazyLock::new(Default::default);

/// One sync, told to everyone who waits for it: its outcome is theirs
/// alone. Dropped untold (its task ended early: the runtime stopping),
/// its waiters hear so.
type Outcome = watch::Sender<Option<Result<(), Arc<str>>>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only follows a panic elsewhere; what is guarded stays whole.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes every change made in `dir` before this call durable: returns once
/// a sync of `dir` that began after the call ended, shared with every
/// caller who came while the sync before it ran.
pub(super) async fn sync_dir_shared(dir: &Path) -> std::io::Result<()> {
    let (mut told, start) = {
        let mut map = lock(&SHARED);
        // A sync under way may have begun before the caller's change: the
        // next one to begin is the first sure to cover it.
        let (next, start) = match map.get_mut(dir) {
            Some(next) => (next, None),
            None => {
                let next = map.entry(dir.to_owned()).or_default();
                // Made here, before the task can be dropped unpolled: its
                // entry goes whatever becomes of the task.
                let running = Running {
                    dir: dir.to_owned(),
                    ended: false,
                };
                (next, Some(running))
            }
        };
        let told = next
            .get_or_insert_with(|| watch::channel(None).0)
            .subscribe();
        (told, start)
    };
    if let Some(running) = start {
        tokio::spawn(run(running));
    }
    let outcome = match told.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => None,
    };
    outcome
        .unwrap_or_else(|| Err(Arc::from("its sync was dropped: the worker is stopping")))
        .map_err(|why| std::io::Error::other(format!("syncing {} failed: {why}", dir.display())))
}

/// Runs the syncs of a directory one after another while any is wanted.
async fn run(mut running: Running) {
    let dir = running.dir.clone();
    loop {
        let outcome = {
            let mut map = lock(&SHARED);
            match map.get_mut(&dir).and_then(Option::take) {
                Some(outcome) => outcome,
                None => {
                    // Everyone who came has been told; under the same lock,
                    // so no caller joins an entry about to go.
                    map.remove(&dir);
                    running.ended = true;
                    return;
                }
            }
        };
        #[cfg(test)]
        tests::before_sync(&dir).await;
        let path = dir.clone();
        let result = match tokio::task::spawn_blocking(move || sync_dir(&path)).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        };
        let result = result.map_err(|e| Arc::<str>::from(e.to_string()));
        if let Err(why) = &result {
            // Those who came while it ran changed the directory meanwhile:
            // the failed writeback may have taken their changes with it,
            // which a later sync that succeeds would not tell. They fail
            // too; whoever comes next gets a sync of their own.
            if let Some(next) = lock(&SHARED).get_mut(&dir).and_then(Option::take) {
                next.send_replace(Some(Err(why.clone())));
            }
        }
        outcome.send_replace(Some(result));
    }
}

/// A directory's syncing task, from before it is spawned until it ends:
/// dropped any other way than by ending, it takes the directory's entry
/// away, and with it the sync its waiters wait for, which tells them.
struct Running {
    dir: PathBuf,
    /// Ended having told everyone who came, its entry removed.
    ended: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.ended {
            lock(&SHARED).remove(&self.dir);
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

    /// Callers waiting for the next sync of `dir`, not begun yet.
    fn waiting(dir: &Path) -> usize {
        lock(&SHARED)
            .get(dir)
            .and_then(Option::as_ref)
            .map_or(0, |next| next.receiver_count())
    }

    /// A caller of [`sync_dir_shared`] for `path`, spawned here.
    fn call(path: &Path) -> tokio::task::JoinHandle<std::io::Result<()>> {
        tokio::spawn(call_owned(path.to_owned()))
    }

    async fn call_owned(path: PathBuf) -> std::io::Result<()> {
        sync_dir_shared(&path).await
    }

    /// A directory `d` made under `root` whose syncs wait at a gate, and
    /// a caller whose sync of it has begun, held at the gate.
    async fn sync_under_way(
        root: &Path,
    ) -> (
        PathBuf,
        Arc<Semaphore>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let path = root.join("d");
        std::fs::create_dir(&path).unwrap();
        let gate = gated(&path);
        let first = call(&path);
        begun(&path, 1).await;
        (path, gate, first)
    }

    /// A caller spawned now, once it waits for the next sync of `path`.
    async fn caller_waiting(path: &Path) -> tokio::task::JoinHandle<std::io::Result<()>> {
        let caller = call(path);
        until(|| waiting(path) == 1).await;
        caller
    }

    /// The error a waiting caller is told, within 10 s (not left waiting).
    async fn told_error(caller: tokio::task::JoinHandle<std::io::Result<()>>) -> std::io::Error {
        tokio::time::timeout(std::time::Duration::from_secs(10), caller)
            .await
            .expect("told, not left waiting")
            .unwrap()
            .unwrap_err()
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
        let first = call(&path);
        begun(&path, 1).await;
        // These come while the first sync runs: it may have begun before
        // their changes, so they wait for the next one, all of them.
        let later: Vec<_> = (0..16).map(|_| call(&path)).collect();
        until(|| waiting(&path) == 16).await;
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
        let (path, gate, first) = sync_under_way(root.path()).await;
        // The first sync finds the directory gone; the next, back.
        std::fs::remove_dir(&path).unwrap();
        gate.add_permits(1);
        let error = first.await.unwrap().unwrap_err();
        std::fs::create_dir(&path).unwrap();
        let second = call(&path);
        begun(&path, 2).await;
        gate.add_permits(1);
        second.await.unwrap().unwrap();
        assert!(error.to_string().contains("No such file"), "{error}");
    }

    /// Callers who came while a sync failed changed the directory while
    /// its writeback may have failed: a later sync that succeeds would not
    /// tell them, so they are told the failure, and no second sync runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_who_came_while_a_sync_failed_are_told_it_failed() {
        let root = tempfile::tempdir().unwrap();
        let (path, gate, first) = sync_under_way(root.path()).await;
        let later = caller_waiting(&path).await;
        std::fs::remove_dir(&path).unwrap();
        gate.add_permits(1);
        assert!(first.await.unwrap().is_err());
        let error = told_error(later).await;
        assert!(error.to_string().contains("No such file"), "{error}");
        until(|| !lock(&SHARED).contains_key(&path)).await;
        assert_eq!(syncs(&path), 1);
    }

    /// A syncing task that ends early (its runtime stopping) tells whoever
    /// waits, for the sync under way and for the next, and leaves no entry
    /// behind: the next caller starts afresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_hear_when_the_syncing_task_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let gate = gated(&path);
        // The first caller, and so the syncing task, on a runtime of their own.
        let other = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let first = other.spawn(call_owned(path.clone()));
        begun(&path, 1).await;
        let later = caller_waiting(&path).await;
        other.shutdown_background();
        assert!(first.await.is_err(), "dropped with its runtime");
        let error = told_error(later).await;
        assert!(error.to_string().contains("dropped"), "{error}");
        assert!(!lock(&SHARED).contains_key(&path));
        gate.add_permits(1);
        sync_dir_shared(&path).await.unwrap();
    }
}

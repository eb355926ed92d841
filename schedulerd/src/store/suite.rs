//! The store test suite: the same behaviour asked of every store, run
//! against SQLite in a temporary file and against PostgreSQL in a
//! throwaway server (`testing/postgres.rs`), a database of its own per
//! test.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::state::JobState;

#[allow(unreachable_pub, dead_code)]
#[path = "../../testing/postgres.rs"]
mod throwaway;

/// Each test, once per store.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = crate::store::SqliteStore::open(&dir.path().join("s.db")).unwrap();
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::postgres().await).await;
                }
            )*
        }
    };
}

suite!(
    a_terminal_state_never_changes_and_a_report_of_a_lost_job_running_asks_for_a_kill,
    a_full_report_loses_only_settled_jobs_it_does_not_name,
    pruning_forgets_only_old_finished_jobs_in_batches,
    a_key_lives_and_dies_with_its_job,
    a_key_binds_a_group_and_can_be_unbound,
    a_job_takes_its_workers_id_with_its_queue_entry_and_key,
    the_queue_keeps_its_order_and_a_job_is_taken_once,
    a_queue_timeout_fails_only_jobs_still_queued,
    a_starts_answer_changes_only_a_record_that_heard_nothing_since,
    a_registration_keeps_the_recorded_drain,
    a_judgement_of_liveness_overwrites_neither_a_leave_nor_a_new_registration,
    a_job_is_recorded_unless_one_queued_ahead_holds_it_back,
    a_job_named_to_the_worker_holds_a_start_back_behind_any_number_of_placed_ones,
    max_queued_counts_the_jobs_waiting_not_those_being_dispatched,
);

/// The queue check of a start and its record are one transaction: a job
/// held back by one queued ahead of it is not recorded (nor its key), and
/// the check asks only about jobs of its priority or higher.
async fn a_job_is_recorded_unless_one_queued_ahead_holds_it_back(store: SharedStore) {
    let ahead = |priority: i32, holds: bool| Ahead {
        priority,
        worker_id: "w".into(),
        limit: 10,
        holds: Box::new(move |row, entry| {
            assert_eq!((row.job_id.as_str(), entry.priority), ("q", 3));
            holds
        }),
    };
    let fresh = |id: &str| job(id, JobState::Unknown, 0);
    // An empty queue holds nothing back, whatever the check would say.
    assert!(
        store
            .insert_job_unless_ahead(fresh("first"), None, ahead(0, true))
            .await
            .unwrap()
    );
    assert!(store.job("first").await.unwrap().is_some());

    let (row, entry) = queued("q", 3, "", 0);
    store
        .enqueue_job(row, entry, None, 10)
        .await
        .unwrap()
        .unwrap();
    let held = store
        .insert_job_unless_ahead(fresh("held"), Some(key(500)), ahead(3, true))
        .await
        .unwrap();
    assert!(!held);
    assert!(store.job("held").await.unwrap().is_none());
    assert!(
        store.idempotency_key("k", 0).await.unwrap().is_none(),
        "no key bound"
    );

    assert!(
        store
            .insert_job_unless_ahead(fresh("passes"), Some(key(500)), ahead(3, false))
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .idempotency_key("k", 0)
            .await
            .unwrap()
            .unwrap()
            .job_id
            .as_deref(),
        Some("passes")
    );
    // A higher priority does not look at it; a key bound already refuses.
    assert!(
        store
            .insert_job_unless_ahead(fresh("urgent"), None, ahead(4, true))
            .await
            .unwrap()
    );
    let taken = store
        .insert_job_unless_ahead(fresh("again"), Some(key(500)), ahead(4, true))
        .await;
    assert!(matches!(taken, Err(StoreError::KeyTaken(_))), "{taken:?}");
    assert!(store.job("again").await.unwrap().is_none());
}

/// A start naming a worker is held back by a job queued for that worker
/// however many placed jobs wait before it: the check read the first
/// `limit` jobs, placed or named alike, so 32 placed ones hid it.
async fn a_job_named_to_the_worker_holds_a_start_back_behind_any_number_of_placed_ones(
    store: SharedStore,
) {
    for i in 0..40 {
        let (row, entry) = queued(&format!("placed{i}"), 0, "", 0);
        store
            .enqueue_job(row, entry, None, 100)
            .await
            .unwrap()
            .unwrap();
    }
    let (row, entry) = queued("named", 0, "w", 0);
    store
        .enqueue_job(row, entry, None, 100)
        .await
        .unwrap()
        .unwrap();
    // Placed jobs that could not run on the worker hold nothing back.
    let ahead = |worker: &str| Ahead {
        priority: i32::MIN,
        worker_id: worker.into(),
        limit: 32,
        holds: Box::new(|row, _| {
            assert!(row.job_id.starts_with("placed"), "{}", row.job_id);
            false
        }),
    };
    let fresh = |id: &str| job(id, JobState::Unknown, 0);
    assert!(
        !store
            .insert_job_unless_ahead(fresh("for-w"), None, ahead("w"))
            .await
            .unwrap(),
        "held back by the job named to w"
    );
    assert!(store.job("for-w").await.unwrap().is_none());
    assert!(
        store
            .insert_job_unless_ahead(fresh("for-w2"), None, ahead("w2"))
            .await
            .unwrap()
    );
    // Once it is taken, nothing holds a start for w back.
    store
        .claim_queued("named", "w", "starting")
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .insert_job_unless_ahead(fresh("for-w"), None, ahead("w"))
            .await
            .unwrap()
    );
}

/// The answer to a start may be recorded after the job was reported (a
/// direct start's answer does not wait for that write): what came later
/// stands.
async fn a_starts_answer_changes_only_a_record_that_heard_nothing_since(store: SharedStore) {
    for id in ["fresh", "reported", "marked"] {
        store
            .insert_job(job(id, JobState::Unknown, 0), None)
            .await
            .unwrap();
    }
    let answer = |id: &str| job(id, JobState::Running, 0);
    assert!(store.update_started(answer("fresh")).await.unwrap());
    assert_eq!(
        store.job("fresh").await.unwrap().unwrap().state,
        JobState::Running
    );

    let mut report = job("reported", JobState::Running, 0);
    report.output_bytes = 42;
    assert!(store.update_job(report).await.unwrap());
    assert!(!store.update_started(answer("reported")).await.unwrap());
    assert_eq!(
        store.job("reported").await.unwrap().unwrap().output_bytes,
        42,
        "the report's figures stay"
    );

    assert!(store.update_job(answer("marked")).await.unwrap());
    store.mark_unknown("w", "cut off").await.unwrap();
    assert!(!store.update_started(answer("marked")).await.unwrap());
    let marked = store.job("marked").await.unwrap().unwrap();
    assert_eq!(marked.state, JobState::Unknown, "the mark stays");
}

/// A ready worker named and identified `id`.
fn worker(id: &str) -> WorkerRow {
    WorkerRow {
        worker_id: id.into(),
        name: id.into(),
        address: "127.0.0.1:1".into(),
        state: WorkerState::Ready,
        plugins: Vec::new(),
        labels: Default::default(),
        registered_at_ms: 1,
        last_seen_ms: 1,
        cgroup_limits: false,
        extensions: Default::default(),
        draining: false,
        max_jobs: 0,
        seed: false,
    }
}

/// Only a drain or an undrain changes the flag: a registration's record,
/// made from what the registry held a moment before, may carry an old one.
async fn a_registration_keeps_the_recorded_drain(store: SharedStore) {
    let worker = WorkerRow {
        draining: true,
        ..worker("w")
    };
    store.upsert_worker(worker.clone()).await.unwrap();
    let draining = |store: SharedStore| async move { store.workers().await.unwrap()[0].draining };
    assert!(
        draining(store.clone()).await,
        "a new worker's flag is written"
    );
    store.set_worker_draining("w", false).await.unwrap();
    store.upsert_worker(worker).await.unwrap();
    assert!(!draining(store.clone()).await, "the undrain stands");
}

/// `down` judged of one registration lands after the worker left, or
/// after it registered again: neither is overwritten. A leave always is
/// recorded.
async fn a_judgement_of_liveness_overwrites_neither_a_leave_nor_a_new_registration(
    store: SharedStore,
) {
    // Sets the state (`registration` as the liveness check passes it) and
    // reads back what the store holds.
    let set = |state, seen, registration| {
        let store = store.clone();
        async move {
            store
                .set_worker_state("w", state, seen, registration)
                .await
                .unwrap();
            store.workers().await.unwrap()[0].state
        }
    };
    store.upsert_worker(worker("w")).await.unwrap();
    assert_eq!(
        set(WorkerState::Down, 2, Some(1)).await,
        WorkerState::Down,
        "the same registration"
    );
    assert_eq!(set(WorkerState::Left, 3, None).await, WorkerState::Left);
    assert_eq!(
        set(WorkerState::Ready, 4, Some(1)).await,
        WorkerState::Left,
        "a leave stands"
    );

    let again = WorkerRow {
        registered_at_ms: 5,
        ..worker("w")
    };
    store.upsert_worker(again).await.unwrap();
    assert_eq!(
        set(WorkerState::Down, 6, Some(1)).await,
        WorkerState::Ready,
        "a new registration stands"
    );
}

/// A new database on this process's throwaway server.
async fn new_database() -> crate::store::postgres::PgLocation {
    let server = throwaway::Postgres::shared().unwrap_or_else(|why| panic!("{why}"));
    let url = tokio::task::spawn_blocking(|| server.database().keep())
        .await
        .unwrap();
    crate::store::postgres::PgLocation {
        url,
        password: None,
        tls: None,
    }
}

/// A PostgreSQL store on a new database of this process's throwaway server.
async fn postgres() -> SharedStore {
    let location = new_database().await;
    std::sync::Arc::new(
        crate::store::postgres::PgStore::connect(&location)
            .await
            .unwrap(),
    )
}

pub(super) fn job(id: &str, state: JobState, finished_at_ms: u64) -> JobRow {
    JobRow {
        job_id: id.into(),
        worker_id: "w".into(),
        command: "bash".into(),
        path: "x.sh".into(),
        args: vec!["1".into()],
        state,
        error_text: String::new(),
        exit_code: None,
        signal: None,
        created_at_ms: 1,
        // A job not yet confirmed by its worker has not started.
        started_at_ms: u64::from(state != JobState::Unknown),
        finished_at_ms,
        output_bytes: 0,
        group_id: None,
        updated_at_ms: 0,
    }
}

async fn a_terminal_state_never_changes_and_a_report_of_a_lost_job_running_asks_for_a_kill(
    store: SharedStore,
) {
    store
        .insert_job(job("a", JobState::Running, 0), None)
        .await
        .unwrap();
    store
        .insert_job(job("b", JobState::Running, 0), None)
        .await
        .unwrap();
    assert!(
        store
            .update_job(job("a", JobState::Succeeded, 5))
            .await
            .unwrap()
    );
    assert!(
        !store
            .update_job(job("a", JobState::Running, 0))
            .await
            .unwrap()
    );
    assert!(
        !store
            .update_job(job("a", JobState::Failed, 6))
            .await
            .unwrap()
    );
    assert_eq!(
        store.job("a").await.unwrap().unwrap().state,
        JobState::Succeeded
    );

    store.mark_unknown("w", "cut off").await.unwrap();
    assert_eq!(
        store.job("b").await.unwrap().unwrap().state,
        JobState::Unknown
    );
    // Unknown is not final: the worker's word brings it back.
    let kill = store
        .apply_reports("w", vec![job("b", JobState::Running, 0)], false, 0)
        .await
        .unwrap();
    assert!(kill.is_empty());
    assert_eq!(
        store.job("b").await.unwrap().unwrap().state,
        JobState::Running
    );
    // A worker registered meanwhile keeps its jobs; a down one loses them.
    let mut worker = worker("w");
    store.upsert_worker(worker.clone()).await.unwrap();
    assert!(store.mark_lost("w", "gone").await.unwrap().is_empty());
    worker.state = WorkerState::Down;
    store.upsert_worker(worker).await.unwrap();
    assert_eq!(store.mark_lost("w", "gone").await.unwrap(), ["b"]);
    let kill = store
        .apply_reports("w", vec![job("b", JobState::Running, 0)], true, 10)
        .await
        .unwrap();
    assert_eq!(kill, ["b"]);
    assert_eq!(store.job("b").await.unwrap().unwrap().state, JobState::Lost);
}

async fn a_full_report_loses_only_settled_jobs_it_does_not_name(store: SharedStore) {
    let mut old = job("old", JobState::Unknown, 0);
    old.created_at_ms = 100;
    let mut starting = job("starting", JobState::Unknown, 0);
    starting.created_at_ms = 1000;
    store.insert_job(old, None).await.unwrap();
    store.insert_job(starting, None).await.unwrap();
    store.apply_reports("w", vec![], true, 500).await.unwrap();
    assert_eq!(
        store.job("old").await.unwrap().unwrap().state,
        JobState::Lost
    );
    assert_eq!(
        store.job("starting").await.unwrap().unwrap().state,
        JobState::Unknown,
        "a start still in flight is not lost"
    );
}

async fn pruning_forgets_only_old_finished_jobs_in_batches(store: SharedStore) {
    for i in 0..5 {
        store
            .insert_job(job(&format!("f{i}"), JobState::Succeeded, 10), None)
            .await
            .unwrap();
    }
    store
        .insert_job(job("new", JobState::Failed, 1000), None)
        .await
        .unwrap();
    store
        .insert_job(job("run", JobState::Running, 0), None)
        .await
        .unwrap();
    assert_eq!(store.prune_finished(500, 3).await.unwrap(), 3);
    assert_eq!(store.prune_finished(500, 3).await.unwrap(), 2);
    assert_eq!(store.prune_finished(500, 3).await.unwrap(), 0);
    assert!(store.job("f0").await.unwrap().is_none());
    assert!(store.job("new").await.unwrap().is_some());
    assert!(store.job("run").await.unwrap().is_some());
}

fn key(created_at_ms: u64) -> NewKey {
    NewKey {
        key: "k".into(),
        route: "/v1/jobs".into(),
        body_sha256: "ab".into(),
        created_at_ms,
        expired_before_ms: 100,
    }
}

async fn a_key_lives_and_dies_with_its_job(store: SharedStore) {
    store
        .insert_job(job("j1", JobState::Unknown, 0), Some(key(500)))
        .await
        .unwrap();
    let bound = store.idempotency_key("k", 0).await.unwrap().unwrap();
    assert_eq!(bound.job_id.as_deref(), Some("j1"));

    // A live binding holds the key: the second job is not written.
    let taken = store
        .insert_job(job("j2", JobState::Unknown, 0), Some(key(600)))
        .await;
    assert!(matches!(taken, Err(StoreError::KeyTaken(_))), "{taken:?}");
    assert!(store.job("j2").await.unwrap().is_none());

    // A refused start forgets the job and its key together.
    store.delete_unstarted_job("j1").await.unwrap();
    assert!(store.job("j1").await.unwrap().is_none());
    assert!(store.idempotency_key("k", 0).await.unwrap().is_none());
    store
        .insert_job(job("j2", JobState::Unknown, 0), Some(key(600)))
        .await
        .unwrap();
    let bound = store.idempotency_key("k", 0).await.unwrap().unwrap();
    assert_eq!(bound.job_id.as_deref(), Some("j2"));

    // Expired: not answered, replaced by a new binding, then pruned.
    assert!(store.idempotency_key("k", 601).await.unwrap().is_none());
    let later = NewKey {
        expired_before_ms: 700,
        ..key(700)
    };
    store
        .insert_job(job("j3", JobState::Unknown, 0), Some(later))
        .await
        .unwrap();
    let bound = store.idempotency_key("k", 0).await.unwrap().unwrap();
    assert_eq!(
        (bound.job_id.as_deref(), bound.created_at_ms),
        (Some("j3"), 700)
    );
    assert_eq!(store.prune_idempotency_keys(700, 10).await.unwrap(), 0);
    assert_eq!(store.prune_idempotency_keys(701, 10).await.unwrap(), 1);
    assert!(store.job("j3").await.unwrap().is_some());
}

async fn a_key_binds_a_group_and_can_be_unbound(store: SharedStore) {
    let group = GroupRow {
        group_id: "g1".into(),
        command: String::new(),
        path: "x.sh".into(),
        args: Vec::new(),
        created_at_ms: 1,
        failed: Vec::new(),
    };
    store
        .insert_group(group.clone(), Some(key(500)))
        .await
        .unwrap();
    let bound = store.idempotency_key("k", 0).await.unwrap().unwrap();
    assert_eq!(
        (bound.job_id, bound.group_id.as_deref()),
        (None, Some("g1"))
    );
    let again = GroupRow {
        group_id: "g2".into(),
        ..group
    };
    let taken = store.insert_group(again.clone(), Some(key(500))).await;
    assert!(matches!(taken, Err(StoreError::KeyTaken(_))), "{taken:?}");
    assert!(store.group("g2").await.unwrap().is_none());
    store.unbind_group_key("k", "g1").await.unwrap();
    assert!(store.idempotency_key("k", 0).await.unwrap().is_none());
    assert!(store.group("g1").await.unwrap().is_some());
    store.insert_group(again, Some(key(500))).await.unwrap();

    // The workers that could not start its job stay with it, listed too.
    let failed = vec![jobcluster_proto::http::GroupFailure {
        worker_id: "w2".into(),
        error: "refused".into(),
    }];
    store
        .record_group_failures("g1", failed.clone())
        .await
        .unwrap();
    assert_eq!(store.group("g1").await.unwrap().unwrap().0.failed, failed);
    let listed = store.groups(10).await.unwrap();
    let g1 = listed.iter().find(|g| g.group_id == "g1").unwrap();
    assert_eq!(g1.failed, failed);
    assert!(listed.iter().all(|g| g.args.is_empty()));
}

async fn a_job_takes_its_workers_id_with_its_queue_entry_and_key(store: SharedStore) {
    let (row, entry) = queued("ours", 0, "w", 0);
    store
        .enqueue_job(row, entry, Some(key(500)), 10)
        .await
        .unwrap()
        .unwrap();
    store
        .insert_job(job("other", JobState::Running, 0), None)
        .await
        .unwrap();
    // An id that names another job is refused, and nothing moves.
    assert!(!store.rekey_job("ours", "other").await.unwrap());
    assert!(store.job("ours").await.unwrap().is_some());

    assert!(store.rekey_job("ours", "theirs").await.unwrap());
    assert!(store.job("ours").await.unwrap().is_none());
    assert_eq!(store.job("theirs").await.unwrap().unwrap().job_id, "theirs");
    assert!(store.queue_entry("theirs").await.unwrap().is_some());
    let bound = store.idempotency_key("k", 0).await.unwrap().unwrap();
    assert_eq!(bound.job_id.as_deref(), Some("theirs"));

    // That the worker speaks the original contract outlives a restart:
    // it will not register again to say so.
    let seed = WorkerRow {
        name: "seed-127.0.0.1-1".into(),
        seed: true,
        ..worker("w")
    };
    store.upsert_worker(seed.clone()).await.unwrap();
    assert_eq!(store.workers().await.unwrap(), [seed]);
}

fn queued(id: &str, priority: i32, worker: &str, deadline_ms: u64) -> (JobRow, QueueEntry) {
    let mut row = job(id, JobState::Queued, 0);
    row.started_at_ms = 0;
    row.worker_id = worker.into();
    let entry = QueueEntry {
        job_id: id.into(),
        priority,
        queued_at_ms: 1,
        worker_id: worker.into(),
        env: [("SECRET".to_owned(), "x".to_owned())].into(),
        deadline_ms,
        reason: "no free slot".into(),
        ..Default::default()
    };
    (row, entry)
}

async fn the_queue_keeps_its_order_and_a_job_is_taken_once(store: SharedStore) {
    assert!(store.queue_is_empty().await.unwrap());
    for (id, priority) in [("a", 0), ("b", 5), ("c", 0)] {
        let (row, entry) = queued(id, priority, "", 0);
        store
            .enqueue_job(row, entry, None, 3)
            .await
            .unwrap()
            .unwrap();
    }
    let (row, entry) = queued("d", 9, "", 0);
    assert_eq!(
        store.enqueue_job(row, entry, None, 3).await.unwrap(),
        None,
        "full"
    );
    let order = |store: SharedStore| async move {
        let rows = store.queued(0, 10, None).await.unwrap();
        rows.into_iter().map(|(j, _)| j.job_id).collect::<Vec<_>>()
    };
    assert_eq!(order(store.clone()).await, ["b", "a", "c"]);
    assert_eq!(store.queue_entry("c").await.unwrap().unwrap().1, 2);
    let ahead = |p: i32, w: &'static str| {
        let store = store.clone();
        async move {
            let rows = store.waiting_ahead(p, w, 10).await.unwrap();
            rows.into_iter().map(|(j, _)| j.job_id).collect::<Vec<_>>()
        }
    };
    assert_eq!(ahead(5, "").await, ["b"]);
    assert!(ahead(6, "w").await.is_empty());

    // Taken once: a second claim, and a stop, find it gone from the queue.
    // The queue's reads leave out args and env; the claim gives the env.
    let rows = store.queued(0, 10, None).await.unwrap();
    assert!(
        rows.iter()
            .all(|(j, e)| j.args.is_empty() && e.env.is_empty()),
        "{rows:?}"
    );
    let rows = store.waiting_ahead(i32::MIN, "", 10).await.unwrap();
    assert!(
        rows.iter()
            .all(|(j, e)| j.args.is_empty() && e.env.is_empty()),
        "{rows:?}"
    );
    let (claimed, env) = store
        .claim_queued("b", "w", "starting")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (claimed.state, claimed.worker_id.as_str()),
        (JobState::Unknown, "w")
    );
    assert_eq!(claimed.args, queued("b", 5, "", 0).0.args);
    assert_eq!(env, queued("b", 5, "", 0).1.env);
    assert!(
        store
            .claim_queued("b", "w2", "starting")
            .await
            .unwrap()
            .is_none()
    );
    assert!(!store.stop_queued("b").await.unwrap());
    assert_eq!(order(store.clone()).await, ["a", "c"]);
    // Its start is cut off: settling leaves it to the dispatcher.
    assert_eq!(store.dispatching().await.unwrap().len(), 1);
    store
        .apply_reports("w", Vec::new(), true, u64::MAX)
        .await
        .unwrap();
    store.mark_job_lost("b", "w", "gone").await.unwrap();
    assert_eq!(
        store.job("b").await.unwrap().unwrap().state,
        JobState::Unknown
    );
    // Refused by the worker: back in its place, with its record as queued.
    assert!(store.requeue("b", "worker busy").await.unwrap());
    assert_eq!(order(store.clone()).await, ["b", "a", "c"]);
    let back = store.job("b").await.unwrap().unwrap();
    assert_eq!(
        (back.state, back.worker_id.as_str()),
        (JobState::Queued, "")
    );
    // Started: the entry (and the env in it) goes.
    store
        .claim_queued("b", "w", "starting")
        .await
        .unwrap()
        .unwrap();
    store.dequeue("b").await.unwrap();
    assert!(store.dispatching().await.unwrap().is_empty());
    assert!(!store.queue_is_empty().await.unwrap());

    // Stopped while queued: never taken.
    assert!(store.stop_queued("a").await.unwrap());
    assert!(
        store
            .claim_queued("a", "w", "starting")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.job("a").await.unwrap().unwrap().state,
        JobState::Stopped
    );
    assert_eq!(order(store.clone()).await, ["c"]);
    // A job being dispatched, and none waiting: a pass still has work.
    store
        .claim_queued("c", "w", "starting")
        .await
        .unwrap()
        .unwrap();
    assert!(order(store.clone()).await.is_empty());
    assert!(!store.queue_is_empty().await.unwrap());
    store.dequeue("c").await.unwrap();
    assert!(store.queue_is_empty().await.unwrap());
}

/// `[scheduler] max_queued` bounds the jobs waiting: one taken by the
/// dispatcher, its start not settled, waits no more.
async fn max_queued_counts_the_jobs_waiting_not_those_being_dispatched(store: SharedStore) {
    for id in ["a", "b"] {
        let (row, entry) = queued(id, 0, "", 0);
        assert!(
            store
                .enqueue_job(row, entry, None, 2)
                .await
                .unwrap()
                .is_some()
        );
    }
    let (row, entry) = queued("c", 0, "", 0);
    assert_eq!(
        store.enqueue_job(row, entry, None, 2).await.unwrap(),
        None,
        "full"
    );
    store
        .claim_queued("a", "w", "starting")
        .await
        .unwrap()
        .unwrap();
    let (row, entry) = queued("c", 0, "", 0);
    assert!(
        store
            .enqueue_job(row, entry, None, 2)
            .await
            .unwrap()
            .is_some(),
        "one waits, one is being dispatched: room for one more"
    );
    let (row, entry) = queued("d", 0, "", 0);
    assert_eq!(
        store.enqueue_job(row, entry, None, 2).await.unwrap(),
        None,
        "full again"
    );
    // A start that started nothing puts its job back, past the bound if
    // need be: an accepted job is never dropped. New ones wait until the
    // queue is below it again.
    assert!(store.requeue("a", "the worker refused").await.unwrap());
    assert_eq!(store.queued(0, 10, None).await.unwrap().len(), 3);
    let (row, entry) = queued("d", 0, "", 0);
    assert_eq!(store.enqueue_job(row, entry, None, 2).await.unwrap(), None);
}

async fn a_queue_timeout_fails_only_jobs_still_queued(store: SharedStore) {
    for (id, deadline) in [("a", 100), ("b", 100), ("c", 0)] {
        let (row, entry) = queued(id, 0, "w", deadline);
        store.enqueue_job(row, entry, None, 10).await.unwrap();
    }
    store
        .claim_queued("b", "w", "starting")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.expire_queued(99).await.unwrap(), Vec::<String>::new());
    assert_eq!(store.expire_queued(100).await.unwrap(), ["a"]);
    let a = store.job("a").await.unwrap().unwrap();
    assert_eq!(a.state, JobState::Failed);
    assert!(a.error_text.contains("queue_timeout"), "{}", a.error_text);
    assert_eq!(
        store.job("b").await.unwrap().unwrap().state,
        JobState::Unknown
    );
    assert_eq!(
        store.job("c").await.unwrap().unwrap().state,
        JobState::Queued
    );
}

#[tokio::test]
async fn a_sqlite_database_newer_than_this_scheduler_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    drop(crate::store::SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let error = crate::store::SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(error, StoreError::TooNew { found: 99, .. }),
        "{error}"
    );
}

#[tokio::test]
async fn a_postgres_database_newer_than_this_scheduler_is_refused() {
    let location = new_database().await;
    drop(
        crate::store::postgres::PgStore::connect(&location)
            .await
            .unwrap(),
    );
    let (client, connection) = tokio_postgres::connect(&location.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .execute("UPDATE schema_version SET version = 99", &[])
        .await
        .unwrap();
    let error = crate::store::postgres::PgStore::connect(&location)
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::TooNew { found: 99, .. }),
        "{error}"
    );
}

/// Two schedulers on one database, racing for every queued job: each is
/// taken exactly once.
#[tokio::test]
async fn schedulers_sharing_a_database_take_each_queued_job_once() {
    let location = new_database().await;
    // Both connect (and migrate) at once.
    let (a, b) = tokio::join!(
        crate::store::postgres::PgStore::connect(&location),
        crate::store::postgres::PgStore::connect(&location)
    );
    let stores: [SharedStore; 2] = [
        std::sync::Arc::new(a.unwrap()),
        std::sync::Arc::new(b.unwrap()),
    ];
    const JOBS: usize = 40;
    for i in 0..JOBS {
        let (row, entry) = queued(&format!("j{i}"), 0, "", 0);
        stores[i % 2]
            .enqueue_job(row, entry, None, JOBS as u64)
            .await
            .unwrap()
            .unwrap();
    }
    let claim = |store: SharedStore, worker: &'static str| async move {
        let mut won = Vec::new();
        for i in 0..JOBS {
            let id = format!("j{i}");
            if store
                .claim_queued(&id, worker, "starting")
                .await
                .unwrap()
                .is_some()
            {
                won.push(id);
            }
        }
        won
    };
    let (x, y) = tokio::join!(
        tokio::spawn(claim(stores[0].clone(), "wa")),
        tokio::spawn(claim(stores[1].clone(), "wb"))
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.len() + y.len(), JOBS, "every job taken: {x:?} {y:?}");
    let mut all: Vec<_> = x.iter().chain(&y).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), JOBS, "none taken twice");
    // And each record names the one worker that won it.
    for id in &x {
        assert_eq!(stores[1].job(id).await.unwrap().unwrap().worker_id, "wa");
    }
}

/// A PostgreSQL store and a second handle on the same database, as two
/// schedulers would hold.
async fn two_postgres_schedulers() -> (SharedStore, SharedStore) {
    let location = new_database().await;
    let a = crate::store::postgres::PgStore::connect(&location)
        .await
        .unwrap();
    let b = crate::store::postgres::PgStore::connect(&location)
        .await
        .unwrap();
    (std::sync::Arc::new(a), std::sync::Arc::new(b))
}

#[tokio::test]
async fn the_lease_has_one_holder_and_passes_on_only_when_it_expires_or_is_given_up() {
    let (a, b) = two_postgres_schedulers().await;
    let ttl = std::time::Duration::from_millis(400);
    assert_eq!(a.lead("a", ttl).await.unwrap(), Some(1));
    assert_eq!(b.lead("b", ttl).await.unwrap(), None, "a holds it");
    assert_eq!(
        a.lead("a", ttl).await.unwrap(),
        Some(1),
        "renewed: same term"
    );
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(
        b.lead("b", ttl).await.unwrap(),
        Some(2),
        "expired: taken over"
    );
    assert_eq!(a.lead("a", ttl).await.unwrap(), None);
    b.resign("b").await.unwrap();
    assert_eq!(
        a.lead("a", ttl).await.unwrap(),
        Some(3),
        "given up: taken at once"
    );
}

#[tokio::test]
async fn a_leader_fenced_off_by_a_new_term_writes_nothing() {
    let (a, b) = two_postgres_schedulers().await;
    let ttl = std::time::Duration::from_millis(400);
    a.insert_job(job("j", JobState::Running, 0), None)
        .await
        .unwrap();
    let term = a.lead("a", ttl).await.unwrap().unwrap();
    let old_leader = a.fenced("a", term);
    assert!(old_leader.mark_unknown("w", "checking").await.unwrap() == ["j"]);
    // Paused past its lease; b takes over.
    tokio::time::sleep(ttl * 2).await;
    let new_term = b.lead("b", ttl).await.unwrap().unwrap();
    assert!(new_term > term);
    let error = old_leader
        .mark_job_lost("j", "w", "stale")
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::NotLeader), "{error}");
    assert_eq!(b.job("j").await.unwrap().unwrap().state, JobState::Unknown);
    // Unfenced writes (the API's) go on from any scheduler.
    // Only on the worker that was asked: the job is on w.
    a.mark_job_lost("j", "w2", "w2 does not know it")
        .await
        .unwrap();
    assert_eq!(b.job("j").await.unwrap().unwrap().state, JobState::Unknown);
    a.mark_job_lost("j", "w", "its worker does not know it")
        .await
        .unwrap();
    assert_eq!(b.job("j").await.unwrap().unwrap().state, JobState::Lost);
}

/// A PostgreSQL that takes only TLS on TCP: the store connects with the
/// CA it is given and verifies the server; another CA's server is refused.
#[tokio::test]
async fn a_postgres_store_over_tls_verifies_its_server() {
    use jobcluster_pki::{CertificateAuthority, Role, Roots};
    let ca = CertificateAuthority::generate("db test CA").unwrap();
    let server_cert = ca.issue(Role::Scheduler, "db", &[]).unwrap();
    let server = tokio::task::spawn_blocking(move || {
        throwaway::Postgres::start_tls(&server_cert.cert_pem, &server_cert.key_pem)
    })
    .await
    .unwrap()
    .unwrap_or_else(|why| panic!("{why}"));
    let url = server.url("postgres");
    let dir = tempfile::tempdir().unwrap();
    let roots = |ca: &CertificateAuthority, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, ca.cert_pem()).unwrap();
        Roots::load(&path).unwrap()
    };
    let with = |roots: &Roots| crate::store::postgres::PgLocation {
        url: url.clone(),
        password: None,
        tls: Some(jobcluster_pki::client_config(roots, None, &[]).unwrap()),
    };

    let store = crate::store::postgres::PgStore::connect(&with(&roots(&ca, "ca.pem")))
        .await
        .unwrap();
    store
        .insert_job(job("j", JobState::Running, 0), None)
        .await
        .unwrap();
    assert_eq!(
        store.job("j").await.unwrap().unwrap().state,
        JobState::Running
    );

    let stranger = CertificateAuthority::generate("another CA").unwrap();
    let error = crate::store::postgres::PgStore::connect(&with(&roots(&stranger, "other.pem")))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("certificate"), "{error}");
    // And without TLS the server takes nobody over TCP.
    let plain = crate::store::postgres::PgLocation {
        url: url.clone(),
        password: None,
        tls: None,
    };
    assert!(
        crate::store::postgres::PgStore::connect(&plain)
            .await
            .is_err()
    );
}

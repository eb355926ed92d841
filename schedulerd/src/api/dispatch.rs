//! The dispatcher: the one task that takes jobs out of the queue.
//!
//! A pass fails the jobs whose queue timeout passed, sends again the starts
//! a scheduler restart cut off, then walks the queue in order (priority,
//! then arrival) and gives each job a worker with a free slot. Taking a job
//! is a conditional update (`queued` → `unknown` on that worker, only if
//! still `queued`), made by this task alone; from there the job goes
//! through the same start path as a direct one, whose record is already
//! written. A start that certainly started nothing puts the job back in
//! its place; one in doubt leaves it `unknown` for the worker's reports to
//! settle. So each job is started at most once by the scheduler, and the
//! worker's start, idempotent by job id, makes a repeated ask harmless.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::AppState;
use super::jobs::{Refusal, call_start, no_slot_matching, no_slot_on};
use crate::state::{JobState, WorkerState};
use crate::store::{JobRow, QueueEntry, StoreError, WorkerRow};

/// How often a pass runs without being woken: for queue timeouts, and for
/// jobs a busy or unreachable worker handed back (retried no faster).
const TICK: Duration = Duration::from_secs(1);

/// Waiting jobs at the head of the queue looked at one by one per pass
/// (each may get its `reason` rewritten); past them, a job is looked at
/// only if no job of its shape ([`Shape`]) could start in this pass.
const BATCH: u32 = 1000;

/// Queued jobs a pass reads at most: past the head, jobs of shapes seen to
/// wait are passed over without a look, so a job that could start is found
/// behind thousands that cannot (twice `[scheduler] max_queued`'s default).
const MAX_READ: u64 = 20_000;

/// Queued jobs read at once, at first; pages grow up to [`MAX_PAGE`] as a
/// pass goes deeper, so reading far costs few store reads.
const PAGE: u32 = 32;
const MAX_PAGE: u32 = 1024;

/// What decides whether a queued job can start now, and where: jobs of one
/// shape all fit or all wait within a pass (a pass only takes slots).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Shape {
    worker_id: String,
    command: String,
    extension: String,
    selector: std::collections::BTreeMap<String, String>,
}

impl Shape {
    fn of(row: &JobRow, entry: &QueueEntry) -> Shape {
        let extension = crate::placement::extension(&row.path);
        Shape {
            worker_id: entry.worker_id.clone(),
            command: row.command.clone(),
            extension: extension.to_owned(),
            selector: entry.selector.clone(),
        }
    }
}

pub(crate) async fn run(state: AppState, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut deep = true;
    let mut ticks = 0u32;
    loop {
        if let Err(error) = pass(&state, deep).await {
            tracing::error!(%error, "dispatching queued jobs failed; retrying");
        }
        deep = tokio::select! {
            () = state.queue.woken() => true,
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                ticks.is_multiple_of(DEEP_EVERY)
            }
            () = stop.cancelled() => return,
        };
    }
}

/// Every this many ticks a pass reads past the head even unwoken: what
/// lets a job back in the queue, or a worker back in use, wake nothing (a
/// start handed back, a storage backoff run out, a worker answering again
/// with nothing to report), so a job past the head waits at most this many
/// seconds for them.
const DEEP_EVERY: u32 = 10;

/// One pass over the queue. Only a `deep` pass (woken: a job queued, a
/// slot freed, a worker registered or undrained; or every
/// [`DEEP_EVERY`]th tick) reads past the head: every tick would read the
/// same thousands of jobs each second while a slot stays free that none
/// of them can use.
async fn pass(state: &AppState, deep: bool) -> Result<(), StoreError> {
    // Nothing queued or being dispatched (the usual case, and a pass runs
    // after every job's end): one read, where the steps below are a write
    // and two reads that would each find nothing.
    if state.store.queue_is_empty().await? {
        return Ok(());
    }
    let expired = state.store.expire_queued(crate::time::now_ms()).await?;
    for job_id in &expired {
        tracing::info!(%job_id, "queued job failed: its queue timeout passed");
    }
    if !expired.is_empty() {
        state.queue.left();
    }
    resume_cut_off(state).await?;
    // Nothing waits (the usual case): the workers' records, copied and
    // sorted below, would be thousands of copies a second for nothing.
    if state.store.queued(0, 1, None).await?.is_empty() {
        return Ok(());
    }
    let workers = state.registry.all();
    let mut taken = state.store.running_counts().await?;
    if !workers.iter().any(|w| has_slot(state, w, &taken)) {
        return Ok(()); // a full cluster does not read the queue at all
    }
    // Read in pages, so a pass that fills the free slots from the head of
    // a long queue reads little of it. Taken jobs leave the queued set;
    // only the ones left waiting count towards the next page's offset.
    let mut waiting = 0u64;
    let mut page_size = PAGE;
    // Shapes of jobs that wait in this pass.
    let mut waits = std::collections::HashSet::new();
    let max_read = if deep { MAX_READ } else { u64::from(BATCH) };
    'pages: while waiting < max_read && waits.len() < BATCH as usize {
        let page = state.store.queued(waiting, page_size, None).await?;
        let last_page = page.len() < page_size as usize;
        page_size = (page_size * 2).min(MAX_PAGE);
        for (row, entry) in page {
            if !workers.iter().any(|w| has_slot(state, w, &taken)) {
                break 'pages; // nothing can start until a slot frees up
            }
            // Checked per job, not per page: pages grow, and a pass
            // that reads the head only would read a thousand more.
            if waiting >= max_read {
                break 'pages;
            }
            // Put back by a start task that has not ended yet: claimed
            // now, the new start would find the old one in flight and not
            // run, leaving the job taken with no start under way. Ended
            // after it put the job back, so the next pass takes it.
            if state.queue.in_flight(&row.job_id) {
                waiting += 1;
                continue;
            }
            // Past the head only, a job's shape is read before the job:
            // at the head every job is looked at anyway.
            let head = waiting < u64::from(BATCH);
            let shape = (!head).then(|| Shape::of(&row, &entry));
            if shape.as_ref().is_some_and(|s| waits.contains(s)) {
                waiting += 1;
                continue;
            }
            let worker = match choose(state, &workers, &taken, &row, &entry) {
                Ok(worker) => worker,
                Err(reason) => {
                    waiting += 1;
                    waits.insert(shape.unwrap_or_else(|| Shape::of(&row, &entry)));
                    if head && reason != entry.reason {
                        state.store.set_queue_reason(&row.job_id, &reason).await?;
                    }
                    continue;
                }
            };
            let why = format!("starting on worker {}; its answer is awaited", worker.name);
            let Some((claimed, env)) = state
                .store
                .claim_queued(&row.job_id, &worker.worker_id, &why)
                .await?
            else {
                continue; // stopped or timed out meanwhile
            };
            let running = taken.entry(worker.worker_id.clone()).or_default();
            *running += 1;
            // With the jobs this pass counted on the worker, to tell a
            // worker's "busy" from a count gone stale.
            tracing::info!(job_id = %row.job_id, worker_id = %worker.worker_id, worker = %worker.name, priority = entry.priority, running = *running, "dispatching queued job");
            // Not in flight (checked above, and only this task begins
            // starts), so this start runs.
            let _ = start(state, claimed, env, Refusal::Requeue);
        }
        if last_page {
            break;
        }
    }
    Ok(())
}

/// Jobs taken from the queue whose start is not settled and not in
/// flight: the scheduler stopped between taking them and the worker's
/// answer. Their worker is asked again (the same job id, so a job that did
/// start is not started twice).
async fn resume_cut_off(state: &AppState) -> Result<(), StoreError> {
    for (row, entry) in state.store.dispatching().await? {
        if row.state != JobState::Unknown || row.started_at_ms != 0 {
            // Settled by a report or a status query; only the entry is left.
            state.store.dequeue(&row.job_id).await?;
            continue;
        }
        let usable = state
            .registry
            .get(&row.worker_id)
            .is_some_and(|w| w.usable());
        if usable {
            let (job_id, worker_id) = (row.job_id.clone(), row.worker_id.clone());
            // Taken under an earlier leader, whose start may still be on
            // its way to this worker: it goes there or nowhere.
            if start(state, row, entry.env, Refusal::Retry) {
                tracing::info!(%job_id, %worker_id, "asking again about a dispatch cut off by a restart");
            }
        }
    }
    Ok(())
}

/// Starts a taken job in a task of its own, so a slow worker holds up
/// only its own jobs. False if its start is already under way.
fn start(
    state: &AppState,
    row: JobRow,
    env: std::collections::BTreeMap<String, String>,
    refusal: Refusal,
) -> bool {
    if !state.queue.begin(&row.job_id) {
        return false;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let job_id = row.job_id.clone();
        // A start outlives its pass; if this scheduler stopped leading
        // meanwhile (paused, cut off), the next leader resumes the job.
        if !state.acting.now() {
            state.queue.end(&job_id);
            return;
        }
        // A cut-off dispatch was read before `begin`: the start that took
        // it may have ended since, after putting the job back in the queue
        // or settling it. Read again now that no other start is in flight.
        let row = if refusal == Refusal::Retry {
            match state.store.job(&job_id).await {
                Ok(Some(now)) if now.state == JobState::Unknown && now.started_at_ms == 0 => now,
                Ok(_) => {
                    state.queue.end(&job_id);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%job_id, %error, "could not read a cut-off dispatch again; the next pass tries");
                    state.queue.end(&job_id);
                    return;
                }
            }
        } else {
            row
        };
        let Some(worker) = state.registry.get(&row.worker_id) else {
            if let Err(error) = state.store.requeue(&job_id, "its worker is gone").await {
                tracing::error!(%job_id, %error, "could not put a job back in the queue");
            }
            state.queue.end(&job_id);
            return;
        };
        let result = call_start(&state, &worker, row, env, refusal).await;
        state.queue.end(&job_id);
        state.queue.left();
        if let Err(e) = result {
            if e.nothing_started {
                // Back in its place (the next tick tries again, not this
                // instant, so a busy worker is not hammered), or failed if
                // the worker refused the job itself.
                tracing::info!(%job_id, worker_id = %worker.id(), error = %e.error.message, "queued job not started");
            } else {
                tracing::warn!(%job_id, worker_id = %worker.id(), error = %e.error.message, "dispatched job's start is in doubt; it stays unknown");
            }
        }
    });
    true
}

fn usable(state: &AppState, w: &WorkerRow) -> bool {
    w.state == WorkerState::Ready
        && !w.draining
        && state.registry.get(&w.worker_id).is_some_and(|e| {
            e.unresponsive_since().is_none()
                && e.recorded()
                && !e.storage_refusing(crate::time::now_ms())
        })
}

fn has_slot(state: &AppState, w: &WorkerRow, taken: &HashMap<String, u64>) -> bool {
    usable(state, w) && w.free_slots(taken.get(&w.worker_id).copied().unwrap_or(0)) != Some(0)
}

/// The worker a queued job starts on now, or why it keeps waiting.
fn choose(
    state: &AppState,
    workers: &[WorkerRow],
    taken: &HashMap<String, u64>,
    row: &JobRow,
    entry: &QueueEntry,
) -> Result<WorkerRow, String> {
    if !entry.worker_id.is_empty() {
        let Some(w) = workers.iter().find(|w| w.worker_id == entry.worker_id) else {
            return Err(format!("worker {} is not registered", entry.worker_id));
        };
        if w.state != WorkerState::Ready {
            return Err(format!("worker {} is {}", w.name, w.state));
        }
        if w.draining {
            return Err(format!("worker {} is draining", w.name));
        }
        if !usable(state, w) {
            let refusing = state
                .registry
                .get(&w.worker_id)
                .is_some_and(|e| e.storage_refusing(crate::time::now_ms()));
            return Err(match refusing {
                true => format!("worker {} refused its last start for its storage", w.name),
                false => format!("worker {} is unresponsive", w.name),
            });
        }
        if !has_slot(state, w, taken) {
            return Err(no_slot_on(&w.name, w.max_jobs));
        }
        return Ok(w.clone());
    }
    let eligible = crate::placement::eligible_queued(workers, row, entry).map_err(|why| why.0)?;
    let free: Vec<WorkerRow> = eligible
        .into_iter()
        .filter(|w| has_slot(state, w, taken))
        .collect();
    let turn = state
        .placement_turn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    crate::placement::order(free, taken, turn)
        .into_iter()
        .next()
        .ok_or_else(|| no_slot_matching(&entry.selector))
}

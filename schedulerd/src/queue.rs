//! What the API, the gRPC service and the dispatcher share about the job
//! queue. The queue itself lives in the store; this is only how its one
//! dispatcher is woken and which dispatches it has in flight.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct Queue {
    wake: Notify,
    /// A queued job left the queue (started, or ended without starting):
    /// for readers waiting to follow one.
    left: Notify,
    /// `[scheduler] max_queued`.
    pub(crate) max_queued: u64,
    /// Jobs taken from the queue whose start task runs now. Held for set
    /// operations only, never across an await.
    in_flight: Mutex<HashSet<String>>,
}

impl Queue {
    pub(crate) fn new(max_queued: u64) -> Self {
        Queue {
            wake: Notify::new(),
            left: Notify::new(),
            max_queued,
            in_flight: Mutex::new(HashSet::new()),
        }
    }

    /// Something that may let a queued job start happened (a job queued or
    /// ended, a worker registered or undrained). Wakes coalesce: one pass
    /// after many of them sees them all.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Wakes every reader waiting for a queued job to leave the queue.
    pub(crate) fn left(&self) {
        self.left.notify_waiters();
    }

    /// Resolves at the next [`Queue::left`] after it was enabled (pin it
    /// and call `enable` before checking the job, so no wake is missed).
    pub(crate) fn leaving(&self) -> tokio::sync::futures::Notified<'_> {
        self.left.notified()
    }

    /// Marks a start in flight; false if it already was.
    pub(crate) fn begin(&self, job_id: &str) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job_id.to_owned())
    }

    /// Whether a start of this job is in flight.
    pub(crate) fn in_flight(&self, job_id: &str) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(job_id)
    }

    pub(crate) fn end(&self, job_id: &str) {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(job_id);
    }
}

//! Who runs what must run once. Schedulers sharing a store take turns as
//! leader through its lease (see [`crate::store::Store::lead`]); the
//! leader runs the liveness rules, the settling of unknown jobs, the queue's
//! dispatcher and the pruning, each through a store fenced with its term.
//! On a store of its own (SQLite) a scheduler leads from start to stop.
//!
//! A leader stops its work before its lease can expire: it counts the
//! lease from the moment it *asked* for it (the store counts from when it
//! granted it, later), less a margin, and ends its term when that passes
//! without a renewal. A leader that cannot stop in time (paused, cut off)
//! is fenced off by the store: its writes fail once another holds the lease.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::SharedStore;

/// How long a lease lasts, and how a leader renews it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lease {
    pub(crate) ttl: Duration,
}

impl Lease {
    /// Renewals (and a follower's tries to take over) come this often:
    /// five chances per lease.
    fn renew_every(self) -> Duration {
        self.ttl / 5
    }

    /// A leader acts until this long before the lease it was granted ends.
    fn margin(self) -> Duration {
        self.ttl / 5
    }
}

/// Whether this scheduler may act as the leader at this instant: its term
/// has not ended, and the lease it holds is not past the point where it
/// must stop. Checked right before a leader's call to a worker (a start),
/// which the store's fence cannot cover. The default always may: a
/// scheduler alone on its store, or one answering a request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Acting(Option<Arc<(CancellationToken, Mutex<std::time::Instant>)>>);

impl Acting {
    pub(crate) fn now(&self) -> bool {
        match &self.0 {
            None => true,
            Some(term) => {
                let until = *term.1.lock().unwrap_or_else(|e| e.into_inner());
                !term.0.is_cancelled() && std::time::Instant::now() < until
            }
        }
    }

    fn extend(&self, until: Instant) {
        if let Some(term) = &self.0 {
            *term.1.lock().unwrap_or_else(|e| e.into_inner()) = until.into_std();
        }
    }
}

/// One term of leadership: its work and how to end it.
struct Term {
    token: i64,
    stop: CancellationToken,
    acting: Acting,
    work: Vec<JoinHandle<()>>,
}

impl Term {
    async fn end(self, why: &str) {
        tracing::warn!(
            term = self.token,
            why,
            "no longer the leader; its work stops"
        );
        crate::metrics::set_leader(false);
        self.stop.cancel();
        for task in self.work {
            // Every task stops at its next await; one stuck in a store
            // call is fenced off anyway.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// Leads whenever this scheduler can, until `stop`: `work` is started at
/// the start of every term, with the term's fenced store and a token that
/// is cancelled when the term ends.
pub(crate) async fn run<W>(
    store: SharedStore,
    holder: String,
    lease: Lease,
    work: W,
    stop: CancellationToken,
) where
    W: Fn(SharedStore, CancellationToken, Acting) -> Vec<JoinHandle<()>>,
{
    if !store.shared() {
        // Alone on its store: one term, from start to stop.
        crate::metrics::set_leader(true);
        let term = stop.child_token();
        let tasks = work(store, term.clone(), Acting::default());
        stop.cancelled().await;
        for task in tasks {
            let _ = task.await;
        }
        return;
    }
    let mut current: Option<Term> = None;
    // Until when the current term may act.
    let mut until = Instant::now();
    loop {
        let asked = Instant::now();
        // A leader waits for its renewal no longer than it may act.
        let wait = if current.is_some() {
            until.min(asked + lease.renew_every())
        } else {
            asked + lease.renew_every()
        };
        let granted = tokio::select! {
            granted = tokio::time::timeout_at(wait, store.lead(&holder, lease.ttl)) => granted,
            () = stop.cancelled() => break,
        };
        match granted {
            Ok(Ok(Some(token))) => {
                if current.as_ref().is_some_and(|t| t.token != token)
                    && let Some(old) = current.take()
                {
                    old.end("the lease lapsed and was taken again under a new term")
                        .await;
                }
                until = asked + lease.ttl - lease.margin();
                match &current {
                    Some(term) => term.acting.extend(until),
                    None => {
                        tracing::info!(term = token, %holder, "this scheduler is the leader");
                        crate::metrics::set_leader(true);
                        let stop = stop.child_token();
                        let acting =
                            Acting(Some(Arc::new((stop.clone(), Mutex::new(until.into_std())))));
                        let fenced = store.fenced(&holder, token);
                        current = Some(Term {
                            token,
                            work: work(fenced, stop.clone(), acting.clone()),
                            acting,
                            stop,
                        });
                    }
                }
            }
            Ok(Ok(None)) => {
                if let Some(old) = current.take() {
                    old.end("another scheduler holds the lease").await;
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not take or renew the leader lease");
            }
            Err(_) => tracing::warn!("taking or renewing the leader lease timed out"),
        }
        if Instant::now() >= until
            && let Some(old) = current.take()
        {
            old.end("its lease was not renewed in time").await;
        }
        let next = Instant::now() + lease.renew_every();
        let deadline = if current.is_some() {
            until.min(next)
        } else {
            next
        };
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = stop.cancelled() => break,
        }
    }
    if let Some(old) = current.take() {
        old.end("the scheduler is stopping").await;
        // Handing over at once instead of after the lease runs out.
        match tokio::time::timeout(lease.renew_every(), store.resign(&holder)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not give the leader lease up"),
            Err(_) => tracing::warn!("giving the leader lease up timed out; it expires by itself"),
        }
    }
}

/// Runs `f` every `every` until `stop`, for the chores every scheduler on
/// a shared store does.
pub(crate) async fn every<F, Fut>(every: Duration, stop: CancellationToken, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => f().await,
            () = stop.cancelled() => return,
        }
    }
}

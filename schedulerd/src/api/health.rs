//! Probes for load balancers and service managers, answered without
//! credentials: `GET /healthz` (the process serves HTTP) and `GET /readyz`
//! (it is past start-up and not shutting down, and its store takes a real
//! write). They say `ok` or `not ready` and nothing else, so an
//! anonymous caller learns nothing about the cluster; the router mounts
//! them outside the authentication layer.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::AppState;

/// A store that does not take a write within this is not ready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A probe's result answers every readiness request for this long, so a
/// flood of anonymous probes costs at most one store write per period.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// Whether the scheduler is ready, as `/readyz` says.
#[derive(Debug)]
pub(crate) struct Readiness {
    /// Set once every listener serves; cleared when shutdown begins.
    serving: AtomicBool,
    last: Mutex<Option<(Instant, bool)>>,
    /// One store probe at a time; the others wait for its result.
    probing: std::sync::Arc<Semaphore>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            serving: AtomicBool::new(false),
            last: Mutex::new(None),
            probing: std::sync::Arc::new(Semaphore::new(1)),
        }
    }
}

impl Readiness {
    pub(crate) fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    fn fresh(&self) -> Option<bool> {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.filter(|(at, _)| at.elapsed() < FRESH_FOR)
            .map(|(_, ok)| ok)
    }

    async fn check(&self, store: &crate::store::SharedStore) -> bool {
        if !self.serving.load(Ordering::Acquire) {
            return false;
        }
        if let Some(ok) = self.fresh() {
            return ok;
        }
        let probe = async {
            // The semaphore is never closed.
            let Ok(permit) = self.probing.clone().acquire_owned().await else {
                return false;
            };
            // Someone else's probe may have answered while this waited.
            if let Some(ok) = self.fresh() {
                return ok;
            }
            // The probe keeps the permit until the store answers, even when
            // this request gave up on it: a stuck store gets no second
            // write queued behind the first.
            let store = store.clone();
            let probe = tokio::spawn(async move {
                let result = store.probe().await;
                drop(permit);
                result
            });
            let ok = match probe.await {
                Ok(Ok(())) => true,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "readiness: the store refused a write");
                    false
                }
                Err(error) => {
                    tracing::warn!(%error, "readiness: the store probe failed");
                    false
                }
            };
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), ok));
            ok
        };
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(ok) => ok,
            Err(_) => {
                tracing::warn!(timeout = ?PROBE_TIMEOUT, "readiness: the store did not take a write in time");
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), false));
                false
            }
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

/// `GET /healthz`: the process is alive and serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "`ok`: the process is alive and serves HTTP. Needs no credentials.", content_type = "text/plain", body = String),
    ),
)]
pub(crate) async fn alive() -> Response {
    plain(StatusCode::OK, "ok\n")
}

/// `GET /readyz`: 200 `ok` when the scheduler serves and its store takes
/// a write, else 503 `not ready`.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "`ok`: the listeners are up and the store takes a write. Needs no credentials.", content_type = "text/plain", body = String),
        (status = 503, description = "`not ready`: starting, shutting down, or the store does not take a write.", content_type = "text/plain", body = String),
    ),
)]
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    if state.readiness.check(&state.store).await {
        plain(StatusCode::OK, "ok\n")
    } else {
        plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

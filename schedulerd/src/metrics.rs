//! Prometheus metrics (docs/OPERATIONS.md, "Metrics"): one process-wide
//! registry, so each instrumented place is a single call and nothing has
//! to be threaded through the state every handler shares.
//!
//! Counters and histograms move where things happen; gauges that mirror
//! state kept elsewhere (the queue, the registry, open output streams) are
//! read when scraped, so they can never drift from what they mirror.
//!
//! Every label's values are bounded: routes are the router's templates,
//! workers are the registered ones, plugins are the names workers declared
//! (anything else is `other`), states and methods are closed sets.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::AppState;
use crate::state::{JobState, WorkerState};

/// Plugin names remembered as label values; names declared past it are
/// counted as `other`, so a misbehaving worker cannot grow the series.
const MAX_PLUGINS: usize = 256;

/// Label value for a plugin no registered worker declared.
const OTHER: &str = "other";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    worker: String,
    plugin: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    state: &'static str,
    worker: String,
    plugin: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueuedLabel {
    queued: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Metrics {
    registry: Registry,
    jobs_started: Family<JobLabels, Counter>,
    jobs_finished: Family<FinishedLabels, Counter>,
    start_latency: HistogramFamily<QueuedLabel>,
    queued_jobs: Gauge,
    workers: Family<StateLabel, Gauge>,
    worker_slots_used: Family<WorkerLabel, Gauge>,
    worker_slots: Family<WorkerLabel, Gauge>,
    http_requests: Family<RequestLabels, Counter>,
    http_duration: HistogramFamily<RouteLabels>,
    followers: Gauge,
    leader: Gauge,
    output_streamed: Counter,
    output_worker_streams: Counter,
    store_duration: HistogramFamily<OperationLabel>,
    plugins: RwLock<HashSet<String>>,
    /// Scrapes set the mirrored gauges and encode under it, so two at once
    /// never encode a half-refreshed family.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn http_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

fn store_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ])
}

fn start_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    ])
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("schedulerd");
        let m = Metrics {
            jobs_started: Family::default(),
            jobs_finished: Family::default(),
            start_latency: Family::new_with_constructor(start_histogram),
            queued_jobs: Gauge::default(),
            workers: Family::default(),
            worker_slots_used: Family::default(),
            worker_slots: Family::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(http_histogram),
            followers: Gauge::default(),
            leader: Gauge::default(),
            output_streamed: Counter::default(),
            output_worker_streams: Counter::default(),
            store_duration: Family::new_with_constructor(store_histogram),
            plugins: RwLock::new(HashSet::new()),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "jobs_started",
            "Jobs a worker confirmed it started, by worker id and plugin",
            m.jobs_started.clone(),
        );
        registry.register(
            "jobs_finished",
            "Started jobs that reached a final state (succeeded, failed, stopped, lost), by state, worker id and plugin",
            m.jobs_finished.clone(),
        );
        registry.register(
            "job_start_latency_seconds",
            "Seconds from the request that created a job to its worker confirming the start, queue wait included; queued says whether it waited in the queue",
            m.start_latency.clone(),
        );
        registry.register(
            "queued_jobs",
            "Jobs waiting in the queue",
            m.queued_jobs.clone(),
        );
        registry.register(
            "workers",
            "Registered workers by state (ready, draining, down, left); a draining worker counts only as draining",
            m.workers.clone(),
        );
        registry.register(
            "worker_slots_used",
            "Jobs recorded running or unknown on a worker, each holding one of its slots, by worker id",
            m.worker_slots_used.clone(),
        );
        registry.register(
            "worker_slots",
            "Job slots a worker declared (its max_jobs), by worker id; absent for a worker without a limit",
            m.worker_slots.clone(),
        );
        registry.register(
            "http_requests",
            "API requests answered, by route template, method and status code",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Seconds from an API request's arrival to its response head (a streamed body may go on after it), by route template and method",
            m.http_duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this scheduler is the leader (runs the liveness rules, the queue and pruning), else 0",
            m.leader.clone(),
        );
        registry.register(
            "followers",
            "Job output streams open to API clients",
            m.followers.clone(),
        );
        registry.register(
            "output_streamed_bytes",
            "Bytes of job output passed from workers to API clients",
            m.output_streamed.clone(),
        );
        registry.register(
            "output_worker_streams",
            "Worker output streams opened for API clients (followers that read together share one)",
            m.output_worker_streams.clone(),
        );
        registry.register(
            "store_operation_duration_seconds",
            "Seconds a store operation took, waiting for its connection included, by operation",
            m.store_duration.clone(),
        );
        Metrics { registry, ..m }
    }

    fn plugin(&self, command: &str) -> String {
        let known = self.plugins.read().unwrap_or_else(|e| e.into_inner());
        if known.contains(command) {
            command.to_owned()
        } else {
            OTHER.to_owned()
        }
    }
}

/// Plugin names a worker declared, which become label values.
pub(crate) fn plugins_declared(names: &[String]) {
    let mut known = METRICS.plugins.write().unwrap_or_else(|e| e.into_inner());
    for name in names {
        if known.len() >= MAX_PLUGINS {
            break;
        }
        if !known.contains(name) {
            known.insert(name.clone());
        }
    }
}

/// A worker confirmed a job's start; `created_at_ms` is when its request came.
pub(crate) fn job_started(worker_id: &str, command: &str, created_at_ms: u64, queued: bool) {
    let labels = JobLabels {
        worker: worker_id.to_owned(),
        plugin: METRICS.plugin(command),
    };
    METRICS.jobs_started.get_or_create(&labels).inc();
    let waited = crate::time::now_ms().saturating_sub(created_at_ms);
    let queued = QueuedLabel {
        queued: if queued { "true" } else { "false" },
    };
    METRICS
        .start_latency
        .get_or_create(&queued)
        .observe(waited as f64 / 1000.0);
}

/// Jobs one store transaction recorded as ended (a final state), counted
/// only once it commits, so a transaction rolled back ends nothing.
#[derive(Debug, Default)]
pub(crate) struct Ended(Vec<FinishedLabels>);

impl Ended {
    pub(crate) fn push(&mut self, state: JobState, worker_id: &str, command: &str) {
        self.0.push(FinishedLabels {
            state: state.as_str(),
            worker: worker_id.to_owned(),
            plugin: METRICS.plugin(command),
        });
    }

    /// The transaction committed: count its jobs.
    pub(crate) fn committed(self) {
        for labels in &self.0 {
            METRICS.jobs_finished.get_or_create(labels).inc();
        }
    }
}

thread_local! {
    /// Jobs a store write in progress on this thread recorded as ended
    /// (the SQLite store's writes run whole on one blocking thread).
    static ENDED: RefCell<Ended> = RefCell::default();
}

/// A started job's record reached a final state, in a store write on this
/// thread: counted by [`store_write_done`] once that write succeeded.
pub(crate) fn job_finished(state: JobState, worker_id: &str, command: &str) {
    ENDED.with_borrow_mut(|ended| ended.push(state, worker_id, command));
}

/// The store write on this thread is over; `ok`: it was committed.
pub(crate) fn store_write_done(ok: bool) {
    let ended = ENDED.take();
    if ok {
        ended.committed();
    }
}

/// This scheduler became the leader (`true`) or stopped being it.
pub(crate) fn set_leader(leading: bool) {
    METRICS.leader.set(i64::from(leading));
}

/// An output stream to a client opened; [`follower_closed`] when it ends.
pub(crate) fn follower_opened() {
    METRICS.followers.inc();
}

pub(crate) fn follower_closed() {
    METRICS.followers.dec();
}

pub(crate) fn output_streamed(bytes: usize) {
    METRICS.output_streamed.inc_by(bytes as u64);
}

pub(crate) fn output_worker_stream_opened() {
    METRICS.output_worker_streams.inc();
}

/// Times a store operation. `F` is the closure a `Store` method hands to
/// its connection: its type name carries that method's name, which keeps
/// the label to the store's own (fixed) set of methods without naming each
/// one at every call.
pub(crate) fn store_operation<F>(started: Instant) {
    drop(StoreTimer {
        operation: operation_name(std::any::type_name::<F>()),
        started,
    });
}

/// Times the store method it was started in until dropped; made by the
/// PostgreSQL store's `timed!`, which names a function inside the method.
#[derive(Debug)]
pub(crate) struct StoreTimer {
    operation: &'static str,
    started: Instant,
}

impl StoreTimer {
    pub(crate) fn start(type_name: &'static str) -> StoreTimer {
        StoreTimer {
            operation: operation_name(type_name),
            started: Instant::now(),
        }
    }
}

impl Drop for StoreTimer {
    fn drop(&mut self) {
        let labels = OperationLabel {
            operation: self.operation,
        };
        METRICS
            .store_duration
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// `<crate::store::sqlite::SqliteStore as crate::store::Store>::job::{{closure}}::{{closure}}`
/// → `job`.
fn operation_name(type_name: &'static str) -> &'static str {
    type_name
        .split_once("Store>::")
        .or_else(|| type_name.split_once("Store::"))
        // A trait method's generics (`insert_job<'_, '_>`) are not its name.
        .and_then(|(_, rest)| rest.split("::").next())
        .and_then(|name| name.split('<').next())
        .filter(|name| !name.is_empty() && !name.starts_with('{'))
        .unwrap_or(OTHER)
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => OTHER,
    }
}

/// Counts and times every API request, by the route template it matched
/// (never the raw path, which would make a series per job id); requests
/// that match no route are `unmatched`.
pub(crate) async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    observe_http(route, method, response.status(), started.elapsed());
    response
}

fn observe_http(route: String, method: &'static str, status: StatusCode, took: Duration) {
    METRICS
        .http_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
            method,
        })
        .observe(took.as_secs_f64());
    METRICS
        .http_requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: status.as_u16(),
        })
        .inc();
}

/// `GET /metrics`: the Prometheus text format (0.0.4), or OpenMetrics for
/// a scraper that asks for it.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Every metric in the Prometheus text format 0.0.4 (OpenMetrics 1.0 when `Accept` asks for `application/openmetrics-text`); see docs/OPERATIONS.md.", content_type = "text/plain", body = String),
    ),
)]
pub(crate) async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Response {
    // Read before taking the lock: no lock is held across an await.
    let queued = state.store.queue_length().await;
    let taken = state.store.running_counts().await;
    let workers = state.registry.all();
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let encoded = {
        let _scrape = METRICS.scrape.lock().unwrap_or_else(|e| e.into_inner());
        match queued {
            Ok(n) => {
                METRICS
                    .queued_jobs
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            Err(error) => tracing::warn!(%error, "metrics: could not count queued jobs"),
        }
        METRICS.workers.clear();
        for state in [
            WorkerState::Ready.as_str(),
            "draining",
            WorkerState::Down.as_str(),
            WorkerState::Left.as_str(),
        ] {
            METRICS.workers.get_or_create(&StateLabel { state }).set(0);
        }
        METRICS.worker_slots.clear();
        for w in &workers {
            let state = if w.state == WorkerState::Ready && w.draining {
                "draining"
            } else {
                w.state.as_str()
            };
            METRICS.workers.get_or_create(&StateLabel { state }).inc();
            if w.max_jobs > 0 {
                let worker = WorkerLabel {
                    worker: w.worker_id.clone(),
                };
                METRICS
                    .worker_slots
                    .get_or_create(&worker)
                    .set(i64::from(w.max_jobs));
            }
        }
        match taken {
            Ok(taken) => {
                METRICS.worker_slots_used.clear();
                for w in &workers {
                    let used = taken.get(&w.worker_id).copied().unwrap_or(0);
                    let worker = WorkerLabel {
                        worker: w.worker_id.clone(),
                    };
                    METRICS
                        .worker_slots_used
                        .get_or_create(&worker)
                        .set(i64::try_from(used).unwrap_or(i64::MAX));
                }
            }
            Err(error) => tracing::warn!(%error, "metrics: could not count running jobs"),
        }
        encode(openmetrics)
    };
    match encoded {
        Ok((content_type, body)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(std::fmt::Error) => {
            tracing::error!("metrics: encoding failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn encode(openmetrics: bool) -> Result<(&'static str, String), std::fmt::Error> {
    let mut body = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut body, &METRICS.registry)?;
        Ok((
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ))
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut body, &METRICS.registry)?;
        Ok((
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body,
        ))
    }
}

/// The plain listener of `[metrics] addr`: only `GET /metrics`, with no
/// credentials (it is meant for loopback), through the API's own
/// connection limits.
pub(crate) fn plain_router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_come_from_the_store_method() {
        assert_eq!(
            operation_name(
                "jobcluster_schedulerd::store::Store::update_job::{{closure}}::{{closure}}"
            ),
            "update_job"
        );
        assert_eq!(
            operation_name(
                "<jobcluster_schedulerd::store::postgres::PgStore as jobcluster_schedulerd::store::Store>::job<'_, '_>::{{closure}}::here"
            ),
            "job"
        );
        assert_eq!(operation_name("something::else::{{closure}}"), OTHER);
        assert_eq!(operation_name("x::Store::{{closure}}"), OTHER);
    }
}

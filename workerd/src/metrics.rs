//! Prometheus metrics (docs/OPERATIONS.md, "Metrics") and the plaintext
//! listener of `[metrics] addr` that serves them. One process-wide
//! registry, so each instrumented place is a single call.
//!
//! Labels are bounded: plugins are the configured ones (a job's plugin is
//! always one of them), states a closed set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::job::{Jobs, State};

/// Scrape connections served at once; more are closed on arrival.
const MAX_CONNECTIONS: usize = 64;
/// A scraper must send a request's headers within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this, however busy (scrapers reconnect).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Open scrapes get this long at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// After a failed accept (out of file descriptors, say), the listener
/// waits this long before the next, rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    state: &'static str,
    plugin: String,
}

struct Metrics {
    registry: Registry,
    jobs_started: Family<PluginLabel, Counter>,
    jobs_finished: Family<FinishedLabels, Counter>,
    slots_used: Gauge,
    slots: Gauge,
    output_written: Counter,
    output_streamed: Counter,
    output_from_memory: Counter,
    followers: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("workerd");
        let m = Metrics {
            registry: Registry::default(),
            jobs_started: Family::default(),
            jobs_finished: Family::default(),
            slots_used: Gauge::default(),
            slots: Gauge::default(),
            output_written: Counter::default(),
            output_streamed: Counter::default(),
            output_from_memory: Counter::default(),
            followers: Gauge::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "jobs_started",
            "Jobs whose process this worker started, by plugin",
            m.jobs_started.clone(),
        );
        registry.register(
            "jobs_finished",
            "Started jobs that ended, by final state (succeeded, failed, stopped, lost) and plugin",
            m.jobs_finished.clone(),
        );
        registry.register(
            "job_slots_used",
            "Jobs whose process runs now, each holding one of the worker's slots",
            m.slots_used.clone(),
        );
        registry.register(
            "job_slots",
            "Jobs this worker runs at once at most ([worker] max_jobs); 0 when unlimited",
            m.slots.clone(),
        );
        registry.register(
            "output_written_bytes",
            "Bytes of job output written to output logs",
            m.output_written.clone(),
        );
        registry.register(
            "output_streamed_bytes",
            "Bytes of job output sent to the scheduler's output streams",
            m.output_streamed.clone(),
        );
        registry.register(
            "output_streamed_from_memory_bytes",
            "Of the output streamed, bytes copied from the piece just written instead of read back from the log (followers that keep up)",
            m.output_from_memory.clone(),
        );
        registry.register("followers", "Output streams open now", m.followers.clone());
        Metrics { registry, ..m }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn state_label(state: State) -> &'static str {
    match state {
        State::Running => "running",
        State::Succeeded => "succeeded",
        State::Failed => "failed",
        State::Stopped => "stopped",
        State::Lost => "lost",
    }
}

pub(crate) fn job_started(plugin: &str) {
    let labels = PluginLabel {
        plugin: plugin.to_owned(),
    };
    METRICS.jobs_started.get_or_create(&labels).inc();
}

pub(crate) fn job_finished(state: State, plugin: &str) {
    let labels = FinishedLabels {
        state: state_label(state),
        plugin: plugin.to_owned(),
    };
    METRICS.jobs_finished.get_or_create(&labels).inc();
}

pub(crate) fn output_written(bytes: usize) {
    METRICS.output_written.inc_by(bytes as u64);
}

pub(crate) fn output_streamed(bytes: usize) {
    METRICS.output_streamed.inc_by(bytes as u64);
}

pub(crate) fn output_from_memory(bytes: usize) {
    METRICS.output_from_memory.inc_by(bytes as u64);
}

/// Counts an open output stream until dropped.
#[derive(Debug)]
pub(crate) struct Follower(());

impl Follower {
    pub(crate) fn open() -> Self {
        METRICS.followers.inc();
        Follower(())
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        METRICS.followers.dec();
    }
}

/// The Prometheus text format (0.0.4), or OpenMetrics when `accept` asks
/// for it.
fn scrape(jobs: &Jobs, max_jobs: Option<usize>, accept: Option<&str>) -> Response<Full<Bytes>> {
    METRICS
        .slots_used
        .set(i64::try_from(jobs.running_count()).unwrap_or(i64::MAX));
    METRICS
        .slots
        .set(max_jobs.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    let openmetrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
    let mut body = String::new();
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut body, &METRICS.registry)
            .map(|()| "application/openmetrics-text; version=1.0.0; charset=utf-8")
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut body, &METRICS.registry)
            .map(|()| prometheus_client::encoding::prometheus_text::CONTENT_TYPE)
    };
    match encoded {
        Ok(content_type) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
        Err(std::fmt::Error) => {
            tracing::error!("metrics: encoding failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

fn respond(
    request: &Request<Incoming>,
    jobs: &Jobs,
    max_jobs: Option<usize>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "only /metrics is served here\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
    }
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    scrape(jobs, max_jobs, accept)
}

/// Serves `GET /metrics` over plain HTTP/1.1 on `listener` until `stop`.
/// No credentials: `[metrics] addr` is meant for loopback.
pub(crate) async fn serve(
    listener: TcpListener,
    jobs: Arc<Jobs>,
    max_jobs: Option<usize>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    loop {
        let (stream, addr): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%addr, limit = MAX_CONNECTIONS, "metrics listener: connection limit reached; closing a new connection");
            continue;
        };
        let (jobs, stop) = (jobs.clone(), stop.clone());
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = respond(&request, &jobs, max_jobs);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%addr, %error, "metrics connection ended with an error");
                    }
                }
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connections.wait()).await;
}

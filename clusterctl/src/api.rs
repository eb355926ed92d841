//! The scheduler's HTTPS API (SPEC §6) as typed calls.
//!
//! [`Api`] holds one reqwest client whose TLS config comes from pki. Every
//! call returns [`ApiError`], whose message is already the one line the user
//! reads: what went wrong and what to do about it. JSON answers are kept as
//! the API sent them ([`Answer::raw`]) so `-o json` and `-o yaml` print the
//! API's objects unchanged, and parsed into the proto types for tables.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use jobcluster_proto::http::{
    ErrorBody, GROUP_TRAILER, GroupInfo, GroupList, GroupLogsQuery, GroupStarted, JOB_TRAILER,
    JobFilter, JobInfo, JobList, JobStarted, LogsQuery, StartGroup, StartJob, StopResult, Success,
    WorkerInfo, WorkerList,
};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::explain;

/// How to reach and authenticate to the scheduler, as the user gave it.
#[derive(Debug, Clone)]
pub(crate) struct ConnectOptions {
    pub(crate) scheduler: String,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) token: Option<String>,
}

/// A piece of an output stream that may end with a record in a trailer.
#[derive(Debug)]
pub(crate) enum Trailed<T> {
    Data(Bytes),
    /// The record the stream ended with.
    End(Box<T>),
}

/// A piece of a job's output stream (`GET /v1/jobs/{id}/logs`); it ends
/// with the job's final record (the [`JOB_TRAILER`]) at the job's end.
pub(crate) type LogFrame = Trailed<JobInfo>;

/// A piece of a group's merged output (`GET /v1/groups/{id}/logs`); a
/// followed one ends with the group's record (the [`GROUP_TRAILER`]) once
/// every member is settled.
pub(crate) type GroupFrame = Trailed<GroupInfo>;

/// A failed API call. Its `Display` is the complete message for the user.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The request or the answer's body did not make it (connect, TLS,
    /// dropped connection).
    #[error("{message}")]
    Transport { message: String, retryable: bool },
    /// The scheduler answered with an error status.
    #[error("{}", status_message(*.status, .body.as_ref(), .text))]
    Status {
        status: StatusCode,
        body: Option<ErrorBody>,
        text: String,
    },
    /// The scheduler answered 2xx with something we cannot read.
    #[error("unexpected answer from the scheduler to {what}: {detail}")]
    Decode { what: String, detail: String },
}

impl ApiError {
    /// The `code` of the scheduler's error body, if it answered one.
    pub(crate) fn code(&self) -> Option<&str> {
        match self {
            ApiError::Status {
                body: Some(body), ..
            } => Some(&body.code),
            _ => None,
        }
    }

    /// `404 job_not_found`: the id may be a group's.
    pub(crate) fn is_job_not_found(&self) -> bool {
        matches!(self, ApiError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
            && self.code() == Some("job_not_found")
    }

    /// A `400` or `404` answer: the id names nothing the route knows.
    pub(crate) fn is_unknown_id(&self) -> bool {
        matches!(
            self,
            ApiError::Status { status, .. }
                if *status == StatusCode::NOT_FOUND || *status == StatusCode::BAD_REQUEST
        )
    }

    /// The job a `503 start_unconfirmed` names: the scheduler recorded it
    /// but does not know whether its worker started it.
    pub(crate) fn job_in_doubt(&self) -> Option<&str> {
        match self {
            ApiError::Status {
                body: Some(body), ..
            } => body.job_id.as_deref(),
            _ => None,
        }
    }

    /// Whether a start sent with an idempotency key may be sent again with
    /// it: the request or its answer was lost on the way (connection
    /// refused or reset, timeout), a proxy or a restarting scheduler
    /// answered 502/503/504 without the API's error body, the scheduler's
    /// store was briefly unavailable, the scheduler's request deadline
    /// passed (`504 request_timeout`; the keyed start goes on), or our own
    /// earlier attempt is still being answered. Never a start in doubt:
    /// its job exists.
    pub(crate) fn is_retryable_start(&self) -> bool {
        if self.job_in_doubt().is_some() {
            return false;
        }
        match self {
            ApiError::Transport { retryable, .. } => *retryable,
            ApiError::Status { status, body, .. } => match body {
                None => matches!(
                    *status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ),
                // `request_timeout`: the scheduler gave up answering, not
                // starting; the start, keyed, goes on and is replayed.
                Some(body) => matches!(
                    body.code.as_str(),
                    "store_unavailable" | "idempotency_key_in_use" | "request_timeout"
                ),
            },
            ApiError::Decode { .. } => false,
        }
    }

    /// Whether trying the same call again later may succeed.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            ApiError::Transport { retryable, .. } => *retryable,
            ApiError::Status { status, .. } => {
                matches!(
                    *status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ) || self.code() == Some("job_not_started")
            }
            ApiError::Decode { .. } => false,
        }
    }
}

fn status_message(status: StatusCode, body: Option<&ErrorBody>, text: &str) -> String {
    let mut message = match body {
        Some(body) => format!("{} ({})", body.error, body.code),
        None if text.is_empty() => format!("the scheduler answered {status}"),
        None => format!("the scheduler answered {status}: {text}"),
    };
    if status == StatusCode::UNAUTHORIZED {
        message.push_str(
            "; check --cert/--key (CLUSTERCTL_CERT/CLUSTERCTL_KEY) or the token (--token-file, \
             CLUSTERCTL_TOKEN_FILE or CLUSTERCTL_TOKEN)",
        );
    }
    message
}

/// A JSON answer: as sent, and parsed.
#[derive(Debug)]
pub(crate) struct Answer<T> {
    pub(crate) raw: Value,
    pub(crate) parsed: T,
}

/// A client of the cluster's schedulers: one at a time, the next when a
/// request to it cannot be delivered (several schedulers share a store,
/// and any of them answers any request).
#[derive(Debug, Clone)]
pub(crate) struct Api {
    client: reqwest::Client,
    /// The schedulers' base URLs, each with its form shown in messages.
    bases: Arc<[(Url, String)]>,
    /// The one requests go to now.
    current: Arc<AtomicUsize>,
    authorization: Option<HeaderValue>,
}

/// Scheduler URLs one `--scheduler` may list at most.
const MAX_SCHEDULERS: usize = 16;

/// How long to wait for a TCP connection and the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a stop waits for a job's start to settle (`job_starting`): after
/// 0.1, 0.2, … 1.6 s and then more, about 10 s in all.
const STOP_SETTLE: Retries = Retries {
    first: Duration::from_millis(100),
    times: 10,
};

/// The header that makes a start safe to send again.
const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// How often, and after which pauses, a call is sent again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retries {
    /// The pause before the first new attempt; doubled before each next.
    pub(crate) first: Duration,
    /// New attempts after the first.
    pub(crate) times: usize,
}

impl Retries {
    /// The pauses as a backon schedule. No jitter: each pause is printed,
    /// and one client's retries do not herd with anyone's.
    fn backoff(&self) -> backon::ExponentialBuilder {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.first)
            .with_factor(2.0)
            .with_max_delay(self.first * 16)
            .with_max_times(self.times)
    }
}

/// A start that failed on the way is sent again after 0.5, 1, 2, 4 and
/// 8 s: together long enough to ride out a scheduler restart.
pub(crate) const START_RETRIES: Retries = Retries {
    first: Duration::from_millis(500),
    times: 5,
};

/// A fresh idempotency key: one per invocation, shared by its retries.
pub(crate) fn new_idempotency_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Runs `call` (a start carrying one idempotency key) until it succeeds,
/// fails in a way another attempt cannot fix, or the retries run out; one
/// line on stderr per retry. The key makes a retry safe: the scheduler
/// answers a start it already made with that job instead of a second one.
pub(crate) async fn retry_start<T, F, Fut>(
    what: &str,
    retries: &Retries,
    call: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    use backon::Retryable;
    let mut retry = 0;
    call.retry(retries.backoff())
        .sleep(tokio::time::sleep)
        .when(ApiError::is_retryable_start)
        .notify(|error, pause| {
            retry += 1;
            eprintln!(
                "clusterctl: {error}; sending {what} again in {} with the same idempotency key (retry {retry}/{})",
                humantime::format_duration(pause),
                retries.times
            );
        })
        .await
}

/// Hint printed when the CA is missing.
const CA_HINT: &str =
    "pass --ca FILE or set CLUSTERCTL_CA (the ca.pem written by `clusterctl pki init`)";

impl Api {
    /// Loads certificates and builds the client. Fails with a message naming
    /// the missing or unreadable file and the flag that sets it.
    pub(crate) fn new(opts: &ConnectOptions) -> anyhow::Result<Api> {
        let bases = parse_scheduler_urls(&opts.scheduler)?;
        let shown = bases
            .iter()
            .map(|(_, shown)| shown.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let plaintext = bases[0].0.scheme() == "http";
        if bases
            .iter()
            .any(|(url, _)| (url.scheme() == "http") != plaintext)
        {
            anyhow::bail!(
                "the scheduler URLs {shown} (--scheduler / CLUSTERCTL_SCHEDULER) mix https:// and \
                 http://: a cluster's schedulers are all one or the other"
            );
        }
        let bases: Arc<[(Url, String)]> = bases.into();
        let authorization = bearer(opts)?;

        if plaintext {
            // A scheduler in insecure mode (use_tls = false, insecure = true).
            eprintln!(
                "clusterctl: warning: plaintext connection to {shown}: nothing is encrypted or authenticated"
            );
            let client = reqwest::Client::builder()
                .user_agent(concat!("clusterctl/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_keepalive(Duration::from_secs(15))
                .build()
                .map_err(|e| anyhow::anyhow!("cannot set up the HTTP client: {e}"))?;
            return Ok(Api {
                client,
                bases,
                current: Arc::default(),
                authorization,
            });
        }

        let Some(ca) = &opts.ca else {
            anyhow::bail!("no CA certificate to verify the scheduler with: {CA_HINT}");
        };
        let roots = jobcluster_pki::Roots::load(ca)
            .map_err(|e| file_error(e, ca, "--ca", "CLUSTERCTL_CA"))?;

        let identity = match (&opts.cert, &opts.key) {
            (Some(cert), Some(key)) => {
                Some(jobcluster_pki::Identity::load(cert, key).map_err(|e| {
                    if pki_error_path(&e) == Some(key.as_path()) {
                        file_error(e, key, "--key", "CLUSTERCTL_KEY")
                    } else {
                        file_error(e, cert, "--cert", "CLUSTERCTL_CERT")
                    }
                })?)
            }
            (Some(_), None) => anyhow::bail!(
                "--cert is set but --key is not: pass --key FILE or set CLUSTERCTL_KEY \
                 (the private key of the client certificate)"
            ),
            (None, Some(_)) => anyhow::bail!(
                "--key is set but --cert is not: pass --cert FILE or set CLUSTERCTL_CERT \
                 (the client certificate)"
            ),
            (None, None) if opts.token.is_some() => None,
            (None, None) => anyhow::bail!(
                "no client certificate: pass --cert FILE --key FILE or set CLUSTERCTL_CERT and \
                 CLUSTERCTL_KEY (a client certificate, e.g. client.pem and client-key.pem from \
                 `clusterctl pki init`), or a token with --token-file FILE (or CLUSTERCTL_TOKEN_FILE \
                 or CLUSTERCTL_TOKEN)"
            ),
        };

        let tls = jobcluster_pki::client_config(&roots, identity.as_ref(), &[b"h2", b"http/1.1"])?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(std::sync::Arc::unwrap_or_clone(tls))
            .https_only(true)
            .user_agent(concat!("clusterctl/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            // A follower of a quiet job notices a dead link within seconds
            // (SPEC §7): HTTP/2 pings, and TCP keepalives for HTTP/1.1.
            .tcp_keepalive(Duration::from_secs(15))
            .tcp_keepalive_interval(Duration::from_secs(5))
            .tcp_keepalive_retries(3)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true)
            // Output arrives in pieces of up to 256 KiB; in HTTP/2's default
            // 16 KiB frames every piece would wake the reader sixteen times.
            .http2_max_frame_size(jobcluster_proto::transport::MAX_FRAME_SIZE)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the HTTPS client: {e}"))?;

        Ok(Api {
            client,
            bases,
            current: Arc::default(),
            authorization,
        })
    }

    /// The scheduler requests go to now: its base URL and its name in
    /// messages.
    fn base(&self) -> &(Url, String) {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// `GET /v1/workers[?all=true]`: the list of workers.
    /// Every page of it, in name order.
    pub(crate) async fn workers(&self, all: bool) -> Result<Answer<Vec<WorkerInfo>>, ApiError> {
        let (mut raw, mut parsed) = (Vec::new(), Vec::new());
        let mut cursor = None;
        loop {
            let mut req = self
                .client
                .get(self.url(&["v1", "workers"]))
                .query(&[("limit", "1000")]);
            if all {
                req = req.query(&[("all", "true")]);
            }
            if let Some(cursor) = &cursor {
                req = req.query(&[("cursor", cursor)]);
            }
            let page = self.json("the worker list", req).await?;
            let list: WorkerList = parse("the worker list", &page)?;
            if let Value::Array(items) = field(page, "workers") {
                raw.extend(items);
            }
            let empty = list.workers.is_empty();
            parsed.extend(list.workers);
            match list.next_cursor {
                // A cursor that does not move on would page for ever.
                Some(next) if empty || cursor.as_ref() == Some(&next) => {
                    return Err(ApiError::Decode {
                        what: "the worker list".to_owned(),
                        detail: format!(
                            "the scheduler gave a cursor that does not advance: {next:?}"
                        ),
                    });
                }
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        Ok(Answer {
            raw: Value::Array(raw),
            parsed,
        })
    }

    /// `GET /v1/workers?limit=N`: the first page only.
    pub(crate) async fn workers_page(&self, limit: u32) -> Result<Answer<WorkerList>, ApiError> {
        let req = self
            .client
            .get(self.url(&["v1", "workers"]))
            .query(&[("limit", limit)]);
        self.typed("the worker list", req).await
    }

    /// `GET /v1/workers/{id-or-name}`.
    pub(crate) async fn worker(&self, worker: &str) -> Result<Answer<WorkerInfo>, ApiError> {
        let req = self.client.get(self.url(&["v1", "workers", worker]));
        self.typed("the worker", req).await
    }

    /// `POST /v1/workers/{id-or-name}/drain` or `/undrain`.
    pub(crate) async fn drain(
        &self,
        worker: &str,
        draining: bool,
    ) -> Result<Answer<WorkerInfo>, ApiError> {
        let action = if draining { "drain" } else { "undrain" };
        let req = self
            .client
            .post(self.url(&["v1", "workers", worker, action]));
        self.typed("the worker", req).await
    }

    /// `DELETE /v1/workers/{id-or-name}`.
    pub(crate) async fn remove_worker(&self, worker: &str) -> Result<Answer<Success>, ApiError> {
        let req = self.client.delete(self.url(&["v1", "workers", worker]));
        self.typed("the removal", req).await
    }

    /// `POST /v1/jobs`, with an `Idempotency-Key` if given.
    pub(crate) async fn start(
        &self,
        job: &StartJob,
        key: Option<&str>,
    ) -> Result<Answer<JobStarted>, ApiError> {
        let mut req = self.client.post(self.url(&["v1", "jobs"])).json(job);
        if let Some(key) = key {
            req = req.header(IDEMPOTENCY_KEY, key);
        }
        self.typed("the start request", req).await
    }

    /// `GET /v1/jobs`: one page.
    pub(crate) async fn jobs(&self, filter: &JobFilter) -> Result<Answer<JobList>, ApiError> {
        let req = self.client.get(self.url(&["v1", "jobs"])).query(filter);
        self.typed("the job list", req).await
    }

    /// `GET /v1/jobs/{id}`.
    pub(crate) async fn job(&self, job: &str) -> Result<Answer<JobInfo>, ApiError> {
        let req = self.client.get(self.url(&["v1", "jobs", job]));
        self.typed("the job", req).await
    }

    /// `POST /v1/jobs/{id}/stop`. A job whose start has not reached its
    /// worker yet (`503 job_starting`: just dispatched) is asked again,
    /// for up to about ten seconds, rather than left to run.
    pub(crate) async fn stop(&self, job: &str) -> Result<Answer<StopResult>, ApiError> {
        use backon::Retryable;
        let stop = || {
            let req = self.client.post(self.url(&["v1", "jobs", job, "stop"]));
            self.typed("the stop request", req)
        };
        stop.retry(STOP_SETTLE.backoff())
            .sleep(tokio::time::sleep)
            .when(|e: &ApiError| e.code() == Some("job_starting"))
            .await
    }

    /// `GET /v1/jobs/{id}/logs`: the output bytes from `offset`, as they
    /// arrive, then the job's record if the stream ended at the job's end
    /// (its `x-job` trailer). A stream error means the body was cut short.
    pub(crate) async fn logs(
        &self,
        job: &str,
        query: &LogsQuery,
    ) -> Result<BoxStream<'static, Result<LogFrame, ApiError>>, ApiError> {
        let req = self
            .client
            .get(self.url(&["v1", "jobs", job, "logs"]))
            // HTTP/1.1 sends the trailer only to a client that asks.
            .header(reqwest::header::TE, "trailers")
            .query(query);
        let resp = self.send(req).await?;
        Ok(self.trailed_stream(resp, JOB_TRAILER))
    }

    /// `POST /v1/groups`, with an `Idempotency-Key` if given.
    pub(crate) async fn start_group(
        &self,
        group: &StartGroup,
        key: Option<&str>,
    ) -> Result<Answer<GroupStarted>, ApiError> {
        let mut req = self.client.post(self.url(&["v1", "groups"])).json(group);
        if let Some(key) = key {
            req = req.header(IDEMPOTENCY_KEY, key);
        }
        self.typed("the group start request", req).await
    }

    /// `GET /v1/groups`: the list of groups, newest first.
    pub(crate) async fn groups(&self) -> Result<Answer<Vec<GroupInfo>>, ApiError> {
        let req = self.client.get(self.url(&["v1", "groups"]));
        let raw = self.json("the group list", req).await?;
        let list: GroupList = parse("the group list", &raw)?;
        Ok(Answer {
            raw: field(raw, "groups"),
            parsed: list.groups,
        })
    }

    /// `GET /v1/groups/{id}`.
    pub(crate) async fn group(&self, group: &str) -> Result<Answer<GroupInfo>, ApiError> {
        let req = self.client.get(self.url(&["v1", "groups", group]));
        self.typed("the group", req).await
    }

    /// `POST /v1/groups/{id}/stop`.
    pub(crate) async fn stop_group(&self, group: &str) -> Result<Answer<StopResult>, ApiError> {
        let req = self.client.post(self.url(&["v1", "groups", group, "stop"]));
        self.typed("the stop request", req).await
    }

    /// `GET /v1/groups/{id}/logs`: every job's lines, prefixed with the
    /// worker's name, as they arrive, then the group's record if every
    /// member's end was recorded (its `x-group` trailer). A stream error
    /// means the body was cut short; group output has no offsets to resume
    /// from.
    pub(crate) async fn group_logs(
        &self,
        group: &str,
        query: &GroupLogsQuery,
    ) -> Result<BoxStream<'static, Result<GroupFrame, ApiError>>, ApiError> {
        let req = self
            .client
            .get(self.url(&["v1", "groups", group, "logs"]))
            // HTTP/1.1 sends the trailer only to a client that asks.
            .header(reqwest::header::TE, "trailers")
            .query(query);
        let resp = self.send(req).await?;
        Ok(self.trailed_stream(resp, GROUP_TRAILER))
    }

    /// A streamed body's data, then the record in its trailer `name` if it
    /// parses; errors are [`ApiError::Transport`]. A trailer that does not
    /// parse is as good as none: the follower asks for the record instead.
    fn trailed_stream<T: DeserializeOwned + Send + 'static>(
        &self,
        resp: Response,
        name: &'static str,
    ) -> BoxStream<'static, Result<Trailed<T>, ApiError>> {
        let broke = self.broke_off();
        let frames = http_body_util::BodyStream::new(reqwest::Body::from(resp));
        frames
            .filter_map(move |frame| {
                futures_util::future::ready(match frame {
                    Ok(frame) => match frame.into_data() {
                        Ok(data) => Some(Ok(Trailed::Data(data))),
                        Err(frame) => frame
                            .into_trailers()
                            .ok()
                            .and_then(|trailers| {
                                serde_json::from_slice(trailers.get(name)?.as_bytes()).ok()
                            })
                            .map(|record| Ok(Trailed::End(Box::new(record)))),
                    },
                    Err(e) => Some(Err(broke(e))),
                })
            })
            .boxed()
    }

    /// The error of an output stream that broke off after it began.
    fn broke_off(&self) -> impl Fn(reqwest::Error) -> ApiError + Send + 'static {
        let shown = self.base().1.clone();
        move |e| ApiError::Transport {
            message: format!(
                "the output stream from {shown} broke off: {}",
                explain::innermost(&e)
            ),
            // Whatever broke a started body, a new request may work.
            retryable: true,
        }
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base().0.clone();
        // `new` made sure the base URL can have path segments; each segment
        // is percent-encoded, so an id cannot change the route.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends a request; any non-2xx answer becomes [`ApiError::Status`].
    /// A request that could not be delivered at all (no connection to its
    /// scheduler) goes to each other scheduler in turn, and the first that
    /// takes it is the one used from then on. Only then: a request that
    /// may have arrived (a reset or a timeout after it was sent) is not
    /// sent elsewhere here; starts are sent again by `retry_start`, with
    /// their idempotency key, and followers resume from their offset.
    async fn send(&self, mut req: RequestBuilder) -> Result<Response, ApiError> {
        if let Some(auth) = &self.authorization {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let first = self.current.load(Ordering::Relaxed);
        let mut original = Some(req.build().map_err(|e| {
            let (message, retryable) = explain::transport(&self.base().1, &e);
            ApiError::Transport { message, retryable }
        })?);
        let mut attempt = 0;
        let resp = loop {
            let at = (first + attempt) % self.bases.len();
            let (base, shown) = &self.bases[at];
            // Copied only while another scheduler is left to try (JSON
            // bodies copy; a body that does not gets one try): with one
            // scheduler, the request goes as it was built.
            let copy = if attempt + 1 < self.bases.len() {
                original.as_ref().and_then(reqwest::Request::try_clone)
            } else {
                None
            };
            let final_try = copy.is_none();
            let Some(mut this) = (if final_try { original.take() } else { copy }) else {
                return Err(no_request_left());
            };
            if attempt > 0 {
                *this.url_mut() = self.rebased(this.url(), base);
            }
            match self.client.execute(this).await {
                Ok(resp) => {
                    self.current.store(at, Ordering::Relaxed);
                    break resp;
                }
                Err(e) => {
                    let (message, retryable) = explain::transport(shown, &e);
                    if final_try || !e.is_connect() {
                        return Err(ApiError::Transport { message, retryable });
                    }
                    let next = &self.base_of(at + 1).1;
                    eprintln!("clusterctl: {message}; trying the scheduler at {next}");
                    attempt += 1;
                }
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        // The error body is small; if it cannot be read, the status alone
        // still says what happened.
        let bytes = resp.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice::<ErrorBody>(&bytes).ok();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        let text = match text.char_indices().nth(200) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text.to_owned(),
        };
        Err(ApiError::Status { status, body, text })
    }

    /// `url`, made for one of the schedulers, for the one at `to`.
    fn rebased(&self, url: &Url, to: &Url) -> Url {
        let to = to.as_str().trim_end_matches('/');
        self.bases
            .iter()
            .map(|(from, _)| from.as_str().trim_end_matches('/'))
            // `https://h:1` is not a prefix of `https://h:10/...`.
            .find_map(|from| {
                url.as_str()
                    .strip_prefix(from)
                    .filter(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
            })
            .and_then(|rest| Url::parse(&format!("{to}{rest}")).ok())
            .unwrap_or_else(|| url.clone())
    }

    fn base_of(&self, at: usize) -> &(Url, String) {
        &self.bases[at % self.bases.len()]
    }

    async fn json(&self, what: &str, req: RequestBuilder) -> Result<Value, ApiError> {
        let resp = self.send(req).await?;
        let bytes = resp.bytes().await.map_err(|e| {
            let (message, retryable) = explain::transport(&self.base().1, &e);
            ApiError::Transport { message, retryable }
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
            what: what.to_owned(),
            detail: format!("not JSON: {e}"),
        })
    }

    async fn typed<T: DeserializeOwned>(
        &self,
        what: &str,
        req: RequestBuilder,
    ) -> Result<Answer<T>, ApiError> {
        let raw = self.json(what, req).await?;
        let parsed = parse(what, &raw)?;
        Ok(Answer { raw, parsed })
    }
}

fn parse<T: DeserializeOwned>(what: &str, raw: &Value) -> Result<T, ApiError> {
    T::deserialize(raw).map_err(|e| ApiError::Decode {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

/// `raw[name]`, taken out of an object the caller already parsed.
fn field(mut raw: Value, name: &str) -> Value {
    raw.get_mut(name).map(Value::take).unwrap_or(Value::Null)
}

/// The `Authorization` header for `--token`, marked sensitive so it is
/// never printed.
fn bearer(opts: &ConnectOptions) -> anyhow::Result<Option<HeaderValue>> {
    let Some(token) = &opts.token else {
        return Ok(None);
    };
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        anyhow::anyhow!(
            "the token contains characters not allowed in an HTTP \
             header"
        )
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// The request `send` was given is gone: it cannot be, as the last try
/// takes it and ends the loop.
fn no_request_left() -> ApiError {
    ApiError::Transport {
        message: "internal: no request left to send".into(),
        retryable: false,
    }
}

/// The scheduler URLs of `--scheduler`: one, or several separated by
/// commas (schedulers sharing a store), each with its form for messages.
fn parse_scheduler_urls(given: &str) -> anyhow::Result<Vec<(Url, String)>> {
    let urls = given
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|one| {
            let url = parse_scheduler_url(one)?;
            let shown = url.as_str().trim_end_matches('/').to_owned();
            Ok((url, shown))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if urls.is_empty() || urls.len() > MAX_SCHEDULERS {
        anyhow::bail!(
            "--scheduler / CLUSTERCTL_SCHEDULER {given:?}: give 1 to {MAX_SCHEDULERS} scheduler \
             URLs, separated by commas"
        );
    }
    Ok(urls)
}

/// The scheduler URL; `HOST:PORT` alone means `https://HOST:PORT`;
/// `http://` is for a scheduler in insecure mode.
fn parse_scheduler_url(given: &str) -> anyhow::Result<Url> {
    let with_scheme = if given.contains("://") {
        given.to_owned()
    } else {
        format!("https://{given}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| {
        anyhow::anyhow!(
            "invalid scheduler URL {given:?} (--scheduler / CLUSTERCTL_SCHEDULER): {e}; \
             expected https://HOST:PORT"
        )
    })?;
    if url.scheme() != "https" && url.scheme() != "http" {
        anyhow::bail!(
            "the scheduler URL {given:?} (--scheduler / CLUSTERCTL_SCHEDULER) must start with \
             https:// (or http:// for a scheduler in insecure mode)"
        );
    }
    if url.cannot_be_a_base() || url.host().is_none() {
        anyhow::bail!(
            "invalid scheduler URL {given:?} (--scheduler / CLUSTERCTL_SCHEDULER): expected \
             https://HOST:PORT"
        );
    }
    Ok(url)
}

fn pki_error_path(e: &jobcluster_pki::PkiError) -> Option<&Path> {
    match e {
        jobcluster_pki::PkiError::Io { path, .. } | jobcluster_pki::PkiError::Pem { path, .. } => {
            Some(path)
        }
        _ => None,
    }
}

/// A certificate or key file that cannot be used, named with its flag.
fn file_error(e: jobcluster_pki::PkiError, path: &Path, flag: &str, env: &str) -> anyhow::Error {
    match e {
        jobcluster_pki::PkiError::Io { path, source } => anyhow::anyhow!(
            "cannot read {} ({flag} / {env}): {}",
            path.display(),
            explain::io_reason(&source)
        ),
        jobcluster_pki::PkiError::Pem { path, what } => {
            anyhow::anyhow!("{} ({flag} / {env}): {what}", path.display())
        }
        other => anyhow::anyhow!("{} ({flag} / {env}): {other}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ConnectOptions {
        ConnectOptions {
            scheduler: crate::cli::DEFAULT_SCHEDULER.to_owned(),
            ca: None,
            cert: None,
            key: None,
            token: None,
        }
    }

    #[test]
    fn scheduler_urls() {
        assert_eq!(
            parse_scheduler_url("10.0.0.1:3000").unwrap().as_str(),
            "https://10.0.0.1:3000/"
        );
        let err = parse_scheduler_url("ftp://10.0.0.1:3000").unwrap_err();
        assert!(
            err.to_string().contains("must start with https://"),
            "{err}"
        );
        assert_eq!(
            parse_scheduler_url("http://10.0.0.1:3000")
                .unwrap()
                .scheme(),
            "http"
        );
        assert!(parse_scheduler_url("https://").is_err());
    }

    #[test]
    fn missing_files_name_the_flag() {
        let err = Api::new(&opts()).unwrap_err().to_string();
        assert!(
            err.contains("--ca") && err.contains("CLUSTERCTL_CA"),
            "{err}"
        );

        let dir = std::env::temp_dir().join(format!("clusterctl-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        jobcluster_pki::init_dir(&dir, &[]).unwrap();
        let with_ca = ConnectOptions {
            ca: Some(dir.join("ca.pem")),
            ..opts()
        };
        let err = Api::new(&with_ca).unwrap_err().to_string();
        assert!(err.contains("--cert FILE --key FILE"), "{err}");
        assert!(err.contains("--token"), "{err}");

        let missing_key = ConnectOptions {
            cert: Some(dir.join("client.pem")),
            key: Some(dir.join("nope-key.pem")),
            ..with_ca.clone()
        };
        let err = Api::new(&missing_key).unwrap_err().to_string();
        assert!(
            err.contains("nope-key.pem") && err.contains("--key"),
            "{err}"
        );
        assert!(err.contains("no such file"), "{err}");

        let token_only = ConnectOptions {
            token: Some("secret".into()),
            ..with_ca.clone()
        };
        Api::new(&token_only).unwrap();
        let full = ConnectOptions {
            cert: Some(dir.join("client.pem")),
            key: Some(dir.join("client-key.pem")),
            ..with_ca
        };
        let api = Api::new(&full).unwrap();
        assert_eq!(
            api.url(&["v1", "jobs", "a/b?c", "logs"]).as_str(),
            "https://127.0.0.1:3000/v1/jobs/a%2Fb%3Fc/logs"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn answer(status: StatusCode, code: Option<&str>, job_id: Option<&str>) -> ApiError {
        ApiError::Status {
            status,
            body: code.map(|code| ErrorBody {
                error: format!("error {code}"),
                code: code.into(),
                job_id: job_id.map(str::to_owned),
            }),
            text: String::new(),
        }
    }

    #[test]
    fn starts_are_sent_again_only_after_failures_on_the_way() {
        let retried = |e: ApiError| e.is_retryable_start();
        assert!(retried(ApiError::Transport {
            message: "connection refused".into(),
            retryable: true
        }));
        assert!(!retried(ApiError::Transport {
            message: "unknown CA".into(),
            retryable: false
        }));
        for proxy in [
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
        ] {
            assert!(retried(answer(proxy, None, None)), "{proxy}");
        }
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        assert!(retried(answer(
            unavailable,
            Some("store_unavailable"),
            None
        )));
        assert!(retried(answer(
            StatusCode::CONFLICT,
            Some("idempotency_key_in_use"),
            None
        )));
        assert!(retried(answer(
            StatusCode::GATEWAY_TIMEOUT,
            Some("request_timeout"),
            None
        )));
        // The scheduler answered: another attempt would get the same.
        assert!(!retried(answer(unavailable, Some("worker_down"), None)));
        assert!(!retried(answer(
            StatusCode::BAD_REQUEST,
            Some("unknown_plugin"),
            None
        )));
        // The job exists; its start is in doubt.
        let in_doubt = answer(unavailable, Some("start_unconfirmed"), Some("j1"));
        assert_eq!(in_doubt.job_in_doubt(), Some("j1"));
        assert!(!retried(in_doubt));
    }

    #[tokio::test]
    async fn a_start_is_retried_with_its_pauses_then_gives_up() {
        let no_wait = Retries {
            first: Duration::ZERO,
            times: 3,
        };
        let calls = std::cell::Cell::new(0);
        let refused = || ApiError::Transport {
            message: "refused".into(),
            retryable: true,
        };
        let result = retry_start("the start", &no_wait, || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { if n < 3 { Err(refused()) } else { Ok(n) } }
        })
        .await;
        assert_eq!((result.unwrap(), calls.get()), (3, 3));

        calls.set(0);
        let result: Result<(), _> = retry_start("the start", &no_wait, || {
            calls.set(calls.get() + 1);
            async { Err(refused()) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.get(), 4);

        calls.set(0);
        let result: Result<(), _> = retry_start("the start", &no_wait, || {
            calls.set(calls.get() + 1);
            async {
                Err(answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some("start_unconfirmed"),
                    Some("j1"),
                ))
            }
        })
        .await;
        assert_eq!(result.unwrap_err().job_in_doubt(), Some("j1"));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn status_errors_print_the_error_body() {
        let err = ApiError::Status {
            status: StatusCode::NOT_FOUND,
            body: Some(ErrorBody {
                error: "unknown job 42".into(),
                code: "job_not_found".into(),
                job_id: None,
            }),
            text: String::new(),
        };
        assert_eq!(err.to_string(), "unknown job 42 (job_not_found)");
        assert!(!err.is_retryable());
        let err = ApiError::Status {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: None,
            text: "upstream down".into(),
        };
        assert_eq!(
            err.to_string(),
            "the scheduler answered 503 Service Unavailable: upstream down"
        );
        assert!(err.is_retryable());
    }
}

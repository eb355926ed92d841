//! Every HTTP error as SPEC §6 wants it: a fitting status and
//! `{"error", "code"}`. Worker errors map here, in one place.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jobcluster_proto::http::ErrorBody;
use tonic::Code;

use crate::state::WorkerState;
use crate::store::StoreError;

#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: String,
    pub(crate) message: String,
    /// Set when the answer leaves a job in doubt.
    pub(crate) job_id: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
            job_id: None,
        }
    }

    pub(crate) fn with_job(mut self, job_id: &str) -> Self {
        self.job_id = Some(job_id.to_owned());
        self
    }

    /// The worker did not answer a call in time; until it is heard from
    /// again, calls that need it are refused at once.
    pub(crate) fn worker_unresponsive(worker: &str, since_ms: u64) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "worker_unresponsive",
            format!(
                "worker {worker} has not answered in time since {}; try later or another worker",
                crate::time::rfc3339(since_ms)
            ),
        )
    }

    /// A worker new here whose registration is still being written: a job
    /// or a drain naming its id now could outlive a failed write.
    pub(crate) fn worker_registering(worker: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "worker_unavailable",
            format!(
                "worker {worker} is still registering (its record is being written); try again"
            ),
        )
    }

    pub(crate) fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn job_not_found(job_id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "job_not_found",
            format!("unknown job {job_id}"),
        )
    }

    pub(crate) fn worker_not_found(worker: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "worker_not_found",
            format!("unknown worker {worker:?}"),
        )
    }

    /// A request body over the limit; `announced` is the length the client
    /// declared, when it did.
    pub(crate) fn payload_too_large(announced: Option<u64>) -> Self {
        let limit = super::BODY_LIMIT;
        let message = match announced {
            Some(n) => format!("request body is {n} bytes; the limit is {limit} bytes"),
            None => format!("request body is over the limit of {limit} bytes"),
        };
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// A start whose `args` or `env` are over a bound (`why` names it).
    pub(crate) fn request_too_large(why: String) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", why)
    }

    /// A request body that did not arrive within `limit` of its headers.
    pub(crate) fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s of its headers; the connection is closed",
                limit.as_secs()
            ),
        )
    }

    /// The worker cannot take requests: `down` (no heartbeat) or gone.
    pub(crate) fn worker_not_ready(w: &crate::store::WorkerRow) -> Self {
        let (code, why) = match w.state {
            WorkerState::Down => ("worker_down", "is down (no heartbeat)"),
            WorkerState::Left => ("worker_unavailable", "has left the cluster"),
            WorkerState::Ready => ("worker_unavailable", "is not ready"),
        };
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            format!("worker {} {why}", w.name),
        )
    }

    /// A worker's gRPC error. Workers put the API's code in metadata; a
    /// status without one is a transport failure: the worker is unreachable.
    pub(crate) fn from_worker(status: tonic::Status, worker: &str) -> Self {
        let code = status
            .metadata()
            .get(jobcluster_proto::ERROR_CODE_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let http = match status.code() {
            _ if code.as_deref() == Some("output_expired") => StatusCode::GONE,
            _ if code.as_deref() == Some("worker_storage_full") => StatusCode::INSUFFICIENT_STORAGE,
            _ if code.as_deref() == Some("request_too_large") => StatusCode::PAYLOAD_TOO_LARGE,
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Internal | Code::DataLoss if code.is_some() => StatusCode::BAD_GATEWAY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        match code {
            Some(code) => ApiError {
                status: http,
                code,
                message: status.message().to_owned(),
                job_id: None,
            },
            None => {
                let why = match status.code() {
                    Code::DeadlineExceeded => "did not answer in time".to_owned(),
                    Code::PermissionDenied | Code::Unauthenticated => {
                        format!("refused the scheduler: {}", status.message())
                    }
                    _ => format!("is unreachable: {}", with_causes(&status)),
                };
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "worker_unavailable",
                    format!("worker {worker} {why}"),
                )
            }
        }
    }
}

/// A status's message with the chain of errors behind it ("transport
/// error: tcp connect error: Connection refused"), for an operator.
fn with_causes(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let cause = error.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = error.source();
    }
    text
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if let StoreError::KeyTaken(_) = error {
            // Another request bound the key first (it started, or is
            // starting, the job this request asks for).
            return ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                "another request with this Idempotency-Key started first; retry to get its job",
            );
        }
        tracing::error!(%error, "store failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the scheduler could not use its database: {error}; try again later"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            code: self.code,
            job_id: self.job_id,
        };
        (self.status, Json(body)).into_response()
    }
}

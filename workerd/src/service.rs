//! The Worker gRPC service (SPEC §5): requests in, [`Jobs`] calls, statuses out.

use std::sync::Arc;
use std::time::Duration;

use jobcluster_pki::Role;
use jobcluster_proto::pb::{
    self, QueryJobRequest, QueryJobResponse, StartJobRequest, StartJobResponse, StopJobRequest,
    StopJobResponse, StreamJobRequest, StreamJobResponse, worker_server::Worker,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::job::{self, CHUNK, Job, JobError, JobRecord, Jobs, StartRequest, State};

/// A quiet followed job still sends a message this often, so both ends
/// learn that the stream is alive.
const STREAM_KEEPALIVE: Duration = Duration::from_secs(5);
/// Messages buffered per stream: enough to keep the link busy, small enough
/// that a slow reader holds little memory (at most `STREAM_BUFFER` ×
/// [`CHUNK`], 1 MiB, besides HTTP/2's send buffer).
const STREAM_BUFFER: usize = 4;

#[derive(Debug, Clone)]
pub(crate) struct WorkerService {
    jobs: Arc<Jobs>,
    /// Plaintext mode: there are no certificates to check.
    insecure: bool,
}

impl WorkerService {
    pub(crate) fn new(jobs: Arc<Jobs>, insecure: bool) -> Self {
        WorkerService { jobs, insecure }
    }

    fn authorize<T>(&self, request: &Request<T>, rpc: &str) -> Result<(), Status> {
        if self.insecure {
            return Ok(());
        }
        jobcluster_proto::transport::require_role(request, Role::Scheduler, rpc).map(|_| ())
    }
}

fn status(error: JobError) -> Status {
    let (code, api_code) = match &error {
        JobError::Path(_) => (Code::InvalidArgument, "invalid_path"),
        JobError::UnknownPlugin { .. } => (Code::InvalidArgument, "unknown_plugin"),
        JobError::NoPluginForScript { .. } => (Code::InvalidArgument, "unknown_plugin"),
        JobError::BadJobId(_) => (Code::InvalidArgument, "invalid_job_id"),
        JobError::BadInput { .. } => (Code::InvalidArgument, "invalid_request"),
        JobError::EnvNotAllowed { .. } => (Code::InvalidArgument, "env_not_allowed"),
        JobError::TooLarge(_) => (Code::InvalidArgument, "request_too_large"),
        JobError::UnknownJob(_) => (Code::NotFound, "job_not_found"),
        JobError::Exists(_) => (Code::AlreadyExists, "job_exists"),
        JobError::Starting(_) => (Code::Unavailable, "job_starting"),
        JobError::StorageFull(_) => (Code::ResourceExhausted, "worker_storage_full"),
        JobError::ShuttingDown => (Code::Unavailable, "worker_unavailable"),
        JobError::Busy(_) => (Code::ResourceExhausted, "worker_busy"),
        JobError::OffsetPastEnd { .. } => (Code::OutOfRange, "offset_out_of_range"),
        JobError::OutputExpired(_) => (Code::FailedPrecondition, "output_expired"),
        JobError::Io(_) => (Code::Internal, "worker_storage"),
    };
    if code == Code::Internal {
        tracing::error!(%error, "request failed");
    }
    let mut status = Status::new(code, error.to_string());
    if let Ok(value) = api_code.parse() {
        status
            .metadata_mut()
            .insert(jobcluster_proto::ERROR_CODE_METADATA, value);
    }
    status
}

pub(crate) fn to_pb_state(state: State) -> pb::JobState {
    match state {
        State::Running => pb::JobState::Running,
        State::Succeeded => pb::JobState::Succeeded,
        State::Failed => pb::JobState::Failed,
        State::Stopped => pb::JobState::Stopped,
        State::Lost => pb::JobState::Lost,
    }
}

pub(crate) fn to_pb_status(r: &JobRecord, output_bytes: u64) -> QueryJobResponse {
    QueryJobResponse {
        done: r.state.is_done(),
        error: matches!(r.state, State::Failed | State::Lost),
        error_text: r.error_text.clone(),
        state: to_pb_state(r.state) as i32,
        exit_code: r.exit_code,
        signal: r.signal,
        created_at_ms: r.created_at_ms,
        started_at_ms: r.started_at_ms,
        finished_at_ms: r.finished_at_ms,
        output_bytes,
        job_id: r.id.to_string(),
        command: r.command.clone(),
        path: r.path.clone(),
        args: r.args.clone(),
        output_expired: r.output_expired,
    }
}

fn job_status(job: &Job) -> QueryJobResponse {
    let (len, _) = job.progress_now();
    to_pb_status(&job.record(), len)
}

pub(crate) type StreamItem = Result<StreamJobResponse, Status>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn start_job(
        &self,
        request: Request<StartJobRequest>,
    ) -> Result<Response<StartJobResponse>, Status> {
        self.authorize(&request, "StartJob")?;
        let r = request.into_inner();
        let record = self
            .jobs
            .start(StartRequest {
                job_id: r.job_id,
                command: r.command,
                path: r.path,
                args: r.args,
                env: r.env.into_iter().collect(),
            })
            .await
            .map_err(status)?;
        Ok(Response::new(StartJobResponse {
            job_id: record.id.to_string(),
            status: Some(to_pb_status(&record, 0)),
        }))
    }

    async fn stop_job(
        &self,
        request: Request<StopJobRequest>,
    ) -> Result<Response<StopJobResponse>, Status> {
        self.authorize(&request, "StopJob")?;
        let record = self
            .jobs
            .stop(&request.get_ref().job_id)
            .await
            .map_err(status)?;
        Ok(Response::new(StopJobResponse {
            state: to_pb_state(record.state) as i32,
        }))
    }

    async fn query_job(
        &self,
        request: Request<QueryJobRequest>,
    ) -> Result<Response<QueryJobResponse>, Status> {
        self.authorize(&request, "QueryJob")?;
        let job = self
            .jobs
            .get(&request.get_ref().job_id)
            .await
            .map_err(status)?;
        Ok(Response::new(job_status(&job)))
    }

    type StreamJobStream = ReceiverStream<StreamItem>;

    async fn stream_job(
        &self,
        request: Request<StreamJobRequest>,
    ) -> Result<Response<Self::StreamJobStream>, Status> {
        self.authorize(&request, "StreamJob")?;
        let r = request.into_inner();
        let job = self.jobs.get(&r.job_id).await.map_err(status)?;
        let follow = r.follow.unwrap_or(true);
        let record = job.record();
        if record.output_expired {
            return Err(status(JobError::OutputExpired(record.id)));
        }
        let path = job.log_path().to_owned();
        let file = tokio::task::spawn_blocking(move || {
            let file = job::open_log(&path)?;
            let len = file.metadata()?.len();
            Ok::<_, std::io::Error>((file, len))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let file = match file {
            Ok((_, len)) if job::output_cut(&record, len) => {
                return Err(status(JobError::OutputExpired(record.id)));
            }
            Ok((file, _)) => file,
            Err(e) => return Err(status(JobError::Io(e))),
        };
        let (len, done) = job.progress_now();
        if done && r.offset > len {
            return Err(status(JobError::OffsetPastEnd {
                offset: r.offset,
                len,
            }));
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(send_output(job, Arc::new(file), r.offset, follow, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends the log from `offset`: everything written so far, then (when
/// following) each new piece as the pump publishes it, then the final
/// status once the job is done and every byte was sent.
async fn send_output(
    job: Arc<Job>,
    file: Arc<std::fs::File>,
    offset: u64,
    follow: bool,
    tx: mpsc::Sender<StreamItem>,
) {
    let _follower = crate::metrics::Follower::open();
    let mut progress = job.progress();
    let mut pos = offset;
    loop {
        let (len, done) = {
            let now = progress.borrow_and_update();
            (now.len, now.done)
        };
        while pos < len {
            let want = usize::try_from(len - pos).unwrap_or(CHUNK).min(CHUNK);
            // A follower that keeps up copies from the pump's last piece;
            // one that is behind reads the log. (The latest piece: the log
            // only grows, so anything in it up to `want` is published.)
            let piece = progress.borrow().tail_at(pos, want);
            let from_memory = piece.is_some();
            let read = match piece {
                Some(piece) => Ok(bytes::Bytes::copy_from_slice(&piece)),
                None => job::read_at(file.clone(), pos, want).await,
            };
            let chunk = match read {
                Ok(chunk) if !chunk.is_empty() => chunk,
                Ok(_) => {
                    let _ = tx
                        .send(Err(Status::data_loss(
                            "output log is shorter than recorded",
                        )))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(status(JobError::Io(e)))).await;
                    return;
                }
            };
            let n = chunk.len() as u64;
            let message = StreamJobResponse {
                output: chunk,
                offset: pos,
                final_status: None,
            };
            if tx.send(Ok(message)).await.is_err() {
                return; // the reader left
            }
            crate::metrics::output_streamed(n as usize);
            if from_memory {
                crate::metrics::output_from_memory(n as usize);
            }
            pos += n;
        }
        if done {
            let message = StreamJobResponse {
                output: Default::default(),
                offset: pos,
                final_status: Some(job_status(&job)),
            };
            let _ = tx.send(Ok(message)).await;
            return;
        }
        if !follow {
            return;
        }
        tokio::select! {
            changed = progress.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(STREAM_KEEPALIVE) => {
                let keepalive = StreamJobResponse { output: Default::default(), offset: pos, final_status: None };
                if tx.send(Ok(keepalive)).await.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
        }
    }
}

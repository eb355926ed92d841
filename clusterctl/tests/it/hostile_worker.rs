//! A worker that says what no workerd says, against the real scheduler:
//! output streams past the bounds of `schedulerd`'s `output_stream`
//! (docs/SECURITY.md, §7, "a worker's output stream as the scheduler
//! reads it"), a job's end contradicted after the API reported it, and a
//! group member's stream that breaks.
//! The worker runs in the test process, registered in insecure mode (the
//! scheduler's checks are the same with TLS: only the channel differs),
//! and runs no processes.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::StreamBody;
use jobcluster_proto::pb::{
    HeartbeatRequest, HeartbeatResponse, JobState, PluginInfo, QueryJobRequest, QueryJobResponse,
    RegisterWorkerRequest, RegisterWorkerResponse, StartJobRequest, StartJobResponse,
    StopJobRequest, StopJobResponse, StreamJobRequest, StreamJobResponse,
};
use jobcluster_proto::transport::grpc_prefix;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, http};

use crate::fake_grpc::{
    Routes, Served, call_scheduler, insecure_scheduler, plain_clusterctl, plain_http, unary,
};

use crate::cluster::{get_json, status_kib};
use crate::harness::Daemon;
use crate::harness::eventually;

/// How the worker answers a `StreamJob` request: the gRPC response body's
/// DATA frames, then its `grpc-status`.
type Answer = Arc<dyn Fn(&StreamJobRequest) -> (Vec<Bytes>, &'static str) + Send + Sync>;

#[derive(Clone)]
struct HostileWorker {
    jobs: Arc<Mutex<HashMap<String, QueryJobResponse>>>,
    stream: Answer,
    /// The instance it registered as.
    instance_id: String,
    /// QueryJob calls answered.
    queries: Arc<AtomicUsize>,
    /// Refusals of the next StartJob calls, in turn: each held for its
    /// pause, then refused with its code; once they run out, starts
    /// succeed.
    refusals: Arc<Mutex<VecDeque<(Duration, &'static str)>>>,
    /// StartJob calls received.
    starts: Arc<AtomicUsize>,
}

impl HostileWorker {
    /// A worker that starts every job and answers `StreamJob` with `stream`.
    fn new(stream: Answer) -> Self {
        HostileWorker {
            jobs: Arc::default(),
            stream,
            instance_id: uuid::Uuid::new_v4().to_string(),
            queries: Arc::default(),
            refusals: Arc::default(),
            starts: Arc::default(),
        }
    }
}

impl Routes for HostileWorker {
    fn route(&self, request: http::Request<Body>) -> BoxFuture<http::Response<Body>, Infallible> {
        let this = self.clone();
        Box::pin(async move {
            let jobs = this.jobs.clone();
            let path = request.uri().path().to_owned();
            let refusal = match path.as_str() {
                "/jobscheduler.Worker/StartJob" => this.refusals.lock().unwrap().pop_front(),
                _ => None,
            };
            let response = match path.as_str() {
                "/jobscheduler.Worker/StartJob" if let Some((pause, code)) = refusal => {
                    this.starts.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(pause).await;
                    unary(
                        request,
                        move |_: StartJobRequest| -> Result<StartJobResponse, _> {
                            let mut refused = match code {
                                "worker_busy" => Status::resource_exhausted("every slot is taken"),
                                _ => Status::unavailable(code),
                            };
                            refused.metadata_mut().insert(
                                jobcluster_proto::ERROR_CODE_METADATA,
                                tonic::metadata::MetadataValue::from_static(code),
                            );
                            Err(refused)
                        },
                    )
                    .await
                }
                "/jobscheduler.Worker/StopJob" => {
                    unary(request, move |r: StopJobRequest| {
                        match jobs.lock().unwrap().contains_key(&r.job_id) {
                            true => Ok(StopJobResponse::default()),
                            false => Err(Status::not_found("unknown job")),
                        }
                    })
                    .await
                }
                "/jobscheduler.Worker/StartJob" => {
                    this.starts.fetch_add(1, Ordering::SeqCst);
                    unary(request, move |r: StartJobRequest| {
                        let status = QueryJobResponse {
                            state: JobState::Running as i32,
                            job_id: r.job_id.clone(),
                            command: r.command,
                            path: r.path,
                            created_at_ms: 1,
                            started_at_ms: 1,
                            ..Default::default()
                        };
                        jobs.lock()
                            .unwrap()
                            .insert(r.job_id.clone(), status.clone());
                        Ok(StartJobResponse {
                            job_id: r.job_id,
                            status: Some(status),
                        })
                    })
                    .await
                }
                "/jobscheduler.Worker/QueryJob" => {
                    this.queries.fetch_add(1, Ordering::SeqCst);
                    unary(request, move |r: QueryJobRequest| {
                        jobs.lock()
                            .unwrap()
                            .get(&r.job_id)
                            .cloned()
                            .ok_or_else(|| Status::not_found("unknown job"))
                    })
                    .await
                }
                "/jobscheduler.Worker/StreamJob" => {
                    // One message: its 5-byte prefix, then the request.
                    let body = http_body_util::BodyExt::collect(request.into_body())
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let asked = StreamJobRequest::decode(body.get(5..).unwrap_or_default())
                        .unwrap_or_default();
                    let (frames, status) = (this.stream)(&asked);
                    let frames = frames.into_iter().map(|b| Ok(Frame::data(b)));
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static(status));
                    let frames =
                        frames.chain(std::iter::once(Ok::<_, Status>(Frame::trailers(trailers))));
                    let body = Body::new(StreamBody::new(tokio_stream::iter(frames)));
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)
                        .unwrap()
                }
                _ => Status::unimplemented("").into_http(),
            };
            Ok(response)
        })
    }
}

/// One gRPC message: its 5-byte prefix and the message.
fn grpc_message(message: &[u8]) -> Vec<u8> {
    [&grpc_prefix(message.len()).unwrap()[..], message].concat()
}

/// A scheduler in insecure mode and the hostile worker registered with it
/// as `hostile`, which answers `StreamJob` with `stream`'s frames; the
/// worker is served until its [`Served`] is dropped.
async fn cluster_with(stream: Answer) -> Hosted {
    cluster_of(HostileWorker::new(stream)).await
}

/// The scheduler, its directory, the worker as served, an HTTP client and
/// the scheduler's API URL.
type Hosted = (
    Daemon,
    tempfile::TempDir,
    Served<HostileWorker>,
    reqwest::Client,
    String,
);

/// [`cluster_with`] with the worker given.
async fn cluster_of(worker: HostileWorker) -> Hosted {
    let (scheduler, tmp) = insecure_scheduler(
        "heartbeat_interval = \"10s\"\ndown_after = \"60s\"\nlost_after = \"120s\"\n",
    );
    let worker = Served::start(worker).await;
    let registered = register(&scheduler, &worker, Vec::new()).await;
    assert!(registered.success);
    let http = plain_http();
    let url = format!("http://{}", scheduler.addrs["http"]);
    (scheduler, tmp, worker, http, url)
}

/// Registers `worker` as `hostile` (again: the same instance), with the
/// jobs it reports.
async fn register(
    scheduler: &Daemon,
    worker: &Served<HostileWorker>,
    jobs: Vec<QueryJobResponse>,
) -> RegisterWorkerResponse {
    call_scheduler(
        &scheduler.addrs["grpc"],
        "/jobscheduler.Scheduler/RegisterWorker",
        RegisterWorkerRequest {
            address: worker.addr.to_string(),
            name: "hostile".into(),
            plugins: vec!["bash".into()],
            plugin_info: vec![PluginInfo {
                name: "bash".into(),
                extensions: vec!["sh".into()],
            }],
            instance_id: worker.worker.instance_id.clone(),
            jobs,
            ..Default::default()
        },
    )
    .await
}

/// Whether the daemon's log shows `what` within seconds: the harness
/// reads its output on a thread of its own, which may lag.
async fn logs_soon(daemon: &Daemon, what: &str) -> bool {
    eventually(Duration::from_secs(5), || daemon.log().contains(what)).await
}

/// `POST /v1/jobs` of a job named to the hostile worker: the answer.
async fn post_start(http: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let reply = http
        .post(format!("{url}/v1/jobs"))
        .json(&json!({"worker_id": "hostile", "path": "count.sh"}))
        .send()
        .await
        .unwrap();
    (reply.status(), reply.json().await.unwrap())
}

/// `GET /v1/jobs/{job}`'s answer.
async fn job_json(http: &reqwest::Client, url: &str, job: &str) -> Value {
    get_json(http, &format!("{url}/v1/jobs/{job}")).await
}

/// Starts a job on the hostile worker; its id.
async fn start(http: &reqwest::Client, url: &str) -> String {
    let (status, body) = post_start(http, url).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["job_id"].as_str().unwrap().to_owned()
}

/// A worker's message cut into many DATA frames reaches the reader whole
/// and in order (the scheduler copies frames under 16 KiB instead of
/// holding each, so small frames cost it copies, not memory). A flood of
/// one-byte frames costs the scheduler no memory either: it reads them
/// all, or, if it falls behind, its HTTP/2 sends the worker away (h2
/// allows frames under 256 bytes received and not yet read up to half the
/// connection's window; then `GOAWAY` `ENHANCE_YOUR_CALM`) and the
/// reader's stream is cut. Either way it goes on serving that worker.
#[tokio::test(flavor = "multi_thread")]
async fn output_in_small_frames_arrives_whole_and_a_flood_of_tiny_ones_costs_nothing() {
    let output: Vec<u8> = (0..60_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let message = grpc_message(
        &StreamJobResponse {
            output: output.clone().into(),
            offset: 0,
            final_status: None,
        }
        .encode_to_vec(),
    );
    let frame_size = Arc::new(AtomicUsize::new(300));
    let stream: Answer = Arc::new({
        let frame_size = frame_size.clone();
        move |_: &StreamJobRequest| {
            let frames = message
                .chunks(frame_size.load(Ordering::SeqCst))
                .map(Bytes::copy_from_slice)
                .collect();
            (frames, "0")
        }
    });
    let (scheduler, _tmp, _worker, http, url) = cluster_with(stream).await;
    let job = start(&http, &url).await;
    let logs = || async {
        http.get(format!("{url}/v1/jobs/{job}/logs"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .bytes()
            .await
            .map_err(|e| e.to_string())
    };

    // 200 frames of 300 bytes.
    let got = logs()
        .await
        .unwrap_or_else(|e| panic!("{e}:\n{}", scheduler.log()));
    assert!(
        got[..] == output[..],
        "{} bytes back of {}",
        got.len(),
        output.len()
    );

    // 60,005 frames of one byte, as fast as the worker can send them.
    frame_size.store(1, Ordering::SeqCst);
    let pid = scheduler.child.id();
    let before = status_kib(pid, "VmHWM");
    match logs().await {
        Ok(got) => assert!(got[..] == output[..], "{} bytes back", got.len()),
        Err(error) => assert!(
            logs_soon(&scheduler, "too_many_data_frames").await,
            "cut ({error}) for another reason:\n{}",
            scheduler.log()
        ),
    }
    let grew = status_kib(pid, "VmHWM").saturating_sub(before);
    assert!(grew < 16 * 1024, "the scheduler's peak grew by {grew} KiB");

    // The worker's next connection is served as before.
    frame_size.store(16 * 1024, Ordering::SeqCst);
    let got = logs()
        .await
        .unwrap_or_else(|e| panic!("{e}:\n{}", scheduler.log()));
    assert!(got[..] == output[..], "{} bytes back", got.len());
}

/// A message longer than the scheduler reads (4 MiB) cuts the reader's
/// stream, as a broken stream does, instead of being buffered; the
/// scheduler's memory does not take it in, and it goes on serving.
#[tokio::test(flavor = "multi_thread")]
async fn an_output_message_past_four_mib_cuts_the_stream_unread() {
    const DECLARED: usize = 64 * 1024 * 1024;
    // The prefix says 64 MiB; 32 MiB of it follow, in 512 KiB frames, as
    // fast as the scheduler's flow control lets them: one that read on
    // would take them all in.
    let stream: Answer = Arc::new(|_: &StreamJobRequest| {
        let mut frames = vec![Bytes::from(grpc_prefix(DECLARED).unwrap().to_vec())];
        frames.extend((0..64).map(|_| Bytes::from(vec![7u8; 512 * 1024])));
        (frames, "0")
    });
    let (scheduler, _tmp, _worker, http, url) = cluster_with(stream).await;
    let pid = scheduler.child.id();
    let before = status_kib(pid, "VmHWM");
    let job = start(&http, &url).await;
    // Cut before its first byte: the answer's head may not have gone out
    // either (HTTP/1.1 sends it with the first chunk).
    let body = match http.get(format!("{url}/v1/jobs/{job}/logs")).send().await {
        Ok(reply) => reply.bytes().await.map(|b| b.len()),
        Err(e) => Err(e),
    };
    assert!(body.is_err(), "the stream ended cleanly: {body:?}");
    let grew = status_kib(pid, "VmHWM").saturating_sub(before);
    assert!(grew < 16 * 1024, "the scheduler's peak grew by {grew} KiB");
    // Still serving: the job's record.
    let shown = http
        .get(format!("{url}/v1/jobs/{job}"))
        .send()
        .await
        .unwrap();
    assert_eq!(shown.status(), StatusCode::OK, "{}", scheduler.log());
    assert!(
        logs_soon(&scheduler, "over the limit of 4194304").await,
        "the scheduler says why:\n{}",
        scheduler.log()
    );
}

/// A job's end, once the API has said it, stays as said, whatever its
/// worker says afterwards, in a registration (as after a lost
/// connection) or in a heartbeat; the API answers for an ended job from
/// its record without asking the worker again.
#[tokio::test(flavor = "multi_thread")]
async fn a_reported_end_stays_whatever_the_worker_says_later() {
    let ended = |job_id: &str, state: JobState, exit_code: i32| QueryJobResponse {
        done: true,
        state: state as i32,
        exit_code: Some(exit_code),
        job_id: job_id.to_owned(),
        created_at_ms: 1,
        started_at_ms: 1,
        finished_at_ms: 2,
        output_bytes: 3,
        ..Default::default()
    };
    // The job's id is known only once it starts: the stream reads it then.
    let job_id = Arc::new(Mutex::new(String::new()));
    let stream: Answer = Arc::new({
        let job_id = job_id.clone();
        move |_: &StreamJobRequest| {
            let id = job_id.lock().unwrap().clone();
            let message = StreamJobResponse {
                output: Bytes::from_static(b"hi\n"),
                offset: 0,
                final_status: Some(ended(&id, JobState::Succeeded, 0)),
            };
            (
                vec![Bytes::from(grpc_message(&message.encode_to_vec()))],
                "0",
            )
        }
    });
    let (scheduler, _tmp, worker, http, url) = cluster_with(stream).await;
    let job = start(&http, &url).await;
    *job_id.lock().unwrap() = job.clone();
    let state = || async {
        let reply = http.get(format!("{url}/v1/jobs/{job}")).send().await;
        let shown: Value = reply.unwrap().json().await.unwrap();
        (shown["state"].clone(), shown["exit_code"].clone())
    };

    // Followed to its end: the stream's last message says it succeeded.
    let reply = http
        .get(format!("{url}/v1/jobs/{job}/logs?follow=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(&reply.bytes().await.unwrap()[..], b"hi\n");
    assert_eq!(state().await, (json!("succeeded"), json!(0)));

    // The worker now says it failed, every way it can.
    let failed = ended(&job, JobState::Failed, 3);
    worker
        .worker
        .jobs
        .lock()
        .unwrap()
        .insert(job.clone(), failed.clone());
    let asked = worker.worker.queries.load(Ordering::SeqCst);
    assert_eq!(state().await, (json!("succeeded"), json!(0)));
    assert_eq!(
        worker.worker.queries.load(Ordering::SeqCst),
        asked,
        "the worker was asked about an ended job"
    );
    // Registered again, as after a lost connection, with its jobs.
    let registered = register(&scheduler, &worker, vec![failed.clone()]).await;
    assert!(registered.success);
    let _: HeartbeatResponse = call_scheduler(
        &scheduler.addrs["grpc"],
        "/jobscheduler.Scheduler/Heartbeat",
        HeartbeatRequest {
            worker_id: registered.worker_id,
            instance_id: worker.worker.instance_id.clone(),
            jobs: vec![failed],
        },
    )
    .await;
    assert_eq!(
        state().await,
        (json!("succeeded"), json!(0)),
        "after a registration and a heartbeat:\n{}",
        scheduler.log()
    );
    // Both reports were read, and said to disagree.
    let disagreements = || {
        scheduler
            .log()
            .matches("a report disagrees with the job's final state; the final state stays")
            .count()
    };
    eventually(Duration::from_secs(5), || disagreements() >= 2).await;
    let log = scheduler.log();
    assert_eq!(
        log.matches("a report disagrees with the job's final state; the final state stays")
            .count(),
        2,
        "{log}"
    );
}

/// A group's output read without following (`logs GROUP`) whose member's
/// stream breaks is read on from the byte where it broke, still without
/// following: a reader of what there is now is not held until the job
/// ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_read_whose_member_stream_breaks_reads_on_without_following() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let stream: Answer = Arc::new({
        let asked = asked.clone();
        move |request: &StreamJobRequest| {
            let mut asked = asked.lock().unwrap();
            asked.push((request.offset, request.follow));
            // The first stream breaks (UNAVAILABLE) after two lines; the
            // second has the rest so far, and the job runs on.
            let (output, status): (&'static [u8], _) = match asked.len() {
                1 => (b"one\ntwo\n", "14"),
                _ => (b"three\n", "0"),
            };
            let message = StreamJobResponse {
                output: Bytes::from_static(output),
                offset: request.offset,
                final_status: None,
            };
            (
                vec![Bytes::from(grpc_message(&message.encode_to_vec()))],
                status,
            )
        }
    });
    let (_scheduler, _tmp, _worker, http, url) = cluster_with(stream).await;
    let reply = http
        .post(format!("{url}/v1/groups"))
        .json(&json!({"all": true, "path": "count.sh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    let started: Value = reply.json().await.unwrap();
    let group = started["group_id"].as_str().unwrap();
    let text = tokio::time::timeout(Duration::from_secs(20), async {
        http.get(format!("{url}/v1/groups/{group}/logs"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
    .await
    .expect("a read of a group's output without follow never ended");
    assert_eq!(text, "[hostile] one\n[hostile] two\n[hostile] three\n");
    assert_eq!(*asked.lock().unwrap(), [(0, Some(false)), (8, Some(false))]);
}

/// A stop that reaches a queued job while the dispatcher is starting it
/// (taken from the queue, its worker's answer awaited) is answered `503
/// job_starting` rather than given up on; `clusterctl stop` asks again
/// until the worker's refusal (busy) has put the job back in the queue,
/// and the job ends `stopped`, never started.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_while_a_queued_job_is_being_dispatched_ends_it_stopped() {
    let busy = HostileWorker::new(Arc::new(|_: &StreamJobRequest| (Vec::new(), "0")));
    busy.refusals
        .lock()
        .unwrap()
        .extend([(Duration::from_millis(1500), "worker_busy"); 100]);
    let starts = busy.starts.clone();
    let (_scheduler, _tmp, _worker, http, url) = cluster_of(busy).await;
    let (status, queued) = post_start(&http, &url).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let job = queued["job_id"].as_str().unwrap().to_owned();
    // The dispatcher takes it; the worker holds its answer.
    assert!(
        eventually(Duration::from_secs(20), || starts.load(Ordering::SeqCst)
            >= 2)
        .await
    );
    let stop = http
        .post(format!("{url}/v1/jobs/{job}/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), StatusCode::SERVICE_UNAVAILABLE);
    let refused: Value = stop.json().await.unwrap();
    assert_eq!(refused["code"], "job_starting", "{refused}");
    let out = plain_clusterctl(&url)
        .args(["stop", &job])
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let shown = job_json(&http, &url, &job).await;
    assert_eq!(shown["state"], "stopped", "{shown}");
    assert!(shown["started_at"].is_null(), "{shown}");
}

/// A dispatch its worker answers `job_starting` (a start of the same job
/// still under way there, as after a restart or a leader change) keeps the
/// job's place: the next pass asks again and the job runs, where it was
/// left with no start, `unknown` until given up as lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_dispatch_met_by_a_start_under_way_is_asked_again() {
    let worker = HostileWorker::new(Arc::new(|_: &StreamJobRequest| (Vec::new(), "0")));
    worker.refusals.lock().unwrap().extend([
        (Duration::ZERO, "worker_busy"),
        (Duration::ZERO, "job_starting"),
    ]);
    let starts = worker.starts.clone();
    let (_scheduler, _tmp, _worker, http, url) = cluster_of(worker).await;
    let (status, queued) = post_start(&http, &url).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let job = queued["job_id"].as_str().unwrap().to_owned();
    let mut state = Value::Null;
    for _ in 0..100 {
        state = job_json(&http, &url, &job).await["state"].clone();
        if state == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "running");
    assert_eq!(starts.load(Ordering::SeqCst), 3, "busy, starting, started");
}

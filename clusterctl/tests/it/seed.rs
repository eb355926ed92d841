//! A worker of the original design joins a scheduler in insecure mode.
//!
//! The worker here speaks only the original contract: hand-written prost
//! messages with the original field numbers (1-3), a registration that
//! carries just its address, no heartbeats, and job ids of its own. It
//! runs in the test process and runs no processes: the test says how each
//! of its jobs ends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobcluster_proto::http::WorkerInfo;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, http};

use crate::cluster::{stderr, stdout};
use crate::fake_grpc::{
    Routes, Served, call_scheduler, insecure_scheduler, plain_clusterctl, plain_http, unary,
};

#[derive(Clone, PartialEq, prost::Message)]
struct RegisterReq {
    #[prost(string, tag = "1")]
    address: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RegisterRes {
    #[prost(bool, tag = "1")]
    success: bool,
    #[prost(string, tag = "2")]
    worker_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StartJobReq {
    #[prost(string, tag = "1")]
    command: String,
    #[prost(string, tag = "2")]
    path: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StartJobRes {
    #[prost(string, tag = "1")]
    job_id: String,
}

/// `StopJobReq` and `QueryJobReq` alike.
#[derive(Clone, PartialEq, prost::Message)]
struct JobReq {
    #[prost(string, tag = "1")]
    job_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StopJobRes {}

#[derive(Clone, PartialEq, prost::Message)]
struct QueryJobRes {
    #[prost(bool, tag = "1")]
    done: bool,
    #[prost(bool, tag = "2")]
    error: bool,
    #[prost(string, tag = "3")]
    error_text: String,
}

#[derive(Default)]
struct SeedState {
    /// By the worker's own job id: done, error, error text.
    jobs: HashMap<String, QueryJobRes>,
    /// Every StartJob as it arrived: command, path.
    starts: Vec<(String, String)>,
    /// Job ids the scheduler asked about that the worker does not know.
    unknown_queries: Vec<String>,
}

/// The original worker's gRPC service, routed by hand.
#[derive(Clone, Default)]
struct SeedWorker(Arc<Mutex<SeedState>>);

impl Routes for SeedWorker {
    fn route(&self, request: http::Request<Body>) -> BoxFuture<http::Response<Body>, Infallible> {
        let state = self.0.clone();
        Box::pin(async move {
            let response = match request.uri().path() {
                "/jobscheduler.Worker/StartJob" => {
                    unary(request, move |r: StartJobReq| {
                        let mut s = state.lock().unwrap();
                        s.starts.push((r.command.clone(), r.path.clone()));
                        if r.command == "nope" {
                            // What Go's exec says when the command is missing.
                            return Err(Status::unknown(
                                "exec: \"nope\": executable file not found in $PATH",
                            ));
                        }
                        let job_id = uuid::Uuid::new_v4().to_string();
                        s.jobs.insert(job_id.clone(), QueryJobRes::default());
                        Ok(StartJobRes { job_id })
                    })
                    .await
                }
                "/jobscheduler.Worker/StopJob" => {
                    unary(request, move |r: JobReq| {
                        let mut s = state.lock().unwrap();
                        let job = s
                            .jobs
                            .get_mut(&r.job_id)
                            .ok_or_else(|| Status::unknown("job not found"))?;
                        if !job.done {
                            *job = QueryJobRes {
                                done: true,
                                error: true,
                                error_text: "signal: killed".into(),
                            };
                        }
                        Ok(StopJobRes {})
                    })
                    .await
                }
                "/jobscheduler.Worker/QueryJob" => {
                    unary(request, move |r: JobReq| {
                        let mut s = state.lock().unwrap();
                        match s.jobs.get(&r.job_id) {
                            Some(job) => Ok(job.clone()),
                            None => {
                                s.unknown_queries.push(r.job_id);
                                Err(Status::unknown("job not found"))
                            }
                        }
                    })
                    .await
                }
                // The original worker has no StreamJob.
                _ => Status::unimplemented("").into_http(),
            };
            Ok(response)
        })
    }
}

impl SeedWorker {
    fn finish(&self, job_id: &str, error: Option<&str>) {
        let mut s = self.0.lock().unwrap();
        let job = s.jobs.get_mut(job_id).expect("a job of this worker");
        *job = QueryJobRes {
            done: true,
            error: error.is_some(),
            error_text: error.unwrap_or_default().to_owned(),
        };
    }

    fn starts(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().starts.clone()
    }

    fn job_ids(&self) -> Vec<String> {
        self.0.lock().unwrap().jobs.keys().cloned().collect()
    }

    fn unknown_queries(&self) -> Vec<String> {
        self.0.lock().unwrap().unknown_queries.clone()
    }
}

/// The original worker's registration: its address and nothing else.
async fn register(scheduler: &str, address: &str) -> RegisterRes {
    call_scheduler(
        scheduler,
        "/jobscheduler.Scheduler/RegisterWorker",
        RegisterReq {
            address: address.to_owned(),
        },
    )
    .await
}

struct Api {
    url: String,
    http: reqwest::Client,
}

impl Api {
    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let reply = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = reply.status();
        (status, reply.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let reply = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = reply.status();
        (status, reply.json().await.unwrap_or(Value::Null))
    }

    async fn worker(&self, name: &str) -> WorkerInfo {
        let (status, body) = self.get(&format!("/v1/workers/{name}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).unwrap()
    }
}

const DOWN_AFTER: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_of_the_original_design_joins_runs_jobs_by_its_own_ids_and_goes_down_when_killed()
{
    let (scheduler, _tmp) = insecure_scheduler(&format!(
        "heartbeat_interval = \"250ms\"\ndown_after = \"{}ms\"\nlost_after = \"60s\"\n",
        DOWN_AFTER.as_millis()
    ));
    let api = Api {
        url: format!("http://{}", scheduler.addrs["http"]),
        http: plain_http(),
    };
    let mut seed = Served::start(SeedWorker::default()).await;
    let registered = register(&scheduler.addrs["grpc"], &seed.addr.to_string()).await;
    assert!(registered.success);
    let worker_id = registered.worker_id;

    // Named after its address; no plugins.
    let name = format!("seed-127.0.0.1-{}", seed.addr.port());
    let info = api.worker(&name).await;
    assert_eq!(
        (info.worker_id.as_str(), info.state.as_str()),
        (worker_id.as_str(), "ready")
    );
    assert!(info.plugins.is_empty());

    // It never heartbeats, yet stays ready well past down_after: the
    // scheduler's checks (queries about a job id that names nothing) stand
    // in for its heartbeats.
    tokio::time::sleep(DOWN_AFTER * 2).await;
    assert_eq!(
        api.worker(&worker_id).await.state,
        "ready",
        "{}",
        scheduler.log()
    );
    let checks = seed.worker.unknown_queries();
    assert!(checks.len() >= 4, "{checks:?}");
    assert!(
        checks
            .iter()
            .all(|id| id == "00000000-0000-0000-0000-000000000000")
    );

    // The original start, with a field the original API would have
    // ignored: the command goes to the worker as it is, and the job's id
    // is the one the worker chose.
    let (status, started) = api
        .post(
            "/start",
            &json!({"worker_id": worker_id, "command": "bash", "path": "count.sh", "timeout": 30}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    let job = started["job_id"].as_str().unwrap().to_owned();
    assert_eq!(seed.worker.job_ids(), std::slice::from_ref(&job));
    assert_eq!(
        seed.worker.starts(),
        [("bash".to_owned(), "count.sh".to_owned())]
    );

    let query = |job: &str| json!({"worker_id": worker_id, "job_id": job, "verbose": true});
    let (status, answer) = api.post("/query", &query(&job)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        (&answer["done"], &answer["error"], &answer["state"]),
        (&json!(false), &json!(false), &json!("running"))
    );
    // /v1 and clusterctl take the worker's id too.
    let (status, shown) = api.get(&format!("/v1/jobs/{job}")).await;
    assert_eq!(
        (status, &shown["state"]),
        (StatusCode::OK, &json!("running"))
    );
    let out = plain_clusterctl(&api.url)
        .args(["-o", "json", "status", &job])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&job), "{}", stdout(&out));

    seed.worker.finish(&job, Some("exit status 3"));
    let (_, answer) = api.post("/query", &query(&job)).await;
    assert_eq!(
        (
            &answer["done"],
            &answer["error"],
            &answer["error_text"],
            &answer["state"]
        ),
        (
            &json!(true),
            &json!(true),
            &json!("exit status 3"),
            &json!("failed")
        )
    );

    // Named by its derived name this time; it succeeds.
    let (status, started) = api
        .post(
            "/start",
            &json!({"worker_id": name, "command": "python3", "path": "count.py"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    let job = started["job_id"].as_str().unwrap().to_owned();
    seed.worker.finish(&job, None);
    let (_, answer) = api.post("/query", &query(&job)).await;
    assert_eq!(
        (&answer["done"], &answer["error"], &answer["state"]),
        (&json!(true), &json!(false), &json!("succeeded"))
    );

    // A stopped job ended without succeeding: the original said error.
    let (_, started) = api
        .post(
            "/start",
            &json!({"worker_id": worker_id, "command": "bash", "path": "count.sh"}),
        )
        .await;
    let job = started["job_id"].as_str().unwrap().to_owned();
    let (status, stopped) = api
        .post(
            "/stop",
            &json!({"worker_id": worker_id, "job_id": job, "force": true}),
        )
        .await;
    assert_eq!(
        (status, &stopped["state"]),
        (StatusCode::OK, &json!("stopped")),
        "{stopped}"
    );
    let (_, answer) = api.post("/query", &query(&job)).await;
    assert_eq!(
        (&answer["done"], &answer["error"], &answer["state"]),
        (&json!(true), &json!(true), &json!("stopped"))
    );

    // A start the worker refuses started nothing and is not recorded.
    let (status, refused) = api
        .post(
            "/start",
            &json!({"worker_id": worker_id, "command": "nope", "path": "count.sh"}),
        )
        .await;
    assert_eq!(
        (status, &refused["code"]),
        (StatusCode::BAD_REQUEST, &json!("start_refused")),
        "{refused}"
    );
    // The original StartJob carries no arguments: not sent without them.
    let (status, refused) = api
        .post(
            "/start",
            &json!({"worker_id": worker_id, "command": "bash", "path": "count.sh", "args": ["1"]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    let (_, jobs) = api.get(&format!("/v1/jobs?worker_id={worker_id}")).await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 3, "{jobs}");
    // No output stream in the original contract.
    let (status, answer) = api
        .post("/stream", &json!({"worker_id": worker_id, "job_id": job}))
        .await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{answer}");
    // /v1 stays strict.
    let (status, answer) = api
        .post(
            "/v1/jobs",
            &json!({"worker_id": worker_id, "command": "bash", "path": "count.sh", "timeout": 30}),
        )
        .await;
    assert_eq!(
        (status, &answer["code"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_request")),
        "{answer}"
    );

    // Killed with a job running: down once its checks fail, and the job,
    // not given up yet, reads unknown.
    let (_, started) = api
        .post(
            "/start",
            &json!({"worker_id": worker_id, "command": "bash", "path": "count.sh"}),
        )
        .await;
    let running = started["job_id"].as_str().unwrap().to_owned();
    seed.kill().await;
    let killed = Instant::now();
    let mut state = String::new();
    while killed.elapsed() < Duration::from_secs(15) {
        state = api.worker(&worker_id).await.state;
        if state == "down" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, "down", "{}", scheduler.log());
    assert!(
        killed.elapsed() >= DOWN_AFTER - Duration::from_millis(500),
        "down after {:?}: only silence for down_after makes a worker down",
        killed.elapsed()
    );
    let (_, shown) = api.get(&format!("/v1/jobs/{running}")).await;
    assert_eq!(shown["state"], json!("unknown"), "{shown}");
    let (status, answer) = api
        .post(
            "/start",
            &json!({"worker_id": worker_id, "command": "bash", "path": "count.sh"}),
        )
        .await;
    assert_eq!(
        (status, &answer["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("worker_down")),
        "{answer}"
    );
}

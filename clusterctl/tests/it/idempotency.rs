//! `Idempotency-Key` on the routes that start work, and clusterctl's
//! retries with it.

use std::collections::BTreeSet;
use std::time::Duration;

use jobcluster_proto::http::JobList;
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::{Cluster, Running, stderr, stdout};
use crate::harness::{eventually, job_processes};

struct Reply {
    status: StatusCode,
    replayed: bool,
    body: Value,
}

async fn post(cluster: &Cluster, route: &str, key: Option<&str>, body: &Value) -> Reply {
    let mut request = cluster
        .http()
        .post(format!("{}{route}", cluster.url()))
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let reply = request.send().await.unwrap();
    let status = reply.status();
    let replayed = match reply.headers().get("idempotent-replayed") {
        Some(value) => {
            assert_eq!(value, "true");
            true
        }
        None => false,
    };
    Reply {
        status,
        replayed,
        body: reply.json().await.unwrap(),
    }
}

async fn job_ids(cluster: &Cluster) -> Vec<String> {
    let list: JobList = cluster.get_json("/v1/jobs").await;
    list.jobs.into_iter().map(|j| j.job_id).collect()
}

/// The ids of the jobs a group's answer lists.
fn group_job_ids(reply: &Reply) -> BTreeSet<String> {
    reply.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_owned())
        .collect()
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_key_gets_the_same_job_and_starts_one_process() {
    let cluster = Cluster::start(&["w1"]).await;
    let key = key();
    let body =
        json!({"worker_id": "w1", "command": "bash", "path": "count.sh", "args": ["100", "0.1"]});
    let first = post(&cluster, "/v1/jobs", Some(&key), &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(!first.replayed);
    assert!(first.body.get("state").is_none(), "{}", first.body);
    let job_id = first.body["job_id"].as_str().unwrap().to_owned();
    assert!(
        eventually(Duration::from_secs(10), || !job_processes(&job_id)
            .is_empty())
        .await,
        "the job never ran"
    );

    // The same request, written differently: the same job, as it is now.
    let same = json!({"args": ["100", "0.1"], "path": "count.sh", "env": {}, "command": "bash", "worker_id": "w1"});
    let again = post(&cluster, "/v1/jobs", Some(&key), &same).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert!(again.replayed);
    assert_eq!(again.body["job_id"], first.body["job_id"]);
    assert_eq!(again.body["worker_id"], first.body["worker_id"]);
    assert_eq!(again.body["state"], "running");
    assert_eq!(job_ids(&cluster).await, vec![job_id.clone()]);
    assert!(!job_processes(&job_id).is_empty());

    // The key with another body, or on another route: refused, nothing new.
    let other = json!({"worker_id": "w1", "command": "bash", "path": "count.sh", "args": ["5"]});
    let reused = post(&cluster, "/v1/jobs", Some(&key), &other).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.body["code"], "idempotency_key_reused");
    let reused = post(&cluster, "/start", Some(&key), &body).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.body["code"], "idempotency_key_reused");
    assert_eq!(job_ids(&cluster).await, vec![job_id.clone()]);

    // Keys are 1 to 255 visible ASCII characters.
    let long = "k".repeat(256);
    for bad in ["", "two words", long.as_str()] {
        let reply = post(&cluster, "/v1/jobs", Some(bad), &body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(reply.body["code"], "invalid_idempotency_key", "{bad:?}");
    }

    // A placed start and the original route: one job each.
    let placed = json!({"command": "bash", "path": "count.sh", "args": ["1", "0"]});
    let legacy =
        json!({"worker_id": "w1", "command": "bash", "path": "count.sh", "args": ["1", "0"]});
    for (route, body) in [("/v1/jobs", placed), ("/start", legacy)] {
        let key = self::key();
        let first = post(&cluster, route, Some(&key), &body).await;
        assert_eq!(first.status, StatusCode::CREATED, "{route}: {}", first.body);
        let again = post(&cluster, route, Some(&key), &body).await;
        assert_eq!(again.status, StatusCode::CREATED, "{route}: {}", again.body);
        assert!(again.replayed, "{route}");
        assert_eq!(again.body["job_id"], first.body["job_id"], "{route}");
    }
    assert_eq!(job_ids(&cluster).await.len(), 3);

    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs/{job_id}/stop", cluster.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_that_started_nothing_is_not_remembered() {
    let cluster = Cluster::start(&["w1"]).await;
    let key = key();
    let refused = post(
        &cluster,
        "/v1/jobs",
        Some(&key),
        &json!({"worker_id": "w1", "command": "nosuch", "path": "count.sh"}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert_eq!(refused.body["code"], "unknown_plugin");
    let unknown = post(
        &cluster,
        "/v1/jobs",
        Some(&key),
        &json!({"worker_id": "w9", "command": "bash", "path": "count.sh"}),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);
    assert!(job_ids(&cluster).await.is_empty());

    // The same key with a fixed body starts the job, once.
    let fixed =
        json!({"worker_id": "w1", "command": "bash", "path": "count.sh", "args": ["1", "0"]});
    let started = post(&cluster, "/v1/jobs", Some(&key), &fixed).await;
    assert_eq!(started.status, StatusCode::CREATED, "{}", started.body);
    assert!(!started.replayed);
    let again = post(&cluster, "/v1/jobs", Some(&key), &fixed).await;
    assert!(again.replayed);
    assert_eq!(again.body["job_id"], started.body["job_id"]);
    assert_eq!(job_ids(&cluster).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_starts_with_one_key_start_one_job() {
    let cluster = Cluster::start(&["w1"]).await;
    let key = key();
    let body =
        json!({"worker_id": "w1", "command": "bash", "path": "count.sh", "args": ["1", "0"]});
    let replies = futures_util::future::join_all(
        (0..4).map(|_| post(&cluster, "/v1/jobs", Some(&key), &body)),
    )
    .await;
    let mut started = BTreeSet::new();
    for reply in &replies {
        match reply.status {
            StatusCode::CREATED => {
                started.insert(reply.body["job_id"].as_str().unwrap().to_owned());
            }
            // Answered while the first request was still starting the job.
            StatusCode::CONFLICT => assert_eq!(reply.body["code"], "idempotency_key_in_use"),
            other => panic!("{other}: {}", reply.body),
        }
    }
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(job_ids(&cluster).await.len(), 1);
    let after = post(&cluster, "/v1/jobs", Some(&key), &body).await;
    assert!(after.replayed);
    assert!(started.contains(after.body["job_id"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_start_with_a_key_is_replayed() {
    let cluster = Cluster::start(&["w1", "w2"]).await;
    let key = key();
    let body = json!({"all": true, "command": "bash", "path": "count.sh", "args": ["100", "0.1"]});
    let first = post(&cluster, "/v1/groups", Some(&key), &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(!first.replayed);
    assert_eq!(group_job_ids(&first).len(), 2, "{}", first.body);

    let again = post(&cluster, "/v1/groups", Some(&key), &body).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert!(again.replayed);
    assert_eq!(again.body["group_id"], first.body["group_id"]);
    assert_eq!(group_job_ids(&again), group_job_ids(&first));
    for job in again.body["jobs"].as_array().unwrap() {
        assert_eq!(job["state"], "running", "{job}");
    }
    // Each job named by its worker's name, as in the first answer.
    let names = |reply: &Reply| -> BTreeSet<String> {
        reply.body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| format!("{} {}", j["job_id"], j["worker_name"]))
            .collect()
    };
    assert_eq!(names(&again), names(&first), "{}", again.body);
    assert!(names(&first).iter().any(|n| n.ends_with("\"w2\"")));
    let groups: Value = cluster.get_json("/v1/groups").await;
    assert_eq!(groups["groups"].as_array().unwrap().len(), 1);
    assert_eq!(job_ids(&cluster).await.len(), 2);

    let other = json!({"all": true, "command": "bash", "path": "count.sh"});
    let reused = post(&cluster, "/v1/groups", Some(&key), &other).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.body["code"], "idempotency_key_reused");

    let group_id = first.body["group_id"].as_str().unwrap();
    let reply = cluster
        .http()
        .post(format!("{}/v1/groups/{group_id}/stop", cluster.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
}

/// A group's member whose start its worker does not confirm in time (a
/// paused worker) is in doubt, not refused: the first answer lists its job
/// as `unknown`, as a replay of the key does. `logs -f` and `run --all`
/// follow it until it is settled (it ran, or it is lost: the paused worker
/// may never take a start the scheduler gave up on) and exit alike, with
/// the group's code.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_member_whose_start_is_in_doubt_is_listed_and_followed() {
    let mut cluster =
        Cluster::start_tuned(&["w1", "w2"], crate::cluster::PAUSED_WORKER_TUNING).await;
    let body = json!({"all": true, "command": "bash", "path": "count.sh", "args": ["2", "0.1"]});
    cluster.worker("w2").signal(Signal::SIGSTOP);
    let key = key();
    let first = post(&cluster, "/v1/groups", Some(&key), &body).await;
    let again = post(&cluster, "/v1/groups", Some(&key), &body).await;
    cluster.worker("w2").signal(Signal::SIGCONT);
    for reply in [&first, &again] {
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        assert_eq!(reply.body["failed"], json!([]), "{}", reply.body);
        assert_eq!(group_job_ids(reply).len(), 2, "{}", reply.body);
    }
    assert!(again.replayed);
    assert_eq!(group_job_ids(&again), group_job_ids(&first));
    let in_doubt: Vec<&Value> = first.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "unknown")
        .collect();
    assert_eq!(in_doubt.len(), 1, "{}", first.body);
    assert_eq!(in_doubt[0]["worker_name"], "w2");
    let w2 = in_doubt[0]["worker_id"].as_str().unwrap().to_owned();
    let group = first.body["group_id"].as_str().unwrap();
    let out = cluster.ctl_output(&["logs", "-f", group]).await;
    told_as_recorded(
        &cluster,
        group,
        &w2,
        &out.status,
        &stdout(&out),
        &stderr(&out),
    )
    .await;

    // `run --all`: its answer comes after the paused worker's timeout;
    // the worker goes on once clusterctl has it.
    cluster.worker("w2").signal(Signal::SIGSTOP);
    let run = Running::until(
        cluster
            .ctl()
            .args(["run", "--all", "count.sh", "--", "2", "0.1"]),
        "started group ",
    )
    .await;
    cluster.worker("w2").signal(Signal::SIGCONT);
    let said = &run.said;
    let group = run
        .line
        .as_deref()
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no group started: {said}"))
        .to_owned();
    assert!(said.contains("2 job(s)"), "{said}");
    assert!(
        said.contains("(1 not confirmed by its worker yet)"),
        "{said}"
    );
    let (out, said) = run.finish(Duration::from_secs(60)).await;
    assert!(!said.contains("could not start"), "{said}");
    told_as_recorded(&cluster, &group, &w2, &out.status, &stdout(&out), &said).await;
    let again = cluster.ctl_output(&["logs", "-f", &group]).await;
    assert_eq!(again.status.code(), out.status.code(), "{said}");
}

/// A followed group's output and exit `code` against its record: every
/// line of w1's job, and of w2's job (`w2`) if it ran; exit 0 only if it
/// did, else a line saying it was lost.
async fn told_as_recorded(
    cluster: &Cluster,
    group: &str,
    w2: &str,
    code: &std::process::ExitStatus,
    out: &str,
    said: &str,
) {
    let status = cluster.ctl_output(&["status", "-o", "json", group]).await;
    let info: jobcluster_proto::http::GroupInfo = serde_json::from_slice(&status.stdout).unwrap();
    assert!(info.done, "{info:?}");
    let lines_of = |w: &str| crate::cluster::lines_of(out, w);
    assert_eq!(lines_of("w1"), ["1", "2", "done"], "{out}\n{said}");
    let job = info.jobs.iter().find(|j| j.worker_id == w2).unwrap();
    match job.state.as_str() {
        "succeeded" => {
            assert_eq!(lines_of("w2"), ["1", "2", "done"], "{out}\n{said}");
            assert_eq!(code.code(), Some(0), "{said}");
        }
        "lost" => {
            assert!(lines_of("w2").is_empty(), "{out}");
            assert_ne!(code.code(), Some(0), "{said}");
            assert!(said.contains("lost"), "{said}");
        }
        other => panic!("w2's job ended {other}: {said}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clusterctl_run_retries_its_start_through_a_scheduler_restart() {
    let mut cluster = Cluster::start(&["w1"]).await;
    // Works end to end as it always did.
    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "count.sh", "--", "2", "0"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\n2\ndone\n");

    cluster.stop_scheduler(Signal::SIGTERM);
    let run = cluster
        .ctl()
        .args(["run", "--worker", "w1", "count.sh", "--", "3", "0.1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    cluster.start_scheduler_again();
    let out = tokio::time::timeout(Duration::from_secs(60), run.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\n2\n3\ndone\n");
    assert!(
        stderr(&out).contains("with the same idempotency key"),
        "{}",
        stderr(&out)
    );
    assert_eq!(job_ids(&cluster).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_in_doubt_keeps_its_key_and_clusterctl_names_its_job() {
    let mut cluster = Cluster::start_tuned(&["w1"], crate::cluster::PAUSED_WORKER_TUNING).await;
    let body =
        json!({"worker_id": "w1", "command": "bash", "path": "count.sh", "args": ["30", "0.1"]});
    // A hung worker: the start reaches it but is never confirmed.
    cluster.worker("w1").signal(Signal::SIGSTOP);
    let key = key();
    let doubt = post(&cluster, "/v1/jobs", Some(&key), &body).await;
    assert_eq!(
        doubt.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        doubt.body
    );
    assert_eq!(doubt.body["code"], "start_unconfirmed");
    let job_id = doubt.body["job_id"].as_str().unwrap().to_owned();
    // The key stays on that job: a retry gets it, still in doubt.
    let again = post(&cluster, "/v1/jobs", Some(&key), &body).await;
    assert_eq!(
        again.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        again.body
    );
    assert!(again.replayed);
    assert_eq!(again.body["code"], "start_unconfirmed");
    assert_eq!(again.body["job_id"], job_id.as_str());
    // Refused before any record (the worker is now known unresponsive):
    // not remembered.
    let other_key = self::key();
    let refused = post(&cluster, "/v1/jobs", Some(&other_key), &body).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.body["code"], "worker_unresponsive");
    assert!(!refused.replayed);

    cluster.worker("w1").signal(Signal::SIGCONT);
    let mut settled = String::new();
    for _ in 0..200 {
        settled = cluster.job(&job_id).await.state;
        if settled != "unknown" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(settled, "unknown", "the start never settled");
    let replay = post(&cluster, "/v1/jobs", Some(&key), &body).await;
    assert_eq!(replay.status, StatusCode::CREATED, "{}", replay.body);
    assert!(replay.replayed);
    assert_eq!(replay.body["job_id"], job_id.as_str());
    assert!(replay.body["state"].is_string(), "{}", replay.body);
    // The refused key starts a job now that the worker answers.
    let mut started = None;
    for _ in 0..100 {
        let reply = post(&cluster, "/v1/jobs", Some(&other_key), &body).await;
        if reply.status == StatusCode::CREATED {
            started = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = started.expect("the worker never took a start again");
    assert!(!started.replayed);
    assert_ne!(started.body["job_id"], job_id.as_str());
    assert_eq!(job_ids(&cluster).await.len(), 2);

    // clusterctl names a job in doubt and says its state is unknown.
    cluster.worker("w1").signal(Signal::SIGSTOP);
    let out = cluster
        .ctl_output(&["start", "--worker", "w1", "count.sh", "--", "1", "0"])
        .await;
    cluster.worker("w1").signal(Signal::SIGCONT);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    let printed = stdout(&out).trim().to_owned();
    assert!(uuid::Uuid::parse_str(&printed).is_ok(), "{printed:?}");
    assert!(stderr(&out).contains("is unknown"), "{}", stderr(&out));
    assert!(job_ids(&cluster).await.contains(&printed));
}

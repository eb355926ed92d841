//! Forgetting workers: `DELETE /v1/workers/{id}` and `clusterctl workers rm`.

use std::time::Duration;

use jobcluster_proto::http::{ErrorBody, Success, WorkerList};
use nix::sys::signal::Signal;
use reqwest::StatusCode;

use crate::cluster::{Cluster, stderr};
use crate::security::{OPERATOR_TOKEN, VIEWER_TOKEN, auth_config};

async fn error_of(reply: reqwest::Response) -> (StatusCode, String, String) {
    let status = reply.status();
    let body: ErrorBody = reply.json().await.unwrap();
    (status, body.code, body.error)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_worker_can_be_removed_and_registers_again_as_a_new_worker() {
    let mut cluster = Cluster::start_with(&["w1", "w2"], &auth_config(), "").await;
    let url = cluster.url();
    let http = cluster.http();
    let w2_id = cluster.worker_info("w2").await.worker_id;

    // One job that finished on w2, one still running when w2 dies.
    let done = cluster.start_job("w2", "count.sh", &["1", "0"]).await;
    let mut finished = false;
    for _ in 0..400 {
        if cluster.job(&done).await.state == "succeeded" {
            finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(finished, "the short job never finished");
    let running = cluster.start_job("w2", "count.sh", &["1000", "0.1"]).await;

    // A live worker is refused, whoever asks; an unknown one is not found.
    let reply = http
        .delete(format!("{url}/v1/workers/w1"))
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(reply).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "worker_alive")
    );
    assert!(message.contains("stop it"), "{message}");
    let reply = http
        .delete(format!("{url}/v1/workers/nobody"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(reply).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "worker_not_found")
    );
    let out = cluster.ctl_output(&["workers", "rm", "w1"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("worker_alive"), "{}", stderr(&out));

    cluster.worker("w2").signal(Signal::SIGKILL);
    cluster.worker("w2").wait(Duration::from_secs(10));
    cluster.wait_state("w2", "down").await;

    // Viewers only read.
    let anonymous = cluster.http_as(None);
    let reply = anonymous
        .delete(format!("{url}/v1/workers/w2"))
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(reply).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert_eq!(cluster.worker_state("w2").await, "down");

    // An operator removes it, by id here (the CLI below uses the name).
    let out = cluster
        .ctl()
        .env_remove("CLUSTERCTL_CERT")
        .env_remove("CLUSTERCTL_KEY")
        .env("CLUSTERCTL_TOKEN", OPERATOR_TOKEN)
        .args(["-o", "json", "workers", "rm", &w2_id])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let answer: Success = serde_json::from_slice(&out.stdout).unwrap();
    assert!(answer.success);

    let list: WorkerList = cluster.get_json("/v1/workers?all=true").await;
    assert!(list.workers.iter().all(|w| w.name != "w2"), "{list:?}");
    assert_eq!(cluster.worker_state("w2").await, "");
    let out = cluster.ctl_output(&["workers", "rm", "w2"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("worker_not_found"),
        "{}",
        stderr(&out)
    );

    // Its jobs' records stay.
    let job = cluster.job(&done).await;
    assert_eq!(
        (job.state.as_str(), job.worker_id.as_str()),
        ("succeeded", w2_id.as_str())
    );
    let job = cluster.job(&running).await;
    assert_eq!(
        (job.state.as_str(), job.worker_id.as_str()),
        ("lost", w2_id.as_str())
    );

    // The same worker (same name, same state_dir keeping the old id) starts
    // again: it registers as a new worker.
    cluster.restart_worker("w2");
    cluster.wait_state("w2", "ready").await;
    let new_id = cluster.worker_info("w2").await.worker_id;
    assert_ne!(new_id, w2_id, "a removed worker's id was given out again");
    let job = cluster.job(&done).await;
    assert_eq!(job.worker_id, w2_id);
    let job = cluster.job(&running).await;
    assert_eq!(job.state, "lost");
    // And it works.
    let reply = http
        .post(format!("{url}/v1/jobs"))
        .json(&serde_json::json!({"worker_id": "w2", "path": "count.sh", "args": ["1", "0"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);

    // The removal outlives a scheduler restart.
    cluster.restart_scheduler(Signal::SIGTERM);
    cluster.wait_state("w2", "ready").await;
    assert_eq!(cluster.worker_info("w2").await.worker_id, new_id);
    let list: WorkerList = cluster.get_json("/v1/workers?all=true").await;
    assert_eq!(
        list.workers.iter().filter(|w| w.name == "w2").count(),
        1,
        "{list:?}"
    );
}

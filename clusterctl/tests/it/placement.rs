//! Placement and draining across three workers with different labels.

use std::collections::HashMap;
use std::time::Duration;

use jobcluster_proto::http::{ErrorBody, JobStarted};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::{Cluster, stderr, stdout};

async fn three_workers() -> Cluster {
    let mut cluster = Cluster::start(&[]).await;
    for (name, zone) in [("w1", "a"), ("w2", "a"), ("w3", "b")] {
        cluster.add_worker_with(name, &format!("labels = {{ zone = \"{zone}\" }}\n---\n"));
    }
    for name in ["w1", "w2", "w3"] {
        for _ in 0..400 {
            if cluster.worker_state(name).await == "ready" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(cluster.worker_state(name).await, "ready", "{name}");
    }
    cluster
}

async fn place(cluster: &Cluster, body: Value) -> (StatusCode, Value) {
    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs", cluster.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    (reply.status(), reply.json().await.unwrap())
}

async fn name_of(cluster: &Cluster, worker_id: &str) -> String {
    cluster.worker_info(worker_id).await.name
}

async fn stop_all(cluster: &Cluster, jobs: &[String]) {
    for job in jobs {
        let out = cluster.ctl_output(&["stop", job]).await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_spreads_jobs_and_skips_draining_and_down_workers() {
    let mut cluster = three_workers().await;
    let long = json!({"path": "count.sh", "args": ["600", "0.1"]});
    let mut jobs = Vec::new();
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let (status, body) = place(&cluster, long.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let started: JobStarted = serde_json::from_value(body).unwrap();
        *per_worker
            .entry(name_of(&cluster, &started.worker_id).await)
            .or_default() += 1;
        jobs.push(started.job_id);
    }
    assert_eq!(
        per_worker,
        HashMap::from([("w1".into(), 10), ("w2".into(), 10), ("w3".into(), 10)])
    );

    // A selector narrows the choice; one nobody matches says why.
    let out = cluster
        .ctl_output(&[
            "start",
            "-o",
            "json",
            "--selector",
            "zone=b",
            "count.sh",
            "--",
            "600",
            "0.1",
        ])
        .await;
    let started: JobStarted =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out)));
    assert_eq!(name_of(&cluster, &started.worker_id).await, "w3");
    jobs.push(started.job_id);
    let (status, body) = place(
        &cluster,
        json!({"path": "count.sh", "selector": {"zone": "mars"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let error: ErrorBody = serde_json::from_value(body).unwrap();
    assert_eq!(error.code, "no_eligible_worker");
    assert!(error.error.contains("zone=mars"), "{}", error.error);
    let (status, body) = place(&cluster, json!({"path": "count.sh", "command": "cobol"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no worker offers plugin"),
        "{body}"
    );

    // Draining: no new jobs for w2, its running jobs go on.
    let out = cluster.ctl_output(&["workers", "drain", "w2"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(cluster.worker_state("w2").await, "draining");
    for _ in 0..6 {
        let (status, body) = place(&cluster, long.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let started: JobStarted = serde_json::from_value(body).unwrap();
        assert_ne!(name_of(&cluster, &started.worker_id).await, "w2");
        jobs.push(started.job_id);
    }
    let (status, body) = place(&cluster, json!({"worker_id": "w2", "path": "count.sh"})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("worker_draining"))
    );
    let (status, _) = place(
        &cluster,
        json!({"path": "count.sh", "selector": {"zone": "a"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "w1 is still in zone a");
    let w2_running = cluster
        .http()
        .get(format!(
            "{}/v1/jobs?worker_id=w2&state=running",
            cluster.url()
        ))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(
        w2_running["jobs"].as_array().unwrap().len(),
        10,
        "draining lets running jobs finish"
    );

    // Stop everything, then take w3 down: placement avoids it too.
    let running: Value = cluster
        .http()
        .get(format!(
            "{}/v1/jobs?state=running&limit=1000",
            cluster.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let all: Vec<String> = running["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_owned())
        .collect();
    stop_all(&cluster, &all).await;
    cluster.worker("w3").signal(Signal::SIGKILL);
    cluster.worker("w3").wait(Duration::from_secs(10));
    for _ in 0..200 {
        if cluster.worker_state("w3").await == "down" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(cluster.worker_state("w3").await, "down");
    for _ in 0..4 {
        let (status, body) = place(&cluster, json!({"path": "count.sh", "args": ["1", "0"]})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(
            name_of(&cluster, body["worker_id"].as_str().unwrap()).await,
            "w1"
        );
    }
    let (status, body) = place(
        &cluster,
        json!({"path": "count.sh", "selector": {"zone": "b"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        body["error"].as_str().unwrap().contains("draining or down"),
        "{body}"
    );

    let out = cluster.ctl_output(&["workers", "undrain", "w2"]).await;
    assert!(out.status.success());
    assert_eq!(cluster.worker_state("w2").await, "ready");
    let out = cluster
        .ctl_output(&["run", "--selector", "zone=a", "count.sh", "--", "1", "0"])
        .await;
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(0), "1\ndone\n"),
        "{}",
        stderr(&out)
    );
}

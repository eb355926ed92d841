//! Placement and draining across three workers with different labels.

use std::collections::HashMap;
use std::time::Duration;

use jobcluster_proto::http::{ErrorBody, JobStarted};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::{Cluster, lines_of, stderr, stdout};

async fn three_workers() -> Cluster {
    let mut cluster = Cluster::start(&[]).await;
    for (name, zone) in [("w1", "a"), ("w2", "a"), ("w3", "b")] {
        cluster.add_worker_with(name, &format!("labels = {{ zone = \"{zone}\" }}\n---\n"));
    }
    for name in ["w1", "w2", "w3"] {
        cluster.wait_state(name, "ready").await;
        assert_eq!(cluster.worker_state(name).await, "ready", "{name}");
    }
    cluster
}

async fn place(cluster: &Cluster, body: Value) -> (StatusCode, Value) {
    cluster.post_json("/v1/jobs", &body).await
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
        .get_json::<Value>("/v1/jobs?worker_id=w2&state=running")
        .await;
    assert_eq!(
        w2_running["jobs"].as_array().unwrap().len(),
        10,
        "draining lets running jobs finish"
    );

    // Stop everything, then take w3 down: placement avoids it too.
    let running: Value = cluster.get_json("/v1/jobs?state=running&limit=1000").await;
    let all: Vec<String> = running["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_owned())
        .collect();
    stop_all(&cluster, &all).await;
    cluster.worker("w3").signal(Signal::SIGKILL);
    cluster.worker("w3").wait(Duration::from_secs(10));
    cluster.wait_state("w3", "down").await;
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

async fn start_group(cluster: &Cluster, body: Value) -> jobcluster_proto::http::GroupStarted {
    let reply = cluster
        .http()
        .post(format!("{}/v1/groups", cluster.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    reply.json().await.unwrap()
}

async fn group(cluster: &Cluster, id: &str) -> jobcluster_proto::http::GroupInfo {
    cluster.get_json(&format!("/v1/groups/{id}")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fan_out_streams_every_line_of_every_worker_and_stops_as_one() {
    let mut cluster = three_workers().await;
    let scripts = cluster.tmp.path().join("scripts");
    std::fs::write(
        scripts.join("picky.sh"),
        "echo \"hello from $WORKER_NAME\"\nprintf 'no newline'\n[ \"$WORKER_NAME\" = w2 ] && exit 4\nexit 0\n",
    )
    .unwrap();

    // Every line of every worker, prefixed, in each worker's order.
    let started = start_group(
        &cluster,
        json!({"all": true, "path": "count.sh", "args": ["5", "0.02"]}),
    )
    .await;
    assert_eq!((started.jobs.len(), started.failed.len()), (3, 0));
    let text = cluster
        .http()
        .get(format!(
            "{}/v1/groups/{}/logs?follow=true",
            cluster.url(),
            started.group_id
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for w in ["w1", "w2", "w3"] {
        let lines = lines_of(&text, w);
        assert_eq!(lines, ["1", "2", "3", "4", "5", "done"], "{w} in:\n{text}");
    }
    assert_eq!(text.lines().count(), 18);
    let info = group(&cluster, &started.group_id).await;
    assert_eq!((info.state.as_str(), info.jobs.len()), ("succeeded", 3));
    assert!(
        info.jobs
            .iter()
            .all(|j| j.group_id.as_deref() == Some(started.group_id.as_str()))
    );

    // A selector picks the fan-out's workers; one failing member fails the
    // group; a partial last line is completed; ndjson carries offsets.
    let started = start_group(
        &cluster,
        json!({"selector": {"zone": "a"}, "path": "picky.sh"}),
    )
    .await;
    assert_eq!(started.jobs.len(), 2);
    let ndjson = cluster.group_ndjson(&started.group_id).await;
    let lines: Vec<jobcluster_proto::http::GroupLogLine> = ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{ndjson}");
    for w in ["w1", "w2"] {
        let mine: Vec<_> = lines.iter().filter(|l| l.worker == w).collect();
        assert_eq!(
            mine[0].line.as_deref(),
            Some(format!("hello from {w}").as_str())
        );
        assert_eq!(
            (mine[1].line.as_deref(), mine[1].offset),
            (Some("no newline"), 14)
        );
    }
    let info = group(&cluster, &started.group_id).await;
    assert_eq!(info.state, "failed");
    let w2_job = info
        .jobs
        .iter()
        .find(|j| j.exit_code == Some(4))
        .expect("w2's job exited 4");
    assert_eq!(name_of(&cluster, &w2_job.worker_id).await, "w2");

    // Stopping the group stops every member.
    let started = start_group(
        &cluster,
        json!({"all": true, "path": "count.sh", "args": ["600", "0.1"]}),
    )
    .await;
    let stop: Value = cluster
        .http()
        .post(format!(
            "{}/v1/groups/{}/stop",
            cluster.url(),
            started.group_id
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (stop["success"].as_bool(), stop["state"].as_str()),
        (Some(true), Some("stopped"))
    );
    let info = group(&cluster, &started.group_id).await;
    assert!(info.jobs.iter().all(|j| j.state == "stopped"), "{info:?}");

    // A worker going down mid-group: its member is lost, the group failed.
    let started = start_group(
        &cluster,
        json!({"all": true, "path": "count.sh", "args": ["600", "0.1"]}),
    )
    .await;
    cluster.worker("w3").signal(Signal::SIGKILL);
    cluster.worker("w3").wait(Duration::from_secs(10));
    let w3_id = cluster.worker_info("w3").await.worker_id;
    let mut lost = false;
    for _ in 0..400 {
        let info = group(&cluster, &started.group_id).await;
        if info
            .jobs
            .iter()
            .any(|j| j.worker_id == w3_id && j.state == "lost")
        {
            assert_eq!(info.state, "running", "the others still run");
            lost = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(lost, "w3's member was never marked lost");
    cluster
        .http()
        .post(format!(
            "{}/v1/groups/{}/stop",
            cluster.url(),
            started.group_id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(group(&cluster, &started.group_id).await.state, "failed");
    // Bring w3 back so it kills what was left of its job.
    cluster.restart_worker("w3");
    cluster.wait_state("w3", "ready").await;

    // Bad fan-outs.
    let reply = cluster
        .http()
        .post(format!("{}/v1/groups", cluster.url()))
        .json(&json!({"path": "count.sh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
    let reply = cluster
        .http()
        .post(format!("{}/v1/groups", cluster.url()))
        .json(&json!({"selector": {"zone": "mars"}, "path": "count.sh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CONFLICT);
    let reply = cluster
        .http()
        .get(format!(
            "{}/v1/groups/{}",
            cluster.url(),
            uuid::Uuid::new_v4()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::NOT_FOUND);
}

/// A worker that could not start a group's job fails the group for good:
/// `logs -f` of a group started earlier exited 0 once the other workers'
/// jobs succeeded, and the group read `succeeded`, as if the job had run
/// everywhere it was asked to.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_could_not_start_its_member_fails_the_group() {
    let mut cluster = Cluster::start(&[]).await;
    // Only w1's plugin passes GREETING: w2 refuses the request's env.
    cluster.add_worker_with(
        "w1",
        "---\n[plugins.greet]\nrunner = \"bash\"\nextensions = []\nallow_env = [\"GREETING\"]\n",
    );
    cluster.add_worker_with(
        "w2",
        "---\n[plugins.greet]\nrunner = \"bash\"\nextensions = []\n",
    );
    for name in ["w1", "w2"] {
        cluster.wait_state(name, "ready").await;
    }
    std::fs::write(
        cluster.tmp.path().join("scripts/greet.sh"),
        "echo \"$GREETING\"\n",
    )
    .unwrap();
    let (status, answer) = cluster
        .post_json(
            "/v1/groups",
            &json!({"all": true, "command": "greet", "path": "greet.sh", "env": {"GREETING": "hi"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let started: jobcluster_proto::http::GroupStarted = serde_json::from_value(answer).unwrap();
    let w2 = cluster.worker_info("w2").await.worker_id;
    assert_eq!(started.jobs.len(), 1);
    assert_eq!(started.failed.len(), 1);
    assert_eq!(started.failed[0].worker_id, w2);

    let out = cluster.ctl_output(&["logs", "-f", &started.group_id]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), "[w1] hi\n");
    assert!(
        stderr(&out).contains("w2: could not start the job"),
        "{}",
        stderr(&out)
    );
    let group: jobcluster_proto::http::GroupInfo = cluster
        .get_json(&format!("/v1/groups/{}", started.group_id))
        .await;
    assert_eq!(group.state, "failed", "{group:?}");
    assert!(group.done);
    assert_eq!(group.jobs[0].state, "succeeded");
    assert_eq!(group.failed.len(), 1);
    assert_eq!(group.failed[0].worker_id, w2);
    assert!(group.failed[0].error.contains("GREETING"), "{group:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_all_streams_with_prefixes_and_exits_with_the_groups_code() {
    let cluster = three_workers().await;
    std::fs::write(
        cluster.tmp.path().join("scripts/picky.sh"),
        "echo \"hi from $WORKER_NAME\"\n[ \"$WORKER_NAME\" = w3 ] && exit 6\nexit 0\n",
    )
    .unwrap();
    let out = cluster
        .ctl_output(&["run", "--all", "count.sh", "--", "2", "0.01"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for w in ["w1", "w2", "w3"] {
        let lines = lines_of(&text, w);
        assert_eq!(lines, ["1", "2", "done"], "{w}:\n{text}");
    }
    let out = cluster
        .ctl_output(&["run", "--all", "--selector", "zone=a", "picky.sh"])
        .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "w3 is not in zone a: {}",
        stderr(&out)
    );
    let out = cluster.ctl_output(&["run", "--all", "picky.sh"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 3);

    // start --all prints the group id; status, logs, stop and groups take it.
    let out = cluster
        .ctl_output(&["start", "--all", "count.sh", "--", "600", "0.1"])
        .await;
    let group = stdout(&out).trim().to_owned();
    assert!(
        uuid::Uuid::parse_str(&group).is_ok(),
        "{group:?} {}",
        stderr(&out)
    );
    let out = cluster.ctl_output(&["status", &group]).await;
    assert!(stdout(&out).contains("running"), "{}", stdout(&out));
    let out = cluster.ctl_output(&["stop", &group]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cluster.ctl_output(&["status", "-o", "json", &group]).await;
    let info: jobcluster_proto::http::GroupInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((info.state.as_str(), info.jobs.len()), ("stopped", 3));
    let out = cluster.ctl_output(&["logs", "-f", &group]).await;
    assert_eq!(out.status.code(), Some(1), "a stopped group exits 1");
    assert!(stdout(&out).contains("[w2] 1\n"), "{}", stdout(&out));
    let out = cluster.ctl_output(&["groups", "-o", "json"]).await;
    let groups: Vec<jobcluster_proto::http::GroupInfo> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(groups.len(), 4);
    assert_eq!(groups[0].group_id, group);
    let out = cluster
        .ctl_output(&["start", "--all", "--worker", "w1", "count.sh"])
        .await;
    assert_eq!(out.status.code(), Some(2), "--all and --worker conflict");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_merged_stream_survives_a_member_worker_restart_without_losing_lines() {
    let mut cluster = three_workers().await;
    let started = start_group(
        &cluster,
        json!({"all": true, "path": "count.sh", "args": ["40", "0.05"]}),
    )
    .await;
    let url = format!(
        "{}/v1/groups/{}/logs?follow=true",
        cluster.url(),
        started.group_id
    );
    let http = cluster.http();
    let follower =
        tokio::spawn(async move { http.get(url).send().await.unwrap().text().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.worker("w2").signal(Signal::SIGKILL);
    cluster.worker("w2").wait(Duration::from_secs(10));
    cluster.restart_worker("w2");
    let text = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .unwrap()
        .unwrap();
    let w2_id = cluster.worker_info("w2").await.worker_id;
    let w2_job = started.jobs.iter().find(|j| j.worker_id == w2_id).unwrap();
    for (w, job) in [("w1", None), ("w3", None), ("w2", Some(&w2_job.job_id))] {
        let got = lines_of(&text, w);
        match job {
            None => assert_eq!(got.len(), 41, "{w}: {got:?}"),
            Some(job) => {
                let log = String::from_utf8(cluster.worker_log(w, job)).unwrap();
                let expected: Vec<&str> = log.lines().collect();
                assert_eq!(got, expected, "w2's lines are exactly its log");
                assert!(got.len() < 41, "w2's job was cut short: {got:?}");
            }
        }
    }
    assert_eq!(group(&cluster, &started.group_id).await.state, "failed");
}

/// A group of `count.sh 3` on every worker, once it succeeded: its id.
async fn counted_group(cluster: &Cluster) -> String {
    let started = start_group(
        cluster,
        json!({"all": true, "path": "count.sh", "args": ["3", "0"]}),
    )
    .await;
    let group_id = started.group_id;
    crate::faults::until(Duration::from_secs(30), "the group done", || async {
        group(cluster, &group_id).await.state == "succeeded"
    })
    .await;
    group_id
}

/// `clusterctl logs GROUP`, started now, to be run beside something else.
fn group_logs(
    cluster: &Cluster,
    group_id: &str,
) -> impl std::future::Future<Output = std::io::Result<std::process::Output>> + use<> {
    let mut command = cluster.ctl();
    command.args(["logs", group_id]);
    command.output()
}

/// A read's output, run beside `meanwhile` (what happens to a worker
/// while the read goes on); the read must succeed.
async fn read_beside(
    read: impl std::future::Future<Output = std::io::Result<std::process::Output>>,
    meanwhile: impl std::future::Future<Output = ()>,
) -> std::process::Output {
    let (out, ()) = tokio::join!(read, meanwhile);
    let out = out.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    out
}

/// A group read cut short: it fails, saying its output cannot be resumed.
fn assert_cut(out: &std::process::Output) {
    assert!(!out.status.success(), "{}", stdout(out));
    assert!(
        stderr(out).contains("a group's output cannot be resumed"),
        "{}",
        stderr(out)
    );
}

/// A finished group read while one member's worker is down: a worker
/// back within seconds gives its lines, as a broken stream's does; one
/// that stays down cuts the output short, after the other members' lines
/// (with `follow`, at once), where the member was left out of an output
/// that ended cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_read_while_a_members_worker_is_down_waits_for_it_or_is_cut() {
    let mut cluster = three_workers().await;
    let group_id = counted_group(&cluster).await;
    let all = ["1", "2", "3", "done"];

    cluster.worker("w2").signal(Signal::SIGKILL);
    cluster.worker("w2").wait(Duration::from_secs(10));
    let read = tokio::spawn(group_logs(&cluster, &group_id));
    // w2 comes back once the read has found it down (not after a fixed
    // time, which a loaded machine's clusterctl could take to get there).
    crate::faults::until(
        Duration::from_secs(20),
        "the read to find w2 down",
        || async {
            let log = cluster.scheduler.log();
            log.contains("group member's output unavailable")
                || log.contains("group member's worker cannot be asked now")
        },
    )
    .await;
    cluster.restart_worker("w2");
    let out = read.await.unwrap().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for w in ["w1", "w2", "w3"] {
        assert_eq!(lines_of(&stdout(&out), w), all, "{w}: {}", stdout(&out));
    }

    cluster.worker("w2").signal(Signal::SIGKILL);
    cluster.worker("w2").wait(Duration::from_secs(10));
    let out = cluster.ctl_output(&["logs", &group_id]).await;
    assert_cut(&out);
    for w in ["w1", "w3"] {
        assert_eq!(lines_of(&stdout(&out), w), all, "{w}: {}", stdout(&out));
    }
    assert!(lines_of(&stdout(&out), "w2").is_empty(), "{}", stdout(&out));
    // A follower is told too (at once, as it watches).
    let out = cluster.ctl_output(&["logs", "-f", &group_id]).await;
    assert_cut(&out);
}

/// A finished group read while a member's worker is paused (SIGSTOP):
/// the read's call times out, the worker is then known unresponsive and
/// not called again until it is heard from, and once it goes on the read
/// gets every line of every member.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_read_waits_out_a_paused_members_worker() {
    let mut cluster =
        Cluster::start_tuned(&["w1", "w2"], crate::cluster::PAUSED_WORKER_TUNING).await;
    let group_id = counted_group(&cluster).await;

    cluster.worker("w2").signal(Signal::SIGSTOP);
    let read = group_logs(&cluster, &group_id);
    let out = read_beside(read, async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.worker("w2").signal(Signal::SIGCONT);
    })
    .await;
    let text = stdout(&out);
    for w in ["w1", "w2"] {
        let got = lines_of(&text, w);
        assert_eq!(got, ["1", "2", "3", "done"], "{w}: {text}");
    }
    let log = cluster.scheduler.log();
    assert!(
        log.contains("worker did not answer; marked unresponsive"),
        "{log}"
    );
}

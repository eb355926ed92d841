//! clusterctl against a live cluster.

use std::time::Duration;

use jobcluster_proto::http::{JobInfo, JobStarted, WorkerInfo};
use tokio::io::AsyncReadExt;

use crate::cluster::{Cluster, stderr, stdout};

#[tokio::test(flavor = "multi_thread")]
async fn workers_lists_both_workers_with_names_plugins_and_state() {
    let cluster = Cluster::start(&["w1", "w2"]).await;
    let out = cluster.ctl_output(&["workers"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    for needle in ["w1", "w2", "ready", "bash", "python"] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }
    let out = cluster.ctl_output(&["workers", "-o", "json"]).await;
    let workers: Vec<WorkerInfo> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = workers.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["w1", "w2"]);
    assert!(
        workers
            .iter()
            .all(|w| w.state == "ready" && w.plugins == ["bash", "python"])
    );
    let out = cluster
        .ctl_output(&["workers", "show", "w2", "-o", "yaml"])
        .await;
    assert!(stdout(&out).contains("name: w2"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn run_streams_every_line_and_exits_with_the_jobs_code() {
    let cluster = Cluster::start(&["w1", "w2"]).await;
    let out = cluster
        .ctl_output(&["run", "--worker", "w2", "count.py", "--", "3", "0.05"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\n2\n3\ndone\n");
    // The worker's name, as the start's answer carries it.
    assert!(stderr(&out).contains(" on w2\n"), "{}", stderr(&out));

    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "fail.sh"])
        .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "about to fail\nfailing on purpose\n");

    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "fail.sh", "--", "7"])
        .await;
    assert_eq!(out.status.code(), Some(7));
}

#[tokio::test(flavor = "multi_thread")]
async fn start_then_follow_from_another_process_then_stop() {
    let cluster = Cluster::start(&["w1", "w2"]).await;
    let out = cluster
        .ctl_output(&["start", "--worker", "w1", "count.sh", "--", "1000", "0.05"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let job = stdout(&out).trim().to_owned();
    assert!(
        uuid::Uuid::parse_str(&job).is_ok(),
        "start prints only the job id: {job:?}"
    );

    let mut follower = cluster
        .ctl()
        .args(["logs", "-f", &job])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout_pipe = follower.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("3\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), stdout_pipe.read(&mut buf))
            .await
            .expect("follower printed nothing")
            .unwrap();
        assert!(n > 0, "follower ended early");
        seen.extend_from_slice(&buf[..n]);
    }

    let out = cluster.ctl_output(&["stop", &job]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // The follower ends by itself once the job has ended, with exit code 1 (stopped).
    let mut rest = Vec::new();
    stdout_pipe.read_to_end(&mut rest).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), follower.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    seen.extend_from_slice(&rest);
    let text = String::from_utf8(seen).unwrap();
    let numbers: Vec<u32> = text.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(
        numbers,
        (1..=numbers.len() as u32).collect::<Vec<_>>(),
        "no line lost or repeated"
    );

    let out = cluster.ctl_output(&["status", &job]).await;
    assert!(stdout(&out).contains("stopped"), "{}", stdout(&out));
    let before = cluster.ctl_output(&["status", &job, "-o", "json"]).await;
    let out = cluster.ctl_output(&["stop", &job]).await;
    assert!(
        out.status.success(),
        "stopping again succeeds: {}",
        stderr(&out)
    );
    let after = cluster.ctl_output(&["status", &job, "-o", "json"]).await;
    let before: JobInfo = serde_json::from_slice(&before.stdout).unwrap();
    let after: JobInfo = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(before, after, "a second stop changes nothing");
    assert_eq!(after.state, "stopped");

    // The full log is still there, and logs without -f exits 0.
    let out = cluster.ctl_output(&["logs", &job]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("1\n2\n3\n"));
    let out = cluster.ctl_output(&["logs", "--offset", "2", &job]).await;
    assert!(stdout(&out).starts_with("2\n3\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn start_json_and_jobs_listing() {
    let cluster = Cluster::start(&["w1"]).await;
    let out = cluster
        .ctl_output(&[
            "start", "-o", "json", "--worker", "w1", "count.sh", "--", "1", "0",
        ])
        .await;
    let started: JobStarted = serde_json::from_slice(&out.stdout).unwrap();
    let out = cluster.ctl_output(&["logs", "-f", &started.job_id]).await;
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(0), "1\ndone\n")
    );
    let out = cluster
        .ctl_output(&["jobs", "-o", "json", "--worker", "w1"])
        .await;
    let jobs: Vec<JobInfo> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].job_id.as_str(), jobs[0].state.as_str()),
        (started.job_id.as_str(), "succeeded")
    );
    let out = cluster
        .ctl_output(&["jobs", "--state", "running", "-o", "json"])
        .await;
    let jobs: Vec<JobInfo> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(jobs.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_one_line_and_say_what_to_do() {
    let cluster = Cluster::start(&["w1"]).await;
    let out = cluster
        .ctl_output(&["status", &uuid::Uuid::new_v4().to_string()])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown job"), "{}", stderr(&out));

    let out = cluster
        .ctl()
        .args(["workers", "--scheduler", "https://127.0.0.1:1"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("https://127.0.0.1:1"),
        "{}",
        stderr(&out)
    );

    // A CA that did not sign the scheduler's certificate.
    let other = cluster.tmp.path().join("other-pki");
    crate::cluster::run_ok(&["pki", "init", other.to_str().unwrap()]);
    let out = cluster
        .ctl()
        .args(["workers", "--ca", other.join("ca.pem").to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown CA"), "{}", stderr(&out));

    let out = cluster
        .ctl_output(&["start", "--worker", "nobody", "count.sh"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nobody"), "{}", stderr(&out));
}

/// `bench status` reads a job's status on one kept connection and reports
/// the latency, as JSON with `-o json`; an unknown job is one error line.
#[tokio::test(flavor = "multi_thread")]
async fn bench_status_measures_reading_a_jobs_status() {
    let cluster = Cluster::start(&["w1"]).await;
    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "count.sh", "--", "1", "0"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let jobs: Vec<JobInfo> =
        serde_json::from_slice(&cluster.ctl_output(&["-o", "json", "jobs"]).await.stdout).unwrap();
    let job = &jobs[0].job_id;
    let out = cluster
        .ctl_output(&[
            "-o",
            "json",
            "bench",
            "status",
            "--job",
            job,
            "--requests",
            "40",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "status");
    assert_eq!(report["state"], "succeeded");
    assert_eq!(
        (report["requests"].as_u64(), report["failed"].as_u64()),
        (Some(40), Some(0))
    );
    let p50 = report["latency_ms"]["p50"].as_f64().unwrap();
    let max = report["latency_ms"]["max"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= max, "{report}");

    let out = cluster
        .ctl_output(&["bench", "status", "--job", job, "--requests", "5"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("requests/s"), "{}", stdout(&out));

    let out = cluster
        .ctl_output(&[
            "bench",
            "status",
            "--job",
            "00000000-0000-4000-8000-000000000000",
        ])
        .await;
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

/// `bench start --floor` measures local no-op bash runs first and reports
/// the cluster's start rate as a share of that floor, from several clients
/// (a thread each core) and from one (one thread).
#[tokio::test(flavor = "multi_thread")]
async fn bench_start_reports_its_share_of_the_local_floor() {
    let cluster = Cluster::start(&["w1"]).await;
    for clients in ["2", "1"] {
        let out = cluster
            .ctl_output(&[
                "-o",
                "json",
                "bench",
                "start",
                "--worker",
                "w1",
                "--clients",
                clients,
                "--jobs",
                "8",
                "--script",
                "count.sh",
                "--floor",
            ])
            .await;
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (report["started"].as_u64(), report["failed"].as_u64()),
            (Some(8), Some(0))
        );
        let floor = report["floor_per_second"].as_f64().unwrap();
        let share = report["share_of_floor"].as_f64().unwrap();
        let rate = report["starts_per_second"].as_f64().unwrap();
        assert!(floor > 0.0 && share > 0.0, "{report}");
        assert!((rate / floor - share).abs() < 0.01, "{report}");
        assert!(
            stderr(&out).contains("measuring the floor"),
            "{}",
            stderr(&out)
        );
    }
}

/// A job's output written where it cannot go: to a full disk (`/dev/full`)
/// `run` and `logs` fail and say so; to a pipe its reader closed they end
/// quietly, as `| head` expects. Neither touches the job: `run` still
/// started it, and it ends as it ends.
#[tokio::test(flavor = "multi_thread")]
async fn output_to_a_full_disk_fails_with_the_reason_and_to_a_closed_pipe_quietly() {
    let cluster = Cluster::start(&["w1"]).await;
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let closed_pipe = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let run = ["run", "--worker", "w1", "count.sh", "--", "2", "0"];
    // `output()` would capture stdout whatever it was set to.
    let with_stdout = |args: &[&str], stdout: std::process::Stdio| {
        let child = cluster
            .ctl()
            .args(args)
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.wait_with_output()
    };

    let out = with_stdout(&run, full().into()).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(said.contains("No space left on device"), "{said}");
    let job = said
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .unwrap()
        .to_owned();

    let cases = [
        ("a full disk", full().into(), true),
        ("a closed pipe", closed_pipe().into(), false),
    ];
    for (to, stdout, says_why) in cases {
        let out = with_stdout(&["logs", "-f", &job], stdout).await.unwrap();
        assert_eq!(out.status.code(), Some(1), "logs to {to}");
        assert_eq!(
            stderr(&out).contains("No space left on device"),
            says_why,
            "logs to {to}: {}",
            stderr(&out)
        );
    }
    let out = with_stdout(&run, closed_pipe().into()).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!stderr(&out).contains("clusterctl:"), "{}", stderr(&out));

    // The job ran to its end all the same.
    let out = cluster.ctl_output(&["logs", &job]).await;
    assert_eq!(stdout(&out), "1\n2\ndone\n", "{}", stderr(&out));
}

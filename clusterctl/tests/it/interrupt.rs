//! Ctrl-C (SIGINT) in `run` and `logs -f`, sent to the real clusterctl.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Child;

use crate::cluster::Cluster;
use crate::harness::job_processes;

/// A clusterctl running `args`, its stdout, and its stderr by lines.
fn spawn_ctl(
    cluster: &Cluster,
    args: &[&str],
) -> (
    Child,
    tokio::process::ChildStdout,
    tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) {
    let mut child = cluster
        .ctl()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let err = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, out, err)
}

fn interrupt(child: &Child) {
    let pid = child.id().expect("clusterctl already reaped");
    kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
}

/// Reads `from` until what was read contains `needle`; all of it.
async fn read_until(from: &mut (impl AsyncRead + Unpin), needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = tokio::time::timeout(Duration::from_secs(30), from.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{needle:?} never came; got {:?}",
                    String::from_utf8_lossy(&seen)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "ended before {needle:?}: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Reads stderr lines until one contains `needle`; the lines read.
async fn stderr_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    needle: &str,
) -> String {
    let mut seen = String::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{needle:?} never came on stderr; got {seen:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("stderr ended before {needle:?}; got {seen:?}"));
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(needle) {
            return seen;
        }
    }
}

/// The id in clusterctl's `started job ID on WORKER` line.
fn started_job(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("started job "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `started job` line in {stderr:?}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_run_stops_the_job_waits_for_its_end_and_exits_130() {
    let cluster = Cluster::start(&["w1"]).await;
    let (mut run, mut out, mut err) = spawn_ctl(
        &cluster,
        &["run", "--worker", "w1", "count.sh", "--", "1000", "0.05"],
    );
    let said = stderr_until(&mut err, "started job").await;
    let job_id = started_job(&said);
    read_until(&mut out, "3\n").await;

    interrupt(&run);
    let status = tokio::time::timeout(Duration::from_secs(30), run.wait())
        .await
        .expect("clusterctl run did not end after Ctrl-C")
        .unwrap();
    let mut rest = String::new();
    while let Ok(Some(line)) = err.next_line().await {
        rest.push_str(&line);
        rest.push('\n');
    }
    assert_eq!(status.code(), Some(130), "stderr: {rest}");
    assert!(
        rest.contains(&format!("interrupted: stopping job {job_id}")),
        "{rest}"
    );
    // It waited for the end: the job reads stopped as soon as run is gone.
    let job = cluster.job(&job_id).await;
    assert_eq!(job.state, "stopped", "{job:?}");
    assert!(job.done);
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_logs_follow_only_detaches() {
    let cluster = Cluster::start(&["w1"]).await;
    let job_id = cluster.start_job("w1", "count.sh", &["1000", "0.05"]).await;
    let (mut follow, mut out, mut lines) = spawn_ctl(&cluster, &["logs", "-f", &job_id]);
    read_until(&mut out, "3\n").await;

    interrupt(&follow);
    let status = tokio::time::timeout(Duration::from_secs(10), follow.wait())
        .await
        .expect("clusterctl logs -f did not end after Ctrl-C")
        .unwrap();
    let mut err = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        err.push_str(&line);
        err.push('\n');
    }
    assert_eq!(status.code(), Some(130), "stderr: {err}");
    assert!(err.contains("stopped following"), "{err}");
    // The job is untouched: still running, and still writing.
    let before = cluster.job(&job_id).await;
    assert_eq!(before.state, "running", "{before:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = cluster.job(&job_id).await;
    assert_eq!(after.state, "running", "{after:?}");
    assert!(after.output_bytes > before.output_bytes, "{after:?}");
    let out = cluster.ctl_output(&["stop", &job_id]).await;
    assert!(out.status.success());
}

/// A job that outlives SIGTERM (its plugin's stop_grace is long) keeps a
/// stopping `run` waiting; a second Ctrl-C leaves at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_ctrl_c_leaves_at_once_and_the_job_as_it_is() {
    let cluster = Cluster::start_with(
        &["w1"],
        "",
        "---\n[plugins.stubborn]\nrunner = \"bash\"\nextensions = []\nstop_grace = \"60s\"\n",
    )
    .await;
    // Bounded, so nothing outlives the test for long even if a kill fails.
    std::fs::write(
        cluster.tmp.path().join("scripts/stubborn.sh"),
        "trap 'echo got TERM' TERM\necho ready\nfor i in $(seq 600); do sleep 0.1; done\n",
    )
    .unwrap();
    let (mut run, mut out, mut err) = spawn_ctl(
        &cluster,
        &[
            "run",
            "--worker",
            "w1",
            "--command",
            "stubborn",
            "stubborn.sh",
        ],
    );
    let said = stderr_until(&mut err, "started job").await;
    let job_id = started_job(&said);
    read_until(&mut out, "ready\n").await;

    interrupt(&run);
    stderr_until(&mut err, "interrupted: stopping").await;
    // The stop reached the job, which goes on (60 s of grace).
    read_until(&mut out, "got TERM\n").await;

    let second = Instant::now();
    interrupt(&run);
    let status = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .expect("a second Ctrl-C did not end clusterctl run")
        .unwrap();
    let left = second.elapsed();
    let rest = stderr_until(&mut err, "as it is").await;
    assert_eq!(status.code(), Some(130), "stderr: {rest}");
    assert!(left < Duration::from_secs(5), "took {left:?}");
    assert!(rest.contains(&job_id), "{rest}");
    let job = cluster.job(&job_id).await;
    assert_eq!(job.state, "running", "left as it is: {job:?}");

    for pid in job_processes(&job_id) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_run_all_stops_every_job_of_the_group() {
    let cluster = Cluster::start(&["w1", "w2"]).await;
    let (mut run, mut out, mut err) = spawn_ctl(
        &cluster,
        &["run", "--all", "count.sh", "--", "1000", "0.05"],
    );
    let said = stderr_until(&mut err, "started group").await;
    let group_id = said
        .lines()
        .find_map(|l| l.strip_prefix("started group "))
        .and_then(|rest| rest.split(':').next())
        .unwrap()
        .to_owned();
    read_until(&mut out, "3\n").await;

    interrupt(&run);
    let status = tokio::time::timeout(Duration::from_secs(30), run.wait())
        .await
        .expect("clusterctl run --all did not end after Ctrl-C")
        .unwrap();
    let rest = stderr_until(&mut err, "interrupted").await;
    assert_eq!(status.code(), Some(130), "stderr: {rest}");
    assert!(rest.contains(&format!("group {group_id}")), "{rest}");
    let group: jobcluster_proto::http::GroupInfo =
        cluster.get_json(&format!("/v1/groups/{group_id}")).await;
    assert_eq!(group.state, "stopped", "{group:?}");
    assert_eq!(group.jobs.len(), 2);
    assert!(group.jobs.iter().all(|j| j.state == "stopped"), "{group:?}");
}

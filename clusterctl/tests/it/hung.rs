//! A hung worker (SIGSTOP: alive to TCP, silent to everything else) and a
//! killed one: their jobs read `unknown`, never a final state that later
//! changes, and nobody else waits on them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jobcluster_proto::http::{ErrorBody, JobInfo, JobStarted};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::json;

use crate::cluster::Cluster;

/// Every state the API ever answered for each job: a terminal state, once
/// seen, must be the only state seen afterwards.
#[derive(Debug, Default)]
pub struct Promises {
    seen: HashMap<String, Vec<String>>,
}

impl Promises {
    pub fn record(&mut self, job: &JobInfo) {
        let states = self.seen.entry(job.job_id.clone()).or_default();
        if let Some(end) = states
            .iter()
            .find(|s| matches!(s.as_str(), "succeeded" | "failed" | "stopped" | "lost"))
        {
            assert_eq!(
                &job.state, end,
                "job {} was {end} and then {}: {states:?}",
                job.job_id, job.state
            );
        }
        assert_eq!(job.done, job.state != "running" && job.state != "unknown");
        if states.last() != Some(&job.state) {
            states.push(job.state.clone());
        }
    }

    pub fn history(&self, job_id: &str) -> &[String] {
        self.seen.get(job_id).map(Vec::as_slice).unwrap_or_default()
    }
}

/// A job read through the API, timed.
async fn read(cluster: &Cluster, job_id: &str, promises: &mut Promises) -> (JobInfo, Duration) {
    let started = Instant::now();
    let job = cluster.job(job_id).await;
    let took = started.elapsed();
    promises.record(&job);
    (job, took)
}

async fn place(cluster: &Cluster) -> (StatusCode, serde_json::Value, Duration) {
    let started = Instant::now();
    let (status, body) = cluster
        .post_json("/v1/jobs", &json!({"path": "count.sh", "args": ["1", "0"]}))
        .await;
    (status, body, started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_worker_costs_nobody_else_and_its_job_is_unknown_until_it_answers() {
    let mut cluster = Cluster::start_tuned(&["w1", "w2"], &[("lost_after", "60s")]).await;
    let mut promises = Promises::default();
    let on_w1 = cluster.start_job("w1", "count.sh", &["600", "0.1"]).await;
    let on_w2 = cluster.start_job("w2", "count.sh", &["600", "0.1"]).await;
    let mut normal = Duration::ZERO;
    for _ in 0..10 {
        normal = normal.max(read(&cluster, &on_w2, &mut promises).await.1);
    }
    read(&cluster, &on_w1, &mut promises).await;

    cluster.worker("w1").signal(Signal::SIGSTOP);
    // A read of the hung worker's job waits refresh_timeout (3 s in tests)
    // at most, then answers from the record, marked stale; soon the job is
    // unknown.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (job, took) = read(&cluster, &on_w1, &mut promises).await;
        assert!(took < Duration::from_secs(6), "a read took {took:?}");
        if job.state == "unknown" {
            assert!(job.stale, "{job:?}");
            assert!(!job.done);
            assert!(job.error_text.contains("w1"), "{}", job.error_text);
            break;
        }
        assert!(Instant::now() < deadline, "never unknown: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // From now on everything about w1 is answered at once.
    let (_, took) = read(&cluster, &on_w1, &mut promises).await;
    assert!(took < Duration::from_secs(2), "a read took {took:?}");
    let started = Instant::now();
    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs/{on_w1}/stop", cluster.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);
    let code = reply.json::<ErrorBody>().await.unwrap().code;
    assert!(
        matches!(code.as_str(), "worker_unresponsive" | "worker_down"),
        "{code}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // Placed starts go to the healthy worker, without waiting on w1.
    let w2_id = cluster.worker_info("w2").await.worker_id;
    for _ in 0..6 {
        let (status, body, took) = place(&cluster).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["worker_id"], w2_id.as_str(), "{body}");
        assert!(
            took < Duration::from_secs(5),
            "a placed start took {took:?}"
        );
    }
    // The healthy worker's calls are not slowed (a bound no healthy run
    // misses, not a benchmark).
    let bound = (normal * 5).max(Duration::from_secs(2));
    for _ in 0..10 {
        let (job, took) = read(&cluster, &on_w2, &mut promises).await;
        assert_eq!(job.state, "running");
        assert!(
            took < bound,
            "a read on w2 took {took:?} (normally {normal:?})"
        );
    }

    // The worker comes back within lost_after: its job goes on, reported
    // truthfully, and can be stopped once the worker is back in the
    // cluster (a read may reach it before it registers again, if it was
    // paused long enough to be marked down).
    cluster.worker("w1").signal(Signal::SIGCONT);
    cluster.wait_ready("w1").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (job, _) = read(&cluster, &on_w1, &mut promises).await;
        if job.state == "running" && !job.stale {
            break;
        }
        assert!(Instant::now() < deadline, "never running again: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cluster.ctl_output(&["stop", &on_w1]).await;
    assert!(out.status.success(), "{out:?}");
    let (job, _) = read(&cluster, &on_w1, &mut promises).await;
    assert_eq!(job.state, "stopped");
    assert_eq!(
        promises.history(&on_w1),
        ["running", "unknown", "running", "stopped"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_given_up_as_lost_is_killed_when_its_worker_comes_back() {
    // lost_after 3 s: the partition outlasts it.
    let mut cluster = Cluster::start(&["w1"]).await;
    let mut promises = Promises::default();
    let job_id = cluster.start_job("w1", "count.sh", &["600", "0.1"]).await;
    cluster.worker("w1").signal(Signal::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (job, _) = read(&cluster, &job_id, &mut promises).await;
        if job.state == "lost" {
            break;
        }
        assert!(Instant::now() < deadline, "never lost: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.worker("w1").signal(Signal::SIGCONT);
    // The worker reports the job running; the scheduler keeps `lost` and
    // the worker kills what is left of it.
    let gone = crate::harness::eventually(Duration::from_secs(15), || {
        crate::harness::job_processes(&job_id).is_empty()
    })
    .await;
    assert!(gone, "the lost job still runs after its worker came back");
    for _ in 0..20 {
        let (job, _) = read(&cluster, &job_id, &mut promises).await;
        assert_eq!(job.state, "lost");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // clusterctl run's exit code for lost is documented: 75.
    let out = cluster.ctl_output(&["logs", "-f", &job_id]).await;
    assert_eq!(out.status.code(), Some(75), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_s_job_reads_unknown_at_once_and_placement_moves_on() {
    let mut cluster = Cluster::start_tuned(&["w1", "w2"], &[("lost_after", "60s")]).await;
    let mut promises = Promises::default();
    let job_id = cluster.start_job("w1", "count.sh", &["600", "0.1"]).await;
    read(&cluster, &job_id, &mut promises).await;
    cluster.worker("w1").signal(Signal::SIGKILL);
    cluster.worker("w1").wait(Duration::from_secs(10));
    // The first read finds nobody at w1's address: the answer is the record,
    // stale, and the job unknown from then on.
    let (job, took) = read(&cluster, &job_id, &mut promises).await;
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(job.stale, "{job:?}");
    let (job, _) = read(&cluster, &job_id, &mut promises).await;
    assert_eq!(job.state, "unknown", "{job:?}");
    let w2_id = cluster.worker_info("w2").await.worker_id;
    for _ in 0..4 {
        let (status, body, _) = place(&cluster).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let started: JobStarted = serde_json::from_value(body).unwrap();
        assert_eq!(started.worker_id, w2_id);
    }
    // A worker that comes back without the job (it died) settles it: lost.
    cluster.restart_worker("w1");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (job, _) = read(&cluster, &job_id, &mut promises).await;
        if job.state == "lost" {
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(promises.history(&job_id), ["running", "unknown", "lost"]);
}

/// Writes `n` finished jobs' records into a worker's state directory, as
/// years of history (or a crash right after many ends) would leave them,
/// each finished at `finished_at_ms`; the first `big` carry 1 MB of
/// arguments each.
pub(crate) fn write_history(
    state_dir: &std::path::Path,
    n: usize,
    big: usize,
    finished_at_ms: u64,
) {
    let jobs = state_dir.join("jobs");
    let large = "x".repeat(1 << 20);
    for i in 0..n {
        let id = uuid::Uuid::new_v4();
        let dir = jobs.join(id.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let args = if i < big {
            vec![large.as_str()]
        } else {
            vec!["1"]
        };
        let record = json!({
            "id": id, "command": "bash", "path": "count.sh", "args": args,
            "state": "succeeded", "exit_code": 0, "signal": null, "error_text": "",
            "created_at_ms": finished_at_ms, "started_at_ms": finished_at_ms,
            "finished_at_ms": finished_at_ms, "pgid": null, "output_bytes": 2,
        });
        std::fs::write(dir.join("job.json"), serde_json::to_vec(&record).unwrap()).unwrap();
        std::fs::write(dir.join("output.log"), "1\n").unwrap();
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn rss_kib(pid: u32) -> u64 {
    crate::cluster::status_kib(pid, "VmRSS")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_a_long_history_registers_in_seconds_and_does_not_hold_it_in_memory() {
    let mut cluster = Cluster::start(&["w1"]).await;
    let w1_id = cluster.worker_info("w1").await.worker_id;
    cluster.worker("w1").signal(Signal::SIGTERM);
    cluster.worker("w1").wait(Duration::from_secs(20));
    // 20,000 finished jobs, 100 of them with 1 MB of arguments: together
    // over 100 MB of records, more than one registration message may carry.
    // JOBCLUSTER_HISTORY_JOBS measures a longer history (docs/PERFORMANCE.md).
    let n: usize = std::env::var("JOBCLUSTER_HISTORY_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let state_dir = cluster.tmp.path().join("state/w1");
    write_history(&state_dir, n, 100, now_ms() - 2 * 24 * 3600 * 1000);

    let started = Instant::now();
    cluster.restart_worker("w1");
    // Longer than `wait_state`'s 10 s: the bound asserted below is 20 s.
    crate::faults::until(Duration::from_secs(30), "w1 ready", || async {
        cluster.worker_state("w1").await == "ready"
    })
    .await;
    let took = started.elapsed();
    eprintln!("a worker with {n} finished jobs registered in {took:?}");
    assert!(took < Duration::from_secs(20), "registration took {took:?}");
    assert_eq!(cluster.worker_info("w1").await.worker_id, w1_id);
    // It works, and its history is on disk, not in memory.
    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "count.sh", "--", "2", "0"])
        .await;
    assert!(out.status.success(), "{out:?}");
    let rss = rss_kib(cluster.worker("w1").child.id());
    eprintln!("its resident memory: {rss} KiB");
    assert!(
        rss < 64 * 1024,
        "workerd holds {rss} KiB after loading its history"
    );
    let log = cluster.worker("w1").log();
    assert!(log.contains(&format!("on_disk={n} kept=0")), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_scheduler_gives_up_no_job_when_it_wakes() {
    // lost_after is 3 s in tests: the scheduler sleeps longer than that.
    let cluster = Cluster::start(&["w1"]).await;
    let mut promises = Promises::default();
    let job_id = cluster.start_job("w1", "count.sh", &["600", "0.1"]).await;
    read(&cluster, &job_id, &mut promises).await;
    cluster.scheduler.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.scheduler.signal(Signal::SIGCONT);
    // Its own silence is not the workers': nothing is down, unknown or lost.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (job, _) = read(&cluster, &job_id, &mut promises).await;
        assert_eq!(job.state, "running", "{job:?}");
        assert_eq!(cluster.worker_state("w1").await, "ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!crate::harness::job_processes(&job_id).is_empty());
}

/// A worker's retention keeps the record of a job whose end the scheduler
/// has not heard of: with the scheduler down past `max_record_age`, the
/// record went, and the scheduler, back, recorded the job `lost` (the
/// worker registered without it) when it had succeeded.
#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_a_record_the_scheduler_has_not_heard_of() {
    let mut cluster = Cluster::start(&[]).await;
    // max_bytes only to sweep right after a job ends (5 s after it).
    cluster.add_worker_with(
        "w3",
        "[retention]\nmax_record_age = \"1s\"\nmax_bytes = 1000000000\n",
    );
    cluster.wait_ready("w3").await;
    let job_id = cluster.start_job("w3", "count.sh", &["2", "0.5"]).await;
    cluster.stop_scheduler(Signal::SIGKILL);
    // The job ends about 1 s in; the sweep after it runs 5 s later.
    let swept = cluster.worker("w3").log().matches("retention").count();
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.start_scheduler_again();
    crate::faults::until(
        Duration::from_secs(20),
        "the job's end recorded",
        || async { cluster.job(&job_id).await.done },
    )
    .await;
    let job = cluster.job(&job_id).await;
    assert_eq!(job.state, "succeeded", "{job:?}");
    assert_eq!(
        cluster.worker("w3").log().matches("retention").count(),
        swept,
        "nothing deleted while unreported"
    );
    let out = cluster.ctl_output(&["logs", &job_id]).await;
    assert_eq!(crate::cluster::stdout(&out), "1\n2\ndone\n");
}

/// A worker keeps at most 1,000 finished jobs in memory: a job pushed out
/// by a thousand later ones is still shown and its output still served,
/// from its record and log on disk.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_pushed_out_of_worker_memory_is_still_served_from_disk() {
    let cluster = Cluster::start(&["w1"]).await;
    cluster.add_repo_script("true.sh");
    let first = cluster.start_job("w1", "count.sh", &["3", "0"]).await;
    crate::faults::until(Duration::from_secs(15), "the first job ended", || async {
        cluster.job(&first).await.state == "succeeded"
    })
    .await;
    let out = cluster
        .ctl_output(&[
            "-o",
            "json",
            "bench",
            "start",
            "--worker",
            "w1",
            "--clients",
            "8",
            "--jobs",
            "1010",
            "--script",
            "true.sh",
        ])
        .await;
    assert!(out.status.success(), "{}", crate::cluster::stderr(&out));
    crate::faults::until(Duration::from_secs(60), "every job ended", || async {
        let running: jobcluster_proto::http::JobList =
            cluster.get_json("/v1/jobs?state=running&limit=1").await;
        running.jobs.is_empty()
    })
    .await;
    // The worker lets jobs leave memory every 2 s; two rounds.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let out = cluster.ctl_output(&["logs", &first]).await;
    assert!(out.status.success(), "{}", crate::cluster::stderr(&out));
    assert_eq!(crate::cluster::stdout(&out), "1\n2\n3\ndone\n");
    let out = cluster.ctl_output(&["-o", "json", "status", &first]).await;
    let job: JobInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((job.state.as_str(), job.exit_code), ("succeeded", Some(0)));
}

/// Memory a burst of followers needed goes back to the system once they
/// are gone: the worker does not stay at its peak. The followers read a
/// finished log from 64 offsets 512 KiB apart, so the scheduler opens a
/// worker stream for each (followers from one offset would share one),
/// and read nothing until the burst shows in the worker's memory.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_gives_back_the_memory_of_a_burst_of_followers() {
    let mut cluster = Cluster::start(&["w1"]).await;
    cluster.add_repo_script("blast.sh");
    let pid = cluster.worker("w1").child.id();
    let idle = rss_kib(pid);
    let size = 32 << 20;
    let job = cluster
        .start_job("w1", "blast.sh", &[&size.to_string()])
        .await;
    crate::faults::until(Duration::from_secs(30), "the job ended", || async {
        cluster.job(&job).await.state == "succeeded"
    })
    .await;
    // Every stream opened before any is read: each backs up on the worker
    // (its messages queued, its window full) while the memory is measured.
    let opened = (0..64u64).map(|i| {
        let url = format!(
            "{}/v1/jobs/{job}/logs?offset={}",
            cluster.url(),
            i * (512 << 10)
        );
        // A connection each, as separate clients come.
        let client = cluster.http_version_within(true, None);
        async move { client.get(url).send().await.unwrap() }
    });
    let streams = futures_util::future::join_all(opened).await;
    let peak = std::sync::atomic::AtomicU64::new(0);
    crate::faults::until(
        Duration::from_secs(30),
        "the burst showed in the worker's memory",
        || {
            let peak = &peak;
            async move {
                let now = rss_kib(pid);
                peak.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                // At least 1 MiB queued for each of the 54 streams with
                // more left than the client's window takes; well past the
                // 16 MiB the worker's trim leaves in place.
                now > idle + 40 * 1024
            }
        },
    )
    .await;
    let peak = peak.into_inner();
    let read = futures_util::future::join_all(
        streams
            .into_iter()
            .map(|stream| async move { stream.bytes().await.unwrap().len() as u64 }),
    )
    .await;
    let expected: Vec<u64> = (0..64u64).map(|i| size - i * (512 << 10)).collect();
    assert_eq!(read, expected);
    let bound = idle + (peak - idle) / 2;
    crate::faults::until(
        Duration::from_secs(40),
        "the worker gave memory back",
        || async { rss_kib(pid) < bound },
    )
    .await;
}

/// Two `clusterctl logs -f` of one job, sharing its worker stream in the
/// scheduler, while the worker is paused (SIGSTOP) for longer than a call
/// to it may take and then goes on: the shared stream waits through the
/// pause (no follower is cut and resumes), and each follower prints every
/// line once and in order and exits with the job's code. A pause is no
/// end: nobody is told the output is complete, and nobody gives up.
#[tokio::test(flavor = "multi_thread")]
async fn followers_on_one_worker_stream_ride_out_a_paused_worker() {
    use tokio::io::AsyncBufReadExt;
    let mut cluster = Cluster::start_tuned(&["w1"], crate::cluster::PAUSED_WORKER_TUNING).await;
    // The scheduler's metric `name` now.
    async fn metric(cluster: &Cluster, name: &str) -> f64 {
        let url = format!("{}/metrics", cluster.url());
        let scrape = crate::metrics::scrape_with(&cluster.http(), &url).await;
        crate::metrics::value(&scrape, name, &[])
    }
    // Worker streams the scheduler opened so far.
    const STREAMS: &str = "schedulerd_output_worker_streams_total";
    // Quiet until both followers are there, so they share one stream.
    cluster.add_script(
        "slow.sh",
        &format!(
            "#!/bin/bash\n{}for i in $(seq 1 \"$1\"); do echo \"$i\"; sleep 0.02; done\n",
            crate::cluster::WAIT_TO_GO
        ),
    );
    let lines = 200;
    let job = cluster
        .start_job("w1", "slow.sh", &[&lines.to_string()])
        .await;
    let before = metric(&cluster, STREAMS).await;
    let mut followers = [cluster.spawn_follow(&job), cluster.spawn_follow(&job)];
    crate::faults::until(Duration::from_secs(20), "two followers", || async {
        metric(&cluster, "schedulerd_followers").await >= 2.0
    })
    .await;
    cluster.let_go();
    let mut outputs = Vec::new();
    for follower in &mut followers {
        let mut out = tokio::io::BufReader::new(follower.stdout.take().unwrap());
        let mut first = String::new();
        tokio::time::timeout(Duration::from_secs(20), out.read_line(&mut first))
            .await
            .expect("no output within 20 s")
            .unwrap();
        assert_eq!(first, "1\n");
        outputs.push((first, out));
    }
    // Both are reading: the worker pauses, past call_timeout (1 s), in
    // which a call to it, or a read of its stream, would have given up,
    // and past the 5 s after which the liveness check suspects it.
    cluster.worker("w1").signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(7)).await;
    cluster.worker("w1").signal(Signal::SIGCONT);
    let expected: String = (1..=lines).map(|i| format!("{i}\n")).collect();
    for (follower, (mut text, mut out)) in followers.into_iter().zip(outputs) {
        let read = async {
            tokio::io::AsyncReadExt::read_to_string(&mut out, &mut text)
                .await
                .unwrap();
            follower.wait_with_output().await.unwrap()
        };
        let done = tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .expect("a follower never ended");
        let said = crate::cluster::stderr(&done);
        assert!(done.status.success(), "{:?}: {said}", done.status);
        assert!(!said.contains("resuming"), "cut during the pause: {said}");
        assert!(text == expected, "a follower's output differs: {text:?}");
    }
    assert_eq!(cluster.job(&job).await.state, "succeeded");
    assert_eq!(
        metric(&cluster, STREAMS).await - before,
        1.0,
        "both on one worker stream"
    );
}

/// Followers who arrive together at a job of a hung worker (SIGSTOP,
/// still `ready` to the scheduler) wait on the one of them that opens its
/// worker stream. When that open gives up (`call_timeout`), the others are
/// let go (each then tries on its own, and finds the worker unresponsive):
/// every one is told with an error soon after, rather than an output that
/// ends or a wait until its client gives up, and so is a follower who comes
/// after.
#[tokio::test(flavor = "multi_thread")]
async fn followers_waiting_on_an_open_that_fails_are_each_told_at_once() {
    let mut cluster = Cluster::start_tuned(&["w1"], crate::cluster::PAUSED_WORKER_TUNING).await;
    let job = cluster.start_job("w1", "count.sh", &["600", "0.1"]).await;
    cluster.worker("w1").signal(Signal::SIGSTOP);
    let follow = || async {
        let started = Instant::now();
        let outcome = match cluster.follow_job(&job).await {
            response if response.status() != StatusCode::OK => Err(response.status().to_string()),
            response => match response.bytes().await {
                Ok(body) => Ok(body),
                Err(error) => Err(error.to_string()),
            },
        };
        (outcome, started.elapsed())
    };
    let together = tokio::join!(follow(), follow(), follow());
    let after = follow().await;
    cluster.worker("w1").signal(Signal::SIGCONT);
    for (outcome, took) in [together.0, together.1, together.2, after] {
        assert!(
            outcome.is_err(),
            "an output from a hung worker: {outcome:?}"
        );
        // call_timeout is 1 s: a bound no healthy run misses, well under
        // the client's own 30 s.
        assert!(took < Duration::from_secs(8), "told after {took:?}");
    }
}

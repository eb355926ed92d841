//! The durable queue: jobs wait for a free slot instead of being refused,
//! in order (priority, then arrival), each started exactly once, across a
//! scheduler killed with SIGKILL.

use std::collections::HashMap;
use std::time::Duration;

use jobcluster_proto::http::{JobInfo, JobList, JobStarted, StopResult};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::Cluster;

async fn post(cluster: &Cluster, body: Value) -> (StatusCode, Value) {
    cluster.post_json("/v1/jobs", &body).await
}

/// A start that the scheduler accepted (started or queued).
/// `count.sh ARGS` on every worker as one group, answered 202: some member
/// waits in the queue.
async fn submit_group(cluster: &Cluster, args: &[&str]) -> jobcluster_proto::http::GroupStarted {
    let (status, answer) = cluster
        .post_json(
            "/v1/groups",
            &json!({"all": true, "path": "count.sh", "args": args}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    serde_json::from_value(answer).unwrap()
}

/// Two workers of one slot each, `wgpu` labelled kind=gpu and `wcpu`
/// labelled kind=cpu.
async fn gpu_and_cpu_workers() -> Cluster {
    let mut cluster = Cluster::start(&[]).await;
    for kind in ["gpu", "cpu"] {
        cluster.add_worker_with(
            &format!("w{kind}"),
            &format!("max_jobs = 1\nlabels = {{ kind = \"{kind}\" }}\n---\n"),
        );
    }
    for kind in ["gpu", "cpu"] {
        cluster.wait_ready(&format!("w{kind}")).await;
    }
    cluster
}

async fn submit(cluster: &Cluster, body: Value) -> JobStarted {
    let (status, answer) = post(cluster, body).await;
    assert!(
        status == StatusCode::CREATED || status == StatusCode::ACCEPTED,
        "{status}: {answer}"
    );
    let started: JobStarted = serde_json::from_value(answer).unwrap();
    assert_eq!(
        status == StatusCode::ACCEPTED,
        started.state.as_deref() == Some("queued")
    );
    // A job started now names its worker; a queued one does where its
    // worker is known (named, or chosen), and never names another.
    if status == StatusCode::CREATED {
        assert!(started.worker_name.is_some(), "{started:?}");
    }
    if let Some(name) = &started.worker_name {
        assert!(name.starts_with('w'), "{started:?}");
    }
    started
}

async fn all_done(cluster: &Cluster, ids: &[String], timeout: Duration) -> Vec<JobInfo> {
    let ended = tokio::time::Instant::now() + timeout;
    loop {
        let mut jobs = Vec::new();
        for id in ids {
            jobs.push(cluster.job(id).await);
        }
        if jobs.iter().all(|j| j.done) {
            return jobs;
        }
        assert!(
            tokio::time::Instant::now() < ended,
            "jobs not done in time: {:?}",
            jobs.iter()
                .filter(|j| !j.done)
                .map(|j| (&j.job_id, &j.state))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ms(rfc3339: &str) -> u128 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Most jobs that ran at once on each worker, from the workers' own start
/// and end times.
fn most_at_once(jobs: &[JobInfo]) -> HashMap<String, usize> {
    let mut events: HashMap<String, Vec<(u128, i32)>> = HashMap::new();
    for j in jobs {
        let start = ms(j.started_at.as_deref().unwrap());
        let end = ms(j.finished_at.as_deref().unwrap());
        let e = events.entry(j.worker_id.clone()).or_default();
        e.push((start, 1));
        e.push((end, -1));
    }
    events
        .into_iter()
        .map(|(w, mut e)| {
            // An end and a start at the same millisecond: the end first.
            e.sort();
            let (mut now, mut most) = (0i32, 0i32);
            for (_, d) in e {
                now += d;
                most = most.max(now);
            }
            (w, most as usize)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_jobs_on_four_slots_all_run_in_queue_order_and_priority_overtakes() {
    let cluster = Cluster::start_with(&["w1", "w2"], "", "max_jobs = 2\n---\n").await;
    let queued: JobList = cluster.get_json("/v1/jobs?state=queued").await;
    assert!(queued.jobs.is_empty());
    let w1 = cluster.worker_info("w1").await;
    assert_eq!((w1.max_jobs, w1.free_slots), (2, Some(2)));

    let mut ids = Vec::new();
    let mut queued = 0;
    for _ in 0..50 {
        let started = submit(
            &cluster,
            json!({"path": "count.sh", "args": ["2", "0.1"], "priority": 0}),
        )
        .await;
        queued += usize::from(started.state.is_some());
        ids.push(started.job_id);
    }
    assert!(queued >= 40, "only {queued} of 50 jobs queued on 4 slots");
    let urgent = submit(
        &cluster,
        json!({"path": "count.sh", "args": ["2", "0.1"], "priority": 10}),
    )
    .await;
    // Ahead of every queued job: started at once if a slot was free, or
    // first in the queue.
    if urgent.state.is_some() {
        assert_eq!(urgent.position, Some(0), "a higher priority goes first");
    }

    let info = cluster.job(&ids[49]).await;
    if info.state == "queued" {
        assert!(info.position.unwrap() > 0);
        assert!(info.queued_at.is_some());
        assert!(
            info.reason.as_deref().unwrap().contains("slot"),
            "{:?}",
            info.reason
        );
    }
    let list: JobList = cluster.get_json("/v1/jobs?state=queued&limit=1000").await;
    let order: Vec<&str> = list.jobs.iter().map(|j| j.job_id.as_str()).collect();
    let expected: Vec<&str> = std::iter::once(urgent.job_id.as_str())
        .chain(ids.iter().map(String::as_str))
        .filter(|id| order.contains(id))
        .collect();
    assert_eq!(
        order, expected,
        "GET /v1/jobs?state=queued is in queue order"
    );
    // A listing, like every other: without each job's args.
    assert!(list.jobs.iter().all(|j| j.args.is_none()), "{list:?}");

    let mut all = ids.clone();
    all.push(urgent.job_id.clone());
    let jobs = all_done(&cluster, &all, Duration::from_secs(120)).await;
    for j in &jobs {
        assert_eq!(j.state, "succeeded", "{j:?}");
        assert!(j.position.is_none());
    }
    for (worker, most) in most_at_once(&jobs) {
        assert!(most <= 2, "worker {worker} ran {most} jobs at once");
    }
    // Dispatch order is the order of the start records (created_at is
    // written when the dispatcher takes a job). The urgent job never
    // raced the dispatcher for a slot (it was queued while jobs waited),
    // so no worker refused a job as busy and sent it behind later ones.
    let log = cluster.scheduler.log();
    for i in 0..49 {
        let (a, b) = (ms(&jobs[i].created_at), ms(&jobs[i + 1].created_at));
        if a > b {
            // What the daemons said about the two jobs tells why.
            let mut said = String::new();
            for (who, log) in std::iter::once(("scheduler".to_owned(), log.clone()))
                .chain(cluster.workers.iter().map(|(n, w)| (n.clone(), w.log())))
            {
                let about = |l: &&str| {
                    [
                        jobs[i].job_id.as_str(),
                        &jobs[i + 1].job_id,
                        "refused",
                        "leader",
                    ]
                    .iter()
                    .any(|s| l.contains(s))
                };
                for line in log.lines().filter(about) {
                    said.push_str(&format!("{who}: {line}\n"));
                }
            }
            panic!(
                "first come, first served: job {i} was taken after job {}: {:#?}\n{said}",
                i + 1,
                [&jobs[i], &jobs[i + 1]]
            );
        }
    }
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("queued job not started") && l.contains("maximum"))
        .collect();
    assert!(
        refused.is_empty(),
        "a worker refused a dispatched job as busy: {}",
        refused.join("\n")
    );
    let taken: Vec<u128> = jobs.iter().map(|j| ms(&j.created_at)).collect();
    let urgent_taken = taken[50];
    assert!(
        urgent_taken <= taken[45],
        "the urgent job overtook the jobs queued before it"
    );
}

/// A queued job starts with the args and env of its request, though the
/// queue's reads (listings, the dispatcher's pass) leave both out: the
/// dispatcher takes them with the job it claims.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_job_starts_with_its_args_and_env() {
    let cluster = Cluster::start_with(
        &["w1"],
        "",
        "max_jobs = 1\n---\n[plugins.greet]\nrunner = \"bash\"\nextensions = []\nallow_env = [\"GREETING\"]\n",
    )
    .await;
    std::fs::write(
        cluster.tmp.path().join("scripts/greet.sh"),
        "echo \"$GREETING|$1|$2\"\n",
    )
    .unwrap();
    let blocker = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["600", "0.1"]}),
    )
    .await;
    let (status, answer) = post(
        &cluster,
        json!({"worker_id": "w1", "command": "greet", "path": "greet.sh",
            "args": ["a b", "c"], "env": {"GREETING": "hi"}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let queued: JobStarted = serde_json::from_value(answer).unwrap();
    let list: JobList = cluster.get_json("/v1/jobs?state=queued").await;
    assert_eq!(list.jobs.len(), 1, "{list:?}");
    assert_eq!(list.jobs[0].args, None, "a listing carries no args");
    let shown = cluster.job(&queued.job_id).await;
    assert_eq!(shown.args, Some(vec!["a b".to_owned(), "c".to_owned()]));

    let out = cluster.ctl_output(&["stop", &blocker.job_id]).await;
    assert!(out.status.success(), "{}", crate::cluster::stderr(&out));
    let out = cluster.ctl_output(&["logs", "-f", &queued.job_id]).await;
    assert!(out.status.success(), "{}", crate::cluster::stderr(&out));
    assert_eq!(crate::cluster::stdout(&out), "hi|a b|c\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_jobs_survive_a_killed_scheduler_and_run_exactly_once_in_order() {
    let mut cluster = Cluster::start_with(&["w1"], "", "max_jobs = 1\n---\n").await;
    let mut ids = Vec::new();
    // Each job lasts a tenth of a second, so most are still queued when
    // the scheduler is killed however fast the queue moves.
    for _ in 0..31 {
        ids.push(
            submit(
                &cluster,
                json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0.1"]}),
            )
            .await
            .job_id,
        );
    }
    let list: JobList = cluster.get_json("/v1/jobs?state=queued&limit=1000").await;
    assert!(list.jobs.len() >= 20, "{} queued", list.jobs.len());
    cluster.restart_scheduler(Signal::SIGKILL);

    let jobs = all_done(&cluster, &ids, Duration::from_secs(120)).await;
    for j in &jobs {
        assert_eq!(j.state, "succeeded", "{j:?}");
        assert_eq!(cluster.worker_log("w1", &j.job_id), b"1\ndone\n");
    }
    // One job at a time, so start times follow the queue.
    let starts: Vec<u128> = jobs
        .iter()
        .map(|j| ms(j.started_at.as_deref().unwrap()))
        .collect();
    for pair in starts.windows(2) {
        assert!(pair[0] <= pair[1], "started out of order: {starts:?}");
    }
    // Exactly once: the worker has one directory per job, no more.
    let dirs = std::fs::read_dir(cluster.tmp.path().join("state/w1/jobs"))
        .unwrap()
        .count();
    assert_eq!(dirs, 31);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_job_can_be_stopped_or_time_out_and_the_queue_has_a_bound() {
    let mut cluster = Cluster::start_with(
        &["w1"],
        "[scheduler]\nmax_queued = 2\n",
        "max_jobs = 1\n---\n",
    )
    .await;
    let long = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["100", "0.1"]}),
    )
    .await;
    assert_eq!(long.state, None, "started: 201");

    // Without the queue: refused as before.
    let (status, answer) = post(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "queue": false}),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("worker_busy"))
    );
    let (status, answer) = post(&cluster, json!({"path": "count.sh", "queue": false})).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::CONFLICT, Some("no_eligible_worker"))
    );

    // Stopped while queued: ends stopped, never started.
    let waiting = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]}),
    )
    .await;
    let info = cluster.job(&waiting.job_id).await;
    assert_eq!(
        (info.state.as_str(), info.done, info.position),
        ("queued", false, Some(0))
    );
    let out = cluster
        .ctl_output(&["jobs", "--state", "queued", "-o", "json"])
        .await;
    let listed: Vec<JobInfo> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1);
    let stopped: StopResult = cluster
        .http()
        .post(format!("{}/v1/jobs/{}/stop", cluster.url(), waiting.job_id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stopped.state, "stopped");
    let info = cluster.job(&waiting.job_id).await;
    assert_eq!(
        (info.state.as_str(), info.started_at.as_deref()),
        ("stopped", None)
    );

    // A queue timeout fails a job that waited too long.
    let late = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "queue_timeout": "1s"}),
    )
    .await;
    let info = all_done(
        &cluster,
        std::slice::from_ref(&late.job_id),
        Duration::from_secs(10),
    )
    .await
    .remove(0);
    assert_eq!(info.state, "failed");
    assert!(
        info.error_text.contains("queue_timeout"),
        "{}",
        info.error_text
    );
    assert!(info.started_at.is_none());

    // max_queued = 2.
    let a = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]}),
    )
    .await;
    let b = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]}),
    )
    .await;
    let (status, answer) = post(&cluster, json!({"worker_id": "w1", "path": "count.sh"})).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("queue_full"))
    );

    // A draining worker: refused at once unless the job may wait for it.
    cluster
        .http()
        .post(format!("{}/v1/workers/w1/drain", cluster.url()))
        .send()
        .await
        .unwrap();
    let (status, answer) = post(&cluster, json!({"worker_id": "w1", "path": "count.sh"})).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::CONFLICT, Some("worker_draining"))
    );

    // The long job ends; the queued ones run, once the worker is undrained.
    assert!(
        cluster
            .ctl_output(&["stop", &long.job_id])
            .await
            .status
            .success()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        cluster.job(&a.job_id).await.state,
        "queued",
        "not on a draining worker"
    );
    cluster
        .http()
        .post(format!("{}/v1/workers/w1/undrain", cluster.url()))
        .send()
        .await
        .unwrap();
    let jobs = all_done(&cluster, &[a.job_id, b.job_id], Duration::from_secs(30)).await;
    assert!(jobs.iter().all(|j| j.state == "succeeded"), "{jobs:?}");
    let _ = &mut cluster;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_waits_through_the_queue_then_follows() {
    let cluster = Cluster::start_with(&["w1"], "", "max_jobs = 1\n---\n").await;
    let long = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["10", "0.1"]}),
    )
    .await;
    let out = cluster
        .ctl_output(&[
            "run",
            "--worker",
            "w1",
            "--priority",
            "3",
            "count.sh",
            "--",
            "2",
            "0",
        ])
        .await;
    assert!(out.status.success(), "{}", crate::cluster::stderr(&out));
    assert_eq!(
        crate::cluster::stdout(&out),
        "1\n2\ndone\n",
        "{}",
        crate::cluster::stderr(&out)
    );
    let err = crate::cluster::stderr(&out);
    assert!(err.contains("queued job"), "{err}");
    assert!(err.contains("started job"), "{err}");
    let _ = long;

    // logs -f on a queued job waits for it to start, then follows it.
    let _long = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["10", "0.1"]}),
    )
    .await;
    let waiting = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]}),
    )
    .await;
    assert_eq!(waiting.state.as_deref(), Some("queued"));
    let out = cluster.ctl_output(&["logs", "-f", &waiting.job_id]).await;
    let err = crate::cluster::stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(crate::cluster::stdout(&out), "1\ndone\n", "{err}");
    assert!(err.contains("is queued"), "{err}");
    assert!(err.contains("started"), "{err}");
}

/// A job that could start is found behind more than a thousand that
/// cannot: a pass looked past 1,000 waiting jobs and stopped there, so a
/// job for another kind of worker behind them never started, however long
/// the slot it waited for stayed free.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_behind_a_thousand_that_cannot_start_is_found() {
    use futures_util::StreamExt;
    let cluster = gpu_and_cpu_workers().await;
    let long = json!({"path": "count.sh", "args": ["600", "0.1"]});
    let mut blockers = HashMap::new();
    for kind in ["gpu", "cpu"] {
        let mut body = long.clone();
        body["worker_id"] = json!(format!("w{kind}"));
        blockers.insert(kind, submit(&cluster, body).await.job_id);
    }
    let answers: Vec<StatusCode> = futures_util::stream::iter(0..1050)
        .map(|_| {
            post(
                &cluster,
                json!({"path": "count.sh", "args": ["1", "0"], "selector": {"kind": "gpu"}}),
            )
        })
        .buffer_unordered(16)
        .map(|(status, _)| status)
        .collect()
        .await;
    assert!(
        answers.iter().all(|s| *s == StatusCode::ACCEPTED),
        "every gpu job queued"
    );
    let behind = submit(
        &cluster,
        json!({"path": "count.sh", "args": ["1", "0"], "selector": {"kind": "cpu"}}),
    )
    .await;
    assert_eq!(behind.state.as_deref(), Some("queued"));
    let out = cluster.ctl_output(&["stop", &blockers["cpu"]]).await;
    assert!(out.status.success(), "{}", crate::cluster::stderr(&out));
    crate::faults::until(Duration::from_secs(20), "the cpu job done", || async {
        cluster.job(&behind.job_id).await.done
    })
    .await;
    let job = cluster.job(&behind.job_id).await;
    assert_eq!(job.state, "succeeded", "{job:?}");
    assert_eq!(job.worker_id, cluster.worker_info("wcpu").await.worker_id);
}

/// Not a test: the scheduler's CPU while 10,000 queued jobs wait for a
/// full worker and another worker's slot stays free (every dispatcher pass
/// then reads the whole queue, passing over the jobs of one shape). Run
/// with `cargo test --release -p jobcluster-clusterctl --test it
/// queue::bench_a_free -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark"]
async fn bench_a_free_slot_behind_ten_thousand_unfit() {
    let cluster = gpu_and_cpu_workers().await;
    submit(
        &cluster,
        json!({"worker_id": "wgpu", "path": "count.sh", "args": ["1000", "1"]}),
    )
    .await;
    let cluster = std::sync::Arc::new(cluster);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..625 {
                let (status, _) = post(
                    &cluster,
                    json!({"path": "count.sh", "args": ["1", "0"], "selector": {"kind": "gpu"}}),
                )
                .await;
                assert_eq!(status, StatusCode::ACCEPTED);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let pid = cluster.scheduler.child.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, t) = (crate::cluster::cpu_seconds(pid), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let share = (crate::cluster::cpu_seconds(pid) - before) / t.elapsed().as_secs_f64() * 100.0;
    println!(
        "10,000 queued for a full worker, another's slot free: scheduler at {share:.1} % of a core"
    );
    let page = std::time::Instant::now();
    let _: JobList = cluster.get_json("/v1/jobs?limit=100").await;
    println!("GET /v1/jobs?limit=100 meanwhile: {:?}", page.elapsed());
}

/// `run` of a queued job rides out a scheduler restart of several seconds:
/// it gave up after five failed asks (about five seconds) and exited 1,
/// leaving its job to start later with nobody following it.
#[tokio::test(flavor = "multi_thread")]
async fn run_rides_out_a_scheduler_restart_while_its_job_is_queued() {
    let mut cluster = Cluster::start_with(&["w1"], "", "max_jobs = 1\n---\n").await;
    let blocker = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["600", "0.1"]}),
    )
    .await;
    let run = cluster
        .ctl()
        .args(["run", "--worker", "w1", "count.sh", "--", "2", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::faults::until(Duration::from_secs(10), "run's job queued", || async {
        let list: JobList = cluster.get_json("/v1/jobs?state=queued").await;
        list.jobs.len() == 1
    })
    .await;
    cluster.stop_scheduler(Signal::SIGKILL);
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.start_scheduler_again();
    crate::faults::until(Duration::from_secs(20), "the blocker stopped", || async {
        let out = cluster.ctl_output(&["stop", &blocker.job_id]).await;
        out.status.success()
    })
    .await;
    let out = tokio::time::timeout(Duration::from_secs(60), run.wait_with_output())
        .await
        .expect("run ends")
        .unwrap();
    let err = crate::cluster::stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(crate::cluster::stdout(&out), "1\n2\ndone\n", "{err}");
    assert!(err.contains("asking about job"), "{err}");
}

/// Not a test: with 10,000 jobs queued, how long a freed slot takes to
/// start the next job and how fast the API answers. Run with
/// `cargo test -p jobcluster-clusterctl --test it queue::bench -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark"]
async fn bench_ten_thousand_queued() {
    let cluster = Cluster::start_with(&["w1"], "", "max_jobs = 1\n---\n").await;
    let blocker = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["1000", "1"]}),
    )
    .await;
    // The API's pace with an empty queue, then with 10,000 jobs in it, on
    // requests whose answers are the same size either way.
    let paths = [
        "/v1/jobs?limit=1".to_owned(),
        "/v1/workers".to_owned(),
        format!("/v1/jobs/{}", blocker.job_id),
    ];
    let pace = |cluster: &Cluster, path: String| {
        let (http, url) = (cluster.http(), cluster.url());
        async move {
            let t = std::time::Instant::now();
            for _ in 0..20 {
                let reply = http.get(format!("{url}{path}")).send().await.unwrap();
                assert!(reply.status().is_success());
                reply.bytes().await.unwrap();
            }
            t.elapsed() / 20
        }
    };
    let mut empty = Vec::new();
    for path in &paths {
        empty.push(pace(&cluster, path.clone()).await);
    }
    let began = std::time::Instant::now();
    let cluster = std::sync::Arc::new(cluster);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..625 {
                let started = submit(
                    &cluster,
                    json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]}),
                )
                .await;
                ids.push(started.job_id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    println!("queued 10,000 jobs in {:?}", began.elapsed());
    for (path, empty) in paths.iter().zip(empty) {
        let full = pace(&cluster, path.clone()).await;
        println!("GET {path}: {full:?} per request (empty queue: {empty:?})");
    }
    let page = pace(&cluster, "/v1/jobs?state=queued&limit=100".to_owned()).await;
    println!("GET /v1/jobs?state=queued&limit=100: {page:?} per request");
    let head: JobList = cluster.get_json("/v1/jobs?state=queued&limit=1").await;
    let first = head.jobs[0].job_id.clone();
    let t = std::time::Instant::now();
    let _ = cluster.job(&ids[9_999]).await;
    let _ = cluster.job(&ids[9_999]).await;
    println!(
        "GET /v1/jobs/{{last queued}} (with its position): {:?}",
        t.elapsed() / 2
    );
    assert!(
        cluster
            .ctl_output(&["stop", &blocker.job_id])
            .await
            .status
            .success()
    );
    let done = all_done(
        &cluster,
        std::slice::from_ref(&blocker.job_id),
        Duration::from_secs(30),
    )
    .await;
    let mut next = None;
    for _ in 0..120 {
        let job = cluster.job(&first).await;
        if job.started_at.is_some() {
            next = Some(job);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let next = next.expect("the first queued job started");
    let freed = ms(done[0].finished_at.as_deref().unwrap());
    let started = ms(next.started_at.as_deref().unwrap());
    println!(
        "slot freed -> next queued job started: {} ms (worker clock)",
        started.saturating_sub(freed)
    );
    // Hop by hop, from the daemons' own logs: the worker's end recorded
    // (its final state durable), the scheduler's dispatch, the worker's
    // spawn of the next job.
    let logged_at = |log: &str, needle: &str, job: &str| {
        log.lines()
            .find(|l| l.contains(needle) && l.contains(job))
            .and_then(|l| l.split_whitespace().next())
            .map(ms)
    };
    let (scheduler, worker) = (cluster.scheduler.log(), cluster.workers[0].1.log());
    if let (Some(ended), Some(dispatched), Some(spawned)) = (
        logged_at(&worker, "job finished", &blocker.job_id),
        logged_at(&scheduler, "dispatching queued job", &first),
        logged_at(&worker, "job started", &first),
    ) {
        println!(
            "end recorded on the worker -> dispatched: {} ms; -> next job spawned: {} ms",
            dispatched.saturating_sub(ended),
            spawned.saturating_sub(ended)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_free_slot_no_queued_job_could_use_is_taken_at_once() {
    let mut cluster = Cluster::start(&[]).await;
    for (name, zone) in [("w1", "eu"), ("w2", "us")] {
        cluster.add_worker_with(
            name,
            &format!("max_jobs = 1\nlabels = {{ zone = \"{zone}\" }}\n---\n"),
        );
    }
    for name in ["w1", "w2"] {
        cluster.wait_state(name, "ready").await;
    }
    let long = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["600", "0.1"]}),
    )
    .await;
    assert_ne!(long.state.as_deref(), Some("queued"), "{long:?}");
    let eu = json!({"path": "count.sh", "args": ["1", "0"], "selector": {"zone": "eu"}});
    let waiting = submit(&cluster, eu.clone()).await;
    assert_eq!(waiting.state.as_deref(), Some("queued"));

    // The queued job can only run on w1: w2's free slot is nobody's in
    // the queue, so a start of the same priority takes it at once.
    let anywhere = submit(&cluster, json!({"path": "count.sh", "args": ["1", "0"]})).await;
    assert_ne!(anywhere.state.as_deref(), Some("queued"), "{anywhere:?}");
    assert_eq!(anywhere.worker_name.as_deref(), Some("w2"));

    // One that could only take w1's slot is queued, a higher priority
    // ahead of the job waiting there, and gets the slot first.
    let mut urgent = eu;
    urgent["priority"] = json!(10);
    let urgent = submit(&cluster, urgent).await;
    assert_eq!(
        (urgent.state.as_deref(), urgent.position),
        (Some("queued"), Some(0))
    );
    let out = cluster.ctl_output(&["stop", &long.job_id]).await;
    assert!(out.status.success(), "{}", crate::cluster::stderr(&out));
    let jobs = all_done(
        &cluster,
        &[urgent.job_id, waiting.job_id, anywhere.job_id],
        Duration::from_secs(30),
    )
    .await;
    assert!(jobs.iter().all(|j| j.state == "succeeded"), "{jobs:?}");
    assert!(
        ms(&jobs[0].created_at) <= ms(&jobs[1].created_at),
        "the urgent job took w1's slot first: {jobs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_for_worker_queues_for_a_draining_worker_or_one_yet_to_come() {
    let mut cluster = Cluster::start(&["w1"]).await;
    // No worker carries zone=eu: refused at once, unless the job may wait.
    let eu = json!({"path": "count.sh", "args": ["1", "0"], "selector": {"zone": "eu"}});
    let (status, answer) = post(&cluster, eu.clone()).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::CONFLICT, Some("no_eligible_worker"))
    );
    let mut waiting = eu;
    waiting["wait_for_worker"] = json!(true);
    let placed = submit(&cluster, waiting).await;
    assert_eq!(placed.state.as_deref(), Some("queued"));

    // A draining worker: the same.
    cluster
        .http()
        .post(format!("{}/v1/workers/w1/drain", cluster.url()))
        .send()
        .await
        .unwrap();
    let named = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"], "wait_for_worker": true}),
    )
    .await;
    assert_eq!(named.state.as_deref(), Some("queued"));
    let info = cluster.job(&named.job_id).await;
    assert!(
        info.reason.as_deref().unwrap().contains("draining"),
        "{:?}",
        info.reason
    );

    cluster.add_worker_with("w2", "labels = { zone = \"eu\" }\n---\n");
    cluster
        .http()
        .post(format!("{}/v1/workers/w1/undrain", cluster.url()))
        .send()
        .await
        .unwrap();
    let jobs = all_done(
        &cluster,
        &[placed.job_id, named.job_id],
        Duration::from_secs(30),
    )
    .await;
    assert!(jobs.iter().all(|j| j.state == "succeeded"), "{jobs:?}");
    let w2 = cluster.worker_info("w2").await.worker_id;
    let w1 = cluster.worker_info("w1").await.worker_id;
    assert_eq!(
        (jobs[0].worker_id.as_str(), jobs[1].worker_id.as_str()),
        (w2.as_str(), w1.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_queues_its_member_on_a_full_worker_and_follows_it_once_started() {
    let cluster = Cluster::start_with(&["w1", "w2"], "", "max_jobs = 1\n---\n").await;
    let busy = json!({"worker_id": "w1", "path": "count.sh", "args": ["10", "0.1"]});
    submit(&cluster, busy.clone()).await;

    let group = submit_group(&cluster, &["2", "0"]).await;
    assert!(group.failed.is_empty(), "{:?}", group.failed);
    // The member on the full worker waits; the other starts.
    let queued: Vec<_> = group
        .jobs
        .iter()
        .filter(|j| j.state.as_deref() == Some("queued"))
        .collect();
    assert_eq!((group.jobs.len(), queued.len()), (2, 1), "{:?}", group.jobs);
    assert!(
        queued[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("w1")),
        "{:?}",
        queued[0]
    );
    let info: jobcluster_proto::http::GroupInfo = cluster
        .get_json(&format!("/v1/groups/{}", group.group_id))
        .await;
    assert_eq!((info.state.as_str(), info.done), ("running", false));

    // The merged followed output waits for the queued member and carries
    // every line of both.
    let out = cluster.ctl_output(&["logs", "-f", &group.group_id]).await;
    let err = crate::cluster::stderr(&out);
    assert!(out.status.success(), "{err}");
    let lines = sorted_lines(&out);
    assert_eq!(
        lines,
        [
            "[w1] 1",
            "[w1] 2",
            "[w1] done",
            "[w2] 1",
            "[w2] 2",
            "[w2] done"
        ],
        "{err}"
    );

    // clusterctl run --all says a member is queued, then follows both.
    submit(&cluster, busy).await;
    let out = cluster
        .ctl_output(&["run", "--all", "count.sh", "--", "1", "0"])
        .await;
    let err = crate::cluster::stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 queued"), "{err}");
    let lines = sorted_lines(&out);
    assert_eq!(
        lines,
        ["[w1] 1", "[w1] done", "[w2] 1", "[w2] done"],
        "{err}"
    );
}

/// A command's stdout lines, sorted: merged group output interleaves its
/// members in any order.
fn sorted_lines(out: &std::process::Output) -> Vec<String> {
    let mut lines: Vec<String> = crate::cluster::stdout(out)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// A burst of 300 starts far above capacity with the scheduler killed twice in the
/// middle: every start that was answered ran exactly once, on one worker,
/// and no worker ran more than its slots at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_through_two_scheduler_kills_runs_every_accepted_job_exactly_once() {
    let mut cluster = Cluster::start_with(&["w1", "w2"], "", "max_jobs = 2\n---\n").await;
    let (http, url) = (cluster.http(), cluster.url());
    // How many starts were answered so far: the kills land mid-burst
    // however fast this machine is.
    let (answered, mut seen) = tokio::sync::watch::channel(0usize);
    let answered = std::sync::Arc::new(answered);
    let submitters: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, answered) = (http.clone(), url.clone(), answered.clone());
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                for _ in 0..75 {
                    // Sent again with its key until answered: a start whose
                    // answer a killed scheduler never sent is not lost, nor
                    // made twice.
                    let key = uuid::Uuid::new_v4().to_string();
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    let started: JobStarted = loop {
                        let sent = http
                            .post(format!("{url}/v1/jobs"))
                            .header("Idempotency-Key", &key)
                            .json(&json!({"path": "count.sh", "args": ["1", "0"]}))
                            .send()
                            .await;
                        if let Ok(reply) = sent {
                            let status = reply.status();
                            if status == StatusCode::CREATED || status == StatusCode::ACCEPTED {
                                break reply.json().await.unwrap();
                            }
                            assert!(
                                status == StatusCode::SERVICE_UNAVAILABLE,
                                "{status}: {:?}",
                                reply.text().await
                            );
                        }
                        assert!(tokio::time::Instant::now() < deadline, "never accepted");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    };
                    accepted.push(started.job_id);
                    answered.send_modify(|n| *n += 1);
                }
                accepted
            })
        })
        .collect();
    for after in [60, 180] {
        seen.wait_for(|n| *n >= after).await.unwrap();
        tokio::task::block_in_place(|| cluster.restart_scheduler(Signal::SIGKILL));
    }
    let mut ids = Vec::new();
    for s in submitters {
        ids.extend(s.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 300, "a key answered with two jobs, or one twice");
    let jobs = all_done(&cluster, &ids, Duration::from_secs(180)).await;
    for j in &jobs {
        assert_eq!(j.state, "succeeded", "{j:?}");
    }
    // Exactly once: each job has one directory, on one worker.
    let mut on_worker: HashMap<String, usize> = HashMap::new();
    for w in ["w1", "w2"] {
        for dir in std::fs::read_dir(cluster.tmp.path().join(format!("state/{w}/jobs"))).unwrap() {
            let name = dir.unwrap().file_name().to_string_lossy().into_owned();
            *on_worker.entry(name).or_default() += 1;
        }
    }
    for id in &ids {
        assert_eq!(
            on_worker.get(id),
            Some(&1),
            "job {id} ran on {:?} workers",
            on_worker.get(id)
        );
    }
    for (w, most) in most_at_once(&jobs) {
        assert!(most <= 2, "worker {w} ran {most} jobs at once");
    }
}

/// A queued job its worker refuses for the job's own sake (a script it
/// does not have) ends `failed` with the refusal, instead of going back
/// into the queue for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_job_its_worker_refuses_fails_with_the_refusal() {
    let cluster = Cluster::start_with(&["w1"], "", "max_jobs = 1\n---\n").await;
    let busy = submit(
        &cluster,
        json!({"worker_id": "w1", "path": "count.sh", "args": ["3", "0.1"]}),
    )
    .await;
    let missing = submit(&cluster, json!({"worker_id": "w1", "path": "nope.sh"})).await;
    assert_eq!(missing.state.as_deref(), Some("queued"));
    let jobs = all_done(
        &cluster,
        &[busy.job_id, missing.job_id],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(jobs[0].state, "succeeded");
    assert_eq!(jobs[1].state, "failed", "{:?}", jobs[1]);
    assert!(
        jobs[1].error_text.contains("refused the job") && jobs[1].error_text.contains("nope.sh"),
        "{:?}",
        jobs[1].error_text
    );
    assert!(jobs[1].started_at.is_none(), "{:?}", jobs[1]);
}

/// A job that waits for a worker nobody has yet does not hold back starts
/// that have a free slot: only queued jobs that could take the same slot
/// go first.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_waiting_for_another_kind_of_worker_holds_nobody_back() {
    let cluster = Cluster::start(&["w1"]).await;
    let waiting = submit(
        &cluster,
        json!({"path": "count.sh", "args": ["1", "0"], "selector": {"zone": "nowhere"}, "wait_for_worker": true}),
    )
    .await;
    assert_eq!(waiting.state.as_deref(), Some("queued"));
    for body in [
        json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]}),
        json!({"path": "count.sh", "args": ["1", "0"]}),
    ] {
        let (status, answer) = post(&cluster, body).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    let (status, answer) = cluster
        .post_json(
            "/v1/groups",
            &json!({"all": true, "path": "count.sh", "args": ["1", "0"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(cluster.job(&waiting.job_id).await.state, "queued");
}

/// The merged output of a group ends when its queued member's worker is
/// removed (the member ends `failed`), instead of waiting for ever; and
/// `logs` without `-f` on a queued job says so at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_follower_moves_on_when_its_queued_members_worker_is_removed() {
    let mut cluster = Cluster::start_with(&["w1", "w2"], "", "max_jobs = 1\n---\n").await;
    submit(
        &cluster,
        json!({"worker_id": "w2", "path": "count.sh", "args": ["600", "0.1"]}),
    )
    .await;
    let group = submit_group(&cluster, &["1", "0"]).await;
    let queued = group
        .jobs
        .iter()
        .find(|j| j.state.as_deref() == Some("queued"))
        .expect("the member on w2 waits")
        .job_id
        .clone();

    let out = cluster.ctl_output(&["logs", &queued]).await;
    let err = crate::cluster::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("queued"), "{err}");
    assert!(!err.contains("reconnect"), "{err}");

    let follower = cluster
        .ctl()
        .args(["logs", "-f", &group.group_id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cluster.worker("w2").signal(Signal::SIGKILL);
    cluster.worker("w2").wait(Duration::from_secs(10));
    cluster.wait_state("w2", "down").await;
    let reply = cluster
        .http()
        .delete(format!("{}/v1/workers/w2", cluster.url()))
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success(), "{:?}", reply.text().await);
    let out = tokio::time::timeout(Duration::from_secs(20), follower.wait_with_output())
        .await
        .expect("the group's output never ended")
        .unwrap();
    let lines = sorted_lines(&out);
    assert_eq!(
        lines,
        ["[w1] 1", "[w1] done"],
        "{}",
        crate::cluster::stderr(&out)
    );
    assert_eq!(cluster.job(&queued).await.state, "failed");
}

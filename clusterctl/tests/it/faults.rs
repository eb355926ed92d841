//! Membership and durability under crashes, restarts and shutdowns.

use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::Mutex;

use jobcluster_proto::http::{ErrorBody, JobInfo, JobList, WorkerList};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::cluster::{Cluster, stderr, stdout};
use crate::harness::{Daemon, eventually, job_processes};

/// Waits (without a fixed sleep) until `check` holds, asking the API.
pub async fn until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every state the API answered for each job, in order; a terminal state,
/// once answered, is a promise, so any later answer that differs panics.
#[derive(Debug, Default)]
pub struct Witness {
    seen: Mutex<HashMap<String, Vec<String>>>,
}

impl Witness {
    const TERMINAL: [&str; 4] = ["succeeded", "failed", "stopped", "lost"];

    pub fn saw(&self, job_id: &str, state: &str) {
        let mut seen = self.seen.lock().unwrap();
        let states = seen.entry(job_id.to_owned()).or_default();
        if let Some(first) = states.iter().find(|s| Self::TERMINAL.contains(&s.as_str())) {
            assert_eq!(
                state, first,
                "job {job_id} was answered {first} and then {state} (answers so far: {states:?})"
            );
        }
        if states.last().map(String::as_str) != Some(state) {
            states.push(state.to_owned());
        }
    }

    /// `GET /v1/jobs/{id}`, witnessed.
    pub async fn job(&self, cluster: &Cluster, job_id: &str) -> JobInfo {
        let job = cluster.job(job_id).await;
        self.saw(&job.job_id, &job.state);
        job
    }

    /// The job once the API answers it ended (within `timeout`), witnessed.
    pub async fn ended(&self, cluster: &Cluster, job_id: &str, timeout: Duration) -> JobInfo {
        until(timeout, "the job's end recorded", || async {
            self.job(cluster, job_id).await.done
        })
        .await;
        self.job(cluster, job_id).await
    }

    /// `GET /v1/jobs` (up to 1000), witnessed.
    pub async fn jobs(&self, cluster: &Cluster) -> Vec<JobInfo> {
        let list: JobList = cluster.get_json("/v1/jobs?limit=1000").await;
        for job in &list.jobs {
            self.saw(&job.job_id, &job.state);
        }
        list.jobs
    }
}

/// A worker stopped (SIGTERM) while its registration is being recorded
/// waits for the scheduler's answer and then leaves under the id it was
/// given: it is shown `left`, and its restart registers at once. It used
/// to drop the call and exit, leaving the scheduler to record it `ready`
/// (alive, its name taken) until `down_after`.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stopped_while_its_registration_is_recorded_leaves() {
    let (mut cluster, holder) = registering_worker().await;
    cluster.worker("w1").signal(Signal::SIGTERM);
    cluster.worker("w1").wait_for_log("shutting down", 0).await;
    // Time for a worker that drops its registration to be gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    holder.release();
    cluster.worker("w1").wait(Duration::from_secs(15));
    cluster.wait_state("w1", "left").await;
    let log = cluster.scheduler.log();
    assert!(log.contains("worker deregistered"), "{log}");
    cluster.restart_worker("w1");
    cluster.wait_ready("w1").await;
    assert!(
        !cluster.scheduler.log().contains("taken name"),
        "{}",
        cluster.scheduler.log()
    );
}

/// A cluster (on SQLite, whatever the suite's store) whose worker `w1` has
/// sent its registration, which the scheduler is writing while another
/// writer holds the store: until the holder is released, for up to 5 s
/// (the store's busy wait) from the call's arrival.
async fn registering_worker() -> (Cluster, crate::security::Holder) {
    let mut cluster = Cluster::start_with_on_sqlite(&[], "", "").await;
    let holder = crate::security::hold_store(&cluster);
    cluster.add_worker_with("w1", "");
    cluster.worker("w1").wait_for_log("worker ready", 0).await;
    // It registers as it starts: time for the call to reach the scheduler.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    (cluster, holder)
}

/// A worker stopped while a scheduler that no longer answers (paused,
/// SIGSTOP) holds its registration still exits, within the time it waits
/// for the answer: a stop never hangs on a peer.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stopped_while_a_paused_scheduler_holds_its_registration_exits() {
    let (mut cluster, holder) = registering_worker().await;
    cluster.scheduler.signal(Signal::SIGSTOP);
    holder.release();
    cluster.worker("w1").signal(Signal::SIGTERM);
    let status = cluster.worker("w1").wait(Duration::from_secs(20));
    cluster.scheduler.signal(Signal::SIGCONT);
    assert!(
        status.success(),
        "{status:?}: {}",
        cluster.worker("w1").log()
    );
    assert!(!cluster.worker("w1").log().contains("deregistered"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_goes_down_its_jobs_are_lost_and_it_comes_back_clean() {
    // down_after stays the test cluster's 1.5 s; lost_after is 10 s so that
    // the `unknown` between them lasts long enough to be seen on a loaded
    // machine (at 3 s it could pass between two looks).
    let mut cluster = Cluster::start_tuned(&["w1", "w2"], &[("lost_after", "10s")]).await;
    let w1_id = cluster.worker_info("w1").await.worker_id;
    let finished = cluster.start_job("w1", "count.sh", &["2", "0"]).await;
    until(Duration::from_secs(10), "first job to finish", || async {
        cluster.job(&finished).await.state == "succeeded"
    })
    .await;
    let running = cluster.start_job("w1", "count.sh", &["1000", "0.05"]).await;
    // Running, and its first line in the log (a loaded machine may take a
    // while to get the interpreter going).
    assert!(
        eventually(Duration::from_secs(10), || !job_processes(&running)
            .is_empty()
            && cluster.worker_log("w1", &running).starts_with(b"1\n"))
        .await
    );

    let killed_at = Instant::now();
    cluster.worker("w1").signal(Signal::SIGKILL);
    cluster.worker("w1").wait(Duration::from_secs(10));
    // Down after down_after (1.5 s), its job unknown (not given up); lost
    // after lost_after (10 s), not before.
    until(
        Duration::from_secs(8),
        "w1 down and its job unknown",
        || async {
            cluster.worker_info("w1").await.state == "down"
                && cluster.job(&running).await.state == "unknown"
        },
    )
    .await;
    let job = cluster.job(&running).await;
    assert!(job.stale && !job.done, "{job:?}");
    until(Duration::from_secs(20), "its job lost", || async {
        cluster.job(&running).await.state == "lost"
    })
    .await;
    // Last heard up to a heartbeat (and a late one) before the kill.
    assert!(killed_at.elapsed() >= Duration::from_secs(8));

    // A down worker is answered for at once.
    let started = Instant::now();
    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs", cluster.url()))
        .json(&serde_json::json!({"worker_id": "w1", "path": "count.sh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json::<ErrorBody>().await.unwrap().code, "worker_down");
    assert!(started.elapsed() < Duration::from_secs(1));
    // w2 is not affected.
    cluster.start_job("w2", "count.sh", &["1", "0"]).await;

    cluster.restart_worker("w1");
    until(Duration::from_secs(15), "w1 ready again", || async {
        cluster.worker_state("w1").await == "ready"
    })
    .await;
    assert_eq!(
        cluster.worker_info("w1").await.worker_id,
        w1_id,
        "same id after a restart"
    );
    assert!(
        job_processes(&running).is_empty(),
        "no process of the old job is left"
    );
    let job = cluster.job(&running).await;
    assert_eq!(job.state, "lost");
    let out = cluster.ctl_output(&["logs", &finished]).await;
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(0), "1\n2\ndone\n")
    );
    // The lost job's output so far stays readable.
    let out = cluster.ctl_output(&["logs", &running]).await;
    assert!(stdout(&out).starts_with("1\n"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_survives_a_killed_scheduler_without_losing_a_byte() {
    let mut cluster = Cluster::start(&["w1"]).await;
    let job = cluster.start_job("w1", "count.sh", &["60", "0.05"]).await;
    let mut follower = cluster
        .ctl()
        .args(["logs", "-f", &job])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = follower.stdout.take().unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&received).contains("5\n") {
        let n = out.read(&mut buf).await.unwrap();
        assert!(n > 0);
        received.extend_from_slice(&buf[..n]);
    }
    cluster.restart_scheduler(Signal::SIGKILL);
    out.read_to_end(&mut received).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), follower.wait())
        .await
        .unwrap()
        .unwrap();
    let mut err = String::new();
    follower
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "follower: {err}");
    let on_worker = cluster.worker_log("w1", &job);
    assert_eq!(
        Sha256::digest(&received),
        Sha256::digest(&on_worker),
        "byte-identical to the worker's log"
    );
    assert!(received.ends_with(b"60\ndone\n"));
    assert_eq!(cluster.job(&job).await.state, "succeeded");
    until(Duration::from_secs(10), "w1 ready", || async {
        cluster.worker_state("w1").await == "ready"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_a_worker_stops_its_jobs_and_it_leaves() {
    let mut cluster = Cluster::start(&["w1", "w2"]).await;
    let a = cluster.start_job("w1", "count.sh", &["1000", "0.05"]).await;
    let b = cluster.start_job("w1", "count.py", &["1000", "0.05"]).await;
    assert!(
        eventually(Duration::from_secs(10), || !job_processes(&a).is_empty()
            && !job_processes(&b).is_empty())
        .await
    );
    cluster.worker("w1").signal(Signal::SIGTERM);
    let status = cluster.worker("w1").wait(Duration::from_secs(20));
    assert!(status.success(), "exit 0: {status:?}");
    for job in [&a, &b] {
        assert_eq!(cluster.job(job).await.state, "stopped");
        assert!(job_processes(job).is_empty());
    }
    assert_eq!(cluster.worker_info("w1").await.state, "left");
    let listed: WorkerList = cluster.get_json("/v1/workers").await;
    assert_eq!(
        listed
            .workers
            .iter()
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>(),
        ["w2"]
    );
    let out = cluster.ctl_output(&["workers", "--all"]).await;
    assert!(stdout(&out).contains("left"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_job_records_survive_a_killed_scheduler() {
    let mut cluster = Cluster::start(&["w1", "w2"]).await;
    let mut ids = Vec::new();
    for i in 0..200 {
        let worker = if i % 2 == 0 { "w1" } else { "w2" };
        ids.push(cluster.start_job(worker, "count.sh", &["1", "0.2"]).await);
    }
    // Some are still running when the scheduler dies.
    cluster.restart_scheduler(Signal::SIGKILL);
    until(
        Duration::from_secs(30),
        "every job recorded as succeeded",
        || async {
            let list: JobList = cluster.get_json("/v1/jobs?limit=1000").await;
            list.jobs.len() == 200
                && list
                    .jobs
                    .iter()
                    .all(|j| j.state == "succeeded" && j.exit_code == Some(0))
        },
    )
    .await;
    let list: JobList = cluster.get_json("/v1/jobs?limit=1000").await;
    let mut listed: Vec<_> = list.jobs.iter().map(|j| j.job_id.clone()).collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_output_answers_410_and_the_record_stays() {
    let mut cluster = Cluster::start(&["w1"]).await;
    cluster.add_worker_with("w3", "[retention]\nmax_bytes = 20\n");
    until(Duration::from_secs(10), "w3 ready", || async {
        cluster.worker_state("w3").await == "ready"
    })
    .await;
    let old = cluster.start_job("w3", "count.sh", &["5", "0"]).await;
    until(Duration::from_secs(10), "first job done", || async {
        cluster.job(&old).await.done
    })
    .await;
    let new = cluster.start_job("w3", "count.sh", &["5", "0"]).await;
    until(Duration::from_secs(10), "second job done", || async {
        cluster.job(&new).await.done
    })
    .await;
    until(Duration::from_secs(10), "old output expired", || async {
        let reply = cluster
            .http()
            .get(format!("{}/v1/jobs/{old}/logs", cluster.url()))
            .send()
            .await
            .unwrap();
        reply.status() == StatusCode::GONE
            && reply.json::<ErrorBody>().await.unwrap().code == "output_expired"
    })
    .await;
    assert_eq!(cluster.job(&old).await.state, "succeeded");
    let out = cluster.ctl_output(&["logs", &new]).await;
    assert_eq!(stdout(&out), "1\n2\n3\n4\n5\ndone\n");
}

/// `max_age` counts from a job's end: a job that printed a line and then
/// worked quietly for longer than `max_age` kept its output for seconds
/// after it ended, because the sweep judged by the log's last write.
#[tokio::test(flavor = "multi_thread")]
async fn output_is_kept_max_age_after_its_job_ended() {
    let mut cluster = Cluster::start(&[]).await;
    // max_bytes only to sweep right after a job ends (5 s after it).
    cluster.add_worker_with(
        "w3",
        "[retention]\nmax_age = \"12s\"\nmax_bytes = 1000000000\n",
    );
    cluster.wait_ready("w3").await;
    cluster.add_script("quiet.sh", "echo hello\nsleep 10\n");
    let quiet = cluster.start_job("w3", "quiet.sh", &[]).await;
    until(Duration::from_secs(30), "quiet job done", || async {
        cluster.job(&quiet).await.done
    })
    .await;
    // Past the sweep that follows its end; its output is 5 s old there
    // (max_age 12 s leaves that sweep 7 s to be late on a loaded machine).
    tokio::time::sleep(Duration::from_secs(9)).await;
    let out = cluster.ctl_output(&["logs", &quiet]).await;
    assert_eq!(stdout(&out), "hello\n", "{}", crate::cluster::stderr(&out));

    // The next job's end sweeps again, past the 12 s.
    let next = cluster.start_job("w3", "count.sh", &["1", "0"]).await;
    until(Duration::from_secs(10), "next job done", || async {
        cluster.job(&next).await.done
    })
    .await;
    until(
        Duration::from_secs(20),
        "quiet job's output expired",
        || async {
            let reply = cluster
                .http()
                .get(format!("{}/v1/jobs/{quiet}/logs", cluster.url()))
                .send()
                .await
                .unwrap();
            reply.status() == StatusCode::GONE
        },
    )
    .await;
    let out = cluster.ctl_output(&["logs", &next]).await;
    assert_eq!(stdout(&out), "1\ndone\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_worker_with_a_taken_name_is_refused() {
    let cluster = Cluster::start(&["w1"]).await;
    let first = cluster.worker_info("w1").await;
    let config = cluster.write_worker_config("w1-twin", "pki/w1.pem", "pki/w1-key.pem");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("name = \"w1-twin\"", "name = \"w1\"");
    std::fs::write(&config, text).unwrap();
    let twin = Daemon::spawn(
        &crate::cluster::bin("workerd"),
        &["--config", config.to_str().unwrap()],
    );
    twin.wait_for_log("already registered", 0).await;
    let now = cluster.worker_info("w1").await;
    assert_eq!(
        (now.worker_id, now.address),
        (first.worker_id, first.address)
    );
}

#[test]
fn the_daemons_tell_systemd_when_they_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let socket_path = tmp.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let pki = tmp.path().join("pki");
    crate::cluster::run_ok(&["pki", "init", pki.to_str().unwrap()]);
    std::fs::write(
        tmp.path().join("s.toml"),
        "[grpc_server]\naddr = \"127.0.0.1:0\"\ncrt_file = \"pki/scheduler.pem\"\nkey_file = \"pki/scheduler-key.pem\"\nca_file = \"pki/ca.pem\"\n[http_server]\naddr = \"127.0.0.1:0\"\n[store]\npath = \"s.db\"\n",
    )
    .unwrap();
    let mut daemon = Daemon::spawn_with(
        &crate::cluster::bin("schedulerd"),
        &["--config", tmp.path().join("s.toml").to_str().unwrap()],
        &["grpc", "http"],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    // One datagram per notification, newline-separated assignments.
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    daemon.signal(Signal::SIGTERM);
    let stopping = next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(
        daemon.wait(Duration::from_secs(20)).success(),
        "schedulerd exits 0 on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_cut_off_past_the_timeout_brings_its_running_jobs_back() {
    let mut cluster = Cluster::start_tuned(&["w1"], &[("lost_after", "60s")]).await;
    let job = cluster.start_job("w1", "count.sh", &["600", "0.1"]).await;
    // SIGSTOP: the worker neither heartbeats nor dies, like a partition.
    cluster.worker("w1").signal(Signal::SIGSTOP);
    until(
        Duration::from_secs(10),
        "w1 down and its job unknown",
        || async {
            cluster.worker_info("w1").await.state == "down"
                && cluster.job(&job).await.state == "unknown"
        },
    )
    .await;
    cluster.worker("w1").signal(Signal::SIGCONT);
    until(Duration::from_secs(15), "the job running again", || async {
        cluster.worker_info("w1").await.state == "ready"
            && cluster.job(&job).await.state == "running"
    })
    .await;
    // And it is stoppable, as a running job is.
    let out = cluster.ctl_output(&["stop", &job]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(cluster.job(&job).await.state, "stopped");
    assert!(job_processes(&job).is_empty());
}

/// A hostile job hands its output pipe to a process outside the job (over
/// a unix socket) and exits; that process goes on writing into the pipe.
/// The worker cannot kill what holds the pipe, so 5 s after the job's end
/// it stops reading, and the job's outcome is its own: `succeeded`, with
/// the output read until then kept. The outsider's quick writes are not
/// taken for a stalled disk.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipe_held_open_from_outside_the_job_is_closed_and_the_job_keeps_its_outcome() {
    let cluster = Cluster::start(&["w1"]).await;
    let scripts = cluster.tmp.path().join("scripts");
    let socket = scripts.join("pipe.sock");
    // Receives the job's stdout and writes into it, 20 lines a second,
    // until the worker closes the pipe's other end.
    let mut outsider = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import os, socket, sys, time\n\
             l = socket.socket(socket.AF_UNIX); l.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777)\n\
             l.listen(1); print('ready', flush=True)\n\
             c, _ = l.accept(); _, fds, _, _ = socket.recv_fds(c, 1, 1); c.send(b'k')\n\
             try:\n\
             \x20   while True:\n\
             \x20       os.write(fds[0], b'outsider\\n'); time.sleep(0.05)\n\
             except BrokenPipeError:\n\
             \x20   print('closed', flush=True)\n",
        )
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut said = tokio::io::BufReader::new(outsider.stdout.take().unwrap()).lines();
    assert_eq!(said.next_line().await.unwrap().as_deref(), Some("ready"));
    cluster.add_script(
        "handoff.sh",
        "echo before\n\
         python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); \
         s.connect(\"pipe.sock\"); socket.send_fds(s, [b\"x\"], [1]); s.recv(1)'\n",
    );
    let witness = Witness::default();
    let id = cluster.start_job("w1", "handoff.sh", &[]).await;
    let job = witness.ended(&cluster, &id, Duration::from_secs(30)).await;
    assert_eq!(
        (job.state.as_str(), job.exit_code, job.error_text.as_str()),
        ("succeeded", Some(0), ""),
        "{job:?}"
    );
    let log = cluster.workers[0].1.log();
    assert!(log.contains("output pipe still open"), "{log}");
    assert!(!log.contains("stalled"), "{log}");
    // The worker closed its end: the outsider's next write failed.
    let closed = tokio::time::timeout(Duration::from_secs(10), said.next_line()).await;
    assert_eq!(closed.unwrap().unwrap().as_deref(), Some("closed"));
    let out = cluster.ctl_output(&["logs", &id]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len() as u64, job.output_bytes);
    assert!(out.stdout.starts_with(b"before\n"), "{}", stdout(&out));
    // What the outsider wrote while the worker still read is kept with it.
    assert!(
        out.stdout.windows(9).any(|w| w == b"outsider\n"),
        "{}",
        stdout(&out)
    );
}

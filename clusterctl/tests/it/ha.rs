//! Several schedulers on one PostgreSQL (issue 14), through the real
//! binaries and a throwaway PostgreSQL: one leads, any serves, and killing
//! the leader loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::cluster::{Cluster, Running, bin, stdout};
use crate::harness::Daemon;

/// Short, so a test sees a few takeovers within seconds.
const LEASE: &str = "2s";

async fn ctl_ok(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.ctl_output(args).await;
    assert!(
        out.status.success(),
        "clusterctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

/// One scheduler on PostgreSQL runs a job to its end, and after a restart
/// on the same database still knows it.
#[tokio::test(flavor = "multi_thread")]
async fn a_scheduler_on_postgres_runs_a_job_and_remembers_it_after_a_restart() {
    let mut cluster = Cluster::start_on_postgres(&["w1"], "").await;
    let out = ctl_ok(
        &cluster,
        &["run", "--worker", "w1", "count.sh", "--", "3", "0"],
    )
    .await;
    assert_eq!(out, "1\n2\n3\ndone\n");
    let listed = ctl_ok(&cluster, &["-o", "json", "jobs"]).await;
    assert!(listed.contains("succeeded"), "{listed}");
    cluster.restart_scheduler(Signal::SIGTERM);
    let again = ctl_ok(&cluster, &["-o", "json", "jobs"]).await;
    assert_eq!(listed, again);
}

/// `n` schedulers on one new PostgreSQL database, and workers that know
/// them all. Scheduler 0 is `cluster.scheduler`; the others are returned,
/// each with the config file that starts it again on its ports.
async fn schedulers(n: usize, workers: &[&str], worker_extra: &str) -> (Cluster, Vec<Scheduler>) {
    let mut cluster = Cluster::start_on_postgres(&[], &format!("leader_lease = \"{LEASE}\"")).await;
    let text = std::fs::read_to_string(cluster.tmp.path().join("scheduler.toml")).unwrap();
    let mut more = Vec::new();
    for i in 1..n {
        let config = cluster.tmp.path().join(format!("scheduler-{i}.toml"));
        std::fs::write(&config, &text).unwrap();
        let daemon = Daemon::spawn_with(
            &bin("schedulerd"),
            &["--config", config.to_str().unwrap()],
            &["grpc", "http"],
            &[],
        );
        let (grpc, http) = (daemon.addrs["grpc"].clone(), daemon.addrs["http"].clone());
        // Fixed ports from now on, so it comes back where workers look.
        let fixed = text
            .replacen("127.0.0.1:0", &grpc, 1)
            .replacen("127.0.0.1:0", &http, 1);
        std::fs::write(&config, fixed).unwrap();
        cluster.more_schedulers.push((grpc, http));
        more.push(Scheduler { daemon, config });
    }
    for name in workers {
        cluster.add_worker_with(name, worker_extra);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = ctl_ok(&cluster, &["-o", "json", "workers"]).await;
        let ready: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
        let ready: BTreeSet<&str> = ready
            .iter()
            .filter(|w| w["state"] == "ready")
            .filter_map(|w| w["name"].as_str())
            .collect();
        if workers.iter().all(|w| ready.contains(w)) {
            break;
        }
        assert!(Instant::now() < deadline, "workers never ready: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (cluster, more)
}

struct Scheduler {
    daemon: Daemon,
    config: std::path::PathBuf,
}

impl Scheduler {
    fn start_again(&mut self) {
        self.daemon = Daemon::spawn_with(
            &bin("schedulerd"),
            &["--config", self.config.to_str().unwrap()],
            &["grpc", "http"],
            &[],
        );
    }
}

/// Whether a scheduler's log says it leads now (its last word on it).
fn leads(log: &str) -> bool {
    let became = log.rfind("this scheduler is the leader");
    let ended = log.rfind("no longer the leader");
    matches!((became, ended), (Some(b), e) if e.is_none_or(|e| e < b))
}

/// `clusterctl` aimed at the one scheduler at `http`.
async fn ctl_at(cluster: &Cluster, http: &str, args: &[&str]) -> std::process::Output {
    cluster
        .ctl()
        .env("CLUSTERCTL_SCHEDULER", format!("https://{http}"))
        .args(args)
        .output()
        .await
        .unwrap()
}

fn job_id(out: &std::process::Output) -> String {
    let text = stdout(out);
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    value["job_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn any_scheduler_serves_every_job_and_exactly_one_leads() {
    let (cluster, more) = schedulers(2, &["w1"], "").await;
    let (a, b) = (
        cluster.http_addr.clone(),
        more[0].daemon.addrs["http"].clone(),
    );
    // Started through b: seen, followed and stopped through a at once.
    let out = ctl_at(
        &cluster,
        &b,
        &[
            "-o", "json", "start", "--worker", "w1", "count.sh", "--", "100", "0.05",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = job_id(&out);
    let shown = ctl_at(&cluster, &a, &["-o", "json", "status", &id]).await;
    assert!(stdout(&shown).contains("\"running\""), "{}", stdout(&shown));
    let mut follow = cluster
        .ctl()
        .env("CLUSTERCTL_SCHEDULER", format!("https://{a}"))
        .args(["logs", "-f", &id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = ctl_at(&cluster, &a, &["stop", &id]).await;
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    let followed = tokio::time::timeout(Duration::from_secs(20), follow.wait())
        .await
        .expect("the follower ends when the job does")
        .unwrap();
    let _ = followed;
    let state = ctl_at(&cluster, &b, &["-o", "json", "status", &id]).await;
    assert!(stdout(&state).contains("\"stopped\""), "{}", stdout(&state));
    // Exactly one of them leads.
    let leaders = [cluster.scheduler.log(), more[0].daemon.log()]
        .iter()
        .filter(|log| leads(log))
        .count();
    assert_eq!(
        leaders,
        1,
        "a: {}\nb: {}",
        cluster.scheduler.log(),
        more[0].daemon.log()
    );
}

/// The check, small: three schedulers, a start-and-follow load
/// with a queue (two slots per worker), the leader killed (`kill -9`) and
/// started again, twice. Every job that got a 201 or 202 runs exactly
/// once (on one worker), ends `succeeded` with its whole output, and the
/// follower of a long job gets every byte.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_leader_under_load_loses_nothing_and_runs_nothing_twice() {
    let (mut cluster, mut more) = schedulers(3, &["w1", "w2"], "max_jobs = 2\n---\n").await;
    let long = job_id(
        &ctl_ok_output(
            &cluster,
            &[
                "-o", "json", "start", "--worker", "w1", "count.sh", "--", "120", "0.05",
            ],
        )
        .await,
    );
    let mut follower = cluster
        .ctl()
        .args(["logs", "-f", &long])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let follower_out = follower.stdout.take().unwrap();
    let followed = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut text = String::new();
        let mut out = follower_out;
        out.read_to_string(&mut text).await.unwrap();
        text
    });

    // Two clients start short jobs, through every scheduler in turn (the
    // CLI fails over), while the leader is killed twice.
    let started = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop_load = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (ctl_env, started, stop_load) = (cluster.urls(), started.clone(), stop_load.clone());
        let pki = cluster.pki();
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            // Bounded, so the queue drains within seconds afterwards.
            while !stop_load.load(std::sync::atomic::Ordering::Relaxed)
                && started.lock().unwrap().len() < 150
            {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let out = tokio::process::Command::new(bin("clusterctl"))
                    .env("CLUSTERCTL_SCHEDULER", &ctl_env)
                    .env("CLUSTERCTL_CA", pki.join("ca.pem"))
                    .env("CLUSTERCTL_CERT", pki.join("client.pem"))
                    .env("CLUSTERCTL_KEY", pki.join("client-key.pem"))
                    .args(["-o", "json", "start", "count.sh", "--", "4", "0.05"])
                    .output()
                    .await
                    .unwrap();
                if out.status.success() {
                    started.lock().unwrap().push(job_id(&out));
                } else {
                    failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
            failures
        }));
    }

    for round in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = find_leader(&cluster, &more).await;
        match leader {
            0 => {
                cluster.scheduler.signal(Signal::SIGKILL);
                cluster.scheduler.wait(Duration::from_secs(10));
            }
            i => {
                more[i - 1].daemon.signal(Signal::SIGKILL);
                more[i - 1].daemon.wait(Duration::from_secs(10));
            }
        }
        let killed_at = Instant::now();
        // Another takes over within 15 s.
        let next = find_leader_except(&cluster, &more, leader).await;
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "round {round}: scheduler {next} took over only after {:?}",
            killed_at.elapsed()
        );
        match leader {
            0 => cluster.start_scheduler_again(),
            i => more[i - 1].start_again(),
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_load.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.unwrap());
    }
    let started = started.lock().unwrap().clone();
    assert!(
        started.len() >= 10,
        "too few starts: {started:?} {failures:?}"
    );

    // Every acknowledged job ends succeeded with its whole output.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut waiting: BTreeSet<&String> = started.iter().chain(std::iter::once(&long)).collect();
    while !waiting.is_empty() {
        let listed = ctl_ok(&cluster, &["-o", "json", "jobs"]).await;
        let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
        for job in &listed {
            let (Some(id), Some(state)) = (job["job_id"].as_str(), job["state"].as_str()) else {
                continue;
            };
            if !waiting.contains(&id.to_owned()) {
                continue;
            }
            assert!(
                ["succeeded", "running", "queued", "unknown"].contains(&state),
                "job {id} ended badly: {job}"
            );
            if state == "succeeded" {
                waiting.remove(&id.to_owned());
            }
        }
        assert!(Instant::now() < deadline, "jobs never ended: {waiting:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &started {
        let out = ctl_ok(&cluster, &["logs", id]).await;
        assert_eq!(out, "1\n2\n3\n4\ndone\n", "job {id}");
    }
    let expected: String = (1..=120).map(|i| format!("{i}\n")).collect::<String>() + "done\n";
    let followed = tokio::time::timeout(Duration::from_secs(60), followed)
        .await
        .expect("the follower ends with its job")
        .unwrap();
    assert_eq!(followed, expected, "the follower's bytes");

    // Ran exactly once: each job is in exactly one worker's records; and
    // what the schedulers say of it is what that worker holds, to the byte.
    let mut on: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for worker in ["w1", "w2"] {
        let dir = cluster.tmp.path().join(format!("state/{worker}/jobs"));
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            on.entry(name).or_default().insert(worker.to_owned());
        }
    }
    for id in started.iter().chain(std::iter::once(&long)) {
        let holders = on.get(id).cloned().unwrap_or_default();
        assert_eq!(holders.len(), 1, "job {id} ran on {holders:?}");
        let worker = holders.first().unwrap();
        let dir = cluster.tmp.path().join(format!("state/{worker}/jobs/{id}"));
        let held: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("job.json")).unwrap()).unwrap();
        let said: serde_json::Value =
            serde_json::from_str(&ctl_ok(&cluster, &["-o", "json", "status", id]).await).unwrap();
        assert_eq!(said["state"], held["state"], "job {id}: {said} / {held}");
        assert_eq!(
            said["exit_code"], held["exit_code"],
            "job {id}: {said} / {held}"
        );
        let bytes = std::fs::read(dir.join("output.log")).unwrap();
        let served = cluster.ctl_output(&["logs", id]).await.stdout;
        assert_eq!(
            served, bytes,
            "job {id}: the output served is what {worker} holds"
        );
    }
}

async fn ctl_ok_output(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    let out = cluster.ctl_output(args).await;
    assert!(
        out.status.success(),
        "clusterctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn logs(cluster: &Cluster, more: &[Scheduler]) -> Vec<String> {
    std::iter::once(cluster.scheduler.log())
        .chain(more.iter().map(|s| s.daemon.log()))
        .collect()
}

/// The index of the leading scheduler, waiting for one.
async fn find_leader(cluster: &Cluster, more: &[Scheduler]) -> usize {
    find_leader_except(cluster, more, usize::MAX).await
}

async fn find_leader_except(cluster: &Cluster, more: &[Scheduler], except: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = logs(cluster, more);
        if let Some(i) = (0..logs.len()).find(|&i| i != except && leads(&logs[i])) {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "no leader:\n{}",
            logs.join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A leader paused (SIGSTOP) past its lease is replaced within 15 s; woken
/// up, it finds its term over and steps down instead of acting on it, and
/// the cluster goes on with one leader.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_is_replaced_and_steps_down_when_it_wakes() {
    let (cluster, more) = schedulers(2, &["w1"], "").await;
    let leader = find_leader(&cluster, &more).await;
    let paused = if leader == 0 {
        &cluster.scheduler
    } else {
        &more[leader - 1].daemon
    };
    paused.signal(Signal::SIGSTOP);
    let at = Instant::now();
    let next = find_leader_except(&cluster, &more, leader).await;
    assert!(
        at.elapsed() < Duration::from_secs(15),
        "took {:?}",
        at.elapsed()
    );
    // Jobs start and run meanwhile, through the one that leads now.
    let url = if next == 0 {
        cluster.http_addr.clone()
    } else {
        more[next - 1].daemon.addrs["http"].clone()
    };
    // Once the worker has moved to a scheduler that answers (it timed out
    // on the paused one), which the new leader sees.
    let deadline = Instant::now() + Duration::from_secs(15);
    let out = loop {
        let out = ctl_at(
            &cluster,
            &url,
            &["run", "--worker", "w1", "count.sh", "--", "2", "0"],
        )
        .await;
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        stdout(&out),
        "1\n2\ndone\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    paused.signal(Signal::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let logs = logs(&cluster, &more);
        if !leads(&logs[leader]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the woken leader never stepped down:\n{}",
            logs[leader]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = logs(&cluster, &more);
    assert_eq!(logs.iter().filter(|l| leads(l)).count(), 1);
}

/// `[store]` and `[scheduler] addrs` are checked at start, with one line
/// naming the key; a database off this machine needs TLS.
#[test]
fn store_and_scheduler_list_settings_are_checked_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("scripts")).unwrap();
    std::fs::write(tmp.path().join("pw"), "secret\n").unwrap();
    crate::cluster::run_ok(&["pki", "init", tmp.path().join("pki").to_str().unwrap()]);
    let insecure = "[grpc_server]\nuse_tls = false\ninsecure = true\n";
    let cases = [
        ("url = \"postgres://u@127.0.0.1:5432/db\"", None),
        (
            "url = \"postgres://u@localhost/db\"\npassword_file = \"pw\"",
            None,
        ),
        (
            "url = \"postgres://u@db.example:5432/db\"",
            Some("store.url"),
        ),
        ("url = \"mysql://u@127.0.0.1/db\"", Some("store.url")),
        (
            "url = \"postgres://u@127.0.0.1/db\"\npath = \"s.db\"",
            Some("store.url"),
        ),
        ("password_file = \"pw\"", Some("store.password_file")),
        (
            "url = \"postgres://u@127.0.0.1/db\"\npassword_file = \"missing\"",
            Some("store.password_file"),
        ),
        (
            "url = \"postgres://u@127.0.0.1/db\"\nleader_lease = \"0s\"",
            Some("store.leader_lease"),
        ),
        // Off this machine with a CA: TLS, accepted; a certificate needs
        // its key; the CA must load; and none of it without a URL.
        (
            "url = \"postgres://u@db.example/db\"\nca_file = \"pki/ca.pem\"",
            None,
        ),
        (
            "url = \"postgres://u@db.example/db\"\nca_file = \"pki/ca.pem\"\ncrt_file = \"pki/client.pem\"",
            Some("store.crt_file"),
        ),
        (
            "url = \"postgres://u@db.example/db\"\nca_file = \"pki/missing.pem\"",
            Some("store.ca_file"),
        ),
        ("ca_file = \"pki/ca.pem\"", Some("store.ca_file")),
    ];
    let path = tmp.path().join("schedulerd.toml");
    for (store, refused) in cases {
        std::fs::write(&path, format!("{insecure}\n[store]\n{store}\n")).unwrap();
        let out = std::process::Command::new(bin("schedulerd"))
            .args(["--config", path.to_str().unwrap(), "--check-config"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), refused.is_none(), "{store}: {stderr}");
        if let Some(key) = refused {
            assert!(stderr.contains(key), "{store}: {stderr}");
            assert!(!stderr.contains("secret"), "{stderr}");
        }
    }
    let worker = |scheduler: &str| {
        format!(
            "{insecure}\n[scheduler]\n{scheduler}\n[worker]\nname = \"w1\"\nscripts_dir = \"scripts\"\nstate_dir = \"state\"\n\n[plugins.bash]\nrunner = \"bash\"\n"
        )
    };
    let path = tmp.path().join("workerd.toml");
    let seventeen = format!("addrs = [{}]", vec!["\"127.0.0.1:1\""; 17].join(", "));
    for (scheduler, ok) in [
        ("addrs = [\"127.0.0.1:1\", \"127.0.0.1:2\"]", true),
        ("addrs = []", false),
        (seventeen.as_str(), false),
        ("addr = \"127.0.0.1:1\"\naddrs = [\"127.0.0.1:2\"]", false),
    ] {
        std::fs::write(&path, worker(scheduler)).unwrap();
        let out = std::process::Command::new(bin("workerd"))
            .args(["--config", path.to_str().unwrap(), "--check-config"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), ok, "{scheduler}: {stderr}");
        if !ok {
            assert!(stderr.contains("scheduler.addrs"), "{scheduler}: {stderr}");
        }
    }
}

/// clusterctl takes several scheduler URLs and sends a request that
/// cannot reach one to the next; a list it cannot use is refused.
#[tokio::test(flavor = "multi_thread")]
async fn clusterctl_tries_the_next_scheduler_when_one_cannot_be_reached() {
    let cluster = Cluster::start(&["w1"]).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("https://{}", dead.local_addr().unwrap());
    drop(dead);
    let both = format!("{dead_url},{}", cluster.url());
    let out = cluster
        .ctl()
        .env("CLUSTERCTL_SCHEDULER", &both)
        .args(["run", "--worker", "w1", "count.sh", "--", "2", "0"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout(&out), "1\n2\ndone\n");
    assert!(stderr.contains("trying the scheduler at"), "{stderr}");
    for bad in [
        format!("http://127.0.0.1:1,{}", cluster.url()),
        vec![cluster.url(); 17].join(","),
        ",".to_owned(),
    ] {
        let out = cluster
            .ctl()
            .env("CLUSTERCTL_SCHEDULER", &bad)
            .arg("workers")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}");
        assert!(stderr.contains("CLUSTERCTL_SCHEDULER"), "{bad}: {stderr}");
    }
}

/// A follower on a scheduler that does not lead (whose dispatcher is idle
/// and tells it nothing) follows a group member queued on a full worker
/// once the leader starts it.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_group_member_is_followed_through_a_scheduler_that_does_not_lead() {
    let (cluster, more) = schedulers(2, &["w1"], "max_jobs = 1\n---\n").await;
    let leader = find_leader(&cluster, &more).await;
    let https = [
        cluster.http_addr.clone(),
        more[0].daemon.addrs["http"].clone(),
    ];
    let other = &https[1 - leader];
    // The other scheduler knows the worker once it has synced with the
    // store (every heartbeat interval).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stdout(&ctl_at(&cluster, other, &["workers"]).await).contains("ready") {
        assert!(Instant::now() < deadline, "{other} never knew w1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let long = job_id(
        &ctl_ok_output(
            &cluster,
            &[
                "-o", "json", "start", "--worker", "w1", "count.sh", "--", "600", "0.1",
            ],
        )
        .await,
    );
    let run = Running::until(
        cluster
            .ctl()
            .env("CLUSTERCTL_SCHEDULER", format!("https://{other}"))
            .args(["run", "--all", "count.sh", "--", "2", "0"]),
        "started group",
    )
    .await;
    assert!(run.said.contains("1 queued"), "{}", run.said);
    // The follower waits for the member before the leader starts it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctl_ok(&cluster, &["stop", &long]).await;
    let (out, said) = run.finish(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert_eq!(stdout(&out), "[w1] 1\n[w1] 2\n[w1] done\n");
}

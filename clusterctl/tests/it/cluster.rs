//! A whole cluster in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use jobcluster_proto::http::{WorkerInfo, WorkerList};

use crate::harness::{Daemon, eventually};

/// A binary of this build, by name. `JOBCLUSTER_CLUSTERCTL=PATH` puts
/// another clusterctl under the same tests: CI runs the CLI's tests with
/// the release clusterctl, which is linked on its own (scripts/release.sh).
pub fn bin(name: &str) -> PathBuf {
    if let Some(other) = std::env::var_os("JOBCLUSTER_CLUSTERCTL").filter(|_| name == "clusterctl")
    {
        let path = PathBuf::from(other);
        assert!(
            path.exists(),
            "JOBCLUSTER_CLUSTERCTL={} is missing",
            path.display()
        );
        return path;
    }
    let path = PathBuf::from(env!("CARGO_BIN_EXE_clusterctl")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build every binary first (`cargo build --workspace --bins`, as scripts/test.sh does)",
        path.display()
    );
    path
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub scheduler: Daemon,
    pub workers: Vec<(String, Daemon)>,
    pub http_addr: String,
    pub grpc_addr: String,
    /// More schedulers on the same store (`ha`): their gRPC addresses go
    /// into new workers' `[scheduler] addrs`, their URLs into clusterctl's.
    pub more_schedulers: Vec<(String, String)>,
    /// Its PostgreSQL database, if its store is one; last, so that it is
    /// dropped after the daemons.
    _database: Option<crate::postgres::Database>,
}

impl Cluster {
    pub fn pki(&self) -> PathBuf {
        self.tmp.path().join("pki")
    }

    /// A scheduler and one worker per name, all registered.
    pub async fn start(worker_names: &[&str]) -> Cluster {
        Self::start_with(worker_names, "", "").await
    }

    /// A cluster whose scheduler's `[workers]` timings are changed:
    /// `("lost_after", "30s")` replaces that key's value.
    pub async fn start_tuned(worker_names: &[&str], workers: &[(&str, &str)]) -> Cluster {
        let mut config = SCHEDULER_CONFIG.to_owned();
        for (key, value) in workers {
            let line = config
                .lines()
                .find(|l| l.starts_with(&format!("{key} =")))
                .map(str::to_owned);
            let new = format!("{key} = \"{value}\"");
            config = match line {
                Some(line) => config.replacen(&line, &new, 1),
                None => config.replacen("[workers]\n", &format!("[workers]\n{new}\n"), 1),
            };
        }
        Self::start_from(worker_names, &config, "", None).await
    }

    /// A cluster whose scheduler keeps its store in `store_dir` (a test may
    /// put that on a small filesystem of its own), in SQLite whatever
    /// `JOBCLUSTER_TEST_STORE` says.
    pub async fn start_with_store(worker_names: &[&str], store_dir: &Path) -> Cluster {
        let config = SCHEDULER_CONFIG.replacen(
            SQLITE_STORE,
            &format!("path = \"{}\"", store_dir.join("scheduler.db").display()),
            1,
        );
        Self::start_from(worker_names, &config, "", None).await
    }

    /// [`Cluster::start_with`], its scheduler on SQLite whatever
    /// `JOBCLUSTER_TEST_STORE` says (for tests of the database file).
    pub async fn start_with_on_sqlite(
        worker_names: &[&str],
        scheduler_extra: &str,
        worker_extra: &str,
    ) -> Cluster {
        let config = format!("{SCHEDULER_CONFIG}{scheduler_extra}").replacen(
            SQLITE_STORE,
            &format!("{SQLITE_STORE} # always SQLite"),
            1,
        );
        Self::start_from(worker_names, &config, worker_extra, None).await
    }

    /// A cluster whose scheduler keeps its records in PostgreSQL, in a new
    /// database on this test process's throwaway server, with more
    /// `[store]` keys.
    pub async fn start_on_postgres(worker_names: &[&str], store_keys: &str) -> Cluster {
        let (config, database) = postgres_store(SCHEDULER_CONFIG)
            .await
            .expect("the scheduler's config keeps its store in SQLite");
        let config = config.replacen("[store]\n", &format!("[store]\n{store_keys}\n"), 1);
        Self::start_from(worker_names, &config, "", Some(database)).await
    }

    /// A cluster with extra scheduler config and extra config for every worker.
    pub async fn start_with(
        worker_names: &[&str],
        scheduler_extra: &str,
        worker_extra: &str,
    ) -> Cluster {
        let config = format!("{SCHEDULER_CONFIG}{scheduler_extra}");
        Self::start_from(worker_names, &config, worker_extra, None).await
    }

    /// A cluster on `database` when given; else, with
    /// JOBCLUSTER_TEST_STORE=postgres, on a new database unless the test
    /// chose its store (the plain SQLite line is gone).
    async fn start_from(
        worker_names: &[&str],
        scheduler_config: &str,
        worker_extra: &str,
        mut database: Option<crate::postgres::Database>,
    ) -> Cluster {
        let mut scheduler_config = scheduler_config.to_owned();
        if database.is_none()
            && std::env::var("JOBCLUSTER_TEST_STORE").as_deref() == Ok("postgres")
            && let Some((config, db)) = postgres_store(&scheduler_config).await
        {
            scheduler_config = config;
            database = Some(db);
        }
        let tmp = tempfile::tempdir().unwrap();
        let pki = tmp.path().join("pki");
        run_ok(&["pki", "init", pki.to_str().unwrap()]);
        let scripts = tmp.path().join("scripts");
        std::fs::create_dir_all(&scripts).unwrap();
        let repo_scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
        for name in ["count.sh", "count.py", "fail.sh"] {
            std::fs::copy(repo_scripts.join(name), scripts.join(name)).unwrap();
        }
        open_to_jobs(tmp.path());
        std::fs::write(tmp.path().join("scheduler.toml"), &scheduler_config).unwrap();
        let scheduler = Daemon::spawn_with(
            &bin("schedulerd"),
            &[
                "--config",
                tmp.path().join("scheduler.toml").to_str().unwrap(),
            ],
            &["grpc", "http"],
            &[],
        );
        let grpc_addr = scheduler.addrs["grpc"].clone();
        let http_addr = scheduler.addrs["http"].clone();
        let mut cluster = Cluster {
            tmp,
            scheduler,
            workers: Vec::new(),
            http_addr,
            grpc_addr,
            more_schedulers: Vec::new(),
            _database: database,
        };
        for name in worker_names {
            cluster.add_worker_with(name, worker_extra);
        }
        let names: Vec<String> = worker_names.iter().map(|s| s.to_string()).collect();
        let ready = eventually(Duration::from_secs(20), || {
            let workers = cluster.workers_blocking();
            names
                .iter()
                .all(|n| workers.iter().any(|w| &w.name == n && w.state == "ready"))
        })
        .await;
        assert!(
            ready,
            "workers never registered:\n{}",
            cluster.scheduler.log()
        );
        cluster
    }

    /// Issues a certificate for `name` and starts a worker with it and `extra` config.
    pub fn add_worker_with(&mut self, name: &str, extra: &str) {
        self.add_worker_at(name, extra, None);
    }

    /// Starts a worker `name` whose `state_dir` is `state_dir` (a test may
    /// put that on a small filesystem of its own).
    pub fn add_worker_in(&mut self, name: &str, state_dir: &Path) {
        self.add_worker_at(name, "", Some(state_dir));
    }

    /// [`Cluster::add_worker_in`] with `extra` config, as
    /// [`Cluster::add_worker_with`] takes it.
    pub fn add_worker_in_with(&mut self, name: &str, state_dir: &Path, extra: &str) {
        self.add_worker_at(name, extra, Some(state_dir));
    }

    /// Issues a worker certificate for `name` from the cluster's CA
    /// (`pki/NAME.pem`, `pki/NAME-key.pem`), as `clusterctl pki issue` does.
    pub fn issue_worker_cert(&self, name: &str) {
        run_ok(&[
            "pki",
            "issue",
            self.pki().to_str().unwrap(),
            "--role",
            "worker",
            name,
        ]);
    }

    fn add_worker_at(&mut self, name: &str, extra: &str, state_dir: Option<&Path>) {
        self.issue_worker_cert(name);
        let config = self.write_worker_config_with(
            name,
            &format!("pki/{name}.pem"),
            &format!("pki/{name}-key.pem"),
            extra,
        );
        if let Some(dir) = state_dir {
            let text = std::fs::read_to_string(&config).unwrap().replacen(
                &format!("state_dir = \"state/{name}\""),
                &format!("state_dir = \"{}\"", dir.display()),
                1,
            );
            std::fs::write(&config, text).unwrap();
        }
        let daemon = Daemon::spawn(&bin("workerd"), &["--config", config.to_str().unwrap()]);
        self.workers.push((name.to_owned(), daemon));
    }

    /// Starts the worker `name` again from its existing config.
    pub fn restart_worker(&mut self, name: &str) {
        let config = self.tmp.path().join(format!("{name}.toml"));
        let daemon = Daemon::spawn(&bin("workerd"), &["--config", config.to_str().unwrap()]);
        *self.worker(name) = daemon;
    }

    /// Starts the worker `name` again and waits until the scheduler has
    /// taken its registration and lists it ready.
    pub async fn restart_worker_registered(&mut self, name: &str) {
        let registered = self.scheduler.log().matches("worker registered").count();
        self.restart_worker(name);
        self.scheduler
            .wait_for_log("worker registered", registered)
            .await;
        self.wait_ready(name).await;
    }

    /// Stops the scheduler with `signal` and starts it again on the same
    /// ports with the same database.
    pub fn restart_scheduler(&mut self, signal: nix::sys::signal::Signal) {
        self.stop_scheduler(signal);
        self.start_scheduler_again();
    }

    /// Stops the scheduler with `signal` and waits for it to exit.
    pub fn stop_scheduler(&mut self, signal: nix::sys::signal::Signal) {
        self.scheduler.signal(signal);
        self.scheduler.wait(Duration::from_secs(20));
    }

    /// Starts a stopped scheduler again on the same ports with the same database.
    pub fn start_scheduler_again(&mut self) {
        self.start_scheduler_again_with(&[], &[]);
    }

    /// Like [`Cluster::start_scheduler_again`], with extra flags and environment.
    pub fn start_scheduler_again_with(&mut self, args: &[&str], env: &[(&str, &str)]) {
        let text = std::fs::read_to_string(self.tmp.path().join("scheduler.toml")).unwrap();
        let config = text.replacen("127.0.0.1:0", &self.grpc_addr, 1).replacen(
            "127.0.0.1:0",
            &self.http_addr,
            1,
        );
        let path = self.tmp.path().join("scheduler.toml");
        std::fs::write(&path, config).unwrap();
        let mut all_args = vec!["--config", path.to_str().unwrap()];
        all_args.extend_from_slice(args);
        self.scheduler = Daemon::spawn_with(&bin("schedulerd"), &all_args, &["grpc", "http"], env);
    }

    /// The worker's own copy of a job's output.
    pub fn worker_log(&self, worker: &str, job_id: &str) -> Vec<u8> {
        let path = self
            .tmp
            .path()
            .join("state")
            .join(worker)
            .join("jobs")
            .join(job_id);
        std::fs::read(path.join("output.log")).unwrap()
    }

    /// Waits until the scheduler reports `name` in `state` (at most 10 s).
    pub async fn wait_state(&self, name: &str, state: &str) {
        for _ in 0..400 {
            if self.worker_state(name).await == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(self.worker_state(name).await, state, "worker {name}");
    }

    /// `GET path` on the API, decoded; panics (failing the test) otherwise.
    /// `POST path` with a JSON body: the status and the JSON answer.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let reply = self
            .http()
            .post(format!("{}{path}", self.url()))
            .json(body)
            .send()
            .await
            .unwrap();
        (reply.status(), reply.json().await.unwrap())
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        get_json(&self.http(), &format!("{}{path}", self.url())).await
    }

    /// The worker's state, or "" while the scheduler does not know it.
    pub async fn worker_state(&self, name: &str) -> String {
        let reply = self
            .http()
            .get(format!("{}/v1/workers/{name}", self.url()))
            .send()
            .await
            .unwrap();
        if reply.status() != reqwest::StatusCode::OK {
            return String::new();
        }
        reply.json::<WorkerInfo>().await.unwrap().state
    }

    /// Waits (bounded) until the worker `name` is registered and ready.
    pub async fn wait_ready(&self, name: &str) {
        crate::faults::until(
            Duration::from_secs(20),
            &format!("{name} ready"),
            || async { self.worker_state(name).await == "ready" },
        )
        .await;
    }

    pub async fn worker_info(&self, name: &str) -> WorkerInfo {
        self.get_json(&format!("/v1/workers/{name}")).await
    }

    pub async fn job(&self, job_id: &str) -> jobcluster_proto::http::JobInfo {
        self.get_json(&format!("/v1/jobs/{job_id}")).await
    }

    /// `GET /v1/jobs/{id}/logs?follow=true`, its answer as it comes.
    pub async fn follow_job(&self, job_id: &str) -> reqwest::Response {
        self.http()
            .get(format!("{}/v1/jobs/{job_id}/logs?follow=true", self.url()))
            .send()
            .await
            .unwrap()
    }

    /// Copies the repository's `scripts/NAME` into the workers' scripts.
    pub fn add_repo_script(&self, name: &str) {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
        std::fs::copy(repo.join(name), self.tmp.path().join("scripts").join(name)).unwrap();
    }

    /// Writes `text` as `NAME` in the workers' scripts directory (where
    /// jobs also start).
    pub fn add_script(&self, name: &str, text: &str) {
        std::fs::write(self.tmp.path().join("scripts").join(name), text).unwrap();
    }

    /// Lets a job past its [`WAIT_TO_GO`] line.
    pub fn let_go(&self) {
        self.add_script("go.flag", "");
    }

    /// A group's merged output as NDJSON, followed to the group's end.
    pub async fn group_ndjson(&self, group_id: &str) -> String {
        self.http()
            .get(format!(
                "{}/v1/groups/{group_id}/logs?follow=true&format=ndjson",
                self.url()
            ))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Starts a job over HTTP; returns its id.
    pub async fn start_job(&self, worker: &str, path: &str, args: &[&str]) -> String {
        let reply = self
            .http()
            .post(format!("{}/v1/jobs", self.url()))
            .json(&serde_json::json!({"worker_id": worker, "path": path, "args": args}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), reqwest::StatusCode::CREATED);
        let started: jobcluster_proto::http::JobStarted = reply.json().await.unwrap();
        started.job_id
    }

    pub fn write_worker_config(&self, name: &str, crt: &str, key: &str) -> PathBuf {
        self.write_worker_config_with(name, crt, key, "")
    }

    pub fn write_worker_config_with(
        &self,
        name: &str,
        crt: &str,
        key: &str,
        extra: &str,
    ) -> PathBuf {
        // Lines of `extra` before a `---` line go into [worker]; the rest
        // (whole tables) goes at the end.
        let (worker_keys, extra) = extra.split_once("---\n").unwrap_or(("", extra));
        // Unlimited unless a test sets it: the default (one slot per CPU)
        // would queue the parallel jobs of tests that are not about slots.
        let worker_keys = if worker_keys.contains("max_jobs") {
            worker_keys.to_owned()
        } else {
            format!("max_jobs = 0\n{worker_keys}")
        };
        let config = self.tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[grpc_server]
addr = "127.0.0.1:0"
crt_file = "{crt}"
key_file = "{key}"
ca_file = "pki/ca.pem"

[scheduler]
{schedulers}

[worker]
name = "{name}"
scripts_dir = "scripts"
state_dir = "state/{name}"
{worker_keys}

[plugins.bash]
runner = "bash"
stop_grace = "2s"

[plugins.python]
runner = "python"
{extra}
"#,
                schedulers = self.worker_schedulers(),
            ),
        )
        .unwrap();
        config
    }

    pub fn worker(&mut self, name: &str) -> &mut Daemon {
        &mut self.workers.iter_mut().find(|(n, _)| n == name).unwrap().1
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.http_addr)
    }

    /// Every scheduler's URL, for clusterctl's `--scheduler`.
    pub fn urls(&self) -> String {
        std::iter::once(self.url())
            .chain(
                self.more_schedulers
                    .iter()
                    .map(|(_, http)| format!("https://{http}")),
            )
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A worker config's `[scheduler]` keys.
    fn worker_schedulers(&self) -> String {
        if self.more_schedulers.is_empty() {
            return format!("addr = \"{}\"", self.grpc_addr);
        }
        let addrs: Vec<String> = std::iter::once(&self.grpc_addr)
            .chain(self.more_schedulers.iter().map(|(grpc, _)| grpc))
            .map(|a| format!("\"{a}\""))
            .collect();
        format!("addrs = [{}]", addrs.join(", "))
    }

    /// `clusterctl` with the scheduler URL and client certificate in its environment.
    pub fn ctl(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin("clusterctl"));
        let pki = self.pki();
        cmd.env("CLUSTERCTL_SCHEDULER", self.urls())
            .env("CLUSTERCTL_CA", pki.join("ca.pem"))
            .env("CLUSTERCTL_CERT", pki.join("client.pem"))
            .env("CLUSTERCTL_KEY", pki.join("client-key.pem"))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    pub async fn ctl_output(&self, args: &[&str]) -> Output {
        self.ctl().args(args).output().await.unwrap()
    }

    /// `clusterctl logs -f JOB` running, its stdout and stderr piped.
    pub fn spawn_follow(&self, job_id: &str) -> tokio::process::Child {
        self.ctl()
            .args(["logs", "-f", job_id])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn workers_blocking(&self) -> Vec<WorkerInfo> {
        let out = std::process::Command::new(bin("clusterctl"))
            .args(["-o", "json", "workers"])
            .env("CLUSTERCTL_SCHEDULER", self.url())
            .env("CLUSTERCTL_CA", self.pki().join("ca.pem"))
            .env("CLUSTERCTL_CERT", self.pki().join("client.pem"))
            .env("CLUSTERCTL_KEY", self.pki().join("client-key.pem"))
            .output()
            .unwrap();
        if !out.status.success() {
            return Vec::new();
        }
        serde_json::from_slice::<Vec<WorkerInfo>>(&out.stdout)
            .or_else(|_| serde_json::from_slice::<WorkerList>(&out.stdout).map(|l| l.workers))
            .unwrap_or_default()
    }

    /// An HTTP client presenting the cluster's client certificate.
    pub fn http(&self) -> reqwest::Client {
        self.http_as(Some(("client.pem", "client-key.pem")))
    }

    /// A client with the client certificate that speaks only HTTP/1.1, or
    /// only HTTP/2.
    pub fn http_version(&self, http2: bool) -> reqwest::Client {
        self.http_version_within(http2, Some(Duration::from_secs(30)))
    }

    /// As [`Cluster::http_version`], with `timeout` for a whole request
    /// (none: a body read as slowly as the test means to).
    pub fn http_version_within(&self, http2: bool, timeout: Option<Duration>) -> reqwest::Client {
        let pki = self.pki();
        let roots = jobcluster_pki::Roots::load(&pki.join("ca.pem")).unwrap();
        let identity =
            jobcluster_pki::Identity::load(&pki.join("client.pem"), &pki.join("client-key.pem"))
                .unwrap();
        let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = jobcluster_pki::client_config(&roots, Some(&identity), alpn).unwrap();
        let mut builder = reqwest::Client::builder().tls_backend_preconfigured((*tls).clone());
        if let Some(timeout) = timeout {
            builder = builder.timeout(timeout);
        }
        let builder = if http2 {
            builder.http2_prior_knowledge()
        } else {
            builder.http1_only()
        };
        builder.build().unwrap()
    }

    pub fn http_as(&self, cert: Option<(&str, &str)>) -> reqwest::Client {
        let pki = self.pki();
        let roots = jobcluster_pki::Roots::load(&pki.join("ca.pem")).unwrap();
        let identity =
            cert.map(|(c, k)| jobcluster_pki::Identity::load(&pki.join(c), &pki.join(k)).unwrap());
        let tls = jobcluster_pki::client_config(&roots, identity.as_ref(), &[b"h2", b"http/1.1"])
            .unwrap();
        reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }
}

/// A line of a job's script that waits until the test calls
/// [`Cluster::let_go`] (a file in the scripts directory, where jobs start);
/// jobs started after that go straight on.
pub const WAIT_TO_GO: &str = "while [ ! -e go.flag ]; do sleep 0.02; done\n";

/// For [`Cluster::start_tuned`], where a test pauses a worker (SIGSTOP):
/// a call to it gives up after a second, and it is neither down nor its
/// jobs lost while the test runs. Heartbeats every 2 s put the liveness
/// check's suspicion (unresponsive: two intervals + 1 s of silence) at 5 s,
/// well after the call's timeout: with the default 250 ms it came 1.5 s
/// after the pause, which a loaded machine could reach before the call
/// the test makes of the paused worker.
pub const PAUSED_WORKER_TUNING: &[(&str, &str)] = &[
    ("heartbeat_interval", "2s"),
    ("call_timeout", "1s"),
    ("refresh_timeout", "1s"),
    ("down_after", "30s"),
    ("lost_after", "60s"),
];

const SQLITE_STORE: &str = "path = \"state/scheduler.db\"";

/// `config` with its SQLite store replaced by a new PostgreSQL database,
/// and the database; `None` when its store is not the plain SQLite one (a
/// line that goes on, ` # always SQLite`, is left alone).
pub async fn postgres_store(config: &str) -> Option<(String, crate::postgres::Database)> {
    let sqlite = format!("{SQLITE_STORE}\n");
    if !config.contains(&sqlite) {
        return None;
    }
    let server = crate::postgres::Postgres::shared().unwrap_or_else(|why| panic!("{why}"));
    let database = tokio::task::spawn_blocking(|| server.database())
        .await
        .unwrap();
    let config = config.replacen(&sqlite, &format!("url = \"{}\"\n", database.url), 1);
    Some((config, database))
}

/// `[http_server]` comes last so that a test's extra lines may add keys to it.
const SCHEDULER_CONFIG: &str = r#"
[grpc_server]
addr = "127.0.0.1:0"
crt_file = "pki/scheduler.pem"
key_file = "pki/scheduler-key.pem"
ca_file = "pki/ca.pem"

[store]
path = "state/scheduler.db"

# Fast enough for tests to see a worker go down within seconds.
[workers]
heartbeat_interval = "250ms"
down_after = "1500ms"
lost_after = "3s"
# A healthy worker on a loaded test machine answers well within this.
refresh_timeout = "3s"

[http_server]
addr = "127.0.0.1:0"
"#;

/// Lets jobs reach `dir/scripts` as a user other than root (a root
/// workerd runs them as nobody): temporary directories are made 0700.
pub fn open_to_jobs(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for dir in [dir.to_owned(), dir.join("scripts")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A size line of `/proc/PID/status` in KiB: `VmRSS` (resident now),
/// `VmHWM` (the most it has been resident).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// CPU time (user and system) process `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // utime and stime, fields 14 and 15, after the command's ")".
    let ticks: u64 = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split(' ')
        .skip(11)
        .take(2)
        .map(|f| f.parse::<u64>().unwrap())
        .sum();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap();
    ticks as f64 / per_second as f64
}

/// Runs clusterctl synchronously and asserts success.
pub fn run_ok(args: &[&str]) -> Output {
    let out = std::process::Command::new(bin("clusterctl"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "clusterctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `GET` of `url` with `http`, its JSON answer.
pub async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &str) -> T {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// A group's merged text output: `worker`'s lines, without their prefix.
pub fn lines_of<'a>(text: &'a str, worker: &str) -> Vec<&'a str> {
    let prefix = format!("[{worker}] ");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `clusterctl` started with its output piped, whose stderr has been
/// read up to a line the test waits for.
pub struct Running {
    child: tokio::process::Child,
    errors: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    /// Its stderr so far.
    pub said: String,
    /// The line waited for, without the prefix it starts with.
    pub line: Option<String>,
}

impl Running {
    /// Starts `command` and reads its stderr up to the first line that
    /// starts with `prefix` (or its end).
    pub async fn until(command: &mut tokio::process::Command, prefix: &str) -> Running {
        use tokio::io::AsyncBufReadExt;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut errors = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = String::new();
        let mut line = None;
        while let Ok(Some(next)) = errors.next_line().await {
            said.push_str(&next);
            said.push('\n');
            if let Some(rest) = next.strip_prefix(prefix) {
                line = Some(rest.to_owned());
                break;
            }
        }
        Running {
            child,
            errors,
            said,
            line,
        }
    }

    /// Waits up to `within` for its end: its status and stdout, and all it
    /// said on stderr.
    pub async fn finish(self, within: Duration) -> (Output, String) {
        let Running {
            child,
            mut errors,
            mut said,
            ..
        } = self;
        let rest = tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                said.push_str(&line);
                said.push('\n');
            }
            said
        });
        let out = tokio::time::timeout(within, child.wait_with_output())
            .await
            .expect("clusterctl never ended")
            .unwrap();
        (out, rest.await.unwrap())
    }
}

//! `bench workers --simulate N`: N simulated workers against a live
//! scheduler, each as a real worker looks to it: a worker certificate from
//! the cluster CA (issued in memory by the pki crate, as `pki issue` does),
//! its own mutual-TLS gRPC connection, a registration, and heartbeats at
//! the interval the scheduler asks for. They run no jobs (they offer a
//! plugin no job names, so nothing is placed on them) and deregister at
//! the end.
//!
//! The figures: registrations per second; the scheduler's share of one
//! core over a steady window of heartbeats (utime + stime from
//! /proc/PID/stat over wall time) and its CPU time per heartbeat; its RSS
//! before the workers came and after the window, and the difference per
//! worker; and the latency of `GET /v1/workers?limit=100` and
//! `GET /v1/jobs?limit=1` measured first without the simulated workers and
//! then with them, in the same run.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobcluster_pki::{CertificateAuthority, ExpectedPeer, Identity, Role, Roots};
use jobcluster_proto::http::JobFilter;
use jobcluster_proto::pb::scheduler_client::SchedulerClient;
use jobcluster_proto::pb::{DeregisterWorkerRequest, HeartbeatRequest, RegisterWorkerRequest};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::transport::Channel;

use super::{LatencyMs, LatencySummary, per_second, plural, round};
use crate::api::{Api, ConnectOptions};
use crate::cli::{BenchWorkersArgs, Output};
use crate::output;

/// Descriptors this process needs besides one per simulated worker
/// (stdio, the API client, the runtime, certificate files).
const SPARE_FILES: u64 = 128;
/// A registration or heartbeat that takes longer has failed (as a real
/// worker's would: it uses 5 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the simulated workers get to deregister at the end.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Worker certificates issued per blocking task.
const ISSUE_BATCH: usize = 256;
/// The scheduler's clock ticks: `USER_HZ`, which Linux fixes at 100 in
/// its user ABI on every architecture this runs on.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
/// The plugin the simulated workers offer: no job names it, so the
/// scheduler never places a job on them.
const SIMULATED_PLUGIN: &str = "bench-simulated";

/// Counters every simulated worker adds to.
#[derive(Debug, Default)]
struct Tally {
    heartbeats: AtomicU64,
    failed_heartbeats: AtomicU64,
    /// Heartbeats answered `known: false` (the worker registered again).
    reregistered: AtomicU64,
    deregistered: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn error(&self, error: String) {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(error);
    }
}

/// One simulated worker's part of the run.
struct Simulated {
    index: u32,
    count: u32,
    name: String,
    config: Arc<rustls::ClientConfig>,
}

pub(super) async fn run(
    opts: &ConnectOptions,
    format: Output,
    args: &BenchWorkersArgs,
) -> anyhow::Result<ExitCode> {
    let n = args.simulate;
    // One connection each, as real workers: the soft limit (often 1024)
    // would stop far short of the thousands this is for.
    let open_files = jobcluster_proto::daemon::raise_open_files_limit();
    if open_files < u64::from(n) + SPARE_FILES {
        anyhow::bail!(
            "simulating {n} workers needs {} open files and the limit is {open_files}: raise the hard limit (ulimit -Hn, or LimitNOFILE=) or simulate fewer",
            u64::from(n) + SPARE_FILES
        );
    }
    let pid = match args.scheduler_pid {
        Some(pid) => Some(pid),
        None => find_scheduler()?,
    };
    if pid.is_none() {
        eprintln!(
            "clusterctl: no process named schedulerd here: the scheduler's CPU and memory are left out (--scheduler-pid PID)"
        );
    }
    let api = Api::new(opts)?;
    // Also checks that the API answers before anything is simulated.
    api.workers_page(1)
        .await
        .map_err(|e| anyhow::anyhow!("cannot list workers: {e}"))?;

    let workers = issue_certificates(args).await?;

    let rss_before = pid.map(rss_kib).transpose()?;
    eprintln!(
        "clusterctl: API latency without the simulated workers ({} per route)",
        plural(u64::from(args.requests), "request")
    );
    let without = route_latency(&api, args.requests).await?;

    eprintln!(
        "clusterctl: registering {} with {} (at most {} at once)",
        plural(u64::from(n), "simulated worker"),
        args.grpc,
        args.concurrency
    );
    let tally = Arc::new(Tally::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (registered_tx, mut registered_rx) = mpsc::channel(1024);
    let gate = Arc::new(Semaphore::new(args.concurrency as usize));
    let interval = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in workers {
        let channel = jobcluster_proto::transport::tls_channel(
            &args.grpc,
            worker.config.clone(),
            CONNECT_TIMEOUT,
        )
        .map_err(|e| anyhow::anyhow!("--grpc: {e}"))?;
        tasks.spawn(simulate(
            worker,
            SchedulerClient::new(channel),
            Shared {
                tally: tally.clone(),
                gate: gate.clone(),
                interval: interval.clone(),
                registered: registered_tx.clone(),
                stop: stop_rx.clone(),
            },
        ));
    }
    drop(registered_tx);
    let mut latencies = Vec::with_capacity(n as usize);
    let mut failed_registrations = 0u64;
    let mut first_registration_error = None;
    while let Some(result) = registered_rx.recv().await {
        match result {
            Ok(latency) => latencies.push(latency),
            Err(error) => {
                failed_registrations += 1;
                first_registration_error.get_or_insert(error);
            }
        }
        let done = latencies.len() as u64 + failed_registrations;
        if done.is_multiple_of(1000) && done < u64::from(n) {
            eprintln!("clusterctl: {done} of {n} registrations answered");
        }
    }
    let registration_time = began.elapsed();
    let registered = latencies.len() as u64;
    let heartbeat_interval = Duration::from_millis(interval.load(Ordering::Relaxed).max(1));

    // One interval for the heartbeats to spread out and settle, then the
    // steady window.
    eprintln!(
        "clusterctl: {registered} registered; heartbeats every {}; settling for one interval, then measuring for {} s",
        humantime::format_duration(heartbeat_interval),
        args.steady
    );
    tokio::time::sleep(heartbeat_interval).await;
    let window = Duration::from_secs(u64::from(args.steady));
    let cpu_before = pid.map(cpu_ticks).transpose()?;
    let heartbeats_before = tally.heartbeats.load(Ordering::Relaxed);
    let window_began = Instant::now();
    let mut samples = Vec::new();
    if let (Some(pid), Some(every)) = (pid, args.sample_every) {
        let every = Duration::from_secs(u64::from(every));
        samples.push(RssSample::now(pid, Duration::ZERO)?);
        while window_began.elapsed() + every <= window {
            let next = every * samples.len() as u32;
            tokio::time::sleep(next.saturating_sub(window_began.elapsed())).await;
            samples.push(RssSample::now(pid, window_began.elapsed())?);
        }
    }
    tokio::time::sleep(window.saturating_sub(window_began.elapsed())).await;
    let window_time = window_began.elapsed();
    let heartbeats = tally
        .heartbeats
        .load(Ordering::Relaxed)
        .saturating_sub(heartbeats_before);
    let cpu_after = pid.map(cpu_ticks).transpose()?;
    let rss_after = pid.map(rss_kib).transpose()?;
    if let Some(pid) = pid
        && args.sample_every.is_some()
    {
        samples.push(RssSample::now(pid, window_time)?);
    }

    eprintln!("clusterctl: API latency with the simulated workers");
    let with = route_latency(&api, args.requests).await?;
    let listed = api
        .workers(false)
        .await
        .map_err(|e| anyhow::anyhow!("cannot list workers: {e}"))?
        .parsed
        .iter()
        .filter(|w| w.name.starts_with(&format!("{}-", args.prefix)) && w.state == "ready")
        .count() as u64;

    eprintln!("clusterctl: the simulated workers deregister");
    let _ = stop_tx.send(true);
    let left = tokio::time::timeout(LEAVE_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if left.is_err() {
        tasks.abort_all();
        tally.error(format!(
            "not every simulated worker deregistered within {}",
            humantime::format_duration(LEAVE_TIMEOUT)
        ));
    }

    let scheduler = match (pid, cpu_before, cpu_after, rss_before, rss_after) {
        (Some(pid), Some(cpu_before), Some(cpu_after), Some(rss_before), Some(rss_after)) => {
            let cpu = (cpu_after.saturating_sub(cpu_before)) as f64 / CLOCK_TICKS_PER_SECOND;
            Some(SchedulerFigures {
                pid,
                cpu_seconds: round(cpu, 2),
                cpu_share_of_one_core: round(cpu / window_time.as_secs_f64().max(1e-9), 4),
                cpu_ms_per_heartbeat: (heartbeats > 0)
                    .then(|| round(cpu * 1000.0 / heartbeats as f64, 4)),
                rss_before_kib: rss_before,
                rss_after_kib: rss_after,
                rss_per_worker_bytes: (registered > 0).then(|| {
                    round(
                        (rss_after as f64 - rss_before as f64) * 1024.0 / registered as f64,
                        0,
                    )
                }),
                rss_samples: samples,
            })
        }
        _ => None,
    };
    let first_error = first_registration_error.or_else(|| {
        tally
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    });
    let report = WorkersReport {
        mode: "workers",
        simulated: n,
        registered,
        failed_registrations,
        listed,
        first_error,
        registration_seconds: round(registration_time.as_secs_f64(), 3),
        registrations_per_second: round(per_second(registered as f64, registration_time), 1),
        registration_latency_ms: LatencySummary::of(latencies).map(|s| s.in_ms()),
        heartbeat_interval_ms: heartbeat_interval.as_millis() as u64,
        steady_seconds: round(window_time.as_secs_f64(), 3),
        heartbeats,
        heartbeats_per_second: round(per_second(heartbeats as f64, window_time), 1),
        failed_heartbeats: tally.failed_heartbeats.load(Ordering::Relaxed),
        reregistered: tally.reregistered.load(Ordering::Relaxed),
        deregistered: tally.deregistered.load(Ordering::Relaxed),
        scheduler,
        latency_without_workers: without,
        latency_with_workers: with,
    };
    let succeeded = report.failed_registrations == 0 && report.failed_heartbeats == 0;
    super::print_report(format, &report, report.text(), succeeded)
}

/// What the simulated workers share with the run.
struct Shared {
    tally: Arc<Tally>,
    /// Registrations (and deregistrations) in flight.
    gate: Arc<Semaphore>,
    /// The heartbeat interval the scheduler asked for, in ms.
    interval: Arc<AtomicU64>,
    registered: mpsc::Sender<Result<Duration, String>>,
    stop: watch::Receiver<bool>,
}

/// One worker: registers (its latency or error goes to `registered`),
/// heartbeats until the run stops, then deregisters.
async fn simulate(worker: Simulated, mut client: SchedulerClient<Channel>, mut shared: Shared) {
    let request = RegisterWorkerRequest {
        // Nothing listens there: the scheduler dials a worker only to run
        // or ask about a job, and none is placed on these.
        address: "127.0.0.1:9".to_owned(),
        name: worker.name.clone(),
        plugins: vec![SIMULATED_PLUGIN.to_owned()],
        labels: [("bench".to_owned(), "simulated".to_owned())].into(),
        instance_id: uuid::Uuid::new_v4().to_string(),
        max_jobs: 1,
        ..Default::default()
    };
    let register = |client: &mut SchedulerClient<Channel>| {
        let mut client = client.clone();
        let request = request.clone();
        async move {
            let reply = tokio::time::timeout(CALL_TIMEOUT, client.register_worker(request))
                .await
                .map_err(|_| "registration timed out".to_owned())?
                .map_err(|s| format!("registration refused: {}", s.message()))?
                .into_inner();
            Ok::<_, String>((reply.worker_id, reply.heartbeat_interval_ms))
        }
    };
    let first = {
        let Ok(_permit) = shared.gate.acquire().await else {
            return;
        };
        let sent = Instant::now();
        register(&mut client).await.map(|r| (r, sent.elapsed()))
    };
    let (mut worker_id, interval_ms) = match first {
        Ok(((id, interval_ms), latency)) => {
            let _ = shared.registered.send(Ok(latency)).await;
            (id, interval_ms)
        }
        Err(error) => {
            let _ = shared.registered.send(Err(error)).await;
            return;
        }
    };
    drop(shared.registered);
    shared.interval.store(interval_ms, Ordering::Relaxed);
    // As workerd does with a zero interval.
    let every = Duration::from_millis(if interval_ms == 0 { 5000 } else { interval_ms });
    // Spread evenly over one interval, as workers started at random times
    // would be.
    let offset = every.mul_f64(f64::from(worker.index) / f64::from(worker.count.max(1)));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shared.stop.changed() => break,
        }
        let beat = HeartbeatRequest {
            worker_id: worker_id.clone(),
            instance_id: request.instance_id.clone(),
            jobs: Vec::new(),
        };
        match tokio::time::timeout(CALL_TIMEOUT, client.heartbeat(beat)).await {
            Ok(Ok(reply)) if reply.get_ref().known => {
                shared.tally.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) => {
                // The scheduler no longer knows it: register again, as
                // workerd does.
                shared.tally.reregistered.fetch_add(1, Ordering::Relaxed);
                match register(&mut client).await {
                    Ok((id, _)) => worker_id = id,
                    Err(error) => {
                        shared
                            .tally
                            .failed_heartbeats
                            .fetch_add(1, Ordering::Relaxed);
                        shared.tally.error(format!("{}: {error}", worker.name));
                    }
                }
            }
            failed => {
                let why = match failed {
                    Ok(Err(status)) => format!("heartbeat: {}", status.message()),
                    _ => "heartbeat timed out".to_owned(),
                };
                shared
                    .tally
                    .failed_heartbeats
                    .fetch_add(1, Ordering::Relaxed);
                shared.tally.error(format!("{}: {why}", worker.name));
            }
        }
    }
    let Ok(_permit) = shared.gate.acquire().await else {
        return;
    };
    let leave = client.deregister_worker(DeregisterWorkerRequest { worker_id });
    if let Ok(Ok(_)) = tokio::time::timeout(CALL_TIMEOUT, leave).await {
        shared.tally.deregistered.fetch_add(1, Ordering::Relaxed);
    }
}

/// A worker certificate (and a client TLS config presenting it) for each
/// simulated worker, issued by the CA in `--pki` with the pki crate's
/// `CertificateAuthority::issue`, as `clusterctl pki issue --role worker`
/// does; nothing is written to disk.
async fn issue_certificates(args: &BenchWorkersArgs) -> anyhow::Result<Vec<Simulated>> {
    let ca = Arc::new(
        CertificateAuthority::load(&args.pki)
            .map_err(|e| anyhow::anyhow!("--pki {}: {e}", args.pki.display()))?,
    );
    let roots = Roots::load(&args.pki.join("ca.pem"))
        .map_err(|e| anyhow::anyhow!("--pki {}: {e}", args.pki.display()))?;
    let n = args.simulate;
    let names: Vec<String> = (1..=n).map(|i| format!("{}-{i:05}", args.prefix)).collect();
    if let Some(bad) = names.iter().find(|name| !jobcluster_pki::valid_name(name)) {
        anyhow::bail!(
            "--prefix {:?} makes {bad:?}, which is no valid worker name (letters, digits, '.', '-', '_'; at most 64)",
            args.prefix
        );
    }
    eprintln!(
        "clusterctl: issuing {} from {}",
        plural(u64::from(n), "worker certificate"),
        args.pki.display()
    );
    let mut batches = tokio::task::JoinSet::new();
    for (batch, chunk) in names.chunks(ISSUE_BATCH).enumerate() {
        let (ca, roots, chunk) = (ca.clone(), roots.clone(), chunk.to_vec());
        batches.spawn_blocking(move || {
            let configs = chunk
                .iter()
                .map(|name| {
                    let issued = ca.issue(Role::Worker, name, &[])?;
                    let identity =
                        Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())
                            .map_err(|e| anyhow::anyhow!("issued certificate for {name}: {e}"))?;
                    let config = jobcluster_pki::client_config_for(
                        &roots,
                        Some(&identity),
                        &[b"h2"],
                        ExpectedPeer {
                            role: Role::Scheduler,
                            name: None,
                        },
                    )?;
                    Ok::<_, anyhow::Error>((name.clone(), config))
                })
                .collect::<Result<Vec<_>, _>>();
            (batch, configs)
        });
    }
    let mut issued = Vec::new();
    while let Some(joined) = batches.join_next().await {
        let (batch, configs) =
            joined.map_err(|e| anyhow::anyhow!("issuing certificates failed: {e}"))?;
        issued.push((batch, configs?));
    }
    issued.sort_by_key(|(batch, _)| *batch);
    Ok(issued
        .into_iter()
        .flat_map(|(_, configs)| configs)
        .enumerate()
        .map(|(index, (name, config))| Simulated {
            index: index as u32,
            count: n,
            name,
            config,
        })
        .collect())
}

/// The only process named `schedulerd`, if there is one.
fn find_scheduler() -> anyhow::Result<Option<u32>> {
    let mut found = Vec::new();
    let dir = std::fs::read_dir("/proc").map_err(|e| anyhow::anyhow!("cannot read /proc: {e}"))?;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "schedulerd")
        {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [pid] => Ok(Some(*pid)),
        pids => anyhow::bail!(
            "{} processes are named schedulerd ({pids:?}): say which with --scheduler-pid PID",
            pids.len()
        ),
    }
}

/// utime + stime of every thread of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    read_proc(pid, "stat", parse_cpu_ticks, "unexpected format")
}

/// Parses `/proc/<pid>/<file>` of the scheduler with `parse`.
fn read_proc(
    pid: u32,
    file: &str,
    parse: fn(&str) -> Option<u64>,
    unparsed: &str,
) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/{file}");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {path} (is the scheduler running?): {e}"))?;
    parse(&text).ok_or_else(|| anyhow::anyhow!("{path}: {unparsed}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start at the last ')'. utime and stime are fields
    // 14 and 15, so the 12th and 13th after it.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    read_proc(pid, "status", parse_rss_kib, "no VmRSS line")
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.trim_start_matches("VmRSS:")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `GET /v1/workers?limit=100` and `GET /v1/jobs?limit=1`, `requests`
/// times each, one after the other on one kept connection.
async fn route_latency(api: &Api, requests: u32) -> anyhow::Result<RouteLatency> {
    let jobs = JobFilter {
        limit: Some(1),
        ..Default::default()
    };
    // Warm: the connection is open before the clock starts.
    api.workers_page(100)
        .await
        .map_err(|e| anyhow::anyhow!("cannot list workers: {e}"))?;
    let mut workers_page = Vec::with_capacity(requests as usize);
    let mut jobs_page = Vec::with_capacity(requests as usize);
    for _ in 0..requests {
        let sent = Instant::now();
        api.workers_page(100)
            .await
            .map_err(|e| anyhow::anyhow!("cannot list workers: {e}"))?;
        workers_page.push(sent.elapsed());
        let sent = Instant::now();
        api.jobs(&jobs)
            .await
            .map_err(|e| anyhow::anyhow!("cannot list jobs: {e}"))?;
        jobs_page.push(sent.elapsed());
    }
    Ok(RouteLatency {
        workers_page_ms: LatencySummary::of(workers_page).map(|s| s.in_ms()),
        jobs_page_ms: LatencySummary::of(jobs_page).map(|s| s.in_ms()),
    })
}

/// The figures of `bench workers`.
#[derive(Debug, Serialize)]
struct WorkersReport {
    mode: &'static str,
    simulated: u32,
    registered: u64,
    failed_registrations: u64,
    /// Simulated workers the scheduler listed as ready after the window.
    listed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
    /// From the first registration sent to the last answered.
    registration_seconds: f64,
    registrations_per_second: f64,
    registration_latency_ms: Option<LatencyMs>,
    /// What the scheduler asked for.
    heartbeat_interval_ms: u64,
    steady_seconds: f64,
    /// Answered during the steady window.
    heartbeats: u64,
    heartbeats_per_second: f64,
    /// Over the whole run.
    failed_heartbeats: u64,
    reregistered: u64,
    deregistered: u64,
    /// Absent when the scheduler's process was not found.
    scheduler: Option<SchedulerFigures>,
    latency_without_workers: RouteLatency,
    latency_with_workers: RouteLatency,
}

#[derive(Debug, Serialize)]
struct SchedulerFigures {
    pid: u32,
    /// CPU time (user + system) during the steady window.
    cpu_seconds: f64,
    /// `cpu_seconds` over the window's wall time: 1.0 is one core.
    cpu_share_of_one_core: f64,
    cpu_ms_per_heartbeat: Option<f64>,
    /// Before the simulated workers registered.
    rss_before_kib: u64,
    /// At the end of the steady window.
    rss_after_kib: u64,
    rss_per_worker_bytes: Option<f64>,
    /// With `--sample-every`: the RSS during the steady window.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rss_samples: Vec<RssSample>,
}

#[derive(Debug, Serialize)]
struct RssSample {
    /// Since the start of the steady window.
    at_seconds: f64,
    rss_kib: u64,
}

impl RssSample {
    fn now(pid: u32, at: Duration) -> anyhow::Result<Self> {
        Ok(RssSample {
            at_seconds: round(at.as_secs_f64(), 1),
            rss_kib: rss_kib(pid)?,
        })
    }
}

#[derive(Debug, Serialize)]
struct RouteLatency {
    /// `GET /v1/workers?limit=100`.
    workers_page_ms: Option<LatencyMs>,
    /// `GET /v1/jobs?limit=1`.
    jobs_page_ms: Option<LatencyMs>,
}

impl WorkersReport {
    fn text(&self) -> String {
        let mut failed = format!(
            "{} registrations, {} heartbeats",
            self.failed_registrations, self.failed_heartbeats
        );
        if let Some(error) = &self.first_error {
            failed.push_str(&format!(" (first: {error})"));
        }
        let mut rows = vec![
            (
                "registered",
                format!(
                    "{} of {} in {:.3} s ({:.1}/s), {} listed",
                    self.registered,
                    self.simulated,
                    self.registration_seconds,
                    self.registrations_per_second,
                    self.listed
                ),
            ),
            (
                "registration",
                LatencyMs::text(self.registration_latency_ms.as_ref()),
            ),
            (
                "heartbeats",
                format!(
                    "every {} ms; {} in {:.1} s ({:.1}/s)",
                    self.heartbeat_interval_ms,
                    self.heartbeats,
                    self.steady_seconds,
                    self.heartbeats_per_second
                ),
            ),
        ];
        if let Some(s) = &self.scheduler {
            rows.push((
                "scheduler cpu",
                format!(
                    "{:.1} % of one core ({} ms per heartbeat)",
                    s.cpu_share_of_one_core * 100.0,
                    s.cpu_ms_per_heartbeat
                        .map_or("-".to_owned(), |ms| format!("{ms:.3}"))
                ),
            ));
            rows.push((
                "scheduler rss",
                format!(
                    "{:.1} MiB before, {:.1} MiB after ({} per worker)",
                    s.rss_before_kib as f64 / 1024.0,
                    s.rss_after_kib as f64 / 1024.0,
                    s.rss_per_worker_bytes
                        .map_or("-".to_owned(), |b| format!("{:.1} KB", b / 1000.0))
                ),
            ));
            if !s.rss_samples.is_empty() {
                let samples: Vec<String> = s
                    .rss_samples
                    .iter()
                    .map(|r| format!("{:.0}s {:.1}", r.at_seconds, r.rss_kib as f64 / 1024.0))
                    .collect();
                rows.push(("rss samples", format!("{} (MiB)", samples.join(", "))));
            }
        }
        let latency = |without: Option<&LatencyMs>, with: Option<&LatencyMs>| {
            format!(
                "without: {}\nwith:    {}",
                LatencyMs::text(without),
                LatencyMs::text(with)
            )
        };
        let head = format!(
            "bench workers: {} simulated\n",
            plural(u64::from(self.simulated), "worker")
        );
        rows.push(("deregistered", self.deregistered.to_string()));
        rows.push(("failed", failed));
        head + &output::key_values(&rows)
            + "GET /v1/workers?limit=100\n"
            + &latency(
                self.latency_without_workers.workers_page_ms.as_ref(),
                self.latency_with_workers.workers_page_ms.as_ref(),
            )
            + "\nGET /v1/jobs?limit=1\n"
            + &latency(
                self.latency_without_workers.jobs_page_ms.as_ref(),
                self.latency_with_workers.jobs_page_ms.as_ref(),
            )
            + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_and_rss_from_proc() {
        let stat =
            "4242 (sched (x) d) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        let status = "Name:\tschedulerd\nVmPeak:\t  200 kB\nVmRSS:\t   11876 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(status), Some(11876));
        assert_eq!(parse_rss_kib("Name:\tx\n"), None);
    }
}

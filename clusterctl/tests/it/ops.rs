//! What operators' tools see: the gRPC health and reflection services on
//! both daemons, JSON logs, and systemd's notify protocol (readiness,
//! stopping, watchdog keep-alives).

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use jobcluster_pki::{ExpectedPeer, Identity, Role, Roots};
use nix::sys::signal::Signal;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::cluster::{Cluster, bin};
use crate::harness::Daemon;

/// A gRPC channel to `addr` presenting the cluster's *client* certificate
/// (not a worker's or the scheduler's): any authenticated peer may use
/// health and reflection.
fn channel(cluster: &Cluster, addr: &str, server: ExpectedPeer) -> Channel {
    let pki = cluster.pki();
    let roots = Roots::load(&pki.join("ca.pem")).unwrap();
    let identity = Identity::load(&pki.join("client.pem"), &pki.join("client-key.pem")).unwrap();
    let tls = jobcluster_pki::client_config_for(&roots, Some(&identity), &[b"h2"], server).unwrap();
    jobcluster_proto::transport::tls_channel(addr, tls, Duration::from_secs(5)).unwrap()
}

fn scheduler_channel(cluster: &Cluster) -> Channel {
    channel(
        cluster,
        &cluster.grpc_addr,
        ExpectedPeer {
            role: Role::Scheduler,
            name: None,
        },
    )
}

async fn worker_channel(cluster: &Cluster, name: &str) -> Channel {
    let addr = cluster.worker_info(name).await.address;
    channel(
        cluster,
        &addr,
        ExpectedPeer {
            role: Role::Worker,
            name: Some(name.to_owned()),
        },
    )
}

async fn check(channel: &Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(reply.into_inner().status())
}

/// The services a v1 reflection client lists.
async fn list_services_v1(channel: &Channel) -> BTreeSet<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply: ServerReflectionResponse = replies.next().await.unwrap().unwrap();
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    }
}

/// The encoded file descriptors v1alpha reflection (what older grpcurl
/// speaks) returns for a symbol.
async fn file_containing_symbol_v1alpha(channel: &Channel, symbol: &str) -> Vec<Vec<u8>> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_owned())),
    };
    let mut replies = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match replies.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => files.file_descriptor_proto,
        other => panic!("no file descriptor for {symbol}: {other:?}"),
    }
}

/// Both daemons serve `grpc.health.v1.Health` (SERVING for the server and
/// their own service, NOT_FOUND for others) and reflection listing our
/// services, to a peer holding a client certificate; a health watcher sees
/// NOT_SERVING when a daemon begins to shut down.
#[tokio::test(flavor = "multi_thread")]
async fn both_daemons_serve_grpc_health_and_reflection_to_authenticated_peers() {
    let mut cluster = Cluster::start(&["w1"]).await;
    let scheduler = scheduler_channel(&cluster);
    let worker = worker_channel(&cluster, "w1").await;

    for (channel, own, other) in [
        (&scheduler, "jobscheduler.Scheduler", "jobscheduler.Worker"),
        (&worker, "jobscheduler.Worker", "jobscheduler.Scheduler"),
    ] {
        assert_eq!(check(channel, "").await.unwrap(), ServingStatus::Serving);
        assert_eq!(check(channel, own).await.unwrap(), ServingStatus::Serving);
        let unknown = check(channel, other).await.unwrap_err();
        assert_eq!(
            unknown.code(),
            tonic::Code::NotFound,
            "{other}: {unknown:?}"
        );

        let services = list_services_v1(channel).await;
        for expected in [
            "jobscheduler.Scheduler",
            "jobscheduler.Worker",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(
                services.contains(expected),
                "{expected} not in {services:?}"
            );
        }
        let files = file_containing_symbol_v1alpha(channel, own).await;
        assert!(
            files.iter().any(|f| f
                .windows(b"jobscheduler.proto".len())
                .any(|w| w == b"jobscheduler.proto")),
            "no descriptor of jobscheduler.proto for {own}"
        );
    }

    // A watcher of each daemon sees it stop serving when it shuts down.
    for (name, channel) in [("worker", worker), ("scheduler", scheduler)] {
        let mut watch = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let first: HealthCheckResponse = watch.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{name}");
        match name {
            "worker" => cluster.worker("w1").signal(Signal::SIGTERM),
            _ => cluster.scheduler.signal(Signal::SIGTERM),
        }
        let next = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .unwrap_or_else(|_| panic!("{name}: no status change after SIGTERM"));
        let next = next
            .unwrap_or_else(|| panic!("{name}: the watch ended without NOT_SERVING"))
            .unwrap_or_else(|e| panic!("{name}: the watch failed without NOT_SERVING: {e}"));
        assert_eq!(next.status(), ServingStatus::NotServing, "{name}");
    }
}

/// Every line both daemons write with `--log-format json` is one JSON
/// object with the usual keys, no colour codes, and the job and worker ids
/// as fields of their own.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_with_job_and_worker_ids_as_fields() {
    let mut cluster = Cluster::start(&["w1"]).await;
    cluster.stop_scheduler(Signal::SIGTERM);
    cluster.start_scheduler_again_with(&["--log-format", "json"], &[]);
    let config = issue_worker(&cluster, "w2");
    let mut w2 = Daemon::spawn(
        &bin("workerd"),
        &["--config", config.to_str().unwrap(), "--log-format", "json"],
    );
    cluster.wait_state("w2", "ready").await;
    let job_id = cluster.start_job("w2", "count.sh", &["1", "0"]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.job(&job_id).await.done {
        assert!(Instant::now() < deadline, "job never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let w2_worker_id = cluster.worker_info("w2").await.worker_id;

    w2.signal(Signal::SIGTERM);
    w2.wait(Duration::from_secs(20));
    w2.wait_for_log("worker stopped", 0).await;
    cluster.stop_scheduler(Signal::SIGTERM);
    cluster.scheduler.wait_for_log("scheduler stopped", 0).await;

    for (who, log) in [("scheduler", cluster.scheduler.log()), ("w2", w2.log())] {
        let events = json_events(who, &log);
        let has = |message: &str, field: &str, value: &str| {
            events
                .iter()
                .any(|e| e["message"] == message && e[field] == value)
        };
        match who {
            "scheduler" => {
                assert!(
                    has("worker registered", "worker_id", &w2_worker_id),
                    "{log}"
                );
                assert!(has("job started", "job_id", &job_id), "{log}");
                assert!(has("job started", "worker_id", &w2_worker_id), "{log}");
            }
            _ => {
                assert!(
                    has("registered with the scheduler", "worker_id", &w2_worker_id),
                    "{log}"
                );
                assert!(has("job started", "job_id", &job_id), "{log}");
                assert!(has("job finished", "job_id", &job_id), "{log}");
            }
        }
    }
}

/// Parses every line of `log` as a JSON log event.
fn json_events(who: &str, log: &str) -> Vec<serde_json::Value> {
    assert!(
        !log.contains('\u{1b}'),
        "{who}: colour codes in the log:\n{log}"
    );
    log.lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{who}: not a JSON line ({e}): {line}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(event[key].is_string(), "{who}: no {key} in {line}");
            }
            event
        })
        .collect()
}

/// Issues a worker certificate for `name` and writes its config.
fn issue_worker(cluster: &Cluster, name: &str) -> std::path::PathBuf {
    cluster.issue_worker_cert(name);
    cluster.write_worker_config(
        name,
        &format!("pki/{name}.pem"),
        &format!("pki/{name}-key.pem"),
    )
}

/// A `NOTIFY_SOCKET` the test listens on, as systemd would.
struct NotifySocket {
    socket: UnixDatagram,
    /// What `NOTIFY_SOCKET` says.
    path: String,
}

impl NotifySocket {
    fn bind(dir: &Path, name: &str) -> NotifySocket {
        let path = dir.join(name);
        let socket = UnixDatagram::bind(&path).unwrap();
        Self::with(socket, path.to_str().unwrap().to_owned())
    }

    /// An abstract socket (`@name`), as some systemd versions hand out.
    fn bind_abstract() -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("jobcluster-test-{}", uuid::Uuid::new_v4());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        Self::with(socket, format!("@{name}"))
    }

    fn with(socket: UnixDatagram, path: String) -> NotifySocket {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket { socket, path }
    }

    fn path(&self) -> &str {
        &self.path
    }

    /// Reads notifications until one carries `line` (at most `within`);
    /// returns every line read.
    async fn until(&self, line: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        let socket = self.socket.try_clone().unwrap();
        loop {
            assert!(
                Instant::now() < deadline,
                "no {line} within {within:?}; got {seen:?}"
            );
            let socket = socket.try_clone().unwrap();
            let got = tokio::task::spawn_blocking(move || {
                let mut buf = [0u8; 4096];
                socket
                    .recv(&mut buf)
                    .ok()
                    .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
            })
            .await
            .unwrap();
            if let Some(message) = got {
                let lines: Vec<String> = message.lines().map(str::to_owned).collect();
                let found = lines.iter().any(|l| l == line);
                seen.extend(lines);
                if found {
                    return seen;
                }
            }
        }
    }
}

/// Under systemd (`NOTIFY_SOCKET`, `WATCHDOG_USEC`) both daemons say
/// READY=1 once they serve (a worker once it is registered), send
/// WATCHDOG=1 keep-alives at half the watchdog interval, and STOPPING=1
/// when a shutdown begins.
#[tokio::test(flavor = "multi_thread")]
async fn both_daemons_notify_systemd_ready_watchdog_and_stopping() {
    let mut cluster = Cluster::start(&["w1"]).await;
    let dir = cluster.tmp.path().to_owned();
    // Half of 600 ms: several keep-alives within a second.
    let watchdog_usec = "600000";

    let scheduler_socket = NotifySocket::bind(&dir, "scheduler.notify");
    cluster.stop_scheduler(Signal::SIGTERM);
    cluster.start_scheduler_again_with(
        &[],
        &[
            ("NOTIFY_SOCKET", scheduler_socket.path()),
            ("WATCHDOG_USEC", watchdog_usec),
        ],
    );
    let seen = scheduler_socket
        .until("READY=1", Duration::from_secs(20))
        .await;
    assert!(!seen.iter().any(|l| l == "STOPPING=1"), "{seen:?}");
    let started = Instant::now();
    let mut keepalives = 0;
    while keepalives < 3 {
        scheduler_socket
            .until("WATCHDOG=1", Duration::from_secs(10))
            .await;
        keepalives += 1;
    }
    // Three at 300 ms apart: well within the 10 s each could take.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let worker_socket = NotifySocket::bind(&dir, "w2.notify");
    let config = issue_worker(&cluster, "w2");
    let mut w2 = Daemon::spawn_with(
        &bin("workerd"),
        &["--config", config.to_str().unwrap()],
        &["grpc"],
        &[
            ("NOTIFY_SOCKET", worker_socket.path()),
            ("WATCHDOG_USEC", watchdog_usec),
        ],
    );
    worker_socket
        .until("READY=1", Duration::from_secs(20))
        .await;
    // Ready means registered: the scheduler knows the worker already.
    assert_eq!(cluster.worker_state("w2").await, "ready", "{}", w2.log());
    worker_socket
        .until("WATCHDOG=1", Duration::from_secs(10))
        .await;

    w2.signal(Signal::SIGTERM);
    worker_socket
        .until("STOPPING=1", Duration::from_secs(10))
        .await;
    w2.wait(Duration::from_secs(20));
    cluster.scheduler.signal(Signal::SIGTERM);
    scheduler_socket
        .until("STOPPING=1", Duration::from_secs(10))
        .await;
    cluster.scheduler.wait(Duration::from_secs(20));
}

/// With a `WATCHDOG_USEC` meant for another process (`WATCHDOG_PID`) a
/// daemon sends no keep-alives, only its state changes; an abstract
/// `NOTIFY_SOCKET` (`@name`) works like a path.
#[tokio::test(flavor = "multi_thread")]
async fn no_watchdog_keepalives_unless_systemd_asks_this_process() {
    let mut cluster = Cluster::start(&[]).await;
    let socket = NotifySocket::bind_abstract();
    cluster.stop_scheduler(Signal::SIGTERM);
    cluster.start_scheduler_again_with(
        &[],
        &[
            ("NOTIFY_SOCKET", socket.path()),
            ("WATCHDOG_USEC", "200000"),
            // Not this process: systemd meant the keep-alives for another.
            ("WATCHDOG_PID", "1"),
        ],
    );
    let mut seen = socket.until("READY=1", Duration::from_secs(20)).await;
    // An absence needs a wait: five keep-alive periods.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.scheduler.signal(Signal::SIGTERM);
    seen.extend(socket.until("STOPPING=1", Duration::from_secs(10)).await);
    assert!(!seen.iter().any(|l| l == "WATCHDOG=1"), "{seen:?}");
}

/// The shipped units say what docs/OPERATIONS.md promises, and pass
/// `systemd-analyze verify` (where it is installed) with the binaries
/// they name replaced by the ones just built.
#[test]
fn systemd_units_are_notify_units_with_watchdog_hardening_and_delegation() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd");
    let tmp = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for daemon in ["schedulerd", "workerd"] {
        let text = std::fs::read_to_string(dir.join(format!("{daemon}.service"))).unwrap();
        let lines: BTreeSet<&str> = text.lines().map(str::trim).collect();
        for line in [
            "Type=notify",
            "NotifyAccess=main",
            "WatchdogSec=30s",
            "Restart=on-failure",
            "LimitNOFILE=65536",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "ProtectKernelModules=yes",
        ] {
            assert!(lines.contains(line), "{daemon}.service lacks {line}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("RestrictAddressFamilies=")),
            "{daemon}.service"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("ReadWritePaths=/var/lib/")),
            "{daemon}.service"
        );
        assert_eq!(
            lines.contains("Delegate=yes"),
            daemon == "workerd",
            "{daemon}.service: Delegate=yes is the worker's"
        );
        let unit = tmp.path().join(format!("{daemon}.service"));
        let built = bin(daemon);
        std::fs::write(
            &unit,
            text.replace(&format!("/usr/local/bin/{daemon}"), built.to_str().unwrap()),
        )
        .unwrap();
        units.push(unit);
    }
    let verified = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output();
    match verified {
        Ok(out) => {
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // Complaints about other units of the machine are not ours.
            let ours = said
                .lines()
                .any(|l| l.contains("schedulerd.service") || l.contains("workerd.service"));
            assert!(
                out.status.success() && !ours,
                "systemd-analyze verify: {said}"
            );
        }
        Err(error) => eprintln!("skipping systemd-analyze verify: {error}"),
    }
}

/// Another gRPC implementation (Python's grpcio with its health-checking
/// and reflection packages, as grpc_health_probe and grpcurl would use)
/// gets the same answers from both daemons. Skipped where grpcio is not
/// installed (`pip install grpcio grpcio-health-checking grpcio-reflection`).
#[tokio::test(flavor = "multi_thread")]
async fn another_grpc_implementation_sees_health_and_reflection() {
    let cluster = Cluster::start(&["w1"]).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/grpc_check.py");
    let pki = cluster.pki();
    let w1 = cluster.worker_info("w1").await.address;
    for (addr, service, method) in [
        (
            cluster.grpc_addr.as_str(),
            "jobscheduler.Scheduler",
            "RegisterWorker",
        ),
        (w1.as_str(), "jobscheduler.Worker", "StartJob"),
    ] {
        // CI names a Python with grpcio installed; elsewhere the test
        // runs where python3 has it and skips where it does not.
        let required = std::env::var_os("JOBCLUSTER_PYTHON");
        let python = required.clone().unwrap_or_else(|| "python3".into());
        let out = tokio::process::Command::new(&python)
            .arg(&script)
            .args([addr])
            .arg(pki.join("ca.pem"))
            .arg(pki.join("client.pem"))
            .arg(pki.join("client-key.pem"))
            .args([service, method])
            .output()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(error) => {
                eprintln!("skipping: cannot run python3: {error}");
                return;
            }
        };
        if out.status.code() == Some(77) {
            assert!(
                required.is_none(),
                "JOBCLUSTER_PYTHON lacks grpcio: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("skipping: {}", String::from_utf8_lossy(&out.stderr));
            return;
        }
        assert!(
            out.status.success(),
            "{service} at {addr}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A worker whose scheduler is down does not tell systemd it is ready
/// at once (it says it is registering), but does after 10 s, so a
/// scheduler that is down never fails the worker's start.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_without_its_scheduler_is_ready_for_systemd_after_ten_seconds() {
    let mut cluster = Cluster::start(&[]).await;
    cluster.stop_scheduler(Signal::SIGTERM);
    let socket = NotifySocket::bind(cluster.tmp.path(), "w2.notify");
    let config = issue_worker(&cluster, "w2");
    let started = Instant::now();
    let _w2 = Daemon::spawn_with(
        &bin("workerd"),
        &["--config", config.to_str().unwrap()],
        &["grpc"],
        &[("NOTIFY_SOCKET", socket.path())],
    );
    let seen = socket.until("READY=1", Duration::from_secs(30)).await;
    let waited = started.elapsed();
    assert!(
        seen.iter()
            .any(|l| l == "STATUS=registering with the scheduler"),
        "{seen:?}"
    );
    assert!(
        waited >= Duration::from_secs(9),
        "READY=1 after {waited:?}, before any registration"
    );
}

/// The scheduling slice in a `/proc/PID/sched` (or `.../task/TID/sched`),
/// in ns; `None` where the kernel does not show it.
fn slice_in(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("se.slice"))?;
    line.split(':').nth(1)?.trim().parse().ok()
}

/// Each slice of a process's threads; a thread that ended while they were
/// read (an idle blocking thread) is left out.
fn thread_slices(pid: u32) -> Vec<Option<u64>> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("sched")).ok())
        .map(|text| slice_in(&text))
        .collect()
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A daemon's thread woken on the CPU a job runs on must not wait for the
/// job's burst (a start's answer waited 1.9 ms for its job's `bash`): both
/// daemons run every thread on the kernel's shortest slice, and a job runs
/// on the default, as any process.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemons_run_on_short_slices_and_jobs_on_the_default() {
    let own = std::fs::read_to_string("/proc/self/sched").unwrap_or_default();
    let Some(default) = slice_in(&own) else {
        eprintln!("skipped: this kernel shows no se.slice in /proc/PID/sched");
        return;
    };
    let cluster = Cluster::start(&["w1"]).await;
    std::fs::write(
        cluster.tmp.path().join("scripts/slice.sh"),
        "grep '^se.slice' /proc/$$/sched\n",
    )
    .unwrap();
    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "slice.sh"])
        .await;
    assert!(out.status.success(), "{}", crate::cluster::stderr(&out));
    let worker = &cluster.workers[0].1;
    let log = worker.log();
    if log.contains("one scheduling slice for all") {
        let version = kernel_version();
        assert!(
            version.is_some_and(|v| v < (6, 12)),
            "Linux {version:?} has per-thread slices, but workerd says it has not:\n{log}"
        );
        eprintln!("skipped: this kernel keeps one slice for all (Linux < 6.12)");
        return;
    }
    for (line, why) in [
        (
            "policy without slices",
            "the tests run under a policy without slices",
        ),
        ("reset on fork", "the tests run with reset on fork"),
        (
            "cannot ask for a short",
            "this machine refuses sched_setattr",
        ),
    ] {
        if log.contains(line) {
            eprintln!("skipped: {why}");
            return;
        }
    }
    for (daemon, name) in [(&cluster.scheduler, "schedulerd"), (worker, "workerd")] {
        let slices = thread_slices(daemon.child.id());
        assert!(slices.len() >= 2, "{name}: {slices:?}");
        assert!(
            slices
                .iter()
                .all(|slice| *slice == Some(jobcluster_proto::slice::SHORT_SLICE_NS)),
            "{name}'s threads: {slices:?}\n{}",
            daemon.log()
        );
    }
    let job = crate::cluster::stdout(&out);
    assert_eq!(slice_in(&job), Some(default), "the job's: {job}");
}

/// Where an operator chose a policy without slices (`SCHED_IDLE`) or reset
/// on fork (under which later threads would not inherit a slice), the
/// daemon leaves its scheduling as it was and says so in its log.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_keeps_a_scheduling_it_cannot_shorten_and_says_so() {
    if std::process::Command::new("chrt")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipped: no chrt (util-linux) on this machine");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("s.toml");
    std::fs::write(
        &config,
        "[grpc_server]\naddr = \"127.0.0.1:0\"\nuse_tls = false\ninsecure = true\n[http_server]\naddr = \"127.0.0.1:0\"\n[store]\npath = \"s.db\"\n",
    )
    .unwrap();
    let (schedulerd, config) = (bin("schedulerd"), config.to_str().unwrap().to_owned());
    let (schedulerd, config) = (schedulerd.to_str().unwrap(), config.as_str());
    for (chrt, said) in [
        (
            ["--idle", "0", schedulerd, "--config", config].as_slice(),
            "scheduling policy without slices: kept",
        ),
        (
            [
                "--reset-on-fork",
                "--other",
                "0",
                schedulerd,
                "--config",
                config,
            ]
            .as_slice(),
            "scheduling reset on fork",
        ),
    ] {
        let daemon = Daemon::spawn_with(Path::new("chrt"), chrt, &["grpc", "http"], &[]);
        let log = daemon.log();
        assert!(log.contains(said), "chrt {chrt:?}: {log}");
        let slices = thread_slices(daemon.child.id());
        assert!(
            !slices.contains(&Some(jobcluster_proto::slice::SHORT_SLICE_NS)),
            "chrt {chrt:?}: {slices:?}"
        );
    }
}

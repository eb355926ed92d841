use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jobcluster_pki::{Identity, Role, Roots};
use jobcluster_proto::pb::worker_client::WorkerClient;
use jobcluster_proto::pb::{
    JobState, QueryJobRequest, QueryJobResponse, StartJobRequest, StopJobRequest, StreamJobRequest,
};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{Daemon, Pki, eventually, job_processes};

const WORKERD: &str = env!("CARGO_BIN_EXE_workerd");

/// The config every test worker starts from: w1's certificate, the
/// scripts and state directories beside the file; plugins come after it.
const BASE_CONFIG: &str = r#"
[grpc_server]
addr = "127.0.0.1:0"
crt_file = "pki/w1.pem"
key_file = "pki/w1-key.pem"
ca_file = "pki/ca.pem"

[worker]
name = "w1"
scripts_dir = "scripts"
state_dir = "state"
# The default (one slot per CPU) would refuse the tests' parallel jobs.
max_jobs = 0
"#;

/// A workerd with its own PKI, scripts and state in a temporary directory.
struct Worker {
    tmp: tempfile::TempDir,
    pki: Pki,
    daemon: Daemon,
}

const TEST_SCRIPTS: &[(&str, &str)] = &[
    (
        "spawns.sh",
        "sleep 300 &\nsleep 300 &\necho started\nwait\n",
    ),
    (
        "ignores_term.sh",
        "trap '' TERM\necho ignoring\nwhile true; do sleep 0.1; done\n",
    ),
    (
        "blob.py",
        "import sys\nchunk = bytes(range(256)) * 4096\nfor _ in range(50):\n    sys.stdout.buffer.write(chunk)\n",
    ),
    (
        "slow_lines.sh",
        "for i in $(seq 1 40); do echo \"line $i\"; sleep 0.05; done\n",
    ),
    ("env.sh", "echo \"$GREETING $1\"\n"),
    // Ends itself with a real-time signal (one nix has no name for).
    ("rtsig.sh", "echo going\nkill -s 40 $$\n"),
    // Leaves its process group and session: a setsid child whose own child
    // is double-forked (re-parented), and a double-forked setsid grandchild.
    (
        "escape.sh",
        "setsid bash -c '(sleep 300 &); exec sleep 300' &\n(setsid sleep 300 &)\necho started\nwait\n",
    ),
    // Leaves an orphan that ends at about the same time, then exits with $1.
    (
        "orphan_exit.sh",
        "(sleep 0.0$((RANDOM % 5)) &)\nexit \"$1\"\n",
    ),
    // Exits at once and leaves eight chains behind, each of whose one live
    // link forks the next and exits, again and again (at most 20,000 links
    // or 10 s). The first links have process groups of their own (job
    // control; bash turns it off in the background subshells after them).
    (
        "relay.sh",
        "set -m\nhop() { [ \"$1\" -lt 20000 ] && [ $SECONDS -lt 10 ] && hop $(($1 + 1)) & }\nfor i in 1 2 3 4 5 6 7 8; do hop 0; done\necho started\n",
    ),
    // Exits at once and leaves four orphans behind, out of its process
    // group, that exec themselves over and over (3,000 times, some
    // seconds: bash's SECONDS starts again at each exec): each is often
    // between the memory of one program and the environment of the next.
    (
        "execs.sh",
        "if [ \"$1\" = again ]; then [ \"$2\" -gt 0 ] && exec bash \"$0\" again $(($2 - 1)); exit; fi\nfor i in 1 2 3 4; do (setsid bash \"$0\" again 3000 &); done\necho started\n",
    ),
    // Leaves an orphan, out of its process group, whose main thread has
    // ended (pthread_exit) while another runs on: the kernel shows the
    // process as a zombie.
    (
        "headless.sh",
        "mark=$(mktemp -u)\nsetsid python3 -c '\nimport ctypes, sys, threading, time\ndef linger():\n    while open(\"/proc/self/stat\").read().rsplit(\")\", 1)[1].split()[0] != \"Z\":\n        time.sleep(0.01)\n    open(sys.argv[1], \"w\").close()\n    time.sleep(300)\nthreading.Thread(target=linger).start()\nctypes.CDLL(None).pthread_exit(None)\n' \"$mark\" &\nwhile [ ! -e \"$mark\" ]; do sleep 0.01; done\nrm -f \"$mark\"\necho headless\n",
    ),
    // Leaves an orphan with 1,100 children, a list longer than the page the
    // kernel hands out at once, and runs on. Its length is in the pids'
    // digits: after pids wrap (at 32,768 by default) they start again at
    // 300, so each takes at least four bytes with its space. 900 did not
    // fill the page when most of them came after a wrap.
    (
        "crowd.sh",
        "mark=$(mktemp -u)\n(setsid bash -c 'for i in $(seq 1 1100); do sleep 300 & done; touch \"$0\"; exec sleep 300' \"$mark\" &)\nwhile [ ! -e \"$mark\" ]; do sleep 0.01; done\nrm -f \"$mark\"\necho started\nexec sleep 300\n",
    ),
    // Runs on with two zombies it never reaps: a child of its main process
    // and a child of an orphan it left.
    (
        "zombies.sh",
        "( (sleep 0.01 & exec sleep 300) & )\nsleep 0.01 &\nsleep 0.2\necho started\nexec sleep 300\n",
    ),
    // Leaves an orphan that exits on its own a little later.
    (
        "orphan.sh",
        "(sleep 1 & echo \"orphan $!\")\necho ready\nexec sleep 300\n",
    ),
];

/// Lets a job user other than root (jobs of a root workerd run as nobody)
/// reach the scripts: temporary directories are made 0700.
fn open_to_jobs(tmp: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for dir in [tmp.to_owned(), tmp.join("scripts")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A directory any job may write its marks to, whichever user it runs as.
fn marks_dir(tmp: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let marks = tmp.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o1777)).unwrap();
    marks
}

impl Worker {
    fn start() -> Self {
        Self::start_with("")
    }

    /// A worker whose config ends with `extra` (whole tables).
    fn start_with(extra: &str) -> Self {
        Self::start_from(BASE_CONFIG, extra)
    }

    /// A worker whose config is `base` (in place of [`BASE_CONFIG`]), the
    /// test plugins and `extra`.
    fn start_from(base: &str, extra: &str) -> Self {
        Self::start_in(base, extra, &[])
    }

    /// [`Worker::start_from`], with `env` in workerd's environment.
    fn start_in(base: &str, extra: &str, env: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new(&tmp.path().join("pki"));
        pki.issue(Role::Worker, "w1");
        let scripts = tmp.path().join("scripts");
        std::fs::create_dir_all(&scripts).unwrap();
        open_to_jobs(tmp.path());
        let repo_scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
        for name in ["count.sh", "count.py", "fail.sh"] {
            std::fs::copy(repo_scripts.join(name), scripts.join(name)).unwrap();
        }
        for (name, body) in TEST_SCRIPTS {
            std::fs::write(scripts.join(name), body).unwrap();
        }
        // A script outside scripts_dir that leaves a mark if it ever runs.
        let marker = marks_dir(tmp.path()).join("outside-ran");
        std::fs::write(
            tmp.path().join("outside.sh"),
            format!("touch {}\n", marker.display()),
        )
        .unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside.sh"), scripts.join("link.sh")).unwrap();
        let config = tmp.path().join("workerd.toml");
        std::fs::write(
            &config,
            format!(
                "{base}\n[plugins.bash]\nrunner = \"bash\"\nstop_grace = \"1s\"\nallow_env = [\"GREETING\"]\n\n[plugins.python]\nrunner = \"python\"\n{extra}"
            ),
        )
        .unwrap();
        let daemon = Daemon::spawn_with(
            Path::new(WORKERD),
            &["--config", config.to_str().unwrap()],
            &["grpc"],
            env,
        );
        Worker { tmp, pki, daemon }
    }

    /// Starts the daemon again, after stopping it with SIGTERM if it runs.
    fn restart(&mut self) {
        if self.daemon.child.try_wait().unwrap().is_none() {
            self.daemon.signal(Signal::SIGTERM);
            assert!(self.daemon.wait(Duration::from_secs(20)).success());
        }
        let config = self.tmp.path().join("workerd.toml");
        self.daemon = Daemon::spawn(Path::new(WORKERD), &["--config", config.to_str().unwrap()]);
    }

    fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn client_as(&self, identity: Option<&Identity>, roots: &Roots) -> WorkerClient<Channel> {
        let tls = jobcluster_pki::client_config(roots, identity, &[b"h2"]).unwrap();
        let channel = jobcluster_proto::transport::tls_channel(
            &self.daemon.addr,
            tls,
            Duration::from_secs(5),
        )
        .unwrap();
        WorkerClient::new(channel)
    }

    fn client(&self) -> WorkerClient<Channel> {
        let id = self.pki.identity(Role::Scheduler, "scheduler");
        self.client_as(Some(&id), &self.pki.roots())
    }
}

fn start_req(command: &str, path: &str, args: &[&str]) -> StartJobRequest {
    StartJobRequest {
        command: command.into(),
        path: path.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

/// A followed output stream of `job_id` from `offset`.
async fn open_followed(
    client: &mut WorkerClient<Channel>,
    job_id: &str,
    offset: u64,
) -> tonic::Streaming<jobcluster_proto::pb::StreamJobResponse> {
    client
        .stream_job(StreamJobRequest {
            job_id: job_id.into(),
            offset,
            follow: Some(true),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Follows a job from `offset` to its end; returns the bytes and the final status.
async fn follow(
    client: &mut WorkerClient<Channel>,
    job_id: &str,
    offset: u64,
) -> (Vec<u8>, QueryJobResponse) {
    let mut stream = open_followed(client, job_id, offset).await;
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        assert_eq!(
            msg.offset,
            offset + out.len() as u64,
            "offsets are contiguous"
        );
        out.extend_from_slice(&msg.output);
        if let Some(status) = msg.final_status {
            assert!(
                stream.message().await.unwrap().is_none(),
                "final status is last"
            );
            return (out, status);
        }
    }
    panic!("stream ended without a final status");
}

/// The worker's answer to a query of `job`.
async fn query(client: &mut WorkerClient<Channel>, job: &str) -> QueryJobResponse {
    client
        .query_job(QueryJobRequest {
            job_id: job.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Stops `job` and returns the state the stop answered with.
async fn stop(client: &mut WorkerClient<Channel>, job: impl Into<String>) -> JobState {
    client
        .stop_job(StopJobRequest { job_id: job.into() })
        .await
        .unwrap()
        .into_inner()
        .state()
}

async fn start(client: &mut WorkerClient<Channel>, req: StartJobRequest) -> String {
    client.start_job(req).await.unwrap().into_inner().job_id
}

/// `max_jobs` counts jobs whose processes run: once a job reads as ended,
/// its slot is free, so the next start on that news is never refused busy.
/// (A slot was given back only after the final record's syncs: the
/// scheduler's queue, told of the end, sent its next job, was refused
/// busy and requeued it behind later ones.)
#[tokio::test]
async fn a_job_that_reads_ended_has_given_back_its_slot() {
    let worker = Worker::start_from(&BASE_CONFIG.replace("max_jobs = 0", "max_jobs = 1"), "");
    let mut client = worker.client();
    // Asked as fast as the worker answers, to land between the end and
    // whatever follows it.
    async fn ended(client: &mut WorkerClient<Channel>, job: &str) -> JobState {
        loop {
            let state = query(client, job).await.state();
            if state != JobState::Running {
                return state;
            }
        }
    }
    let mut job = start(&mut client, start_req("bash", "fail.sh", &["0"])).await;
    for round in 0..40 {
        let state = ended(&mut client, &job).await;
        assert_eq!(state, JobState::Succeeded, "round {round}");
        job = match client.start_job(start_req("bash", "fail.sh", &["0"])).await {
            Ok(started) => started.into_inner().job_id,
            Err(status) => panic!(
                "round {round}: a start after the last job read ended was refused: {status:?}"
            ),
        };
    }
    // The slot is held while a job runs.
    ended(&mut client, &job).await;
    let long = start(&mut client, start_req("bash", "ignores_term.sh", &[])).await;
    let refused = client
        .start_job(start_req("bash", "fail.sh", &["0"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    stop(&mut client, long).await;
}

#[tokio::test]
async fn bash_and_python_jobs_stream_every_line_and_succeed() {
    let worker = Worker::start();
    let mut client = worker.client();
    for (plugin, script) in [("bash", "count.sh"), ("python", "count.py")] {
        let job = start(&mut client, start_req(plugin, script, &["5", "0.05"])).await;
        let (out, status) = follow(&mut client, &job, 0).await;
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1\n2\n3\n4\n5\ndone\n",
            "{script}"
        );
        assert_eq!(status.state(), JobState::Succeeded);
        let q = query(&mut client, &job).await;
        assert!(q.done && !q.error, "{q:?}");
        assert_eq!(q.exit_code, Some(0));
        assert_eq!(q.output_bytes, 15);
        assert_eq!(q.command, plugin);
    }
    // No plugin named: the script's extension picks one.
    let job = start(&mut client, start_req("", "count.py", &["1", "0"])).await;
    let (_, status) = follow(&mut client, &job, 0).await;
    assert_eq!(
        (status.state(), status.command.as_str()),
        (JobState::Succeeded, "python")
    );
}

#[tokio::test]
async fn a_failing_script_is_failed_with_its_exit_code_and_all_output() {
    let worker = Worker::start();
    let mut client = worker.client();
    let job = start(&mut client, start_req("bash", "fail.sh", &[])).await;
    let (out, status) = follow(&mut client, &job, 0).await;
    assert_eq!(
        out, b"about to fail\nfailing on purpose\n",
        "stdout and stderr in order"
    );
    assert_eq!(status.state(), JobState::Failed);
    assert!(status.done && status.error);
    assert_eq!(status.exit_code, Some(3));
    assert_eq!(status.error_text, "exited with code 3");
}

#[tokio::test]
async fn a_job_ended_by_a_real_time_signal_is_failed_with_that_signal() {
    let worker = Worker::start();
    let mut client = worker.client();
    let job = start(&mut client, start_req("bash", "rtsig.sh", &[])).await;
    let (out, status) = follow(&mut client, &job, 0).await;
    assert_eq!(out, b"going\n");
    assert_eq!(status.state(), JobState::Failed, "{status:?}");
    assert_eq!(status.signal, Some(40), "{status:?}");
    assert_eq!(status.exit_code, None, "{status:?}");
}

#[tokio::test]
async fn stop_ends_the_whole_process_group_and_is_idempotent() {
    let worker = Worker::start();
    let mut client = worker.client();
    let job = start(&mut client, start_req("bash", "spawns.sh", &[])).await;
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&job).len() >= 3).await,
        "job and its two children should run"
    );
    let state = stop(&mut client, job.clone()).await;
    assert_eq!(state, JobState::Stopped);
    assert_eq!(
        job_processes(&job),
        Vec::<u32>::new(),
        "no process of the job remains"
    );
    let q = query(&mut client, &job).await;
    assert_eq!(q.state(), JobState::Stopped);
    // Stopping again succeeds and changes nothing.
    let again = client
        .stop_job(StopJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap();
    assert_eq!(again.into_inner().state(), JobState::Stopped);
    let q2 = query(&mut client, &job).await;
    assert_eq!(q, q2);
}

#[tokio::test]
async fn a_job_ignoring_sigterm_is_killed_after_the_grace_period() {
    let worker = Worker::start();
    let mut client = worker.client();
    let job = start(&mut client, start_req("bash", "ignores_term.sh", &[])).await;
    let mut stream = open_followed(&mut client, &job, 0).await;
    // Wait until the trap is installed.
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(&first.output[..], b"ignoring\n");
    let state = client
        .stop_job(StopJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap();
    assert_eq!(state.into_inner().state(), JobState::Stopped);
    let q = query(&mut client, &job).await;
    assert_eq!(q.signal, Some(9), "killed with SIGKILL: {q:?}");
    assert!(job_processes(&job).is_empty());
}

#[tokio::test]
async fn paths_outside_scripts_dir_are_refused_before_anything_runs() {
    let worker = Worker::start();
    let mut client = worker.client();
    let outside = worker.tmp.path().join("outside.sh");
    for path in [
        outside.to_str().unwrap(),
        "../outside.sh",
        "sub/../../outside.sh",
        "count.sh\0",
        "link.sh",
        "",
    ] {
        let err = client
            .start_job(start_req("bash", path, &[]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path:?}: {err:?}");
        assert_eq!(
            err.metadata().get("jobcluster-code").unwrap(),
            "invalid_path",
            "{path:?}"
        );
    }
    assert!(
        !worker.tmp.path().join("marks/outside-ran").exists(),
        "no escaped script ran"
    );
    let jobs = std::fs::read_dir(worker.state_dir().join("jobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(jobs, 0, "no job was created");
    // The worker still serves valid requests.
    let job = start(&mut client, start_req("bash", "count.sh", &["1", "0"])).await;
    assert_eq!(
        follow(&mut client, &job, 0).await.1.state(),
        JobState::Succeeded
    );
}

#[tokio::test]
async fn callers_without_the_scheduler_certificate_get_nothing() {
    let worker = Worker::start();
    let request = || QueryJobRequest {
        job_id: uuid::Uuid::new_v4().to_string(),
    };

    // No client certificate: the handshake fails.
    let mut anonymous = worker.client_as(None, &worker.pki.roots());
    let err = anonymous.query_job(request()).await.unwrap_err();
    assert_ne!(err.code(), Code::NotFound, "{err:?}");
    assert_ne!(err.code(), Code::Ok);

    // A certificate from another CA: refused too.
    let other = Pki::new(&worker.tmp.path().join("other-pki"));
    let stranger = other.identity(Role::Scheduler, "scheduler");
    let mut foreign = worker.client_as(Some(&stranger), &worker.pki.roots());
    let err = foreign.query_job(request()).await.unwrap_err();
    assert_ne!(err.code(), Code::NotFound, "{err:?}");

    // The right CA but the wrong role: permission denied.
    let client_cert = worker.pki.identity(Role::Client, "someone");
    let mut wrong_role = worker.client_as(Some(&client_cert), &worker.pki.roots());
    let err = wrong_role.query_job(request()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The scheduler gets a real answer.
    let err = worker.client().query_job(request()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// `runtime_threads` is the count the runtime takes: one when absent,
/// whatever `TOKIO_WORKER_THREADS` says, which only `0` leaves it to.
#[tokio::test]
async fn runtime_threads_is_what_the_runtime_takes_and_zero_leaves_it_to_tokio() {
    let env = [("TOKIO_WORKER_THREADS", "3")];
    for (setting, threads) in [
        ("", 1),
        ("runtime_threads = 2", 2),
        ("runtime_threads = 0", 3),
    ] {
        let base = BASE_CONFIG.replace("max_jobs = 0", &format!("max_jobs = 0\n{setting}"));
        let worker = Worker::start_in(&base, "", &env);
        assert_eq!(runtime_threads(&worker), threads, "{setting:?}");
    }
}

/// How many threads workerd's async runtime took, as it logged at start.
fn runtime_threads(worker: &Worker) -> usize {
    let log = worker.daemon.log();
    log.lines()
        .find_map(|l| {
            l.split_once("async runtime started threads=")?
                .1
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no runtime thread count logged:\n{log}"))
}

/// workerd runs its runtime on one thread unless told otherwise; on
/// several (`runtime_threads = 4`), where its tasks run in parallel, jobs
/// started and followed at once still each give every byte.
#[tokio::test]
async fn a_worker_on_several_runtime_threads_runs_and_streams_jobs_at_once() {
    let worker = Worker::start_from(
        &BASE_CONFIG.replace("max_jobs = 0", "max_jobs = 0\nruntime_threads = 4"),
        "",
    );
    assert_eq!(runtime_threads(&worker), 4);
    let client = worker.client();
    let expected: Vec<u8> = (0..50 * 4096).flat_map(|_| 0..=255u8).collect();
    let runs: Vec<_> = (0..4)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let (plugin, script, args) = if i % 2 == 0 {
                    ("python", "blob.py", vec![])
                } else {
                    ("bash", "count.sh", vec!["20", "0.01"])
                };
                let job = start(&mut client, start_req(plugin, script, &args)).await;
                let (mut one, mut two) = (client.clone(), client.clone());
                let both = tokio::join!(follow(&mut one, &job, 0), follow(&mut two, &job, 0));
                (i, both)
            })
        })
        .collect();
    for run in runs {
        let (i, ((out, status), (again, _))) = run.await.unwrap();
        assert_eq!(status.state(), JobState::Succeeded, "{i}: {status:?}");
        assert_eq!(out, again, "{i}: two followers differ");
        if i % 2 == 0 {
            assert_eq!(Sha256::digest(&out), Sha256::digest(&expected), "{i}");
        } else {
            let lines: String = (1..=20).map(|n| format!("{n}\n")).collect();
            assert_eq!(String::from_utf8(out).unwrap(), format!("{lines}done\n"));
        }
    }
}

#[tokio::test]
async fn late_followers_get_identical_bytes() {
    let worker = Worker::start();
    let mut client = worker.client();
    let job = start(&mut client, start_req("bash", "slow_lines.sh", &[])).await;
    let mut early_client = client.clone();
    let early_job = job.clone();
    let early = tokio::spawn(async move { follow(&mut early_client, &early_job, 0).await });
    // Join once part of the output exists.
    let mut probe = open_followed(&mut client, &job, 0).await;
    let mut seen = 0;
    while seen < 30 {
        seen += probe.message().await.unwrap().unwrap().output.len();
    }
    let (late_out, late_status) = follow(&mut client, &job, 0).await;
    let (early_out, early_status) = early.await.unwrap();
    assert_eq!(early_out, late_out);
    assert_eq!(early_status, late_status);
    let expected: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8(late_out).unwrap(), expected);
    // Reading from an offset gives the suffix.
    let (tail, _) = follow(&mut client, &job, 7).await;
    assert_eq!(tail, &expected.as_bytes()[7..]);
}

#[tokio::test]
async fn fifty_megabytes_of_binary_output_arrive_byte_exact() {
    let worker = Worker::start();
    let mut client = worker.client();
    let job = start(&mut client, start_req("python", "blob.py", &[])).await;
    let (out, status) = follow(&mut client, &job, 0).await;
    assert_eq!(status.state(), JobState::Succeeded, "{status:?}");
    let expected: Vec<u8> = (0..50 * 4096).flat_map(|_| 0..=255u8).collect();
    assert_eq!(out.len(), expected.len());
    assert_eq!(Sha256::digest(&out), Sha256::digest(&expected));
    let on_disk = std::fs::read(
        worker
            .state_dir()
            .join("jobs")
            .join(&job)
            .join("output.log"),
    )
    .unwrap();
    assert_eq!(Sha256::digest(&on_disk), Sha256::digest(&expected));
}

#[tokio::test]
async fn unknown_plugins_jobs_and_offsets_get_clear_errors() {
    let worker = Worker::start();
    let mut client = worker.client();
    let err = client
        .start_job(start_req("cobol", "count.sh", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown plugin \"cobol\""),
        "{}",
        err.message()
    );
    assert!(err.message().contains("bash, python"), "{}", err.message());

    let unknown = uuid::Uuid::new_v4().to_string();
    let err = client
        .query_job(QueryJobRequest {
            job_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&unknown));
    let err = client
        .stop_job(StopJobRequest { job_id: unknown })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .query_job(QueryJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let job = start(&mut client, start_req("bash", "count.sh", &["1", "0"])).await;
    follow(&mut client, &job, 0).await;
    let err = client
        .stream_job(StreamJobRequest {
            job_id: job,
            offset: 1000,
            follow: Some(false),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
}

#[tokio::test]
async fn args_and_env_reach_the_script_and_the_scheduler_can_choose_the_id_and_starts_are_idempotent()
 {
    let worker = Worker::start();
    let mut client = worker.client();
    let id = uuid::Uuid::new_v4().to_string();
    let mut req = start_req("bash", "env.sh", &["world"]);
    req.env = HashMap::from([("GREETING".to_owned(), "hello".to_owned())]);
    req.job_id = id.clone();
    assert_eq!(start(&mut client, req.clone()).await, id);
    let (out, _) = follow(&mut client, &id, 0).await;
    assert_eq!(out, b"hello world\n");
    // A repeated start of the same id returns the job and starts nothing.
    let again = client.start_job(req).await.unwrap().into_inner();
    assert_eq!(again.job_id, id);
    let status = again.status.unwrap();
    assert_eq!(status.state, JobState::Succeeded as i32);
    let (out, _) = follow(&mut client, &id, 0).await;
    assert_eq!(out, b"hello world\n", "the script ran once");
}

#[tokio::test]
async fn sigterm_stops_running_jobs_and_records_survive_a_restart() {
    let mut worker = Worker::start();
    let mut client = worker.client();
    let done = start(&mut client, start_req("bash", "count.sh", &["2", "0"])).await;
    follow(&mut client, &done, 0).await;
    let running = start(&mut client, start_req("bash", "spawns.sh", &[])).await;
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&running).len()
            >= 3)
        .await
    );

    worker.daemon.signal(Signal::SIGTERM);
    let status = worker.daemon.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "workerd exits 0 on SIGTERM: {status:?}\n{}",
        worker.daemon.log()
    );
    assert!(job_processes(&running).is_empty());

    worker.restart();
    let mut client = worker.client();
    let q = query(&mut client, &running).await;
    assert_eq!(q.state(), JobState::Stopped);
    let (out, status) = follow(&mut client, &done, 0).await;
    assert_eq!(
        (out.as_slice(), status.state()),
        (&b"1\n2\ndone\n"[..], JobState::Succeeded)
    );
}

/// A job in a spare directory (synced while no start came) has its final
/// record written over the space held for it (`job.json.final`, NUL bytes)
/// and synced, and only then renamed over its first record, unsynced. A
/// crash that undoes that rename (or the first record's own, made unsynced
/// at the start) leaves the final record beside a first one that says the
/// job runs, or alone: the worker, started again, serves the end it had
/// reported. A write the crash tore (a sector of it not written, so the
/// space's own bytes in its place, here inside a string) is not a record,
/// nor is a file that holds another job's: the job is as it was before its
/// end, here lost with the worker. (The files are put as such a crash
/// leaves them, the worker killed first.)
#[tokio::test]
async fn a_final_record_whose_rename_a_crash_undid_is_still_the_jobs_end() {
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Left {
        BesideTheFirst,
        Alone,
        Torn,
        AnotherJobs,
    }
    let mut worker = Worker::start();
    let mut client = worker.client();
    let mut jobs = Vec::new();
    for left in [
        Left::BesideTheFirst,
        Left::Alone,
        Left::Torn,
        Left::AnotherJobs,
    ] {
        let job = start(&mut client, start_req("bash", "fail.sh", &["7"])).await;
        follow(&mut client, &job, 0).await;
        jobs.push((job, left));
    }
    let other = start(&mut client, start_req("bash", "fail.sh", &["9"])).await;
    follow(&mut client, &other, 0).await;
    let jobs_dir = worker.state_dir().join("jobs");
    // What a sector the crash did not write holds: the space's own bytes,
    // as a spare holds them. Spares are made after the worker starts, off
    // the starts' path: on a loaded machine the jobs above may have come
    // first, so the test waits for one (10 s at most) before the crash.
    let spares = worker.state_dir().join("spare");
    let spare_space = || {
        names_in(&spares)
            .iter()
            .filter_map(|name| std::fs::read(spares.join(name).join("job.json.final")).ok())
            .find(|held| held.len() >= 4096)
    };
    eventually(Duration::from_secs(10), || spare_space().is_some()).await;
    worker.daemon.signal(Signal::SIGKILL);
    worker.daemon.wait(Duration::from_secs(10));
    let held = spare_space().expect("a spare's space for a final record");
    let other_record = std::fs::read(jobs_dir.join(&other).join("job.json")).unwrap();
    for (job, left) in &jobs {
        let dir = jobs_dir.join(job);
        assert_eq!(names_in(&dir), ["job.json", "output.log"], "renamed");
        let last = std::fs::read(dir.join("job.json")).unwrap();
        let mut first: serde_json::Value = serde_json::from_slice(&last).unwrap();
        assert_eq!(first["state"], "failed");
        first["state"] = "running".into();
        first["exit_code"] = serde_json::Value::Null;
        first["finished_at_ms"] = 0.into();
        match left {
            Left::Alone => std::fs::remove_file(dir.join("job.json")).unwrap(),
            _ => std::fs::write(dir.join("job.json"), serde_json::to_vec(&first).unwrap()).unwrap(),
        }
        let final_record = match left {
            Left::Torn => {
                let mut torn = held.clone();
                torn[..last.len()].copy_from_slice(&last);
                let path = last.windows(9).position(|w| w == b"\"fail.sh\"").unwrap();
                torn[path + 1..path + 8].copy_from_slice(&held[..7]);
                torn
            }
            Left::AnotherJobs => other_record.clone(),
            _ => last.clone(),
        };
        std::fs::write(dir.join("job.json.final"), final_record).unwrap();
    }
    worker.restart();
    let mut client = worker.client();
    for (job, left) in &jobs {
        let q = query(&mut client, job).await;
        if matches!(left, Left::Torn | Left::AnotherJobs) {
            assert_eq!(q.state(), JobState::Lost, "{left:?}: {q:?}");
            continue;
        }
        assert_eq!(
            (q.state(), q.exit_code),
            (JobState::Failed, Some(7)),
            "{left:?}: {q:?}"
        );
        let (out, status) = follow(&mut client, job, 0).await;
        assert_eq!(
            (out.as_slice(), status.state()),
            (
                &b"about to fail\nfailing on purpose\n"[..],
                JobState::Failed
            )
        );
        // Renamed into place when the worker started.
        assert_eq!(names_in(&jobs_dir.join(job)), ["job.json", "output.log"]);
    }
}

#[test]
fn bad_configs_are_refused_with_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    pki.issue(Role::Worker, "w1");
    std::fs::create_dir(tmp.path().join("scripts")).unwrap();
    open_to_jobs(tmp.path());
    let base = BASE_CONFIG;
    let cases = [
        ("[plugins.bash]\nrunner = \"bash\"\n", None),
        ("[plugins.x]\nrunner = \"cobol\"\n", Some("plugins.x")),
        (
            "[plugins.ruby]\nrunner = \"interpreter\"\ninterpreter = \"/no/ruby\"\n",
            Some("plugins.ruby.interpreter"),
        ),
        (
            "[plugins.bash]\nrunner = \"bash\"\nstop_grace = \"soon\"\n",
            Some("plugins.bash"),
        ),
        (
            "[plugins.bash]\nrunner = \"bash\"\n[extra]\nx = 1\n",
            Some("extra"),
        ),
        ("", Some("plugins")),
        (
            "[plugins.bash]\nrunner = \"bash\"\nallow_env = [\"LD_PRELOAD\"]\n",
            Some("plugins.bash.allow_env"),
        ),
        (
            "[plugins.bash]\nrunner = \"bash\"\nallow_env = [\"*\"]\n",
            Some("plugins.bash.allow_env"),
        ),
        (
            "[plugins.bash]\nrunner = \"bash\"\nmax_output_bytes = 0\nlimits = { processes = 0, open_files = 0 }\n",
            None,
        ),
        (
            "[plugins.bash]\nrunner = \"bash\"\nlimits = { open_files = 99999999999 }\n",
            Some("plugins.bash.limits.open_files"),
        ),
        // Any number of runtime threads up to 1024; 0: one per CPU.
        (
            "runtime_threads = 0\n[plugins.bash]\nrunner = \"bash\"\n",
            None,
        ),
        (
            "runtime_threads = 4\n[plugins.bash]\nrunner = \"bash\"\n",
            None,
        ),
        (
            "runtime_threads = 1024\n[plugins.bash]\nrunner = \"bash\"\n",
            None,
        ),
        (
            "runtime_threads = 1025\n[plugins.bash]\nrunner = \"bash\"\n",
            Some("worker.runtime_threads"),
        ),
        (
            "runtime_threads = 5000\n[plugins.bash]\nrunner = \"bash\"\n",
            Some("at most 1024"),
        ),
        (
            "runtime_threads = -1\n[plugins.bash]\nrunner = \"bash\"\n",
            Some("runtime_threads"),
        ),
    ];
    for (extra, key) in cases {
        let config = tmp.path().join("w.toml");
        std::fs::write(&config, format!("{base}{extra}")).unwrap();
        let out = std::process::Command::new(WORKERD)
            .args(["--config", config.to_str().unwrap(), "--check-config"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match key {
            None => assert!(out.status.success(), "{extra}: {stderr}"),
            Some(key) => {
                assert!(!out.status.success(), "{extra} should be refused");
                assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
                assert!(stderr.contains("w.toml"), "{stderr}");
                assert!(stderr.contains(key), "{key} in {stderr}");
            }
        }
    }
    // A worker certificate for another name is refused, naming the fix.
    let config = tmp.path().join("w.toml");
    std::fs::write(
        &config,
        format!(
            "{}[plugins.bash]\nrunner = \"bash\"\n",
            base.replace("name = \"w1\"", "name = \"w2\"")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(WORKERD)
        .args(["--config", config.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("worker.name"));

    if nix::unistd::geteuid().is_root() {
        // Jobs of a root worker run as nobody, who cannot pass through a
        // private directory: refused at start, in one line naming the way out.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let check = |extra: &str| {
            std::fs::write(
                &config,
                format!("{base}{extra}[plugins.bash]\nrunner = \"bash\"\n"),
            )
            .unwrap();
            std::process::Command::new(WORKERD)
                .args(["--config", config.to_str().unwrap(), "--check-config"])
                .output()
                .unwrap()
        };
        let out = check("");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        for part in [
            "worker.run_as_user",
            "nobody",
            "cannot read scripts_dir",
            "(mode 0700",
        ] {
            assert!(stderr.contains(part), "{part} in {stderr}");
        }
        // Naming root is the operator's call (warned at start).
        let out = check("run_as_user = \"root\"\n");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn request_env_passes_only_what_the_plugin_allows() {
    let worker = Worker::start_with(
        "\n[plugins.app]\nrunner = \"bash\"\nextensions = []\nallow_env = [\"APP_*\"]\n",
    );
    let marks = worker.tmp.path().join("marks");
    std::fs::write(
        worker.tmp.path().join("scripts/mark.py"),
        format!("open('{}/ran', 'w').close()\n", marks.display()),
    )
    .unwrap();
    std::fs::write(
        worker.tmp.path().join("scripts/app.sh"),
        "echo \"$APP_MODE $APP_LEVEL ${GREETING-unset}\"\n",
    )
    .unwrap();
    let mut client = worker.client();
    let refused = [
        // The reported attack: PYTHONWARNINGS imports a module that runs
        // BROWSER as a shell command.
        (
            "python",
            "mark.py",
            vec![
                ("PYTHONWARNINGS", "all:0:antigravity.x:0:0"),
                ("BROWSER", "/bin/sh -c 'touch /tmp/pwned' %s"),
            ],
            vec!["PYTHONWARNINGS", "BROWSER", "allows none"],
        ),
        (
            "bash",
            "env.sh",
            vec![("OTHER", "x")],
            vec!["not allowed: OTHER", "allows GREETING"],
        ),
        (
            "app",
            "app.sh",
            vec![("APP_MODE", "x"), ("LD_PRELOAD", "/x.so")],
            vec!["never allowed: LD_PRELOAD", "allows APP_*"],
        ),
        (
            "app",
            "app.sh",
            vec![("GREETING", "hi")],
            vec!["not allowed: GREETING"],
        ),
    ];
    for (plugin, script, env, parts) in refused {
        let mut req = start_req(plugin, script, &[]);
        req.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let err = client.start_job(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{plugin}: {err:?}");
        assert_eq!(
            err.metadata().get("jobcluster-code").unwrap(),
            "env_not_allowed",
            "{plugin}"
        );
        for part in parts {
            assert!(err.message().contains(part), "{part} in {}", err.message());
        }
    }
    assert!(!marks.join("ran").exists(), "a refused job ran");
    let jobs = std::fs::read_dir(worker.state_dir().join("jobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(jobs, 0, "no job was created");

    let mut req = start_req("app", "app.sh", &[]);
    req.env = HashMap::from([
        ("APP_MODE".to_owned(), "fast".to_owned()),
        ("APP_LEVEL".to_owned(), "3".to_owned()),
    ]);
    let job = start(&mut client, req).await;
    assert_eq!(follow(&mut client, &job, 0).await.0, b"fast 3 unset\n");
}

/// State, parent, process group and session of a live (or zombie) process.
fn proc_stat(pid: u32) -> Option<(char, u32, u32, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some((
        fields[0].chars().next()?,
        fields[1].parse().ok()?,
        fields[2].parse().ok()?,
        fields[3].parse().ok()?,
    ))
}

/// Zombies whose parent is `parent`: children it has not reaped.
fn zombie_children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| matches!(proc_stat(*pid), Some(('Z', ppid, _, _)) if ppid == parent))
        .collect()
}

/// Kills whatever is left of a job when a test ends, so a failing test
/// leaves no `sleep 300` behind.
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Again while any is found: a chain's next link may be forked
        // between a look and its kill.
        for _ in 0..100 {
            let left = job_processes(&self.0);
            if left.is_empty() {
                return;
            }
            for pid in left {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sessions of the job's live processes.
fn job_sessions(job: &str) -> std::collections::BTreeSet<u32> {
    job_processes(job)
        .into_iter()
        .filter_map(|pid| proc_stat(pid).map(|s| s.3))
        .collect()
}

/// Starts escape.sh and waits until all four of its processes run, in three
/// sessions (some processes come and go while it sets up).
async fn start_escaping_job(client: &mut WorkerClient<Channel>) -> (String, KillOnDrop) {
    let job = start(client, start_req("bash", "escape.sh", &[])).await;
    let guard = KillOnDrop(job.clone());
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&job).len() >= 4
            && job_sessions(&job).len() >= 3)
        .await,
        "the job and its three escapees should run: {:?} in sessions {:?}",
        job_processes(&job),
        job_sessions(&job)
    );
    (job, guard)
}

#[tokio::test]
async fn stop_kills_descendants_that_left_the_process_group() {
    let worker = Worker::start();
    let mut client = worker.client();
    let (job, _guard) = start_escaping_job(&mut client).await;
    let state = stop(&mut client, job.clone()).await;
    assert_eq!(state, JobState::Stopped, "{}", worker.daemon.log());
    assert!(
        eventually(Duration::from_secs(3), || job_processes(&job).is_empty()).await,
        "left after stop: {:?}",
        job_processes(&job)
    );
    // With every holder of the pipe gone, the log closes at once.
    let (out, status) = tokio::time::timeout(Duration::from_secs(3), follow(&mut client, &job, 0))
        .await
        .expect("the output ends promptly");
    assert_eq!(
        (out.as_slice(), status.state()),
        (&b"started\n"[..], JobState::Stopped)
    );
    let workerd = worker.daemon.child.id();
    assert!(
        eventually(Duration::from_secs(3), || zombie_children(workerd)
            .is_empty())
        .await,
        "zombies of workerd: {:?}",
        zombie_children(workerd)
    );
}

#[tokio::test]
async fn worker_sigterm_kills_descendants_that_left_the_process_group() {
    let mut worker = Worker::start();
    let mut client = worker.client();
    let (job, _guard) = start_escaping_job(&mut client).await;
    worker.daemon.signal(Signal::SIGTERM);
    let status = worker.daemon.wait(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", worker.daemon.log());
    assert!(
        eventually(Duration::from_secs(3), || job_processes(&job).is_empty()).await,
        "left after the worker stopped: {:?}",
        job_processes(&job)
    );
}

#[tokio::test]
async fn a_restart_after_kill_9_kills_escaped_descendants_and_records_the_job_lost() {
    let mut worker = Worker::start();
    let mut client = worker.client();
    let (job, _guard) = start_escaping_job(&mut client).await;
    worker.daemon.signal(Signal::SIGKILL);
    worker.daemon.wait(Duration::from_secs(10));
    assert!(
        job_processes(&job).len() >= 4,
        "the job outlives a killed worker"
    );
    worker.restart();
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&job).is_empty()).await,
        "left after the restart: {:?}",
        job_processes(&job)
    );
    let q = query(&mut worker.client(), &job).await;
    assert_eq!(q.state(), JobState::Lost, "{q:?}");
}

#[tokio::test]
async fn orphans_re_parented_to_the_worker_are_reaped() {
    let worker = Worker::start();
    let mut client = worker.client();
    let job = start(&mut client, start_req("bash", "orphan.sh", &[])).await;
    let _guard = KillOnDrop(job.clone());
    let out = wait_for_output(&mut client, &job, b"ready\n").await;
    let orphan: u32 = String::from_utf8(out)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("orphan "))
        .unwrap()
        .parse()
        .unwrap();
    let workerd = worker.daemon.child.id();
    assert_eq!(
        proc_stat(orphan).map(|s| s.1),
        Some(workerd),
        "the orphan is re-parented to workerd"
    );
    // It exits after a second; a zombie left unreaped would keep its entry.
    assert!(
        eventually(Duration::from_secs(5), || proc_stat(orphan)
            .is_none_or(|s| s.1 != workerd))
        .await,
        "the orphan was not reaped: {:?}",
        proc_stat(orphan)
    );
    assert_eq!(zombie_children(workerd), Vec::<u32>::new());
    let state = stop(&mut client, job).await;
    assert_eq!(state, JobState::Stopped);
}

/// Runs `script` `times` times and checks after each that nothing of the
/// job outlived its end, then or a little later, and that the end did not
/// give up its kill rounds.
async fn assert_job_ends_leave_nothing(worker: &Worker, script: &str, times: usize) {
    let mut client = worker.client();
    for _ in 0..times {
        let job = start(&mut client, start_req("bash", script, &[])).await;
        let _guard = KillOnDrop(job.clone());
        let (_, status) = follow(&mut client, &job, 0).await;
        assert_eq!(status.state(), JobState::Succeeded, "{status:?}");
        let left = || {
            job_processes(&job)
                .into_iter()
                .map(|pid| (pid, proc_stat(pid)))
                .collect::<Vec<_>>()
        };
        // The end is recorded once the job's processes are gone, and none
        // was hidden to come back later.
        let workerd = worker.daemon.child.id();
        assert_eq!(
            left(),
            [],
            "left (workerd {workerd}): {}",
            worker.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            left(),
            [],
            "came back (workerd {workerd}): {}",
            worker.daemon.log()
        );
    }
    assert!(
        !worker.daemon.log().contains(GAVE_UP),
        "{}",
        worker.daemon.log()
    );
}

/// What workerd logs when a job's end ran out of kill rounds.
const GAVE_UP: &str = "after every kill round";

/// A job's end finds its processes by walking workerd's tree, where a
/// process moves (to workerd) whenever its parent exits. A chain whose
/// live link keeps starting the next and exiting moves all the time while
/// the end looks for it, and still nothing of the job outlives it.
#[tokio::test]
async fn a_job_end_kills_a_chain_whose_live_link_keeps_moving() {
    assert_job_ends_leave_nothing(&Worker::start(), "relay.sh", 10).await;
}

/// A process in an `execve` has a new memory without its environment for a
/// moment, so the environment that marks it as the job's reads empty.
#[tokio::test]
async fn a_job_end_kills_orphans_that_exec_again_and_again() {
    assert_job_ends_leave_nothing(&Worker::start(), "execs.sh", 40).await;
}

/// A process whose main thread ended alone shows as a zombie, and its
/// environment reads empty, while its other threads run on.
#[tokio::test]
async fn a_job_end_kills_an_orphan_whose_main_thread_ended() {
    assert_job_ends_leave_nothing(&Worker::start(), "headless.sh", 3).await;
}

/// A children list longer than one read of it can hold may miss a child
/// that moves while it is read: another job's orphan with hundreds of
/// children makes a job's end settle its walks with a scan of every
/// process, and nothing of either job outlives its end.
#[tokio::test]
async fn a_children_list_too_long_to_read_at_once_is_settled_by_a_scan() {
    // Their own plugin: 1,100 processes would hit the default process limit,
    // which (as root, per job user) every other test's jobs share.
    let user = match nix::unistd::geteuid().is_root() {
        true => "user = \"root\"\n",
        false => "",
    };
    let worker = Worker::start_with(&format!(
        "\n[plugins.crowd]\nrunner = \"bash\"\n{user}limits = {{ processes = 0 }}\n"
    ));
    let mut client = worker.client();
    let crowd = start(&mut client, start_req("crowd", "crowd.sh", &[])).await;
    let _guard = KillOnDrop(crowd.clone());
    wait_for_output(&mut client, &crowd, b"started\n").await;
    assert_job_ends_leave_nothing(&worker, "env.sh", 1).await;
    assert!(
        worker.daemon.log().contains(SCANNED),
        "{}",
        worker.daemon.log()
    );
    assert_eq!(stop(&mut client, crowd.clone()).await, JobState::Stopped);
    assert_eq!(job_processes(&crowd), Vec::<u32>::new());
}

/// What workerd logs when a list too long to read made it scan `/proc`.
const SCANNED: &str = "too long to read at once";

/// Reads the job's output until it ends with `tail`, and returns it.
async fn wait_for_output(client: &mut WorkerClient<Channel>, job: &str, tail: &[u8]) -> Vec<u8> {
    let mut stream = open_followed(client, job, 0).await;
    let mut out = Vec::new();
    while !out.ends_with(tail) {
        let msg = stream.message().await.unwrap().unwrap();
        out.extend_from_slice(&msg.output);
    }
    out
}

/// Zombies nobody reaps, in another job's tree or in an orphan it left,
/// cannot move anything: the ends of other jobs need not doubt them.
#[tokio::test]
async fn zombies_of_a_running_job_do_not_hold_up_other_jobs_ends() {
    let worker = Worker::start();
    let mut client = worker.client();
    let lingering = start(&mut client, start_req("bash", "zombies.sh", &[])).await;
    let _guard = KillOnDrop(lingering.clone());
    wait_for_output(&mut client, &lingering, b"started\n").await;
    assert_job_ends_leave_nothing(&worker, "env.sh", 3).await;
    let state = stop(&mut client, lingering.clone()).await;
    assert_eq!(state, JobState::Stopped);
    assert_eq!(job_processes(&lingering), Vec::<u32>::new());
}

/// The orphan reaper runs on every SIGCHLD beside the jobs' own waits: it
/// must never take a job's exit status, however their ends interleave.
#[tokio::test]
async fn every_job_keeps_its_own_exit_code_while_orphans_are_reaped_around_it() {
    let worker = Worker::start();
    let client = worker.client();
    let mut jobs = tokio::task::JoinSet::new();
    for code in 1..=40u8 {
        let mut client = client.clone();
        jobs.spawn(async move {
            let job = start(
                &mut client,
                start_req("bash", "orphan_exit.sh", &[&code.to_string()]),
            )
            .await;
            let (_, status) = follow(&mut client, &job, 0).await;
            (code, status)
        });
    }
    while let Some(ended) = jobs.join_next().await {
        let (code, status) = ended.unwrap();
        assert_eq!(
            (status.state(), status.exit_code),
            (JobState::Failed, Some(i32::from(code))),
            "{status:?}"
        );
    }
    let workerd = worker.daemon.child.id();
    assert!(
        eventually(Duration::from_secs(5), || zombie_children(workerd)
            .is_empty())
        .await,
        "zombies left: {:?}",
        zombie_children(workerd)
    );
}

/// A caller that gives up on a start (its deadline passes mid-start) never
/// leaves a process that nobody supervises: every job id either names a
/// job the worker knows and sees through to its end, or started nothing
/// and left nothing behind.
#[tokio::test]
async fn a_start_whose_caller_gives_up_is_supervised_or_leaves_nothing() {
    let worker = Worker::start();
    let mut client = worker.client();
    let mut ids = Vec::new();
    for i in 0..40u64 {
        let id = uuid::Uuid::new_v4().to_string();
        let mut req = start_req("bash", "count.sh", &["3", "0.5"]);
        req.job_id = id.clone();
        let mut request = tonic::Request::new(req);
        // From well before the spawn to around it.
        request.set_timeout(Duration::from_micros(200 + 150 * i));
        let _ = client.start_job(request).await;
        ids.push(id);
    }
    // A start the caller gave up on goes on in the worker: wait (bounded)
    // until each id is either a job the worker knows or nothing at all.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let known = loop {
        let mut known = Vec::new();
        let mut unsettled = Vec::new();
        for id in &ids {
            match client
                .query_job(QueryJobRequest { job_id: id.clone() })
                .await
            {
                Ok(_) => known.push(id.clone()),
                // A start the caller left may still be under way.
                Err(status) if status.code() == Code::Unavailable => {
                    let code = status.metadata().get("jobcluster-code");
                    assert_eq!(
                        code.and_then(|c| c.to_str().ok()),
                        Some("job_starting"),
                        "{status:?}"
                    );
                    unsettled.push(id.clone());
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::NotFound, "{status:?}");
                    let files = worker.state_dir().join("jobs").join(id).exists();
                    if files || !job_processes(id).is_empty() {
                        unsettled.push(id.clone());
                    }
                }
            }
        }
        if unsettled.is_empty() {
            break known;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs {unsettled:?} run or left files, but their worker does not know them"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!known.is_empty(), "no start got far enough to spawn");
    for id in &known {
        let (_, status) = follow(&mut client, id, 0).await;
        assert_eq!(status.state(), JobState::Succeeded, "{id}");
        assert!(job_processes(id).is_empty());
    }
}

/// Names in a directory, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits (bounded) until the worker keeps all 16 spare job directories;
/// returns where they are.
async fn spares_made(worker: &Worker) -> PathBuf {
    let spare = worker.state_dir().join("spare");
    let kept = || names_in(&spare).len() == 16;
    assert!(
        eventually(Duration::from_secs(10), kept).await,
        "{:?}",
        names_in(&spare)
    );
    spare
}

/// Job directories are made ahead of the starts that take them, in
/// `state/spare` (never among the jobs): a started job's directory holds
/// what a freshly made one would, its final record's reservation grown for
/// long arguments, and what a stopped worker left among the spares is
/// cleared when it starts again.
#[tokio::test]
async fn starts_take_job_directories_made_ahead_that_hold_what_a_new_one_would() {
    use std::os::unix::fs::MetadataExt;
    let mut worker = Worker::start();
    let spare = spares_made(&worker).await;
    let inode = |path: PathBuf| std::fs::metadata(path).unwrap().ino();
    let made: Vec<u64> = names_in(&spare)
        .into_iter()
        .map(|n| inode(spare.join(n).join("output.log")))
        .collect();
    // Spares made a day ago: a job's log must not look that old to
    // retention, which judges its age by the log's time.
    let day_ago = std::time::SystemTime::now() - Duration::from_secs(86_400);
    for name in names_in(&spare) {
        let log = std::fs::File::options()
            .write(true)
            .open(spare.join(name).join("output.log"))
            .unwrap();
        log.set_modified(day_ago).unwrap();
    }
    let mut client = worker.client();
    let long = "x".repeat(6000);
    let job = start(
        &mut client,
        start_req("bash", "count.sh", &["100", "0.1", &long]),
    )
    .await;
    let dir = worker.state_dir().join("jobs").join(&job);
    assert_eq!(names_in(&dir), ["job.json", "job.json.final", "output.log"]);
    assert!(
        made.contains(&inode(dir.join("output.log"))),
        "a spare was taken"
    );
    let logged = std::fs::metadata(dir.join("output.log"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(logged > day_ago + Duration::from_secs(3600), "{logged:?}");
    for name in ["job.json", "job.json.final", "output.log"] {
        let mode = std::fs::metadata(dir.join(name)).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let record = std::fs::read(dir.join("job.json")).unwrap();
    let reserved = std::fs::metadata(dir.join("job.json.final")).unwrap().len();
    assert!(
        reserved >= 2 * record.len() as u64 + 4096,
        "{reserved} bytes held for a record of {}",
        record.len()
    );
    let stopped = client
        .stop_job(StopJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap();
    drop(stopped);
    let (_, status) = follow(&mut client, &job, 0).await;
    assert_eq!(status.state(), JobState::Stopped);
    assert_eq!(names_in(&dir), ["job.json", "output.log"]);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("job.json")).unwrap()).unwrap();
    assert_eq!(record["args"][2], long.as_str());

    // Refilled once half are taken: nine starts leave seven without it.
    let mut job = String::new();
    for _ in 0..8 {
        job = start(&mut client, start_req("bash", "count.sh", &["2", "0"])).await;
        let (out, status) = follow(&mut client, &job, 0).await;
        assert_eq!(status.state(), JobState::Succeeded);
        assert_eq!(out, b"1\n2\ndone\n");
    }
    let refilled = || names_in(&spare).len() >= 15;
    assert!(
        eventually(Duration::from_secs(10), refilled).await,
        "{:?}",
        names_in(&spare)
    );

    // Leftovers of a stopped worker are cleared when it starts.
    worker.daemon.signal(Signal::SIGTERM);
    assert!(worker.daemon.wait(Duration::from_secs(20)).success());
    std::fs::create_dir_all(spare.join("half-made")).unwrap();
    std::fs::write(spare.join("half-made/output.log"), b"old").unwrap();
    std::fs::write(spare.join("stray"), b"old").unwrap();
    worker.restart();
    let fresh = || {
        let names = names_in(&spare);
        names.len() == 16 && !names.iter().any(|n| n == "half-made" || n == "stray")
    };
    assert!(
        eventually(Duration::from_secs(10), fresh).await,
        "{:?}",
        names_in(&spare)
    );
    let mut client = worker.client();
    let (out, status) = follow(&mut client, &job, 0).await;
    assert_eq!(status.state(), JobState::Succeeded);
    assert_eq!(out, b"1\n2\ndone\n");
}

/// Unmounts (lazily, so a failing test cannot leave it) when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Where `jobs/` is another filesystem than the spares, a spare cannot be
/// renamed into place: the worker says so once, stops making them, and
/// every start makes its own directory.
#[tokio::test]
async fn spares_on_another_filesystem_than_the_jobs_are_turned_off() {
    let uid = nix::unistd::geteuid();
    if !uid.is_root() {
        eprintln!("skipping: needs root to mount a tmpfs (running as uid {uid})");
        return;
    }
    let mut worker = Worker::start();
    worker.daemon.signal(Signal::SIGTERM);
    assert!(worker.daemon.wait(Duration::from_secs(20)).success());
    let jobs = worker.state_dir().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&jobs)
        .status()
        .unwrap();
    if !mounted.success() {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    }
    let _mount = Mounted(jobs.clone());
    worker.restart();
    spares_made(&worker).await;
    let mut client = worker.client();
    for _ in 0..3 {
        let job = start(&mut client, start_req("bash", "count.sh", &["2", "0"])).await;
        let (out, status) = follow(&mut client, &job, 0).await;
        assert_eq!(status.state(), JobState::Succeeded);
        assert_eq!(out, b"1\n2\ndone\n");
        assert_eq!(names_in(&jobs.join(&job)), ["job.json", "output.log"]);
    }
    let log = worker.daemon.log();
    assert_eq!(
        log.matches("cannot be moved into place").count(),
        1,
        "{log}"
    );
    worker.daemon.signal(Signal::SIGTERM);
    assert!(worker.daemon.wait(Duration::from_secs(20)).success());
}

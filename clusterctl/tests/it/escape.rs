//! A hostile job that leaves its process group and session (setsid, a
//! double fork) is still ended by a stop through the API, and by its
//! worker's restart after a crash.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cluster::Cluster;
use crate::faults::until;
use crate::harness::{eventually, job_processes};

const ESCAPE: &str =
    "setsid bash -c '(sleep 300 &); exec sleep 300' &\n(setsid sleep 300 &)\necho started\nwait\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_escapes_its_group_is_stopped_whole_and_killed_after_a_crash() {
    let mut cluster = Cluster::start(&["w1"]).await;
    std::fs::write(cluster.tmp.path().join("scripts/escape.sh"), ESCAPE).unwrap();

    let stopped = cluster.start_job("w1", "escape.sh", &[]).await;
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&stopped).len()
            >= 4)
        .await,
        "the job never spread out"
    );
    let out = cluster.ctl_output(&["stop", &stopped]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&stopped)
            .is_empty())
        .await,
        "processes of a stopped job live on: {:?}",
        job_processes(&stopped)
    );
    assert_eq!(cluster.job(&stopped).await.state, "stopped");

    let crashed = cluster.start_job("w1", "escape.sh", &[]).await;
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&crashed).len()
            >= 4)
        .await,
        "the job never spread out"
    );
    cluster.worker("w1").signal(Signal::SIGKILL);
    cluster.worker("w1").wait(Duration::from_secs(10));
    cluster.restart_worker("w1");
    assert!(
        eventually(Duration::from_secs(15), || job_processes(&crashed)
            .is_empty())
        .await,
        "processes of a job outlived its worker's crash: {:?}",
        job_processes(&crashed)
    );
    until(
        Duration::from_secs(15),
        "the crashed job recorded lost",
        || async { cluster.job(&crashed).await.state == "lost" },
    )
    .await;
}

/// A job that ends on its own (exit 0) with daemons it double-forked out of
/// its group and session: they are killed when it ends, found by walking
/// the worker's own descendants (it is their subreaper), not by a scan of
/// every process on the machine.
#[tokio::test(flavor = "multi_thread")]
async fn processes_a_job_left_behind_when_it_exited_are_killed() {
    let cluster = Cluster::start(&["w1"]).await;
    let script = "(setsid bash -c '(sleep 300 &); exec sleep 300' &)\n(setsid sleep 300 &)\nsleep 1\necho done\n";
    std::fs::write(cluster.tmp.path().join("scripts/leave.sh"), script).unwrap();

    let job = cluster.start_job("w1", "leave.sh", &[]).await;
    until(Duration::from_secs(15), "the job succeeded", || async {
        cluster.job(&job).await.state == "succeeded"
    })
    .await;
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&job).is_empty()).await,
        "processes the job left behind live on: {:?}",
        job_processes(&job)
    );
}

/// A stop's SIGTERM reaches the job's processes outside its group while
/// the job's main process still runs (so they are still below it, not yet
/// orphans of the worker): each gets its chance to clean up, not only the
/// SIGKILL of the job's end.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_sends_sigterm_below_a_main_process_that_still_runs() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::start(&["w1"]).await;
    // Whatever user the job runs as, it can leave its mark here.
    let marks = cluster.tmp.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mark = marks.join("term");
    let ready = marks.join("ready");
    // The daemon leaves the group and session; the main process, asked to
    // stop, takes two seconds to go (its trap is set before the daemon
    // starts: a shell's traps do not pass to the commands it runs).
    let script = format!(
        "trap 'sleep 2; exit 0' TERM\n\
         setsid bash -c 'trap \"echo term > {mark}; exit 0\" TERM; touch {ready}; while :; do sleep 0.1; done' &\n\
         echo started\nwhile :; do sleep 0.1; done\n",
        mark = mark.display(),
        ready = ready.display()
    );
    std::fs::write(cluster.tmp.path().join("scripts/linger.sh"), script).unwrap();

    let job = cluster.start_job("w1", "linger.sh", &[]).await;
    let _left = KillLeft(job.clone());
    // Its trap is set once it says so.
    assert!(
        eventually(Duration::from_secs(10), || ready.exists()).await,
        "the job's daemon never started"
    );
    let out = cluster.ctl_output(&["stop", &job]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&job).is_empty()).await,
        "processes of a stopped job live on: {:?}",
        job_processes(&job)
    );
    assert_eq!(
        std::fs::read_to_string(&mark).ok().as_deref(),
        Some("term\n"),
        "the process outside the job's group never had its SIGTERM"
    );
    assert_eq!(cluster.job(&job).await.state, "stopped");
}

/// A stop's grace period is the whole job's: a child that takes a second
/// to clean up after SIGTERM finishes (and its last line is kept), though
/// the main process, a shell without a trap, ends at once. The child was
/// SIGKILLed as soon as the main process ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_gives_the_grace_period_to_every_process_of_the_job() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::start(&["w1"]).await;
    let marks = cluster.tmp.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let ready = marks.join("ready");
    // The harness's bash plugin has stop_grace = "2s".
    let script = format!(
        "bash -c 'trap \"sleep 1; echo child cleaned up; exit 0\" TERM; touch {ready}; while :; do sleep 0.1; done' &\n\
         wait\n",
        ready = ready.display()
    );
    std::fs::write(cluster.tmp.path().join("scripts/cleanup.sh"), script).unwrap();

    let job = cluster.start_job("w1", "cleanup.sh", &[]).await;
    let _left = KillLeft(job.clone());
    assert!(
        eventually(Duration::from_secs(10), || ready.exists()).await,
        "the job's child never set its trap"
    );
    let out = cluster.ctl_output(&["stop", &job]).await;
    assert!(out.status.success(), "{out:?}");
    until(Duration::from_secs(10), "the job stopped", || async {
        cluster.job(&job).await.done
    })
    .await;
    assert_eq!(cluster.job(&job).await.state, "stopped");
    let out = cluster.ctl_output(&["logs", &job]).await;
    // (Bash may say first that the `sleep` it waited for was terminated.)
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        log.ends_with("child cleaned up\n"),
        "the child's clean-up was cut short: {log:?}"
    );
    assert!(job_processes(&job).is_empty(), "{:?}", job_processes(&job));
}

/// A job's main process that clones a sibling (`clone(CLONE_PARENT)`, which
/// any process may) gives it workerd's thread that spawned the job as its
/// parent: neither below the job's main process nor an orphan of workerd's
/// main thread. Out of the job's group and session too, it is still the
/// job's, and ends with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_sibling_a_job_clones_beside_its_main_process_ends_with_the_job() {
    let cluster = Cluster::start(&["w1"]).await;
    let script = r#"command -v python3 >/dev/null || { echo "no python3"; exit 0; }
exec python3 -c '
import ctypes, os
clone = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)
if clone is None:
    print("no clone number for", os.uname().machine)
    raise SystemExit
libc = ctypes.CDLL(None, use_errno=True)
CLONE_PARENT, SIGCHLD = 0x8000, 17
pid = libc.syscall(clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    os.setsid()
    os.execvp("sleep", ["sleep", "300"])
print("sibling", pid, "errno", ctypes.get_errno(), flush=True)
'
"#;
    std::fs::write(cluster.tmp.path().join("scripts/sibling.sh"), script).unwrap();

    let job = cluster.start_job("w1", "sibling.sh", &[]).await;
    let _left = KillLeft(job.clone());
    until(Duration::from_secs(15), "the job succeeded", || async {
        cluster.job(&job).await.state == "succeeded"
    })
    .await;
    let out = cluster.ctl_output(&["logs", &job]).await;
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    if log.starts_with("no ") {
        eprintln!("skipped: the job cannot clone here ({})", log.trim());
        return;
    }
    assert!(
        log.starts_with("sibling ") && !log.starts_with("sibling -1"),
        "the job could not clone its sibling: {log}"
    );
    assert!(
        eventually(Duration::from_secs(10), || job_processes(&job).is_empty()).await,
        "the sibling the job cloned lives on: {:?}",
        job_processes(&job)
    );
}

/// Kills what is left of a job when a test ends, passed or failed: not
/// left behind for minutes by a failure.
struct KillLeft(String);

impl Drop for KillLeft {
    fn drop(&mut self) {
        for pid in job_processes(&self.0) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

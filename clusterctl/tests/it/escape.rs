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

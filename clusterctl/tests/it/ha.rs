//! Schedulers on PostgreSQL (issue 14): the store shared by several
//! schedulers, through the real binaries and a throwaway PostgreSQL.

use crate::cluster::{Cluster, stdout};

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
    cluster.restart_scheduler(nix::sys::signal::Signal::SIGTERM);
    let again = ctl_ok(&cluster, &["-o", "json", "jobs"]).await;
    assert_eq!(listed, again);
}

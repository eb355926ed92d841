//! Output-path throughput of the real workerd: a job writes N MiB as fast as
//! it can; we measure how long the job takes (pipe -> log file) and how fast
//! one and then four concurrent followers receive the bytes over gRPC+mTLS.
//!
//! Run: `cargo bench -p jobcluster-workerd --bench output [-- MIB]` (default 512).

#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
#[path = "../tests/it/harness.rs"]
mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{Daemon, Pki};
use jobcluster_pki::Role;
use jobcluster_proto::pb::worker_client::WorkerClient;
use jobcluster_proto::pb::{StartJobRequest, StreamJobRequest};
use tonic::transport::Channel;

async fn drain(mut client: WorkerClient<Channel>, job_id: String) -> u64 {
    let mut stream = client
        .stream_job(StreamJobRequest {
            job_id,
            offset: 0,
            follow: Some(true),
        })
        .await
        .unwrap()
        .into_inner();
    let mut total = 0u64;
    while let Some(msg) = stream.message().await.unwrap() {
        total += msg.output.len() as u64;
        if msg.final_status.is_some() {
            break;
        }
    }
    total
}

fn rate(bytes: u64, elapsed: Duration) -> String {
    format!(
        "{:.0} MiB/s",
        bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
    )
}

#[tokio::main]
async fn main() {
    jobcluster_pki::install_crypto_provider();
    let mib: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(512);
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    pki.issue(Role::Worker, "w1");
    let scripts = tmp.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(scripts.join("blast.sh"), "head -c \"$1\" /dev/zero\n").unwrap();
    // A root workerd runs jobs as nobody, who must reach the script.
    for dir in [tmp.path(), scripts.as_path()] {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let config = tmp.path().join("w.toml");
    std::fs::write(
        &config,
        "[grpc_server]\naddr = \"127.0.0.1:0\"\ncrt_file = \"pki/w1.pem\"\nkey_file = \"pki/w1-key.pem\"\nca_file = \"pki/ca.pem\"\n[worker]\nname = \"w1\"\nscripts_dir = \"scripts\"\nstate_dir = \"state\"\n[plugins.bash]\nrunner = \"bash\"\nmax_output_bytes = 0\n",
    )
    .unwrap();
    let daemon = Daemon::spawn(
        Path::new(env!("CARGO_BIN_EXE_workerd")),
        &["--config", config.to_str().unwrap()],
    );
    let tls = jobcluster_pki::client_config(
        &pki.roots(),
        Some(&pki.identity(Role::Scheduler, "scheduler")),
        &[b"h2"],
    )
    .unwrap();
    let channel =
        jobcluster_proto::transport::tls_channel(&daemon.addr, tls, Duration::from_secs(5))
            .unwrap();
    let mut client = WorkerClient::new(channel);
    let bytes = mib << 20;
    println!("output path, {mib} MiB per job");

    for followers in [1usize, 4] {
        let started = Instant::now();
        let job_id = client
            .start_job(StartJobRequest {
                command: "bash".into(),
                path: "blast.sh".into(),
                args: vec![bytes.to_string()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let tasks: Vec<_> = (0..followers)
            .map(|_| tokio::spawn(drain(client.clone(), job_id.clone())))
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), bytes);
        }
        let elapsed = started.elapsed();
        println!(
            "  {followers} live follower(s): job start to last byte at every follower {:.2?} ({} per follower)",
            elapsed,
            rate(bytes, elapsed)
        );
    }
    // A finished job's log read back from disk by a late follower.
    let job_id = client
        .start_job(StartJobRequest {
            command: "bash".into(),
            path: "blast.sh".into(),
            args: vec![bytes.to_string()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    drain(client.clone(), job_id.clone()).await;
    let started = Instant::now();
    assert_eq!(drain(client.clone(), job_id).await, bytes);
    println!(
        "  replay of a finished job's log: {}",
        rate(bytes, started.elapsed())
    );
    drop(daemon);
}

//! A whole cluster in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use jobcluster_proto::http::{WorkerInfo, WorkerList};

use crate::harness::{Daemon, eventually};

pub fn bin(name: &str) -> PathBuf {
    let ctl = PathBuf::from(env!("CARGO_BIN_EXE_clusterctl"));
    let path = ctl.with_file_name(name);
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
}

impl Cluster {
    pub fn pki(&self) -> PathBuf {
        self.tmp.path().join("pki")
    }

    /// A scheduler and one worker per name, all registered.
    pub async fn start(worker_names: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let pki = tmp.path().join("pki");
        run_ok(&["pki", "init", pki.to_str().unwrap()]);
        let scripts = tmp.path().join("scripts");
        std::fs::create_dir_all(&scripts).unwrap();
        let repo_scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
        for name in ["count.sh", "count.py", "fail.sh"] {
            std::fs::copy(repo_scripts.join(name), scripts.join(name)).unwrap();
        }
        std::fs::write(tmp.path().join("scheduler.toml"), SCHEDULER_CONFIG).unwrap();
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
        };
        for name in worker_names {
            cluster.add_worker(name);
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

    /// Issues a certificate for `name` and starts a worker with it.
    pub fn add_worker(&mut self, name: &str) {
        let pki = self.pki();
        run_ok(&[
            "pki",
            "issue",
            pki.to_str().unwrap(),
            "--role",
            "worker",
            name,
        ]);
        let config = self.write_worker_config(
            name,
            &format!("pki/{name}.pem"),
            &format!("pki/{name}-key.pem"),
        );
        let daemon = Daemon::spawn(&bin("workerd"), &["--config", config.to_str().unwrap()]);
        self.workers.push((name.to_owned(), daemon));
    }

    pub fn write_worker_config(&self, name: &str, crt: &str, key: &str) -> PathBuf {
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
addr = "{grpc}"

[worker]
name = "{name}"
scripts_dir = "scripts"
state_dir = "state/{name}"

[plugins.bash]
runner = "bash"
stop_grace = "2s"

[plugins.python]
runner = "python"
"#,
                grpc = self.grpc_addr
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

    /// `clusterctl` with the scheduler URL and client certificate in its environment.
    pub fn ctl(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin("clusterctl"));
        let pki = self.pki();
        cmd.env("CLUSTERCTL_SCHEDULER", self.url())
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

const SCHEDULER_CONFIG: &str = r#"
[grpc_server]
addr = "127.0.0.1:0"
crt_file = "pki/scheduler.pem"
key_file = "pki/scheduler-key.pem"
ca_file = "pki/ca.pem"

[http_server]
addr = "127.0.0.1:0"

[store]
path = "state/scheduler.db"
"#;

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

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

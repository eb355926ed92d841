//! A small harness for the real binaries: a PKI minted per test, daemons
//! spawned on ephemeral loopback ports and killed on drop, readiness taken
//! from the address the daemon logs, never from a sleep.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use jobcluster_pki::{CertificateAuthority, Identity, Role, Roots};

/// A CA and its files in a temporary directory.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: CertificateAuthority,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        Pki {
            dir: dir.to_owned(),
            ca,
        }
    }

    /// Writes NAME.pem and NAME-key.pem; returns their paths.
    pub fn issue(&self, role: Role, name: &str) -> (PathBuf, PathBuf) {
        let issued = self.ca.issue(role, name, &[]).unwrap();
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        (cert, key)
    }

    pub fn identity(&self, role: Role, name: &str) -> Identity {
        let issued = self.ca.issue(role, name, &[]).unwrap();
        Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
    }

    pub fn roots(&self) -> Roots {
        Roots::from_pem(self.ca.cert_pem().as_bytes()).unwrap()
    }
}

/// A spawned daemon, killed when dropped. Its stderr is kept for failure
/// messages.
pub struct Daemon {
    pub child: Child,
    /// The first address it logged (its gRPC server).
    pub addr: String,
    /// Every `<kind> server listening addr=...` it logged, by kind.
    pub addrs: HashMap<String, String>,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Spawns `bin args` and waits until it logs `grpc server listening addr=HOST:PORT`.
    pub fn spawn(bin: &Path, args: &[&str]) -> Self {
        Self::spawn_with(bin, args, &["grpc"], &[])
    }

    /// Spawns `bin args` with extra environment and waits until it has
    /// logged `<kind> server listening addr=...` for every kind in `kinds`.
    pub fn spawn_with(bin: &Path, args: &[&str], kinds: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((head, tail)) = line.split_once(" server listening addr=") {
                    let kind = head.rsplit(' ').next().unwrap_or_default().to_owned();
                    let addr = tail
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send((kind, addr));
                } else if let Some(listening) = json_listening(&line) {
                    // `--log-format json`
                    let _ = tx.send(listening);
                }
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut addrs = HashMap::new();
        while !kinds.iter().all(|k| addrs.contains_key(*k)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((kind, addr)) => {
                    addrs.insert(kind, addr);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{} never logged its addresses:\n{}",
                        bin.display(),
                        log.lock().unwrap()
                    );
                }
            }
        }
        let addr = addrs.get(kinds[0]).cloned().unwrap_or_default();
        Daemon {
            child,
            addr,
            addrs,
            log,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the daemon has logged `needle` more than `after` times
    /// (at most 20 s).
    pub async fn wait_for_log(&self, needle: &str, after: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches(needle).count() <= after {
            assert!(
                Instant::now() < deadline,
                "never logged {needle:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `(kind, addr)` of a JSON log line `{"message":"<kind> server listening","addr":...}`.
fn json_listening(line: &str) -> Option<(String, String)> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    let kind = event["message"]
        .as_str()?
        .strip_suffix(" server listening")?;
    Some((kind.to_owned(), event["addr"].as_str()?.to_owned()))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    check()
}

/// Pids of live processes whose environment holds `JOB_ID=<job_id>`: every
/// process of a job, children included, carries it.
pub fn job_processes(job_id: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // Zombies are gone but for their entry. A process whose main thread
        // ended alone shows as one too, with more than one thread.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let (state, threads) = (fields.first().copied(), fields.get(17).copied());
        if state == Some("Z") && threads.is_none_or(|t| t == "1") {
            continue;
        }
        // Read from every thread (the main one may have ended) and a few
        // times: in an `execve` the environment reads empty for a moment.
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let environs: Vec<Vec<u8>> = std::fs::read_dir(entry.path().join("task"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|task| read_environment(&task.path().join("environ")))
                .collect();
            if environs.iter().any(|env| carries(env, job_id)) {
                pids.push(pid);
                break;
            }
            if environs.iter().all(|env| !env.is_empty()) {
                break;
            }
        }
    }
    pids
}

/// A process's environment in one read (as workerd reads it): an `execve`
/// between two reads would cut it short.
fn read_environment(path: &std::path::Path) -> Option<Vec<u8>> {
    use std::io::Read;
    // The tests' environments are a few KiB.
    let mut buf = vec![0u8; 64 << 10];
    let len = std::fs::File::open(path).ok()?.read(&mut buf).ok()?;
    buf.truncate(len);
    Some(buf)
}

/// Whether an environment holds `JOB_ID=<job_id>`, or `JOB_ID` and the id
/// as two entries (bash, importing its environment, overwrites each `=`
/// with a NUL for a moment).
fn carries(environ: &[u8], job_id: &str) -> bool {
    let needle = format!("JOB_ID={job_id}");
    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    vars.contains(&needle.as_bytes())
        || vars
            .windows(2)
            .any(|w| w[0] == b"JOB_ID" && w[1] == job_id.as_bytes())
}

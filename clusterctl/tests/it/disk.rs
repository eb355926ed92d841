//! Faulty disks: a worker's `state_dir` that fills while a job writes, a
//! start on a full worker, and a scheduler whose store fills (each disk a
//! small tmpfs), and a disk that stalls under a job's last output (a loop
//! device): these need root, and without it say so and pass. A scheduler
//! whose disk fails its syncs needs no root but a C compiler (`cc`) for its
//! preload library; without one it says so and passes.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jobcluster_proto::http::{ErrorBody, JobStarted};
use nix::sys::signal::Signal;
use reqwest::StatusCode;

use crate::cluster::{Cluster, stderr};
use crate::faults::{Witness, until};
use crate::harness::job_processes;

/// A tmpfs of a fixed size, unmounted when dropped (a failing test too).
/// Declare it before the cluster that uses it: the cluster's daemons must
/// be gone, their files closed, when it is unmounted.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it), or says
    /// why the test is skipped and returns `None`.
    fn mount(size: &str) -> Option<Tmpfs> {
        let uid = nix::unistd::geteuid();
        if !uid.is_root() {
            eprintln!("skipping: needs root to mount a tmpfs (running as uid {uid})");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(Tmpfs { dir }),
            Ok(out) => {
                eprintln!(
                    "skipping: needs root to mount a tmpfs (mount failed: {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("skipping: needs root to mount a tmpfs (cannot run mount: {error})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the filesystem has no byte left; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(self.dir.path());
    }
}

/// Unmounts `path`; if something still holds a file there, detaches it,
/// so that a mount never outlives its test.
fn unmount(path: &Path) {
    let unmounted = Command::new("umount")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    if !unmounted {
        let _ = Command::new("umount").arg("-l").arg(path).status();
    }
}

/// An ext4 image on a loop device, mounted: a disk that `fsfreeze` can
/// stall (every write to it then waits until it is thawed). Unmounted
/// when dropped; declare it before the cluster that uses it, and its
/// [`Frozen`] after, so that it is thawed before the daemons are stopped.
struct LoopDisk {
    dir: tempfile::TempDir,
    _image: tempfile::TempDir,
}

impl LoopDisk {
    /// Mounts a fresh 64 MiB ext4 image, or says why the test is skipped
    /// and returns `None`.
    fn mount() -> Option<LoopDisk> {
        let uid = nix::unistd::geteuid();
        if !uid.is_root() {
            eprintln!("skipping: needs root to mount a loop device (running as uid {uid})");
            return None;
        }
        let image_dir = tempfile::tempdir().unwrap();
        let image = image_dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let run = |program: &str, args: &[&std::ffi::OsStr]| match Command::new(program)
            .args(args)
            .output()
        {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            Err(error) => Err(error.to_string()),
        };
        let made = run(
            "mkfs.ext4",
            &["-q".as_ref(), "-F".as_ref(), image.as_os_str()],
        )
        .and_then(|()| {
            run(
                "mount",
                &[
                    "-o".as_ref(),
                    "loop".as_ref(),
                    image.as_os_str(),
                    dir.path().as_os_str(),
                ],
            )
        });
        match made {
            Ok(()) => Some(LoopDisk {
                dir,
                _image: image_dir,
            }),
            Err(why) => {
                eprintln!("skipping: needs an ext4 image mounted on a loop device ({why})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Stalls every write to the disk until the guard is dropped.
    fn freeze(&self) -> Frozen<'_> {
        let frozen = Command::new("fsfreeze")
            .arg("--freeze")
            .arg(self.path())
            .status()
            .unwrap();
        assert!(
            frozen.success(),
            "fsfreeze --freeze {}",
            self.path().display()
        );
        Frozen(self)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        unmount(self.dir.path());
    }
}

/// A [`LoopDisk`] frozen; thawed when dropped (a failing test too).
struct Frozen<'a>(&'a LoopDisk);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(self.0.path())
            .status();
    }
}

/// Starts `count.sh 3 0` on w1 and checks it succeeds with all its output:
/// the worker's disk takes a job again. Its id.
async fn runs_on_w1(cluster: &Cluster, witness: &Witness) -> String {
    let again = cluster.start_job("w1", "count.sh", &["3", "0"]).await;
    until(Duration::from_secs(10), "job on w1 done", || async {
        witness.job(cluster, &again).await.done
    })
    .await;
    assert_eq!(witness.job(cluster, &again).await.state, "succeeded");
    let out = cluster.ctl_output(&["logs", &again]).await;
    assert_eq!(out.stdout, b"1\n2\n3\ndone\n");
    again
}

/// The job directories in `state_dir/jobs`.
fn job_dirs(state_dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(state_dir.join("jobs")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => panic!("reading {}: {e}", state_dir.display()),
    }
}

/// Pids of live processes working in `dir`: every job process starts in
/// its script's directory, which is unique to a test's cluster.
fn processes_in(dir: &Path) -> Vec<u32> {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .collect()
}

/// `POST /v1/jobs` with `body`: the status, and the answer (a started job
/// or an error).
async fn post_job(
    cluster: &Cluster,
    body: serde_json::Value,
) -> (StatusCode, Result<JobStarted, ErrorBody>) {
    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs", cluster.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = reply.status();
    let text = reply.bytes().await.unwrap();
    let answer = if status.is_success() {
        Ok(serde_json::from_slice(&text).unwrap())
    } else {
        Err(serde_json::from_slice(&text)
            .unwrap_or_else(|e| panic!("{status}: {e}: {}", String::from_utf8_lossy(&text))))
    };
    (status, answer)
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_a_job_that_fills_its_workers_disk_fails_for_good() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let mut cluster = Cluster::start(&[]).await;
    cluster.add_worker_in("w1", disk.path());
    cluster.wait_ready("w1").await;
    // About 20 MB in pieces, so that followers attach while it writes.
    cluster.add_script(
        "big.sh",
        "for i in $(seq 80); do head -c 262144 /dev/urandom; sleep 0.02; done\n",
    );
    let witness = Witness::default();

    let run = cluster
        .ctl()
        .args(["run", "--worker", "w1", "big.sh"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Attached once the worker has the job (a start still in flight reads
    // `unknown` and its worker does not know it yet).
    let id = loop {
        if let Some(job) = witness.jobs(&cluster).await.first()
            && job.state != "unknown"
        {
            break job.job_id.clone();
        }
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let live_follower = cluster
        .ctl()
        .args(["logs", "-f", &id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = run.wait_with_output().await.unwrap();
    let live_follower = live_follower.wait_with_output().await.unwrap();
    assert_eq!(witness.jobs(&cluster).await.len(), 1);
    assert!(
        run.status.code().is_some_and(|c| c != 0),
        "run exits non-zero: {:?} {}",
        run.status,
        stderr(&run)
    );
    assert!(
        live_follower.status.code().is_some_and(|c| c != 0),
        "logs -f exits non-zero: {:?} {}",
        live_follower.status,
        stderr(&live_follower)
    );
    let job = witness.job(&cluster, &id).await;
    assert_eq!(job.state, "failed", "{job:?}");
    assert!(job.done && job.error, "{job:?}");
    assert!(
        job.error_text.contains("No space left on device"),
        "names the cause: {}",
        job.error_text
    );
    assert!(
        job.error_text
            .contains(&format!("first {} bytes", job.output_bytes)),
        "says how many bytes were kept: {}",
        job.error_text
    );
    assert!(
        job.output_bytes > 0 && job.output_bytes < 4 << 20,
        "{}",
        job.output_bytes
    );
    let on_disk = std::fs::read(disk.path().join("jobs").join(&id).join("output.log")).unwrap();
    assert_eq!(on_disk.len() as u64, job.output_bytes);
    let logs = cluster.ctl_output(&["logs", &id]).await;
    assert!(logs.status.success(), "{}", stderr(&logs));
    assert_eq!(logs.stdout.len() as u64, job.output_bytes);
    assert!(logs.stdout == on_disk, "logs gives the kept bytes");
    assert!(run.stdout == on_disk, "run printed the kept bytes");
    assert!(
        live_follower.stdout == on_disk,
        "logs -f printed the kept bytes"
    );
    let follow = cluster.ctl_output(&["logs", "-f", &id]).await;
    assert!(
        follow.status.code().is_some_and(|c| c != 0),
        "logs -f exits non-zero: {:?} {}",
        follow.status,
        stderr(&follow)
    );
    assert!(follow.stdout == on_disk);
    assert!(
        job_processes(&id).is_empty(),
        "no process of the job is left"
    );

    let fields = |j: &jobcluster_proto::http::JobInfo| {
        (
            j.state.clone(),
            j.error_text.clone(),
            j.exit_code,
            j.signal,
            j.output_bytes,
        )
    };
    let before = fields(&job);
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        cluster.worker("w1").signal(signal);
        cluster.worker("w1").wait(Duration::from_secs(20));
        // Past lost_after (3 s in the test cluster) without its worker:
        // a final state stays what it was.
        let away = Instant::now();
        while away.elapsed() < Duration::from_secs(4) {
            assert_eq!(fields(&witness.job(&cluster, &id).await), before);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster.restart_worker_registered("w1").await;
        for _ in 0..10 {
            assert_eq!(
                fields(&witness.job(&cluster, &id).await),
                before,
                "after {signal}"
            );
            witness.jobs(&cluster).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The worker's own record agrees, and it never reported otherwise.
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(disk.path().join("jobs").join(&id).join("job.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(record["state"], "failed", "after {signal}: {record}");
        assert!(
            !cluster.scheduler.log().contains("disagrees"),
            "after {signal}:\n{}",
            cluster.scheduler.log()
        );
        assert!(job_processes(&id).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_a_start_on_a_full_worker_is_refused_and_placed_elsewhere() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let mut cluster = Cluster::start(&["w2"]).await;
    cluster.add_worker_in("w1", disk.path());
    cluster.wait_ready("w1").await;
    let w2_id = cluster.worker_info("w2").await.worker_id;
    let scripts = cluster.tmp.path().join("scripts");
    let witness = Witness::default();

    let first = cluster.start_job("w1", "count.sh", &["2", "0"]).await;
    let job = witness
        .ended(&cluster, &first, Duration::from_secs(10))
        .await;
    assert_eq!(job.state, "succeeded");
    // The worker answers with a job's final state while it writes it
    // (into the space reserved for it, then trimmed): filling the disk
    // before that ends would leave the freed pages to the next start.
    let reserved = disk.path().join("jobs").join(&first).join("job.json.final");
    until(
        Duration::from_secs(10),
        "first job's record written",
        || async { !reserved.exists() },
    )
    .await;

    // Nearly full rather than full: two pages free, fewer than a new job's
    // directory, log reservation and record take (a spare directory made
    // ahead would need only one of them).
    let slack = disk.path().join("slack");
    std::fs::write(&slack, vec![0u8; 8192]).unwrap();
    let filler = disk.fill();
    std::fs::remove_file(&slack).unwrap();
    let dirs = job_dirs(disk.path());
    let refused_before = cluster.worker("w1").log().matches("job refused").count();
    for _ in 0..3 {
        let (status, answer) = post_job(
            &cluster,
            serde_json::json!({"worker_id": "w1", "path": "count.sh", "args": ["1000", "0.05"]}),
        )
        .await;
        let error = answer.expect_err("refused");
        assert_eq!(
            (status, error.code.as_str()),
            (StatusCode::INSUFFICIENT_STORAGE, "worker_storage_full"),
            "{}",
            error.error
        );
    }
    assert_eq!(job_dirs(disk.path()), dirs, "nothing left behind");
    assert_eq!(processes_in(&scripts), Vec::<u32>::new(), "nothing started");

    // Placed starts go to w2; at least the ones that tried w1 first were
    // refused there.
    let mut placed = Vec::new();
    for _ in 0..4 {
        let (status, answer) = post_job(
            &cluster,
            serde_json::json!({"path": "count.sh", "args": ["1", "0"]}),
        )
        .await;
        let started = answer.unwrap_or_else(|e| panic!("{status}: {e:?}"));
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(started.worker_id, w2_id, "placed on the worker with room");
        placed.push(started.job_id);
    }
    let refused = cluster.worker("w1").log().matches("job refused").count() - refused_before;
    assert!(refused >= 4, "w1 was asked and refused: {refused}");
    assert_eq!(job_dirs(disk.path()), dirs, "nothing left behind");
    for id in &placed {
        until(Duration::from_secs(10), "placed job done", || async {
            witness.job(&cluster, id).await.done
        })
        .await;
        assert_eq!(witness.job(&cluster, id).await.state, "succeeded");
    }
    // The refused starts left no record either.
    let recorded: BTreeSet<String> = witness
        .jobs(&cluster)
        .await
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    let expected: BTreeSet<String> = placed.iter().cloned().chain([first.clone()]).collect();
    assert_eq!(recorded, expected);

    std::fs::remove_file(filler).unwrap();
    let again = runs_on_w1(&cluster, &witness).await;
    assert_eq!(
        job_dirs(disk.path()),
        dirs.iter().cloned().chain([again.clone()]).collect()
    );
    witness.jobs(&cluster).await;
}

/// Retention frees a full disk: the record that says a job's output went
/// needs a block of its own, which a full disk does not have, so the sweep
/// failed for every job, freed nothing, and the worker refused every start
/// until an operator came. The log is now emptied first.
#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_retention_frees_a_full_disk() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let mut cluster = Cluster::start(&[]).await;
    cluster.add_worker_in_with("w1", disk.path(), "[retention]\nmax_bytes = 65536\n");
    cluster.wait_ready("w1").await;
    cluster.add_script("big.sh", "head -c 8000000 /dev/zero\n");
    let witness = Witness::default();
    let big = cluster.start_job("w1", "big.sh", &[]).await;
    until(Duration::from_secs(20), "the filling job done", || async {
        witness.job(&cluster, &big).await.done
    })
    .await;
    // Every block taken (the job's final record may have left a few),
    // before the sweep that follows a job's end (5 s after it).
    disk.fill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster
        .worker("w1")
        .log()
        .contains("job output deleted by retention")
    {
        assert!(
            Instant::now() < deadline,
            "output never deleted: {}",
            cluster.worker("w1").log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cluster.ctl_output(&["logs", &big]).await;
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));

    runs_on_w1(&cluster, &witness).await;
    assert!(
        !cluster
            .worker("w1")
            .log()
            .contains("could not delete expired output"),
        "{}",
        cluster.worker("w1").log()
    );
    witness.jobs(&cluster).await;
}

/// A queued job goes to a worker with a free slot, not again and again to
/// one whose disk is full: that one, running the fewest jobs, was every
/// dispatcher pass's first choice, refused the job each time, and the job
/// stayed queued for as long as the other worker's long job ran.
#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_a_queued_job_goes_past_a_worker_whose_disk_is_full() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let mut cluster = Cluster::start_with(&["w2"], "", "max_jobs = 2\n---\n").await;
    cluster.add_worker_in("w1", disk.path());
    cluster.wait_ready("w1").await;
    let w2_id = cluster.worker_info("w2").await.worker_id;
    let witness = Witness::default();
    disk.fill();

    // w2's two slots: one for the whole test, one for two seconds.
    let long = cluster.start_job("w2", "count.sh", &["600", "0.1"]).await;
    let short = cluster.start_job("w2", "count.sh", &["2", "1"]).await;
    let (status, answer) = post_job(
        &cluster,
        serde_json::json!({"path": "count.sh", "args": ["1", "0"]}),
    )
    .await;
    let queued = answer.unwrap_or_else(|e| panic!("{status}: {e:?}"));
    assert_eq!(status, StatusCode::ACCEPTED, "w1 refused it, w2 is full");

    until(Duration::from_secs(15), "short job done", || async {
        witness.job(&cluster, &short).await.done
    })
    .await;
    until(
        Duration::from_secs(15),
        "queued job started on w2's free slot",
        || async { witness.job(&cluster, &queued.job_id).await.state != "queued" },
    )
    .await;
    let job = witness.job(&cluster, &queued.job_id).await;
    assert_eq!(job.worker_id, w2_id, "{job:?}");
    until(Duration::from_secs(10), "queued job done", || async {
        witness.job(&cluster, &queued.job_id).await.done
    })
    .await;
    assert_eq!(
        witness.job(&cluster, &queued.job_id).await.state,
        "succeeded"
    );
    assert!(
        !witness.job(&cluster, &long).await.done,
        "the slot it took was the short job's"
    );
    let refused = cluster.worker("w1").log().matches("job refused").count();
    assert!(
        refused <= 2,
        "w1 was asked {refused} times: {}",
        cluster.scheduler.log()
    );
    let out = cluster.ctl_output(&["stop", &long]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    witness.jobs(&cluster).await;
}

/// A job deep in the queue (past the first 1,000 waiting) starts once the
/// worker that refused it for its full disk may be asked again, though
/// nothing wakes the dispatcher then: only woken passes read that far, so
/// the job waited for some unrelated event, however long its slot was free.
#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_a_job_deep_in_the_queue_starts_once_its_workers_disk_is_freed() {
    use futures_util::StreamExt;
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let mut cluster = Cluster::start(&[]).await;
    cluster.add_worker_with("wgpu", "max_jobs = 1\nlabels = { kind = \"gpu\" }\n---\n");
    cluster.add_worker_in_with(
        "wcpu",
        disk.path(),
        "max_jobs = 1\nlabels = { kind = \"cpu\" }\n---\n",
    );
    for name in ["wgpu", "wcpu"] {
        cluster.wait_ready(name).await;
    }
    let witness = Witness::default();
    let blocker = cluster.start_job("wgpu", "count.sh", &["600", "0.1"]).await;
    let queued: Vec<StatusCode> = futures_util::stream::iter(0..1050)
        .map(|_| {
            post_job(
                &cluster,
                serde_json::json!({"path": "count.sh", "args": ["1", "0"], "selector": {"kind": "gpu"}}),
            )
        })
        .buffer_unordered(16)
        .map(|(status, _)| status)
        .collect()
        .await;
    assert!(queued.iter().all(|s| *s == StatusCode::ACCEPTED));

    let filler = disk.fill();
    let (status, answer) = post_job(
        &cluster,
        serde_json::json!({"path": "count.sh", "args": ["1", "0"], "selector": {"kind": "cpu"}}),
    )
    .await;
    let deep = answer.unwrap_or_else(|e| panic!("{status}: {e:?}"));
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "wcpu refused it: its disk is full"
    );
    std::fs::remove_file(filler).unwrap();

    // The refusal's backoff (10 s), then a tick that reads past the head.
    until(Duration::from_secs(40), "the deep job done", || async {
        witness.job(&cluster, &deep.job_id).await.done
    })
    .await;
    let job = witness.job(&cluster, &deep.job_id).await;
    assert_eq!(job.state, "succeeded", "{job:?}");
    assert_eq!(job.worker_id, cluster.worker_info("wcpu").await.worker_id);
    assert!(!witness.job(&cluster, &blocker).await.done);
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_a_full_store_starts_nothing_without_a_record() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let cluster = Cluster::start_with_store(&["w1"], disk.path()).await;
    let state_dir = cluster.tmp.path().join("state").join("w1");
    let scripts = cluster.tmp.path().join("scripts");
    let witness = Witness::default();

    let mut earlier = Vec::new();
    for _ in 0..3 {
        earlier.push(cluster.start_job("w1", "count.sh", &["2", "0"]).await);
    }
    for id in &earlier {
        until(Duration::from_secs(10), "earlier job done", || async {
            witness.job(&cluster, id).await.done
        })
        .await;
    }

    // One job ends while the store is full: its end is recorded later.
    let ending = cluster.start_job("w1", "count.sh", &["20", "0.1"]).await;

    let filler = disk.fill();
    let dirs = job_dirs(&state_dir);
    let mut started = Vec::new();
    let mut refused = 0;
    for _ in 0..15 {
        let (status, answer) = post_job(
            &cluster,
            serde_json::json!({"worker_id": "w1", "path": "count.sh", "args": ["20", "0.1"]}),
        )
        .await;
        match answer {
            // SQLite may still fit a small write into free pages of its
            // log; then the job has its record, which is all that counts.
            Ok(job) => {
                assert_eq!(status, StatusCode::CREATED);
                started.push(job.job_id);
            }
            Err(error) => {
                assert_eq!(
                    (status, error.code.as_str()),
                    (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
                    "{}",
                    error.error
                );
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "the full store refused no start ({} started):\n{}",
        started.len(),
        cluster.scheduler.log()
    );
    // No job runs without a record: the worker holds exactly the jobs
    // whose start was answered 201, and runs no other process.
    let new: BTreeSet<String> = job_dirs(&state_dir).difference(&dirs).cloned().collect();
    assert_eq!(new, started.iter().cloned().collect::<BTreeSet<_>>());
    for pid in processes_in(&scripts) {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let environ = String::from_utf8_lossy(&environ);
        assert!(
            started
                .iter()
                .chain([&ending])
                .any(|id| environ.contains(&format!("JOB_ID={id}"))),
            "process {pid} belongs to no started job"
        );
    }

    // What was recorded stays readable while nothing can be written.
    let listed: BTreeSet<String> = witness
        .jobs(&cluster)
        .await
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(
        listed,
        earlier
            .iter()
            .chain(&started)
            .chain([&ending])
            .cloned()
            .collect::<BTreeSet<_>>()
    );
    // The job ends on its worker, but its end cannot be stored: the API
    // shows the stored record, stale, never an end it could not keep.
    until(
        Duration::from_secs(10),
        "the running job answered stale",
        || async {
            let job = witness.job(&cluster, &ending).await;
            assert!(!job.done, "an end shown that was never stored: {job:?}");
            job.stale
        },
    )
    .await;
    for id in &earlier {
        assert_eq!(witness.job(&cluster, id).await.state, "succeeded");
    }
    std::fs::remove_file(filler).unwrap();
    let after = cluster.start_job("w1", "count.sh", &["2", "0"]).await;
    let all: Vec<String> = earlier
        .iter()
        .chain(&started)
        .chain([&ending, &after])
        .cloned()
        .collect();
    for id in &all {
        until(Duration::from_secs(20), "job done", || async {
            witness.job(&cluster, id).await.done
        })
        .await;
        assert_eq!(witness.job(&cluster, id).await.state, "succeeded", "{id}");
    }
    let listed: BTreeSet<String> = witness
        .jobs(&cluster)
        .await
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(listed, all.iter().cloned().collect::<BTreeSet<_>>());
    for id in job_dirs(&state_dir) {
        assert!(listed.contains(&id), "job {id} on the worker has a record");
    }
    let ended = witness.job(&cluster, &ending).await;
    assert_eq!(
        (ended.exit_code, ended.stale),
        (Some(0), false),
        "{ended:?}"
    );
}

/// An anonymous `GET` of the health route `path`: its status and body.
async fn probe(cluster: &Cluster, path: &str) -> (StatusCode, String) {
    let reply = cluster
        .http_as(None)
        .get(format!("{}{path}", cluster.url()))
        .send()
        .await
        .unwrap();
    (reply.status(), reply.text().await.unwrap())
}

/// Waits until `/readyz` says `not ready` (`what` names the wait), then
/// checks that `/healthz` still says `ok`: a scheduler whose store takes
/// no write is taken out of rotation, not restarted by its supervisor.
async fn not_ready_but_alive(cluster: &Cluster, what: &str) {
    until(Duration::from_secs(20), what, || async {
        probe(cluster, "/readyz").await
            == (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
    })
    .await;
    assert_eq!(
        probe(cluster, "/healthz").await,
        (StatusCode::OK, "ok\n".to_owned())
    );
}

/// `/readyz` (anonymous) says `not ready` while the store takes no write,
/// and `ok` again once it has room; `/healthz` says `ok` throughout.
#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_readyz_follows_whether_the_store_takes_a_write() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let cluster = Cluster::start_with_store(&[], disk.path()).await;
    assert_eq!(
        probe(&cluster, "/readyz").await,
        (StatusCode::OK, "ok\n".to_owned())
    );

    let filler = disk.fill();
    not_ready_but_alive(&cluster, "readyz 503 on a full store").await;

    std::fs::remove_file(filler).unwrap();
    until(
        Duration::from_secs(20),
        "readyz ok with room again",
        || async { probe(&cluster, "/readyz").await == (StatusCode::OK, "ok\n".to_owned()) },
    )
    .await;
}

/// A worker that registers while the store takes no write is refused and
/// not shown: the scheduler undoes a registration it could not record, so
/// the API never lists a worker its store does not hold. Once the store
/// has room the worker registers, and a restarted scheduler still knows it.
#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_a_registration_the_full_store_cannot_keep_is_not_shown() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let mut cluster = Cluster::start_with_store(&["w1"], disk.path()).await;
    let anonymous = cluster.http_as(None);
    let readyz = format!("{}/readyz", cluster.url());
    let filler = disk.fill();
    until(
        Duration::from_secs(20),
        "the store takes no write",
        || async {
            let reply = anonymous.get(&readyz).send().await.unwrap();
            reply.status() == StatusCode::SERVICE_UNAVAILABLE
        },
    )
    .await;

    cluster.add_worker_with("w2", "");
    cluster
        .worker("w2")
        .wait_for_log("scheduler registration failed", 0)
        .await;
    cluster
        .scheduler
        .wait_for_log("a registration the store could not record was undone", 0)
        .await;
    // No new attempt once it is gone; one still under way is undone too
    // (in its write's task, even if the call was dropped).
    cluster.worker("w2").signal(Signal::SIGKILL);
    cluster.worker("w2").wait(Duration::from_secs(20));
    until(Duration::from_secs(20), "w2 not shown", || async {
        cluster.worker_state("w2").await.is_empty()
    })
    .await;
    let names: Vec<String> = cluster
        .get_json::<jobcluster_proto::http::WorkerList>("/v1/workers")
        .await
        .workers
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["w1"]);

    std::fs::remove_file(filler).unwrap();
    cluster.restart_worker("w2");
    cluster.wait_ready("w2").await;
    let id = cluster.worker_info("w2").await.worker_id;
    cluster.restart_scheduler(Signal::SIGKILL);
    assert_eq!(cluster.worker_info("w2").await.worker_id, id);
}

/// A disk that stalls after a job ended, with its last output not yet
/// written: the job does not read succeeded with its output cut. Five
/// seconds after its end the worker records it failed, with the bytes the
/// log holds, and that record stands once the disk takes writes again:
/// the write that lands late adds nothing to its output, neither at once
/// nor after the worker restarts.
#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_a_disk_that_stalls_under_a_jobs_last_output_fails_the_job() {
    let Some(disk) = LoopDisk::mount() else {
        return;
    };
    // A worker whose disk stalls stops beating (it records what the
    // scheduler acknowledged before the next beat): not given up on here
    // before the disk is back.
    let mut cluster = Cluster::start_tuned(&[], &[("lost_after", "60s")]).await;
    cluster.add_worker_in("w1", disk.path());
    cluster.wait_ready("w1").await;
    // Its last output fits in the pipe, so the job ends whatever the pump
    // does with it.
    cluster.add_script(
        "stall.sh",
        &format!(
            "echo before\n{}head -c 10000 /dev/zero | tr '\\0' x\n",
            crate::cluster::WAIT_TO_GO
        ),
    );
    let witness = Witness::default();
    let id = cluster.start_job("w1", "stall.sh", &[]).await;
    until(
        Duration::from_secs(10),
        "the first line written",
        || async { witness.job(&cluster, &id).await.output_bytes == "before\n".len() as u64 },
    )
    .await;

    let frozen = disk.freeze();
    cluster.let_go();
    // Five seconds after the job's end, its pump is given up on.
    until(Duration::from_secs(20), "the pump given up on", || async {
        let log = cluster.workers[0].1.log();
        log.contains("writing the job's output stalled") || log.contains("output pipe still open")
    })
    .await;
    drop(frozen);

    let job = witness.ended(&cluster, &id, Duration::from_secs(20)).await;
    assert_eq!(job.state, "failed", "{job:?}");
    assert_eq!(job.exit_code, Some(0), "{job:?}");
    assert_eq!(job.output_bytes, "before\n".len() as u64, "{job:?}");
    assert!(
        job.error_text.contains("stalled")
            && job.error_text.contains("the first 7 bytes")
            && !job.error_text.contains("was stopped"),
        "{}",
        job.error_text
    );
    let log = disk.path().join("jobs").join(&id).join("output.log");
    for when in ["after the thaw", "after a restart"] {
        let logs = cluster.ctl_output(&["logs", &id]).await;
        assert!(logs.status.success(), "{when}: {}", stderr(&logs));
        assert_eq!(
            String::from_utf8_lossy(&logs.stdout[..logs.stdout.len().min(64)]),
            "before\n",
            "{when}: {} bytes",
            logs.stdout.len()
        );
        // The late write may have landed in the log: it is not output.
        let on_disk = std::fs::metadata(&log).unwrap().len();
        assert!(on_disk >= job.output_bytes, "{when}: {on_disk}");
        assert_eq!(witness.job(&cluster, &id).await.state, "failed", "{when}");
        if when == "after the thaw" {
            cluster.worker("w1").signal(Signal::SIGTERM);
            cluster.worker("w1").wait(Duration::from_secs(20));
            cluster.restart_worker_registered("w1").await;
        }
    }
}

/// A preload library that makes `fdatasync` and `fsync` of a file whose
/// name ends in `-wal` (the store's log) fail with `EIO` while the file
/// named by `JOBCLUSTER_FAIL_SYNC` exists: a disk that takes the write
/// into the page cache and then fails to keep it. (This kernel has no
/// device-mapper, whose `error` target would do it below the filesystem.)
const FAIL_SYNC_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int armed(int fd) {
    const char *flag = getenv("JOBCLUSTER_FAIL_SYNC");
    if (flag == NULL || access(flag, F_OK) != 0) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    return n > 4 && memcmp(path + n - 4, "-wal", 4) == 0;
}

/* The libc function `name`, unless the flag fails it. */
static int sync_unless_armed(int fd, const char *name) {
    if (armed(fd)) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, name);
    return real(fd);
}

int fdatasync(int fd) { return sync_unless_armed(fd, "fdatasync"); }
int fsync(int fd) { return sync_unless_armed(fd, "fsync"); }
"#;

/// Builds [`FAIL_SYNC_C`] in `dir`, or says why not.
fn fail_sync_library(dir: &Path) -> Option<PathBuf> {
    let source = dir.join("failsync.c");
    let library = dir.join("failsync.so");
    std::fs::write(&source, FAIL_SYNC_C).unwrap();
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output();
    match built {
        Ok(out) if out.status.success() => Some(library),
        Ok(out) => {
            eprintln!(
                "skipping: cc could not build the preload library: {}",
                stderr(&out)
            );
            None
        }
        Err(error) => {
            eprintln!("skipping: needs a C compiler (cc) for the preload library: {error}");
            None
        }
    }
}

/// A start whose record the scheduler cannot sync is refused before any
/// worker is asked (`store_unavailable`): no job runs that a power loss
/// could leave without a record. Once the scheduler runs again on a disk
/// that keeps its writes, jobs start again.
#[tokio::test(flavor = "multi_thread")]
async fn faults_disk_a_start_whose_record_cannot_be_synced_starts_nothing() {
    let build = tempfile::tempdir().unwrap();
    let Some(library) = fail_sync_library(build.path()) else {
        return;
    };
    // The log under test is SQLite's (PostgreSQL's commit is its sync).
    let mut cluster = Cluster::start_with_on_sqlite(&["w1"], "", "").await;
    let state_dir = cluster.tmp.path().join("state").join("w1");
    let scripts = cluster.tmp.path().join("scripts");
    cluster.add_script("hold.sh", "#!/bin/bash\nsleep 30\n");
    let flag = cluster.tmp.path().join("fail-sync");
    cluster.stop_scheduler(Signal::SIGTERM);
    cluster.start_scheduler_again_with(
        &[],
        &[
            ("LD_PRELOAD", library.to_str().unwrap()),
            ("JOBCLUSTER_FAIL_SYNC", flag.to_str().unwrap()),
        ],
    );
    cluster.wait_ready("w1").await;
    let witness = Witness::default();
    // A first start on the fresh log: SQLite syncs a log it starts anew
    // itself, and that sync is not the one under test.
    runs_on_w1(&cluster, &witness).await;
    let dirs = job_dirs(&state_dir);
    // Every sync so far went through: the first to fail is one made while
    // the flag is there.
    assert!(!cluster.scheduler.log().contains("could not be synced"));

    std::fs::write(&flag, b"").unwrap();
    for _ in 0..3 {
        let (status, answer) = post_job(
            &cluster,
            serde_json::json!({"worker_id": "w1", "path": "hold.sh"}),
        )
        .await;
        let error = match answer {
            Ok(job) => panic!("a start on a store that cannot sync answered {status}: {job:?}"),
            Err(error) => error,
        };
        assert_eq!(
            (status, error.code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            "{}",
            error.error
        );
    }
    // The worker was never asked: no job directory, no process.
    assert_eq!(job_dirs(&state_dir), dirs);
    assert_eq!(processes_in(&scripts), Vec::<u32>::new());
    cluster
        .scheduler
        .wait_for_log("could not be synced", 0)
        .await;
    // Nothing more is acknowledged, and a load balancer is told so; the
    // process stays alive for an operator to restart.
    not_ready_but_alive(&cluster, "readyz 503 once a sync failed").await;
    let listed = cluster
        .http()
        .get(format!("{}/v1/jobs", cluster.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::SERVICE_UNAVAILABLE);

    std::fs::remove_file(&flag).unwrap();
    cluster.stop_scheduler(Signal::SIGKILL);
    cluster.start_scheduler_again();
    cluster.wait_ready("w1").await;
    runs_on_w1(&cluster, &witness).await;
}

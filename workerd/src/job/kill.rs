//! Finding and killing every process of a job, wherever it went.
//!
//! A job's process group is not enough: a process can `setsid()` or
//! `setpgid()` out of it and double-fork so that it is no longer even a
//! descendant of the job's main process. What every job process does keep is
//! what it was born with, so a process belongs to the job when it started no
//! earlier than the job and either carries `JOB_ID=<id>` in its environment
//! (spawn sets it and children inherit it), is in the job's cgroup, or
//! descends (by live ppid links) from a process that does. Where the job has a
//! cgroup, `cgroup.kill` reaches everything in it first; the scan follows in
//! every case, for whatever left the cgroup.
//!
//! Processes can fork while they are being killed, so killing repeats the
//! look until a round finds nothing and can believe it (bounded): for a job
//! started here, a walk of workerd's tree (less the trees of other jobs'
//! main processes) that saw nothing move while it ran.
//! Each process is signalled through a pidfd opened before its start time is
//! checked again, so the signal reaches exactly the process that was found: a
//! pid reused in between is never hit.
//!
//! The limit: a process that clears `JOB_ID` from its environment *and*
//! leaves the tree (its ancestors up to a carrier exit, so it is re-parented)
//! before a scan, outside any cgroup, is not found.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use uuid::Uuid;

use super::JobRecord;
use crate::cgroup::Cgroups;

/// Scan-and-kill rounds before giving up on processes that will not die
/// (uninterruptible sleep can outlast any bound).
const MAX_ROUNDS: u32 = 40;
/// Pause after the first round; it doubles up to `MAX_PAUSE` so a quick
/// kill is quick and a slow one does not spin.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_millis(100);
/// `btime` has whole seconds and the job's start is wall-clock time, so a
/// process's start is only known to within a second or so of the job's.
const START_SLACK_MS: u64 = 2_000;

/// What identifies the processes of one job.
#[derive(Debug, Clone)]
pub(super) struct JobProcs {
    pub(super) id: Uuid,
    pub(super) started_at_ms: u64,
    /// The job's cgroup, where it has one.
    pub(super) cgroup: Option<PathBuf>,
    /// Every process of the job is below this process: it was started here,
    /// and orphans come back to us (we are a subreaper), so a round walks
    /// our descendants to find them instead of scanning every process on
    /// the machine.
    pub(super) in_tree: bool,
    /// The job's main process while it runs: the one running spawn whose
    /// tree is walked. Every other running spawn heads another job, and no
    /// process of this job is below it: a process only ever moves up its
    /// own line of ancestors, to workerd (or is cloned as a sibling of one
    /// of this job's, `CLONE_PARENT`: beside it, never below another job).
    pub(super) main: Option<i32>,
    /// The thread of workerd that spawned the main process: a process the
    /// main process clones as its sibling is that thread's child, not the
    /// main thread's, until the thread ends.
    pub(super) spawner: Option<i32>,
}

impl JobProcs {
    /// A job found on disk, started by an earlier worker process: its
    /// processes may be anywhere.
    pub(super) fn of(record: &JobRecord, cgroup: Option<PathBuf>) -> Self {
        JobProcs {
            id: record.id,
            started_at_ms: record.started_at_ms,
            cgroup,
            in_tree: false,
            main: None,
            spawner: None,
        }
    }

    /// A job this process spawned, whose main process is `main`, spawned
    /// by workerd's thread `spawner`.
    pub(super) fn spawned_here(
        record: &JobRecord,
        cgroup: Option<PathBuf>,
        main: Option<i32>,
        spawner: i32,
    ) -> Self {
        JobProcs {
            in_tree: super::reap::is_subreaper(),
            main,
            spawner: Some(spawner),
            ..JobProcs::of(record, cgroup)
        }
    }
}

/// Sends `signal` once to every process of the job that is not in
/// `signalled_group` (the caller already reached those with killpg, and a
/// second SIGTERM could cut a script's own clean-up short). Returns how many
/// processes were signalled.
pub(super) async fn signal_job(
    job: &JobProcs,
    signal: Signal,
    signalled_group: Option<i32>,
) -> usize {
    let job = job.clone();
    let sent = tokio::task::spawn_blocking(move || {
        find(&job)
            .into_iter()
            .filter(|p| Some(p.pgrp) != signalled_group)
            .filter(|p| send(p, signal))
            .count()
    })
    .await;
    sent.unwrap_or(0)
}

/// Kills every process of the job and returns once none is left (or the
/// rounds ran out). Returns how many processes were killed.
pub(super) async fn kill_job(job: &JobProcs) -> usize {
    let job = job.clone();
    tokio::task::spawn_blocking(move || kill_blocking(&job))
        .await
        .unwrap_or(0)
}

/// Kills what is left of a job whose worker died under it, and removes its
/// cgroup, which nobody else will.
pub(super) async fn kill_leftovers(record: &JobRecord, cgroups: Option<&Cgroups>) -> usize {
    let job = JobProcs::of(record, cgroups.map(|c| c.group(record.id)));
    let killed = kill_job(&job).await;
    if let Some(dir) = job.cgroup {
        let _ = tokio::task::spawn_blocking(move || {
            if dir.exists() {
                Cgroups::remove(&dir);
            }
        })
        .await;
    }
    killed
}

fn kill_blocking(job: &JobProcs) -> usize {
    if let Some(dir) = &job.cgroup {
        kill_cgroup(job.id, dir);
    }
    let mut killed = BTreeSet::new();
    let mut pause = FIRST_PAUSE;
    let mut memory = Memory::default();
    for _ in 0..MAX_ROUNDS {
        let seen = look(job, &mut memory);
        let seen = match seen.found.is_empty() {
            true => confirm_none(job, seen, &mut memory),
            false => seen,
        };
        if seen.found.is_empty() && seen.doubt == Doubt::None {
            return killed.len();
        }
        for process in &seen.found {
            if send(process, Signal::SIGKILL) {
                killed.insert(process.pid);
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
    tracing::warn!(job_id = %job.id, rounds = MAX_ROUNDS, "processes of the job still alive, or moving too fast to be sure none is, after every kill round");
    killed.len()
}

/// Kills everything in the job's cgroup and waits for it to empty.
fn kill_cgroup(id: Uuid, dir: &Path) {
    match std::fs::write(dir.join("cgroup.kill"), "1") {
        Ok(()) => {}
        // No such group, or a kernel before 5.14: the scan does it all.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(error) => {
            tracing::warn!(job_id = %id, %error, "cgroup.kill failed; killing the job's processes one by one");
            return;
        }
    }
    let mut pause = FIRST_PAUSE;
    for _ in 0..MAX_ROUNDS {
        if cgroup_members(dir).is_empty() {
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

fn cgroup_members(dir: &Path) -> BTreeSet<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// The fields of `/proc/<pid>/stat` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcStat {
    pub(super) pid: i32,
    pub(super) state: char,
    pub(super) ppid: i32,
    pub(super) pgrp: i32,
    /// Field 9: the kernel's flags of the process (`PF_*`).
    pub(super) flags: u64,
    /// Field 20.
    pub(super) num_threads: u64,
    /// Field 22: clock ticks after boot.
    pub(super) start_ticks: u64,
    /// Fields 50 and 51: where its environment lies in its memory; the end
    /// is 0 while an `execve` has swapped in a new memory and not yet
    /// written the environment into it (and when it has no memory).
    pub(super) env_start: u64,
    pub(super) env_end: u64,
}

/// The kernel's flag of a process that has begun to exit (set before it
/// lets go of its memory, so its environment reads empty, and before its
/// children go to workerd).
const PF_EXITING: u64 = 0x4;
/// The kernel's flag of its own threads (`kworker`s come and go all the
/// time): no memory, no environment, never a job's.
const PF_KTHREAD: u64 = 0x0020_0000;

impl ProcStat {
    /// Parses `/proc/<pid>/stat`. The command (field 2) may hold spaces and
    /// parentheses, so the fields are counted from its last `)`.
    pub(super) fn parse(text: &str) -> Option<ProcStat> {
        let (head, rest) = text.rsplit_once(')')?;
        let pid = head.split_once('(')?.0.trim().parse().ok()?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state).
        let field = |n: usize| fields.get(n - 3).copied();
        Some(ProcStat {
            pid,
            state: field(3)?.chars().next()?,
            ppid: field(4)?.parse().ok()?,
            pgrp: field(5)?.parse().ok()?,
            flags: field(9)?.parse().ok()?,
            num_threads: field(20)?.parse().ok()?,
            start_ticks: field(22)?.parse().ok()?,
            // Kernels before 3.5 lack them: read as "not known", 0.
            env_start: field(50).and_then(|f| f.parse().ok()).unwrap_or(0),
            env_end: field(51).and_then(|f| f.parse().ok()).unwrap_or(0),
        })
    }

    pub(super) fn read(pid: i32) -> Option<ProcStat> {
        ProcStat::read_path(&format!("/proc/{pid}/stat"))
    }

    /// The state of one thread `tid` of process `pid`.
    fn read_task(pid: i32, tid: i32) -> Option<ProcStat> {
        ProcStat::read_path(&format!("/proc/{pid}/task/{tid}/stat"))
    }

    fn read_path(path: &str) -> Option<ProcStat> {
        // In one read where it fits, as it always does (one line of at
        // most about 1 KiB): `read_to_string` grows its buffer from 32
        // bytes, six reads per process, and a job's end scans them all.
        let mut file = std::fs::File::open(path).ok()?;
        let mut buf = [0u8; 4096];
        let mut len = 0;
        while len < buf.len() {
            match std::io::Read::read(&mut file, &mut buf[len..]) {
                Ok(0) => return ProcStat::parse(std::str::from_utf8(&buf[..len]).ok()?),
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        None // longer than any stat line
    }

    /// Dead but not yet reaped, or dying: nothing left to signal. A main
    /// thread that ended alone (`pthread_exit`) shows its process as a
    /// zombie while the other threads run on: that process is alive.
    pub(super) fn is_zombie(&self) -> bool {
        self.is_dead_task() && self.num_threads <= 1
    }

    /// The process's main thread ended while others run on.
    fn is_headless(&self) -> bool {
        self.is_dead_task() && self.num_threads > 1
    }

    fn is_dead_task(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// This thread is exiting or dead: what it held (its environment, its
    /// children) may already be gone.
    fn is_task_ending(&self) -> bool {
        self.is_dead_task() || self.flags & PF_EXITING != 0
    }

    /// The process is exiting or dead. One whose main thread alone ended
    /// is not: its children went to its other threads, whose lists and
    /// states a walk reads one by one.
    fn is_ending(&self) -> bool {
        !self.is_headless() && self.is_task_ending()
    }
}

/// Every process now on the machine (those that vanish mid-scan are left out).
pub(super) fn all_processes() -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(ProcStat::read)
        .collect()
}

/// The children of every thread of `pid`, from
/// `/proc/<pid>/task/<tid>/children`; None where the kernel has no such
/// file (built without `CONFIG_PROC_CHILDREN`) or the process is gone.
pub(super) fn children(pid: i32) -> Option<Vec<i32>> {
    children_read(pid).map(|(pids, _)| pids)
}

/// workerd's orphans: the children of its main thread (`pid`'s thread
/// `pid`; every thread's before Linux 3.19, see [`workerd_lists`]); None
/// as for [`children`]. See [`thread_children_read`].
pub(super) fn orphans(pid: i32) -> Option<Vec<i32>> {
    workerd_lists(pid, None).map(|(pids, _)| pids)
}

/// The children of thread `tid` of process `pid`, and whether the list
/// came in pieces.
///
/// The kernel gives an orphan to the first live thread of its nearest
/// subreaper: workerd's main thread, which lasts as long as workerd; and
/// when one of workerd's threads ends, its children go there too. Its
/// other threads (the runtime's, and a blocking pool that grows to
/// hundreds under load) hold the main processes they spawned, and what
/// those clone as their siblings: a walk reads the job's own spawning
/// thread beside the main thread (see [`descendants`]). Reading every
/// thread's list cost a job's end an open and a read per thread: a fifth
/// of the worker's time with 64 starts at once.
fn thread_children_read(pid: i32, tid: i32) -> std::io::Result<(Vec<i32>, Doubt)> {
    let list = read_whole(Path::new(&format!("/proc/{pid}/task/{tid}/children")))?;
    let doubt = match list.len() > LIST_PAGE {
        true => Doubt::LongList,
        false => Doubt::None,
    };
    Ok((parse_pids(&list).collect(), doubt))
}

fn parse_pids(list: &str) -> impl Iterator<Item = i32> + '_ {
    list.split_ascii_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
}

/// The most of a children list the kernel hands out in one read: a page,
/// less the room of one entry it would not split.
const LIST_PAGE: usize = 4096 - 12;

/// How far a look that found none of the job's processes can be believed.
/// Ordered: a look doubts as much as the most doubtful thing it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Doubt {
    /// Nothing it saw could have hidden a process from it.
    None,
    /// A children list longer than a page came in pieces, which may not
    /// agree. Looking again does not settle that (the list stays long),
    /// so after [`WALKS`] walks a scan of every process does.
    LongList,
    /// Something moved while it looked: a process or thread ended, or
    /// began to, or could not yet be told whose it was. Looking again
    /// settles it.
    Moving,
}

/// The children of every thread of `pid`, and how far the lists can be
/// believed: a thread that ended (or began to) after its list was read
/// may have handed a child it forked since to a list already read (an
/// ended thread's list reads empty), and a list read in pieces may miss a
/// child that moved between them. The main thread's state is the caller's
/// to check, after this.
fn children_read(pid: i32) -> Option<(Vec<i32>, Doubt)> {
    let mut pids = Vec::new();
    let mut doubt = Doubt::None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let (list, listed) = match thread_children_read(pid, tid) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && task.path().exists() => {
                return None;
            }
            // The thread ended meanwhile.
            Err(_) => {
                doubt = Doubt::Moving;
                continue;
            }
        };
        doubt = doubt.max(listed);
        if tid != pid && ProcStat::read_task(pid, tid).is_none_or(|s| s.is_task_ending()) {
            doubt = Doubt::Moving;
        }
        pids.extend(list);
    }
    Some((pids, doubt))
}

/// A `/proc` list file, whole. The kernel hands such a file out a page
/// at a time (`seq_file`), so a list longer than a page (some 500 pids)
/// takes several reads and can miss a child that left between two of
/// them; the callers tolerate that (a walk doubts such a list, the reaper
/// looks again at the next signal). Most lists are empty or short: one
/// read and the one that finds the end.
fn read_whole(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut list = Vec::with_capacity(4 * 1024);
    std::fs::File::open(path)?.read_to_end(&mut list)?;
    String::from_utf8(list).map_err(std::io::Error::other)
}

/// What the looks of one job's end learnt for the next ones: what one
/// doubts for the first time, the next may know. Processes by pid and
/// start time.
#[derive(Debug, Default)]
struct Memory {
    /// Seen dead (zombies): such a process holds no children and forks
    /// none (see [`descendants`]).
    dead: HashSet<(i32, u64)>,
    /// Seen with an empty environment (see [`read_mark`]).
    no_environment: HashSet<(i32, u64)>,
}

/// A walk of the processes below one.
struct Walk {
    processes: Vec<ProcStat>,
    /// Whether it may have missed a process (see [`descendants`]).
    doubt: Doubt,
}

/// The children lists of workerd (`root`) where orphans and a job's
/// processes can be: the thread that spawned the job's main process
/// (`spawner`), then the main thread (every thread's before Linux 3.19).
/// In that order: if the spawning thread ends in between, its children go
/// to the main thread, read after. None where a list cannot be read (the
/// caller then scans every process).
fn workerd_lists(root: i32, spawner: Option<i32>) -> Option<(Vec<i32>, Doubt)> {
    if !orphans_go_to_main_thread() {
        return children_read(root);
    }
    let mut next = Vec::new();
    let mut doubt = Doubt::None;
    if let Some(spawner) = spawner.filter(|tid| *tid != root) {
        match thread_children_read(root, spawner) {
            Ok((pids, listed)) => {
                next.extend(pids);
                doubt = listed;
            }
            // Ended: its children are the main thread's now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
    }
    let (orphans, listed) = thread_children_read(root, root).ok()?;
    next.extend(orphans);
    Some((next, doubt.max(listed)))
}

/// Whether the kernel gives an orphan to the first live thread of its
/// subreaper, and an ending thread's children to the first live thread of
/// its process (`find_alive_thread`, Linux 3.19): workerd's main thread.
/// Before, they went to the subreaper's thread that was the orphan's
/// ancestor, or to the next thread, so every thread's list is read there.
fn orphans_go_to_main_thread() -> bool {
    static AT_LEAST_3_19: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AT_LEAST_3_19.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .and_then(|release| kernel_at_least(&release, (3, 19)))
            .unwrap_or(false)
    })
}

/// Whether a kernel release (`6.18.44-fc`) is `at_least` (major, minor);
/// None if it cannot be read as one.
fn kernel_at_least(release: &str, at_least: (u32, u32)) -> Option<bool> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse::<u32>().ok()?;
    let minor = parts.next()?.parse::<u32>().ok()?;
    Some((major, minor) >= at_least)
}

/// Every process below `root` (workerd, not itself) where the job's can
/// be: below its main thread (orphans), its thread that spawned the job
/// (the main process and its siblings) and the job's main process while
/// it runs, but for the trees of running spawns other than the job's
/// (other jobs' main processes: see [`JobProcs::main`]); None where the
/// kernel does not list children.
///
/// The kernel's lists are read one after the other, and a process moves
/// from one to another when its parent exits (to the subreaper, workerd,
/// whose lists were read first) or a thread of its parent does. The walk
/// reads a process's list before its state: one that is not exiting
/// after its list was read had every child it then had in it (one it
/// forks later comes from a live process the walk saw). It doubts where
/// that does not hold: a process gone before its list or state was read,
/// a thread that ended, a list read in pieces, or an exiting or dead
/// process, unless an earlier walk saw it dead too (recorded in
/// `memory`): its children had moved (to workerd) before it was seen
/// dead, so before this walk read workerd's list, and it forks no more.
/// An exiting process that is not dead yet is doubted every time: the
/// kernel moves its children before it marks it dead, and a reader of
/// `/proc` can see the one without the other.
fn descendants(root: i32, job: &JobProcs, memory: &mut Memory) -> Option<Walk> {
    // Taken before the root's lists: a main process not running now was
    // reaped, so it had died, and its children had gone to the root's main
    // thread, before that list is read. One running is walked from its
    // pid, wherever it is listed.
    let main = job.main.filter(|main| super::reap::is_running_spawn(*main));
    let (mut next, mut doubt) = workerd_lists(root, job.spawner)?;
    next.extend(main);
    // Taken after the root's lists, so every spawn in them is known. A main
    // process reaped since keeps its pid for the walk: pids are handed out
    // in turn, and reusing one so soon would take a wrap of all of them.
    let mut others = super::reap::running_spawns();
    if let Some(main) = main {
        others.remove(&main);
    }
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    while let Some(pid) = next.pop() {
        // Lists read at different moments may disagree; each pid once.
        if others.contains(&pid) || !seen.insert(pid) {
            continue;
        }
        let list = children_read(pid);
        let Some(stat) = ProcStat::read(pid) else {
            doubt = Doubt::Moving;
            continue;
        };
        match list {
            Some((pids, listed)) => {
                next.extend(pids);
                doubt = doubt.max(listed);
            }
            None => doubt = Doubt::Moving,
        }
        let dead_before = stat.is_zombie() && !memory.dead.insert((pid, stat.start_ticks));
        if stat.is_ending() && !dead_before {
            doubt = Doubt::Moving;
        }
        found.push(stat);
    }
    Some(Walk {
        processes: found,
        doubt,
    })
}

/// Whether a read of a process's `/proc` file failed because the process
/// is gone.
fn ended(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::NotFound || error.raw_os_error() == Some(nix::libc::ESRCH)
}

/// Boot time in seconds since the epoch, from the text of `/proc/stat`.
fn parse_btime(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Whether a `/proc/<pid>/environ` holds exactly `name=value`. bash,
/// importing its environment at start, writes a NUL over each `=` for a
/// moment: `name` and `value` as two entries count too.
fn environ_has(environ: &[u8], name: &[u8], value: &[u8]) -> bool {
    let mut before: &[u8] = &[];
    environ.split(|b| *b == 0).any(|var| {
        let found = (before == name && var == value)
            || var
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(b"="))
                .is_some_and(|rest| rest == value);
        before = var;
        found
    })
}

/// The most of an environment read: the kernel's own limit on the
/// arguments and environment of an `execve` is a quarter of the stack
/// limit; past this, what was read is judged.
const MAX_ENVIRONMENT: usize = 4 << 20;

/// A process's environment, in one `read` where it fits: each call takes
/// hold of the process's memory anew, so an `execve` between two calls
/// would end the file early, cut short; one call copies all of it from
/// one memory. (`std::fs::read` starts with 32 bytes.)
fn read_environment(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut size = 16 * 1024;
    loop {
        let mut buf = vec![0u8; size];
        let len = loop {
            match std::fs::File::open(path)?.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        if len < size || size >= MAX_ENVIRONMENT {
            buf.truncate(len);
            return Ok(buf);
        }
        size *= 4;
    }
}

/// What a process's environment says of its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Carries,
    Lacks,
    /// Not read: it was exiting, in an `execve`, or gone.
    Unknown,
}

/// The thread whose memory a process's environment is read from: its
/// main thread, or another where that one ended alone (its own memory is
/// gone; the process's is not).
fn voice(stat: &ProcStat) -> Option<i32> {
    if !stat.is_headless() {
        return Some(stat.pid);
    }
    std::fs::read_dir(format!("/proc/{}/task", stat.pid))
        .ok()?
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok())
        .find(|tid| *tid != stat.pid)
}

/// Reads whether the process `stat` carries `JOB_ID=<id>` in its
/// environment.
///
/// An environment reads empty when the process is exiting (its memory
/// gone), in an `execve` (a new memory whose environment is not written
/// yet: `env_end` is 0, then `env_start == env_end` while the kernel
/// writes it) or has none at all (`env_start == env_end` for good). The
/// state read after the environment tells the first two; an empty one is
/// believed once an earlier look of the same end saw it so too (it is in
/// `memory`). One whose `execve` finished in between is read again.
fn read_mark(stat: &ProcStat, id: &[u8], memory: &mut Memory) -> Mark {
    let Some(tid) = voice(stat) else {
        return Mark::Unknown;
    };
    for _ in 0..2 {
        let env = match read_environment(&format!("/proc/{}/task/{tid}/environ", stat.pid)) {
            Ok(env) if environ_has(&env, b"JOB_ID", id) => return Mark::Carries,
            Ok(env) => env,
            Err(e) if ended(&e) => return Mark::Unknown,
            // Not ours to read (another user's): told by its ancestors.
            Err(_) => return Mark::Lacks,
        };
        let Some(now) = ProcStat::read_task(stat.pid, tid) else {
            return Mark::Unknown;
        };
        // A thread's own start time differs from its process's.
        let other = tid == stat.pid && now.start_ticks != stat.start_ticks;
        if other || now.is_task_ending() || now.env_end == 0 {
            return Mark::Unknown;
        }
        if !env.is_empty() {
            return Mark::Lacks;
        }
        if now.env_start == now.env_end {
            let key = (stat.pid, stat.start_ticks);
            return match memory.no_environment.insert(key) {
                true => Mark::Unknown,
                false => Mark::Lacks,
            };
        }
    }
    Mark::Unknown
}

/// Turns process start ticks into wall-clock milliseconds.
#[derive(Debug, Clone, Copy)]
struct Clock {
    btime_s: u64,
    ticks_per_s: u64,
}

impl Clock {
    fn read() -> Option<Clock> {
        let btime_s = parse_btime(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(100);
        Some(Clock {
            btime_s,
            ticks_per_s,
        })
    }

    fn started_ms(&self, ticks: u64) -> u64 {
        self.btime_s
            .saturating_mul(1000)
            .saturating_add(ticks.saturating_mul(1000) / self.ticks_per_s)
    }
}

/// One process as seen by a scan, with what marks it as the job's.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    stat: ProcStat,
    /// Started no earlier than the job.
    young: bool,
    /// Carries the job's `JOB_ID` or sits in its cgroup.
    marked: bool,
}

/// The job's processes among `candidates`: young ones that are marked or
/// descend from a marked one through young ancestors.
fn select(candidates: &[Candidate]) -> Vec<ProcStat> {
    let by_pid: HashMap<i32, &Candidate> = candidates.iter().map(|c| (c.stat.pid, c)).collect();
    let mut known: HashMap<i32, bool> = HashMap::new();
    let mut chosen = Vec::new();
    for c in candidates {
        let mut chain = Vec::new();
        let mut pid = c.stat.pid;
        // A scan is not atomic, so links may be inconsistent; the length of
        // the chain is bounded rather than trusted to end.
        let verdict = loop {
            if let Some(v) = known.get(&pid) {
                break *v;
            }
            let Some(p) = by_pid.get(&pid) else {
                break false;
            };
            if !p.young || chain.len() > by_pid.len() {
                break false;
            }
            chain.push(pid);
            if p.marked {
                break true;
            }
            pid = p.stat.ppid;
        };
        for pid in chain {
            known.insert(pid, verdict);
        }
        if verdict {
            chosen.push(c.stat);
        }
    }
    chosen
}

/// Walks after one that found none of the job's processes but may have
/// missed some, before the kill round ends and a later one looks again.
const WALKS: usize = 3;

/// What one look at the machine found of a job.
#[derive(Debug)]
struct Look {
    /// The job's live processes.
    found: Vec<ProcStat>,
    /// How far it can be believed when it found none: a walk of workerd's
    /// tree is believed when it saw nothing move (see [`descendants`]) and
    /// told whose every process that might have been the job's was (see
    /// [`select_job`]); a scan of every process always is (see
    /// [`look_everywhere`]).
    doubt: Doubt,
}

impl Look {
    /// A look that found `found`, doubting as much as `otherwise` when
    /// every process that might have been the job's was `told`.
    fn new((found, told): (Vec<ProcStat>, bool), otherwise: Doubt) -> Look {
        let doubt = match told {
            true => otherwise,
            false => Doubt::Moving,
        };
        Look { found, doubt }
    }
}

fn look(job: &JobProcs, memory: &mut Memory) -> Look {
    let own = i32::try_from(std::process::id()).unwrap_or(0);
    match job.in_tree.then(|| descendants(own, job, memory)).flatten() {
        Some(walk) => Look::new(select_job(job, &walk.processes, memory), walk.doubt),
        None => look_everywhere(job, memory),
    }
}

/// [`look`] at every process on the machine, for a job whose processes
/// may be anywhere. Believed when it finds none: on a busy machine some
/// process always ends mid-scan, and waiting for a scan where none did
/// would hold every such job's end for all the kill rounds.
fn look_everywhere(job: &JobProcs, memory: &mut Memory) -> Look {
    let (found, _) = select_job(job, &all_processes(), memory);
    Look {
        found,
        doubt: Doubt::None,
    }
}

/// Looks again after a look that found none of the job's processes but
/// may have missed some, up to [`WALKS`] times; returns the last look.
///
/// A scan of every process on the machine confirmed every empty walk
/// before: one `/proc/<pid>/stat` per process at every job's end (two
/// thirds of the files a job's end opened here), and no better a proof:
/// a process it lists can be gone when its state is read, and the child
/// it forked just before can have a pid the scan has passed (pids wrap).
/// The walks stand on what the scan lacks: every process of the job is
/// below workerd, its subreaper. Only a list too long to be read at once
/// still falls back on the scan, once the walks have settled all else.
fn confirm_none(job: &JobProcs, first: Look, memory: &mut Memory) -> Look {
    let mut last = first;
    for _ in 0..WALKS {
        if last.doubt == Doubt::None || !last.found.is_empty() {
            return last;
        }
        last = look(job, memory);
    }
    if last.doubt != Doubt::LongList || !last.found.is_empty() {
        return last;
    }
    tracing::info!(job_id = %job.id, "a children list in workerd's tree is too long to read at once; scanning every process");
    // Unlike a job adopted from an earlier worker process, this one's
    // processes can still be told by their environments being readable.
    let own = i32::try_from(std::process::id()).unwrap_or(0);
    Look::new(
        select_job(job, &below(own, all_processes()), memory),
        Doubt::None,
    )
}

/// The processes of a scan that may be below `root` (workerd): by the
/// parents the scan read, their line of ancestors reaches `root`, or a
/// process the scan did not see (one that ended or began meanwhile: where
/// it stood is not known). Every process of a job started here is below
/// workerd, its subreaper; the rest of the machine (another worker's jobs
/// in an `execve`, say) can neither be the job's nor leave its end in
/// doubt.
fn below(root: i32, all: Vec<ProcStat>) -> Vec<ProcStat> {
    let parents: HashMap<i32, i32> = all.iter().map(|s| (s.pid, s.ppid)).collect();
    let reaches = |mut pid: i32| {
        // Bounded: parents read at different moments may form a loop.
        for _ in 0..=parents.len() {
            match parents.get(&pid) {
                Some(&parent) if parent == root => return true,
                Some(&parent) if parent <= 1 => return false,
                Some(&parent) => pid = parent,
                None => return true,
            }
        }
        true
    };
    all.into_iter().filter(|s| reaches(s.pid)).collect()
}

/// The job's live processes now.
fn find(job: &JobProcs) -> Vec<ProcStat> {
    look(job, &mut Memory::default()).found
}

/// The job's live processes among `processes`, and whether every one that
/// might have been the job's was told: one whose environment could not be
/// read because it was exiting (it may have forked after its list was
/// read, and its children go up to workerd) or in an `execve` was not.
fn select_job(
    job: &JobProcs,
    processes: &[ProcStat],
    memory: &mut Memory,
) -> (Vec<ProcStat>, bool) {
    let Some(clock) = Clock::read() else {
        tracing::warn!(job_id = %job.id, "cannot read /proc/stat; the job's processes cannot be found");
        return (Vec::new(), true);
    };
    let own = i32::try_from(std::process::id()).unwrap_or(0);
    let id = job.id.to_string();
    let in_cgroup = job
        .cgroup
        .as_deref()
        .map(cgroup_members)
        .unwrap_or_default();
    let mut told = true;
    let candidates: Vec<Candidate> = processes
        .iter()
        .copied()
        // Never workerd itself or init, whatever their environment says,
        // nor the kernel's threads (a young one's environment would read
        // as one not written yet, and leave every look in doubt).
        .filter(|s| !s.is_zombie() && s.pid > 1 && s.pid != own && s.flags & PF_KTHREAD == 0)
        .map(|stat| {
            let young = clock.started_ms(stat.start_ticks) + START_SLACK_MS >= job.started_at_ms;
            // Only the young can be the job's; old ones need no environ read.
            let marked = young
                && (in_cgroup.contains(&stat.pid)
                    || match read_mark(&stat, id.as_bytes(), memory) {
                        Mark::Carries => true,
                        Mark::Lacks => false,
                        Mark::Unknown => {
                            told = false;
                            false
                        }
                    });
            Candidate {
                stat,
                young,
                marked,
            }
        })
        .collect();
    (select(&candidates), told)
}

/// Signals the process found as `found`, and only it. Returns whether the
/// signal was delivered.
fn send(found: &ProcStat, signal: Signal) -> bool {
    let same = || ProcStat::read(found.pid).is_some_and(|s| s.start_ticks == found.start_ticks);
    match crate::sys::pidfd_open(found.pid) {
        // The pidfd pins one process; if the pid still shows the start time
        // that was checked, it is that process.
        Ok(fd) => same() && crate::sys::pidfd_send_signal(&fd, signal).is_ok(),
        // Kernels before 5.3: check and kill, with a window of microseconds
        // in which the pid would have to be reused.
        Err(Errno::ENOSYS) => {
            same() && nix::sys::signal::kill(Pid::from_raw(found.pid), signal).is_ok()
        }
        Err(Errno::ESRCH) => false,
        Err(error) => {
            tracing::debug!(pid = found.pid, %error, "could not open a pidfd");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where orphans go changed in Linux 3.19; releases read as written.
    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert_eq!(kernel_at_least("6.18.44-fc-v1098\n", (3, 19)), Some(true));
        assert_eq!(kernel_at_least("3.19.0", (3, 19)), Some(true));
        assert_eq!(kernel_at_least("4.1-rc1", (3, 19)), Some(true));
        assert_eq!(kernel_at_least("3.18.140", (3, 19)), Some(false));
        assert_eq!(
            kernel_at_least("3.10.0-1160.el7.x86_64", (3, 19)),
            Some(false)
        );
        assert_eq!(kernel_at_least("2.6", (3, 19)), Some(false));
        assert_eq!(kernel_at_least("", (3, 19)), None);
        assert_eq!(kernel_at_least("six.x", (3, 19)), None);
    }

    /// Out of workerd's tree by the scan's own parents: another worker's
    /// jobs, the kernel's threads. Kept: below workerd, or where the line
    /// breaks at a process the scan did not see.
    #[test]
    fn a_scan_keeps_only_what_may_be_below_workerd() {
        let stat = |pid: i32, ppid: i32| {
            let line = format!("{pid} (p) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55");
            ProcStat::parse(&line).unwrap()
        };
        let all = vec![
            stat(1, 0),
            stat(2, 0),
            stat(9, 2),     // a kworker
            stat(100, 1),   // workerd
            stat(101, 100), // a job's main process
            stat(102, 101), // its child
            stat(103, 555), // its parent ended mid-scan
            stat(200, 1),   // another worker
            stat(201, 200), // its job
            stat(300, 301), // parents read in a loop
            stat(301, 300),
        ];
        let kept: Vec<i32> = below(100, all).iter().map(|s| s.pid).collect();
        assert_eq!(kept, [101, 102, 103, 300, 301]);
    }

    #[test]
    fn parses_stat_even_with_odd_command_names() {
        let text = "4242 (we ird) cmd)) S 17 4242 4242 0 -1 4194560 120 0 0 0 1 2 0 0 20 0 1 0 987654 10000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            ProcStat::parse(text),
            Some(ProcStat {
                pid: 4242,
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                flags: 4194560,
                num_threads: 1,
                start_ticks: 987654,
                env_start: 0,
                env_end: 0,
            })
        );
        let zombie = "7 (sleep) Z 1 5 5 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0 0";
        assert!(ProcStat::parse(zombie).unwrap().is_zombie());
        let exiting = "7 (sleep) R 1 5 5 0 -1 4194564 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0 0";
        let exiting = ProcStat::parse(exiting).unwrap();
        assert!(!exiting.is_zombie() && exiting.is_ending());
        assert!(!ProcStat::parse(text).unwrap().is_ending());
        // Its main thread gone (pthread_exit), three threads run on.
        let headless = "7 (py) Z 1 5 5 0 -1 4194564 0 0 0 0 0 0 0 0 20 0 3 0 55 0 0 0";
        let headless = ProcStat::parse(headless).unwrap();
        assert!(!headless.is_zombie() && !headless.is_ending() && headless.is_headless());
        // Fields 50 and 51: where the environment lies (0 in an execve).
        let full = format!("{zombie}{} 100 200 0\n", " 0".repeat(24));
        let full = ProcStat::parse(&full).unwrap();
        assert_eq!((full.env_start, full.env_end), (100, 200));
        assert_eq!(ProcStat::parse(zombie).unwrap().env_end, 0);
        let kworker = "9 (kworker/0:0) I 2 0 0 0 -1 69238880 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0 0";
        assert_ne!(ProcStat::parse(kworker).unwrap().flags & PF_KTHREAD, 0);
        assert_eq!(ProcStat::parse(text).unwrap().flags & PF_KTHREAD, 0);
        assert_eq!(ProcStat::parse("7 (sleep) S 1 5"), None, "truncated");
        assert_eq!(ProcStat::parse("garbage"), None);
    }

    #[test]
    fn reads_btime_and_environ() {
        let stat = "cpu  1 2 3\nintr 5\nctxt 9\nbtime 1700000000\nprocesses 7\n";
        assert_eq!(parse_btime(stat), Some(1_700_000_000));
        assert_eq!(parse_btime("cpu 1\n"), None);
        let env = b"PATH=/bin\0JOB_ID=abc\0X=JOB_ID=abcd\0";
        assert!(environ_has(env, b"JOB_ID", b"abc"));
        assert!(!environ_has(env, b"JOB_ID", b"ab"));
        assert!(!environ_has(b"", b"JOB_ID", b"abc"));
        // bash importing its environment: `=` overwritten for a moment.
        assert!(environ_has(b"PATH=/bin\0JOB_ID\0abc\0", b"JOB_ID", b"abc"));
        assert!(!environ_has(b"X=JOB_ID\0abc\0", b"JOB_ID", b"abc"));
        let clock = Clock {
            btime_s: 1000,
            ticks_per_s: 100,
        };
        assert_eq!(clock.started_ms(250), 1_002_500);
    }

    fn candidate(pid: i32, ppid: i32, young: bool, marked: bool) -> Candidate {
        Candidate {
            stat: ProcStat {
                pid,
                state: 'S',
                ppid,
                pgrp: pid,
                flags: 0,
                num_threads: 1,
                start_ticks: 0,
                env_start: 0,
                env_end: 0,
            },
            young,
            marked,
        }
    }

    #[test]
    fn selects_marked_processes_and_their_young_descendants_only() {
        let procs = [
            candidate(10, 1, false, false), // workerd
            candidate(20, 10, true, true),  // the job's main process
            candidate(21, 20, true, false), // cleared JOB_ID, still a child
            candidate(22, 21, true, false), // and its child
            candidate(30, 1, true, true),   // double-forked, re-parented to init
            candidate(31, 10, true, false), // re-parented, JOB_ID cleared: lost
            candidate(40, 1, false, true),  // older than the job: not it
            candidate(41, 40, true, false), // child of an old carrier
            candidate(50, 51, true, false), // an inconsistent cycle
            candidate(51, 50, true, false),
        ];
        let mut pids: Vec<i32> = select(&procs).iter().map(|s| s.pid).collect();
        pids.sort();
        assert_eq!(pids, [20, 21, 22, 30]);
    }
}

//! One worker stream of a job's output, read once for every follower that
//! reads the same bytes at about the same time.
//!
//! Each follower of a job used to open a `StreamJob` of its own: four
//! followers had the worker read and encrypt the log four times and this
//! scheduler decrypt it four times, for the same bytes
//! (docs/PERFORMANCE.md, "Following: one worker stream for followers
//! together"). A [`Source`] is one worker stream; every follower reads it
//! through a [`Tap`] at its own offset. Whichever follower needs bytes
//! that have not come yet reads the next message for all of them while
//! the others wait for it, so no task of its own runs and the stream goes
//! no faster than its fastest follower. Output is kept only until every
//! follower still on the source has passed it, and never more than
//! [`WINDOW`] behind the fastest: a follower that falls further behind
//! leaves the source and goes on from its offset on a stream of its own,
//! so a slow client neither holds the others back nor makes this process
//! hold more than [`WINDOW`] of output per shared stream, nor more than
//! [`BUDGET`] in all (each plus a message).
//!
//! A followed source keeps the last [`KEEP`] bytes it read (and the
//! chunk that reaches past them) for followers who come a moment later,
//! until its first read after [`KEEP_FOR`], while all hold under half the
//! [`BUDGET`]. A follower
//! joins an open source ([`Taps::join`]) only if the source still holds
//! the byte it starts from, and only where the bytes cannot
//! differ: a followed stream, or a finished job's log. A read of a running
//! job without `follow` stops at what there was when it asked, so it
//! always opens its own. A source whose worker stream broke, or ended
//! without the job's end, takes no new followers (each opens its own,
//! perhaps from a worker back again). A follower that leaves a source
//! opens its stream on the channel the source was opened on, without
//! asking the registry again; if that fails its body ends cut, and the
//! client resumes from its offset as after any broken stream. `HELD`
//! counts output bytes; the h2 read buffers they are slices of may be
//! larger.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jobcluster_proto::pb;
use tokio::sync::{Notify, watch};
use tonic::Status;

use crate::output_stream::Output;

/// The most output a shared source holds behind its fastest follower; a
/// follower further behind leaves it for a stream of its own. 32 ms of a
/// replay at 1 GiB/s: followers sharing two vCPUs with the daemons fall
/// that far behind now and then.
pub(crate) const WINDOW: u64 = 32 << 20;

/// Output a source keeps behind its head for followers who come a moment
/// after it opened (each connection's TLS handshake spreads followers that
/// start together over milliseconds): 5 ms of a job writing 1.5 GiB/s.
pub(crate) const KEEP: u64 = 8 << 20;

/// How long after it opened a followed source keeps [`KEEP`]. Not for its
/// whole life, nor for a finished log read back: output held past its
/// reading keeps h2's read buffers from being reused, and a lone
/// follower's scheduler then faults in fresh pages for every message
/// (59,000-90,000 page faults and half again the CPU per 7 replays of
/// 256 MiB when kept for a stream's life).
pub(crate) const KEEP_FOR: Duration = Duration::from_millis(50);

/// The most output all sources hold together. Past it a source keeps no
/// follower behind its fastest (they go on alone, each on a worker
/// stream's own flow control), so clients that stop reading cannot make
/// this process hold more than this plus a message per source.
pub(crate) const BUDGET: u64 = 256 << 20;

/// Output all sources hold.
static HELD: AtomicU64 = AtomicU64::new(0);

/// What a follower reads next.
#[derive(Debug)]
pub(crate) enum Piece {
    /// Output, in order.
    Data(Bytes),
    /// The job ended and every byte was read: its final status.
    Final(pb::QueryJobResponse),
    /// The worker ended the stream without a status (a read without
    /// `follow` reached what there was).
    Ended,
}

/// How a source's worker stream ended.
#[derive(Debug, Clone)]
enum End {
    Final(pb::QueryJobResponse),
    Ended,
    Broke(Status),
}

type Key = (String, bool);

/// The sources followers may join, by job and whether they follow.
#[derive(Debug, Default)]
pub(crate) struct Taps {
    open: Mutex<HashMap<Key, Entry>>,
}

#[derive(Debug)]
enum Entry {
    /// A follower is opening the worker stream; its sender goes when it
    /// is done, however that ends.
    Opening(watch::Receiver<()>),
    Open(Weak<Source>),
}

/// What [`Taps::join`] found.
#[derive(Debug)]
pub(crate) enum Joined {
    /// A place on an open source that holds the offset asked for.
    Tap(Tap),
    /// None: the caller opens the worker stream and hands it to
    /// [`Opener::opened`], which offers it to later followers; others that
    /// come meanwhile wait for it.
    Open(Opener),
    /// None, and another follower's opening failed or went away: the
    /// caller opens a stream of its own, unshared.
    Alone,
}

impl Taps {
    /// A place on an open source of `job_id`'s output that still holds
    /// `offset`; one being opened is waited for (its opening is bounded by
    /// the worker call's deadline), so followers that come together share
    /// one.
    pub(crate) async fn join(self: &Arc<Self>, job_id: &str, follow: bool, offset: u64) -> Joined {
        let key = (job_id.to_owned(), follow);
        let mut waited = false;
        loop {
            let mut opening = {
                let mut open = lock(&self.open);
                let found = match open.get(&key) {
                    Some(Entry::Opening(opening)) => Ok(opening.clone()),
                    Some(Entry::Open(source)) => Err(source.upgrade()),
                    None => Err(None),
                };
                match found {
                    Ok(opening) => opening,
                    Err(source) => {
                        if let Some(tap) = source.and_then(|source| Tap::at(source, offset)) {
                            tracing::debug!(
                                job_id,
                                offset,
                                "follower joined an open output stream"
                            );
                            return Joined::Tap(tap);
                        }
                        if waited {
                            return Joined::Alone;
                        }
                        // None, gone, or past the offset: this follower
                        // opens one, which replaces it for later followers
                        // (an old one goes on serving its own).
                        let (done, opening) = watch::channel(());
                        // Sources no follower holds any more are gone.
                        open.retain(|_, entry| match entry {
                            Entry::Open(source) => source.strong_count() > 0,
                            Entry::Opening(_) => true,
                        });
                        open.insert(key.clone(), Entry::Opening(opening));
                        return Joined::Open(Opener {
                            taps: self.clone(),
                            key,
                            done: Some(done),
                        });
                    }
                }
            };
            waited = true;
            // Ends when the opener is done, however that ends.
            let _ = opening.changed().await;
        }
    }

    /// A tap on `output`, the worker's stream of `job_id` from `offset`
    /// (opened again from elsewhere by `reopen`), for a follower that reads
    /// alone.
    pub(crate) fn alone(
        job_id: &str,
        follow: bool,
        offset: u64,
        output: Output,
        reopen: Reopen,
    ) -> Tap {
        let source = Source::new((job_id.to_owned(), follow), offset, output, reopen, false);
        Tap::first(source, offset)
    }
}

/// The follower that opens a worker stream for others to join. Dropped
/// without [`Opener::opened`] (the opening failed, or its client left),
/// it lets the followers waiting for it go on.
#[derive(Debug)]
pub(crate) struct Opener {
    taps: Arc<Taps>,
    key: Key,
    done: Option<watch::Sender<()>>,
}

impl Opener {
    /// The first tap on `output`, the worker's stream from `offset`
    /// (opened again from elsewhere by `reopen`), offered to later
    /// followers.
    pub(crate) fn opened(mut self, offset: u64, output: Output, reopen: Reopen) -> Tap {
        let source = Source::new(self.key.clone(), offset, output, reopen, true);
        let tap = Tap::first(source.clone(), offset);
        lock(&self.taps.open).insert(self.key.clone(), Entry::Open(Arc::downgrade(&source)));
        self.done = None;
        tap
    }
}

impl Drop for Opener {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let mut open = lock(&self.taps.open);
            if let Some(Entry::Opening(opening)) = open.get(&self.key)
                && opening.same_channel(&done.subscribe())
            {
                open.remove(&self.key);
            }
        }
    }
}

/// Opens the worker's stream of the job again from an offset, for a
/// follower that leaves a source to go on alone: the same open as the
/// first (`api::jobs`), with its deadline and its news of a worker that
/// cannot be reached.
pub(crate) type Reopen =
    Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = Result<Output, Status>> + Send>> + Send + Sync>;

/// One worker stream and the output its followers have not all read.
struct Source {
    /// The job and whether the stream follows it.
    key: Key,
    reopen: Reopen,
    inner: Mutex<Inner>,
    /// Output came, the stream ended, or its reader let it go.
    changed: Notify,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("key", &self.key)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Inner {
    /// Output not yet read by every follower, in order.
    chunks: VecDeque<Bytes>,
    /// The offset of the first byte of `chunks`.
    base: u64,
    /// The offset past the last byte of `chunks`.
    head: u64,
    /// Where each follower on the source is. A follower that fell
    /// [`WINDOW`] behind is no longer here: it leaves when it next reads.
    at: HashMap<u64, u64>,
    next_id: u64,
    /// The worker's stream while no follower is reading it.
    output: Option<Output>,
    end: Option<End>,
    /// Until when [`KEEP`] is kept.
    keep_until: Option<Instant>,
}

impl Source {
    /// `joinable`: offered to later followers (a source opened for one
    /// follower alone keeps nothing for them).
    fn new(key: Key, offset: u64, output: Output, reopen: Reopen, joinable: bool) -> Arc<Source> {
        crate::metrics::output_worker_stream_opened();
        let keep = joinable && key.1;
        Arc::new(Source {
            key,
            reopen,
            inner: Mutex::new(Inner {
                chunks: VecDeque::new(),
                base: offset,
                head: offset,
                at: HashMap::new(),
                next_id: 0,
                output: Some(output),
                end: None,
                // Readers of a finished log that start together come
                // while the first opens the stream, and wait for it.
                keep_until: keep.then(|| Instant::now() + KEEP_FOR),
            }),
            changed: Notify::new(),
        })
    }
}

impl Inner {
    fn enter(&mut self, offset: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.at.insert(id, offset);
        id
    }

    /// The output held from `offset` (`base <= offset < head`) to the end
    /// of the chunk that holds it.
    fn piece_at(&self, offset: u64) -> Bytes {
        let mut start = self.base;
        for chunk in &self.chunks {
            let end = start + chunk.len() as u64;
            if offset < end {
                // Both within this chunk's length.
                let from = (offset - start) as usize;
                return chunk.slice(from..);
            }
            start = end;
        }
        Bytes::new()
    }

    /// Drops the output every follower on the source has read, but for the
    /// last [`KEEP`] bytes in its first [`KEEP_FOR`] while all sources hold
    /// under half the [`BUDGET`].
    fn trim(&mut self) {
        let mut lowest = self.at.values().copied().min().unwrap_or(self.head);
        if let Some(until) = self.keep_until {
            if Instant::now() >= until {
                // Past it for good: no clock read on later pieces.
                self.keep_until = None;
            } else if HELD.load(Ordering::Relaxed) < BUDGET / 2 {
                lowest = lowest.min(self.head.saturating_sub(KEEP));
            }
        }
        while let Some(first) = self.chunks.front() {
            let end = self.base + first.len() as u64;
            if end > lowest {
                break;
            }
            HELD.fetch_sub(end - self.base, Ordering::Relaxed);
            self.base = end;
            self.chunks.pop_front();
        }
    }

    /// Sends the followers more than [`WINDOW`] behind the fastest one on
    /// the source off it (every one behind the fastest while all sources
    /// hold more than [`BUDGET`]), then drops what only they needed. The
    /// fastest stays, and so does a follower alone on its source: the one
    /// that just read is among them, and it must get what it read.
    fn let_laggards_go(&mut self, job_id: &str) {
        let Some(fastest) = self.at.values().copied().max() else {
            return;
        };
        if self.at.len() > 1 {
            let window = if HELD.load(Ordering::Relaxed) > BUDGET {
                0
            } else {
                WINDOW
            };
            let behind = fastest.saturating_sub(window);
            let slow: Vec<u64> = self
                .at
                .iter()
                .filter(|&(_, &at)| at < behind)
                .map(|(&id, _)| id)
                .collect();
            for id in slow {
                self.at.remove(&id);
                tracing::debug!(
                    job_id,
                    "follower fell behind a shared output stream; it goes on alone"
                );
            }
        }
        self.trim();
    }
}

/// What a follower does next, decided under the source's lock.
enum Step {
    /// It fell behind: a stream of its own.
    Alone,
    /// It reads the next message for every follower.
    Read(Output),
    /// Another follower is reading.
    Wait,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // What is still held goes with it.
        HELD.fetch_sub(self.head - self.base, Ordering::Relaxed);
    }
}

/// One follower's place on a source.
#[derive(Debug)]
pub(crate) struct Tap {
    source: Arc<Source>,
    id: u64,
    /// The offset of the next byte this follower reads.
    at: u64,
}

impl Tap {
    /// A place on `source` at `offset`, if it still holds that offset and
    /// its worker stream did not break.
    fn at(source: Arc<Source>, offset: u64) -> Option<Tap> {
        let id = {
            let mut inner = lock(&source.inner);
            // A stream that broke, or ended without the job's end (a
            // worker that closed it), may go on elsewhere: not joined.
            let ended_short = matches!(inner.end, Some(End::Broke(_) | End::Ended));
            if ended_short || offset < inner.base || offset > inner.head {
                return None;
            }
            inner.enter(offset)
        };
        Some(Tap {
            source,
            id,
            at: offset,
        })
    }

    fn first(source: Arc<Source>, offset: u64) -> Tap {
        let id = lock(&source.inner).enter(offset);
        Tap {
            source,
            id,
            at: offset,
        }
    }

    /// The next piece of output, or how the stream ended. An error ends
    /// the stream: the worker's stream broke (or one opened to go on alone
    /// could not be).
    pub(crate) async fn next(&mut self) -> Result<Piece, Status> {
        loop {
            let source = self.source.clone();
            let changed = source.changed.notified();
            tokio::pin!(changed);
            let step = {
                let mut inner = lock(&source.inner);
                if !inner.at.contains_key(&self.id) {
                    Step::Alone
                } else if self.at < inner.head {
                    let piece = inner.piece_at(self.at);
                    self.at += piece.len() as u64;
                    inner.at.insert(self.id, self.at);
                    inner.trim();
                    return Ok(Piece::Data(piece));
                } else if let Some(end) = &inner.end {
                    return match end {
                        End::Final(status) => Ok(Piece::Final(status.clone())),
                        End::Ended => Ok(Piece::Ended),
                        End::Broke(status) => Err(status.clone()),
                    };
                } else if let Some(output) = inner.output.take() {
                    Step::Read(output)
                } else {
                    // Another follower is reading: wait for what it
                    // brings. Enabled before the lock goes, so its news
                    // cannot come in between.
                    changed.as_mut().enable();
                    Step::Wait
                }
            };
            let output = match step {
                Step::Alone => {
                    self.go_alone().await?;
                    continue;
                }
                Step::Wait => {
                    changed.await;
                    continue;
                }
                Step::Read(output) => output,
            };
            // This follower reads the next message for all of them.
            let mut reading = Reading {
                source: &source,
                output: None,
            };
            let message = reading.output.insert(output).message().await;
            let mut inner = lock(&source.inner);
            inner.output = reading.output.take();
            match message {
                Ok(Some(message)) => {
                    for chunk in message.output {
                        inner.head += chunk.len() as u64;
                        HELD.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        inner.chunks.push_back(chunk);
                    }
                    if let Some(status) = message.final_status {
                        inner.end = Some(End::Final(status));
                    }
                }
                Ok(None) => inner.end = Some(End::Ended),
                Err(status) => inner.end = Some(End::Broke(status)),
            }
            inner.let_laggards_go(&source.key.0);
            drop(inner);
            source.changed.notify_waiters();
        }
    }

    /// Leaves a source this follower fell behind on, for a worker stream
    /// of its own from where it is.
    async fn go_alone(&mut self) -> Result<(), Status> {
        let output = (self.source.reopen)(self.at).await?;
        let reopen = self.source.reopen.clone();
        let source = Source::new(self.source.key.clone(), self.at, output, reopen, false);
        // The old place goes with the old tap (it was already taken off
        // its source's followers).
        *self = Tap::first(source, self.at);
        Ok(())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let mut inner = lock(&self.source.inner);
        inner.at.remove(&self.id);
        inner.trim();
    }
}

/// The worker's stream while one follower reads it: given back to the
/// source if that follower goes away mid-read (its client left), so
/// another can read on.
struct Reading<'a> {
    source: &'a Source,
    output: Option<Output>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        if let Some(output) = self.output.take() {
            lock(&self.source.inner).output = Some(output);
            self.source.changed.notify_waiters();
        }
    }
}

/// These locks guard plain data and are never held across an await; one
/// poisoned by a panic elsewhere still holds consistent data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source's state with one chunk of `head` bytes from 0 and a
    /// follower at each of `at`, its bytes counted in [`HELD`] as a source
    /// counts them.
    fn inner(head: u64, at: &[u64]) -> Inner {
        HELD.fetch_add(head, Ordering::Relaxed);
        let mut inner = Inner {
            chunks: VecDeque::from([Bytes::from(vec![0u8; head as usize])]),
            base: 0,
            head,
            at: HashMap::new(),
            next_id: 0,
            output: None,
            end: None,
            keep_until: None,
        };
        for &offset in at {
            inner.enter(offset);
        }
        inner
    }

    /// The followers sent off the source (entered, and no longer on it).
    fn left(inner: &Inner) -> Vec<u64> {
        (0..inner.next_id)
            .filter(|id| !inner.at.contains_key(id))
            .collect()
    }

    /// One test, as they share the process's count of held bytes.
    #[test]
    fn followers_behind_the_fastest_go_on_alone_and_the_fastest_and_a_lone_one_stay() {
        let head = WINDOW + (4 << 20);
        // Within the window of the fastest (not of the head): all stay.
        let mut near = inner(
            head,
            &[head - WINDOW - 1, head - (4 << 20), head - (4 << 20) + 1],
        );
        near.let_laggards_go("job");
        assert!(left(&near).is_empty());
        // Further behind the fastest than the window: it goes.
        let mut far = inner(head, &[0, head - 1, head]);
        far.let_laggards_go("job");
        assert_eq!(left(&far), [0]);

        // Over the budget: every follower behind the fastest goes, the
        // fastest stays, and so does a follower alone on its source,
        // however far behind the head it is.
        let over = inner(BUDGET + 1, &[]);
        let mut shared = inner(1 << 20, &[0, 10, 1 << 20]);
        shared.let_laggards_go("job");
        assert_eq!(left(&shared), [0, 1]);
        assert_eq!(shared.at.len(), 1);
        let mut alone = inner(1 << 20, &[0]);
        alone.let_laggards_go("job");
        assert!(left(&alone).is_empty());
        drop((near, far, over, shared, alone));
        assert_eq!(
            HELD.load(Ordering::Relaxed),
            0,
            "every byte held was given back"
        );

        // A piece starts at its offset inside the chunk that holds it.
        let mut inner = inner(0, &[]);
        for chunk in [&b"abc"[..], b"defgh", b"ij"] {
            inner.head += chunk.len() as u64;
            HELD.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            inner.chunks.push_back(Bytes::copy_from_slice(chunk));
        }
        assert_eq!(&inner.piece_at(0)[..], b"abc");
        assert_eq!(&inner.piece_at(4)[..], b"efgh");
        assert_eq!(&inner.piece_at(9)[..], b"j");
        drop(inner);
        assert_eq!(HELD.load(Ordering::Relaxed), 0);
    }
}

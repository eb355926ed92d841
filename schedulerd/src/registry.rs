//! The workers the scheduler knows, each with one long-lived gRPC channel
//! that every request about that worker reuses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use jobcluster_proto::pb::worker_client::WorkerClient;
use jobcluster_proto::transport::{self, AddressError, ClientConfigSource};
use tonic::transport::Channel;

use crate::state::WorkerState;
use crate::store::{StoreError, WorkerRow};

/// One worker: its record, the process instance that holds its name, and
/// its channel.
///
/// Every worker costs the scheduler this entry for as long as it is
/// known, so the entry holds no more than it must: the channel to the
/// worker is made on the first call to it (a channel is a task and a
/// request buffer of its own; most workers of a big cluster are called
/// rarely, and a worker that is never given a job is never dialled), and
/// the hot paths (heartbeats, the liveness sweep) read the record in place
/// instead of cloning it.
#[derive(Debug)]
pub(crate) struct WorkerEntry {
    row: Mutex<WorkerRow>,
    /// Empty until the worker has registered or heartbeated since this
    /// scheduler started.
    instance_id: Mutex<String>,
    /// Since when (Unix ms) a call to this worker timed out, until it is
    /// heard from again: placement skips it and calls that need it fail fast.
    unresponsive_since: Mutex<Option<u64>>,
    channel: OnceLock<Channel>,
    dial: Arc<Dial>,
    /// [`LOCAL_CHANGES`] at this entry's last change made here.
    changed: std::sync::atomic::AtomicU64,
    /// Store writes of changes made here that are under way ([`Writing`]).
    writing: std::sync::atomic::AtomicU32,
    /// The registration (numbered by [`Registry::register`]) this entry
    /// holds; 0 for a record loaded from the store.
    registration: std::sync::atomic::AtomicU64,
    /// A worker new here whose first registration the store does not hold
    /// yet: no job is placed on it and no drain is set, since an undo
    /// ([`Registry::undo_registration`]) would forget the id they name.
    /// Goes false once, when the write lands ([`Undo::recorded`]).
    unrecorded: std::sync::atomic::AtomicBool,
    /// Woken when this entry's registration's write is settled (recorded
    /// or not), for those waiting on [`WorkerEntry::wait_recorded`].
    settled: tokio::sync::Notify,
    /// A registration's write is under way for this entry.
    pending: std::sync::atomic::AtomicBool,
    /// Until when (Unix ms) the dispatcher passes this worker over: it
    /// refused a start for its storage (full, or failing), which it would
    /// refuse again for any job ([`WorkerEntry::refused_for_storage`]).
    storage_refused_until: std::sync::atomic::AtomicU64,
}

/// A store write of a change to one entry, under way until dropped. While
/// any is, a sync leaves the entry as it is: the sync's read of the store
/// may have begun before the write landed, and would put back the record
/// the change replaced (a worker that left listed `ready` again, one just
/// registered `left`). Taken before the change, so no sync can fall
/// between the change and the write.
#[must_use = "the entry is guarded only until this is dropped, after its store write"]
pub(crate) struct Writing(Arc<WorkerEntry>);

impl Writing {
    /// Runs `write`, the store write this guard covers, in a task of its
    /// own and drops the guard when it ends. A caller that stops waiting
    /// (a request whose client gave up) must not drop the guard while the
    /// write may still land, or a sync could read the old record after
    /// the guard is gone and before the write commits.
    pub(crate) async fn until<T: Send + 'static>(
        self,
        write: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        tokio::spawn(async move {
            let done = write.await;
            drop(self);
            done
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Records the state of worker `worker_id` through [`Writing::until`];
    /// with `registration`, only while that registration stands (see
    /// [`crate::store::Store::set_worker_state`]).
    pub(crate) async fn record_state(
        self,
        store: &crate::store::SharedStore,
        worker_id: &str,
        state: WorkerState,
        seen_ms: u64,
        registration: Option<u64>,
    ) -> Result<(), StoreError> {
        let (store, id) = (store.clone(), worker_id.to_owned());
        self.until(async move {
            store
                .set_worker_state(&id, state, seen_ms, registration)
                .await
        })
        .await
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        // Marked changed first: a sync that sees no write under way then
        // sees the mark too, and keeps the entry if its reads began before.
        self.0.mark_changed();
        self.0
            .writing
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Counts the changes this scheduler makes to its entries (a drain, a
/// heartbeat), so that a sync does not put back a record of the store's
/// read before such a change: the store's copy of it may be older.
static LOCAL_CHANGES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How the scheduler dials workers; shared by every entry.
#[derive(Debug)]
struct Dial {
    /// `None` in insecure (plaintext) mode.
    tls: Option<ClientConfigSource>,
    connect_timeout: Duration,
}

impl Dial {
    /// A lazily connected channel to `address`.
    fn channel(&self, address: &str) -> Result<Channel, AddressError> {
        match &self.tls {
            Some(tls) => transport::tls_channel_from(address, tls.clone(), self.connect_timeout),
            None => transport::plain_channel(address, self.connect_timeout),
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegisterError {
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error(
        "a worker named {name:?} is already registered from {address} and alive; a second worker with the same name is refused"
    )]
    Duplicate { name: String, address: String },
    #[error(
        "a registration of worker {name:?} is still being recorded; try again once it is (bounded: one at a time per worker)"
    )]
    InFlight { name: String },
}

impl WorkerEntry {
    /// Guards this entry against syncs until the store write of a change
    /// about to be made is done (see [`Writing`]).
    pub(crate) fn writing(self: &Arc<Self>) -> Writing {
        self.writing
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Writing(self.clone())
    }

    /// Whether a sync whose reads began at change `since` may put the
    /// store's record over this entry's. Asked under the record's lock, so
    /// no change made here falls between the answer and the overwrite.
    fn stale_since(&self, since: u64) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        self.writing.load(Acquire) == 0 && self.changed.load(Acquire) <= since
    }

    pub(crate) fn row(&self) -> WorkerRow {
        self.row.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the record in place (no copy of its strings and maps).
    pub(crate) fn with_row<R>(&self, f: impl FnOnce(&WorkerRow) -> R) -> R {
        f(&self.row.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn state(&self) -> WorkerState {
        self.with_row(|r| r.state)
    }

    /// Whether this entry is the worker with id `id`.
    pub(crate) fn has_id(&self, id: &str) -> bool {
        self.with_row(|r| r.worker_id == id)
    }

    /// Whether the worker is named `name`.
    pub(crate) fn named(&self, name: &str) -> bool {
        self.with_row(|r| r.name == name)
    }

    fn instance(&self) -> String {
        self.instance_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn instance_is_empty(&self) -> bool {
        self.instance_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn instance_is(&self, id: &str) -> bool {
        *self.instance_id.lock().unwrap_or_else(|e| e.into_inner()) == id
    }

    fn set_instance(&self, id: &str) {
        *self.instance_id.lock().unwrap_or_else(|e| e.into_inner()) = id.to_owned();
    }

    /// Since when the worker has not answered in time, if it has not.
    pub(crate) fn unresponsive_since(&self) -> Option<u64> {
        *self
            .unresponsive_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records that a call timed out. True if the worker was responsive
    /// until now (the caller then records its running jobs `unknown`).
    pub(crate) fn mark_unresponsive(&self, now_ms: u64) -> bool {
        let mut since = self
            .unresponsive_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let newly = since.is_none();
        since.get_or_insert(now_ms);
        newly
    }

    /// Records that the worker refused a start for its storage: the
    /// dispatcher leaves it out for [`STORAGE_REFUSAL_BACKOFF`]. Otherwise
    /// a worker that can start nothing, having the fewest running jobs,
    /// would be every pass's first choice for the head of the queue, which
    /// it would refuse again while other workers have free slots.
    pub(crate) fn refused_for_storage(&self, now_ms: u64) {
        let until = now_ms.saturating_add(STORAGE_REFUSAL_BACKOFF.as_millis() as u64);
        self.storage_refused_until
            .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the worker refused a start for its storage within the last
    /// [`STORAGE_REFUSAL_BACKOFF`].
    pub(crate) fn storage_refusing(&self, now_ms: u64) -> bool {
        self.storage_refused_until
            .load(std::sync::atomic::Ordering::Relaxed)
            > now_ms
    }

    /// Ready, answering and recorded: placement may use it.
    pub(crate) fn usable(&self) -> bool {
        self.state() == WorkerState::Ready && self.unresponsive_since().is_none() && self.recorded()
    }

    /// Whether the store holds this worker (false only while a new
    /// worker's first registration is written).
    pub(crate) fn recorded(&self) -> bool {
        !self.unrecorded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the store holds this worker, waiting up to `limit` for a
    /// registration's write under way: a worker just listed `ready` takes
    /// a start at once, not a refusal, once its record lands (false if the
    /// write failed or took longer).
    pub(crate) async fn wait_recorded(&self, limit: Duration) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        // Every start asks: once recorded, an atomic load answers, without
        // joining the waiters' list.
        if self.recorded() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the checks, so a wake-up between them and
            // the wait is not missed.
            let mut notified = std::pin::pin!(self.settled.notified());
            notified.as_mut().enable();
            if self.recorded() {
                return true;
            }
            if !self.pending.load(Acquire) {
                return false;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.recorded();
            }
        }
    }

    pub(crate) fn id(&self) -> String {
        self.with_row(|r| r.worker_id.clone())
    }

    /// A handle on the worker's shared channel (cloning is cheap; the
    /// connection is not duplicated), made on first use.
    pub(crate) fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::new(self.channel())
    }

    /// The worker's shared channel, for calls made without the generated
    /// client ([`crate::output_stream`]).
    pub(crate) fn channel(&self) -> Channel {
        self.channel
            .get_or_init(|| {
                let address = self.with_row(|r| r.address.clone());
                self.dial.channel(&address).unwrap_or_else(|error| {
                    // Not expected: the same address made a channel when
                    // the worker registered (or was loaded).
                    tracing::error!(worker_id = %self.id(), %error, "cannot dial the worker");
                    transport::failing_channel(error.to_string())
                })
            })
            .clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut WorkerRow)) -> WorkerRow {
        let mut row = self.row.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut row);
        self.mark_changed();
        row.clone()
    }

    /// Records that this scheduler changed the entry (or finished writing
    /// a change of it to the store) now: see [`Registry::refresh`].
    fn mark_changed(&self) {
        let change = LOCAL_CHANGES.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        // The larger of two marks racing wins: a guard's drop (no lock
        // held) may fall between another change's number and its store.
        self.changed
            .fetch_max(change, std::sync::atomic::Ordering::AcqRel);
    }

    /// Like [`update`](Self::update), returning what `f` returns instead
    /// of a copy of the record.
    pub(crate) fn modify<R>(&self, f: impl FnOnce(&mut WorkerRow) -> R) -> R {
        f(&mut self.row.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[derive(Debug, Default)]
struct Maps {
    by_id: HashMap<String, Arc<WorkerEntry>>,
    /// Ordered, so the worker list is paged by name without a sort.
    by_name: std::collections::BTreeMap<String, String>,
    /// Ids of removed workers, never given out again.
    removed: HashSet<String>,
}

impl Maps {
    /// Takes worker `id` out of the maps, and its `name` if that still
    /// names it.
    fn detach(&mut self, id: &str, name: &str) {
        self.by_id.remove(id);
        if self.by_name.get(name).is_some_and(|held| held == id) {
            self.by_name.remove(name);
        }
    }
}

/// Why a worker could not be removed.
#[derive(Debug)]
pub(crate) enum RemoveError {
    NotFound,
    /// It is `ready` (the worker's name): its record is still the truth
    /// about a live process.
    Alive(String),
    /// Its registration's write is under way (the worker's name): the
    /// write, landing after the removal's, would bring its row back.
    Registering(String),
}

#[derive(Debug)]
pub(crate) struct Registry {
    // std RwLock: held for map lookups only, never across an await.
    maps: RwLock<Maps>,
    /// Held through a whole registration or removal (never across an
    /// await), so a removal cannot fall between a registration's lookup of
    /// the name and its insert.
    membership: Mutex<()>,
    dial: Arc<Dial>,
    /// On a shared store: the workers heard from since the last
    /// [`Registry::take_heard`], for the store (the leader judges liveness
    /// from it). `None`: not kept.
    heard: Mutex<Option<HashSet<String>>>,
    /// When (Unix ms) a lookup that missed last synced with the store.
    missed_at: std::sync::atomic::AtomicU64,
    /// Registrations made here, to tell them apart ([`Undo`]).
    registrations: std::sync::atomic::AtomicU64,
    /// The workers (by name) whose registration's store write is under
    /// way: one at a time per worker, so an undo never goes back over a
    /// newer registration. Emptied by each [`Undo`]'s drop.
    registering: Arc<Mutex<HashSet<String>>>,
}

/// A lookup that misses syncs with a shared store at most this often, so
/// requests naming unknown workers cannot turn into a read of every
/// worker's record each.
const RESYNC_ON_MISS_MS: u64 = 100;

/// How long the dispatcher passes over a worker that refused a start for
/// its storage: two heartbeat intervals by default, long enough for the
/// queue's head to go to another worker, short enough that a worker
/// whose disk was freed gets queued jobs again soon.
pub(crate) const STORAGE_REFUSAL_BACKOFF: Duration = Duration::from_secs(10);

/// What a sync did with one entry it knew.
enum Took {
    /// Changed here since the sync's reads began, or being written.
    Kept,
    /// The worker moved to another address (the record read).
    Moved(WorkerRow),
    /// The record read; `again`: registered again since.
    Taken { again: bool },
}

/// How to undo a registration whose store write failed
/// ([`Registry::undo_registration`]), so the API does not go on showing a
/// registration the store does not hold. While it lives, the worker's
/// next registration is refused ([`RegisterError::InFlight`]); dropped
/// (after the write, whatever became of it, a panic included), it lets
/// the next one in.
#[derive(Debug)]
pub(crate) struct Undo {
    /// The registration's number.
    registration: u64,
    /// Taken by the undo.
    replaced: Option<Replaced>,
    /// The entry the registration left in the registry.
    entry: Arc<WorkerEntry>,
    name: String,
    registering: Arc<Mutex<HashSet<String>>>,
}

impl Undo {
    /// The registration's write landed: a worker new here may now take
    /// jobs and drains.
    pub(crate) fn recorded(self) {
        self.entry.unrecorded.store(false, Release);
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        self.registering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
        self.entry.pending.store(false, Release);
        self.entry.settled.notify_waiters();
    }
}

/// What a registration replaced.
#[derive(Debug)]
enum Replaced {
    /// Nothing: the worker was new to this scheduler.
    Nothing,
    /// The same entry, changed in place (same address), as it was.
    Record {
        row: Box<WorkerRow>,
        instance: String,
        unresponsive_since: Option<u64>,
        registration: u64,
    },
    /// The entry the registration's new one took the place of (a new
    /// address: a new entry, with a channel of its own).
    Entry(Arc<WorkerEntry>),
}

/// What a registering worker says about itself.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) plugins: Vec<String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) previous_worker_id: String,
    pub(crate) instance_id: String,
    pub(crate) cgroup_limits: bool,
    pub(crate) extensions: BTreeMap<String, Vec<String>>,
    pub(crate) max_jobs: u32,
    /// A worker of the original contract: checked on, not heartbeating.
    pub(crate) seed: bool,
}

impl Registry {
    pub(crate) fn new(tls: Option<ClientConfigSource>, connect_timeout: Duration) -> Self {
        Registry {
            maps: RwLock::new(Maps::default()),
            membership: Mutex::new(()),
            dial: Arc::new(Dial {
                tls,
                connect_timeout,
            }),
            heard: Mutex::new(None),
            missed_at: Default::default(),
            registrations: Default::default(),
            registering: Default::default(),
        }
    }

    /// One sync with the schedulers sharing `store`: the workers heard here
    /// are recorded as seen, and the registry takes the store's records.
    pub(crate) async fn sync(&self, store: &crate::store::SharedStore) {
        let heard = self.take_heard();
        if !heard.is_empty()
            && let Err(error) = store
                .touch_workers(heard.clone(), crate::time::now_ms())
                .await
        {
            tracing::warn!(%error, "could not record the workers heard from; trying again at the next sync");
            for id in &heard {
                self.heard_from(id);
            }
        }
        // Changes made here from now on are newer than what is read next.
        let since = LOCAL_CHANGES.load(std::sync::atomic::Ordering::Acquire);
        match tokio::try_join!(store.workers(), store.removed_worker_ids()) {
            Ok((rows, removed)) => self.refresh(rows, removed, since),
            Err(error) => {
                tracing::warn!(%error, "could not read the workers other schedulers recorded")
            }
        }
    }

    /// A worker by id or by name; on a shared store, one this scheduler
    /// does not know yet (registered with another a moment ago) is looked
    /// for in the store too.
    pub(crate) async fn find(
        &self,
        id_or_name: &str,
        store: &crate::store::SharedStore,
    ) -> Option<Arc<WorkerEntry>> {
        if let Some(entry) = self.get(id_or_name) {
            return Some(entry);
        }
        let now = crate::time::now_ms();
        let last = self
            .missed_at
            .swap(now, std::sync::atomic::Ordering::Relaxed);
        if !store.shared() || now.saturating_sub(last) < RESYNC_ON_MISS_MS {
            return None;
        }
        self.sync(store).await;
        self.get(id_or_name)
    }

    /// Keeps the ids of the workers heard from, for [`Registry::take_heard`].
    pub(crate) fn keep_heard(&self) {
        *self.heard.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashSet::new());
    }

    /// The workers heard from since the last call.
    pub(crate) fn take_heard(&self) -> Vec<String> {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(|heard| heard.drain().collect())
            .unwrap_or_default()
    }

    fn heard_from(&self, worker_id: &str) {
        if let Some(heard) = self
            .heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            heard.insert(worker_id.to_owned());
        }
    }

    /// Sets a worker's drain flag under the membership lock, so a
    /// registration under way (which carries the flag over to the entry
    /// it makes) cannot put the old value back. The entry and its record,
    /// or `None` for an unknown worker.
    pub(crate) fn set_draining(
        &self,
        id_or_name: &str,
        draining: bool,
    ) -> Option<(Arc<WorkerEntry>, WorkerRow)> {
        let _membership = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let entry = self.get(id_or_name)?;
        let row = entry.update(|r| r.draining = draining);
        Some((entry, row))
    }

    /// Brings the registry up to the store's records, which every
    /// scheduler sharing the store writes: workers registered elsewhere
    /// are added (or replaced, when they registered again since), states
    /// the leader judged (`down`) and flags set elsewhere (drain) are
    /// taken, a worker's last word is the latest any scheduler heard, and
    /// workers removed elsewhere go. An entry changed here after `since`
    /// (the reads began), or with a store write under way ([`Writing`]),
    /// keeps its record: the next sync brings the rest.
    pub(crate) fn refresh(&self, rows: Vec<WorkerRow>, removed: Vec<String>, since: u64) {
        let _membership = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
            for id in removed {
                if let Some(entry) = maps.by_id.remove(&id) {
                    let name = entry.with_row(|r| r.name.clone());
                    if maps.by_name.get(&name) == Some(&id) {
                        maps.by_name.remove(&name);
                    }
                }
                maps.removed.insert(id);
            }
        }
        for row in rows {
            if self.is_removed(&row.worker_id) {
                continue;
            }
            let known = self
                .get(&row.worker_id)
                .filter(|e| e.has_id(&row.worker_id));
            match known {
                Some(entry) => {
                    let last_seen = row.last_seen_ms;
                    let took = entry.modify(|r| {
                        if !entry.stale_since(since) {
                            return Took::Kept;
                        }
                        if r.address != row.address {
                            return Took::Moved(row);
                        }
                        let again = row.registered_at_ms > r.registered_at_ms;
                        let seen = r.last_seen_ms.max(row.last_seen_ms);
                        *r = row;
                        r.last_seen_ms = seen;
                        Took::Taken { again }
                    });
                    match took {
                        Took::Kept => continue,
                        Took::Moved(row) => {
                            // Its channel dials the old address: a new entry.
                            if let Ok(fresh) = self.entry(row) {
                                self.insert(fresh);
                            }
                            continue;
                        }
                        Took::Taken { again } => {
                            if again {
                                // Registered again elsewhere, as another
                                // process perhaps: whichever instance
                                // heartbeats here next is the one.
                                entry.set_instance("");
                            }
                        }
                    }
                    // Heard from (by some scheduler) since this one found it
                    // unresponsive: trusted again, as after a heartbeat here.
                    let mut unresponsive = entry
                        .unresponsive_since
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if unresponsive.is_some_and(|since| last_seen > since) {
                        *unresponsive = None;
                    }
                }
                None => match self.entry(row) {
                    Ok(entry) => {
                        entry.with_row(|r| crate::metrics::plugins_declared(&r.plugins));
                        self.insert(entry);
                    }
                    Err(error) => tracing::warn!(%error, "skipping a recorded worker"),
                },
            }
        }
    }

    /// An entry for `row`; its address must make a channel (the one made
    /// here to check it is dropped: the entry dials on first use).
    fn entry(&self, row: WorkerRow) -> Result<Arc<WorkerEntry>, AddressError> {
        drop(self.dial.channel(&row.address)?);
        Ok(Arc::new(WorkerEntry {
            row: Mutex::new(row),
            instance_id: Mutex::new(String::new()),
            unresponsive_since: Mutex::new(None),
            channel: OnceLock::new(),
            dial: self.dial.clone(),
            changed: std::sync::atomic::AtomicU64::new(0),
            writing: std::sync::atomic::AtomicU32::new(0),
            registration: std::sync::atomic::AtomicU64::new(0),
            unrecorded: std::sync::atomic::AtomicBool::new(false),
            settled: tokio::sync::Notify::new(),
            pending: std::sync::atomic::AtomicBool::new(false),
            storage_refused_until: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Loads the workers recorded before a restart; their channels connect
    /// on first use. Live workers count as seen now, so each gets a full
    /// `down_after` to check in with this scheduler.
    pub(crate) fn load(&self, rows: Vec<WorkerRow>, now_ms: u64) {
        for mut row in rows {
            crate::metrics::plugins_declared(&row.plugins);
            if row.state != WorkerState::Left {
                row.last_seen_ms = now_ms;
            }
            match self.entry(row.clone()) {
                Ok(entry) => self.insert(entry),
                Err(error) => {
                    tracing::warn!(worker_id = %row.worker_id, %error, "skipping a recorded worker");
                }
            }
        }
    }

    /// Loads the ids of workers removed before a restart.
    pub(crate) fn load_removed(&self, ids: Vec<String>) {
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        maps.removed.extend(ids);
    }

    /// Forgets a worker that is not `ready` (`down` or `left`). Its id is
    /// never given out again: if the worker comes back, it registers anew
    /// and gets a new id.
    pub(crate) fn remove(&self, id_or_name: &str) -> Result<Arc<WorkerEntry>, RemoveError> {
        let _membership = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        let id = if maps.by_id.contains_key(id_or_name) {
            id_or_name.to_owned()
        } else {
            maps.by_name
                .get(id_or_name)
                .cloned()
                .ok_or(RemoveError::NotFound)?
        };
        let entry = maps.by_id.get(&id).cloned().ok_or(RemoveError::NotFound)?;
        // A heartbeat racing this check revives only the detached entry; it
        // is answered `known: false` (the worker was down), so the worker
        // registers again, under a new id.
        let row = entry.row();
        if row.state == WorkerState::Ready {
            return Err(RemoveError::Alive(row.name));
        }
        if self.registering().contains(&row.name) {
            return Err(RemoveError::Registering(row.name));
        }
        maps.detach(&id, &row.name);
        maps.removed.insert(id);
        Ok(entry)
    }

    /// Undoes a removal whose recording failed, unless another worker has
    /// taken the name since.
    pub(crate) fn restore(&self, entry: Arc<WorkerEntry>) {
        let _membership = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let row = entry.row();
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        if maps.by_name.contains_key(&row.name) {
            return;
        }
        maps.removed.remove(&row.worker_id);
        maps.by_name.insert(row.name.clone(), row.worker_id.clone());
        maps.by_id.insert(row.worker_id, entry);
    }

    fn is_removed(&self, id: &str) -> bool {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        maps.removed.contains(id)
    }

    fn insert(&self, entry: Arc<WorkerEntry>) {
        let row = entry.row();
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        maps.by_name.insert(row.name.clone(), row.worker_id.clone());
        maps.by_id.insert(row.worker_id, entry);
    }

    /// A worker by id or by name.
    pub(crate) fn get(&self, id_or_name: &str) -> Option<Arc<WorkerEntry>> {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        maps.by_id.get(id_or_name).cloned().or_else(|| {
            maps.by_name
                .get(id_or_name)
                .and_then(|id| maps.by_id.get(id))
                .cloned()
        })
    }

    /// Counts every worker that has not left as seen now: after the
    /// scheduler itself was paused or its clock jumped, silence says
    /// nothing about the workers.
    pub(crate) fn touch_all(&self, now_ms: u64) {
        for entry in self.entries() {
            entry.modify(|r| {
                if r.state != WorkerState::Left {
                    r.last_seen_ms = now_ms;
                }
            });
        }
    }

    pub(crate) fn entries(&self) -> Vec<Arc<WorkerEntry>> {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        maps.by_id.values().cloned().collect()
    }

    /// Up to `limit` workers by name after `after`, with those that left
    /// only if `with_left`; the flag says whether more follow.
    pub(crate) fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        with_left: bool,
    ) -> (Vec<Arc<WorkerEntry>>, bool) {
        use std::ops::Bound;
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page: Vec<Arc<WorkerEntry>> = maps
            .by_name
            .range::<str, _>((from, Bound::Unbounded))
            .filter_map(|(_, id)| maps.by_id.get(id))
            .filter(|e| with_left || e.state() != WorkerState::Left)
            .take(limit + 1)
            .cloned()
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        (page, more)
    }

    pub(crate) fn all(&self) -> Vec<WorkerRow> {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = maps.by_id.values().map(|e| e.row()).collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Registers a worker and returns its record, to be written to the
    /// store before the guard drops. A worker keeps its id across
    /// restarts: the id recorded for its name, else the id it presents (the
    /// scheduler may have lost its records), else a new one.
    pub(crate) fn register(
        &self,
        reg: Registration,
        now_ms: u64,
        down_after: Duration,
    ) -> Result<(WorkerRow, Writing, Undo), RegisterError> {
        let _membership = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        if self.registering().contains(&reg.name) {
            return Err(RegisterError::InFlight { name: reg.name });
        }
        let existing = self.get(&reg.name).filter(|e| e.row().name == reg.name);
        if let Some(entry) = &existing {
            let row = entry.row();
            let holder = entry.instance();
            let alive = now_ms.saturating_sub(row.last_seen_ms) < down_after.as_millis() as u64;
            if row.state == WorkerState::Ready
                && alive
                && !holder.is_empty()
                && holder != reg.instance_id
            {
                return Err(RegisterError::Duplicate {
                    name: row.name,
                    address: row.address,
                });
            }
        }
        let worker_id = match &existing {
            Some(entry) => entry.id(),
            None => match uuid::Uuid::parse_str(&reg.previous_worker_id) {
                // Only if no other worker holds that id and it was not
                // removed (the old records keep it).
                Ok(id)
                    if self.get(&id.to_string()).is_none() && !self.is_removed(&id.to_string()) =>
                {
                    id.to_string()
                }
                _ => uuid::Uuid::new_v4().to_string(),
            },
        };
        let row = WorkerRow {
            worker_id,
            name: reg.name,
            address: reg.address,
            state: WorkerState::Ready,
            plugins: reg.plugins,
            labels: crate::store::small_map(reg.labels),
            registered_at_ms: now_ms,
            last_seen_ms: now_ms,
            cgroup_limits: reg.cgroup_limits,
            extensions: crate::store::small_map(reg.extensions),
            // A drain outlives the worker's restarts; only undrain ends it.
            draining: existing.as_ref().is_some_and(|e| e.row().draining),
            max_jobs: reg.max_jobs,
            seed: reg.seed,
        };
        crate::metrics::plugins_declared(&row.plugins);
        let registration = self.registrations.fetch_add(1, AcqRel) + 1;
        match existing {
            // Same address: keep the channel (and its live connection).
            Some(entry) if entry.row().address == row.address => {
                let writing = entry.writing();
                let replaced = Replaced::Record {
                    row: Box::new(entry.row()),
                    instance: entry.instance(),
                    unresponsive_since: entry.unresponsive_since(),
                    registration: entry.registration.swap(registration, AcqRel),
                };
                entry.update(|r| *r = row.clone());
                entry.set_instance(&reg.instance_id);
                // It answered: a full report follows, so it is trusted again.
                *entry
                    .unresponsive_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                let undo = self.in_flight(registration, replaced, entry);
                Ok((row, writing, undo))
            }
            existing => {
                let entry = self.entry(row.clone())?;
                entry.set_instance(&reg.instance_id);
                entry.registration.store(registration, Release);
                // A new address keeps the recorded id; only a new worker
                // waits for its record.
                let unrecorded = existing.as_ref().is_none_or(|e| !e.recorded());
                entry.unrecorded.store(unrecorded, Release);
                entry.pending.store(true, Release);
                let writing = entry.writing();
                self.insert(entry.clone());
                let replaced = existing.map_or(Replaced::Nothing, Replaced::Entry);
                let undo = self.in_flight(registration, replaced, entry);
                Ok((row, writing, undo))
            }
        }
    }

    fn registering(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.registering.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the worker `name`'s registration `registration` in flight
    /// until the returned [`Undo`] drops.
    fn in_flight(&self, registration: u64, replaced: Replaced, entry: Arc<WorkerEntry>) -> Undo {
        let name = entry.with_row(|r| r.name.clone());
        self.registering().insert(name.clone());
        Undo {
            registration,
            replaced: Some(replaced),
            entry,
            name,
            registering: self.registering.clone(),
        }
    }

    /// Undoes the registration that recorded `row`, whose store write
    /// failed: what it replaced comes back (or a worker new here is
    /// forgotten); true if so, false if the entry no longer holds it (a
    /// sync or a removal took it since). A drain set meanwhile (written to
    /// the store before the registry, see [`Registry::set_draining`]) is
    /// kept. Call before the registration's [`Writing`] guard drops, so
    /// that no sync falls between the failed write and the undo.
    pub(crate) fn undo_registration(&self, row: &WorkerRow, mut undo: Undo) -> bool {
        let _membership = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = self
            .get(&row.worker_id)
            .filter(|e| e.registration.load(Acquire) == undo.registration)
        else {
            return false;
        };
        let Some(replaced) = undo.replaced.take() else {
            return false;
        };
        // What happened meanwhile stays: a drain, a deregistration, a call
        // that timed out. Only the registration's own change goes.
        let (draining, left) = entry.with_row(|r| (r.draining, r.state == WorkerState::Left));
        let timed_out = entry.unresponsive_since();
        let carry = |r: &mut WorkerRow| {
            r.draining = draining;
            if left {
                r.state = WorkerState::Left;
            }
        };
        match replaced {
            Replaced::Record {
                row: mut before,
                instance,
                unresponsive_since,
                registration,
            } => {
                carry(&mut before);
                entry.update(|r| *r = *before);
                entry.set_instance(&instance);
                entry.registration.store(registration, Release);
                *entry
                    .unresponsive_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = timed_out.or(unresponsive_since);
            }
            Replaced::Entry(before) => {
                before.update(carry);
                if let Some(since) = timed_out {
                    before.mark_unresponsive(since);
                }
                self.insert(before);
            }
            Replaced::Nothing => {
                let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
                maps.detach(&row.worker_id, &row.name);
            }
        }
        true
    }

    /// A heartbeat from `worker_id`. `None` when the scheduler does not
    /// know this worker or this instance of it (it must register again).
    /// Otherwise the updated record and whether the worker was down or
    /// unresponsive until now (its jobs' records may then be behind: it
    /// must register again with a full report).
    ///
    /// The most frequent call of all (every worker, every interval): it
    /// copies nothing.
    pub(crate) fn heartbeat(
        &self,
        worker_id: &str,
        instance_id: &str,
        now_ms: u64,
    ) -> Option<(Arc<WorkerEntry>, bool)> {
        let entry = self.get(worker_id).filter(|e| e.has_id(worker_id))?;
        if entry.instance_is_empty() {
            // First word from this worker since the scheduler started.
            entry.set_instance(instance_id);
        } else if !entry.instance_is(instance_id) {
            return None;
        }
        if entry.state() == WorkerState::Left {
            return None;
        }
        let was_unresponsive = entry
            .unresponsive_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some();
        self.heard_from(worker_id);
        let came_back = entry.modify(|r| {
            r.last_seen_ms = now_ms;
            if r.state == WorkerState::Down {
                r.state = WorkerState::Ready;
                return true;
            }
            false
        }) || was_unresponsive;
        Some((entry, came_back))
    }

    /// A worker of the original contract answered the scheduler's check:
    /// as good as a heartbeat. `None` if it has left; else whether it was
    /// `down` until now (its state is then `ready` again, to be recorded).
    pub(crate) fn checked(&self, entry: &WorkerEntry, now_ms: u64) -> Option<bool> {
        if entry.state() == WorkerState::Left {
            return None;
        }
        *entry
            .unresponsive_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        let mut came_back = false;
        entry.update(|r| {
            if r.state == WorkerState::Down {
                came_back = true;
                r.state = WorkerState::Ready;
            }
            r.last_seen_ms = now_ms;
        });
        Some(came_back)
    }

    /// Marks `ready` workers not heard from for `down_after` as `down` and
    /// returns them, each to be recorded before its guard drops.
    pub(crate) fn sweep(&self, now_ms: u64, down_after: Duration) -> Vec<(WorkerRow, Writing)> {
        let entries: Vec<_> = self
            .maps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .values()
            .cloned()
            .collect();
        let limit = down_after.as_millis() as u64;
        // Runs every second over every worker: only those that went down
        // are copied.
        entries
            .iter()
            .filter_map(|entry| {
                entry.modify(|r| {
                    (r.state == WorkerState::Ready && now_ms.saturating_sub(r.last_seen_ms) > limit)
                        .then(|| {
                            let writing = entry.writing();
                            r.state = WorkerState::Down;
                            (r.clone(), writing)
                        })
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(name: &str, previous_worker_id: &str) -> Registration {
        Registration {
            name: name.to_owned(),
            address: "127.0.0.1:1".to_owned(),
            plugins: vec!["bash".to_owned()],
            labels: BTreeMap::new(),
            previous_worker_id: previous_worker_id.to_owned(),
            instance_id: uuid::Uuid::new_v4().to_string(),
            cgroup_limits: false,
            extensions: BTreeMap::new(),
            max_jobs: 0,
            seed: false,
        }
    }

    #[tokio::test]
    async fn only_a_worker_that_is_not_ready_is_removed_and_its_id_is_never_reused() {
        let registry = Registry::new(None, Duration::from_secs(1));
        let down_after = Duration::from_secs(2);
        let (first, _, _) = registry
            .register(registration("w1", ""), 0, down_after)
            .unwrap();
        assert!(matches!(registry.remove("w1"), Err(RemoveError::Alive(name)) if name == "w1"));
        assert!(matches!(registry.remove("w9"), Err(RemoveError::NotFound)));

        assert_eq!(registry.sweep(10_000, down_after).len(), 1);
        registry.remove(&first.worker_id).unwrap();
        assert!(registry.get("w1").is_none());
        assert!(registry.get(&first.worker_id).is_none());
        assert!(
            registry
                .heartbeat(&first.worker_id, "any", 10_001)
                .is_none()
        );

        // Back with the id it kept: a new one.
        let (again, _, _) = registry
            .register(registration("w1", &first.worker_id), 10_002, down_after)
            .unwrap();
        assert_ne!(again.worker_id, first.worker_id);
        assert_eq!(registry.get("w1").map(|e| e.id()), Some(again.worker_id));
    }

    /// A registration whose store write failed is undone: a new worker is
    /// forgotten, a returning one gets back its record (same address) or
    /// its entry (a new address) with a drain set meanwhile, and a later
    /// registration is left alone.
    #[tokio::test]
    async fn a_registration_the_store_did_not_keep_is_undone() {
        let registry = Registry::new(None, Duration::from_secs(1));
        let down_after = Duration::from_secs(2);
        let reg = registration("w1", "");
        let (row, writing, undo) = registry.register(reg.clone(), 0, down_after).unwrap();
        drop(writing);
        // New here and not yet recorded: no job may name its id.
        let unwritten = registry.get("w1").unwrap();
        assert!(!unwritten.recorded() && !unwritten.usable());
        registry.undo_registration(&row, undo);
        assert!(registry.get("w1").is_none() && registry.get(&row.worker_id).is_none());
        assert!(!unwritten.recorded());

        let (kept, writing, undo) = registry.register(reg.clone(), 0, down_after).unwrap();
        drop(writing);
        let kept_entry = registry.get("w1").unwrap();
        assert!(!kept_entry.recorded());
        undo.recorded();
        assert!(kept_entry.recorded() && kept_entry.usable());

        // Again from the same address, with another instance and limit;
        // drained while its write was under way.
        let again = Registration {
            max_jobs: 7,
            ..registration("w1", &kept.worker_id)
        };
        let (row, writing, undo) = registry.register(again, 10_000, down_after).unwrap();
        assert_eq!(registry.get("w1").unwrap().row().max_jobs, 7);
        registry.get("w1").unwrap().update(|r| r.draining = true);
        registry.undo_registration(&row, undo);
        drop(writing);
        let entry = registry.get("w1").unwrap();
        assert!(Arc::ptr_eq(&entry, &kept_entry));
        assert_eq!(
            entry.row(),
            WorkerRow {
                draining: true,
                ..kept.clone()
            }
        );
        assert!(entry.instance_is(&reg.instance_id));
        entry.update(|r| r.draining = false);

        // From a new address: a new entry, then the old one back.
        let moved = Registration {
            address: "127.0.0.1:2".to_owned(),
            ..registration("w1", &kept.worker_id)
        };
        let (row, writing, undo) = registry.register(moved, 20_000, down_after).unwrap();
        drop(writing);
        assert_eq!(
            registry.get(&kept.worker_id).unwrap().row().address,
            "127.0.0.1:2"
        );
        registry.undo_registration(&row, undo);
        assert!(Arc::ptr_eq(
            &registry.get(&kept.worker_id).unwrap(),
            &kept_entry
        ));
        assert_eq!(registry.get("w1").unwrap().row(), kept);

        // A deregistration and a call that timed out meanwhile stay.
        let (row, writing, undo) = registry
            .register(registration("w1", &kept.worker_id), 30_000, down_after)
            .unwrap();
        kept_entry.update(|r| r.state = WorkerState::Left);
        kept_entry.mark_unresponsive(30_001);
        assert!(registry.undo_registration(&row, undo));
        drop(writing);
        assert_eq!(
            registry.get("w1").unwrap().row(),
            WorkerRow {
                state: WorkerState::Left,
                ..kept.clone()
            }
        );
        assert_eq!(kept_entry.unresponsive_since(), Some(30_001));

        // Not removed while its registration is written (the write would
        // bring its row back), even once it has left; removed after.
        let (row, writing, undo) = registry
            .register(registration("w1", &kept.worker_id), 40_000, down_after)
            .unwrap();
        registry
            .get("w1")
            .unwrap()
            .update(|r| r.state = WorkerState::Left);
        assert!(matches!(
            registry.remove("w1"),
            Err(RemoveError::Registering(name)) if name == "w1"
        ));
        assert!(registry.undo_registration(&row, undo));
        drop(writing);
        registry.remove("w1").unwrap();
        assert!(registry.get("w1").is_none() && registry.get(&kept.worker_id).is_none());
    }

    /// One registration per worker at a time: a worker whose deadline
    /// dropped its call and tries again while the first write is under
    /// way is refused until that write is settled (recorded, undone, or
    /// its task gone), so an undo only ever goes back to what was there
    /// before. Other workers are not held back.
    #[tokio::test]
    async fn a_second_registration_waits_until_the_first_is_settled() {
        let registry = Registry::new(None, Duration::from_secs(1));
        let down_after = Duration::from_secs(2);
        let reg = registration("w1", "");
        let (first, _writing, undo) = registry.register(reg.clone(), 0, down_after).unwrap();
        assert!(matches!(
            registry.register(reg.clone(), 1, down_after),
            Err(RegisterError::InFlight { name }) if name == "w1"
        ));
        let (_, _, other) = registry
            .register(registration("w2", ""), 1, down_after)
            .unwrap();
        drop(other);

        // Undone: back to nothing, and the next one is let in.
        assert!(registry.undo_registration(&first, undo));
        assert!(registry.get("w1").is_none());
        let (second, _writing, undo) = registry.register(reg.clone(), 2, down_after).unwrap();
        // Recorded: it stands, and takes jobs.
        undo.recorded();
        assert_eq!(registry.get("w1").unwrap().row(), second);
        assert!(registry.get("w1").unwrap().recorded());
        assert!(registry.registering().is_empty());

        // A later registration's undo goes back to the recorded one.
        let (third, _writing, undo) = registry.register(reg, 10_000, down_after).unwrap();
        assert_ne!(third, second);
        assert!(registry.undo_registration(&third, undo));
        assert_eq!(registry.get("w1").unwrap().row(), second);
        assert!(registry.registering().is_empty());
    }

    /// A registry that has just registered `w1`: its entry, its record
    /// and the registration's guard.
    fn registered_w1() -> (Registry, Arc<WorkerEntry>, WorkerRow, Writing) {
        let registry = Registry::new(None, Duration::from_secs(1));
        let (ready, writing, undo) = registry
            .register(registration("w1", ""), 0, Duration::from_secs(2))
            .unwrap();
        undo.recorded();
        let entry = registry.get("w1").unwrap();
        (registry, entry, ready, writing)
    }

    /// Where a sync whose reads begin now would stand.
    fn changes_now() -> u64 {
        LOCAL_CHANGES.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The failure this guards against: a worker deregistered while a sync
    /// read the store, and the sync put its `ready` record back.
    #[tokio::test]
    async fn a_sync_never_puts_back_a_record_read_before_a_write_landed() {
        let (registry, entry, ready, writing) = registered_w1();
        drop(writing);
        let since = changes_now();

        // Left here, written; the sync read the old record meanwhile.
        let writing = entry.writing();
        entry.update(|r| r.state = WorkerState::Left);
        registry.refresh(vec![ready.clone()], Vec::new(), u64::MAX);
        assert_eq!(entry.state(), WorkerState::Left, "a write under way");
        drop(writing);
        registry.refresh(vec![ready.clone()], Vec::new(), since);
        assert_eq!(entry.state(), WorkerState::Left, "a read begun before");

        // A read begun after the write lands is the store's truth.
        let since = changes_now();
        registry.refresh(vec![ready], Vec::new(), since);
        assert_eq!(entry.state(), WorkerState::Ready);
    }

    /// A caller that gives up waiting (a request whose client left) does
    /// not take the guard with it: it lasts until the write itself ends.
    #[tokio::test]
    async fn a_guard_outlives_a_caller_that_stops_waiting_for_its_write() {
        let (registry, entry, ready, writing) = registered_w1();
        entry.update(|r| r.state = WorkerState::Left);
        let (land, landed) = tokio::sync::oneshot::channel::<()>();
        let (done, written) = tokio::sync::oneshot::channel();
        let caller = writing.until(async move {
            let _ = landed.await;
            let _ = done.send(());
            Ok(())
        });
        // The caller is dropped with its write under way.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), caller)
                .await
                .is_err()
        );
        registry.refresh(vec![ready.clone()], Vec::new(), u64::MAX);
        assert_eq!(entry.state(), WorkerState::Left, "still guarded");

        land.send(()).unwrap();
        // One thread: the write's task, once it has said so, runs on to
        // its end (the guard's drop) before this test is polled again.
        written.await.unwrap();
        let since = changes_now();
        registry.refresh(vec![ready], Vec::new(), since);
        assert_eq!(
            entry.state(),
            WorkerState::Ready,
            "a sync after the write takes the store's record"
        );
    }
}

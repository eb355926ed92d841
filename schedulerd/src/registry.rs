//! The workers the scheduler knows, each with one long-lived gRPC channel
//! that every request about that worker reuses.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jobcluster_proto::pb::worker_client::WorkerClient;
use jobcluster_proto::transport::{self, AddressError};
use tonic::transport::Channel;

use crate::store::WorkerRow;

/// One worker: its record and its channel.
#[derive(Debug)]
pub(crate) struct WorkerEntry {
    row: Mutex<WorkerRow>,
    client: WorkerClient<Channel>,
}

impl WorkerEntry {
    pub(crate) fn row(&self) -> WorkerRow {
        self.row.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn id(&self) -> String {
        self.row().worker_id
    }

    /// A handle on the worker's shared channel (cloning is cheap; the
    /// connection is not duplicated).
    pub(crate) fn client(&self) -> WorkerClient<Channel> {
        self.client.clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut WorkerRow)) -> WorkerRow {
        let mut row = self.row.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut row);
        row.clone()
    }
}

#[derive(Debug, Default)]
struct Maps {
    by_id: HashMap<String, Arc<WorkerEntry>>,
    by_name: HashMap<String, String>,
}

#[derive(Debug)]
pub(crate) struct Registry {
    // std RwLock: held for map lookups only, never across an await.
    maps: RwLock<Maps>,
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
}

/// What a registering worker says about itself.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) plugins: Vec<String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) previous_worker_id: String,
}

impl Registry {
    pub(crate) fn new(tls: Arc<rustls::ClientConfig>, connect_timeout: Duration) -> Self {
        Registry {
            maps: RwLock::new(Maps::default()),
            tls,
            connect_timeout,
        }
    }

    fn entry(&self, row: WorkerRow) -> Result<Arc<WorkerEntry>, AddressError> {
        let channel = transport::tls_channel(&row.address, self.tls.clone(), self.connect_timeout)?;
        Ok(Arc::new(WorkerEntry {
            row: Mutex::new(row),
            client: WorkerClient::new(channel),
        }))
    }

    /// Loads the workers recorded before a restart; their channels connect
    /// on first use.
    pub(crate) fn load(&self, rows: Vec<WorkerRow>) {
        for row in rows {
            match self.entry(row.clone()) {
                Ok(entry) => self.insert(entry),
                Err(error) => {
                    tracing::warn!(worker_id = %row.worker_id, %error, "skipping a recorded worker");
                }
            }
        }
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

    pub(crate) fn all(&self) -> Vec<WorkerRow> {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = maps.by_id.values().map(|e| e.row()).collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Registers a worker and returns its record. A worker keeps its id
    /// across restarts: the id recorded for its name, else the id it
    /// presents (the scheduler may have lost its records), else a new one.
    pub(crate) fn register(
        &self,
        reg: Registration,
        now_ms: u64,
    ) -> Result<WorkerRow, AddressError> {
        let existing = self.get(&reg.name).filter(|e| e.row().name == reg.name);
        let worker_id = match &existing {
            Some(entry) => entry.id(),
            None => match uuid::Uuid::parse_str(&reg.previous_worker_id) {
                // Only if no other worker holds that id.
                Ok(id) if self.get(&id.to_string()).is_none() => id.to_string(),
                _ => uuid::Uuid::new_v4().to_string(),
            },
        };
        let row = WorkerRow {
            worker_id,
            name: reg.name,
            address: reg.address,
            state: "ready".to_owned(),
            plugins: reg.plugins,
            labels: reg.labels,
            registered_at_ms: now_ms,
            last_seen_ms: now_ms,
        };
        match existing {
            // Same address: keep the channel (and its live connection).
            Some(entry) if entry.row().address == row.address => {
                entry.update(|r| *r = row.clone());
            }
            _ => self.insert(self.entry(row.clone())?),
        }
        Ok(row)
    }
}

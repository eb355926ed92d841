//! Workers of the original design ("seed" workers), which join a scheduler
//! in insecure mode with the original contract only: `RegisterWorker`
//! carries just an address, `StartJob` just `command` and `path`, and they
//! never heartbeat. Here: the name such a worker is given, and the check
//! that stands in for its heartbeats.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jobcluster_proto::pb::QueryJobRequest;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::registry::{Registry, WorkerEntry};
use crate::state::WorkerState;
use crate::store::SharedStore;
use crate::time::now_ms;

/// The job id the liveness check asks about: the nil UUID, which names no
/// job, so the check is a lookup that finds nothing and changes nothing.
pub(crate) const PROBE_JOB_ID: &str = "00000000-0000-0000-0000-000000000000";

/// The name of a worker that registered without one, from its address:
/// `seed-HOST-PORT` with the host lowercased and, for an IPv6 literal, its
/// brackets dropped and each `:` written `_` (`[::1]:30000` gives
/// `seed-__1-30000`). An address this cannot spell as a valid worker name
/// (a `_` or other character outside `[a-z0-9.-]` in a host name, or a
/// name over 64 bytes) gives `seed-` and the first 24 hex digits of the
/// address's SHA-256 instead.
///
/// Stable: the same address always gives the same name, so a worker that
/// restarts on its address takes its old name and id back. Unique: the
/// port is the part after the last `-`; only IPv6 hosts contain `_`; and
/// the hashed form has no `-` after `seed-`, so no two addresses share a
/// spelled name, and hashed names collide only with SHA-256 itself.
pub(crate) fn name_for(address: &str) -> String {
    spelled(address).unwrap_or_else(|| {
        let digest = Sha256::digest(address.as_bytes());
        let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
        format!("seed-{hex}")
    })
}

fn spelled(address: &str) -> Option<String> {
    let (host, port) = address.rsplit_once(':')?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let host = host.to_ascii_lowercase();
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6)
            if v6.contains(':')
                && v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') =>
        {
            v6.replace(':', "_")
        }
        Some(_) => return None,
        None if !host.is_empty()
            && host.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
            }) =>
        {
            host
        }
        None => return None,
    };
    let name = format!("seed-{host}-{port}");
    jobcluster_pki::valid_name(&name).then_some(name)
}

/// Whether a failed call's status was sent by the peer (a worker of the
/// original contract answers an unknown job with a plain error, without
/// our error-code metadata) rather than made up on this side because the
/// call timed out or never got an answer.
pub(crate) fn from_peer(status: &tonic::Status) -> bool {
    !matches!(
        status.code(),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unavailable
    ) && std::error::Error::source(status).is_none()
}

/// Checks on every worker of the original contract at the heartbeat
/// interval until `stop` fires: one `QueryJob` about [`PROBE_JOB_ID`] per
/// worker, at most one in flight per worker, each bounded by
/// `call_timeout`. Any answer of the worker's own, even an error, counts
/// as a heartbeat; a check that times out or finds nobody counts for
/// nothing, so such a worker goes unresponsive and then `down` by the
/// liveness rules in `grpc::watch_liveness`, exactly as a worker whose
/// heartbeats stop. Workers that heartbeat are never checked.
pub(crate) async fn check_workers(
    registry: Arc<Registry>,
    store: SharedStore,
    every: Duration,
    call_timeout: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checks = JoinSet::new();
    let mut in_flight: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let busy: HashSet<&String> = in_flight.values().collect();
                let due: Vec<_> = registry
                    .entries()
                    .into_iter()
                    // Every worker, every interval: read in place, not copied.
                    .filter(|e| {
                        e.with_row(|row| {
                            row.seed
                                && row.state != WorkerState::Left
                                && !busy.contains(&row.worker_id)
                        })
                    })
                    .collect();
                for entry in due {
                    let id = entry.id();
                    let task = checks.spawn(check(registry.clone(), store.clone(), entry, call_timeout));
                    in_flight.insert(task.id(), id);
                }
            }
            Some(done) = checks.join_next_with_id() => {
                let id = match &done {
                    Ok((id, ())) => *id,
                    Err(error) => error.id(),
                };
                in_flight.remove(&id);
            }
            () = stop.cancelled() => {
                checks.shutdown().await;
                return;
            }
        }
    }
}

async fn check(
    registry: Arc<Registry>,
    store: SharedStore,
    entry: Arc<WorkerEntry>,
    call_timeout: Duration,
) {
    let mut client = entry.client();
    let request = QueryJobRequest {
        job_id: PROBE_JOB_ID.to_owned(),
    };
    let answered = match crate::api::with_deadline(call_timeout, client.query_job(request)).await {
        Ok(_) => true,
        Err(status) if from_peer(&status) => true,
        Err(status) => {
            let row = entry.row();
            tracing::debug!(worker_id = %row.worker_id, worker = %row.name, %status, "worker of the original contract did not answer its check");
            false
        }
    };
    if !answered {
        return;
    }
    let now = now_ms();
    let writing = entry.writing();
    if registry.checked(&entry, now) == Some(true) {
        let row = entry.row();
        tracing::info!(worker_id = %row.worker_id, worker = %row.name, "worker of the original contract answers again; ready");
        if let Err(error) = writing
            .record_state(
                &store,
                &row.worker_id,
                WorkerState::Ready,
                now,
                Some(row.registered_at_ms),
            )
            .await
        {
            tracing::error!(worker_id = %row.worker_id, %error, "could not record worker ready");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_stable_and_distinct() {
        let cases = [
            ("127.0.0.1:30000", "seed-127.0.0.1-30000"),
            ("Worker-1.example:8080", "seed-worker-1.example-8080"),
            ("[::1]:30000", "seed-__1-30000"),
        ];
        for (address, name) in cases {
            assert_eq!(name_for(address), name);
        }
        let odd = [
            "under_score:1",
            "a:b",
            "[zone%1]:1",
            &format!("{}:1", "a".repeat(70)),
        ];
        let mut seen = HashSet::new();
        for address in cases.iter().map(|(a, _)| *a).chain(odd) {
            let name = name_for(address);
            assert!(jobcluster_pki::valid_name(&name), "{address} -> {name}");
            assert_eq!(name, name_for(address));
            assert!(seen.insert(name), "{address}");
        }
        // The port is what follows the last dash: these do not collide.
        assert_ne!(name_for("a-1:2"), name_for("a:12"));
        assert!(name_for("under_score:1").starts_with("seed-"));
        assert!(!name_for("under_score:1")[5..].contains('-'));
    }

    #[test]
    fn only_answers_from_the_peer_count() {
        assert!(from_peer(&tonic::Status::unknown("job not found")));
        assert!(from_peer(&tonic::Status::not_found("no such job")));
        assert!(!from_peer(&tonic::Status::deadline_exceeded(
            "deadline exceeded"
        )));
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!from_peer(&tonic::Status::from_error(Box::new(io))));
    }
}

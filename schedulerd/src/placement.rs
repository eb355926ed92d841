//! Placement: which worker runs a job that names none. Pure functions over
//! worker records, so the rules are tested without a cluster.
//!
//! Eligible: `ready` (not draining, not down), offers the job's plugin (by
//! name, or by the script's extension when the job names none), and
//! carries every label of the selector. Order: fewest running jobs first;
//! workers tied at the fewest take turns (round-robin), so equal workers
//! share a burst of starts.

use std::collections::HashMap;
use std::path::Path;

use jobcluster_proto::http::Selector;

use crate::state::WorkerState;
use crate::store::{JobRow, QueueEntry, WorkerRow};

/// Why no worker can take the job, for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NoEligibleWorker(pub(crate) String);

fn offers(w: &WorkerRow, command: Option<&str>, extension: &str) -> bool {
    match command {
        Some(plugin) => w.plugins.iter().any(|p| p == plugin),
        None => w
            .extensions
            .values()
            .any(|exts| exts.iter().any(|e| e == extension)),
    }
}

fn matches(w: &WorkerRow, selector: &Selector) -> bool {
    selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
}

pub(crate) fn available(w: &WorkerRow) -> bool {
    w.state == WorkerState::Ready && !w.draining
}

fn show(selector: &Selector) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The extension a plugin is chosen by when a job names none ("" without).
pub(crate) fn extension(path: &str) -> &str {
    Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
}

/// The workers that may take a job of `command` (or, without one, for the
/// script at `path`) under `selector`.
pub(crate) fn eligible(
    workers: &[WorkerRow],
    command: Option<&str>,
    path: &str,
    selector: &Selector,
) -> Result<Vec<WorkerRow>, NoEligibleWorker> {
    let extension = extension(path);
    let what = match command {
        Some(plugin) => format!("plugin {plugin:?}"),
        None => format!("{path:?} (no plugin named; by extension)"),
    };
    let offering: Vec<_> = workers
        .iter()
        .filter(|w| w.state != WorkerState::Left && offers(w, command, extension))
        .collect();
    if offering.is_empty() {
        return Err(NoEligibleWorker(format!("no worker offers {what}")));
    }
    let matching: Vec<_> = offering
        .into_iter()
        .filter(|w| matches(w, selector))
        .collect();
    if matching.is_empty() {
        return Err(NoEligibleWorker(format!(
            "no worker offering {what} matches the selector {}",
            show(selector)
        )));
    }
    let total = matching.len();
    let ready: Vec<WorkerRow> = matching
        .into_iter()
        .filter(|w| available(w))
        .cloned()
        .collect();
    if ready.is_empty() {
        return Err(NoEligibleWorker(format!(
            "all {total} worker(s) offering {what}{} are draining or down",
            if selector.is_empty() {
                String::new()
            } else {
                format!(" with {}", show(selector))
            }
        )));
    }
    Ok(ready)
}

/// The workers that may take a queued job (its record and queue entry),
/// as the queue places it: [`eligible`], less the workers of the original
/// design, which rename the jobs they start (a queued job's id was
/// answered already).
pub(crate) fn eligible_queued(
    workers: &[WorkerRow],
    row: &JobRow,
    entry: &QueueEntry,
) -> Result<Vec<WorkerRow>, NoEligibleWorker> {
    let command = (!row.command.is_empty()).then_some(row.command.as_str());
    let mut eligible = eligible(workers, command, &row.path, &entry.selector)?;
    eligible.retain(|w| !w.seed);
    Ok(eligible)
}

/// Orders eligible workers: fewest running jobs first, the tied-fewest
/// rotated by `turn`.
pub(crate) fn order(
    mut workers: Vec<WorkerRow>,
    running: &HashMap<String, u64>,
    turn: usize,
) -> Vec<WorkerRow> {
    let load = |w: &WorkerRow| running.get(&w.worker_id).copied().unwrap_or(0);
    workers.sort_by(|a, b| load(a).cmp(&load(b)).then_with(|| a.name.cmp(&b.name)));
    let Some(first) = workers.first() else {
        return workers;
    };
    let least = load(first);
    let tied = workers.iter().take_while(|w| load(w) == least).count();
    workers[..tied].rotate_left(turn % tied);
    workers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(name: &str, zone: &str, state: WorkerState, draining: bool) -> WorkerRow {
        WorkerRow {
            worker_id: format!("id-{name}"),
            name: name.into(),
            address: String::new(),
            state,
            plugins: vec!["bash".into()],
            labels: [("zone".to_owned(), zone.to_owned())].into_iter().collect(),
            registered_at_ms: 0,
            last_seen_ms: 0,
            cgroup_limits: false,
            extensions: [("bash".to_owned(), vec!["sh".to_owned()])]
                .into_iter()
                .collect(),
            draining,
            max_jobs: 0,
            seed: false,
        }
    }

    #[test]
    fn eligibility_and_reasons() {
        let ws = vec![
            worker("a", "x", WorkerState::Ready, false),
            worker("b", "y", WorkerState::Ready, true),
            worker("c", "y", WorkerState::Down, false),
        ];
        let names = |r: Result<Vec<WorkerRow>, NoEligibleWorker>| {
            r.map(|v| v.into_iter().map(|w| w.name).collect::<Vec<_>>())
        };
        let none = Selector::new();
        assert_eq!(
            names(eligible(&ws, Some("bash"), "s.sh", &none)),
            Ok(vec!["a".to_owned()])
        );
        assert_eq!(
            names(eligible(&ws, None, "s.sh", &none)),
            Ok(vec!["a".to_owned()])
        );
        let y: Selector = [("zone".to_owned(), "y".to_owned())].into();
        let err = eligible(&ws, Some("bash"), "s.sh", &y).unwrap_err();
        assert!(err.0.contains("draining or down"), "{}", err.0);
        let z: Selector = [("zone".to_owned(), "z".to_owned())].into();
        assert!(
            eligible(&ws, Some("bash"), "s.sh", &z)
                .unwrap_err()
                .0
                .contains("matches the selector zone=z")
        );
        assert!(
            eligible(&ws, Some("ruby"), "s.rb", &none)
                .unwrap_err()
                .0
                .contains("no worker offers plugin")
        );
        assert!(
            eligible(&ws, None, "s.rb", &none)
                .unwrap_err()
                .0
                .contains("no worker offers")
        );
    }

    #[test]
    fn fewest_running_first_then_round_robin() {
        let ws = vec![
            worker("a", "x", WorkerState::Ready, false),
            worker("b", "x", WorkerState::Ready, false),
            worker("c", "x", WorkerState::Ready, false),
        ];
        let running: HashMap<String, u64> = [("id-a".to_owned(), 2)].into();
        let first = |turn| order(ws.clone(), &running, turn)[0].name.clone();
        assert_eq!(
            (first(0), first(1), first(2)),
            ("b".into(), "c".into(), "b".into())
        );
        assert_eq!(order(ws.clone(), &running, 0).last().unwrap().name, "a");
    }
}

//! Retention: finished jobs' output is deleted, oldest first, once it is
//! older than `[retention] max_age` or their total passes `max_bytes`.
//! Records stay, so status is still served; output reads as expired.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Retention;
use crate::job::Jobs;

/// Age limits are checked at least this often; size limits also whenever a
/// job finishes.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

pub(crate) async fn run(jobs: Arc<Jobs>, limits: Retention, cancel: CancellationToken) {
    if limits.max_age.is_none() && limits.max_bytes.is_none() {
        return;
    }
    loop {
        jobs.apply_retention(limits.max_age, limits.max_bytes).await;
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            () = jobs.job_finished() => {}
            () = cancel.cancelled() => return,
        }
    }
}

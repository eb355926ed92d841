//! Time as the scheduler stores it (Unix milliseconds) and shows it (RFC 3339 UTC).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds.
pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `None` for 0, which means "not yet".
pub(crate) fn rfc3339_opt(ms: u64) -> Option<String> {
    (ms != 0).then(|| rfc3339(ms))
}

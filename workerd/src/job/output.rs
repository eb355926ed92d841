//! The output log: the pump that copies a job's pipe to it, and reads.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{CHUNK, Progress};

/// Copies the job's output pipe to its log and publishes each new length.
/// Ends at EOF, that is when every process of the job has closed the pipe.
/// With `limit`, at most that many bytes are kept; reaching it fires
/// `over_limit` and the rest is drained and dropped until the job is gone.
pub(super) async fn pump(
    mut reader: pipe::Receiver,
    file: std::fs::File,
    progress: watch::Sender<Progress>,
    limit: Option<u64>,
    over_limit: CancellationToken,
) -> u64 {
    let file = Arc::new(file);
    let mut buf = Vec::with_capacity(CHUNK);
    let mut len = 0u64;
    let mut write_failed = false;
    loop {
        buf.clear();
        match reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "reading job output failed");
                break;
            }
        }
        if write_failed || over_limit.is_cancelled() {
            // Keep draining so the job never blocks on a full pipe.
            continue;
        }
        if let Some(limit) = limit
            && len + buf.len() as u64 > limit
        {
            buf.truncate((limit - len) as usize);
            over_limit.cancel();
        }
        let f = file.clone();
        let b = std::mem::take(&mut buf);
        let offset = len;
        // File writes block; they go to the blocking pool, one chunk at a time.
        let result = tokio::task::spawn_blocking(move || {
            let r = f.write_all_at(&b, offset);
            (b, r)
        })
        .await;
        match result {
            Ok((b, Ok(()))) => {
                len += b.len() as u64;
                buf = b;
                progress.send_modify(|p| p.len = len);
            }
            Ok((b, Err(error))) => {
                tracing::error!(%error, "writing job output failed; dropping further output");
                buf = b;
                write_failed = true;
            }
            Err(error) => {
                tracing::error!(%error, "output writer task failed");
                write_failed = true;
            }
        }
    }
    len
}

/// Reads up to `max` bytes of a log at `offset` on the blocking pool.
pub(crate) async fn read_at(
    file: Arc<std::fs::File>,
    offset: u64,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; max];
        let mut filled = 0;
        while filled < max {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    })
    .await
    .map_err(std::io::Error::other)?
}

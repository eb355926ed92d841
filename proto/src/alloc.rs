//! glibc's allocator, set for processes that move output: clusterctl and
//! both daemons.
//!
//! Why: HTTP/2 hands each received frame (up to
//! [`crate::transport::MAX_FRAME_SIZE`], 512 KiB) to its reader as a slice
//! of the connection's read buffer, so the next frame needs a new buffer
//! while the last one is still held. glibc gives such blocks (128 KiB and
//! more) fresh memory from the kernel, by `mmap` or by growing a heap it
//! shrank on the last `free` (its trim threshold), and every 4 KiB page of
//! them is then a page fault when the bytes are copied in: 53,000 faults
//! and two thirds of `clusterctl`'s CPU for 256 MiB followed, measured
//! (docs/PERFORMANCE.md, "Following: the allocator's thresholds").
//! [`keep_stream_buffers`] keeps blocks up to [`MMAP_THRESHOLD`] in the heap
//! and up to [`TRIM_THRESHOLD`] of free heap, so the pages are reused.
//!
//! What a burst freed beyond that is given back by [`return_free_memory`]
//! (the daemons run it): glibc keeps freed memory inside its heaps. While
//! output streams, a trim may give back pages the thresholds would have
//! kept; they fault in again once, at most every 10 s, which is nothing
//! beside a fault per page received.
//!
//! The calls have no safe wrapper in nix or rustix, hence this module's
//! `unsafe`.
#![allow(unsafe_code)]

/// Blocks up to this size come from glibc's heap, not from `mmap`: twice a
/// frame, the most a read buffer grows to around one.
pub const MMAP_THRESHOLD: usize = 2 << 20;

/// Free memory at the top of one of glibc's heaps that it keeps instead
/// of giving back at once: room for the buffers of a few frames in flight.
pub const TRIM_THRESHOLD: usize = 4 << 20;

/// Free memory the allocator may hold before [`return_free_memory`] gives
/// it back.
pub const KEEP_FREE_BYTES: usize = 16 << 20;

/// Sets glibc's thresholds to [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`].
/// Call it early in `main`, before other threads exist. Does nothing when
/// the environment sets either (`GLIBC_TUNABLES`, or the older
/// `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`): the operator's
/// choice wins. Off glibc, nothing to set.
pub fn keep_stream_buffers() {
    let tunables = std::env::var_os("GLIBC_TUNABLES").unwrap_or_default();
    let tunables = tunables.to_string_lossy();
    let set_by_operator = tunables.contains("glibc.malloc.mmap_threshold")
        || tunables.contains("glibc.malloc.trim_threshold")
        || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some();
    if !set_by_operator {
        set_thresholds();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() {
    use nix::libc;
    for (param, value) in [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt takes the allocator's own lock and no pointers;
        // a refused value leaves glibc's default, which is only slower.
        let set = unsafe { libc::mallopt(param, value) };
        if set != 1 {
            tracing::debug!(param, value, "glibc refused a malloc threshold");
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() {}

/// Gives memory that glibc's allocator holds free back to the system when
/// there is more than [`KEEP_FREE_BYTES`] of it; returns how much was free
/// if it did. glibc keeps what a burst freed inside its heaps for reuse:
/// after a thousand followers of one job (about 1 MiB of output in flight
/// each) the worker stayed at 1.2 GB resident. mimalloc as the global
/// allocator gave the pages back but doubled the idle worker (22 MB), so
/// the allocator stays and is trimmed. Blocks: call it off the runtime.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_free_memory() -> Option<usize> {
    use nix::libc;
    // SAFETY: plain glibc calls without pointer arguments; they take the
    // allocator's own locks.
    let free = unsafe { libc::mallinfo2() }.fordblks;
    if free <= KEEP_FREE_BYTES {
        return None;
    }
    // SAFETY: as above.
    unsafe { libc::malloc_trim(0) };
    Some(free)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_free_memory() -> Option<usize> {
    None
}

/// Every 10 s, hands memory freed after a burst (of followers, of
/// connections) back to the system ([`trim_free_memory`]), so a daemon's
/// footprint follows what it holds, not its peak.
pub async fn return_free_memory() {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Ok(Some(free)) = tokio::task::spawn_blocking(trim_free_memory).await {
            tracing::debug!(free_bytes = free, "returned free memory to the system");
        }
    }
}

//! glibc's thresholds as `keep_stream_buffers` sets them, in a process of
//! their own (the allocator's settings are global).

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use jobcluster_proto::alloc;
use nix::libc;

fn mmapped_blocks() -> usize {
    // SAFETY: a plain glibc call without pointer arguments.
    #[allow(unsafe_code)]
    unsafe { libc::mallinfo2() }.hblks
}

/// A frame-sized block comes from the heap once the thresholds are set:
/// glibc's default maps every block of 128 KiB and more (until its
/// dynamic threshold learns otherwise from a block freed).
#[test]
fn a_frame_sized_block_comes_from_the_heap_and_a_larger_one_is_mapped() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        eprintln!("skipped: GLIBC_TUNABLES is set, and keep_stream_buffers leaves it be");
        return;
    }
    alloc::keep_stream_buffers();
    let before = mmapped_blocks();
    let block = std::hint::black_box(vec![1u8; alloc::MMAP_THRESHOLD / 2 + 4096]);
    assert_eq!(
        mmapped_blocks(),
        before,
        "a 1 MiB block was mapped on its own"
    );
    let big = std::hint::black_box(vec![1u8; alloc::MMAP_THRESHOLD * 2]);
    assert_eq!(
        mmapped_blocks(),
        before + 1,
        "a block past the threshold is mapped"
    );
    drop((block, big));
}

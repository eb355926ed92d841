//! `memcpy` for every binary of the cluster, around glibc's.
//!
//! glibc's x86-64 `memcpy` copies 2 KiB and more with `rep movsb` (the
//! threshold is `glibc.cpu.x86_rep_movsb_threshold`, 0x840 on FSRM CPUs).
//! On AMD Zen 4 (this project's benchmark machine, an EPYC with AVX-512),
//! `rep movsb` runs at 3.5 GB/s instead of 80-100 when the destination
//! sits 1 to 15 bytes past the source modulo 4 KiB, a 25-fold slowdown
//! glibc 2.36 does not avoid (its check for a short distance is for Intel
//! CPUs and looks at the distance itself, not modulo a page). A TLS
//! record's payload starts 5 bytes into it, and the buffers it is copied
//! between are reused for a whole stream, so a stream either never meets
//! that case or meets it on every record: `clusterctl logs` of 256 MiB
//! spent 39 % of its CPU in one such copy (rustls handing decrypted data
//! to its plaintext buffer). docs/PERFORMANCE.md, "Following: glibc's
//! `rep movsb` at a short distance", has the measurements.
//!
//! The fix an operator could make, `GLIBC_TUNABLES` raising the threshold,
//! is read by the dynamic loader before `main`, so a program cannot set it
//! for itself, and `clusterctl` is started by people and CI, not by units
//! we ship. Defining `memcpy` in the program takes every call to it from
//! Rust code and the C linked into it (SQLite) before glibc's: a copy at
//! one of those distances goes to glibc as chunks under the threshold,
//! which glibc copies with vector loads and stores; every other copy goes
//! to glibc whole. `memmove` is left to glibc (its callers here move
//! little: a buffer's unread tail to its front), and glibc's own calls
//! inside libc are its own.
//!
//! Only on x86-64 Linux with glibc; elsewhere the platform's `memcpy`
//! serves.

/// Copies this size and larger are checked for the slow distance: under
/// glibc's smallest default threshold (2,048 bytes times the vector size
/// over 16, raised to 0x840 with FSRM) no copy uses `rep movsb`.
pub const CHECKED_FROM: usize = 2048;

/// Each piece of a copy at a slow distance: under every default threshold,
/// so glibc copies it with vector instructions.
pub const PIECE: usize = 2048;

/// Whether glibc's `rep movsb` would be slow copying `len` bytes from
/// `src` to `dst`: the destination 1 to 15 bytes past the source modulo a
/// 4 KiB page.
pub fn slow_distance(dst: usize, src: usize, len: usize) -> bool {
    let distance = dst.wrapping_sub(src) & 4095;
    len >= CHECKED_FROM && (1..16).contains(&distance)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
pub mod glibc {
    #![allow(unsafe_code)]

    use nix::libc::{c_void, memmove};

    /// # Safety
    ///
    /// As C's `memcpy`: `src` readable and `dst` writable for `n` bytes,
    /// the two not overlapping.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcpy(dst: *mut c_void, src: *const c_void, n: usize) -> *mut c_void {
        if super::slow_distance(dst as usize, src as usize, n) {
            // SAFETY: the caller's promise, passed on.
            unsafe { in_pieces(dst, src, n) };
            return dst;
        }
        // SAFETY: the caller's promise; `memmove` asks less of it.
        // glibc's `memcpy` and `memmove` are one function on x86-64.
        unsafe { memmove(dst, src, n) }
    }

    /// Out of line, so the common case above is a check and a jump.
    #[cold]
    #[inline(never)]
    unsafe fn in_pieces(dst: *mut c_void, src: *const c_void, n: usize) {
        let (mut to, mut from, mut left) = (dst.cast::<u8>(), src.cast::<u8>(), n);
        while left > 0 {
            let piece = left.min(super::PIECE);
            // SAFETY: inside the caller's `n` bytes of each; pieces go in
            // order, as the whole would.
            unsafe {
                memmove(to.cast(), from.cast(), piece);
                to = to.add(piece);
                from = from.add(piece);
            }
            left -= piece;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_copies_of_2_kib_or_more_1_to_15_bytes_past_modulo_a_page_are_slow() {
        let base = 0x7f00_0000_1005usize;
        for distance in 1..16 {
            assert!(slow_distance(base + distance, base, 16_384), "{distance}");
            assert!(slow_distance(base + 4096 * 3 + distance, base, 2048));
            assert!(!slow_distance(base + distance, base, 2047));
        }
        for distance in [0, 16, 17, 4095, 2048] {
            assert!(!slow_distance(base + distance, base, 16_384), "{distance}");
        }
        // Below the source, as a page past it is the same distance.
        assert!(slow_distance(base - 4096 + 5, base, 4096));
        assert!(!slow_distance(base - 5, base, 4096));
    }

    /// The program's `memcpy`: where it is ours, the one every caller
    /// links to.
    fn copy(to: &mut [u8], from: &[u8]) {
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        {
            #[allow(unsafe_code)]
            // SAFETY: two slices of one length, one borrowed mutably.
            unsafe {
                nix::libc::memcpy(to.as_mut_ptr().cast(), from.as_ptr().cast(), from.len());
            }
            // Ours, not glibc's, is what the program calls memcpy.
            let linked = nix::libc::memcpy as *const () as usize;
            assert_eq!(linked, glibc::memcpy as *const () as usize);
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
        to.copy_from_slice(from);
    }

    /// Every byte arrives, in every alignment around the slow distances
    /// and every length around a piece.
    #[test]
    fn copies_at_every_distance_and_length_give_the_same_bytes() {
        let source: Vec<u8> = (0..3 * 4096 + 64)
            .map(|i: usize| (i.wrapping_mul(131) >> 3) as u8)
            .collect();
        let mut target = vec![0u8; 3 * 4096 + 4096 + 64];
        let lengths = [0, 1, 2047, 2048, 2049, 4095, 4096, 4097, 6143, 3 * 4096];
        for src_at in [0usize, 5, 4091] {
            for distance in 0..20usize {
                for &len in &lengths {
                    let len = std::hint::black_box(len);
                    let from = &source[src_at..src_at + len.min(source.len() - src_at)];
                    let src_addr = from.as_ptr() as usize;
                    // Where in `target` the destination is this distance
                    // past the source modulo a page.
                    let dst_at =
                        (src_addr + distance).wrapping_sub(target.as_ptr() as usize) & 4095;
                    target.fill(0xAA);
                    let to = &mut target[dst_at..dst_at + from.len()];
                    copy(to, from);
                    assert_eq!(to, from, "src_at {src_at} distance {distance} len {len}");
                    assert!(target[..dst_at].iter().all(|&b| b == 0xAA));
                    assert!(target[dst_at + from.len()..].iter().all(|&b| b == 0xAA));
                }
            }
        }
    }
}

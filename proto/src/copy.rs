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
//! we ship. Defining `memcpy` in the program takes every call to it before
//! glibc's: from Rust code, from the C linked into it (SQLite), and, in a
//! dynamically linked program, where the symbol is in its dynamic table,
//! from the shared libraries it loads (libgcc_s, NSS modules). On an AMD CPU of family 0x19 or later
//! (Zen 3 and after; the slow case was measured on Zen 4), a copy of
//! [`CHECKED_FROM`] to [`CHECKED_UP_TO`] bytes at one of those distances
//! goes to glibc's `memmove` as pieces under the threshold, which glibc
//! copies with vector loads and stores; every other copy goes to glibc's
//! `memmove` whole, a few comparisons and a jump (glibc's `memcpy` is
//! that same function on x86-64, so overlapping ranges, undefined for
//! `memcpy`, still come out as they did). `memmove` is left to glibc: its
//! callers here move a buffer's unread tail to its front, rarely at that
//! distance. Nothing in this module may copy memory by any other means
//! than glibc's `memmove`, or the program's `memcpy` would call itself.
//!
//! Only on x86-64 Linux with glibc; elsewhere the platform's `memcpy`
//! serves. Linked statically (the release clusterctl, scripts/release.sh),
//! this `memcpy` keeps glibc's own out of the link (its `memcpy` is its
//! own object in `libc.a`, `memmove` another), and glibc's own calls of
//! `memcpy` come here too (not `__mempcpy` or `__memcpy_chk`, which stay
//! glibc's). That is safe from the first one: glibc's own `memcpy` is an
//! IFUNC as `memmove` is, so a static glibc resolves its IFUNCs before it
//! copies anything, and the jump to `memmove` below is ready by then.

/// Copies this size and larger are checked for the slow distance: under
/// glibc's smallest default threshold (2,048 bytes times the vector size
/// over 16, raised to 0x840 with FSRM) no copy uses `rep movsb`.
pub const CHECKED_FROM: usize = 2048;

/// Copies larger than this go to glibc whole: its largest copies use
/// non-temporal stores, not `rep movsb`, and a program here copies nothing
/// that large on a path that matters. The probe found the slow case up to
/// 1 MB.
pub const CHECKED_UP_TO: usize = 4 << 20;

/// Each piece of a copy at a slow distance: under every default threshold,
/// so glibc copies it with vector instructions.
pub const PIECE: usize = 2048;

/// Whether glibc's `rep movsb` would be slow copying `len` bytes from
/// `src` to `dst` on an affected CPU: the destination 1 to 15 bytes past
/// the source modulo a 4 KiB page, the ranges apart, the size in range.
/// Plain integer operations only: it runs inside `memcpy`.
#[inline(always)]
// Comparisons, not `contains`: a debug build calls `contains` out of line,
// and nothing generic should run inside `memcpy`.
#[allow(clippy::manual_range_contains)]
pub fn slow_distance(dst: usize, src: usize, len: usize) -> bool {
    let apart = dst.wrapping_sub(src);
    let distance = apart & 4095;
    // `apart < len`: the destination starts inside the source, so the
    // copy runs backwards in glibc (no `rep movsb`) and must stay whole.
    len >= CHECKED_FROM && len <= CHECKED_UP_TO && distance.wrapping_sub(1) < 15 && apart >= len
}

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
pub mod glibc {
    #![allow(unsafe_code)]

    use std::sync::atomic::{AtomicU8, Ordering};

    use nix::libc::{c_void, memmove};

    /// 0: not asked yet; 1: an affected CPU; 2: another.
    static AFFECTED: AtomicU8 = AtomicU8::new(0);

    /// Whether this CPU is an AMD of family 0x19 or later, asked once (the
    /// answer cannot change; threads racing to ask get the same one).
    #[inline(always)]
    fn affected() -> bool {
        match AFFECTED.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let yes = amd_zen3_or_later();
                AFFECTED.store(if yes { 1 } else { 2 }, Ordering::Relaxed);
                yes
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn amd_zen3_or_later() -> bool {
        use std::arch::x86_64::__cpuid;
        #[allow(unused_unsafe)] // `__cpuid` is safe from Rust 1.89
        // SAFETY: CPUID exists on every x86-64 CPU.
        let (vendor, version) = unsafe { (__cpuid(0), __cpuid(1)) };
        // "AuthenticAMD", in EBX, EDX, ECX.
        let amd =
            vendor.ebx == 0x6874_7541 && vendor.edx == 0x6974_6e65 && vendor.ecx == 0x444d_4163;
        let base = (version.eax >> 8) & 0xf;
        let family = if base == 0xf {
            base + ((version.eax >> 20) & 0xff)
        } else {
            base
        };
        amd && family >= 0x19
    }

    /// # Safety
    ///
    /// As C's `memcpy`: `src` readable and `dst` writable for `n` bytes.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcpy(dst: *mut c_void, src: *const c_void, n: usize) -> *mut c_void {
        if super::slow_distance(dst as usize, src as usize, n) && affected() {
            // SAFETY: the caller's promise, passed on.
            unsafe { in_pieces(dst, src, n) };
            return dst;
        }
        // SAFETY: the caller's promise; `memmove` asks less of it.
        unsafe { memmove(dst, src, n) }
    }

    /// Copies `n` bytes from `src` to `dst` as [`super::PIECE`]-byte
    /// `memmove`s in order, the last one shorter.
    ///
    /// # Safety
    ///
    /// As C's `memcpy`, and `dst` not inside `src`'s range (a forward
    /// copy in pieces would overwrite source bytes not yet copied).
    #[cold]
    #[inline(never)]
    pub unsafe fn in_pieces(dst: *mut c_void, src: *const c_void, n: usize) {
        let (mut to, mut from, mut left) = (dst.cast::<u8>(), src.cast::<u8>(), n);
        while left > 0 {
            let piece = if left < super::PIECE {
                left
            } else {
                super::PIECE
            };
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
    #![allow(unsafe_code)]

    use super::*;

    #[test]
    fn only_copies_of_2_kib_to_4_mib_1_to_15_bytes_past_modulo_a_page_and_apart_are_slow() {
        let base = 0x7f00_0000_1005usize;
        for distance in 1..16 {
            assert!(
                slow_distance(base + 8192 + distance, base, 8192),
                "{distance}"
            );
            assert!(slow_distance(base + 4096 * 3 + distance, base, 2048));
            assert!(!slow_distance(base + 8192 + distance, base, 2047));
            assert!(!slow_distance(
                base + (8 << 20) + distance,
                base,
                (4 << 20) + 1
            ));
            // Overlapping, the destination inside the source: glibc copies
            // backwards, and a copy in pieces would read what it wrote.
            assert!(!slow_distance(base + distance, base, 2048));
        }
        assert!(slow_distance(base + (8 << 20) + 3, base, 4 << 20));
        for distance in [0, 16, 17, 4095, 2048] {
            assert!(
                !slow_distance(base + 8192 + distance, base, 4096),
                "{distance}"
            );
        }
        // Below the source, as a page past it is the same distance.
        assert!(slow_distance(base - 4096 + 5, base, 4096));
        assert!(!slow_distance(base - 5, base, 4096));
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    mod ours {
        use super::*;

        /// Copies `from` to `to` through `copy`, at every distance around
        /// the slow ones, every length around a piece and three source
        /// alignments, checking every byte and that nothing around the
        /// destination was written.
        fn at_every_distance(copy: impl Fn(&mut [u8], &[u8])) {
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
                        // Where in `target` the destination is this
                        // distance past the source modulo a page.
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

        /// The program's `memcpy` is ours (what every caller in the
        /// program links to), and copies every byte wherever it falls.
        #[test]
        fn the_programs_memcpy_is_ours_and_copies_at_every_distance() {
            let linked = nix::libc::memcpy as *const () as usize;
            assert_eq!(linked, glibc::memcpy as *const () as usize);
            at_every_distance(|to, from| {
                // SAFETY: two slices of one length, one borrowed mutably.
                unsafe {
                    nix::libc::memcpy(to.as_mut_ptr().cast(), from.as_ptr().cast(), from.len());
                }
            });
        }

        /// The pieces, whatever this CPU: every byte, in order, the last
        /// piece shorter.
        #[test]
        fn a_copy_in_pieces_copies_every_byte() {
            at_every_distance(|to, from| {
                // SAFETY: two slices of one length, apart.
                unsafe {
                    glibc::in_pieces(to.as_mut_ptr().cast(), from.as_ptr().cast(), from.len())
                }
            });
        }

        /// A caller that overlaps its ranges (undefined for `memcpy`, but
        /// C code in the process may) gets what glibc's gave: `memmove`'s
        /// result, also at the slow distances.
        #[test]
        fn overlapping_ranges_come_out_as_memmove_makes_them() {
            let original: Vec<u8> = (0..16_384usize).map(|i| (i * 7 + i / 251) as u8).collect();
            for shift in [1usize, 5, 15, 16, 4097] {
                let len = 8192;
                let mut buf = original.clone();
                let base = buf.as_mut_ptr();
                // SAFETY: both ranges inside `buf`.
                unsafe { nix::libc::memcpy(base.add(shift).cast(), base.cast(), len) };
                assert_eq!(
                    &buf[shift..shift + len],
                    &original[..len],
                    "forward {shift}"
                );
                let mut buf = original.clone();
                let base = buf.as_mut_ptr();
                // SAFETY: both ranges inside `buf`.
                unsafe { nix::libc::memcpy(base.cast(), base.add(shift).cast(), len) };
                assert_eq!(
                    &buf[..len],
                    &original[shift..shift + len],
                    "backward {shift}"
                );
            }
        }
    }
}

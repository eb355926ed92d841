//! Time per GiB of each AEAD that TLS may agree on here (ring, as rustls
//! uses it): sealing 16 KiB records, TLS's largest, on one thread. Wall
//! time, so run it on an idle machine: it is the CPU time then. The figures behind
//! the suite order of `pki::tls` (docs/PERFORMANCE.md, session 24).
//!
//! Run: `cargo bench -p jobcluster-pki --bench ciphers [-- MIB]` (default 1024).

#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use ring::aead::{
    AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};

const RECORD: usize = 16 * 1024;

/// Seconds to seal `mib` MiB as TLS records.
fn seconds_to_seal(algorithm: &'static Algorithm, mib: usize) -> f64 {
    let key = LessSafeKey::new(UnboundKey::new(algorithm, &vec![7; algorithm.key_len()]).unwrap());
    let mut record = vec![0u8; RECORD];
    let records = mib * 1024 * 1024 / RECORD;
    let started = Instant::now();
    for n in 0..records as u64 {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([23u8, 3, 3, 64, 17]),
                &mut record,
            )
            .unwrap();
        let _ = std::hint::black_box(tag);
    }
    started.elapsed().as_secs_f64()
}

fn main() {
    let mib: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("MIB: a number of MiB"))
        .unwrap_or(1024);
    let suites: [(&str, &'static Algorithm); 3] = [
        ("AES-128-GCM", &AES_128_GCM),
        ("AES-256-GCM", &AES_256_GCM),
        ("ChaCha20-Poly1305", &CHACHA20_POLY1305),
    ];
    // A first round warms the CPU up; the second is reported.
    for round in 0..2 {
        for (name, algorithm) in suites {
            let seconds = seconds_to_seal(algorithm, mib);
            if round == 1 {
                let per_gib = seconds * 1024.0 / mib as f64;
                println!(
                    "{name:<18} {per_gib:.3} s per GiB  {:.0} MiB/s",
                    mib as f64 / seconds
                );
            }
        }
    }
}

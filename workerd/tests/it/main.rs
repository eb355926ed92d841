//! Integration tests of the real `workerd` binary over real mutual TLS.

#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

// Shared by path with the end-to-end tests and the bench; each uses a part.
#[allow(dead_code)]
mod harness;
mod worker;

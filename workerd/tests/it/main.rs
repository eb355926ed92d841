//! Integration tests of the real `workerd` binary over real mutual TLS.

#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod worker;

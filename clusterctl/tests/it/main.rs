//! End-to-end tests: the real `schedulerd`, two (or more) real `workerd`
//! and the real `clusterctl`, on loopback with a PKI made by `clusterctl pki`.

#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod cluster;
mod disk;
mod escape;
mod fake_grpc;
mod faults;
mod follow;
mod ha;
#[allow(dead_code)]
#[path = "../../../workerd/tests/it/harness.rs"]
mod harness;
mod hostile_worker;
mod http;
mod hung;
mod idempotency;
mod interrupt;
mod man;
mod metrics;
mod openapi;
mod ops;
mod placement;
#[allow(dead_code)]
#[path = "../../../schedulerd/testing/postgres.rs"]
mod postgres;
mod queue;
mod removal;
mod scale;
mod security;
mod seed;

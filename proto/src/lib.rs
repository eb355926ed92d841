//! The wire contract of the job cluster.
//!
//! Owns the gRPC types generated from `jobscheduler.proto`, the JSON types
//! of the HTTP API shared by schedulerd and clusterctl ([`http`]), the
//! config-file contract ([`config`]), the transport that carries gRPC
//! (mTLS listener and dialer, [`transport`]), and the daemons' shared edges
//! ([`daemon`]: logging, signals, systemd notify; [`slice`]: the
//! scheduling slice their threads ask for; [`alloc`]: glibc's allocator
//! settings for moving output, and giving freed memory back; [`copy`]: the
//! programs' `memcpy`, around a slow case of glibc's; [`grpc_ops`]: gRPC
//! health and reflection; [`man`]: manual pages from the clap
//! definitions). Holds wire types,
//! conversions and byte moving only: no job or worker logic, and no
//! authorization policy (the daemons say which role a service wants).

// Denied, not forbidden: `slice`, `alloc` and `copy` hold the system and
// glibc calls nothing wraps (a crate of its own for them would change the fixed
// top level).
#![deny(unsafe_code)]

/// Generated gRPC code for package `jobscheduler`.
#[allow(
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    rust_2018_idioms
)]
pub mod pb {
    tonic::include_proto!("jobscheduler");
}

/// gRPC metadata key on a worker's error status carrying the snake_case
/// error code of the HTTP API (`invalid_path`, `unknown_plugin`, ...), so the
/// scheduler maps errors without parsing messages.
pub const ERROR_CODE_METADATA: &str = "jobcluster-code";

/// Encoded `FileDescriptorSet` of `jobscheduler.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/jobscheduler_descriptor.bin"));

pub mod alloc;
pub mod config;
pub mod copy;
pub mod daemon;
pub mod grpc_ops;
pub mod http;
pub mod man;
pub mod slice;
pub mod transport;

//! The wire contract of the job cluster.
//!
//! Owns the gRPC types generated from `jobscheduler.proto`, the JSON types
//! of the HTTP API shared by schedulerd and clusterctl, and the transport
//! that carries gRPC (mTLS listener and dialer, in [`transport`]). Holds wire
//! types, conversions and byte moving only: no policy, no job or worker
//! logic, no decision about who may call what.

#![forbid(unsafe_code)]

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

pub mod config;
pub mod daemon;
pub mod http;
pub mod transport;

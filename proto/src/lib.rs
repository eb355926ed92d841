//! The wire contract of the job cluster.
//!
//! Owns the gRPC types generated from `jobscheduler.proto` and the JSON types
//! of the HTTP API shared by schedulerd and clusterctl. Holds wire types and
//! conversions only: no I/O, no policy, no logic beyond mapping.

/// Generated gRPC code for package `jobscheduler`.
#[allow(missing_debug_implementations, unreachable_pub, clippy::all, rust_2018_idioms)]
pub mod pb {
    tonic::include_proto!("jobscheduler");
}

/// Encoded `FileDescriptorSet` of `jobscheduler.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/jobscheduler_descriptor.bin"));

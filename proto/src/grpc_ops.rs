//! The standard gRPC services an operator's tools expect on both daemons'
//! gRPC ports: health (`grpc.health.v1.Health`, for `grpc_health_probe`
//! and load balancers) and server reflection (`grpc.reflection.v1` and
//! `v1alpha`, so `grpcurl` lists and describes our services without the
//! `.proto` file). Both sit behind the port's mutual TLS like every other
//! service: any peer with a certificate of the cluster's CA may use them;
//! they reveal nothing but the contract and whether the daemon serves.

use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

pub use tonic_reflection::server::Error as ReflectionError;

/// What the health service answers for the whole server (`""`) and for
/// the daemon's own service: `NOT_SERVING` until [`serving`], and again
/// from [`not_serving`] on.
///
/// [`serving`]: HealthStatus::serving
/// [`not_serving`]: HealthStatus::not_serving
#[derive(Debug, Clone)]
pub struct HealthStatus {
    reporter: HealthReporter,
    service: &'static str,
}

impl HealthStatus {
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    pub async fn not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }
}

/// The health service for a server whose own service is `S`, and the
/// handle that sets its status; it starts `NOT_SERVING`.
pub async fn health<S: NamedService>() -> (HealthStatus, HealthServer<impl Health>) {
    let (reporter, server) = tonic_health::server::health_reporter();
    let status = HealthStatus {
        reporter,
        service: S::NAME,
    };
    status.not_serving().await;
    (status, server)
}

/// Both versions of the reflection service (grpcurl and most tools speak
/// v1 and fall back to v1alpha), describing `jobscheduler.proto` and the
/// health service.
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ReflectionError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

//! What every gRPC role serves besides its own API: `grpc.health.v1` health (so load balancers and
//! orchestrators see shutdown begin) and server reflection (so `grpcurl` works without the proto files).

use chatvault_proto::v1::FILE_DESCRIPTOR_SET;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};

use crate::error::{Error, Result};

/// The health of a role's gRPC server, reported as SERVING from [`serve_health`] until [`Self::not_serving`].
#[derive(Clone)]
pub struct GrpcHealth {
    reporter: HealthReporter,
}

/// The services every gRPC role adds next to its API `S`: health (with `S` SERVING) and reflection.
pub struct CommonServices<H: Health, R: ServerReflection> {
    pub health: GrpcHealth,
    pub health_service: HealthServer<H>,
    pub reflection: ServerReflectionServer<R>,
}

/// Health (with `S` reported SERVING) and reflection over chatvault's API descriptors.
pub async fn serve_health<S: NamedService>()
-> Result<CommonServices<impl Health, impl ServerReflection>> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| {
            Error::internal(format!("building the gRPC reflection service: {error}"))
        })?;
    Ok(CommonServices {
        health: GrpcHealth { reporter },
        health_service,
        reflection,
    })
}

impl GrpcHealth {
    /// Reports `S` and the server as a whole (`""`) NOT_SERVING: shutdown began, clients should move away.
    pub async fn not_serving<S: NamedService>(&self) {
        self.reporter.set_not_serving::<S>().await;
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }
}

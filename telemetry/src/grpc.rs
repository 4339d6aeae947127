//! The two standard services every Encore gRPC server adds beside its own:
//! `grpc.health.v1.Health`, for load balancers and `grpc_health_probe`, and
//! `grpc.reflection.v1.ServerReflection`, so that `grpcurl` works without
//! the `.proto` files.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! # let fds: &[u8] = &[];
//! let (reporter, health) = encore_telemetry::grpc_health();
//! let reflection = encore_telemetry::grpc_reflection(fds)?; // encore_proto::FILE_DESCRIPTOR_SET
//! // tonic::transport::Server::builder()
//! //     .add_service(health)
//! //     .add_service(reflection)
//! //     .add_service(ActorServer::new(actor))
//! //     .serve_with_shutdown(addr, shutdown.cancelled());
//! // reporter.set_serving::<ActorServer<Actor>>().await;
//! # let _ = (reporter, health, reflection);
//! # Ok(())
//! # }
//! ```

pub use tonic_health::ServingStatus;
pub use tonic_health::pb::health_server::HealthServer;
pub use tonic_health::server::{HealthReporter, HealthService};
pub use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};

use crate::error::Result;

/// The health service and the reporter that sets what it answers. The
/// overall server status (service name `""`) starts as serving; set each
/// service's status with [`HealthReporter::set_serving`] and
/// [`HealthReporter::set_not_serving`], and set them not serving when
/// shutdown begins so that balancers stop routing before the port closes.
pub fn grpc_health() -> (HealthReporter, HealthServer<HealthService>) {
    let reporter = HealthReporter::new();
    let service = HealthService::from_health_reporter(reporter.clone());
    (reporter, HealthServer::new(service))
}

/// A v1 reflection service describing the services in `file_descriptor_set`
/// (an encoded `google.protobuf.FileDescriptorSet` with imports, such as
/// `encore_proto::FILE_DESCRIPTOR_SET`), plus the health and reflection
/// services themselves.
pub fn grpc_reflection(
    file_descriptor_set: &[u8],
) -> Result<ServerReflectionServer<impl ServerReflection>> {
    let server = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(file_descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Ok(server)
}

//! The two standard services every Encore gRPC server adds beside its own:
//! `grpc.health.v1.Health`, for load balancers and `grpc_health_probe`, and
//! `grpc.reflection.v1.ServerReflection`, so that `grpcurl` works without
//! the `.proto` files. Reflection is also served under its older name,
//! `grpc.reflection.v1alpha` ([`grpc_reflection_v1alpha`]), the only one
//! some clients speak (Python's `grpcio-reflection`, older `grpcurl`).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! # let fds: &[u8] = &[];
//! let (reporter, health) = encore_telemetry::grpc_health();
//! let reflection = encore_telemetry::grpc_reflection(fds, &[])?; // encore_proto::FILE_DESCRIPTOR_SET
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

use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;
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

/// The reflection builder shared by both versions: the descriptors of
/// `file_descriptor_set` and of the health service, advertising `services`
/// (fully qualified names) and the health service, or every service in the
/// set when `services` is empty. A descriptor set usually describes more
/// services than one process serves (`encore.v1` has them all), and a client
/// listing services must only see those it can call.
fn reflection_builder<'b>(
    file_descriptor_set: &'b [u8],
    services: &[&str],
) -> tonic_reflection::server::Builder<'b> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(file_descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    if !services.is_empty() {
        for name in services.iter().copied().chain(["grpc.health.v1.Health"]) {
            builder = builder.with_service_name(name);
        }
    }
    builder
}

/// A v1 reflection service describing the services in `file_descriptor_set`
/// (an encoded `google.protobuf.FileDescriptorSet` with imports, such as
/// `encore_proto::FILE_DESCRIPTOR_SET`), plus the health and reflection
/// services themselves. It advertises `services` (all in the set when
/// empty).
pub fn grpc_reflection(
    file_descriptor_set: &[u8],
    services: &[&str],
) -> Result<ServerReflectionServer<impl ServerReflection>> {
    Ok(reflection_builder(file_descriptor_set, services).build_v1()?)
}

/// [`grpc_reflection`] under the older `grpc.reflection.v1alpha` name; add
/// both, so that clients of either version find the services.
pub fn grpc_reflection_v1alpha(
    file_descriptor_set: &[u8],
    services: &[&str],
) -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    Ok(reflection_builder(file_descriptor_set, services).build_v1alpha()?)
}

/// The shutdown future of a tonic server (`serve_with_incoming_shutdown`):
/// waits for `token`, then marks the process not ready and reports every
/// service of `services` and the overall status (`""`) NOT_SERVING, so that
/// balancers stop routing before the port closes. The statuses are then
/// cleared, which ends open health Watch streams after they delivered
/// NOT_SERVING; they would otherwise hold the drain until its grace period
/// ran out.
pub async fn drain_signal(
    token: CancellationToken,
    readiness: Readiness,
    mut reporter: HealthReporter,
    services: Vec<&'static str>,
) {
    token.cancelled().await;
    tracing::info!("shutting down: no new rpcs, draining those in flight");
    readiness.set_not_ready("shutting down");
    for name in std::iter::once("").chain(services) {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
        reporter.clear_service_status(name).await;
    }
}

//! The health and reflection services, served by a real tonic server on
//! 127.0.0.1:0 and queried with the generated clients.

use encore_telemetry::grpc::ServingStatus;
use encore_telemetry::{Error, grpc_health, grpc_reflection};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

#[tokio::test]
async fn health_and_reflection_are_served() {
    let (reporter, health) = grpc_health();
    // The health service's own descriptors stand in for Encore's here.
    let reflection = grpc_reflection(tonic_health::pb::FILE_DESCRIPTOR_SET, &[]).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // Health: the whole server serves from the start; a named service
    // answers what the reporter last set.
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    let status = health.check(check("")).await.unwrap().into_inner().status;
    assert_eq!(status, WireStatus::Serving as i32);
    reporter
        .set_service_status("encore.v1.Actor", ServingStatus::NotServing)
        .await;
    let status = health
        .check(check("encore.v1.Actor"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, WireStatus::NotServing as i32);
    let unknown = health.check(check("encore.v1.Nothing")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Reflection: the registered services are listed.
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply: ServerReflectionResponse = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply: {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.reflection.v1.ServerReflection".to_owned()),
        "{names:?}"
    );

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[test]
fn a_bad_descriptor_set_is_an_error() {
    // Field 1, wire type 2 (the `file` field), claiming more bytes than follow.
    let Err(err) = grpc_reflection(&[0x0a, 0x10, 0x01], &[]) else {
        panic!("a truncated descriptor set was accepted");
    };
    assert!(matches!(err, Error::Reflection(_)), "{err}");
}

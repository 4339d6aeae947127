//! The reward server under pressure and over its life: a full queue, an
//! expired deadline, gRPC health and reflection, the worker token, and a
//! shutdown that drains in-flight requests. Queues are filled deterministically by holding the
//! scoring workers at a [`Gate`].

mod common;

use std::time::Duration;

use common::{PATIENCE, TestServer, clips, http_get, raw_client, request, test_config, tiny_model};
use encore_reward::RewardKind;
use encore_reward_server::{Config, Gate, SERVICE_NAME};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_types::StatusExt;

async fn quality_server(config: Config, gate: Gate) -> TestServer {
    TestServer::start(
        config,
        vec![("quality", tiny_model(RewardKind::Quality, 5))],
        gate,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted_with_a_retry_delay() {
    let config = Config {
        max_request_items: 4,
        queue_capacity: 4,
        ..test_config()
    };
    let gate = Gate::closed();
    let t = quality_server(config, gate.clone()).await;

    // Together one item too many for the queue. Whichever is queued first
    // stays queued (the worker is held), so the other must be refused.
    let mut big = tokio::spawn({
        let mut client = t.client.clone();
        async move { client.score(request(clips(30, 0, 4), &[])).await }
    });
    let mut small = tokio::spawn({
        let mut client = t.client.clone();
        async move { client.score(request(clips(30, 4, 1), &[])).await }
    });
    let (refused, admitted) = tokio::time::timeout(PATIENCE, async {
        tokio::select! {
            r = &mut big => (r.unwrap(), small),
            r = &mut small => (r.unwrap(), big),
        }
    })
    .await
    .expect("neither request was refused");
    let status = refused.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let details = status.get_error_details();
    let info = details.error_info().unwrap();
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("OVERLOADED", "encore.v1")
    );
    assert_eq!(info.metadata["model"], "quality");
    let delay = details.retry_info().unwrap().retry_delay.unwrap();
    assert!(delay >= Duration::from_millis(10), "{delay:?}");

    // Released, the worker scores what was admitted.
    gate.open();
    let response = admitted.await.unwrap().unwrap().into_inner();
    assert!(!response.results.is_empty());
    assert_eq!(
        t.metric(r#"encore_reward_requests_total{code="RESOURCE_EXHAUSTED",model="quality"}"#)
            .await,
        1.0
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_deadline_answers_deadline_exceeded_and_is_not_scored() {
    let gate = Gate::closed();
    let mut t = quality_server(test_config(), gate.clone()).await;

    let mut raw = raw_client(t.server.grpc_addr());
    let mut expiring = tonic::Request::new(request(clips(30, 0, 3), &[]));
    expiring
        .metadata_mut()
        .insert("grpc-timeout", "200m".parse().unwrap());
    let status = tokio::time::timeout(PATIENCE, raw.score(expiring))
        .await
        .expect("the deadline was not enforced")
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // A deadline already spent on arrival is refused at once.
    let mut spent = tonic::Request::new(request(clips(30, 0, 1), &[]));
    spent
        .metadata_mut()
        .insert("grpc-timeout", "1m".parse().unwrap());
    let status = raw.score(spent).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // Released, the worker drops the expired entry and scores the next
    // request; the queue is FIFO, so once that one is answered the expired
    // one has been dealt with.
    gate.open();
    let ok = t
        .client
        .score(request(clips(30, 5, 2), &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.results.len(), 2);
    assert_eq!(
        t.metric(r#"encore_reward_items_total{model="quality"}"#)
            .await,
        2.0
    );
    assert_eq!(
        t.metric(r#"encore_reward_skipped_items_total{model="quality"}"#)
            .await,
        3.0
    );
    // The spent one was refused before its body, and so its models, were
    // read.
    assert_eq!(
        t.metric(r#"encore_reward_requests_total{code="DEADLINE_EXCEEDED",model="quality"}"#)
            .await,
        1.0
    );

    // Through tonic's own channel, which enforces the deadline on its side
    // as well, the call fails in time with one of the two codes.
    gate.close();
    let mut tonic_request = tonic::Request::new(request(clips(30, 0, 1), &[]));
    tonic_request.set_timeout(Duration::from_millis(100));
    let status = t.client.score(tonic_request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    gate.open();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_worker_token_only_its_holders_are_scored_and_probes_stay_open() {
    use encore_client::BearerToken;
    use encore_proto::v1::DescribeModelsRequest;
    use encore_proto::v1::reward_service_client::RewardServiceClient;

    let mut config = test_config();
    config.worker_token = Some("worker-secret".into());
    let mut t = quality_server(config, Gate::new()).await;
    let channel = common::channel(t.server.grpc_addr()).await;
    let client = |token: &str| {
        RewardServiceClient::with_interceptor(channel.clone(), BearerToken::new(token).unwrap())
    };

    for token in ["", "wrong-secret"] {
        let refused = |status: tonic::Status| {
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{token:?}: {status:?}"
            )
        };
        refused(
            client(token)
                .score(request(clips(40, 0, 1), &["quality"]))
                .await
                .unwrap_err(),
        );
        refused(
            client(token)
                .describe_models(DescribeModelsRequest::default())
                .await
                .unwrap_err(),
        );
    }
    // The harness's own client sends no token either.
    let status = t
        .client
        .score(request(clips(40, 0, 1), &["quality"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let scored = client("worker-secret")
        .score(request(clips(40, 0, 2), &["quality"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scored.results.len(), 2);
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    assert_eq!(http_get(t.server.admin_addr(), "/metrics").await.0, 200);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let t = quality_server(test_config(), Gate::new()).await;
    let channel = common::channel(t.server.grpc_addr()).await;

    let mut health = HealthClient::new(channel.clone());
    for service in ["", SERVICE_NAME] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(services)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<&str> = services.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&SERVICE_NAME), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // The admin port.
    let admin = t.server.admin_addr();
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    let metrics = http_get(admin, "/metrics").await.1;
    assert!(
        metrics.contains("encore_reward_queue_depth_items"),
        "{metrics}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_serving_drains_in_flight_requests_and_stops() {
    let gate = Gate::closed();
    let t = quality_server(test_config(), gate.clone()).await;
    let addr = t.server.grpc_addr();
    let channel = common::channel(addr).await;

    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    // A request in flight when shutdown begins.
    let in_flight = tokio::spawn({
        let mut client = t.client.clone();
        async move { client.score(request(clips(30, 0, 2), &[])).await }
    });
    t.wait_for_queue_depth("quality", 2.0).await;

    t.shutdown.cancel();
    let next = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("no health update after shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);

    // The in-flight request is still answered once the worker may go on.
    gate.open();
    let response = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .expect("the in-flight request was not answered")
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(response.results.len(), 2);

    tokio::time::timeout(PATIENCE, t.server.wait())
        .await
        .expect("the server did not stop")
        .unwrap();
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

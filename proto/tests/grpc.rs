//! End-to-end check of the generated tonic code: a real server and client
//! over TCP on 127.0.0.1. The RewardService below is a test fixture, not the
//! reward server (that lives in the reward-server crate).

use encore_proto::v1::reward_service_client::RewardServiceClient;
use encore_proto::v1::reward_service_server::{RewardService, RewardServiceServer};
use encore_proto::v1::{
    DescribeModelsRequest, DescribeModelsResponse, InputConstraints, OutputRange, RewardKind,
    RewardModelInfo, ScoreRequest, ScoreResponse,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};

/// Test fixture: describes one fixed model and scores nothing.
struct FixtureRewardService;

fn fixture_model() -> RewardModelInfo {
    RewardModelInfo {
        name: "adherence".into(),
        kind: RewardKind::PromptAdherence.into(),
        version: "test".into(),
        sha256: "00".repeat(32),
        description: "test fixture".into(),
        input: Some(InputConstraints {
            min_tokens: 1,
            max_tokens: 1500,
            vocab_size: 1024,
            codec: "encore-codec-v1".into(),
            frame_rate_hz: 50.0,
            sample_rate_hz: 24_000,
            uses_caption: true,
            max_caption_bytes: 4096,
            max_batch_items: 64,
        }),
        output: Some(OutputRange {
            min: Some(-1.0),
            max: Some(1.0),
            description: "cosine similarity".into(),
        }),
    }
}

#[tonic::async_trait]
impl RewardService for FixtureRewardService {
    async fn score(
        &self,
        _request: Request<ScoreRequest>,
    ) -> Result<Response<ScoreResponse>, Status> {
        Err(Status::invalid_argument(
            "items: must not be empty (fixture)",
        ))
    }

    async fn describe_models(
        &self,
        _request: Request<DescribeModelsRequest>,
    ) -> Result<Response<DescribeModelsResponse>, Status> {
        Ok(Response::new(DescribeModelsResponse {
            models: vec![fixture_model()],
            audio_codec: None,
        }))
    }
}

#[tokio::test]
async fn generated_client_and_server_talk_over_tcp() {
    // Bound before the server task starts, so the client's connect cannot
    // race the server: the kernel queues the connection until it is accepted.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RewardServiceServer::new(FixtureRewardService))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = shutdown_rx.await;
            }),
    );

    let mut client = RewardServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");

    let models = client
        .describe_models(DescribeModelsRequest {})
        .await
        .expect("DescribeModels")
        .into_inner();
    assert_eq!(models.models, vec![fixture_model()]);
    assert_eq!(models.models[0].kind(), RewardKind::PromptAdherence);

    // Errors cross the wire with their code and message intact.
    let status = client
        .score(ScoreRequest::default())
        .await
        .expect_err("fixture rejects every batch");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "items: must not be empty (fixture)");

    drop(client);
    shutdown_tx.send(()).expect("server still running");
    server
        .await
        .expect("server task")
        .expect("server shut down cleanly");
}

//! What the integration tests share: tiny real reward models, a server
//! started on 127.0.0.1:0, clients for its gRPC and admin ports, and
//! realistic clips from the corpus.

#![allow(dead_code)] // Each test binary uses a different part of this.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use candle_core::Device;
use encore_proto::v1::reward_service_client::RewardServiceClient;
use encore_proto::v1::{ScoreItem, ScoreRequest, ScoreResponse};
use encore_reward::{ArchConfig, RewardConfig, RewardKind, RewardModel};
use encore_reward_server::{Config, Gate, RunningServer, ServerBuilder};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// Bounds every wait on the server, so that a bug fails the test instead
/// of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Most tokens the test models accept.
pub const MAX_TOKENS: usize = 200;

/// A small, untrained but real model of `kind`: the full front end and
/// network, narrow enough to score in milliseconds.
pub fn tiny_config(kind: RewardKind) -> RewardConfig {
    let mut cfg = RewardConfig::new(kind);
    cfg.arch = ArchConfig::tiny();
    cfg.min_tokens = 4;
    cfg.max_tokens = MAX_TOKENS;
    cfg.version = format!("test-{kind}");
    cfg.description = format!("tiny {kind} model for tests");
    cfg
}

/// A fresh tiny model; the same seed gives the same weights.
pub fn tiny_model(kind: RewardKind, seed: u64) -> RewardModel {
    RewardModel::fresh(tiny_config(kind), &Device::Cpu, seed).unwrap()
}

/// A config for tests: both ports on 127.0.0.1:0.
pub fn test_config() -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    }
}

/// A running server, its shutdown token, and a connected client.
pub struct TestServer {
    pub server: RunningServer,
    pub shutdown: CancellationToken,
    pub client: RewardServiceClient<Channel>,
}

impl TestServer {
    /// Starts `models` with `config` and the workers held at `gate`.
    pub async fn start<N: Into<String>>(
        config: Config,
        models: Vec<(N, RewardModel)>,
        gate: Gate,
    ) -> Self {
        let mut builder = ServerBuilder::new(config)
            .registry(Registry::new())
            .gate(gate);
        for (name, model) in models {
            builder = builder.model(name, model);
        }
        Self::from_builder(builder).await
    }

    /// Starts the server `builder` describes.
    pub async fn from_builder(builder: ServerBuilder) -> Self {
        let shutdown = CancellationToken::new();
        // `start` returns once the server is ready.
        let server = builder.start(shutdown.clone()).await.unwrap();
        let client = RewardServiceClient::new(channel(server.grpc_addr()).await);
        Self {
            server,
            shutdown,
            client,
        }
    }

    /// Scores `items` with the named models; panics if the server refuses.
    pub async fn scores(&mut self, items: Vec<ScoreItem>, models: &[&str]) -> ScoreResponse {
        let n = items.len();
        let response = self
            .client
            .score(request(items, models))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.results.len(), n);
        response
    }

    /// Cancels the token and waits for the server to stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.server.wait())
            .await
            .expect("the server did not stop")
            .unwrap();
    }

    /// The value of a metric sample in `/metrics`, e.g.
    /// `encore_reward_items_total{model="quality"}`; 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = http_get(self.server.admin_addr(), "/metrics").await.1;
        metric_value(&text, sample)
    }

    /// The value of a metric sample in the server's registry, read
    /// directly rather than over HTTP (for polling); 0 if absent.
    pub fn registry_value(&self, sample: &str) -> f64 {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&self.server.registry().gather())
            .unwrap();
        metric_value(&text, sample)
    }

    /// Waits until `model`'s queue holds `items` items. Yields to the
    /// runtime between looks, bounded by [`PATIENCE`].
    pub async fn wait_for_queue_depth(&self, model: &str, items: f64) {
        let started = std::time::Instant::now();
        let sample = format!("encore_reward_queue_depth_items{{model=\"{model}\"}}");
        while self.registry_value(&sample) != items {
            assert!(
                started.elapsed() < PATIENCE,
                "the queue never held {items} items"
            );
            tokio::task::yield_now().await;
        }
    }
}

/// A channel to a gRPC server.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A Score client over a plain HTTP/2 connection that sends `grpc-timeout`
/// but, unlike tonic's channel, does not enforce it itself, so the test
/// sees the server's own answer to an expired deadline.
pub fn raw_client(
    addr: SocketAddr,
) -> RewardServiceClient<
    Client<hyper_util::client::legacy::connect::HttpConnector, tonic::body::Body>,
> {
    let http = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let origin = format!("http://{addr}").parse().unwrap();
    RewardServiceClient::with_origin(http, origin)
}

/// GET over HTTP/1.1: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri = format!("http://{addr}{path}").parse().unwrap();
    let response = client.get(uri).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The value of `sample` in a Prometheus text exposition; 0 if absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(sample))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .sum()
}

/// `n` corpus clips of `frames` tokens as Score items, starting at `start`.
pub fn clips(frames: usize, start: u64, n: usize) -> Vec<ScoreItem> {
    encore_reward_server::corpus_items(17, frames, start, n)
}

/// A request for `items` with the named models.
pub fn request(items: Vec<ScoreItem>, models: &[&str]) -> ScoreRequest {
    ScoreRequest {
        items,
        models: models.iter().map(|m| (*m).to_owned()).collect(),
    }
}

/// The fields a refused request's BadRequest names, with their reasons.
pub fn violations(status: &tonic::Status) -> HashMap<String, String> {
    status
        .get_error_details()
        .bad_request()
        .expect("a BadRequest")
        .field_violations
        .iter()
        .map(|v| (v.field.clone(), v.reason.clone()))
        .collect()
}

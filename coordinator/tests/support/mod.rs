//! What the coordinator's integration tests share: a coordinator started
//! in-process on 127.0.0.1:0 (or the real binary) over a real Redis or an
//! embedded store, clients that carry bearer tokens, and builders of valid
//! requests.

#![allow(dead_code)] // Each test binary uses a different part of this.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use encore_coordinator::Config;
use encore_coordinator::auth::BearerToken;
use encore_coordinator::config::AuthConfig;
use encore_coordinator::server::{Coordinator, RunningCoordinator};
use encore_proto::v1::cluster_service_client::ClusterServiceClient;
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{
    Algorithm, Capabilities, JobResources, JobSpec, ModelRef, Prompt, PromptList, PromptSource,
    RegisterRequest, Resources, RewardConfig, Role, SamplingParams, StopCondition,
    SubmitJobRequest, prompt_source,
};
use encore_store::{Store, SystemClock};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Bounds every wait, so that a bug fails the test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(60);
/// The client token of client "alice".
pub const ALICE: &str = "alice-token";
/// The client token of client "bob".
pub const BOB: &str = "bob-token";
/// The worker token.
pub const WORKER: &str = "worker-token";

/// A config for tests: both ports on 127.0.0.1:0, blobs in `dir`, tokens
/// for alice, bob and the workers.
pub fn test_config(store_uri: &str, dir: &Path) -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        store: store_uri.to_owned(),
        blob_dir: dir.join("blobs"),
        checkpoint_dir: dir.join("checkpoints"),
        shutdown_grace_ms: 2_000,
        auth: AuthConfig {
            client_tokens: vec![format!("alice:{ALICE}"), format!("bob:{BOB}")],
            worker_token: Some(WORKER.into()),
            ..AuthConfig::default()
        },
        ..Config::default()
    }
}

/// A coordinator running in this process.
pub struct TestCoordinator {
    pub running: RunningCoordinator,
    pub shutdown: CancellationToken,
}

impl TestCoordinator {
    /// Starts a coordinator with `config`.
    pub async fn start(config: Config) -> Self {
        let shutdown = CancellationToken::new();
        let running = Coordinator::new(config)
            .start(shutdown.clone())
            .await
            .expect("starting the coordinator");
        Self { running, shutdown }
    }

    /// Its gRPC URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.running.grpc_addr())
    }

    /// A JobService client with `token`.
    pub async fn jobs(&self, token: &str) -> JobClient {
        JobServiceClient::with_interceptor(channel(&self.url()).await, bearer(token))
    }

    /// A ClusterService client with the worker token.
    pub async fn cluster(&self) -> ClusterClient {
        ClusterServiceClient::with_interceptor(channel(&self.url()).await, bearer(WORKER))
    }

    /// Shuts it down and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.running.wait().await.expect("clean shutdown");
    }
}

/// The client-side bearer interceptor.
pub type Bearer = BearerToken;

/// Adds `token` as a bearer token; an empty token sends none.
pub fn bearer(token: &str) -> Bearer {
    BearerToken::new(token).expect("ascii token")
}

/// A JobService client with a token.
pub type JobClient = JobServiceClient<InterceptedService<Channel, Bearer>>;
/// A ClusterService client with a token.
pub type ClusterClient = ClusterServiceClient<InterceptedService<Channel, Bearer>>;

/// A channel to `url`.
pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connecting to the coordinator")
}

/// A Redis store on `server`, for the tests that look into the store.
pub async fn redis_store(url: &str) -> Arc<dyn Store> {
    encore_store::open(url, Arc::new(SystemClock))
        .await
        .expect("opening the Redis store")
}

/// A small valid job: `actors` actors, one learner rank, the quality reward
/// model, 4 inline prompts.
pub fn spec(actors: u32) -> JobSpec {
    JobSpec {
        name: "test job".into(),
        base_checkpoint: Some(ModelRef {
            name: "base".into(),
            uri: "runs/base/model.safetensors".into(),
            sha256: String::new(),
        }),
        prompts: Some(PromptSource {
            source: Some(prompt_source::Source::Inline(PromptList {
                prompts: (0..4)
                    .map(|i| Prompt {
                        prompt_id: format!("p{i}"),
                        caption: format!("calm piano piece number {i}"),
                        ..Prompt::default()
                    })
                    .collect(),
            })),
        }),
        rewards: vec![RewardConfig {
            model: Some(ModelRef {
                name: "quality".into(),
                ..ModelRef::default()
            }),
            weight: 1.0,
            normalization: None,
        }],
        algorithm: Some(Algorithm {
            samples_per_prompt: 2,
            batch_size: 4,
            learning_rate: 1e-4,
            kl_coef: 0.05,
            sampling: Some(SamplingParams {
                max_new_tokens: 64,
                temperature: 1.0,
                ..SamplingParams::default()
            }),
            ..Algorithm::default()
        }),
        stop: Some(StopCondition {
            max_steps: Some(100),
            ..StopCondition::default()
        }),
        resources: Some(JobResources {
            actors,
            learner_ranks: 1,
            ..JobResources::default()
        }),
        ..JobSpec::default()
    }
}

/// A submit request for `spec(actors)` under `key`.
pub fn submit(key: &str, actors: u32) -> SubmitJobRequest {
    SubmitJobRequest {
        idempotency_key: key.into(),
        spec: Some(spec(actors)),
        validate_only: false,
    }
}

/// A valid Register request for `role` from `instance`; learners and reward
/// servers give an address, reward servers host "quality".
pub fn register(role: Role, instance: &str) -> RegisterRequest {
    let (address, models) = match role {
        Role::Learner => ("127.0.0.1:7001".to_owned(), Vec::new()),
        Role::RewardServer => (
            "127.0.0.1:50061".to_owned(),
            vec![ModelRef {
                name: "quality".into(),
                ..ModelRef::default()
            }],
        ),
        _ => (String::new(), Vec::new()),
    };
    RegisterRequest {
        role: role as i32,
        capabilities: Some(Capabilities {
            resources: Some(Resources {
                cpu_cores: 2,
                ..Resources::default()
            }),
            models,
            address,
            software_version: encore_coordinator::cluster::SOFTWARE_VERSION.into(),
            ..Capabilities::default()
        }),
        instance_id: instance.into(),
    }
}

/// Submits `submit(key, actors)` and returns the new job's id.
pub async fn submit_job(jobs: &mut JobClient, key: &str, actors: u32) -> String {
    jobs.submit(submit(key, actors))
        .await
        .expect("submitting a valid job")
        .into_inner()
        .job
        .expect("the job")
        .job_id
}

/// Registers a reward server hosting "quality", a learner and one actor:
/// what `spec(1)` needs to run. Returns their member ids in that order.
pub async fn staff(cluster: &mut ClusterClient, suffix: &str) -> [String; 3] {
    let mut ids = Vec::new();
    for role in [Role::RewardServer, Role::Learner, Role::Actor] {
        let instance = format!(
            "{}-{suffix}",
            role.as_str_name().to_lowercase().replace('_', "-")
        );
        let r = cluster
            .register(register(role, &instance))
            .await
            .expect("registering");
        ids.push(r.into_inner().member_id);
    }
    ids.try_into().expect("three members")
}

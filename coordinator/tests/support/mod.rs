//! What the coordinator's integration tests share: a coordinator started
//! in-process on 127.0.0.1:0 (or the real binary) over a real Redis or an
//! embedded store, clients that carry bearer tokens, and builders of valid
//! requests.

#![allow(dead_code)] // Each test binary uses a different part of this.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use encore_client::BearerToken;
use encore_coordinator::Config;
use encore_coordinator::config::AuthConfig;
use encore_coordinator::server::{Coordinator, RunningCoordinator};
use encore_proto::v1::cluster_service_client::ClusterServiceClient;
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{
    Algorithm, Assignment, Capabilities, DeregisterRequest, DeregisterResponse,
    GetAssignmentRequest, HeartbeatRequest, HeartbeatResponse, JobResources, JobSpec, JobState,
    ModelRef, Prompt, PromptList, PromptSource, RegisterRequest, RegisterResponse,
    ReportProgressRequest, ReportProgressResponse, Resources, RewardConfig, Role, SamplingParams,
    StopCondition, SubmitJobRequest, WatchAssignmentRequest, WatchJobRequest, job_event,
    prompt_source,
};
use encore_store::{Store, SystemClock};
use tokio_stream::StreamExt;
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

    /// A ClusterService client that registers with the worker token and
    /// acts for each member with its member token.
    pub async fn cluster(&self) -> TestCluster {
        TestCluster::new(channel(&self.url()).await)
    }

    /// Shuts it down and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.running.wait().await.expect("clean shutdown");
    }
}

/// ClusterService as the members of a test see it: Register goes out with
/// the worker token, and every call about a member with the token Register
/// gave that member (a made-up one for a member it never registered, which
/// the coordinator treats as a member that is gone).
#[derive(Clone)]
pub struct TestCluster {
    channel: Channel,
    tokens: Arc<Mutex<HashMap<String, String>>>,
}

impl TestCluster {
    /// Over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            channel,
            tokens: Arc::default(),
        }
    }

    /// The same members over another channel (a restarted coordinator).
    pub fn reconnect(&self, channel: Channel) -> Self {
        Self {
            channel,
            tokens: self.tokens.clone(),
        }
    }

    /// A plain client sending `token`.
    pub fn with_token(&self, token: &str) -> ClusterClient {
        ClusterServiceClient::with_interceptor(self.channel.clone(), bearer(token))
    }

    /// The token of `member_id`: the last one Register gave it, or a
    /// well-formed one nobody was given.
    pub fn token(&self, member_id: &str) -> String {
        self.tokens
            .lock()
            .unwrap()
            .get(member_id)
            .cloned()
            .unwrap_or_else(|| format!("encore-member.{member_id}.{}", "0".repeat(64)))
    }

    fn member(&self, member_id: &str) -> ClusterClient {
        // A member id no header can carry (a fuzzed one) gets a token for
        // another member, which the coordinator refuses as such.
        let token = BearerToken::new(&self.token(member_id))
            .unwrap_or_else(|_| bearer(&format!("encore-member.x.{}", "0".repeat(64))));
        ClusterServiceClient::with_interceptor(self.channel.clone(), token)
    }

    /// Register, with the worker token; remembers the member's token.
    pub async fn register(
        &mut self,
        request: RegisterRequest,
    ) -> Result<tonic::Response<RegisterResponse>, tonic::Status> {
        let response = self.with_token(WORKER).register(request).await?;
        let r = response.get_ref();
        self.tokens
            .lock()
            .unwrap()
            .insert(r.member_id.clone(), r.member_token.clone());
        Ok(response)
    }

    /// Heartbeat, as the member.
    pub async fn heartbeat(
        &mut self,
        request: HeartbeatRequest,
    ) -> Result<tonic::Response<HeartbeatResponse>, tonic::Status> {
        self.member(&request.member_id).heartbeat(request).await
    }

    /// GetAssignment, as the member.
    pub async fn get_assignment(
        &mut self,
        request: GetAssignmentRequest,
    ) -> Result<tonic::Response<Assignment>, tonic::Status> {
        self.member(&request.member_id)
            .get_assignment(request)
            .await
    }

    /// WatchAssignment, as the member.
    pub async fn watch_assignment(
        &mut self,
        request: WatchAssignmentRequest,
    ) -> Result<tonic::Response<tonic::Streaming<Assignment>>, tonic::Status> {
        self.member(&request.member_id)
            .watch_assignment(request)
            .await
    }

    /// Deregister, as the member.
    pub async fn deregister(
        &mut self,
        request: DeregisterRequest,
    ) -> Result<tonic::Response<DeregisterResponse>, tonic::Status> {
        self.member(&request.member_id).deregister(request).await
    }

    /// ReportProgress, as the member.
    pub async fn report_progress(
        &mut self,
        request: ReportProgressRequest,
    ) -> Result<tonic::Response<ReportProgressResponse>, tonic::Status> {
        self.member(&request.member_id)
            .report_progress(request)
            .await
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
            software_version: encore_client::SOFTWARE_VERSION.into(),
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
pub async fn staff(cluster: &mut TestCluster, suffix: &str) -> [String; 3] {
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

/// Waits (at most [`PATIENCE`]) until the job is in `state`.
pub async fn wait_for_state(jobs: &mut JobClient, job_id: &str, state: JobState) {
    let mut events = jobs
        .watch(WatchJobRequest {
            job_id: job_id.into(),
            after_sequence: None,
        })
        .await
        .unwrap()
        .into_inner();
    let reached = async {
        while let Some(event) = events.next().await {
            match event.unwrap().event {
                Some(job_event::Event::Snapshot(job)) if job.state == state as i32 => return,
                Some(job_event::Event::StateChange(c)) if c.state == state as i32 => return,
                _ => {}
            }
        }
        panic!("the watch ended before {state:?}");
    };
    tokio::time::timeout(PATIENCE, reached)
        .await
        .expect("job state reached in time");
}

/// Submits a job for alice and staffs it (see [`staff`]); returns when it
/// runs, with the ids of its reward server, learner rank and actor.
pub async fn running_job(
    jobs: &mut JobClient,
    cluster: &mut TestCluster,
    key: &str,
) -> (String, [String; 3]) {
    let job_id = submit_job(jobs, key, 1).await;
    let members = staff(cluster, key).await;
    wait_for_state(jobs, &job_id, JobState::Running).await;
    (job_id, members)
}

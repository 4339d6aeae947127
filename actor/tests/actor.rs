//! An actor against real parts on loopback: a coordinator on a real Redis,
//! a reward server with two tiny (untrained, real) reward models, and a
//! tiny policy published as version 0. The actor registers, takes the job,
//! fetches the weights, samples groups of K clips, gets them scored, and
//! appends ScoredBatches to the Redis rollout queue; it picks up version 1
//! when it is published, and stalls without losing or breaking anything
//! while the reward server is away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use encore_actor::Config as ActorConfig;
use encore_client::BearerToken;
use encore_client::weights::{PublishData, publish};
use encore_coordinator::config::AuthConfig;
use encore_coordinator::{Config, Coordinator};
use encore_model::{Preset, TrainablePolicy};
use encore_proto::v1::cluster_service_client::ClusterServiceClient;
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::weight_service_client::WeightServiceClient;
use encore_proto::v1::{
    Algorithm, Capabilities, HeartbeatRequest, JobResources, JobSpec, ModelRef, Prompt, PromptList,
    PromptSource, PublishHeader, RegisterRequest, Resources, RewardConfig, Role, SamplingParams,
    ScoredBatch, StopCondition, SubmitJobRequest, WatchAssignmentRequest, WeightFormat,
    prompt_source,
};
use encore_reward::{ArchConfig, RewardConfig as ModelConfig, RewardKind, RewardModel};
use encore_reward_server::{Config as RewardServerConfig, RunningServer, ServerBuilder};
use encore_store::{Store, SystemClock};
use encore_testkit::{RedisServer, free_port};
use prost::Message;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const PATIENCE: Duration = Duration::from_secs(120);
const WORKER: &str = "worker-token";
const CLIENT: &str = "client-token";
const K: u32 = 2;
const FRAMES: u32 = 16;

fn tiny_reward(kind: RewardKind) -> RewardModel {
    let mut cfg = ModelConfig::new(kind);
    cfg.arch = ArchConfig::tiny();
    cfg.min_tokens = 4;
    cfg.max_tokens = 200;
    RewardModel::fresh(cfg, &Device::Cpu, 7).unwrap()
}

/// A reward server on `port` that joins the coordinator at `coordinator`
/// itself, as its binary does with `--coordinator`.
async fn reward_server(port: u16, coordinator: &str) -> (RunningServer, CancellationToken) {
    let config = RewardServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        shutdown_grace_ms: 500,
        coordinator: coordinator.to_owned(),
        worker_token: Some(WORKER.into()),
        ..RewardServerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let server = ServerBuilder::new(config)
        .registry(prometheus::Registry::new())
        .model("quality", tiny_reward(RewardKind::Quality))
        .model("adherence", tiny_reward(RewardKind::Adherence))
        .start(shutdown.clone())
        .await
        .unwrap();
    (server, shutdown)
}

fn spec() -> JobSpec {
    let reward = |name: &str| RewardConfig {
        model: Some(ModelRef {
            name: name.into(),
            ..ModelRef::default()
        }),
        weight: 1.0,
        normalization: None,
    };
    JobSpec {
        name: "actor test".into(),
        base_checkpoint: Some(ModelRef {
            name: "tiny".into(),
            uri: "unused-by-the-actor".into(),
            sha256: String::new(),
        }),
        prompts: Some(PromptSource {
            source: Some(prompt_source::Source::Inline(PromptList {
                prompts: [
                    "calm solo piano",
                    "fast drums and bass",
                    "slow strings in D minor",
                ]
                .iter()
                .enumerate()
                .map(|(i, c)| Prompt {
                    prompt_id: format!("p{i}"),
                    caption: (*c).into(),
                    ..Prompt::default()
                })
                .collect(),
            })),
        }),
        rewards: vec![reward("quality"), reward("adherence")],
        algorithm: Some(Algorithm {
            samples_per_prompt: K,
            batch_size: 2 * K,
            learning_rate: 1e-4,
            sampling: Some(SamplingParams {
                max_new_tokens: FRAMES,
                ..SamplingParams::default()
            }),
            ..Algorithm::default()
        }),
        stop: Some(StopCondition {
            max_steps: Some(10),
            ..StopCondition::default()
        }),
        resources: Some(JobResources {
            actors: 1,
            learner_ranks: 1,
            ..JobResources::default()
        }),
        ..JobSpec::default()
    }
}

/// Publishes a fresh tiny policy (seeded) as `version` of `job_id`, as the
/// job's learner rank 0 (its member `token`).
async fn publish_policy(
    url: &str,
    token: &str,
    job_id: &str,
    version: u64,
    seed: u64,
    dir: &std::path::Path,
) {
    let cfg = Preset::Tiny.config();
    let policy = TrainablePolicy::fresh(&cfg, &Device::Cpu, seed).unwrap();
    let out = dir.join(format!("policy-{version}"));
    policy.save(&out, serde_json::json!({})).unwrap();
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        WeightServiceClient::with_interceptor(channel, BearerToken::new(token).unwrap());
    publish(
        &mut client,
        PublishHeader {
            job_id: job_id.into(),
            version,
            format: WeightFormat::Safetensors as i32,
            model_config_json: serde_json::to_string(&cfg).unwrap(),
            ..PublishHeader::default()
        },
        PublishData::File(out.join(encore_model::WEIGHTS_FILE)),
        1 << 20,
    )
    .await
    .unwrap();
}

/// Reads the next ScoredBatch from the job's queue (acknowledging it).
async fn next_batch(store: &dyn Store, job_id: &str) -> ScoredBatch {
    let read = tokio::time::timeout(PATIENCE, async {
        loop {
            let entries = store
                .queue_read(job_id, "test", "reader", 1, Duration::from_secs(5))
                .await
                .unwrap();
            if let Some(entry) = entries.into_iter().next() {
                store.queue_ack(job_id, "test", &[entry.id]).await.unwrap();
                return ScoredBatch::decode(entry.payload.as_slice()).unwrap();
            }
        }
    });
    read.await.expect("a batch in time")
}

#[tokio::test]
async fn an_actor_samples_scores_and_queues_rollouts_and_follows_new_weights() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let coordinator_config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        store: redis.url(),
        blob_dir: dir.path().join("blobs"),
        checkpoint_dir: dir.path().join("checkpoints"),
        shutdown_grace_ms: 1_000,
        auth: AuthConfig {
            client_tokens: vec![format!("alice:{CLIENT}")],
            worker_token: Some(WORKER.into()),
            ..AuthConfig::default()
        },
        ..Config::default()
    };
    let stop_coordinator = CancellationToken::new();
    let coordinator = Coordinator::new(coordinator_config)
        .start(stop_coordinator.clone())
        .await
        .unwrap();
    let url = format!("http://{}", coordinator.grpc_addr());
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let reward_port = free_port();
    let (rewards, stop_rewards) = reward_server(reward_port, &url).await;
    let mut cluster =
        ClusterServiceClient::with_interceptor(channel.clone(), BearerToken::new(WORKER).unwrap());
    let register = |role: Role, address: String, models: Vec<&str>| RegisterRequest {
        role: role as i32,
        capabilities: Some(Capabilities {
            resources: Some(Resources::default()),
            models: models
                .into_iter()
                .map(|m| ModelRef {
                    name: m.into(),
                    ..ModelRef::default()
                })
                .collect(),
            address,
            software_version: encore_client::SOFTWARE_VERSION.into(),
            ..Capabilities::default()
        }),
        instance_id: format!("{role:?}"),
    };
    // The learner rank is played by the test: it publishes the weights.
    let learner = cluster
        .register(register(Role::Learner, "127.0.0.1:7000".into(), vec![]))
        .await
        .unwrap()
        .into_inner();
    let mut jobs = JobServiceClient::with_interceptor(channel, BearerToken::new(CLIENT).unwrap());
    let job_id = jobs
        .submit(SubmitJobRequest {
            idempotency_key: "actor-test".into(),
            spec: Some(spec()),
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
        .job_id;

    let stop_actor = CancellationToken::new();
    let actor_config = ActorConfig {
        coordinator: url.clone(),
        worker_token: Some(WORKER.into()),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        work_dir: dir.path().join("actor"),
        queue_max_batches: 4,
        max_backoff_ms: 200,
        ..ActorConfig::default()
    };
    let actor = tokio::spawn(encore_actor::run_with(
        actor_config,
        prometheus::Registry::new(),
        stop_actor.clone(),
    ));

    // Once the actor has joined the job runs, and its learner rank 0
    // publishes the first weights.
    let mut as_learner = ClusterServiceClient::with_interceptor(
        Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
        BearerToken::new(&learner.member_token).unwrap(),
    );
    let mut assignments = as_learner
        .watch_assignment(WatchAssignmentRequest {
            member_id: learner.member_id.clone(),
            after_generation: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // The test's learner keeps its lease for as long as the test runs.
    let keep_alive = {
        let mut cluster = as_learner.clone();
        let member_id = learner.member_id.clone();
        tokio::spawn(async move {
            loop {
                let _ = cluster
                    .heartbeat(HeartbeatRequest {
                        member_id: member_id.clone(),
                        status: None,
                    })
                    .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    tokio::time::timeout(PATIENCE, async {
        while let Some(assignment) = assignments.next().await {
            if assignment.unwrap().job_id == job_id {
                return;
            }
        }
        panic!("the assignment stream ended");
    })
    .await
    .expect("the learner is assigned the job");
    publish_policy(&url, &learner.member_token, &job_id, 0, 1, dir.path()).await;

    let store = encore_store::open(&redis.url(), Arc::new(SystemClock))
        .await
        .unwrap();
    let batch = next_batch(&*store, &job_id).await;
    assert_eq!(batch.job_id, job_id);
    assert_eq!(batch.stage, "main");
    assert_eq!(
        batch.rollouts.len(),
        (2 * K) as usize,
        "groups_per_batch × K"
    );
    for (i, rollout) in batch.rollouts.iter().enumerate() {
        assert_eq!(rollout.tokens.len(), FRAMES as usize);
        assert_eq!(rollout.behaviour_log_probs.len(), FRAMES as usize);
        assert!(
            rollout
                .behaviour_log_probs
                .iter()
                .all(|lp| lp.is_finite() && *lp <= 0.0)
        );
        assert_eq!(rollout.group_size, K);
        assert_eq!(rollout.sample_index, i as u32 % K);
        assert_eq!(rollout.policy_version.as_ref().unwrap().version, 0);
        let mut models: Vec<&String> = rollout.scores.keys().collect();
        models.sort();
        assert_eq!(models, ["adherence", "quality"]);
        assert!(rollout.scores.values().all(|s| s.value.is_finite()));
    }
    // A group's samples share their prompt and group id.
    assert_eq!(batch.rollouts[0].group_id, batch.rollouts[1].group_id);
    assert_eq!(batch.rollouts[0].prompt, batch.rollouts[1].prompt);

    // A new version is picked up between batches.
    publish_policy(&url, &learner.member_token, &job_id, 1, 2, dir.path()).await;
    let picked_up = tokio::time::timeout(PATIENCE, async {
        loop {
            let batch = next_batch(&*store, &job_id).await;
            if batch.rollouts[0].policy_version.as_ref().unwrap().version == 1 {
                return;
            }
        }
    });
    picked_up.await.expect("version 1 sampled from");

    // The reward server goes away (and deregisters): the actor stalls (the
    // queue stays empty after what was in flight), then carries on once the
    // server is back and has joined again.
    stop_rewards.cancel();
    rewards.wait().await.unwrap();
    while store.queue_len(&job_id).await.unwrap() > 0 {
        next_batch(&*store, &job_id).await;
    }
    assert!(
        !actor.is_finished(),
        "the actor survives a missing reward server"
    );
    let (rewards, stop_rewards) = reward_server(reward_port, &url).await;
    let batch = next_batch(&*store, &job_id).await;
    assert_eq!(batch.rollouts.len(), (2 * K) as usize);

    keep_alive.abort();
    stop_actor.cancel();
    tokio::time::timeout(PATIENCE, actor)
        .await
        .expect("the actor stops")
        .unwrap()
        .unwrap();
    stop_rewards.cancel();
    rewards.wait().await.unwrap();
    stop_coordinator.cancel();
    coordinator.wait().await.unwrap();
}

//! The RL loop end to end on loopback: a coordinator on a real Redis, a
//! reward server hosting a tiny quality model (it joins the cluster
//! itself), an actor and a learner rank. The job runs its steps, each step
//! is reported, weights are published and picked up, checkpoints are
//! written, and every rollout produced is consumed or dropped and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use encore_coordinator::auth::BearerToken;
use encore_coordinator::config::AuthConfig;
use encore_coordinator::{Config, Coordinator};
use encore_model::{Preset, TrainablePolicy};
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{
    Algorithm, JobResources, JobSpec, JobState, ModelRef, Normalization, NormalizationKind, Prompt,
    PromptList, PromptSource, RewardConfig, SamplingParams, StopCondition, SubmitJobRequest,
    WatchJobRequest, job_event, prompt_source,
};
use encore_reward::{ArchConfig, RewardConfig as ModelConfig, RewardKind, RewardModel};
use encore_reward_server::{Config as RewardServerConfig, ServerBuilder};
use encore_store::SystemClock;
use encore_testkit::RedisServer;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const PATIENCE: Duration = Duration::from_secs(300);
const WORKER: &str = "worker-token";
const CLIENT: &str = "client-token";
const STEPS: u64 = 6;

fn spec(base: &std::path::Path, shape: Shape) -> JobSpec {
    JobSpec {
        name: "rl loop test".into(),
        base_checkpoint: Some(ModelRef {
            name: "tiny".into(),
            uri: base.display().to_string(),
            sha256: String::new(),
        }),
        prompts: Some(PromptSource {
            source: Some(prompt_source::Source::Inline(PromptList {
                prompts: [
                    "calm solo piano",
                    "fast drums",
                    "slow strings",
                    "bright synth lead",
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
        rewards: vec![RewardConfig {
            model: Some(ModelRef {
                name: "quality".into(),
                ..ModelRef::default()
            }),
            weight: 1.0,
            normalization: Some(Normalization {
                kind: NormalizationKind::None as i32,
                ..Normalization::default()
            }),
        }],
        algorithm: Some(Algorithm {
            samples_per_prompt: 2,
            batch_size: shape.batch,
            learning_rate: shape.learning_rate,
            kl_coef: 0.05,
            sampling: Some(SamplingParams {
                max_new_tokens: 16,
                ..SamplingParams::default()
            }),
            ..Algorithm::default()
        }),
        stop: Some(StopCondition {
            max_steps: Some(shape.steps),
            ..StopCondition::default()
        }),
        resources: Some(JobResources {
            actors: shape.actors,
            learner_ranks: shape.ranks,
            ..JobResources::default()
        }),
        checkpoint_every_steps: 2,
        ..JobSpec::default()
    }
}

/// The size of a test job.
#[derive(Debug, Clone, Copy)]
struct Shape {
    actors: u32,
    ranks: u32,
    steps: u64,
    batch: u32,
    learning_rate: f64,
    /// Abort the learner (no clean-up: its lease lapses) after this many
    /// reported steps, and start a new one in its place.
    kill_learner_after: Option<u64>,
}

/// What a finished job left behind.
struct Outcome {
    job_id: String,
    points: Vec<encore_proto::v1::MetricPoint>,
    end: Option<i32>,
    dir: tempfile::TempDir,
    redis: RedisServer,
    /// Rollouts the actors appended to the queue.
    produced: u64,
    /// Rollouts still in the queue at the end (appended, not acknowledged).
    left_in_queue: u64,
}

/// Runs one job of `shape` on a fresh cluster in this process and waits
/// for it to end.
async fn run_job(shape: Shape) -> Outcome {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    TrainablePolicy::fresh(&Preset::Tiny.config(), &Device::Cpu, 1)
        .unwrap()
        .save(&base, serde_json::json!({}))
        .unwrap();

    let stop = CancellationToken::new();
    let coordinator = Coordinator::new(Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        store: redis.url(),
        blob_dir: dir.path().join("blobs"),
        checkpoint_dir: dir.path().join("checkpoints"),
        shutdown_grace_ms: 1_000,
        // Short, so a killed learner's rank is handed on quickly.
        lease_ttl_ms: 1_000,
        auth: AuthConfig {
            client_tokens: vec![format!("alice:{CLIENT}")],
            worker_token: Some(WORKER.into()),
            ..AuthConfig::default()
        },
        ..Config::default()
    })
    .start(stop.clone())
    .await
    .unwrap();
    let url = format!("http://{}", coordinator.grpc_addr());

    let mut quality = ModelConfig::new(RewardKind::Quality);
    quality.arch = ArchConfig::tiny();
    quality.min_tokens = 4;
    quality.max_tokens = 200;
    let rewards = ServerBuilder::new(RewardServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        shutdown_grace_ms: 500,
        coordinator: url.clone(),
        worker_token: Some(WORKER.into()),
        ..RewardServerConfig::default()
    })
    .registry(prometheus::Registry::new())
    .model(
        "quality",
        RewardModel::fresh(quality, &Device::Cpu, 3).unwrap(),
    )
    .start(stop.clone())
    .await
    .unwrap();

    let mut workers = Vec::new();
    let mut actor_registries = Vec::new();
    for _ in 0..shape.actors {
        let registry = prometheus::Registry::new();
        actor_registries.push(registry.clone());
        workers.push(tokio::spawn(encore_actor::run_with(
            encore_actor::Config {
                coordinator: url.clone(),
                worker_token: Some(WORKER.into()),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                work_dir: dir.path().join("actor"),
                max_backoff_ms: 200,
                ..encore_actor::Config::default()
            },
            registry,
            stop.clone(),
        )));
    }
    let learner = || {
        tokio::spawn(encore_learner::run_with(
            encore_learner::Config {
                coordinator: url.clone(),
                worker_token: Some(WORKER.into()),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                work_dir: dir.path().join("learner"),
                ..encore_learner::Config::default()
            },
            prometheus::Registry::new(),
            stop.clone(),
        ))
    };
    let mut learners: Vec<_> = (0..shape.ranks).map(|_| learner()).collect();

    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut jobs = JobServiceClient::with_interceptor(channel, BearerToken::new(CLIENT).unwrap());
    let job_id = jobs
        .submit(SubmitJobRequest {
            idempotency_key: "rl-loop".into(),
            spec: Some(spec(&base, shape)),
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
        .job_id;
    let mut watch = jobs
        .watch(WatchJobRequest {
            job_id: job_id.clone(),
            after_sequence: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    let mut points = Vec::new();
    let mut end = None;
    let mut killed = false;
    let followed = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = watch.next().await {
            match event.unwrap().event {
                Some(job_event::Event::Metrics(p)) => {
                    let step = p.step;
                    points.push(p);
                    if !killed && shape.kill_learner_after.is_some_and(|after| step >= after) {
                        // Like SIGKILL for the learner: its tasks stop where
                        // they are, nothing is deregistered or acknowledged.
                        killed = true;
                        learners[0].abort();
                        learners[0] = learner();
                    }
                }
                Some(job_event::Event::StateChange(c)) => end = Some(c.state),
                _ => {}
            }
        }
    });
    followed.await.expect("the job finished in time");
    stop.cancel();
    for task in workers {
        let ended = tokio::time::timeout(PATIENCE, task).await;
        ended.expect("the actor stops").unwrap().unwrap();
    }
    for task in learners {
        let ended = tokio::time::timeout(PATIENCE, task).await;
        ended.expect("the learner stops").unwrap().unwrap();
    }
    rewards.wait().await.unwrap();
    coordinator.wait().await.unwrap();
    let per_batch = u64::from(shape.batch / shape.actors);
    let produced: u64 = actor_registries
        .iter()
        .map(|r| {
            r.gather()
                .iter()
                .filter(|f| f.name() == "encore_actor_batches_total")
                .flat_map(|f| {
                    f.get_metric()
                        .iter()
                        .map(|m| m.get_counter().get_value() as u64)
                })
                .sum::<u64>()
        })
        .sum::<u64>()
        * per_batch;
    let store = encore_store::open(&redis.url(), std::sync::Arc::new(SystemClock))
        .await
        .unwrap();
    let left_in_queue = store.queue_len(&job_id).await.unwrap() * per_batch;
    Outcome {
        job_id,
        points,
        end,
        dir,
        redis,
        produced,
        left_in_queue,
    }
}

#[tokio::test]
async fn a_job_runs_through_actor_reward_server_and_learner() {
    let Outcome {
        job_id,
        points,
        end,
        dir,
        redis,
        ..
    } = run_job(Shape {
        actors: 1,
        ranks: 1,
        steps: STEPS,
        batch: 8,
        learning_rate: 1e-3,
        kill_learner_after: None,
    })
    .await;
    assert_eq!(end, Some(JobState::Succeeded as i32));
    assert_eq!(
        points.iter().map(|p| p.step).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>()
    );
    for p in &points {
        assert!(p.rewards.contains_key("quality"), "{p:?}");
        assert!(p.kl.is_finite() && p.loss.is_finite() && p.grad_norm.is_finite());
    }
    let last = points.last().unwrap();
    assert_eq!(last.policy_version, STEPS, "one version published per step");
    // Every rollout consumed or dropped on purpose, and counted.
    assert!(last.rollouts_consumed_total >= STEPS * 8);
    // Checkpoints every 2 steps (and at the end).
    let checkpoints = dir.path().join("checkpoints").join(&job_id);
    let saved: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        saved.iter().any(|n| n == &format!("step-{STEPS}")),
        "{saved:?}"
    );
    let store = encore_store::open(&redis.url(), Arc::new(SystemClock))
        .await
        .unwrap();
    assert_eq!(
        store.queue_pending(&job_id, "learners").await.unwrap(),
        0,
        "everything the steps used was acknowledged after the last checkpoint"
    );
    println!(
        "steps {:?}\ncombined reward {:?}\nkl {:?}",
        points.iter().map(|p| p.step).collect::<Vec<_>>(),
        points
            .iter()
            .map(|p| p.combined_reward_mean)
            .collect::<Vec<_>>(),
        points.iter().map(|p| p.kl).collect::<Vec<_>>()
    );
}

/// Two actors feed two data-parallel learner ranks on a TCP ring: the job
/// runs to its end, each step's global batch is the two ranks' shares, and
/// every rollout is accounted for. (Whether the reward rises needs a reward
/// model with something to learn; these tiny ones are untrained.)
#[tokio::test]
async fn two_actors_feed_two_learner_ranks() {
    const STEPS_2X2: u64 = 12;
    let outcome = run_job(Shape {
        actors: 2,
        ranks: 2,
        steps: STEPS_2X2,
        batch: 16,
        learning_rate: 3e-3,
        kill_learner_after: None,
    })
    .await;
    assert_eq!(outcome.end, Some(JobState::Succeeded as i32));
    assert_eq!(
        outcome.points.iter().map(|p| p.step).collect::<Vec<_>>(),
        (1..=STEPS_2X2).collect::<Vec<_>>()
    );
    let last = outcome.points.last().unwrap();
    assert!(
        last.rollouts_consumed_total >= STEPS_2X2 * 16,
        "each step trains on both ranks' shares: {}",
        last.rollouts_consumed_total
    );
    assert_eq!(
        last.rollouts_dropped_total,
        last.dropped_by_reason.values().sum::<u64>(),
        "every drop has a reason"
    );
    assert!(
        outcome
            .points
            .iter()
            .all(|p| p.kl.is_finite() && p.grad_norm > 0.0)
    );
}

/// The learner dies mid-job without any clean-up; a new one takes its rank
/// once the lease lapses, resumes from the last checkpoint and finishes the
/// job. Every rollout the actor produced is consumed, dropped on purpose
/// (and counted), or still in the queue.
#[tokio::test]
async fn a_killed_learner_resumes_from_its_checkpoint_and_nothing_is_lost() {
    const STEPS_KILLED: u64 = 10;
    let outcome = run_job(Shape {
        actors: 1,
        ranks: 1,
        steps: STEPS_KILLED,
        batch: 8,
        learning_rate: 1e-3,
        kill_learner_after: Some(5),
    })
    .await;
    assert_eq!(outcome.end, Some(JobState::Succeeded as i32));
    let steps: Vec<u64> = outcome.points.iter().map(|p| p.step).collect();
    assert_eq!(
        steps,
        (1..=STEPS_KILLED).collect::<Vec<_>>(),
        "each step reported once"
    );
    let last = outcome.points.last().unwrap();
    assert_eq!(
        outcome.produced,
        last.rollouts_consumed_total + last.rollouts_dropped_total + outcome.left_in_queue,
        "produced = consumed + dropped + still queued ({:?})",
        last.dropped_by_reason
    );
    println!(
        "produced {} = consumed {} + dropped {} {:?} + queued {}",
        outcome.produced,
        last.rollouts_consumed_total,
        last.rollouts_dropped_total,
        last.dropped_by_reason,
        outcome.left_in_queue
    );
}

//! The RL loop end to end on loopback: a coordinator on a real Redis, a
//! reward server hosting a tiny quality model (it joins the cluster
//! itself), an actor and a learner rank. The job runs its steps, each step
//! is reported, weights are published and picked up, checkpoints are
//! written, and every rollout produced is consumed or dropped and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use encore_client::BearerToken;
use encore_client::CoordinatorTls;
use encore_coordinator::config::{AuthConfig, TlsConfig};
use encore_coordinator::{Config, Coordinator};
use encore_model::pretrain::PretrainConfig;
use encore_model::{Preset, TrainablePolicy};
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{
    Algorithm, JobResources, JobSpec, JobState, ModelRef, Normalization, NormalizationKind,
    PolicyArchitecture, PolicyVersion, Prompt, PromptList, PromptSource, RewardConfig, Rollout,
    SamplingParams, Score, ScoredBatch, Stage, StopCondition, SubmitJobRequest, WatchJobRequest,
    job_event, prompt_source,
};
use encore_raters::generate::{self, GenConfig};
use encore_reward::{ArchConfig, RewardConfig as ModelConfig, RewardKind, RewardModel};
use encore_reward_server::{Config as RewardServerConfig, ServerBuilder};
use encore_reward_train::{self as train, TrainConfig};
use encore_store::{AppendOutcome, SystemClock};
use encore_testkit::RedisServer;
use prost::Message;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(300);
const WORKER: &str = "worker-token";
const CLIENT: &str = "client-token";
const STEPS: u64 = 6;
const PROMPTS: [&str; 4] = [
    "calm solo piano",
    "fast drums",
    "slow strings",
    "bright synth lead",
];

fn spec(base: &std::path::Path, shape: Shape) -> JobSpec {
    let mut spec = JobSpec {
        name: "rl loop test".into(),
        base_checkpoint: Some(ModelRef {
            name: "tiny".into(),
            uri: base.display().to_string(),
            sha256: String::new(),
        }),
        prompts: Some(PromptSource {
            source: Some(prompt_source::Source::Inline(PromptList {
                prompts: PROMPTS
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
            samples_per_prompt: shape.k,
            batch_size: shape.batch,
            learning_rate: shape.learning_rate,
            warmup_steps: 5,
            kl_coef: 0.05,
            sampling: Some(SamplingParams {
                max_new_tokens: shape.frames,
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
        checkpoint_every_steps: shape.checkpoint_every,
        ..JobSpec::default()
    };
    (shape.edit)(&mut spec);
    spec
}

/// The size of a test job.
#[derive(Debug, Clone, Copy)]
struct Shape {
    actors: u32,
    ranks: u32,
    steps: u64,
    batch: u32,
    /// Samples per prompt.
    k: u32,
    /// Frames per clip.
    frames: u32,
    learning_rate: f64,
    /// A pretrained base and a trained quality model, instead of fresh
    /// (untrained) ones.
    trained: bool,
    /// The job's checkpoint interval, in steps.
    checkpoint_every: u32,
    /// The actors' bound on batches waiting unread.
    queue_max_batches: u64,
    /// The coordinator on the embedded store (workers reach the queue
    /// through its RolloutQueueService) instead of Redis.
    embedded: bool,
    /// The base is a random tiny MusicGen checkpoint (Hugging Face layout)
    /// and the reward server decodes its EnCodec codes, instead of the tiny
    /// preset over the embedded codec.
    musicgen: bool,
    /// Changes the test's spec before it is submitted.
    edit: fn(&mut JobSpec),
    /// The coordinator speaks TLS (a self-signed certificate for
    /// localhost), and every worker and the job client trust it through
    /// `tls.ca`.
    tls: bool,
}

impl Shape {
    /// One actor, one rank, 8 clips of 16 frames a step, untrained models:
    /// the tests override what they are about.
    fn small(steps: u64) -> Shape {
        Shape {
            actors: 1,
            ranks: 1,
            steps,
            batch: 8,
            k: 2,
            frames: 16,
            learning_rate: 1e-3,
            trained: false,
            checkpoint_every: 2,
            queue_max_batches: 64,
            embedded: false,
            musicgen: false,
            edit: |_| {},
            tls: false,
        }
    }
}

/// The least-squares slope of `ys` against the step index, and its t
/// statistic: the slope over its standard error from the residuals.
fn trend(ys: &[f64]) -> (f64, f64) {
    let n = ys.len() as f64;
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let sxx: f64 = (0..ys.len()).map(|i| (i as f64 - mean_x).powi(2)).sum();
    let sxy: f64 = ys
        .iter()
        .enumerate()
        .map(|(i, y)| (i as f64 - mean_x) * (y - mean_y))
        .sum();
    let slope = sxy / sxx;
    let residual: f64 = ys
        .iter()
        .enumerate()
        .map(|(i, y)| (y - mean_y - slope * (i as f64 - mean_x)).powi(2))
        .sum();
    let standard_error = (residual / (n - 2.0) / sxx).sqrt();
    (slope, slope / standard_error)
}

/// Pretrains the tiny base policy into `base` and trains a small quality
/// model on simulated ratings: a reward with something to learn, and a
/// policy whose clips it can tell apart.
fn trained_models(base: &std::path::Path) -> RewardModel {
    let started = std::time::Instant::now();
    let pretrain = PretrainConfig {
        preset: Preset::Tiny,
        steps: 120,
        batch_size: 8,
        warmup_steps: 10,
        eval_every: 120,
        eval_examples: 4,
        checkpoint_every: 0,
        ..PretrainConfig::default()
    };
    encore_model::pretrain::pretrain(&pretrain, base, |_| {}).unwrap();
    let pretrained = started.elapsed();
    let ratings = generate::ratings(&GenConfig {
        seed: 11,
        n: 300,
        frames_min: 40,
        frames_max: 64,
        ..GenConfig::default()
    })
    .unwrap();
    let (model, report) =
        train::train_quality(&ratings, &TrainConfig::small(), &Device::Cpu, &mut |_| {}).unwrap();
    println!(
        "pretrained the base in {pretrained:.1?}, trained the quality model in {:.1?}: {}",
        started.elapsed() - pretrained,
        train::describe(&report)
    );
    model
}

/// A random tiny MusicGen base (4 codebooks of 32 codes, EnCodec at 8 kHz,
/// 50 frames/s, a word tokenizer over the test's prompts) and a random
/// quality model whose output layer is steepened eightfold, so that clips
/// differ in reward by more than the policy's sampling noise can hide: a
/// reward with something to climb.
fn musicgen_models(base: &std::path::Path) -> RewardModel {
    let words: Vec<&str> = PROMPTS.iter().flat_map(|p| p.split(' ')).collect();
    encore_musicgen::write_random_checkpoint(
        base,
        &encore_musicgen::tiny_config(32, 32, 2, 32),
        &words,
        5,
    )
    .unwrap();
    let mut quality = ModelConfig::new(RewardKind::Quality);
    quality.arch = ArchConfig::tiny();
    quality.min_tokens = 4;
    quality.max_tokens = 200;
    let model = RewardModel::fresh(quality, &Device::Cpu, 3).unwrap();
    for var in model.vars().all_vars() {
        if var.dims().first() == Some(&1) && var.rank() == 2 {
            var.set(&(var.as_tensor() * 8.0).unwrap()).unwrap();
        }
    }
    model
}

/// What goes wrong during a job, once the given step has been reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// SIGKILL for the `encore-learner` process of rank 0 (the ranks run as
    /// processes); a new process takes its place.
    KillLearner {
        after: u64,
    },
    /// Actor 0's tasks stop where they are: no clean-up, its lease lapses.
    KillActor {
        after: u64,
    },
    /// The reward server shuts down, and a new one starts on the same
    /// address `away` later.
    RewardServerAway {
        after: u64,
        away: Duration,
    },
    /// The reward server shuts down for good: the actors cannot score, and
    /// the job stalls.
    RewardServerGone {
        after: u64,
    },
    /// The job names a base checkpoint that does not exist: every attempt
    /// at training fails.
    MissingBase,
    /// Malformed batches (a score missing, a NaN score, a group short of a
    /// sample) are in the queue ahead of the actors' first batch.
    MalformedBatches,
}

impl Fault {
    fn after(self) -> Option<u64> {
        match self {
            Fault::None | Fault::MissingBase | Fault::MalformedBatches => None,
            Fault::KillLearner { after }
            | Fault::KillActor { after }
            | Fault::RewardServerAway { after, .. }
            | Fault::RewardServerGone { after } => Some(after),
        }
    }
}

/// What a finished job left behind.
struct Outcome {
    job_id: String,
    points: Vec<encore_proto::v1::MetricPoint>,
    end: Option<i32>,
    dir: tempfile::TempDir,
    /// The store's URI (the coordinator has stopped: it may be opened).
    store: String,
    /// The Redis behind it, unless the store is embedded.
    _redis: Option<RedisServer>,
    /// Rollouts the actors appended to the queue.
    produced: u64,
    /// Rollouts still in the queue at the end (appended, not acknowledged).
    left_in_queue: u64,
    /// Score calls the actors saw fail with UNAVAILABLE.
    unavailable_score_calls: u64,
    /// The message of the last state change.
    failure: String,
}

impl Outcome {
    /// The job succeeded, and reported steps 1 to `steps` once each.
    fn assert_succeeded_after(&self, steps: u64) {
        assert_eq!(
            self.end,
            Some(JobState::Succeeded as i32),
            "{}",
            self.failure
        );
        let reported: Vec<u64> = self.points.iter().map(|p| p.step).collect();
        assert_eq!(reported, (1..=steps).collect::<Vec<_>>());
    }

    /// Every rollout the actors produced was consumed, dropped on purpose
    /// (and counted), or is still in the queue; prints the balance.
    fn assert_every_rollout_accounted_for(&self) {
        let last = self.points.last().expect("the job reported steps");
        assert_eq!(
            self.produced,
            last.rollouts_consumed_total + last.rollouts_dropped_total + self.left_in_queue,
            "produced = consumed + dropped + still queued ({:?})",
            last.dropped_by_reason
        );
        println!(
            "produced {} = consumed {} + dropped {} {:?} + queued {}",
            self.produced,
            last.rollouts_consumed_total,
            last.rollouts_dropped_total,
            last.dropped_by_reason,
            self.left_in_queue
        );
    }
}

/// Appends three malformed batches of stage "main" to `job_id`'s queue, the
/// way an actor appends (version 0, so that none is stale when read):
/// one with a rollout's score missing, one with a NaN score, one whose group
/// lacks a sample. Returns the rollouts appended.
async fn inject_malformed_batches(store_uri: &str, job_id: &str) -> u64 {
    let store = encore_store::open(store_uri, Arc::new(SystemClock))
        .await
        .unwrap();
    let rollout = |group: &str, i: u32, quality: Option<f64>| Rollout {
        rollout_id: format!("{group}-{i}"),
        job_id: job_id.to_owned(),
        group_id: group.to_owned(),
        sample_index: i,
        group_size: 2,
        tokens: vec![1, 2, 3, 4, 5],
        behaviour_log_probs: vec![-2.0; 5],
        policy_version: Some(PolicyVersion {
            job_id: job_id.to_owned(),
            version: 0,
            sha256: String::new(),
        }),
        scores: quality
            .map(|value| {
                (
                    "quality".to_owned(),
                    Score {
                        value,
                        details: None,
                    },
                )
            })
            .into_iter()
            .collect(),
        ..Rollout::default()
    };
    let batches = [
        vec![
            rollout("missing", 0, Some(3.0)),
            rollout("missing", 1, None),
        ],
        vec![
            rollout("nan", 0, Some(f64::NAN)),
            rollout("nan", 1, Some(2.0)),
        ],
        vec![rollout("short", 0, Some(3.0))],
    ];
    let mut appended = 0;
    for (i, rollouts) in batches.into_iter().enumerate() {
        appended += rollouts.len() as u64;
        let batch = ScoredBatch {
            batch_id: format!("malformed-{i}"),
            job_id: job_id.to_owned(),
            stage: "main".into(),
            actor_id: "test".into(),
            rollouts,
            create_time: None,
        };
        let outcome = store
            .queue_append(job_id, batch.encode_to_vec(), 1_000)
            .await
            .unwrap();
        assert!(matches!(outcome, AppendOutcome::Appended(_)), "{outcome:?}");
    }
    appended
}

/// A learner rank: a task in this process, or an `encore-learner` process.
enum Rank {
    Task(tokio::task::JoinHandle<Result<(), encore_learner::LearnerError>>),
    Process(tokio::process::Child),
}

impl Rank {
    /// Starts a rank as the `encore-learner` binary.
    fn process(url: &str, ca: Option<&CoordinatorTls>, work_dir: &std::path::Path) -> Rank {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_encore-learner"));
        if let Some(ca) = ca {
            command.env("ENCORE_LEARNER__TLS__CA", &ca.ca);
        }
        let child = command
            .env("ENCORE_LEARNER__COORDINATOR", url)
            .env("ENCORE_LEARNER__WORKER_TOKEN", WORKER)
            .env("ENCORE_LEARNER__ADMIN", "127.0.0.1:0")
            .env("ENCORE_LEARNER__WORK_DIR", work_dir)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("encore-learner starts");
        Rank::Process(child)
    }

    /// SIGKILL, or for a task the nearest thing: it stops where it is.
    async fn kill(self) {
        match self {
            Rank::Task(task) => task.abort(),
            Rank::Process(mut child) => {
                child.kill().await.expect("SIGKILL");
            }
        }
    }

    /// Waits for a rank told to stop (SIGTERM for a process) to end cleanly.
    async fn finish(self) {
        match self {
            Rank::Task(task) => {
                let ended = tokio::time::timeout(PATIENCE, task).await;
                ended.expect("the learner stops").unwrap().unwrap();
            }
            Rank::Process(mut child) => {
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) on our own child's pid, not yet reaped.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                let status = tokio::time::timeout(PATIENCE, child.wait()).await;
                let status = status.expect("the learner stops").unwrap();
                assert!(status.success(), "encore-learner ended with {status}");
            }
        }
    }
}

/// Runs one job of `shape` on a fresh cluster in this process, injects
/// `fault`, and waits for the job to end.
async fn run_job(shape: Shape, fault: Fault) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let (redis, store_uri) = if shape.embedded {
        let uri = format!("embedded://{}", dir.path().join("state").display());
        (None, uri)
    } else {
        let redis = RedisServer::start().await;
        let uri = redis.url();
        (Some(redis), uri)
    };
    let base = dir.path().join("base");
    let mut quality_model = if shape.musicgen {
        musicgen_models(&base)
    } else if shape.trained {
        let base = base.clone();
        tokio::task::spawn_blocking(move || trained_models(&base))
            .await
            .unwrap()
    } else {
        TrainablePolicy::fresh(&Preset::Tiny.config(), &Device::Cpu, 1)
            .unwrap()
            .save(&base, serde_json::json!({}))
            .unwrap();
        let mut quality = ModelConfig::new(RewardKind::Quality);
        quality.arch = ArchConfig::tiny();
        quality.min_tokens = 4;
        quality.max_tokens = 200;
        RewardModel::fresh(quality, &Device::Cpu, 3).unwrap()
    };
    let quality_dir = dir.path().join("quality");
    quality_model.save(&quality_dir).unwrap();

    // A self-signed certificate: its own CA.
    let tls = shape.tls.then(|| {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, key.cert.pem()).unwrap();
        std::fs::write(&key_file, key.signing_key.serialize_pem()).unwrap();
        TlsConfig {
            cert,
            key: key_file,
        }
    });
    let ca = tls.as_ref().map(|t| CoordinatorTls { ca: t.cert.clone() });

    let stop = CancellationToken::new();
    let coordinator = Coordinator::new(Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        store: store_uri.clone(),
        blob_dir: dir.path().join("blobs"),
        checkpoint_dir: dir.path().join("checkpoints"),
        shutdown_grace_ms: 1_000,
        // Short, so a killed learner's rank is handed on quickly.
        lease_ttl_ms: 1_000,
        tls: tls.clone(),
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
    let url = match &tls {
        Some(_) => format!("https://localhost:{}", coordinator.grpc_addr().port()),
        None => format!("http://{}", coordinator.grpc_addr()),
    };

    let musicgen_base = shape.musicgen.then(|| base.clone());
    let reward_server = {
        let (url, quality_dir, ca) = (url.clone(), quality_dir.clone(), ca.clone());
        let musicgen_base = musicgen_base.clone();
        move |listen: SocketAddr, token: CancellationToken| {
            let (url, quality_dir, ca, musicgen_base) = (
                url.clone(),
                quality_dir.clone(),
                ca.clone(),
                musicgen_base.clone(),
            );
            async move {
                let config = RewardServerConfig {
                    listen,
                    admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                    shutdown_grace_ms: 500,
                    coordinator: url,
                    tls: ca,
                    worker_token: Some(WORKER.into()),
                    audio_codec: musicgen_base.clone(),
                    ..RewardServerConfig::default()
                };
                let codec = encore_reward_server::load_audio_codec(&config)
                    .await
                    .unwrap();
                let builder = ServerBuilder::new(config);
                let builder = match codec {
                    Some(codec) => builder.audio_codec(codec),
                    None => builder,
                };
                builder
                    .registry(prometheus::Registry::new())
                    .model(
                        "quality",
                        RewardModel::load(&quality_dir, &Device::Cpu).unwrap(),
                    )
                    .start(token)
                    .await
                    .unwrap()
            }
        }
    };
    let rewards_stop = stop.child_token();
    let rewards = reward_server(SocketAddr::from(([127, 0, 0, 1], 0)), rewards_stop.clone()).await;
    let rewards_addr = rewards.grpc_addr();
    let mut rewards = Some((rewards, rewards_stop));
    let mut comeback = None;

    let mut actors = Vec::new();
    let mut actor_registries = Vec::new();
    for _ in 0..shape.actors {
        let registry = prometheus::Registry::new();
        actor_registries.push(registry.clone());
        actors.push(tokio::spawn(encore_actor::run_with(
            encore_actor::Config {
                coordinator: url.clone(),
                tls: ca.clone(),
                worker_token: Some(WORKER.into()),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                work_dir: dir.path().join("actor"),
                max_backoff_ms: 200,
                queue_max_batches: shape.queue_max_batches,
                ..encore_actor::Config::default()
            },
            registry,
            stop.clone(),
        )));
    }
    let processes = matches!(fault, Fault::KillLearner { .. });
    let learner_dir = dir.path().join("learner");
    let learner = || {
        if processes {
            return Rank::process(&url, ca.as_ref(), &learner_dir);
        }
        Rank::Task(tokio::spawn(encore_learner::run_with(
            encore_learner::Config {
                coordinator: url.clone(),
                tls: ca.clone(),
                worker_token: Some(WORKER.into()),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                work_dir: learner_dir.clone(),
                ..encore_learner::Config::default()
            },
            prometheus::Registry::new(),
            stop.clone(),
        )))
    };
    let mut learners: Vec<Rank> = (0..shape.ranks).map(|_| learner()).collect();

    let channel = encore_client::endpoint::endpoint(&url, ca.as_ref())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut jobs = JobServiceClient::with_interceptor(channel, BearerToken::new(CLIENT).unwrap());
    let job_id = jobs
        .submit(SubmitJobRequest {
            idempotency_key: "rl-loop".into(),
            spec: Some(if fault == Fault::MissingBase {
                spec(&dir.path().join("no-such-checkpoint"), shape)
            } else {
                spec(&base, shape)
            }),
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
        .job_id;
    let injected_rollouts = if fault == Fault::MalformedBatches {
        inject_malformed_batches(&store_uri, &job_id).await
    } else {
        0
    };
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
    let mut injected = false;
    let mut failure = String::new();
    let followed = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = watch.next().await {
            match event.unwrap().event {
                Some(job_event::Event::Metrics(p)) => {
                    let step = p.step;
                    points.push(p);
                    if injected || fault.after().is_none_or(|after| step < after) {
                        continue;
                    }
                    injected = true;
                    match fault {
                        Fault::None | Fault::MissingBase | Fault::MalformedBatches => {}
                        Fault::KillLearner { .. } => {
                            learners.remove(0).kill().await;
                            learners.insert(0, learner());
                        }
                        Fault::KillActor { .. } => actors[0].abort(),
                        Fault::RewardServerAway { away, .. } => {
                            let (server, token) = rewards.take().unwrap();
                            token.cancel();
                            server.wait().await.unwrap();
                            let (start, token) = (reward_server.clone(), stop.child_token());
                            comeback = Some(tokio::spawn(async move {
                                tokio::time::sleep(away).await;
                                start(rewards_addr, token).await
                            }));
                        }
                        Fault::RewardServerGone { .. } => {
                            let (server, token) = rewards.take().unwrap();
                            token.cancel();
                            server.wait().await.unwrap();
                        }
                    }
                }
                Some(job_event::Event::StateChange(c)) => {
                    end = Some(c.state);
                    failure = c.message;
                }
                _ => {}
            }
        }
    });
    followed.await.expect("the job finished in time");
    stop.cancel();
    for (i, task) in actors.into_iter().enumerate() {
        let ended = tokio::time::timeout(PATIENCE, task).await;
        let ended = ended.expect("the actor stops");
        if i == 0 && fault.after().is_some() && matches!(fault, Fault::KillActor { .. }) {
            assert!(ended.unwrap_err().is_cancelled());
        } else {
            ended.unwrap().unwrap();
        }
    }
    for rank in learners {
        rank.finish().await;
    }
    if let Some((server, _)) = rewards {
        server.wait().await.unwrap();
    }
    if let Some(task) = comeback {
        task.await.unwrap().wait().await.unwrap();
    }
    coordinator.wait().await.unwrap();
    let per_batch = u64::from(shape.batch / shape.actors);
    let counter = |name: &str, label: Option<(&str, &str)>| -> u64 {
        actor_registries
            .iter()
            .flat_map(|r| r.gather())
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().to_vec())
            .filter(|m| {
                label.is_none_or(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == k && l.value() == v)
                })
            })
            // A counter's value, or a histogram's count: the other is 0.
            .map(|m| m.get_counter().get_value() as u64 + m.get_histogram().get_sample_count())
            .sum()
    };
    let produced = counter("encore_actor_batches_total", None) * per_batch + injected_rollouts;
    let unavailable_score_calls = counter(
        "encore_actor_reward_call_seconds",
        Some(("code", "UNAVAILABLE")),
    );
    let store = encore_store::open(&store_uri, std::sync::Arc::new(SystemClock))
        .await
        .unwrap();
    let left_in_queue = store.queue_len(&job_id).await.unwrap() * per_batch;
    Outcome {
        job_id,
        points,
        end,
        dir,
        store: store_uri,
        _redis: redis,
        produced,
        left_in_queue,
        unavailable_score_calls,
        failure,
    }
}

#[tokio::test]
async fn a_job_runs_through_actor_reward_server_and_learner() {
    let Outcome {
        job_id,
        points,
        end,
        dir,
        store,
        // Kept alive: the queue is read below.
        _redis,
        ..
    } = run_job(Shape::small(STEPS), Fault::None).await;
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
    let store = encore_store::open(&store, Arc::new(SystemClock))
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
    let outcome = run_job(
        Shape {
            actors: 2,
            ranks: 2,
            batch: 16,
            learning_rate: 3e-3,
            ..Shape::small(STEPS_2X2)
        },
        Fault::None,
    )
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
    let outcome = run_job(Shape::small(STEPS_KILLED), Fault::KillLearner { after: 5 }).await;
    // The job's history has each step once whatever the learner does: the
    // coordinator keeps the first report of a step (the resumed rank redoes
    // the steps after its checkpoint and reports them again; the dedup has
    // its own test in coordinator/tests/jobs_and_cluster.rs).
    outcome.assert_succeeded_after(STEPS_KILLED);
    // What the learner itself counted: each step trained one batch of 8
    // rollouts, counted once across the kill (the resumed rank's counts come
    // from its checkpoint, and the steps it redoes replace the lost ones).
    for p in &outcome.points {
        assert_eq!(
            p.rollouts_consumed_total,
            8 * p.step,
            "rollouts consumed by step {}",
            p.step
        );
    }
    outcome.assert_every_rollout_accounted_for();
}

/// One machine without Redis: the coordinator on the embedded store, whose
/// directory only it may open, and the learner as its own process reading
/// the queue through the coordinator's RolloutQueueService. It is killed
/// mid-job; its successor re-claims its unacknowledged entries through the
/// service too, and nothing is lost.
#[tokio::test]
async fn on_the_embedded_store_a_learner_process_uses_the_coordinators_queue() {
    const STEPS_EMBEDDED: u64 = 8;
    let outcome = run_job(
        Shape {
            embedded: true,
            ..Shape::small(STEPS_EMBEDDED)
        },
        Fault::KillLearner { after: 4 },
    )
    .await;
    assert!(outcome.store.starts_with("embedded://"));
    outcome.assert_succeeded_after(STEPS_EMBEDDED);
    outcome.assert_every_rollout_accounted_for();
}

/// MusicRL's loop in miniature: 2 actors, 1 reward server, a coordinator on
/// Redis and 2 learner ranks fine-tune a pretrained base policy on a
/// trained quality model. The mean reward rises by a clear margin while the
/// KL to the base stays under its bound.
#[tokio::test]
async fn the_reward_rises_while_the_kl_stays_bounded() {
    const STEPS_TRAINED: u64 = 40;
    let outcome = run_job(
        Shape {
            actors: 2,
            ranks: 2,
            batch: 32,
            k: 4,
            frames: 48,
            learning_rate: 2e-3,
            trained: true,
            ..Shape::small(STEPS_TRAINED)
        },
        Fault::None,
    )
    .await;
    assert_eq!(outcome.end, Some(JobState::Succeeded as i32));
    let rewards: Vec<f64> = outcome
        .points
        .iter()
        .map(|p| p.rewards["quality"].mean)
        .collect();
    let kls: Vec<f64> = outcome.points.iter().map(|p| p.kl).collect();
    let staleness: Vec<f64> = outcome.points.iter().map(|p| p.staleness_mean).collect();
    println!(
        "quality reward per step {rewards:.3?}\nkl per step {kls:.3?}\nstaleness per step {staleness:.2?}"
    );
    assert_eq!(rewards.len() as u64, STEPS_TRAINED);
    // The quality model scores on the raters' 1-5 scale. Steps are noisy
    // (one step's mean moves by about 0.1), so compare the first and last
    // eight steps: 0.2 is about four standard errors of that difference.
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&rewards[..8]), mean(&rewards[rewards.len() - 8..]));
    assert!(
        last - first >= 0.2,
        "the mean quality reward rose from {first:.3} to {last:.3} only"
    );
    // The KL bound of the objective `reward - beta * KL`: the reward was
    // not bought with more distance from the base than beta allows, so the
    // regularised objective rose too...
    let beta = 0.05;
    let objective: Vec<f64> = rewards
        .iter()
        .zip(&kls)
        .map(|(r, kl)| r - beta * kl)
        .collect();
    let (first_objective, last_objective) = (
        mean(&objective[..8]),
        mean(&objective[objective.len() - 8..]),
    );
    assert!(
        last_objective > first_objective,
        "reward - beta KL fell from {first_objective:.3} to {last_objective:.3}"
    );
    // ...and the KL stayed bounded, in nats per sequence (`MetricPoint.kl`
    // sums k3 over a clip's tokens). The steps just after the 5-step
    // warm-up are heavy-tailed: the policy overshoots once the learning
    // rate is full, and the penalty pulls it back within two steps. On 2
    // cores the largest single step was 6.7-23.9 on a quiet machine and
    // 9.5-54.1 with two to four busy loops beside the tests; a bound of 60
    // on every step failed once in CI (its output was cut). After step 8 no
    // printed run saw a step above 6. So the test bounds the mean over the
    // whole run, transient included (2.7-5.4 seen; 12 allows one spike of
    // some 300 nats), and the mean of the last eight steps (at most 4.9
    // seen), the one that says the KL holds.
    let (run_bound, settled_bound) = (12.0, 8.0);
    let whole_run = mean(&kls);
    let settled = mean(&kls[kls.len() - 8..]);
    assert!(
        kls.iter().all(|kl| kl.is_finite() && *kl >= 0.0),
        "a step's KL is not a non-negative number: {kls:?}"
    );
    assert!(
        whole_run <= run_bound,
        "the KL averaged {whole_run:.2} nats per sequence over the run, above {run_bound}: {kls:?}"
    );
    assert!(
        settled <= settled_bound,
        "the KL of the last 8 steps averaged {settled:.2} nats per sequence, above {settled_bound}"
    );
    println!(
        "mean quality reward: first 8 steps {first:.3}, last 8 steps {last:.3}; \
         reward - {beta} KL: {first_objective:.3} -> {last_objective:.3}; \
         largest KL {:.2} nats per clip, mean {whole_run:.2} (bound {run_bound}), last 8 steps \
         {settled:.2} (bound {settled_bound})",
        kls.iter().copied().fold(0.0, f64::max)
    );
}

/// One of two actors dies mid-job without any clean-up: the job carries on
/// with the other one and finishes every step.
#[tokio::test]
async fn a_killed_actor_does_not_stop_the_job() {
    const STEPS_ACTOR: u64 = 8;
    let outcome = run_job(
        Shape {
            actors: 2,
            ..Shape::small(STEPS_ACTOR)
        },
        Fault::KillActor { after: 3 },
    )
    .await;
    assert_eq!(outcome.end, Some(JobState::Succeeded as i32));
    let steps: Vec<u64> = outcome.points.iter().map(|p| p.step).collect();
    assert_eq!(steps, (1..=STEPS_ACTOR).collect::<Vec<_>>());
}

/// The reward server goes away for two seconds mid-job and a new one comes
/// back on the same address. The actors' Score calls fail meanwhile (they
/// hold their sampled batches and retry), so the job stalls; then it runs
/// to its end and every rollout produced is consumed, dropped on purpose
/// or still queued: none was lost.
#[tokio::test]
async fn a_reward_server_that_goes_away_stalls_the_job_and_loses_nothing() {
    const STEPS_AWAY: u64 = 8;
    let outcome = run_job(
        Shape::small(STEPS_AWAY),
        Fault::RewardServerAway {
            after: 3,
            away: Duration::from_secs(2),
        },
    )
    .await;
    assert_eq!(outcome.end, Some(JobState::Succeeded as i32));
    let steps: Vec<u64> = outcome.points.iter().map(|p| p.step).collect();
    assert_eq!(steps, (1..=STEPS_AWAY).collect::<Vec<_>>());
    assert!(
        outcome.unavailable_score_calls > 0,
        "the actor noticed the server was away"
    );
    println!(
        "{} Score calls failed with UNAVAILABLE",
        outcome.unavailable_score_calls
    );
    outcome.assert_every_rollout_accounted_for();
}

/// A learner that cannot train (here: the job's base checkpoint does not
/// exist) retries from its last checkpoint a few times, then rank 0 fails
/// the job with the cause instead of leaving it RUNNING with nobody
/// training it.
#[tokio::test]
async fn a_learner_that_cannot_train_fails_the_job_with_the_cause() {
    let outcome = run_job(Shape::small(4), Fault::MissingBase).await;
    assert_eq!(outcome.end, Some(JobState::Failed as i32));
    assert!(outcome.points.is_empty());
    assert!(
        outcome.failure.contains("failed 3 times")
            && outcome.failure.contains("no-such-checkpoint"),
        "{}",
        outcome.failure
    );
}

/// A spec that names an architecture its base checkpoint does not hold
/// fails with both named, instead of training something else.
#[tokio::test]
async fn a_base_of_another_architecture_than_the_spec_names_fails_the_job() {
    let outcome = run_job(
        Shape {
            edit: |spec| spec.architecture = PolicyArchitecture::Musicgen as i32,
            ..Shape::small(4)
        },
        Fault::None,
    )
    .await;
    assert_eq!(outcome.end, Some(JobState::Failed as i32));
    assert!(
        outcome.failure.contains("spec.architecture: musicgen")
            && outcome.failure.contains("holds a tiny checkpoint"),
        "{}",
        outcome.failure
    );
}

/// Batches the learner has read stay in the queue until the checkpoint that
/// covers them. With a checkpoint interval holding more batches than the
/// actors' queue bound (here 20 steps of 2 batches against a bound of 4),
/// the bound must count only unread batches, or the actors wait for an
/// acknowledgement that never comes and the job stalls.
#[tokio::test]
async fn a_checkpoint_interval_longer_than_the_queue_bound_does_not_stall() {
    const STEPS_LONG: u64 = 12;
    let outcome = run_job(
        Shape {
            actors: 2,
            checkpoint_every: 20,
            queue_max_batches: 4,
            ..Shape::small(STEPS_LONG)
        },
        Fault::None,
    )
    .await;
    assert_eq!(outcome.end, Some(JobState::Succeeded as i32));
    let steps: Vec<u64> = outcome.points.iter().map(|p| p.step).collect();
    assert_eq!(steps, (1..=STEPS_LONG).collect::<Vec<_>>());
}

/// Malformed batches in the queue (a score missing, a NaN score, a group
/// short of a sample) are dropped as `invalid` and counted; the job trains
/// on the rest and succeeds.
#[tokio::test]
async fn malformed_batches_are_dropped_as_invalid_and_the_job_goes_on() {
    const STEPS_MALFORMED: u64 = 4;
    let outcome = run_job(Shape::small(STEPS_MALFORMED), Fault::MalformedBatches).await;
    outcome.assert_succeeded_after(STEPS_MALFORMED);
    let last = outcome.points.last().unwrap();
    assert_eq!(
        last.dropped_by_reason.get("invalid").copied(),
        Some(5),
        "the 5 rollouts of the 3 malformed batches: {:?}",
        last.dropped_by_reason
    );
    outcome.assert_every_rollout_accounted_for();
}

/// Runs a job of `steps` steps with a wall time of 2 s, and `fault`;
/// checks that the wall time stopped it, and returns the steps it took.
async fn run_to_wall_time(steps: u64, fault: Fault) -> u64 {
    let outcome = run_job(
        Shape {
            edit: |spec| {
                spec.stop.as_mut().unwrap().max_wall_time = Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                });
            },
            ..Shape::small(steps)
        },
        fault,
    )
    .await;
    assert_eq!(outcome.end, Some(JobState::Succeeded as i32));
    assert_eq!(outcome.failure, "stopped: STOP_REASON_WALL_TIME");
    let taken = outcome.points.len() as u64;
    assert!((1..steps).contains(&taken), "{taken} steps");
    taken
}

/// `max_wall_time` ends a job: here 2 s, long before its 60 steps.
#[tokio::test]
async fn a_job_stops_at_its_wall_time() {
    let steps = run_to_wall_time(60, Fault::None).await;
    println!("stopped at its wall time of 2 s after {steps} steps");
}

/// A job whose actors stall (here: its reward server is gone for good)
/// still ends at its wall time, while the learner waits for rollouts.
#[tokio::test]
async fn a_stalled_job_stops_at_its_wall_time() {
    let steps = run_to_wall_time(1_000, Fault::RewardServerGone { after: 1 }).await;
    println!("stalled after {steps} steps, stopped at its wall time of 2 s");
}

/// A job with stages stops on its own `spec.stop` too: here after 3 steps
/// in the first of two stages of 20 steps each.
#[tokio::test]
async fn the_jobs_own_stop_condition_ends_a_staged_job() {
    let outcome = run_job(
        Shape {
            edit: |spec| {
                let stage = |name: &str| Stage {
                    name: name.into(),
                    rewards: spec.rewards.clone(),
                    stop: Some(StopCondition {
                        max_steps: Some(20),
                        ..StopCondition::default()
                    }),
                };
                spec.stages = vec![stage("A"), stage("B")];
                spec.rewards.clear();
                spec.stop = Some(StopCondition {
                    max_steps: Some(3),
                    ..StopCondition::default()
                });
            },
            ..Shape::small(40)
        },
        Fault::None,
    )
    .await;
    outcome.assert_succeeded_after(3);
    assert_eq!(outcome.failure, "stopped: STOP_REASON_MAX_STEPS");
    assert!(outcome.points.iter().all(|p| p.stage == "A"));
}

/// TLS end to end: the coordinator serves a self-signed certificate, and the
/// reward server, the actor, the learner rank (the `encore-learner` binary,
/// given `ENCORE_LEARNER__TLS__CA`) and the job client all reach it over
/// `https://` with the certificate as `tls.ca`. The learner is killed
/// mid-job, and its successor connects the same way.
#[tokio::test]
async fn workers_run_a_job_on_a_tls_coordinator() {
    const STEPS_TLS: u64 = 8;
    let outcome = run_job(
        Shape {
            tls: true,
            ..Shape::small(STEPS_TLS)
        },
        Fault::KillLearner { after: 3 },
    )
    .await;
    outcome.assert_succeeded_after(STEPS_TLS);
    outcome.assert_every_rollout_accounted_for();
}

/// A MusicGen-architecture policy (random tiny config, Hugging Face layout)
/// runs a whole job: actors sample 4 codebooks with the delay pattern and
/// guidance, the reward server decodes the codes with the checkpoint's
/// EnCodec and scores the audio, the learner trains the decoder, publishes,
/// and actors pick the new weights up. The reward rises.
#[tokio::test]
async fn a_musicgen_policy_learns_from_encodec_audio_rewards() {
    const STEPS_TRAINED: u64 = 60;
    let outcome = run_job(
        Shape {
            batch: 32,
            k: 4,
            frames: 16,
            learning_rate: 5e-3,
            musicgen: true,
            // The random reward's spread between clips is small on its own
            // scale; z-scoring gives the policy gradient unit-size
            // advantages.
            edit: |spec| {
                for r in &mut spec.rewards {
                    r.normalization = Some(Normalization {
                        kind: NormalizationKind::RunningZScore as i32,
                        ..Normalization::default()
                    });
                }
            },
            ..Shape::small(STEPS_TRAINED)
        },
        Fault::None,
    )
    .await;
    assert_eq!(
        outcome.end,
        Some(JobState::Succeeded as i32),
        "{}",
        outcome.failure
    );
    outcome.assert_every_rollout_accounted_for();
    let rewards: Vec<f64> = outcome
        .points
        .iter()
        .map(|p| p.rewards["quality"].mean)
        .collect();
    assert_eq!(rewards.len() as u64, STEPS_TRAINED);
    // Weights were published, and actors fetched them: had they kept
    // sampling the base, the last steps' rollouts would be some 60 versions
    // stale.
    let last = outcome.points.last().unwrap();
    assert!(
        last.policy_version > 1,
        "versions published: {}",
        last.policy_version
    );
    assert!(
        last.staleness_max <= 8,
        "the last step trained on rollouts {} versions old",
        last.staleness_max
    );
    // The reward's trend over all steps: the least-squares slope and its t
    // statistic (slope over its standard error, from the residual spread).
    // The effect is small on the random reward's own scale, so the test uses
    // every step rather than comparing the first and last ten: a loaded CI
    // run that saw a rise of 2.6 standard errors between those had a slope
    // t of 4.4, and quiet runs here see 6 to 7. Without learning, t is about
    // standard normal and t >= 3 happens about once in 700 runs.
    let (slope, t) = trend(&rewards);
    println!(
        "quality reward per step {rewards:.3?}: slope {:.2e} per step, t {t:.1}",
        slope
    );
    assert!(
        t >= 3.0,
        "the reward's slope over {STEPS_TRAINED} steps was {slope:.2e} per step, t {t:.1} only"
    );
}

//! End-to-end throughput of the RL loop on loopback: a coordinator on a
//! real Redis, one reward server (the three reward models at their default
//! size), actors and one learner rank, all in this process, on the `small`
//! policy preset. For 1 and then 2 actors (a fresh cluster each) it runs a
//! job, skips the first steps (start-up, first weight fetches) and prints,
//! over the measured steps: rollouts trained per second, learner steps per
//! second, clips sampled per second, rollouts dropped as too stale, and the
//! share of the learner's time spent waiting for rollouts
//! (`encore_learner_phase_seconds_total`).
//!
//! Usage: `cargo bench -p encore-learner --bench rl_loop [-- --steps N
//! --frames F]` (needs `redis-server` on PATH).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use encore_client::BearerToken;
use encore_coordinator::config::AuthConfig;
use encore_coordinator::{Config, Coordinator};
use encore_model::{Preset, TrainablePolicy};
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{
    Algorithm, JobResources, JobSpec, ModelRef, Normalization, NormalizationKind, Prompt,
    PromptList, PromptSource, RewardConfig, SamplingParams, StopCondition, SubmitJobRequest,
    WatchJobRequest, job_event, prompt_source,
};
use encore_reward::{RewardConfig as ModelConfig, RewardKind, RewardModel};
use encore_reward_server::{Config as RewardServerConfig, ServerBuilder};
use encore_testkit::RedisServer;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WORKER: &str = "bench-worker-token";
const CLIENT: &str = "bench-client-token";
/// Steps before the measurement starts.
const WARM_UP_STEPS: u64 = 2;
const BATCH: u32 = 32;
const K: u32 = 4;
const REWARDS: [(&str, RewardKind, f64); 3] = [
    ("preference", RewardKind::Preference, 1.0),
    ("adherence", RewardKind::Adherence, 0.5),
    ("quality", RewardKind::Quality, 0.5),
];

/// One measured run.
struct Measured {
    actors: u32,
    /// The actors' `max_lead_batches` (0: derived from the job).
    lead: u64,
    seconds: f64,
    steps: u64,
    rollouts: u64,
    dropped: u64,
    clips_sampled: f64,
    wait_share: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let (steps, frames) = parse_args()?;
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base");
    TrainablePolicy::fresh(&Preset::Small.config(), &Device::Cpu, 1)?
        .save(&base, serde_json::json!({}))?;
    for (name, kind, _) in REWARDS {
        let mut model = RewardModel::fresh(ModelConfig::new(kind), &Device::Cpu, 3)?;
        model.save(&dir.path().join(name))?;
    }
    println!(
        "RL loop on loopback, `small` policy, {frames}-frame clips, batch {BATCH} (K = {K}), \
         1 learner rank, 1 reward server hosting 3 models, {} cores; \
         {steps} measured steps after {WARM_UP_STEPS} warm-up steps\n",
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    let mut rows = Vec::new();
    // The actors' default (hold back beyond what the learners can use
    // before it goes stale) next to no hold-back (only the queue's bound).
    for (actors, lead) in [(1, 0), (2, 0), (1, 64), (2, 64)] {
        eprintln!("running with {actors} actor(s), max_lead_batches {lead}...");
        rows.push(run(dir.path(), &base, actors, lead, steps, frames).await?);
    }
    println!(
        "| actors | actors' max lead (batches) | rollouts/s (trained) | learner steps/s | clips/s (sampled) | rollouts dropped as stale | learner time waiting for rollouts | measured |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for m in &rows {
        println!(
            "| {} | {} | {:.2} | {:.3} | {:.2} | {} | {:.1}% | {} steps in {:.1} s |",
            m.actors,
            if m.lead == 0 {
                // actors x max_staleness, 2 when the spec leaves it unset.
                format!("{} (derived)", m.actors * 2)
            } else {
                format!("{} (queue bound)", m.lead)
            },
            m.rollouts as f64 / m.seconds,
            m.steps as f64 / m.seconds,
            m.clips_sampled / m.seconds,
            m.dropped,
            m.wait_share * 100.0,
            m.steps,
            m.seconds
        );
    }
    Ok(())
}

fn parse_args() -> Result<(u64, u32)> {
    let (mut steps, mut frames) = (8u64, 100u32);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--steps" => steps = args.next().ok_or("--steps needs a value")?.parse()?,
            "--frames" => frames = args.next().ok_or("--frames needs a value")?.parse()?,
            // cargo bench passes --bench; anything else is a mistake.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok((steps.max(1), frames.max(1)))
}

/// Sum of a metric family's samples in `registry`, filtered by one label.
fn total(registry: &prometheus::Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().to_vec())
        .filter(|m| {
            label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            })
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

async fn run(
    dir: &Path,
    base: &Path,
    actors: u32,
    lead: u64,
    steps: u64,
    frames: u32,
) -> Result<Measured> {
    let redis = RedisServer::start().await;
    let run_dir = tempfile::tempdir_in(dir)?;
    let stop = CancellationToken::new();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let coordinator = Coordinator::new(Config {
        listen: loopback,
        admin: loopback,
        store: redis.url(),
        blob_dir: run_dir.path().join("blobs"),
        checkpoint_dir: run_dir.path().join("checkpoints"),
        auth: AuthConfig {
            client_tokens: vec![format!("bench:{CLIENT}")],
            worker_token: Some(WORKER.into()),
            ..AuthConfig::default()
        },
        ..Config::default()
    })
    .start(stop.clone())
    .await?;
    let url = format!("http://{}", coordinator.grpc_addr());

    let mut server = ServerBuilder::new(RewardServerConfig {
        listen: loopback,
        admin: loopback,
        coordinator: url.clone(),
        worker_token: Some(WORKER.into()),
        ..RewardServerConfig::default()
    })
    .registry(prometheus::Registry::new());
    for (name, _, _) in REWARDS {
        server = server.model(name, RewardModel::load(&dir.join(name), &Device::Cpu)?);
    }
    let rewards = server.start(stop.clone()).await?;

    let mut tasks = Vec::new();
    let mut actor_registries = Vec::new();
    for _ in 0..actors {
        let registry = prometheus::Registry::new();
        actor_registries.push(registry.clone());
        tasks.push(tokio::spawn(encore_actor::run_with(
            encore_actor::Config {
                coordinator: url.clone(),
                worker_token: Some(WORKER.into()),
                admin: loopback,
                work_dir: run_dir.path().join("actor"),
                max_lead_batches: lead,
                ..encore_actor::Config::default()
            },
            registry,
            stop.clone(),
        )));
    }
    let learner_registry = prometheus::Registry::new();
    let learner = tokio::spawn(encore_learner::run_with(
        encore_learner::Config {
            coordinator: url.clone(),
            worker_token: Some(WORKER.into()),
            admin: loopback,
            work_dir: run_dir.path().join("learner"),
            ..encore_learner::Config::default()
        },
        learner_registry.clone(),
        stop.clone(),
    ));

    let channel = Channel::from_shared(url)?.connect().await?;
    let mut jobs = JobServiceClient::with_interceptor(channel, BearerToken::new(CLIENT)?);
    let job_id = jobs
        .submit(SubmitJobRequest {
            idempotency_key: format!("bench-{actors}-{lead}"),
            spec: Some(spec(base, actors, WARM_UP_STEPS + steps, frames)),
            validate_only: false,
        })
        .await?
        .into_inner()
        .job
        .ok_or("Submit returned no job")?
        .job_id;
    let mut watch = jobs
        .watch(WatchJobRequest {
            job_id,
            after_sequence: Some(0),
        })
        .await?
        .into_inner();

    // Figures at the end of the warm-up and at the last step.
    let phases = ["wait", "step", "publish", "checkpoint", "report"];
    let snapshot = |registry: &prometheus::Registry, clips: &[prometheus::Registry]| {
        let by_phase: HashMap<&str, f64> = phases
            .iter()
            .map(|p| {
                let seconds = total(
                    registry,
                    "encore_learner_phase_seconds_total",
                    Some(("phase", p)),
                );
                (*p, seconds)
            })
            .collect();
        let sampled: f64 = clips
            .iter()
            .map(|r| total(r, "encore_actor_clips_total", None))
            .sum();
        (by_phase, sampled)
    };
    let mut start = None;
    let mut last = None;
    while let Some(event) = watch.next().await {
        let Some(job_event::Event::Metrics(point)) = event?.event else {
            continue;
        };
        eprintln!(
            "  step {} ({} rollouts so far)",
            point.step, point.rollouts_consumed_total
        );
        let figures = snapshot(&learner_registry, &actor_registries);
        let counts = (point.rollouts_consumed_total, point.rollouts_dropped_total);
        if point.step == WARM_UP_STEPS {
            start = Some((Instant::now(), counts, figures));
        } else if point.step == WARM_UP_STEPS + steps {
            last = Some((Instant::now(), counts, figures));
        }
    }
    stop.cancel();
    for task in tasks {
        task.await??;
    }
    learner.await??;
    rewards.wait().await?;
    coordinator.wait().await?;

    let ((t0, r0, (p0, c0)), (t1, r1, (p1, c1))) = (
        start.ok_or("the job ended before the warm-up did")?,
        last.ok_or("the job ended before the last step")?,
    );
    let spent = |p: &str| p1[p] - p0[p];
    let all: f64 = phases.iter().map(|p| spent(p)).sum();
    Ok(Measured {
        actors,
        lead,
        seconds: (t1 - t0).as_secs_f64().max(1e-9),
        steps,
        rollouts: r1.0 - r0.0,
        dropped: r1.1 - r0.1,
        clips_sampled: c1 - c0,
        wait_share: if all > 0.0 { spent("wait") / all } else { 0.0 },
    })
}

fn spec(base: &Path, actors: u32, steps: u64, frames: u32) -> JobSpec {
    JobSpec {
        name: "rl loop bench".into(),
        base_checkpoint: Some(ModelRef {
            name: "small".into(),
            uri: base.display().to_string(),
            sha256: String::new(),
        }),
        prompts: Some(PromptSource {
            source: Some(prompt_source::Source::Inline(PromptList {
                prompts: encore_corpus::eval_prompts(5, frames as usize, 64)
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| Prompt {
                        prompt_id: format!("p{i}"),
                        caption: e.caption,
                        ..Prompt::default()
                    })
                    .collect(),
            })),
        }),
        rewards: REWARDS
            .iter()
            .map(|(name, _, weight)| RewardConfig {
                model: Some(ModelRef {
                    name: (*name).into(),
                    ..ModelRef::default()
                }),
                weight: *weight,
                normalization: Some(Normalization {
                    kind: NormalizationKind::RunningZScore as i32,
                    ..Normalization::default()
                }),
            })
            .collect(),
        algorithm: Some(Algorithm {
            samples_per_prompt: K,
            batch_size: BATCH,
            learning_rate: 1e-4,
            kl_coef: 0.05,
            sampling: Some(SamplingParams {
                max_new_tokens: frames,
                ..SamplingParams::default()
            }),
            ..Algorithm::default()
        }),
        stop: Some(StopCondition {
            max_steps: Some(steps),
            ..StopCondition::default()
        }),
        resources: Some(JobResources {
            actors,
            learner_ranks: 1,
            ..JobResources::default()
        }),
        checkpoint_every_steps: 50,
        ..JobSpec::default()
    }
}

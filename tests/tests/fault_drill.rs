//! The fault drill: a local cluster of `encore serve` processes (a
//! coordinator, a reward server, two actors, a learner rank) runs a small
//! job while each role is SIGKILLed once, mid-job, and started again on the
//! same configuration (the coordinator on the same store, after 2 s
//! away): the reward
//! server, actor 0, the learner (two steps past its checkpoint, so that it
//! holds entries it trained on and has not acknowledged) and the
//! coordinator, each at least two steps after the restart before it. The
//! job must succeed, every actor process must have appended batches after
//! the coordinator's restart (one actor could finish the job alone), and
//! the store, read once every process has stopped, must account for every
//! rollout the actors produced:
//!
//! - produced = consumed + dropped + queued, in rollouts: the queue's count
//!   of entries ever appended (each a batch of the same number of
//!   rollouts) against the job's last metric point (the learner's totals,
//!   which are part of its checkpoints, so a redone step is not counted
//!   twice) and what is left in the queue;
//! - no entry trained twice: no queue entry id is in two checkpoints' lists
//!   of the entries they cover (`MetricPoint.checkpoint_entry_ids`);
//! - nothing is held by a learner at the end (no entry pending).
//!
//! Two variants: the embedded store (the workers reach the queue through
//! the coordinator's RolloutQueueService) and Redis (a real redis-server
//! started here; the workers use its streams directly).
//!
//! This binary has its own `main` (`harness = false`): it runs the variants
//! one after the other, since each loads every core, and it is also the
//! `encore` command its processes run as. It takes libtest's name filters
//! (`cargo test --workspace --test fault_drill -- redis`) and `--list`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use encore_proto::v1::{
    Algorithm, GetJobRequest, JobResources, JobSpec, JobState, MetricPoint, ModelRef,
    Normalization, NormalizationKind, Prompt, PromptList, PromptSource, RewardConfig,
    SamplingParams, StopCondition, SubmitJobRequest, WatchJobRequest, job_event, prompt_source,
};
use encore_store::{EntryId, Store, SystemClock};
use encore_testkit::RedisServer;
use encore_tests::{Cluster, Jobs, REWARD_MODEL, Setup};
use tokio_stream::StreamExt;

/// Steps of the drill's job.
const STEPS: u64 = 18;
/// The job's checkpoint interval: steps between a learner's checkpoint and
/// its crash are done again.
const CHECKPOINT_EVERY: u64 = 3;
/// Rollouts per step, samples per prompt, actors, frames per clip.
const BATCH: u32 = 8;
const K: u32 = 2;
const ACTORS: u32 = 2;
const FRAMES: u32 = 16;

/// One SIGKILL of the drill: the process, and the reported steps after
/// which it may come (at the earliest [`RECOVERY_STEPS`] after the restart
/// before it).
struct Kill {
    victim: &'static str,
    after: fn(u64) -> bool,
    /// How long it stays down before it is started again.
    down: Duration,
}

/// One process of each role, in this order. The coordinator comes last:
/// after it no process is started afresh, so the job finishes only if every
/// worker carried on through its restart by itself.
const KILLS: [Kill; 4] = [
    Kill {
        victim: "reward-server",
        down: DOWN,
        after: any_step,
    },
    Kill {
        victim: "actor-0",
        down: DOWN,
        after: any_step,
    },
    Kill {
        victim: "learner",
        down: DOWN,
        after: learner_kill,
    },
    Kill {
        victim: "coordinator",
        after: coordinator_kill,
        down: COORDINATOR_DOWN,
    },
];

/// The first kill comes after this step: the job is under way.
const FIRST_KILL_AFTER: u64 = 3;

fn any_step(_: u64) -> bool {
    true
}

/// Two steps past a checkpoint: the learner holds the entries of those
/// steps, trained on and not yet acknowledged, and is in the middle of the
/// next; its successor claims them and does the steps again.
fn learner_kill(step: u64) -> bool {
    step % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1
}

/// Before a step that writes no checkpoint: the learner's report of that
/// step fails, it goes back to its checkpoint, and the steps it redoes are
/// reported once the coordinator is back.
fn coordinator_kill(step: u64) -> bool {
    !(step + 1).is_multiple_of(CHECKPOINT_EVERY)
}

/// How long a killed worker stays down before it is started again: long
/// enough that its peers and the coordinator notice.
const DOWN: Duration = Duration::from_millis(300);

/// How long the coordinator stays down: long enough that every worker
/// calls it while it is away (an actor looks at the queue at least every
/// 250 ms) and longer than the learner's retries from its checkpoint
/// (0.5 s, then 1 s apart) would last if failing to reach the coordinator
/// counted as a failed attempt; short of the members' 3 s leases.
const COORDINATOR_DOWN: Duration = Duration::from_secs(2);

/// New steps reported after a restart before the next kill: the job has
/// recovered from one fault before the next comes.
const RECOVERY_STEPS: u64 = 2;
/// A job that reports no step for this long has stalled.
const STALL: Duration = Duration::from_secs(60);
/// The learners' consumer group (as the coordinator names it).
const GROUP: &str = "learners";

/// Which store a variant runs on.
#[derive(Debug, Clone, Copy)]
enum Variant {
    Embedded,
    Redis,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Embedded => "embedded",
            Variant::Redis => "redis",
        }
    }
}

fn main() -> ExitCode {
    if let Some(code) = encore_tests::serve_if_asked() {
        return code;
    }
    let args = Args::parse();
    let variants: Vec<Variant> = [Variant::Embedded, Variant::Redis]
        .into_iter()
        .filter(|v| args.selects(v.name()))
        .collect();
    if args.list {
        for v in &variants {
            println!("{}: test", v.name());
        }
        return ExitCode::SUCCESS;
    }
    println!("\nrunning {} fault drills", variants.len());
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut failed = Vec::new();
    for variant in variants {
        match runtime.block_on(drill(variant)) {
            Ok(()) => println!("test {} ... ok", variant.name()),
            Err(e) => {
                println!("test {} ... FAILED\n{e:#}", variant.name());
                failed.push(variant.name());
            }
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failed: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

/// What libtest's command line asks of this binary: name filters and
/// `--list`; its other flags are taken and ignored (`--ignored` runs
/// nothing: no drill is ignored).
struct Args {
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    list: bool,
    only_ignored: bool,
}

impl Args {
    fn parse() -> Args {
        let mut args = Args {
            filters: Vec::new(),
            skips: Vec::new(),
            exact: false,
            list: false,
            only_ignored: false,
        };
        let mut argv = std::env::args().skip(1);
        while let Some(arg) = argv.next() {
            match arg.as_str() {
                "--list" => args.list = true,
                "--exact" => args.exact = true,
                "--ignored" => args.only_ignored = true,
                "--skip" => args.skips.extend(argv.next()),
                // Flags of libtest that take a value as the next argument.
                "--test-threads" | "--color" | "--format" | "--logfile" | "-Z" => {
                    argv.next();
                }
                flag if flag.starts_with('-') => {}
                filter => args.filters.push(filter.to_owned()),
            }
        }
        args
    }

    fn selects(&self, name: &str) -> bool {
        let matches = |pattern: &String| {
            if self.exact {
                name == pattern
            } else {
                name.contains(pattern.as_str())
            }
        };
        !self.only_ignored
            && (self.filters.is_empty() || self.filters.iter().any(matches))
            && !self.skips.iter().any(matches)
    }
}

/// One variant of the drill, from a fresh cluster to the store's balance.
async fn drill(variant: Variant) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let redis = match variant {
        Variant::Embedded => None,
        Variant::Redis => Some(RedisServer::start().await),
    };
    let store_uri = match &redis {
        None => format!("embedded://{}", dir.path().join("state").display()),
        Some(redis) => redis.url(),
    };
    let program = std::env::current_exe()?;
    let setup = Setup {
        store: store_uri.clone(),
        actors: ACTORS as usize,
        // Short, so that the learner's rank and the actor's prompt shard
        // are handed to their restarted processes soon.
        lease_ttl: Duration::from_secs(3),
    };
    let mut cluster = Cluster::start(dir.path(), &program, &setup).await?;
    println!(
        "[{}] cluster up in {:.1?}; {}",
        variant.name(),
        started.elapsed(),
        cluster.logs()
    );
    let followed = follow(&mut cluster, variant).await;
    let (job_id, kills) = match followed {
        Ok(run) => run,
        Err(e) => {
            let tails = cluster.log_tails(15);
            let _ = cluster.stop().await;
            // Keep the directory for a look at the logs.
            let kept = dir.keep();
            bail!(
                "{e:#}\nthe drill's files are kept in {}; the ends of the logs:\n{tails}",
                kept.display()
            );
        }
    };
    let ran = started.elapsed();
    cluster.stop().await?;

    // Every process has stopped: the store is the record.
    let store = encore_store::open(&store_uri, Arc::new(SystemClock)).await?;
    let balance = Balance::read(&*store, &job_id).await?;
    println!(
        "[{}] {STEPS} steps in {ran:.1?} ({:.1?} in all); SIGKILLed after step: {}",
        variant.name(),
        started.elapsed(),
        kills
            .iter()
            .map(|(victim, step)| format!("{victim} {step}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("[{}] {balance}", variant.name());
    balance.check()
}

/// Submits the job and follows it to its end through JobService.Watch,
/// killing and restarting one process of each role on the way. Returns
/// the job's id and which process was killed after which step.
async fn follow(
    cluster: &mut Cluster,
    variant: Variant,
) -> anyhow::Result<(String, Vec<(&'static str, u64)>)> {
    let mut jobs = cluster.jobs().await?;
    let job_id = jobs
        .submit(SubmitJobRequest {
            idempotency_key: format!("fault-drill-{}", variant.name()),
            spec: Some(spec(&cluster.base)),
            validate_only: false,
        })
        .await
        .context("submitting the job")?
        .into_inner()
        .job
        .ok_or_else(|| anyhow!("Submit answered without a job"))?
        .job_id;
    let mut last_sequence = 0;
    let mut events = watch(&mut jobs, &job_id, last_sequence).await?;
    let mut kills: Vec<(&'static str, u64)> = Vec::new();
    let mut next_kill_from = FIRST_KILL_AFTER;
    let mut batches_at_last_kill = Vec::new();
    let mut last_step = 0;
    let mut last_step_at = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = events.next() => {
                let event = match event {
                    Some(Ok(event)) => event,
                    // The coordinator went away (killed by the drill): the
                    // stream resumes on the restarted one where it stopped.
                    Some(Err(_)) | None => {
                        jobs = cluster.jobs().await?;
                        events = watch(&mut jobs, &job_id, last_sequence).await?;
                        continue;
                    }
                };
                last_sequence = event.sequence;
                match event.event {
                    Some(job_event::Event::Metrics(point)) => {
                        ensure!(point.step > last_step, "step {} reported after step {last_step}", point.step);
                        last_step = point.step;
                        last_step_at = Instant::now();
                        if let Some(kill) = KILLS.get(kills.len())
                            && point.step >= next_kill_from
                        {
                            // The events may lag behind the job (the drill
                            // was busy with a restart): the job's own step
                            // says where the kill lands.
                            let job = jobs
                                .get(GetJobRequest { job_id: job_id.clone() })
                                .await
                                .context("getting the job")?
                                .into_inner();
                            let state = JobState::try_from(job.state).unwrap_or(JobState::Unspecified);
                            ensure!(!state.is_terminal(), "the job ended ({state:?}) before {} was killed", kill.victim);
                            if (kill.after)(job.step) {
                                cluster.kill_and_restart(kill.victim, kill.down).await?;
                                println!("[{}] step {}: SIGKILLed {} and started it again", variant.name(), job.step, kill.victim);
                                kills.push((kill.victim, job.step));
                                next_kill_from = job.step + RECOVERY_STEPS;
                                if kills.len() == KILLS.len() {
                                    batches_at_last_kill = actor_batches(cluster).await?;
                                }
                            }
                        }
                    }
                    Some(job_event::Event::StateChange(change)) => {
                        let state = JobState::try_from(change.state).unwrap_or(JobState::Unspecified);
                        if state.is_terminal() {
                            ensure!(state == JobState::Succeeded, "the job ended {state:?}: {}", change.message);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                cluster.check_alive()?;
                if last_step_at.elapsed() > STALL {
                    bail!("no step reported for {STALL:?} after step {last_step}");
                }
            }
        }
    }
    ensure!(
        kills.len() == KILLS.len()
            && kills
                .last()
                .is_some_and(|(_, step)| step + RECOVERY_STEPS <= STEPS),
        "the job ended before every role was killed and the job recovered: {kills:?}"
    );
    ensure!(
        last_step == STEPS,
        "the last step reported is {last_step}, not {STEPS}"
    );
    // One actor could have finished the job alone: each must have carried
    // on through the last restart.
    let batches = actor_batches(cluster).await?;
    println!(
        "[{}] batches appended by each actor process since the last restart: {:?}",
        variant.name(),
        batches
            .iter()
            .zip(&batches_at_last_kill)
            .map(|((name, now), (_, then))| format!("{name} {}", now - then))
            .collect::<Vec<_>>()
    );
    for ((name, now), (_, then)) in batches.iter().zip(&batches_at_last_kill) {
        ensure!(
            now > then,
            "{name} appended no batch after the last restart ({then} before it, {now} at the end)"
        );
    }
    Ok((job_id, kills))
}

/// Each actor process's count of batches appended (its
/// `encore_actor_batches_total`, from its start).
async fn actor_batches(cluster: &mut Cluster) -> anyhow::Result<Vec<(String, f64)>> {
    let mut counts = Vec::new();
    for i in 0..ACTORS {
        let name = format!("actor-{i}");
        let count = cluster.metric(&name, "encore_actor_batches_total").await?;
        counts.push((name, count));
    }
    Ok(counts)
}

async fn watch(
    jobs: &mut Jobs,
    job_id: &str,
    after_sequence: u64,
) -> anyhow::Result<tonic::Streaming<encore_proto::v1::JobEvent>> {
    Ok(jobs
        .watch(WatchJobRequest {
            job_id: job_id.to_owned(),
            after_sequence: Some(after_sequence),
        })
        .await
        .context("watching the job")?
        .into_inner())
}

/// The drill's job: one reward (the untrained quality model), PPO, small
/// batches of short clips from two actors, a checkpoint every
/// [`CHECKPOINT_EVERY`] steps.
fn spec(base: &Path) -> JobSpec {
    let prompts = [
        "calm solo piano",
        "fast drums",
        "slow strings",
        "bright synth lead",
    ]
    .iter()
    .enumerate()
    .map(|(i, caption)| Prompt {
        prompt_id: format!("p{i}"),
        caption: (*caption).to_owned(),
        ..Prompt::default()
    })
    .collect();
    JobSpec {
        name: "fault drill".into(),
        base_checkpoint: Some(ModelRef {
            name: "tiny".into(),
            uri: base.display().to_string(),
            sha256: String::new(),
        }),
        prompts: Some(PromptSource {
            source: Some(prompt_source::Source::Inline(PromptList { prompts })),
        }),
        rewards: vec![RewardConfig {
            model: Some(ModelRef {
                name: REWARD_MODEL.into(),
                ..ModelRef::default()
            }),
            weight: 1.0,
            normalization: Some(Normalization {
                kind: NormalizationKind::RunningZScore as i32,
                ..Normalization::default()
            }),
        }],
        algorithm: Some(Algorithm {
            samples_per_prompt: K,
            batch_size: BATCH,
            learning_rate: 1e-3,
            kl_coef: 0.05,
            sampling: Some(SamplingParams {
                max_new_tokens: FRAMES,
                temperature: 1.0,
                ..SamplingParams::default()
            }),
            ..Algorithm::default()
        }),
        stop: Some(StopCondition {
            max_steps: Some(STEPS),
            ..StopCondition::default()
        }),
        resources: Some(JobResources {
            actors: ACTORS,
            learner_ranks: 1,
            ..JobResources::default()
        }),
        checkpoint_every_steps: CHECKPOINT_EVERY as u32,
        ..JobSpec::default()
    }
}

/// What the store says of the job's rollouts once everything has stopped.
struct Balance {
    state: JobState,
    /// Steps in the job's metric history.
    points: usize,
    last_step: u64,
    /// Rollouts in one queue entry: each actor appends batches of
    /// `batch_size / k / actors` groups of k (the coordinator's split).
    per_entry: u64,
    /// Queue entries ever appended, and still in the queue.
    appended: u64,
    queued: u64,
    /// Queue entries delivered to a learner and not acknowledged.
    pending: u64,
    /// The learner's totals at the last step, in rollouts.
    consumed: u64,
    dropped: u64,
    dropped_by_reason: BTreeMap<String, u64>,
    /// Entry ids in the checkpoints' lists, and those in more than one.
    covered: usize,
    twice: Vec<String>,
    /// Whether every step that wrote a checkpoint is in the history (a
    /// learner stopped between a checkpoint and its report takes that
    /// step's point, and so its list, with it).
    lists_complete: bool,
}

impl Balance {
    async fn read(store: &dyn Store, job_id: &str) -> anyhow::Result<Balance> {
        let job = store
            .get_job(job_id)
            .await?
            .ok_or_else(|| anyhow!("the store has no job {job_id}"))?;
        let points: Vec<MetricPoint> = store.metrics(job_id, 0, 0).await?;
        let last = points
            .last()
            .ok_or_else(|| anyhow!("the store has no metric point of {job_id}"))?;
        let mut seen = BTreeSet::new();
        let mut twice = Vec::new();
        for id in points.iter().flat_map(|p| &p.checkpoint_entry_ids) {
            id.parse::<EntryId>()
                .map_err(|e| anyhow!("checkpoint entry id {id:?}: {e}"))?;
            if !seen.insert(id.clone()) {
                twice.push(id.clone());
            }
        }
        let steps: BTreeSet<u64> = points.iter().map(|p| p.step).collect();
        let mut checkpointed =
            (1..=last.step).filter(|s| s.is_multiple_of(CHECKPOINT_EVERY) || *s == STEPS);
        Ok(Balance {
            state: JobState::try_from(job.job.state).unwrap_or(JobState::Unspecified),
            points: points.len(),
            last_step: last.step,
            per_entry: u64::from((BATCH / K / ACTORS).max(1) * K),
            appended: store.queue_appended(job_id).await?,
            queued: store.queue_len(job_id).await?,
            pending: store.queue_pending(job_id, GROUP).await?,
            consumed: last.rollouts_consumed_total,
            dropped: last.rollouts_dropped_total,
            dropped_by_reason: last.dropped_by_reason.clone().into_iter().collect(),
            covered: seen.len() + twice.len(),
            twice,
            lists_complete: checkpointed.all(|s| steps.contains(&s)),
        })
    }

    /// The checks, each failing with the numbers.
    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.state == JobState::Succeeded,
            "the store has the job {:?}",
            self.state
        );
        ensure!(
            self.last_step == STEPS,
            "the last stored step is {}",
            self.last_step
        );
        ensure!(
            self.dropped == self.dropped_by_reason.values().sum::<u64>(),
            "dropped {} is not the sum of {:?}",
            self.dropped,
            self.dropped_by_reason
        );
        ensure!(
            self.twice.is_empty(),
            "entries trained on (or dropped) twice: {:?}",
            self.twice
        );
        let produced = self.appended * self.per_entry;
        let queued = self.queued * self.per_entry;
        ensure!(
            produced == self.consumed + self.dropped + queued,
            "produced {produced} != consumed {} + dropped {} + queued {queued}",
            self.consumed,
            self.dropped
        );
        ensure!(
            self.pending == 0,
            "{} entries are still held by a learner",
            self.pending
        );
        // The lists and the totals agree: each listed entry's rollouts
        // were counted once.
        let listed = self.covered as u64 * self.per_entry;
        if self.lists_complete {
            ensure!(
                listed == self.consumed + self.dropped,
                "the checkpoints list {} entries ({listed} rollouts), the totals count {}",
                self.covered,
                self.consumed + self.dropped
            );
        } else {
            ensure!(
                listed <= self.consumed + self.dropped,
                "the checkpoints list {} entries ({listed} rollouts), more than the totals count ({})",
                self.covered,
                self.consumed + self.dropped
            );
        }
        Ok(())
    }
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.per_entry;
        write!(
            f,
            "job {:?}, {} steps stored; rollouts: produced {} ({} entries of {n}) = consumed {} \
             + dropped {} {:?} + queued {} ({} entries, {} pending); checkpoint lists: {} \
             entries, none twice: {}{}",
            self.state,
            self.points,
            self.appended * n,
            self.appended,
            self.consumed,
            self.dropped,
            self.dropped_by_reason,
            self.queued * n,
            self.queued,
            self.pending,
            self.covered,
            self.twice.is_empty(),
            if self.lists_complete {
                ""
            } else {
                " (a checkpoint's step is missing from the history)"
            }
        )
    }
}

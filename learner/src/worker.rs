//! The learner rank process: joins the cluster, waits for a learner
//! assignment, forms the collective with the other ranks, and trains.
//!
//! ```text
//!  assignment (rank, world, peers, spec, checkpoint dir, rollout queue)
//!   ├─ resume from the latest complete checkpoint (weights, optimiser,
//!   │  normaliser, step, stage); re-claim queue entries a crashed
//!   │  incarnation had taken but not acknowledged
//!   └─ per step: read this rank's share (whole ScoredBatches) from the queue
//!        ├─ drop on purpose, counted: stale (older than max_staleness
//!        │  versions), another stage, undecodable or malformed (a score
//!        │  missing or not finite, a short group)
//!        ├─ Trainer::step (all-reduce, AdamW)             [step.rs]
//!        ├─ rank 0: publish weights every publish_every_steps,
//!        │  report the metric point (ClusterService.ReportProgress)
//!        ├─ checkpoint every checkpoint_every_steps (rank 0 writes; every
//!        │  rank then acknowledges the entries its steps used: a crash
//!        │  re-delivers exactly those)
//!        └─ stage stop conditions: next stage, or the job's end
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_nn::ParamsAdamW;
use encore_coordinator::member::{
    ClusterClient, CoordinatorClient, Membership, WeightClient, instance_id,
};
use encore_coordinator::weights::client::{PublishData, PublishError, publish};
use encore_policies::AnyTrainable;
use encore_proto::v1::{
    AlgorithmKind, Capabilities, DeviceKind, ErrorReason, GetManifestRequest, JobSpec, JobState,
    LearnerAssignment, MetricPoint, NormalizationKind as ProtoKind, PublishHeader,
    ReportProgressRequest, Resources, RewardStats, Role, Rollout, ScoredBatch, Stage, StageChange,
    StopCondition, StopReason, WeightFormat, assignment,
};
use encore_store::{EntryId, QueueEntry};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{self, LearnerCheckpoint};
use crate::collective::{Collective, CollectiveConfig, all_gather, connect};
use crate::config::Config;
use crate::error::LearnerError;
use crate::loss::{Algorithm, KlEstimator, LossConfig};
use crate::metrics::{Metrics, Phase};
use crate::normalize::{Normalization, NormalizationKind, RewardSpec};
use crate::optim::{AdamW, named_vars};
use crate::step::{StepReport, Trainer};

/// Consumer group of the learner ranks (as the coordinator names it).
const GROUP: &str = "learners";
/// How long one queue read blocks before the loop looks around again.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// Attempts at training one assignment before rank 0 fails the job.
const TRAIN_ATTEMPTS: u32 = 3;
/// Pause before the second attempt; it doubles for each one after.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// A learner rank.
pub struct Learner {
    config: Config,
    device: Device,
    coordinator: CoordinatorClient,
    listener: TcpListener,
    advertise: String,
    metrics: Metrics,
}

impl Learner {
    /// Binds the collective listener, prepares the coordinator channel and
    /// registers the metrics on `registry`.
    pub fn new(config: Config, registry: &prometheus::Registry) -> Result<Self, LearnerError> {
        let metrics = Metrics::new(registry)?;
        let device = encore_model::device(&config.device)?;
        let coordinator =
            CoordinatorClient::new(&config.coordinator, &config.token()?, config.tls.as_ref())
                .map_err(|e| LearnerError::Config(format!("learner.{e}")))?;
        let listener = TcpListener::bind(config.listen)
            .map_err(|e| LearnerError::io(Path::new(&config.listen.to_string()), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| LearnerError::io(Path::new(&config.listen.to_string()), e))?;
        let advertise = if config.advertise.is_empty() {
            bound.to_string()
        } else {
            config.advertise.clone()
        };
        Ok(Self {
            config,
            device,
            coordinator,
            listener,
            advertise,
            metrics,
        })
    }

    fn cluster(&self) -> ClusterClient {
        self.coordinator.cluster()
    }

    fn weights(&self) -> WeightClient {
        self.coordinator.weights()
    }

    /// Works until `shutdown`: joins, trains each assignment, joins again
    /// after a lost lease, leaves on the way out.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), LearnerError> {
        let instance = if self.config.instance_id.is_empty() {
            instance_id("learner")
        } else {
            self.config.instance_id.clone()
        };
        let capabilities = Capabilities {
            resources: Some(Resources {
                device: if self.device.is_cuda() {
                    DeviceKind::Cuda
                } else {
                    DeviceKind::Cpu
                } as i32,
                device_count: u32::from(self.device.is_cuda()),
                cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                ..Resources::default()
            }),
            address: self.advertise.clone(),
            software_version: encore_coordinator::cluster::SOFTWARE_VERSION.into(),
            ..Capabilities::default()
        };
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let membership = match Membership::join(
                &self.coordinator,
                Role::Learner,
                capabilities.clone(),
                &instance,
                &shutdown,
            )
            .await
            {
                Ok(m) => m,
                Err(status) => {
                    tracing::warn!(error = %status, "joining the coordinator failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            self.follow(&membership).await;
            membership.leave("shutdown").await;
        }
        Ok(())
    }

    /// Trains each assignment as it comes until the membership ends.
    async fn follow(&self, membership: &Membership) {
        let mut assigned = membership.assignments.clone();
        loop {
            let current = assigned.borrow_and_update().clone();
            let generation = current.generation;
            membership.update_status(|s| s.applied_generation = generation);
            if let (Some(assignment::Details::Learner(work)), false) =
                (current.details.clone(), current.job_id.is_empty())
            {
                let cancel = membership.lost.child_token();
                let watcher = {
                    let cancel = cancel.clone();
                    let mut assigned = assigned.clone();
                    tokio::spawn(async move {
                        while assigned.changed().await.is_ok() {
                            if assigned.borrow().generation != generation {
                                break;
                            }
                        }
                        cancel.cancel();
                    })
                };
                let queue_uri = current.rollout_queue.map(|q| q.uri).unwrap_or_default();
                self.train_with_retries(membership, &current.job_id, &work, &queue_uri, &cancel)
                    .await;
                watcher.abort();
            }
            tokio::select! {
                () = membership.lost.cancelled() => return,
                changed = assigned.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Trains an assignment; a failed attempt (a peer that died, the store
    /// or the coordinator away) is retried from the last checkpoint with
    /// back-off. After [`TRAIN_ATTEMPTS`] failures rank 0 fails the job
    /// with the error, so that it does not stay RUNNING with nobody
    /// training it.
    async fn train_with_retries(
        &self,
        membership: &Membership,
        job_id: &str,
        work: &LearnerAssignment,
        queue_uri: &str,
        cancel: &CancellationToken,
    ) {
        let mut backoff = RETRY_BACKOFF;
        for attempt in 1..=TRAIN_ATTEMPTS {
            let error = match self
                .train(membership, job_id, work, queue_uri, cancel)
                .await
            {
                Ok(()) => {
                    tracing::info!(job_id, "job done on this rank");
                    return;
                }
                Err(e) if cancel.is_cancelled() => {
                    tracing::info!(job_id, reason = %e, "assignment ended");
                    return;
                }
                Err(e) => e,
            };
            if attempt < TRAIN_ATTEMPTS {
                tracing::warn!(job_id, attempt, error = %error, retry_in = ?backoff,
                    "training failed; retrying from the last checkpoint");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff *= 2;
                continue;
            }
            tracing::error!(job_id, attempt, error = %error, "training failed; giving up");
            if work.rank != 0 {
                // Only rank 0 may end the job; it fails too once this rank
                // is gone from the collective.
                return;
            }
            let failed = self
                .cluster()
                .report_progress(ReportProgressRequest {
                    member_id: membership.member_id.clone(),
                    job_id: job_id.to_owned(),
                    metrics: Vec::new(),
                    stage_change: None,
                    stop_reason: 0,
                    failure_message: format!(
                        "learner rank 0 failed {TRAIN_ATTEMPTS} times; last error: {error}"
                    ),
                })
                .await;
            if let Err(status) = failed {
                tracing::error!(job_id, error = %status, "reporting the failure failed");
            }
        }
    }

    /// Trains `job_id` as rank `work.rank` until the job ends or `cancel`.
    async fn train(
        &self,
        membership: &Membership,
        job_id: &str,
        work: &LearnerAssignment,
        queue_uri: &str,
        cancel: &CancellationToken,
    ) -> Result<(), LearnerError> {
        let spec = work
            .spec
            .clone()
            .ok_or_else(|| LearnerError::Config("the assignment carries no job spec".into()))?;
        let plan = Plan::from_spec(&spec)?;
        let rank = work.rank as usize;
        let world = work.world_size.max(1) as usize;
        tracing::info!(job_id, rank, world, "training");
        let store = encore_coordinator::queue::open_queue(queue_uri, &self.coordinator).await?;

        // The collective (blocking: ranks wait for each other).
        let collective_config = CollectiveConfig::from_assignment(
            job_id,
            work,
            self.config.ring_secret()?,
            self.config.collective_timeout(),
        );
        let listener = self
            .listener
            .try_clone()
            .map_err(|e| LearnerError::io(Path::new(&self.advertise), e))?;
        let mut collective =
            tokio::task::spawn_blocking(move || connect(&collective_config, Some(listener)))
                .await
                .map_err(|e| LearnerError::Config(format!("forming the collective: {e}")))??;

        // The model, resumed from the latest checkpoint if there is one.
        let base = base_dir(&spec)?;
        check_architecture(&spec, &base)?;
        let checkpoint_root = PathBuf::from(&work.checkpoint_dir);
        let device = self.device.clone();
        let (mut trainer, mut state) = {
            let (plan, root) = (plan.clone(), checkpoint_root.clone());
            tokio::task::spawn_blocking(move || build_trainer(&base, &root, &plan, &device))
                .await
                .map_err(|e| LearnerError::Config(format!("loading the model: {e}")))??
        };
        // Every rank found its checkpoint on its own: refuse to train
        // unless all of them stand where rank 0 does.
        let step = state.step;
        let (back, agreed) = tokio::task::spawn_blocking(move || {
            let agreed = checkpoint::weights_sha256(&trainer.policy)
                .and_then(|hash| checkpoint::agree_on_start(collective.as_mut(), step, &hash));
            ((trainer, collective), agreed)
        })
        .await
        .map_err(|e| LearnerError::Config(format!("comparing start states panicked: {e}")))?;
        (trainer, collective) = back;
        agreed?;
        // Wall-time limits count from these (kept in the checkpoint, so a
        // resumed rank counts from the job's start, not its own).
        let started_ms = unix_ms();
        if state.job_start_unix_ms == 0 {
            state.job_start_unix_ms = started_ms;
        }
        if state.stage_start_unix_ms == 0 {
            state.stage_start_unix_ms = started_ms;
        }
        let consumer = format!("rank-{rank}");
        // Entries a crashed incarnation had taken and not acknowledged are
        // used again, first: the checkpoint predates them.
        let claimed = store
            .claim_stale(job_id, GROUP, &consumer, Duration::ZERO, 100_000)
            .await?;
        let (trained, redo) = split_claimed(claimed, &state.trained_unacknowledged);
        if !trained.is_empty() {
            // The checkpoint covers them; the crash came before their
            // acknowledgement.
            store.ack(job_id, GROUP, &trained).await?;
        }
        let mut backlog: VecDeque<QueueEntry> = redo.into();
        if !backlog.is_empty() || !trained.is_empty() {
            tracing::info!(
                job_id,
                redo = backlog.len(),
                already_trained = trained.len(),
                "re-claimed unacknowledged rollouts"
            );
        }
        if rank == 0 && state.step == 0 {
            // Version 0 is the base checkpoint (a retry is a no-op).
            self.publish(job_id, 0, 0, &plan.stages[0].name, &trainer.policy)
                .await?;
        }
        let mut pending: Vec<EntryId> = Vec::new();
        // Drops since the last step on this rank; summed over ranks by the
        // step.
        let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
        let mut recent: VecDeque<f64> = VecDeque::new();
        loop {
            let stage = plan.stages[state.stage_index as usize].clone();
            let last_stage = state.stage_index as usize + 1 >= plan.stages.len();
            let specs = reward_specs(&stage)?;
            let latest = self
                .latest_version(job_id)
                .await
                .unwrap_or(state.policy_version);
            state.policy_version = state.policy_version.max(latest);

            // This rank's share of the global batch.
            let share = (plan.batch_size / world).max(plan.k);
            let mut rollouts: Vec<Rollout> = Vec::with_capacity(share);
            let started = Instant::now();
            if rank == 0
                && let Ok(depth) = store.len(job_id).await
            {
                self.metrics.queue_depth(job_id, depth);
            }
            while rollouts.len() < share {
                let entry = match backlog.pop_front() {
                    Some(entry) => entry,
                    None => {
                        let read = tokio::select! {
                            () = cancel.cancelled() => return Err(LearnerError::Cancelled),
                            read = store.read(job_id, GROUP, &consumer, 1, READ_BLOCK) => read,
                        };
                        match read?.pop() {
                            Some(entry) => entry,
                            // A wall time that ends the job does not wait
                            // for a step that may never come (stalled
                            // actors): rank 0 ends the job now, and the
                            // other ranks' assignments end with it.
                            None if rank == 0
                                && waited_out(&stage, &plan, last_stage, &state, &recent) =>
                            {
                                tracing::info!(
                                    job_id,
                                    step = state.step,
                                    "wall time reached while waiting for rollouts"
                                );
                                self.report(
                                    membership,
                                    job_id,
                                    None,
                                    None,
                                    Some(StopReason::WallTime),
                                )
                                .await?;
                                return Ok(());
                            }
                            None => continue,
                        }
                    }
                };
                if pending.contains(&entry.id) {
                    // Read twice since the checkpoint (a queue that lost
                    // its delivery state): consumed once, so neither
                    // trained on nor counted again.
                    tracing::warn!(job_id, id = %entry.id,
                        "the queue delivered an entry this rank already holds; skipping it");
                    continue;
                }
                pending.push(entry.id);
                if state.trained_unacknowledged.contains(&entry.id.to_string()) {
                    tracing::warn!(job_id, id = %entry.id,
                        "the queue delivered an entry the checkpoint trained on; skipping it");
                    continue;
                }
                match usable(
                    &entry,
                    &stage.name,
                    &specs,
                    plan.k,
                    state.policy_version,
                    plan.max_staleness,
                ) {
                    Ok(batch) => rollouts.extend(batch.rollouts),
                    Err((reason, n)) => *dropped.entry(reason.into()).or_default() += n,
                }
            }

            self.metrics.phase(job_id, Phase::Wait, started.elapsed());
            let step_started = Instant::now();

            // The step itself, on a blocking thread.
            let tokens: u64 = rollouts.iter().map(|r| r.tokens.len() as u64).sum();
            let staleness: Vec<u64> = rollouts
                .iter()
                .map(|r| {
                    state
                        .policy_version
                        .saturating_sub(r.policy_version.as_ref().map_or(0, |v| v.version))
                })
                .collect();
            let (stage_name, k, local_drops) =
                (stage.name.clone(), plan.k, std::mem::take(&mut dropped));
            trainer
                .optimizer
                .set_learning_rate(plan.learning_rate_at(state.step + 1));
            let (back, report) = tokio::task::spawn_blocking(move || {
                let report = trainer.step(
                    &stage_name,
                    &specs,
                    &rollouts,
                    k,
                    &local_drops,
                    collective.as_mut(),
                );
                ((trainer, collective), report)
            })
            .await
            .map_err(|e| LearnerError::Config(format!("the step panicked: {e}")))?;
            (trainer, collective) = back;
            let report = report?;
            self.metrics
                .phase(job_id, Phase::Step, step_started.elapsed());
            self.metrics.staleness(job_id, &staleness);
            if rank == 0 {
                self.metrics.step(job_id, &stage.name, &report);
            }
            let took = started.elapsed();
            state.step += 1;
            // Job-wide counts: the step summed them over the ranks.
            state.rollouts_consumed_total += report.rollouts;
            for (reason, count) in &report.dropped {
                state.rollouts_dropped_total += count;
                *state.dropped_by_reason.entry(reason.clone()).or_default() += count;
            }
            recent.push_back(report.combined_reward_mean);
            while recent.len() > stage.stop.as_ref().map_or(10, |s| s.target_window.max(1)) as usize
            {
                recent.pop_front();
            }

            // Publish, then report, then checkpoint.
            if rank == 0 && state.step % plan.publish_every == 0 {
                let publish_started = Instant::now();
                state.policy_version += 1;
                self.publish(
                    job_id,
                    state.policy_version,
                    state.step,
                    &stage.name,
                    &trainer.policy,
                )
                .await?;
                membership.update_status(|s| {
                    s.policy_version = Some(encore_proto::v1::PolicyVersion {
                        job_id: job_id.to_owned(),
                        version: state.policy_version,
                        sha256: String::new(),
                    })
                });
                self.metrics
                    .phase(job_id, Phase::Publish, publish_started.elapsed());
            }
            self.metrics.policy_version(job_id, state.policy_version);
            let stop = stop_reason(
                &stage,
                plan.job_stop.as_ref(),
                last_stage,
                &state,
                &recent,
                unix_ms(),
            );
            let checkpoint_now = state.step % plan.checkpoint_every == 0 || stop.is_some();
            // The entries this checkpoint covers and the previous one did
            // not (`MetricPoint.checkpoint_entry_ids`).
            let mut covered = Vec::new();
            if checkpoint_now {
                let checkpoint_started = Instant::now();
                trainer.normalizer.clone_into(&mut state.normalizer);
                state.queue_position = pending.last().map(ToString::to_string);
                // Every rank's unacknowledged entries go into the
                // checkpoint (see `LearnerCheckpoint::trained_unacknowledged`).
                let mine: Vec<String> = pending.iter().map(ToString::to_string).collect();
                let (back, gathered) = tokio::task::spawn_blocking(move || {
                    let gathered = gather(collective.as_mut(), &mine);
                    (collective, gathered)
                })
                .await
                .map_err(|e| LearnerError::Config(format!("gathering panicked: {e}")))?;
                collective = back;
                let gathered = gathered?;
                // A re-delivered entry the previous checkpoint covered was
                // skipped above, though held (and so gathered) again.
                covered = gathered
                    .iter()
                    .filter(|id| !state.trained_unacknowledged.contains(id))
                    .cloned()
                    .collect();
                state.trained_unacknowledged = gathered;
                if rank == 0 {
                    let (root, st, keep) = (
                        checkpoint_root.clone(),
                        state.clone(),
                        self.config.keep_checkpoints,
                    );
                    let (back, saved) = tokio::task::spawn_blocking(move || {
                        let saved =
                            checkpoint::save(&root, &st, &trainer.policy, &trainer.optimizer, keep);
                        (trainer, saved)
                    })
                    .await
                    .map_err(|e| LearnerError::Config(format!("checkpointing panicked: {e}")))?;
                    trainer = back;
                    saved?;
                }
                // Every rank acknowledges only once the checkpoint that
                // covers its entries is durable.
                let (back, barrier) = tokio::task::spawn_blocking(move || {
                    let r = collective.barrier();
                    (collective, r)
                })
                .await
                .map_err(|e| LearnerError::Config(format!("barrier panicked: {e}")))?;
                collective = back;
                barrier?;
                let acknowledged = store.ack(job_id, GROUP, &pending).await?;
                if acknowledged < pending.len() as u64 {
                    // Not pending for the group any more: acknowledged
                    // already, or handed to another consumer.
                    tracing::warn!(
                        job_id,
                        acknowledged,
                        read = pending.len(),
                        "the queue acknowledged fewer entries than this rank read"
                    );
                }
                pending.clear();
                self.metrics
                    .phase(job_id, Phase::Checkpoint, checkpoint_started.elapsed());
            }
            if rank == 0 {
                let report_started = Instant::now();
                let point = MetricPoint {
                    checkpoint_entry_ids: covered,
                    ..metric_point(&state, &stage, &report, took, tokens, &staleness, &trainer)
                };
                let stage_change = match stop {
                    Some(Stop {
                        ends_job: false, ..
                    }) => Some(StageChange {
                        stage_index: state.stage_index + 1,
                        stage: plan.stages[state.stage_index as usize + 1].name.clone(),
                        step: state.step,
                    }),
                    _ => None,
                };
                let job_stop = stop.filter(|s| s.ends_job).map(|s| s.reason);
                let answer = self
                    .report(membership, job_id, Some(point), stage_change, job_stop)
                    .await?;
                self.metrics
                    .phase(job_id, Phase::Report, report_started.elapsed());
                if JobState::try_from(answer).is_ok_and(JobState::is_terminal) {
                    tracing::info!(job_id, step = state.step, "the job has ended");
                    return Ok(());
                }
            }
            match stop {
                Some(Stop { ends_job: true, .. }) => return Ok(()),
                Some(Stop {
                    ends_job: false, ..
                }) => {
                    state.stage_index += 1;
                    state.stage = plan.stages[state.stage_index as usize].name.clone();
                    state.stage_start_step = state.step;
                    state.stage_start_unix_ms = unix_ms();
                    recent.clear();
                }
                None => {}
            }
            if cancel.is_cancelled() {
                return Err(LearnerError::Cancelled);
            }
        }
    }

    async fn latest_version(&self, job_id: &str) -> Option<u64> {
        self.weights()
            .get_manifest(GetManifestRequest {
                job_id: job_id.to_owned(),
                version: None,
            })
            .await
            .ok()
            .and_then(|m| m.into_inner().version.map(|v| v.version))
    }

    /// Publishes the policy's weights as `version`.
    async fn publish(
        &self,
        job_id: &str,
        version: u64,
        step: u64,
        stage: &str,
        policy: &AnyTrainable,
    ) -> Result<(), LearnerError> {
        let dir = self.config.work_dir.join(job_id);
        std::fs::create_dir_all(&dir).map_err(|e| LearnerError::io(&dir, e))?;
        // Its own name: an actor sharing the work directory keeps the
        // versions it fetched there as `v<N>.safetensors`.
        let path = dir.join(format!("publish-v{version}.safetensors"));
        let tensors: std::collections::HashMap<String, candle_core::Tensor> =
            policy.named_tensors().into_iter().collect();
        candle_core::safetensors::save(&tensors, &path)?;
        let config = policy
            .published_config()
            .map_err(|e| LearnerError::Config(e.to_string()))?;
        let mut client = self.weights();
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        let publish_started = Instant::now();
        let published = publish(
            &mut client,
            PublishHeader {
                job_id: job_id.to_owned(),
                version,
                format: WeightFormat::Safetensors as i32,
                model_config_json: config,
                step,
                stage: stage.to_owned(),
                ..PublishHeader::default()
            },
            PublishData::File(path.clone()),
            1 << 20,
        )
        .await;
        let _ = std::fs::remove_file(&path);
        match published {
            Ok(_) => {
                self.metrics
                    .published(job_id, publish_started.elapsed(), bytes);
                Ok(())
            }
            // Already above this version (a resumed rank 0 publishing again):
            // the committed one stands.
            Err(PublishError::Status(status)) if superseded(&status) => Ok(()),
            Err(e) => Err(LearnerError::Config(format!(
                "publishing version {version}: {e}"
            ))),
        }
    }

    async fn report(
        &self,
        membership: &Membership,
        job_id: &str,
        point: Option<MetricPoint>,
        stage_change: Option<StageChange>,
        stop: Option<StopReason>,
    ) -> Result<i32, LearnerError> {
        let answer = self
            .cluster()
            .report_progress(ReportProgressRequest {
                member_id: membership.member_id.clone(),
                job_id: job_id.to_owned(),
                metrics: point.into_iter().collect(),
                stage_change,
                stop_reason: stop.map_or(0, |s| s as i32),
                failure_message: String::new(),
            })
            .await
            .map_err(|status| LearnerError::Rpc {
                what: "ReportProgress".into(),
                status: Box::new(status),
            })?;
        Ok(answer.into_inner().state)
    }
}

/// Whether a refused Publish only says that a later version is already
/// committed (VERSION_NOT_MONOTONIC: a resumed rank 0 publishing a version
/// again), so the committed one stands. Other refusals with the same code
/// (the job has ended, this member is no longer rank 0 or its lease
/// expired) are failures.
fn superseded(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && encore_proto::status::reason_of(status) == ErrorReason::VersionNotMonotonic
}

/// What a job's spec says about training, in the learner's terms.
#[derive(Debug, Clone)]
struct Plan {
    stages: Vec<Stage>,
    /// The job's own stop condition, next to each stage's (a job with
    /// explicit stages; without, it is the one stage's).
    job_stop: Option<StopCondition>,
    k: usize,
    batch_size: usize,
    max_staleness: u64,
    publish_every: u64,
    checkpoint_every: u64,
    loss: LossConfig,
    params: ParamsAdamW,
    max_grad_norm: f64,
    micro_batch: usize,
    epochs: usize,
    learning_rate: f64,
    warmup_steps: u64,
}

impl Plan {
    /// The learning rate of step `step` (1-based): linear warm-up over
    /// `warmup_steps`, then constant.
    fn learning_rate_at(&self, step: u64) -> f64 {
        if self.warmup_steps == 0 {
            return self.learning_rate;
        }
        self.learning_rate * (step as f64 / self.warmup_steps as f64).min(1.0)
    }
}

impl Plan {
    fn from_spec(spec: &JobSpec) -> Result<Self, LearnerError> {
        let algorithm = spec.algorithm.unwrap_or_default();
        if spec.stages.is_empty() {
            return Err(LearnerError::Config(
                "spec.stages: the effective spec has no stages".into(),
            ));
        }
        Ok(Self {
            stages: spec.stages.clone(),
            job_stop: spec.stop,
            k: algorithm.samples_per_prompt.max(2) as usize,
            batch_size: algorithm.batch_size.max(1) as usize,
            max_staleness: u64::from(algorithm.max_staleness.unwrap_or(2)),
            publish_every: u64::from(spec.publish_every_steps.max(1)),
            checkpoint_every: u64::from(if spec.checkpoint_every_steps == 0 {
                50
            } else {
                spec.checkpoint_every_steps
            }),
            loss: LossConfig {
                algorithm: if algorithm.kind == AlgorithmKind::Reinforce as i32 {
                    Algorithm::Reinforce
                } else {
                    Algorithm::Ppo
                },
                clip_range: algorithm.clip_range.unwrap_or(0.2),
                kl_coef: algorithm.kl_coef,
                kl_estimator: if algorithm.kl_estimator == encore_proto::v1::KlEstimator::K2 as i32
                {
                    KlEstimator::K2
                } else {
                    KlEstimator::K3
                },
                entropy_coef: algorithm.entropy_coef.unwrap_or(0.0),
            },
            params: ParamsAdamW {
                lr: algorithm.learning_rate,
                weight_decay: algorithm.weight_decay,
                ..ParamsAdamW::default()
            },
            max_grad_norm: algorithm.max_grad_norm.unwrap_or(1.0),
            micro_batch: algorithm.micro_batch_size as usize,
            epochs: if algorithm.kind == AlgorithmKind::Reinforce as i32 {
                1
            } else {
                algorithm.ppo_epochs.max(1) as usize
            },
            learning_rate: algorithm.learning_rate,
            warmup_steps: u64::from(algorithm.warmup_steps),
        })
    }
}

/// The directory of the base checkpoint (`uri` names it or its weights
/// file).
fn base_dir(spec: &JobSpec) -> Result<PathBuf, LearnerError> {
    let uri = spec
        .base_checkpoint
        .as_ref()
        .map(|m| m.uri.as_str())
        .unwrap_or_default();
    let path = PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri));
    if path.is_dir() {
        Ok(path)
    } else if let Some(parent) = path.parent().filter(|_| path.is_file()) {
        Ok(parent.to_owned())
    } else {
        Err(LearnerError::Config(format!(
            "spec.base_checkpoint.uri: {uri:?} is neither a checkpoint directory nor its weights file"
        )))
    }
}

/// Refuses a base checkpoint of another kind than `spec.architecture` names.
fn check_architecture(spec: &JobSpec, base: &Path) -> Result<(), LearnerError> {
    use encore_policies::Architecture;
    use encore_proto::v1::PolicyArchitecture;
    let wanted = match PolicyArchitecture::try_from(spec.architecture) {
        Ok(PolicyArchitecture::Tiny) => Architecture::Tiny,
        Ok(PolicyArchitecture::Musicgen) => Architecture::Musicgen,
        Ok(PolicyArchitecture::Unspecified) | Err(_) => return Ok(()),
    };
    let found = Architecture::of_checkpoint(base)?;
    if found != wanted {
        return Err(LearnerError::Config(format!(
            "spec.architecture: {} but base_checkpoint.uri {} holds a {} checkpoint",
            wanted.name(),
            base.display(),
            found.name()
        )));
    }
    Ok(())
}

/// The trainer, from the latest checkpoint under `root` if any, else from
/// the base checkpoint; and the learner state to go on from.
fn build_trainer(
    base: &Path,
    root: &Path,
    plan: &Plan,
    device: &Device,
) -> Result<(Trainer, LearnerCheckpoint), LearnerError> {
    let policy = AnyTrainable::load(base, device)?;
    let reference = policy.frozen()?;
    let vars = named_vars(&policy.vars);
    let mut optimizer = AdamW::new(vars.clone(), plan.params.clone())?;
    let mut state = LearnerCheckpoint {
        stage: plan.stages[0].name.clone(),
        ..LearnerCheckpoint::default()
    };
    if let Some((dir, _)) = checkpoint::latest(root)? {
        state = checkpoint::load(&dir, &policy, &mut optimizer)?;
        tracing::info!(step = state.step, dir = %dir.display(), "resumed from checkpoint");
    }
    let normalizer = state.normalizer.clone();
    Ok((
        Trainer {
            policy,
            reference,
            vars,
            optimizer,
            normalizer,
            loss: plan.loss,
            max_grad_norm: plan.max_grad_norm,
            micro_batch: plan.micro_batch,
            epochs: plan.epochs,
        },
        state,
    ))
}

/// Every rank's `mine`, in rank order, on every rank (the lists are short:
/// the entries of one checkpoint interval).
fn gather(collective: &mut dyn Collective, mine: &[String]) -> Result<Vec<String>, LearnerError> {
    let mut all = Vec::new();
    for (root, bytes) in all_gather(collective, mine.join("\n").as_bytes())?
        .into_iter()
        .enumerate()
    {
        let text = String::from_utf8(bytes).map_err(|_| {
            LearnerError::StateMismatch(format!("rank {root} sent non-UTF-8 entry ids"))
        })?;
        all.extend(
            text.split('\n')
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
    }
    Ok(all)
}

/// Splits re-claimed entries into those the checkpoint already trained on
/// (to acknowledge) and those to train on again.
fn split_claimed(claimed: Vec<QueueEntry>, trained: &[String]) -> (Vec<EntryId>, Vec<QueueEntry>) {
    let trained: std::collections::BTreeSet<&str> = trained.iter().map(String::as_str).collect();
    let (done, redo): (Vec<QueueEntry>, Vec<QueueEntry>) = claimed
        .into_iter()
        .partition(|e| trained.contains(e.id.to_string().as_str()));
    (done.into_iter().map(|e| e.id).collect(), redo)
}

/// The learner's reward specs for a stage.
fn reward_specs(stage: &Stage) -> Result<Vec<RewardSpec>, LearnerError> {
    stage
        .rewards
        .iter()
        .map(|r| {
            let n = r.normalization.unwrap_or_default();
            Ok(RewardSpec {
                model: r.model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                weight: r.weight,
                normalization: Normalization {
                    kind: if n.kind == ProtoKind::None as i32 {
                        NormalizationKind::None
                    } else if n.kind == ProtoKind::GroupZScore as i32 {
                        NormalizationKind::GroupZScore
                    } else {
                        NormalizationKind::RunningZScore
                    },
                    ema_decay: n.ema_decay.unwrap_or(0.99),
                    clip: n.clip,
                },
            })
        })
        .collect()
}

/// The batch in `entry` if it may be trained on, else why not and how many
/// rollouts are dropped. A malformed batch (a score of the stage missing or
/// not finite, a group short of `k` samples, tokens without one log-prob
/// per decoder step) is dropped as `invalid` here, so that one bad batch costs its
/// own rollouts rather than failing every attempt at the step it would join.
fn usable(
    entry: &QueueEntry,
    stage: &str,
    specs: &[RewardSpec],
    k: usize,
    latest: u64,
    max_staleness: u64,
) -> Result<ScoredBatch, (&'static str, u64)> {
    let batch = ScoredBatch::decode(entry.payload.as_slice()).map_err(|_| ("invalid", 1))?;
    let n = batch.rollouts.len() as u64;
    if batch.rollouts.is_empty() {
        return Err(("invalid", 1));
    }
    if batch.stage != stage {
        return Err(("stage", n));
    }
    let oldest = batch
        .rollouts
        .iter()
        .map(|r| r.policy_version.as_ref().map_or(0, |v| v.version))
        .min()
        .unwrap_or(0);
    if latest.saturating_sub(oldest) > max_staleness {
        return Err(("stale", n));
    }
    let malformed = |r: &Rollout| {
        encore_policies::decoder_steps(r.tokens.len(), r.codebooks)
            != Some(r.behaviour_log_probs.len())
            || r.behaviour_log_probs.iter().any(|lp| !lp.is_finite())
            || specs.iter().any(|spec| {
                r.scores
                    .get(&spec.model)
                    .is_none_or(|score| !score.value.is_finite())
            })
    };
    // Whole groups of k, adjacent: the leave-one-out baseline needs them.
    let whole_groups = batch.rollouts.len().is_multiple_of(k)
        && batch
            .rollouts
            .chunks(k)
            .all(|g| g.iter().all(|r| r.group_id == g[0].group_id));
    if !whole_groups || batch.rollouts.iter().any(malformed) {
        return Err(("invalid", n));
    }
    Ok(batch)
}

/// A stop condition that holds after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stop {
    reason: StopReason,
    /// The job ends (its own condition, or the last stage's); otherwise
    /// the next stage begins.
    ends_job: bool,
}

/// Which stop condition holds after the step, if any: the job's own
/// (`job_stop`: its steps count over all stages, its wall time from the
/// job's start), then `stage`'s (counting from the stage's start). `now_ms`
/// is the time in milliseconds since the Unix epoch.
fn stop_reason(
    stage: &Stage,
    job_stop: Option<&StopCondition>,
    last_stage: bool,
    state: &LearnerCheckpoint,
    recent: &VecDeque<f64>,
    now_ms: u64,
) -> Option<Stop> {
    let ends_job = |reason| {
        Some(Stop {
            reason,
            ends_job: true,
        })
    };
    if let Some(stop) = job_stop {
        if stop.max_steps.is_some_and(|max| state.step >= max) {
            return ends_job(StopReason::MaxSteps);
        }
        if past(stop.max_wall_time.as_ref(), state.job_start_unix_ms, now_ms) {
            return ends_job(StopReason::WallTime);
        }
    }
    let stop = stage.stop.as_ref()?;
    let target_met = stop.target_reward.is_some_and(|target| {
        let window = stop.target_window.max(1) as usize;
        recent.len() >= window && recent.iter().sum::<f64>() / recent.len() as f64 >= target
    });
    let reason = if stop
        .max_steps
        .is_some_and(|max| state.step - state.stage_start_step >= max)
    {
        StopReason::MaxSteps
    } else if target_met {
        StopReason::TargetReward
    } else if past(
        stop.max_wall_time.as_ref(),
        state.stage_start_unix_ms,
        now_ms,
    ) {
        StopReason::WallTime
    } else {
        return None;
    };
    Some(Stop {
        reason,
        ends_job: last_stage,
    })
}

/// Whether a wall time that ends the job has passed (checked while waiting
/// for rollouts, between steps).
fn waited_out(
    stage: &Stage,
    plan: &Plan,
    last_stage: bool,
    state: &LearnerCheckpoint,
    recent: &VecDeque<f64>,
) -> bool {
    let stop = stop_reason(
        stage,
        plan.job_stop.as_ref(),
        last_stage,
        state,
        recent,
        unix_ms(),
    );
    stop.is_some_and(|s| s.ends_job && s.reason == StopReason::WallTime)
}

/// Whether `limit` (none: no limit) has passed between `since_ms` and
/// `now_ms`.
fn past(limit: Option<&prost_types::Duration>, since_ms: u64, now_ms: u64) -> bool {
    limit
        .and_then(|d| Duration::try_from(*d).ok())
        .is_some_and(|d| u128::from(now_ms.saturating_sub(since_ms)) >= d.as_millis())
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The metric point of a step (`MetricPoint`).
fn metric_point(
    state: &LearnerCheckpoint,
    stage: &Stage,
    report: &StepReport,
    took: Duration,
    tokens: u64,
    staleness: &[u64],
    trainer: &Trainer,
) -> MetricPoint {
    let seconds = took.as_secs_f64().max(1e-9);
    MetricPoint {
        step: state.step,
        stage_index: state.stage_index,
        stage: stage.name.clone(),
        policy_version: state.policy_version,
        rewards: report
            .rewards
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    RewardStats {
                        mean: s.mean,
                        std: s.std(),
                    },
                )
            })
            .collect(),
        combined_reward_mean: report.combined_reward_mean,
        kl: report.loss.kl_seq_mean,
        entropy: report.loss.neg_log_prob_mean,
        loss: report.loss.loss,
        grad_norm: report.grad_norm,
        learning_rate: trainer.optimizer.learning_rate(),
        clip_fraction: report.loss.clip_fraction,
        rollouts_per_second: report.rollouts as f64 / seconds,
        tokens_per_second: tokens as f64 / seconds,
        staleness_mean: if staleness.is_empty() {
            0.0
        } else {
            staleness.iter().sum::<u64>() as f64 / staleness.len() as f64
        },
        staleness_max: staleness.iter().copied().max().unwrap_or(0),
        rollouts_consumed_total: state.rollouts_consumed_total,
        rollouts_dropped_total: state.rollouts_dropped_total,
        dropped_by_reason: state
            .dropped_by_reason
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect(),
        step_duration: prost_types::Duration::try_from(took).ok(),
        checkpoint_entry_ids: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> QueueEntry {
        QueueEntry {
            id: id.parse().unwrap(),
            payload: Vec::new(),
        }
    }

    #[test]
    fn the_jobs_own_stop_and_wall_times_end_stages_and_jobs() {
        let secs = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
        let stage = Stage {
            name: "R".into(),
            rewards: Vec::new(),
            stop: Some(StopCondition {
                max_steps: Some(100),
                max_wall_time: secs(2),
                ..StopCondition::default()
            }),
        };
        let state = LearnerCheckpoint {
            step: 5,
            stage_start_step: 2,
            job_start_unix_ms: 1_000,
            stage_start_unix_ms: 4_000,
            ..LearnerCheckpoint::default()
        };
        let recent = VecDeque::new();
        let at = |job_stop: Option<&StopCondition>, last_stage, now_ms| {
            stop_reason(&stage, job_stop, last_stage, &state, &recent, now_ms)
        };
        let stop = |reason, ends_job| Some(Stop { reason, ends_job });
        // The stage's wall time counts from the stage's start.
        assert_eq!(at(None, false, 5_999), None);
        assert_eq!(at(None, false, 6_000), stop(StopReason::WallTime, false));
        assert_eq!(at(None, true, 6_000), stop(StopReason::WallTime, true));
        // The job's own bounds end the job in any stage: steps over all
        // stages, wall time from the job's start.
        let job = StopCondition {
            max_steps: Some(5),
            ..StopCondition::default()
        };
        assert_eq!(at(Some(&job), false, 0), stop(StopReason::MaxSteps, true));
        let job = StopCondition {
            max_steps: Some(6),
            max_wall_time: secs(3),
            ..StopCondition::default()
        };
        assert_eq!(at(Some(&job), false, 3_999), None);
        assert_eq!(
            at(Some(&job), false, 4_000),
            stop(StopReason::WallTime, true)
        );
    }

    /// A batch of `groups` groups of 2 rollouts scored by "quality".
    fn scored_batch(groups: usize) -> ScoredBatch {
        ScoredBatch {
            stage: "main".into(),
            rollouts: (0..2 * groups)
                .map(|i| Rollout {
                    group_id: format!("g{}", i / 2),
                    sample_index: (i % 2) as u32,
                    group_size: 2,
                    tokens: vec![1, 2, 3],
                    behaviour_log_probs: vec![-1.0; 3],
                    scores: [(
                        "quality".to_owned(),
                        encore_proto::v1::Score {
                            value: 3.0,
                            details: None,
                        },
                    )]
                    .into(),
                    ..Rollout::default()
                })
                .collect(),
            ..ScoredBatch::default()
        }
    }

    #[test]
    fn malformed_batches_are_dropped_as_invalid_with_their_rollouts() {
        let specs = reward_specs(&Stage {
            name: "main".into(),
            rewards: vec![encore_proto::v1::RewardConfig {
                model: Some(encore_proto::v1::ModelRef {
                    name: "quality".into(),
                    ..Default::default()
                }),
                weight: 1.0,
                normalization: None,
            }],
            stop: None,
        })
        .unwrap();
        let check = |batch: &ScoredBatch| {
            let entry = QueueEntry {
                id: "1-0".parse().unwrap(),
                payload: batch.encode_to_vec(),
            };
            usable(&entry, "main", &specs, 2, 0, 2).map(|b| b.rollouts.len())
        };
        assert_eq!(check(&scored_batch(2)), Ok(4));
        type Breakage = (&'static str, fn(&mut ScoredBatch));
        let broken: [Breakage; 6] = [
            ("missing score", |b| b.rollouts[1].scores.clear()),
            ("NaN score", |b| {
                b.rollouts[2].scores.get_mut("quality").unwrap().value = f64::NAN
            }),
            ("infinite score", |b| {
                b.rollouts[0].scores.get_mut("quality").unwrap().value = f64::INFINITY
            }),
            ("short group", |b| {
                b.rollouts.pop();
            }),
            ("groups mixed up", |b| b.rollouts.swap(1, 2)),
            ("NaN log-prob", |b| {
                b.rollouts[3].behaviour_log_probs[1] = f32::NAN
            }),
        ];
        for (what, breaks) in broken {
            let mut batch = scored_batch(2);
            breaks(&mut batch);
            let n = batch.rollouts.len() as u64;
            assert_eq!(check(&batch), Err(("invalid", n)), "{what}");
        }
    }

    #[test]
    fn the_learning_rate_warms_up_linearly_then_holds() {
        let spec = JobSpec {
            stages: vec![Stage::default()],
            algorithm: Some(encore_proto::v1::Algorithm {
                learning_rate: 1e-3,
                warmup_steps: 4,
                ppo_epochs: 3,
                ..encore_proto::v1::Algorithm::default()
            }),
            ..JobSpec::default()
        };
        let plan = Plan::from_spec(&spec).unwrap();
        let lr: Vec<f64> = (1..=6).map(|s| plan.learning_rate_at(s)).collect();
        assert_eq!(lr, [0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3]);
        assert_eq!(plan.epochs, 3);
        let no_warmup = Plan::from_spec(&JobSpec {
            algorithm: Some(encore_proto::v1::Algorithm {
                learning_rate: 1e-3,
                kind: AlgorithmKind::Reinforce as i32,
                ppo_epochs: 3,
                ..encore_proto::v1::Algorithm::default()
            }),
            ..spec
        })
        .unwrap();
        assert_eq!(no_warmup.learning_rate_at(1), 1e-3);
        assert_eq!(no_warmup.epochs, 1, "REINFORCE takes one pass");
    }

    #[test]
    fn only_a_later_committed_version_makes_a_refused_publish_a_success() {
        use encore_coordinator::Error;
        // As the coordinator answers them (its one conversion to a status).
        let later = tonic::Status::from(Error::VersionNotMonotonic(
            "header.version: 3 is not above 5".into(),
        ));
        assert!(superseded(&later), "{later:?}");
        let refusals = [
            Error::JobTerminal {
                job_id: "j".into(),
                state: "CANCELLED".into(),
                action: "given new weight versions",
            },
            Error::NotAssigned {
                member_id: "m".into(),
                why: "is not rank 0 of job \"j\"'s learner".into(),
            },
            Error::LeaseExpired("m".into()),
            Error::Store(encore_store::StoreError::LeaseExpired {
                member_id: "m".into(),
            }),
        ];
        for refusal in refusals {
            let status = tonic::Status::from(refusal);
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
            assert!(!superseded(&status), "{status:?}");
        }
        // The code alone, without the reason, is not enough either.
        assert!(!superseded(&tonic::Status::failed_precondition(
            "not above the latest"
        )));
    }

    #[test]
    fn entries_the_checkpoint_trained_on_are_acknowledged_not_redone() {
        let claimed = vec![entry("5-0"), entry("6-0"), entry("7-1")];
        let (done, redo) = split_claimed(claimed, &["6-0".into(), "9-9".into()]);
        assert_eq!(done, vec!["6-0".parse::<EntryId>().unwrap()]);
        let redo: Vec<String> = redo.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(redo, ["5-0", "7-1"]);
    }
}

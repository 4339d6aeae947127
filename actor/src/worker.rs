//! The actor's work: membership (register, heartbeat, follow the
//! assignment) and, for an assigned job, the sampling loop.
//!
//! ```text
//!  coordinator ──WatchAssignment──▶ job, stage, prompt shard, reward endpoints
//!  loop per batch:
//!    GetManifest(latest) newer? ──Fetch──▶ verified file ──▶ policy (never a half-received one)
//!    shard ──▶ G prompts × K samples ──KV-cached sampler──▶ tokens + behaviour log-probs
//!    reward servers (all models at once, deadlines, retries) ──▶ scores
//!    ScoredBatch ──queue_append (waits while the queue is full)──▶ rollout queue
//! ```
//!
//! The assignment is checked between batches: a new generation (another
//! stage, other reward servers, another job, or idle) ends the loop and the
//! next one starts from the new assignment. A lost lease stops the work and
//! registers again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use encore_client::BearerToken;
use encore_client::member::{self, CoordinatorClient, Membership, WeightClient, instance_id};
use encore_client::weights::fetch_to_file;
use encore_model::SamplingParams;
use encore_policies::AnyPolicy;
use encore_proto::v1::{
    ActorAssignment, GetManifestRequest, Role, Rollout, RolloutQueue, ScoreItem, ScoredBatch,
    WeightManifest, assignment,
};
use encore_store::{AppendOutcome, Queue};
use prost::Message;
use prost_types::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::prompts::ShardedPrompts;
use crate::scoring::RewardClients;

/// A running actor's shared parts.
#[derive(Clone)]
pub struct Actor {
    config: Config,
    metrics: Metrics,
    device: Device,
    coordinator: CoordinatorClient,
}

impl member::MemberWork for Actor {
    fn with_membership(&self, membership: &Membership) -> impl Future<Output = ()> + Send {
        self.work(membership)
    }
}

impl Actor {
    /// An actor for `config`; connects lazily to the coordinator.
    pub fn new(config: Config, metrics: Metrics) -> Result<Self> {
        let device = encore_model::device(&config.device)
            .map_err(|e| Error::Config(format!("actor.device: {e}")))?;
        let coordinator =
            CoordinatorClient::new(&config.coordinator, &config.token()?, config.tls.as_ref())
                .map_err(|e| Error::Config(format!("actor.{e}")))?;
        Ok(Self {
            config,
            metrics,
            device,
            coordinator,
        })
    }

    fn weights(&self) -> WeightClient {
        self.coordinator.weights()
    }

    /// Works until `shutdown`: registers, follows assignments, samples;
    /// registers again after a lost lease; deregisters on the way out.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let instance = if self.config.instance_id.is_empty() {
            instance_id("actor")
        } else {
            self.config.instance_id.clone()
        };
        member::stay_joined(
            &self.coordinator,
            Role::Actor,
            member::capabilities(self.device.is_cuda()),
            &instance,
            self.config.max_backoff(),
            &shutdown,
            self,
        )
        .await;
        Ok(())
    }

    /// Runs each assignment as it comes until the membership ends.
    async fn work(&self, membership: &Membership) {
        let member_id = membership.member_id.as_str();
        let mut assigned = membership.assignments.clone();
        let lost = &membership.lost;
        loop {
            let current = assigned.borrow_and_update().clone();
            let generation = current.generation;
            let job = match current.details {
                Some(assignment::Details::Actor(actor)) if !current.job_id.is_empty() => {
                    Some((current.job_id.clone(), actor, current.rollout_queue))
                }
                _ => None,
            };
            membership.update_status(|s| s.applied_generation = generation);
            let outcome = match job {
                Some((job_id, work, queue)) => {
                    let queue = queue.unwrap_or_default();
                    self.run_job(member_id, &job_id, &work, &queue, generation, membership)
                        .await
                }
                None => Err(Error::Reassigned),
            };
            match outcome {
                Err(Error::Reassigned) => {}
                Err(Error::ShuttingDown) => return,
                // The coordinator, the queue or a reward server away for now
                // (restarting, a connection cut mid-call): the same
                // assignment goes on after a pause, with a new batch. (A
                // batch whose append failed is not sent again: the queue
                // may have taken it before the answer was lost.)
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "the job failed on this actor for now; working on after a pause");
                    tokio::select! {
                        () = lost.cancelled() => return,
                        () = tokio::time::sleep(self.config.max_backoff()) => {}
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the job failed on this actor; waiting for a new assignment");
                }
                Ok(()) => {}
            }
            tokio::select! {
                () = lost.cancelled() => return,
                changed = assigned.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Samples batches for `job_id` until the assignment changes.
    #[allow(clippy::too_many_arguments)]
    #[tracing::instrument(skip_all, fields(job_id, member_id))]
    async fn run_job(
        &self,
        member_id: &str,
        job_id: &str,
        work: &ActorAssignment,
        queue: &RolloutQueue,
        generation: u64,
        membership: &Membership,
    ) -> Result<()> {
        let lost = &membership.lost;
        tracing::info!(job_id, stage = %work.stage, generation, "working on job");
        // Ends the batch loop's waits as soon as the assignment changes.
        let scope = membership.assignment_scope(generation);
        let result = self
            .batches(member_id, job_id, work, queue, membership, &scope.cancel)
            .await;
        drop(scope);
        match result {
            Err(Error::ShuttingDown) if !lost.is_cancelled() => Err(Error::Reassigned),
            other => other,
        }
    }

    async fn batches(
        &self,
        member_id: &str,
        job_id: &str,
        work: &ActorAssignment,
        queue: &RolloutQueue,
        membership: &Membership,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let mut prompts = ShardedPrompts::new(
            work.prompts
                .as_ref()
                .ok_or_else(|| Error::Config("the assignment has no prompt shard".into()))?,
        )?;
        let store = encore_client::queue::open_queue(&queue.uri, &self.coordinator).await?;
        let group = if queue.consumer_group.is_empty() {
            "learners"
        } else {
            queue.consumer_group.as_str()
        };
        let lead = match self.config.max_lead_batches {
            0 => lead(work),
            configured => configured,
        };
        let token = BearerToken::new(&self.config.token()?)
            .map_err(|why| Error::Config(format!("actor.worker_token: {why}")))?;
        let rewards = RewardClients::new(
            &work.reward_servers,
            &token,
            self.config.score_deadline(),
            self.config.max_backoff(),
            self.metrics.clone(),
        )?;
        let k = work.samples_per_prompt.max(1) as usize;
        let groups = work.groups_per_batch.max(1) as usize;
        let sampling = work.sampling.unwrap_or_default();
        let mut policy: Option<(WeightManifest, Arc<AnyPolicy>)> = None;
        let mut batch_no = 0u64;
        let job_label = [job_id];
        loop {
            if cancel.is_cancelled() {
                return Err(Error::ShuttingDown);
            }
            self.wait_for_room(&*store, job_id, group, lead, cancel)
                .await?;
            let latest = self.latest_manifest(job_id, cancel).await?;
            let newer = policy
                .as_ref()
                .is_none_or(|(m, _)| version_of(m) < version_of(&latest));
            if newer {
                let loaded = self.load(job_id, &latest, cancel).await?;
                let version = loaded.0.version.clone();
                membership.update_status(|s| s.policy_version = version);
                policy = Some(loaded);
            }
            let Some((manifest, current)) = policy.clone() else {
                continue;
            };
            self.metrics
                .version_lag
                .with_label_values(&job_label)
                .set((version_of(&latest) - version_of(&manifest)) as f64);

            let chosen = prompts.take(groups);
            let captions: Vec<String> = chosen
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.caption.clone(), k))
                .collect();
            let frames = (sampling.max_new_tokens as usize).min(current.max_frames());
            let params = SamplingParams {
                temperature: if sampling.temperature > 0.0 {
                    sampling.temperature
                } else {
                    1.0
                },
                top_k: (sampling.top_k > 0).then_some(sampling.top_k as usize),
                top_p: (sampling.top_p > 0.0 && sampling.top_p < 1.0).then_some(sampling.top_p),
                seed: work
                    .sampling_seed
                    .wrapping_add(batch_no.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            };
            let started = Instant::now();
            let (policy_ref, texts) = (current.clone(), captions.clone());
            let samples = tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                policy_ref.sample(&refs, frames, &params)
            })
            .await
            .map_err(|e| Error::Config(format!("the sampling task failed: {e}")))??;
            self.metrics
                .sample_seconds
                .with_label_values(&job_label)
                .observe(started.elapsed().as_secs_f64());
            self.metrics
                .clips
                .with_label_values(&job_label)
                .inc_by(captions.len() as u64);
            self.metrics
                .tokens
                .with_label_values(&job_label)
                .inc_by((captions.len() * frames) as u64);

            let items: Vec<ScoreItem> = captions
                .iter()
                .zip(&samples.tokens)
                .map(|(caption, tokens)| ScoreItem {
                    caption: caption.clone(),
                    tokens: tokens.clone(),
                    codebooks: samples.codebooks,
                })
                .collect();
            let scores = rewards.score(items, cancel).await?;

            let batch_id = format!("{member_id}-{batch_no}");
            let now = Some(Timestamp::from(std::time::SystemTime::now()));
            let mut rollouts = Vec::with_capacity(captions.len());
            for (i, ((tokens, log_probs), scores)) in samples
                .tokens
                .into_iter()
                .zip(samples.log_probs)
                .zip(scores)
                .enumerate()
            {
                let group = i / k;
                rollouts.push(Rollout {
                    rollout_id: format!("{batch_id}-{i}"),
                    job_id: job_id.to_owned(),
                    prompt: Some(chosen[group].clone()),
                    group_id: format!("{batch_id}-g{group}"),
                    sample_index: (i % k) as u32,
                    group_size: k as u32,
                    tokens,
                    behaviour_log_probs: log_probs,
                    policy_version: manifest.version.clone(),
                    sampling: Some(sampling),
                    scores: scores.into_iter().collect(),
                    actor_id: member_id.to_owned(),
                    create_time: now,
                    codebooks: samples.codebooks,
                });
            }
            let batch = ScoredBatch {
                batch_id,
                job_id: job_id.to_owned(),
                stage: work.stage.clone(),
                actor_id: member_id.to_owned(),
                rollouts,
                create_time: now,
            };
            self.append(&*store, job_id, group, batch.encode_to_vec(), cancel)
                .await?;
            self.metrics.batches.with_label_values(&job_label).inc();
            batch_no += 1;
        }
    }

    /// Waits while the learners have `lead` or more batches waiting that
    /// they have not read yet: a batch sampled now would wait behind them
    /// and go stale before it is read. (A hard bound on the queue,
    /// `queue_max_batches`, is enforced when appending.)
    async fn wait_for_room(
        &self,
        store: &dyn Queue,
        job_id: &str,
        group: &str,
        lead: u64,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let mut backoff = Duration::from_millis(10);
        loop {
            let counts = store.stats(job_id, group).await?;
            if counts.len.saturating_sub(counts.pending) < lead {
                return Ok(());
            }
            self.metrics.ahead_waits.with_label_values(&[job_id]).inc();
            tokio::select! {
                () = cancel.cancelled() => return Err(Error::ShuttingDown),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_AHEAD_POLL);
        }
    }

    /// Appends to the rollout queue, waiting while it is full.
    ///
    /// The bound counts the batches the learners have not read yet. Those
    /// they have read stay in the queue until the checkpoint that covers
    /// them (every `checkpoint_every_steps`), and counting them would
    /// deadlock a job whose checkpoint interval holds more batches than the
    /// bound: the actors would wait for an acknowledgement that only comes
    /// after steps that need their batches.
    async fn append(
        &self,
        store: &dyn Queue,
        job_id: &str,
        group: &str,
        payload: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let mut backoff = Duration::from_millis(20);
        loop {
            let read = store.pending(job_id, group).await?;
            let bound = self.config.queue_max_batches.saturating_add(read);
            match store.append(job_id, payload.clone(), bound).await? {
                AppendOutcome::Appended(_) => return Ok(()),
                AppendOutcome::Full { .. } => {
                    self.metrics
                        .queue_full_waits
                        .with_label_values(&[job_id])
                        .inc();
                    tokio::select! {
                        () = cancel.cancelled() => return Err(Error::ShuttingDown),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.max_backoff());
                }
            }
        }
    }

    /// The job's latest weight version; waits (with back-off) until the
    /// learner has published one.
    async fn latest_manifest(
        &self,
        job_id: &str,
        cancel: &CancellationToken,
    ) -> Result<WeightManifest> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let answer = self
                .weights()
                .get_manifest(GetManifestRequest {
                    job_id: job_id.to_owned(),
                    version: None,
                })
                .await;
            match answer {
                Ok(manifest) => return Ok(manifest.into_inner()),
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::NotFound | tonic::Code::Unavailable
                    ) => {}
                Err(status) => return Err(Error::rpc("GetManifest", status)),
            }
            tokio::select! {
                () = cancel.cancelled() => return Err(Error::ShuttingDown),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.config.max_backoff());
        }
    }

    /// Downloads (resumably, verified) and loads a version.
    async fn load(
        &self,
        job_id: &str,
        manifest: &WeightManifest,
        cancel: &CancellationToken,
    ) -> Result<(WeightManifest, Arc<AnyPolicy>)> {
        let version = version_of(manifest);
        let dir = self.config.work_dir.join(job_id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Weights(format!("{}: {e}", dir.display())))?;
        let dest: PathBuf = dir.join(format!("v{version}.safetensors"));
        let mut client = self.weights();
        let started = Instant::now();
        let fetched = tokio::select! {
            () = cancel.cancelled() => return Err(Error::ShuttingDown),
            fetched = fetch_to_file(&mut client, job_id, Some(version), &dest, 8) => fetched,
        }
        .map_err(|e| Error::Weights(e.to_string()))?;
        self.metrics
            .weight_fetch_seconds
            .with_label_values(&[job_id])
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .weight_fetch_bytes
            .with_label_values(&[job_id])
            .inc_by(fetched.total_size_bytes);
        let (config, device, path) = (
            fetched.model_config_json.clone(),
            self.device.clone(),
            dest.clone(),
        );
        let policy = tokio::task::spawn_blocking(move || {
            encore_policies::load_published(&config, &path, &device)
        })
        .await
        .map_err(|e| Error::Weights(format!("loading task failed: {e}")))??;
        // Older versions are not needed any more (only this actor's own
        // `v<N>.safetensors`: a learner may share the directory).
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let fetched_version = name
                    .to_str()
                    .and_then(|n| n.strip_prefix('v'))
                    .and_then(|n| n.strip_suffix(".safetensors"))
                    .is_some_and(|n| n.parse::<u64>().is_ok());
                if entry.path() != dest && fetched_version {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        tracing::info!(job_id, version, "policy loaded");
        Ok((fetched, Arc::new(policy)))
    }
}

fn version_of(manifest: &WeightManifest) -> u64 {
    manifest.version.as_ref().map_or(0, |v| v.version)
}

/// Longest pause between two looks at the queue while waiting for room.
const MAX_AHEAD_POLL: Duration = Duration::from_millis(250);

/// How many unread batches may wait for the learners before an actor holds
/// back: every actor's batch for `max_staleness` steps (at least one). A
/// learner step takes one batch from each actor and each step publishes a
/// version, so a batch appended behind more than that is read more than
/// `max_staleness` versions later and dropped as stale: sampling it would
/// be wasted work.
fn lead(work: &ActorAssignment) -> u64 {
    let actors = work.prompts.as_ref().map_or(1, |p| p.shard_count.max(1));
    u64::from(actors) * u64::from(work.max_staleness.max(1))
}

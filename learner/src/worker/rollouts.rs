//! One step's data and the step itself: this rank's share of the global
//! batch, read from the queue (re-claimed entries first), with what may not
//! be trained on dropped on purpose and counted; then the step on a
//! blocking thread and its bookkeeping.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use encore_client::member::Membership;
use encore_proto::v1::{MetricPoint, RewardStats, Rollout, ScoredBatch, Stage, StopReason};
use encore_store::QueueEntry;
use prost::Message;
use tokio_util::sync::CancellationToken;

use super::settings::reward_specs;
use super::setup::Attempt;
use super::stages::waited_out;
use super::{GROUP, Learner, READ_BLOCK};
use crate::checkpoint::LearnerCheckpoint;
use crate::error::LearnerError;
use crate::metrics::Phase;
use crate::normalize::RewardSpec;
use crate::step::StepReport;

/// What a step did, for its metric point.
pub(super) struct StepOutcome {
    pub(super) report: StepReport,
    /// From the start of reading its rollouts to the end of the step.
    pub(super) took: Duration,
    pub(super) tokens: u64,
    /// Versions each rollout lagged behind the policy.
    pub(super) staleness: Vec<u64>,
}

impl Learner {
    /// Reads this rank's share of the next global batch. `None`: a wall
    /// time ended the job while waiting (rank 0 has reported it).
    pub(super) async fn collect(
        &self,
        membership: &Membership,
        run: &mut Attempt,
        stage: &Stage,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<Rollout>>, LearnerError> {
        let job_id = run.job_id.clone();
        let job_id = job_id.as_str();
        let specs = reward_specs(stage)?;
        let latest = self
            .latest_version(job_id)
            .await
            .unwrap_or(run.state.policy_version);
        run.state.policy_version = run.state.policy_version.max(latest);
        let (k, max_staleness) = (run.settings.k, run.settings.max_staleness);
        let share = (run.settings.batch_size / run.world).max(k);
        let mut rollouts: Vec<Rollout> = Vec::with_capacity(share);
        let started = Instant::now();
        if run.rank == 0
            && let Ok(depth) = run.store.len(job_id).await
        {
            self.metrics.queue_depth(job_id, depth);
        }
        while rollouts.len() < share {
            let entry = match run.backlog.pop_front() {
                Some(entry) => entry,
                None => {
                    let read = tokio::select! {
                        () = cancel.cancelled() => return Err(LearnerError::Cancelled),
                        read = run.store.read(job_id, GROUP, &run.consumer, 1, READ_BLOCK) => read,
                    };
                    match read?.pop() {
                        Some(entry) => entry,
                        // A wall time that ends the job does not wait for a
                        // step that may never come (stalled actors): rank 0
                        // ends the job now, and the other ranks'
                        // assignments end with it.
                        None if run.rank == 0
                            && waited_out(
                                stage,
                                &run.settings,
                                run.last_stage(),
                                &run.state,
                                &run.recent,
                            ) =>
                        {
                            tracing::info!(
                                job_id,
                                step = run.state.step,
                                "wall time reached while waiting for rollouts"
                            );
                            self.report(membership, job_id, None, None, Some(StopReason::WallTime))
                                .await?;
                            return Ok(None);
                        }
                        None => continue,
                    }
                }
            };
            if run.pending.contains(&entry.id) {
                // Read twice since the checkpoint (a queue that lost its
                // delivery state): consumed once, so neither trained on nor
                // counted again.
                tracing::warn!(job_id, id = %entry.id,
                    "the queue delivered an entry this rank already holds; skipping it");
                continue;
            }
            run.pending.push(entry.id);
            if run
                .state
                .trained_unacknowledged
                .contains(&entry.id.to_string())
            {
                tracing::warn!(job_id, id = %entry.id,
                    "the queue delivered an entry the checkpoint trained on; skipping it");
                continue;
            }
            match usable(
                &entry,
                &stage.name,
                &specs,
                k,
                run.state.policy_version,
                max_staleness,
            ) {
                Ok(batch) => rollouts.extend(batch.rollouts),
                Err((reason, n)) => *run.dropped.entry(reason.into()).or_default() += n,
            }
        }
        self.metrics.phase(job_id, Phase::Wait, started.elapsed());
        Ok(Some(rollouts))
    }

    /// Takes the step on `rollouts` (all-reduce with the other ranks,
    /// AdamW) and counts it; `started` is when its rollouts were first
    /// awaited.
    pub(super) async fn take_step(
        &self,
        run: &mut Attempt,
        stage: &Stage,
        rollouts: Vec<Rollout>,
        started: Instant,
    ) -> Result<StepOutcome, LearnerError> {
        let job_id = run.job_id.clone();
        let step_started = Instant::now();
        let specs = reward_specs(stage)?;
        let tokens: u64 = rollouts.iter().map(|r| r.tokens.len() as u64).sum();
        let staleness: Vec<u64> = rollouts
            .iter()
            .map(|r| {
                run.state
                    .policy_version
                    .saturating_sub(r.policy_version.as_ref().map_or(0, |v| v.version))
            })
            .collect();
        let (stage_name, k, local_drops) = (
            stage.name.clone(),
            run.settings.k,
            std::mem::take(&mut run.dropped),
        );
        let learning_rate = run.settings.learning_rate_at(run.state.step + 1);
        let report = run
            .on_compute("the step", move |c| {
                c.trainer.optimizer.set_learning_rate(learning_rate);
                c.trainer.step(
                    &stage_name,
                    &specs,
                    &rollouts,
                    k,
                    &local_drops,
                    c.collective.as_mut(),
                )
            })
            .await??;
        self.metrics
            .phase(&job_id, Phase::Step, step_started.elapsed());
        self.metrics.staleness(&job_id, &staleness);
        if run.rank == 0 {
            self.metrics.step(&job_id, &stage.name, &report);
        }
        let took = started.elapsed();
        let state = &mut run.state;
        state.step += 1;
        // Job-wide counts: the step summed them over the ranks.
        state.rollouts_consumed_total += report.rollouts;
        for (reason, count) in &report.dropped {
            state.rollouts_dropped_total += count;
            *state.dropped_by_reason.entry(reason.clone()).or_default() += count;
        }
        run.recent.push_back(report.combined_reward_mean);
        let window = stage
            .stop
            .as_ref()
            .map_or(encore_spec::DEFAULT_TARGET_WINDOW, |s| {
                s.target_window.max(1)
            });
        while run.recent.len() > window as usize {
            run.recent.pop_front();
        }
        Ok(StepOutcome {
            report,
            took,
            tokens,
            staleness,
        })
    }
}

impl Attempt {
    /// The metric point of the step just taken.
    pub(super) fn metric_point(&self, stage: &Stage, step: &StepOutcome) -> MetricPoint {
        let learning_rate = {
            let compute = self.compute.lock().unwrap_or_else(|p| p.into_inner());
            compute.trainer.optimizer.learning_rate()
        };
        metric_point(&self.state, stage, step, learning_rate)
    }
}

/// The batch in `entry` if it may be trained on, else why not and how many
/// rollouts are dropped. A malformed batch (a score of the stage missing or
/// not finite, a group short of `k` samples, tokens without one log-prob
/// per decoder step) is dropped as `invalid` here, so that one bad batch costs its
/// own rollouts rather than failing every attempt at the step it would join.
pub(super) fn usable(
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

/// The metric point of a step (`MetricPoint`).
fn metric_point(
    state: &LearnerCheckpoint,
    stage: &Stage,
    step: &StepOutcome,
    learning_rate: f64,
) -> MetricPoint {
    let StepOutcome {
        report,
        took,
        tokens,
        staleness,
    } = step;
    let (took, tokens) = (*took, *tokens);
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
        learning_rate,
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

//! One learner step on one rank, identical in result to the same step on
//! one rank over the global batch:
//!
//! ```text
//!  this rank's rollouts (whole groups of K)
//!   └─ scores (raw, or less their group's mean) ── local sums ──all-reduce──▶ global batch statistics
//!        └─ RewardNormalizer::update (same on every rank) ─▶ combined reward per rollout
//!             └─ leave-one-out baseline per group ─▶ advantage per rollout
//!  micro-batches: policy log-probs (differentiable), reference log-probs,
//!   behaviour log-probs ─▶ policy_loss(sum over tokens / global token count)
//!   └─ backward ─▶ flat gradient (accumulated) ──all-reduce──▶ global gradient
//!        └─ clip to max_grad_norm ─▶ AdamW step (same on every rank)
//! ```
//!
//! Every quantity that depends on the whole batch (reward statistics, the
//! token count that normalises the loss, the gradient, the reported
//! statistics) is summed across ranks before use, so ranks keep
//! bit-identical weights and two ranks take the step one rank would take
//! on their union (up to float summation order). Groups are never split
//! across ranks: the leave-one-out baseline needs all K samples.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use encore_policies::{AnyPolicy, AnyTrainable};
use encore_proto::v1::Rollout;

use crate::advantage::leave_one_out;
use crate::collective::Collective;
use crate::error::LearnerError;
use crate::loss::{LossConfig, LossInputs, LossStats, pad_rows, policy_loss};
use crate::normalize::{BatchStats, RewardNormalizer, RewardSpec};
use crate::optim::{AdamW, clip_global_norm, flatten_grads, unflatten};

/// What one step reports (identical on every rank).
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Raw score statistics of the global batch, by reward model.
    pub rewards: BTreeMap<String, BatchStats>,
    /// Mean combined reward of the global batch.
    pub combined_reward_mean: f64,
    /// Loss statistics of the global batch.
    pub loss: LossStats,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Rollouts in the global batch.
    pub rollouts: u64,
    /// Rollouts dropped on purpose by all ranks since the previous step, by
    /// reason (every reason of [`DROP_REASONS`] present).
    pub dropped: BTreeMap<String, u64>,
}

/// Why a rollout is dropped instead of trained on (`MetricPoint.dropped_by_reason`).
pub const DROP_REASONS: [&str; 4] = ["stale", "invalid", "stage", "duplicate"];

/// The trainable policy, its frozen reference, the optimiser and the
/// reward normaliser of one rank.
pub struct Trainer {
    /// The policy being trained.
    pub policy: AnyTrainable,
    /// The frozen reference policy of the KL term (the base checkpoint).
    pub reference: AnyPolicy,
    /// Variables in name order: the layout of the flat gradient.
    pub vars: Vec<(String, Var)>,
    /// The optimiser.
    pub optimizer: AdamW,
    /// Running reward statistics.
    pub normalizer: RewardNormalizer,
    /// Loss settings.
    pub loss: LossConfig,
    /// Global gradient norm bound.
    pub max_grad_norm: f64,
    /// Rollouts per forward and backward pass (0: all at once).
    pub micro_batch: usize,
    /// Passes over each batch, each an optimiser step (PPO's epochs; 1 for
    /// REINFORCE). Later passes are off-policy: the clipped importance
    /// ratios against the behaviour log-probs keep them honest.
    pub epochs: usize,
}

/// Sums `values` (f64) across ranks exactly and identically everywhere:
/// every rank's values are broadcast to all (they are a few numbers), and
/// each rank adds them in rank order in f64. An f32 all-reduce would round
/// the statistics that the normaliser and the reports depend on.
fn all_reduce_f64(
    collective: &mut dyn Collective,
    values: &[f64],
) -> Result<Vec<f64>, LearnerError> {
    let mut total = vec![0f64; values.len()];
    for root in 0..collective.world_size() {
        let mut bytes: Vec<u8> = if root == collective.rank() {
            values.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else {
            Vec::new()
        };
        collective.broadcast(&mut bytes, root)?;
        if bytes.len() != values.len() * 8 {
            return Err(LearnerError::StateMismatch(format!(
                "rank {root} sent {} bytes of statistics, expected {}",
                bytes.len(),
                values.len() * 8
            )));
        }
        for (t, chunk) in total.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *t += f64::from_le_bytes(b);
        }
    }
    Ok(total)
}

impl Trainer {
    /// One step on this rank's share `rollouts` (whole groups of
    /// `group_size`, adjacent) of a global batch, for `stage` scored by
    /// `specs`. Every rank must call it with the same stage and specs.
    pub fn step(
        &mut self,
        stage: &str,
        specs: &[RewardSpec],
        rollouts: &[Rollout],
        group_size: usize,
        dropped: &BTreeMap<String, u64>,
        collective: &mut dyn Collective,
    ) -> Result<StepReport, LearnerError> {
        let scores: Vec<HashMap<String, f64>> = rollouts
            .iter()
            .map(|r| r.scores.iter().map(|(k, s)| (k.clone(), s.value)).collect())
            .collect();

        // Global reward statistics: count, sum and sum of squares per model,
        // of the raw scores (reported) and of what each normaliser sees
        // (raw, or deviations from group means), plus the valid tokens of
        // the batch. Groups are whole on every rank, so the deviations of
        // the shards are those of the global batch.
        let local = RewardNormalizer::batch_stats(specs, &scores)?;
        let seen = RewardNormalizer::normalizer_stats(specs, &scores, group_size)?;
        // A "token" of the loss is a decoder step: one per token for the
        // tiny policy, one per step of the delay pattern for MusicGen.
        let tokens_here: u64 = rollouts
            .iter()
            .map(|r| r.behaviour_log_probs.len() as u64)
            .sum();
        let mut sums = Vec::with_capacity(specs.len() * 6 + 2);
        for stats in [&local, &seen] {
            for spec in specs {
                let s = &stats[&spec.model];
                let n = s.count as f64;
                sums.extend([n, s.mean * n, (s.var + s.mean * s.mean) * n]);
            }
        }
        sums.extend([tokens_here as f64, rollouts.len() as f64]);
        sums.extend(
            DROP_REASONS
                .iter()
                .map(|r| dropped.get(*r).copied().unwrap_or(0) as f64),
        );
        let sums = all_reduce_f64(collective, &sums)?;
        let stats_at = |i: usize| {
            let (n, sum, sq) = (sums[3 * i], sums[3 * i + 1], sums[3 * i + 2]);
            let mean = if n > 0.0 { sum / n } else { 0.0 };
            let var = if n > 0.0 {
                (sq / n - mean * mean).max(0.0)
            } else {
                0.0
            };
            BatchStats {
                count: n.round() as u64,
                mean,
                var,
            }
        };
        let mut global = BTreeMap::new();
        let mut global_seen = BTreeMap::new();
        for (i, spec) in specs.iter().enumerate() {
            global.insert(spec.model.clone(), stats_at(i));
            global_seen.insert(spec.model.clone(), stats_at(specs.len() + i));
        }
        let rest = specs.len() * 6;
        let global_tokens = sums[rest];
        let global_rollouts = sums[rest + 1].round() as u64;
        let global_dropped: BTreeMap<String, u64> = DROP_REASONS
            .iter()
            .enumerate()
            .map(|(i, r)| ((*r).to_owned(), sums[rest + 2 + i].round() as u64))
            .collect();
        if global_tokens <= 0.0 {
            return Err(LearnerError::InvalidBatch(
                "the global batch holds no tokens".into(),
            ));
        }
        for spec in specs {
            self.normalizer
                .update(stage, spec, &global_seen[&spec.model]);
        }
        let combined = self
            .normalizer
            .combined(stage, specs, &scores, group_size)?;
        let advantages = leave_one_out(&combined, group_size)?;

        // The first pass's statistics and gradient norm are the step's: they
        // describe the batch as the actors produced it.
        let (stats, grad_norm) = self.pass(rollouts, &advantages, global_tokens, collective)?;
        for _ in 1..self.epochs.max(1) {
            self.pass(rollouts, &advantages, global_tokens, collective)?;
        }

        // Reported statistics over the global batch.
        let combined_sum: f64 = combined.iter().sum();
        let weighted = [
            combined_sum,
            stats.loss,
            stats.policy_loss,
            stats.kl_penalty,
            stats.entropy_bonus,
            stats.kl_seq_mean * stats.sequences as f64,
            stats.kl_k3_mean * stats.tokens as f64,
            stats.neg_log_prob_mean * stats.tokens as f64,
            stats.clip_fraction * stats.tokens as f64,
            stats.ratio_mean * stats.tokens as f64,
            stats.tokens as f64,
            stats.sequences as f64,
        ];
        let g = all_reduce_f64(collective, &weighted)?;
        let (tokens, sequences) = (g[10].max(1.0), g[11].max(1.0));
        Ok(StepReport {
            rewards: global,
            combined_reward_mean: g[0] / global_rollouts.max(1) as f64,
            loss: LossStats {
                tokens: g[10] as u64,
                sequences: g[11] as u64,
                loss: g[1],
                policy_loss: g[2],
                kl_penalty: g[3],
                entropy_bonus: g[4],
                kl_seq_mean: g[5] / sequences,
                kl_k3_mean: g[6] / tokens,
                neg_log_prob_mean: g[7] / tokens,
                clip_fraction: g[8] / tokens,
                ratio_mean: g[9] / tokens,
            },
            grad_norm,
            rollouts: global_rollouts,
            dropped: global_dropped,
        })
    }

    /// One pass over this rank's share: forward and backward per
    /// micro-batch (gradients accumulate in one flat buffer), the
    /// all-reduce, clipping, and an AdamW step. Returns this rank's loss
    /// statistics and the global gradient norm before clipping.
    fn pass(
        &mut self,
        rollouts: &[Rollout],
        advantages: &[f64],
        global_tokens: f64,
        collective: &mut dyn Collective,
    ) -> Result<(LossStats, f64), LearnerError> {
        let device = self.policy.device().clone();
        let total: usize = self.vars.iter().map(|(_, v)| v.elem_count()).sum();
        let mut flat = vec![0f32; total];
        let mut stats = LossStats::default();
        let step = if self.micro_batch == 0 {
            rollouts.len().max(1)
        } else {
            self.micro_batch
        };
        for (chunk, adv) in rollouts.chunks(step).zip(advantages.chunks(step)) {
            let out = self.micro_step(chunk, adv, global_tokens, &device)?;
            let grads = out.0.backward()?;
            for (acc, g) in flat.iter_mut().zip(flatten_grads(&grads, &self.vars)?) {
                *acc += g;
            }
            stats = stats.merge(&out.1);
        }
        collective.all_reduce_sum(&mut flat)?;
        let grad_norm = clip_global_norm(&mut flat, self.max_grad_norm);
        if !grad_norm.is_finite() {
            return Err(LearnerError::InvalidBatch(format!(
                "the gradient norm is {grad_norm}; step skipped"
            )));
        }
        self.optimizer.step_with(&unflatten(&flat, &self.vars)?)?;
        Ok((stats, grad_norm))
    }

    /// The loss of one micro-batch (its gradient still to be taken).
    fn micro_step(
        &self,
        rollouts: &[Rollout],
        advantages: &[f64],
        global_tokens: f64,
        device: &Device,
    ) -> Result<(Tensor, LossStats), LearnerError> {
        let captions: Vec<&str> = rollouts
            .iter()
            .map(|r| r.prompt.as_ref().map_or("", |p| p.caption.as_str()))
            .collect();
        let policy = self.policy.policy();
        for r in rollouts {
            let codebooks = r.codebooks.max(1);
            if codebooks != policy.codebooks() {
                return Err(LearnerError::InvalidBatch(format!(
                    "rollout {}: {codebooks} codebooks, the policy has {}",
                    r.rollout_id,
                    policy.codebooks()
                )));
            }
            let steps = policy.steps_for(r.tokens.len());
            if r.tokens.is_empty() || r.behaviour_log_probs.len() != steps {
                return Err(LearnerError::InvalidBatch(format!(
                    "rollout {}: {} behaviour log-probs for {} tokens ({steps} decoder steps)",
                    r.rollout_id,
                    r.behaviour_log_probs.len(),
                    r.tokens.len()
                )));
            }
        }
        let clips: Vec<&[u32]> = rollouts.iter().map(|r| r.tokens.as_slice()).collect();
        let behaviour: Vec<&[f32]> = rollouts
            .iter()
            .map(|r| r.behaviour_log_probs.as_slice())
            .collect();
        let (behaviour, mask) = pad_rows(&behaviour, device)?;
        // Rollouts that do not fit the policy make the batch invalid (dropped
        // and counted), not the learner broken.
        let invalid = |e: encore_policies::PolicyError| match e {
            encore_policies::PolicyError::Input(m) => LearnerError::InvalidBatch(m),
            other => other.into(),
        };
        let log_probs = policy.log_probs(&captions, &clips).map_err(invalid)?;
        let reference = self
            .reference
            .log_probs(&captions, &clips)
            .map_err(invalid)?
            .detach();
        let advantages = Tensor::from_vec(
            advantages.iter().map(|&a| a as f32).collect::<Vec<_>>(),
            rollouts.len(),
            device,
        )?;
        let out = policy_loss(
            &self.loss,
            &LossInputs {
                log_probs: &log_probs,
                behaviour_log_probs: &behaviour,
                reference_log_probs: &reference,
                advantages: &advantages,
                mask: &mask.to_dtype(DType::F32)?,
                global_tokens,
            },
        )?;
        Ok((out.loss, out.stats))
    }
}

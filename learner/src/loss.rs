//! The policy-gradient loss of one micro-batch, with the KL penalty to the
//! frozen reference policy, as a candle graph that backpropagates into the
//! policy.
//!
//! Where it sits: after [`crate::advantage`] has produced one advantage per
//! sequence. The learner runs the trainable policy on a micro-batch
//! (`Policy::log_probs`, differentiable), the frozen reference policy on the
//! same tokens (constant), pads everything to `[b, t]` with a mask, calls
//! [`policy_loss`], and backpropagates `LossOutput::loss`; the gradients of
//! all micro-batches and ranks are summed before the optimiser step.
//!
//! Per valid token `(i, t)`, with `logp` the current log-prob, `logb` the
//! behaviour log-prob (what the actor sampled from), `logr` the reference
//! log-prob, `A_i` the sequence's advantage, `eps` the clip range, `beta` the
//! KL coefficient and `sg` stop-gradient:
//!
//! ```text
//! r     = exp(logp - logb)                         importance ratio
//! PPO:        s = min(r * A, clip(r, 1 - eps, 1 + eps) * A)
//! REINFORCE:  s = sg(min(1, (1 + eps) / r)) * r * A
//!             (value min(r, 1 + eps) * A, gradient min(r, 1 + eps) * A * dlogp)
//! k3    = exp(logr - logp) - (logr - logp) - 1    KL penalty, k3 (default)
//! k2    = (logp - logr)^2 / 2                      KL penalty, k2
//! h     = sg(-logp) * r                           entropy bonus (value -logp)
//! loss  = ( -sum s  +  beta * sum k  -  c * sum h ) / N,   k = k3 or k2
//! ```
//!
//! Sums run over the micro-batch's valid tokens; `N` is the number of valid
//! tokens in the *global* batch (all micro-batches, all ranks), passed in.
//! Dividing by the global count rather than the local one makes the summed
//! gradients of any split of the batch, over micro-batches or data-parallel
//! ranks, equal the gradient of one pass over the whole batch. The loss is
//! therefore a mean over tokens: a longer sequence weighs proportionally
//! more (every clip of a job has `max_new_tokens` tokens, so in practice all
//! weigh the same).
//!
//! PPO is the standard clipped surrogate: a token whose ratio has moved past
//! the clip range *in the direction its advantage pushes* (`A > 0` and
//! `r > 1 + eps`, or `A < 0` and `r < 1 - eps`) contributes a constant and no
//! gradient; it is written with an explicit mask rather than `min` so ties
//! cannot split the gradient.
//!
//! REINFORCE is the truncated importance-sampling policy gradient (IMPALA's
//! truncated rho): every token keeps a gradient, weighted by the ratio
//! truncated from above at `1 + eps`. Written as `sg(w / r) * r * A` so the
//! loss value is `-min(r, 1 + eps) * A` (on-policy, `-A`, plain REINFORCE)
//! while the gradient is `-min(r, 1 + eps) * A * dlogp`. Unlike PPO's clip,
//! truncation never zeroes a gradient, so one step per batch learns from
//! every token; it bounds the variance a stale rollout can add.
//!
//! KL. `k3` is Schulman's estimator: non-negative, zero only where
//! `logp = logr`, and with expectation `KL(pi || pi_ref)` per token under
//! samples from pi. Its gradient `d k3 / d logp = 1 - exp(logr - logp)`
//! pulls each token's log-prob towards the reference. Used as a loss on
//! sampled tokens (as GRPO does) its expected gradient is that of
//! `KL(pi_ref || pi)`, not of `KL(pi || pi_ref)`; both vanish only at
//! `pi = pi_ref`, which is what the penalty is for. The per-sequence KL that
//! `MetricPoint.kl` reports is the k1 estimate `sum_t (logp - logr)`, measured
//! here without a gradient.
//!
//! The k3 gradient is bounded: where the policy has moved mass onto a
//! token (`logp > logr`), `1 - exp(logr - logp)` is below 1 however far it
//! moved, so the penalty pulls each token back with a force of at most
//! `beta`, while the advantage pushes with `|A|`, about 1 for z-scored
//! rewards. With a small `beta` nothing holds the policy once an advantage
//! points one way for long. `KlEstimator::K2` uses `k2` instead, whose
//! gradient `logp - logr` grows with the log-ratio, and whose expectation
//! under samples from pi is exactly the gradient of `KL(pi || pi_ref)`,
//! the KL of MusicRL's objective (`E[(log pi - log pi_ref) dlog pi]`; the
//! term `E[dlog pi]` is zero): the penalty then holds at the point where
//! the advantage and `beta * log(pi / pi_ref)` balance. It includes the
//! entropy's gradient with weight `beta`, since
//! `KL(pi || pi_ref) = -H(pi) - E[log pi_ref]`.
//!
//! The reported KL (`kl_seq_mean`, `kl_k3_mean`) is k3's with either
//! estimator: an unbiased, non-negative estimate of the KL's value. Neither KL term is importance-weighted: with
//! staleness bounded by `max_staleness`, the behaviour and current policies
//! are close.
//!
//! Entropy. `c` (`entropy_coef`, 0 by default) adds a bonus for the
//! entropy of each decoder step's distribution, estimated from the sampled
//! tokens alone: the score-function gradient of `H = E[-log pi]` is
//! `E[-log pi(y) * dlog pi(y)]` (the `-1` of `d(-log pi)` has expectation
//! zero), which is the gradient of `h` at `r = 1`; the ratio carries the
//! usual importance weight on later PPO passes. It needs no full
//! distribution, so any policy that gives log-probs of its tokens gets it.
//! Unlike the KL term it pushes back before a step's distribution has
//! collapsed onto one token; once it has, every estimate (this one, and
//! the exact entropy's gradient) vanishes, so it is a guard, not a cure.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::LearnerError;

/// The policy-gradient variant (proto `AlgorithmKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Truncated importance-weighted REINFORCE, one gradient step per batch.
    Reinforce,
    /// PPO's clipped surrogate, for `ppo_epochs` passes over each batch.
    Ppo,
}

/// How the KL penalty is estimated per token (proto `KlEstimator`); see
/// the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `exp(logr - logp) - (logr - logp) - 1`: its gradient pulls each
    /// token back with a force of at most beta.
    #[default]
    K3,
    /// `(logp - logr)^2 / 2`: its gradient is that of `KL(pi || pi_ref)`.
    K2,
}

/// Hyper-parameters of the loss (from proto `Algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    /// Which variant.
    pub algorithm: Algorithm,
    /// `eps`, the clip range of importance ratios, > 0.
    pub clip_range: f64,
    /// `beta`, the KL penalty coefficient, >= 0.
    pub kl_coef: f64,
    /// The per-token KL estimator the penalty backpropagates through.
    #[serde(default)]
    pub kl_estimator: KlEstimator,
    /// `c`, the weight of the entropy bonus, >= 0 (0: none).
    #[serde(default)]
    pub entropy_coef: f64,
}

impl LossConfig {
    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<(), LearnerError> {
        if !(self.clip_range.is_finite() && self.clip_range > 0.0) {
            return Err(LearnerError::Config(format!(
                "algorithm.clip_range: must be > 0, got {}",
                self.clip_range
            )));
        }
        if !(self.kl_coef.is_finite() && self.kl_coef >= 0.0) {
            return Err(LearnerError::Config(format!(
                "algorithm.kl_coef: must be >= 0, got {}",
                self.kl_coef
            )));
        }
        if !(self.entropy_coef.is_finite() && self.entropy_coef >= 0.0) {
            return Err(LearnerError::Config(format!(
                "algorithm.entropy_coef: must be >= 0, got {}",
                self.entropy_coef
            )));
        }
        Ok(())
    }
}

/// The tensors of one micro-batch of `b` sequences padded to `t` tokens.
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a> {
    /// Current per-token log-probs `[b, t]` (f32), differentiable: the
    /// output of `Policy::log_probs` on the trainable policy.
    pub log_probs: &'a Tensor,
    /// Behaviour log-probs `[b, t]` from the rollouts; treated as constants.
    pub behaviour_log_probs: &'a Tensor,
    /// Log-probs `[b, t]` under the frozen reference policy; constants.
    pub reference_log_probs: &'a Tensor,
    /// One advantage per sequence, `[b]`; constants.
    pub advantages: &'a Tensor,
    /// `[b, t]`, non-zero on real tokens and zero on padding, any dtype.
    /// Padded positions may hold anything, even NaN: they are selected
    /// away, not multiplied by zero.
    pub mask: &'a Tensor,
    /// `N`: valid tokens in the global batch, over all micro-batches and
    /// ranks, > 0.
    pub global_tokens: f64,
}

/// What [`policy_loss`] returns.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The scalar to backpropagate.
    pub loss: Tensor,
    /// Its parts and diagnostics, without gradients.
    pub stats: LossStats,
}

/// Diagnostics of a loss evaluation. `loss`, `policy_loss` and `kl_penalty`
/// are this micro-batch's share of the global loss (already divided by the
/// global token count), so they add up over micro-batches and ranks; the
/// means are over this micro-batch's own tokens or sequences, and
/// [`LossStats::merge`] weighs them by `tokens` and `sequences`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LossStats {
    /// Valid tokens in the micro-batch.
    pub tokens: u64,
    /// Sequences in the micro-batch.
    pub sequences: u64,
    /// `policy_loss + kl_penalty - entropy_bonus`.
    pub loss: f64,
    /// `-sum s / N`, the policy-gradient term.
    pub policy_loss: f64,
    /// `beta * sum k / N`, the KL penalty term (k3 or k2).
    pub kl_penalty: f64,
    /// `c * sum h / N`, the entropy bonus (subtracted from the loss).
    #[serde(default)]
    pub entropy_bonus: f64,
    /// Mean over sequences of `sum_t k3`, nats per sequence
    /// (`MetricPoint.kl`): the quantity the penalty acts on. Never
    /// negative, unlike k1 (`sum_t (logp - logr)`), which on rollouts from
    /// an older policy swings far below zero.
    pub kl_seq_mean: f64,
    /// Mean over tokens of k3, nats per token.
    pub kl_k3_mean: f64,
    /// Mean over tokens of `-logp` of the sampled tokens: the per-token
    /// entropy's Monte-Carlo estimate when the rollouts are on-policy (an
    /// estimate only; the policy's full distribution is not computed).
    pub neg_log_prob_mean: f64,
    /// Fraction of tokens whose ratio was clipped (PPO: the clipped side is
    /// active) or truncated (REINFORCE: `r > 1 + eps`).
    pub clip_fraction: f64,
    /// Mean importance ratio `r` over tokens.
    pub ratio_mean: f64,
}

impl LossStats {
    /// The statistics of two micro-batches together.
    pub fn merge(&self, other: &Self) -> Self {
        let tokens = self.tokens + other.tokens;
        let sequences = self.sequences + other.sequences;
        let by = |a: f64, wa: u64, b: f64, wb: u64| {
            if wa + wb == 0 {
                0.0
            } else {
                (a * wa as f64 + b * wb as f64) / (wa + wb) as f64
            }
        };
        let by_tokens = |a: f64, b: f64| by(a, self.tokens, b, other.tokens);
        Self {
            tokens,
            sequences,
            loss: self.loss + other.loss,
            policy_loss: self.policy_loss + other.policy_loss,
            kl_penalty: self.kl_penalty + other.kl_penalty,
            entropy_bonus: self.entropy_bonus + other.entropy_bonus,
            kl_seq_mean: by(
                self.kl_seq_mean,
                self.sequences,
                other.kl_seq_mean,
                other.sequences,
            ),
            kl_k3_mean: by_tokens(self.kl_k3_mean, other.kl_k3_mean),
            neg_log_prob_mean: by_tokens(self.neg_log_prob_mean, other.neg_log_prob_mean),
            clip_fraction: by_tokens(self.clip_fraction, other.clip_fraction),
            ratio_mean: by_tokens(self.ratio_mean, other.ratio_mean),
        }
    }
}

/// The loss of one micro-batch; see the module doc for the formulas.
pub fn policy_loss(cfg: &LossConfig, inputs: &LossInputs<'_>) -> Result<LossOutput, LearnerError> {
    cfg.validate()?;
    let logp = inputs.log_probs;
    let (b, t) = logp.dims2().map_err(|e| bad("log_probs", e))?;
    for (name, x) in [
        ("behaviour_log_probs", inputs.behaviour_log_probs),
        ("reference_log_probs", inputs.reference_log_probs),
        ("mask", inputs.mask),
    ] {
        if x.dims() != [b, t] {
            return Err(LearnerError::InvalidBatch(format!(
                "{name}: shape {:?}, log_probs has [{b}, {t}]",
                x.dims()
            )));
        }
    }
    if inputs.advantages.dims() != [b] {
        return Err(LearnerError::InvalidBatch(format!(
            "advantages: shape {:?}, expected [{b}]",
            inputs.advantages.dims()
        )));
    }
    let n = inputs.global_tokens;
    if !(n.is_finite() && n > 0.0) {
        return Err(LearnerError::InvalidBatch(format!(
            "global_tokens: must be > 0, got {n}"
        )));
    }
    let dtype = logp.dtype();
    let advantages = inputs.advantages.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some(i) = advantages.iter().position(|a| !a.is_finite()) {
        return Err(LearnerError::InvalidBatch(format!(
            "advantages[{i}]: not finite ({})",
            advantages[i]
        )));
    }

    let mask = inputs.mask.to_dtype(dtype)?.detach();
    let valid = mask.ne(0.0)?; // u8, for where_cond
    let mask = valid.to_dtype(dtype)?; // exactly 0 / 1
    let behaviour = inputs.behaviour_log_probs.to_dtype(dtype)?.detach();
    let reference = inputs.reference_log_probs.to_dtype(dtype)?.detach();
    let adv = inputs
        .advantages
        .to_dtype(dtype)?
        .detach()
        .unsqueeze(1)?
        .broadcast_as((b, t))?
        .contiguous()?;
    let zeros = Tensor::zeros((b, t), dtype, logp.device())?;

    // Padding is selected away before any exp, so garbage there can neither
    // overflow nor turn into NaN through 0 * inf.
    let log_ratio = valid.where_cond(&(logp - &behaviour)?, &zeros)?;
    let ratio = log_ratio.exp()?;
    let ratio_const = ratio.detach();
    let eps = cfg.clip_range;
    let (surrogate, clipped) = match cfg.algorithm {
        Algorithm::Ppo => {
            let high = ratio_const.gt(1.0 + eps)?.mul(&adv.gt(0.0)?)?;
            let low = ratio_const.lt(1.0 - eps)?.mul(&adv.lt(0.0)?)?;
            // The two cases exclude each other, so the sum stays 0 / 1.
            let clipped = high.add(&low)?.mul(&valid)?;
            let constant = (ratio_const.clamp(1.0 - eps, 1.0 + eps)? * &adv)?;
            let surrogate = clipped.where_cond(&constant, &(&ratio * &adv)?)?;
            (surrogate, clipped)
        }
        Algorithm::Reinforce => {
            let clipped = ratio_const.gt(1.0 + eps)?.mul(&valid)?;
            let weight = (ratio_const.recip()? * (1.0 + eps))?.minimum(1.0)?;
            let surrogate = ((&ratio * &weight)? * &adv)?;
            (surrogate, clipped)
        }
    };
    let surrogate_sum = (surrogate * &mask)?.sum_all()?;
    let policy_term = surrogate_sum.affine(-1.0 / n, 0.0)?;

    let ref_minus_logp = valid.where_cond(&(&reference - logp)?, &zeros)?;
    let k3 = ((ref_minus_logp.exp()? - &ref_minus_logp)? - 1.0)?;
    let k3_sum = (k3 * &mask)?.sum_all()?;
    let penalty_sum = match cfg.kl_estimator {
        KlEstimator::K3 => k3_sum.clone(),
        KlEstimator::K2 => (ref_minus_logp.sqr()? * &mask)?
            .sum_all()?
            .affine(0.5, 0.0)?,
    };
    // With beta = 0 the penalty stays out of the graph: 0 * inf would
    // otherwise turn a far-off reference into a NaN gradient.
    let mut loss = if cfg.kl_coef > 0.0 {
        (&policy_term + penalty_sum.affine(cfg.kl_coef / n, 0.0)?)?
    } else {
        policy_term.clone()
    };
    let neg_logp_const = valid.where_cond(&logp.detach().neg()?, &zeros)?;
    let mut entropy_bonus = 0.0;
    if cfg.entropy_coef > 0.0 {
        let h_sum = ((&neg_logp_const * &ratio)? * &mask)?.sum_all()?;
        loss = (loss - h_sum.affine(cfg.entropy_coef / n, 0.0)?)?;
        entropy_bonus =
            cfg.entropy_coef * h_sum.detach().to_dtype(DType::F64)?.to_scalar::<f64>()? / n;
    }

    let scalar = |x: &Tensor| -> Result<f64, LearnerError> {
        Ok(x.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)
    };
    let tokens = scalar(&mask.sum_all()?)?;
    let per_token = |sum: f64| if tokens > 0.0 { sum / tokens } else { 0.0 };
    let k3_total = scalar(&k3_sum)?;
    let policy_loss = scalar(&policy_term)?;
    let kl_penalty = cfg.kl_coef * scalar(&penalty_sum)? / n;
    let stats = LossStats {
        tokens: tokens as u64,
        sequences: b as u64,
        loss: policy_loss + kl_penalty - entropy_bonus,
        policy_loss,
        kl_penalty,
        entropy_bonus,
        // k3 summed over a sequence's tokens, then averaged over sequences.
        kl_seq_mean: if b > 0 { k3_total / b as f64 } else { 0.0 },
        kl_k3_mean: per_token(k3_total),
        neg_log_prob_mean: per_token(scalar(&neg_logp_const.sum_all()?)?),
        clip_fraction: per_token(scalar(&clipped.to_dtype(dtype)?.sum_all()?)?),
        ratio_mean: per_token(scalar(&(ratio_const * &mask)?.sum_all()?)?),
    };
    Ok(LossOutput { loss, stats })
}

/// Pads rows of unequal length into `[rows, longest]` f32 values and a
/// matching 0/1 mask (padding holds 0). The learner uses it for behaviour
/// log-probs and, with the same lengths, for tokens.
pub fn pad_rows(rows: &[&[f32]], device: &Device) -> Result<(Tensor, Tensor), LearnerError> {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut values = vec![0f32; rows.len() * width];
    let mut mask = vec![0f32; rows.len() * width];
    for (i, row) in rows.iter().enumerate() {
        values[i * width..i * width + row.len()].copy_from_slice(row);
        mask[i * width..i * width + row.len()].fill(1.0);
    }
    let shape = (rows.len(), width);
    Ok((
        Tensor::from_vec(values, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

fn bad(name: &str, e: candle_core::Error) -> LearnerError {
    LearnerError::InvalidBatch(format!("{name}: {e}"))
}

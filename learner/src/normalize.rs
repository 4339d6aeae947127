//! Reward normalisation and combination: raw reward-model scores in, one
//! combined reward per rollout out.
//!
//! Where it sits: first thing the learner does with a scored batch. Each
//! reward of the stage (proto `RewardConfig`) has its raw scores normalised
//! (proto `Normalization`), then the combined reward of a rollout is
//! `sum_k weight_k * normalised_k`. The combined rewards go on to
//! [`crate::advantage`] for the per-group baseline.
//!
//! Running z-score. The learner keeps, per stage and per reward model, an
//! exponential moving mean `mu` and variance `s2`, updated once per learner
//! step from the statistics of that step's whole (global) batch:
//!
//! ```text
//! first step:  mu = mean_b,  s2 = var_b
//! later:       mu' = d*mu + (1-d)*mean_b
//!              s2' = d*s2 + (1-d)*var_b + d*(1-d)*(mu - mean_b)^2
//! z = (x - mu') / sqrt(s2' + 1e-8),  then clipped to [-clip, clip] if set
//! ```
//!
//! with `d = ema_decay` and `var_b` the population variance of the batch
//! (divided by n). `s2'` is exactly the variance of the mixture "old
//! statistics with weight d, this batch with weight 1 - d", so a shift of
//! the mean shows up as variance instead of being forgotten. The batch is
//! normalised with the statistics *after* they absorbed it, which is what
//! lets the first step z-score against itself. Statistics are keyed by
//! (stage, model): a stage that reuses a model from an earlier stage starts
//! fresh, as its batches come from a different policy. The state is serde
//! so it goes into the learner checkpoint; a resumed learner normalises
//! exactly as the one that crashed would have.
//!
//! Group z-score. The same running statistics, kept of each score's
//! deviation from the mean of its prompt's group (`x - mean(group)`)
//! instead of the raw score. The advantage's leave-one-out baseline
//! ([`crate::advantage`]) removes whatever a group shares, so only the
//! spread *within* groups reaches the gradient; a running z-score divides
//! by the spread of the whole batch, much of which can lie *between*
//! prompts (an adherence score depends on the caption as much as on the
//! clip). Two rewards with equal weights then weigh unequally in the
//! advantage: the one whose spread lies within groups swamps the other.
//! Dividing by the within-group spread instead makes a stage's weights
//! mean what they say.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::LearnerError;

/// Added to the running variance before the square root, so a batch of
/// identical scores (variance 0) normalises to 0 instead of NaN.
pub const VARIANCE_EPSILON: f64 = 1e-8;

/// Normalisation method of one reward (proto `NormalizationKind`;
/// `UNSPECIFIED` is filled in as [`NormalizationKind::RunningZScore`] at
/// submit, so it has no counterpart here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizationKind {
    /// Raw scores pass through (then the optional clip).
    None,
    /// Running z-score, see the module doc.
    RunningZScore,
    /// Running z-score of the deviations from each group's mean, see the
    /// module doc.
    GroupZScore,
}

/// How one reward's raw scores are normalised (proto `Normalization`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// The method.
    pub kind: NormalizationKind,
    /// Decay of the moving mean and variance per learner step, in [0, 1);
    /// not used by [`NormalizationKind::None`].
    pub ema_decay: f64,
    /// Clip normalised scores to `[-clip, clip]`; applies to every kind.
    pub clip: Option<f64>,
}

impl Default for Normalization {
    fn default() -> Self {
        Self {
            kind: NormalizationKind::RunningZScore,
            ema_decay: encore_spec::DEFAULT_EMA_DECAY,
            clip: None,
        }
    }
}

/// One reward model's part in a stage's combined reward (proto
/// `RewardConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardSpec {
    /// Reward model name, the key of `Rollout.scores`.
    pub model: String,
    /// Weight in the combined reward; 0 logs the reward without optimising
    /// it.
    pub weight: f64,
    /// How its raw scores are normalised.
    pub normalization: Normalization,
}

/// Checks a stage's reward specs; errors name the offending reward and key.
pub fn validate_rewards(specs: &[RewardSpec]) -> Result<(), LearnerError> {
    if specs.is_empty() {
        return Err(LearnerError::Config(
            "rewards: at least one is needed".into(),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for spec in specs {
        let name = &spec.model;
        if !seen.insert(name.as_str()) {
            return Err(LearnerError::Config(format!(
                "rewards[{name}]: listed twice"
            )));
        }
        if !spec.weight.is_finite() {
            return Err(LearnerError::Config(format!(
                "rewards[{name}].weight: must be finite, got {}",
                spec.weight
            )));
        }
        let n = &spec.normalization;
        if !(0.0..1.0).contains(&n.ema_decay) {
            return Err(LearnerError::Config(format!(
                "rewards[{name}].normalization.ema_decay: must be in [0, 1), got {}",
                n.ema_decay
            )));
        }
        if let Some(clip) = n.clip
            && !(clip.is_finite() && clip > 0.0)
        {
            return Err(LearnerError::Config(format!(
                "rewards[{name}].normalization.clip: must be > 0, got {clip}"
            )));
        }
    }
    if specs.iter().all(|s| s.weight == 0.0) {
        return Err(LearnerError::Config(
            "rewards: at least one weight must be non-zero".into(),
        ));
    }
    Ok(())
}

/// Count, mean and population variance of one reward's raw scores over a
/// batch (or a shard of one). Also what `MetricPoint.rewards` reports.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct BatchStats {
    /// Number of scores.
    pub count: u64,
    /// Their mean (0 when `count` is 0).
    pub mean: f64,
    /// Their population variance, sum of squared deviations over `count`.
    pub var: f64,
}

impl BatchStats {
    /// Statistics of `scores` (two passes, for accuracy).
    pub fn from_scores(scores: &[f64]) -> Self {
        if scores.is_empty() {
            return Self::default();
        }
        let n = scores.len() as f64;
        let mean = scores.iter().sum::<f64>() / n;
        let var = scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Self {
            count: scores.len() as u64,
            mean,
            var,
        }
    }

    /// Statistics of the union of two disjoint shards (Chan et al.'s
    /// pairwise update), so ranks that each hold part of a batch can agree
    /// on the statistics of the whole.
    pub fn merge(&self, other: &Self) -> Self {
        if self.count == 0 {
            return *other;
        }
        if other.count == 0 {
            return *self;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        let delta = other.mean - self.mean;
        let mean = self.mean + delta * nb / n;
        let m2 = self.var * na + other.var * nb + delta * delta * na * nb / n;
        Self {
            count: self.count + other.count,
            mean,
            var: m2 / n,
        }
    }

    /// Population standard deviation.
    pub fn std(&self) -> f64 {
        self.var.sqrt()
    }
}

/// Running statistics of one reward in one stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunningStats {
    /// Exponential moving mean of the raw scores.
    pub mean: f64,
    /// Exponential moving variance (see the module doc).
    pub var: f64,
    /// Learner steps folded in so far.
    pub updates: u64,
}

impl RunningStats {
    /// Folds in one step's batch statistics with decay `decay`.
    fn update(&mut self, batch: &BatchStats, decay: f64) {
        let delta = self.mean - batch.mean;
        self.mean = decay * self.mean + (1.0 - decay) * batch.mean;
        self.var =
            decay * self.var + (1.0 - decay) * batch.var + decay * (1.0 - decay) * delta * delta;
        self.updates += 1;
    }
}

/// The combined rewards of a batch, with the raw statistics behind them.
#[derive(Debug, Clone, PartialEq)]
pub struct Combined {
    /// One combined reward per rollout, in batch order.
    pub rewards: Vec<f64>,
    /// Raw score statistics of the batch by reward model name
    /// (`MetricPoint.rewards`).
    pub raw: BTreeMap<String, BatchStats>,
}

/// Per-stage, per-reward running statistics; see the module doc.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardNormalizer {
    /// stage name -> reward model name -> statistics. Nested maps rather
    /// than a tuple key so that the state serialises as a JSON object.
    stages: BTreeMap<String, BTreeMap<String, RunningStats>>,
}

impl RewardNormalizer {
    /// A normaliser with no statistics yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The running statistics of `model` in `stage`, once it has some.
    pub fn stats(&self, stage: &str, model: &str) -> Option<&RunningStats> {
        self.stages.get(stage)?.get(model)
    }

    /// Folds one learner step's batch statistics of `spec`'s reward into
    /// the running statistics of `stage`. Call it once per step per reward,
    /// with the statistics of the whole global batch (merge shards with
    /// [`BatchStats::merge`] first). A no-op for
    /// [`NormalizationKind::None`] and for an empty batch.
    pub fn update(&mut self, stage: &str, spec: &RewardSpec, batch: &BatchStats) {
        if spec.normalization.kind == NormalizationKind::None || batch.count == 0 {
            return;
        }
        let per_stage = self.stages.entry(stage.to_owned()).or_default();
        match per_stage.get_mut(&spec.model) {
            Some(stats) => stats.update(batch, spec.normalization.ema_decay),
            None => {
                per_stage.insert(
                    spec.model.clone(),
                    RunningStats {
                        mean: batch.mean,
                        var: batch.var,
                        updates: 1,
                    },
                );
            }
        }
    }

    /// The normalised value of one `score` of `spec`'s reward in `stage`:
    /// a raw score, or for [`NormalizationKind::GroupZScore`] its deviation
    /// from its group's mean (what [`Self::prepared`] gives). Fails for a
    /// z-score whose statistics have not been updated yet: normalising
    /// against no statistics would silently use the raw scale.
    pub fn normalize(
        &self,
        stage: &str,
        spec: &RewardSpec,
        score: f64,
    ) -> Result<f64, LearnerError> {
        let n = &spec.normalization;
        let z = match n.kind {
            NormalizationKind::None => score,
            NormalizationKind::RunningZScore | NormalizationKind::GroupZScore => {
                let stats = self.stats(stage, &spec.model).ok_or_else(|| {
                    LearnerError::Config(format!(
                        "normalizer: no statistics for reward {} in stage {stage}; update before normalising",
                        spec.model
                    ))
                })?;
                (score - stats.mean) / (stats.var + VARIANCE_EPSILON).sqrt()
            }
        };
        Ok(match n.clip {
            Some(c) => z.clamp(-c, c),
            None => z,
        })
    }

    /// Raw statistics per reward of a batch whose rollout `i` has raw
    /// scores `scores[i]` (reward model name -> value). Fails, naming the
    /// rollout and the reward, if a score is missing or not finite.
    pub fn batch_stats(
        specs: &[RewardSpec],
        scores: &[HashMap<String, f64>],
    ) -> Result<BTreeMap<String, BatchStats>, LearnerError> {
        specs
            .iter()
            .map(|spec| {
                let column = column(spec, scores)?;
                Ok((spec.model.clone(), BatchStats::from_scores(&column)))
            })
            .collect()
    }

    /// The scores of `spec`'s reward as its normaliser sees them: raw, or
    /// for [`NormalizationKind::GroupZScore`] each minus the mean of its
    /// group (`scores` holds consecutive groups of `group_size`). Fails,
    /// naming the rollout, if a score is missing or not finite, or if the
    /// batch does not split into whole groups.
    pub fn prepared(
        spec: &RewardSpec,
        scores: &[HashMap<String, f64>],
        group_size: usize,
    ) -> Result<Vec<f64>, LearnerError> {
        let mut xs = column(spec, scores)?;
        if spec.normalization.kind == NormalizationKind::GroupZScore {
            if group_size == 0 || !xs.len().is_multiple_of(group_size) {
                return Err(LearnerError::InvalidBatch(format!(
                    "rewards[{}]: {} rollouts do not split into whole groups of {group_size}",
                    spec.model,
                    xs.len()
                )));
            }
            for group in xs.chunks_exact_mut(group_size) {
                let mean = group.iter().sum::<f64>() / group_size as f64;
                for x in group {
                    *x -= mean;
                }
            }
        }
        Ok(xs)
    }

    /// Statistics per reward of the scores its normaliser sees
    /// ([`Self::prepared`]): what [`Self::update`] folds in. The raw
    /// scores' for every kind but [`NormalizationKind::GroupZScore`].
    pub fn normalizer_stats(
        specs: &[RewardSpec],
        scores: &[HashMap<String, f64>],
        group_size: usize,
    ) -> Result<BTreeMap<String, BatchStats>, LearnerError> {
        specs
            .iter()
            .map(|spec| {
                let xs = Self::prepared(spec, scores, group_size)?;
                Ok((spec.model.clone(), BatchStats::from_scores(&xs)))
            })
            .collect()
    }

    /// Combined reward per rollout, `sum_k weight_k * normalize(score_k)`,
    /// against the current statistics (no update); `scores` holds
    /// consecutive groups of `group_size`. For ranks that hold a shard of
    /// the batch (whole groups): merge [`Self::normalizer_stats`] over
    /// ranks, [`Self::update`], then call this on the local shard.
    pub fn combined(
        &self,
        stage: &str,
        specs: &[RewardSpec],
        scores: &[HashMap<String, f64>],
        group_size: usize,
    ) -> Result<Vec<f64>, LearnerError> {
        let mut combined = vec![0.0; scores.len()];
        for spec in specs {
            // A zero weight contributes nothing but its score is still
            // required and checked: it is logged, and must be valid.
            let xs = Self::prepared(spec, scores, group_size)?;
            for (c, x) in combined.iter_mut().zip(xs) {
                *c += spec.weight * self.normalize(stage, spec, x)?;
            }
        }
        Ok(combined)
    }

    /// One learner step's reward combination over the whole batch
    /// (consecutive groups of `group_size`): statistics, one update of the
    /// running statistics, then the combined reward of every rollout.
    pub fn combine(
        &mut self,
        stage: &str,
        specs: &[RewardSpec],
        scores: &[HashMap<String, f64>],
        group_size: usize,
    ) -> Result<Combined, LearnerError> {
        let raw = Self::batch_stats(specs, scores)?;
        let seen = Self::normalizer_stats(specs, scores, group_size)?;
        for spec in specs {
            self.update(stage, spec, &seen[&spec.model]);
        }
        let rewards = self.combined(stage, specs, scores, group_size)?;
        Ok(Combined { rewards, raw })
    }
}

/// The raw scores of `spec`'s reward over the batch, validated.
fn column(spec: &RewardSpec, scores: &[HashMap<String, f64>]) -> Result<Vec<f64>, LearnerError> {
    scores
        .iter()
        .enumerate()
        .map(|(i, row)| match row.get(&spec.model) {
            Some(x) if x.is_finite() => Ok(*x),
            Some(x) => Err(LearnerError::InvalidBatch(format!(
                "rollouts[{i}].scores[{}]: not finite ({x})",
                spec.model
            ))),
            None => Err(LearnerError::InvalidBatch(format!(
                "rollouts[{i}].scores[{}]: missing",
                spec.model
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        model: &str,
        weight: f64,
        kind: NormalizationKind,
        decay: f64,
        clip: Option<f64>,
    ) -> RewardSpec {
        RewardSpec {
            model: model.into(),
            weight,
            normalization: Normalization {
                kind,
                ema_decay: decay,
                clip,
            },
        }
    }

    fn rows(model: &str, xs: &[f64]) -> Vec<HashMap<String, f64>> {
        xs.iter()
            .map(|&x| HashMap::from([(model.to_owned(), x)]))
            .collect()
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    #[test]
    fn batch_stats_by_hand_and_merge_matches_concatenation() {
        let s = BatchStats::from_scores(&[1.0, 2.0, 3.0]);
        assert_eq!(s.count, 3);
        close(s.mean, 2.0);
        close(s.var, 2.0 / 3.0);
        let a = BatchStats::from_scores(&[1.0, 2.0, 3.0, 10.0]);
        let b = BatchStats::from_scores(&[-4.0, 0.5]);
        let whole = BatchStats::from_scores(&[1.0, 2.0, 3.0, 10.0, -4.0, 0.5]);
        let merged = a.merge(&b);
        assert_eq!(merged.count, 6);
        close(merged.mean, whole.mean);
        close(merged.var, whole.var);
        assert_eq!(BatchStats::default().merge(&a), a);
    }

    #[test]
    fn first_step_initialises_then_ema_mixes_mean_and_variance() {
        let s = spec("q", 1.0, NormalizationKind::RunningZScore, 0.5, None);
        let mut n = RewardNormalizer::new();
        // Step 1, batch [1, 2, 3]: mu = 2, s2 = 2/3, z(3) = 1 / sqrt(2/3).
        let c = n
            .combine(
                "R",
                std::slice::from_ref(&s),
                &rows("q", &[1.0, 2.0, 3.0]),
                1,
            )
            .unwrap();
        let st = n.stats("R", "q").unwrap();
        close(st.mean, 2.0);
        close(st.var, 2.0 / 3.0);
        assert_eq!(st.updates, 1);
        let z3 = 1.0 / (2.0f64 / 3.0 + 1e-8).sqrt();
        close(c.rewards[0], -z3);
        close(c.rewards[1], 0.0);
        close(c.rewards[2], z3);
        // Step 2, batch [5, 7] (mean 6, var 1), d = 0.5:
        // mu = 0.5*2 + 0.5*6 = 4; s2 = 0.5*(2/3) + 0.5*1 + 0.25*(2-6)^2 = 29/6.
        let c = n.combine("R", &[s], &rows("q", &[5.0, 7.0]), 1).unwrap();
        let st = n.stats("R", "q").unwrap();
        close(st.mean, 4.0);
        close(st.var, 29.0 / 6.0);
        assert_eq!(st.updates, 2);
        close(c.rewards[0], 1.0 / (29.0f64 / 6.0 + 1e-8).sqrt());
        close(c.rewards[1], 3.0 / (29.0f64 / 6.0 + 1e-8).sqrt());
        close(c.raw["q"].mean, 6.0);
        close(c.raw["q"].std(), 1.0);
    }

    #[test]
    fn constant_first_batch_normalises_to_zero() {
        let s = spec("q", 1.0, NormalizationKind::RunningZScore, 0.9, None);
        let mut n = RewardNormalizer::new();
        let c = n.combine("R", &[s], &rows("q", &[4.0, 4.0]), 1).unwrap();
        assert_eq!(c.rewards, vec![0.0, 0.0]);
    }

    #[test]
    fn none_passes_through_and_clip_applies_to_both_kinds() {
        let none = spec("a", 1.0, NormalizationKind::None, 0.99, Some(2.0));
        let mut n = RewardNormalizer::new();
        let c = n
            .combine("R", &[none], &rows("a", &[5.0, -0.5, -3.0]), 1)
            .unwrap();
        assert_eq!(c.rewards, vec![2.0, -0.5, -2.0]);
        assert!(n.stats("R", "a").is_none(), "NONE keeps no statistics");

        // z-scores of [0, 0, 0, 10]: mu = 2.5, s2 = 18.75; z(10) = 1.732..
        let z = spec("b", 1.0, NormalizationKind::RunningZScore, 0.99, Some(1.5));
        let c = n
            .combine("R", &[z], &rows("b", &[0.0, 0.0, 0.0, 10.0]), 1)
            .unwrap();
        close(c.rewards[0], -2.5 / (18.75f64 + 1e-8).sqrt());
        close(c.rewards[3], 1.5);
    }

    #[test]
    fn combine_weights_normalised_scores_per_stage() {
        let a = spec("a", 2.0, NormalizationKind::None, 0.99, None);
        let b = spec("b", -0.5, NormalizationKind::RunningZScore, 0.99, None);
        let scores = vec![
            HashMap::from([("a".to_owned(), 1.0), ("b".to_owned(), 10.0)]),
            HashMap::from([("a".to_owned(), 3.0), ("b".to_owned(), 20.0)]),
        ];
        let mut n = RewardNormalizer::new();
        let c = n.combine("U", &[a, b.clone()], &scores, 1).unwrap();
        // b: mu = 15, s2 = 25, z = -1, +1 (to 1e-9).
        let z = 5.0 / (25.0f64 + 1e-8).sqrt();
        close(c.rewards[0], 2.0 * 1.0 - 0.5 * -z);
        close(c.rewards[1], 2.0 * 3.0 - 0.5 * z);
        // Same model, other stage: separate statistics.
        assert!(n.stats("R", "b").is_none());
        n.update("R", &b, &BatchStats::from_scores(&[0.0, 2.0]));
        close(n.stats("R", "b").unwrap().mean, 1.0);
        close(n.stats("U", "b").unwrap().mean, 15.0);
    }

    #[test]
    fn group_z_scores_weigh_rewards_by_their_spread_within_groups() {
        // Two prompts, K = 2. Adherence differs a lot between the prompts
        // and by 1 within each; quality by 1 within each and not between.
        let scores: Vec<HashMap<String, f64>> = [(0.0, 0.0), (1.0, 1.0), (10.0, 0.0), (11.0, 1.0)]
            .iter()
            .map(|&(a, q)| HashMap::from([("a".to_owned(), a), ("q".to_owned(), q)]))
            .collect();
        let kind = NormalizationKind::GroupZScore;
        let group = [
            spec("a", 1.0, kind, 0.9, None),
            spec("q", 1.0, kind, 0.9, None),
        ];
        let mut n = RewardNormalizer::new();
        let c = n.combine("R", &group, &scores, 2).unwrap();
        // Deviations from the group means: -0.5, 0.5 for both rewards in
        // both groups; their variance 0.25, so z = -1, 1 each.
        let z = 0.5 / (0.25f64 + 1e-8).sqrt();
        for (got, want) in c.rewards.iter().zip([-2.0 * z, 2.0 * z, -2.0 * z, 2.0 * z]) {
            close(*got, want);
        }
        let st = n.stats("R", "a").unwrap();
        close(st.mean, 0.0);
        close(st.var, 0.25);
        // The raw statistics are still reported.
        close(c.raw["a"].mean, 5.5);
        // Both rewards move the advantage equally: with K = 2 each
        // sample's advantage is its reward less the other's, -4z and 4z ...
        let adv = crate::advantage::leave_one_out(&c.rewards, 2).unwrap();
        close(adv[1] - adv[0], 8.0 * z);
        // ... where a running z-score over the batch lets quality swamp
        // adherence: adherence's batch variance is 25.25, quality's 0.25,
        // so a unit step of adherence within a group is worth 1/5.02 of
        // quality's.
        let kind = NormalizationKind::RunningZScore;
        let running = [
            spec("a", 1.0, kind, 0.9, None),
            spec("q", 1.0, kind, 0.9, None),
        ];
        let mut n = RewardNormalizer::new();
        let c = n.combine("R", &running, &scores, 2).unwrap();
        let only_a = n.normalize("R", &running[0], 1.0).unwrap()
            - n.normalize("R", &running[0], 0.0).unwrap();
        let only_q = n.normalize("R", &running[1], 1.0).unwrap()
            - n.normalize("R", &running[1], 0.0).unwrap();
        close(only_a, 1.0 / (25.25f64 + 1e-8).sqrt());
        close(only_q, 1.0 / (0.25f64 + 1e-8).sqrt());
        assert!(c.rewards.iter().all(|r| r.is_finite()));
    }

    #[test]
    fn group_z_scores_need_whole_groups() {
        let s = spec("q", 1.0, NormalizationKind::GroupZScore, 0.9, None);
        let err = RewardNormalizer::new()
            .combine("R", &[s], &rows("q", &[1.0, 2.0, 3.0]), 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rewards[q]") && err.contains("whole groups"),
            "{err}"
        );
    }

    #[test]
    fn missing_or_non_finite_scores_are_named() {
        let s = spec("q", 1.0, NormalizationKind::None, 0.99, None);
        let mut n = RewardNormalizer::new();
        let mut scores = rows("q", &[1.0, 2.0]);
        scores[1].insert("q".into(), f64::NAN);
        let err = n
            .combine("R", std::slice::from_ref(&s), &scores, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rollouts[1].scores[q]") && err.contains("not finite"),
            "{err}"
        );
        scores[1].clear();
        let err = n.combine("R", &[s], &scores, 1).unwrap_err().to_string();
        assert!(err.contains("rollouts[1].scores[q]: missing"), "{err}");
    }

    #[test]
    fn normalising_before_any_update_is_an_error() {
        let s = spec("q", 1.0, NormalizationKind::RunningZScore, 0.99, None);
        let err = RewardNormalizer::new().normalize("R", &s, 1.0).unwrap_err();
        assert!(
            err.to_string().contains("no statistics for reward q"),
            "{err}"
        );
    }

    #[test]
    fn state_round_trips_through_json() {
        let s = spec("q", 1.0, NormalizationKind::RunningZScore, 0.9, None);
        let mut n = RewardNormalizer::new();
        n.combine(
            "R",
            std::slice::from_ref(&s),
            &rows("q", &[0.1, 0.7, 0.3]),
            1,
        )
        .unwrap();
        n.combine("R", &[s], &rows("q", &[0.9, 0.2]), 1).unwrap();
        let json = serde_json::to_string(&n).unwrap();
        let back: RewardNormalizer = serde_json::from_str(&json).unwrap();
        assert_eq!(back, n);
        assert!(json.contains("\"R\"") && json.contains("\"q\""), "{json}");
    }

    #[test]
    fn validate_names_the_bad_key() {
        let ok = spec("q", 1.0, NormalizationKind::RunningZScore, 0.99, None);
        validate_rewards(std::slice::from_ref(&ok)).unwrap();
        let mut bad = ok.clone();
        bad.normalization.ema_decay = 1.0;
        let err = validate_rewards(&[bad]).unwrap_err().to_string();
        assert!(err.contains("rewards[q].normalization.ema_decay"), "{err}");
        let mut bad = ok.clone();
        bad.normalization.clip = Some(0.0);
        assert!(
            validate_rewards(&[bad])
                .unwrap_err()
                .to_string()
                .contains("clip")
        );
        let mut zero = ok.clone();
        zero.weight = 0.0;
        assert!(validate_rewards(&[zero]).is_err());
        assert!(
            validate_rewards(&[ok.clone(), ok])
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }
}

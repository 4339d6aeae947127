//! Batched sampling with a KV cache: what actors run to produce rollouts.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{ModelError, Policy};

/// How to turn the policy's next-token distribution into a choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 1.0 samples from the policy itself.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (`None`: all).
    pub top_p: Option<f32>,
    /// Seed of the sampler's random stream: same seed, same clips.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the parameters; errors name the offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(ModelError::Config(format!(
                "temperature: must be a positive number, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(ModelError::Config("top_k: must be at least 1".into()));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ModelError::Config(format!(
                "top_p: must be in (0, 1], got {p}"
            )));
        }
        Ok(())
    }

    /// True when the sampler draws from the untruncated policy at
    /// temperature 1, so the returned log-probs are the behaviour policy's.
    pub fn is_exact(&self) -> bool {
        self.temperature == 1.0 && self.top_k.is_none() && self.top_p.is_none()
    }
}

/// Clips drawn from the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    /// One token sequence per row of the batch.
    pub tokens: Vec<Vec<u32>>,
    /// Behaviour log-probabilities: the log-probability of each chosen token
    /// under the distribution actually sampled from (after temperature, top-k
    /// and top-p), as `Rollout.behaviour_log_probs` carries them. With
    /// [`SamplingParams::is_exact`] they equal what [`Policy::log_probs`]
    /// recomputes by teacher forcing.
    pub log_probs: Vec<Vec<f32>>,
}

/// Samples `frames` tokens for each caption embedding in `text`
/// (`[b, text_dim]`), all rows in one batch, one forward step per frame.
pub fn sample(
    policy: &Policy,
    text: &Tensor,
    frames: usize,
    params: &SamplingParams,
) -> Result<Samples, ModelError> {
    params.validate()?;
    let max = policy.config().max_frames;
    if frames == 0 || frames > max {
        return Err(ModelError::Shape(format!(
            "frames: {frames} outside 1..={max}"
        )));
    }
    let b = text.dim(0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let mut tokens = vec![Vec::with_capacity(frames); b];
    let mut log_probs = vec![Vec::with_capacity(frames); b];
    let (mut logits, mut cache) = policy.start(text)?;
    for t in 0..frames {
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut chosen = Vec::with_capacity(b);
        for (i, row) in rows.iter().enumerate() {
            let (id, log_prob) = choose(row, params, &mut rng);
            log_probs[i].push(log_prob);
            tokens[i].push(id as u32);
            chosen.push(id as u32);
        }
        if t + 1 < frames {
            let next = Tensor::from_vec(chosen, b, policy.device())?;
            logits = policy.step(&next, &mut cache)?;
        }
    }
    Ok(Samples { tokens, log_probs })
}

/// `log softmax(logits)[id]`, computed stably.
pub fn log_softmax_at(logits: &[f32], id: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    logits[id] - max - sum.ln()
}

/// Draws one index from `logits` under `params`; returns it with its
/// log-probability under the distribution actually sampled from (after
/// temperature and truncation). Every policy's sampler draws through it.
pub fn choose(logits: &[f32], params: &SamplingParams, rng: &mut impl Rng) -> (usize, f32) {
    let inv_t = 1.0 / params.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let scaled = |l: f32| (l - max) * inv_t;
    let (ids, weights): (Option<Vec<usize>>, Vec<f32>) =
        if params.top_k.is_none() && params.top_p.is_none() {
            (None, logits.iter().map(|&l| scaled(l).exp()).collect())
        } else {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            // Highest logit first, ties by index: a total order, so the top
            // k are one set, found in linear time before only they are
            // sorted (MusicGen's top-250 of 2048 codes, four codebooks a
            // clip, every step).
            let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
            if let Some(k) = params.top_k.filter(|&k| k > 0 && k < order.len()) {
                order.select_nth_unstable_by(k - 1, by_logit);
                order.truncate(k);
            }
            order.sort_unstable_by(by_logit);
            let mut weights: Vec<f32> = order.iter().map(|&i| scaled(logits[i]).exp()).collect();
            if let Some(p) = params.top_p {
                let total: f32 = weights.iter().sum();
                let mut cumulative = 0.0;
                let mut keep = weights.len();
                for (n, w) in weights.iter().enumerate() {
                    cumulative += w / total;
                    if cumulative >= p {
                        keep = n + 1;
                        break;
                    }
                }
                weights.truncate(keep);
                order.truncate(keep);
            }
            (Some(order), weights)
        };
    let total: f32 = weights.iter().sum();
    let j = draw(&weights, total, rng);
    let id = ids.as_ref().map_or(j, |ids| ids[j]);
    (id, scaled(logits[id]) - total.ln())
}

/// Picks `j` with probability `weights[j] / total`.
fn draw(weights: &[f32], total: f32, rng: &mut impl Rng) -> usize {
    let mut u = rng.random::<f32>() * total;
    for (j, w) in weights.iter().enumerate() {
        if u < *w {
            return j;
        }
        u -= w;
    }
    // Rounding can leave `u` a hair above the last weight.
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1, 3.0, -1.0, 2.9];
        let params = SamplingParams {
            top_k: Some(1),
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(choose(&logits, &params, &mut rng), (1, 0.0));
        }
    }

    #[test]
    fn top_k_draws_what_a_full_sort_would() {
        // The reference: sort every logit (highest first, ties by index),
        // keep k, draw. Logits with many ties, and k at the edges.
        let reference = |logits: &[f32], k: usize, rng: &mut ChaCha8Rng| {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            order.truncate(k);
            let max = logits[order[0]];
            let weights: Vec<f32> = order.iter().map(|&i| (logits[i] - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            let j = draw(&weights, total, rng);
            (order[j], logits[order[j]] - max - total.ln())
        };
        let mut source = ChaCha8Rng::seed_from_u64(4);
        for case in 0..200 {
            let n = 1 + case % 97;
            let logits: Vec<f32> = (0..n)
                .map(|_| (source.random::<f32>() * 8.0).round() / 2.0)
                .collect();
            for k in [1, 2, n / 2 + 1, n, n + 3] {
                let params = SamplingParams {
                    top_k: Some(k),
                    ..Default::default()
                };
                let (mut a, mut b) = (
                    ChaCha8Rng::seed_from_u64(case as u64),
                    ChaCha8Rng::seed_from_u64(case as u64),
                );
                for _ in 0..5 {
                    let got = choose(&logits, &params, &mut a);
                    let want = reference(&logits, k.min(n), &mut b);
                    assert_eq!(got.0, want.0, "n {n} k {k}");
                    assert!((got.1 - want.1).abs() < 1e-6, "n {n} k {k}");
                }
            }
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: p = 0.8 keeps the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let params = SamplingParams {
            top_p: Some(0.8),
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut seen = [0; 4];
        for _ in 0..2000 {
            seen[choose(&logits, &params, &mut rng).0] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[0] > seen[1] && seen[1] > 0, "{seen:?}");
    }

    #[test]
    fn full_sampling_matches_the_distribution() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()]; // 1:2:3
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut seen = [0f64; 3];
        let n = 30_000;
        for _ in 0..n {
            seen[choose(&logits, &SamplingParams::default(), &mut rng).0] += 1.0;
        }
        for (i, expected) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            assert!((seen[i] / n as f64 - expected).abs() < 0.015, "{seen:?}");
        }
    }

    #[test]
    fn behaviour_log_probs_follow_the_truncated_distribution() {
        // p = [0.1, 0.2, 0.3, 0.4]; top-2 keeps {3, 2}, renormalised to 4/7, 3/7.
        let logits: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
        let params = SamplingParams {
            top_k: Some(2),
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..50 {
            let (id, lp) = choose(&logits, &params, &mut rng);
            let expected = if id == 3 {
                (4.0f32 / 7.0).ln()
            } else {
                (3.0f32 / 7.0).ln()
            };
            assert!(id >= 2 && (lp - expected).abs() < 1e-5, "{id} {lp}");
        }
        // At temperature 1 without truncation they are the policy's log-softmax.
        let (id, lp) = choose(&logits, &SamplingParams::default(), &mut rng);
        assert!((lp - log_softmax_at(&logits, id)).abs() < 1e-5);
    }

    #[test]
    fn log_softmax_at_is_normalised() {
        let logits = [1.0f32, -2.0, 0.5, 4.0];
        let total: f32 = (0..4).map(|i| log_softmax_at(&logits, i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bad_params_name_the_field() {
        let bad = SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
        let bad = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
    }
}

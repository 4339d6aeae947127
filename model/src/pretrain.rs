//! Pretraining the base policy on the procedural corpus: next-token
//! cross-entropy, AdamW with warm-up and cosine decay, gradient clipping,
//! periodic held-out evaluation and checkpoints.
//!
//! The result is the frozen reference policy that RL fine-tunes and the KL
//! term is measured against.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use encore_corpus::{Corpus, Example, Split};
use serde::{Deserialize, Serialize};

use crate::{ModelError, Policy, Preset, TrainablePolicy, embed_captions};

/// Everything `encore pretrain` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Model size.
    pub preset: Preset,
    /// Optimiser steps.
    pub steps: usize,
    /// Clips per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Steps of linear warm-up before the cosine decay.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value.
    pub grad_clip: f64,
    /// Sequence-length warm-up: the first `short_fraction` of the steps train
    /// on the first `short_frames` frames of each clip, with proportionally
    /// more clips per batch (the same tokens per step). What a prompt asks
    /// for is decided once per clip, so short clips early teach the policy to
    /// follow prompts from many more clips per second; the full-length steps
    /// after them teach long-range structure. 0 turns it off.
    pub short_frames: usize,
    /// Fraction of the steps run at `short_frames`.
    pub short_fraction: f64,
    /// Evaluate on held-out clips every this many steps (and at the end).
    pub eval_every: usize,
    /// Number of held-out clips in each evaluation.
    pub eval_examples: usize,
    /// Write a checkpoint every this many steps (and at the end); 0: only at the end.
    pub checkpoint_every: usize,
    /// Seed of the corpus.
    pub corpus_seed: u64,
    /// Seed of the weight initialisation.
    pub init_seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            preset: Preset::Small,
            steps: 600,
            batch_size: 8,
            learning_rate: 3e-3,
            warmup_steps: 50,
            weight_decay: 0.01,
            grad_clip: 1.0,
            short_frames: 64,
            short_fraction: 0.6,
            eval_every: 100,
            eval_examples: 32,
            checkpoint_every: 100,
            corpus_seed: 7,
            init_seed: 1,
            device: "cpu".into(),
        }
    }
}

impl PretrainConfig {
    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (key, value) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("eval_every", self.eval_every),
            ("eval_examples", self.eval_examples),
        ] {
            if value == 0 {
                return Err(ModelError::Config(format!("{key}: must be positive")));
            }
        }
        for (key, value) in [
            ("learning_rate", self.learning_rate),
            ("grad_clip", self.grad_clip),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ModelError::Config(format!(
                    "{key}: must be a positive number"
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.short_fraction) {
            return Err(ModelError::Config(
                "short_fraction: must be in [0, 1]".into(),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(ModelError::Config("weight_decay: must be >= 0".into()));
        }
        Ok(())
    }

    /// Clip length and clips per batch at `step` for clips of `frames` frames.
    pub fn shape_at(&self, step: usize, frames: usize) -> (usize, usize) {
        let short_steps = (self.steps as f64 * self.short_fraction).round() as usize;
        if self.short_frames > 0 && self.short_frames < frames && step < short_steps {
            let batch = (self.batch_size * frames).div_ceil(self.short_frames);
            (self.short_frames, batch)
        } else {
            (frames, self.batch_size)
        }
    }

    /// Learning rate at `step` (0-based): linear warm-up, then cosine decay
    /// to a tenth of the peak.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = 0.1;
        self.learning_rate
            * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }
}

/// One progress report, sent after every step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// Steps in the run.
    pub steps: usize,
    /// Training loss of the step, nats per token.
    pub loss: f64,
    /// Learning rate used for the step.
    pub learning_rate: f64,
    /// Training tokens per second so far.
    pub tokens_per_second: f64,
    /// Held-out loss, when this step evaluated.
    pub eval_loss: Option<f64>,
    /// Where a checkpoint was written, when this step wrote one.
    pub checkpoint: Option<PathBuf>,
}

/// What a pretraining run achieved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainReport {
    /// Steps run.
    pub steps: usize,
    /// Held-out loss (nats per token) by step.
    pub eval_history: Vec<(usize, f64)>,
    /// Entropy of the held-out clips' token frequencies: the loss of the best
    /// model that ignores context (the unigram baseline).
    pub unigram_entropy: f64,
    /// Final held-out loss.
    pub final_eval_loss: f64,
    /// Training throughput, tokens per second.
    pub tokens_per_second: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Caption embeddings and token ids for a batch of examples.
pub fn batch_tensors(
    examples: &[Example],
    device: &Device,
) -> Result<(Tensor, Tensor), ModelError> {
    let captions: Vec<&str> = examples.iter().map(|e| e.caption.as_str()).collect();
    let text = embed_captions(&captions, device)?;
    let frames = examples.first().map_or(0, |e| e.tokens.len());
    let mut ids = Vec::with_capacity(examples.len() * frames);
    for e in examples {
        if e.tokens.len() != frames {
            return Err(ModelError::Shape(format!(
                "tokens: example {} has {} frames, the batch {frames}",
                e.index,
                e.tokens.len()
            )));
        }
        ids.extend_from_slice(&e.tokens);
    }
    let tokens = Tensor::from_vec(ids, (examples.len(), frames), device)?;
    Ok((tokens, text))
}

/// Mean next-token loss of `policy` on `examples`, in batches of `batch`.
pub fn evaluate(policy: &Policy, examples: &[Example], batch: usize) -> Result<f64, ModelError> {
    let mut total = 0.0;
    let mut count = 0usize;
    for chunk in examples.chunks(batch.max(1)) {
        let (tokens, text) = batch_tensors(chunk, policy.device())?;
        let loss = policy.loss(&tokens, &text)?.to_scalar::<f32>()? as f64;
        total += loss * chunk.len() as f64;
        count += chunk.len();
    }
    Ok(total / count.max(1) as f64)
}

/// Scales the gradients in `grads` so that their global L2 norm is at most
/// `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[candle_core::Var],
    max_norm: f64,
) -> Result<f64, ModelError> {
    let mut sum = 0.0f64;
    for var in vars {
        if let Some(g) = grads.get(var) {
            sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sum.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for var in vars {
            if let Some(g) = grads.remove(var) {
                grads.insert(var, (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Pretrains a policy of `cfg.preset` on the corpus and writes checkpoints to
/// `out`. `on_progress` is called after every step.
pub fn pretrain(
    cfg: &PretrainConfig,
    out: &Path,
    mut on_progress: impl FnMut(&Progress),
) -> Result<PretrainReport, ModelError> {
    cfg.validate()?;
    let device = crate::device(&cfg.device)?;
    let policy_cfg = cfg.preset.config();
    let frames = policy_cfg.max_frames;
    let model = TrainablePolicy::fresh(&policy_cfg, &device, cfg.init_seed)?;
    let corpus = Corpus::new(cfg.corpus_seed, frames);
    let eval_set = corpus.batch(Split::Eval, 0, cfg.eval_examples);
    let unigram_entropy = encore_corpus::unigram_entropy(&eval_set);

    let vars = model.vars.all_vars();
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: cfg.learning_rate,
            weight_decay: cfg.weight_decay,
            beta2: 0.99,
            ..Default::default()
        },
    )?;

    let started = Instant::now();
    let mut eval_history = Vec::new();
    let mut next_example = 0u64;
    let mut tokens_seen = 0usize;
    for step in 0..cfg.steps {
        let (length, batch) = cfg.shape_at(step, frames);
        let mut examples = corpus.batch(Split::Train, next_example, batch);
        next_example += batch as u64;
        for e in &mut examples {
            e.tokens.truncate(length);
        }
        tokens_seen += batch * length;
        let (tokens, text) = batch_tensors(&examples, &device)?;
        let loss = model.policy.loss(&tokens, &text)?;
        let mut grads = loss.backward()?;
        clip_grad_norm(&mut grads, &vars, cfg.grad_clip)?;
        let lr = cfg.learning_rate_at(step);
        opt.set_learning_rate(lr);
        opt.step(&grads)?;
        let loss = loss.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            return Err(ModelError::Config(format!(
                "learning_rate: training diverged at step {step} (loss {loss}); lower it"
            )));
        }

        let done = step + 1;
        let last = done == cfg.steps;
        let eval_loss = if done % cfg.eval_every == 0 || last {
            let l = evaluate(&model.policy, &eval_set, cfg.batch_size)?;
            eval_history.push((done, l));
            Some(l)
        } else {
            None
        };
        let checkpoint = if last || (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) {
            let metadata = serde_json::json!({
                "kind": "pretrained",
                "step": done,
                "preset": cfg.preset.name(),
                "corpus_seed": cfg.corpus_seed,
                "eval_loss": eval_history.last().map(|e| e.1),
                "unigram_entropy": unigram_entropy,
            });
            model.save(out, metadata)?;
            Some(out.to_path_buf())
        } else {
            None
        };
        let elapsed = started.elapsed().as_secs_f64();
        on_progress(&Progress {
            step: done,
            steps: cfg.steps,
            loss,
            learning_rate: lr,
            tokens_per_second: tokens_seen as f64 / elapsed.max(1e-9),
            eval_loss,
            checkpoint,
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    let final_eval_loss = eval_history.last().map_or(f64::NAN, |e| e.1);
    Ok(PretrainReport {
        steps: cfg.steps,
        eval_history,
        unigram_entropy,
        final_eval_loss,
        tokens_per_second: tokens_seen as f64 / seconds.max(1e-9),
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = PretrainConfig {
            steps: 100,
            warmup_steps: 10,
            learning_rate: 1.0,
            ..Default::default()
        };
        assert!((cfg.learning_rate_at(0) - 0.1).abs() < 1e-12);
        assert!((cfg.learning_rate_at(9) - 1.0).abs() < 1e-12);
        assert!((cfg.learning_rate_at(10) - 1.0).abs() < 1e-12);
        assert!((cfg.learning_rate_at(100) - 0.1).abs() < 1e-12);
        assert!(cfg.learning_rate_at(50) < cfg.learning_rate_at(20));
    }

    #[test]
    fn short_warm_up_keeps_tokens_per_step() {
        let cfg = PretrainConfig {
            steps: 10,
            batch_size: 8,
            short_frames: 64,
            short_fraction: 0.6,
            ..Default::default()
        };
        assert_eq!(cfg.shape_at(0, 256), (64, 32));
        assert_eq!(cfg.shape_at(5, 256), (64, 32));
        assert_eq!(cfg.shape_at(6, 256), (256, 8));
        // Clips no longer than the warm-up length train at full length.
        assert_eq!(cfg.shape_at(0, 64), (64, 8));
    }

    #[test]
    fn validation_names_the_key() {
        let cfg = PretrainConfig {
            batch_size: 0,
            ..Default::default()
        };
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("batch_size")
        );
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let a = candle_core::Var::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
        let b = candle_core::Var::new(&[4.0f32], &Device::Cpu).unwrap();
        // loss = 0.5 * |a|^2 + 0.5 * |b|^2, so the gradient is (a, b) with norm 5.
        let loss = ((a.as_tensor().sqr().unwrap().sum_all().unwrap()
            + b.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap()
            * 0.5)
            .unwrap();
        let mut grads = loss.backward().unwrap();
        let vars = vec![a.clone(), b.clone()];
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-5);
        let ga = grads.get(&a).unwrap().to_vec1::<f32>().unwrap();
        let gb = grads.get(&b).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (ga[0] - 0.6).abs() < 1e-4 && (gb[0] - 0.8).abs() < 1e-4,
            "{ga:?} {gb:?}"
        );
    }
}

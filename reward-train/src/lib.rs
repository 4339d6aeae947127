//! Training Encore's reward models (`encore-reward`) on the JSONL datasets of
//! `encore-raters`, with held-out evaluation. The reward server links the
//! models only; training, and the simulated raters its ceilings need, live
//! here.
//!
//! - adherence: symmetric InfoNCE over (caption, clip) pairs with a learned
//!   temperature; captions repeated inside a batch are not counted as
//!   negatives of each other. Held out: text-to-audio recall@1 and @5,
//!   against chance and against an attribute oracle.
//! - quality: mean squared error to each clip's MOS (the mean of its
//!   ratings). Held out: Spearman and Pearson correlation, MSE, against the
//!   correlation of the raters' latent quality with the same MOS.
//! - preference: Bradley-Terry likelihood of the choices (a tie counts as
//!   half a win each way, skips are dropped). Held out: accuracy on decided
//!   pairs, against the Bayes-optimal accuracy given the rater population.
//!
//! The held-out split is a pure function of each record's id (or position
//! for clips) and the seed, so it is the same on every run. [`heldout`]
//! computes the figures.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use encore_raters::records::{Choice, ClipRecord, PreferenceRecord, RatingRecord};
use encore_raters::stats::{pearson, spearman};
use encore_reward::{
    ArchConfig, Clip, Features, Frontend, FrontendConfig, RewardConfig, RewardError, RewardKind,
    RewardModel, ScoreInput,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod heldout;

use heldout::{mse, oracle_recall_at_k, pairwise_accuracy, recall_at_k};

/// Everything that can go wrong while training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A training setting is invalid; the message names the key.
    #[error("invalid config: {0}")]
    Config(String),
    /// The data cannot be trained on (too few examples), or training
    /// diverged.
    #[error("invalid input: {0}")]
    Input(String),
    /// The reward model failed (features, scoring, checkpoints).
    #[error(transparent)]
    Reward(#[from] RewardError),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Clips measured to set the front end's normalisation.
const STATS_CLIPS: usize = 256;

/// Training settings (section `[reward_train]` of a config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training split.
    pub epochs: usize,
    /// Examples per step (clips, or pairs for preference).
    pub batch_size: usize,
    /// Peak AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup_steps: usize,
    /// Global gradient-norm bound.
    pub grad_clip: f64,
    /// Fraction of the records held out for evaluation.
    pub eval_fraction: f64,
    /// Fraction of the training records set aside to pick the best epoch.
    pub validation_fraction: f64,
    /// Most held-out clips in the retrieval set (adherence).
    pub max_eval_clips: usize,
    /// Seed of initialisation, shuffling and the split.
    pub seed: u64,
    /// Network shape.
    pub arch: ArchConfig,
    /// Start the audio tower (and its front-end statistics) from another
    /// reward checkpoint of the same shape, for example the quality model
    /// when training the preference model: a pretrained audio encoder, as
    /// reward models are usually built on. `None` starts from scratch.
    pub init_audio: Option<std::path::PathBuf>,
    /// For the preference ceiling of simulated data: the seed of the rater
    /// population that labelled it.
    pub population_seed: u64,
    /// For the preference ceiling: the size of the rater pool.
    pub raters: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 6,
            batch_size: 32,
            learning_rate: 2e-3,
            weight_decay: 0.01,
            warmup_steps: 30,
            grad_clip: 1.0,
            eval_fraction: 0.1,
            validation_fraction: 0.1,
            max_eval_clips: 1000,
            seed: 0,
            arch: ArchConfig::default(),
            init_audio: None,
            population_seed: 0,
            raters: 100,
        }
    }
}

impl TrainConfig {
    /// A small model and short schedule that learn something real from a
    /// few hundred clips in seconds: for tests and smoke runs.
    pub fn small() -> TrainConfig {
        TrainConfig {
            epochs: 4,
            batch_size: 16,
            learning_rate: 3e-3,
            warmup_steps: 5,
            eval_fraction: 0.2,
            arch: ArchConfig {
                channels: 24,
                dilations: vec![1, 2, 4],
                embed_dim: 32,
                hidden: 32,
                ..ArchConfig::default()
            },
            ..TrainConfig::default()
        }
    }

    /// Checks the settings; errors name the key.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad =
            |key: &str, why: &str| Err(TrainError::Config(format!("reward_train.{key}: {why}")));
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if self.batch_size < 2 {
            return bad(
                "batch_size",
                "must be at least 2 (contrastive batches need negatives)",
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad("learning_rate", "must be positive");
        }
        if !(self.eval_fraction > 0.0 && self.eval_fraction < 1.0) {
            return bad("eval_fraction", "must be between 0 and 1");
        }
        if !(0.0..0.5).contains(&self.validation_fraction) {
            return bad("validation_fraction", "must be in [0, 0.5)");
        }
        if self.grad_clip.is_nan() || self.grad_clip <= 0.0 {
            return bad("grad_clip", "must be positive");
        }
        Ok(())
    }

    fn learning_rate_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1);
        let t = (step - self.warmup_steps) as f64 / span as f64;
        let floor = 0.1 * self.learning_rate;
        floor
            + (self.learning_rate - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
    }
}

/// Progress of a training run, for a progress bar or the log.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// Features are being computed: `done` of `total` clips.
    Features {
        /// Clips done.
        done: usize,
        /// Clips in all.
        total: usize,
    },
    /// An epoch finished.
    Epoch {
        /// Epochs done.
        epoch: usize,
        /// Mean training loss of the epoch.
        train_loss: f64,
        /// Loss on the validation slice of the training data (`None` when
        /// it is too small), which picks the epoch kept.
        validation_loss: Option<f64>,
    },
    /// One optimiser step finished.
    Step {
        /// Steps done.
        step: usize,
        /// Steps in the run.
        total: usize,
        /// Training loss of the step.
        loss: f64,
    },
}

/// Held-out figures, each with the bound the data allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evaluation {
    /// Text-to-audio retrieval among the held-out clips.
    Adherence {
        /// Clips in the retrieval set.
        clips: usize,
        /// Recall@1.
        recall_at_1: f64,
        /// Recall@5.
        recall_at_5: f64,
        /// Recall@1 of random ranking.
        chance_at_1: f64,
        /// Recall@5 of random ranking.
        chance_at_5: f64,
        /// Recall@1 of the attribute oracle (needs ground truth).
        oracle_at_1: Option<f64>,
        /// Recall@5 of the attribute oracle.
        oracle_at_5: Option<f64>,
    },
    /// Predicted MOS against the raters' MOS of held-out clips.
    Quality {
        /// Held-out clips.
        clips: usize,
        /// Spearman rank correlation.
        spearman: f64,
        /// Pearson correlation.
        pearson: f64,
        /// Mean squared error, in rating points squared.
        mse: f64,
        /// Spearman correlation of the raters' latent quality with the same
        /// MOS: the ceiling rater noise leaves (needs ground truth).
        ceiling_spearman: Option<f64>,
    },
    /// Choices on held-out pairs.
    Preference {
        /// Held-out decided pairs (no ties or skips).
        pairs: usize,
        /// Fraction whose preferred clip scores higher.
        accuracy: f64,
        /// Accuracy of the Bayes-optimal judge that knows the rater
        /// population (needs ground truth).
        bayes_ceiling: Option<f64>,
        /// Chance that two random raters agree on a pair.
        inter_rater_agreement: Option<f64>,
    },
}

/// What a training run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// The model trained.
    pub kind: RewardKind,
    /// Training examples (clips or pairs).
    pub train_examples: usize,
    /// Held-out examples.
    pub eval_examples: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Mean training loss of the epoch kept.
    pub final_loss: f64,
    /// Held-out figures.
    pub eval: Evaluation,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Whether a record with this id is held out.
fn held_out(id: &str, seed: u64, fraction: f64) -> bool {
    let digest = Sha256::digest(format!("{seed}:{id}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(first) as f64 / u64::MAX as f64) < fraction
}

/// A fresh model of `kind` whose front end is normalised on `clips`.
fn fresh_model(
    kind: RewardKind,
    cfg: &TrainConfig,
    clips: &[&[u32]],
    device: &Device,
) -> Result<RewardModel, TrainError> {
    let mut config = RewardConfig::new(kind);
    config.arch = cfg.arch.clone();
    let mut model = RewardModel::fresh(config, device, cfg.seed)?;
    match &cfg.init_audio {
        Some(dir) => {
            let source = RewardModel::load(dir, device)?;
            model.adopt_audio_tower(&source)?;
        }
        None => {
            let probe: Vec<&[u32]> = clips.iter().take(STATS_CLIPS).copied().collect();
            model.set_frontend(Frontend::measure(FrontendConfig::default().n_mels, &probe)?)?;
        }
    }
    let min = clips.iter().map(|c| c.len()).min().unwrap_or(1);
    let max = clips.iter().map(|c| c.len()).max().unwrap_or(1);
    let config = model.config_mut();
    // Judge clips down to half the shortest training clip (at least 1 s) and
    // up to a little past the longest.
    config.min_tokens = (min / 2).clamp(1, 25);
    config.max_tokens = config.max_tokens.max(max);
    Ok(model)
}

/// Features of every clip (token slices or [`Clip`]s, audio
/// included), in parallel chunks so progress can be shown.
fn features_of<'c, C>(
    frontend: &Frontend,
    clips: &[C],
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Vec<f32>>, TrainError>
where
    C: Into<Clip<'c>> + Copy + Sync,
{
    let mut out = Vec::with_capacity(clips.len());
    for chunk in clips.chunks(512) {
        out.extend(frontend.clips(chunk)?);
        progress(Progress::Features {
            done: out.len(),
            total: clips.len(),
        });
    }
    Ok(out)
}

fn stack(features: &[Vec<f32>], idx: &[usize], width: usize) -> Features {
    let rows: Vec<&[f32]> = idx.iter().map(|&i| features[i].as_slice()).collect();
    Features::stack(&rows, width)
}

/// The shared optimisation loop: shuffles `n` examples each epoch and steps
/// on `loss(batch indices)`.
fn optimise(
    model: &RewardModel,
    n: usize,
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(Progress),
    loss: &dyn Fn(&[usize]) -> Result<Tensor, TrainError>,
) -> Result<(usize, f64), TrainError> {
    let vars = model.vars().all_vars();
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: cfg.learning_rate,
            weight_decay: cfg.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed);
    // A validation slice of the training examples picks the best epoch, so
    // that a model that starts to memorise its labels is not the one kept.
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let n_val = ((n as f64 * cfg.validation_fraction) as usize).min(n / 2);
    let val: Vec<usize> = order.split_off(n - n_val);
    let per_epoch = order.len().div_ceil(cfg.batch_size);
    let total = per_epoch * cfg.epochs;
    let mut step = 0;
    let mut best: Option<(f64, Vec<Tensor>, f64)> = None;
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let mut sum = 0.0;
        let mut count = 0;
        for batch in order.chunks(cfg.batch_size) {
            // A one-example tail cannot form a contrastive batch; it joins
            // the next epoch's shuffle instead.
            if batch.len() < 2 {
                continue;
            }
            opt.set_learning_rate(cfg.learning_rate_at(step, total));
            let l = loss(batch)?;
            let value = f64::from(l.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Err(TrainError::Input(format!(
                    "training diverged at step {step} (loss {value}); lower reward_train.learning_rate"
                )));
            }
            let mut grads = l.backward()?;
            encore_model::pretrain::clip_grad_norm(&mut grads, &vars, cfg.grad_clip)
                .map_err(|e| TrainError::Input(e.to_string()))?;
            opt.step(&grads)?;
            step += 1;
            sum += value;
            count += 1;
            progress(Progress::Step {
                step,
                total,
                loss: value,
            });
        }
        let train_loss = sum / count.max(1) as f64;
        let val_loss = mean_loss(&val, cfg.batch_size, loss)?;
        progress(Progress::Epoch {
            epoch: epoch + 1,
            train_loss,
            validation_loss: val_loss,
        });
        let better = match (&best, val_loss) {
            (_, None) => true,
            (None, Some(_)) => true,
            (Some((b, _, _)), Some(v)) => v < *b,
        };
        if better {
            let snapshot = vars
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?;
            best = Some((val_loss.unwrap_or(f64::INFINITY), snapshot, train_loss));
        }
    }
    let Some((_, snapshot, train_loss)) = best else {
        return Ok((step, 0.0));
    };
    for (var, value) in vars.iter().zip(&snapshot) {
        var.set(value)?;
    }
    Ok((step, train_loss))
}

/// Mean loss over `examples` in batches, without gradients; `None` when
/// there are too few to form a batch.
fn mean_loss(
    examples: &[usize],
    batch_size: usize,
    loss: &dyn Fn(&[usize]) -> Result<Tensor, TrainError>,
) -> Result<Option<f64>, TrainError> {
    let mut sum = 0.0;
    let mut count = 0;
    for batch in examples.chunks(batch_size) {
        if batch.len() < 2 {
            continue;
        }
        sum += f64::from(loss(batch)?.detach().to_scalar::<f32>()?) * batch.len() as f64;
        count += batch.len();
    }
    Ok((count > 0).then(|| sum / count as f64))
}

/// Trains the prompt-adherence dual encoder on captioned clips.
pub fn train_adherence(
    records: &[ClipRecord],
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn FnMut(Progress),
) -> Result<(RewardModel, TrainReport), TrainError> {
    cfg.validate()?;
    let started = Instant::now();
    let mut train: Vec<&ClipRecord> = Vec::new();
    let mut eval: Vec<&ClipRecord> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if !held_out(&i.to_string(), cfg.seed, cfg.eval_fraction) {
            train.push(r);
        } else if eval.len() < cfg.max_eval_clips {
            eval.push(r);
        }
    }
    check_sizes(RewardKind::Adherence, train.len(), eval.len(), cfg)?;
    let clips: Vec<&[u32]> = train.iter().map(|r| r.tokens.as_slice()).collect();
    let model = fresh_model(RewardKind::Adherence, cfg, &clips, device)?;
    let features = features_of(model.frontend(), &clips, progress)?;
    let width = model.frontend().width();
    let captions: Vec<&str> = train.iter().map(|r| r.caption.as_str()).collect();

    let (steps, final_loss) = optimise(&model, train.len(), cfg, progress, &|batch| {
        let caps: Vec<&str> = batch.iter().map(|&i| captions[i]).collect();
        let (audio, text, scale) = model.contrastive(&stack(&features, batch, width), &caps)?;
        let logits = text.matmul(&audio.t()?)?.broadcast_mul(&scale)?; // [captions, clips]
        let logits = logits.broadcast_add(&duplicate_mask(&caps, device)?)?;
        let targets = Tensor::arange(0u32, batch.len() as u32, device)?;
        let t2a = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let a2t = candle_nn::loss::cross_entropy(&logits.t()?, &targets)?;
        Ok(((t2a + a2t)? * 0.5)?)
    })?;
    let eval_result = evaluate_adherence(&model, &eval)?;
    finish(
        model,
        cfg,
        RewardKind::Adherence,
        train.len(),
        eval.len(),
        steps,
        final_loss,
        eval_result,
        started,
    )
}

/// Additive mask that removes repeated captions as each other's negatives.
fn duplicate_mask(captions: &[&str], device: &Device) -> Result<Tensor, TrainError> {
    let n = captions.len();
    let mut mask = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            if i != j && captions[i] == captions[j] {
                mask[i * n + j] = -1e4;
            }
        }
    }
    Ok(Tensor::from_vec(mask, (n, n), device)?)
}

/// Text-to-audio retrieval among `records`.
pub fn evaluate_adherence(
    model: &RewardModel,
    records: &[&ClipRecord],
) -> Result<Evaluation, TrainError> {
    let n = records.len();
    let mut audio = Vec::new();
    let mut text = Vec::new();
    for chunk in records.chunks(128) {
        let clips: Vec<&[u32]> = chunk.iter().map(|r| r.tokens.as_slice()).collect();
        let caps: Vec<&str> = chunk.iter().map(|r| r.caption.as_str()).collect();
        let (a, t, _) = model.contrastive(&model.frontend().batch(&clips)?, &caps)?;
        audio.push(a);
        text.push(t);
    }
    let audio = Tensor::cat(&audio, 0)?;
    let text = Tensor::cat(&text, 0)?;
    let sim: Vec<f32> = text.matmul(&audio.t()?)?.flatten_all()?.to_vec1()?;
    let truth: Option<Vec<_>> = records
        .iter()
        .map(|r| r.truth.as_ref().map(|t| (t.attributes, t.mentioned)))
        .collect();
    Ok(Evaluation::Adherence {
        clips: n,
        recall_at_1: recall_at_k(&sim, n, 1),
        recall_at_5: recall_at_k(&sim, n, 5),
        chance_at_1: 1.0 / n as f64,
        chance_at_5: (5.0 / n as f64).min(1.0),
        oracle_at_1: truth.as_ref().map(|t| oracle_recall_at_k(t, 1)),
        oracle_at_5: truth.as_ref().map(|t| oracle_recall_at_k(t, 5)),
    })
}

/// A rated clip: its tokens, caption, MOS, and the ratings behind it.
struct RatedClip<'a> {
    tokens: &'a [u32],
    mos: f64,
    records: Vec<&'a RatingRecord>,
}

fn group_ratings(records: &[RatingRecord]) -> Vec<RatedClip<'_>> {
    let mut by_clip: BTreeMap<&str, Vec<&RatingRecord>> = BTreeMap::new();
    for r in records {
        by_clip.entry(r.clip_id.as_str()).or_default().push(r);
    }
    by_clip
        .into_values()
        .map(|records| RatedClip {
            tokens: &records[0].tokens,
            mos: records.iter().map(|r| f64::from(r.rating)).sum::<f64>() / records.len() as f64,
            records,
        })
        .collect()
}

/// Trains the quality regressor on rated clips (several ratings per clip
/// are averaged into its MOS).
pub fn train_quality(
    records: &[RatingRecord],
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn FnMut(Progress),
) -> Result<(RewardModel, TrainReport), TrainError> {
    cfg.validate()?;
    let started = Instant::now();
    let (train, eval): (Vec<RatedClip>, Vec<RatedClip>) = group_ratings(records)
        .into_iter()
        .partition(|c| !held_out(&c.records[0].clip_id, cfg.seed, cfg.eval_fraction));
    check_sizes(RewardKind::Quality, train.len(), eval.len(), cfg)?;
    let clips: Vec<&[u32]> = train.iter().map(|c| c.tokens).collect();
    let model = fresh_model(RewardKind::Quality, cfg, &clips, device)?;
    let features = features_of(model.frontend(), &clips, progress)?;
    let width = model.frontend().width();
    let mos: Vec<f32> = train.iter().map(|c| c.mos as f32).collect();

    let (steps, final_loss) = optimise(&model, train.len(), cfg, progress, &|batch| {
        let target: Vec<f32> = batch.iter().map(|&i| mos[i]).collect();
        let target = Tensor::from_vec(target, batch.len(), device)?;
        let pred = model.score_features(&stack(&features, batch, width), &vec![""; batch.len()])?;
        Ok((pred - target)?.sqr()?.mean_all()?)
    })?;
    let eval_result = evaluate_quality_clips(&model, &eval)?;
    finish(
        model,
        cfg,
        RewardKind::Quality,
        train.len(),
        eval.len(),
        steps,
        final_loss,
        eval_result,
        started,
    )
}

/// Quality figures on rated clips (ratings grouped by clip id).
pub fn evaluate_quality(
    model: &RewardModel,
    records: &[RatingRecord],
) -> Result<Evaluation, TrainError> {
    evaluate_quality_clips(model, &group_ratings(records))
}

fn evaluate_quality_clips(
    model: &RewardModel,
    clips: &[RatedClip],
) -> Result<Evaluation, TrainError> {
    let mut predicted = Vec::with_capacity(clips.len());
    for chunk in clips.chunks(128) {
        let items: Vec<ScoreInput> = chunk
            .iter()
            .map(|c| ScoreInput::tokens("", c.tokens))
            .collect();
        predicted.extend(model.score(&items)?.into_iter().map(f64::from));
    }
    let mos: Vec<f64> = clips.iter().map(|c| c.mos).collect();
    let has_truth = clips
        .iter()
        .all(|c| c.records.iter().all(|r| r.truth.is_some()));
    let ceiling = if has_truth && !clips.is_empty() {
        let all: Vec<RatingRecord> = clips
            .iter()
            .flat_map(|c| c.records.iter().map(|r| (*r).clone()))
            .collect();
        Some(encore_raters::generate::quality_ceiling(&all).spearman)
    } else {
        None
    };
    Ok(Evaluation::Quality {
        clips: clips.len(),
        spearman: spearman(&predicted, &mos).unwrap_or(0.0),
        pearson: pearson(&predicted, &mos).unwrap_or(0.0),
        mse: mse(&predicted, &mos),
        ceiling_spearman: ceiling,
    })
}

/// The Bradley-Terry target of a choice: 1 when A won, 0 when B won, 1/2
/// for a tie; `None` for a skip.
fn target(choice: Choice) -> Option<f32> {
    match choice {
        Choice::A => Some(1.0),
        Choice::B => Some(0.0),
        Choice::Tie => Some(0.5),
        Choice::Skip => None,
    }
}

/// Trains the Bradley-Terry user-preference model on pairwise choices.
pub fn train_preference(
    records: &[PreferenceRecord],
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn FnMut(Progress),
) -> Result<(RewardModel, TrainReport), TrainError> {
    cfg.validate()?;
    let started = Instant::now();
    let (train, eval): (Vec<&PreferenceRecord>, Vec<&PreferenceRecord>) = records
        .iter()
        .filter(|r| target(r.choice).is_some())
        .partition(|r| !held_out(&r.pair_id, cfg.seed, cfg.eval_fraction));
    check_sizes(RewardKind::Preference, train.len(), eval.len(), cfg)?;
    // Clip 2i is pair i's A, clip 2i + 1 its B.
    let clips: Vec<&[u32]> = train
        .iter()
        .flat_map(|r| [r.a.tokens.as_slice(), r.b.tokens.as_slice()])
        .collect();
    let model = fresh_model(RewardKind::Preference, cfg, &clips, device)?;
    let features = features_of(model.frontend(), &clips, progress)?;
    let width = model.frontend().width();

    let (steps, final_loss) = optimise(&model, train.len(), cfg, progress, &|batch| {
        let idx: Vec<usize> = batch.iter().flat_map(|&i| [2 * i, 2 * i + 1]).collect();
        let caps: Vec<&str> = batch
            .iter()
            .flat_map(|&i| [train[i].caption.as_str(), train[i].caption.as_str()])
            .collect();
        let scores = model
            .score_features(&stack(&features, &idx, width), &caps)?
            .reshape((batch.len(), 2))?;
        let margin = (scores.narrow(1, 0, 1)? - scores.narrow(1, 1, 1)?)?.squeeze(1)?;
        let y: Vec<f32> = batch
            .iter()
            .filter_map(|&i| target(train[i].choice))
            .collect();
        let y = Tensor::from_vec(y, batch.len(), device)?;
        // Binary cross-entropy with logits: y softplus(-m) + (1 - y) softplus(m).
        let loss = ((&y * softplus(&margin.neg()?)?)? + ((1.0 - &y)? * softplus(&margin)?)?)?;
        Ok(loss.mean_all()?)
    })?;
    let eval_result = evaluate_preference(&model, &eval, cfg.population_seed, cfg.raters)?;
    finish(
        model,
        cfg,
        RewardKind::Preference,
        train.len(),
        eval.len(),
        steps,
        final_loss,
        eval_result,
        started,
    )
}

/// `log(1 + exp(x))`, stable for large |x|.
fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Pairwise accuracy on decided pairs, with the ceilings when the records
/// carry ground truth.
///
/// The ceilings assume the labels came from raters `0..raters` of the
/// population with `population_seed` (the generator's `GenConfig`).
pub fn evaluate_preference(
    model: &RewardModel,
    records: &[&PreferenceRecord],
    population_seed: u64,
    raters: usize,
) -> Result<Evaluation, TrainError> {
    let decided: Vec<&PreferenceRecord> = records
        .iter()
        .copied()
        .filter(|r| matches!(r.choice, Choice::A | Choice::B))
        .collect();
    let mut margins = Vec::with_capacity(decided.len());
    for chunk in decided.chunks(64) {
        let items: Vec<ScoreInput> = chunk
            .iter()
            .flat_map(|r| {
                [
                    ScoreInput::tokens(&r.caption, &r.a.tokens),
                    ScoreInput::tokens(&r.caption, &r.b.tokens),
                ]
            })
            .collect();
        let scores = model.score(&items)?;
        for (r, s) in chunk.iter().zip(scores.chunks(2)) {
            let m = s[0] - s[1];
            margins.push(if r.choice == Choice::A { m } else { -m });
        }
    }
    let (bayes, agreement) = if !decided.is_empty() && decided.iter().all(|r| r.truth.is_some()) {
        let owned: Vec<PreferenceRecord> = decided.iter().map(|r| (*r).clone()).collect();
        let population = encore_raters::sim::Population::new(population_seed);
        let c = encore_raters::generate::preference_ceiling(&owned, &population, raters);
        (Some(c.bayes_accuracy), Some(c.inter_rater_agreement))
    } else {
        (None, None)
    };
    Ok(Evaluation::Preference {
        pairs: decided.len(),
        accuracy: pairwise_accuracy(&margins),
        bayes_ceiling: bayes,
        inter_rater_agreement: agreement,
    })
}

fn check_sizes(
    kind: RewardKind,
    train: usize,
    eval: usize,
    cfg: &TrainConfig,
) -> Result<(), TrainError> {
    if train < cfg.batch_size.max(2) || eval < 2 {
        return Err(TrainError::Input(format!(
            "{kind}: {train} training and {eval} held-out examples are too few \
             (need at least batch_size = {} to train and 2 to evaluate)",
            cfg.batch_size
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn finish(
    mut model: RewardModel,
    cfg: &TrainConfig,
    kind: RewardKind,
    train_examples: usize,
    eval_examples: usize,
    steps: usize,
    final_loss: f64,
    eval: Evaluation,
    started: Instant,
) -> Result<(RewardModel, TrainReport), TrainError> {
    let report = TrainReport {
        kind,
        train_examples,
        eval_examples,
        steps,
        final_loss,
        eval,
        seconds: started.elapsed().as_secs_f64(),
    };
    let config = model.config_mut();
    config.version = format!("trained-seed{}", cfg.seed);
    config.description = describe(&report);
    config.metadata = serde_json::json!({ "train": cfg, "report": report });
    Ok((model, report))
}

/// One line on what a model was trained on and how well it does.
pub fn describe(report: &TrainReport) -> String {
    let figure = match &report.eval {
        Evaluation::Adherence {
            clips,
            recall_at_1,
            recall_at_5,
            ..
        } => format!(
            "text-to-audio recall@1 {:.1}%, recall@5 {:.1}% among {clips} held-out clips",
            100.0 * recall_at_1,
            100.0 * recall_at_5
        ),
        Evaluation::Quality {
            clips,
            spearman,
            mse,
            ..
        } => {
            format!("Spearman {spearman:.3}, MSE {mse:.3} on {clips} held-out clips")
        }
        Evaluation::Preference {
            pairs, accuracy, ..
        } => {
            format!(
                "accuracy {:.1}% on {pairs} held-out pairs",
                100.0 * accuracy
            )
        }
    };
    format!(
        "{} reward model trained on {} examples; {figure}",
        report.kind, report.train_examples
    )
}

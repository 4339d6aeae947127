//! The policies Encore's workers run, behind one type: the in-house tiny
//! transformer over the embedded codec's tokens ([`encore_model`]) or a
//! MusicGen checkpoint over EnCodec codebooks ([`encore_musicgen`]).
//!
//! Actors sample from an [`AnyPolicy`] loaded from published weights
//! ([`load_published`]); learners train an [`AnyTrainable`] loaded from the
//! job's base checkpoint directory, whose kind is read from its
//! `config.json` ([`Architecture::of_checkpoint`]).
//!
//! How a MusicGen rollout is laid out: `tokens` holds the `K` codebooks
//! row-major (`[K][frames]`), `codebooks = K`, and there is one behaviour
//! log-prob per decoder step (`frames + K - 1`, the delay pattern's steps),
//! each the sum over the codebooks generated at that step. The tiny policy
//! has one codebook and one log-prob per token.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use encore_model::{Policy, SamplingParams, TrainablePolicy};
use encore_musicgen::{GenerateParams, Musicgen, MusicgenConfig, WEIGHTS_FILE};
use serde::{Deserialize, Serialize};

/// Why a policy cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// From the tiny policy.
    #[error(transparent)]
    Model(#[from] encore_model::ModelError),
    /// From MusicGen.
    #[error(transparent)]
    Musicgen(#[from] encore_musicgen::MusicgenError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A checkpoint or published config is unusable; the message names it.
    #[error("{0}")]
    Checkpoint(String),
    /// Inputs do not fit the policy; the message names the field.
    #[error("{0}")]
    Input(String),
}

type Result<T> = std::result::Result<T, PolicyError>;

/// Which model a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Encore's own transformer (`encore pretrain` writes these).
    Tiny,
    /// A Hugging Face `MusicgenForConditionalGeneration` directory.
    Musicgen,
}

impl Architecture {
    /// Reads `dir/config.json`: a MusicGen config has `decoder` and
    /// `audio_encoder` sections, Encore's has `policy`.
    pub fn of_checkpoint(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| PolicyError::Checkpoint(format!("{}: {e}", path.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| PolicyError::Checkpoint(format!("{}: {e}", path.display())))?;
        if json.get("decoder").is_some() && json.get("audio_encoder").is_some() {
            Ok(Self::Musicgen)
        } else if json.get("policy").is_some() {
            Ok(Self::Tiny)
        } else {
            Err(PolicyError::Checkpoint(format!(
                "{}: neither an Encore policy (no \"policy\") nor a MusicGen checkpoint (no \"decoder\"/\"audio_encoder\")",
                path.display()
            )))
        }
    }

    /// Lower-case name, as logs and docs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Musicgen => "musicgen",
        }
    }
}

/// `WeightManifest.model_config_json` of a MusicGen policy: the decoder's
/// weights are published; the text encoder, codec and tokenizer come from
/// the base checkpoint directory, which actors must see at the same path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MusicgenPublished {
    /// Always `"musicgen"`.
    pub architecture: String,
    /// The base checkpoint directory.
    pub base: PathBuf,
    /// Classifier-free guidance scale of the policy (sampling and learning).
    pub guidance_scale: f64,
}

/// A MusicGen policy and its guidance scale.
#[derive(Debug)]
pub struct MusicgenPolicy {
    /// The model.
    pub model: Musicgen,
    /// Guidance scale: part of the policy, as the learner's log-probs must
    /// be those of the distribution actors sample from.
    pub guidance_scale: f64,
    /// Its base checkpoint directory.
    pub base: PathBuf,
}

/// The guidance scale a checkpoint's `generation_config.json` sets
/// (MusicGen's releases: 3.0), else 1.0 (none).
pub fn checkpoint_guidance(dir: &Path) -> f64 {
    std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|j| j.get("guidance_scale").and_then(serde_json::Value::as_f64))
        .unwrap_or(1.0)
}

/// Clips sampled by any policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// Tokens per clip (MusicGen: `[K][frames]` row-major).
    pub tokens: Vec<Vec<u32>>,
    /// Behaviour log-probs per clip, one per decoder step.
    pub log_probs: Vec<Vec<f32>>,
    /// Codebooks per clip (1 for the tiny policy).
    pub codebooks: u32,
}

/// A policy for sampling or as a frozen reference.
// One long-lived handle per process (behind an Arc in actors): the size
// difference between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum AnyPolicy {
    /// The tiny transformer.
    Tiny(Policy),
    /// MusicGen.
    Musicgen(MusicgenPolicy),
}

impl std::fmt::Debug for AnyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AnyPolicy")
            .field(&self.architecture())
            .finish()
    }
}

impl AnyPolicy {
    /// Which architecture.
    pub fn architecture(&self) -> Architecture {
        match self {
            Self::Tiny(_) => Architecture::Tiny,
            Self::Musicgen(_) => Architecture::Musicgen,
        }
    }

    /// The most frames one clip may have.
    pub fn max_frames(&self) -> usize {
        match self {
            Self::Tiny(p) => p.config().max_frames,
            Self::Musicgen(m) => {
                let d = &m.model.config().decoder;
                d.max_position_embeddings.saturating_sub(d.num_codebooks)
            }
        }
    }

    /// Codec frames per second of the policy's audio tokens.
    pub fn frame_rate(&self) -> f64 {
        match self {
            Self::Tiny(_) => 25.0,
            Self::Musicgen(m) => m.model.frame_rate() as f64,
        }
    }

    /// Samples `frames` frames for each caption, one batch.
    pub fn sample(
        &self,
        captions: &[&str],
        frames: usize,
        params: &SamplingParams,
    ) -> Result<Sampled> {
        match self {
            Self::Tiny(p) => {
                let text = encore_model::embed_captions(captions, p.device())?;
                let out = encore_model::sample(p, &text, frames, params)?;
                Ok(Sampled {
                    tokens: out.tokens,
                    log_probs: out.log_probs,
                    codebooks: 1,
                })
            }
            Self::Musicgen(m) => {
                let cond = m.model.condition(captions)?;
                let out = m.model.generate(
                    &cond,
                    frames,
                    &GenerateParams {
                        sampling: params.clone(),
                        guidance_scale: m.guidance_scale,
                    },
                )?;
                Ok(Sampled {
                    tokens: out.codes.iter().map(|c| c.concat()).collect(),
                    log_probs: out.log_probs,
                    codebooks: m.model.codebooks() as u32,
                })
            }
        }
    }

    /// Teacher-forced log-probs `[b, steps]` of clips (tokens as
    /// [`Sampled`] lays them out, all of one length), without gradients.
    pub fn log_probs(&self, captions: &[&str], clips: &[&[u32]]) -> Result<Tensor> {
        match self {
            Self::Tiny(p) => tiny_log_probs(p, captions, clips),
            Self::Musicgen(m) => musicgen_log_probs(m, captions, clips),
        }
    }

    /// Decoder steps (log-probs) of a clip of `tokens` tokens (0 when they
    /// do not fill whole frames of the policy's codebooks).
    pub fn steps_for(&self, tokens: usize) -> usize {
        decoder_steps(tokens, self.codebooks()).unwrap_or(0)
    }

    /// Codebooks per clip.
    pub fn codebooks(&self) -> u32 {
        match self {
            Self::Tiny(_) => 1,
            Self::Musicgen(m) => m.model.codebooks() as u32,
        }
    }
}

fn tiny_log_probs(p: &Policy, captions: &[&str], clips: &[&[u32]]) -> Result<Tensor> {
    let width = clips.iter().map(|c| c.len()).max().unwrap_or(0);
    if width == 0 {
        return Err(PolicyError::Input("tokens: clips without tokens".into()));
    }
    // Padding repeats token 0; causal attention keeps it from affecting
    // real positions, and callers mask it out.
    let mut ids = vec![0u32; clips.len() * width];
    for (row, c) in clips.iter().enumerate() {
        ids[row * width..row * width + c.len()].copy_from_slice(c);
    }
    let device = p.device();
    let tokens = Tensor::from_vec(ids, (clips.len(), width), device)?;
    let text = encore_model::embed_captions(captions, device)?;
    Ok(p.log_probs(&tokens, &text)?)
}

fn musicgen_log_probs(m: &MusicgenPolicy, captions: &[&str], clips: &[&[u32]]) -> Result<Tensor> {
    let k = m.model.codebooks();
    let len = clips.first().map_or(0, |c| c.len());
    if len == 0 || !len.is_multiple_of(k) || clips.iter().any(|c| c.len() != len) {
        return Err(PolicyError::Input(format!(
            "tokens: MusicGen clips in one batch need one length, a non-zero multiple of {k} codebooks"
        )));
    }
    let codes: Vec<Vec<Vec<u32>>> = clips
        .iter()
        .map(|c| c.chunks(len / k).map(<[u32]>::to_vec).collect())
        .collect();
    let cond = m.model.condition(captions)?;
    Ok(m.model.log_probs(&codes, &cond, m.guidance_scale)?)
}

/// Decoder steps, and so behaviour log-probs, of a clip of `tokens` tokens
/// in `codebooks` codebooks (0 or 1: one stream, one step per token; K:
/// MusicGen's delay pattern, frames + K - 1). `None` when the tokens are
/// empty or do not fill whole frames.
pub fn decoder_steps(tokens: usize, codebooks: u32) -> Option<usize> {
    let k = codebooks.max(1) as usize;
    if tokens == 0 || !tokens.is_multiple_of(k) {
        return None;
    }
    Some(if k == 1 { tokens } else { tokens / k + k - 1 })
}

/// Loads published weights for sampling: `config_json` is
/// `WeightManifest.model_config_json` (a tiny [`encore_model::PolicyConfig`]
/// or a [`MusicgenPublished`]).
pub fn load_published(config_json: &str, weights: &Path, device: &Device) -> Result<AnyPolicy> {
    if let Ok(published) = serde_json::from_str::<MusicgenPublished>(config_json)
        && published.architecture == Architecture::Musicgen.name()
    {
        let model = Musicgen::load_with_decoder(&published.base, weights, device)?;
        return Ok(AnyPolicy::Musicgen(MusicgenPolicy {
            model,
            guidance_scale: published.guidance_scale,
            base: published.base,
        }));
    }
    Ok(AnyPolicy::Tiny(encore_model::load_frozen_file(
        config_json,
        weights,
        device,
    )?))
}

/// Loads a base checkpoint directory for sampling or as a reference.
pub fn load_frozen(dir: &Path, device: &Device) -> Result<AnyPolicy> {
    Ok(match Architecture::of_checkpoint(dir)? {
        Architecture::Tiny => AnyPolicy::Tiny(encore_model::load_frozen(dir, device)?.0),
        Architecture::Musicgen => AnyPolicy::Musicgen(MusicgenPolicy {
            model: Musicgen::load(dir, device)?,
            guidance_scale: checkpoint_guidance(dir),
            base: dir.to_owned(),
        }),
    })
}

/// A policy being trained: its model over the variables in `vars` (the
/// tiny policy: all of them; MusicGen: the decoder and the text
/// projection, while T5 and EnCodec stay frozen, as in MusicRL).
pub struct AnyTrainable {
    policy: AnyPolicy,
    /// The trainable parameters, by safetensors name.
    pub vars: VarMap,
}

impl From<TrainablePolicy> for AnyTrainable {
    fn from(t: TrainablePolicy) -> Self {
        Self {
            policy: AnyPolicy::Tiny(t.policy),
            vars: t.vars,
        }
    }
}

impl AnyTrainable {
    /// Loads the job's base checkpoint directory, either architecture.
    pub fn load(base: &Path, device: &Device) -> Result<Self> {
        match Architecture::of_checkpoint(base)? {
            Architecture::Tiny => Ok(TrainablePolicy::load(base, device)?.0.into()),
            Architecture::Musicgen => {
                let cfg = MusicgenConfig::load(base)?;
                let weights = base.join(WEIGHTS_FILE);
                let frozen = encore_musicgen::mmap_weights(base, device)?;
                let vars = VarMap::new();
                let model = Musicgen::new(
                    &cfg,
                    frozen,
                    VarBuilder::from_varmap(&vars, DType::F32, device),
                    encore_musicgen::load_tokenizer(base)?,
                )?;
                let mut loading = vars.clone();
                loading
                    .load(&weights)
                    .map_err(|e| PolicyError::Checkpoint(format!("{}: {e}", weights.display())))?;
                Ok(Self {
                    policy: AnyPolicy::Musicgen(MusicgenPolicy {
                        model,
                        guidance_scale: checkpoint_guidance(base),
                        base: base.to_owned(),
                    }),
                    vars,
                })
            }
        }
    }

    /// The model over the trainable variables.
    pub fn policy(&self) -> &AnyPolicy {
        &self.policy
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        match &self.policy {
            AnyPolicy::Tiny(p) => p.device(),
            AnyPolicy::Musicgen(m) => m.model.device(),
        }
    }

    /// Every trainable parameter by name, in name order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        encore_model::named_tensors(&self.vars)
    }

    /// A frozen copy for the KL reference: detached weights, no graph.
    pub fn frozen(&self) -> Result<AnyPolicy> {
        let tensors = self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.detach().copy()?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        let device = self.device().clone();
        let detached = VarBuilder::from_tensors(tensors, DType::F32, &device);
        match &self.policy {
            AnyPolicy::Tiny(p) => Ok(AnyPolicy::Tiny(Policy::new(p.config(), detached)?)),
            AnyPolicy::Musicgen(m) => {
                let frozen = encore_musicgen::mmap_weights(&m.base, &device)?;
                let model = Musicgen::new(
                    m.model.config(),
                    frozen,
                    detached,
                    encore_musicgen::load_tokenizer(&m.base)?,
                )?;
                Ok(AnyPolicy::Musicgen(MusicgenPolicy {
                    model,
                    guidance_scale: m.guidance_scale,
                    base: m.base.clone(),
                }))
            }
        }
    }

    /// `WeightManifest.model_config_json` for weights this policy publishes.
    pub fn published_config(&self) -> Result<String> {
        let json = match &self.policy {
            AnyPolicy::Tiny(p) => serde_json::to_string(p.config()),
            AnyPolicy::Musicgen(m) => serde_json::to_string(&MusicgenPublished {
                architecture: Architecture::Musicgen.name().into(),
                base: m.base.clone(),
                guidance_scale: m.guidance_scale,
            }),
        };
        json.map_err(|e| PolicyError::Checkpoint(format!("model config: {e}")))
    }
}

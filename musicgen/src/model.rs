//! A whole MusicGen checkpoint: text -> conditioning -> delayed codes ->
//! waveform, with the two things reinforcement learning needs on top of
//! transformers' `generate`: behaviour log-probs from the sampler, and
//! differentiable teacher-forced log-probs for the learner.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5::T5EncoderModel;
use encore_model::{SamplingParams, choose};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::decoder::{Linear, log_softmax};
use crate::delay::{delay, is_free, undelay};
use crate::{
    Conditioning, Decoder, EncodecDecoder, MusicgenConfig, MusicgenError, Result, TOKENIZER_FILE,
    mmap_file, mmap_weights,
};

/// How to sample: the tiny policy's parameters plus classifier-free
/// guidance.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Temperature, top-k, top-p and seed.
    pub sampling: SamplingParams,
    /// Classifier-free guidance scale: logits are
    /// `uncond + scale * (cond - uncond)`; 1.0 (or less) turns it off.
    /// MusicGen's own default is 3.0.
    pub guidance_scale: f64,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            guidance_scale: 1.0,
        }
    }
}

impl GenerateParams {
    /// True when guidance runs (a second, unconditional pass per step).
    pub fn guided(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// Clips drawn by [`Musicgen::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Codes per clip, `[K][frames]` (the delay pattern reverted).
    pub codes: Vec<Vec<Vec<u32>>>,
    /// Behaviour log-probs per clip and decoder step (`frames + K - 1`
    /// steps): the sum over codebooks of the chosen codes' log-probs under
    /// the distribution sampled from. Forced pad positions add nothing.
    pub log_probs: Vec<Vec<f32>>,
}

/// A MusicGen model: T5 text encoder, decoder, EnCodec decoder and, when the
/// checkpoint has one, its tokenizer.
pub struct Musicgen {
    cfg: MusicgenConfig,
    // candle's T5 takes `&mut self` (it has a decoder cache it never uses
    // when encoding); the lock makes `Musicgen` usable through `&self`.
    text: Mutex<T5EncoderModel>,
    proj: Option<Linear>,
    decoder: Decoder,
    codec: EncodecDecoder,
    tokenizer: Option<Tokenizer>,
    device: Device,
}

impl std::fmt::Debug for Musicgen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Musicgen")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Musicgen {
    /// Loads a Hugging Face checkpoint directory (`config.json`,
    /// `model.safetensors`, and `tokenizer.json` if present), memory-mapped.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = MusicgenConfig::load(dir)?;
        let vb = mmap_weights(dir, device)?;
        let tokenizer = load_tokenizer(dir)?;
        Self::new(&cfg, vb.clone(), vb, tokenizer)
    }

    /// Loads a checkpoint directory with the decoder (and text projection)
    /// taken from `decoder_weights` instead: what a learner published.
    pub fn load_with_decoder(dir: &Path, decoder_weights: &Path, device: &Device) -> Result<Self> {
        let cfg = MusicgenConfig::load(dir)?;
        let frozen = mmap_weights(dir, device)?;
        let trained = mmap_file(decoder_weights, device)?;
        Self::new(&cfg, frozen, trained, load_tokenizer(dir)?)
    }

    /// Builds the model from `frozen` (text encoder and codec) and
    /// `trained` (decoder and text projection): the learner passes its
    /// variables as `trained` and the checkpoint as `frozen`.
    pub fn new(
        cfg: &MusicgenConfig,
        frozen: VarBuilder,
        trained: VarBuilder,
        tokenizer: Option<Tokenizer>,
    ) -> Result<Self> {
        cfg.validate()?;
        let t5 = cfg.t5()?;
        let text = T5EncoderModel::load(frozen.pp("text_encoder"), &t5)?;
        let proj = if needs_projection(cfg)? {
            Some(Linear::new(
                t5.d_model,
                cfg.decoder.hidden_size,
                true,
                trained.pp("enc_to_dec_proj"),
            )?)
        } else {
            None
        };
        let decoder = Decoder::new(&cfg.decoder, trained.clone())?;
        let codec = EncodecDecoder::new(&cfg.audio_encoder, frozen.pp("audio_encoder"))?;
        Ok(Self {
            cfg: cfg.clone(),
            text: Mutex::new(text),
            proj,
            decoder,
            codec,
            tokenizer,
            device: trained.device().clone(),
        })
    }

    /// The checkpoint's config.
    pub fn config(&self) -> &MusicgenConfig {
        &self.cfg
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The decoder.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The EnCodec decoder.
    pub fn codec(&self) -> &EncodecDecoder {
        &self.codec
    }

    /// Parallel codebooks.
    pub fn codebooks(&self) -> usize {
        self.cfg.decoder.num_codebooks
    }

    /// Codec frames per second of audio.
    pub fn frame_rate(&self) -> usize {
        self.cfg.audio_encoder.frame_rate()
    }

    /// Output sample rate, Hz.
    pub fn sample_rate(&self) -> u32 {
        self.codec.sample_rate()
    }

    /// Token ids of `prompts` (with T5's closing `</s>`).
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            MusicgenError::Input(format!(
                "prompts: the checkpoint has no {TOKENIZER_FILE}; pass token ids"
            ))
        })?;
        prompts
            .iter()
            .map(|p| {
                tok.encode(*p, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| {
                        MusicgenError::Input(format!("prompts: cannot tokenize {p:?}: {e}"))
                    })
            })
            .collect()
    }

    /// T5 states of each prompt's ids, `[b, s, d_text]` with zeros past each
    /// prompt's end, and the mask. Each prompt is encoded on its own, so
    /// padding never enters T5.
    pub fn encode_text(&self, ids: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        let width = ids.iter().map(Vec::len).max().unwrap_or(0);
        if width == 0 {
            return Err(MusicgenError::Input(
                "prompts: every prompt needs at least one token".into(),
            ));
        }
        let vocab = self.cfg.t5()?.vocab_size;
        let mut text = self
            .text
            .lock()
            .map_err(|_| MusicgenError::Input("text encoder lock poisoned".into()))?;
        for row in ids {
            if row.is_empty() {
                return Err(MusicgenError::Input(
                    "prompts: every prompt needs at least one token".into(),
                ));
            }
            if let Some(bad) = row.iter().find(|&&t| t as usize >= vocab) {
                return Err(MusicgenError::Input(format!(
                    "prompts: token id {bad} outside the vocabulary of {vocab}"
                )));
            }
        }
        // candle's T5 takes no attention mask, so a padded row would attend
        // to its padding. Prompts of one length run as one batch instead
        // (no padding inside the encoder, so each row's states are what it
        // gets alone), and a prompt repeated in the batch (each of a
        // group's K samples) is encoded once. One forward per row made T5
        // cost more than the whole decoding at batch 32.
        let mut by_length: BTreeMap<usize, Vec<&[u32]>> = BTreeMap::new();
        for row in ids {
            let group = by_length.entry(row.len()).or_default();
            if !group.contains(&row.as_slice()) {
                group.push(row);
            }
        }
        let mut encoded: HashMap<&[u32], Tensor> = HashMap::new();
        for (len, group) in by_length {
            let input = Tensor::from_vec(group.concat(), (group.len(), len), &self.device)?;
            let states = text.forward(&input)?;
            for (n, row) in group.into_iter().enumerate() {
                encoded.insert(row, states.get(n)?.pad_with_zeros(0, 0, width - len)?);
            }
        }
        let mut rows = Vec::with_capacity(ids.len());
        let mut mask = Vec::with_capacity(ids.len() * width);
        for row in ids {
            let states = encoded
                .get(row.as_slice())
                .cloned()
                .ok_or_else(|| MusicgenError::Input("prompts: a prompt was not encoded".into()))?;
            rows.push(states);
            mask.extend((0..width).map(|i| if i < row.len() { 1f32 } else { 0.0 }));
        }
        let states = Tensor::stack(&rows, 0)?;
        let mask = Tensor::from_vec(mask, (ids.len(), width), &self.device)?;
        Ok((states, mask))
    }

    /// The decoder's conditioning for token ids: T5, the text projection,
    /// and zeros at padding.
    pub fn condition_ids(&self, ids: &[Vec<u32>]) -> Result<Conditioning> {
        let (states, mask) = self.encode_text(ids)?;
        let states = match &self.proj {
            Some(p) => p.forward(&states)?,
            None => states,
        };
        let states = states.broadcast_mul(&mask.unsqueeze(2)?)?;
        Ok(Conditioning { states, mask })
    }

    /// The decoder's conditioning for text prompts.
    pub fn condition(&self, prompts: &[&str]) -> Result<Conditioning> {
        self.condition_ids(&self.tokenize(prompts)?)
    }

    /// Samples `frames` frames for every row of `cond`, all rows in one
    /// batch (twice that with guidance), one KV-cached decoder step per
    /// delayed position.
    pub fn generate(
        &self,
        cond: &Conditioning,
        frames: usize,
        params: &GenerateParams,
    ) -> Result<Generated> {
        params
            .sampling
            .validate()
            .map_err(|e| MusicgenError::Input(e.to_string()))?;
        if frames == 0 {
            return Err(MusicgenError::Input("frames: must be at least 1".into()));
        }
        let b = cond.batch()?;
        let k_total = self.codebooks();
        let len = frames + k_total;
        let run = if params.guided() {
            cond.with_unconditional()?
        } else {
            cond.clone()
        };
        let rows = run.batch()?;
        let (start, pad) = (self.cfg.start_token(), self.cfg.decoder.pad_token_id);
        let mut seq = vec![vec![vec![pad; len]; k_total]; b];
        for clip in &mut seq {
            for row in clip.iter_mut() {
                row[0] = start;
            }
        }
        let mut log_probs = vec![Vec::with_capacity(len - 1); b];
        let mut rng = ChaCha8Rng::seed_from_u64(params.sampling.seed);
        let mut cache = self.decoder.cache(&run)?;
        let mut input = Tensor::full(start, (rows, k_total, 1), &self.device)?;
        for t in 1..len {
            let logits = self
                .decoder
                .forward(&input, &run, Some(&mut cache))?
                .squeeze(2)?;
            let logits = guide(&logits, b, params.guidance_scale)?;
            let logits = logits.to_dtype(DType::F32)?.to_vec3::<f32>()?;
            for (i, clip) in seq.iter_mut().enumerate() {
                let mut step = 0f32;
                for (k, row) in clip.iter_mut().enumerate() {
                    if is_free(k, t, len, k_total) {
                        let (id, lp) = choose(&logits[i][k], &params.sampling, &mut rng);
                        row[t] = id as u32;
                        step += lp;
                    }
                }
                log_probs[i].push(step);
            }
            if t + 1 < len {
                let column: Vec<u32> = (0..rows)
                    .flat_map(|r| {
                        let clip = &seq[r % b];
                        (0..k_total).map(move |k| clip[k][t])
                    })
                    .collect();
                input = Tensor::from_vec(column, (rows, k_total, 1), &self.device)?;
            }
        }
        Ok(Generated {
            codes: seq.iter().map(|clip| undelay(clip)).collect(),
            log_probs,
        })
    }

    /// Guided logits `[b, K, frames + K - 1, vocab]` of every decoder step
    /// for codes `[b][K][frames]`, by teacher forcing: what the sampler
    /// drew from at each step.
    pub fn step_logits(
        &self,
        codes: &[Vec<Vec<u32>>],
        cond: &Conditioning,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let (input, _) = self.delayed_tensors(codes)?;
        let b = cond.batch()?;
        if b != codes.len() {
            return Err(MusicgenError::Input(format!(
                "codes: {} clips for {b} prompts",
                codes.len()
            )));
        }
        let (input, run) = if guidance_scale > 1.0 {
            (
                Tensor::cat(&[&input, &input], 0)?,
                cond.with_unconditional()?,
            )
        } else {
            (input, cond.clone())
        };
        let logits = self.decoder.forward(&input, &run, None)?;
        guide(&logits, b, guidance_scale)
    }

    /// Teacher-forced log-probs `[b, frames + K - 1]` of codes
    /// `[b][K][frames]` under the guided policy at temperature 1: per step,
    /// the sum over codebooks of the generated codes' log-probs. This is
    /// what [`Generated::log_probs`] holds when sampling is exact, and it is
    /// differentiable in the decoder's weights.
    pub fn log_probs(
        &self,
        codes: &[Vec<Vec<u32>>],
        cond: &Conditioning,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let logits = self.step_logits(codes, cond, guidance_scale)?;
        let (_, targets) = self.delayed_tensors(codes)?;
        let (_, k_total, steps, _) = logits.dims4()?;
        let len = steps + 1;
        let free: Vec<f32> = (0..k_total)
            .flat_map(|k| {
                (1..len).map(move |t| {
                    if is_free(k, t, len, k_total) {
                        1.0
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let free = Tensor::from_vec(free, (1, k_total, steps), &self.device)?;
        // Forced positions hold the pad id, outside the heads' vocabulary;
        // gather code 0 there and mask it out.
        let safe = targets.broadcast_mul(&free.to_dtype(DType::U32)?)?;
        let lp = log_softmax(&logits)?
            .gather(&safe.unsqueeze(3)?, 3)?
            .squeeze(3)?;
        Ok(lp.broadcast_mul(&free)?.sum(1)?)
    }

    /// Delayed decoder inputs `[b, K, L - 1]` and targets `[b, K, L - 1]`
    /// (u32) for codes `[b][K][frames]`, `L = frames + K`.
    fn delayed_tensors(&self, codes: &[Vec<Vec<u32>>]) -> Result<(Tensor, Tensor)> {
        let k_total = self.codebooks();
        let frames = codes.first().and_then(|c| c.first()).map_or(0, Vec::len);
        let vocab = self.cfg.decoder.vocab_size as u32;
        for (i, clip) in codes.iter().enumerate() {
            if clip.len() != k_total || clip.iter().any(|r| r.len() != frames) {
                return Err(MusicgenError::Input(format!(
                    "codes[{i}]: expected {k_total} codebooks of {frames} frames"
                )));
            }
            if let Some(bad) = clip.iter().flatten().find(|&&c| c >= vocab) {
                return Err(MusicgenError::Input(format!(
                    "codes[{i}]: code {bad} outside 0..{vocab}"
                )));
            }
        }
        if frames == 0 {
            return Err(MusicgenError::Input(
                "codes: at least one frame is needed".into(),
            ));
        }
        let (start, pad) = (self.cfg.start_token(), self.cfg.decoder.pad_token_id);
        let len = frames + k_total;
        let mut inputs = Vec::with_capacity(codes.len() * k_total * (len - 1));
        let mut targets = Vec::with_capacity(inputs.capacity());
        for clip in codes {
            for row in delay(clip, start, pad) {
                inputs.extend_from_slice(&row[..len - 1]);
                targets.extend_from_slice(&row[1..]);
            }
        }
        let shape = (codes.len(), k_total, len - 1);
        Ok((
            Tensor::from_vec(inputs, shape, &self.device)?,
            Tensor::from_vec(targets, shape, &self.device)?,
        ))
    }

    /// Waveforms `[b, samples]` (mono, at [`Musicgen::sample_rate`]) for
    /// codes `[b][K][frames]`.
    pub fn decode_audio(&self, codes: &[Vec<Vec<u32>>]) -> Result<Vec<Vec<f32>>> {
        let k_total = self.codebooks();
        let frames = codes.first().and_then(|c| c.first()).map_or(0, Vec::len);
        let flat: Vec<u32> = codes.iter().flatten().flatten().copied().collect();
        if flat.len() != codes.len() * k_total * frames || frames == 0 {
            return Err(MusicgenError::Input(format!(
                "codes: expected {k_total} codebooks of equal, non-zero length per clip"
            )));
        }
        let codes = Tensor::from_vec(flat, (codes.len(), k_total, frames), &self.device)?;
        let audio = self.codec.decode(&codes)?;
        Ok(audio.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

/// Classifier-free guidance over the first dimension: rows `0..b` are
/// conditional, `b..2b` unconditional. Without guidance, the logits as they
/// are.
fn guide(logits: &Tensor, b: usize, scale: f64) -> Result<Tensor> {
    if scale <= 1.0 {
        return Ok(logits.clone());
    }
    let cond = logits.narrow(0, 0, b)?;
    let uncond = logits.narrow(0, b, b)?;
    Ok((&uncond + ((cond - &uncond)? * scale)?)?)
}

/// Whether the checkpoint has `enc_to_dec_proj` (transformers adds it when
/// the text and decoder widths differ and no cross-attention width is set).
fn needs_projection(cfg: &MusicgenConfig) -> Result<bool> {
    Ok(cfg.t5()?.d_model != cfg.decoder.hidden_size
        && cfg.decoder.cross_attention_hidden_size.is_none())
}

/// The checkpoint's `tokenizer.json`, if it has one.
pub fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    Tokenizer::from_file(&path)
        .map(Some)
        .map_err(|e| MusicgenError::checkpoint(&path, e))
}

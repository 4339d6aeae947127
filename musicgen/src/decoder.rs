//! MusicGen's audio-token decoder (`MusicgenForCausalLM`): per-codebook
//! embeddings summed with sinusoidal positions, pre-norm transformer layers
//! with causal self-attention and cross-attention to the text, and one
//! linear head per codebook.
//!
//! Safetensors names follow transformers: `decoder.model.decoder.*` for the
//! body, `decoder.lm_heads.{k}` for the heads.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::{DecoderConfig, Result};

/// Additive mask value for text positions a row must not attend to. Finite,
/// so that a row with no text at all (the unconditional half of classifier-
/// free guidance) attends uniformly to zero states, as in transformers.
const MASKED: f32 = -1e9;

/// A linear layer applied to the last dimension, flattening the leading
/// ones into one matrix product (one GEMM, not one per row).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(inp: usize, out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let weight = vb.get_with_hints((out, inp), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out, "bias", candle_nn::init::ZERO)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A layer over the given weight `[out, inp]` and bias `[out]`.
    pub(crate) fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows = xs.elem_count() / inp;
        // `W x^T` with `x^T` contiguous, transposed back: candle's GEMM runs
        // this orientation faster than `x W^T` for the 2 to 64 rows of a
        // decoding step, 1.3x with gemm's AVX2 kernels and 2-4x with its
        // AVX-512 ones (measured on this 2-core CPU at 1024x4096).
        let xt = xs.reshape((rows, inp))?.t()?.contiguous()?;
        let ys = self.weight.matmul(&xt)?.t()?;
        let ys = match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight.dim(0)?;
        Ok(ys.reshape(out)?)
    }
}

/// The sinusoidal position table of transformers' MusicGen, computed in f32
/// exactly as it does (cosines first, then sines).
pub fn sinusoidal_positions(positions: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let scale = (10000f64.ln() / (half as f64 - 1.0)) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -scale).exp()).collect();
    let mut table = Vec::with_capacity(positions * dim);
    for p in 0..positions {
        let angles: Vec<f32> = freqs.iter().map(|f| p as f32 * f).collect();
        table.extend(angles.iter().map(|a| a.cos()));
        table.extend(angles.iter().map(|a| a.sin()));
        if dim % 2 == 1 {
            table.push(0.0);
        }
    }
    Ok(Tensor::from_vec(table, (positions, dim), device)?)
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q: Linear::new(d, d, false, vb.pp("q_proj"))?,
            k: Linear::new(d, d, false, vb.pp("k_proj"))?,
            v: Linear::new(d, d, false, vb.pp("v_proj"))?,
            out: Linear::new(d, d, false, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// `[b, t, d]` -> `[b, heads, t, head_dim]`.
    fn split(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        Ok(xs
            .reshape((b, t, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    fn keys_values(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split(&self.k.forward(xs)?)?,
            self.split(&self.v.forward(xs)?)?,
        ))
    }

    /// Attention of `xs` (`[b, t, d]`) over keys and values
    /// `[b, heads, s, head_dim]`, with an additive mask broadcastable to
    /// `[b, heads, t, s]`.
    fn attend(&self, xs: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = self.split(&(self.q.forward(xs)? * scale)?)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ys = probs.matmul(v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out.forward(&ys)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    self_attn: Attention,
    self_norm: LayerNorm,
    cross_attn: Attention,
    cross_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_norm: LayerNorm,
}

impl Layer {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let norm = |name: &str| candle_nn::layer_norm(d, 1e-5, vb.pp(name));
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            self_norm: norm("self_attn_layer_norm")?,
            cross_attn: Attention::new(cfg, vb.pp("encoder_attn"))?,
            cross_norm: norm("encoder_attn_layer_norm")?,
            fc1: Linear::new(d, cfg.ffn_dim, false, vb.pp("fc1"))?,
            fc2: Linear::new(cfg.ffn_dim, d, false, vb.pp("fc2"))?,
            final_norm: norm("final_layer_norm")?,
        })
    }
}

/// Keys and values of everything decoded so far, and the text's keys and
/// values, per layer: incremental decoding does one position per step.
///
/// Self-attention keys and values go into buffers that grow by doubling and
/// are written in place, so a step copies only its own position, not the
/// whole history.
#[derive(Debug)]
pub struct DecoderCache {
    past: Vec<candle_nn::kv_cache::KvCache>,
    cross: Vec<(Tensor, Tensor)>,
    cross_mask: Tensor,
    len: usize,
}

impl DecoderCache {
    /// Positions decoded so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first step.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Text conditioning as the decoder reads it: projected text states
/// `[b, s, hidden]`, zero at padding, and the mask `[b, s]` (1 = text).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Projected, masked text-encoder states.
    pub states: Tensor,
    /// 1.0 where a text token is, 0.0 at padding.
    pub mask: Tensor,
}

impl Conditioning {
    /// Rows of the batch.
    pub fn batch(&self) -> Result<usize> {
        Ok(self.states.dim(0)?)
    }

    /// These rows followed by as many unconditional ones (zero states, no
    /// text): the batch classifier-free guidance runs.
    pub fn with_unconditional(&self) -> Result<Self> {
        Ok(Self {
            states: Tensor::cat(&[&self.states, &self.states.zeros_like()?], 0)?,
            mask: Tensor::cat(&[&self.mask, &self.mask.zeros_like()?], 0)?,
        })
    }

    /// Each row repeated `n` times in place (row `i` becomes rows
    /// `i*n .. (i+1)*n`).
    pub fn repeat_rows(&self, n: usize) -> Result<Self> {
        let rep = |t: &Tensor| -> Result<Tensor> {
            let rows = t.dim(0)?;
            let index: Vec<u32> = (0..rows as u32)
                .flat_map(|i| std::iter::repeat_n(i, n))
                .collect();
            Ok(t.index_select(&Tensor::new(index, t.device())?, 0)?)
        };
        Ok(Self {
            states: rep(&self.states)?,
            mask: rep(&self.mask)?,
        })
    }

    /// The additive cross-attention mask `[b, 1, 1, s]`.
    fn additive(&self) -> Result<Tensor> {
        let m = ((self.mask.ones_like()? - &self.mask)? * f64::from(MASKED))?;
        Ok(m.unsqueeze(1)?.unsqueeze(1)?)
    }
}

/// The decoder and its heads.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed: Vec<candle_nn::Embedding>,
    layers: Vec<Layer>,
    norm: LayerNorm,
    heads: Vec<Linear>,
    positions: Tensor,
    cfg: DecoderConfig,
}

impl Decoder {
    /// Builds the decoder from `vb` at the checkpoint's root (it reads
    /// `decoder.model.decoder.*` and `decoder.lm_heads.*`).
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let body = vb.pp("decoder").pp("model").pp("decoder");
        let d = cfg.hidden_size;
        let embed = (0..cfg.num_codebooks)
            .map(|k| candle_nn::embedding(cfg.vocab_size + 1, d, body.pp("embed_tokens").pp(k)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, body.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = candle_nn::layer_norm(d, 1e-5, body.pp("layer_norm"))?;
        let heads = (0..cfg.num_codebooks)
            .map(|k| {
                Linear::new(
                    d,
                    cfg.vocab_size,
                    false,
                    vb.pp("decoder").pp("lm_heads").pp(k),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let positions = sinusoidal_positions(cfg.max_position_embeddings, d, vb.device())?;
        Ok(Self {
            embed,
            layers,
            norm,
            heads,
            positions,
            cfg: cfg.clone(),
        })
    }

    /// The decoder's config.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// A fresh cache for decoding with `cond`: the text's keys and values
    /// are computed here, once.
    pub fn cache(&self, cond: &Conditioning) -> Result<DecoderCache> {
        let cross = self
            .layers
            .iter()
            .map(|l| l.cross_attn.keys_values(&cond.states))
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderCache {
            past: (0..self.layers.len())
                .map(|_| candle_nn::kv_cache::KvCache::new(2, 64))
                .collect(),
            cross,
            cross_mask: cond.additive()?,
            len: 0,
        })
    }

    /// Logits `[b, K, t, vocab]` for the delayed ids `[b, K, t]` (u32).
    /// With a cache the ids continue what it holds (and are appended to it);
    /// without one they start at position 0 and attend to `cond` in full.
    pub fn forward(
        &self,
        ids: &Tensor,
        cond: &Conditioning,
        cache: Option<&mut DecoderCache>,
    ) -> Result<Tensor> {
        let (b, k_total, t) = ids.dims3()?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        let mut xs: Option<Tensor> = None;
        for (k, embed) in self.embed.iter().enumerate().take(k_total) {
            let e = candle_nn::Module::forward(embed, &ids.narrow(1, k, 1)?.squeeze(1)?)?;
            xs = Some(match xs {
                Some(acc) => (acc + e)?,
                None => e,
            });
        }
        let xs = xs.ok_or_else(|| crate::MusicgenError::Input("ids: no codebooks".into()))?;
        let pos = self.position_rows(past, t)?;
        let mut xs = xs.broadcast_add(&pos.unsqueeze(0)?)?;
        let self_mask = if t > 1 {
            Some(causal_mask(t, past, ids.device())?)
        } else {
            None
        };
        match cache {
            Some(cache) => {
                for (i, layer) in self.layers.iter().enumerate() {
                    let h = xs.apply(&layer.self_norm)?;
                    let (k_new, v_new) = layer.self_attn.keys_values(&h)?;
                    let (k, v) = cache.past[i].append(&k_new, &v_new)?;
                    xs = (&xs + layer.self_attn.attend(&h, &k, &v, self_mask.as_ref())?)?;
                    let (ck, cv) = &cache.cross[i];
                    xs = self.cross_and_ffn(layer, xs, ck, cv, &cache.cross_mask)?;
                }
                cache.len += t;
            }
            None => {
                let cross_mask = cond.additive()?;
                for layer in &self.layers {
                    let h = xs.apply(&layer.self_norm)?;
                    let (k, v) = layer.self_attn.keys_values(&h)?;
                    xs = (&xs + layer.self_attn.attend(&h, &k, &v, self_mask.as_ref())?)?;
                    let (ck, cv) = layer.cross_attn.keys_values(&cond.states)?;
                    xs = self.cross_and_ffn(layer, xs, &ck, &cv, &cross_mask)?;
                }
            }
        }
        let xs = xs.apply(&self.norm)?;
        let logits = self
            .heads
            .iter()
            .take(k_total)
            .map(|h| h.forward(&xs))
            .collect::<Result<Vec<_>>>()?;
        let logits = Tensor::stack(&logits, 1)?;
        debug_assert_eq!(logits.dims()[..3], [b, k_total, t]);
        Ok(logits)
    }

    fn cross_and_ffn(
        &self,
        layer: &Layer,
        xs: Tensor,
        ck: &Tensor,
        cv: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let h = xs.apply(&layer.cross_norm)?;
        let xs = (&xs + layer.cross_attn.attend(&h, ck, cv, Some(mask))?)?;
        let h = xs.apply(&layer.final_norm)?;
        let h = layer.fc2.forward(&layer.fc1.forward(&h)?.gelu_erf()?)?;
        Ok((xs + h)?)
    }

    /// Position rows `past .. past + t`, `[t, hidden]`.
    fn position_rows(&self, past: usize, t: usize) -> Result<Tensor> {
        if past + t <= self.positions.dim(0)? {
            Ok(self.positions.narrow(0, past, t)?)
        } else {
            let table =
                sinusoidal_positions(past + t, self.cfg.hidden_size, self.positions.device())?;
            Ok(table.narrow(0, past, t)?)
        }
    }
}

/// Additive causal mask `[t, past + t]`.
fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let s = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, s), device)?.to_dtype(DType::F32)?)
}

/// Log-softmax over the last dimension.
pub(crate) fn log_softmax(xs: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(xs, D::Minus1)?)
}

//! The policy: a decoder-only transformer over audio tokens, conditioned on a
//! caption embedding through a learned soft prompt.
//!
//! Sequence layout (positions left to right):
//!
//! ```text
//! [ prefix_0 .. prefix_{P-1} | BOS | y_0 .. y_{T-2} ]   input
//!                      logits at BOS .. y_{T-2}    ->   predict y_0 .. y_{T-1}
//! ```
//!
//! The caption embedding (from [`encore_corpus::text::TextEncoder`]) is
//! projected to a global conditioning vector added at every position, and
//! from it to `n_prefix` soft-prompt vectors, the way MusicLM conditions on a
//! MuLan embedding. Attention is causal over the whole sequence, so the prefix and
//! each generated token are computed once and kept in a [`KvCache`] while
//! sampling.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::{ModelError, PolicyConfig};

/// Keys and values of one attention layer for the positions seen so far,
/// in buffers `[batch, heads, max_positions, head_dim]` allocated once, so a
/// decoding step writes one column instead of copying the whole cache.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl LayerCache {
    fn append(&mut self, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let l = k.dim(2)?;
        if self.buffers.is_none() {
            let (b, h, _, hd) = k.dims4()?;
            let shape = (b, h, self.capacity, hd);
            self.buffers = Some((
                Tensor::zeros(shape, k.dtype(), k.device())?,
                Tensor::zeros(shape, v.dtype(), v.device())?,
            ));
        }
        if self.len + l > self.capacity {
            candle_core::bail!("kv cache full: {} + {l} > {}", self.len, self.capacity);
        }
        let (kb, vb) = self.buffers.as_ref().expect("allocated above");
        kb.slice_set(&k, 2, self.len)?;
        vb.slice_set(&v, 2, self.len)?;
        self.len += l;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// The caption's global conditioning vector, `[b, 1, d]`.
    global: Option<Tensor>,
}

impl KvCache {
    /// An empty cache for a policy with `n_layers` blocks and at most
    /// `positions` positions.
    pub fn new(n_layers: usize, positions: usize) -> Self {
        Self {
            layers: vec![
                LayerCache {
                    capacity: positions,
                    ..Default::default()
                };
                n_layers
            ],
            global: None,
        }
    }

    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    /// True before the first forward step.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Attention {
    qkv: Linear,
    out: Linear,
    n_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &PolicyConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            qkv: candle_nn::linear(cfg.d_model, 3 * cfg.d_model, vb.pp("qkv"))?,
            out: candle_nn::linear(cfg.d_model, cfg.d_model, vb.pp("out"))?,
            n_heads: cfg.n_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x`: `[b, l, d]`; `mask`: additive `[l, past + l]` or `None` for a
    /// single new position; `rope`: the rotary tables for the `l` positions.
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, l, 3, self.n_heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?; // [3, b, h, l, hd]
        let cache_used = cache.is_some();
        let q = rope.apply(&qkv.get(0)?.contiguous()?, cache_used)?;
        let k = rope.apply(&qkv.get(1)?.contiguous()?, cache_used)?;
        let v = qkv.get(2)?.contiguous()?;
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v)?,
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?; // [b, h, l, s]
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        // The fused softmax has no backward pass; decoding with a cache never
        // needs one, teacher forcing (training, log-probs) may.
        let weights = if cache_used {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        };
        let y = weights.matmul(&v)?; // [b, h, l, hd]
        let y = y.transpose(1, 2)?.reshape((b, l, d))?;
        self.out.forward(&y)
    }
}

/// Layer norm with a choice of kernel. candle's fused layer norm (what
/// `candle_nn::LayerNorm` runs on contiguous input) has no backward pass:
/// used while training, it silently cuts the gradient to everything below
/// it. Teacher forcing therefore runs the composed version; decoding, which
/// never needs gradients, the fused one.
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    const EPS: f32 = 1e-5;

    fn new(d: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(d, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        if fused {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, Self::EPS)
        } else {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, Self::EPS)
        }
    }
}

struct Block {
    ln1: Norm,
    attn: Attention,
    ln2: Norm,
    mlp_in: Linear,
    mlp_out: Linear,
}

impl Block {
    fn new(cfg: &PolicyConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            ln1: Norm::new(cfg.d_model, vb.pp("ln1"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ln2: Norm::new(cfg.d_model, vb.pp("ln2"))?,
            mlp_in: candle_nn::linear(cfg.d_model, cfg.d_ff, vb.pp("mlp_in"))?,
            mlp_out: candle_nn::linear(cfg.d_ff, cfg.d_model, vb.pp("mlp_out"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let fused = cache.is_some();
        let h = (x + self
            .attn
            .forward(&self.ln1.forward(x, fused)?, mask, rope, cache)?)?;
        let m = self
            .mlp_out
            .forward(&self.mlp_in.forward(&self.ln2.forward(&h, fused)?)?.gelu()?)?;
        h + m
    }
}

/// Rotary position tables (cos, sin), `[positions, head_dim / 2]`, for a
/// run of consecutive positions. Rotary embeddings let attention see how far
/// back a key is, which is what continuing a rhythm needs; the learned
/// absolute embeddings keep the position within the bar.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for every position of the policy.
    fn tables(cfg: &PolicyConfig, device: &Device) -> candle_core::Result<Rope> {
        let half = cfg.head_dim() / 2;
        let n = cfg.max_positions();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for i in 0..half {
                let freq = 1.0 / 10_000f64.powf(2.0 * i as f64 / (2 * half) as f64);
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (n, half), device)?,
            sin: Tensor::from_vec(sin, (n, half), device)?,
        })
    }

    /// The tables for positions `start..start + len`.
    fn window(&self, start: usize, len: usize) -> candle_core::Result<Rope> {
        Ok(Rope {
            cos: self.cos.narrow(0, start, len)?.contiguous()?,
            sin: self.sin.narrow(0, start, len)?.contiguous()?,
        })
    }

    /// Rotates `x` (`[b, h, l, hd]`). The fused kernel has no backward pass,
    /// so teacher forcing uses the composed one.
    fn apply(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        if fused {
            candle_nn::rotary_emb::rope(x, &self.cos, &self.sin)
        } else {
            candle_nn::rotary_emb::rope_slow(x, &self.cos, &self.sin)
        }
    }
}

struct Factored {
    matrix: Tensor,
    matrix_t: Tensor,
    emb: Tensor,
    head: Linear,
}

/// The text-conditioned autoregressive policy over audio tokens.
pub struct Policy {
    cfg: PolicyConfig,
    cond: Linear,
    cond_global: Linear,
    rope: Rope,
    tok_emb: Embedding,
    /// Factored vocabulary: the `[vocab, factors]` 0/1 matrix (a constant),
    /// the factors' input embeddings `[factors, d]` and their output weights.
    factored: Option<Factored>,
    pos_emb: Embedding,
    blocks: Vec<Block>,
    ln_f: Norm,
    head: Linear,
    device: Device,
}

impl Policy {
    /// Builds the policy; parameter names come from the `vb` prefixes
    /// (`cond_global`, `cond`, `tok_emb`, `pos_emb`, `blocks.N.*`, `ln_f`,
    /// `head`, and `factor_emb`, `factor_head` with a factored vocabulary).
    pub fn new(cfg: &PolicyConfig, vb: VarBuilder) -> Result<Self, ModelError> {
        cfg.validate()?;
        let d = cfg.d_model;
        let blocks = (0..cfg.n_layers)
            .map(|i| Block::new(cfg, vb.pp("blocks").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let factored = if cfg.factored_vocab {
            let matrix = crate::factors::factor_matrix(vb.device())?;
            let k = crate::factors::NUM_FACTORS;
            Some(Factored {
                matrix_t: matrix.t()?.contiguous()?,
                matrix,
                emb: vb.pp("factor_emb").get((k, d), "weight")?,
                head: candle_nn::linear_no_bias(d, k, vb.pp("factor_head"))?,
            })
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            cond: candle_nn::linear(d, cfg.n_prefix * d, vb.pp("cond"))?,
            cond_global: candle_nn::linear(cfg.text_dim, d, vb.pp("cond_global"))?,
            rope: Rope::tables(cfg, vb.device())?,
            tok_emb: candle_nn::embedding(cfg.vocab_size, d, vb.pp("tok_emb"))?,
            factored,
            pos_emb: candle_nn::embedding(cfg.max_positions(), d, vb.pp("pos_emb"))?,
            blocks,
            ln_f: Norm::new(d, vb.pp("ln_f"))?,
            head: candle_nn::linear(d, cfg.vocab_size, vb.pp("head"))?,
            device: vb.device().clone(),
        })
    }

    /// The policy's shape.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Input embeddings of token ids `[b, l]` -> `[b, l, d]`.
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.tok_emb.forward(ids)?;
        match &self.factored {
            Some(f) => {
                let (b, l) = ids.dims2()?;
                let rows = f.matrix.index_select(&ids.flatten_all()?, 0)?; // [b*l, k]
                let extra = rows.matmul(&f.emb)?.reshape((b, l, self.cfg.d_model))?;
                x + extra
            }
            None => Ok(x),
        }
    }

    /// Output logits for hidden states `[b, l, d]` -> `[b, l, vocab]`.
    fn logits(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.head.forward(h)?;
        match &self.factored {
            Some(f) => {
                let (b, l, _) = h.dims3()?;
                let per_factor = f
                    .head
                    .forward(h)?
                    .reshape((b * l, crate::factors::NUM_FACTORS))?;
                let extra = per_factor
                    .matmul(&f.matrix_t)?
                    .reshape((b, l, self.cfg.vocab_size))?;
                logits + extra
            }
            None => Ok(logits),
        }
    }

    /// Runs `x` (`[b, l, d]`, already embedded, at positions `past..past+l`)
    /// through the blocks and returns logits `[b, l, vocab]`.
    /// `global` (`[b, 1, d]`) is the caption's global conditioning vector,
    /// added at every position.
    fn run(
        &self,
        x: Tensor,
        past: usize,
        global: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (_, l, _) = x.dims3()?;
        let positions = Tensor::arange(past as u32, (past + l) as u32, &self.device)?;
        let mut x = x
            .broadcast_add(&self.pos_emb.forward(&positions)?)?
            .broadcast_add(global)?;
        let mask = if l > 1 {
            Some(causal_mask(l, past, &self.device)?)
        } else {
            None
        };
        let rope = self.rope.window(past, l)?;
        let fused = cache.is_some();
        match cache {
            Some(cache) => {
                for (block, layer) in self.blocks.iter().zip(cache.layers.iter_mut()) {
                    x = block.forward(&x, mask.as_ref(), &rope, Some(layer))?;
                }
            }
            None => {
                for block in &self.blocks {
                    x = block.forward(&x, mask.as_ref(), &rope, None)?;
                }
            }
        }
        self.logits(&self.ln_f.forward(&x, fused)?)
    }

    /// The global conditioning vector for caption embeddings `text`:
    /// `[b, 1, d]`.
    fn global(&self, text: &Tensor) -> candle_core::Result<Tensor> {
        self.cond_global.forward(text)?.unsqueeze(1)
    }

    /// The soft prompt for the global conditioning vectors `global`
    /// (`[b, 1, d]`), followed by the start token: `[b, n_prefix + 1, d]`.
    fn prompt(&self, global: &Tensor) -> candle_core::Result<Tensor> {
        let b = global.dim(0)?;
        let prefix = self.cond.forward(&global.squeeze(1)?)?.reshape((
            b,
            self.cfg.n_prefix,
            self.cfg.d_model,
        ))?;
        let bos = Tensor::full(encore_codec::BOS, (b, 1), &self.device)?;
        Tensor::cat(&[&prefix, &self.embed(&bos)?], 1)
    }

    fn check_inputs(&self, tokens: &Tensor, text: &Tensor) -> Result<(usize, usize), ModelError> {
        let (b, t) = tokens.dims2()?;
        let (bt, dim) = text.dims2()?;
        if bt != b {
            return Err(ModelError::Shape(format!(
                "text: batch {bt} does not match tokens batch {b}"
            )));
        }
        if dim != self.cfg.text_dim {
            return Err(ModelError::Shape(format!(
                "text: width {dim}, the policy expects {}",
                self.cfg.text_dim
            )));
        }
        if t == 0 || t > self.cfg.max_frames {
            return Err(ModelError::Shape(format!(
                "tokens: length {t} outside 1..={}",
                self.cfg.max_frames
            )));
        }
        Ok((b, t))
    }

    /// Teacher-forced logits: for clips `tokens` (`[b, t]`, u32) and caption
    /// embeddings `text` (`[b, text_dim]`), returns `[b, t, vocab]` where row
    /// `i` is the distribution over `tokens[:, i]` given everything before it.
    pub fn forward(&self, tokens: &Tensor, text: &Tensor) -> Result<Tensor, ModelError> {
        let (_, t) = self.check_inputs(tokens, text)?;
        let global = self.global(text)?;
        let prompt = self.prompt(&global)?;
        let x = if t > 1 {
            let body = self.embed(&tokens.narrow(1, 0, t - 1)?)?;
            Tensor::cat(&[&prompt, &body], 1)?
        } else {
            prompt
        };
        let logits = self.run(x, 0, &global, None)?;
        Ok(logits.narrow(1, self.cfg.n_prefix, t)?)
    }

    /// Per-token log-probabilities `[b, t]` of `tokens` under the policy
    /// (temperature 1, no truncation). Differentiable: the learner's loss and
    /// the KL to the reference policy are built on it. The sequence
    /// log-probability is the sum over `t`.
    pub fn log_probs(&self, tokens: &Tensor, text: &Tensor) -> Result<Tensor, ModelError> {
        let logits = self.forward(tokens, text)?;
        let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let tokens = tokens.to_dtype(DType::U32)?.unsqueeze(2)?;
        Ok(log_p.gather(&tokens, 2)?.squeeze(2)?)
    }

    /// Mean next-token cross-entropy (nats per token) of `tokens`: the
    /// pretraining loss.
    pub fn loss(&self, tokens: &Tensor, text: &Tensor) -> Result<Tensor, ModelError> {
        let logits = self.forward(tokens, text)?;
        let (b, t, v) = logits.dims3()?;
        let flat = logits.reshape((b * t, v))?;
        let targets = tokens.reshape(b * t)?;
        Ok(candle_nn::loss::cross_entropy(&flat, &targets)?)
    }

    /// Starts incremental decoding: processes the prompt for `text`
    /// (`[b, text_dim]`) into a fresh cache and returns the logits for the
    /// first audio token, `[b, vocab]`.
    pub fn start(&self, text: &Tensor) -> Result<(Tensor, KvCache), ModelError> {
        let mut cache = KvCache::new(self.cfg.n_layers, self.cfg.max_positions());
        let global = self.global(text)?;
        let prompt = self.prompt(&global)?;
        let l = prompt.dim(1)?;
        let logits = self.run(prompt, 0, &global, Some(&mut cache))?;
        cache.global = Some(global);
        Ok((logits.narrow(1, l - 1, 1)?.squeeze(1)?, cache))
    }

    /// Feeds one token per row (`[b]`, u32) after the positions in `cache` and
    /// returns the logits for the next token, `[b, vocab]`.
    pub fn step(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let past = cache.len();
        if past >= self.cfg.max_positions() {
            return Err(ModelError::Shape(format!(
                "tokens: cannot decode past {} frames",
                self.cfg.max_frames
            )));
        }
        let global = cache.global.clone().ok_or_else(|| {
            ModelError::Shape("cache: decoding must begin with Policy::start".into())
        })?;
        let x = self.embed(&tokens.unsqueeze(1)?)?;
        let logits = self.run(x, past, &global, Some(cache))?;
        Ok(logits.squeeze(1)?)
    }
}

/// Additive causal mask `[l, past + l]`: query `i` (at position `past + i`)
/// sees keys `0..=past + i`.
fn causal_mask(l: usize, past: usize, device: &Device) -> candle_core::Result<Tensor> {
    let s = past + l;
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| (0..s).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (l, s), device)
}

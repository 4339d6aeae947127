//! The decoding half of EnCodec (codes -> waveform) as transformers runs it:
//! residual vector quantizer lookup, SEANet decoder with weight-normalised
//! convolutions, reflect padding and trimmed transposed convolutions.
//!
//! candle-transformers has an EnCodec too, but it cannot read these
//! checkpoints: it has no reflect padding, does not trim its transposed
//! convolutions, reads neither transformers 5's weight-norm parametrisation
//! nor snake-case config values.
//!
//! Weight norm is folded at load time (`w = g * v / |v|`); both layouts are
//! read: `weight_g`/`weight_v` (older checkpoints, the ones on the Hub) and
//! `parametrizations.weight.original0/1` (transformers 5).

use std::path::Path;

use candle_core::{D, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;

use crate::decoder::Linear;
use crate::{CONFIG_FILE, EncodecConfig, MusicgenError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pad {
    Reflect,
    Constant,
    Replicate,
}

/// A weight-normalised weight `[a, b, k]` whose norm is taken over every
/// dimension but the first.
fn weight_norm(vb: &VarBuilder, shape: (usize, usize, usize)) -> Result<Tensor> {
    let (g, v) = if vb.contains_tensor("parametrizations.weight.original0") {
        (
            vb.get((shape.0, 1, 1), "parametrizations.weight.original0")?,
            vb.get(shape, "parametrizations.weight.original1")?,
        )
    } else {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        (
            vb.get_with_hints((shape.0, 1, 1), "weight_g", candle_nn::init::ONE)?,
            vb.get_with_hints(shape, "weight_v", init)?,
        )
    };
    let norm = v.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
    Ok(v.broadcast_mul(&g)?.broadcast_div(&norm)?)
}

#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    dilation: usize,
    causal: bool,
    pad: Pad,
}

impl Conv {
    fn new(
        cfg: &EncodecConfig,
        inp: usize,
        out: usize,
        k: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("conv");
        Ok(Self {
            weight: weight_norm(&vb, (out, inp, k))?,
            bias: vb.get_with_hints(out, "bias", candle_nn::init::ZERO)?,
            stride: 1,
            dilation,
            causal: cfg.use_causal_conv,
            pad: match cfg.pad_mode.as_str() {
                "reflect" => Pad::Reflect,
                "replicate" => Pad::Replicate,
                _ => Pad::Constant,
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let k = (self.weight.dim(2)? - 1) * self.dilation + 1;
        let total = k - self.stride;
        let len = xs.dim(D::Minus1)?;
        // transformers' `_get_extra_padding_for_conv1d`.
        let frames = ((len + total) as f64 - k as f64) / self.stride as f64 + 1.0;
        let ideal = ((frames.ceil() as usize).saturating_sub(1)) * self.stride + k - total;
        let extra = ideal.saturating_sub(len);
        let (left, right) = if self.causal {
            (total, extra)
        } else {
            let right = total / 2;
            (total - right, right + extra)
        };
        let xs = pad1d(xs, left, right, self.pad)?;
        // candle unfolds the whole input (`[b, out_len, c_in * k]`; 460 MB at
        // musicgen-small's last layer for 8 clips of 1 s) before one
        // product; windows of `CONV_WINDOW` outputs keep that buffer small
        // and warm. Each output still sums the same inputs in the same
        // order.
        let out_len = (xs.dim(D::Minus1)? - k) / self.stride + 1;
        let mut parts = Vec::with_capacity(out_len.div_ceil(CONV_WINDOW));
        for start in (0..out_len).step_by(CONV_WINDOW) {
            let n = CONV_WINDOW.min(out_len - start);
            let window = xs
                .narrow(D::Minus1, start * self.stride, (n - 1) * self.stride + k)?
                .contiguous()?;
            parts.push(window.conv1d(&self.weight, 0, self.stride, self.dilation, 1)?);
        }
        let ys = Tensor::cat(&parts, D::Minus1)?;
        Ok(ys.broadcast_add(&self.bias.reshape((1, (), 1))?)?)
    }
}

/// Output positions per convolution window in [`Conv::forward`].
const CONV_WINDOW: usize = 2048;

/// Pads the last dimension; reflect padding of an input shorter than the pad
/// first zero-pads it on the right, as transformers does.
fn pad1d(xs: &Tensor, left: usize, right: usize, mode: Pad) -> Result<Tensor> {
    Ok(match mode {
        Pad::Constant => xs.pad_with_zeros(D::Minus1, left, right)?,
        Pad::Replicate => xs.pad_with_same(D::Minus1, left, right)?,
        Pad::Reflect => {
            let len = xs.dim(D::Minus1)?;
            let max_pad = left.max(right);
            let (xs, extra) = if len <= max_pad {
                let extra = max_pad - len + 1;
                (xs.pad_with_zeros(D::Minus1, 0, extra)?, extra)
            } else {
                (xs.clone(), 0)
            };
            let n = len + extra;
            let index: Vec<u32> = (0..left)
                .map(|i| (left - i) as u32)
                .chain((0..n).map(|i| i as u32))
                .chain((0..right).map(|i| (n - 2 - i) as u32))
                .collect();
            let index = Tensor::new(index, xs.device())?;
            let padded = xs.index_select(&index, xs.rank() - 1)?;
            let total = padded.dim(D::Minus1)?;
            padded.narrow(D::Minus1, 0, total - extra)?
        }
    })
}

#[derive(Debug, Clone)]
struct ConvTranspose {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    trim_left: usize,
    trim_right: usize,
}

impl ConvTranspose {
    fn new(
        cfg: &EncodecConfig,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("conv");
        let total = k - stride;
        let trim_right = if cfg.use_causal_conv {
            (total as f64 * cfg.trim_right_ratio).ceil() as usize
        } else {
            total / 2
        };
        Ok(Self {
            weight: weight_norm(&vb, (inp, out, k))?,
            bias: vb.get_with_hints(out, "bias", candle_nn::init::ZERO)?,
            stride,
            trim_left: total - trim_right,
            trim_right,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = conv_transpose1d(xs, &self.weight, self.stride)?;
        let ys = ys.broadcast_add(&self.bias.reshape((1, (), 1))?)?;
        let len = ys.dim(D::Minus1)?;
        Ok(ys.narrow(
            D::Minus1,
            self.trim_left,
            len - self.trim_left - self.trim_right,
        )?)
    }
}

/// A transposed 1-d convolution (no padding, no dilation) as one matrix
/// product and an overlap-add: every input frame contributes a `[c_out, k]`
/// patch at `t * stride`. candle 0.11's `conv_transpose1d` gives wrong
/// results on the CPU for batches of several channels (checked against
/// torch), and this is also faster.
fn conv_transpose1d(xs: &Tensor, weight: &Tensor, stride: usize) -> Result<Tensor> {
    let (b, c_in, t) = xs.dims3()?;
    let (_, c_out, k) = weight.dims3()?;
    let chunks = k.div_ceil(stride);
    let weight = weight.pad_with_zeros(2, 0, chunks * stride - k)?;
    // [b, t, c_in] x [c_in, c_out * chunks * stride] -> [b, t, c_out, chunks, stride]
    let patches = xs
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * t, c_in))?
        .matmul(&weight.reshape((c_in, c_out * chunks * stride))?)?
        .reshape((b, t, c_out, chunks, stride))?;
    let mut out: Option<Tensor> = None;
    for j in 0..chunks {
        // Chunk j of frame t lands at (t + j) * stride.
        let part = patches
            .narrow(3, j, 1)?
            .squeeze(3)?
            .permute((0, 2, 1, 3))?
            .reshape((b, c_out, t * stride))?
            .pad_with_zeros(2, j * stride, (chunks - 1 - j) * stride)?;
        out = Some(match out {
            Some(acc) => (acc + part)?,
            None => part,
        });
    }
    let out =
        out.ok_or_else(|| crate::MusicgenError::Input("conv_transpose1d: empty kernel".into()))?;
    Ok(out.narrow(2, 0, (t - 1) * stride + k)?)
}

/// One LSTM layer (PyTorch's gate order: input, forget, cell, output).
///
/// The input projection of every time step is one matrix product up front;
/// only the recurrent product `W_hh h` runs per step. (candle_nn's LSTM
/// does both per step, as `x W^T` products, the slow orientation of
/// candle's GEMM for a few rows.)
#[derive(Debug, Clone)]
struct LstmLayer {
    /// `W_ih`, with both biases.
    input: Linear,
    /// `W_hh`, no bias.
    recurrent: Linear,
    dim: usize,
}

impl LstmLayer {
    fn new(dim: usize, index: usize, vb: &VarBuilder) -> Result<Self> {
        let w_ih = vb.get((4 * dim, dim), &format!("weight_ih_l{index}"))?;
        let w_hh = vb.get((4 * dim, dim), &format!("weight_hh_l{index}"))?;
        let b_ih = vb.get(4 * dim, &format!("bias_ih_l{index}"))?;
        let b_hh = vb.get(4 * dim, &format!("bias_hh_l{index}"))?;
        Ok(Self {
            input: Linear::from_parts(w_ih, Some((b_ih + b_hh)?)),
            recurrent: Linear::from_parts(w_hh, None),
            dim,
        })
    }

    /// `[b, t, dim]` -> the hidden states `[b, t, dim]`, from zero state.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let d = self.dim;
        let gates_in = self.input.forward(xs)?;
        let mut h = Tensor::zeros((b, d), xs.dtype(), xs.device())?;
        let mut c = h.clone();
        let mut out = Vec::with_capacity(t);
        for step in 0..t {
            let gates = (gates_in.i((.., step, ..))? + self.recurrent.forward(&h)?)?;
            let gate = |k: usize| gates.narrow(1, k * d, d);
            let input = candle_nn::ops::sigmoid(&gate(0)?)?;
            let forget = candle_nn::ops::sigmoid(&gate(1)?)?;
            let cell = gate(2)?.tanh()?;
            let output = candle_nn::ops::sigmoid(&gate(3)?)?;
            c = ((forget * &c)? + (input * cell)?)?;
            h = (output * c.tanh()?)?;
            out.push(h.clone());
        }
        Ok(Tensor::stack(&out, 1)?)
    }
}

#[derive(Debug, Clone)]
struct Lstm {
    layers: Vec<LstmLayer>,
}

impl Lstm {
    fn new(cfg: &EncodecConfig, dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("lstm");
        let layers = (0..cfg.num_lstm_layers)
            .map(|index| LstmLayer::new(dim, index, &vb))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// `[b, c, t]` -> `[b, c, t]`, with the residual connection.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let input = xs.transpose(1, 2)?.contiguous()?;
        let mut h = input.clone();
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        Ok((h + input)?.transpose(1, 2)?.contiguous()?)
    }
}

#[derive(Debug, Clone)]
struct Resnet {
    conv1: Conv,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn new(cfg: &EncodecConfig, dim: usize, dilation: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = dim / cfg.compress;
        let block = vb.pp("block");
        Ok(Self {
            conv1: Conv::new(
                cfg,
                dim,
                hidden,
                cfg.residual_kernel_size,
                dilation,
                block.pp(1),
            )?,
            conv2: Conv::new(cfg, hidden, dim, 1, 1, block.pp(3))?,
            shortcut: if cfg.use_conv_shortcut {
                Some(Conv::new(cfg, dim, dim, 1, 1, vb.pp("shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&xs.elu(1.0)?)?;
        let h = self.conv2.forward(&h.elu(1.0)?)?;
        let residual = match &self.shortcut {
            Some(s) => s.forward(xs)?,
            None => xs.clone(),
        };
        Ok((residual + h)?)
    }
}

/// EnCodec's quantizer lookup and decoder.
#[derive(Debug, Clone)]
pub struct EncodecDecoder {
    codebooks: Vec<Tensor>,
    first: Conv,
    lstm: Lstm,
    stages: Vec<(ConvTranspose, Vec<Resnet>)>,
    last: Conv,
    cfg: EncodecConfig,
}

impl EncodecDecoder {
    /// Loads only the codec of a MusicGen checkpoint directory: the
    /// `audio_encoder` key of `config.json` and the `audio_encoder.*`
    /// tensors of `model.safetensors` (memory-mapped, so the text encoder
    /// and decoder weights are never read). A reward server decodes a
    /// policy's codes with it.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| MusicgenError::checkpoint(&path, e))?;
        let mut json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| MusicgenError::checkpoint(&path, e))?;
        let section = json.get_mut("audio_encoder").map(serde_json::Value::take);
        let Some(section) = section else {
            return Err(MusicgenError::checkpoint(
                &path,
                "no audio_encoder key: not a MusicGen checkpoint",
            ));
        };
        let cfg: EncodecConfig = serde_json::from_value(section)
            .map_err(|e| MusicgenError::checkpoint(&path, format!("audio_encoder: {e}")))?;
        cfg.validate()?;
        let vb = crate::config::mmap_weights(dir, device)?;
        Self::new(&cfg, vb.pp("audio_encoder"))
    }

    /// Builds it from `vb` at the checkpoint's `audio_encoder` prefix.
    pub fn new(cfg: &EncodecConfig, vb: VarBuilder) -> Result<Self> {
        let codebooks = (0..cfg.num_quantizers())
            .map(|i| {
                vb.pp("quantizer")
                    .pp("layers")
                    .pp(i)
                    .pp("codebook")
                    .get_with_hints(
                        (cfg.codebook_size, cfg.codebook_dim()),
                        "embed",
                        candle_nn::init::Init::Randn {
                            mean: 0.0,
                            stdev: 1.0,
                        },
                    )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let layers = vb.pp("decoder").pp("layers");
        let mut scale = 1usize << cfg.upsampling_ratios.len();
        let mut index = 0;
        let first = Conv::new(
            cfg,
            cfg.hidden_size,
            scale * cfg.num_filters,
            cfg.kernel_size,
            1,
            layers.pp(index),
        )?;
        index += 1;
        let lstm = Lstm::new(cfg, scale * cfg.num_filters, layers.pp(index))?;
        index += 1;
        let mut stages = Vec::with_capacity(cfg.upsampling_ratios.len());
        for &ratio in &cfg.upsampling_ratios {
            let dim = scale * cfg.num_filters;
            index += 1; // ELU
            let up = ConvTranspose::new(cfg, dim, dim / 2, ratio * 2, ratio, layers.pp(index))?;
            index += 1;
            let mut resnets = Vec::with_capacity(cfg.num_residual_layers);
            for j in 0..cfg.num_residual_layers {
                let dilation = cfg.dilation_growth_rate.pow(j as u32);
                resnets.push(Resnet::new(cfg, dim / 2, dilation, layers.pp(index))?);
                index += 1;
            }
            stages.push((up, resnets));
            scale /= 2;
        }
        index += 1; // ELU
        let last = Conv::new(
            cfg,
            cfg.num_filters,
            cfg.audio_channels,
            cfg.last_kernel_size,
            1,
            layers.pp(index),
        )?;
        Ok(Self {
            codebooks,
            first,
            lstm,
            stages,
            last,
            cfg: cfg.clone(),
        })
    }

    /// Output sample rate, Hz.
    pub fn sample_rate(&self) -> u32 {
        self.cfg.sampling_rate
    }

    /// Samples per code frame.
    pub fn hop_length(&self) -> usize {
        self.cfg.hop_length()
    }

    /// Code frames per second of audio.
    pub fn frame_rate(&self) -> usize {
        self.cfg.frame_rate()
    }

    /// Codebooks of the residual quantizer (the most [`Self::decode`] takes).
    pub fn codebooks(&self) -> usize {
        self.codebooks.len()
    }

    /// Codes per codebook; every code must be below it.
    pub fn codebook_size(&self) -> usize {
        self.cfg.codebook_size
    }

    /// The codec's config.
    pub fn config(&self) -> &EncodecConfig {
        &self.cfg
    }

    /// Waveforms `[b, channels, frames * hop]` for codes `[b, K, frames]`
    /// (u32); `K` may be fewer than the codec's codebooks.
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let (_, k_total, _) = codes.dims3()?;
        if k_total > self.codebooks.len() {
            return Err(crate::MusicgenError::Input(format!(
                "codes: {k_total} codebooks, the codec has {}",
                self.codebooks.len()
            )));
        }
        let mut latent: Option<Tensor> = None;
        for (k, book) in self.codebooks.iter().enumerate().take(k_total) {
            let ids = codes.i((.., k, ..))?.contiguous()?;
            let (b, t) = ids.dims2()?;
            let q = book
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, ()))?
                .transpose(1, 2)?;
            latent = Some(match latent {
                Some(acc) => (acc + q)?,
                None => q,
            });
        }
        let latent =
            latent.ok_or_else(|| crate::MusicgenError::Input("codes: no codebooks".into()))?;
        let mut xs = self.first.forward(&latent.contiguous()?)?;
        xs = self.lstm.forward(&xs)?;
        for (up, resnets) in &self.stages {
            xs = up.forward(&xs.elu(1.0)?)?;
            for r in resnets {
                xs = r.forward(&xs)?;
            }
        }
        self.last.forward(&xs.elu(1.0)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{CONV_WINDOW, Conv, Pad, pad1d};

    #[test]
    fn a_convolution_in_windows_equals_one_over_the_whole_input() {
        let device = Device::Cpu;
        for (dilation, pad, causal) in [(1, Pad::Reflect, false), (3, Pad::Constant, true)] {
            let conv = Conv {
                weight: Tensor::randn(0f32, 1.0, (5, 4, 7), &device).expect("weight"),
                bias: Tensor::randn(0f32, 1.0, 5, &device).expect("bias"),
                stride: 1,
                dilation,
                causal,
                pad,
            };
            // More than two windows, the last one partial.
            let len = 2 * CONV_WINDOW + 123;
            let xs = Tensor::randn(0f32, 1.0, (2, 4, len), &device).expect("input");
            let windowed = conv.forward(&xs).expect("windowed");
            let k = 6 * dilation + 1;
            let (left, right) = if causal {
                (k - 1, 0)
            } else {
                (k - 1 - (k - 1) / 2, (k - 1) / 2)
            };
            let whole = pad1d(&xs, left, right, pad)
                .expect("pad")
                .conv1d(&conv.weight, 0, 1, dilation, 1)
                .expect("conv")
                .broadcast_add(&conv.bias.reshape((1, 5, 1)).expect("bias"))
                .expect("bias");
            assert_eq!(windowed.dims(), [2, 5, len]);
            let gap = (windowed - whole)
                .expect("sub")
                .abs()
                .expect("abs")
                .max_all()
                .expect("max")
                .to_scalar::<f32>()
                .expect("scalar");
            assert!(gap < 1e-4, "dilation {dilation}: windows differ by {gap}");
        }
    }
}

//! Network building blocks shared by the three reward models: an audio tower
//! (dilated 1-D convolutions over feature rows with masked statistics
//! pooling) and a text tower over the hashed caption features.
//!
//! Every op here has a backward pass in candle (candle's fused layer norm and
//! its convolution kernels are avoided for that reason, see
//! docs/reward-models.md). Convolutions are written as one matrix product
//! over shifted copies of the input, which is also the fastest form on CPU.
//!
//! Padding never changes a clip's embedding: padded rows are zeroed after
//! every block, which is exactly the zero padding a lone clip sees at its
//! ends, so a clip scores the same alone and in a padded batch.

use candle_core::{D, Module, Tensor};
use candle_nn::{Linear, VarBuilder, linear};
use serde::{Deserialize, Serialize};

/// Shape of the towers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchConfig {
    /// Feature rows (token frames) folded into one row before the first
    /// layer: the tower runs at `25 / stride` Hz.
    pub stride: usize,
    /// Channels of the audio tower.
    pub channels: usize,
    /// Kernel width of every convolution, in feature rows (token frames).
    pub kernel: usize,
    /// Dilation of each residual convolution block, in order.
    pub dilations: Vec<usize>,
    /// Width of the audio and text embeddings.
    pub embed_dim: usize,
    /// Hidden width of the text tower and of the scoring heads.
    pub hidden: usize,
}

impl Default for ArchConfig {
    /// The tower runs at 12.5 Hz; its receptive field is 33 rows (66
    /// token frames, 2.6 s), two beats at the slowest tempo, and its last
    /// block also sees the whole clip's mean.
    fn default() -> Self {
        Self {
            stride: 2,
            channels: 64,
            kernel: 3,
            dilations: vec![1, 2, 4, 8],
            embed_dim: 128,
            hidden: 128,
        }
    }
}

impl ArchConfig {
    /// A narrow tower (16 channels, two blocks) that scores in
    /// milliseconds: for tests of the code around the models.
    pub fn tiny() -> Self {
        Self {
            channels: 16,
            dilations: vec![1, 2],
            embed_dim: 16,
            hidden: 16,
            ..ArchConfig::default()
        }
    }

    /// Receptive field of the audio tower, in token frames.
    pub fn receptive_field(&self) -> usize {
        self.stride * self.receptive_rows()
    }

    /// Receptive field of the audio tower's convolutions (the dilated
    /// blocks and the context block), in its own rows.
    pub fn receptive_rows(&self) -> usize {
        self.kernel
            + self
                .dilations
                .iter()
                .map(|d| d * (self.kernel - 1))
                .sum::<usize>()
    }
}

/// RMS normalisation with a learned gain, composed from differentiable ops.
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn new(d: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + 1e-5)?.sqrt()?)?
            .broadcast_mul(&self.weight)
    }
}

/// A dilated "same" convolution over time on `[batch, frames, channels]`.
struct Conv {
    proj: Linear,
    kernel: usize,
    dilation: usize,
}

impl Conv {
    fn new(
        channels: usize,
        kernel: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            proj: linear(kernel * channels, channels, vb)?,
            kernel,
            dilation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let pad = self.dilation * (self.kernel - 1) / 2;
        let zeros = Tensor::zeros((b, pad, c), x.dtype(), x.device())?;
        let padded = Tensor::cat(&[&zeros, x, &zeros], 1)?;
        // [b, t, kernel * c]: tap j of row i is input row i + (j - k/2) * dilation.
        let taps: Vec<Tensor> = (0..self.kernel)
            .map(|j| padded.narrow(1, j * self.dilation, t))
            .collect::<candle_core::Result<_>>()?;
        linear_rows(&self.proj, &Tensor::cat(&taps, 2)?)
    }
}

/// A pre-norm residual block: `h + conv(relu(norm(h)))`.
struct Block {
    norm: RmsNorm,
    conv: Conv,
}

/// Audio tower: feature rows in, one embedding per clip out.
pub struct AudioTower {
    stride: usize,
    stem: Linear,
    blocks: Vec<Block>,
    /// Projects the clip's mean features back onto every row, so that the
    /// last block judges each moment against the whole clip (a note against
    /// the key, a timbre against the instrument).
    context: Linear,
    context_block: Block,
    out_norm: RmsNorm,
    proj: Linear,
}

impl AudioTower {
    /// Builds the tower for feature rows of `width` values.
    pub fn new(cfg: &ArchConfig, width: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = cfg.channels;
        if cfg.stride == 0 {
            candle_core::bail!("arch.stride must be at least 1");
        }
        let blocks = cfg
            .dilations
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(Block {
                    norm: RmsNorm::new(c, vb.pp("norm"))?,
                    conv: Conv::new(c, cfg.kernel, d, vb.pp("conv"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            stride: cfg.stride,
            stem: linear(cfg.stride * width, c, vb.pp("stem"))?,
            blocks,
            context: linear(c, c, vb.pp("context"))?,
            context_block: Block {
                norm: RmsNorm::new(c, vb.pp("context_block.norm"))?,
                conv: Conv::new(c, cfg.kernel, 1, vb.pp("context_block.conv"))?,
            },
            out_norm: RmsNorm::new(c, vb.pp("out_norm"))?,
            proj: linear(3 * c, cfg.embed_dim, vb.pp("proj"))?,
        })
    }

    /// Rows the tower folds into one.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// `x`: `[b, t, width]` with `t` a multiple of the stride, `mask`:
    /// `[b, t / stride, 1]` -> `[b, embed_dim]`.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, w) = x.dims3()?;
        if t % self.stride != 0 {
            candle_core::bail!(
                "{t} feature rows are not a multiple of the stride {}",
                self.stride
            );
        }
        let x = x.reshape((b, t / self.stride, self.stride * w))?;
        let mut h = linear_rows(&self.stem, &x)?.broadcast_mul(mask)?;
        for block in &self.blocks {
            h = block.forward(&h, mask)?;
        }
        let len = mask.sum(1)?.clamp(1.0, f64::INFINITY)?; // [b, 1]
        let context = self.context.forward(&h.sum(1)?.broadcast_div(&len)?)?; // [b, c]
        let h = h
            .broadcast_add(&context.unsqueeze(1)?)?
            .broadcast_mul(mask)?;
        let h = self.context_block.forward(&h, mask)?;
        let h = self.out_norm.forward(&h)?.broadcast_mul(mask)?;
        // Masked mean, standard deviation and maximum over time: the mean
        // says how much of something there is, the maximum whether it
        // happens at all (one stray note).
        let mean = h.sum(1)?.broadcast_div(&len)?; // [b, c]
        let centred = h.broadcast_sub(&mean.unsqueeze(1)?)?.broadcast_mul(mask)?;
        let std = (centred.sqr()?.sum(1)?.broadcast_div(&len)? + 1e-5)?.sqrt()?;
        let max = h.broadcast_add(&((mask - 1.0)? * 1e4)?)?.max(1)?;
        self.proj.forward(&Tensor::cat(&[&mean, &std, &max], 1)?)
    }
}

impl Block {
    /// `h + conv(relu(norm(h)))`, padding rows kept at zero.
    fn forward(&self, h: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let update = self.conv.forward(&self.norm.forward(h)?.relu()?)?;
        (h + update)?.broadcast_mul(mask)
    }
}

/// Text tower: hashed caption features in, one embedding per caption out.
pub struct TextTower {
    hidden: Linear,
    out: Linear,
}

impl TextTower {
    /// Builds the tower for caption features of `text_dim` values.
    pub fn new(cfg: &ArchConfig, text_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            hidden: linear(text_dim, cfg.hidden, vb.pp("hidden"))?,
            out: linear(cfg.hidden, cfg.embed_dim, vb.pp("out"))?,
        })
    }

    /// `[b, text_dim]` -> `[b, embed_dim]`.
    pub fn forward(&self, text: &Tensor) -> candle_core::Result<Tensor> {
        self.out.forward(&self.hidden.forward(text)?.gelu()?)
    }
}

/// A two-layer MLP with one output: the scoring head.
pub struct Head {
    hidden: Linear,
    out: Linear,
}

impl Head {
    /// Builds a head over `input` values.
    pub fn new(input: usize, hidden: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            hidden: linear(input, hidden, vb.pp("hidden"))?,
            out: linear(hidden, 1, vb.pp("out"))?,
        })
    }

    /// `[b, input]` -> `[b]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.out
            .forward(&self.hidden.forward(x)?.gelu()?)?
            .squeeze(1)
    }
}

/// Applies a linear layer to `[b, t, in]` as one `[b * t, in]` matrix
/// product: candle's batched form broadcasts the weight per batch item,
/// which is several times slower on CPU.
fn linear_rows(layer: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let y = layer.forward(&x.reshape((b * t, d))?)?;
    let out = y.dim(1)?;
    y.reshape((b, t, out))
}

/// Unit-normalises the rows of `[b, d]`.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn convolution_matches_a_direct_sum() {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let conv = Conv::new(2, 3, 2, vb).unwrap();
        let x = Tensor::arange(0f32, 14.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 7, 2))
            .unwrap();
        let y: Vec<Vec<f32>> = conv
            .forward(&x)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let w: Vec<Vec<f32>> = conv.proj.weight().to_vec2().unwrap(); // [out, k*c]
        let bias: Vec<f32> = conv.proj.bias().unwrap().to_vec1().unwrap();
        let xs: Vec<Vec<f32>> = x.squeeze(0).unwrap().to_vec2().unwrap();
        for i in 0..7i64 {
            for o in 0..2 {
                let mut acc = bias[o];
                for j in 0..3i64 {
                    let src = i + (j - 1) * 2;
                    if (0..7).contains(&src) {
                        for c in 0..2 {
                            acc += w[o][(j * 2) as usize + c] * xs[src as usize][c];
                        }
                    }
                }
                assert!((acc - y[i as usize][o]).abs() < 1e-4, "row {i} out {o}");
            }
        }
    }

    #[test]
    fn padding_does_not_change_an_embedding() {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let cfg = ArchConfig {
            stride: 1,
            channels: 8,
            dilations: vec![1, 2],
            embed_dim: 4,
            hidden: 8,
            ..ArchConfig::default()
        };
        let tower = AudioTower::new(&cfg, 6, vb).unwrap();
        let dev = Device::Cpu;
        let alone = Tensor::randn(0f32, 1.0, (1, 9, 6), &dev).unwrap();
        let ones = Tensor::ones((1, 9, 1), DType::F32, &dev).unwrap();
        let e1: Vec<f32> = tower
            .forward(&alone, &ones)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let padded = Tensor::cat(
            &[&alone, &Tensor::zeros((1, 5, 6), DType::F32, &dev).unwrap()],
            1,
        )
        .unwrap();
        let mask = Tensor::cat(
            &[&ones, &Tensor::zeros((1, 5, 1), DType::F32, &dev).unwrap()],
            1,
        )
        .unwrap();
        let e2: Vec<f32> = tower
            .forward(&padded, &mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in e1.iter().zip(&e2) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn receptive_field_counts_dilations() {
        assert_eq!(ArchConfig::default().receptive_field(), 66);
    }
}

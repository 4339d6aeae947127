//! `config.json` of a Hugging Face `MusicgenForConditionalGeneration`
//! checkpoint: the decoder, the T5 text encoder and the EnCodec audio
//! encoder, each under its own key, as `save_pretrained` writes them.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::t5;
use serde::{Deserialize, Serialize};

use crate::{MusicgenError, Result};

/// File name of the config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the text tokenizer inside a checkpoint directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The weights of a checkpoint directory, memory-mapped as f32 on `device`.
pub fn mmap_weights(dir: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        return Err(MusicgenError::checkpoint(
            &weights,
            "missing (sharded checkpoints are not supported)",
        ));
    }
    mmap_file(&weights, device)
}

/// One safetensors file (e.g. published decoder weights), memory-mapped as
/// f32 on `device`.
pub fn mmap_file(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the file is mapped read-only; like every safetensors loader we
    // rely on nobody truncating it while it is mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
        .map_err(|e| MusicgenError::checkpoint(path, e))
}

/// The whole checkpoint's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MusicgenConfig {
    /// The audio-token decoder.
    pub decoder: DecoderConfig,
    /// The T5 text encoder's config as Hugging Face writes it (candle's
    /// [`t5::Config`] reads it; see [`MusicgenConfig::t5`]).
    pub text_encoder: serde_json::Value,
    /// The EnCodec codec whose codes the decoder predicts.
    pub audio_encoder: EncodecConfig,
    /// The token every codebook starts from (Hugging Face: the pad token).
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
}

/// `MusicgenDecoderConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Codes per codebook (EnCodec's codebook size); the embeddings hold one
    /// more row, for the pad token.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward layer.
    pub ffn_dim: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads (self and cross).
    pub num_attention_heads: usize,
    /// Length of the sinusoidal position table (longer sequences extend it).
    pub max_position_embeddings: usize,
    /// Parallel codebooks, predicted with the delay pattern.
    pub num_codebooks: usize,
    /// 1 (mono); stereo checkpoints are refused.
    #[serde(default = "one")]
    pub audio_channels: usize,
    /// The pad token, which fills the delay pattern (= `vocab_size`).
    pub pad_token_id: u32,
    /// The start token (= `pad_token_id` in released checkpoints).
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Feed-forward activation: `gelu` in every released checkpoint.
    #[serde(default = "gelu")]
    pub activation_function: String,
    /// Width of the text states fed to cross-attention, when it differs from
    /// the text encoder's.
    #[serde(default)]
    pub cross_attention_hidden_size: Option<usize>,
}

fn one() -> usize {
    1
}

fn gelu() -> String {
    "gelu".into()
}

/// `EncodecConfig`: the fields the decoding half of EnCodec needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodecConfig {
    /// Output sample rate, Hz.
    pub sampling_rate: u32,
    /// Audio channels (1).
    pub audio_channels: usize,
    /// Width of the latent (and of each codeword unless `codebook_dim`).
    pub hidden_size: usize,
    /// Channels of the outermost convolution.
    pub num_filters: usize,
    /// Upsampling ratios of the decoder, outermost last.
    pub upsampling_ratios: Vec<usize>,
    /// `weight_norm` (released checkpoints) or `time_group_norm`.
    pub norm_type: String,
    /// Kernel of the first and last convolutions.
    pub kernel_size: usize,
    /// Kernel of the last convolution.
    pub last_kernel_size: usize,
    /// Kernel of the residual blocks' first convolution.
    pub residual_kernel_size: usize,
    /// Dilation growth across residual layers.
    pub dilation_growth_rate: usize,
    /// Residual blocks per upsampling stage.
    pub num_residual_layers: usize,
    /// Causal (left) or centred padding.
    pub use_causal_conv: bool,
    /// `reflect` (released checkpoints), `constant` or `replicate`.
    pub pad_mode: String,
    /// Channel reduction inside residual blocks.
    pub compress: usize,
    /// LSTM layers after the first convolution.
    pub num_lstm_layers: usize,
    /// Share of the transposed convolutions' padding trimmed on the right
    /// (causal models only).
    pub trim_right_ratio: f64,
    /// Codewords per codebook.
    pub codebook_size: usize,
    /// Codeword width (`hidden_size` when absent).
    #[serde(default)]
    pub codebook_dim: Option<usize>,
    /// A 1x1 convolution on the residual path (else identity).
    pub use_conv_shortcut: bool,
    /// Bandwidths the codec was trained for, kbit/s.
    pub target_bandwidths: Vec<f64>,
}

impl EncodecConfig {
    /// Samples per code frame.
    pub fn hop_length(&self) -> usize {
        self.upsampling_ratios.iter().product()
    }

    /// Code frames per second.
    pub fn frame_rate(&self) -> usize {
        (self.sampling_rate as usize).div_ceil(self.hop_length().max(1))
    }

    /// Codeword width.
    pub fn codebook_dim(&self) -> usize {
        self.codebook_dim.unwrap_or(self.hidden_size)
    }

    /// Codebooks of the residual quantizer, as transformers computes it.
    pub fn num_quantizers(&self) -> usize {
        let bits = (self.codebook_size as f64).log2();
        let bandwidth = self.target_bandwidths.last().copied().unwrap_or(0.0);
        ((1000.0 * bandwidth) / (self.frame_rate() as f64 * bits)).floor() as usize
    }

    /// Checks what this implementation of the decoder supports; errors name
    /// the key under `audio_encoder`.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(MusicgenError::Config(msg));
        if self.audio_channels != 1 {
            return bad(format!(
                "audio_encoder.audio_channels: only mono is supported, got {}",
                self.audio_channels
            ));
        }
        if self.norm_type != "weight_norm" {
            return bad(format!(
                "audio_encoder.norm_type: only \"weight_norm\" is supported, got {:?}",
                self.norm_type
            ));
        }
        if !matches!(self.pad_mode.as_str(), "reflect" | "constant" | "replicate") {
            return bad(format!(
                "audio_encoder.pad_mode: unknown mode {:?}",
                self.pad_mode
            ));
        }
        if self.upsampling_ratios.is_empty() {
            return bad("audio_encoder.upsampling_ratios: must not be empty".into());
        }
        if self.hop_length() == 0 || self.sampling_rate == 0 || self.codebook_size == 0 {
            return bad(
                "audio_encoder: sampling_rate, upsampling_ratios and codebook_size must be positive"
                    .into(),
            );
        }
        if self.num_quantizers() == 0 {
            return bad(
                "audio_encoder.target_bandwidths: below one codebook at this frame rate".into(),
            );
        }
        Ok(())
    }
}

impl MusicgenConfig {
    /// Reads `config.json` from a checkpoint directory and validates it.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| MusicgenError::checkpoint(&path, e))?;
        let cfg: Self =
            serde_json::from_str(&text).map_err(|e| MusicgenError::checkpoint(&path, e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The text encoder's config.
    pub fn t5(&self) -> Result<t5::Config> {
        serde_json::from_value(self.text_encoder.clone())
            .map_err(|e| MusicgenError::Config(format!("text_encoder: {e}")))
    }

    /// The start token of every codebook.
    pub fn start_token(&self) -> u32 {
        self.decoder_start_token_id
            .or(self.decoder.bos_token_id)
            .unwrap_or(self.decoder.pad_token_id)
    }

    /// Checks what this implementation supports; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let d = &self.decoder;
        let bad = |msg: String| Err(MusicgenError::Config(msg));
        if d.audio_channels != 1 {
            return bad(format!(
                "decoder.audio_channels: only mono checkpoints are supported, got {}",
                d.audio_channels
            ));
        }
        if d.num_codebooks == 0 || d.hidden_size == 0 || d.num_attention_heads == 0 {
            return bad(
                "decoder: num_codebooks, hidden_size and num_attention_heads must be positive"
                    .into(),
            );
        }
        if !d.hidden_size.is_multiple_of(d.num_attention_heads) {
            return bad(format!(
                "decoder.hidden_size: {} is not a multiple of num_attention_heads {}",
                d.hidden_size, d.num_attention_heads
            ));
        }
        if d.activation_function != "gelu" {
            return bad(format!(
                "decoder.activation_function: only \"gelu\" is supported, got {:?}",
                d.activation_function
            ));
        }
        if d.pad_token_id as usize != d.vocab_size {
            return bad(format!(
                "decoder.pad_token_id: must equal vocab_size ({}), got {}",
                d.vocab_size, d.pad_token_id
            ));
        }
        self.t5()?;
        let a = &self.audio_encoder;
        if a.codebook_size != d.vocab_size {
            return bad(format!(
                "audio_encoder.codebook_size: {} differs from decoder.vocab_size {}",
                a.codebook_size, d.vocab_size
            ));
        }
        if a.num_quantizers() < d.num_codebooks {
            return bad(format!(
                "audio_encoder.target_bandwidths: give {} codebooks, the decoder predicts {}",
                a.num_quantizers(),
                d.num_codebooks
            ));
        }
        a.validate()
    }
}

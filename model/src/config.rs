//! Policy hyper-parameters and the named presets.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Shape of a [`crate::Policy`]. Saved next to the weights as `config.json`, so
/// a checkpoint directory is self-describing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Number of audio token ids (the codec's vocabulary).
    pub vocab_size: usize,
    /// Width of the caption embedding the policy is conditioned on.
    pub text_dim: usize,
    /// Transformer width.
    pub d_model: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Attention heads per block; must divide `d_model`.
    pub n_heads: usize,
    /// Hidden width of the feed-forward layers.
    pub d_ff: usize,
    /// Number of soft-prompt positions the caption embedding is projected to.
    pub n_prefix: usize,
    /// Longest clip, in audio frames (tokens), the policy can generate.
    pub max_frames: usize,
    /// Share embeddings and output weights across tokens with the same
    /// instrument, pitch, velocity or kind (needs the codec's vocabulary).
    #[serde(default)]
    pub factored_vocab: bool,
}

/// Named model sizes. `tiny` is for tests, `small` for the CPU quick start,
/// `medium` and `large` for GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// 0.36 M parameters, 64-frame (2.6 s) clips: seconds on a CPU.
    Tiny,
    /// 1.4 M parameters, 250-frame (10 s) clips: minutes on a CPU.
    Small,
    /// 44 M parameters, 750-frame (30 s) clips: one GPU.
    Medium,
    /// 324 M parameters, 750-frame (30 s) clips: GPUs.
    Large,
}

impl Preset {
    /// Every preset, smallest first.
    pub const ALL: [Preset; 4] = [Preset::Tiny, Preset::Small, Preset::Medium, Preset::Large];

    /// The preset's name as written in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Medium => "medium",
            Preset::Large => "large",
        }
    }

    /// The policy shape of this preset.
    pub fn config(self) -> PolicyConfig {
        let base = PolicyConfig {
            vocab_size: encore_codec::VOCAB_SIZE,
            text_dim: encore_corpus::text::TEXT_DIM,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            d_ff: 256,
            n_prefix: 4,
            max_frames: 64,
            factored_vocab: true,
        };
        match self {
            Preset::Tiny => base,
            Preset::Small => PolicyConfig {
                d_model: 128,
                n_layers: 4,
                n_heads: 4,
                d_ff: 512,
                n_prefix: 4,
                max_frames: 250,
                ..base
            },
            Preset::Medium => PolicyConfig {
                d_model: 512,
                n_layers: 12,
                n_heads: 8,
                d_ff: 2048,
                n_prefix: 16,
                max_frames: 750,
                ..base
            },
            Preset::Large => PolicyConfig {
                d_model: 1024,
                n_layers: 24,
                n_heads: 16,
                d_ff: 4096,
                n_prefix: 16,
                max_frames: 750,
                ..base
            },
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                ModelError::Config(format!(
                    "preset: unknown preset {s:?} (tiny, small, medium, large)"
                ))
            })
    }
}

impl PolicyConfig {
    /// Total sequence positions: soft prompt, the start token, and the clip.
    pub fn max_positions(&self) -> usize {
        self.n_prefix + 1 + self.max_frames
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Checks the shape is buildable; errors name the offending key.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("text_dim", self.text_dim),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("d_ff", self.d_ff),
            ("n_prefix", self.n_prefix),
            ("max_frames", self.max_frames),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ModelError::Config(format!("{key}: must be positive")));
            }
        }
        if self.factored_vocab && self.vocab_size != encore_codec::VOCAB_SIZE {
            return Err(ModelError::Config(format!(
                "factored_vocab: needs vocab_size {} (the codec's), got {}",
                encore_codec::VOCAB_SIZE,
                self.vocab_size
            )));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ModelError::Config(format!(
                "n_heads: {} does not divide d_model {}",
                self.n_heads, self.d_model
            )));
        }
        Ok(())
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        let d = self.d_model;
        let block = 4 * d // two layer norms
            + 3 * d * d + 3 * d // qkv
            + d * d + d // attention output
            + d * self.d_ff + self.d_ff // mlp in
            + self.d_ff * d + d; // mlp out
        let cond = self.text_dim * d + d + d * self.n_prefix * d + self.n_prefix * d;
        let embeddings = self.vocab_size * d + self.max_positions() * d;
        let head = 2 * d + d * self.vocab_size + self.vocab_size;
        let factors = if self.factored_vocab {
            2 * crate::factors::NUM_FACTORS * d
        } else {
            0
        };
        cond + embeddings + self.n_layers * block + head + factors
    }

    /// Forward-pass FLOPs for one new token given `context` earlier positions
    /// (matrix multiplies only: 2 FLOPs per multiply-add). Training costs
    /// about three times this (forward plus backward).
    pub fn forward_flops_per_token(&self, context: usize) -> f64 {
        let d = self.d_model as f64;
        let per_layer = 2.0 * (4.0 * d * d + 2.0 * d * self.d_ff as f64) // projections + mlp
            + 2.0 * 2.0 * d * context as f64; // q.k and attn.v
        self.n_layers as f64 * per_layer + 2.0 * d * self.vocab_size as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_grow() {
        let mut last = 0;
        for preset in Preset::ALL {
            let cfg = preset.config();
            cfg.validate().unwrap();
            assert!(cfg.parameter_count() > last, "{preset:?}");
            last = cfg.parameter_count();
            assert_eq!(preset.name().parse::<Preset>().unwrap(), preset);
        }
        assert!("huge".parse::<Preset>().is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let mut cfg = Preset::Tiny.config();
        cfg.n_heads = 5;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("n_heads"), "{err}");
    }
}

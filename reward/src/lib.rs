//! Encore's reward models: the three rewards of MusicRL as candle networks
//! that Encore trains and serves.
//!
//! - [`frontend`]: tokens -> waveform (the codec) -> normalised log-mel rows,
//!   or a waveform decoded elsewhere (MusicGen's EnCodec) -> the same rows.
//!   Reward models only ever see audio features.
//! - [`nn`]: the audio tower (dilated convolutions, statistics pooling) and
//!   the caption tower the models share.
//! - [`model`]: [`RewardModel`] for prompt adherence (dual encoder, cosine
//!   similarity), quality (MOS regressor) and user preference
//!   (Bradley-Terry), with safetensors checkpoints.
//!
//! The reward server (`encore-reward-server`) hosts these models over gRPC;
//! `encore-reward-train` trains them on the JSONL datasets of
//! `encore-raters`.

use std::path::PathBuf;

pub mod frontend;
pub mod model;
pub mod nn;

pub use frontend::{Clip, Features, Frontend, FrontendConfig, resample, resampled_len};
pub use model::{CODEC_ID, RewardConfig, RewardKind, RewardModel, ScoreInput};
pub use nn::ArchConfig;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// A configuration value is invalid; the message names the key.
    #[error("invalid config: {0}")]
    Config(String),
    /// An input clip or record cannot be used.
    #[error("invalid input: {0}")]
    Input(String),
    /// A model produced a non-finite score.
    #[error("the model produced a non-finite score for item {index}")]
    NonFinite {
        /// Index of the item in the batch.
        index: usize,
    },
    /// A checkpoint could not be read or written.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

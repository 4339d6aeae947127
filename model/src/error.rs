//! The model crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong building, running, saving or loading a policy.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed (shape mismatch inside candle, device error).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// An input had the wrong shape; the message names the argument.
    #[error("{0}")]
    Shape(String),
    /// A configuration value is invalid; the message names the key.
    #[error("{0}")]
    Config(String),
    /// A checkpoint file could not be read, parsed or written.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file concerned.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

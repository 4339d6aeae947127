//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a MusicGen checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum MusicgenError {
    /// A tensor operation failed (shapes, dtypes, devices).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A checkpoint file is missing, unreadable or malformed.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A config value is outside what this implementation supports; the
    /// message names the key.
    #[error("config: {0}")]
    Config(String),
    /// An input (prompt, codes, sampling parameters) is invalid; the message
    /// names the field.
    #[error("{0}")]
    Input(String),
}

impl MusicgenError {
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::Checkpoint {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T> = std::result::Result<T, MusicgenError>;

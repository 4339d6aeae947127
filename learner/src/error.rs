//! The learner crate's error type.
//!
//! One enum for everything the learner can fail at, from a malformed batch to
//! a checkpoint that cannot be read; the learner process maps it to a job
//! failure or a dropped batch in one place. Variants are added as the
//! learner grows (collective, queue, coordinator), so match on it with a
//! wildcard arm outside this crate.

use std::path::PathBuf;

/// Everything that can go wrong turning rollouts into policy updates.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// The policy model failed (building it, running it, loading a base
    /// checkpoint).
    #[error("model: {0}")]
    Model(#[from] encore_model::ModelError),
    /// The policy failed (either architecture: loading the base checkpoint,
    /// running the model).
    #[error("policy: {0}")]
    Policy(#[from] encore_policies::PolicyError),
    /// A tensor operation failed (shape mismatch inside candle, device
    /// error).
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A learner checkpoint file is missing, malformed or does not fit the
    /// policy or optimiser it is loaded into.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file (or directory) concerned.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A batch, or an argument built from one, is unusable (missing or
    /// non-finite score, wrong group size, mismatched shapes); the message
    /// names the offending field.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A hyper-parameter is out of range; the message names the key.
    #[error("{0}")]
    Config(String),
    /// Saved state (optimiser moments, gradients by name) does not fit what
    /// it is loaded into; the message names the entry.
    #[error("state mismatch: {0}")]
    StateMismatch(String),
    /// The rollout queue (the store) failed.
    #[error("rollout queue: {0}")]
    Queue(#[from] encore_store::StoreError),
    /// The collective with the other ranks failed (it must be formed again).
    #[error("collective: {0}")]
    Collective(#[from] crate::collective::CollectiveError),
    /// The coordinator refused a call or could not be reached.
    #[error("{what}: {status}")]
    Rpc {
        /// Which call.
        what: String,
        /// How it ended.
        status: Box<tonic::Status>,
    },
    /// The assignment changed or the process is shutting down.
    #[error("cancelled")]
    Cancelled,
}

impl LearnerError {
    /// An [`LearnerError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether the failure is the coordinator or the rollout queue being
    /// out of reach for now (restarting, a connection cut mid-call), which
    /// passes by itself: a retry should wait for it rather than count it
    /// as an attempt at the job.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Queue(encore_store::StoreError::Backend(_)) => true,
            Self::Rpc { status, .. } => encore_client::endpoint::is_unreachable(status),
            _ => false,
        }
    }

    /// A [`LearnerError::Checkpoint`] for `path`.
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::Checkpoint {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_absent_coordinator_or_queue_is_unreachable() {
        let rpc = |code| LearnerError::Rpc {
            what: "ReportProgress".into(),
            status: Box::new(tonic::Status::new(code, "x")),
        };
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::Unknown,
            tonic::Code::Cancelled,
            tonic::Code::DeadlineExceeded,
        ] {
            assert!(rpc(code).is_unreachable(), "{code:?}");
        }
        for code in [
            tonic::Code::PermissionDenied,
            tonic::Code::FailedPrecondition,
            tonic::Code::InvalidArgument,
            tonic::Code::NotFound,
        ] {
            assert!(!rpc(code).is_unreachable(), "{code:?}");
        }
        let away = encore_store::StoreError::Backend("connection refused".into());
        assert!(LearnerError::Queue(away).is_unreachable());
        assert!(!LearnerError::InvalidBatch("scores".into()).is_unreachable());
        assert!(!LearnerError::Config("algorithm.clip_ratio".into()).is_unreachable());
    }
}

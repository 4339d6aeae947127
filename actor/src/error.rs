//! The actor's one error type.

use std::path::PathBuf;

/// `Result` with the actor's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop the actor or fail one batch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid; the message names the key.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The coordinator or a reward server could not be reached or refused a
    /// call.
    #[error("{what}: {status}")]
    Rpc {
        /// Which call.
        what: String,
        /// The status it ended with.
        status: Box<tonic::Status>,
    },
    /// A connection could not be set up.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// Where to.
        url: String,
        /// Why not.
        #[source]
        source: tonic::transport::Error,
    },
    /// The assignment changed (or the job ended) while working on it.
    #[error("the assignment changed")]
    Reassigned,
    /// Weights could not be fetched or loaded.
    #[error("weights: {0}")]
    Weights(String),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] encore_model::ModelError),
    /// The policy (either architecture) failed.
    #[error(transparent)]
    Policy(#[from] encore_policies::PolicyError),
    /// The prompt set could not be read.
    #[error("prompts {path}: {message}")]
    Prompts {
        /// The dataset file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The rollout queue failed.
    #[error(transparent)]
    Store(#[from] encore_store::StoreError),
    /// Metrics or the admin server could not be set up.
    #[error(transparent)]
    Telemetry(#[from] encore_telemetry::Error),
    /// The actor is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl Error {
    /// An rpc failure.
    pub fn rpc(what: impl Into<String>, status: tonic::Status) -> Self {
        Error::Rpc {
            what: what.into(),
            status: Box::new(status),
        }
    }

    /// Whether the failure may pass by itself: the coordinator, the rollout
    /// queue or a reward server away for a while (restarting, a connection
    /// cut mid-call, a weight transfer broken off), so that the same work
    /// is worth taking up again.
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            Error::Store(encore_store::StoreError::Backend(_)) | Error::Weights(_) => true,
            // Away for now, or a reward server shedding load.
            Error::Rpc { status, .. } => {
                encore_client::endpoint::is_unreachable(status)
                    || matches!(status.code(), Code::Aborted | Code::ResourceExhausted)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_can_pass_are_transient() {
        let rpc = |code| Error::rpc("GetManifest", tonic::Status::new(code, "x"));
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::Unknown,
            tonic::Code::DeadlineExceeded,
        ] {
            assert!(rpc(code).is_transient(), "{code:?}");
        }
        for code in [
            tonic::Code::PermissionDenied,
            tonic::Code::Unauthenticated,
            tonic::Code::InvalidArgument,
            tonic::Code::FailedPrecondition,
        ] {
            assert!(!rpc(code).is_transient(), "{code:?}");
        }
        assert!(Error::Store(encore_store::StoreError::Backend("away".into())).is_transient());
        assert!(Error::Weights("fetch broken off".into()).is_transient());
        assert!(!Error::Config("actor.device".into()).is_transient());
        assert!(
            !Error::Store(encore_store::StoreError::invalid(
                "max_len",
                "must be at least 1"
            ))
            .is_transient()
        );
    }
}

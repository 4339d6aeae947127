//! The crate's one error type, [`Error`], and its one conversion to
//! [`tonic::Status`], so every failure reaches the caller with the code and
//! the rich details (`google.rpc.ErrorInfo` with domain `encore.v1`,
//! `BadRequest`, `RetryInfo`) that `proto/encore/v1/common.proto` promises,
//! decided in this one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use encore_proto::status::status;
pub use encore_proto::status::{ERROR_DOMAIN, MAX_VIOLATIONS, Violation, Violations, reason_name};
use encore_proto::v1::ErrorReason;
use encore_reward::RewardError;
use tonic::Code;
use tonic_types::StatusExt;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the reward server: at start-up (config,
/// loading, binding) and per request (validation, overload, deadlines,
/// model failures).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid; the message names the key.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A model checkpoint could not be loaded.
    #[error("loading model {name:?} from {}: {source}", path.display())]
    Load {
        /// The model's name.
        name: String,
        /// Its checkpoint directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<RewardError>,
    },
    /// The audio codec (`audio_codec`) could not be loaded.
    #[error("reward_server.audio_codec: loading {}: {source}", path.display())]
    LoadCodec {
        /// The checkpoint directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<encore_musicgen::MusicgenError>,
    },
    /// Decoding validated codes to audio failed.
    #[error("decoding codes with the audio codec: {0}")]
    Decode(String),
    /// The gRPC listener could not be bound.
    #[error("binding the gRPC server to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed while serving.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Metrics, the admin server, health or reflection could not be set up.
    #[error(transparent)]
    Telemetry(Box<encore_telemetry::Error>),
    /// A scoring worker could not be started or stopped abnormally.
    #[error("scoring worker: {0}")]
    Worker(String),
    /// The request breaks the rules of `reward.proto`; nothing was scored.
    #[error("{0}")]
    InvalidRequest(Violations),
    /// A model's queue is full.
    #[error(
        "model {model:?} is overloaded: {queued} items queued, room for {capacity}; \
         retry in {} ms",
        retry_after.as_millis()
    )]
    Overloaded {
        /// The model whose queue is full.
        model: String,
        /// Items queued when the request arrived.
        queued: usize,
        /// The queue's capacity in items.
        capacity: usize,
        /// How long the queue takes to drain at its recent pace.
        retry_after: Duration,
    },
    /// The caller's deadline passed before the scores were ready.
    #[error("the deadline passed {0}")]
    DeadlineExceeded(&'static str),
    /// A model produced a NaN or infinite score.
    #[error("model {model:?} produced a non-finite score for items[{index}]")]
    NonFinite {
        /// The model.
        model: String,
        /// Index of the item in the request.
        index: usize,
    },
    /// A model failed on inputs that passed validation.
    #[error("model {model:?} failed: {source}")]
    Scoring {
        /// The model.
        model: String,
        /// Why.
        #[source]
        source: Box<RewardError>,
    },
    /// The server is shutting down and takes no new work.
    #[error("the reward server is shutting down")]
    ShuttingDown,
}

impl From<encore_telemetry::Error> for Error {
    fn from(e: encore_telemetry::Error) -> Self {
        Error::Telemetry(Box::new(e))
    }
}

impl Error {
    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidRequest(_) => Code::InvalidArgument,
            Error::Overloaded { .. } => Code::ResourceExhausted,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::ShuttingDown => Code::Unavailable,
            Error::Config(_)
            | Error::Load { .. }
            | Error::LoadCodec { .. }
            | Error::Decode(_)
            | Error::Bind { .. }
            | Error::Transport(_)
            | Error::Telemetry(_)
            | Error::Worker(_)
            | Error::NonFinite { .. }
            | Error::Scoring { .. } => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        let message = err.to_string();
        match &err {
            Error::InvalidRequest(violations) => violations.to_status(),
            Error::Overloaded {
                model, retry_after, ..
            } => status(
                code,
                message,
                ErrorReason::Overloaded,
                &[("model", model.clone())],
                Some(*retry_after),
            ),
            Error::NonFinite { model, index } => status(
                code,
                message,
                ErrorReason::NonFinite,
                &[("model", model.clone()), ("item", index.to_string())],
                None,
            ),
            Error::ShuttingDown => {
                let mut details = tonic_types::ErrorDetails::new();
                details.set_retry_info(Some(Duration::from_secs(1)));
                tonic::Status::with_error_details(code, message, details)
            }
            _ => tonic::Status::new(code, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_carries_a_retry_delay() {
        let status = tonic::Status::from(Error::Overloaded {
            model: "quality".into(),
            queued: 10,
            capacity: 10,
            retry_after: Duration::from_millis(250),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(details.error_info().unwrap().reason, "OVERLOADED");
        assert_eq!(
            details.retry_info().unwrap().retry_delay,
            Some(Duration::from_millis(250))
        );
    }
}

//! The crate's one error type, [`Error`], and its one conversion to
//! [`tonic::Status`], so every failure reaches the caller with the code and
//! the rich details (`google.rpc.ErrorInfo` with domain `encore.v1`,
//! `BadRequest`, `RetryInfo`) that `proto/encore/v1/common.proto` promises,
//! decided in this one place.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use encore_proto::v1::ErrorReason;
use encore_reward::RewardError;
use tonic::Code;
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// `ErrorInfo.domain` of every Encore error.
pub const ERROR_DOMAIN: &str = "encore.v1";

/// Most field violations one error carries; the rest are counted. Keeps the
/// `grpc-status-details-bin` trailer well inside HTTP/2 header limits when a
/// request is wrong everywhere.
pub const MAX_VIOLATIONS: usize = 64;

/// Fields named in the status message; the BadRequest details list up to
/// [`MAX_VIOLATIONS`].
const MESSAGE_FIELDS: usize = 8;

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

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field, e.g. `items[3].tokens[17]`.
    pub field: String,
    /// What kind of problem it is.
    pub reason: ErrorReason,
    /// What is wrong, for humans.
    pub description: String,
}

/// Every bad field of a request, in request order: the first
/// [`MAX_VIOLATIONS`] in full, the rest counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    listed: Vec<Violation>,
    omitted: usize,
}

impl Violations {
    /// Records a bad field.
    pub fn push(&mut self, field: String, reason: ErrorReason, description: String) {
        if self.listed.len() < MAX_VIOLATIONS {
            self.listed.push(Violation {
                field,
                reason,
                description,
            });
        } else {
            self.omitted += 1;
        }
    }

    /// Whether no field is bad.
    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }

    /// The violations carried in full.
    pub fn listed(&self) -> &[Violation] {
        &self.listed
    }

    /// Number of bad fields in all.
    pub fn total(&self) -> usize {
        self.listed.len() + self.omitted
    }

    /// The reason the status's ErrorInfo carries: that of the first bad
    /// field (models are checked before items).
    pub fn reason(&self) -> ErrorReason {
        self.listed
            .first()
            .map_or(ErrorReason::InvalidField, |v| v.reason)
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total();
        write!(
            f,
            "invalid request, {total} bad field{}: ",
            if total == 1 { "" } else { "s" }
        )?;
        for (i, v) in self.listed.iter().take(MESSAGE_FIELDS).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        if total > MESSAGE_FIELDS {
            write!(f, "; and {} more", total - MESSAGE_FIELDS)?;
        }
        Ok(())
    }
}

/// The name an `ErrorInfo.reason` carries: the enum value's name without its
/// `ERROR_REASON_` prefix.
pub fn reason_name(reason: ErrorReason) -> &'static str {
    let name = reason.as_str_name();
    name.strip_prefix("ERROR_REASON_").unwrap_or(name)
}

fn error_info(details: &mut ErrorDetails, reason: ErrorReason, metadata: &[(&str, String)]) {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    details.set_error_info(reason_name(reason), ERROR_DOMAIN, metadata);
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
        let mut details = ErrorDetails::new();
        match &err {
            Error::InvalidRequest(violations) => {
                error_info(&mut details, violations.reason(), &[]);
                let fields: Vec<FieldViolation> = violations
                    .listed()
                    .iter()
                    .map(|v| {
                        let mut fv = FieldViolation::new(v.field.clone(), v.description.clone());
                        fv.reason = reason_name(v.reason).to_owned();
                        fv
                    })
                    .collect();
                details.set_bad_request(fields);
            }
            Error::Overloaded {
                model, retry_after, ..
            } => {
                error_info(
                    &mut details,
                    ErrorReason::Overloaded,
                    &[("model", model.clone())],
                );
                details.set_retry_info(Some(*retry_after));
            }
            Error::NonFinite { model, index } => {
                error_info(
                    &mut details,
                    ErrorReason::NonFinite,
                    &[("model", model.clone()), ("item", index.to_string())],
                );
            }
            Error::ShuttingDown => {
                details.set_retry_info(Some(Duration::from_secs(1)));
            }
            _ => return tonic::Status::new(code, message),
        }
        tonic::Status::with_error_details(code, message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_requests_carry_every_field_and_the_first_reason() {
        let mut v = Violations::default();
        v.push(
            "models[1]".into(),
            ErrorReason::UnknownModel,
            "no such model".into(),
        );
        v.push(
            "items[0].tokens[3]".into(),
            ErrorReason::TokenOutOfRange,
            "too big".into(),
        );
        let status = tonic::Status::from(Error::InvalidRequest(v));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("models[1]"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("items[0].tokens[3]"),
            "{}",
            status.message()
        );
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("UNKNOWN_MODEL", "encore.v1")
        );
        let fields: Vec<(&str, &str)> = details
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|f| (f.field.as_str(), f.reason.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("models[1]", "UNKNOWN_MODEL"),
                ("items[0].tokens[3]", "TOKEN_OUT_OF_RANGE")
            ]
        );
    }

    #[test]
    fn a_flood_of_violations_is_capped_and_counted() {
        let mut v = Violations::default();
        for i in 0..1000 {
            v.push(
                format!("items[{i}].caption"),
                ErrorReason::InvalidField,
                "empty".into(),
            );
        }
        assert_eq!(v.total(), 1000);
        let status = tonic::Status::from(Error::InvalidRequest(v));
        assert!(
            status.message().contains("1000 bad fields"),
            "{}",
            status.message()
        );
        assert!(
            status
                .message()
                .ends_with(&format!("and {} more", 1000 - MESSAGE_FIELDS))
        );
        let details = status.get_error_details();
        assert_eq!(
            details.bad_request().unwrap().field_violations.len(),
            MAX_VIOLATIONS
        );
    }

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

    #[test]
    fn reason_names_drop_the_prefix() {
        assert_eq!(reason_name(ErrorReason::TooLarge), "TOO_LARGE");
        assert_eq!(reason_name(ErrorReason::NonFinite), "NON_FINITE");
    }
}

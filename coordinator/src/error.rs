//! The coordinator's one error type, [`Error`], and its one conversion to
//! [`tonic::Status`]: every failure of every service reaches the caller with
//! the code and the `google.rpc` details `common.proto` promises, decided
//! here and nowhere else.

use std::net::SocketAddr;
use std::time::Duration;

use encore_proto::status::{Violations, status};
use encore_proto::v1::ErrorReason;
use encore_store::StoreError;
use tonic::Code;
use tonic_types::StatusExt;

/// Longest status message, in bytes.
const MAX_MESSAGE_BYTES: usize = 2048;

/// `Result` with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the coordinator: at start-up (config,
/// store, binding) and per rpc.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid; the message names the key.
    #[error("invalid configuration: {0}")]
    Config(String),
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

    /// The request breaks the rules of the protocol; nothing changed.
    #[error("{0}")]
    Invalid(Violations),
    /// No job has this id.
    #[error("job {0:?} not found")]
    JobNotFound(String),
    /// The idempotency key was used before with another spec.
    #[error(
        "idempotency_key: already used for job {job_id:?} with a different spec; \
         choose a new key to submit a different job"
    )]
    IdempotencyKeyReused {
        /// The job that owns the key.
        job_id: String,
    },
    /// The job is terminal and cannot do what was asked.
    #[error("job {job_id:?} is already {state} and cannot be {action}")]
    JobTerminal {
        /// The job.
        job_id: String,
        /// Its terminal state's name (`SUCCEEDED`...).
        state: String,
        /// What was asked ("cancelled", "updated").
        action: &'static str,
    },
    /// The caller has reached its quota of live jobs.
    #[error(
        "client {client:?} already has {active} PENDING or RUNNING jobs, the most allowed \
         ({limit}); wait for one to finish or cancel one"
    )]
    QuotaExceeded {
        /// The client.
        client: String,
        /// Its live jobs.
        active: u64,
        /// The limit.
        limit: u64,
    },
    /// The member's lease has expired, or the member id is unknown.
    #[error(
        "member_id: the lease of member {0:?} has expired or the member is unknown; register again"
    )]
    LeaseExpired(String),
    /// The member is alive but not assigned the work the call is about.
    #[error("member {member_id:?} {why}")]
    NotAssigned {
        /// The member.
        member_id: String,
        /// What it is not (for example "is not rank 0 of job \"j1\"'s learner").
        why: String,
    },
    /// The member speaks an incompatible protocol or software version.
    #[error("{field}: {message}")]
    Incompatible {
        /// The offending field's path.
        field: String,
        /// Why it is incompatible.
        message: String,
    },
    /// The weight version does not exist or was garbage-collected.
    #[error("weight version {version} of job {job_id:?} not found")]
    VersionNotFound {
        /// The job.
        job_id: String,
        /// The version ("latest" when none was named).
        version: String,
    },
    /// The weight version was committed with another sha256, or a fetch
    /// expected another one.
    #[error("{0}")]
    VersionConflict(String),
    /// A fetch named an expected sha256 and the version has another one.
    #[error("expected_sha256: {0}")]
    FetchConflict(String),
    /// A published version is not above the latest committed one.
    #[error("{0}")]
    VersionNotMonotonic(String),
    /// Uploaded bytes do not match the announced size or sha256.
    #[error("{0}")]
    ChecksumMismatch(String),
    /// A fetch offset lies beyond the end of the file.
    #[error("offset: {offset} is beyond the end of the {size}-byte weights file")]
    OffsetOutOfRange {
        /// The offset asked for.
        offset: u64,
        /// The file's size.
        size: u64,
    },
    /// The call has no bearer token, or an unknown one.
    #[error("{0}")]
    Unauthenticated(String),
    /// The token is valid but not for this service.
    #[error("{0}")]
    PermissionDenied(String),
    /// Another writer changed the same record first, again and again; the
    /// caller may retry.
    #[error("{0}")]
    Aborted(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blob file could not be read or written.
    #[error("weight blob {path}: {source}")]
    Blob {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator is shutting down and takes no new work.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// Reading a client-streamed request failed: the client went away, or a
    /// message did not decode. Answered with the code tonic gave it.
    #[error("request stream: {}", .0.message())]
    RequestStream(Box<tonic::Status>),
}

impl From<encore_telemetry::Error> for Error {
    fn from(e: encore_telemetry::Error) -> Self {
        Error::Telemetry(Box::new(e))
    }
}

impl From<Violations> for Error {
    fn from(v: Violations) -> Self {
        Error::Invalid(v)
    }
}

impl Error {
    /// One bad field (reason INVALID_FIELD).
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::Invalid(Violations::one(field, description))
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid(_) | Error::ChecksumMismatch(_) | Error::Incompatible { .. } => {
                Code::InvalidArgument
            }
            Error::JobNotFound(_) | Error::VersionNotFound { .. } => Code::NotFound,
            Error::IdempotencyKeyReused { .. } | Error::VersionConflict(_) => Code::AlreadyExists,
            Error::JobTerminal { .. }
            | Error::LeaseExpired(_)
            | Error::NotAssigned { .. }
            | Error::FetchConflict(_)
            | Error::VersionNotMonotonic(_) => Code::FailedPrecondition,
            Error::QuotaExceeded { .. } => Code::ResourceExhausted,
            Error::OffsetOutOfRange { .. } => Code::OutOfRange,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Aborted(_) => Code::Aborted,
            Error::ShuttingDown => Code::Unavailable,
            Error::RequestStream(status) => status.code(),
            Error::Store(e) => store_code(e),
            Error::Config(_)
            | Error::Bind { .. }
            | Error::Transport(_)
            | Error::Telemetry(_)
            | Error::Blob { .. } => Code::Internal,
        }
    }

    /// The reason carried in ErrorInfo, where one fits.
    fn reason(&self) -> Option<ErrorReason> {
        Some(match self {
            Error::JobNotFound(_) => ErrorReason::JobNotFound,
            Error::IdempotencyKeyReused { .. } => ErrorReason::IdempotencyKeyReused,
            Error::JobTerminal { .. } => ErrorReason::JobTerminal,
            Error::QuotaExceeded { .. } => ErrorReason::QuotaExceeded,
            Error::LeaseExpired(_) => ErrorReason::LeaseExpired,
            Error::NotAssigned { .. } => ErrorReason::NotAssigned,
            Error::Incompatible { .. } => ErrorReason::Incompatible,
            Error::VersionNotFound { .. } => ErrorReason::VersionNotFound,
            Error::VersionConflict(_) | Error::FetchConflict(_) => ErrorReason::VersionConflict,
            Error::VersionNotMonotonic(_) => ErrorReason::VersionNotMonotonic,
            Error::ChecksumMismatch(_) => ErrorReason::ChecksumMismatch,
            Error::OffsetOutOfRange { .. } => ErrorReason::OffsetOutOfRange,
            Error::Unauthenticated(_) => ErrorReason::Unauthenticated,
            Error::PermissionDenied(_) => ErrorReason::PermissionDenied,
            Error::Store(StoreError::LeaseExpired { .. }) => ErrorReason::LeaseExpired,
            Error::Store(StoreError::NotFound { kind: "job", .. }) => ErrorReason::JobNotFound,
            Error::Store(StoreError::VersionNotMonotonic { .. }) => {
                ErrorReason::VersionNotMonotonic
            }
            Error::Store(StoreError::JobTerminal { .. }) => ErrorReason::JobTerminal,
            _ => return None,
        })
    }

    /// ErrorInfo metadata: the ids a client may act on.
    fn metadata(&self) -> Vec<(&'static str, String)> {
        match self {
            Error::JobNotFound(job_id)
            | Error::IdempotencyKeyReused { job_id }
            | Error::JobTerminal { job_id, .. }
            | Error::VersionNotFound { job_id, .. } => vec![("job_id", job_id.clone())],
            Error::LeaseExpired(member_id) | Error::NotAssigned { member_id, .. } => {
                vec![("member_id", member_id.clone())]
            }
            Error::QuotaExceeded { limit, .. } => vec![("limit", limit.to_string())],
            _ => Vec::new(),
        }
    }
}

/// The code of a store failure that reaches an rpc: transient backend
/// trouble is UNAVAILABLE (retry later), lost compare-and-sets ABORTED, and
/// corrupt data INTERNAL.
fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::NotFound { .. } => Code::NotFound,
        StoreError::Conflict { .. } => Code::Aborted,
        StoreError::JobTerminal { .. }
        | StoreError::VersionNotMonotonic { .. }
        | StoreError::Pinned { .. }
        | StoreError::LeaseExpired { .. } => Code::FailedPrecondition,
        StoreError::InvalidArgument { .. } => Code::InvalidArgument,
        StoreError::Backend(_) | StoreError::Io { .. } => Code::Unavailable,
        StoreError::Decode { .. } => Code::Internal,
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        if let Error::Invalid(violations) = &err {
            return violations.to_status();
        }
        let code = err.code();
        // Messages may quote request values; the bound keeps the trailers
        // within HTTP/2's header limit.
        let message = encore_proto::status::truncate(&err.to_string(), MAX_MESSAGE_BYTES);
        let retry = match code {
            Code::Unavailable | Code::Aborted => Some(Duration::from_secs(1)),
            _ => None,
        };
        if code == Code::Internal {
            tracing::error!(error = %err, "internal error");
        }
        match err.reason() {
            Some(reason) => status(code, message, reason, &err.metadata(), retry),
            None => match retry {
                Some(delay) => {
                    let mut details = tonic_types::ErrorDetails::new();
                    details.set_retry_info(Some(delay));
                    tonic::Status::with_error_details(code, message, details)
                }
                None => tonic::Status::new(code, message),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason_of(status: &tonic::Status) -> String {
        status
            .get_error_details()
            .error_info()
            .map(|i| i.reason.clone())
            .unwrap_or_default()
    }

    #[test]
    fn each_failure_gets_its_code_and_reason() {
        let cases = [
            (
                Error::JobNotFound("j".into()),
                Code::NotFound,
                "JOB_NOT_FOUND",
            ),
            (
                Error::IdempotencyKeyReused { job_id: "j".into() },
                Code::AlreadyExists,
                "IDEMPOTENCY_KEY_REUSED",
            ),
            (
                Error::QuotaExceeded {
                    client: "c".into(),
                    active: 3,
                    limit: 3,
                },
                Code::ResourceExhausted,
                "QUOTA_EXCEEDED",
            ),
            (
                Error::Store(StoreError::LeaseExpired {
                    member_id: "m".into(),
                }),
                Code::FailedPrecondition,
                "LEASE_EXPIRED",
            ),
            (
                Error::OffsetOutOfRange { offset: 9, size: 3 },
                Code::OutOfRange,
                "OFFSET_OUT_OF_RANGE",
            ),
            (
                Error::Unauthenticated("no token".into()),
                Code::Unauthenticated,
                "UNAUTHENTICATED",
            ),
        ];
        for (err, code, reason) in cases {
            let status = tonic::Status::from(err);
            assert_eq!((status.code(), reason_of(&status).as_str()), (code, reason));
        }
    }

    #[test]
    fn transient_store_failures_are_unavailable_with_a_retry_delay() {
        let status = tonic::Status::from(Error::Store(StoreError::Backend("down".into())));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("down"));
    }
}

//! The one error type of the store, shared by both backends so that a caller
//! (the coordinator's single `StoreError -> tonic::Status` conversion, the
//! learner's queue loop) branches on the same variants whichever backend is
//! configured.

/// Result of every store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation failed. A failed operation changes nothing, except
/// [`StoreError::Io`] from the embedded backend's write-ahead log, after which
/// the embedded store refuses every further call (see `docs/store.md`).
///
/// Answers that a caller is expected to branch on in normal operation (an
/// idempotency key that matched, a full rollout queue) are not errors; they
/// are variants of the operation's outcome type ([`crate::CreateOutcome`],
/// [`crate::AppendOutcome`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing named does not exist (a job, a member, a weight version).
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// What was looked up: "job", "member", "weight version".
        kind: &'static str,
        /// Its id (for weight versions `job_id@version`).
        id: String,
    },

    /// A compare-and-set lost: the stored revision is not the expected one,
    /// or the thing already exists with other content (a job id taken, a
    /// weight version committed with another sha256). The caller re-reads
    /// and decides again.
    #[error("conflict on {kind} {id:?}: {message}")]
    Conflict {
        /// What conflicted: "job", "member", "weight version".
        kind: &'static str,
        /// Its id.
        id: String,
        /// What was expected and what was found.
        message: String,
    },

    /// A job in a terminal state (SUCCEEDED, FAILED, CANCELLED) cannot change
    /// state again.
    #[error("job {job_id:?} is terminal ({state}) and cannot move to {requested}")]
    JobTerminal {
        /// The job.
        job_id: String,
        /// Its terminal state, as the enum value name.
        state: String,
        /// The state that was asked for.
        requested: String,
    },

    /// A weight version is not above the highest version ever committed for
    /// the job (versions only grow, also across garbage collection).
    #[error(
        "weight version {version} of job {job_id:?} is not above the latest committed version {latest}"
    )]
    VersionNotMonotonic {
        /// The job.
        job_id: String,
        /// The version offered.
        version: u64,
        /// The highest version committed so far.
        latest: u64,
    },

    /// Garbage collection tried to delete a weight version that a reader
    /// still holds a live fetch pin on.
    #[error("weight version {version} of job {job_id:?} is pinned by a reader")]
    Pinned {
        /// The job.
        job_id: String,
        /// The pinned version.
        version: u64,
    },

    /// The member's lease has expired, or the member id is unknown: the
    /// process must register again.
    #[error("lease of member {member_id:?} has expired or the member is unknown")]
    LeaseExpired {
        /// The member.
        member_id: String,
    },

    /// An argument is malformed (an empty id, an UNSPECIFIED state, a page
    /// token issued for another filter, a zero queue bound).
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        /// The argument, by name (for example `page_token`, `job.state`).
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },

    /// The backend failed (Redis unreachable, a script error, a reply of an
    /// unexpected shape). Usually transient: retry later.
    #[error("store backend: {0}")]
    Backend(String),

    /// The embedded backend could not read or write its directory.
    #[error("store i/o on {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Stored bytes do not decode: a corrupt record, or data written by an
    /// incompatible version. Names the key or record it came from.
    #[error("cannot decode {what}: {message}")]
    Decode {
        /// The Redis key and field, or the embedded file and record.
        what: String,
        /// Why.
        message: String,
    },
}

impl StoreError {
    /// Shorthand for [`StoreError::NotFound`].
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound {
            kind,
            id: id.into(),
        }
    }

    /// Shorthand for [`StoreError::InvalidArgument`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// Shorthand for [`StoreError::Decode`].
    pub fn decode(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::Decode {
            what: what.into(),
            message: message.to_string(),
        }
    }

    /// Shorthand for [`StoreError::Io`].
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(err: redis::RedisError) -> Self {
        Self::Backend(format!("redis: {err}"))
    }
}

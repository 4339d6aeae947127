//! The error conventions of `common.proto` as code: the `google.rpc` rich
//! details every Encore service attaches to a failed call (an `ErrorInfo`
//! with domain [`ERROR_DOMAIN`] and a [`ErrorReason`] name, a `BadRequest`
//! naming each bad field, a `RetryInfo` when the server knows how long to
//! back off), so that each service's one `Error -> tonic::Status`
//! conversion only decides the code and the reason.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tonic::Code;
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::v1::ErrorReason;

/// `ErrorInfo.domain` of every Encore error.
pub const ERROR_DOMAIN: &str = "encore.v1";

/// Most field violations one error carries; the rest are counted. Keeps the
/// `grpc-status-details-bin` trailer well inside HTTP/2 header limits when a
/// request is wrong everywhere.
pub const MAX_VIOLATIONS: usize = 64;

/// Fields named in the status message; the BadRequest details list up to
/// [`MAX_VIOLATIONS`].
pub const MESSAGE_FIELDS: usize = 8;

/// Longest field path or description a violation keeps, in bytes. Paths can
/// hold map keys from the request and descriptions can quote values; without
/// a bound, one long key would push the trailers past HTTP/2's header limit
/// and the client would see a protocol error instead of the status.
pub const MAX_TEXT_BYTES: usize = 256;

/// `text` cut to at most `max` bytes at a character boundary, with an
/// ellipsis when something was cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field, e.g. `spec.stages[1].rewards[0].weight`.
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
                field: truncate(&field, MAX_TEXT_BYTES),
                reason,
                description: truncate(&description, MAX_TEXT_BYTES),
            });
        } else {
            self.omitted += 1;
        }
    }

    /// Records a malformed field (reason INVALID_FIELD).
    pub fn invalid(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.push(field.into(), ErrorReason::InvalidField, description.into());
    }

    /// A single malformed field (reason INVALID_FIELD).
    pub fn one(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut v = Self::default();
        v.invalid(field, description);
        v
    }

    /// Whether no field is bad.
    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }

    /// `Ok(())` when no field is bad, else the violations.
    pub fn into_result(self) -> Result<(), Self> {
        if self.is_empty() { Ok(()) } else { Err(self) }
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
    /// field.
    pub fn reason(&self) -> ErrorReason {
        self.listed
            .first()
            .map_or(ErrorReason::InvalidField, |v| v.reason)
    }

    /// The INVALID_ARGUMENT status for these violations: the message names
    /// the first [`MESSAGE_FIELDS`] fields, the BadRequest details list every
    /// field carried, and ErrorInfo carries the first field's reason.
    pub fn to_status(&self) -> tonic::Status {
        let mut details = ErrorDetails::new();
        error_info(&mut details, self.reason(), &[]);
        let fields: Vec<FieldViolation> = self
            .listed
            .iter()
            .map(|v| {
                let mut fv = FieldViolation::new(v.field.clone(), v.description.clone());
                fv.reason = reason_name(v.reason).to_owned();
                fv
            })
            .collect();
        details.set_bad_request(fields);
        tonic::Status::with_error_details(Code::InvalidArgument, self.to_string(), details)
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

/// The [`ErrorReason`] a status carries in its ErrorInfo (domain
/// [`ERROR_DOMAIN`]); `Unspecified` when it has none, one of another domain,
/// or a reason this build does not know.
pub fn reason_of(status: &tonic::Status) -> ErrorReason {
    status
        .get_error_details()
        .error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)
        .and_then(|info| ErrorReason::from_str_name(&format!("ERROR_REASON_{}", info.reason)))
        .unwrap_or(ErrorReason::Unspecified)
}

/// Sets the ErrorInfo of `details`: domain [`ERROR_DOMAIN`], `reason`, and
/// the given metadata.
pub fn error_info(details: &mut ErrorDetails, reason: ErrorReason, metadata: &[(&str, String)]) {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    details.set_error_info(reason_name(reason), ERROR_DOMAIN, metadata);
}

/// A status with `code`, `message`, an ErrorInfo of `reason` and
/// `metadata`, and a RetryInfo when `retry_after` is given.
pub fn status(
    code: Code,
    message: impl Into<String>,
    reason: ErrorReason,
    metadata: &[(&str, String)],
    retry_after: Option<Duration>,
) -> tonic::Status {
    let mut details = ErrorDetails::new();
    error_info(&mut details, reason, metadata);
    if retry_after.is_some() {
        details.set_retry_info(retry_after);
    }
    tonic::Status::with_error_details(code, message, details)
}

/// The canonical upper-case name of a gRPC code, as grpc-go and the gRPC
/// spec spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
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
        let status = v.to_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        for field in ["models[1]", "items[0].tokens[3]"] {
            assert!(status.message().contains(field), "{}", status.message());
        }
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
            v.invalid(format!("items[{i}].caption"), "empty");
        }
        assert_eq!(v.total(), 1000);
        let status = v.to_status();
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
    fn statuses_carry_reason_metadata_and_retry_delay() {
        let status = status(
            Code::ResourceExhausted,
            "busy",
            ErrorReason::Overloaded,
            &[("model", "quality".into())],
            Some(Duration::from_millis(250)),
        );
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(info.reason, "OVERLOADED");
        assert_eq!(info.metadata["model"], "quality");
        assert_eq!(reason_of(&status), ErrorReason::Overloaded);
        assert_eq!(
            reason_of(&tonic::Status::internal("no details")),
            ErrorReason::Unspecified
        );
        assert_eq!(
            details.retry_info().unwrap().retry_delay,
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn long_paths_and_descriptions_are_cut() {
        let mut v = Violations::default();
        let key = "é".repeat(1000);
        v.invalid(format!("labels[{key:?}]"), key.clone());
        let kept = &v.listed()[0];
        assert!(kept.field.len() <= MAX_TEXT_BYTES && kept.field.ends_with("..."));
        assert!(kept.description.len() <= MAX_TEXT_BYTES);
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn reason_names_drop_the_prefix() {
        assert_eq!(reason_name(ErrorReason::TooLarge), "TOO_LARGE");
        assert_eq!(reason_name(ErrorReason::NonFinite), "NON_FINITE");
    }
}

//! The one error type of this crate.

use std::net::SocketAddr;

/// Everything that can go wrong while setting up telemetry. All of it happens
/// at start-up; once running, the admin server and the signal watcher do not
/// fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A subsystem or metric name breaks the `encore_<subsystem>_<what>_<unit>`
    /// rule.
    #[error("metric name {name:?}: {reason}")]
    MetricName {
        /// The offending name, as given.
        name: String,
        /// Which part of the rule it breaks.
        reason: &'static str,
    },
    /// The registry refused a metric, most often because the same name was
    /// registered twice.
    #[error("registering metric {name}: {source}")]
    Register {
        /// The full metric name.
        name: String,
        /// Prometheus' reason.
        #[source]
        source: prometheus::Error,
    },
    /// The admin server could not bind its address.
    #[error("binding the admin server to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("installing the {signal} handler: {source}")]
    Signal {
        /// The signal, e.g. `SIGTERM`.
        signal: &'static str,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The encoded file descriptor set given to the reflection service is not
    /// a valid `FileDescriptorSet`.
    #[error("building the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

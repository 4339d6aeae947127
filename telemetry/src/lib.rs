//! Observability and lifecycle plumbing shared by every long-running Encore
//! process (coordinator, actors, learners, reward servers), so that each of
//! them logs, exports metrics, reports health and shuts down the same way.
//!
//! - [`logging`]: the `tracing` subscriber ([`init`], [`LogFormat`]).
//! - [`metrics`]: Prometheus metrics, registered per subsystem under the
//!   `encore_<subsystem>_<what>_<unit>` naming rule ([`Subsystem`]).
//! - [`admin`]: the HTTP admin server beside each gRPC server: `/metrics`,
//!   `/healthz` and `/readyz` ([`serve_admin`], [`Readiness`]).
//! - [`shutdown`]: SIGTERM / SIGINT turned into a
//!   [`CancellationToken`](tokio_util::sync::CancellationToken) that every
//!   loop selects on ([`shutdown_token`]).
//! - [`grpc`]: the standard gRPC health and reflection services that each
//!   tonic server adds next to its own ([`grpc_health`], [`grpc_reflection`]).
//!
//! A process wires them up once at start-up, roughly:
//!
//! ```no_run
//! # async fn run() -> Result<(), encore_telemetry::Error> {
//! use encore_telemetry::{AdminState, Readiness, serve_admin, shutdown_token};
//!
//! let shutdown = shutdown_token()?;
//! let readiness = Readiness::new();
//! let state = AdminState::new(encore_telemetry::registry().clone(), readiness.clone());
//! let (admin_addr, admin) = serve_admin("0.0.0.0:9090".parse().unwrap(), state, shutdown.clone()).await?;
//! // ... start the gRPC server with `shutdown.cancelled()` as its shutdown future ...
//! readiness.set_ready();
//! shutdown.cancelled().await;
//! readiness.set_not_ready("shutting down");
//! admin.await.ok();
//! # let _ = admin_addr;
//! # Ok(())
//! # }
//! ```

pub mod admin;
mod error;
pub mod grpc;
pub mod logging;
pub mod metrics;
pub mod shutdown;

pub use admin::{AdminState, Readiness, ReadyState, serve_admin};
pub use error::{Error, Result};
pub use grpc::{drain_signal, grpc_health, grpc_reflection, grpc_reflection_v1alpha};
pub use logging::{LogFormat, init};
pub use metrics::{Label, Subsystem, registry};
pub use shutdown::{ShutdownSignal, Signals, cancel_on, shutdown_token, wait_for_shutdown};

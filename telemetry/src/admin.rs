//! The HTTP admin server that runs beside each process's gRPC server, on its
//! own port, for the things that scrape and probe it rather than call it:
//!
//! - `GET /metrics`: the registry in Prometheus text format 0.0.4;
//! - `GET /healthz`: liveness, `200 ok` for as long as the process serves;
//! - `GET /readyz`: readiness, `200 ready` once the process said so through
//!   its [`Readiness`] handle, `503` with the reason before that, after it
//!   takes it back, and as soon as shutdown begins.
//!
//! The server stops accepting when the shutdown token is cancelled, answers
//! the requests it has, and its task then ends.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The content type of the text exposition format, version 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the process is ready to take traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyState {
    /// Ready.
    Ready,
    /// Not ready, and why (shown in `/readyz`'s body).
    NotReady(String),
}

/// A shared, cloneable readiness flag. It starts not ready ("starting"); the
/// process calls [`Readiness::set_ready`] once its dependencies are up and its
/// servers listen, and [`Readiness::set_not_ready`] when it loses one or
/// starts draining.
#[derive(Debug, Clone)]
pub struct Readiness {
    state: Arc<watch::Sender<ReadyState>>,
}

impl Readiness {
    /// A new flag, not ready with the reason "starting".
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(ReadyState::NotReady(
                "starting".to_owned(),
            ))),
        }
    }

    /// Marks the process ready.
    pub fn set_ready(&self) {
        self.state.send_replace(ReadyState::Ready);
    }

    /// Marks the process not ready, with a reason for whoever reads
    /// `/readyz`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.state.send_replace(ReadyState::NotReady(reason.into()));
    }

    /// The current state.
    pub fn state(&self) -> ReadyState {
        self.state.borrow().clone()
    }

    /// Whether the process is ready now.
    pub fn is_ready(&self) -> bool {
        matches!(*self.state.borrow(), ReadyState::Ready)
    }

    /// Resolves once the process is ready (at once if it already is).
    pub async fn wait_ready(&self) {
        let mut rx = self.state.subscribe();
        // `self` holds the sender, so the channel cannot close under us.
        let _ = rx.wait_for(|s| matches!(s, ReadyState::Ready)).await;
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

/// What the admin server reports on: the metrics registry and the readiness
/// flag.
#[derive(Debug, Clone)]
pub struct AdminState {
    registry: Registry,
    readiness: Readiness,
}

impl AdminState {
    /// The state for a process whose metrics live in `registry` (usually
    /// [`crate::registry()`]`.clone()`) and whose readiness is `readiness`.
    pub fn new(registry: Registry, readiness: Readiness) -> Self {
        Self {
            registry,
            readiness,
        }
    }
}

/// What each handler sees.
#[derive(Clone)]
struct Shared {
    state: AdminState,
    shutdown: CancellationToken,
}

/// Binds `addr` (port 0 picks a free port) and serves the admin endpoints
/// until `shutdown` is cancelled. Returns the address actually bound and the
/// server's task, which ends once the server has stopped.
pub async fn serve_admin(
    addr: SocketAddr,
    state: AdminState,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let bind_error = |source| Error::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let app = router(Shared {
        state,
        shutdown: shutdown.clone(),
    });
    tracing::info!(addr = %bound, "admin server listening");
    let task = tokio::spawn(async move {
        // `axum::serve` never returns an error: accept errors are retried
        // inside, so there is nothing to report here.
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        tracing::info!(addr = %bound, "admin server stopped");
    });
    Ok((bound, task))
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Shared>) -> Response {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&shared.state.registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics: {e}\n"),
            )
                .into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Shared>) -> (StatusCode, String) {
    if shared.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_owned(),
        );
    }
    match shared.state.readiness.state() {
        ReadyState::Ready => (StatusCode::OK, "ready\n".to_owned()),
        ReadyState::NotReady(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_flips_and_wakes_waiters() {
        let readiness = Readiness::new();
        assert_eq!(readiness.state(), ReadyState::NotReady("starting".into()));
        let waiter = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.wait_ready().await }
        });
        assert!(!waiter.is_finished());
        readiness.clone().set_ready();
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("wait_ready did not wake up")
            .unwrap();
        assert!(readiness.is_ready());
        readiness.set_not_ready("redis down");
        assert_eq!(readiness.state(), ReadyState::NotReady("redis down".into()));
    }

    #[tokio::test]
    async fn readyz_is_unavailable_once_shutdown_begins() {
        let readiness = Readiness::new();
        readiness.set_ready();
        let shared = Shared {
            state: AdminState::new(Registry::new(), readiness),
            shutdown: CancellationToken::new(),
        };
        assert_eq!(readyz(State(shared.clone())).await.0, StatusCode::OK);
        shared.shutdown.cancel();
        let (status, body) = readyz(State(shared)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("shutting down"), "{body}");
    }
}

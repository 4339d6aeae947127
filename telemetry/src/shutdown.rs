//! Graceful shutdown: SIGTERM (what Kubernetes and systemd send) and SIGINT
//! (Ctrl-C) cancel one [`CancellationToken`] that every server and loop of
//! the process selects on.
//!
//! Installing a handler replaces the signal's default action, which is to
//! kill the process, for the rest of its life. So that a drain that hangs
//! can still be cut short, [`shutdown_token`] exits the process at once on a
//! second signal.

use std::fmt::Display;

use tokio::signal::unix::{self, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The signals that ask an Encore process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownSignal {
    /// SIGTERM.
    Terminate,
    /// SIGINT.
    Interrupt,
}

impl ShutdownSignal {
    /// The conventional exit status of a process killed by this signal,
    /// 128 + its number.
    pub const fn exit_code(self) -> i32 {
        match self {
            ShutdownSignal::Terminate => 128 + 15,
            ShutdownSignal::Interrupt => 128 + 2,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            ShutdownSignal::Terminate => "SIGTERM",
            ShutdownSignal::Interrupt => "SIGINT",
        }
    }
}

impl Display for ShutdownSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Handlers for SIGTERM and SIGINT. Signals that arrive after
/// [`Signals::install`] are kept until [`Signals::recv`] takes them, so
/// install early, before the servers start.
#[derive(Debug)]
pub struct Signals {
    terminate: unix::Signal,
    interrupt: unix::Signal,
}

impl Signals {
    /// Installs the handlers. Must be called from within a Tokio runtime.
    pub fn install() -> Result<Self> {
        let install = |signal: ShutdownSignal, kind| {
            unix::signal(kind).map_err(|source| Error::Signal {
                signal: signal.name(),
                source,
            })
        };
        Ok(Self {
            terminate: install(ShutdownSignal::Terminate, SignalKind::terminate())?,
            interrupt: install(ShutdownSignal::Interrupt, SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT. Never resolves once the runtime
    /// is shutting down (the signal driver is gone then).
    pub async fn recv(&mut self) -> ShutdownSignal {
        tokio::select! {
            Some(()) = self.terminate.recv() => ShutdownSignal::Terminate,
            Some(()) = self.interrupt.recv() => ShutdownSignal::Interrupt,
            else => std::future::pending().await,
        }
    }
}

/// Installs the handlers and waits for the first SIGTERM or SIGINT.
pub async fn wait_for_shutdown() -> Result<ShutdownSignal> {
    Ok(Signals::install()?.recv().await)
}

/// Waits for `signal` and cancels `token` when it resolves, logging what
/// arrived. Returns what arrived, or `None` if the token was cancelled some
/// other way first (then `signal` is dropped unfinished).
///
/// `signal` is any future so that tests can drive this with a channel
/// instead of a real signal; [`shutdown_token`] passes [`Signals::recv`].
pub async fn cancel_on<F>(signal: F, token: &CancellationToken) -> Option<F::Output>
where
    F: Future,
    F::Output: Display,
{
    tokio::select! {
        received = signal => {
            tracing::info!(signal = %received, "shutdown requested; draining");
            token.cancel();
            Some(received)
        }
        () = token.cancelled() => None,
    }
}

/// A token cancelled on the first SIGTERM or SIGINT. The handlers are
/// installed before this returns, so a signal sent right after is not lost.
/// A second signal, after the first or after the token was cancelled some
/// other way, exits the process at once with status 128 + the signal's
/// number. Must be called from within a Tokio runtime.
pub fn shutdown_token() -> Result<CancellationToken> {
    let mut signals = Signals::install()?;
    let token = CancellationToken::new();
    let watched = token.clone();
    tokio::spawn(async move {
        cancel_on(signals.recv(), &watched).await;
        let again = signals.recv().await;
        tracing::warn!(signal = %again, "second shutdown signal; exiting without draining");
        std::process::exit(again.exit_code());
    });
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn cancel_on_cancels_when_the_signal_arrives() {
        let token = CancellationToken::new();
        let (tx, rx) = oneshot::channel::<()>();
        let watcher = tokio::spawn({
            let token = token.clone();
            async move {
                let signal = async {
                    rx.await.unwrap();
                    ShutdownSignal::Terminate
                };
                cancel_on(signal, &token).await
            }
        });
        assert!(!token.is_cancelled());
        tx.send(()).unwrap();
        assert_eq!(watcher.await.unwrap(), Some(ShutdownSignal::Terminate));
        assert!(token.is_cancelled());
    }

    #[tokio::test]
    async fn cancel_on_returns_when_cancelled_elsewhere() {
        let token = CancellationToken::new();
        let watcher = tokio::spawn({
            let token = token.clone();
            async move { cancel_on(std::future::pending::<ShutdownSignal>(), &token).await }
        });
        token.cancel();
        assert_eq!(watcher.await.unwrap(), None);
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(ShutdownSignal::Terminate.exit_code(), 128 + libc::SIGTERM);
        assert_eq!(ShutdownSignal::Interrupt.exit_code(), 128 + libc::SIGINT);
        assert_eq!(ShutdownSignal::Interrupt.to_string(), "SIGINT");
    }
}

//! Pieces of a local cluster of `encore serve ROLE` processes, shared by
//! the quick start (`quickstart/cluster.rs`) and the cross-process tests
//! (`tests/`): the typed configuration file, tokens, stopping a process,
//! reading its log.

use std::path::Path;
use std::time::Duration;

use tokio::process::Child;

/// The cluster's configuration file: one section per process, typed, so
/// that a key the processes do not know cannot be written.
#[derive(Debug, serde::Serialize)]
pub struct ClusterConfig {
    /// `[coordinator]`.
    pub coordinator: encore_coordinator::Config,
    /// `[reward_server]`.
    pub reward_server: encore_reward_server::Config,
    /// `[actor]`.
    pub actor: encore_actor::Config,
    /// `[learner]`.
    pub learner: encore_learner::Config,
}

/// A token nobody can guess, so that a stray process on this machine
/// cannot join the cluster.
pub fn token(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// Sends SIGTERM to `child` and waits up to `grace` for it to exit (then
/// SIGKILL); `Err` says how it did not exit cleanly.
pub async fn stop(child: &mut Child, grace: Duration) -> Result<(), String> {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(status.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!("no exit {grace:?} after SIGTERM"))
        }
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

//! The learner rank's configuration: one serde [`Config`], section
//! `learner`, layered by `encore-config` (defaults < file <
//! `ENCORE_LEARNER__*` < [`Flags`]) and checked once at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use encore_client::CoordinatorTls;
use serde::{Deserialize, Serialize};

use crate::collective::RingSecret;
use crate::error::LearnerError;

/// Section of the config file the learner reads.
pub const SECTION: &str = "learner";

/// Everything a learner rank can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The coordinator's gRPC URL.
    pub coordinator: String,
    /// TLS towards an `https://` coordinator: `ca`, the CA certificate
    /// (PEM) its certificate chains to. Required for `https://`.
    pub tls: Option<CoordinatorTls>,
    /// The worker token (or `worker_token_file`).
    pub worker_token: Option<String>,
    /// A file holding the worker token.
    pub worker_token_file: Option<PathBuf>,
    /// The secret the ranks of a TCP ring prove to each other at the
    /// handshake (or `ring_secret_file`); a peer without it is refused.
    /// Unset, it is derived from the worker token, which every rank holds.
    pub ring_secret: Option<String>,
    /// A file holding the ring secret.
    pub ring_secret_file: Option<PathBuf>,
    /// This process incarnation's id; empty draws one at start-up.
    pub instance_id: String,
    /// Address of the admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
    /// Port 0 (the default) picks a free port, logged at start-up, so that
    /// several learner ranks can run on one machine; a deployment that scrapes
    /// them sets a fixed one (deploy/ uses 9481).
    pub admin: SocketAddr,
    /// Address the collective listener binds (port 0 picks a free port).
    pub listen: SocketAddr,
    /// host:port the other ranks reach the listener at; empty means the
    /// bound address.
    pub advertise: String,
    /// Device to train on: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Where published weight files are staged.
    pub work_dir: PathBuf,
    /// Checkpoints kept per job.
    pub keep_checkpoints: usize,
    /// Longest wait of a collective operation for a peer, in milliseconds.
    pub collective_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:50051".into(),
            tls: None,
            worker_token: None,
            worker_token_file: None,
            ring_secret: None,
            ring_secret_file: None,
            instance_id: String::new(),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: String::new(),
            device: "cpu".into(),
            work_dir: PathBuf::from("runs/learner"),
            keep_checkpoints: 3,
            collective_timeout_ms: 120_000,
        }
    }
}

impl Config {
    /// Builds the configuration from defaults, `file`, the environment and
    /// `flags`, and validates it.
    pub fn load(file: Option<&Path>, flags: &Flags) -> Result<Self, LearnerError> {
        let config: Config = encore_config::load(SECTION, file, flags)
            .map_err(|e| LearnerError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the error names the first offending key.
    pub fn validate(&self) -> Result<(), LearnerError> {
        let bad =
            |key: &str, why: String| Err(LearnerError::Config(format!("{SECTION}.{key}: {why}")));
        encore_config::check_url(&format!("{SECTION}.coordinator"), &self.coordinator)
            .map_err(|e| LearnerError::Config(e.to_string()))?;
        encore_client::endpoint::endpoint(&self.coordinator, self.tls.as_ref())
            .map_err(|e| LearnerError::Config(format!("{SECTION}.{e}")))?;
        if self.keep_checkpoints == 0 {
            return bad("keep_checkpoints", "must be at least 1".into());
        }
        if self.collective_timeout_ms == 0 {
            return bad("collective_timeout_ms", "must be at least 1".into());
        }
        if let Err(e) = encore_model::device(&self.device) {
            return bad("device", e.to_string());
        }
        self.token()?;
        self.ring_secret().map(|_| ())
    }

    /// The TCP ring's secret: `ring_secret` (or its file), else one derived
    /// from the worker token. Fails if neither is set.
    pub fn ring_secret(&self) -> Result<RingSecret, LearnerError> {
        let explicit = encore_config::secret(
            &format!("{SECTION}.ring_secret"),
            self.ring_secret.as_deref(),
            self.ring_secret_file.as_deref(),
        )
        .map_err(|e| LearnerError::Config(e.to_string()))?;
        let secret = match explicit {
            Some(secret) => format!("ring secret:{secret}"),
            None => format!("worker token:{}", self.token()?),
        };
        Ok(RingSecret::new(secret.as_bytes()))
    }

    /// The worker token, from the config or its file.
    pub fn token(&self) -> Result<String, LearnerError> {
        encore_config::secret(
            &format!("{SECTION}.worker_token"),
            self.worker_token.as_deref(),
            self.worker_token_file.as_deref(),
        )
        .map_err(|e| LearnerError::Config(e.to_string()))?
        .ok_or_else(|| {
            LearnerError::Config(format!(
                "{SECTION}.worker_token: required (or worker_token_file, or ENCORE_LEARNER__WORKER_TOKEN)"
            ))
        })
    }

    /// `collective_timeout_ms` as a duration.
    pub fn collective_timeout(&self) -> Duration {
        Duration::from_millis(self.collective_timeout_ms)
    }
}

/// Command-line flags of `encore-learner`; each overrides its config key.
#[derive(Debug, Clone, Default, clap::Parser, Serialize)]
#[command(
    name = "encore-learner",
    version,
    about = "Runs an Encore learner rank."
)]
pub struct Flags {
    /// Configuration file (TOML or JSON) with a `[learner]` section.
    #[arg(long, env = "ENCORE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Log format on stderr: text or json.
    #[arg(long, default_value = "text")]
    #[serde(skip)]
    pub log_format: encore_telemetry::LogFormat,
    /// The coordinator's URL [default: http://127.0.0.1:50051].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Collective listener address [default: 127.0.0.1:0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Address the other ranks reach the listener at [default: the bound one].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Admin HTTP address [default: 127.0.0.1:0, a free port].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Where published weight files are staged [default: runs/learner].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_secret_is_its_own_or_derived_from_the_worker_token() {
        let with_token = |token: &str| Config {
            worker_token: Some(token.into()),
            ..Config::default()
        };
        let derived = with_token("w").ring_secret().unwrap();
        assert_eq!(derived, with_token("w").ring_secret().unwrap());
        assert_ne!(derived, with_token("v").ring_secret().unwrap());
        let own = Config {
            ring_secret: Some("w".into()),
            ..with_token("w")
        };
        assert_ne!(own.ring_secret().unwrap(), derived);
        let err = Config::default().ring_secret().unwrap_err().to_string();
        assert!(err.contains("learner.worker_token"), "{err}");
    }
}

//! The actor's configuration: one serde [`Config`], section `actor`,
//! layered by `encore-config` (defaults < file < `ENCORE_ACTOR__*` <
//! [`Flags`]) and checked once at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use encore_client::CoordinatorTls;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Section of the config file the actor reads.
pub const SECTION: &str = "actor";

/// Everything the actor can be told.
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
    /// This process incarnation's id; empty draws one at start-up
    /// (`actor-<host>-<random>`).
    pub instance_id: String,
    /// Address of the admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
    /// Port 0 (the default) picks a free port, logged at start-up, so that
    /// several actors can run on one machine; a deployment that scrapes
    /// them sets a fixed one (deploy/ uses 9471).
    pub admin: SocketAddr,
    /// Device to sample on: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Where fetched weights are kept.
    pub work_dir: PathBuf,
    /// Most batches the rollout queue may hold that the learners have not
    /// read yet before the actor waits (backpressure). Batches read and
    /// not yet acknowledged (they are acknowledged at checkpoints) do not
    /// count.
    pub queue_max_batches: u64,
    /// Most batches the learners may have waiting unread before the actor
    /// holds back its next one. 0 (the default) derives it from the job:
    /// actors x max_staleness, beyond which a new batch would be read too
    /// late and dropped as stale.
    pub max_lead_batches: u64,
    /// Deadline of one Score call, in milliseconds.
    pub score_deadline_ms: u64,
    /// Longest back-off between retries of a failing call, in milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:50051".into(),
            tls: None,
            worker_token: None,
            worker_token_file: None,
            instance_id: String::new(),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            device: "cpu".into(),
            work_dir: PathBuf::from("runs/actor"),
            queue_max_batches: 64,
            max_lead_batches: 0,
            score_deadline_ms: 30_000,
            max_backoff_ms: 5_000,
        }
    }
}

impl Config {
    /// Builds the configuration from defaults, `file`, the environment and
    /// `flags`, and validates it.
    pub fn load(file: Option<&Path>, flags: &Flags) -> Result<Self> {
        let config: Config =
            encore_config::load(SECTION, file, flags).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the error names the first offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::Config(format!("{SECTION}.{key}: {why}")));
        encore_config::check_url(&format!("{SECTION}.coordinator"), &self.coordinator)
            .map_err(|e| Error::Config(e.to_string()))?;
        encore_client::endpoint::endpoint(&self.coordinator, self.tls.as_ref())
            .map_err(|e| Error::Config(format!("{SECTION}.{e}")))?;
        if self.queue_max_batches == 0 {
            return bad("queue_max_batches", "must be at least 1".into());
        }
        if self.score_deadline_ms == 0 {
            return bad("score_deadline_ms", "must be at least 1".into());
        }
        if let Err(e) = encore_model::device(&self.device) {
            return bad("device", e.to_string());
        }
        Ok(())
    }

    /// The worker token, from the config or its file.
    pub fn token(&self) -> Result<String> {
        encore_config::secret(
            &format!("{SECTION}.worker_token"),
            self.worker_token.as_deref(),
            self.worker_token_file.as_deref(),
        )
        .map_err(|e| Error::Config(e.to_string()))?
        .ok_or_else(|| {
            Error::Config(format!(
                "{SECTION}.worker_token: required (or worker_token_file, or ENCORE_ACTOR__WORKER_TOKEN)"
            ))
        })
    }

    /// `score_deadline_ms` as a duration.
    pub fn score_deadline(&self) -> Duration {
        Duration::from_millis(self.score_deadline_ms)
    }

    /// `max_backoff_ms` as a duration.
    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }
}

/// Command-line flags of `encore-actor`; each overrides its config key.
#[derive(Debug, Clone, Default, clap::Parser, Serialize)]
#[command(name = "encore-actor", version, about = "Runs an Encore actor.")]
pub struct Flags {
    /// Configuration file (TOML or JSON) with an `[actor]` section.
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
    /// This process's instance id [default: drawn at start-up].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Admin HTTP address [default: 127.0.0.1:0, a free port].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Where fetched weights are kept [default: runs/actor].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
}

//! The coordinator's configuration: one serde [`Config`], section
//! `coordinator`, layered by `encore-config` (defaults < file <
//! `ENCORE_COORDINATOR__*` < [`Flags`]) and checked once at start-up by
//! [`Config::validate`], whose messages name the offending key.
//!
//! Secrets (client and worker tokens) can come inline, from the
//! environment (`ENCORE_COORDINATOR__AUTH__WORKER_TOKEN`), or from files
//! (a Kubernetes Secret mounted as a volume); [`Config::authenticator`]
//! reads them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::Authenticator;
use crate::error::{Error, Result};

/// Section of the config file the coordinator reads.
pub const SECTION: &str = "coordinator";

/// Everything the coordinator can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Address of the admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    /// The store holding all state: `embedded://DIR` or
    /// `redis://host:port/db`.
    pub store: String,
    /// Where the rollout queue lives, as handed to actors and learners;
    /// empty means the store itself, or for an embedded store (which no
    /// other process may open) `coordinator://`: this coordinator's
    /// RolloutQueueService.
    pub rollout_queue: String,
    /// Directory of weight blobs (a shared volume on Kubernetes).
    pub blob_dir: PathBuf,
    /// Root of the learners' checkpoint directories (one per job under it),
    /// as handed to learner ranks.
    pub checkpoint_dir: PathBuf,
    /// A member's lease lasts this long after its last heartbeat, in
    /// milliseconds; members are told to heartbeat every third of it.
    pub lease_ttl_ms: u64,
    /// Weight versions kept per job besides version 0: the latest this many.
    pub keep_versions: u32,
    /// How long a fetch pins the version it reads, renewed while it runs,
    /// in milliseconds; garbage collection never deletes a pinned version.
    pub fetch_pin_ttl_ms: u64,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most PENDING or RUNNING jobs one client may have.
    pub max_active_jobs_per_client: u64,
    /// How long shutdown waits for in-flight rpcs, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// TLS for the gRPC port; plaintext when unset.
    pub tls: Option<TlsConfig>,
    /// Bearer tokens.
    pub auth: AuthConfig,
}

/// TLS certificate and key of the gRPC port (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

/// Where the bearer tokens come from. A client named in both an inline
/// entry and the file keeps both tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Client tokens inline, as `CLIENT:TOKEN`.
    pub client_tokens: Vec<String>,
    /// A file of client tokens, one `CLIENT:TOKEN` per line (blank lines
    /// and lines starting with `#` are skipped).
    pub client_tokens_file: Option<PathBuf>,
    /// The token workers (actors, learners, reward servers) register with,
    /// as any role. May be left out when every role has its own token.
    pub worker_token: Option<String>,
    /// A file holding the worker token (surrounding whitespace trimmed).
    pub worker_token_file: Option<PathBuf>,
    /// A token that registers actors only.
    pub actor_token: Option<String>,
    /// A file holding the actor token.
    pub actor_token_file: Option<PathBuf>,
    /// A token that registers learner ranks only.
    pub learner_token: Option<String>,
    /// A file holding the learner token.
    pub learner_token_file: Option<PathBuf>,
    /// A token that registers reward servers only.
    pub reward_server_token: Option<String>,
    /// A file holding the reward server token.
    pub reward_server_token_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9451)),
            store: "embedded://runs/coordinator/state".into(),
            rollout_queue: String::new(),
            blob_dir: PathBuf::from("runs/coordinator/blobs"),
            checkpoint_dir: PathBuf::from("runs/coordinator/checkpoints"),
            lease_ttl_ms: 15_000,
            keep_versions: 3,
            fetch_pin_ttl_ms: 60_000,
            max_message_bytes: 4 << 20,
            max_active_jobs_per_client: 16,
            shutdown_grace_ms: 10_000,
            tls: None,
            auth: AuthConfig::default(),
        }
    }
}

/// Smallest useful lease: heartbeats go out every third of it.
const MIN_LEASE_TTL_MS: u64 = 100;
/// Weight chunks are up to 1 MiB; messages must hold one with its framing.
const MIN_MESSAGE_BYTES: usize = (1 << 20) + 4096;

impl Config {
    /// Builds the configuration from defaults, `file`, the environment and
    /// `flags`, and validates it.
    pub fn load(file: Option<&Path>, flags: &Flags) -> Result<Self> {
        let config: Config =
            encore_config::load(SECTION, file, flags).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the error names the first offending key. Tokens
    /// are checked by [`Config::authenticator`].
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::Config(format!("{SECTION}.{key}: {why}")));
        if !(self.store.starts_with("embedded://")
            || self.store.starts_with("redis://")
            || self.store.starts_with("rediss://"))
        {
            return bad(
                "store",
                format!(
                    "expected embedded://DIR or redis://HOST:PORT/DB, got {:?}",
                    self.store
                ),
            );
        }
        if self.blob_dir.as_os_str().is_empty() {
            return bad("blob_dir", "must not be empty".into());
        }
        if self.checkpoint_dir.as_os_str().is_empty() {
            return bad("checkpoint_dir", "must not be empty".into());
        }
        if self.lease_ttl_ms < MIN_LEASE_TTL_MS {
            return bad(
                "lease_ttl_ms",
                format!(
                    "must be at least {MIN_LEASE_TTL_MS}, got {}",
                    self.lease_ttl_ms
                ),
            );
        }
        if self.fetch_pin_ttl_ms == 0 {
            return bad("fetch_pin_ttl_ms", "must be at least 1".into());
        }
        if self.max_message_bytes < MIN_MESSAGE_BYTES {
            return bad(
                "max_message_bytes",
                format!(
                    "must be at least {MIN_MESSAGE_BYTES} (a 1 MiB weight chunk and its framing), got {}",
                    self.max_message_bytes
                ),
            );
        }
        if self.max_active_jobs_per_client == 0 {
            return bad("max_active_jobs_per_client", "must be at least 1".into());
        }
        Ok(())
    }

    /// `lease_ttl_ms` as a duration.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// How often members heartbeat: a third of the lease.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease_ttl() / 3
    }

    /// `fetch_pin_ttl_ms` as a duration.
    pub fn fetch_pin_ttl(&self) -> Duration {
        Duration::from_millis(self.fetch_pin_ttl_ms)
    }

    /// `shutdown_grace_ms` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The rollout queue's URI as handed to actors and learners.
    pub fn rollout_queue_uri(&self) -> &str {
        if self.rollout_queue.is_empty() && self.store.starts_with("embedded://") {
            encore_client::queue::COORDINATOR_QUEUE_URI
        } else if self.rollout_queue.is_empty() {
            &self.store
        } else {
            &self.rollout_queue
        }
    }

    /// Reads the tokens (inline and from their files) and builds the
    /// [`Authenticator`]. Fails, naming the key, when the worker token or
    /// every client token is missing: the coordinator never runs open.
    pub fn authenticator(&self) -> Result<Authenticator> {
        let auth = &self.auth;
        let bad = |key: &str, why: String| Error::Config(format!("{SECTION}.auth.{key}: {why}"));
        let read = |key: &str, path: &Path| {
            std::fs::read_to_string(path).map_err(|e| bad(key, format!("{}: {e}", path.display())))
        };
        let secret = |key: &str, inline: Option<&str>, file: Option<&Path>| {
            encore_config::secret(&format!("{SECTION}.auth.{key}"), inline, file)
                .map_err(|e| Error::Config(e.to_string()))
        };
        let worker = secret(
            "worker_token",
            auth.worker_token.as_deref(),
            auth.worker_token_file.as_deref(),
        )?;
        let mut roles = Vec::new();
        for (role, key, inline, file) in [
            (
                encore_proto::v1::Role::Actor,
                "actor_token",
                &auth.actor_token,
                &auth.actor_token_file,
            ),
            (
                encore_proto::v1::Role::Learner,
                "learner_token",
                &auth.learner_token,
                &auth.learner_token_file,
            ),
            (
                encore_proto::v1::Role::RewardServer,
                "reward_server_token",
                &auth.reward_server_token,
                &auth.reward_server_token_file,
            ),
        ] {
            match secret(key, inline.as_deref(), file.as_deref())? {
                Some(token) => roles.push((role, token)),
                None if worker.is_none() => {
                    return Err(bad(
                        "worker_token",
                        format!(
                            "no worker token, and no {key} either, so no {} could register: set \
                             worker_token (or worker_token_file, or \
                             ENCORE_COORDINATOR__AUTH__WORKER_TOKEN), or a token for every role",
                            role.as_str_name()
                        ),
                    ));
                }
                None => {}
            }
        }
        let mut lines: Vec<(String, String)> = Vec::new();
        for (i, entry) in auth.client_tokens.iter().enumerate() {
            lines.push((format!("client_tokens[{i}]"), entry.clone()));
        }
        if let Some(path) = &auth.client_tokens_file {
            let text = read("client_tokens_file", path)?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if !line.is_empty() && !line.starts_with('#') {
                    lines.push((
                        format!("client_tokens_file line {}", i + 1),
                        line.to_owned(),
                    ));
                }
            }
        }
        let mut clients = Vec::with_capacity(lines.len());
        for (key, line) in &lines {
            match line.split_once(':') {
                Some((client, token)) if !client.trim().is_empty() && !token.trim().is_empty() => {
                    clients.push((client.trim().to_owned(), token.trim().to_owned()));
                }
                _ => return Err(bad(key, "expected CLIENT:TOKEN".into())),
            }
        }
        if clients.is_empty() {
            return Err(bad(
                "client_tokens",
                "no client token: set client_tokens or client_tokens_file".into(),
            ));
        }
        Authenticator::with_role_tokens(
            clients.iter().map(|(c, t)| (c.as_str(), t.as_str())),
            worker.as_deref().unwrap_or_default(),
            roles.iter().map(|(r, t)| (*r, t.as_str())),
        )
        .map_err(|why| bad("client_tokens", why))
    }
}

/// Command-line flags of `encore-coordinator`; each overrides its config
/// key.
#[derive(Debug, Clone, Default, clap::Parser, Serialize)]
#[command(
    name = "encore-coordinator",
    version,
    about = "Runs the Encore coordinator."
)]
pub struct Flags {
    /// Configuration file (TOML or JSON) with a `[coordinator]` section.
    #[arg(long, env = "ENCORE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Log format on stderr: text or json.
    #[arg(long, default_value = "text")]
    #[serde(skip)]
    pub log_format: encore_telemetry::LogFormat,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP address for /metrics, /healthz, /readyz [default: 127.0.0.1:9451].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// The store: embedded://DIR or redis://HOST:PORT/DB [default: embedded://runs/coordinator/state].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Directory of weight blobs [default: runs/coordinator/blobs].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_dir: Option<PathBuf>,
    /// Root of the learners' checkpoint directories [default: runs/coordinator/checkpoints].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Lease TTL in milliseconds [default: 15000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl_ms: Option<u64>,
    /// Weight versions kept per job besides version 0 [default: 3].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_versions: Option<u32>,
    /// Most live jobs per client [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_active_jobs_per_client: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tokens() -> Config {
        Config {
            auth: AuthConfig {
                client_tokens: vec!["alice:a".into()],
                worker_token: Some("w".into()),
                ..AuthConfig::default()
            },
            ..Config::default()
        }
    }

    #[test]
    fn the_defaults_are_valid_and_tokens_are_required() {
        Config::default().validate().unwrap();
        let err = Config::default().authenticator().unwrap_err().to_string();
        assert!(err.contains("coordinator.auth.worker_token"), "{err}");
        with_tokens().authenticator().unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        type Change = fn(&mut Config);
        let cases: [(Change, &str); 4] = [
            (|c| c.store = "postgres://x".into(), "coordinator.store"),
            (|c| c.lease_ttl_ms = 1, "coordinator.lease_ttl_ms"),
            (
                |c| c.max_message_bytes = 1000,
                "coordinator.max_message_bytes",
            ),
            (
                |c| c.max_active_jobs_per_client = 0,
                "coordinator.max_active_jobs_per_client",
            ),
        ];
        for (change, key) in cases {
            let mut config = with_tokens();
            change(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let mut config = with_tokens();
        config.auth.client_tokens = vec!["no-colon".into()];
        let err = config.authenticator().unwrap_err().to_string();
        assert!(err.contains("client_tokens[0]"), "{err}");
    }

    #[test]
    fn tokens_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("clients"), "# team\nalice:a\n\nbob:b\n").unwrap();
        std::fs::write(dir.path().join("worker"), "w\n").unwrap();
        let config = Config {
            auth: AuthConfig {
                client_tokens_file: Some(dir.path().join("clients")),
                worker_token_file: Some(dir.path().join("worker")),
                ..AuthConfig::default()
            },
            ..Config::default()
        };
        config.authenticator().unwrap();
    }

    #[test]
    fn role_tokens_can_stand_in_for_the_worker_token() {
        let mut config = with_tokens();
        config.auth.worker_token = None;
        config.auth.actor_token = Some("a-w".into());
        config.auth.learner_token = Some("l-w".into());
        let err = config.authenticator().unwrap_err().to_string();
        assert!(err.contains("reward_server_token"), "{err}");
        config.auth.reward_server_token = Some("r-w".into());
        config.authenticator().unwrap();
        config.auth.learner_token = Some("a-w".into());
        let err = config.authenticator().unwrap_err().to_string();
        assert!(err.contains("also given to another caller"), "{err}");
    }
}

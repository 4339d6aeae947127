//! The reward server's configuration: one serde [`Config`], section
//! `reward_server`, layered by `encore-config` (defaults < file <
//! `ENCORE_REWARD_SERVER__*` < [`Flags`]) and checked once at start-up by
//! [`Config::validate`], whose messages name the offending key.
//!
//! This is the first thing the process reads; everything downstream (which
//! models to load, how the batchers behave, what requests are accepted) comes
//! from here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use encore_client::CoordinatorTls;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Section of the config file the server reads.
pub const SECTION: &str = "reward_server";

/// A model to host: the name clients address it by and its checkpoint
/// directory (`config.json` + `model.safetensors`, as `encore-reward` writes
/// them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Name in `ScoreRequest.models` and `DescribeModels`.
    pub name: String,
    /// Checkpoint directory.
    pub path: PathBuf,
}

impl FromStr for ModelSpec {
    type Err = String;

    /// Parses the flag form `NAME=DIR`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(ModelSpec {
                name: name.to_owned(),
                path: PathBuf::from(path),
            }),
            _ => Err(format!("expected NAME=DIR, got {s:?}")),
        }
    }
}

/// Everything the reward server can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Address of the admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    /// The models to host.
    pub models: Vec<ModelSpec>,
    /// A MusicGen checkpoint directory (`config.json` + `model.safetensors`)
    /// whose EnCodec decodes items sent as codes (`ScoreItem.codebooks` >
    /// 1); only its `audio_encoder` part is read. None: only the embedded
    /// codec's tokens are scored.
    pub audio_codec: Option<PathBuf>,
    /// Most items one forward pass scores; 1 turns batching off. On a CPU
    /// small batches (about 8) score fastest, as larger ones spill out of
    /// the caches (measure with `reward-load`); on a GPU, larger ones pay.
    pub max_batch_items: usize,
    /// How long a batch waits for more requests after its first one was
    /// queued, in milliseconds.
    pub max_wait_ms: u64,
    /// Items each model's queue holds before new requests are turned away
    /// with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Most items per Score request.
    pub max_request_items: usize,
    /// Longest accepted caption, in bytes.
    pub max_caption_bytes: usize,
    /// Device the models run on: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// How long shutdown waits for in-flight requests before it stops
    /// anyway, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// The coordinator to join as a reward server (its gRPC URL), so that
    /// jobs find the models hosted here; empty runs stand-alone.
    pub coordinator: String,
    /// TLS towards an `https://` coordinator: `ca`, the CA certificate
    /// (PEM) its certificate chains to. Required for `https://`.
    pub tls: Option<CoordinatorTls>,
    /// The worker token (or `worker_token_file`): presented to the
    /// coordinator to register (the shared worker token, or the
    /// coordinator's `reward_server_token`), and, unless `caller_token` is
    /// set, required from every RewardService caller (actors send theirs)
    /// as `authorization: Bearer <token>`. Without either the server may
    /// only run stand-alone, and then serves anyone. gRPC health,
    /// reflection and the admin port stay open.
    pub worker_token: Option<String>,
    /// A file holding the worker token.
    pub worker_token_file: Option<PathBuf>,
    /// The token RewardService callers must present, when it is not the
    /// worker token: with one token per role, the actors' token.
    pub caller_token: Option<String>,
    /// A file holding the caller token.
    pub caller_token_file: Option<PathBuf>,
    /// host:port actors reach this server at, as told to the coordinator;
    /// empty means the bound gRPC address (fine on one machine; on
    /// Kubernetes, the pod's DNS name or IP).
    pub advertise: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9461)),
            models: Vec::new(),
            audio_codec: None,
            max_batch_items: 64,
            max_wait_ms: 5,
            queue_capacity: 1024,
            max_request_items: 256,
            max_caption_bytes: 1024,
            device: "cpu".into(),
            shutdown_grace_ms: 10_000,
            coordinator: String::new(),
            tls: None,
            worker_token: None,
            worker_token_file: None,
            caller_token: None,
            caller_token_file: None,
            advertise: String::new(),
        }
    }
}

/// Longest accepted `max_wait_ms`: a batch that waits longer than this for
/// company costs more latency than batching can win back.
const MAX_WAIT_LIMIT_MS: u64 = 10_000;

impl Config {
    /// Builds the configuration from defaults, `file`, the environment and
    /// `flags`, and validates it.
    pub fn load(file: Option<&Path>, flags: &Flags) -> Result<Self> {
        let config: Config =
            encore_config::load(SECTION, file, flags).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the error names the first offending key. An
    /// empty `models` list passes (models can also be handed to
    /// [`crate::ServerBuilder`] directly); the server refuses to start with
    /// no model at all.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::Config(format!("{SECTION}.{key}: {why}")));
        if self.max_batch_items == 0 {
            return bad(
                "max_batch_items",
                "must be at least 1 (1 turns batching off)".into(),
            );
        }
        if self.max_wait_ms > MAX_WAIT_LIMIT_MS {
            return bad(
                "max_wait_ms",
                format!(
                    "must be at most {MAX_WAIT_LIMIT_MS}, got {}",
                    self.max_wait_ms
                ),
            );
        }
        if self.max_request_items == 0 {
            return bad("max_request_items", "must be at least 1".into());
        }
        // Otherwise a request the validator accepts could never be queued,
        // not even on an idle server.
        if self.queue_capacity < self.max_request_items {
            return bad(
                "queue_capacity",
                format!(
                    "must be at least max_request_items ({}), got {}",
                    self.max_request_items, self.queue_capacity
                ),
            );
        }
        if self.max_caption_bytes == 0 {
            return bad("max_caption_bytes", "must be at least 1".into());
        }
        if !self.coordinator.is_empty() {
            encore_config::check_url(&format!("{SECTION}.coordinator"), &self.coordinator)
                .map_err(|e| Error::Config(e.to_string()))?;
            encore_client::endpoint::endpoint(&self.coordinator, self.tls.as_ref())
                .map_err(|e| Error::Config(format!("{SECTION}.{e}")))?;
            self.worker_token()?;
        }
        if let Err(e) = encore_model::device(&self.device) {
            return bad("device", e.to_string());
        }
        if self
            .audio_codec
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return bad("audio_codec", "must not be empty".into());
        }
        for (i, spec) in self.models.iter().enumerate() {
            check_model_name(&spec.name).or_else(|why| bad(&format!("models[{i}].name"), why))?;
            if spec.path.as_os_str().is_empty() {
                return bad(&format!("models[{i}].path"), "must not be empty".into());
            }
            if let Some(j) = self.models[..i].iter().position(|m| m.name == spec.name) {
                return bad(
                    &format!("models[{i}].name"),
                    format!("{:?} is already used by models[{j}]", spec.name),
                );
            }
        }
        Ok(())
    }

    /// The token RewardService callers must present, if one is configured:
    /// `caller_token`, else the worker token (inline or from their files).
    pub fn caller_token(&self) -> Result<Option<String>> {
        let caller = encore_config::secret(
            &format!("{SECTION}.caller_token"),
            self.caller_token.as_deref(),
            self.caller_token_file.as_deref(),
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        match caller {
            Some(token) => Ok(Some(token)),
            None => self.own_token(),
        }
    }

    fn own_token(&self) -> Result<Option<String>> {
        encore_config::secret(
            &format!("{SECTION}.worker_token"),
            self.worker_token.as_deref(),
            self.worker_token_file.as_deref(),
        )
        .map_err(|e| Error::Config(e.to_string()))
    }

    /// The worker token (inline or from its file); an error naming the key
    /// when a coordinator is configured without one.
    pub fn worker_token(&self) -> Result<String> {
        self.own_token()?.ok_or_else(|| {
            Error::Config(format!(
                "{SECTION}.worker_token: required to join the coordinator (or worker_token_file, \
                 or ENCORE_REWARD_SERVER__WORKER_TOKEN)"
            ))
        })
    }

    /// `max_wait_ms` as a duration.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// `shutdown_grace_ms` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// A model name follows the protocol's identifier rule: 1 to 128 bytes of
/// `[A-Za-z0-9._-]`.
pub(crate) fn check_model_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err(format!("{name:?} must be 1 to 128 bytes long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{name:?} may only hold letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Command-line flags of `encore-reward-server`. Flags left out fall back to
/// the config file, the environment and the defaults.
#[derive(Debug, Default, clap::Parser, Serialize)]
#[command(
    name = "encore-reward-server",
    version,
    about = "Serves Encore reward models over gRPC."
)]
pub struct Flags {
    /// Configuration file (TOML or JSON) with a `[reward_server]` section.
    #[arg(long, env = "ENCORE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Log format on stderr: text or json.
    #[arg(long, default_value = "text")]
    #[serde(skip)]
    pub log_format: encore_telemetry::LogFormat,
    /// gRPC listen address [default: 127.0.0.1:50061].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP address for /metrics, /healthz, /readyz [default: 127.0.0.1:9461].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// A model to host, as NAME=DIR; repeat for several. Replaces the
    /// config file's list.
    #[arg(long = "model", value_name = "NAME=DIR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelSpec>,
    /// A MusicGen checkpoint directory whose EnCodec decodes items sent as
    /// codes (codebooks > 1) [default: none, tokens only].
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_codec: Option<PathBuf>,
    /// Most items per forward pass; 1 turns batching off [default: 64].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_items: Option<usize>,
    /// Milliseconds a batch waits for more requests [default: 5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
    /// Items queued per model before RESOURCE_EXHAUSTED [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_capacity: Option<usize>,
    /// Most items per request [default: 256].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_items: Option<usize>,
    /// Longest caption in bytes [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_caption_bytes: Option<usize>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Milliseconds shutdown waits for in-flight requests [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_ms: Option<u64>,
    /// The coordinator to join, e.g. http://127.0.0.1:50051 [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// host:port actors reach this server at [default: the bound address].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// A file holding the worker token, which the coordinator and every
    /// RewardService caller must present [default: none, stand-alone and
    /// open].
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_token_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_a_coordinator_needs_a_worker_token() {
        let mut config = Config {
            coordinator: "http://127.0.0.1:50051".into(),
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("reward_server.worker_token"), "{err}");
        config.worker_token = Some("w".into());
        config.validate().unwrap();
        config.coordinator = "127.0.0.1:50051".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("reward_server.coordinator"), "{err}");
    }

    #[test]
    fn the_defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn model_flags_parse_as_name_equals_dir() {
        let spec: ModelSpec = "quality=runs/rewards/quality".parse().unwrap();
        assert_eq!(spec.name, "quality");
        assert_eq!(spec.path, PathBuf::from("runs/rewards/quality"));
        for bad in ["quality", "=dir", "name=", ""] {
            assert!(bad.parse::<ModelSpec>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    max_batch_items: 0,
                    ..Config::default()
                },
                "reward_server.max_batch_items",
            ),
            (
                Config {
                    max_wait_ms: 60_000,
                    ..Config::default()
                },
                "reward_server.max_wait_ms",
            ),
            (
                Config {
                    queue_capacity: 10,
                    ..Config::default()
                },
                "reward_server.queue_capacity",
            ),
            (
                Config {
                    max_request_items: 0,
                    ..Config::default()
                },
                "reward_server.max_request_items",
            ),
            (
                Config {
                    max_caption_bytes: 0,
                    ..Config::default()
                },
                "reward_server.max_caption_bytes",
            ),
            (
                Config {
                    device: "tpu".into(),
                    ..Config::default()
                },
                "reward_server.device",
            ),
            (
                Config {
                    models: vec!["a=x".parse().unwrap(), "a=y".parse().unwrap()],
                    ..Config::default()
                },
                "reward_server.models[1].name",
            ),
            (
                Config {
                    models: vec!["bad name=x".parse().unwrap()],
                    ..Config::default()
                },
                "reward_server.models[0].name",
            ),
            (
                Config {
                    audio_codec: Some(PathBuf::new()),
                    ..Config::default()
                },
                "reward_server.audio_codec",
            ),
        ];
        for (config, key) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err:?} does not name {key}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("encore.toml");
        std::fs::write(
            &file,
            "[reward_server]\nmax_batch_items = 8\nmax_wait_ms = 20\n\
             models = [{ name = \"quality\", path = \"q\" }, { name = \"x\", path = \"y\" }]\n",
        )
        .unwrap();
        let flags = Flags {
            max_wait_ms: Some(2),
            audio_codec: Some("musicgen-small".into()),
            ..Flags::default()
        };
        let config = Config::load(Some(&file), &flags).unwrap();
        assert_eq!(config.max_batch_items, 8);
        assert_eq!(config.max_wait_ms, 2);
        assert_eq!(config.audio_codec, Some(PathBuf::from("musicgen-small")));
        assert_eq!(
            config.models,
            vec!["quality=q".parse().unwrap(), "x=y".parse().unwrap()]
        );

        let flags = Flags {
            models: vec!["adherence=a".parse().unwrap()],
            ..Flags::default()
        };
        let config = Config::load(Some(&file), &flags).unwrap();
        assert_eq!(config.models, vec!["adherence=a".parse().unwrap()]);
    }
}

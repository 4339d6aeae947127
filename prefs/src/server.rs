//! The `encore-prefs` process: configuration (section `prefs`, layered by
//! `encore-config`: defaults < file < `ENCORE_PREFS__*` < flags), the gRPC
//! service, the page and its API over HTTP, `/metrics` `/healthz` `/readyz`
//! on the admin port, and a drain on SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use encore_proto::v1::preference_service_server::PreferenceServiceServer;
use encore_store::SystemClock;
use encore_telemetry::{AdminState, Readiness, serve_admin};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{HostedPolicy, Limits, PreferenceServer, Preferences};

/// The configuration section.
pub const SECTION: &str = "prefs";

/// Everything `encore-prefs` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC address (PreferenceService, health). Its default, 50071, is
    /// its own: the reward server's is 50061, and both may run on one
    /// machine.
    pub listen: SocketAddr,
    /// HTTP address of the page and its API.
    pub http: SocketAddr,
    /// Admin address: `/metrics`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    /// Where comparisons are kept: `embedded://DIR` or `redis://...`.
    pub store: String,
    /// Policies to generate with, `NAME=CHECKPOINT_DIR`; the first two are
    /// the default pair (one is compared against itself).
    pub policies: Vec<String>,
    /// Device to sample on.
    pub device: String,
    /// Clip length in seconds (25 frames each), capped by the policy.
    pub clip_seconds: f64,
    /// How long a served clip can be judged, in seconds.
    pub clip_ttl_s: u64,
    /// Longest prompt, in bytes.
    pub max_prompt_bytes: usize,
    /// Pairs one rater may ask for per minute.
    pub pairs_per_minute: u32,
    /// Comparisons one rater may submit per minute.
    pub comparisons_per_minute: u32,
    /// Pairs all raters together may ask for per minute (rater ids are
    /// not authenticated; this is what a made-up id cannot escape).
    pub all_pairs_per_minute: u32,
    /// Comparisons all raters together may submit per minute.
    pub all_comparisons_per_minute: u32,
    /// Most raters the per-rater limits track at once.
    pub max_raters: usize,
    /// Rater sessions all callers together may start per minute.
    pub sessions_per_minute: u32,
    /// The key rater ids are signed with (at least 16 bytes; surrounding
    /// whitespace trimmed), shared by every replica; without one a key is
    /// drawn at start-up, and rater sessions end with the process.
    pub rater_key: Option<String>,
    /// A file holding the rater key.
    pub rater_key_file: Option<PathBuf>,
    /// How long a drain waits for in-flight calls, in milliseconds.
    pub shutdown_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50071)),
            http: SocketAddr::from(([127, 0, 0, 1], 8090)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9491)),
            store: "embedded://runs/prefs/store".into(),
            policies: Vec::new(),
            device: "cpu".into(),
            clip_seconds: 8.0,
            clip_ttl_s: limits.clip_ttl.as_secs(),
            max_prompt_bytes: limits.max_prompt_bytes,
            pairs_per_minute: limits.pairs_per_minute,
            comparisons_per_minute: limits.comparisons_per_minute,
            all_pairs_per_minute: limits.all_pairs_per_minute,
            all_comparisons_per_minute: limits.all_comparisons_per_minute,
            max_raters: limits.max_raters,
            sessions_per_minute: limits.sessions_per_minute,
            rater_key: None,
            rater_key_file: None,
            shutdown_grace_ms: 10_000,
        }
    }
}

/// Flags of `encore-prefs`.
#[derive(Debug, Clone, Default, clap::Parser, Serialize)]
#[command(
    name = "encore-prefs",
    version,
    about = "Serves the A/B listening page and stores listeners' comparisons."
)]
pub struct Flags {
    /// Configuration file (TOML or JSON), section `[prefs]`.
    #[arg(long, env = "ENCORE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Log format on stderr: text or json.
    #[arg(long, default_value = "text")]
    #[serde(skip)]
    pub log_format: encore_telemetry::LogFormat,
    /// gRPC address [default: 127.0.0.1:50071].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// HTTP address of the page.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// Admin address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// Store URI.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// A policy, `NAME=CHECKPOINT_DIR` (repeatable).
    #[arg(long = "policy", value_name = "NAME=DIR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

/// Why the process could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A bad setting, named.
    #[error("{0}")]
    Config(String),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] encore_store::StoreError),
    /// A policy could not be loaded.
    #[error("{0}")]
    Model(String),
    /// A listener could not be bound or a server failed.
    #[error("{0}")]
    Serve(String),
}

impl Config {
    /// Defaults < `file` < environment < `flags`, validated.
    pub fn load(file: Option<&Path>, flags: &Flags) -> Result<Self, ServerError> {
        let config: Config = encore_config::load(SECTION, file, flags)
            .map_err(|e| ServerError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad =
            |key: &str, why: String| Err(ServerError::Config(format!("{SECTION}.{key}: {why}")));
        if self.policies.is_empty() {
            return bad("policies", "at least one NAME=CHECKPOINT_DIR".into());
        }
        for (i, spec) in self.policies.iter().enumerate() {
            match spec.split_once('=') {
                Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {}
                _ => {
                    return bad(
                        &format!("policies[{i}]"),
                        format!("{spec:?} is not NAME=DIR"),
                    );
                }
            }
        }
        if !(self.clip_seconds > 0.0 && self.clip_seconds <= 60.0) {
            return bad(
                "clip_seconds",
                format!("{} is outside (0, 60]", self.clip_seconds),
            );
        }
        if self.clip_ttl_s == 0 {
            return bad("clip_ttl_s", "must be at least 1".into());
        }
        if self.max_prompt_bytes == 0 {
            return bad("max_prompt_bytes", "must be at least 1".into());
        }
        for (key, rate) in [
            ("pairs_per_minute", self.pairs_per_minute),
            ("comparisons_per_minute", self.comparisons_per_minute),
            ("all_pairs_per_minute", self.all_pairs_per_minute),
            (
                "all_comparisons_per_minute",
                self.all_comparisons_per_minute,
            ),
            ("sessions_per_minute", self.sessions_per_minute),
        ] {
            if rate == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.max_raters == 0 {
            return bad("max_raters", "must be at least 1".into());
        }
        if let Err(e) = encore_model::device(&self.device) {
            return bad("device", e.to_string());
        }
        if let Some(key) = self.rater_key()?
            && key.len() < 16
        {
            return bad(
                "rater_key",
                format!("{} bytes; it needs at least 16", key.len()),
            );
        }
        Ok(())
    }

    /// The rater key (inline or from its file), if one is configured.
    pub fn rater_key(&self) -> Result<Option<String>, ServerError> {
        encore_config::secret(
            &format!("{SECTION}.rater_key"),
            self.rater_key.as_deref(),
            self.rater_key_file.as_deref(),
        )
        .map_err(|e| ServerError::Config(e.to_string()))
    }

    fn limits(&self) -> Limits {
        Limits {
            max_prompt_bytes: self.max_prompt_bytes,
            clip_frames: (self.clip_seconds * 25.0).round() as usize,
            clip_ttl: Duration::from_secs(self.clip_ttl_s),
            pairs_per_minute: self.pairs_per_minute,
            comparisons_per_minute: self.comparisons_per_minute,
            all_pairs_per_minute: self.all_pairs_per_minute,
            all_comparisons_per_minute: self.all_comparisons_per_minute,
            max_raters: self.max_raters,
            sessions_per_minute: self.sessions_per_minute,
            ..Limits::default()
        }
    }
}

/// Addresses a running service is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// gRPC.
    pub grpc: SocketAddr,
    /// The page.
    pub http: SocketAddr,
    /// Admin.
    pub admin: SocketAddr,
}

/// Runs the binary: configuration, then [`serve`] until SIGTERM or SIGINT.
pub async fn run(flags: Flags) -> Result<(), ServerError> {
    let config = Config::load(flags.config.as_deref(), &flags)?;
    let shutdown =
        encore_telemetry::shutdown_token().map_err(|e| ServerError::Config(e.to_string()))?;
    let (bound, done) = serve(config, encore_telemetry::registry().clone(), shutdown).await?;
    tracing::info!(grpc = %bound.grpc, http = %bound.http, admin = %bound.admin, "encore-prefs serving");
    done.await
        .map_err(|e| ServerError::Serve(format!("server task: {e}")))?
}

/// Loads the policies, opens the store and serves until `shutdown`; the
/// handle ends when every server has drained.
pub async fn serve(
    config: Config,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(Bound, tokio::task::JoinHandle<Result<(), ServerError>>), ServerError> {
    config.validate()?;
    let device =
        encore_model::device(&config.device).map_err(|e| ServerError::Config(e.to_string()))?;
    let mut policies = Vec::new();
    for spec in &config.policies {
        let (name, dir) = spec.split_once('=').unwrap_or((spec, spec));
        let (policy, _) = encore_model::load_frozen(Path::new(dir), &device)
            .map_err(|e| ServerError::Model(format!("{SECTION}.policies: {name}={dir}: {e}")))?;
        policies.push(HostedPolicy {
            name: name.to_owned(),
            policy: Arc::new(policy),
            version: 0,
        });
    }
    let store = encore_store::open(&config.store, Arc::new(SystemClock)).await?;
    let mut service = Preferences::new(store, policies, config.limits())
        .with_metrics(&registry)
        .map_err(|e| ServerError::Config(format!("metrics: {e}")))?;
    match config.rater_key()? {
        Some(key) => {
            service = service
                .with_rater_key(key.into_bytes())
                .map_err(|e| ServerError::Config(format!("{SECTION}.rater_key: {e}")))?;
        }
        None => {
            tracing::info!("prefs.rater_key is not set: rater sessions end when this process does")
        }
    }
    let service = Arc::new(service);

    let readiness = Readiness::new();
    let (admin, admin_task) = serve_admin(
        config.admin,
        AdminState::new(registry, readiness.clone()),
        shutdown.clone(),
    )
    .await
    .map_err(|e| ServerError::Serve(e.to_string()))?;

    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServerError::Serve(format!("binding {addr}: {e}")))
    };
    let grpc_listener = bind(config.listen).await?;
    let http_listener = bind(config.http).await?;
    let bound = Bound {
        grpc: grpc_listener
            .local_addr()
            .map_err(|e| ServerError::Serve(e.to_string()))?,
        http: http_listener
            .local_addr()
            .map_err(|e| ServerError::Serve(e.to_string()))?,
        admin,
    };

    let (reporter, health) = encore_telemetry::grpc_health();
    reporter
        .set_serving::<PreferenceServiceServer<PreferenceServer>>()
        .await;
    let drained = tokio::spawn(encore_telemetry::drain_signal(
        shutdown.clone(),
        readiness.clone(),
        reporter,
        vec!["encore.v1.PreferenceService"],
    ));
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let grpc = {
        let (service, shutdown) = (service.clone(), shutdown.clone());
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(PreferenceServiceServer::new(PreferenceServer(service)))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                async move { shutdown.cancelled().await },
            )
    };
    let http = {
        let shutdown = shutdown.clone();
        axum::serve(http_listener, crate::http::router(service))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
    };
    readiness.set_ready();
    let done = tokio::spawn(async move {
        let (grpc, http) = tokio::join!(
            async { tokio::time::timeout(grace * 2, grpc).await },
            async { tokio::time::timeout(grace * 2, http.into_future()).await },
        );
        let _ = drained.await;
        let _ = admin_task.await;
        match (grpc, http) {
            (Ok(Ok(())), Ok(Ok(()))) => Ok(()),
            (Ok(Err(e)), _) => Err(ServerError::Serve(format!("gRPC server: {e}"))),
            (_, Ok(Err(e))) => Err(ServerError::Serve(format!("HTTP server: {e}"))),
            _ => Err(ServerError::Serve(
                "the drain outlasted its grace period".into(),
            )),
        }
    });
    Ok((bound, done))
}

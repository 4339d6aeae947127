//! Start-up and shutdown: builds the batchers and the gRPC and admin
//! servers around a set of loaded models, and takes them down in order when
//! the shutdown token is cancelled.
//!
//! Start-up: validate the config, load the audio codec if one is
//! configured, register metrics, start one scoring worker per model, bind
//! the gRPC port (RewardService, gRPC health, reflection) and the admin port
//! (`/metrics`, `/healthz`, `/readyz`), then report SERVING and ready.
//! RewardService answers only callers presenting the worker token when one
//! is configured ([`RequireToken`]); health, reflection
//! and the admin port stay open for probes.
//!
//! Shutdown, once the token is cancelled: report NOT_SERVING and not ready,
//! stop accepting connections, let in-flight rpcs finish (for at most
//! `shutdown_grace_ms`), then close the queues, let the workers drain and
//! join them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use encore_client::member::{self, CoordinatorClient};
use encore_client::token::RequireToken;
use encore_proto::v1::reward_service_server::RewardServiceServer;
use encore_proto::v1::{Capabilities, ModelRef, Role};
use encore_proto::v1::{InputConstraints, OutputRange, RewardKind as ProtoKind, RewardModelInfo};
use encore_reward::{CODEC_ID, RewardKind, RewardModel};
use encore_telemetry::grpc::ServingStatus;
use encore_telemetry::{
    AdminState, Readiness, drain_signal, grpc_health, grpc_reflection, grpc_reflection_v1alpha,
    serve_admin,
};
use prometheus::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::batcher::{BatchConfig, Batcher, Gate, Worker};
use crate::codec::AudioCodec;
use crate::config::{Config, ModelSpec, check_model_name};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::service::{Hosted, RewardServer, stamp_arrival};
use crate::validate::{Limits, ModelLimits};

/// The gRPC service name clients and health checks use.
pub const SERVICE_NAME: &str = "encore.v1.RewardService";

/// Decoding limit for request messages, never below tonic's 4 MiB default:
/// the largest request the limits allow, with room for protobuf framing.
/// An item holds at most `max_tokens` tokens, or as many EnCodec codes as
/// fill that duration when the server has a codec.
fn max_message_bytes(config: &Config, max_tokens: usize, codec: Option<&AudioCodec>) -> usize {
    let max_codes = codec.map_or(0, |c| c.codebooks() * c.max_frames(max_tokens));
    // A token is a varint of at most 5 bytes; each item and caption has a
    // few bytes of tags and lengths.
    let item = config.max_caption_bytes + 5 * max_tokens.max(max_codes) + 32;
    (config.max_request_items.saturating_mul(item) + 64 * 1024).max(4 << 20)
}

/// Starts a reward server: hosts the models given to [`ServerBuilder::model`]
/// with the limits and addresses of a [`Config`] (whose `models` list it
/// ignores; [`serve`] loads that one).
pub struct ServerBuilder {
    config: Config,
    models: Vec<(String, RewardModel)>,
    codec: Option<AudioCodec>,
    registry: Option<Registry>,
    gate: Gate,
}

impl ServerBuilder {
    /// A server with `config`'s limits and addresses and no model yet.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            models: Vec::new(),
            codec: None,
            registry: None,
            gate: Gate::new(),
        }
    }

    /// Decodes items sent as EnCodec codes with `codec` (what [`serve`]
    /// loads from `audio_codec`); without one, such items are refused.
    pub fn audio_codec(mut self, codec: AudioCodec) -> Self {
        self.codec = Some(codec);
        self
    }

    /// Hosts `model` under `name`.
    pub fn model(mut self, name: impl Into<String>, model: RewardModel) -> Self {
        self.models.push((name.into(), model));
        self
    }

    /// Registers the metrics on `registry` (by default a fresh one, so that
    /// several servers can live in one process), which `/metrics` serves.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Holds the scoring workers at `gate` before each batch (for tests
    /// and experiments; by default the gate is always open).
    pub fn gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    /// Binds both ports, starts the workers and serves until `shutdown` is
    /// cancelled. Returns once the server is ready for traffic.
    pub async fn start(self, shutdown: CancellationToken) -> Result<RunningServer> {
        let ServerBuilder {
            config,
            models,
            codec,
            registry,
            gate,
        } = self;
        let codec = codec.map(Arc::new);
        config.validate()?;
        let authenticator = match config.caller_token()? {
            Some(token) => Some(
                RequireToken::new(&token)
                    .map_err(|why| Error::Config(format!("reward_server.caller_token: {why}")))?,
            ),
            None => {
                tracing::warn!(
                    "reward_server.worker_token is not set: RewardService serves any caller"
                );
                None
            }
        };
        if models.is_empty() {
            return Err(Error::Config(
                "reward_server.models: no model to host; pass --model NAME=DIR".into(),
            ));
        }
        for (i, (name, _)) in models.iter().enumerate() {
            check_model_name(name)
                .map_err(|why| Error::Config(format!("reward_server.models[{i}].name: {why}")))?;
            if models[..i].iter().any(|(other, _)| other == name) {
                return Err(Error::Config(format!(
                    "reward_server.models[{i}].name: {name:?} is hosted twice"
                )));
            }
        }
        let registry = registry.unwrap_or_default();
        let metrics = Metrics::new(&registry)?;
        let (health_reporter, health) = grpc_health();
        let reflection = grpc_reflection(encore_proto::FILE_DESCRIPTOR_SET, &[SERVICE_NAME])?;
        let reflection_v1alpha =
            grpc_reflection_v1alpha(encore_proto::FILE_DESCRIPTOR_SET, &[SERVICE_NAME])?;

        // Ports first: they fail for reasons outside our control, and
        // nothing else is running yet. The admin server stops with this
        // child token if start-up fails later on.
        let started = shutdown.child_token();
        let incoming = TcpIncoming::bind(config.listen)
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?
            .with_nodelay(Some(true));
        let grpc_addr = incoming.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let readiness = Readiness::new();
        let (admin_addr, admin_task) = serve_admin(
            config.admin,
            AdminState::new(registry.clone(), readiness.clone()),
            started.clone(),
        )
        .await?;

        let hosted: Vec<ModelRef> = models
            .iter()
            .map(|(name, model)| ModelRef {
                name: name.clone(),
                uri: String::new(),
                sha256: model.sha256().to_owned(),
            })
            .collect();
        let spawned = spawn_models(models, codec.clone(), &config, &gate, &metrics);
        let (service, workers, max_tokens) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                started.cancel();
                let _ = admin_task.await;
                return Err(e);
            }
        };
        let reward = InterceptedService::new(
            RewardServiceServer::new(service).max_decoding_message_size(max_message_bytes(
                &config,
                max_tokens,
                codec.as_deref(),
            )),
            move |request| match &authenticator {
                Some(authenticator) => {
                    authenticator.check(&request)?;
                    stamp_arrival(request)
                }
                None => stamp_arrival(request),
            },
        );
        health_reporter
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;

        let signal = drain_signal(
            started.clone(),
            readiness.clone(),
            health_reporter.clone(),
            vec![SERVICE_NAME],
        );
        let serve = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(reward)
            .serve_with_incoming_shutdown(incoming, signal);

        let membership = if config.coordinator.is_empty() {
            None
        } else {
            let advertise = if config.advertise.is_empty() {
                grpc_addr.to_string()
            } else {
                config.advertise.clone()
            };
            Some(tokio::spawn(join_cluster(
                config.clone(),
                hosted,
                advertise,
                started.clone(),
            )))
        };
        let drained = run_until_drained(
            serve,
            started,
            config.shutdown_grace(),
            workers,
            gate,
            admin_task,
        );
        let task = tokio::spawn(async move {
            let result = drained.await;
            if let Some(membership) = membership {
                let _ = membership.await;
            }
            result
        });
        readiness.set_ready();
        tracing::info!(%grpc_addr, %admin_addr, "reward server ready");
        Ok(RunningServer {
            grpc_addr,
            admin_addr,
            registry,
            readiness,
            task,
        })
    }
}

/// A reward server's membership: no assignments, only the lease, held
/// until it is lost.
struct HostModels;

impl member::MemberWork for HostModels {
    fn with_membership(&self, membership: &member::Membership) -> impl Future<Output = ()> + Send {
        membership.lost.cancelled()
    }
}

/// Longest pause between tries to join the coordinator.
const MAX_JOIN_BACKOFF: Duration = Duration::from_secs(5);

/// Keeps this server a member of the coordinator's cluster, hosting
/// `models` at `address`, until `shutdown`: joins, rejoins after a lost
/// lease or while the coordinator is unreachable (with back-off), and
/// deregisters on the way out. Reward servers get no assignments; they
/// register so that jobs are routed to the models they host.
async fn join_cluster(
    config: Config,
    models: Vec<ModelRef>,
    address: String,
    shutdown: CancellationToken,
) {
    let coordinator = match config
        .worker_token()
        .map_err(|e| e.to_string())
        .and_then(|token| CoordinatorClient::new(&config.coordinator, &token, config.tls.as_ref()))
    {
        Ok(coordinator) => coordinator,
        Err(e) => return tracing::error!(error = %e, "cannot join the coordinator"),
    };
    let capabilities = Capabilities {
        models,
        address,
        ..member::capabilities(config.device.starts_with("cuda"))
    };
    member::stay_joined(
        &coordinator,
        Role::RewardServer,
        capabilities,
        &member::instance_id("reward-server"),
        MAX_JOIN_BACKOFF,
        &shutdown,
        &HostModels,
    )
    .await;
}

/// Starts a scoring worker per model and builds the service around their
/// batchers. Returns the service, the workers, and the longest sequence any
/// model accepts. On failure the workers already started are stopped.
fn spawn_models(
    models: Vec<(String, RewardModel)>,
    codec: Option<Arc<AudioCodec>>,
    config: &Config,
    gate: &Gate,
    metrics: &Metrics,
) -> Result<(RewardServer, Vec<Worker>, usize)> {
    let batching = BatchConfig {
        max_batch_items: config.max_batch_items,
        max_wait: config.max_wait(),
        queue_capacity: config.queue_capacity,
    };
    let mut hosted = Vec::with_capacity(models.len());
    let mut workers: Vec<Worker> = Vec::with_capacity(models.len());
    let mut max_tokens = 0;
    for (name, model) in models {
        let info = model_info(&name, &model, config);
        let limits = ModelLimits {
            name: name.clone(),
            min_tokens: model.config().min_tokens,
            max_tokens: model.config().max_tokens,
        };
        max_tokens = max_tokens.max(limits.max_tokens);
        tracing::info!(
            model = %name,
            kind = %model.kind(),
            version = %model.config().version,
            sha256 = %model.sha256(),
            "hosting model"
        );
        match Batcher::spawn(&name, model, batching, gate.clone(), metrics.model(&name)) {
            Ok((batcher, worker)) => {
                workers.push(worker);
                hosted.push(Hosted {
                    info,
                    limits,
                    batcher,
                });
            }
            Err(e) => {
                gate.open();
                for worker in workers {
                    // Already failing; the first error is the one to report.
                    let _ = worker.join();
                }
                return Err(e);
            }
        }
    }
    let limits = Limits {
        max_request_items: config.max_request_items,
        max_caption_bytes: config.max_caption_bytes,
    };
    Ok((
        RewardServer::new(hosted, limits, codec, metrics.clone()),
        workers,
        max_tokens,
    ))
}

/// Serves until the shutdown token is cancelled and in-flight rpcs are done
/// (or the grace period is over), then stops the workers and the admin
/// server.
async fn run_until_drained(
    serve: impl Future<Output = Result<(), tonic::transport::Error>>,
    shutdown: CancellationToken,
    grace: Duration,
    workers: Vec<Worker>,
    gate: Gate,
    admin_task: JoinHandle<()>,
) -> Result<()> {
    let served = tokio::select! {
        served = serve => served.map_err(Error::from),
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "in-flight requests did not finish within the grace period; stopping anyway"
            );
            Ok(())
        }
    };
    // Also when serving failed: the workers are stopped either way.
    shutdown.cancel();
    let stopped = stop_workers(workers, &gate).await;
    // The admin task only ends with an error if it panicked; nothing is
    // left to clean up after it then.
    let _ = admin_task.await;
    tracing::info!("reward server stopped");
    served.and(stopped)
}

/// Closes every queue, opens the gate so held workers can drain, and waits
/// for the worker threads off the async runtime.
async fn stop_workers(workers: Vec<Worker>, gate: &Gate) -> Result<()> {
    for worker in &workers {
        worker.close();
    }
    gate.open();
    tokio::task::spawn_blocking(move || {
        // Every worker is joined; the first failure is the one reported.
        let mut result = Ok(());
        for worker in workers {
            let joined = worker.join();
            if result.is_ok() {
                result = joined;
            }
        }
        result
    })
    .await
    .map_err(|e| Error::Worker(format!("joining the workers: {e}")))?
}

/// A started reward server.
pub struct RunningServer {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    registry: Registry,
    readiness: Readiness,
    task: JoinHandle<Result<()>>,
}

impl RunningServer {
    /// The address the gRPC server is bound to.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address of the admin HTTP server.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The registry holding the server's metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The readiness flag `/readyz` reports.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// Waits until the server has shut down (after its token was
    /// cancelled) and every worker has stopped.
    pub async fn wait(self) -> Result<()> {
        self.task
            .await
            .map_err(|e| Error::Worker(format!("the server task failed: {e}")))?
    }
}

/// Loads the models of `config.models` from their checkpoint directories
/// onto `config.device`, off the async runtime.
pub async fn load_models(config: &Config) -> Result<Vec<(String, RewardModel)>> {
    let device = encore_model::device(&config.device)
        .map_err(|e| Error::Config(format!("reward_server.device: {e}")))?;
    let specs = config.models.clone();
    tokio::task::spawn_blocking(move || load_blocking(&specs, &device))
        .await
        .map_err(|e| Error::Worker(format!("loading models: {e}")))?
}

fn load_blocking(specs: &[ModelSpec], device: &Device) -> Result<Vec<(String, RewardModel)>> {
    specs
        .iter()
        .map(|spec| {
            RewardModel::load(&spec.path, device)
                .map(|model| (spec.name.clone(), model))
                .map_err(|source| Error::Load {
                    name: spec.name.clone(),
                    path: spec.path.clone(),
                    source: Box::new(source),
                })
        })
        .collect()
}

/// Loads the audio codec of `config.audio_codec`, if any, onto
/// `config.device`, off the async runtime; errors name the key.
pub async fn load_audio_codec(config: &Config) -> Result<Option<AudioCodec>> {
    let Some(path) = config.audio_codec.clone() else {
        return Ok(None);
    };
    let device = encore_model::device(&config.device)
        .map_err(|e| Error::Config(format!("reward_server.device: {e}")))?;
    let codec = tokio::task::spawn_blocking(move || AudioCodec::load(&path, &device))
        .await
        .map_err(|e| Error::Worker(format!("loading the audio codec: {e}")))??;
    tracing::info!(
        sample_rate = codec.sample_rate(),
        codebooks = codec.codebooks(),
        codebook_size = codec.codebook_size(),
        "audio codec loaded"
    );
    Ok(Some(codec))
}

/// Loads the models (and the audio codec) named in `config` and serves
/// them until `shutdown` is cancelled, with metrics on the process-wide
/// registry ([`encore_telemetry::registry`]).
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<RunningServer> {
    config.validate()?;
    let codec = load_audio_codec(&config).await?;
    let models = load_models(&config).await?;
    let mut builder = ServerBuilder::new(config).registry(encore_telemetry::registry().clone());
    if let Some(codec) = codec {
        builder = builder.audio_codec(codec);
    }
    for (name, model) in models {
        builder = builder.model(name, model);
    }
    builder.start(shutdown).await
}

/// What DescribeModels says about a model.
fn model_info(name: &str, model: &RewardModel, config: &Config) -> RewardModelInfo {
    let kind = model.kind();
    let cfg = model.config();
    let (min, max) = kind.range();
    let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    RewardModelInfo {
        name: name.to_owned(),
        kind: proto_kind(kind) as i32,
        version: cfg.version.clone(),
        sha256: model.sha256().to_owned(),
        description: cfg.description.clone(),
        input: Some(InputConstraints {
            min_tokens: to_u32(cfg.min_tokens),
            max_tokens: to_u32(cfg.max_tokens),
            vocab_size: to_u32(encore_codec::VOCAB_SIZE),
            codec: CODEC_ID.to_owned(),
            frame_rate_hz: f64::from(encore_codec::FRAME_RATE),
            sample_rate_hz: encore_codec::SAMPLE_RATE,
            uses_caption: kind.uses_caption(),
            max_caption_bytes: to_u32(config.max_caption_bytes),
            max_batch_items: to_u32(config.max_request_items),
        }),
        output: Some(OutputRange {
            min,
            max,
            description: kind.meaning().to_owned(),
        }),
    }
}

/// The wire form of a reward kind.
pub fn proto_kind(kind: RewardKind) -> ProtoKind {
    match kind {
        RewardKind::Adherence => ProtoKind::PromptAdherence,
        RewardKind::Quality => ProtoKind::Quality,
        RewardKind::Preference => ProtoKind::UserPreference,
    }
}

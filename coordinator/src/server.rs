//! Start-up and shutdown of the coordinator: opens the store, binds the
//! gRPC port (TLS when configured) and the admin port, mounts JobService,
//! ClusterService and WeightService behind the bearer-token check together
//! with gRPC health and reflection, and runs the reconciler and the weight
//! garbage collector beside them. On shutdown it stops taking rpcs, lets
//! in-flight ones finish within the grace period, and ends the background
//! tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use encore_proto::v1::cluster_service_server::ClusterServiceServer;
use encore_proto::v1::job_service_server::JobServiceServer;
use encore_proto::v1::rollout_queue_service_server::RolloutQueueServiceServer;
use encore_proto::v1::weight_service_server::WeightServiceServer;
use encore_store::{Store, SystemClock};
use encore_telemetry::{
    AdminState, Readiness, drain_signal, grpc_health, grpc_reflection, grpc_reflection_v1alpha,
    serve_admin,
};
use prometheus::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::auth::Authenticator;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::queue::QueueService;
use crate::reconcile::{Changes, Reconciler, Trigger};
use crate::weights::{WeightOptions, Weights};
use encore_spec::Limits;

/// Services whose health is reported under their own name.
const SERVICES: [&str; 4] = [
    "encore.v1.JobService",
    "encore.v1.ClusterService",
    "encore.v1.WeightService",
    "encore.v1.RolloutQueueService",
];

/// How often the weight garbage collector sweeps every live job.
const GC_PERIOD: Duration = Duration::from_secs(60);

/// A coordinator about to start: its configuration, and optionally a store
/// and a metrics registry handed in (tests share a store between two
/// coordinator lives; the binary opens the configured one).
pub struct Coordinator {
    config: Config,
    store: Option<Arc<dyn Store>>,
    registry: Option<Registry>,
}

impl Coordinator {
    /// A coordinator for `config`.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            store: None,
            registry: None,
        }
    }

    /// Uses `store` instead of opening `config.store`.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Registers metrics on `registry` (default: a fresh one).
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Starts serving until `shutdown` is cancelled; returns once ready.
    pub async fn start(self, shutdown: CancellationToken) -> Result<RunningCoordinator> {
        let Coordinator {
            config,
            store,
            registry,
        } = self;
        config.validate()?;
        let auth = config.authenticator()?;
        let store = match store {
            Some(store) => store,
            None => encore_store::open(&config.store, Arc::new(SystemClock)).await?,
        };
        let registry = registry.unwrap_or_default();
        let metrics = Metrics::new(&registry)?;
        let (health_reporter, health) = grpc_health();
        let reflection = grpc_reflection(encore_proto::FILE_DESCRIPTOR_SET, &SERVICES)?;
        let reflection_v1alpha =
            grpc_reflection_v1alpha(encore_proto::FILE_DESCRIPTOR_SET, &SERVICES)?;

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

        let trigger = Trigger::new();
        let changes = Changes::default();
        let jobs = Jobs::new(
            store.clone(),
            metrics.clone(),
            Limits::default(),
            config.max_active_jobs_per_client,
            trigger.clone(),
            started.clone(),
        );
        let cluster = Cluster::new(
            store.clone(),
            metrics.clone(),
            config.lease_ttl(),
            trigger.clone(),
            changes.clone(),
            started.clone(),
        );
        let weights = Weights::new(
            store.clone(),
            WeightOptions {
                keep_versions: config.keep_versions,
                fetch_pin_ttl: config.fetch_pin_ttl(),
                ..WeightOptions::new(config.blob_dir.clone())
            },
            metrics.clone(),
            started.clone(),
        )?;
        let reconciler = Reconciler::new(
            store.clone(),
            metrics.clone(),
            changes,
            config.rollout_queue_uri().to_owned(),
            config.checkpoint_dir.clone(),
        );

        let max = config.max_message_bytes;
        let check = move |auth: Authenticator| move |r| auth.check(r);
        let job_service = JobServiceServer::new(jobs)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let cluster_service = ClusterServiceServer::new(cluster)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let weight_service = WeightServiceServer::new(weights.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let queue_service =
            RolloutQueueServiceServer::new(QueueService::new(store.clone(), metrics.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max);

        // Wide HTTP/2 windows and large frames: with the defaults (1 MiB
        // stream window) a 100 MB Publish runs at a quarter of the speed,
        // waiting on window updates (measured by weight-bench).
        let mut builder = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(encore_client::endpoint::HTTP2_STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(
                encore_client::endpoint::HTTP2_CONNECTION_WINDOW_BYTES,
            ))
            .max_frame_size(Some(encore_client::endpoint::HTTP2_MAX_FRAME_BYTES));
        if let Some(tls) = &config.tls {
            let read = |key: &str, path: &std::path::Path| {
                std::fs::read(path).map_err(|e| {
                    Error::Config(format!("coordinator.tls.{key}: {}: {e}", path.display()))
                })
            };
            let identity = Identity::from_pem(read("cert", &tls.cert)?, read("key", &tls.key)?);
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(identity))
                .map_err(|e| Error::Config(format!("coordinator.tls: {e}")))?;
        }
        for name in SERVICES {
            health_reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let signal = drain_signal(
            started.clone(),
            readiness.clone(),
            health_reporter.clone(),
            SERVICES.to_vec(),
        );
        let serve = builder
            .trace_fn(|request| tracing::info_span!("rpc", path = %request.uri().path()))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                job_service,
                check(auth.clone()),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                cluster_service,
                check(auth.clone()),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                weight_service,
                check(auth.clone()),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                queue_service,
                check(auth),
            ))
            .serve_with_incoming_shutdown(incoming, signal);

        let reconcile_task = tokio::spawn(reconciler.run(
            trigger,
            (config.lease_ttl() / 4).max(Duration::from_millis(25)),
            started.clone(),
        ));
        let gc_task = tokio::spawn(collect_garbage(store.clone(), weights, started.clone()));
        let grace = config.shutdown_grace();
        let task = tokio::spawn({
            let started = started.clone();
            async move {
                let served = tokio::select! {
                    served = serve => served.map_err(Error::from),
                    () = async {
                        started.cancelled().await;
                        tokio::time::sleep(grace).await;
                    } => {
                        tracing::warn!("in-flight rpcs did not finish within the grace period");
                        Ok(())
                    }
                };
                started.cancel();
                let _ = reconcile_task.await;
                let _ = gc_task.await;
                let _ = admin_task.await;
                tracing::info!("coordinator stopped");
                served
            }
        });
        readiness.set_ready();
        tracing::info!(%grpc_addr, %admin_addr, store = %encore_store::redacted(&config.store), "coordinator ready");
        Ok(RunningCoordinator {
            grpc_addr,
            admin_addr,
            registry,
            store,
            task,
        })
    }
}

/// Sweeps every live job's weight versions now and then; each publish also
/// collects its own job's garbage at once.
async fn collect_garbage(store: Arc<dyn Store>, weights: Weights, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(GC_PERIOD) => {}
        }
        let jobs = match store
            .list_jobs(None, &[], encore_store::MAX_PAGE_SIZE, None)
            .await
        {
            Ok(page) => page.jobs,
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection could not list jobs");
                continue;
            }
        };
        for job in jobs {
            if let Err(e) = weights.collect_garbage(&job.job.job_id).await {
                tracing::warn!(job_id = %job.job.job_id, error = %e, "garbage collection failed");
            }
        }
    }
}

/// A started coordinator.
pub struct RunningCoordinator {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    registry: Registry,
    store: Arc<dyn Store>,
    task: JoinHandle<Result<()>>,
}

impl RunningCoordinator {
    /// The address the gRPC server is bound to.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address of the admin HTTP server.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The registry holding the coordinator's metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The store the coordinator runs on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Waits until the coordinator has shut down (after its token was
    /// cancelled).
    pub async fn wait(self) -> Result<()> {
        self.task
            .await
            .map_err(|e| Error::Config(format!("the coordinator task failed: {e}")))?
    }
}

/// Runs the coordinator the way the `encore-coordinator` binary does: reads
/// the configuration from `flags` (and the file and environment they point
/// at), serves until SIGTERM or SIGINT, and drains.
pub async fn run(flags: crate::Flags) -> Result<()> {
    let config = Config::load(flags.config.as_deref(), &flags)?;
    let shutdown = encore_telemetry::shutdown_token()?;
    let running = Coordinator::new(config)
        .registry(encore_telemetry::registry().clone())
        .start(shutdown)
        .await?;
    running.wait().await
}

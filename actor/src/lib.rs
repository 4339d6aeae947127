//! Encore actor: samples music from the job's current policy snapshot.
//!
//! Data flow (see [`worker`]): fetch weights of version v from the
//! coordinator's WeightService -> sample K clips per prompt with the
//! KV-cached sampler (`encore-model`) -> score them on the reward servers
//! (RewardService, [`scoring`]) -> push scored rollouts, tagged with v and
//! their behaviour log-probs, to the rollout queue.
//!
//! Around it: [`config`], [`prompts`] (the job's prompt set and this
//! actor's shard), [`metrics`], and [`run`] (admin server, readiness,
//! SIGTERM).

#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod metrics;
pub mod prompts;
pub mod scoring;
pub mod worker;

pub use config::{Config, Flags};
pub use error::{Error, Result};
pub use worker::Actor;

use encore_telemetry::{AdminState, Readiness, serve_admin};
use tokio_util::sync::CancellationToken;

/// Runs the actor the way the `encore-actor` binary does: reads the
/// configuration, serves `/metrics`, `/healthz` and `/readyz`, and works
/// until SIGTERM or SIGINT, then deregisters.
pub async fn run(flags: Flags) -> Result<()> {
    let config = Config::load(flags.config.as_deref(), &flags)?;
    let shutdown = encore_telemetry::shutdown_token()?;
    run_with(config, encore_telemetry::registry().clone(), shutdown).await
}

/// Runs an actor for `config` with metrics on `registry` until `shutdown`.
pub async fn run_with(
    config: Config,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<()> {
    config.validate()?;
    let metrics = metrics::Metrics::new(&registry)?;
    let readiness = Readiness::new();
    let (admin_addr, admin) = serve_admin(
        config.admin,
        AdminState::new(registry, readiness.clone()),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%admin_addr, coordinator = %config.coordinator, "actor starting");
    let actor = Actor::new(config, metrics)?;
    readiness.set_ready();
    let result = actor.run(shutdown.clone()).await;
    readiness.set_not_ready("shutting down");
    shutdown.cancel();
    let _ = admin.await;
    result
}

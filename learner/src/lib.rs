//! Encore learner: turns scored rollouts into policy updates.
//!
//! Data flow: consume scored rollouts from the rollout queue -> combine and
//! normalise rewards, leave-one-out baselines, KL to the frozen reference,
//! clipped importance-weighted policy gradient (`encore-model` log-probs) ->
//! all-reduce gradients across ranks (NCCL or a TCP ring) -> AdamW step ->
//! checkpoint -> publish weights through the coordinator.
//!
//! The process: [`worker`] (membership, the queue, checkpoints,
//! publishing, progress reports) around [`step`] (one data-parallel step),
//! with [`config`] and [`run`] (admin server, readiness, SIGTERM).

pub mod advantage;
pub mod checkpoint;
pub mod collective;
pub mod config;
mod error;
pub mod loss;
pub mod metrics;
pub mod normalize;
pub mod optim;
pub mod step;
pub mod worker;

pub use checkpoint::LearnerCheckpoint;
pub use error::LearnerError;
pub use loss::{
    Algorithm, KlEstimator, LossConfig, LossInputs, LossOutput, LossStats, policy_loss,
};
pub use normalize::{RewardNormalizer, RewardSpec};
pub use optim::AdamW;
pub use step::{StepReport, Trainer};

pub use config::{Config, Flags};
pub use worker::Learner;

use encore_telemetry::{AdminState, Readiness, serve_admin};
use tokio_util::sync::CancellationToken;

/// Runs a learner rank the way the `encore-learner` binary does: reads the
/// configuration, serves `/metrics`, `/healthz` and `/readyz`, and trains
/// until SIGTERM or SIGINT.
pub async fn run(flags: Flags) -> Result<(), LearnerError> {
    let config = Config::load(flags.config.as_deref(), &flags)?;
    let shutdown =
        encore_telemetry::shutdown_token().map_err(|e| LearnerError::Config(e.to_string()))?;
    run_with(config, encore_telemetry::registry().clone(), shutdown).await
}

/// Runs a learner rank for `config` with metrics on `registry` until
/// `shutdown`.
pub async fn run_with(
    config: Config,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(), LearnerError> {
    config.validate()?;
    let readiness = Readiness::new();
    let (admin_addr, admin) = serve_admin(
        config.admin,
        AdminState::new(registry.clone(), readiness.clone()),
        shutdown.clone(),
    )
    .await
    .map_err(|e| LearnerError::Config(e.to_string()))?;
    tracing::info!(%admin_addr, coordinator = %config.coordinator, "learner starting");
    let learner = Learner::new(config, &registry)?;
    readiness.set_ready();
    let result = learner.run(shutdown.clone()).await;
    readiness.set_not_ready("shutting down");
    shutdown.cancel();
    let _ = admin.await;
    result
}

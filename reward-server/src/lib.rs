//! Encore's reward server: hosts any subset of the reward models (prompt
//! adherence, quality, user preference) behind `encore.v1.RewardService`,
//! with dynamic batching across concurrent callers.
//!
//! Data flow of a Score request, with the module that handles each step:
//!
//! ```text
//! actor --gRPC--> service::stamp_arrival (arrival time, grpc-timeout deadline)
//!              -> service (validate::validate the whole request)
//!              -> codec::AudioCodec (items sent as MusicGen's EnCodec codes:
//!                 decoded once, resampled to 16 kHz; tokens pass through)
//!              -> service (fan out per model)
//!              -> batcher::Batcher (bounded queue per model, counted in items)
//!              -> worker thread (one batch of many requests -> RewardModel::score:
//!                 tokens -> codec audio (or the decoded audio) -> log-mel -> network)
//!              -> service (join the models' replies, in request order) --gRPC--> actor
//! ```
//!
//! Around it: [`config`] (the layered [`Config`]), [`error`] (the one
//! [`Error`] and its conversion to `tonic::Status` with rich details),
//! `metrics` (Prometheus, served with `/healthz` and `/readyz` on the admin
//! port), and [`server`] (start-up, gRPC health and reflection, and a
//! shutdown that drains in-flight requests). [`ServerBuilder`] hosts models
//! that are already loaded, and can hold the scoring workers at a [`Gate`]
//! so tests fill queues deterministically.
//!
//! Serving the models of a config until the token is cancelled:
//!
//! ```no_run
//! # async fn run() -> Result<(), encore_reward_server::Error> {
//! use encore_reward_server::{Config, serve};
//! use tokio_util::sync::CancellationToken;
//!
//! let config = Config {
//!     models: vec!["quality=runs/rewards/quality".parse().unwrap()],
//!     ..Config::default()
//! };
//! let shutdown = CancellationToken::new();
//! let server = serve(config, shutdown.clone()).await?;
//! println!("serving on {}", server.grpc_addr());
//! shutdown.cancel();
//! server.wait().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod batcher;
mod codec;
pub mod config;
pub mod error;
mod metrics;
pub mod server;
mod service;
mod validate;

pub use batcher::Gate;
pub use codec::AudioCodec;
pub use config::{Config, Flags, ModelSpec};
pub use error::{Error, Result};
pub use server::{
    RunningServer, SERVICE_NAME, ServerBuilder, load_audio_codec, load_models, serve,
};
pub use service::DEADLINE_MARGIN;

use encore_corpus::{Corpus, Split};
use encore_proto::v1::ScoreItem;
use tokio_util::sync::CancellationToken;

/// `n` clips of `frames` tokens from the synthetic corpus's eval split (of
/// corpus `seed`, from example `start` on), as Score items: realistic input
/// for tests, the load bench and the example client.
pub fn corpus_items(seed: u64, frames: usize, start: u64, n: usize) -> Vec<ScoreItem> {
    let corpus = Corpus::new(seed, frames);
    (start..start + n as u64)
        .map(|i| {
            let ex = corpus.example(Split::Eval, i);
            ScoreItem {
                caption: ex.caption,
                tokens: ex.tokens,
                codebooks: 0,
            }
        })
        .collect()
}

/// Runs the server the way the `encore-reward-server` binary does: reads
/// the configuration from `flags` (and the file and environment they point
/// at), loads the models, serves until SIGTERM or SIGINT, and drains.
pub async fn run(flags: Flags) -> Result<()> {
    let config = Config::load(flags.config.as_deref(), &flags)?;
    let shutdown = encore_telemetry::shutdown_token()?;
    run_with(config, shutdown).await
}

/// Serves `config` until `shutdown` is cancelled, then drains and returns.
pub async fn run_with(config: Config, shutdown: CancellationToken) -> Result<()> {
    let server = serve(config, shutdown).await?;
    server.wait().await
}

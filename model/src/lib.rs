//! The Encore policy model: a decoder-only transformer over the codec's audio
//! tokens, conditioned on a caption embedding, in candle.
//!
//! Actors use [`sample()`] (batched, KV-cached) to produce clips and their
//! behaviour log-probs; the learner uses [`Policy::log_probs`] (teacher
//! forcing) for the policy-gradient loss and the KL to the frozen reference;
//! `encore pretrain` uses [`pretrain`] to fit the base policy on the
//! procedural corpus. Checkpoints are a directory with `config.json` and
//! `model.safetensors` ([`TrainablePolicy::save`] / [`TrainablePolicy::load`]).

pub mod bench;
mod checkpoint;
mod config;
mod device;
mod error;
mod factors;
pub mod follow;
mod policy;
pub mod pretrain;
mod sample;

pub use checkpoint::{
    CONFIG_FILE, CheckpointConfig, TrainablePolicy, WEIGHTS_FILE, load_frozen, load_frozen_file,
    named_tensors, read_config, write_atomically,
};
pub use config::{PolicyConfig, Preset};
pub use device::{SPIN_LIMIT_VAR, device, park_idle_cpu_workers};
pub use error::ModelError;
pub use policy::{KvCache, Policy};
pub use sample::{Samples, SamplingParams, choose, log_softmax_at, sample};

/// Caption embeddings for `captions` as a `[n, text_dim]` tensor.
pub fn embed_captions(
    captions: &[&str],
    device: &candle_core::Device,
) -> Result<candle_core::Tensor, ModelError> {
    let encoder = encore_corpus::text::TextEncoder::new();
    let flat = encoder.embed_batch(captions);
    Ok(candle_core::Tensor::from_vec(
        flat,
        (captions.len(), encore_corpus::text::TEXT_DIM),
        device,
    )?)
}

//! The actor's Prometheus metrics, registered in this one place under
//! `encore_actor_*`:
//!
//! | metric | type | what |
//! | --- | --- | --- |
//! | `encore_actor_clips_total{job}` | counter | clips sampled (rate: clips/s) |
//! | `encore_actor_tokens_total{job}` | counter | audio tokens sampled (rate: tokens/s) |
//! | `encore_actor_batches_total{job}` | counter | scored batches appended to the rollout queue |
//! | `encore_actor_sample_seconds{job}` | histogram | time to sample one batch |
//! | `encore_actor_reward_call_seconds{model,code}` | histogram | Score call latency by model and outcome |
//! | `encore_actor_version_lag_versions{job}` | gauge | latest published version minus the one sampled from |
//! | `encore_actor_queue_full_waits_total{job}` | counter | appends that found the queue full and waited |
//! | `encore_actor_weight_fetch_seconds{job}` | histogram | time to fetch one weight version (resumable, sha256-checked) |
//! | `encore_actor_weight_fetch_bytes_total{job}` | counter | bytes of weights fetched |
//! | `encore_actor_ahead_waits_total{job}` | counter | looks at the queue that found the learners far enough behind that a new batch would go stale, so the actor waited |

use std::time::Duration;

use encore_proto::status::code_name;
use encore_telemetry::metrics::{Label, Subsystem};
use prometheus::{GaugeVec, HistogramVec, IntCounterVec, Registry};

use crate::error::Result;

/// Every metric of the actor.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Clips sampled.
    pub clips: IntCounterVec,
    /// Tokens sampled.
    pub tokens: IntCounterVec,
    /// Batches appended.
    pub batches: IntCounterVec,
    /// Sampling time per batch.
    pub sample_seconds: HistogramVec,
    reward_call_seconds: HistogramVec,
    /// Version lag.
    pub version_lag: GaugeVec,
    /// Waits on a full queue.
    pub queue_full_waits: IntCounterVec,
    /// Waits for the learners to catch up.
    pub ahead_waits: IntCounterVec,
    /// Weight fetch time.
    pub weight_fetch_seconds: HistogramVec,
    /// Weight bytes fetched.
    pub weight_fetch_bytes: IntCounterVec,
}

impl Metrics {
    /// Registers every metric on `registry`.
    pub fn new(registry: &Registry) -> Result<Self> {
        let m = Subsystem::new(registry, "actor")?;
        let job = &[Label::Job];
        Ok(Self {
            clips: m.counter_vec("clips_total", "Clips sampled.", job)?,
            tokens: m.counter_vec("tokens_total", "Audio tokens sampled.", job)?,
            batches: m.counter_vec(
                "batches_total",
                "Scored batches appended to the rollout queue.",
                job,
            )?,
            sample_seconds: m.latency_histogram_vec(
                "sample_seconds",
                "Time to sample one batch of clips.",
                job,
            )?,
            reward_call_seconds: m.latency_histogram_vec(
                "reward_call_seconds",
                "Score call latency by reward model and gRPC code.",
                &[Label::Model, Label::Code],
            )?,
            version_lag: m.gauge_vec(
                "version_lag_versions",
                "Latest published policy version minus the version sampled from.",
                job,
            )?,
            queue_full_waits: m.counter_vec(
                "queue_full_waits_total",
                "Appends that found the rollout queue full and waited.",
                job,
            )?,
            weight_fetch_seconds: m.latency_histogram_vec(
                "weight_fetch_seconds",
                "Time to fetch one weight version (resumable, sha256-checked).",
                job,
            )?,
            weight_fetch_bytes: m.counter_vec(
                "weight_fetch_bytes_total",
                "Bytes of weights fetched.",
                job,
            )?,
            ahead_waits: m.counter_vec(
                "ahead_waits_total",
                "Looks at the rollout queue that found the learners so far behind that a new batch would go stale, so the actor waited.",
                job,
            )?,
        })
    }

    /// Records one Score call.
    pub fn observe_score(&self, model: &str, took: Duration, failed: Option<tonic::Code>) {
        let code = code_name(failed.unwrap_or(tonic::Code::Ok));
        self.reward_call_seconds
            .with_label_values(&[model, code])
            .observe(took.as_secs_f64());
    }
}

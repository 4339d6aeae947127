//! The learner's Prometheus metrics, registered in this one place under
//! `encore_learner_*`.
//!
//! Training figures are job-wide (the step sums them over the ranks), so
//! only rank 0 records them; time by phase is each rank's own.
//!
//! | metric | type | what |
//! | --- | --- | --- |
//! | `encore_learner_steps_total{job,stage}` | counter | optimiser steps taken (rate: steps/s) |
//! | `encore_learner_phase_seconds_total{job,phase}` | counter | this rank's time in `wait` (for rollouts), `step` (forward, backward, all-reduce, AdamW), `publish`, `checkpoint`, `report` |
//! | `encore_learner_reward_mean{job,stage,model}` | gauge | raw mean score of the last step's global batch, by reward model |
//! | `encore_learner_combined_reward_mean{job,stage}` | gauge | mean combined (weighted, normalised) reward of the last step |
//! | `encore_learner_kl_nats{job,stage}` | gauge | mean per-sequence KL(pi ‖ pi_ref) of the last step |
//! | `encore_learner_loss{job,stage}` | gauge | the loss of the last step |
//! | `encore_learner_grad_norm{job,stage}` | gauge | global gradient norm before clipping |
//! | `encore_learner_clip_fraction_ratio{job,stage}` | gauge | share of tokens whose importance ratio was clipped |
//! | `encore_learner_rollouts_consumed_total{job}` | counter | rollouts trained on (rate: rollouts/s) |
//! | `encore_learner_rollouts_dropped_total{job,reason}` | counter | rollouts dropped on purpose, by reason |
//! | `encore_learner_staleness_versions{job}` | histogram | policy versions between a trained rollout's behaviour policy and the learner's (each rank its own share) |
//! | `encore_learner_policy_version{job}` | gauge | latest policy version this learner knows of |
//! | `encore_learner_queue_depth_batches{job}` | gauge | scored batches waiting in the rollout queue |
//! | `encore_learner_weight_publish_seconds{job}` | histogram | time to publish one weight snapshot |
//! | `encore_learner_weight_publish_bytes_total{job}` | counter | bytes of weights published |

use std::time::Duration;

use encore_telemetry::metrics::{Label, Subsystem};
use prometheus::{CounterVec, GaugeVec, HistogramVec, IntCounterVec, Registry};

use crate::error::LearnerError;
use crate::step::StepReport;

/// Where a learner rank spends its time (`phase` label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for rollouts from the queue.
    Wait,
    /// The step: forward, backward, all-reduce and the optimiser.
    Step,
    /// Publishing weights (rank 0).
    Publish,
    /// Checkpointing and acknowledging.
    Checkpoint,
    /// Reporting progress to the coordinator (rank 0).
    Report,
}

impl Phase {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Wait => "wait",
            Phase::Step => "step",
            Phase::Publish => "publish",
            Phase::Checkpoint => "checkpoint",
            Phase::Report => "report",
        }
    }
}

/// Bucket bounds for staleness in policy versions.
const STALENESS_BUCKETS: [f64; 8] = [0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0];

/// Every metric of the learner.
#[derive(Debug, Clone)]
pub struct Metrics {
    steps: IntCounterVec,
    phase_seconds: CounterVec,
    reward_mean: GaugeVec,
    combined_reward_mean: GaugeVec,
    kl: GaugeVec,
    loss: GaugeVec,
    grad_norm: GaugeVec,
    clip_fraction: GaugeVec,
    consumed: IntCounterVec,
    dropped: IntCounterVec,
    staleness: HistogramVec,
    policy_version: GaugeVec,
    queue_depth: GaugeVec,
    publish_seconds: HistogramVec,
    publish_bytes: IntCounterVec,
}

impl Metrics {
    /// Registers every metric on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, LearnerError> {
        Self::register(registry).map_err(|e| LearnerError::Config(format!("metrics: {e}")))
    }

    fn register(registry: &Registry) -> Result<Self, encore_telemetry::Error> {
        let m = Subsystem::new(registry, "learner")?;
        let job = &[Label::Job];
        let staged = &[Label::Job, Label::Stage];
        Ok(Self {
            steps: m.counter_vec("steps_total", "Optimiser steps taken.", staged)?,
            phase_seconds: m.float_counter_vec(
                "phase_seconds_total",
                "Seconds this rank spent in each phase: wait, step, publish, checkpoint, report.",
                &[Label::Job, Label::Phase],
            )?,
            reward_mean: m.gauge_vec(
                "reward_mean",
                "Raw mean score of the last step's global batch, by reward model.",
                &[Label::Job, Label::Stage, Label::Model],
            )?,
            combined_reward_mean: m.gauge_vec(
                "combined_reward_mean",
                "Mean combined (weighted, normalised) reward of the last step's global batch.",
                staged,
            )?,
            kl: m.gauge_vec(
                "kl_nats",
                "Mean per-sequence KL(pi || pi_ref) estimate (k3) of the last step.",
                staged,
            )?,
            loss: m.gauge_vec("loss", "Loss of the last step.", staged)?,
            grad_norm: m.gauge_vec(
                "grad_norm",
                "Global gradient norm of the last step, before clipping.",
                staged,
            )?,
            clip_fraction: m.gauge_vec(
                "clip_fraction_ratio",
                "Share of tokens whose importance ratio was clipped in the last step.",
                staged,
            )?,
            consumed: m.counter_vec("rollouts_consumed_total", "Rollouts trained on.", job)?,
            dropped: m.counter_vec(
                "rollouts_dropped_total",
                "Rollouts dropped on purpose, by reason.",
                &[Label::Job, Label::Reason],
            )?,
            staleness: m.histogram_vec(
                "staleness_versions",
                "Policy versions between a trained rollout's behaviour policy and the learner's.",
                job,
                &STALENESS_BUCKETS,
            )?,
            policy_version: m.gauge_vec(
                "policy_version",
                "Latest policy version this learner knows of.",
                job,
            )?,
            queue_depth: m.gauge_vec(
                "queue_depth_batches",
                "Scored batches waiting in the job's rollout queue.",
                job,
            )?,
            publish_seconds: m.latency_histogram_vec(
                "weight_publish_seconds",
                "Time to publish one weight snapshot.",
                job,
            )?,
            publish_bytes: m.counter_vec(
                "weight_publish_bytes_total",
                "Bytes of weights published.",
                job,
            )?,
        })
    }

    /// Adds `took` to this rank's time in `phase`.
    pub fn phase(&self, job: &str, phase: Phase, took: Duration) {
        self.phase_seconds
            .with_label_values(&[job, phase.as_str()])
            .inc_by(took.as_secs_f64());
    }

    /// Records rank 0's view of one step: the job-wide figures.
    pub fn step(&self, job: &str, stage: &str, report: &StepReport) {
        let staged = [job, stage];
        self.steps.with_label_values(&staged).inc();
        for (model, stats) in &report.rewards {
            self.reward_mean
                .with_label_values(&[job, stage, model])
                .set(stats.mean);
        }
        self.combined_reward_mean
            .with_label_values(&staged)
            .set(report.combined_reward_mean);
        self.kl
            .with_label_values(&staged)
            .set(report.loss.kl_seq_mean);
        self.loss.with_label_values(&staged).set(report.loss.loss);
        self.grad_norm
            .with_label_values(&staged)
            .set(report.grad_norm);
        self.clip_fraction
            .with_label_values(&staged)
            .set(report.loss.clip_fraction);
        self.consumed
            .with_label_values(&[job])
            .inc_by(report.rollouts);
        for (reason, count) in &report.dropped {
            self.dropped
                .with_label_values(&[job, reason])
                .inc_by(*count);
        }
    }

    /// Records the staleness of the rollouts this rank trained on.
    pub fn staleness(&self, job: &str, staleness: &[u64]) {
        let histogram = self.staleness.with_label_values(&[job]);
        for &s in staleness {
            histogram.observe(s as f64);
        }
    }

    /// Records the latest policy version known.
    pub fn policy_version(&self, job: &str, version: u64) {
        self.policy_version
            .with_label_values(&[job])
            .set(version as f64);
    }

    /// Records the rollout queue's depth.
    pub fn queue_depth(&self, job: &str, batches: u64) {
        self.queue_depth
            .with_label_values(&[job])
            .set(batches as f64);
    }

    /// Records one weight publish.
    pub fn published(&self, job: &str, took: Duration, bytes: u64) {
        self.publish_seconds
            .with_label_values(&[job])
            .observe(took.as_secs_f64());
        self.publish_bytes.with_label_values(&[job]).inc_by(bytes);
    }
}

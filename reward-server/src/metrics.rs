//! The reward server's Prometheus metrics, registered in this one place
//! under `encore_reward_*` with the label `model`, and served on the admin
//! port's `/metrics`:
//!
//! | metric | type | what |
//! | --- | --- | --- |
//! | `encore_reward_requests_total{model,code}` | counter | Score requests finished, by model used and gRPC code |
//! | `encore_reward_request_seconds{model}` | histogram | Score latency, arrival to answer |
//! | `encore_reward_items_total{model}` | counter | items scored |
//! | `encore_reward_skipped_items_total{model}` | counter | items dropped unscored (deadline passed, caller gone) |
//! | `encore_reward_batch_size_items{model}` | histogram | items per forward pass |
//! | `encore_reward_batch_seconds{model}` | histogram | time of one forward pass (front end included) |
//! | `encore_reward_queue_depth_items{model}` | gauge | items waiting for a batch |
//! | `encore_reward_queue_wait_seconds{model}` | histogram | time from queueing to the batch start |
//! | `encore_reward_decoded_items_total` | counter | items decoded from EnCodec codes by the audio codec |
//! | `encore_reward_decode_seconds` | histogram | time to decode (and resample) one request's codes |
//!
//! `code` is the gRPC code name (`OK`, `INVALID_ARGUMENT`...), a small fixed
//! set, so the label stays cheap; model names come from the server's own
//! configuration, never from requests. A request whose model list is wrong
//! through and through counts under `model="unknown"`. Requests whose
//! deadline is spent on arrival are answered before their body is read and
//! are not counted.

pub(crate) use encore_proto::status::code_name;
use encore_telemetry::metrics::{LATENCY_BUCKETS_SECONDS, Label, Subsystem};
use prometheus::{Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, Registry};

use crate::error::Result;

/// Model label of requests that name no hosted model at all.
pub(crate) const UNKNOWN_MODEL: &str = "unknown";

/// Every metric of the server.
#[derive(Clone)]
pub(crate) struct Metrics {
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    items: IntCounterVec,
    skipped_items: IntCounterVec,
    batch_size: HistogramVec,
    batch_seconds: HistogramVec,
    queue_depth: prometheus::GaugeVec,
    queue_wait: HistogramVec,
    /// Items the audio codec decoded; not per model: a request's codes are
    /// decoded once, for every model it uses.
    pub decoded_items: IntCounter,
    /// Time to decode one request's codes.
    pub decode_seconds: Histogram,
}

/// The metrics of one model, with the label filled in, for the batcher's
/// hot path.
#[derive(Clone)]
pub(crate) struct ModelMetrics {
    pub items: IntCounter,
    pub skipped_items: IntCounter,
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
    pub queue_depth: Gauge,
    pub queue_wait: Histogram,
}

impl Metrics {
    /// Registers every metric on `registry`.
    pub(crate) fn new(registry: &Registry) -> Result<Self> {
        let m = Subsystem::new(registry, "reward")?;
        let model = &[Label::Model];
        let requests = m.counter_vec(
            "requests_total",
            "Score requests finished, by model used and gRPC status code.",
            &[Label::Model, Label::Code],
        )?;
        Ok(Self {
            requests,
            request_seconds: m.latency_histogram_vec(
                "request_seconds",
                "Score latency from arrival to answer, by model used.",
                model,
            )?,
            items: m.counter_vec("items_total", "Items scored.", model)?,
            skipped_items: m.counter_vec(
                "skipped_items_total",
                "Items dropped unscored because their deadline passed or their caller left.",
                model,
            )?,
            batch_size: m.batch_size_histogram_vec(
                "batch_size_items",
                "Items per forward pass.",
                model,
            )?,
            batch_seconds: m.latency_histogram_vec(
                "batch_seconds",
                "Time of one forward pass, audio front end included.",
                model,
            )?,
            queue_depth: m.gauge_vec("queue_depth_items", "Items waiting for a batch.", model)?,
            queue_wait: m.latency_histogram_vec(
                "queue_wait_seconds",
                "Time from queueing to the start of the batch.",
                model,
            )?,
            decoded_items: m.counter(
                "decoded_items_total",
                "Items decoded from EnCodec codes by the audio codec.",
            )?,
            decode_seconds: m.histogram(
                "decode_seconds",
                "Time to decode and resample the EnCodec codes of one request.",
                &LATENCY_BUCKETS_SECONDS,
            )?,
        })
    }

    /// The handles of one model.
    pub(crate) fn model(&self, name: &str) -> ModelMetrics {
        let labels = &[name];
        ModelMetrics {
            items: self.items.with_label_values(labels),
            skipped_items: self.skipped_items.with_label_values(labels),
            batch_size: self.batch_size.with_label_values(labels),
            batch_seconds: self.batch_seconds.with_label_values(labels),
            queue_depth: self.queue_depth.with_label_values(labels),
            queue_wait: self.queue_wait.with_label_values(labels),
        }
    }

    /// Records a finished Score request for one model it used.
    pub(crate) fn request(&self, model: &str, code: tonic::Code, seconds: f64) {
        self.requests
            .with_label_values(&[model, code_name(code)])
            .inc();
        self.request_seconds
            .with_label_values(&[model])
            .observe(seconds);
    }
}

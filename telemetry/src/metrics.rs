//! Prometheus metrics: one [`Registry`] per process, scraped through the
//! admin server's `/metrics`, and a [`Subsystem`] handle through which each
//! part of Encore registers its metrics, in one place, under the naming rule
//! `encore_<subsystem>_<what>_<unit>` with labels among `job`, `stage`,
//! `model` and `role` ([`Label`]).
//!
//! Each subsystem keeps its metrics in one struct built at start-up, so the
//! full list of what it exports reads in one screen:
//!
//! ```
//! use encore_telemetry::metrics::{Label, Subsystem};
//! use prometheus::{HistogramVec, IntCounterVec, Registry};
//!
//! struct ActorMetrics {
//!     rollouts: IntCounterVec,
//!     rollout_latency: HistogramVec,
//! }
//!
//! impl ActorMetrics {
//!     fn new(registry: &Registry) -> encore_telemetry::Result<Self> {
//!         let m = Subsystem::new(registry, "actor")?;
//!         Ok(Self {
//!             rollouts: m.counter_vec("rollouts_total", "Rollouts finished.", &[Label::Job, Label::Model])?,
//!             rollout_latency: m.latency_histogram_vec("rollout_seconds", "Time to produce one rollout.", &[Label::Model])?,
//!         })
//!     }
//! }
//!
//! let registry = Registry::new();
//! let metrics = ActorMetrics::new(&registry).unwrap();
//! metrics.rollouts.with_label_values(&["job-1", "policy-v3"]).inc();
//! metrics.rollout_latency.with_label_values(&["policy-v3"]).observe(0.42);
//! ```
//!
//! Why the `prometheus` crate rather than `prometheus-client`: its
//! [`Registry`] is a cheap `Clone` handle with interior mutability, so every
//! subsystem can register on the same registry from `&Registry` at start-up and
//! the admin server can hold a clone, with no `&mut` threaded through
//! start-up; it writes the text exposition format 0.0.4 that every Prometheus
//! scrapes; and its `*Vec` metrics with `with_label_values` need no derived
//! label types. `prometheus-client`'s typed label sets are its main advantage;
//! the [`Label`] enum gives the part of that we need (only the four agreed
//! label names can be used). The crate is built without its `protobuf` feature,
//! so it brings no second protobuf stack next to prost.

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    Opts, Registry,
};

use crate::error::{Error, Result};

/// Every metric name starts with this.
pub const NAMESPACE: &str = "encore";

/// Bucket bounds, in seconds, for rpc and step latencies: 0.5 ms to 10 s in a
/// 1-2.5-5 progression, so a local rpc (sub-millisecond) and a slow learner
/// step (seconds) both land in buckets narrow enough to read percentiles from.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds for batch sizes: the powers of two from 1 to 512, since
/// batches are usually sized in powers of two and a bucket per size shows
/// exactly how full they run.
pub const BATCH_SIZE_BUCKETS: [f64; 10] =
    [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The process-wide default registry, the one a process hands to the admin
/// server unless it builds its own. It is `prometheus`' own default registry,
/// so metrics registered with the crate's `register_*!` macros show up too.
/// Tests should build a fresh [`Registry`] instead, so that they do not
/// collide on names.
pub fn registry() -> &'static Registry {
    prometheus::default_registry()
}

/// The label names metrics may use. Keeping them in an enum is what keeps the
/// dashboards' label set small and shared across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    /// The training job (a run of the coordinator).
    Job,
    /// The job's stage, as its spec names it (`R`, `U`, `main`...).
    Stage,
    /// The model or policy version.
    Model,
    /// The process role: coordinator, actor, learner, reward-server.
    Role,
    /// The gRPC method of an rpc metric, e.g. `JobService/Submit`.
    Method,
    /// The outcome of an rpc: the gRPC status code's name (`OK`,
    /// `INVALID_ARGUMENT`...).
    Code,
    /// A lifecycle state, e.g. a job's `RUNNING`.
    State,
    /// Where a process spends its time, e.g. a learner's `wait` or `step`.
    Phase,
    /// Why something was dropped or refused, e.g. a rollout's `stale`.
    Reason,
}

impl Label {
    /// The label's name as it appears in the exposition.
    pub const fn as_str(self) -> &'static str {
        match self {
            Label::Job => "job",
            Label::Stage => "stage",
            Label::Model => "model",
            Label::Role => "role",
            Label::Method => "method",
            Label::Code => "code",
            Label::State => "state",
            Label::Phase => "phase",
            Label::Reason => "reason",
        }
    }
}

/// Registers metrics named `encore_<subsystem>_<name>` on one registry.
///
/// Names (both the subsystem's and the metric's) are lower snake case:
/// `[a-z][a-z0-9_]*`, with no double, leading or trailing underscore. The
/// metric name carries the unit as its last word (`_seconds`, `_bytes`,
/// `_tokens`...); counters end in `_total`, latency histograms in `_seconds`,
/// and those two are checked.
#[derive(Debug, Clone)]
pub struct Subsystem {
    registry: Registry,
    prefix: String,
}

impl Subsystem {
    /// A handle registering on `registry` under `encore_<name>_`.
    pub fn new(registry: &Registry, name: &str) -> Result<Self> {
        check_snake_case(name)?;
        Ok(Self {
            registry: registry.clone(),
            prefix: format!("{NAMESPACE}_{name}_"),
        })
    }

    /// The full name a metric called `name` gets, after checking `name`.
    pub fn metric_name(&self, name: &str) -> Result<String> {
        check_snake_case(name)?;
        Ok(format!("{}{name}", self.prefix))
    }

    /// Registers any collector (for metric kinds the helpers below do not
    /// cover) and hands it back. Its name is not checked: build it with
    /// [`Subsystem::metric_name`].
    pub fn register<C: Collector + Clone + 'static>(&self, collector: C) -> Result<C> {
        let name = collector
            .desc()
            .first()
            .map(|d| d.fq_name.clone())
            .unwrap_or_default();
        self.registry
            .register(Box::new(collector.clone()))
            .map_err(|source| Error::Register { name, source })?;
        Ok(collector)
    }

    /// An integer counter; `name` must end in `_total`.
    pub fn counter(&self, name: &str, help: &str) -> Result<IntCounter> {
        let full = self.counter_name(name)?;
        let counter = IntCounter::with_opts(Opts::new(&full, help));
        self.register(counter.map_err(|e| register_error(full, e))?)
    }

    /// An integer counter with labels; `name` must end in `_total`.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[Label]) -> Result<IntCounterVec> {
        let full = self.counter_name(name)?;
        let vec = IntCounterVec::new(Opts::new(&full, help), &label_names(labels));
        self.register(vec.map_err(|e| register_error(full, e))?)
    }

    /// A floating-point counter with labels (seconds spent, say); `name`
    /// must end in `_total`.
    pub fn float_counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[Label],
    ) -> Result<CounterVec> {
        let full = self.counter_name(name)?;
        let vec = CounterVec::new(Opts::new(&full, help), &label_names(labels));
        self.register(vec.map_err(|e| register_error(full, e))?)
    }

    /// A gauge.
    pub fn gauge(&self, name: &str, help: &str) -> Result<Gauge> {
        let full = self.metric_name(name)?;
        let gauge = Gauge::with_opts(Opts::new(&full, help));
        self.register(gauge.map_err(|e| register_error(full, e))?)
    }

    /// A gauge with labels.
    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[Label]) -> Result<GaugeVec> {
        let full = self.metric_name(name)?;
        let vec = GaugeVec::new(Opts::new(&full, help), &label_names(labels));
        self.register(vec.map_err(|e| register_error(full, e))?)
    }

    /// A histogram with the given bucket upper bounds.
    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Result<Histogram> {
        let full = self.metric_name(name)?;
        let opts = HistogramOpts::new(&full, help).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts).map_err(|e| register_error(full, e))?)
    }

    /// A histogram with labels and the given bucket upper bounds.
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[Label],
        buckets: &[f64],
    ) -> Result<HistogramVec> {
        let full = self.metric_name(name)?;
        let opts = HistogramOpts::new(&full, help).buckets(buckets.to_vec());
        let vec = HistogramVec::new(opts, &label_names(labels));
        self.register(vec.map_err(|e| register_error(full, e))?)
    }

    /// A latency histogram over [`LATENCY_BUCKETS_SECONDS`]; `name` must end
    /// in `_seconds`.
    pub fn latency_histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[Label],
    ) -> Result<HistogramVec> {
        if !name.ends_with("_seconds") {
            return Err(Error::MetricName {
                name: name.to_owned(),
                reason: "a latency histogram's name must end in `_seconds`",
            });
        }
        self.histogram_vec(name, help, labels, &LATENCY_BUCKETS_SECONDS)
    }

    /// A batch-size histogram over [`BATCH_SIZE_BUCKETS`].
    pub fn batch_size_histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[Label],
    ) -> Result<HistogramVec> {
        self.histogram_vec(name, help, labels, &BATCH_SIZE_BUCKETS)
    }

    fn counter_name(&self, name: &str) -> Result<String> {
        if !name.ends_with("_total") {
            return Err(Error::MetricName {
                name: name.to_owned(),
                reason: "a counter's name must end in `_total`",
            });
        }
        self.metric_name(name)
    }
}

fn label_names(labels: &[Label]) -> Vec<&'static str> {
    labels.iter().map(|l| l.as_str()).collect()
}

fn register_error(name: String, source: prometheus::Error) -> Error {
    Error::Register { name, source }
}

/// `[a-z][a-z0-9_]*` with no `__` and no trailing `_`.
fn check_snake_case(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("must start with a lower-case letter")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Some("only lower-case letters, digits and `_` are allowed")
    } else if name.contains("__") || name.ends_with('_') {
        Some("no double or trailing `_`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::MetricName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    fn exposition(registry: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn names_follow_the_rule() {
        let registry = Registry::new();
        let m = Subsystem::new(&registry, "reward_server").unwrap();
        let c = m.counter("scores_total", "Scores.").unwrap();
        c.inc_by(3);
        let text = exposition(&registry);
        assert!(
            text.contains("# TYPE encore_reward_server_scores_total counter"),
            "{text}"
        );
        assert!(
            text.contains("encore_reward_server_scores_total 3"),
            "{text}"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        let registry = Registry::new();
        for bad in ["", "Actor", "1actor", "act-or", "actor_", "act__or"] {
            assert!(
                matches!(
                    Subsystem::new(&registry, bad),
                    Err(Error::MetricName { .. })
                ),
                "{bad:?} accepted"
            );
        }
        let m = Subsystem::new(&registry, "actor").unwrap();
        assert!(matches!(
            m.counter("rollouts", "x"),
            Err(Error::MetricName { .. })
        ));
        assert!(matches!(
            m.latency_histogram_vec("rollout_ms", "x", &[]),
            Err(Error::MetricName { .. })
        ));
        assert!(matches!(
            m.gauge("queue depth", "x"),
            Err(Error::MetricName { .. })
        ));
    }

    #[test]
    fn registering_twice_is_an_error() {
        let registry = Registry::new();
        let m = Subsystem::new(&registry, "learner").unwrap();
        m.gauge("learning_rate", "LR.").unwrap();
        let err = m.gauge("learning_rate", "LR.").unwrap_err();
        assert!(matches!(err, Error::Register { .. }), "{err}");
    }

    #[test]
    fn labels_and_buckets_reach_the_exposition() {
        let registry = Registry::new();
        let m = Subsystem::new(&registry, "actor").unwrap();
        let lat = m
            .latency_histogram_vec("rpc_seconds", "Rpc latency.", &[Label::Stage, Label::Role])
            .unwrap();
        let batch = m
            .batch_size_histogram_vec("batch_size", "Batch size.", &[Label::Model])
            .unwrap();
        lat.with_label_values(&["rollout", "actor"]).observe(0.003);
        batch.with_label_values(&["v1"]).observe(24.0);
        let text = exposition(&registry);
        // 3 ms is above the 2.5 ms bound and within the 5 ms one.
        assert!(
            text.contains(
                r#"encore_actor_rpc_seconds_bucket{role="actor",stage="rollout",le="0.0025"} 0"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"encore_actor_rpc_seconds_bucket{role="actor",stage="rollout",le="0.005"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"encore_actor_batch_size_bucket{model="v1",le="16"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"encore_actor_batch_size_bucket{model="v1",le="32"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn buckets_cover_the_documented_ranges() {
        assert_eq!(LATENCY_BUCKETS_SECONDS.first(), Some(&0.0005));
        assert_eq!(LATENCY_BUCKETS_SECONDS.last(), Some(&10.0));
        assert!(LATENCY_BUCKETS_SECONDS.windows(2).all(|w| w[0] < w[1]));
        let powers: Vec<f64> = (0..10).map(|i| f64::from(1u32 << i)).collect();
        assert_eq!(BATCH_SIZE_BUCKETS.to_vec(), powers);
    }
}

//! The coordinator's Prometheus metrics, registered in this one place under
//! `encore_coordinator_*` and served on the admin port's `/metrics`:
//!
//! | metric | type | what |
//! | --- | --- | --- |
//! | `encore_coordinator_jobs{state}` | gauge | jobs by lifecycle state |
//! | `encore_coordinator_members{role}` | gauge | live members by role |
//! | `encore_coordinator_rpc_seconds{method,code}` | histogram | rpc latency (streams: until the stream is set up) by method and outcome |
//! | `encore_coordinator_lease_expirations_total{role}` | counter | leases that ran out |
//! | `encore_coordinator_assignments_total{role}` | counter | assignment changes handed out |
//! | `encore_coordinator_weight_versions_total{job}` | counter | weight versions committed |
//! | `encore_coordinator_weight_latest_version{job}` | gauge | latest committed version |
//! | `encore_coordinator_weight_received_bytes_total{job}` | counter | bytes received by Publish |
//! | `encore_coordinator_weight_served_bytes_total{job}` | counter | bytes sent by Fetch |
//! | `encore_coordinator_weight_fetches{job}` | gauge | Fetch streams running |
//! | `encore_coordinator_weight_deleted_versions_total{job}` | counter | versions removed by garbage collection |
//!
//! Label values come from the coordinator's own records (job ids it
//! assigned, fixed role, state, method and code names), never from free
//! text in requests.

use std::future::Future;
use std::time::Instant;

use encore_proto::status::code_name;
use encore_telemetry::metrics::{Label, Subsystem};
use prometheus::{GaugeVec, HistogramVec, IntCounterVec, Registry};

use crate::error::{Error, Result};

/// Every metric of the coordinator.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Jobs by state.
    pub jobs: GaugeVec,
    /// Live members by role.
    pub members: GaugeVec,
    rpc_seconds: HistogramVec,
    /// Leases that ran out, by role.
    pub lease_expirations: IntCounterVec,
    /// Assignment changes handed out, by role.
    pub assignments: IntCounterVec,
    /// Weight versions committed, by job.
    pub weight_versions: IntCounterVec,
    /// Latest committed weight version, by job.
    pub weight_latest_version: GaugeVec,
    /// Bytes received by Publish, by job.
    pub weight_received_bytes: IntCounterVec,
    /// Bytes sent by Fetch, by job.
    pub weight_served_bytes: IntCounterVec,
    /// Fetch streams running, by job.
    pub weight_fetches: GaugeVec,
    /// Versions removed by garbage collection, by job.
    pub weight_deleted_versions: IntCounterVec,
}

impl Metrics {
    /// Registers every metric on `registry`.
    pub fn new(registry: &Registry) -> Result<Self> {
        let m = Subsystem::new(registry, "coordinator")?;
        let job = &[Label::Job];
        Ok(Self {
            jobs: m.gauge_vec("jobs", "Jobs by lifecycle state.", &[Label::State])?,
            members: m.gauge_vec("members", "Live cluster members by role.", &[Label::Role])?,
            rpc_seconds: m.latency_histogram_vec(
                "rpc_seconds",
                "Rpc latency by method and gRPC code (streams: until the stream is set up).",
                &[Label::Method, Label::Code],
            )?,
            lease_expirations: m.counter_vec(
                "lease_expirations_total",
                "Member leases that ran out without a heartbeat, by role.",
                &[Label::Role],
            )?,
            assignments: m.counter_vec(
                "assignments_total",
                "Assignment changes handed to members, by role.",
                &[Label::Role],
            )?,
            weight_versions: m.counter_vec(
                "weight_versions_total",
                "Weight versions committed, by job.",
                job,
            )?,
            weight_latest_version: m.gauge_vec(
                "weight_latest_version",
                "Latest committed weight version, by job.",
                job,
            )?,
            weight_received_bytes: m.counter_vec(
                "weight_received_bytes_total",
                "Weight bytes received by Publish, by job.",
                job,
            )?,
            weight_served_bytes: m.counter_vec(
                "weight_served_bytes_total",
                "Weight bytes sent by Fetch, by job.",
                job,
            )?,
            weight_fetches: m.gauge_vec("weight_fetches", "Fetch streams running, by job.", job)?,
            weight_deleted_versions: m.counter_vec(
                "weight_deleted_versions_total",
                "Weight versions removed by garbage collection, by job.",
                job,
            )?,
        })
    }

    /// Runs an rpc handler body, records its latency under `method` and the
    /// code it ends with, and converts its error to a status (the services'
    /// one path from [`Error`] to `tonic::Status`).
    pub async fn rpc<T>(
        &self,
        method: &'static str,
        body: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, tonic::Status> {
        let started = Instant::now();
        let result = body.await.map_err(tonic::Status::from);
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        self.rpc_seconds
            .with_label_values(&[method, code_name(code)])
            .observe(started.elapsed().as_secs_f64());
        if let Err(status) = &result {
            tracing::debug!(
                method,
                code = code_name(code),
                message = status.message(),
                "rpc failed"
            );
        }
        result
    }
}

//! ClusterService: how actors, learner ranks and reward servers join the
//! cluster, keep their leases, learn their work, and (learner rank 0)
//! report a job's progress.
//!
//! Leases and assignments live in the store; this service only validates
//! and forwards. Work is decided by [`crate::reconcile`], which a
//! registration, a deregistration or a progress report wakes through its
//! [`Trigger`]; WatchAssignment streams wake on [`Changes`] and re-read the
//! member's record, and end with LEASE_EXPIRED when the lease runs out.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use encore_client::SOFTWARE_VERSION;
use encore_proto::status::Violations;
use encore_proto::v1::cluster_service_server::ClusterService;
use encore_proto::v1::{
    Assignment, Capabilities, DeregisterRequest, DeregisterResponse, ErrorReason,
    GetAssignmentRequest, HeartbeatRequest, HeartbeatResponse, JobState, MetricPoint,
    RegisterRequest, RegisterResponse, ReportProgressRequest, ReportProgressResponse, Role,
    StageChange, StopReason, WatchAssignmentRequest, assignment, job_event,
};
use encore_proto::v1::{JobEvent, Resources};
use encore_store::{Member, MemberRecord, Registration, Store, StoreError};
use prost_types::Timestamp;
use rand::Rng;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::{
    Caller, member_token, require_any, require_registrar, require_self, verify_member,
};
use crate::error::{Error, Result};
use crate::job_changes::{check_id, job_state, modify_job, state_event};
use crate::metrics::Metrics;
use crate::reconcile::{Changes, Trigger};

/// Longest failure message a progress report may carry, in bytes.
pub const MAX_FAILURE_MESSAGE_BYTES: usize = 4096;
/// Most metric points one progress report may carry.
pub const MAX_POINTS_PER_REPORT: usize = 1024;
/// Length of an NCCL unique id, in bytes.
const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// The ClusterService implementation.
#[derive(Debug, Clone)]
pub struct Cluster {
    store: Arc<dyn Store>,
    metrics: Metrics,
    lease_ttl: Duration,
    trigger: Trigger,
    changes: Changes,
    shutdown: CancellationToken,
}

impl Cluster {
    /// A ClusterService over `store` granting leases of `lease_ttl`.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Metrics,
        lease_ttl: Duration,
        trigger: Trigger,
        changes: Changes,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            metrics,
            lease_ttl,
            trigger,
            changes,
            shutdown,
        }
    }

    async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse> {
        let role = validate_register(&req)?;
        let member_id = format!(
            "{}-{:016x}",
            crate::reconcile::role_name(role as i32),
            rand::rng().random::<u64>()
        );
        let (token, token_sha256) = member_token(&member_id);
        let member = Member {
            member_id,
            role: role as i32,
            instance_id: req.instance_id,
            capabilities: req.capabilities,
            assignment: None,
            register_time: Some(Timestamp::from(self.store.now())),
            token_sha256: token_sha256.to_vec(),
        };
        let (record, token) = match self.store.register_member(member, self.lease_ttl).await? {
            Registration::Registered(record) => {
                tracing::info!(
                    member_id = %record.member.member_id,
                    role = crate::reconcile::role_name(record.member.role),
                    "member registered"
                );
                self.trigger.fire();
                (record, token)
            }
            // A retried Register: the earlier answer (and its token) may
            // never have arrived, so the member gets a new token.
            Registration::Existing(record) => self.reissue_token(record).await?,
        };
        Ok(RegisterResponse {
            member_id: record.member.member_id,
            lease_ttl: prost_types::Duration::try_from(self.lease_ttl).ok(),
            heartbeat_interval: prost_types::Duration::try_from(self.lease_ttl / 3).ok(),
            member_token: token,
        })
    }

    /// Gives an existing member a new token, retrying when the reconciler
    /// changes the record at the same moment.
    async fn reissue_token(&self, mut record: MemberRecord) -> Result<(MemberRecord, String)> {
        loop {
            let (token, token_sha256) = member_token(&record.member.member_id);
            let mut member = record.member.clone();
            member.token_sha256 = token_sha256.to_vec();
            match self.store.update_member(member, record.revision).await {
                Ok(updated) => return Ok((updated, token)),
                Err(StoreError::Conflict { .. }) => {
                    record = self
                        .store
                        .get_member(&record.member.member_id)
                        .await?
                        .ok_or_else(|| Error::LeaseExpired(record.member.member_id.clone()))?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn heartbeat(&self, caller: &Caller, req: HeartbeatRequest) -> Result<HeartbeatResponse> {
        let mut bad = Violations::default();
        check_id(&mut bad, "member_id", &req.member_id);
        if let Some(id) = req.status.as_ref().and_then(|s| s.nccl_unique_id.as_ref())
            && id.len() != NCCL_UNIQUE_ID_BYTES
        {
            bad.invalid(
                "status.nccl_unique_id",
                format!(
                    "{} bytes, an NCCL unique id has {NCCL_UNIQUE_ID_BYTES}",
                    id.len()
                ),
            );
        }
        bad.into_result()?;
        require_self(caller, &req.member_id)?;
        match verify_member(&*self.store, caller).await {
            // An expired lease is the answer below, not an error.
            Ok(_) | Err(Error::LeaseExpired(_)) => {}
            Err(e) => return Err(e),
        }
        let new_nccl_id = req
            .status
            .as_ref()
            .is_some_and(|s| s.nccl_unique_id.is_some());
        match self
            .store
            .renew_lease(&req.member_id, self.lease_ttl, req.status)
            .await
        {
            Ok(record) => {
                if new_nccl_id {
                    // Rank 0's id goes to the other ranks' assignments.
                    self.trigger.fire();
                }
                Ok(HeartbeatResponse {
                    lease_valid: true,
                    lease_expire_time: Some(Timestamp::from(record.lease_deadline)),
                    assignment_generation: generation(&record),
                })
            }
            Err(StoreError::LeaseExpired { .. }) => Ok(HeartbeatResponse {
                lease_valid: false,
                lease_expire_time: None,
                assignment_generation: 0,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The record of the member `caller` is, acting as `member_id`, if its
    /// lease is alive; LEASE_EXPIRED otherwise.
    async fn live_member(&self, caller: &Caller, member_id: &str) -> Result<MemberRecord> {
        let mut bad = Violations::default();
        check_id(&mut bad, "member_id", member_id);
        bad.into_result()?;
        require_self(caller, member_id)?;
        verify_member(&*self.store, caller).await
    }

    async fn watch_assignment(
        &self,
        caller: &Caller,
        req: WatchAssignmentRequest,
    ) -> Result<AssignmentStream> {
        // Fails at once for an unknown or expired member.
        self.live_member(caller, &req.member_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = self.store.clone();
        let mut changes = self.changes.subscribe();
        let shutdown = self.shutdown.clone();
        let member_id = req.member_id;
        let mut sent = req.after_generation;
        let mut first = sent == 0;
        tokio::spawn(async move {
            loop {
                // Marked seen before the read, so a change made during the
                // read wakes the next wait.
                changes.borrow_and_update();
                let record = match store.get_member(&member_id).await {
                    Ok(Some(record)) if record.is_alive(store.now()) => record,
                    Ok(_) => {
                        let _ = tx
                            .send(Err(Status::from(Error::LeaseExpired(member_id.clone()))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(Error::from(e)))).await;
                        return;
                    }
                };
                let current = assignment_of(&record);
                if first || current.generation > sent {
                    first = false;
                    sent = current.generation;
                    if tx.send(Ok(current)).await.is_err() {
                        return;
                    }
                }
                let until_expiry = record
                    .lease_deadline
                    .duration_since(store.now())
                    .unwrap_or_default();
                tokio::select! {
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::from(Error::ShuttingDown))).await;
                        return;
                    }
                    changed = changes.changed() => if changed.is_err() { return },
                    // Re-read at the deadline: a heartbeat may have renewed
                    // the lease, otherwise the next read ends the stream.
                    () = tokio::time::sleep(until_expiry + Duration::from_millis(1)) => {}
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn deregister(
        &self,
        caller: &Caller,
        req: DeregisterRequest,
    ) -> Result<DeregisterResponse> {
        let mut bad = Violations::default();
        check_id(&mut bad, "member_id", &req.member_id);
        if req.reason.len() > 1024 {
            bad.push(
                "reason".into(),
                ErrorReason::TooLarge,
                format!("{} bytes, at most 1024", req.reason.len()),
            );
        }
        bad.into_result()?;
        require_self(caller, &req.member_id)?;
        match verify_member(&*self.store, caller).await {
            // Deregistering a member that is gone succeeds.
            Ok(_) | Err(Error::LeaseExpired(_)) => {}
            Err(e) => return Err(e),
        }
        if self.store.remove_member(&req.member_id).await? {
            tracing::info!(member_id = %req.member_id, reason = %req.reason, "member deregistered");
            self.trigger.fire();
            self.changes.notify();
        }
        Ok(DeregisterResponse {})
    }

    async fn report_progress(
        &self,
        caller: &Caller,
        req: ReportProgressRequest,
    ) -> Result<ReportProgressResponse> {
        validate_report(&req)?;
        let record = self.live_member(caller, &req.member_id).await?;
        let assigned = record.member.assignment.as_ref().is_some_and(|a| {
            a.job_id == req.job_id
                && matches!(&a.details, Some(assignment::Details::Learner(l)) if l.rank == 0)
        });
        if !assigned {
            return Err(Error::NotAssigned {
                member_id: req.member_id.clone(),
                why: format!("is not rank 0 of job {:?}'s learner", req.job_id),
            });
        }
        let stored = modify_job(&*self.store, &req.job_id, |job, now| {
            let state = job_state(job);
            if state.is_terminal() {
                return Ok(None);
            }
            let stamp = Some(Timestamp::from(now));
            let mut events = Vec::new();
            for point in &req.metrics {
                if point.step <= job.step {
                    continue; // A retried report.
                }
                job.step = point.step;
                job.latest_metrics = Some(point.clone());
                events.push(JobEvent {
                    sequence: 0,
                    time: stamp,
                    event: Some(job_event::Event::Metrics(point.clone())),
                });
            }
            if let Some(change) = &req.stage_change
                && change.stage_index > job.stage_index
            {
                check_stage_change(job, change)?;
                job.stage_index = change.stage_index;
                job.stage = change.stage.clone();
                events.push(JobEvent {
                    sequence: 0,
                    time: stamp,
                    event: Some(job_event::Event::StageChange(change.clone())),
                });
            }
            let stop = StopReason::try_from(req.stop_reason).unwrap_or(StopReason::Unspecified);
            if stop != StopReason::Unspecified {
                job.state = JobState::Succeeded as i32;
                job.stop_reason = stop as i32;
                job.end_time = stamp;
                let message = format!("stopped: {}", stop.as_str_name());
                events.push(state_event(now, state, JobState::Succeeded, &message));
            } else if !req.failure_message.is_empty() {
                job.state = JobState::Failed as i32;
                job.failure_message = req.failure_message.clone();
                job.end_time = stamp;
                events.push(state_event(
                    now,
                    state,
                    JobState::Failed,
                    &req.failure_message,
                ));
            }
            if events.is_empty() {
                return Ok(None);
            }
            Ok(Some(events))
        })
        .await?;
        let state = job_state(&stored.job);
        if req.stage_change.is_some() || state.is_terminal() {
            // Actors move to the new stage's rewards, or are released.
            self.trigger.fire();
        }
        Ok(ReportProgressResponse {
            state: state as i32,
            step: stored.job.step,
        })
    }
}

/// A stage change must enter the next stage of the job's spec, by index and
/// name.
fn check_stage_change(job: &encore_proto::v1::Job, change: &StageChange) -> Result<()> {
    let stages = job.spec.as_ref().map_or(0, |s| s.stages.len());
    let expected = job
        .spec
        .as_ref()
        .and_then(|s| s.stages.get(change.stage_index as usize))
        .map(|s| s.name.as_str());
    if change.stage_index != job.stage_index + 1 || expected != Some(change.stage.as_str()) {
        return Err(Error::invalid(
            "stage_change",
            format!(
                "the job is in stage {} of {stages}; the next stage is {} named {:?}, not {} \
                 named {:?}",
                job.stage_index,
                job.stage_index + 1,
                job.spec
                    .as_ref()
                    .and_then(|s| s.stages.get(job.stage_index as usize + 1))
                    .map_or("(none)", |s| s.name.as_str()),
                change.stage_index,
                change.stage
            ),
        ));
    }
    Ok(())
}

/// The member's current assignment (generation 0 and idle before the
/// first).
fn assignment_of(record: &MemberRecord) -> Assignment {
    record
        .member
        .assignment
        .clone()
        .unwrap_or_else(|| Assignment {
            member_id: record.member.member_id.clone(),
            ..Assignment::default()
        })
}

fn generation(record: &MemberRecord) -> u64 {
    record
        .member
        .assignment
        .as_ref()
        .map_or(0, |a| a.generation)
}

/// Checks a Register request; returns its role.
fn validate_register(req: &RegisterRequest) -> Result<Role> {
    let mut bad = Violations::default();
    let role = match Role::try_from(req.role) {
        Ok(Role::Unspecified) | Err(_) => {
            bad.invalid(
                "role",
                format!("{} is not ACTOR, LEARNER or REWARD_SERVER", req.role),
            );
            Role::Unspecified
        }
        Ok(role) => role,
    };
    check_id(&mut bad, "instance_id", &req.instance_id);
    let default = Capabilities::default();
    let caps = match &req.capabilities {
        Some(caps) => caps,
        None => {
            bad.invalid("capabilities", "required");
            &default
        }
    };
    if caps.software_version.is_empty() {
        bad.invalid(
            "capabilities.software_version",
            "required, e.g. \"encore 0.1.0\"",
        );
    } else if !compatible(&caps.software_version) {
        return Err(Error::Incompatible {
            field: "capabilities.software_version".into(),
            message: format!(
                "{:?} cannot work with this coordinator ({SOFTWARE_VERSION:?}): major and \
                 minor versions must match",
                caps.software_version
            ),
        });
    }
    if let Some(r) = &caps.resources {
        check_resources(&mut bad, "capabilities.resources", r);
    }
    let needs_address = matches!(role, Role::Learner | Role::RewardServer);
    if caps.address.is_empty() {
        if needs_address {
            bad.invalid(
                "capabilities.address",
                "required for learners and reward servers",
            );
        }
    } else if !is_host_port(&caps.address) {
        bad.invalid(
            "capabilities.address",
            format!("{:?} is not host:port", caps.address),
        );
    }
    if role == Role::RewardServer && caps.models.is_empty() {
        bad.invalid(
            "capabilities.models",
            "a reward server must host at least one model",
        );
    }
    if role != Role::RewardServer && !caps.models.is_empty() {
        bad.invalid("capabilities.models", "only reward servers host models");
    }
    for (i, model) in caps.models.iter().enumerate() {
        check_id(
            &mut bad,
            &format!("capabilities.models[{i}].name"),
            &model.name,
        );
        if !model.sha256.is_empty() && !is_sha256(&model.sha256) {
            bad.invalid(
                format!("capabilities.models[{i}].sha256"),
                "must be 64 lower-case hex characters",
            );
        }
    }
    if caps.labels.len() > 64 {
        bad.invalid(
            "capabilities.labels",
            format!("{} labels, at most 64", caps.labels.len()),
        );
    }
    let mut keys: Vec<&String> = caps.labels.keys().collect();
    keys.sort();
    for key in keys {
        let value = &caps.labels[key];
        if key.is_empty() || key.len() > 63 || value.len() > 63 {
            bad.invalid(
                format!("capabilities.labels[{key:?}]"),
                "keys must be 1 to 63 bytes and values at most 63 bytes",
            );
        }
    }
    bad.into_result()?;
    Ok(role)
}

fn check_resources(bad: &mut Violations, path: &str, r: &Resources) {
    if encore_proto::v1::DeviceKind::try_from(r.device).is_err() {
        bad.invalid(
            format!("{path}.device"),
            format!("{} is not a device kind", r.device),
        );
    }
    if r.device_names.len() > 64 {
        bad.invalid(format!("{path}.device_names"), "at most 64 names");
    }
}

/// Checks a ReportProgress request's own fields (not yet the job's state).
fn validate_report(req: &ReportProgressRequest) -> Result<()> {
    let mut bad = Violations::default();
    check_id(&mut bad, "member_id", &req.member_id);
    check_id(&mut bad, "job_id", &req.job_id);
    if req.metrics.len() > MAX_POINTS_PER_REPORT {
        bad.push(
            "metrics".into(),
            ErrorReason::TooLarge,
            format!(
                "{} points, at most {MAX_POINTS_PER_REPORT}",
                req.metrics.len()
            ),
        );
    }
    let mut previous = 0;
    for (i, point) in req.metrics.iter().enumerate() {
        let path = format!("metrics[{i}]");
        if point.step == 0 {
            bad.invalid(format!("{path}.step"), "steps start at 1");
        } else if point.step <= previous {
            bad.invalid(
                format!("{path}.step"),
                format!("{} does not follow {previous}", point.step),
            );
        }
        previous = point.step;
        check_point(&mut bad, &path, point);
    }
    if StopReason::try_from(req.stop_reason).is_err() {
        bad.invalid(
            "stop_reason",
            format!("{} is not a stop reason", req.stop_reason),
        );
    }
    if req.failure_message.len() > MAX_FAILURE_MESSAGE_BYTES {
        bad.push(
            "failure_message".into(),
            ErrorReason::TooLarge,
            format!(
                "{} bytes, at most {MAX_FAILURE_MESSAGE_BYTES}",
                req.failure_message.len()
            ),
        );
    }
    if req.stop_reason != 0 && !req.failure_message.is_empty() {
        bad.invalid(
            "failure_message",
            "a job either stops (stop_reason) or fails, not both",
        );
    }
    bad.into_result()?;
    Ok(())
}

/// Every float a metric point carries must be finite: a NaN would poison
/// every curve drawn from the history.
fn check_point(bad: &mut Violations, path: &str, p: &MetricPoint) {
    let mut finite = |name: &str, value: f64| {
        if !value.is_finite() {
            bad.push(
                format!("{path}.{name}"),
                ErrorReason::NonFinite,
                format!("{value} is not finite"),
            );
        }
    };
    for (name, value) in [
        ("combined_reward_mean", p.combined_reward_mean),
        ("kl", p.kl),
        ("entropy", p.entropy),
        ("loss", p.loss),
        ("grad_norm", p.grad_norm),
        ("learning_rate", p.learning_rate),
        ("clip_fraction", p.clip_fraction),
        ("rollouts_per_second", p.rollouts_per_second),
        ("tokens_per_second", p.tokens_per_second),
        ("staleness_mean", p.staleness_mean),
    ] {
        finite(name, value);
    }
    let mut models: Vec<&String> = p.rewards.keys().collect();
    models.sort();
    for model in models {
        let stats = &p.rewards[model];
        finite(&format!("rewards[{model:?}].mean"), stats.mean);
        finite(&format!("rewards[{model:?}].std"), stats.std);
    }
}

/// Whether a member's software can work with ours: same major and minor.
fn compatible(theirs: &str) -> bool {
    let ours = env!("CARGO_PKG_VERSION");
    let minor = |v: &str| -> Option<String> {
        let v = v.strip_prefix("encore ")?;
        let mut parts = v.split('.');
        Some(format!("{}.{}", parts.next()?, parts.next()?))
    };
    minor(theirs).is_some_and(|t| Some(t) == minor(&format!("encore {ours}")))
}

fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What WatchAssignment returns.
pub type AssignmentStream = Pin<Box<dyn Stream<Item = Result<Assignment, Status>> + Send>>;

#[tonic::async_trait]
impl ClusterService for Cluster {
    type WatchAssignmentStream = AssignmentStream;

    #[tracing::instrument(skip_all, fields(instance_id = %request.get_ref().instance_id))]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        self.metrics
            .rpc("ClusterService/Register", async {
                let role = Role::try_from(request.get_ref().role).unwrap_or(Role::Unspecified);
                require_registrar(&request, role)?;
                self.register(request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(member_id = %request.get_ref().member_id))]
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.metrics
            .rpc("ClusterService/Heartbeat", async {
                let caller = require_any(&request)?;
                self.heartbeat(&caller, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(member_id = %request.get_ref().member_id))]
    async fn get_assignment(
        &self,
        request: Request<GetAssignmentRequest>,
    ) -> Result<Response<Assignment>, Status> {
        self.metrics
            .rpc("ClusterService/GetAssignment", async {
                let caller = require_any(&request)?;
                let record = self
                    .live_member(&caller, &request.get_ref().member_id)
                    .await?;
                Ok(assignment_of(&record))
            })
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(member_id = %request.get_ref().member_id))]
    async fn watch_assignment(
        &self,
        request: Request<WatchAssignmentRequest>,
    ) -> Result<Response<Self::WatchAssignmentStream>, Status> {
        self.metrics
            .rpc("ClusterService/WatchAssignment", async {
                let caller = require_any(&request)?;
                self.watch_assignment(&caller, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(member_id = %request.get_ref().member_id))]
    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        self.metrics
            .rpc("ClusterService/Deregister", async {
                let caller = require_any(&request)?;
                self.deregister(&caller, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn report_progress(
        &self,
        request: Request<ReportProgressRequest>,
    ) -> Result<Response<ReportProgressResponse>, Status> {
        self.metrics
            .rpc("ClusterService/ReportProgress", async {
                let caller = require_any(&request)?;
                self.report_progress(&caller, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_share_major_and_minor() {
        assert!(compatible(SOFTWARE_VERSION));
        assert!(!compatible("encore 99.0.0"));
        assert!(!compatible("other 0.1.0"));
        assert!(!compatible("encore"));
    }

    #[test]
    fn addresses_are_host_and_port() {
        assert!(is_host_port("127.0.0.1:5000"));
        assert!(is_host_port("learner-0.learners:7000"));
        assert!(is_host_port("[::1]:80"));
        for bad in ["", "host", "host:", ":80", "host:0", "host:99999"] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn non_finite_metrics_are_named() {
        let req = ReportProgressRequest {
            member_id: "m".into(),
            job_id: "j".into(),
            metrics: vec![MetricPoint {
                step: 1,
                kl: f64::NAN,
                ..MetricPoint::default()
            }],
            ..ReportProgressRequest::default()
        };
        let err = validate_report(&req).unwrap_err().to_string();
        assert!(err.contains("metrics[0].kl"), "{err}");
    }
}

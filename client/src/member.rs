//! The member side of ClusterService, for every process that joins a
//! cluster (actors, learner ranks, reward servers): register, renew the
//! lease in the background, follow the assignment, and notice when the
//! lease is gone.
//!
//! ```text
//!  Membership::join ──Register(worker token)──▶ member id, member token, lease, heartbeat interval
//!     every later call sends the member token
//!     heartbeat task ──Heartbeat(status)──▶ lease renewed; lease_valid=false ─▶ `lost`
//!     follow task    ──WatchAssignment──▶ `assignments` (a watch channel); LEASE_EXPIRED ─▶ `lost`
//!  Membership::leave ──Deregister──▶ work freed at once
//! ```
//!
//! A coordinator that restarts is not a lost lease: heartbeats that fail
//! are retried (the lease outlives a few), and the assignment stream is
//! opened again from the last generation seen.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use encore_proto::v1::cluster_service_client::ClusterServiceClient;
use encore_proto::v1::rollout_queue_service_client::RolloutQueueServiceClient;
use encore_proto::v1::weight_service_client::WeightServiceClient;
use encore_proto::v1::{
    Assignment, Capabilities, DeregisterRequest, DeviceKind, HeartbeatRequest, MemberStatus,
    RegisterRequest, Resources, Role, WatchAssignmentRequest,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::endpoint::{CoordinatorTls, endpoint, tune_endpoint};
use crate::token::BearerToken;

/// Software version members must share with the coordinator (major.minor).
pub const SOFTWARE_VERSION: &str = concat!("encore ", env!("CARGO_PKG_VERSION"));

/// A ClusterService client carrying the worker or member token.
pub type ClusterClient = ClusterServiceClient<InterceptedService<Channel, BearerToken>>;
/// A WeightService client carrying the member token.
pub type WeightClient = WeightServiceClient<InterceptedService<Channel, BearerToken>>;

/// The coordinator as a worker process sees it: one lazily connected
/// channel (HTTP/2 windows widened for weight transfers) and the token,
/// from which the ClusterService, RolloutQueueService and WeightService
/// clients are made: the worker token until [`Membership::join`] registers,
/// the member token it got from then on (shared by every client and clone).
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    channel: Channel,
    token: BearerToken,
}

impl CoordinatorClient {
    /// Clients of the coordinator at `url` with `token`, over TLS with
    /// `tls` (see [`endpoint`]); fails, naming the problem, on a malformed
    /// URL or token or an unreadable CA. Nothing is connected yet.
    pub fn new(url: &str, token: &str, tls: Option<&CoordinatorTls>) -> Result<Self, String> {
        let token = BearerToken::new(token).map_err(|e| format!("worker_token: {e}"))?;
        let endpoint = endpoint(url, tls)?;
        let channel = tune_endpoint(endpoint)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self { channel, token })
    }

    /// A ClusterService client. Like every client made here, it sends the
    /// worker token until [`Membership::join`] registers, and the member
    /// token from then on.
    pub fn cluster(&self) -> ClusterClient {
        ClusterServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// A RolloutQueueService client (entries are up to a ScoredBatch).
    pub fn queue(&self) -> crate::queue::RawQueueClient {
        RolloutQueueServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// A WeightService client.
    pub fn weights(&self) -> WeightClient {
        WeightServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
            .max_decoding_message_size(8 << 20)
    }
}

/// A fresh instance id for this process: `prefix`, the process id and 32
/// random bits (a restarted process is a new incarnation).
pub fn instance_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// What this process offers when it registers: its device (CUDA when
/// `cuda`, one of them, else the CPU), its CPU cores and
/// [`SOFTWARE_VERSION`]. Roles add what is theirs (an address, models).
pub fn capabilities(cuda: bool) -> Capabilities {
    Capabilities {
        resources: Some(Resources {
            device: if cuda {
                DeviceKind::Cuda
            } else {
                DeviceKind::Cpu
            } as i32,
            device_count: u32::from(cuda),
            cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            ..Resources::default()
        }),
        software_version: SOFTWARE_VERSION.into(),
        ..Capabilities::default()
    }
}

/// What a worker does with a membership, which [`stay_joined`] runs:
/// follow its assignments until the membership is lost
/// ([`Membership::lost`], which `shutdown` cancels too), then return.
pub trait MemberWork: Sync {
    /// Works for `membership` until it ends.
    fn with_membership(&self, membership: &Membership) -> impl Future<Output = ()> + Send;
}

/// The first pause after a failed Register; it doubles per failure in a
/// row, up to the caller's longest.
const FIRST_JOIN_BACKOFF: Duration = Duration::from_millis(100);

/// Keeps this process a member as `role` until `shutdown`: the one join
/// loop every worker runs. It registers (retrying with back-off, doubling
/// up to `max_backoff`, while the coordinator is away or refuses), runs
/// the `worker`'s [`MemberWork`] until it returns, leaves, and registers
/// again unless `shutdown` was cancelled: a lost lease is a new
/// membership, not an end.
pub async fn stay_joined(
    coordinator: &CoordinatorClient,
    role: Role,
    capabilities: Capabilities,
    instance_id: &str,
    max_backoff: Duration,
    shutdown: &CancellationToken,
    worker: &impl MemberWork,
) {
    let mut backoff = FIRST_JOIN_BACKOFF;
    while !shutdown.is_cancelled() {
        let membership = match Membership::join(
            coordinator,
            role,
            capabilities.clone(),
            instance_id,
            shutdown,
        )
        .await
        {
            Ok(membership) => membership,
            Err(status) => {
                tracing::warn!(error = %status, retry_in = ?backoff,
                        "joining the coordinator failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
        };
        backoff = FIRST_JOIN_BACKOFF;
        worker.with_membership(&membership).await;
        membership.leave("shutdown").await;
        if !shutdown.is_cancelled() {
            tracing::warn!(
                role = role.as_str_name(),
                "the membership ended; joining again"
            );
        }
    }
}

/// Longest pause between tries to re-open the assignment stream.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A live membership.
#[derive(Debug)]
pub struct Membership {
    /// The coordinator-assigned member id.
    pub member_id: String,
    /// The current assignment; changes wake receivers.
    pub assignments: watch::Receiver<Assignment>,
    /// Cancelled when the lease is gone (or the membership is left): stop
    /// the work and join again.
    pub lost: CancellationToken,
    status: Arc<Mutex<MemberStatus>>,
    cluster: ClusterClient,
    tasks: Vec<JoinHandle<()>>,
}

impl Membership {
    /// Registers as `role` with `capabilities` under `instance_id` (with
    /// the worker token), makes every client of `coordinator` send the
    /// member token from then on, and starts the heartbeat and the
    /// assignment follower. `parent` cancelling ends them too.
    pub async fn join(
        coordinator: &CoordinatorClient,
        role: Role,
        capabilities: Capabilities,
        instance_id: &str,
        parent: &CancellationToken,
    ) -> Result<Self, tonic::Status> {
        let registered = ClusterServiceClient::with_interceptor(
            coordinator.channel.clone(),
            coordinator.token.registrar(),
        )
        .register(RegisterRequest {
            role: role as i32,
            capabilities: Some(capabilities),
            instance_id: instance_id.to_owned(),
        })
        .await?
        .into_inner();
        let member_id = registered.member_id;
        coordinator
            .token
            .set_member(&registered.member_token)
            .map_err(|e| tonic::Status::internal(format!("the member token: {e}")))?;
        let cluster = coordinator.cluster();
        let interval = registered
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(5));
        tracing::info!(%member_id, role = role.as_str_name(), "registered");
        let lost = parent.child_token();
        let status = Arc::new(Mutex::new(MemberStatus::default()));
        let (tx, assignments) = watch::channel(Assignment::default());
        let tasks = vec![
            tokio::spawn(heartbeat(
                cluster.clone(),
                member_id.clone(),
                interval,
                status.clone(),
                lost.clone(),
            )),
            tokio::spawn(follow(cluster.clone(), member_id.clone(), tx, lost.clone())),
        ];
        Ok(Self {
            member_id,
            assignments,
            lost,
            status,
            cluster,
            tasks,
        })
    }

    /// A token cancelled once the assignment moves past `generation` or
    /// the membership is lost: what work on one assignment watches. The
    /// watch ends when the scope is dropped.
    pub fn assignment_scope(&self, generation: u64) -> AssignmentScope {
        let cancel = self.lost.child_token();
        let watcher = {
            let cancel = cancel.clone();
            let mut assigned = self.assignments.clone();
            tokio::spawn(async move {
                while assigned.changed().await.is_ok() {
                    if assigned.borrow().generation != generation {
                        break;
                    }
                }
                cancel.cancel();
            })
        };
        AssignmentScope { cancel, watcher }
    }

    /// Changes what the next heartbeats report.
    pub fn update_status(&self, change: impl FnOnce(&mut MemberStatus)) {
        change(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Sends a heartbeat now (for example with an NCCL unique id that the
    /// other ranks are waiting for); a failure is left to the next beat.
    pub async fn beat_now(&self) {
        let status = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let _ = self
            .cluster
            .clone()
            .heartbeat(HeartbeatRequest {
                member_id: self.member_id.clone(),
                status: Some(status),
            })
            .await;
    }

    /// Stops the background tasks and, unless the lease is already gone,
    /// deregisters so the work is freed at once.
    pub async fn leave(mut self, reason: &str) {
        let was_lost = self.lost.is_cancelled();
        self.lost.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if !was_lost {
            let _ = self
                .cluster
                .deregister(DeregisterRequest {
                    member_id: self.member_id.clone(),
                    reason: reason.to_owned(),
                })
                .await;
            tracing::info!(member_id = %self.member_id, reason, "deregistered");
        }
    }
}

/// See [`Membership::assignment_scope`].
#[derive(Debug)]
pub struct AssignmentScope {
    /// Cancelled when the assignment changes or the membership is lost.
    pub cancel: CancellationToken,
    watcher: JoinHandle<()>,
}

impl Drop for AssignmentScope {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.lost.cancel();
    }
}

/// Renews the lease every `interval`; cancels `lost` when it is gone.
async fn heartbeat(
    mut cluster: ClusterClient,
    member_id: String,
    interval: Duration,
    status: Arc<Mutex<MemberStatus>>,
    lost: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = lost.cancelled() => return,
            _ = tick.tick() => {}
        }
        let current = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let beat = tokio::select! {
            () = lost.cancelled() => return,
            beat = cluster.heartbeat(HeartbeatRequest {
                member_id: member_id.clone(),
                status: Some(current),
            }) => beat,
        };
        match beat {
            Ok(beat) if beat.get_ref().lease_valid => {}
            Ok(_) => {
                tracing::warn!(%member_id, "the coordinator says the lease expired");
                lost.cancel();
                return;
            }
            // The token is no longer this member's: a retried Register
            // replaced it, so this membership is over.
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                tracing::warn!(%member_id, error = %status, "the member token was refused");
                lost.cancel();
                return;
            }
            // The coordinator may be restarting; the lease outlives a few
            // missed beats.
            Err(status) => tracing::warn!(%member_id, error = %status, "heartbeat failed"),
        }
    }
}

/// Follows the member's assignment; cancels `lost` when the lease is gone.
async fn follow(
    mut cluster: ClusterClient,
    member_id: String,
    assigned: watch::Sender<Assignment>,
    lost: CancellationToken,
) {
    let mut after = 0;
    let mut backoff = Duration::from_millis(50);
    loop {
        let opened = tokio::select! {
            () = lost.cancelled() => return,
            opened = cluster.watch_assignment(WatchAssignmentRequest {
                member_id: member_id.clone(),
                after_generation: after,
            }) => opened,
        };
        let mut stream = match opened {
            Ok(stream) => stream.into_inner(),
            Err(status) if ends_membership(&status) => {
                lost.cancel();
                return;
            }
            Err(status) => {
                tracing::warn!(error = %status, "watching the assignment failed; retrying");
                tokio::select! {
                    () = lost.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                () = lost.cancelled() => return,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(assignment)) => {
                    after = assignment.generation;
                    backoff = Duration::from_millis(50);
                    let _ = assigned.send(assignment);
                }
                Some(Err(status)) if ends_membership(&status) => {
                    lost.cancel();
                    return;
                }
                // The coordinator went away or restarted: watch again.
                Some(Err(_)) | None => break,
            }
        }
    }
}

/// A status that means the membership is over: the lease is gone
/// (FAILED_PRECONDITION) or the token is no longer the member's.
fn ends_membership(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::Unauthenticated
    )
}

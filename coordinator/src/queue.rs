//! The rollout queue over gRPC: `RolloutQueueService` serves the queue of
//! the coordinator's own store to workers that cannot open that store (the
//! embedded one is a directory only one process may hold), and
//! [`QueueClient`] is the workers' side of it, a [`Queue`] like any store.
//!
//! ```text
//!  actor ──Append/Stats──▶ coordinator ──▶ Store::queue_* (embedded://DIR)
//!  learner ──Read/Ack/ClaimStale/Stats──▶ ┘
//! ```
//!
//! The coordinator hands out [`COORDINATOR_QUEUE_URI`] as the queue's URI
//! when its store is embedded and no other queue is configured;
//! [`open_queue`] turns any queue URI into a [`Queue`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use encore_proto::status::Violations;
use encore_proto::v1::rollout_queue_service_client::RolloutQueueServiceClient;
use encore_proto::v1::rollout_queue_service_server::RolloutQueueService;
use encore_proto::v1::{
    QueueAckRequest, QueueAckResponse, QueueAppendRequest, QueueAppendResponse, QueueClaimRequest,
    QueueEntries, QueueEntryId, QueueReadRequest, QueueStats, QueueStatsRequest,
};
use encore_store::{AppendOutcome, EntryId, Queue, QueueEntry, Store, StoreError, SystemClock};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::auth::{BearerToken, Caller, JobRight, require_any, require_member_right};
use crate::error::Result;
use crate::member::CoordinatorClient;
use crate::metrics::Metrics;
use crate::records::check_id;

/// The queue URI that means "the coordinator's RolloutQueueService".
pub const COORDINATOR_QUEUE_URI: &str = "coordinator://";

/// The longest a Read waits for an append before answering empty; callers
/// read again.
pub const MAX_BLOCK: Duration = Duration::from_secs(5);

/// Opens the queue `uri` names: the coordinator's service for
/// [`COORDINATOR_QUEUE_URI`] (through `coordinator`'s channel and worker
/// token), otherwise the store itself (`redis://...`, `embedded://DIR`).
pub async fn open_queue(
    uri: &str,
    coordinator: &CoordinatorClient,
) -> std::result::Result<Arc<dyn Queue>, StoreError> {
    if uri == COORDINATOR_QUEUE_URI {
        Ok(Arc::new(QueueClient {
            client: coordinator.queue(),
        }))
    } else {
        let store = encore_store::open(uri, Arc::new(SystemClock)).await?;
        Ok(Arc::new(store))
    }
}

// ------------------------------------------------------------------ server

/// The RolloutQueueService over a store.
#[derive(Debug, Clone)]
pub struct QueueService {
    store: Arc<dyn Store>,
    metrics: Metrics,
}

impl QueueService {
    /// Serves `store`'s rollout queues.
    pub fn new(store: Arc<dyn Store>, metrics: Metrics) -> Self {
        Self { store, metrics }
    }

    async fn append(
        &self,
        caller: &Caller,
        req: QueueAppendRequest,
    ) -> Result<QueueAppendResponse> {
        let mut bad = Violations::default();
        check_id(&mut bad, "job_id", &req.job_id);
        if req.payload.is_empty() {
            bad.invalid("payload", "required");
        }
        if req.max_len == 0 {
            bad.invalid("max_len", "must be > 0");
        }
        bad.into_result()?;
        require_member_right(&*self.store, caller, &req.job_id, JobRight::Produce).await?;
        Ok(
            match self
                .store
                .queue_append(&req.job_id, req.payload, req.max_len)
                .await?
            {
                AppendOutcome::Appended(id) => QueueAppendResponse {
                    appended: true,
                    id: Some(to_wire(id)),
                    len: 0,
                },
                AppendOutcome::Full { len } => QueueAppendResponse {
                    appended: false,
                    id: None,
                    len,
                },
            },
        )
    }

    async fn read(&self, caller: &Caller, req: QueueReadRequest) -> Result<QueueEntries> {
        let mut bad = Violations::default();
        check_id(&mut bad, "job_id", &req.job_id);
        check_id(&mut bad, "group", &req.group);
        check_id(&mut bad, "consumer", &req.consumer);
        if req.count == 0 {
            bad.invalid("count", "must be > 0");
        }
        bad.into_result()?;
        require_member_right(&*self.store, caller, &req.job_id, JobRight::Consume).await?;
        let block = Duration::from_millis(req.block_ms).min(MAX_BLOCK);
        let entries = self
            .store
            .queue_read(
                &req.job_id,
                &req.group,
                &req.consumer,
                req.count as usize,
                block,
            )
            .await?;
        Ok(entries_to_wire(entries))
    }

    async fn ack(&self, caller: &Caller, req: QueueAckRequest) -> Result<QueueAckResponse> {
        let mut bad = Violations::default();
        check_id(&mut bad, "job_id", &req.job_id);
        check_id(&mut bad, "group", &req.group);
        bad.into_result()?;
        require_member_right(&*self.store, caller, &req.job_id, JobRight::Consume).await?;
        let ids: Vec<EntryId> = req.ids.iter().map(from_wire).collect();
        let acknowledged = self.store.queue_ack(&req.job_id, &req.group, &ids).await?;
        Ok(QueueAckResponse { acknowledged })
    }

    async fn claim_stale(&self, caller: &Caller, req: QueueClaimRequest) -> Result<QueueEntries> {
        let mut bad = Violations::default();
        check_id(&mut bad, "job_id", &req.job_id);
        check_id(&mut bad, "group", &req.group);
        check_id(&mut bad, "consumer", &req.consumer);
        if req.count == 0 {
            bad.invalid("count", "must be > 0");
        }
        bad.into_result()?;
        require_member_right(&*self.store, caller, &req.job_id, JobRight::Consume).await?;
        let entries = self
            .store
            .queue_claim_stale(
                &req.job_id,
                &req.group,
                &req.consumer,
                Duration::from_millis(req.min_idle_ms),
                req.count as usize,
            )
            .await?;
        Ok(entries_to_wire(entries))
    }

    async fn stats(&self, caller: &Caller, req: QueueStatsRequest) -> Result<QueueStats> {
        let mut bad = Violations::default();
        check_id(&mut bad, "job_id", &req.job_id);
        if !req.group.is_empty() {
            check_id(&mut bad, "group", &req.group);
        }
        bad.into_result()?;
        require_member_right(&*self.store, caller, &req.job_id, JobRight::InspectQueue).await?;
        let len = self.store.queue_len(&req.job_id).await?;
        let pending = if req.group.is_empty() {
            0
        } else {
            self.store.queue_pending(&req.job_id, &req.group).await?
        };
        Ok(QueueStats { len, pending })
    }
}

#[tonic::async_trait]
impl RolloutQueueService for QueueService {
    async fn append(
        &self,
        request: Request<QueueAppendRequest>,
    ) -> std::result::Result<Response<QueueAppendResponse>, Status> {
        self.metrics
            .rpc("RolloutQueueService/Append", async {
                let caller = require_any(&request)?;
                self.append(&caller, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    async fn read(
        &self,
        request: Request<QueueReadRequest>,
    ) -> std::result::Result<Response<QueueEntries>, Status> {
        self.metrics
            .rpc("RolloutQueueService/Read", async {
                let caller = require_any(&request)?;
                self.read(&caller, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    async fn ack(
        &self,
        request: Request<QueueAckRequest>,
    ) -> std::result::Result<Response<QueueAckResponse>, Status> {
        self.metrics
            .rpc("RolloutQueueService/Ack", async {
                let caller = require_any(&request)?;
                self.ack(&caller, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    async fn claim_stale(
        &self,
        request: Request<QueueClaimRequest>,
    ) -> std::result::Result<Response<QueueEntries>, Status> {
        self.metrics
            .rpc("RolloutQueueService/ClaimStale", async {
                let caller = require_any(&request)?;
                self.claim_stale(&caller, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    async fn stats(
        &self,
        request: Request<QueueStatsRequest>,
    ) -> std::result::Result<Response<QueueStats>, Status> {
        self.metrics
            .rpc("RolloutQueueService/Stats", async {
                let caller = require_any(&request)?;
                self.stats(&caller, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }
}

fn to_wire(id: EntryId) -> QueueEntryId {
    QueueEntryId {
        ms: id.ms,
        seq: id.seq,
    }
}

fn from_wire(id: &QueueEntryId) -> EntryId {
    EntryId {
        ms: id.ms,
        seq: id.seq,
    }
}

fn entries_to_wire(entries: Vec<QueueEntry>) -> QueueEntries {
    QueueEntries {
        entries: entries
            .into_iter()
            .map(|e| encore_proto::v1::QueueEntry {
                id: Some(to_wire(e.id)),
                payload: e.payload,
            })
            .collect(),
    }
}

fn entries_from_wire(entries: QueueEntries) -> std::result::Result<Vec<QueueEntry>, StoreError> {
    entries
        .entries
        .into_iter()
        .map(|e| {
            let id = e.id.as_ref().ok_or_else(|| {
                StoreError::decode("RolloutQueueService entry", "the entry has no id")
            })?;
            Ok(QueueEntry {
                id: from_wire(id),
                payload: e.payload,
            })
        })
        .collect()
}

// ------------------------------------------------------------------ client

/// A RolloutQueueService client carrying the worker token.
pub type RawQueueClient = RolloutQueueServiceClient<InterceptedService<Channel, BearerToken>>;

/// The coordinator's RolloutQueueService as a [`Queue`]. Transport
/// failures and UNAVAILABLE answers become [`StoreError::Backend`]
/// (transient: the caller retries, as with a Redis that is away).
#[derive(Debug, Clone)]
pub struct QueueClient {
    client: RawQueueClient,
}

impl QueueClient {
    /// A queue client over an existing RolloutQueueService client.
    pub fn new(client: RawQueueClient) -> Self {
        Self { client }
    }
}

/// The store error a failed queue rpc stands for.
fn store_error(status: Status) -> StoreError {
    let message = format!("coordinator queue: {}", status.message());
    match status.code() {
        Code::InvalidArgument => StoreError::invalid("rollout queue request", message),
        Code::NotFound => StoreError::not_found("rollout queue", message),
        Code::Internal | Code::DataLoss => StoreError::decode("RolloutQueueService", message),
        code => StoreError::Backend(format!("{message} ({code:?})")),
    }
}

#[async_trait]
impl Queue for QueueClient {
    async fn append(
        &self,
        job_id: &str,
        payload: Vec<u8>,
        max_len: u64,
    ) -> std::result::Result<AppendOutcome, StoreError> {
        let answer = self
            .client
            .clone()
            .append(QueueAppendRequest {
                job_id: job_id.to_owned(),
                payload,
                max_len,
            })
            .await
            .map_err(store_error)?
            .into_inner();
        match (answer.appended, answer.id) {
            (true, Some(id)) => Ok(AppendOutcome::Appended(from_wire(&id))),
            (true, None) => Err(StoreError::decode(
                "RolloutQueueService.Append",
                "appended without an id",
            )),
            (false, _) => Ok(AppendOutcome::Full { len: answer.len }),
        }
    }

    async fn read(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> std::result::Result<Vec<QueueEntry>, StoreError> {
        let answer = self
            .client
            .clone()
            .read(QueueReadRequest {
                job_id: job_id.to_owned(),
                group: group.to_owned(),
                consumer: consumer.to_owned(),
                count: u32::try_from(count).unwrap_or(u32::MAX),
                block_ms: u64::try_from(block.min(MAX_BLOCK).as_millis()).unwrap_or(0),
            })
            .await
            .map_err(store_error)?;
        entries_from_wire(answer.into_inner())
    }

    async fn ack(
        &self,
        job_id: &str,
        group: &str,
        ids: &[EntryId],
    ) -> std::result::Result<u64, StoreError> {
        let answer = self
            .client
            .clone()
            .ack(QueueAckRequest {
                job_id: job_id.to_owned(),
                group: group.to_owned(),
                ids: ids.iter().copied().map(to_wire).collect(),
            })
            .await
            .map_err(store_error)?;
        Ok(answer.into_inner().acknowledged)
    }

    async fn claim_stale(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> std::result::Result<Vec<QueueEntry>, StoreError> {
        let answer = self
            .client
            .clone()
            .claim_stale(QueueClaimRequest {
                job_id: job_id.to_owned(),
                group: group.to_owned(),
                consumer: consumer.to_owned(),
                min_idle_ms: u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX),
                count: u32::try_from(count).unwrap_or(u32::MAX),
            })
            .await
            .map_err(store_error)?;
        entries_from_wire(answer.into_inner())
    }

    async fn len(&self, job_id: &str) -> std::result::Result<u64, StoreError> {
        Ok(self.stats(job_id, "").await?.len)
    }

    async fn pending(&self, job_id: &str, group: &str) -> std::result::Result<u64, StoreError> {
        Ok(self.stats(job_id, group).await?.pending)
    }
}

impl QueueClient {
    async fn stats(
        &self,
        job_id: &str,
        group: &str,
    ) -> std::result::Result<QueueStats, StoreError> {
        Ok(self
            .client
            .clone()
            .stats(QueueStatsRequest {
                job_id: job_id.to_owned(),
                group: group.to_owned(),
            })
            .await
            .map_err(store_error)?
            .into_inner())
    }
}

//! RolloutQueueService: the queue of the coordinator's own store, served to
//! workers that cannot open that store (the embedded one is a directory
//! only one process may hold). Their side of it is
//! `encore_client::queue::QueueClient`.
//!
//! ```text
//!  actor ──Append/Stats──▶ coordinator ──▶ Store::queue_* (embedded://DIR)
//!  learner ──Read/Ack/ClaimStale/Stats──▶ ┘
//! ```
//!
//! The coordinator hands out `coordinator://` as the queue's URI
//! when its store is embedded and no other queue is configured.

use std::sync::Arc;
use std::time::Duration;

use encore_client::queue::MAX_BLOCK;
use encore_client::queue::{entries_to_wire, from_wire, to_wire};
use encore_proto::status::Violations;
use encore_proto::v1::rollout_queue_service_server::RolloutQueueService;
use encore_proto::v1::{
    QueueAckRequest, QueueAckResponse, QueueAppendRequest, QueueAppendResponse, QueueClaimRequest,
    QueueEntries, QueueReadRequest, QueueStats, QueueStatsRequest,
};
use encore_store::{AppendOutcome, EntryId, Queue, Store};
use tonic::{Request, Response, Status};

use crate::auth::{Caller, JobRight, require_any, require_member_right};
use crate::error::Result;
use crate::job_changes::check_id;
use crate::metrics::Metrics;

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
        let counts = Queue::stats(&self.store, &req.job_id, &req.group).await?;
        Ok(QueueStats {
            len: counts.len,
            pending: counts.pending,
        })
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

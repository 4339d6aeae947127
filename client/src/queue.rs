//! The rollout queue as workers see it: [`open_queue`] turns the URI an
//! assignment carries into a [`Queue`], either the store itself
//! (`redis://...`) or [`QueueClient`], the coordinator's
//! RolloutQueueService for workers that cannot open its store (the embedded
//! one is a directory only one process may hold). The wire conversions are
//! shared with the service.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use encore_proto::v1::rollout_queue_service_client::RolloutQueueServiceClient;
use encore_proto::v1::{
    QueueAckRequest, QueueAppendRequest, QueueClaimRequest, QueueEntries, QueueEntryId,
    QueueReadRequest, QueueStats, QueueStatsRequest,
};
use encore_store::{
    AppendOutcome, EntryId, Queue, QueueCounts, QueueEntry, StoreError, SystemClock,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::member::CoordinatorClient;
use crate::token::BearerToken;

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

/// A queue entry id as the wire carries it.
pub fn to_wire(id: EntryId) -> QueueEntryId {
    QueueEntryId {
        ms: id.ms,
        seq: id.seq,
    }
}

/// A queue entry id from the wire.
pub fn from_wire(id: &QueueEntryId) -> EntryId {
    EntryId {
        ms: id.ms,
        seq: id.seq,
    }
}

/// Entries as a Read or ClaimStale answer carries them.
pub fn entries_to_wire(entries: Vec<QueueEntry>) -> QueueEntries {
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

/// Entries from a Read or ClaimStale answer; DECODE if one has no id.
pub fn entries_from_wire(
    entries: QueueEntries,
) -> std::result::Result<Vec<QueueEntry>, StoreError> {
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

    async fn stats(
        &self,
        job_id: &str,
        group: &str,
    ) -> std::result::Result<QueueCounts, StoreError> {
        let stats: QueueStats = self
            .client
            .clone()
            .stats(QueueStatsRequest {
                job_id: job_id.to_owned(),
                group: group.to_owned(),
            })
            .await
            .map_err(store_error)?
            .into_inner();
        Ok(QueueCounts {
            len: stats.len,
            pending: stats.pending,
        })
    }
}

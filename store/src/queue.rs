//! [`Queue`]: the rollout-queue half of [`Store`], all that actors and
//! learner ranks use. Every store is one; the coordinator's
//! `RolloutQueueService` client is another, for workers that cannot open
//! the coordinator's store themselves (the embedded one is a directory
//! only its own process may open).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{AppendOutcome, EntryId, QueueEntry, Result, Store};

/// A job's bounded rollout queue with one consumer group. The semantics
/// are those of the [`Store`] methods of the same names with a `queue_`
/// prefix; any shared store is one (`Arc::new(store) as Arc<dyn Queue>`).
#[async_trait]
pub trait Queue: Send + Sync + Debug {
    /// See [`Store::queue_append`].
    async fn append(&self, job_id: &str, payload: Vec<u8>, max_len: u64) -> Result<AppendOutcome>;

    /// See [`Store::queue_read`].
    async fn read(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<QueueEntry>>;

    /// See [`Store::queue_ack`].
    async fn ack(&self, job_id: &str, group: &str, ids: &[EntryId]) -> Result<u64>;

    /// See [`Store::queue_claim_stale`].
    async fn claim_stale(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<QueueEntry>>;

    /// The queue's length and `group`'s pending count (0 for an empty
    /// `group`), in one call: one rpc for a queue behind the coordinator.
    async fn stats(&self, job_id: &str, group: &str) -> Result<QueueCounts>;

    /// See [`Store::queue_len`].
    async fn len(&self, job_id: &str) -> Result<u64> {
        Ok(self.stats(job_id, "").await?.len)
    }

    /// See [`Store::queue_pending`].
    async fn pending(&self, job_id: &str, group: &str) -> Result<u64> {
        Ok(self.stats(job_id, group).await?.pending)
    }
}

/// What [`Queue::stats`] answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Entries in the queue: appended and not acknowledged.
    pub len: u64,
    /// Entries delivered to the group and not acknowledged.
    pub pending: u64,
}

#[async_trait]
impl<S: Store + ?Sized> Queue for Arc<S> {
    async fn append(&self, job_id: &str, payload: Vec<u8>, max_len: u64) -> Result<AppendOutcome> {
        self.queue_append(job_id, payload, max_len).await
    }

    async fn read(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<QueueEntry>> {
        self.queue_read(job_id, group, consumer, count, block).await
    }

    async fn ack(&self, job_id: &str, group: &str, ids: &[EntryId]) -> Result<u64> {
        self.queue_ack(job_id, group, ids).await
    }

    async fn claim_stale(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<QueueEntry>> {
        self.queue_claim_stale(job_id, group, consumer, min_idle, count)
            .await
    }

    async fn stats(&self, job_id: &str, group: &str) -> Result<QueueCounts> {
        let len = self.queue_len(job_id).await?;
        let pending = if group.is_empty() {
            0
        } else {
            self.queue_pending(job_id, group).await?
        };
        Ok(QueueCounts { len, pending })
    }

    async fn len(&self, job_id: &str) -> Result<u64> {
        self.queue_len(job_id).await
    }

    async fn pending(&self, job_id: &str, group: &str) -> Result<u64> {
        self.queue_pending(job_id, group).await
    }
}

//! Encore's state layer: everything the coordinator must not keep only in
//! memory (jobs, their event history, cluster membership and leases, weight
//! manifests) and the rollout queue between actors and learners, behind one
//! object-safe trait, [`Store`], with two backends that hold exactly the same
//! data (protocol messages, prost-encoded):
//!
//! - [`EmbeddedStore`]: in-process, persisted to a local directory (a
//!   write-ahead log compacted into snapshots). The default on one machine
//!   and in the quick start.
//! - [`RedisStore`]: Redis, for a cluster: hashes and sorted sets for jobs,
//!   members and manifests, Lua scripts for every multi-key move, and Redis
//!   Streams with consumer groups for the rollout queue.
//!
//! Where it sits in the data flow:
//!
//! ```text
//!  CLI ──gRPC──▶ coordinator ──▶ Store: jobs, job events, members, manifests
//!  actor ──queue_append──▶ Store: rollout queue ──queue_read/ack──▶ learner
//! ```
//!
//! The coordinator keeps no state outside the store, so a restarted
//! coordinator reopens the same store and carries on. The rollout queue
//! delivers every entry to one consumer of a group until it is
//! acknowledged; a learner acknowledges entries only after the step that used
//! them is checkpointed, and a crashed learner's entries are re-delivered
//! through [`Store::queue_claim_stale`].
//!
//! [`open`] picks a backend from a URI (`redis://...` or `embedded://DIR`),
//! the form `RolloutQueue.uri` uses. `docs/store.md` describes the Redis key
//! layout, the embedded files and their fsync policy.

#![deny(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use encore_proto::v1::{
    Job, JobEvent, JobState, MemberStatus, MetricPoint, Role, WeightManifest, job_event,
};

mod clock;
mod embedded;
mod error;
mod queue;
mod redis_backend;
mod subscribe;
mod types;
mod validate;

pub use clock::{Clock, ManualClock, SystemClock, from_millis, millis};
pub use embedded::{Durability, EmbeddedOptions, EmbeddedStore};
pub use error::{Result, StoreError};
pub use queue::{Queue, QueueCounts};
pub use redis_backend::{RedisConfig, RedisStore};
pub use subscribe::{EventStream, subscribe};
pub use types::{
    AppendOutcome, CreateOutcome, DEFAULT_PAGE_SIZE, EntryId, IdempotencyKey, JobPage,
    MAX_PAGE_SIZE, ManifestPut, Member, MemberRecord, QueueEntry, RecordPut, Registration,
    StoredJob,
};

/// The state of an Encore cluster. Object safe: processes hold an
/// `Arc<dyn Store>` and do not know which backend is behind it.
///
/// Every operation is atomic: it happens completely or not at all, and a
/// failed one changes nothing. Mutations are durable when they return (see
/// each backend for what durable means there).
#[async_trait]
pub trait Store: Send + Sync + Debug {
    /// The store's clock: the time lease and pin deadlines are measured
    /// against.
    fn now(&self) -> SystemTime;

    // ----- Jobs -----

    /// Stores a new job (`job.job_id` chosen by the caller, `job.state` set)
    /// together with its owner's idempotency key, atomically. If the owner
    /// already used the key: the existing job when the spec hash matches
    /// ([`CreateOutcome::Existing`], nothing changes), else
    /// [`CreateOutcome::KeyReused`]. A job id that is taken without a
    /// matching key fails with [`StoreError::Conflict`].
    async fn create_job(
        &self,
        job: Job,
        owner: &str,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<CreateOutcome>;

    /// One job, with its revision; `None` if there is none.
    async fn get_job(&self, job_id: &str) -> Result<Option<StoredJob>>;

    /// Jobs of `owner` (everyone's when `None`) in any of `states` (all
    /// when empty), newest first (descending
    /// creation order), `page_size` at a time (0 means
    /// [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`]). Paging is stable:
    /// jobs created while paging do not shift later pages. A token only
    /// works with the filter it was issued for
    /// ([`StoreError::InvalidArgument`] on `page_token` otherwise). A job
    /// that changes state while paging appears with its new state, or not at
    /// all if that state no longer passes the filter, so a page may hold
    /// fewer jobs than asked although more follow.
    async fn list_jobs(
        &self,
        owner: Option<&str>,
        states: &[JobState],
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<JobPage>;

    /// Replaces the job `job.job_id` if its revision is still
    /// `expected_revision` (compare-and-set: of two coordinators moving the
    /// same job, one gets [`StoreError::Conflict`] and re-reads), and appends
    /// `events` to its history in the same atomic step, so that a watcher
    /// never sees a state without the event that announced it. A terminal
    /// job cannot change state ([`StoreError::JobTerminal`]). Returns the job
    /// as stored, with its new revision.
    async fn update_job(
        &self,
        job: Job,
        expected_revision: u64,
        events: Vec<JobEvent>,
    ) -> Result<StoredJob>;

    /// Number of jobs in each storable state (every state present, zeros
    /// included).
    async fn count_jobs_by_state(&self) -> Result<BTreeMap<JobState, u64>>;

    /// Number of the owner's jobs that are PENDING or RUNNING (for a
    /// jobs-per-client limit).
    async fn active_jobs_of(&self, owner: &str) -> Result<u64>;

    // ----- Job events (what JobService.Watch streams) -----

    /// Appends events to a job's history and returns the sequence of the
    /// last one (the current last sequence when `events` is empty). The
    /// store assigns sequences (1, 2, ... per job), overwriting
    /// `JobEvent.sequence`; `time` is the caller's. Snapshot events are not
    /// history and are refused.
    async fn append_events(&self, job_id: &str, events: Vec<JobEvent>) -> Result<u64>;

    /// Events with a sequence above `after_sequence`, oldest first, at most
    /// `limit` (0 means no limit). If there are none, waits up to `wait` for
    /// the next one (without polling) and returns what arrived, possibly
    /// nothing. [`subscribe`] builds a stream on this.
    async fn read_events(
        &self,
        job_id: &str,
        after_sequence: u64,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<JobEvent>>;

    /// The reward-curve history: metric points of the job with a step above
    /// `after_step`, by step (then by the order they were appended), at most
    /// `limit` (0 means no limit).
    async fn metrics(
        &self,
        job_id: &str,
        after_step: u64,
        limit: usize,
    ) -> Result<Vec<MetricPoint>>;

    /// Appends one metric point as an event stamped with the store's clock;
    /// returns its sequence.
    async fn append_metric(&self, job_id: &str, point: MetricPoint) -> Result<u64> {
        let event = JobEvent {
            sequence: 0,
            time: Some(prost_types::Timestamp::from(self.now())),
            event: Some(job_event::Event::Metrics(point)),
        };
        self.append_events(job_id, vec![event]).await
    }

    // ----- Membership and leases -----

    /// Registers a member with a lease ending `lease_ttl` from now.
    /// Idempotent by `member.instance_id`: if that instance already belongs
    /// to a member whose lease is alive, returns it unchanged
    /// ([`Registration::Existing`]). An expired member of the same instance
    /// stays until it is removed; the instance then names the new member. A
    /// member id that is taken fails with [`StoreError::Conflict`].
    async fn register_member(&self, member: Member, lease_ttl: Duration) -> Result<Registration>;

    /// Replaces a member's record (its assignment, typically) if its
    /// revision is still `expected_revision`; keeps its lease and status.
    /// The role and instance id cannot change.
    async fn update_member(&self, member: Member, expected_revision: u64) -> Result<MemberRecord>;

    /// Extends a live lease to `lease_ttl` from now and, if given, stores
    /// the member's heartbeat status. [`StoreError::LeaseExpired`] if the
    /// lease has already ended or the member is unknown: a lease never comes
    /// back to life.
    async fn renew_lease(
        &self,
        member_id: &str,
        lease_ttl: Duration,
        status: Option<MemberStatus>,
    ) -> Result<MemberRecord>;

    /// One member, alive or expired; `None` if unknown.
    async fn get_member(&self, member_id: &str) -> Result<Option<MemberRecord>>;

    /// The member an instance id names, alive or expired.
    async fn member_by_instance(&self, instance_id: &str) -> Result<Option<MemberRecord>>;

    /// Members with `role` (all when `None`), alive and expired, by member id.
    async fn list_members(&self, role: Option<Role>) -> Result<Vec<MemberRecord>>;

    /// Members whose lease has ended by now and that were not removed yet:
    /// the coordinator reassigns their work, then removes them.
    async fn expired_members(&self) -> Result<Vec<MemberRecord>>;

    /// Removes a member (clean shutdown or after expiry); false if it was
    /// unknown.
    async fn remove_member(&self, member_id: &str) -> Result<bool>;

    // ----- Weight manifests -----

    /// Commits a weight version (job and version from `manifest.version`).
    /// The same version with the same sha256 again is a no-op
    /// ([`ManifestPut::AlreadyCommitted`]); with another sha256 it fails
    /// with [`StoreError::Conflict`]; a version not above every version ever
    /// committed for the job fails with [`StoreError::VersionNotMonotonic`].
    async fn put_manifest(&self, manifest: WeightManifest) -> Result<ManifestPut>;

    /// One retained version's manifest.
    async fn get_manifest(&self, job_id: &str, version: u64) -> Result<Option<WeightManifest>>;

    /// The highest retained version's manifest.
    async fn latest_manifest(&self, job_id: &str) -> Result<Option<WeightManifest>>;

    /// Every retained version's manifest, newest first.
    async fn list_manifests(&self, job_id: &str) -> Result<Vec<WeightManifest>>;

    /// Deletes a version (garbage collection); false if it was not retained.
    /// Fails with [`StoreError::Pinned`] while a reader holds a live pin on
    /// it. Deleting never lowers the bar for later versions.
    async fn delete_manifest(&self, job_id: &str, version: u64) -> Result<bool>;

    /// Pins a retained version for `holder` (a reader fetching it) until
    /// `ttl` from now, replacing the holder's earlier pin on it; returns the
    /// pin's deadline. [`StoreError::NotFound`] if the version is not
    /// retained.
    async fn pin(
        &self,
        job_id: &str,
        version: u64,
        holder: &str,
        ttl: Duration,
    ) -> Result<SystemTime>;

    /// Releases a holder's pin; false if there was none.
    async fn unpin(&self, job_id: &str, version: u64, holder: &str) -> Result<bool>;

    /// Versions with at least one live pin.
    async fn pinned_versions(&self, job_id: &str) -> Result<BTreeSet<u64>>;

    // ----- Rollout queue (one per job; one consumer group per job) -----

    /// Appends an entry unless the queue already holds `max_len`
    /// unacknowledged entries, in which case nothing is appended and the
    /// answer is [`AppendOutcome::Full`] (backpressure; entries are never
    /// trimmed).
    async fn queue_append(
        &self,
        job_id: &str,
        payload: Vec<u8>,
        max_len: u64,
    ) -> Result<AppendOutcome>;

    /// Delivers up to `count` entries that no consumer of `group` has been
    /// given yet to `consumer`, oldest first; each is delivered to exactly
    /// one consumer of the group and stays pending for it until
    /// acknowledged. If there are none, waits up to `block` (zero: not at
    /// all) for an append, without polling. Creates the group on first use,
    /// positioned at the start of the queue.
    async fn queue_read(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<QueueEntry>>;

    /// Acknowledges entries delivered to `group`: they leave the queue for
    /// good (and stop counting towards its length). Returns how many were
    /// pending; unknown or already acknowledged ids are skipped, so a
    /// caller that must know compares the count with its ids. Deliveries
    /// are durable on both backends (a restart of the store's process
    /// keeps them pending), so a consumer's own ids are never unknown.
    async fn queue_ack(&self, job_id: &str, group: &str, ids: &[EntryId]) -> Result<u64>;

    /// Moves up to `count` entries that have been pending in `group` for at
    /// least `min_idle` (delivered to a consumer that has not acknowledged
    /// them: one that crashed) to `consumer`, and returns them: how a
    /// restarted learner gets back the entries of the step it lost.
    async fn queue_claim_stale(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<QueueEntry>>;

    /// Entries in the queue: appended and not yet acknowledged (undelivered
    /// and pending).
    async fn queue_len(&self, job_id: &str) -> Result<u64>;

    /// Entries delivered to `group` and not yet acknowledged (0 for a group
    /// that does not exist yet).
    async fn queue_pending(&self, job_id: &str, group: &str) -> Result<u64>;

    /// Entries ever appended to the job's queue, acknowledged ones
    /// included (0 for a queue never appended to): with the learners'
    /// counts of what they consumed and dropped, and [`Store::queue_len`],
    /// it accounts for every entry the actors produced.
    async fn queue_appended(&self, job_id: &str) -> Result<u64>;

    // ----- Preference records (what listeners submit) and served clips -----

    /// Stores a preference record (an opaque payload) under the next
    /// sequence number, unless `(rater, key)` was stored before: a retried
    /// submission changes nothing and gets the first one's sequence back.
    async fn put_preference(&self, rater: &str, key: &str, payload: Vec<u8>) -> Result<RecordPut>;

    /// Preference records with a sequence above `after`, oldest first, at
    /// most `limit`.
    async fn list_preferences(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>>;

    /// Keeps a clip served for comparison for `ttl`, so that a submission
    /// can name it; a later put of the same id replaces it.
    async fn put_clip(&self, clip_id: &str, payload: Vec<u8>, ttl: Duration) -> Result<()>;

    /// A clip put before and not yet expired.
    async fn get_clip(&self, clip_id: &str) -> Result<Option<Vec<u8>>>;
}

/// Opens the store a URI names: `redis://host:port/db` (or `rediss://`) for
/// [`RedisStore`] with the default key prefix, `embedded://DIR` for
/// [`EmbeddedStore`] with default options.
pub async fn open(uri: &str, clock: Arc<dyn Clock>) -> Result<Arc<dyn Store>> {
    if uri.starts_with("redis://") || uri.starts_with("rediss://") {
        let store = RedisStore::connect(RedisConfig::new(uri), clock).await?;
        Ok(Arc::new(store))
    } else if let Some(dir) = uri.strip_prefix("embedded://") {
        if dir.is_empty() {
            return Err(StoreError::invalid("uri", "embedded:// needs a directory"));
        }
        // Opening replays the directory: blocking file I/O, kept off the
        // async workers.
        let dir = dir.to_owned();
        let store = tokio::task::spawn_blocking(move || {
            EmbeddedStore::open(dir, EmbeddedOptions::default(), clock)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("opening the embedded store: {e}")))??;
        Ok(Arc::new(store))
    } else {
        Err(StoreError::invalid(
            "uri",
            format!("{uri:?} is neither redis://... nor embedded://DIR"),
        ))
    }
}

/// `uri` fit for a log line: the credentials of a
/// `redis://user:password@host` URI replaced by `***`.
pub fn redacted(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => uri.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacted_hides_credentials_only() {
        use super::redacted;
        assert_eq!(
            redacted("redis://:s3cret@encore-redis:6379/0"),
            "redis://***@encore-redis:6379/0"
        );
        assert_eq!(redacted("rediss://u:p@h/1"), "rediss://***@h/1");
        assert_eq!(redacted("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redacted("embedded:///var/a@b"), "embedded:///var/a@b");
    }
}

//! The values that cross the [`Store`](crate::Store) trait besides the
//! protocol's own messages: outcomes of operations, records with the
//! bookkeeping the store keeps next to a message (revisions, owners, lease
//! deadlines), rollout-queue entry ids, and the one stored message the
//! protocol does not define ([`Member`]).

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use encore_proto::v1::{Assignment, Capabilities, Job, JobState, MemberStatus, WeightManifest};

use crate::error::{Result, StoreError};

/// Page size used when a caller asks for 0 (the protocol's `Page` default).
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size; larger requests are treated as this (as in `Page`).
pub const MAX_PAGE_SIZE: usize = 1000;

/// The idempotency key a job was submitted with, scoped to its owner: the
/// same key from two owners names two different submissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The client-chosen key (`SubmitJobRequest.idempotency_key`).
    pub key: String,
    /// sha256 (hex) of the spec as submitted, before defaults are filled in;
    /// a retry with the same key must carry the same hash.
    pub spec_sha256: String,
}

/// A job as stored, with the bookkeeping kept next to it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    /// The job message.
    pub job: Job,
    /// Compare-and-set counter: 1 at creation, +1 on every
    /// [`update_job`](crate::Store::update_job).
    pub revision: u64,
    /// Who submitted it (the client identity the coordinator chose); the
    /// scope of its idempotency key and of the per-client job limit.
    pub owner: String,
}

/// Outcome of [`create_job`](crate::Store::create_job).
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum CreateOutcome {
    /// The job was stored, together with its idempotency key.
    Created(StoredJob),
    /// The owner's idempotency key already names a job submitted with the
    /// same spec: that job, unchanged (a safe retry).
    Existing(StoredJob),
    /// The owner's idempotency key names a job submitted with another spec;
    /// nothing was stored (the protocol's IDEMPOTENCY_KEY_REUSED).
    KeyReused {
        /// The job that owns the key.
        job_id: String,
    },
}

/// One page of [`list_jobs`](crate::Store::list_jobs).
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    /// The jobs, newest first (descending creation order).
    pub jobs: Vec<StoredJob>,
    /// Token for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// A cluster member as stored: what it registered with and the work it is
/// assigned. The protocol has no message for this (it is the coordinator's
/// own record), so it is defined here as a prost message, which keeps both
/// backends storing the same bytes. Heartbeat status and the lease deadline
/// change on every heartbeat and are kept beside it (see [`MemberRecord`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Member {
    /// Coordinator-assigned member id.
    #[prost(string, tag = "1")]
    pub member_id: String,
    /// The member's role (`encore.v1.Role`).
    #[prost(enumeration = "encore_proto::v1::Role", tag = "2")]
    pub role: i32,
    /// The process incarnation that registered (`RegisterRequest.instance_id`);
    /// registering again with it while the lease lives returns this member.
    #[prost(string, tag = "3")]
    pub instance_id: String,
    /// What the member offers.
    #[prost(message, optional, tag = "4")]
    pub capabilities: Option<Capabilities>,
    /// The member's current assignment (its generation grows with every
    /// change); unset before the first.
    #[prost(message, optional, tag = "5")]
    pub assignment: Option<Assignment>,
    /// When the member registered.
    #[prost(message, optional, tag = "6")]
    pub register_time: Option<prost_types::Timestamp>,
    /// SHA-256 of the secret in the member's bearer token (the token itself
    /// is never stored); empty for a member registered before tokens were
    /// issued, which then has to register again.
    #[prost(bytes = "vec", tag = "7")]
    pub token_sha256: Vec<u8>,
}

/// A member with its liveness.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRecord {
    /// Registration and assignment.
    pub member: Member,
    /// What the member reported in its last heartbeat; `None` before the
    /// first.
    pub status: Option<MemberStatus>,
    /// Compare-and-set counter of `member` (not bumped by heartbeats): 1 at
    /// registration, +1 on every [`update_member`](crate::Store::update_member).
    pub revision: u64,
    /// The lease ends at this time unless renewed.
    pub lease_deadline: SystemTime,
}

impl MemberRecord {
    /// Whether the lease is still alive at `now` (a lease is dead from its
    /// deadline on).
    pub fn is_alive(&self, now: SystemTime) -> bool {
        now < self.lease_deadline
    }
}

/// Outcome of [`register_member`](crate::Store::register_member).
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum Registration {
    /// A new member was stored with a fresh lease.
    Registered(MemberRecord),
    /// The instance id already belongs to a member whose lease is alive:
    /// that member, unchanged (a retried Register).
    Existing(MemberRecord),
}

/// Outcome of [`put_manifest`](crate::Store::put_manifest).
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum ManifestPut {
    /// The version was committed; the manifest as stored.
    Committed(WeightManifest),
    /// The version was already committed with the same sha256: the manifest
    /// stored the first time (a safe retry; nothing changed).
    AlreadyCommitted(WeightManifest),
}

/// Id of a rollout-queue entry, `<milliseconds>-<sequence>` as Redis Streams
/// write it; ids grow strictly in append order within a job's queue (also
/// across restarts and after every entry was acknowledged), so a learner can
/// record a queue position in its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    /// Milliseconds part (append time, never decreasing).
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl EntryId {
    /// The id that follows `self` for an append at `now_ms` (Redis' rule:
    /// the time part never goes backwards).
    pub(crate) fn next(self, now_ms: u64) -> Self {
        if now_ms > self.ms {
            Self { ms: now_ms, seq: 0 }
        } else {
            Self {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || StoreError::invalid("entry_id", format!("{s:?} is not <ms>-<seq>"));
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// One entry of a rollout queue: an encoded `ScoredBatch` and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    /// The entry's id; acknowledge it with
    /// [`queue_ack`](crate::Store::queue_ack) once the learner step that used
    /// it is checkpointed.
    pub id: EntryId,
    /// The bytes appended (an encoded `ScoredBatch`; the store does not look
    /// inside).
    pub payload: Vec<u8>,
}

/// Outcome of [`queue_append`](crate::Store::queue_append).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum AppendOutcome {
    /// The entry was appended under this id.
    Appended(EntryId),
    /// The queue already holds `max_len` unacknowledged entries; nothing was
    /// appended. The backpressure signal: the actor waits and retries.
    Full {
        /// Entries in the queue (appended and not yet acknowledged).
        len: u64,
    },
}

/// Outcome of [`put_preference`](crate::Store::put_preference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum RecordPut {
    /// Stored under this sequence number.
    Stored(u64),
    /// The same rater and key were stored before, under this sequence
    /// number; nothing changed.
    Duplicate(u64),
}

/// Clamps a requested page size to `1..=MAX_PAGE_SIZE`, 0 meaning the
/// default, as the protocol's `Page` does.
pub(crate) fn effective_page_size(requested: usize) -> usize {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// Bit mask of a state filter (bit n for state value n); 0 for "any state".
fn filter_mask(filter: &[JobState]) -> u32 {
    filter
        .iter()
        .fold(0u32, |mask, state| mask | 1u32 << ((*state as i32) & 31))
}

/// Whether `state` passes `filter` (an empty filter passes everything).
pub(crate) fn state_matches(filter: &[JobState], state: i32) -> bool {
    filter.is_empty() || filter.iter().any(|s| *s as i32 == state)
}

/// Encodes a job page token: the creation sequence of the last job returned
/// and the filter it was issued for. Both backends list by creation
/// sequence, so the same token format serves both.
pub(crate) fn encode_page_token(last_seq: u64, filter: &[JobState]) -> String {
    format!("{last_seq}.{:x}", filter_mask(filter))
}

/// Decodes a page token: the creation sequence to continue below, `None` for
/// the first page.
pub(crate) fn decode_page_token(token: Option<&str>, filter: &[JobState]) -> Result<Option<u64>> {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let bad = |why: &str| StoreError::invalid("page_token", format!("{token:?} {why}"));
    let (seq, mask) = token.split_once('.').ok_or_else(|| bad("is malformed"))?;
    let seq: u64 = seq.parse().map_err(|_| bad("is malformed"))?;
    let mask = u32::from_str_radix(mask, 16).map_err(|_| bad("is malformed"))?;
    if mask != filter_mask(filter) {
        return Err(bad("was issued for a different state filter"));
    }
    Ok(Some(seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_round_trip_and_order_like_redis() {
        let id: EntryId = "1700000000000-7".parse().unwrap();
        assert_eq!(id.to_string(), "1700000000000-7");
        assert!(EntryId { ms: 5, seq: 9 } < EntryId { ms: 6, seq: 0 });
        assert_eq!(
            EntryId { ms: 5, seq: 9 }.next(5),
            EntryId { ms: 5, seq: 10 }
        );
        assert_eq!(
            EntryId { ms: 5, seq: 9 }.next(3),
            EntryId { ms: 5, seq: 10 }
        );
        assert_eq!(EntryId { ms: 5, seq: 9 }.next(8), EntryId { ms: 8, seq: 0 });
        assert!("17-".parse::<EntryId>().is_err());
        assert!("x-1".parse::<EntryId>().is_err());
    }

    #[test]
    fn page_tokens_are_bound_to_their_filter() {
        let running = [JobState::Running];
        let token = encode_page_token(42, &running);
        assert_eq!(decode_page_token(Some(&token), &running).unwrap(), Some(42));
        assert_eq!(decode_page_token(None, &running).unwrap(), None);
        assert_eq!(decode_page_token(Some(""), &running).unwrap(), None);
        assert!(matches!(
            decode_page_token(Some(&token), &[]),
            Err(StoreError::InvalidArgument {
                field: "page_token",
                ..
            })
        ));
        assert!(decode_page_token(Some("garbage"), &running).is_err());
    }

    #[test]
    fn page_sizes_follow_the_protocol() {
        assert_eq!(effective_page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(effective_page_size(7), 7);
        assert_eq!(effective_page_size(5000), MAX_PAGE_SIZE);
    }
}

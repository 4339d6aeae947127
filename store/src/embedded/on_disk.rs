//! What the embedded store writes to disk: prost messages private to this
//! crate. A write-ahead-log record and a snapshot are both a [`Batch`] of
//! [`Op`]s; an op is the resulting row of a change ("the job is now this"),
//! never a command to re-run, so applying the ops of the snapshot and then
//! of the newer log records in order rebuilds the state exactly, and the
//! same `apply` serves live mutations and recovery.
//!
//! Protocol messages are embedded as they are (`Job`, `JobEvent`,
//! `WeightManifest`, ...), so the bytes on disk are the same encoding the
//! Redis backend stores.

use encore_proto::v1::{Job, JobEvent, MemberStatus, WeightManifest};

use crate::types::Member;

/// A group of ops applied atomically: one log record (one store call), or a
/// whole snapshot.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Batch {
    /// Log sequence number: of the record, or for a snapshot of the last
    /// record it includes (records up to it are skipped on recovery).
    #[prost(uint64, tag = "1")]
    pub lsn: u64,
    /// The changes, in order.
    #[prost(message, repeated, tag = "2")]
    pub ops: Vec<Op>,
}

/// One change.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Op {
    /// Which change; an op of an unknown kind fails recovery (it was written
    /// by a newer version).
    #[prost(
        oneof = "op::Kind",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15"
    )]
    pub kind: Option<op::Kind>,
}

/// The kinds of [`Op`].
pub(crate) mod op {
    /// One change.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub(crate) enum Kind {
        /// A job was created or replaced.
        #[prost(message, tag = "1")]
        PutJob(super::JobRow),
        /// An event was appended to a job's history.
        #[prost(message, tag = "2")]
        AppendEvent(super::EventRow),
        /// A member was registered, updated or renewed.
        #[prost(message, tag = "3")]
        PutMember(super::MemberRow),
        /// A member was removed.
        #[prost(message, tag = "4")]
        RemoveMember(super::MemberKey),
        /// A weight version was committed.
        #[prost(message, tag = "5")]
        PutManifest(super::ManifestRow),
        /// A weight version was garbage-collected.
        #[prost(message, tag = "6")]
        DeleteManifest(super::ManifestKey),
        /// The highest version ever committed for a job (snapshots only:
        /// it survives the deletion of that version).
        #[prost(message, tag = "7")]
        ManifestHighWater(super::ManifestKey),
        /// A fetch pin was set or extended.
        #[prost(message, tag = "8")]
        Pin(super::PinRow),
        /// A fetch pin was released.
        #[prost(message, tag = "9")]
        Unpin(super::PinRow),
        /// An entry was appended to a rollout queue.
        #[prost(message, tag = "10")]
        QueueAppend(super::QueueRow),
        /// Entries were acknowledged (and leave the queue).
        #[prost(message, tag = "11")]
        QueueAck(super::QueueAckRow),
        /// The last id a queue handed out (snapshots only: ids keep growing
        /// after every entry was acknowledged).
        #[prost(message, tag = "12")]
        QueueLastId(super::QueueRow),
        /// A preference record was stored.
        #[prost(message, tag = "13")]
        PutPreference(super::PreferenceRow),
        /// A clip was kept for comparison.
        #[prost(message, tag = "14")]
        PutClip(super::ClipRow),
        /// Entries of a queue were delivered to a consumer of a group, or
        /// claimed by one; or (without ids) how far a group has read.
        #[prost(message, tag = "15")]
        QueueDeliver(super::QueueDeliverRow),
    }
}

/// A job and its bookkeeping.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct JobRow {
    /// The job.
    #[prost(message, optional, tag = "1")]
    pub job: Option<Job>,
    /// Compare-and-set revision.
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    /// Creation sequence (list order).
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    /// The submitting client.
    #[prost(string, tag = "4")]
    pub owner: String,
    /// The owner's idempotency key; empty if none.
    #[prost(string, tag = "5")]
    pub idempotency_key: String,
    /// sha256 of the spec as submitted under that key.
    #[prost(string, tag = "6")]
    pub spec_sha256: String,
}

/// One event of a job's history (its sequence is inside).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct EventRow {
    /// The job.
    #[prost(string, tag = "1")]
    pub job_id: String,
    /// The event, with its sequence.
    #[prost(message, optional, tag = "2")]
    pub event: Option<JobEvent>,
}

/// A member and its liveness.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MemberRow {
    /// Registration and assignment.
    #[prost(message, optional, tag = "1")]
    pub member: Option<Member>,
    /// Last heartbeat status.
    #[prost(message, optional, tag = "2")]
    pub status: Option<MemberStatus>,
    /// Compare-and-set revision.
    #[prost(uint64, tag = "3")]
    pub revision: u64,
    /// Lease deadline, milliseconds since the Unix epoch.
    #[prost(uint64, tag = "4")]
    pub lease_deadline_ms: u64,
    /// Whether this row is a registration, which makes the member's instance
    /// id name it (updates of an old member of the same instance must not).
    #[prost(bool, tag = "5")]
    pub claims_instance: bool,
}

/// A member id.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MemberKey {
    /// The member.
    #[prost(string, tag = "1")]
    pub member_id: String,
}

/// A committed weight version.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ManifestRow {
    /// The manifest (job and version inside).
    #[prost(message, optional, tag = "1")]
    pub manifest: Option<WeightManifest>,
}

/// A job's weight version.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ManifestKey {
    /// The job.
    #[prost(string, tag = "1")]
    pub job_id: String,
    /// The version.
    #[prost(uint64, tag = "2")]
    pub version: u64,
}

/// A fetch pin.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PinRow {
    /// The job.
    #[prost(string, tag = "1")]
    pub job_id: String,
    /// The pinned version.
    #[prost(uint64, tag = "2")]
    pub version: u64,
    /// Who holds the pin.
    #[prost(string, tag = "3")]
    pub holder: String,
    /// When it lapses, milliseconds since the Unix epoch (unused by Unpin).
    #[prost(uint64, tag = "4")]
    pub deadline_ms: u64,
}

/// A queue entry (or, for QueueLastId, only its id and the count of
/// entries ever appended).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct QueueRow {
    /// The job whose queue it is.
    #[prost(string, tag = "1")]
    pub job_id: String,
    /// Entry id, milliseconds part.
    #[prost(uint64, tag = "2")]
    pub id_ms: u64,
    /// Entry id, sequence part.
    #[prost(uint64, tag = "3")]
    pub id_seq: u64,
    /// The entry's bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub payload: Vec<u8>,
    /// QueueLastId only: entries ever appended to the queue, acknowledged
    /// ones included.
    #[prost(uint64, tag = "5")]
    pub appended: u64,
}

/// Acknowledged entries of a queue.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct QueueAckRow {
    /// The job whose queue it is.
    #[prost(string, tag = "1")]
    pub job_id: String,
    /// Entry ids, milliseconds parts.
    #[prost(uint64, repeated, tag = "2")]
    pub id_ms: Vec<u64>,
    /// Entry ids, sequence parts (same length as `id_ms`).
    #[prost(uint64, repeated, tag = "3")]
    pub id_seq: Vec<u64>,
}

/// Entries delivered to (or claimed by) one consumer of a queue's group,
/// and how far the group has read: the consumer-group state a restarted
/// store must keep, as Redis keeps a stream's pending entries list.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct QueueDeliverRow {
    /// The job whose queue it is.
    #[prost(string, tag = "1")]
    pub job_id: String,
    /// The consumer group.
    #[prost(string, tag = "2")]
    pub group: String,
    /// The consumer now holding the entries.
    #[prost(string, tag = "3")]
    pub consumer: String,
    /// When they were delivered, milliseconds since the Unix epoch.
    #[prost(uint64, tag = "4")]
    pub delivered_ms: u64,
    /// Entry ids, milliseconds parts.
    #[prost(uint64, repeated, tag = "5")]
    pub id_ms: Vec<u64>,
    /// Entry ids, sequence parts (same length as `id_ms`).
    #[prost(uint64, repeated, tag = "6")]
    pub id_seq: Vec<u64>,
    /// The group has read every entry up to this id (milliseconds part);
    /// it never moves back.
    #[prost(uint64, tag = "7")]
    pub last_delivered_ms: u64,
    /// The same id's sequence part.
    #[prost(uint64, tag = "8")]
    pub last_delivered_seq: u64,
}

/// A stored preference record.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PreferenceRow {
    /// Its sequence number.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Who submitted it.
    #[prost(string, tag = "2")]
    pub rater: String,
    /// The submission's client key.
    #[prost(string, tag = "3")]
    pub key: String,
    /// The record.
    #[prost(bytes = "vec", tag = "4")]
    pub payload: Vec<u8>,
}

/// A clip kept for comparison until `expires_ms`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ClipRow {
    /// The clip's id.
    #[prost(string, tag = "1")]
    pub clip_id: String,
    /// The clip.
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    /// When it is forgotten, in ms since the epoch.
    #[prost(uint64, tag = "3")]
    pub expires_ms: u64,
}

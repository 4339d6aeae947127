//! The embedded backend: the whole state in this process's memory, every
//! change made durable in a local directory before the call that made it
//! returns. The default on one machine (`encore` running every role in one
//! process, the quick start), where actors, learners and the coordinator
//! share one `Arc<EmbeddedStore>`.
//!
//! A mutation runs in three steps: under the state lock it is validated and
//! turned into ops (the resulting rows, see [`on_disk`]); the ops are
//! queued to the log writer and applied to memory, still under the lock, so
//! log order is apply order; then, with the lock released, the call waits
//! until the writer reports the record durable. Reads only take the lock.
//! Blocking reads (queue entries, job events) wait on a per-job
//! [`Notify`](tokio::sync::Notify), never on a timer loop.
//!
//! Files and recovery are described in [`log`]; `docs/store.md` has the
//! reasoning.

mod log;
mod on_disk;
mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use encore_proto::v1::{
    Job, JobEvent, JobState, MemberStatus, MetricPoint, Role, WeightManifest, job_event,
};
use prost::Message;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use self::log::Durability;
use self::log::{Ack, LogWriter};
use self::on_disk::{
    Batch, ClipRow, EventRow, ManifestKey, ManifestRow, MemberKey, Op, PinRow, PreferenceRow,
    QueueAckRow, QueueDeliverRow, QueueRow, op::Kind,
};
use self::state::{JobEntry, MemberEntry, State};
use crate::Store;
use crate::clock::{Clock, from_millis, millis};
use crate::error::{Result, StoreError};
use crate::types::{
    AppendOutcome, CreateOutcome, EntryId, IdempotencyKey, JobPage, ManifestPut, Member,
    MemberRecord, QueueEntry, RecordPut, Registration, StoredJob, decode_page_token,
    effective_page_size, encode_page_token, state_matches,
};
use crate::validate::{
    STORABLE_STATES, check_member_identity, check_same_manifest, check_transition, is_active,
    job_state, manifest_identity, require_non_empty, validate_events, validate_job,
    validate_member, validate_queue_args, version_id,
};

/// Tuning of an [`EmbeddedStore`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How hard each write is pushed to the disk before a mutation returns.
    pub durability: Durability,
    /// Write a snapshot and empty the log once the log has grown by this
    /// many bytes since the last snapshot (one is also written on open).
    pub compact_after_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Fsync,
            compact_after_bytes: 64 << 20,
        }
    }
}

/// The in-process store, persisted to a directory. See the module docs.
pub struct EmbeddedStore {
    dir: PathBuf,
    clock: Arc<dyn Clock>,
    options: EmbeddedOptions,
    shared: Mutex<Shared>,
    event_waiters: Waiters,
    queue_waiters: Waiters,
    // Dropped in declaration order: the writer finishes and releases the
    // log before the directory lock is released.
    writer: LogWriter,
    _lock: File,
}

/// What the state lock guards.
struct Shared {
    state: State,
    /// LSN of the last record handed to the writer.
    lsn: u64,
    /// Log bytes written since the last snapshot.
    wal_bytes: u64,
    /// Set when a write failed: memory may hold changes the disk does not,
    /// so the store refuses every further call until it is reopened.
    failed: Option<String>,
}

/// Per-job wake-ups for blocking reads.
#[derive(Default)]
struct Waiters(Mutex<HashMap<String, Arc<Notify>>>);

impl Waiters {
    fn get(&self, job_id: &str) -> Arc<Notify> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(job_id.to_owned()).or_default().clone()
    }

    /// Calls waiting on this job right now (each holds a clone while it
    /// waits).
    fn waiting(&self, job_id: &str) -> usize {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(job_id)
            .map_or(0, |notify| Arc::strong_count(notify).saturating_sub(1))
    }

    fn wake(&self, job_id: &str) {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = map.get(job_id) {
            notify.notify_waiters();
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.dir)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn op(kind: Kind) -> Op {
    Op { kind: Some(kind) }
}

fn stored(entry: &JobEntry) -> StoredJob {
    StoredJob {
        job: entry.job.clone(),
        revision: entry.revision,
        owner: entry.owner.clone(),
    }
}

fn record(entry: &MemberEntry) -> MemberRecord {
    MemberRecord {
        member: entry.member.clone(),
        status: entry.status.clone(),
        revision: entry.revision,
        lease_deadline: from_millis(entry.deadline_ms),
    }
}

fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`: takes the directory
    /// lock, replays the snapshot and the log, writes a fresh snapshot, and
    /// starts the log writer. Blocks on file I/O; call it at start-up.
    pub fn open(
        dir: impl AsRef<Path>,
        options: EmbeddedOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        let lock = log::lock_dir(&dir)?;
        let recovered = log::recover(&dir)?;
        let mut state = State::default();
        let mut lsn = 0;
        for batch in recovered.snapshot.into_iter().chain(recovered.records) {
            lsn = batch.lsn;
            for op in batch.ops {
                state.apply(op);
            }
        }
        let snapshot = state.dump(lsn, millis(clock.now())).encode_to_vec();
        let writer = LogWriter::start(&dir, &snapshot, options.durability)?;
        Ok(Self {
            dir,
            clock,
            options,
            shared: Mutex::new(Shared {
                state,
                lsn,
                wal_bytes: 0,
                failed: None,
            }),
            event_waiters: Waiters::default(),
            queue_waiters: Waiters::default(),
            writer,
            _lock: lock,
        })
    }

    /// Blocking reads (of the job's queue or events) waiting right now; for
    /// diagnostics and for tests that must act while a reader waits.
    pub fn blocked_readers(&self, job_id: &str) -> usize {
        self.event_waiters.waiting(job_id) + self.queue_waiters.waiting(job_id)
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<MutexGuard<'_, Shared>> {
        let shared = self
            .shared
            .lock()
            .map_err(|_| StoreError::Backend("embedded store state poisoned by a panic".into()))?;
        if let Some(why) = &shared.failed {
            return Err(StoreError::io(
                &self.dir,
                std::io::Error::other(format!(
                    "the store stopped after a failed write ({why}); reopen it"
                )),
            ));
        }
        Ok(shared)
    }

    /// Runs a read under the state lock.
    fn read<T>(&self, f: impl FnOnce(&State) -> Result<T>) -> Result<T> {
        f(&self.lock()?.state)
    }

    /// Runs a mutation: `f` validates against the current state (given the
    /// clock's time in ms) and returns the answer and the ops that make the
    /// change; the ops are logged and applied, and the call returns once
    /// they are durable.
    async fn commit<T>(&self, f: impl FnOnce(&State, u64) -> Result<(T, Vec<Op>)>) -> Result<T> {
        let (value, acks) = {
            let mut shared = self.lock()?;
            let now_ms = millis(self.clock.now());
            let (value, ops) = f(&shared.state, now_ms)?;
            (value, self.log(&mut shared, ops, now_ms))
        };
        self.wait_all_durable(acks).await?;
        Ok(value)
    }

    /// Under the state lock: hands `ops` (if any) to the log writer as one
    /// record, applies them, and queues a snapshot when the log has grown
    /// enough. The returned acks resolve once all of it is durable.
    fn log(&self, shared: &mut Shared, ops: Vec<Op>, now_ms: u64) -> Vec<Ack> {
        if ops.is_empty() {
            return Vec::new();
        }
        shared.lsn += 1;
        let batch = Batch {
            lsn: shared.lsn,
            ops,
        };
        let bytes = batch.encode_to_vec();
        shared.wal_bytes += bytes.len() as u64;
        let mut acks = vec![self.writer.append(bytes)];
        for op in batch.ops {
            shared.state.apply(op);
        }
        if shared.wal_bytes >= self.options.compact_after_bytes {
            let snapshot = shared.state.dump(shared.lsn, now_ms).encode_to_vec();
            acks.push(self.writer.snapshot(snapshot));
            shared.wal_bytes = 0;
        }
        acks
    }

    async fn wait_all_durable(&self, acks: Vec<Ack>) -> Result<()> {
        for ack in acks {
            self.wait_durable(ack).await?;
        }
        Ok(())
    }

    async fn wait_durable(&self, ack: Ack) -> Result<()> {
        let err = match ack.await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => err,
            Err(_) => std::io::Error::other("the log writer thread is gone"),
        };
        if let Ok(mut shared) = self.shared.lock() {
            shared.failed.get_or_insert_with(|| err.to_string());
        }
        Err(StoreError::io(&self.dir, err))
    }

    /// Waits on `notify` until `check` returns something non-empty or
    /// `wait` has passed; the wake-up is armed before each check, so an
    /// append between the check and the wait is not missed.
    async fn wait_for<T>(
        &self,
        notify: Arc<Notify>,
        wait: Duration,
        mut check: impl FnMut() -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found = check()?;
            if !found.is_empty() || Instant::now() >= deadline {
                return Ok(found);
            }
            // On timeout the loop checks once more and returns.
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

/// The op that makes `ids` pending with `consumer` of `group` since
/// `now_ms` (none if there are no ids).
fn deliver_ops(job_id: &str, group: &str, consumer: &str, now_ms: u64, ids: &[EntryId]) -> Vec<Op> {
    if ids.is_empty() {
        return Vec::new();
    }
    vec![op(Kind::QueueDeliver(QueueDeliverRow {
        job_id: job_id.to_owned(),
        group: group.to_owned(),
        consumer: consumer.to_owned(),
        delivered_ms: now_ms,
        id_ms: ids.iter().map(|id| id.ms).collect(),
        id_seq: ids.iter().map(|id| id.seq).collect(),
        last_delivered_ms: 0,
        last_delivered_seq: 0,
    }))]
}

fn job_exists(state: &State, job_id: &str) -> Result<()> {
    if state.jobs.contains_key(job_id) {
        Ok(())
    } else {
        Err(StoreError::not_found("job", job_id))
    }
}

/// Ops appending `events` after the job's last sequence; the last sequence
/// after them.
fn event_ops(state: &State, job_id: &str, events: Vec<JobEvent>) -> (u64, Vec<Op>) {
    let mut sequence = state.last_event_sequence(job_id);
    let ops = events
        .into_iter()
        .map(|mut event| {
            sequence += 1;
            event.sequence = sequence;
            op(Kind::AppendEvent(EventRow {
                job_id: job_id.to_owned(),
                event: Some(event),
            }))
        })
        .collect();
    (sequence, ops)
}

#[async_trait]
impl Store for EmbeddedStore {
    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    async fn create_job(
        &self,
        job: Job,
        owner: &str,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<CreateOutcome> {
        validate_job(&job)?;
        require_non_empty("owner", owner)?;
        if let Some(key) = &idempotency {
            require_non_empty("idempotency.key", &key.key)?;
        }
        self.commit(|state, _| {
            if let Some(key) = &idempotency
                && let Some(job_id) = state.idempotency.get(&(owner.to_owned(), key.key.clone()))
            {
                let entry = state.jobs.get(job_id).ok_or_else(|| {
                    StoreError::Backend(format!(
                        "idempotency key {:?} names job {job_id:?}, which is missing",
                        key.key
                    ))
                })?;
                let outcome = if entry.spec_sha256 == key.spec_sha256 {
                    CreateOutcome::Existing(stored(entry))
                } else {
                    CreateOutcome::KeyReused {
                        job_id: job_id.clone(),
                    }
                };
                return Ok((outcome, Vec::new()));
            }
            if state.jobs.contains_key(&job.job_id) {
                return Err(StoreError::Conflict {
                    kind: "job",
                    id: job.job_id.clone(),
                    message: "the job id is taken".into(),
                });
            }
            let (key, sha) = idempotency.map(|k| (k.key, k.spec_sha256)).unzip();
            let entry = JobEntry {
                job,
                revision: 1,
                seq: state.next_job_seq.max(1),
                owner: owner.to_owned(),
                idempotency_key: key.unwrap_or_default(),
                spec_sha256: sha.unwrap_or_default(),
            };
            let outcome = CreateOutcome::Created(stored(&entry));
            Ok((outcome, vec![op(Kind::PutJob(entry.row()))]))
        })
        .await
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<StoredJob>> {
        self.read(|state| Ok(state.jobs.get(job_id).map(stored)))
    }

    async fn list_jobs(
        &self,
        owner: Option<&str>,
        states: &[JobState],
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<JobPage> {
        let below = decode_page_token(page_token, states)?.unwrap_or(u64::MAX);
        let size = effective_page_size(page_size);
        self.read(|state| {
            let mut jobs = Vec::new();
            let mut last_seq = 0;
            let mut next_page_token = None;
            for (seq, job_id) in state.jobs_by_seq.range(..below).rev() {
                let Some(entry) = state.jobs.get(job_id) else {
                    continue;
                };
                if !state_matches(states, entry.job.state)
                    || owner.is_some_and(|o| o != entry.owner)
                {
                    continue;
                }
                if jobs.len() == size {
                    next_page_token = Some(encode_page_token(last_seq, states));
                    break;
                }
                jobs.push(stored(entry));
                last_seq = *seq;
            }
            Ok(JobPage {
                jobs,
                next_page_token,
            })
        })
    }

    async fn update_job(
        &self,
        job: Job,
        expected_revision: u64,
        events: Vec<JobEvent>,
    ) -> Result<StoredJob> {
        validate_job(&job)?;
        validate_events(&events)?;
        let job_id = job.job_id.clone();
        let has_events = !events.is_empty();
        let updated = self
            .commit(|state, _| {
                let current = state
                    .jobs
                    .get(&job_id)
                    .ok_or_else(|| StoreError::not_found("job", &job_id))?;
                if current.revision != expected_revision {
                    return Err(StoreError::Conflict {
                        kind: "job",
                        id: job_id.clone(),
                        message: format!(
                            "expected revision {expected_revision}, found {}",
                            current.revision
                        ),
                    });
                }
                check_transition(&job_id, current.job.state, job.state)?;
                let entry = JobEntry {
                    job,
                    revision: current.revision + 1,
                    ..current.clone()
                };
                let mut ops = vec![op(Kind::PutJob(entry.row()))];
                ops.extend(event_ops(state, &job_id, events).1);
                Ok((stored(&entry), ops))
            })
            .await?;
        if has_events {
            self.event_waiters.wake(&job_id);
        }
        Ok(updated)
    }

    async fn count_jobs_by_state(&self) -> Result<BTreeMap<JobState, u64>> {
        self.read(|state| {
            let mut counts: BTreeMap<JobState, u64> =
                STORABLE_STATES.iter().map(|s| (*s, 0)).collect();
            for entry in state.jobs.values() {
                *counts.entry(job_state(entry.job.state)).or_default() += 1;
            }
            Ok(counts)
        })
    }

    async fn active_jobs_of(&self, owner: &str) -> Result<u64> {
        self.read(|state| {
            Ok(state
                .jobs
                .values()
                .filter(|e| e.owner == owner && is_active(e.job.state))
                .count() as u64)
        })
    }

    async fn append_events(&self, job_id: &str, events: Vec<JobEvent>) -> Result<u64> {
        validate_events(&events)?;
        let has_events = !events.is_empty();
        let last = self
            .commit(|state, _| {
                job_exists(state, job_id)?;
                Ok(event_ops(state, job_id, events))
            })
            .await?;
        if has_events {
            self.event_waiters.wake(job_id);
        }
        Ok(last)
    }

    async fn read_events(
        &self,
        job_id: &str,
        after_sequence: u64,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<JobEvent>> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let notify = self.event_waiters.get(job_id);
        self.wait_for(notify, wait, || {
            self.read(|state| {
                job_exists(state, job_id)?;
                let events = state.events.get(job_id).map_or(&[][..], Vec::as_slice);
                let start = usize::try_from(after_sequence)
                    .unwrap_or(usize::MAX)
                    .min(events.len());
                Ok(events[start..].iter().take(limit).cloned().collect())
            })
        })
        .await
    }

    async fn metrics(
        &self,
        job_id: &str,
        after_step: u64,
        limit: usize,
    ) -> Result<Vec<MetricPoint>> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        self.read(|state| {
            job_exists(state, job_id)?;
            let (Some(index), Some(events), Some(first)) = (
                state.metric_index.get(job_id),
                state.events.get(job_id),
                after_step.checked_add(1),
            ) else {
                return Ok(Vec::new());
            };
            Ok(index
                .range((first, 0)..)
                .filter_map(|(_, sequence)| {
                    let event = events.get(usize::try_from(*sequence).ok()?.checked_sub(1)?)?;
                    match &event.event {
                        Some(job_event::Event::Metrics(point)) => Some(point.clone()),
                        _ => None,
                    }
                })
                .take(limit)
                .collect())
        })
    }

    async fn register_member(&self, member: Member, lease_ttl: Duration) -> Result<Registration> {
        validate_member(&member)?;
        self.commit(|state, now_ms| {
            if let Some(existing) = state
                .instances
                .get(&member.instance_id)
                .and_then(|id| state.members.get(id))
                .filter(|e| e.deadline_ms > now_ms)
            {
                return Ok((Registration::Existing(record(existing)), Vec::new()));
            }
            if state.members.contains_key(&member.member_id) {
                return Err(StoreError::Conflict {
                    kind: "member",
                    id: member.member_id.clone(),
                    message: "the member id is taken".into(),
                });
            }
            let entry = MemberEntry {
                member,
                status: None,
                revision: 1,
                deadline_ms: now_ms.saturating_add(ttl_millis(lease_ttl)),
            };
            let row = entry.row(true);
            Ok((
                Registration::Registered(record(&entry)),
                vec![op(Kind::PutMember(row))],
            ))
        })
        .await
    }

    async fn update_member(&self, member: Member, expected_revision: u64) -> Result<MemberRecord> {
        validate_member(&member)?;
        self.commit(|state, _| {
            let current = state
                .members
                .get(&member.member_id)
                .ok_or_else(|| StoreError::not_found("member", &member.member_id))?;
            if current.revision != expected_revision {
                return Err(StoreError::Conflict {
                    kind: "member",
                    id: member.member_id.clone(),
                    message: format!(
                        "expected revision {expected_revision}, found {}",
                        current.revision
                    ),
                });
            }
            check_member_identity(&current.member, &member)?;
            let entry = MemberEntry {
                member,
                revision: current.revision + 1,
                ..current.clone()
            };
            Ok((record(&entry), vec![op(Kind::PutMember(entry.row(false)))]))
        })
        .await
    }

    async fn renew_lease(
        &self,
        member_id: &str,
        lease_ttl: Duration,
        status: Option<MemberStatus>,
    ) -> Result<MemberRecord> {
        self.commit(|state, now_ms| {
            let current = state
                .members
                .get(member_id)
                .filter(|e| e.deadline_ms > now_ms)
                .ok_or_else(|| StoreError::LeaseExpired {
                    member_id: member_id.to_owned(),
                })?;
            let mut entry = current.clone();
            entry.deadline_ms = now_ms.saturating_add(ttl_millis(lease_ttl));
            if status.is_some() {
                entry.status = status;
            }
            Ok((record(&entry), vec![op(Kind::PutMember(entry.row(false)))]))
        })
        .await
    }

    async fn get_member(&self, member_id: &str) -> Result<Option<MemberRecord>> {
        self.read(|state| Ok(state.members.get(member_id).map(record)))
    }

    async fn member_by_instance(&self, instance_id: &str) -> Result<Option<MemberRecord>> {
        self.read(|state| {
            Ok(state
                .instances
                .get(instance_id)
                .and_then(|id| state.members.get(id))
                .map(record))
        })
    }

    async fn list_members(&self, role: Option<Role>) -> Result<Vec<MemberRecord>> {
        self.read(|state| {
            let mut members: Vec<MemberRecord> = state
                .members
                .values()
                .filter(|e| role.is_none_or(|r| e.member.role == r as i32))
                .map(record)
                .collect();
            members.sort_by(|a, b| a.member.member_id.cmp(&b.member.member_id));
            Ok(members)
        })
    }

    async fn expired_members(&self) -> Result<Vec<MemberRecord>> {
        let now_ms = millis(self.clock.now());
        self.read(|state| {
            let mut members: Vec<MemberRecord> = state
                .members
                .values()
                .filter(|e| e.deadline_ms <= now_ms)
                .map(record)
                .collect();
            members.sort_by(|a, b| a.member.member_id.cmp(&b.member.member_id));
            Ok(members)
        })
    }

    async fn remove_member(&self, member_id: &str) -> Result<bool> {
        self.commit(|state, _| {
            if !state.members.contains_key(member_id) {
                return Ok((false, Vec::new()));
            }
            let key = MemberKey {
                member_id: member_id.to_owned(),
            };
            Ok((true, vec![op(Kind::RemoveMember(key))]))
        })
        .await
    }

    async fn put_manifest(&self, manifest: WeightManifest) -> Result<ManifestPut> {
        let (job_id, version, sha) = manifest_identity(&manifest)?;
        self.commit(|state, _| {
            let job = state.manifests.get(&job_id);
            if let Some(existing) = job.and_then(|j| j.versions.get(&version)) {
                return check_same_manifest(existing, &job_id, version, &sha)
                    .map(|()| (ManifestPut::AlreadyCommitted(existing.clone()), Vec::new()));
            }
            if let Some(latest) = job.and_then(|j| j.high_water)
                && version <= latest
            {
                return Err(StoreError::VersionNotMonotonic {
                    job_id,
                    version,
                    latest,
                });
            }
            let row = ManifestRow {
                manifest: Some(manifest.clone()),
            };
            Ok((
                ManifestPut::Committed(manifest),
                vec![op(Kind::PutManifest(row))],
            ))
        })
        .await
    }

    async fn get_manifest(&self, job_id: &str, version: u64) -> Result<Option<WeightManifest>> {
        self.read(|state| {
            Ok(state
                .manifests
                .get(job_id)
                .and_then(|j| j.versions.get(&version))
                .cloned())
        })
    }

    async fn latest_manifest(&self, job_id: &str) -> Result<Option<WeightManifest>> {
        self.read(|state| {
            Ok(state
                .manifests
                .get(job_id)
                .and_then(|j| j.versions.last_key_value())
                .map(|(_, m)| m.clone()))
        })
    }

    async fn list_manifests(&self, job_id: &str) -> Result<Vec<WeightManifest>> {
        self.read(|state| {
            Ok(state
                .manifests
                .get(job_id)
                .map(|j| j.versions.values().rev().cloned().collect())
                .unwrap_or_default())
        })
    }

    async fn delete_manifest(&self, job_id: &str, version: u64) -> Result<bool> {
        self.commit(|state, now_ms| {
            let Some(job) = state
                .manifests
                .get(job_id)
                .filter(|j| j.versions.contains_key(&version))
            else {
                return Ok((false, Vec::new()));
            };
            if job.pinned(now_ms).contains(&version) {
                return Err(StoreError::Pinned {
                    job_id: job_id.to_owned(),
                    version,
                });
            }
            let key = ManifestKey {
                job_id: job_id.to_owned(),
                version,
            };
            Ok((true, vec![op(Kind::DeleteManifest(key))]))
        })
        .await
    }

    async fn pin(
        &self,
        job_id: &str,
        version: u64,
        holder: &str,
        ttl: Duration,
    ) -> Result<SystemTime> {
        require_non_empty("holder", holder)?;
        self.commit(|state, now_ms| {
            let retained = state
                .manifests
                .get(job_id)
                .is_some_and(|j| j.versions.contains_key(&version));
            if !retained {
                return Err(StoreError::not_found(
                    "weight version",
                    version_id(job_id, version),
                ));
            }
            let deadline_ms = now_ms.saturating_add(ttl_millis(ttl));
            let row = PinRow {
                job_id: job_id.to_owned(),
                version,
                holder: holder.to_owned(),
                deadline_ms,
            };
            Ok((from_millis(deadline_ms), vec![op(Kind::Pin(row))]))
        })
        .await
    }

    async fn unpin(&self, job_id: &str, version: u64, holder: &str) -> Result<bool> {
        self.commit(|state, _| {
            let held = state
                .manifests
                .get(job_id)
                .is_some_and(|j| j.pins.contains_key(&(version, holder.to_owned())));
            if !held {
                return Ok((false, Vec::new()));
            }
            let row = PinRow {
                job_id: job_id.to_owned(),
                version,
                holder: holder.to_owned(),
                deadline_ms: 0,
            };
            Ok((true, vec![op(Kind::Unpin(row))]))
        })
        .await
    }

    async fn pinned_versions(&self, job_id: &str) -> Result<BTreeSet<u64>> {
        let now_ms = millis(self.clock.now());
        self.read(|state| {
            Ok(state
                .manifests
                .get(job_id)
                .map(|j| j.pinned(now_ms))
                .unwrap_or_default())
        })
    }

    async fn queue_append(
        &self,
        job_id: &str,
        payload: Vec<u8>,
        max_len: u64,
    ) -> Result<AppendOutcome> {
        require_non_empty("job_id", job_id)?;
        if max_len == 0 {
            return Err(StoreError::invalid("max_len", "must be at least 1"));
        }
        let outcome = self
            .commit(|state, now_ms| {
                let queue = state.queues.get(job_id);
                let len = queue.map_or(0, |q| q.entries.len() as u64);
                if len >= max_len {
                    return Ok((AppendOutcome::Full { len }, Vec::new()));
                }
                let id = queue.map_or(EntryId::default(), |q| q.last_id).next(now_ms);
                let row = QueueRow {
                    job_id: job_id.to_owned(),
                    id_ms: id.ms,
                    id_seq: id.seq,
                    payload,
                    appended: 0,
                };
                Ok((
                    AppendOutcome::Appended(id),
                    vec![op(Kind::QueueAppend(row))],
                ))
            })
            .await?;
        if matches!(outcome, AppendOutcome::Appended(_)) {
            self.queue_waiters.wake(job_id);
        }
        Ok(outcome)
    }

    async fn queue_read(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<QueueEntry>> {
        validate_queue_args(group, consumer, count)?;
        let notify = self.queue_waiters.get(job_id);
        // The delivery is logged like any change (a learner outlives a
        // restart of the coordinator serving it this queue); its record is
        // queued under the lock, and the read answers once it is durable.
        let mut acks = Vec::new();
        let picked = self
            .wait_for(notify, block, || {
                let mut shared = self.lock()?;
                let now_ms = millis(self.clock.now());
                let Some(queue) = shared.state.queues.get(job_id) else {
                    return Ok(Vec::new());
                };
                let after = queue
                    .groups
                    .get(group)
                    .map_or(EntryId::default(), |g| g.last_delivered);
                let picked: Vec<QueueEntry> = queue
                    .entries
                    .range((Bound::Excluded(after), Bound::Unbounded))
                    .take(count)
                    .map(|(id, payload)| QueueEntry {
                        id: *id,
                        payload: payload.clone(),
                    })
                    .collect();
                let ids: Vec<EntryId> = picked.iter().map(|e| e.id).collect();
                let ops = deliver_ops(job_id, group, consumer, now_ms, &ids);
                acks.extend(self.log(&mut shared, ops, now_ms));
                Ok(picked)
            })
            .await?;
        self.wait_all_durable(acks).await?;
        Ok(picked)
    }

    async fn queue_ack(&self, job_id: &str, group: &str, ids: &[EntryId]) -> Result<u64> {
        self.commit(|state, _| {
            let Some(pending) = state
                .queues
                .get(job_id)
                .and_then(|q| q.groups.get(group))
                .map(|g| &g.pending)
            else {
                return Ok((0, Vec::new()));
            };
            let acked: BTreeSet<EntryId> = ids
                .iter()
                .filter(|id| pending.contains_key(id))
                .copied()
                .collect();
            if acked.is_empty() {
                return Ok((0, Vec::new()));
            }
            let row = QueueAckRow {
                job_id: job_id.to_owned(),
                id_ms: acked.iter().map(|id| id.ms).collect(),
                id_seq: acked.iter().map(|id| id.seq).collect(),
            };
            Ok((acked.len() as u64, vec![op(Kind::QueueAck(row))]))
        })
        .await
    }

    async fn queue_claim_stale(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<QueueEntry>> {
        validate_queue_args(group, consumer, count)?;
        let min_idle_ms = ttl_millis(min_idle);
        self.commit(|state, now_ms| {
            let Some(queue) = state.queues.get(job_id) else {
                return Ok((Vec::new(), Vec::new()));
            };
            let Some(pending) = queue.groups.get(group).map(|g| &g.pending) else {
                return Ok((Vec::new(), Vec::new()));
            };
            let claimed: Vec<QueueEntry> = pending
                .iter()
                .filter(|(_, d)| now_ms.saturating_sub(d.delivered_ms) >= min_idle_ms)
                .filter_map(|(id, _)| {
                    queue.entries.get(id).map(|payload| QueueEntry {
                        id: *id,
                        payload: payload.clone(),
                    })
                })
                .take(count)
                .collect();
            let ids: Vec<EntryId> = claimed.iter().map(|e| e.id).collect();
            let ops = deliver_ops(job_id, group, consumer, now_ms, &ids);
            Ok((claimed, ops))
        })
        .await
    }

    async fn queue_len(&self, job_id: &str) -> Result<u64> {
        self.read(|state| {
            Ok(state
                .queues
                .get(job_id)
                .map_or(0, |q| q.entries.len() as u64))
        })
    }

    async fn queue_pending(&self, job_id: &str, group: &str) -> Result<u64> {
        self.read(|state| {
            Ok(state
                .queues
                .get(job_id)
                .and_then(|q| q.groups.get(group))
                .map_or(0, |g| g.pending.len() as u64))
        })
    }

    async fn queue_appended(&self, job_id: &str) -> Result<u64> {
        self.read(|state| Ok(state.queues.get(job_id).map_or(0, |q| q.appended)))
    }

    async fn put_preference(&self, rater: &str, key: &str, payload: Vec<u8>) -> Result<RecordPut> {
        require_non_empty("rater", rater)?;
        require_non_empty("key", key)?;
        self.commit(|state, _| {
            if let Some(&seq) = state
                .preference_keys
                .get(&(rater.to_owned(), key.to_owned()))
            {
                return Ok((RecordPut::Duplicate(seq), Vec::new()));
            }
            let seq = state.next_preference_seq();
            let row = PreferenceRow {
                seq,
                rater: rater.to_owned(),
                key: key.to_owned(),
                payload,
            };
            Ok((RecordPut::Stored(seq), vec![op(Kind::PutPreference(row))]))
        })
        .await
    }

    async fn list_preferences(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        self.read(|state| {
            Ok(state
                .preferences
                .range((Bound::Excluded(after), Bound::Unbounded))
                .take(limit)
                .map(|(seq, row)| (*seq, row.payload.clone()))
                .collect())
        })
    }

    async fn put_clip(&self, clip_id: &str, payload: Vec<u8>, ttl: Duration) -> Result<()> {
        require_non_empty("clip_id", clip_id)?;
        self.commit(|_, now_ms| {
            let row = ClipRow {
                clip_id: clip_id.to_owned(),
                payload,
                expires_ms: now_ms.saturating_add(ttl_millis(ttl)),
            };
            Ok(((), vec![op(Kind::PutClip(row))]))
        })
        .await
    }

    async fn get_clip(&self, clip_id: &str) -> Result<Option<Vec<u8>>> {
        let now_ms = millis(self.clock.now());
        self.read(|state| {
            Ok(state
                .clips
                .get(clip_id)
                .filter(|(_, expires_ms)| *expires_ms > now_ms)
                .map(|(payload, _)| payload.clone()))
        })
    }
}

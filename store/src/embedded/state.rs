//! The embedded store's in-memory state and the one function that changes
//! its durable part, [`State::apply`], used both for live mutations (after
//! their ops were handed to the log) and for recovery (replaying the
//! snapshot and the log). [`State::dump`] turns the durable part back into
//! ops for a snapshot.
//!
//! Consumer-group bookkeeping of the rollout queues (which entry was
//! delivered to which consumer, and when) is durable too: a coordinator
//! serves its embedded store's queue to learner processes that outlive it,
//! and a learner still holds what it read when the coordinator restarts
//! (see `docs/store.md`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use encore_proto::v1::{Job, JobEvent, MemberStatus, WeightManifest, job_event};

use super::on_disk::{
    Batch, ClipRow, EventRow, JobRow, ManifestKey, ManifestRow, MemberKey, MemberRow, Op, PinRow,
    PreferenceRow, QueueAckRow, QueueDeliverRow, QueueRow, op::Kind,
};
use crate::types::{EntryId, Member};

/// A stored job.
#[derive(Debug, Clone)]
pub(crate) struct JobEntry {
    pub job: Job,
    pub revision: u64,
    pub seq: u64,
    pub owner: String,
    pub idempotency_key: String,
    pub spec_sha256: String,
}

impl JobEntry {
    /// The row that stores this entry.
    pub fn row(&self) -> JobRow {
        JobRow {
            job: Some(self.job.clone()),
            revision: self.revision,
            seq: self.seq,
            owner: self.owner.clone(),
            idempotency_key: self.idempotency_key.clone(),
            spec_sha256: self.spec_sha256.clone(),
        }
    }
}

/// A stored member.
#[derive(Debug, Clone)]
pub(crate) struct MemberEntry {
    pub member: Member,
    pub status: Option<MemberStatus>,
    pub revision: u64,
    pub deadline_ms: u64,
}

impl MemberEntry {
    /// The row that stores this entry.
    pub fn row(&self, claims_instance: bool) -> MemberRow {
        MemberRow {
            member: Some(self.member.clone()),
            status: self.status.clone(),
            revision: self.revision,
            lease_deadline_ms: self.deadline_ms,
            claims_instance,
        }
    }
}

/// A job's weight versions and pins.
#[derive(Debug, Default)]
pub(crate) struct Manifests {
    pub versions: BTreeMap<u64, WeightManifest>,
    /// Highest version ever committed (survives its deletion).
    pub high_water: Option<u64>,
    /// (version, holder) -> deadline in ms.
    pub pins: BTreeMap<(u64, String), u64>,
}

impl Manifests {
    /// Versions with a pin alive at `now_ms`.
    pub fn pinned(&self, now_ms: u64) -> BTreeSet<u64> {
        self.pins
            .iter()
            .filter(|(_, deadline)| **deadline > now_ms)
            .map(|((version, _), _)| *version)
            .collect()
    }
}

/// Who holds a delivered, unacknowledged entry, and since when.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub consumer: String,
    pub delivered_ms: u64,
}

/// A consumer group of a queue.
#[derive(Debug, Default)]
pub(crate) struct Group {
    /// Entries up to this id were delivered to some consumer.
    pub last_delivered: EntryId,
    /// Delivered and not acknowledged.
    pub pending: BTreeMap<EntryId, Delivery>,
}

/// A job's rollout queue.
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    /// Appended and not acknowledged.
    pub entries: BTreeMap<EntryId, Vec<u8>>,
    /// Last id handed out.
    pub last_id: EntryId,
    /// Entries ever appended, acknowledged ones included.
    pub appended: u64,
    /// Consumer groups.
    pub groups: HashMap<String, Group>,
}

/// The rows that rebuild `group`: its read position, then its pending
/// entries, one row per consumer and delivery time.
fn group_rows(job_id: &str, name: &str, group: &Group) -> Vec<QueueDeliverRow> {
    let row = |consumer: &str, delivered_ms| QueueDeliverRow {
        job_id: job_id.to_owned(),
        group: name.to_owned(),
        consumer: consumer.to_owned(),
        delivered_ms,
        last_delivered_ms: group.last_delivered.ms,
        last_delivered_seq: group.last_delivered.seq,
        ..QueueDeliverRow::default()
    };
    let mut by_holder: BTreeMap<(&str, u64), QueueDeliverRow> = BTreeMap::new();
    for (id, delivery) in &group.pending {
        let held = by_holder
            .entry((&delivery.consumer, delivery.delivered_ms))
            .or_insert_with(|| row(&delivery.consumer, delivery.delivered_ms));
        held.id_ms.push(id.ms);
        held.id_seq.push(id.seq);
    }
    std::iter::once(row("", 0))
        .chain(by_holder.into_values())
        .collect()
}

/// Everything an embedded store holds.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub next_job_seq: u64,
    pub jobs: HashMap<String, JobEntry>,
    pub jobs_by_seq: BTreeMap<u64, String>,
    /// (owner, key) -> job id.
    pub idempotency: HashMap<(String, String), String>,
    /// Job id -> its events; the event at index i has sequence i + 1.
    pub events: HashMap<String, Vec<JobEvent>>,
    /// Job id -> (step, sequence) of its metric events.
    pub metric_index: HashMap<String, BTreeSet<(u64, u64)>>,
    pub members: HashMap<String, MemberEntry>,
    /// Instance id -> member id.
    pub instances: HashMap<String, String>,
    pub manifests: HashMap<String, Manifests>,
    pub queues: HashMap<String, QueueState>,
    /// Sequence -> preference record.
    pub preferences: BTreeMap<u64, PreferenceRow>,
    /// (rater, key) -> sequence.
    pub preference_keys: HashMap<(String, String), u64>,
    /// Clip id -> the clip and when it expires (ms).
    pub clips: HashMap<String, (Vec<u8>, u64)>,
}

impl State {
    /// Applies one durable change.
    pub fn apply(&mut self, op: Op) {
        let Some(kind) = op.kind else { return };
        match kind {
            Kind::PutJob(row) => {
                let Some(job) = row.job else { return };
                let job_id = job.job_id.clone();
                if !row.idempotency_key.is_empty() {
                    self.idempotency.insert(
                        (row.owner.clone(), row.idempotency_key.clone()),
                        job_id.clone(),
                    );
                }
                self.jobs_by_seq.insert(row.seq, job_id.clone());
                self.next_job_seq = self.next_job_seq.max(row.seq + 1);
                self.jobs.insert(
                    job_id,
                    JobEntry {
                        job,
                        revision: row.revision,
                        seq: row.seq,
                        owner: row.owner,
                        idempotency_key: row.idempotency_key,
                        spec_sha256: row.spec_sha256,
                    },
                );
            }
            Kind::AppendEvent(EventRow { job_id, event }) => {
                let Some(event) = event else { return };
                if let Some(job_event::Event::Metrics(point)) = &event.event {
                    self.metric_index
                        .entry(job_id.clone())
                        .or_default()
                        .insert((point.step, event.sequence));
                }
                self.events.entry(job_id).or_default().push(event);
            }
            Kind::PutMember(row) => {
                let Some(member) = row.member else { return };
                let member_id = member.member_id.clone();
                if row.claims_instance {
                    self.instances
                        .insert(member.instance_id.clone(), member_id.clone());
                }
                self.members.insert(
                    member_id,
                    MemberEntry {
                        member,
                        status: row.status,
                        revision: row.revision,
                        deadline_ms: row.lease_deadline_ms,
                    },
                );
            }
            Kind::RemoveMember(MemberKey { member_id }) => {
                if let Some(entry) = self.members.remove(&member_id) {
                    let instance = &entry.member.instance_id;
                    if self.instances.get(instance) == Some(&member_id) {
                        self.instances.remove(instance);
                    }
                }
            }
            Kind::PutManifest(ManifestRow { manifest }) => {
                let Some(manifest) = manifest else { return };
                let Some(version) = manifest.version.as_ref() else {
                    return;
                };
                let (job_id, number) = (version.job_id.clone(), version.version);
                let job = self.manifests.entry(job_id).or_default();
                job.high_water = Some(job.high_water.map_or(number, |h| h.max(number)));
                job.versions.insert(number, manifest);
            }
            Kind::DeleteManifest(ManifestKey { job_id, version }) => {
                if let Some(job) = self.manifests.get_mut(&job_id) {
                    job.versions.remove(&version);
                    job.pins.retain(|(v, _), _| *v != version);
                }
            }
            Kind::ManifestHighWater(ManifestKey { job_id, version }) => {
                let job = self.manifests.entry(job_id).or_default();
                job.high_water = Some(job.high_water.map_or(version, |h| h.max(version)));
            }
            Kind::Pin(PinRow {
                job_id,
                version,
                holder,
                deadline_ms,
            }) => {
                self.manifests
                    .entry(job_id)
                    .or_default()
                    .pins
                    .insert((version, holder), deadline_ms);
            }
            Kind::Unpin(PinRow {
                job_id,
                version,
                holder,
                ..
            }) => {
                if let Some(job) = self.manifests.get_mut(&job_id) {
                    job.pins.remove(&(version, holder));
                }
            }
            Kind::QueueAppend(QueueRow {
                job_id,
                id_ms,
                id_seq,
                payload,
                ..
            }) => {
                let id = EntryId {
                    ms: id_ms,
                    seq: id_seq,
                };
                let queue = self.queues.entry(job_id).or_default();
                queue.last_id = queue.last_id.max(id);
                queue.entries.insert(id, payload);
                queue.appended += 1;
            }
            Kind::QueueAck(QueueAckRow {
                job_id,
                id_ms,
                id_seq,
            }) => {
                if let Some(queue) = self.queues.get_mut(&job_id) {
                    for (ms, seq) in id_ms.into_iter().zip(id_seq) {
                        let id = EntryId { ms, seq };
                        queue.entries.remove(&id);
                        for group in queue.groups.values_mut() {
                            group.pending.remove(&id);
                        }
                    }
                }
            }
            Kind::QueueLastId(QueueRow {
                job_id,
                id_ms,
                id_seq,
                appended,
                ..
            }) => {
                let queue = self.queues.entry(job_id).or_default();
                queue.last_id = queue.last_id.max(EntryId {
                    ms: id_ms,
                    seq: id_seq,
                });
                // The snapshot's entries were counted as they were
                // replayed; the total counts the acknowledged ones too. (A
                // snapshot written before the count existed leaves only
                // the entries it still holds counted.)
                queue.appended = queue.appended.max(appended);
            }
            Kind::QueueDeliver(row) => self.deliver(row),
            Kind::PutPreference(row) => {
                self.preference_keys
                    .insert((row.rater.clone(), row.key.clone()), row.seq);
                self.preferences.insert(row.seq, row);
            }
            Kind::PutClip(ClipRow {
                clip_id,
                payload,
                expires_ms,
            }) => {
                self.clips.insert(clip_id, (payload, expires_ms));
            }
        }
    }

    /// Records a delivery (or a claim): the entries still in the queue are
    /// pending with the row's consumer, and the group's read position moves
    /// up to the row's (never back).
    fn deliver(&mut self, row: QueueDeliverRow) {
        let queue = self.queues.entry(row.job_id).or_default();
        let group = queue.groups.entry(row.group).or_default();
        group.last_delivered = group.last_delivered.max(EntryId {
            ms: row.last_delivered_ms,
            seq: row.last_delivered_seq,
        });
        for (ms, seq) in row.id_ms.into_iter().zip(row.id_seq) {
            let id = EntryId { ms, seq };
            if queue.entries.contains_key(&id) {
                group.last_delivered = group.last_delivered.max(id);
                group.pending.insert(
                    id,
                    Delivery {
                        consumer: row.consumer.clone(),
                        delivered_ms: row.delivered_ms,
                    },
                );
            }
        }
    }

    /// The sequence the next preference record gets.
    pub fn next_preference_seq(&self) -> u64 {
        self.preferences.keys().next_back().map_or(1, |s| s + 1)
    }

    /// The durable state as a snapshot batch (pins that lapsed by `now_ms`
    /// are left out).
    pub fn dump(&self, lsn: u64, now_ms: u64) -> Batch {
        let mut ops = Vec::new();
        let mut push = |kind: Kind| ops.push(Op { kind: Some(kind) });
        for job_id in self.jobs_by_seq.values() {
            if let Some(entry) = self.jobs.get(job_id) {
                push(Kind::PutJob(entry.row()));
            }
        }
        let mut event_jobs: Vec<&String> = self.events.keys().collect();
        event_jobs.sort();
        for job_id in event_jobs {
            for event in &self.events[job_id] {
                push(Kind::AppendEvent(EventRow {
                    job_id: job_id.clone(),
                    event: Some(event.clone()),
                }));
            }
        }
        let mut member_ids: Vec<&String> = self.members.keys().collect();
        member_ids.sort();
        for member_id in member_ids {
            let entry = &self.members[member_id];
            let claims = self.instances.get(&entry.member.instance_id) == Some(member_id);
            push(Kind::PutMember(entry.row(claims)));
        }
        let mut manifest_jobs: Vec<&String> = self.manifests.keys().collect();
        manifest_jobs.sort();
        for job_id in manifest_jobs {
            let job = &self.manifests[job_id];
            for manifest in job.versions.values() {
                push(Kind::PutManifest(ManifestRow {
                    manifest: Some(manifest.clone()),
                }));
            }
            if let Some(high) = job.high_water {
                push(Kind::ManifestHighWater(ManifestKey {
                    job_id: job_id.clone(),
                    version: high,
                }));
            }
            for ((version, holder), deadline_ms) in &job.pins {
                if *deadline_ms > now_ms {
                    push(Kind::Pin(PinRow {
                        job_id: job_id.clone(),
                        version: *version,
                        holder: holder.clone(),
                        deadline_ms: *deadline_ms,
                    }));
                }
            }
        }
        let mut queue_jobs: Vec<&String> = self.queues.keys().collect();
        queue_jobs.sort();
        for job_id in queue_jobs {
            let queue = &self.queues[job_id];
            for (id, payload) in &queue.entries {
                push(Kind::QueueAppend(QueueRow {
                    job_id: job_id.clone(),
                    id_ms: id.ms,
                    id_seq: id.seq,
                    payload: payload.clone(),
                    appended: 0,
                }));
            }
            push(Kind::QueueLastId(QueueRow {
                job_id: job_id.clone(),
                id_ms: queue.last_id.ms,
                id_seq: queue.last_id.seq,
                payload: Vec::new(),
                appended: queue.appended,
            }));
            let mut group_names: Vec<&String> = queue.groups.keys().collect();
            group_names.sort();
            for name in group_names {
                for row in group_rows(job_id, name, &queue.groups[name]) {
                    push(Kind::QueueDeliver(row));
                }
            }
        }
        for row in self.preferences.values() {
            push(Kind::PutPreference(row.clone()));
        }
        let mut clip_ids: Vec<&String> = self.clips.keys().collect();
        clip_ids.sort();
        for clip_id in clip_ids {
            let (payload, expires_ms) = &self.clips[clip_id];
            if *expires_ms > now_ms {
                push(Kind::PutClip(ClipRow {
                    clip_id: clip_id.clone(),
                    payload: payload.clone(),
                    expires_ms: *expires_ms,
                }));
            }
        }
        Batch { lsn, ops }
    }

    /// The last event sequence of a job (0 before the first event).
    pub fn last_event_sequence(&self, job_id: &str) -> u64 {
        self.events.get(job_id).map_or(0, |e| e.len() as u64)
    }
}

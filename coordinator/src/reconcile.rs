//! The reconciler: turns the registered members and the live jobs into
//! assignments, and moves jobs from PENDING to RUNNING.
//!
//! It is level-triggered. Each pass reads everything it needs from the
//! store, computes who should work on what, and writes only the
//! differences (each member with a compare-and-set), so a pass can be
//! interrupted or run by a freshly restarted coordinator at any point and
//! the next pass carries on. A pass runs when something changed
//! ([`Trigger::fire`]: a submit, a cancel, a registration, a progress
//! report) and on a timer a few times per lease TTL, which is what notices
//! expired leases.
//!
//! A pass:
//! 1. removes members whose lease ran out (their work becomes free);
//! 2. keeps every live member on the job it is working on, in its slot
//!    (an actor's prompt shard, a learner's rank);
//! 3. fills the free slots of live jobs, oldest job first, with idle members
//!    whose resources satisfy the job's: a RUNNING job takes whoever is
//!    there (a replacement for a lost actor), a PENDING job only starts when
//!    all its slots can be filled and a reward server hosts each of its
//!    current stage's reward models, then moves to RUNNING;
//! 4. writes each member's assignment where it differs from the stored one,
//!    with the next generation, and idles members whose job ended.
//!
//! Member records change only through the store, so WatchAssignment streams
//! wake on [`Changes`] and re-read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use encore_proto::v1::{
    ActorAssignment, Assignment, CollectiveBackend, DeviceKind, Job, JobSpec, JobState,
    LearnerAssignment, PromptShard, Resources, RewardEndpoint, Role, RolloutQueue, Stage,
    assignment,
};
use encore_spec::JobPlan;
use encore_store::{MemberRecord, Store, StoreError};
use prost_types::Timestamp;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::job_changes::{job_state, modify_job, state_event};
use crate::metrics::Metrics;

/// Consumer group the learner ranks of every job read the rollout queue
/// with.
pub const LEARNER_GROUP: &str = "learners";

/// Wakes the reconciler for an early pass.
#[derive(Debug, Clone, Default)]
pub struct Trigger(Arc<Notify>);

impl Trigger {
    /// A trigger nobody listens to yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a pass soon; several fires before the pass count as one.
    pub fn fire(&self) {
        self.0.notify_one();
    }

    async fn fired(&self) {
        self.0.notified().await;
    }
}

/// Tells WatchAssignment streams that member records may have changed.
#[derive(Debug, Clone)]
pub struct Changes(Arc<watch::Sender<u64>>);

impl Default for Changes {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl Changes {
    /// Announces a change.
    pub fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that wakes on the next announcement.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// What a pass needs besides the store.
#[derive(Debug, Clone)]
pub struct Reconciler {
    store: Arc<dyn Store>,
    metrics: Metrics,
    changes: Changes,
    /// URI of the rollout queue, as handed to actors and learners.
    pub rollout_queue_uri: String,
    /// Root of the learners' checkpoint directories.
    pub checkpoint_dir: PathBuf,
}

impl Reconciler {
    /// A reconciler over `store`.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Metrics,
        changes: Changes,
        rollout_queue_uri: String,
        checkpoint_dir: PathBuf,
    ) -> Self {
        Self {
            store,
            metrics,
            changes,
            rollout_queue_uri,
            checkpoint_dir,
        }
    }

    /// Runs passes until `shutdown`: one at once, then one per `trigger`
    /// fire and at least every `period`. A failed pass is logged and the
    /// next one tries again.
    pub async fn run(self, trigger: Trigger, period: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "reconcile pass failed; retrying on the next one");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = trigger.fired() => {}
                () = tokio::time::sleep(period) => {}
            }
        }
    }

    /// One pass (see the module doc).
    pub async fn pass(&self) -> Result<()> {
        let store = &*self.store;
        let mut changed = false;
        for expired in store.expired_members().await? {
            let member = &expired.member;
            let role = role_name(member.role);
            tracing::info!(
                member_id = %member.member_id,
                role,
                job_id = member.assignment.as_ref().map(|a| a.job_id.as_str()).unwrap_or(""),
                "lease expired; member removed and its work freed"
            );
            self.metrics
                .lease_expirations
                .with_label_values(&[role])
                .inc();
            store.remove_member(&member.member_id).await?;
            changed = true;
        }

        let now = store.now();
        let members: Vec<MemberRecord> = store
            .list_members(None)
            .await?
            .into_iter()
            .filter(|m| m.is_alive(now))
            .collect();
        self.update_member_gauge(&members);
        let jobs = live_jobs(store).await?;

        let mut placement = Placement::new(&members);
        // Members stay on their jobs before any free slot is filled, so a
        // younger job never takes a member an older one still has.
        for job in &jobs {
            placement.keep_members(job, &members);
        }
        let mut started = Vec::new();
        for job in &jobs {
            if placement.fill(job, &members) {
                started.push(job.job_id.clone());
            }
        }
        let jobs_by_id: BTreeMap<&str, &Job> =
            jobs.iter().map(|j| (j.job_id.as_str(), j)).collect();

        for record in &members {
            let member = &record.member;
            let desired = match placement.slot_of(&member.member_id) {
                Some((job_id, slot)) => match jobs_by_id.get(job_id) {
                    Some(job) => self.assignment(job, member.role, slot, &placement, &members),
                    None => Assignment::default(),
                },
                None => Assignment::default(),
            };
            let current = member.assignment.clone().unwrap_or_default();
            if same_work(&current, &desired) {
                continue;
            }
            let mut updated = member.clone();
            updated.assignment = Some(Assignment {
                member_id: member.member_id.clone(),
                generation: current.generation + 1,
                ..desired
            });
            match store.update_member(updated, record.revision).await {
                Ok(_) => {
                    changed = true;
                    self.metrics
                        .assignments
                        .with_label_values(&[role_name(member.role)])
                        .inc();
                    tracing::info!(
                        member_id = %member.member_id,
                        generation = current.generation + 1,
                        job_id = placement.slot_of(&member.member_id).map(|(j, _)| j).unwrap_or(""),
                        "assignment changed"
                    );
                }
                // The member re-registered, heartbeat-raced or was removed
                // meanwhile; the next pass sees it as it is now.
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Only now that every member of a starting job holds its assignment:
        // whoever sees RUNNING finds the work handed out.
        for job_id in &started {
            self.start(job_id).await?;
        }
        self.update_job_gauge().await?;
        if changed {
            self.changes.notify();
        }
        Ok(())
    }

    async fn start(&self, job_id: &str) -> Result<()> {
        modify_job(&*self.store, job_id, |job, now| {
            if job_state(job) != JobState::Pending {
                return Ok(None);
            }
            job.state = JobState::Running as i32;
            job.start_time = Some(Timestamp::from(now));
            Ok(Some(vec![state_event(
                now,
                JobState::Pending,
                JobState::Running,
                "every actor, learner rank and reward model is in place",
            )]))
        })
        .await?;
        tracing::info!(job_id, "job running");
        Ok(())
    }

    fn update_member_gauge(&self, members: &[MemberRecord]) {
        for role in [Role::Actor, Role::Learner, Role::RewardServer] {
            let n = members
                .iter()
                .filter(|m| m.member.role == role as i32)
                .count();
            self.metrics
                .members
                .with_label_values(&[role_name(role as i32)])
                .set(n as f64);
        }
    }

    async fn update_job_gauge(&self) -> Result<()> {
        for (state, n) in self.store.count_jobs_by_state().await? {
            self.metrics
                .jobs
                .with_label_values(&[state.as_str_name().trim_start_matches("JOB_STATE_")])
                .set(n as f64);
        }
        Ok(())
    }

    /// The assignment of the member in `slot` of `job`.
    fn assignment(
        &self,
        job: &Job,
        role: i32,
        slot: u32,
        placement: &Placement,
        members: &[MemberRecord],
    ) -> Assignment {
        let spec = job.spec.clone().unwrap_or_default();
        let job_plan = match JobPlan::of(&spec) {
            Ok(job_plan) => job_plan,
            Err(bad) => {
                // Only a spec that bypassed Submit can get here.
                tracing::error!(job_id = %job.job_id, error = %bad,
                    "the job's spec has no plan; nobody is assigned to it");
                return Assignment::default();
            }
        };
        let queue = RolloutQueue {
            uri: self.rollout_queue_uri.clone(),
            stream: job.job_id.clone(),
            consumer_group: LEARNER_GROUP.into(),
        };
        let details = if role == Role::Actor as i32 {
            let seeds = spec.seeds.unwrap_or_default();
            let k = job_plan.samples_per_prompt;
            let actors = job_plan.actors;
            let stage = current_stage(job);
            assignment::Details::Actor(ActorAssignment {
                stage: stage.name.clone(),
                reward_servers: endpoints(&stage, members),
                prompts: Some(PromptShard {
                    source: spec.prompts.clone(),
                    shard_index: slot,
                    shard_count: actors,
                    seed: seeds.prompt_order.unwrap_or_default(),
                }),
                sampling: Some(job_plan.sampling),
                samples_per_prompt: k,
                groups_per_batch: (job_plan.batch_size / k / actors).max(1),
                sampling_seed: mix(seeds.sampling.unwrap_or_default(), u64::from(slot)),
                max_staleness: job_plan.max_staleness,
            })
        } else {
            let world = job_plan.learner_ranks;
            let ranks: Vec<Option<&MemberRecord>> = (0..world)
                .map(|rank| {
                    placement
                        .member_in(&job.job_id, Role::Learner as i32, rank)
                        .and_then(|id| members.iter().find(|m| m.member.member_id == id))
                })
                .collect();
            let cuda = ranks.iter().all(|m| {
                m.and_then(|m| m.member.capabilities.as_ref())
                    .and_then(|c| c.resources.as_ref())
                    .is_some_and(|r| r.device == DeviceKind::Cuda as i32)
            });
            let nccl_unique_id = if cuda {
                ranks[0]
                    .and_then(|m| m.status.as_ref())
                    .and_then(|s| s.nccl_unique_id.clone())
            } else {
                None
            };
            assignment::Details::Learner(LearnerAssignment {
                rank: slot,
                world_size: world,
                peer_addresses: ranks
                    .iter()
                    .map(|m| {
                        m.and_then(|m| m.member.capabilities.as_ref())
                            .map(|c| c.address.clone())
                            .unwrap_or_default()
                    })
                    .collect(),
                backend: if cuda {
                    CollectiveBackend::Nccl
                } else {
                    CollectiveBackend::TcpRing
                } as i32,
                nccl_unique_id,
                spec: Some(spec),
                checkpoint_dir: self
                    .checkpoint_dir
                    .join(&job.job_id)
                    .to_string_lossy()
                    .into_owned(),
                device_ordinal: None,
            })
        };
        Assignment {
            member_id: String::new(),
            generation: 0,
            job_id: job.job_id.clone(),
            details: Some(details),
            rollout_queue: Some(queue),
        }
    }
}

/// PENDING and RUNNING jobs, oldest first.
async fn live_jobs(store: &dyn Store) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = store
            .list_jobs(
                None,
                &[JobState::Pending, JobState::Running],
                encore_store::MAX_PAGE_SIZE,
                token.as_deref(),
            )
            .await?;
        jobs.extend(page.jobs.into_iter().map(|s| s.job));
        match page.next_page_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    jobs.retain(|j| !job_state(j).is_terminal());
    jobs.reverse();
    Ok(jobs)
}

/// The stage a job is in (the implicit "main" stage of a job without
/// explicit stages).
pub fn current_stage(job: &Job) -> Stage {
    let spec = job.spec.clone().unwrap_or_default();
    match spec.stages.get(job.stage_index as usize) {
        Some(stage) => stage.clone(),
        None => Stage {
            name: if job.stage.is_empty() {
                "main".into()
            } else {
                job.stage.clone()
            },
            rewards: spec.rewards,
            stop: spec.stop,
        },
    }
}

/// Where each reward model of `stage` is served: the live reward servers
/// hosting it (with the pinned sha256, if any), by address.
fn endpoints(stage: &Stage, members: &[MemberRecord]) -> Vec<RewardEndpoint> {
    stage
        .rewards
        .iter()
        .filter_map(|r| r.model.as_ref())
        .map(|model| RewardEndpoint {
            model: model.name.clone(),
            addresses: members
                .iter()
                .filter(|m| m.member.role == Role::RewardServer as i32)
                .filter_map(|m| m.member.capabilities.as_ref())
                .filter(|c| {
                    c.models.iter().any(|hosted| {
                        hosted.name == model.name
                            && (model.sha256.is_empty() || hosted.sha256 == model.sha256)
                    })
                })
                .map(|c| c.address.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        })
        .collect()
}

/// Who works on what: member id -> (job id, slot).
struct Placement {
    slots: BTreeMap<String, (String, u32)>,
    /// (job id, role, slot) -> member id.
    taken: BTreeMap<(String, i32, u32), String>,
    roles: BTreeMap<String, i32>,
}

impl Placement {
    fn new(members: &[MemberRecord]) -> Self {
        Self {
            slots: BTreeMap::new(),
            taken: BTreeMap::new(),
            roles: members
                .iter()
                .map(|m| (m.member.member_id.clone(), m.member.role))
                .collect(),
        }
    }

    fn slot_of(&self, member_id: &str) -> Option<(&str, u32)> {
        self.slots.get(member_id).map(|(j, s)| (j.as_str(), *s))
    }

    fn member_in(&self, job_id: &str, role: i32, slot: u32) -> Option<&str> {
        self.taken
            .get(&(job_id.to_owned(), role, slot))
            .map(String::as_str)
    }

    fn put(&mut self, member_id: &str, role: i32, job_id: &str, slot: u32) {
        self.slots
            .insert(member_id.to_owned(), (job_id.to_owned(), slot));
        self.taken
            .insert((job_id.to_owned(), role, slot), member_id.to_owned());
    }

    /// Fills `job`'s free slots; true if a PENDING job can now start.
    fn fill(&mut self, job: &Job, members: &[MemberRecord]) -> bool {
        let Some(spec) = job.spec.as_ref() else {
            return false;
        };
        let pending = job_state(job) == JobState::Pending;
        let needs = slot_needs(spec);
        let mut chosen: Vec<(String, i32, u32)> = Vec::new();
        for (role, count, need) in &needs {
            // Roles differ between iterations, so members chosen for an
            // earlier role never show up here again.
            let idle: Vec<&MemberRecord> = members
                .iter()
                .filter(|m| {
                    m.member.role == *role
                        && !self.slots.contains_key(&m.member.member_id)
                        && satisfies(
                            m.member
                                .capabilities
                                .as_ref()
                                .and_then(|c| c.resources.as_ref()),
                            need,
                        )
                })
                .collect();
            let mut idle = idle.into_iter();
            for slot in 0..*count {
                if self.member_in(&job.job_id, *role, slot).is_some() {
                    continue;
                }
                match idle.next() {
                    Some(m) => chosen.push((m.member.member_id.clone(), *role, slot)),
                    None if pending => return false,
                    None => break,
                }
            }
        }
        if pending {
            let stage = current_stage(job);
            let served = endpoints(&stage, members)
                .iter()
                .all(|e| !e.addresses.is_empty());
            if !served {
                return false;
            }
        }
        for (member_id, role, slot) in chosen {
            self.put(&member_id, role, &job.job_id, slot);
        }
        pending
    }

    /// Keeps each live member whose stored assignment is for `job` in its
    /// slot, unless the slot is out of range or already taken.
    fn keep_members(&mut self, job: &Job, members: &[MemberRecord]) {
        let Some(spec) = job.spec.as_ref() else {
            return;
        };
        for m in members {
            let Some(a) = m.member.assignment.as_ref() else {
                continue;
            };
            if a.job_id != job.job_id || self.slots.contains_key(&m.member.member_id) {
                continue;
            }
            let (role, slot) = match &a.details {
                Some(assignment::Details::Actor(actor)) => (
                    Role::Actor as i32,
                    actor.prompts.as_ref().map_or(0, |p| p.shard_index),
                ),
                Some(assignment::Details::Learner(learner)) => (Role::Learner as i32, learner.rank),
                None => continue,
            };
            if self.roles.get(&m.member.member_id) != Some(&role) {
                continue;
            }
            let count = slot_needs(spec)
                .iter()
                .find(|(r, _, _)| *r == role)
                .map_or(0, |(_, n, _)| *n);
            if slot < count && self.member_in(&job.job_id, role, slot).is_none() {
                self.put(&m.member.member_id, role, &job.job_id, slot);
            }
        }
    }
}

/// (role, slots, resources each) of a job.
fn slot_needs(spec: &JobSpec) -> [(i32, u32, Resources); 2] {
    let r = spec.resources.clone().unwrap_or_default();
    [
        (
            Role::Learner as i32,
            r.learner_ranks.max(1),
            r.learner.unwrap_or_default(),
        ),
        (
            Role::Actor as i32,
            r.actors.max(1),
            r.actor.unwrap_or_default(),
        ),
    ]
}

/// Whether `offer` meets every non-zero requirement of `need`.
pub fn satisfies(offer: Option<&Resources>, need: &Resources) -> bool {
    let default = Resources::default();
    let offer = offer.unwrap_or(&default);
    (need.device == DeviceKind::Unspecified as i32 || offer.device == need.device)
        && offer.device_count >= need.device_count
        && offer.device_memory_bytes >= need.device_memory_bytes
        && offer.host_memory_bytes >= need.host_memory_bytes
        && offer.cpu_cores >= need.cpu_cores
}

/// Whether two assignments give the same work (generation and member id
/// aside).
fn same_work(a: &Assignment, b: &Assignment) -> bool {
    a.job_id == b.job_id && a.details == b.details && a.rollout_queue == b.rollout_queue
}

/// The metric label of a role.
pub fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Actor) => "actor",
        Ok(Role::Learner) => "learner",
        Ok(Role::RewardServer) => "reward-server",
        _ => "unknown",
    }
}

/// A per-slot seed from a job seed: splitmix64 of their combination, so
/// neighbouring slots get unrelated streams.
fn mix(seed: u64, slot: u64) -> u64 {
    let mut z = seed ^ slot.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_satisfy_only_what_they_meet() {
        let offer = Resources {
            device: DeviceKind::Cuda as i32,
            device_count: 2,
            cpu_cores: 8,
            ..Resources::default()
        };
        assert!(satisfies(Some(&offer), &Resources::default()));
        let need = Resources {
            device: DeviceKind::Cuda as i32,
            device_count: 2,
            ..Resources::default()
        };
        assert!(satisfies(Some(&offer), &need));
        let more = Resources {
            cpu_cores: 16,
            ..need.clone()
        };
        assert!(!satisfies(Some(&offer), &more));
        let cpu = Resources {
            device: DeviceKind::Cpu as i32,
            ..Resources::default()
        };
        assert!(!satisfies(Some(&offer), &cpu));
        assert!(!satisfies(None, &need));
    }

    #[test]
    fn slot_seeds_differ() {
        let seeds: BTreeSet<u64> = (0..64).map(|s| mix(7, s)).collect();
        assert_eq!(seeds.len(), 64);
    }
}

//! One attempt at a job: its rollout queue, the collective with the other
//! ranks, the trainer resumed from the latest checkpoint (every rank
//! agreeing on where it stands), and the entries a crashed incarnation had
//! taken and not acknowledged.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use encore_proto::v1::LearnerAssignment;
use encore_store::{EntryId, Queue, QueueEntry};

use super::settings::{TrainingSettings, base_dir, build_trainer, check_architecture};
use super::stages::unix_ms;
use super::{GROUP, Learner};
use crate::checkpoint::{self, LearnerCheckpoint};
use crate::collective::{Collective, CollectiveConfig, connect};
use crate::error::LearnerError;
use crate::step::Trainer;

/// What the blocking work of a step needs: the trainer and the collective
/// with the other ranks.
pub(super) struct Compute {
    /// The policy, its reference, the optimiser and the normaliser.
    pub(super) trainer: Trainer,
    /// The other ranks.
    pub(super) collective: Box<dyn Collective>,
}

/// The state of one attempt at training a job on this rank.
pub(super) struct Attempt {
    pub(super) job_id: String,
    pub(super) rank: usize,
    pub(super) world: usize,
    /// This rank's consumer name in the queue's group.
    pub(super) consumer: String,
    pub(super) settings: TrainingSettings,
    pub(super) store: Arc<dyn Queue>,
    /// Shared with the blocking threads that step, gather and checkpoint.
    pub(super) compute: Arc<Mutex<Compute>>,
    /// Step, stage, totals and what the last checkpoint covers.
    pub(super) state: LearnerCheckpoint,
    pub(super) checkpoint_root: PathBuf,
    /// Re-claimed entries to train on before reading new ones.
    pub(super) backlog: VecDeque<QueueEntry>,
    /// Entries read since the last checkpoint, acknowledged after the next.
    pub(super) pending: Vec<EntryId>,
    /// Drops since the last step on this rank; summed over ranks by the
    /// step.
    pub(super) dropped: BTreeMap<String, u64>,
    /// Combined reward means of the recent steps (a target's window).
    pub(super) recent: VecDeque<f64>,
}

impl Attempt {
    /// Runs `f` on the trainer and collective on a blocking thread (ranks
    /// wait for each other there, and steps are long).
    pub(super) async fn on_compute<R: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Compute) -> R + Send + 'static,
    ) -> Result<R, LearnerError> {
        let compute = self.compute.clone();
        tokio::task::spawn_blocking(move || {
            let mut compute = compute.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut compute)
        })
        .await
        .map_err(|e| LearnerError::Config(format!("{what} panicked: {e}")))
    }
}

impl Learner {
    /// Sets up an attempt at `job_id` as rank `work.rank`: opens the queue,
    /// forms the collective, loads the model from the latest checkpoint,
    /// checks every rank stands where rank 0 does, re-claims what a crashed
    /// incarnation held, and (rank 0, at step 0) publishes version 0.
    pub(super) async fn start(
        &self,
        job_id: &str,
        work: &LearnerAssignment,
        queue_uri: &str,
    ) -> Result<Attempt, LearnerError> {
        let spec = work
            .spec
            .clone()
            .ok_or_else(|| LearnerError::Config("the assignment carries no job spec".into()))?;
        let settings = TrainingSettings::from_spec(&spec)?;
        let rank = work.rank as usize;
        let world = work.world_size.max(1) as usize;
        tracing::info!(job_id, rank, world, "training");
        let store = encore_client::queue::open_queue(queue_uri, &self.coordinator).await?;

        // The collective (blocking: ranks wait for each other).
        let collective_config = CollectiveConfig::from_assignment(
            job_id,
            work,
            self.config.ring_secret()?,
            self.config.collective_timeout(),
        );
        let listener = self
            .listener
            .try_clone()
            .map_err(|e| LearnerError::io(Path::new(&self.advertise), e))?;
        let collective =
            tokio::task::spawn_blocking(move || connect(&collective_config, Some(listener)))
                .await
                .map_err(|e| LearnerError::Config(format!("forming the collective: {e}")))??;

        // The model, resumed from the latest checkpoint if there is one.
        let base = base_dir(&spec)?;
        check_architecture(&spec, &base)?;
        let checkpoint_root = PathBuf::from(&work.checkpoint_dir);
        let device = self.device.clone();
        let (trainer, mut state) = {
            let (settings, root) = (settings.clone(), checkpoint_root.clone());
            tokio::task::spawn_blocking(move || build_trainer(&base, &root, &settings, &device))
                .await
                .map_err(|e| LearnerError::Config(format!("loading the model: {e}")))??
        };
        // Wall-time limits count from these (kept in the checkpoint, so a
        // resumed rank counts from the job's start, not its own).
        let started_ms = unix_ms();
        if state.job_start_unix_ms == 0 {
            state.job_start_unix_ms = started_ms;
        }
        if state.stage_start_unix_ms == 0 {
            state.stage_start_unix_ms = started_ms;
        }
        let mut run = Attempt {
            job_id: job_id.to_owned(),
            rank,
            world,
            consumer: format!("rank-{rank}"),
            settings,
            store,
            compute: Arc::new(Mutex::new(Compute {
                trainer,
                collective,
            })),
            state,
            checkpoint_root,
            backlog: VecDeque::new(),
            pending: Vec::new(),
            dropped: BTreeMap::new(),
            recent: VecDeque::new(),
        };

        // Every rank found its checkpoint on its own: refuse to train
        // unless all of them stand where rank 0 does.
        let step = run.state.step;
        run.on_compute("comparing start states", move |c| {
            checkpoint::weights_sha256(&c.trainer.policy)
                .and_then(|hash| checkpoint::agree_on_start(c.collective.as_mut(), step, &hash))
        })
        .await??;

        // Entries a crashed incarnation had taken and not acknowledged are
        // used again, first: the checkpoint predates them.
        let claimed = run
            .store
            .claim_stale(job_id, GROUP, &run.consumer, Duration::ZERO, 100_000)
            .await?;
        let (trained, redo) =
            super::commit::split_claimed(claimed, &run.state.trained_unacknowledged);
        if !trained.is_empty() {
            // The checkpoint covers them; the crash came before their
            // acknowledgement.
            run.store.ack(job_id, GROUP, &trained).await?;
        }
        run.backlog = redo.into();
        if !run.backlog.is_empty() || !trained.is_empty() {
            tracing::info!(
                job_id,
                redo = run.backlog.len(),
                already_trained = trained.len(),
                "re-claimed unacknowledged rollouts"
            );
        }
        if rank == 0 && run.state.step == 0 {
            // Version 0 is the base checkpoint (a retry is a no-op).
            let stage = run.settings.stages[0].name.clone();
            self.publish_weights(&run, 0, &stage).await?;
        }
        Ok(run)
    }
}

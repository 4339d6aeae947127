//! Checkpoint, then acknowledge: every rank's unacknowledged entries go
//! into the checkpoint rank 0 writes, and only once it is durable does each
//! rank acknowledge the entries its steps used, so a crash re-delivers
//! exactly those.

use std::time::Instant;

use encore_store::{EntryId, QueueEntry};

use super::setup::Attempt;
use super::{GROUP, Learner};
use crate::checkpoint;
use crate::collective::{Collective, all_gather};
use crate::error::LearnerError;
use crate::metrics::Phase;

impl Learner {
    /// Writes a checkpoint covering the steps since the last one and
    /// acknowledges their entries; returns the entries it covers that the
    /// previous one did not (`MetricPoint.checkpoint_entry_ids`).
    pub(super) async fn checkpoint_and_ack(
        &self,
        run: &mut Attempt,
    ) -> Result<Vec<String>, LearnerError> {
        let checkpoint_started = Instant::now();
        {
            let compute = run.compute.lock().unwrap_or_else(|p| p.into_inner());
            compute
                .trainer
                .normalizer
                .clone_into(&mut run.state.normalizer);
        }
        run.state.queue_position = run.pending.last().map(ToString::to_string);
        // Every rank's unacknowledged entries go into the checkpoint (see
        // `LearnerCheckpoint::trained_unacknowledged`).
        let mine: Vec<String> = run.pending.iter().map(ToString::to_string).collect();
        let gathered = run
            .on_compute("gathering", move |c| gather(c.collective.as_mut(), &mine))
            .await??;
        // A re-delivered entry the previous checkpoint covered was skipped
        // when read, though held (and so gathered) again.
        let covered = gathered
            .iter()
            .filter(|id| !run.state.trained_unacknowledged.contains(id))
            .cloned()
            .collect();
        run.state.trained_unacknowledged = gathered;
        if run.rank == 0 {
            let (root, state, keep) = (
                run.checkpoint_root.clone(),
                run.state.clone(),
                self.config.keep_checkpoints,
            );
            run.on_compute("checkpointing", move |c| {
                checkpoint::save(&root, &state, &c.trainer.policy, &c.trainer.optimizer, keep)
            })
            .await??;
        }
        // Every rank acknowledges only once the checkpoint that covers its
        // entries is durable.
        run.on_compute("the barrier", |c| c.collective.barrier())
            .await??;
        let acknowledged = run.store.ack(&run.job_id, GROUP, &run.pending).await?;
        if acknowledged < run.pending.len() as u64 {
            // Not pending for the group any more: acknowledged already, or
            // handed to another consumer.
            tracing::warn!(
                job_id = run.job_id,
                acknowledged,
                read = run.pending.len(),
                "the queue acknowledged fewer entries than this rank read"
            );
        }
        run.pending.clear();
        self.metrics
            .phase(&run.job_id, Phase::Checkpoint, checkpoint_started.elapsed());
        Ok(covered)
    }
}

/// Every rank's `mine`, in rank order, on every rank (the lists are short:
/// the entries of one checkpoint interval).
pub(super) fn gather(
    collective: &mut dyn Collective,
    mine: &[String],
) -> Result<Vec<String>, LearnerError> {
    let mut all = Vec::new();
    for (root, bytes) in all_gather(collective, mine.join("\n").as_bytes())?
        .into_iter()
        .enumerate()
    {
        let text = String::from_utf8(bytes).map_err(|_| {
            LearnerError::StateMismatch(format!("rank {root} sent non-UTF-8 entry ids"))
        })?;
        all.extend(
            text.split('\n')
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
    }
    Ok(all)
}

/// Splits re-claimed entries into those the checkpoint already trained on
/// (to acknowledge) and those to train on again.
pub(super) fn split_claimed(
    claimed: Vec<QueueEntry>,
    trained: &[String],
) -> (Vec<EntryId>, Vec<QueueEntry>) {
    let trained: std::collections::BTreeSet<&str> = trained.iter().map(String::as_str).collect();
    let (done, redo): (Vec<QueueEntry>, Vec<QueueEntry>) = claimed
        .into_iter()
        .partition(|e| trained.contains(e.id.to_string().as_str()));
    (done.into_iter().map(|e| e.id).collect(), redo)
}

//! Membership: the learner joins through `encore_client`'s one join loop,
//! follows its assignments, and retries an attempt at a job from the last
//! checkpoint.

use std::time::Duration;

use encore_client::member::{self, Membership, instance_id};
use encore_proto::v1::{Capabilities, LearnerAssignment, ReportProgressRequest, Role, assignment};
use tokio_util::sync::CancellationToken;

use super::Learner;
use crate::error::LearnerError;

/// Attempts at training one assignment before rank 0 fails the job.
const TRAIN_ATTEMPTS: u32 = 3;
/// Pause before the second attempt; it doubles for each one after.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// Longest pause between tries while the coordinator is out of reach.
const MAX_UNREACHABLE_BACKOFF: Duration = Duration::from_secs(5);
/// Longest pause between tries to join the coordinator.
const MAX_JOIN_BACKOFF: Duration = Duration::from_secs(5);

impl member::MemberWork for Learner {
    fn with_membership(&self, membership: &Membership) -> impl Future<Output = ()> + Send {
        self.follow(membership)
    }
}

impl Learner {
    /// Works until `shutdown`: joins, trains each assignment, joins again
    /// after a lost lease, leaves on the way out.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), LearnerError> {
        let instance = if self.config.instance_id.is_empty() {
            instance_id("learner")
        } else {
            self.config.instance_id.clone()
        };
        let capabilities = Capabilities {
            address: self.advertise.clone(),
            ..member::capabilities(self.device.is_cuda())
        };
        member::stay_joined(
            &self.coordinator,
            Role::Learner,
            capabilities,
            &instance,
            MAX_JOIN_BACKOFF,
            &shutdown,
            self,
        )
        .await;
        Ok(())
    }

    /// Trains each assignment as it comes until the membership ends.
    async fn follow(&self, membership: &Membership) {
        let mut assigned = membership.assignments.clone();
        loop {
            let current = assigned.borrow_and_update().clone();
            let generation = current.generation;
            membership.update_status(|s| s.applied_generation = generation);
            if let (Some(assignment::Details::Learner(work)), false) =
                (current.details.clone(), current.job_id.is_empty())
            {
                let scope = membership.assignment_scope(generation);
                let queue_uri = current.rollout_queue.map(|q| q.uri).unwrap_or_default();
                self.train_with_retries(
                    membership,
                    &current.job_id,
                    &work,
                    &queue_uri,
                    &scope.cancel,
                )
                .await;
            }
            tokio::select! {
                () = membership.lost.cancelled() => return,
                changed = assigned.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Trains an assignment; a failed attempt (a peer that died, a step
    /// that failed) is retried from the last checkpoint with back-off. A
    /// coordinator or queue out of reach is waited out, from the last
    /// checkpoint too, without counting as an attempt. After
    /// [`TRAIN_ATTEMPTS`] failures rank 0 fails the job with the error, so
    /// that it does not stay RUNNING with nobody training it.
    async fn train_with_retries(
        &self,
        membership: &Membership,
        job_id: &str,
        work: &LearnerAssignment,
        queue_uri: &str,
        cancel: &CancellationToken,
    ) {
        let mut backoff = RETRY_BACKOFF;
        let mut away = RETRY_BACKOFF;
        let mut attempt = 0;
        while attempt < TRAIN_ATTEMPTS {
            let error = match self
                .train(membership, job_id, work, queue_uri, cancel)
                .await
            {
                Ok(()) => {
                    tracing::info!(job_id, "job done on this rank");
                    return;
                }
                Err(e) if cancel.is_cancelled() => {
                    tracing::info!(job_id, reason = %e, "assignment ended");
                    return;
                }
                // The coordinator or the queue away (a restart): wait for
                // it without using up an attempt. A lease that runs out
                // meanwhile ends the assignment through `cancel`.
                Err(e) if e.is_unreachable() => {
                    tracing::warn!(job_id, error = %e, retry_in = ?away,
                        "the coordinator or the queue is out of reach; retrying from the last checkpoint");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(away) => {}
                    }
                    away = (away * 2).min(MAX_UNREACHABLE_BACKOFF);
                    continue;
                }
                Err(e) => e,
            };
            attempt += 1;
            away = RETRY_BACKOFF;
            if attempt < TRAIN_ATTEMPTS {
                tracing::warn!(job_id, attempt, error = %error, retry_in = ?backoff,
                    "training failed; retrying from the last checkpoint");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff *= 2;
                continue;
            }
            tracing::error!(job_id, attempt, error = %error, "training failed; giving up");
            if work.rank != 0 {
                // Only rank 0 may end the job; it fails too once this rank
                // is gone from the collective.
                return;
            }
            let failed = self
                .cluster()
                .report_progress(ReportProgressRequest {
                    member_id: membership.member_id.clone(),
                    job_id: job_id.to_owned(),
                    metrics: Vec::new(),
                    stage_change: None,
                    stop_reason: 0,
                    failure_message: format!(
                        "learner rank 0 failed {TRAIN_ATTEMPTS} times; last error: {error}"
                    ),
                })
                .await;
            if let Err(status) = failed {
                tracing::error!(job_id, error = %status, "reporting the failure failed");
            }
        }
    }
}

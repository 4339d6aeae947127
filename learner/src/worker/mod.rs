//! The learner rank process: joins the cluster, waits for a learner
//! assignment, forms the collective with the other ranks, and trains.
//!
//! ```text
//!  assignment (rank, world, peers, spec, checkpoint dir, rollout queue)
//!   ├─ resume from the latest complete checkpoint (weights, optimiser,
//!   │  normaliser, step, stage); re-claim queue entries a crashed
//!   │  incarnation had taken but not acknowledged
//!   └─ per step: read this rank's share (whole ScoredBatches) from the queue
//!        ├─ drop on purpose, counted: stale (older than max_staleness
//!        │  versions), another stage, undecodable or malformed (a score
//!        │  missing or not finite, a short group)
//!        ├─ Trainer::step (all-reduce, AdamW)             [crate::step]
//!        ├─ rank 0: publish weights every publish_every_steps,
//!        │  report the metric point (ClusterService.ReportProgress)
//!        ├─ checkpoint every checkpoint_every_steps (rank 0 writes; every
//!        │  rank then acknowledges the entries its steps used: a crash
//!        │  re-delivers exactly those)
//!        └─ stage stop conditions: next stage, or the job's end
//! ```

//!
//! The parts, each its own module: `membership` (joining, following
//! assignments, retrying an attempt), `setup` (one attempt's queue,
//! collective, model and resumed state), `rollouts` (reading this rank's
//! share and dropping what may not be trained on), `publish` (weights and
//! progress reports to the coordinator), `commit` (checkpoint, then
//! acknowledge), `stages` (stop conditions and stage changes) and
//! `settings` (the job's plan in the learner's terms).

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use encore_client::member::{ClusterClient, CoordinatorClient, Membership, WeightClient};
use encore_proto::v1::{JobState, LearnerAssignment, MetricPoint};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::LearnerError;
use crate::metrics::{Metrics, Phase};

mod commit;
mod membership;
mod publish;
mod rollouts;
mod settings;
mod setup;
mod stages;

use self::stages::Stop;

/// Consumer group of the learner ranks (as the coordinator names it).
const GROUP: &str = "learners";
/// How long one queue read blocks before the loop looks around again.
const READ_BLOCK: Duration = Duration::from_secs(1);

/// A learner rank.
pub struct Learner {
    config: Config,
    device: Device,
    coordinator: CoordinatorClient,
    listener: TcpListener,
    advertise: String,
    metrics: Metrics,
}

impl Learner {
    /// Binds the collective listener, prepares the coordinator channel and
    /// registers the metrics on `registry`.
    pub fn new(config: Config, registry: &prometheus::Registry) -> Result<Self, LearnerError> {
        let metrics = Metrics::new(registry)?;
        let device = encore_model::device(&config.device)?;
        let coordinator =
            CoordinatorClient::new(&config.coordinator, &config.token()?, config.tls.as_ref())
                .map_err(|e| LearnerError::Config(format!("learner.{e}")))?;
        let listener = TcpListener::bind(config.listen)
            .map_err(|e| LearnerError::io(Path::new(&config.listen.to_string()), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| LearnerError::io(Path::new(&config.listen.to_string()), e))?;
        let advertise = if config.advertise.is_empty() {
            bound.to_string()
        } else {
            config.advertise.clone()
        };
        Ok(Self {
            config,
            device,
            coordinator,
            listener,
            advertise,
            metrics,
        })
    }

    fn cluster(&self) -> ClusterClient {
        self.coordinator.cluster()
    }

    fn weights(&self) -> WeightClient {
        self.coordinator.weights()
    }

    /// Trains `job_id` as rank `work.rank` until the job ends or `cancel`:
    /// sets the attempt up, then steps until a stop condition ends the job.
    async fn train(
        &self,
        membership: &Membership,
        job_id: &str,
        work: &LearnerAssignment,
        queue_uri: &str,
        cancel: &CancellationToken,
    ) -> Result<(), LearnerError> {
        let mut run = self.start(job_id, work, queue_uri).await?;
        loop {
            let stage = run.stage();
            let started = Instant::now();
            let Some(rollouts) = self.collect(membership, &mut run, &stage, cancel).await? else {
                // A wall time ended the job while rollouts were awaited.
                return Ok(());
            };
            let step = self.take_step(&mut run, &stage, rollouts, started).await?;
            if run.rank == 0 && run.state.step % run.settings.publish_every == 0 {
                self.publish_next(membership, &mut run, &stage.name).await?;
            }
            self.metrics
                .policy_version(job_id, run.state.policy_version);
            let stop = run.stop_after_step(&stage);
            let covered = if run.state.step % run.settings.checkpoint_every == 0 || stop.is_some() {
                self.checkpoint_and_ack(&mut run).await?
            } else {
                Vec::new()
            };
            if run.rank == 0 {
                let report_started = Instant::now();
                let point = MetricPoint {
                    checkpoint_entry_ids: covered,
                    ..run.metric_point(&stage, &step)
                };
                let answer = self
                    .report(
                        membership,
                        job_id,
                        Some(point),
                        run.stage_change(stop),
                        stop.filter(|s| s.ends_job).map(|s| s.reason),
                    )
                    .await?;
                self.metrics
                    .phase(job_id, Phase::Report, report_started.elapsed());
                if JobState::try_from(answer).is_ok_and(JobState::is_terminal) {
                    tracing::info!(job_id, step = run.state.step, "the job has ended");
                    return Ok(());
                }
            }
            if let Some(Stop { ends_job: true, .. }) = stop {
                return Ok(());
            }
            run.advance(stop);
            if cancel.is_cancelled() {
                return Err(LearnerError::Cancelled);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use encore_proto::v1::{
        AlgorithmKind, JobSpec, Rollout, ScoredBatch, Stage, StopCondition, StopReason,
    };
    use encore_store::{EntryId, QueueEntry};
    use prost::Message;

    use super::commit::split_claimed;
    use super::publish::superseded;
    use super::rollouts::usable;
    use super::settings::{TrainingSettings, reward_specs};
    use super::stages::{Stop, stop_reason};
    use crate::checkpoint::LearnerCheckpoint;

    fn entry(id: &str) -> QueueEntry {
        QueueEntry {
            id: id.parse().unwrap(),
            payload: Vec::new(),
        }
    }

    #[test]
    fn the_jobs_own_stop_and_wall_times_end_stages_and_jobs() {
        let secs = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
        let stage = Stage {
            name: "R".into(),
            rewards: Vec::new(),
            stop: Some(StopCondition {
                max_steps: Some(100),
                max_wall_time: secs(2),
                ..StopCondition::default()
            }),
        };
        let state = LearnerCheckpoint {
            step: 5,
            stage_start_step: 2,
            job_start_unix_ms: 1_000,
            stage_start_unix_ms: 4_000,
            ..LearnerCheckpoint::default()
        };
        let recent = VecDeque::new();
        let at = |job_stop: Option<&StopCondition>, last_stage, now_ms| {
            stop_reason(&stage, job_stop, last_stage, &state, &recent, now_ms)
        };
        let stop = |reason, ends_job| Some(Stop { reason, ends_job });
        // The stage's wall time counts from the stage's start.
        assert_eq!(at(None, false, 5_999), None);
        assert_eq!(at(None, false, 6_000), stop(StopReason::WallTime, false));
        assert_eq!(at(None, true, 6_000), stop(StopReason::WallTime, true));
        // The job's own bounds end the job in any stage: steps over all
        // stages, wall time from the job's start.
        let job = StopCondition {
            max_steps: Some(5),
            ..StopCondition::default()
        };
        assert_eq!(at(Some(&job), false, 0), stop(StopReason::MaxSteps, true));
        let job = StopCondition {
            max_steps: Some(6),
            max_wall_time: secs(3),
            ..StopCondition::default()
        };
        assert_eq!(at(Some(&job), false, 3_999), None);
        assert_eq!(
            at(Some(&job), false, 4_000),
            stop(StopReason::WallTime, true)
        );
    }

    /// A batch of `groups` groups of 2 rollouts scored by "quality".
    fn scored_batch(groups: usize) -> ScoredBatch {
        ScoredBatch {
            stage: "main".into(),
            rollouts: (0..2 * groups)
                .map(|i| Rollout {
                    group_id: format!("g{}", i / 2),
                    sample_index: (i % 2) as u32,
                    group_size: 2,
                    tokens: vec![1, 2, 3],
                    behaviour_log_probs: vec![-1.0; 3],
                    scores: [(
                        "quality".to_owned(),
                        encore_proto::v1::Score {
                            value: 3.0,
                            details: None,
                        },
                    )]
                    .into(),
                    ..Rollout::default()
                })
                .collect(),
            ..ScoredBatch::default()
        }
    }

    #[test]
    fn malformed_batches_are_dropped_as_invalid_with_their_rollouts() {
        let specs = reward_specs(&Stage {
            name: "main".into(),
            rewards: vec![encore_proto::v1::RewardConfig {
                model: Some(encore_proto::v1::ModelRef {
                    name: "quality".into(),
                    ..Default::default()
                }),
                weight: 1.0,
                normalization: None,
            }],
            stop: None,
        })
        .unwrap();
        let check = |batch: &ScoredBatch| {
            let entry = QueueEntry {
                id: "1-0".parse().unwrap(),
                payload: batch.encode_to_vec(),
            };
            usable(&entry, "main", &specs, 2, 0, 2).map(|b| b.rollouts.len())
        };
        assert_eq!(check(&scored_batch(2)), Ok(4));
        type Breakage = (&'static str, fn(&mut ScoredBatch));
        let broken: [Breakage; 6] = [
            ("missing score", |b| b.rollouts[1].scores.clear()),
            ("NaN score", |b| {
                b.rollouts[2].scores.get_mut("quality").unwrap().value = f64::NAN
            }),
            ("infinite score", |b| {
                b.rollouts[0].scores.get_mut("quality").unwrap().value = f64::INFINITY
            }),
            ("short group", |b| {
                b.rollouts.pop();
            }),
            ("groups mixed up", |b| b.rollouts.swap(1, 2)),
            ("NaN log-prob", |b| {
                b.rollouts[3].behaviour_log_probs[1] = f32::NAN
            }),
        ];
        for (what, breaks) in broken {
            let mut batch = scored_batch(2);
            breaks(&mut batch);
            let n = batch.rollouts.len() as u64;
            assert_eq!(check(&batch), Err(("invalid", n)), "{what}");
        }
    }

    #[test]
    fn the_learning_rate_warms_up_linearly_then_holds() {
        let spec = JobSpec {
            stages: vec![Stage::default()],
            algorithm: Some(encore_proto::v1::Algorithm {
                learning_rate: 1e-3,
                warmup_steps: 4,
                ppo_epochs: 3,
                samples_per_prompt: 2,
                batch_size: 2,
                ..encore_proto::v1::Algorithm::default()
            }),
            resources: Some(encore_proto::v1::JobResources {
                actors: 1,
                learner_ranks: 1,
                ..encore_proto::v1::JobResources::default()
            }),
            ..JobSpec::default()
        };
        let effective = |spec: &JobSpec| encore_spec::fill_defaults(spec);
        let plan = TrainingSettings::from_spec(&effective(&spec)).unwrap();
        let lr: Vec<f64> = (1..=6).map(|s| plan.learning_rate_at(s)).collect();
        assert_eq!(lr, [0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3]);
        assert_eq!(plan.epochs, 3);
        let no_warmup = TrainingSettings::from_spec(&effective(&JobSpec {
            algorithm: Some(encore_proto::v1::Algorithm {
                learning_rate: 1e-3,
                kind: AlgorithmKind::Reinforce as i32,
                ppo_epochs: 3,
                samples_per_prompt: 2,
                batch_size: 2,
                ..encore_proto::v1::Algorithm::default()
            }),
            ..spec
        }))
        .unwrap();
        assert_eq!(no_warmup.learning_rate_at(1), 1e-3);
        assert_eq!(no_warmup.epochs, 1, "REINFORCE takes one pass");
    }

    #[test]
    fn only_a_later_committed_version_makes_a_refused_publish_a_success() {
        use encore_coordinator::Error;
        // As the coordinator answers them (its one conversion to a status).
        let later = tonic::Status::from(Error::VersionNotMonotonic(
            "header.version: 3 is not above 5".into(),
        ));
        assert!(superseded(&later), "{later:?}");
        let refusals = [
            Error::JobTerminal {
                job_id: "j".into(),
                state: "CANCELLED".into(),
                action: "given new weight versions",
            },
            Error::NotAssigned {
                member_id: "m".into(),
                why: "is not rank 0 of job \"j\"'s learner".into(),
            },
            Error::LeaseExpired("m".into()),
            Error::Store(encore_store::StoreError::LeaseExpired {
                member_id: "m".into(),
            }),
        ];
        for refusal in refusals {
            let status = tonic::Status::from(refusal);
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
            assert!(!superseded(&status), "{status:?}");
        }
        // The code alone, without the reason, is not enough either.
        assert!(!superseded(&tonic::Status::failed_precondition(
            "not above the latest"
        )));
    }

    #[test]
    fn entries_the_checkpoint_trained_on_are_acknowledged_not_redone() {
        let claimed = vec![entry("5-0"), entry("6-0"), entry("7-1")];
        let (done, redo) = split_claimed(claimed, &["6-0".into(), "9-9".into()]);
        assert_eq!(done, vec!["6-0".parse::<EntryId>().unwrap()]);
        let redo: Vec<String> = redo.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(redo, ["5-0", "7-1"]);
    }
}

//! [`JobPlan`]: the effective spec as typed values, which the reconciler,
//! the actors (through the assignments the reconciler builds from it) and
//! the learner read instead of picking at the proto.
//!
//! ```text
//!  JobSpec ──validate──▶ JobPlan (the submit's answer: the spec is good)
//!          ──with_defaults──▶ effective JobSpec (stored, assigned)
//!                              ──JobPlan::of──▶ the same JobPlan, on any process
//! ```
//!
//! Defaults live in one place, [`fill_defaults`](crate::fill_defaults);
//! the seeds a job draws stay in the effective spec's `seeds`.
//! [`JobPlan::of`] reads an effective spec and never defaults again: a
//! value the defaults fill that is missing is an error naming the field,
//! which only a spec that did not pass through the coordinator can cause.

use encore_proto::status::Violations;
use encore_proto::v1::{AlgorithmKind, JobSpec, KlEstimator, SamplingParams, Stage, StopCondition};

/// What a job does, typed and with every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPlan {
    /// The stages, in order (an effective spec always lists at least one).
    pub stages: Vec<Stage>,
    /// The job's own stop condition, next to each stage's.
    pub job_stop: Option<StopCondition>,
    /// PPO or REINFORCE.
    pub algorithm: AlgorithmKind,
    /// K: clips sampled per prompt, the group of the advantages (>= 2).
    pub samples_per_prompt: u32,
    /// Clips per optimiser step over all learner ranks.
    pub batch_size: u32,
    /// Clips per forward/backward pass on a rank; 0: the rank's whole batch.
    pub micro_batch_size: u32,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: u32,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// β: weight of the KL penalty to the base policy.
    pub kl_coef: f64,
    /// Which KL estimator the penalty uses.
    pub kl_estimator: KlEstimator,
    /// PPO's clip range ε.
    pub clip_range: f64,
    /// Versions a rollout may lag behind the learner's policy.
    pub max_staleness: u32,
    /// Gradient norm clipping.
    pub max_grad_norm: f64,
    /// Passes over each batch (1 for REINFORCE).
    pub epochs: u32,
    /// Weight of the entropy bonus (0: none).
    pub entropy_coef: f64,
    /// How actors sample.
    pub sampling: SamplingParams,
    /// Steps between weight publications.
    pub publish_every_steps: u32,
    /// Steps between learner checkpoints.
    pub checkpoint_every_steps: u32,
    /// Actor processes.
    pub actors: u32,
    /// Learner ranks.
    pub learner_ranks: u32,
}

impl JobPlan {
    /// The plan of an effective spec (what
    /// [`with_defaults`](crate::with_defaults) returns and `Job.spec`
    /// holds). Fails, naming each field, if the spec lacks a value the
    /// defaults fill.
    pub fn of(effective: &JobSpec) -> Result<JobPlan, Violations> {
        let mut bad = Violations::default();
        let mut missing = |field: &str| {
            bad.invalid(
                format!("spec.{field}"),
                "missing from the effective spec (the coordinator fills it)",
            );
        };
        if effective.stages.is_empty() {
            missing("stages");
        }
        let algorithm = effective.algorithm.unwrap_or_default();
        if effective.algorithm.is_none() {
            missing("algorithm");
        }
        let kind = AlgorithmKind::try_from(algorithm.kind).unwrap_or(AlgorithmKind::Unspecified);
        if kind == AlgorithmKind::Unspecified {
            missing("algorithm.kind");
        }
        let clip_range = algorithm.clip_range.unwrap_or_else(|| {
            missing("algorithm.clip_range");
            0.0
        });
        let max_staleness = algorithm.max_staleness.unwrap_or_else(|| {
            missing("algorithm.max_staleness");
            0
        });
        let max_grad_norm = algorithm.max_grad_norm.unwrap_or_else(|| {
            missing("algorithm.max_grad_norm");
            0.0
        });
        if algorithm.ppo_epochs == 0 {
            missing("algorithm.ppo_epochs");
        }
        let sampling = algorithm.sampling.unwrap_or_else(|| {
            missing("algorithm.sampling");
            SamplingParams::default()
        });
        if effective.publish_every_steps == 0 {
            missing("publish_every_steps");
        }
        if effective.checkpoint_every_steps == 0 {
            missing("checkpoint_every_steps");
        }
        let resources = effective.resources.clone().unwrap_or_default();
        // What the consumers divide by and index with; `validate` refuses
        // specs without them, so only a spec that bypassed it fails here.
        for (field, n, least) in [
            (
                "algorithm.samples_per_prompt",
                algorithm.samples_per_prompt,
                2,
            ),
            ("algorithm.batch_size", algorithm.batch_size, 1),
            ("resources.actors", resources.actors, 1),
            ("resources.learner_ranks", resources.learner_ranks, 1),
        ] {
            if n < least {
                bad.invalid(format!("spec.{field}"), format!("must be at least {least}"));
            }
        }
        bad.into_result()?;
        Ok(JobPlan {
            stages: effective.stages.clone(),
            job_stop: effective.stop,
            algorithm: kind,
            samples_per_prompt: algorithm.samples_per_prompt,
            batch_size: algorithm.batch_size,
            micro_batch_size: algorithm.micro_batch_size,
            learning_rate: algorithm.learning_rate,
            warmup_steps: algorithm.warmup_steps,
            weight_decay: algorithm.weight_decay,
            kl_coef: algorithm.kl_coef,
            // The protocol: unspecified is k3.
            kl_estimator: match KlEstimator::try_from(algorithm.kl_estimator) {
                Ok(KlEstimator::K2) => KlEstimator::K2,
                _ => KlEstimator::K3,
            },
            clip_range,
            max_staleness,
            max_grad_norm,
            // REINFORCE takes one pass whatever ppo_epochs says.
            epochs: if kind == AlgorithmKind::Reinforce {
                1
            } else {
                algorithm.ppo_epochs
            },
            // The protocol: unset disables the bonus.
            entropy_coef: algorithm.entropy_coef.unwrap_or(0.0),
            sampling,
            publish_every_steps: effective.publish_every_steps,
            checkpoint_every_steps: effective.checkpoint_every_steps,
            actors: resources.actors,
            learner_ranks: resources.learner_ranks,
        })
    }
}

//! The job's plan in the learner's terms, and what it loads: the base
//! checkpoint, the trainer resumed from the latest checkpoint, the stage's
//! reward specs.

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::ParamsAdamW;
use encore_policies::AnyTrainable;
use encore_proto::v1::{
    AlgorithmKind, JobSpec, NormalizationKind as ProtoKind, Stage, StopCondition,
};
use encore_spec::JobPlan;

use crate::checkpoint::{self, LearnerCheckpoint};
use crate::error::LearnerError;
use crate::loss::{Algorithm, KlEstimator, LossConfig};
use crate::normalize::{Normalization, NormalizationKind, RewardSpec};
use crate::optim::{AdamW, named_vars};
use crate::step::Trainer;

/// What a job's plan says about training, in the learner's terms.
#[derive(Debug, Clone)]
pub(super) struct TrainingSettings {
    pub(super) stages: Vec<Stage>,
    /// The job's own stop condition, next to each stage's (a job with
    /// explicit stages; without, it is the one stage's).
    pub(super) job_stop: Option<StopCondition>,
    pub(super) k: usize,
    pub(super) batch_size: usize,
    pub(super) max_staleness: u64,
    pub(super) publish_every: u64,
    pub(super) checkpoint_every: u64,
    pub(super) loss: LossConfig,
    pub(super) params: ParamsAdamW,
    pub(super) max_grad_norm: f64,
    pub(super) micro_batch: usize,
    pub(super) epochs: usize,
    pub(super) learning_rate: f64,
    pub(super) warmup_steps: u64,
}

impl TrainingSettings {
    /// The learning rate of step `step` (1-based): linear warm-up over
    /// `warmup_steps`, then constant.
    pub(super) fn learning_rate_at(&self, step: u64) -> f64 {
        if self.warmup_steps == 0 {
            return self.learning_rate;
        }
        self.learning_rate * (step as f64 / self.warmup_steps as f64).min(1.0)
    }
}

impl TrainingSettings {
    /// The training settings of an effective spec, read through the one
    /// [`JobPlan`] every part of Encore reads (its defaults applied by the
    /// coordinator, never again here).
    pub(super) fn from_spec(spec: &JobSpec) -> Result<Self, LearnerError> {
        let plan = JobPlan::of(spec).map_err(|bad| LearnerError::Config(bad.to_string()))?;
        Ok(Self {
            stages: plan.stages,
            job_stop: plan.job_stop,
            k: plan.samples_per_prompt as usize,
            batch_size: plan.batch_size as usize,
            max_staleness: u64::from(plan.max_staleness),
            publish_every: u64::from(plan.publish_every_steps),
            checkpoint_every: u64::from(plan.checkpoint_every_steps),
            loss: LossConfig {
                algorithm: if plan.algorithm == AlgorithmKind::Reinforce {
                    Algorithm::Reinforce
                } else {
                    Algorithm::Ppo
                },
                clip_range: plan.clip_range,
                kl_coef: plan.kl_coef,
                kl_estimator: if plan.kl_estimator == encore_proto::v1::KlEstimator::K2 {
                    KlEstimator::K2
                } else {
                    KlEstimator::K3
                },
                entropy_coef: plan.entropy_coef,
            },
            params: ParamsAdamW {
                lr: plan.learning_rate,
                weight_decay: plan.weight_decay,
                ..ParamsAdamW::default()
            },
            max_grad_norm: plan.max_grad_norm,
            micro_batch: plan.micro_batch_size as usize,
            epochs: plan.epochs as usize,
            learning_rate: plan.learning_rate,
            warmup_steps: u64::from(plan.warmup_steps),
        })
    }
}

/// The directory of the base checkpoint (`uri` names it or its weights
/// file).
pub(super) fn base_dir(spec: &JobSpec) -> Result<PathBuf, LearnerError> {
    let uri = spec
        .base_checkpoint
        .as_ref()
        .map(|m| m.uri.as_str())
        .unwrap_or_default();
    let path = PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri));
    if path.is_dir() {
        Ok(path)
    } else if let Some(parent) = path.parent().filter(|_| path.is_file()) {
        Ok(parent.to_owned())
    } else {
        Err(LearnerError::Config(format!(
            "spec.base_checkpoint.uri: {uri:?} is neither a checkpoint directory nor its weights file"
        )))
    }
}

/// Refuses a base checkpoint of another kind than `spec.architecture` names.
pub(super) fn check_architecture(spec: &JobSpec, base: &Path) -> Result<(), LearnerError> {
    use encore_policies::Architecture;
    use encore_proto::v1::PolicyArchitecture;
    let wanted = match PolicyArchitecture::try_from(spec.architecture) {
        Ok(PolicyArchitecture::Tiny) => Architecture::Tiny,
        Ok(PolicyArchitecture::Musicgen) => Architecture::Musicgen,
        Ok(PolicyArchitecture::Unspecified) | Err(_) => return Ok(()),
    };
    let found = Architecture::of_checkpoint(base)?;
    if found != wanted {
        return Err(LearnerError::Config(format!(
            "spec.architecture: {} but base_checkpoint.uri {} holds a {} checkpoint",
            wanted.name(),
            base.display(),
            found.name()
        )));
    }
    Ok(())
}

/// The trainer, from the latest checkpoint under `root` if any, else from
/// the base checkpoint; and the learner state to go on from.
pub(super) fn build_trainer(
    base: &Path,
    root: &Path,
    plan: &TrainingSettings,
    device: &Device,
) -> Result<(Trainer, LearnerCheckpoint), LearnerError> {
    let policy = AnyTrainable::load(base, device)?;
    let reference = policy.frozen()?;
    let vars = named_vars(&policy.vars);
    let mut optimizer = AdamW::new(vars.clone(), plan.params.clone())?;
    let mut state = LearnerCheckpoint {
        stage: plan.stages[0].name.clone(),
        ..LearnerCheckpoint::default()
    };
    if let Some((dir, _)) = checkpoint::latest(root)? {
        state = checkpoint::load(&dir, &policy, &mut optimizer)?;
        tracing::info!(step = state.step, dir = %dir.display(), "resumed from checkpoint");
    }
    let normalizer = state.normalizer.clone();
    Ok((
        Trainer {
            policy,
            reference,
            vars,
            optimizer,
            normalizer,
            loss: plan.loss,
            max_grad_norm: plan.max_grad_norm,
            micro_batch: plan.micro_batch,
            epochs: plan.epochs,
        },
        state,
    ))
}

/// The learner's reward specs for a stage.
pub(super) fn reward_specs(stage: &Stage) -> Result<Vec<RewardSpec>, LearnerError> {
    stage
        .rewards
        .iter()
        .map(|r| {
            let n = r.normalization.unwrap_or_default();
            Ok(RewardSpec {
                model: r.model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                weight: r.weight,
                normalization: Normalization {
                    kind: if n.kind == ProtoKind::None as i32 {
                        NormalizationKind::None
                    } else if n.kind == ProtoKind::GroupZScore as i32 {
                        NormalizationKind::GroupZScore
                    } else {
                        NormalizationKind::RunningZScore
                    },
                    // Filled in the effective spec wherever it is used;
                    // NONE reads no decay.
                    ema_decay: n.ema_decay.unwrap_or(encore_spec::DEFAULT_EMA_DECAY),
                    clip: n.clip,
                },
            })
        })
        .collect()
}

//! Stage control: which stop condition holds after a step (the job's own,
//! then the stage's), a wall time that passes while rollouts are awaited,
//! and moving on to the next stage.

use std::collections::VecDeque;
use std::time::Duration;

use encore_proto::v1::{Stage, StageChange, StopCondition, StopReason};

use super::settings::TrainingSettings;
use super::setup::Attempt;
use crate::checkpoint::LearnerCheckpoint;

/// A stop condition that holds after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stop {
    pub(super) reason: StopReason,
    /// The job ends (its own condition, or the last stage's); otherwise
    /// the next stage begins.
    pub(super) ends_job: bool,
}

/// Which stop condition holds after the step, if any: the job's own
/// (`job_stop`: its steps count over all stages, its wall time from the
/// job's start), then `stage`'s (counting from the stage's start). `now_ms`
/// is the time in milliseconds since the Unix epoch.
pub(super) fn stop_reason(
    stage: &Stage,
    job_stop: Option<&StopCondition>,
    last_stage: bool,
    state: &LearnerCheckpoint,
    recent: &VecDeque<f64>,
    now_ms: u64,
) -> Option<Stop> {
    let ends_job = |reason| {
        Some(Stop {
            reason,
            ends_job: true,
        })
    };
    if let Some(stop) = job_stop {
        if stop.max_steps.is_some_and(|max| state.step >= max) {
            return ends_job(StopReason::MaxSteps);
        }
        if past(stop.max_wall_time.as_ref(), state.job_start_unix_ms, now_ms) {
            return ends_job(StopReason::WallTime);
        }
    }
    let stop = stage.stop.as_ref()?;
    let target_met = stop.target_reward.is_some_and(|target| {
        let window = stop.target_window.max(1) as usize;
        recent.len() >= window && recent.iter().sum::<f64>() / recent.len() as f64 >= target
    });
    let reason = if stop
        .max_steps
        .is_some_and(|max| state.step - state.stage_start_step >= max)
    {
        StopReason::MaxSteps
    } else if target_met {
        StopReason::TargetReward
    } else if past(
        stop.max_wall_time.as_ref(),
        state.stage_start_unix_ms,
        now_ms,
    ) {
        StopReason::WallTime
    } else {
        return None;
    };
    Some(Stop {
        reason,
        ends_job: last_stage,
    })
}

/// Whether a wall time that ends the job has passed (checked while waiting
/// for rollouts, between steps).
pub(super) fn waited_out(
    stage: &Stage,
    plan: &TrainingSettings,
    last_stage: bool,
    state: &LearnerCheckpoint,
    recent: &VecDeque<f64>,
) -> bool {
    let stop = stop_reason(
        stage,
        plan.job_stop.as_ref(),
        last_stage,
        state,
        recent,
        unix_ms(),
    );
    stop.is_some_and(|s| s.ends_job && s.reason == StopReason::WallTime)
}

/// Whether `limit` (none: no limit) has passed between `since_ms` and
/// `now_ms`.
pub(super) fn past(limit: Option<&prost_types::Duration>, since_ms: u64, now_ms: u64) -> bool {
    limit
        .and_then(|d| Duration::try_from(*d).ok())
        .is_some_and(|d| u128::from(now_ms.saturating_sub(since_ms)) >= d.as_millis())
}

/// Milliseconds since the Unix epoch.
pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Attempt {
    /// The stage the next step trains.
    pub(super) fn stage(&self) -> Stage {
        self.settings.stages[self.state.stage_index as usize].clone()
    }

    /// Whether this is the job's last stage.
    pub(super) fn last_stage(&self) -> bool {
        self.state.stage_index as usize + 1 >= self.settings.stages.len()
    }

    /// The stop condition that holds after the step just taken, if any.
    pub(super) fn stop_after_step(&self, stage: &Stage) -> Option<Stop> {
        stop_reason(
            stage,
            self.settings.job_stop.as_ref(),
            self.last_stage(),
            &self.state,
            &self.recent,
            unix_ms(),
        )
    }

    /// The stage change a stop that does not end the job reports.
    pub(super) fn stage_change(&self, stop: Option<Stop>) -> Option<StageChange> {
        match stop {
            Some(Stop {
                ends_job: false, ..
            }) => Some(StageChange {
                stage_index: self.state.stage_index + 1,
                stage: self.settings.stages[self.state.stage_index as usize + 1]
                    .name
                    .clone(),
                step: self.state.step,
            }),
            _ => None,
        }
    }

    /// Moves on to the next stage when `stop` ends only the stage.
    pub(super) fn advance(&mut self, stop: Option<Stop>) {
        if let Some(Stop {
            ends_job: false, ..
        }) = stop
        {
            self.state.stage_index += 1;
            self.state.stage = self.settings.stages[self.state.stage_index as usize]
                .name
                .clone();
            self.state.stage_start_step = self.state.step;
            self.state.stage_start_unix_ms = unix_ms();
            self.recent.clear();
        }
    }
}

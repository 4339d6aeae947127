//! Talking to the coordinator while training: the latest committed
//! version, publishing weights (rank 0), reporting a step's progress.

use std::path::{Path, PathBuf};
use std::time::Instant;

use encore_client::member::Membership;
use encore_client::weights::{PublishData, PublishError, publish};
use encore_policies::AnyTrainable;
use encore_proto::v1::{
    ErrorReason, GetManifestRequest, MetricPoint, PublishHeader, ReportProgressRequest,
    StageChange, StopReason, WeightFormat,
};

use super::Learner;
use super::setup::Attempt;
use crate::error::LearnerError;
use crate::metrics::Phase;

impl Learner {
    /// The job's latest committed version, if the coordinator answers.
    pub(super) async fn latest_version(&self, job_id: &str) -> Option<u64> {
        self.weights()
            .get_manifest(GetManifestRequest {
                job_id: job_id.to_owned(),
                version: None,
            })
            .await
            .ok()
            .and_then(|m| m.into_inner().version.map(|v| v.version))
    }

    /// Rank 0 publishes the next version after a step and says so in its
    /// heartbeats.
    pub(super) async fn publish_next(
        &self,
        membership: &Membership,
        run: &mut Attempt,
        stage: &str,
    ) -> Result<(), LearnerError> {
        let publish_started = Instant::now();
        run.state.policy_version += 1;
        let version = run.state.policy_version;
        self.publish_weights(run, version, stage).await?;
        let job_id = run.job_id.clone();
        membership.update_status(|s| {
            s.policy_version = Some(encore_proto::v1::PolicyVersion {
                job_id,
                version,
                sha256: String::new(),
            })
        });
        self.metrics
            .phase(&run.job_id, Phase::Publish, publish_started.elapsed());
        Ok(())
    }

    /// Publishes the policy's weights as `version` of the job, at the
    /// attempt's step.
    pub(super) async fn publish_weights(
        &self,
        run: &Attempt,
        version: u64,
        stage: &str,
    ) -> Result<(), LearnerError> {
        let job_id = run.job_id.as_str();
        let dir = self.config.work_dir.join(job_id);
        // Its own name: an actor sharing the work directory keeps the
        // versions it fetched there as `v<N>.safetensors`.
        let path = dir.join(format!("publish-v{version}.safetensors"));
        let written = path.clone();
        let config = run
            .on_compute("writing the weights", move |c| {
                write_weights(&dir, &written, &c.trainer.policy)
            })
            .await??;
        let mut client = self.weights();
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        let publish_started = Instant::now();
        let published = publish(
            &mut client,
            PublishHeader {
                job_id: job_id.to_owned(),
                version,
                format: WeightFormat::Safetensors as i32,
                model_config_json: config,
                step: run.state.step,
                stage: stage.to_owned(),
                ..PublishHeader::default()
            },
            PublishData::File(path.clone()),
            1 << 20,
        )
        .await;
        let _ = std::fs::remove_file(&path);
        match published {
            Ok(_) => {
                self.metrics
                    .published(job_id, publish_started.elapsed(), bytes);
                Ok(())
            }
            // Already above this version (a resumed rank 0 publishing again):
            // the committed one stands.
            Err(PublishError::Status(status)) if superseded(&status) => Ok(()),
            Err(e) => Err(LearnerError::Config(format!(
                "publishing version {version}: {e}"
            ))),
        }
    }

    pub(super) async fn report(
        &self,
        membership: &Membership,
        job_id: &str,
        point: Option<MetricPoint>,
        stage_change: Option<StageChange>,
        stop: Option<StopReason>,
    ) -> Result<i32, LearnerError> {
        let answer = self
            .cluster()
            .report_progress(ReportProgressRequest {
                member_id: membership.member_id.clone(),
                job_id: job_id.to_owned(),
                metrics: point.into_iter().collect(),
                stage_change,
                stop_reason: stop.map_or(0, |s| s as i32),
                failure_message: String::new(),
            })
            .await
            .map_err(|status| LearnerError::Rpc {
                what: "ReportProgress".into(),
                status: Box::new(status),
            })?;
        Ok(answer.into_inner().state)
    }
}

/// Writes `policy`'s weights to `path` in `dir` (safetensors) and returns
/// its published model config.
fn write_weights(
    dir: &Path,
    path: &PathBuf,
    policy: &AnyTrainable,
) -> Result<String, LearnerError> {
    std::fs::create_dir_all(dir).map_err(|e| LearnerError::io(dir, e))?;
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        policy.named_tensors().into_iter().collect();
    candle_core::safetensors::save(&tensors, path)?;
    policy
        .published_config()
        .map_err(|e| LearnerError::Config(e.to_string()))
}

/// Whether a refused Publish only says that a later version is already
/// committed (VERSION_NOT_MONOTONIC: a resumed rank 0 publishing a version
/// again), so the committed one stands. Other refusals with the same code
/// (the job has ended, this member is no longer rank 0 or its lease
/// expired) are failures.
pub(super) fn superseded(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && encore_proto::status::reason_of(status) == ErrorReason::VersionNotMonotonic
}

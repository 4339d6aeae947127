//! Reading and changing job records in the store, shared by the services
//! and the reconciler: every change of a job is a compare-and-set that
//! carries the events announcing it, so watchers never see a state without
//! its event.

use std::time::SystemTime;

use encore_proto::status::Violations;
use encore_proto::v1::{Job, JobEvent, JobState, JobStateChange, job_event};
use encore_store::{Store, StoreError, StoredJob};
use prost_types::Timestamp;

use crate::error::{Error, Result};

/// Compare-and-set attempts before a job update gives up with ABORTED.
const CAS_ATTEMPTS: usize = 16;

/// A job's state; unknown values read as UNSPECIFIED.
pub(crate) fn job_state(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

/// A state-change event stamped `now`.
pub(crate) fn state_event(
    now: SystemTime,
    previous: JobState,
    state: JobState,
    message: &str,
) -> JobEvent {
    JobEvent {
        sequence: 0,
        time: Some(Timestamp::from(now)),
        event: Some(job_event::Event::StateChange(JobStateChange {
            previous: previous as i32,
            state: state as i32,
            message: message.to_owned(),
        })),
    }
}

/// The stored job, or JOB_NOT_FOUND.
pub(crate) async fn get_job(store: &dyn Store, job_id: &str) -> Result<StoredJob> {
    store
        .get_job(job_id)
        .await?
        .ok_or_else(|| Error::JobNotFound(job_id.to_owned()))
}

/// Reads a job, lets `change` edit it and return the events announcing the
/// change (`None`: nothing to change), and writes it back with a
/// compare-and-set, re-reading and retrying when another writer came first.
/// Sets `update_time`. Returns the job as stored afterwards.
pub(crate) async fn modify_job(
    store: &dyn Store,
    job_id: &str,
    mut change: impl FnMut(&mut Job, SystemTime) -> Result<Option<Vec<JobEvent>>>,
) -> Result<StoredJob> {
    for _ in 0..CAS_ATTEMPTS {
        let stored = get_job(store, job_id).await?;
        let mut job = stored.job.clone();
        let now = store.now();
        let Some(events) = change(&mut job, now)? else {
            return Ok(stored);
        };
        job.update_time = Some(Timestamp::from(now));
        match store.update_job(job, stored.revision, events).await {
            Ok(updated) => return Ok(updated),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Aborted(format!(
        "job {job_id:?} kept changing under {CAS_ATTEMPTS} attempts to update it; retry"
    )))
}

/// Checks a protocol identifier: 1 to 128 bytes of `[A-Za-z0-9._-]`.
pub(crate) fn check_id(bad: &mut Violations, field: &str, value: &str) {
    if value.is_empty() {
        bad.invalid(field, "required");
    } else if value.len() > 128 {
        bad.invalid(field, format!("{} bytes, at most 128", value.len()));
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        bad.invalid(field, "may only hold [A-Za-z0-9._-]");
    }
}

//! JobService: how clients submit, inspect, cancel and follow jobs.
//!
//! Every job lives in the store, never only here: Submit validates the spec
//! (`encore_spec`), fills in defaults and stores the job in PENDING under
//! the client's idempotency key; [`crate::reconcile`] later moves it to
//! RUNNING once its workers are assigned; learner rank 0's progress reports
//! ([`crate::cluster`]) append metric points and end it. Watch streams the
//! job's stored history ([`encore_store::subscribe`]), so a client that
//! reconnects with the last sequence it saw misses nothing, also across a
//! coordinator restart.
//!
//! A client sees and changes only its own jobs: List shows only them, and
//! Get, Cancel and Watch refuse a job another client submitted
//! ([`require_owner`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use encore_proto::status::Violations;
use encore_proto::v1::job_service_server::JobService;
use encore_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobEvent, JobState, ListJobsRequest, ListJobsResponse,
    SubmitJobRequest, SubmitJobResponse, WatchJobRequest, job_event,
};
use encore_store::{CreateOutcome, IdempotencyKey, Store, StoreError, StoredJob};
use prost_types::Timestamp;
use rand::Rng;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::{Caller, require_client, require_owner};
use crate::error::{Error, Result};
use crate::job_changes::{check_id, get_job, job_state, modify_job, state_event};
use crate::metrics::Metrics;
use crate::reconcile::Trigger;
use encore_spec::{self as spec, Limits};

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// Longest cancel reason, in bytes.
pub const MAX_CANCEL_REASON_BYTES: usize = 1024;

/// The JobService implementation.
#[derive(Debug, Clone)]
pub struct Jobs {
    store: Arc<dyn Store>,
    metrics: Metrics,
    limits: Arc<Limits>,
    max_active_per_client: u64,
    /// Serialises the quota check and the insert of one coordinator's
    /// submissions, so that concurrent submits cannot overshoot a quota.
    submit_lock: Arc<tokio::sync::Mutex<()>>,
    trigger: Trigger,
    shutdown: CancellationToken,
}

impl Jobs {
    /// A JobService over `store`.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Metrics,
        limits: Limits,
        max_active_per_client: u64,
        trigger: Trigger,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            metrics,
            limits: Arc::new(limits),
            max_active_per_client,
            submit_lock: Arc::new(tokio::sync::Mutex::new(())),
            trigger,
            shutdown,
        }
    }

    async fn submit(&self, client: String, req: SubmitJobRequest) -> Result<SubmitJobResponse> {
        let mut bad = Violations::default();
        check_length(
            &mut bad,
            "idempotency_key",
            &req.idempotency_key,
            MAX_IDEMPOTENCY_KEY_BYTES,
        );
        let Some(spec) = req.spec.as_ref() else {
            bad.invalid("spec", "required");
            return Err(bad.into());
        };
        // Validation may read a prompt dataset file: blocking I/O, kept off
        // the async workers.
        let checked = {
            let (spec, limits) = (spec.clone(), self.limits.clone());
            tokio::task::spawn_blocking(move || spec::validate(&spec, &limits))
                .await
                .map_err(|e| Error::Aborted(format!("validating the spec: {e}")))?
        };
        if let Err(spec_bad) = checked {
            for v in spec_bad.listed() {
                bad.push(v.field.clone(), v.reason, v.description.clone());
            }
        }
        bad.into_result()?;

        let effective = spec::with_defaults(spec, &mut rand::rng());
        let now = self.store.now();
        let first_stage = effective
            .stages
            .first()
            .map(|s| s.name.clone())
            .unwrap_or_else(|| "main".into());
        let mut job = Job {
            job_id: String::new(),
            spec: Some(effective),
            state: JobState::Pending as i32,
            idempotency_key: req.idempotency_key.clone(),
            stage_index: 0,
            stage: first_stage,
            create_time: Some(Timestamp::from(now)),
            update_time: Some(Timestamp::from(now)),
            ..Job::default()
        };
        if req.validate_only {
            return Ok(SubmitJobResponse {
                job: Some(job),
                created: false,
            });
        }
        job.job_id = new_job_id(now);
        let key = IdempotencyKey {
            key: req.idempotency_key,
            spec_sha256: spec::spec_sha256(spec),
        };

        let _serial = self.submit_lock.lock().await;
        let active = self.store.active_jobs_of(&client).await?;
        if active >= self.max_active_per_client {
            return Err(Error::QuotaExceeded {
                client,
                active,
                limit: self.max_active_per_client,
            });
        }
        match self.store.create_job(job, &client, Some(key)).await? {
            CreateOutcome::Created(stored) => {
                let event = state_event(now, JobState::Unspecified, JobState::Pending, "submitted");
                self.store
                    .append_events(&stored.job.job_id, vec![event])
                    .await?;
                tracing::info!(job_id = %stored.job.job_id, %client, "job submitted");
                self.trigger.fire();
                Ok(SubmitJobResponse {
                    job: Some(stored.job),
                    created: true,
                })
            }
            CreateOutcome::Existing(stored) => Ok(SubmitJobResponse {
                job: Some(stored.job),
                created: false,
            }),
            CreateOutcome::KeyReused { job_id } => Err(Error::IdempotencyKeyReused { job_id }),
        }
    }

    async fn list(&self, client: &str, req: ListJobsRequest) -> Result<ListJobsResponse> {
        let mut bad = Violations::default();
        let mut states = Vec::with_capacity(req.states.len());
        for (i, &value) in req.states.iter().enumerate() {
            match JobState::try_from(value) {
                Ok(state) if state != JobState::Unspecified => states.push(state),
                _ => bad.invalid(
                    format!("states[{i}]"),
                    format!("{value} is not a job state (1 to 5)"),
                ),
            }
        }
        bad.into_result()?;
        let page = req.page.unwrap_or_default();
        let token = (!page.page_token.is_empty()).then_some(page.page_token.as_str());
        let listed = self
            .store
            .list_jobs(Some(client), &states, page.page_size as usize, token)
            .await
            .map_err(|e| match e {
                StoreError::InvalidArgument {
                    field: "page_token",
                    message,
                } => {
                    let mut bad = Violations::default();
                    bad.push(
                        "page.page_token".into(),
                        encore_proto::v1::ErrorReason::InvalidPageToken,
                        message,
                    );
                    Error::Invalid(bad)
                }
                other => other.into(),
            })?;
        Ok(ListJobsResponse {
            jobs: listed.jobs.into_iter().map(|s| s.job).collect(),
            next_page_token: listed.next_page_token.unwrap_or_default(),
        })
    }

    /// The job `job_id`, if `client` submitted it.
    async fn owned_job(&self, client: String, job_id: &str) -> Result<StoredJob> {
        let stored = get_job(&*self.store, job_id).await?;
        require_owner(&Caller::Client(client), &stored)?;
        Ok(stored)
    }

    async fn cancel(&self, client: String, req: CancelJobRequest) -> Result<Job> {
        let mut bad = Violations::default();
        check_id(&mut bad, "job_id", &req.job_id);
        if req.reason.len() > MAX_CANCEL_REASON_BYTES {
            bad.push(
                "reason".into(),
                encore_proto::v1::ErrorReason::TooLarge,
                format!(
                    "{} bytes, at most {MAX_CANCEL_REASON_BYTES}",
                    req.reason.len()
                ),
            );
        }
        bad.into_result()?;
        // The owner never changes, so checking it before the
        // compare-and-set loop is enough.
        self.owned_job(client, &req.job_id).await?;
        let reason = req.reason;
        let stored = modify_job(&*self.store, &req.job_id, |job, now| match job_state(job) {
            JobState::Cancelled => Ok(None),
            state if state.is_terminal() => Err(Error::JobTerminal {
                job_id: job.job_id.clone(),
                state: state.as_str_name().trim_start_matches("JOB_STATE_").into(),
                action: "cancelled",
            }),
            previous => {
                job.state = JobState::Cancelled as i32;
                job.cancel_reason = reason.clone();
                job.end_time = Some(Timestamp::from(now));
                let message = if reason.is_empty() {
                    "cancelled by a client".to_owned()
                } else {
                    format!("cancelled: {reason}")
                };
                Ok(Some(vec![state_event(
                    now,
                    previous,
                    JobState::Cancelled,
                    &message,
                )]))
            }
        })
        .await?;
        tracing::info!(job_id = %req.job_id, "job cancelled");
        self.trigger.fire();
        Ok(stored.job)
    }

    async fn watch(&self, client: String, req: WatchJobRequest) -> Result<WatchStream> {
        let mut bad = Violations::default();
        check_id(&mut bad, "job_id", &req.job_id);
        bad.into_result()?;
        self.owned_job(client, &req.job_id).await?;
        let store = self.store.clone();
        let (first, after) = match req.after_sequence {
            Some(after) => (None, after),
            None => {
                // The sequence is read before the job: the snapshot then
                // reflects at least every event up to it, and an event in
                // between is sent again rather than lost.
                let last = store.append_events(&req.job_id, Vec::new()).await?;
                let stored = get_job(&*store, &req.job_id).await?;
                let snapshot = JobEvent {
                    sequence: last,
                    time: stored.job.update_time,
                    event: Some(job_event::Event::Snapshot(stored.job)),
                };
                (Some(snapshot), last)
            }
        };
        let ends_now = first.as_ref().is_some_and(ends_stream);
        let history = encore_store::subscribe(store, req.job_id.clone(), after);
        let shutdown = self.shutdown.clone();
        let stream = async_stream(first, ends_now, history, shutdown);
        Ok(Box::pin(stream))
    }
}

/// What Watch returns.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

/// The snapshot (if any), then stored events until one makes the job
/// terminal, the coordinator shuts down, or the store fails.
fn async_stream(
    first: Option<JobEvent>,
    ends_now: bool,
    history: encore_store::EventStream,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<JobEvent, Status>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        if let Some(event) = first
            && (tx.send(Ok(event)).await.is_err() || ends_now)
        {
            return;
        }
        let mut history = history;
        loop {
            let next = tokio::select! {
                () = tx.closed() => return,
                () = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::from(Error::ShuttingDown))).await;
                    return;
                }
                next = history.next() => next,
            };
            match next {
                Some(Ok(event)) => {
                    let last = ends_stream(&event);
                    if tx.send(Ok(event)).await.is_err() || last {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(Status::from(Error::from(e)))).await;
                    return;
                }
                None => return,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether a Watch stream ends after this event: it moves the job to a
/// terminal state, or is the snapshot of a terminal job.
fn ends_stream(event: &JobEvent) -> bool {
    match &event.event {
        Some(job_event::Event::StateChange(change)) => {
            JobState::try_from(change.state).is_ok_and(JobState::is_terminal)
        }
        Some(job_event::Event::Snapshot(job)) => job_state(job).is_terminal(),
        _ => false,
    }
}

#[tonic::async_trait]
impl JobService for Jobs {
    type WatchStream = WatchStream;

    #[tracing::instrument(skip_all, fields(key = %request.get_ref().idempotency_key))]
    async fn submit(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        self.metrics
            .rpc("JobService/Submit", async {
                let client = require_client(&request)?;
                self.submit(client, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn get(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        self.metrics
            .rpc("JobService/Get", async {
                let client = require_client(&request)?;
                let job_id = &request.get_ref().job_id;
                let mut bad = Violations::default();
                check_id(&mut bad, "job_id", job_id);
                bad.into_result()?;
                Ok(self.owned_job(client, job_id).await?.job)
            })
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn list(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        self.metrics
            .rpc("JobService/List", async {
                let client = require_client(&request)?;
                self.list(&client, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn cancel(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        self.metrics
            .rpc("JobService/Cancel", async {
                let client = require_client(&request)?;
                self.cancel(client, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn watch(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.metrics
            .rpc("JobService/Watch", async {
                let client = require_client(&request)?;
                self.watch(client, request.into_inner()).await
            })
            .await
            .map(Response::new)
    }
}

/// A fresh job id: the creation time in milliseconds (so ids sort roughly
/// by age in logs) and 32 random bits.
fn new_job_id(now: SystemTime) -> String {
    let millis = encore_store::millis(now);
    let random: u32 = rand::rng().random();
    format!("job-{millis:x}-{random:08x}")
}

/// Checks a required string of at most `max` bytes.
fn check_length(bad: &mut Violations, field: &str, value: &str, max: usize) {
    if value.is_empty() {
        bad.invalid(field, "required");
    } else if value.len() > max {
        bad.push(
            field.into(),
            encore_proto::v1::ErrorReason::TooLarge,
            format!("{} bytes, at most {max}", value.len()),
        );
    }
}

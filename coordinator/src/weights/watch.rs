//! WatchVersions: actors follow a job's new versions as they are committed,
//! and learn that no more will come when the job ends.
//!
//! ```text
//!  Publish commit ──broadcast (Weights.commits)──▶ watcher task ──▶ client
//!  job events (Store::read_events) ──terminal state──▶ final catch-up, end OK
//! ```
//!
//! New versions arrive through the in-process commit broadcast; a watcher
//! that falls too far behind it catches up from the store's manifests
//! instead, so it skips nothing that is still retained. The end of the job
//! is seen in the job's event history, which cannot lose the terminal
//! state change; the watcher subscribes at the sequence it read before
//! looking at the job's state, so a change between the two is not missed.

use encore_proto::status::Violations;
use encore_proto::v1::{JobEvent, JobState, WatchVersionsRequest, WeightManifest, job_event};
use encore_store::StoreError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tracing::{Instrument, Span};

use super::{Sent, Weights, check_job_id, end_with, job_of, send, version_of};
use crate::error::{Error, Result};

/// Manifests queued for a slow watcher before its task waits.
const WATCH_QUEUE: usize = 16;

/// The response stream of WatchVersions.
pub type WatchStream = ReceiverStream<std::result::Result<WeightManifest, tonic::Status>>;

impl Weights {
    /// The WatchVersions rpc.
    #[tracing::instrument(name = "watch_versions", skip_all, fields(job_id))]
    pub(super) async fn watch_stream(
        &self,
        request: Request<WatchVersionsRequest>,
    ) -> Result<WatchStream> {
        let caller = crate::auth::require_any(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        check_job_id(&mut v, "job_id", &request.job_id);
        v.into_result()?;
        Span::current().record("job_id", request.job_id.as_str());
        self.require_reader(&caller, &request.job_id).await?;

        let store = &self.inner.store;
        // Listen before reading anything, so no commit falls in between.
        let commits = self.inner.commits.subscribe();
        // The current end of the job's history (an empty append only reads
        // it), taken before the job's state: a state change after this
        // sequence is in the subscription below.
        let sequence = match store.append_events(&request.job_id, Vec::new()).await {
            Err(StoreError::NotFound { .. }) => return Err(Error::JobNotFound(request.job_id)),
            other => other?,
        };
        let job = self.require_job(&request.job_id).await?;
        let terminal = JobState::try_from(job.job.state).is_ok_and(JobState::is_terminal);

        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let watcher = Watcher {
            weights: self.clone(),
            job_id: request.job_id,
            last: request.after_version,
            tx,
        };
        tokio::spawn(
            watcher
                .run(request.after_version.is_none(), terminal, sequence, commits)
                .instrument(Span::current()),
        );
        Ok(ReceiverStream::new(rx))
    }
}

/// One WatchVersions stream.
struct Watcher {
    weights: Weights,
    job_id: String,
    /// The highest version sent (or the `after_version` asked for).
    last: Option<u64>,
    tx: mpsc::Sender<std::result::Result<WeightManifest, tonic::Status>>,
}

/// Why a watcher stopped early.
enum Stop {
    ClientGone,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Failed(e.into())
    }
}

impl Watcher {
    async fn run(
        mut self,
        latest_only: bool,
        terminal: bool,
        sequence: u64,
        commits: broadcast::Receiver<WeightManifest>,
    ) {
        match self.follow(latest_only, terminal, sequence, commits).await {
            Ok(()) | Err(Stop::ClientGone) => {}
            Err(Stop::Failed(err)) => end_with(&self.tx, err).await,
        }
    }

    async fn follow(
        &mut self,
        latest_only: bool,
        terminal: bool,
        sequence: u64,
        mut commits: broadcast::Receiver<WeightManifest>,
    ) -> std::result::Result<(), Stop> {
        let store = self.weights.inner.store.clone();
        if latest_only {
            if let Some(latest) = store.latest_manifest(&self.job_id).await? {
                self.offer(latest).await?;
            }
        } else {
            self.catch_up().await?;
        }
        if terminal {
            return Ok(());
        }
        let mut events = encore_store::subscribe(store, self.job_id.clone(), sequence);
        let shutdown = self.weights.inner.shutdown.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Err(Error::ShuttingDown.into()),
                () = self.tx.closed() => return Err(Stop::ClientGone),
                commit = commits.recv() => match commit {
                    Ok(manifest) if job_of(&manifest) == self.job_id => self.offer(manifest).await?,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "fell behind the commit notices; reading the store");
                        self.catch_up().await?;
                    }
                    // The sender lives as long as `Weights`, which this task holds.
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Error::ShuttingDown.into());
                    }
                },
                event = events.next() => match event {
                    Some(Ok(event)) if ends_job(&event) => {
                        // A publish that raced with the end may have
                        // committed after the last notice seen here.
                        self.catch_up().await?;
                        return Ok(());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => {
                        return Err(Error::Aborted("the job's event stream ended".into()).into());
                    }
                },
            }
        }
    }

    /// Sends every retained version above the last one sent, oldest first.
    async fn catch_up(&mut self) -> std::result::Result<(), Stop> {
        let mut manifests = self
            .weights
            .inner
            .store
            .list_manifests(&self.job_id)
            .await?;
        manifests.reverse();
        for manifest in manifests {
            self.offer(manifest).await?;
        }
        Ok(())
    }

    /// Sends `manifest` if it is newer than the last one sent.
    async fn offer(&mut self, manifest: WeightManifest) -> std::result::Result<(), Stop> {
        let version = version_of(&manifest);
        if self.last.is_some_and(|last| version <= last) {
            return Ok(());
        }
        match send(&self.tx, manifest, &self.weights.inner.shutdown).await {
            Sent::Delivered => {
                self.last = Some(version);
                Ok(())
            }
            Sent::ClientGone => Err(Stop::ClientGone),
            Sent::ShuttingDown => Err(Error::ShuttingDown.into()),
        }
    }
}

/// Whether `event` moves the job to a terminal state.
fn ends_job(event: &JobEvent) -> bool {
    match &event.event {
        Some(job_event::Event::StateChange(change)) => {
            JobState::try_from(change.state).is_ok_and(JobState::is_terminal)
        }
        _ => false,
    }
}

//! Fetch: an actor (or the CLI) downloads a version, resuming where a
//! broken download stopped.
//!
//! ```text
//!  resolve version ──pin (store)──▶ open blob ──▶ task: manifest, then chunks
//!      reader thread: read chunk n+1  ║  network: send chunk n
//!  stream ends ──▶ unpin            client gone ──▶ FetchPin dropped ──▶ unpin
//! ```
//!
//! One task per stream reads the file on the blocking pool one chunk ahead
//! of the network, so disk and socket overlap; the response channel holds a
//! few chunks more. The version is pinned in the store for the whole
//! stream (renewed while it runs), which is what keeps garbage collection
//! from deleting it under a reader; the pin is also what makes a fetch safe
//! across coordinators, since the open file alone only protects this one.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use encore_proto::status::Violations;
use encore_proto::v1::{FetchRequest, FetchResponse, WeightChunk, WeightManifest, fetch_response};
use encore_store::{Store, StoreError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tracing::{Instrument, Span};

use super::{
    Sent, Weights, blobs, blocking, check_job_id, check_sha256, end_with, send, sha_of, version_of,
};
use crate::error::{Error, Result};

/// Chunks queued between the reading task and tonic, per stream.
const FETCH_QUEUE: usize = 4;

/// The response stream of Fetch.
pub type FetchStream = ReceiverStream<std::result::Result<FetchResponse, tonic::Status>>;

impl Weights {
    /// The Fetch rpc: everything that can fail before the first byte is
    /// checked here, so the caller gets a plain error status; then one task
    /// streams the file.
    #[tracing::instrument(name = "fetch", skip_all, fields(job_id, version, offset))]
    pub(super) async fn fetch_stream(&self, request: Request<FetchRequest>) -> Result<FetchStream> {
        let caller = crate::auth::require_any(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        check_job_id(&mut v, "job_id", &request.job_id);
        if !request.expected_sha256.is_empty() {
            check_sha256(&mut v, "expected_sha256", &request.expected_sha256);
        }
        v.into_result()?;
        self.require_reader(&caller, &request.job_id).await?;

        let manifest = self.resolve(&request.job_id, request.version).await?;
        let (version, size) = (version_of(&manifest), manifest.total_size_bytes);
        Span::current()
            .record("job_id", request.job_id.as_str())
            .record("version", version)
            .record("offset", request.offset);
        if !request.expected_sha256.is_empty() && request.expected_sha256 != sha_of(&manifest) {
            return Err(Error::FetchConflict(format!(
                "version {version} of job {:?} has sha256 {}, not {}",
                request.job_id,
                sha_of(&manifest),
                request.expected_sha256
            )));
        }
        if request.offset > size {
            return Err(Error::OffsetOutOfRange {
                offset: request.offset,
                size,
            });
        }

        let pin = FetchPin::acquire(self, &request.job_id, version).await?;
        let path = self
            .inner
            .blobs
            .blob_path(&request.job_id, version, sha_of(&manifest));
        let offset = request.offset;
        let open_path = path.clone();
        let file = blocking(&path, move || {
            let mut file = File::open(&open_path)?;
            let len = file.metadata()?.len();
            if len != size {
                return Err(io::Error::other(format!(
                    "the file holds {len} bytes, its manifest says {size}"
                )));
            }
            file.seek(SeekFrom::Start(offset))?;
            Ok(file)
        })
        .await?;

        let (tx, rx) = mpsc::channel(FETCH_QUEUE);
        let weights = self.clone();
        tokio::spawn(
            async move {
                weights
                    .send_file(manifest, file, offset, pin, path, tx)
                    .await
            }
            .instrument(Span::current()),
        );
        Ok(ReceiverStream::new(rx))
    }

    /// Streams the manifest, then the file from `offset`, then releases the
    /// pin before the stream closes, so that a client that saw the end also
    /// sees the version unpinned. If the client goes away first, dropping
    /// the pin releases it.
    async fn send_file(
        self,
        manifest: WeightManifest,
        file: File,
        offset: u64,
        pin: FetchPin,
        path: PathBuf,
        tx: mpsc::Sender<std::result::Result<FetchResponse, tonic::Status>>,
    ) {
        let inner = &self.inner;
        let served = inner
            .metrics
            .weight_served_bytes
            .with_label_values(&[super::job_of(&manifest)]);
        let size = manifest.total_size_bytes;
        let chunk_bytes = inner.chunk_bytes as u64;
        let read_next = |file: File, at: u64| {
            let len = chunk_bytes.min(size - at);
            tokio::task::spawn_blocking(move || read_chunk(file, len))
        };
        // The first read starts before the manifest goes out.
        let mut reading = (offset < size).then(|| read_next(file, offset));
        let head = FetchResponse {
            payload: Some(fetch_response::Payload::Manifest(manifest)),
        };
        match send(&tx, head, &inner.shutdown).await {
            Sent::Delivered => {}
            Sent::ClientGone => return,
            Sent::ShuttingDown => return end_with(&tx, Error::ShuttingDown).await,
        }
        let mut position = offset;
        while let Some(read) = reading.take() {
            let (file, data) = match read.await.map_err(io::Error::other).and_then(|r| r) {
                Ok(read) => read,
                Err(source) => {
                    let path = path.display().to_string();
                    return end_with(&tx, Error::Blob { path, source }).await;
                }
            };
            let at = position;
            let len = data.len() as u64;
            position += len;
            if position < size {
                reading = Some(read_next(file, position));
            }
            let chunk = FetchResponse {
                payload: Some(fetch_response::Payload::Chunk(WeightChunk {
                    offset: at,
                    data,
                })),
            };
            match send(&tx, chunk, &inner.shutdown).await {
                Sent::Delivered => served.inc_by(len),
                Sent::ClientGone => {
                    tracing::debug!(sent = at, "the client went away");
                    return;
                }
                Sent::ShuttingDown => return end_with(&tx, Error::ShuttingDown).await,
            }
        }
        // Hold the pin until tonic has taken every queued chunk (all queue
        // slots free again), not merely until the last one was queued: up to
        // then a broken connection may still need to resume this version.
        let drained = tokio::select! {
            () = inner.shutdown.cancelled() => false,
            permits = tx.reserve_many(FETCH_QUEUE) => permits.is_ok(),
        };
        if drained {
            pin.release().await;
        }
    }
}

/// Reads exactly the next `len` bytes of `file`.
fn read_chunk(file: File, len: u64) -> io::Result<(File, Vec<u8>)> {
    let (file, data) = blobs::read_up_to(file, len)?;
    if data.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the weights file is shorter than its manifest says",
        ));
    }
    Ok((file, data))
}

/// A fetch's pin on its version: renewed in the background while held, and
/// released when the stream ends, or, if the stream is dropped (the client
/// went away), by a task spawned on drop. Also counts the stream in the
/// running-fetches gauge.
struct FetchPin {
    store: Arc<dyn Store>,
    job_id: String,
    version: u64,
    holder: String,
    renewer: JoinHandle<()>,
    gauge: prometheus::Gauge,
    released: bool,
}

impl FetchPin {
    /// Pins `version` for a fresh holder; VERSION_NOT_FOUND if it was
    /// collected since it was resolved.
    async fn acquire(weights: &Weights, job_id: &str, version: u64) -> Result<Self> {
        let inner = &weights.inner;
        let holder = format!("fetch-{:016x}", rand::random::<u64>());
        let ttl = inner.fetch_pin_ttl;
        match inner.store.pin(job_id, version, &holder, ttl).await {
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => {
                return Err(Error::VersionNotFound {
                    job_id: job_id.to_owned(),
                    version: version.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        let renewer = tokio::spawn(renew(
            inner.store.clone(),
            job_id.to_owned(),
            version,
            holder.clone(),
            ttl,
        ));
        let gauge = inner.metrics.weight_fetches.with_label_values(&[job_id]);
        gauge.inc();
        Ok(Self {
            store: inner.store.clone(),
            job_id: job_id.to_owned(),
            version,
            holder,
            renewer,
            gauge,
            released: false,
        })
    }

    /// Unpins now and waits for the store to confirm.
    async fn release(mut self) {
        self.renewer.abort();
        self.released = true;
        unpin(
            self.store.clone(),
            self.job_id.clone(),
            self.version,
            self.holder.clone(),
        )
        .await;
    }
}

impl Drop for FetchPin {
    fn drop(&mut self) {
        self.renewer.abort();
        self.gauge.dec();
        if self.released {
            return;
        }
        // Dropped mid-stream: unpin in the background (the pin would also
        // lapse at its deadline, but GC should not have to wait for it).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(unpin(
                self.store.clone(),
                std::mem::take(&mut self.job_id),
                self.version,
                std::mem::take(&mut self.holder),
            ));
        }
    }
}

/// Renews a pin every third of its lifetime, so that one failed renewal
/// does not yet let it lapse.
async fn renew(store: Arc<dyn Store>, job_id: String, version: u64, holder: String, ttl: Duration) {
    let mut every = tokio::time::interval(ttl / 3);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the pin was just taken.
    every.tick().await;
    loop {
        every.tick().await;
        match store.pin(&job_id, version, &holder, ttl).await {
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => {
                // The pin lapsed (a stalled reader) and the version was
                // collected; the open file still serves this stream.
                tracing::warn!(
                    job_id,
                    version,
                    "the fetched version was collected while it was read"
                );
                return;
            }
            Err(e) => tracing::warn!(job_id, version, error = %e, "could not renew a fetch pin"),
        }
    }
}

async fn unpin(store: Arc<dyn Store>, job_id: String, version: u64, holder: String) {
    if let Err(e) = store.unpin(&job_id, version, &holder).await {
        tracing::warn!(job_id, version, error = %e, "could not release a fetch pin; it lapses at its deadline");
    }
}

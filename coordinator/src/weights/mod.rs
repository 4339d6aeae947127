//! WeightService: how policy weights travel from the learner to the actors.
//!
//! ```text
//!  learner rank 0 ──Publish(header, chunks)──▶ staging file ──verify──▶ rename
//!                                            ──▶ Store::put_manifest (the commit point)
//!  actors, CLI ◀──Fetch(manifest, chunks)── blob file, pinned while read
//!  actors ──GetManifest (between batches)──▶ the latest version
//! ```
//!
//! The bytes live in the blob directory (`blobs.rs`); the store only holds
//! manifests (job, version, sha256, size, model config) and fetch pins. A
//! version exists for readers once, and only once, its manifest is
//! committed, which happens after every byte arrived, hashed to the
//! announced sha256 and was renamed into place: a half-published version is
//! never visible. Garbage collection (`gc.rs`) keeps version 0 and the
//! latest versions and never deletes what a reader is fetching.
//!
//! Only rank 0 of a job's learner publishes its weights; the job's actors and
//! learner ranks read them ([`crate::auth::require_member_right`]), and so
//! does the client that submitted it ([`crate::auth::require_owner`]).
//!
//! - `service.rs`: the tonic `WeightService` implementation and the small
//!   rpcs (GetManifest, ListVersions).
//! - `publish.rs`, `fetch.rs`: the two streaming rpcs.
//!
//! Publishing and resumable fetching, the learners', actors' and CLI's
//! side, are `encore_client::weights`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use encore_proto::status::Violations;
use encore_proto::v1::WeightManifest;
use encore_store::Store;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use encore_client::weights::{MAX_CHUNK_BYTES, sha_of, version_of};

use crate::error::{Error, Result};
use crate::metrics::Metrics;

mod blobs;
mod fetch;
mod gc;
mod publish;
mod service;

/// How the WeightService stores and serves weights.
#[derive(Debug, Clone)]
pub struct WeightOptions {
    /// Directory of weight files (a shared volume on Kubernetes).
    pub blob_dir: PathBuf,
    /// Versions kept per job besides version 0: the latest this many (at
    /// least 1 is kept in any case, so the latest version always stays).
    pub keep_versions: u32,
    /// How long a fetch pins the version it reads; the pin is renewed every
    /// third of this while the fetch runs.
    pub fetch_pin_ttl: Duration,
    /// Bytes per Fetch chunk, 1 to [`MAX_CHUNK_BYTES`] (larger values are
    /// treated as the maximum).
    pub chunk_bytes: usize,
}

impl WeightOptions {
    /// Options with the defaults: 3 kept versions, a 60 s fetch pin, 1 MiB
    /// chunks.
    pub fn new(blob_dir: impl Into<PathBuf>) -> Self {
        Self {
            blob_dir: blob_dir.into(),
            keep_versions: 3,
            fetch_pin_ttl: Duration::from_secs(60),
            chunk_bytes: MAX_CHUNK_BYTES,
        }
    }
}

/// The WeightService: a cheap handle (clones share everything) that the
/// gRPC server mounts and the coordinator's housekeeping calls
/// [`Weights::collect_garbage`] on.
#[derive(Debug, Clone)]
pub struct Weights {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    blobs: blobs::BlobDir,
    keep_versions: usize,
    fetch_pin_ttl: Duration,
    chunk_bytes: usize,
    metrics: Metrics,
    shutdown: CancellationToken,
    /// Held from the rename of a verified file to the end of its commit, and
    /// by the orphan sweep, so the sweep never takes a file whose manifest
    /// is about to be committed. Commits are rare and short.
    commit_lock: Mutex<()>,
}

impl Weights {
    /// Serves weights from `store` and `options.blob_dir`, which is created
    /// if needed and cleared of uploads a previous run left unfinished.
    /// Streams end (UNAVAILABLE) when `shutdown` is cancelled.
    pub fn new(
        store: Arc<dyn Store>,
        options: WeightOptions,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        if options.fetch_pin_ttl.is_zero() {
            return Err(Error::Config("fetch_pin_ttl must not be zero".into()));
        }
        let blobs =
            blobs::BlobDir::open(options.blob_dir.clone()).map_err(|source| Error::Blob {
                path: options.blob_dir.display().to_string(),
                source,
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                blobs,
                keep_versions: options.keep_versions.max(1) as usize,
                fetch_pin_ttl: options.fetch_pin_ttl,
                chunk_bytes: options.chunk_bytes.clamp(1, MAX_CHUNK_BYTES),
                metrics,
                shutdown,
                commit_lock: Mutex::new(()),
            }),
        })
    }

    /// The manifest of `version` of `job_id` (the latest when `None`):
    /// JOB_NOT_FOUND for an unknown job, VERSION_NOT_FOUND for a version
    /// that does not exist or was collected.
    async fn resolve(&self, job_id: &str, version: Option<u64>) -> Result<WeightManifest> {
        let store = &self.inner.store;
        let found = match version {
            Some(v) => store.get_manifest(job_id, v).await?,
            None => store.latest_manifest(job_id).await?,
        };
        if let Some(manifest) = found {
            return Ok(manifest);
        }
        // Only a miss pays for the job lookup that tells the two apart.
        self.require_job(job_id).await?;
        Err(Error::VersionNotFound {
            job_id: job_id.to_owned(),
            version: version.map_or_else(|| "latest".to_owned(), |v| v.to_string()),
        })
    }

    /// Passes a member assigned to `job_id` (an actor or learner rank), and
    /// a client if it submitted `job_id` (PERMISSION_DENIED if another
    /// client did, JOB_NOT_FOUND if nobody did).
    async fn require_reader(&self, caller: &crate::auth::Caller, job_id: &str) -> Result<()> {
        match caller {
            crate::auth::Caller::Client(_) => {
                crate::auth::require_owner(caller, &self.require_job(job_id).await?)
            }
            _ => crate::auth::require_member_right(
                &*self.inner.store,
                caller,
                job_id,
                crate::auth::JobRight::ReadWeights,
            )
            .await
            .map(drop),
        }
    }

    /// The job's record; JOB_NOT_FOUND if there is none.
    async fn require_job(&self, job_id: &str) -> Result<encore_store::StoredJob> {
        self.inner
            .store
            .get_job(job_id)
            .await?
            .ok_or_else(|| Error::JobNotFound(job_id.to_owned()))
    }
}

/// Checks a job id as `common.proto` defines ids (1 to 128 bytes of
/// `[A-Za-z0-9._-]`), and that it is not `.` or `..`: ids name directories
/// of the blob dir, so this is what keeps a request inside it.
fn check_job_id(violations: &mut Violations, field: &str, id: &str) {
    if id.is_empty() {
        violations.invalid(field, "must be set");
    } else if id.len() > 128 {
        violations.invalid(
            field,
            format!("is {} bytes long, the most is 128", id.len()),
        );
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        violations.invalid(field, "may only hold the characters A-Z a-z 0-9 . _ -");
    } else if id == "." || id == ".." {
        violations.invalid(field, format!("{id:?} is not a job id"));
    }
}

/// Checks a sha256 as the protocol writes it: 64 lower-case hex characters.
fn check_sha256(violations: &mut Violations, field: &str, sha: &str) {
    let hex = sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !hex {
        violations.invalid(field, "must be 64 lower-case hex characters (a sha256)");
    }
}

/// Runs blocking file work on the blocking pool; an error names `path`.
async fn blocking<T: Send + 'static>(
    path: &std::path::Path,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let blob_error = |source| Error::Blob {
        path: path.display().to_string(),
        source,
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| blob_error(std::io::Error::other(e)))?
        .map_err(blob_error)
}

/// How handing one message to a response stream went.
enum Sent {
    /// The message is queued for the client.
    Delivered,
    /// The client went away (tonic dropped the stream).
    ClientGone,
    /// The coordinator is shutting down.
    ShuttingDown,
}

/// Queues `item` on a response stream, waiting while the client is slow,
/// unless the client goes away or shutdown begins first.
async fn send<T>(
    tx: &mpsc::Sender<std::result::Result<T, tonic::Status>>,
    item: T,
    shutdown: &CancellationToken,
) -> Sent {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Sent::ShuttingDown,
        // `reserve` rather than `send`: when shutdown wins the race no
        // message is half-sent.
        permit = tx.reserve() => match permit {
            Ok(permit) => {
                permit.send(Ok(item));
                Sent::Delivered
            }
            Err(_) => Sent::ClientGone,
        },
    }
}

/// Ends a response stream with `err`. The client may have stopped reading,
/// so the wait is bounded: shutdown must not hang on a stalled reader.
async fn end_with<T>(tx: &mpsc::Sender<std::result::Result<T, tonic::Status>>, err: Error) {
    let status = tonic::Status::from(err);
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(Err(status))).await;
}

/// The job id of a manifest (empty if it has no version, which the store
/// never returns).
fn job_of(manifest: &WeightManifest) -> &str {
    manifest.version.as_ref().map_or("", |v| v.job_id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violations_of(id: &str) -> usize {
        let mut v = Violations::default();
        check_job_id(&mut v, "job_id", id);
        v.total()
    }

    #[test]
    fn job_ids_stay_single_path_components() {
        for good in ["j", "job-1.a_b", &"x".repeat(128), "..."] {
            assert_eq!(violations_of(good), 0, "{good:?}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(129), "é"] {
            assert_eq!(violations_of(bad), 1, "{bad:?}");
        }
    }

    #[test]
    fn sha256_must_be_lower_case_hex() {
        let mut v = Violations::default();
        check_sha256(&mut v, "s", &"a".repeat(64));
        assert!(v.is_empty());
        for bad in [
            "A".repeat(64),
            "a".repeat(63),
            "g".repeat(64),
            String::new(),
        ] {
            let mut v = Violations::default();
            check_sha256(&mut v, "s", &bad);
            assert_eq!(v.total(), 1, "{bad:?}");
        }
    }
}

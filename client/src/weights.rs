//! The client side of WeightService, for the processes that move weights:
//! the learner publishes ([`publish`]), actors and the CLI download
//! ([`fetch_to_file`]).
//!
//! ```text
//!  learner: safetensors bytes or file ──publish──▶ coordinator
//!  actor:   coordinator ──fetch_to_file──▶ <dest>.part (hashed as it arrives)
//!             broken stream? resume: same version, offset = bytes received
//!             sha256 matches? rename to <dest>; else nothing at <dest>
//! ```
//!
//! Both take a generated [`WeightServiceClient`] over any tonic transport,
//! so the caller decides how to connect and authenticate (typically a
//! `Channel` wrapped in an interceptor that adds `authorization: Bearer
//! <worker token>`). A download never leaves a partial file at its
//! destination: the bytes go to a temporary file next to it, which is
//! renamed into place only after its sha256 matched the manifest, and
//! removed on any failure.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use encore_proto::v1::weight_service_client::WeightServiceClient;
use encore_proto::v1::{
    FetchRequest, PublishHeader, PublishRequest, WeightChunk, WeightManifest, fetch_response,
    publish_request,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codegen::{Body, Bytes, StdError};

use crate::spool::{self, Spool};

/// Largest chunk the protocol allows (`WeightChunk.data`), in bytes.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Chunks queued ahead of the network while publishing.
const PUBLISH_QUEUE: usize = 4;
/// First pause before resuming a broken download; doubles per failure in a
/// row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause before resuming a broken download.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The bytes to publish.
#[derive(Debug, Clone)]
pub enum PublishData {
    /// A weights file already in memory (shared, so a caller can keep it for
    /// a retry without copying).
    Memory(Arc<Vec<u8>>),
    /// A weights file on disk, read as it is sent.
    File(PathBuf),
}

/// Why [`publish`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The server refused or the call broke; the status' code and
    /// `ErrorInfo` reason say which (a retry with the same header is safe).
    #[error("publish failed: {0}")]
    Status(Box<tonic::Status>),
    /// The weights file could not be read.
    #[error("reading {path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Why [`fetch_to_file`] failed. Nothing is left at the destination in any
/// case.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server refused the fetch (VERSION_NOT_FOUND, VERSION_CONFLICT,
    /// PERMISSION_DENIED...); such answers are not retried.
    #[error("fetch refused: {0}")]
    Refused(Box<tonic::Status>),
    /// The download broke more times in a row than the caller allowed.
    #[error(
        "fetch of job {job_id:?} broke {attempts} times in a row without progress; last: {last}"
    )]
    Interrupted {
        /// The job.
        job_id: String,
        /// Attempts in a row that broke (the first of them may have
        /// received bytes).
        attempts: u32,
        /// How the last one ended.
        last: Box<tonic::Status>,
    },
    /// The server sent something the protocol does not allow (no manifest
    /// first, a chunk at the wrong offset, another version on resume).
    #[error("the server broke the Fetch protocol: {0}")]
    Protocol(String),
    /// The bytes received do not hash to the manifest's sha256.
    #[error("the {size} bytes received hash to {actual}, the manifest says {expected}")]
    ChecksumMismatch {
        /// The manifest's sha256.
        expected: String,
        /// The hash of the bytes received.
        actual: String,
        /// Bytes received.
        size: u64,
    },
    /// The temporary or destination file could not be written.
    #[error("writing {path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Publishes `data` as described by `header` in chunks of `chunk_bytes`
/// (clamped to 1..=1 MiB) and returns the committed manifest. A
/// `total_size_bytes` of 0 or an empty `sha256` in the header is filled in
/// from the data (which reads a file twice). Publishing the same version
/// with the same bytes again returns the committed manifest, so a failed
/// publish can simply be retried.
pub async fn publish<T>(
    client: &mut WeightServiceClient<T>,
    mut header: PublishHeader,
    data: PublishData,
    chunk_bytes: usize,
) -> Result<WeightManifest, PublishError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let chunk_bytes = chunk_bytes.clamp(1, MAX_CHUNK_BYTES);
    if header.total_size_bytes == 0 || header.sha256.is_empty() {
        let (size, sha256) = measure(&data).await?;
        header.total_size_bytes = size;
        header.sha256 = sha256;
    }
    let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
    let call = client.publish(ReceiverStream::new(rx));
    tokio::pin!(call);
    let sent = tokio::select! {
        // The server may answer before the last chunk: an error, or the
        // manifest of a version that is already committed.
        response = &mut call => {
            return response.map(|r| r.into_inner()).map_err(|s| PublishError::Status(Box::new(s)));
        }
        sent = send_all(tx, header, &data, chunk_bytes) => sent,
    };
    // On a read error, returning drops the call: the rpc is cancelled and
    // the server commits nothing.
    sent?;
    call.await
        .map(|r| r.into_inner())
        .map_err(|s| PublishError::Status(Box::new(s)))
}

/// Size and sha256 of the data, hashed off the async threads.
async fn measure(data: &PublishData) -> Result<(u64, String), PublishError> {
    let data = data.clone();
    let path = match &data {
        PublishData::File(path) => path.clone(),
        PublishData::Memory(_) => PathBuf::from("(memory)"),
    };
    let hashed = tokio::task::spawn_blocking(move || match data {
        PublishData::Memory(bytes) => {
            Ok((bytes.len() as u64, hex::encode(Sha256::digest(&bytes[..]))))
        }
        PublishData::File(path) => {
            let mut hasher = Sha256::new();
            let size = io::copy(&mut File::open(path)?, &mut hasher)?;
            Ok((size, hex::encode(hasher.finalize())))
        }
    })
    .await
    .map_err(io::Error::other)
    .and_then(|r| r);
    hashed.map_err(|source| PublishError::Io { path, source })
}

/// Sends the header and then the data; stops quietly if the call ended
/// (its answer says why).
async fn send_all(
    tx: mpsc::Sender<PublishRequest>,
    header: PublishHeader,
    data: &PublishData,
    chunk_bytes: usize,
) -> Result<(), PublishError> {
    let header = PublishRequest {
        payload: Some(publish_request::Payload::Header(header)),
    };
    if tx.send(header).await.is_err() {
        return Ok(());
    }
    let chunk = |offset: u64, data: Vec<u8>| PublishRequest {
        payload: Some(publish_request::Payload::Chunk(WeightChunk {
            offset,
            data,
        })),
    };
    match data {
        PublishData::Memory(bytes) => {
            let mut offset = 0u64;
            for piece in bytes.chunks(chunk_bytes) {
                if tx.send(chunk(offset, piece.to_vec())).await.is_err() {
                    return Ok(());
                }
                offset += piece.len() as u64;
            }
        }
        PublishData::File(path) => {
            let io_error = |source| PublishError::Io {
                path: path.clone(),
                source,
            };
            let open = path.clone();
            let mut file = tokio::task::spawn_blocking(move || File::open(open))
                .await
                .map_err(io::Error::other)
                .and_then(|r| r)
                .map_err(io_error)?;
            let mut offset = 0u64;
            loop {
                let len = chunk_bytes as u64;
                let (back, piece) =
                    tokio::task::spawn_blocking(move || spool::read_up_to(file, len))
                        .await
                        .map_err(io::Error::other)
                        .and_then(|r| r)
                        .map_err(io_error)?;
                file = back;
                if piece.is_empty() {
                    return Ok(());
                }
                let len = piece.len() as u64;
                if tx.send(chunk(offset, piece)).await.is_err() {
                    return Ok(());
                }
                offset += len;
            }
        }
    }
    Ok(())
}

/// Downloads `version` of `job_id` (the latest when `None`) to `dest` and
/// returns its manifest.
///
/// The bytes go to a temporary file next to `dest`, hashed as they arrive.
/// A stream that breaks is resumed with the same version and the number of
/// bytes received as offset (and the expected sha256, so that bytes of two
/// files are never mixed), after a short back-off; `max_retries` bounds how
/// many times in a row it resumes, an attempt that received bytes starting
/// the count afresh (so a long download over a flaky link completes, and a
/// dead server fails fast). Refusals (NOT_FOUND, FAILED_PRECONDITION...)
/// are not retried. Only when every
/// byte arrived and the sha256 matched is the file renamed to `dest`
/// (replacing what was there); on any failure nothing is left behind.
pub async fn fetch_to_file<T>(
    client: &mut WeightServiceClient<T>,
    job_id: &str,
    version: Option<u64>,
    dest: &Path,
    max_retries: u32,
) -> Result<WeightManifest, FetchError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let part = partial_path(dest);
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    let spool = Spool::create(part.clone()).await.map_err(io_error(&part))?;
    let mut download = Download {
        spool,
        manifest: None,
        received: 0,
    };
    let mut failures = 0u32;
    loop {
        let before = download.received;
        let outcome = download.attempt(client, job_id, version).await;
        let broken = match outcome {
            Ok(()) if download.complete() => break,
            Ok(()) => tonic::Status::unavailable("the stream ended before the last byte"),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Broken(status)) => status,
        };
        failures = if download.received > before {
            1
        } else {
            failures + 1
        };
        if failures > max_retries {
            return Err(FetchError::Interrupted {
                job_id: job_id.to_owned(),
                attempts: failures,
                last: Box::new(broken),
            });
        }
        tracing::debug!(
            job_id,
            received = download.received,
            error = %broken,
            "the download broke; resuming"
        );
        let backoff = FIRST_BACKOFF * 2u32.pow(failures.saturating_sub(1).min(10));
        tokio::time::sleep(backoff.min(MAX_BACKOFF)).await;
    }

    let Download {
        spool, manifest, ..
    } = download;
    let manifest = manifest.unwrap_or_default();
    let spooled = spool.finish().await.map_err(io_error(&part))?;
    let expected = sha_of(&manifest);
    if spooled.sha256 != expected {
        return Err(FetchError::ChecksumMismatch {
            expected: expected.to_owned(),
            actual: spooled.sha256,
            size: spooled.size,
        });
    }
    let (from, to) = (spooled.file.path().to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || spool::rename_durably(&from, &to))
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .map_err(io_error(dest))?;
    spooled.file.keep();
    Ok(manifest)
}

/// `.<name>.<random>.part` next to `dest`: same directory, so the final
/// rename is atomic; hidden and random, so concurrent downloads of the same
/// destination do not collide.
fn partial_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weights".to_owned());
    let part = format!(".{name}.{:016x}.part", rand::random::<u64>());
    match dest.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(part),
        _ => PathBuf::from(part),
    }
}

/// A download in progress, across attempts.
struct Download {
    spool: Spool,
    /// The version being downloaded, once the first manifest arrived.
    manifest: Option<WeightManifest>,
    /// Bytes received (and queued to the file) so far.
    received: u64,
}

/// How one attempt failed.
enum Attempt {
    /// The stream broke; resuming may help.
    Broken(tonic::Status),
    /// Resuming cannot help.
    Fatal(FetchError),
}

impl Download {
    fn complete(&self) -> bool {
        self.manifest
            .as_ref()
            .is_some_and(|m| self.received == m.total_size_bytes)
    }

    /// One Fetch call, from the current offset to the end or until it
    /// breaks.
    async fn attempt<T>(
        &mut self,
        client: &mut WeightServiceClient<T>,
        job_id: &str,
        version: Option<u64>,
    ) -> Result<(), Attempt>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<StdError>,
        T::ResponseBody: Body<Data = Bytes> + Send + 'static,
        <T::ResponseBody as Body>::Error: Into<StdError> + Send,
    {
        // Once a manifest arrived, every resume names its version and hash.
        let request = FetchRequest {
            job_id: job_id.to_owned(),
            version: self.manifest.as_ref().map(version_of).or(version),
            offset: self.received,
            expected_sha256: self
                .manifest
                .as_ref()
                .map(|m| sha_of(m).to_owned())
                .unwrap_or_default(),
        };
        let mut stream = client.fetch(request).await.map_err(classify)?.into_inner();
        match stream.message().await.map_err(classify)? {
            Some(response) => match response.payload {
                Some(fetch_response::Payload::Manifest(manifest)) => self.accept(manifest)?,
                _ => return Err(protocol("the first message is not the manifest")),
            },
            None => {
                return Err(Attempt::Broken(tonic::Status::unavailable(
                    "the stream ended before the manifest",
                )));
            }
        }
        let size = self.manifest.as_ref().map_or(0, |m| m.total_size_bytes);
        while let Some(response) = stream.message().await.map_err(classify)? {
            let Some(fetch_response::Payload::Chunk(chunk)) = response.payload else {
                return Err(protocol("a second manifest"));
            };
            let len = chunk.data.len() as u64;
            if chunk.offset != self.received || len == 0 || self.received + len > size {
                return Err(protocol(&format!(
                    "a chunk of {len} bytes at offset {} after {} of {size} bytes",
                    chunk.offset, self.received
                )));
            }
            self.spool.write(chunk.data).await.map_err(|source| {
                Attempt::Fatal(FetchError::Io {
                    path: self.spool.path().to_path_buf(),
                    source,
                })
            })?;
            self.received += len;
        }
        Ok(())
    }

    /// Takes the manifest of an attempt: the first one, or on resume the
    /// same version and bytes as before.
    fn accept(&mut self, manifest: WeightManifest) -> Result<(), Attempt> {
        match &self.manifest {
            None => self.manifest = Some(manifest),
            Some(first)
                if first.version == manifest.version
                    && first.total_size_bytes == manifest.total_size_bytes => {}
            Some(_) => return Err(protocol("a resumed fetch sent another version")),
        }
        Ok(())
    }
}

fn protocol(what: &str) -> Attempt {
    Attempt::Fatal(FetchError::Protocol(what.to_owned()))
}

/// Whether resuming may help after `status`: transport trouble and an
/// overloaded or restarting server, yes; a refusal, no.
fn classify(status: tonic::Status) -> Attempt {
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::ResourceExhausted => Attempt::Broken(status),
        _ => Attempt::Fatal(FetchError::Refused(Box::new(status))),
    }
}

/// The version number of a manifest.
pub fn version_of(manifest: &WeightManifest) -> u64 {
    manifest.version.as_ref().map_or(0, |v| v.version)
}

/// The sha256 of a manifest.
pub fn sha_of(manifest: &WeightManifest) -> &str {
    manifest.version.as_ref().map_or("", |v| v.sha256.as_str())
}

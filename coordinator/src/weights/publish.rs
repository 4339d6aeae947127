//! Publish: a learner uploads a new version, and it becomes visible all at
//! once or not at all.
//!
//! ```text
//!  header ──validate, job live?, version new?──▶ chunks ──Spool (hash)──▶ staging file
//!    ──size and sha256 match──▶ rename to <version>-<sha256>.safetensors
//!    ──Store::put_manifest──▶ committed: notify watchers, collect garbage
//! ```
//!
//! The version checks run twice: from the header, so that a retry or a
//! stale publisher learns the answer before uploading 100 MB, and at commit,
//! where the store decides atomically. Whatever fails before the commit
//! leaves no file behind (the [`TempFile`] guards), and the commit itself
//! runs in its own task, so a client that disconnects while the store is
//! committing cannot leave a manifest without its bytes.

use encore_proto::status::Violations;
use encore_proto::v1::{
    JobState, PolicyVersion, PublishHeader, PublishRequest, WeightChunk, WeightFormat,
    WeightManifest, publish_request::Payload,
};
use encore_store::{ManifestPut, StoreError, StoredJob};
use tonic::{Request, Streaming};
use tracing::Span;

use super::blobs::{self, Spool, Spooled, TempFile};
use super::{MAX_CHUNK_BYTES, Weights, blocking, check_job_id, check_sha256, sha_of, version_of};
use crate::error::{Error, Result};

impl Weights {
    /// The Publish rpc: header, chunks, verification, commit.
    #[tracing::instrument(name = "publish", skip_all, fields(job_id, version))]
    pub(super) async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<WeightManifest> {
        let caller = crate::auth::require_any(&request)?;
        let mut stream = request.into_inner();
        let header = match self.next_message(&mut stream).await? {
            Some(PublishRequest {
                payload: Some(Payload::Header(header)),
            }) => header,
            Some(_) => {
                return Err(Error::invalid(
                    "header",
                    "the first message of a Publish stream must be the header",
                ));
            }
            None => {
                return Err(Error::invalid(
                    "header",
                    "the stream ended before the header",
                ));
            }
        };
        validate_header(&header)?;
        Span::current()
            .record("job_id", header.job_id.as_str())
            .record("version", header.version);

        refuse_terminal(&self.require_job(&header.job_id).await?)?;
        let publisher = crate::auth::require_member_right(
            &*self.inner.store,
            &caller,
            &header.job_id,
            crate::auth::JobRight::Publish,
        )
        .await?
        .member
        .member_id;
        if let Some(committed) = self.check_version(&header).await? {
            tracing::info!("version already committed with this sha256; nothing to do");
            return Ok(committed);
        }
        let spooled = self.receive(&header, &mut stream).await?;
        // Detached, so that a client going away now cannot interrupt the
        // commit between the rename and the store (see the module doc).
        let weights = self.clone();
        let path = spooled.file.path().display().to_string();
        let commit = tokio::spawn(async move { weights.commit(header, publisher, spooled).await });
        // The task is never aborted; a join error means it panicked.
        commit.await.map_err(|e| Error::Blob {
            path,
            source: std::io::Error::other(e),
        })?
    }

    /// The next message of the request stream; `None` at its end.
    async fn next_message(
        &self,
        stream: &mut Streaming<PublishRequest>,
    ) -> Result<Option<PublishRequest>> {
        tokio::select! {
            () = self.inner.shutdown.cancelled() => Err(Error::ShuttingDown),
            message = stream.message() => message.map_err(|s| Error::RequestStream(Box::new(s))),
        }
    }

    /// Answers from the header alone when the store already decided: the
    /// committed manifest for a retry of a committed version, VERSION_CONFLICT
    /// for another sha256, VERSION_NOT_MONOTONIC for a stale version.
    async fn check_version(&self, header: &PublishHeader) -> Result<Option<WeightManifest>> {
        let store = &self.inner.store;
        if let Some(existing) = store.get_manifest(&header.job_id, header.version).await? {
            return if sha_of(&existing) == header.sha256 {
                Ok(Some(existing))
            } else {
                Err(conflict(header, sha_of(&existing)))
            };
        }
        if let Some(latest) = store.latest_manifest(&header.job_id).await?
            && version_of(&latest) >= header.version
        {
            return Err(not_monotonic(header, version_of(&latest)));
        }
        Ok(None)
    }

    /// Receives the chunks into a staging file and checks size and hash.
    async fn receive(
        &self,
        header: &PublishHeader,
        stream: &mut Streaming<PublishRequest>,
    ) -> Result<Spooled> {
        let blobs = self.inner.blobs.clone();
        let job_id = header.job_id.clone();
        let staging = blobs.job_dir(&header.job_id);
        let path = blocking(&staging, move || blobs.staging_path(&job_id)).await?;
        let mut spool = Spool::create(path.clone())
            .await
            .map_err(|source| blob_error(&path, source))?;

        let received_bytes = self
            .inner
            .metrics
            .weight_received_bytes
            .with_label_values(&[header.job_id.as_str()]);
        let total = header.total_size_bytes;
        let mut received = 0u64;
        while let Some(message) = self.next_message(stream).await? {
            let chunk = match message.payload {
                Some(Payload::Chunk(chunk)) => chunk,
                Some(Payload::Header(_)) => {
                    return Err(Error::invalid(
                        "header",
                        "sent again; a Publish stream has one header, as its first message",
                    ));
                }
                None => return Err(Error::invalid("payload", "must be a header or a chunk")),
            };
            check_chunk(&chunk, received, total)?;
            let len = chunk.data.len() as u64;
            spool
                .write(chunk.data)
                .await
                .map_err(|source| blob_error(&path, source))?;
            received += len;
            received_bytes.inc_by(len);
        }
        if received != total {
            return Err(Error::ChecksumMismatch(format!(
                "header.total_size_bytes: {total} bytes were announced, the stream ended after \
                 {received}; nothing was committed"
            )));
        }
        let spooled = spool
            .finish()
            .await
            .map_err(|source| blob_error(&path, source))?;
        if spooled.sha256 != header.sha256 {
            return Err(Error::ChecksumMismatch(format!(
                "header.sha256: {} was announced, the {total} bytes received hash to {}; nothing \
                 was committed",
                header.sha256, spooled.sha256
            )));
        }
        Ok(spooled)
    }

    /// Renames the verified file into place and commits its manifest.
    async fn commit(
        &self,
        header: PublishHeader,
        publisher_id: String,
        spooled: Spooled,
    ) -> Result<WeightManifest> {
        let inner = &self.inner;
        let final_path = inner
            .blobs
            .blob_path(&header.job_id, header.version, &header.sha256);
        let manifest = WeightManifest {
            version: Some(PolicyVersion {
                job_id: header.job_id.clone(),
                version: header.version,
                sha256: header.sha256.clone(),
            }),
            total_size_bytes: header.total_size_bytes,
            format: header.format,
            model_config_json: header.model_config_json.clone(),
            step: header.step,
            stage: header.stage.clone(),
            publisher_id,
            commit_time: Some(prost_types::Timestamp::from(inner.store.now())),
        };

        let lock = inner.commit_lock.lock().await;
        // The job may have ended while the bytes arrived.
        refuse_terminal(&self.require_job(&header.job_id).await?)?;
        let from = spooled.file.path().to_path_buf();
        let to = final_path.clone();
        blocking(&final_path, move || blobs::rename_durably(&from, &to)).await?;
        spooled.file.keep();
        // If the rename replaced the file of the same version and hash left
        // by an earlier, identical publish, the bytes are the same; readers
        // that have it open keep reading the old inode.
        let placed = TempFile::new(final_path);

        let committed = match inner.store.put_manifest(manifest).await {
            Ok(ManifestPut::Committed(m)) => m,
            Ok(ManifestPut::AlreadyCommitted(m)) => {
                // Our file is that version's file (same name, same bytes).
                placed.keep();
                return Ok(m);
            }
            // Another publish won a race since the header was checked. The
            // winner's file has another name (another sha256 or version),
            // so dropping `placed` removes only ours.
            Err(StoreError::Conflict { message, .. }) => {
                return Err(Error::VersionConflict(format!(
                    "header.sha256: version {} of job {:?} was {message}",
                    header.version, header.job_id
                )));
            }
            Err(StoreError::VersionNotMonotonic { latest, .. }) => {
                return Err(not_monotonic(&header, latest));
            }
            Err(err) => {
                // The store may have committed before failing to answer: a
                // manifest without its file would be far worse than a stray
                // file, which the garbage collector sweeps.
                placed.keep();
                return Err(err.into());
            }
        };
        placed.keep();
        drop(lock);
        self.on_commit(&committed).await;
        Ok(committed)
    }

    /// What follows a commit: metrics, watchers, the job record, garbage
    /// collection. None of it may fail the publish, which has happened.
    async fn on_commit(&self, manifest: &WeightManifest) {
        let inner = &self.inner;
        let job_id = super::job_of(manifest);
        let version = version_of(manifest);
        tracing::info!(
            sha256 = sha_of(manifest),
            bytes = manifest.total_size_bytes,
            "committed"
        );
        let job = [job_id];
        inner.metrics.weight_versions.with_label_values(&job).inc();
        inner
            .metrics
            .weight_latest_version
            .with_label_values(&job)
            .set(version as f64);
        if let Err(e) = self.record_latest(manifest).await {
            tracing::warn!(error = %e, "could not record the latest version on the job");
        }
        if let Err(e) = self.collect_garbage(job_id).await {
            tracing::warn!(error = %e, "garbage collection after the commit failed");
        }
    }

    /// Sets `Job.latest_version`, unless a newer version is already there
    /// (compare-and-set, retried when another writer moved the job first).
    async fn record_latest(&self, manifest: &WeightManifest) -> Result<()> {
        let store = &self.inner.store;
        let job_id = super::job_of(manifest);
        for _ in 0..5 {
            let Some(stored) = store.get_job(job_id).await? else {
                return Ok(());
            };
            let newer_known = stored
                .job
                .latest_version
                .as_ref()
                .is_some_and(|v| v.version >= version_of(manifest));
            if newer_known {
                return Ok(());
            }
            let mut job = stored.job;
            job.latest_version = manifest.version.clone();
            job.update_time = Some(prost_types::Timestamp::from(store.now()));
            match store.update_job(job, stored.revision, Vec::new()).await {
                Err(StoreError::Conflict { .. }) => continue,
                other => return other.map(drop).map_err(Error::from),
            }
        }
        Err(Error::Aborted(format!(
            "job {job_id:?} kept changing while its latest version was recorded"
        )))
    }
}

/// Checks every field of a Publish header; all bad fields are reported.
fn validate_header(header: &PublishHeader) -> Result<()> {
    let mut v = Violations::default();
    check_job_id(&mut v, "header.job_id", &header.job_id);
    if header.total_size_bytes == 0 {
        v.invalid("header.total_size_bytes", "must be above 0");
    }
    check_sha256(&mut v, "header.sha256", &header.sha256);
    if WeightFormat::try_from(header.format) != Ok(WeightFormat::Safetensors) {
        v.invalid(
            "header.format",
            format!(
                "must be WEIGHT_FORMAT_SAFETENSORS (1), got {}",
                header.format
            ),
        );
    }
    match serde_json::from_str::<serde_json::Value>(&header.model_config_json) {
        Ok(serde_json::Value::Object(_)) => {}
        Ok(_) => v.invalid("header.model_config_json", "must be a JSON object"),
        Err(e) => v.invalid(
            "header.model_config_json",
            format!("is not valid JSON: {e}"),
        ),
    }
    v.into_result().map_err(Error::Invalid)
}

/// Checks one chunk against what came before it.
fn check_chunk(chunk: &WeightChunk, received: u64, total: u64) -> Result<()> {
    let mut v = Violations::default();
    if chunk.offset != received {
        v.invalid(
            "chunk.offset",
            format!(
                "must be {received}, where the previous chunk ended, got {}",
                chunk.offset
            ),
        );
    }
    let len = chunk.data.len();
    if len == 0 || len > MAX_CHUNK_BYTES {
        v.invalid(
            "chunk.data",
            format!("must hold 1 to {MAX_CHUNK_BYTES} bytes, got {len}"),
        );
    }
    v.into_result().map_err(Error::Invalid)?;
    if received + len as u64 > total {
        return Err(Error::ChecksumMismatch(format!(
            "chunk.data: the chunks add up to more than header.total_size_bytes = {total}; \
             nothing was committed"
        )));
    }
    Ok(())
}

/// JOB_TERMINAL for a job that has ended: it gets no new versions.
fn refuse_terminal(job: &StoredJob) -> Result<()> {
    let state = JobState::try_from(job.job.state).unwrap_or(JobState::Unspecified);
    if state.is_terminal() {
        let name = state.as_str_name();
        return Err(Error::JobTerminal {
            job_id: job.job.job_id.clone(),
            state: name.strip_prefix("JOB_STATE_").unwrap_or(name).to_owned(),
            action: "given new weight versions",
        });
    }
    Ok(())
}

fn conflict(header: &PublishHeader, committed_sha: &str) -> Error {
    Error::VersionConflict(format!(
        "header.sha256: version {} of job {:?} is already committed with sha256 {committed_sha}; \
         publish other weights under a new version",
        header.version, header.job_id
    ))
}

fn not_monotonic(header: &PublishHeader, latest: u64) -> Error {
    Error::VersionNotMonotonic(format!(
        "header.version: {} is not above {latest}, the latest committed version of job {:?}",
        header.version, header.job_id
    ))
}

fn blob_error(path: &std::path::Path, source: std::io::Error) -> Error {
    Error::Blob {
        path: path.display().to_string(),
        source,
    }
}

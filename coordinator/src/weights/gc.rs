//! Garbage collection of weight versions: a job keeps version 0 (its base
//! checkpoint, for evaluation against the start) and its latest
//! `keep_versions` versions; older ones go, manifest first, then file.
//!
//! Runs after every commit and periodically from the server. Deleting the
//! manifest first means a reader can never resolve a version whose file is
//! gone; the store refuses to delete a pinned version, and a fetch pins
//! before it opens the file, so a version being fetched is never deleted.
//! The sweep at the end removes files that no manifest owns (left by a
//! crash between rename and commit, or by a failed delete).

use std::collections::HashSet;
use std::time::Duration;

use encore_store::StoreError;

use super::{Weights, blobs, blocking, sha_of, version_of};
use crate::error::Result;

/// How long a file nobody owns must have been left alone before the sweep
/// takes it: far longer than any upload pauses between two chunks.
const ORPHAN_GRACE: Duration = Duration::from_secs(3600);

impl Weights {
    /// Deletes the versions of `job_id` that are neither version 0 nor among
    /// the latest `keep_versions`, skipping pinned ones (they go in a later
    /// run), and sweeps files without a manifest. Returns how many versions
    /// it deleted.
    #[tracing::instrument(skip(self))]
    pub async fn collect_garbage(&self, job_id: &str) -> Result<u64> {
        let inner = &self.inner;
        let store = &inner.store;
        let manifests = store.list_manifests(job_id).await?;
        let doomed: Vec<_> = manifests
            .iter()
            .enumerate()
            .filter(|(newest_first, m)| *newest_first >= inner.keep_versions && version_of(m) != 0)
            .map(|(_, m)| m)
            .collect();
        let mut deleted = 0u64;
        let mut failure = None;
        if !doomed.is_empty() {
            // Asked up front only to skip known pins quietly; the delete
            // itself is what enforces them.
            let pinned = store.pinned_versions(job_id).await?;
            for manifest in doomed {
                let version = version_of(manifest);
                if pinned.contains(&version) {
                    tracing::debug!(version, "pinned by a reader; kept for now");
                    continue;
                }
                match store.delete_manifest(job_id, version).await {
                    Ok(removed) => {
                        deleted += u64::from(removed);
                        let path = inner.blobs.blob_path(job_id, version, sha_of(manifest));
                        let file = path.clone();
                        if let Err(e) = blocking(&path, move || blobs::remove_file(&file)).await {
                            // The sweep takes the file later.
                            tracing::warn!(version, error = %e, "could not remove a collected version's file");
                        }
                        tracing::info!(version, "collected");
                    }
                    Err(StoreError::Pinned { .. }) => {
                        tracing::debug!(version, "pinned by a reader; kept for now");
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
        }
        inner
            .metrics
            .weight_deleted_versions
            .with_label_values(&[job_id])
            .inc_by(deleted);
        if let Some(e) = failure {
            return Err(e.into());
        }
        self.sweep(job_id).await?;
        Ok(deleted)
    }

    /// Removes files of `job_id` that no retained version owns.
    async fn sweep(&self, job_id: &str) -> Result<()> {
        let inner = &self.inner;
        // No commit may be between its rename and its manifest meanwhile.
        let _commits = inner.commit_lock.lock().await;
        let keep: HashSet<_> = inner
            .store
            .list_manifests(job_id)
            .await?
            .iter()
            .map(|m| inner.blobs.blob_path(job_id, version_of(m), sha_of(m)))
            .collect();
        let blob_dir = inner.blobs.clone();
        let dir = blob_dir.job_dir(job_id);
        let job = job_id.to_owned();
        blocking(&dir, move || {
            for orphan in blob_dir.orphans(&job, &keep, ORPHAN_GRACE)? {
                tracing::info!(path = %orphan.display(), "removing a weights file no version owns");
                blobs::remove_file(&orphan)?;
            }
            Ok(())
        })
        .await
    }
}

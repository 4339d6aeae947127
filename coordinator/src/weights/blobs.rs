//! The files behind weight versions: where they live, how bytes reach them
//! without ever being visible half-written, and how they go away.
//!
//! ```text
//!  <blob_dir>/<job_id>/.staging/<random>.part         a Publish in progress
//!  <blob_dir>/<job_id>/<version>-<sha256>.safetensors  a verified file
//! ```
//!
//! Publish streams bytes through a [`Spool`] (from `encore_client::spool`,
//! which the client side of Fetch uses too) into a staging file, hashing
//! them on the way; only a file whose size and sha256 matched is renamed to
//! its final name, and only a final file whose manifest the store committed
//! is ever served. Every path that must not survive a failure is held by a
//! [`TempFile`] guard (a client that goes away mid-stream makes tonic drop
//! the handler future, and with it the guard).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub(crate) use encore_client::spool::{
    Spool, Spooled, TempFile, read_up_to, remove_file, rename_durably,
};

/// Name of the per-job directory that holds Publish uploads in progress.
pub(crate) const STAGING_DIR: &str = ".staging";
/// Suffix of a staging file.
const STAGING_SUFFIX: &str = ".part";
/// Suffix of a committed (or about to be committed) weights file.
const BLOB_SUFFIX: &str = ".safetensors";

/// The blob directory: the one place that knows the file layout.
#[derive(Debug, Clone)]
pub(crate) struct BlobDir {
    root: PathBuf,
}

impl BlobDir {
    /// Creates `root` if needed and removes staging files left by a
    /// previous run (uploads that were cut off by a crash: their publishers
    /// got no answer and will publish again).
    pub(crate) fn open(root: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&root)?;
        for entry in fs::read_dir(&root)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                let staging = entry.path().join(STAGING_DIR);
                match fs::remove_dir_all(&staging) {
                    Ok(()) => tracing::debug!(dir = %staging.display(), "removed leftover uploads"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Self { root })
    }

    /// The directory of one job's files. `job_id` must have passed
    /// [`super::check_job_id`], which keeps it a single path component.
    pub(crate) fn job_dir(&self, job_id: &str) -> PathBuf {
        self.root.join(job_id)
    }

    /// The final file of a version.
    pub(crate) fn blob_path(&self, job_id: &str, version: u64, sha256: &str) -> PathBuf {
        self.job_dir(job_id)
            .join(format!("{version}-{sha256}{BLOB_SUFFIX}"))
    }

    /// A fresh staging path for an upload of `job_id`, its directory
    /// created.
    pub(crate) fn staging_path(&self, job_id: &str) -> io::Result<PathBuf> {
        let dir = self.job_dir(job_id).join(STAGING_DIR);
        fs::create_dir_all(&dir)?;
        let name: u64 = rand::random();
        Ok(dir.join(format!("{name:016x}{STAGING_SUFFIX}")))
    }

    /// Files of `job_id` that no retained version owns (`keep` holds the
    /// final names of retained versions) and that nobody touched for
    /// `grace`: final files whose commit never happened (a crash between
    /// rename and commit, an ambiguous store failure) and staging files of
    /// uploads that died without cleaning up. The grace period keeps the
    /// sweep away from uploads still running, also on another coordinator
    /// sharing the directory.
    pub(crate) fn orphans(
        &self,
        job_id: &str,
        keep: &HashSet<PathBuf>,
        grace: Duration,
    ) -> io::Result<Vec<PathBuf>> {
        let now = SystemTime::now();
        let stale = |path: &Path| -> bool {
            fs::metadata(path)
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).is_ok_and(|age| age >= grace))
                .unwrap_or(false)
        };
        let mut orphans = Vec::new();
        let dir = self.job_dir(job_id);
        for dir in [dir.clone(), dir.join(STAGING_DIR)] {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let path = entry?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let ours = name.ends_with(BLOB_SUFFIX) || name.ends_with(STAGING_SUFFIX);
                if ours && path.is_file() && !keep.contains(&path) && stale(&path) {
                    orphans.push(path);
                }
            }
        }
        Ok(orphans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_removes_leftover_uploads_only() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::open(dir.path().to_path_buf()).unwrap();
        let staged = blobs.staging_path("j").unwrap();
        fs::write(&staged, b"half").unwrap();
        let committed = blobs.blob_path("j", 3, "ab");
        fs::write(&committed, b"whole").unwrap();

        BlobDir::open(dir.path().to_path_buf()).unwrap();
        assert!(!staged.exists());
        assert!(committed.exists());
    }

    #[test]
    fn orphans_are_unowned_files_past_their_grace() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::open(dir.path().to_path_buf()).unwrap();
        fs::create_dir_all(blobs.job_dir("j")).unwrap();
        let owned = blobs.blob_path("j", 1, "aa");
        let orphan = blobs.blob_path("j", 2, "bb");
        let staged = blobs.staging_path("j").unwrap();
        for path in [&owned, &orphan, &staged] {
            fs::write(path, b"x").unwrap();
        }
        let keep = HashSet::from([owned.clone()]);
        let mut found = blobs.orphans("j", &keep, Duration::ZERO).unwrap();
        found.sort();
        let mut expected = vec![orphan, staged];
        expected.sort();
        assert_eq!(found, expected);
        assert!(
            blobs
                .orphans("j", &keep, Duration::from_secs(3600))
                .unwrap()
                .is_empty()
        );
        assert!(
            blobs
                .orphans("nobody", &keep, Duration::ZERO)
                .unwrap()
                .is_empty()
        );
    }
}

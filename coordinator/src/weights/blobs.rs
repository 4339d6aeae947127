//! The files behind weight versions: where they live, how bytes reach them
//! without ever being visible half-written, and how they go away.
//!
//! ```text
//!  <blob_dir>/<job_id>/.staging/<random>.part         a Publish in progress
//!  <blob_dir>/<job_id>/<version>-<sha256>.safetensors  a verified file
//! ```
//!
//! Publish streams bytes through a [`Spool`] into a staging file, hashing
//! them on the way; only a file whose size and sha256 matched is renamed to
//! its final name, and only a final file whose manifest the store committed
//! is ever served. The client side of Fetch uses the same [`Spool`] for its
//! temporary file next to the destination. Writing and hashing happen on a
//! blocking thread so that the async workers keep moving bytes.
//!
//! Every path that must not survive a failure is held by a [`TempFile`]
//! guard, which removes it when dropped: an error, a client that goes away
//! mid-stream (tonic drops the handler future) or a panic all leave nothing
//! behind.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Name of the per-job directory that holds Publish uploads in progress.
pub(crate) const STAGING_DIR: &str = ".staging";
/// Suffix of a staging file.
const STAGING_SUFFIX: &str = ".part";
/// Suffix of a committed (or about to be committed) weights file.
const BLOB_SUFFIX: &str = ".safetensors";
/// Chunks queued between the network and the writing thread: enough to keep
/// the disk busy while the next chunk arrives, little enough to bound memory
/// per upload to a few MiB.
const SPOOL_QUEUE: usize = 4;

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

/// Removes a file, treating "already gone" as success.
pub(crate) fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads up to `len` bytes from `file`'s position (fewer only at its end).
/// The file travels with the read, so that a stream's sequential reads can
/// hop between blocking-pool threads in order without a lock.
pub(crate) fn read_up_to(mut file: File, len: u64) -> io::Result<(File, Vec<u8>)> {
    // Callers read one chunk (at most 1 MiB) at a time.
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(usize::MAX));
    (&mut file).take(len).read_to_end(&mut data)?;
    Ok((file, data))
}

/// Flushes a directory's entries (a rename into it) to disk.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    // Directories can only be fsynced through a handle on Unix; elsewhere
    // the rename is as durable as the platform makes it.
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Renames `from` to `to` and makes the rename durable.
pub(crate) fn rename_durably(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    match to.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// A path that is removed when the guard is dropped, unless
/// [`TempFile::keep`] was called: the one mechanism that cleans up after
/// every way an upload or download can fail.
#[derive(Debug)]
pub(crate) struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    /// Guards `path`.
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }

    /// The guarded path.
    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Disarms the guard: the file stays.
    pub(crate) fn keep(mut self) -> PathBuf {
        self.path.take().unwrap_or_default()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            // A single unlink, done right here even on an async worker:
            // deferring it would leave a window in which a failed upload's
            // file is still there when the caller gets its answer.
            if let Err(e) = remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a temporary weights file");
            }
        }
    }
}

/// What a finished [`Spool`] wrote.
#[derive(Debug)]
pub(crate) struct Spooled {
    /// The file, still guarded: the caller renames it or lets it go.
    pub(crate) file: TempFile,
    /// Bytes written.
    pub(crate) size: u64,
    /// sha256 of the bytes, lower-case hex.
    pub(crate) sha256: String,
}

/// A file being written from async code: chunks go through a small queue to
/// a blocking thread that writes and hashes them. Dropping an unfinished
/// spool removes the file.
#[derive(Debug)]
pub(crate) struct Spool {
    file: TempFile,
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<JoinHandle<io::Result<(u64, String)>>>,
    abandoned: Arc<AtomicBool>,
}

impl Spool {
    /// Creates `path` (which must not exist) and starts its writer.
    pub(crate) async fn create(path: PathBuf) -> io::Result<Self> {
        let open_path = path.clone();
        let file = tokio::task::spawn_blocking(move || {
            File::options().write(true).create_new(true).open(open_path)
        })
        .await
        .map_err(io::Error::other)??;
        let guard = TempFile::new(path);
        let (tx, rx) = mpsc::channel(SPOOL_QUEUE);
        let abandoned = Arc::new(AtomicBool::new(false));
        let writer = {
            let abandoned = abandoned.clone();
            tokio::task::spawn_blocking(move || write_chunks(file, rx, &abandoned))
        };
        Ok(Self {
            file: guard,
            chunks: Some(tx),
            writer: Some(writer),
            abandoned,
        })
    }

    /// The file being written.
    pub(crate) fn path(&self) -> &Path {
        self.file.path()
    }

    /// Queues `data` to be written after the chunks before it; waits while
    /// the queue is full. A write error of the thread surfaces here or at
    /// [`Spool::finish`].
    pub(crate) async fn write(&mut self, data: Vec<u8>) -> io::Result<()> {
        let sent = match &self.chunks {
            Some(chunks) => chunks.send(data).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer stopped early: it failed, and its error says why.
        Err(self
            .join()
            .await
            .err()
            .unwrap_or_else(|| io::Error::other("the weights file writer stopped unexpectedly")))
    }

    /// Flushes and fsyncs the file and returns it with its size and hash.
    pub(crate) async fn finish(mut self) -> io::Result<Spooled> {
        let (size, sha256) = self.join().await?;
        let file = std::mem::replace(&mut self.file, TempFile { path: None });
        Ok(Spooled { file, size, sha256 })
    }

    async fn join(&mut self) -> io::Result<(u64, String)> {
        // Closing the queue tells the writer that no more chunks come.
        self.chunks = None;
        match self.writer.take() {
            Some(writer) => writer.await.map_err(io::Error::other)?,
            None => Err(io::Error::other("the weights file writer already finished")),
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // An unfinished spool is abandoned: the writer skips the fsync of a
        // file that is about to be removed (the TempFile guard removes it).
        if self.writer.is_some() {
            self.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// The writer thread: writes and hashes chunks until the queue closes, then
/// fsyncs (unless abandoned).
fn write_chunks(
    mut file: File,
    mut chunks: mpsc::Receiver<Vec<u8>>,
    abandoned: &AtomicBool,
) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = chunks.blocking_recv() {
        hasher.update(&chunk);
        file.write_all(&chunk)?;
        size += chunk.len() as u64;
    }
    if !abandoned.load(Ordering::Relaxed) {
        file.sync_all()?;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spool_hashes_what_it_writes_and_a_dropped_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::open(dir.path().to_path_buf()).unwrap();

        let mut spool = Spool::create(blobs.staging_path("j").unwrap())
            .await
            .unwrap();
        spool.write(b"hello ".to_vec()).await.unwrap();
        spool.write(b"world".to_vec()).await.unwrap();
        let spooled = spool.finish().await.unwrap();
        assert_eq!(spooled.size, 11);
        assert_eq!(spooled.sha256, hex::encode(Sha256::digest(b"hello world")));
        assert_eq!(fs::read(spooled.file.path()).unwrap(), b"hello world");
        let kept = spooled.file.keep();
        assert!(kept.exists());

        let mut spool = Spool::create(blobs.staging_path("j").unwrap())
            .await
            .unwrap();
        spool.write(vec![1; 1000]).await.unwrap();
        let path = spool.path().to_path_buf();
        assert!(path.exists());
        drop(spool);
        assert!(!path.exists());
    }

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

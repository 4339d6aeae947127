//! Writing weights files so that nothing half-written is ever visible: a
//! [`Spool`] streams bytes to a temporary file on a blocking thread,
//! hashing them on the way; a [`TempFile`] guard removes the file unless it
//! is kept; [`rename_durably`] moves a finished file into place. The
//! coordinator's Publish uses them for its staging files, and
//! [`crate::weights::fetch_to_file`] for the file next to its destination.
//!
//! Every path that must not survive a failure is held by a [`TempFile`],
//! which removes it when dropped: an error, a peer that goes away
//! mid-stream or a panic all leave nothing behind.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunks queued between the network and the writing thread: enough to keep
/// the disk busy while the next chunk arrives, little enough to bound memory
/// per upload to a few MiB.
const SPOOL_QUEUE: usize = 4;

/// Removes a file, treating "already gone" as success.
pub fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads up to `len` bytes from `file`'s position (fewer only at its end).
/// The file travels with the read, so that a stream's sequential reads can
/// hop between blocking-pool threads in order without a lock.
pub fn read_up_to(mut file: File, len: u64) -> io::Result<(File, Vec<u8>)> {
    // Callers read one chunk (at most 1 MiB) at a time.
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(usize::MAX));
    (&mut file).take(len).read_to_end(&mut data)?;
    Ok((file, data))
}

/// Flushes a directory's entries (a rename into it) to disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    // Directories can only be fsynced through a handle on Unix; elsewhere
    // the rename is as durable as the platform makes it.
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Renames `from` to `to` and makes the rename durable.
pub fn rename_durably(from: &Path, to: &Path) -> io::Result<()> {
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
pub struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    /// Guards `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }

    /// The guarded path.
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Disarms the guard: the file stays.
    pub fn keep(mut self) -> PathBuf {
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
pub struct Spooled {
    /// The file, still guarded: the caller renames it or lets it go.
    pub file: TempFile,
    /// Bytes written.
    pub size: u64,
    /// sha256 of the bytes, lower-case hex.
    pub sha256: String,
}

/// A file being written from async code: chunks go through a small queue to
/// a blocking thread that writes and hashes them. Dropping an unfinished
/// spool removes the file.
#[derive(Debug)]
pub struct Spool {
    file: TempFile,
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<JoinHandle<io::Result<(u64, String)>>>,
    abandoned: Arc<AtomicBool>,
}

impl Spool {
    /// Creates `path` (which must not exist) and starts its writer.
    pub async fn create(path: PathBuf) -> io::Result<Self> {
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
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Queues `data` to be written after the chunks before it; waits while
    /// the queue is full. A write error of the thread surfaces here or at
    /// [`Spool::finish`].
    pub async fn write(&mut self, data: Vec<u8>) -> io::Result<()> {
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
    pub async fn finish(mut self) -> io::Result<Spooled> {
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

        let mut spool = Spool::create(dir.path().join("a.part")).await.unwrap();
        spool.write(b"hello ".to_vec()).await.unwrap();
        spool.write(b"world".to_vec()).await.unwrap();
        let spooled = spool.finish().await.unwrap();
        assert_eq!(spooled.size, 11);
        assert_eq!(spooled.sha256, hex::encode(Sha256::digest(b"hello world")));
        assert_eq!(fs::read(spooled.file.path()).unwrap(), b"hello world");
        let kept = spooled.file.keep();
        assert!(kept.exists());

        let mut spool = Spool::create(dir.path().join("b.part")).await.unwrap();
        spool.write(vec![1; 1000]).await.unwrap();
        let path = spool.path().to_path_buf();
        assert!(path.exists());
        drop(spool);
        assert!(!path.exists());
    }
}

//! The embedded store's files and the thread that writes them.
//!
//! A store directory holds:
//!
//! - `snapshot.bin`: magic `ENCSNAP1`, then the CRC-32 (little-endian u32)
//!   of the rest, then one prost [`Batch`]: the whole state as ops, and the
//!   LSN of the last log record it includes. Replaced atomically (written to
//!   `snapshot.tmp`, fsynced, renamed over, directory fsynced).
//! - `wal.log`: magic `ENCWAL01`, then records, each a little-endian u32
//!   length, a little-endian u32 CRC-32 of the payload, and the payload (a
//!   prost [`Batch`]: the ops of one store call). Emptied after each
//!   snapshot.
//! - `LOCK`: held with `flock` while a store has the directory open, so a
//!   second process (or a second open in this one) fails instead of
//!   corrupting it.
//!
//! Recovery reads the snapshot, then every log record with a larger LSN. A
//! torn last record (a crash during its write; its caller was never told it
//! succeeded) is cut off; damage anywhere else is an error, never silently
//! skipped.
//!
//! Writes go through one thread ([`LogWriter`]) so that no fsync blocks an
//! async worker: callers enqueue an encoded record and await its
//! acknowledgement; the thread writes everything that queued up while it
//! was busy and syncs once for all of it (group commit).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use prost::Message;
use tokio::sync::oneshot;

use super::on_disk::Batch;
use crate::error::{Result, StoreError};

const WAL_MAGIC: &[u8; 8] = b"ENCWAL01";
const SNAPSHOT_MAGIC: &[u8; 8] = b"ENCSNAP1";
const WAL_FILE: &str = "wal.log";
const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
const LOCK_FILE: &str = "LOCK";
/// Length and CRC in front of each record.
const FRAME_HEADER: usize = 8;

/// How hard the log pushes each write to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// fsync (fdatasync) before a mutation returns: it survives a crash of
    /// the machine. Concurrent mutations share one sync (group commit).
    #[default]
    Fsync,
    /// Hand each write to the kernel before a mutation returns, no fsync: it
    /// survives a crash of the process, not of the machine. For tests and
    /// throwaway runs.
    OsBuffer,
}

/// Takes the directory's lock file; fails if another store holds it.
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        let message = if err.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                "the store directory is open in another store (process or handle)",
            )
        } else {
            err
        };
        return Err(StoreError::io(&path, message));
    }
    Ok(file)
}

/// What recovery found on disk.
pub(crate) struct Recovered {
    /// The snapshot, if there was one.
    pub snapshot: Option<Batch>,
    /// Log records newer than the snapshot, in order.
    pub records: Vec<Batch>,
}

/// Reads the snapshot and the log, cutting off a torn last log record.
pub(crate) fn recover(dir: &Path) -> Result<Recovered> {
    let snapshot = read_snapshot(dir)?;
    let after = snapshot.as_ref().map_or(0, |s| s.lsn);
    let records = read_wal(dir)?
        .into_iter()
        .filter(|record| record.lsn > after)
        .collect();
    Ok(Recovered { snapshot, records })
}

fn read_snapshot(dir: &Path) -> Result<Option<Batch>> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(&path, e)),
    };
    let what = || path.display().to_string();
    if bytes.len() < SNAPSHOT_MAGIC.len() + 4 || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(StoreError::decode(what(), "not an Encore store snapshot"));
    }
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let body = &bytes[12..];
    if crc32fast::hash(body) != crc {
        return Err(StoreError::decode(what(), "checksum mismatch"));
    }
    Batch::decode(body)
        .map(Some)
        .map_err(|e| StoreError::decode(what(), e))
}

fn read_wal(dir: &Path) -> Result<Vec<Batch>> {
    let path = dir.join(WAL_FILE);
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes)
                .map_err(|e| StoreError::io(&path, e))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(&path, e)),
    }
    if bytes.len() < WAL_MAGIC.len() {
        // Created but the header never made it: nothing was logged.
        return Ok(Vec::new());
    }
    if &bytes[..8] != WAL_MAGIC {
        return Err(StoreError::decode(
            path.display().to_string(),
            "not an Encore store write-ahead log",
        ));
    }
    let mut records = Vec::new();
    let mut at = WAL_MAGIC.len();
    while at < bytes.len() {
        let what = || format!("{} record at byte {at}", path.display());
        let rest = &bytes[at..];
        if rest.len() < FRAME_HEADER {
            warn_torn(&path, at, rest.len());
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let end = FRAME_HEADER + len;
        if rest.len() < end {
            warn_torn(&path, at, rest.len());
            break;
        }
        let payload = &rest[FRAME_HEADER..end];
        let is_last = rest.len() == end;
        let record = if crc32fast::hash(payload) == crc {
            Batch::decode(payload).map_err(|e| StoreError::decode(what(), e))
        } else {
            Err(StoreError::decode(what(), "checksum mismatch"))
        };
        match record {
            Ok(record) => records.push(record),
            // A damaged final record is a write the crash interrupted.
            Err(_) if is_last => {
                warn_torn(&path, at, rest.len());
                break;
            }
            Err(err) => return Err(err),
        }
        at += end;
    }
    Ok(records)
}

fn warn_torn(path: &Path, at: usize, len: usize) {
    tracing::warn!(
        path = %path.display(),
        offset = at,
        bytes = len,
        "dropping a torn record at the end of the store's write-ahead log (a write interrupted by a crash)"
    );
}

/// Writes `snapshot` atomically and empties the log: temp file, fsync,
/// rename, directory fsync, then a fresh log.
fn write_snapshot(dir: &Path, snapshot: &[u8], wal: &mut File) -> io::Result<()> {
    let tmp = dir.join(SNAPSHOT_TMP);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(SNAPSHOT_MAGIC)?;
        file.write_all(&crc32fast::hash(snapshot).to_le_bytes())?;
        file.write_all(snapshot)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    File::open(dir)?.sync_all()?;
    // Only now may the records the snapshot includes go.
    wal.set_len(WAL_MAGIC.len() as u64)?;
    wal.seek(SeekFrom::End(0))?;
    wal.sync_all()
}

/// Opens (or creates) the log for appending, with its header in place.
fn open_wal(dir: &Path) -> io::Result<File> {
    let path = dir.join(WAL_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    if file.metadata()?.len() < WAL_MAGIC.len() as u64 {
        file.set_len(0)?;
        file.write_all(WAL_MAGIC)?;
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
    }
    file.seek(SeekFrom::End(0))?;
    Ok(file)
}

/// What the writer thread is asked to do.
enum Command {
    /// Append one encoded record.
    Append(Vec<u8>, oneshot::Sender<io::Result<()>>),
    /// Replace the snapshot with this encoded batch and empty the log.
    Snapshot(Vec<u8>, oneshot::Sender<io::Result<()>>),
}

/// Receives the outcome of a queued write.
pub(crate) type Ack = oneshot::Receiver<io::Result<()>>;

/// The writer thread and the way to it.
pub(crate) struct LogWriter {
    tx: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    /// Writes `snapshot` (the recovered state) synchronously, empties the
    /// log, and starts the writer thread on it.
    pub fn start(dir: &Path, snapshot: &[u8], durability: Durability) -> Result<Self> {
        let wal_path = dir.join(WAL_FILE);
        let mut wal = open_wal(dir).map_err(|e| StoreError::io(&wal_path, e))?;
        write_snapshot(dir, snapshot, &mut wal).map_err(|e| StoreError::io(dir, e))?;
        let (tx, rx) = mpsc::channel();
        let dir: PathBuf = dir.to_owned();
        let thread = std::thread::Builder::new()
            .name("encore-store-wal".into())
            .spawn(move || run(dir, wal, rx, durability))
            .map_err(|e| StoreError::io(&wal_path, e))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a record; the returned ack resolves once it is durable.
    pub fn append(&self, record: Vec<u8>) -> Ack {
        self.send(|done| Command::Append(record, done))
    }

    /// Queues a snapshot (ordered after every record queued before it).
    pub fn snapshot(&self, snapshot: Vec<u8>) -> Ack {
        self.send(|done| Command::Snapshot(snapshot, done))
    }

    fn send(&self, command: impl FnOnce(oneshot::Sender<io::Result<()>>) -> Command) -> Ack {
        let (done, ack) = oneshot::channel();
        if let Some(tx) = &self.tx {
            // If the thread is gone the command (and `done`) is dropped,
            // which the caller sees as a closed ack.
            let _ = tx.send(command(done));
        }
        ack
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        // Closing the channel lets the thread finish what is queued and exit;
        // joining means the files are released when the store is.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: group commit until the channel closes. After the
/// first failure every later write fails too (the store then refuses all
/// calls), so nothing is ever written after a gap.
fn run(dir: PathBuf, mut wal: File, rx: mpsc::Receiver<Command>, durability: Durability) {
    let mut failed: Option<String> = None;
    let fail = |failed: &Option<String>| io::Error::other(failed.clone().unwrap_or_default());
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut buffer = Vec::new();
        let mut waiting = Vec::new();
        for command in batch {
            match command {
                Command::Append(record, done) => {
                    if failed.is_some() {
                        let _ = done.send(Err(fail(&failed)));
                        continue;
                    }
                    let len = u32::try_from(record.len()).unwrap_or(u32::MAX);
                    buffer.extend_from_slice(&len.to_le_bytes());
                    buffer.extend_from_slice(&crc32fast::hash(&record).to_le_bytes());
                    buffer.extend_from_slice(&record);
                    waiting.push(done);
                }
                Command::Snapshot(snapshot, done) => {
                    flush(&mut wal, &mut buffer, &mut waiting, &mut failed, durability);
                    if failed.is_some() {
                        let _ = done.send(Err(fail(&failed)));
                        continue;
                    }
                    let result = write_snapshot(&dir, &snapshot, &mut wal);
                    if let Err(err) = &result {
                        failed = Some(format!("writing the snapshot: {err}"));
                    }
                    let _ = done.send(result);
                }
            }
        }
        flush(&mut wal, &mut buffer, &mut waiting, &mut failed, durability);
    }
}

/// Writes the buffered records, syncs, and acknowledges their callers.
fn flush(
    wal: &mut File,
    buffer: &mut Vec<u8>,
    waiting: &mut Vec<oneshot::Sender<io::Result<()>>>,
    failed: &mut Option<String>,
    durability: Durability,
) {
    if waiting.is_empty() {
        return;
    }
    let result = wal.write_all(buffer).and_then(|()| match durability {
        Durability::Fsync => wal.sync_data(),
        Durability::OsBuffer => Ok(()),
    });
    buffer.clear();
    if let Err(err) = &result {
        *failed = Some(format!("writing the write-ahead log: {err}"));
    }
    for done in waiting.drain(..) {
        let _ = done.send(match &result {
            Ok(()) => Ok(()),
            Err(err) => Err(io::Error::new(err.kind(), err.to_string())),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::on_disk::{MemberKey, Op, op::Kind};

    fn record(lsn: u64) -> Vec<u8> {
        Batch {
            lsn,
            ops: vec![Op {
                kind: Some(Kind::RemoveMember(MemberKey {
                    member_id: format!("m{lsn}"),
                })),
            }],
        }
        .encode_to_vec()
    }

    fn frame(record: &[u8]) -> Vec<u8> {
        let mut out = (record.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&crc32fast::hash(record).to_le_bytes());
        out.extend_from_slice(record);
        out
    }

    #[test]
    fn a_torn_last_record_is_dropped_but_damage_before_it_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        let mut good = WAL_MAGIC.to_vec();
        good.extend(frame(&record(1)));
        good.extend(frame(&record(2)));

        // Cut in the middle of record 2: record 1 survives.
        fs::write(&path, &good[..good.len() - 3]).unwrap();
        let lsns: Vec<u64> = read_wal(dir.path())
            .unwrap()
            .iter()
            .map(|r| r.lsn)
            .collect();
        assert_eq!(lsns, [1]);

        // A flipped byte in the last record: also a torn write.
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        fs::write(&path, &flipped).unwrap();
        assert_eq!(read_wal(dir.path()).unwrap().len(), 1);

        // A flipped byte in record 1 with record 2 after it: corruption.
        let mut corrupt = good.clone();
        corrupt[WAL_MAGIC.len() + FRAME_HEADER + 1] ^= 0xff;
        fs::write(&path, &corrupt).unwrap();
        assert!(matches!(
            read_wal(dir.path()),
            Err(StoreError::Decode { .. })
        ));

        fs::write(&path, &good).unwrap();
        assert_eq!(read_wal(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn a_damaged_snapshot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open_wal(dir.path()).unwrap();
        write_snapshot(dir.path(), &record(7), &mut wal).unwrap();
        assert_eq!(read_snapshot(dir.path()).unwrap().unwrap().lsn, 7);
        let path = dir.path().join(SNAPSHOT_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            read_snapshot(dir.path()),
            Err(StoreError::Decode { .. })
        ));
    }

    #[test]
    fn the_directory_lock_excludes_a_second_store() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_dir(dir.path()).unwrap();
        assert!(matches!(lock_dir(dir.path()), Err(StoreError::Io { .. })));
        drop(first);
        lock_dir(dir.path()).unwrap();
    }
}

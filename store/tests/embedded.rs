//! What only the embedded backend has: its files. Recovery from a crash in
//! the middle of a write, refusal of damaged or shared directories,
//! compaction, and the queues' consumer groups kept across a restart.

mod support;

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use encore_proto::v1::JobState;
use encore_store::{
    AppendOutcome, CreateOutcome, Durability, EmbeddedOptions, EmbeddedStore, ManualClock, Store,
    StoreError,
};
use support::{job, metric};

fn open(dir: &std::path::Path, options: EmbeddedOptions) -> encore_store::Result<EmbeddedStore> {
    EmbeddedStore::open(dir, options, Arc::new(ManualClock::starting_now()))
}

fn wal_len(dir: &std::path::Path) -> u64 {
    std::fs::metadata(dir.join("wal.log")).unwrap().len()
}

#[tokio::test]
async fn a_write_torn_by_a_crash_is_dropped_and_the_rest_recovered() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), EmbeddedOptions::default()).unwrap();
        let created = store
            .create_job(job("j1", JobState::Pending), "alice", None)
            .await
            .unwrap();
        assert!(matches!(created, CreateOutcome::Created(_)));
        store.append_metric("j1", metric(1)).await.unwrap();
    }
    // A crash in the middle of the next record: its header promises more
    // bytes than made it to the disk.
    let mut wal = OpenOptions::new()
        .append(true)
        .open(dir.path().join("wal.log"))
        .unwrap();
    wal.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6]).unwrap();
    drop(wal);

    let store = open(dir.path(), EmbeddedOptions::default()).unwrap();
    assert!(store.get_job("j1").await.unwrap().is_some());
    assert_eq!(store.metrics("j1", 0, 0).await.unwrap(), [metric(1)]);
    // Recovery compacted the log, torn bytes included.
    assert_eq!(wal_len(dir.path()), 8);
    store.append_metric("j1", metric(2)).await.unwrap();
    drop(store);
    let store = open(dir.path(), EmbeddedOptions::default()).unwrap();
    assert_eq!(store.metrics("j1", 0, 0).await.unwrap().len(), 2);
}

#[tokio::test]
async fn damage_before_the_last_record_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), EmbeddedOptions::default()).unwrap();
        let _ = store
            .create_job(job("j1", JobState::Pending), "alice", None)
            .await
            .unwrap();
        store.append_metric("j1", metric(1)).await.unwrap();
    }
    let path = dir.path().join("wal.log");
    let mut bytes = std::fs::read(&path).unwrap();
    // Inside the first record's payload (magic 8 + frame header 8).
    bytes[20] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let err = open(dir.path(), EmbeddedOptions::default()).unwrap_err();
    assert!(
        matches!(&err, StoreError::Decode { what, .. } if what.contains("wal.log")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_directory_is_open_in_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), EmbeddedOptions::default()).unwrap();
    let second = open(dir.path(), EmbeddedOptions::default());
    assert!(matches!(second, Err(StoreError::Io { .. })), "{second:?}");
    drop(first);
    open(dir.path(), EmbeddedOptions::default()).unwrap();
}

#[tokio::test]
async fn the_log_is_compacted_into_snapshots_as_it_grows() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        durability: Durability::OsBuffer,
        compact_after_bytes: 2048,
    };
    {
        let store = open(dir.path(), options.clone()).unwrap();
        let _ = store
            .create_job(job("j1", JobState::Running), "alice", None)
            .await
            .unwrap();
        for step in 1..=200 {
            store.append_metric("j1", metric(step)).await.unwrap();
        }
        for i in 0..50u8 {
            let outcome = store.queue_append("j1", vec![i; 100], 1000).await.unwrap();
            assert!(matches!(outcome, AppendOutcome::Appended(_)));
        }
        assert!(
            wal_len(dir.path()) < 2048 + 1024,
            "log not compacted: {} bytes",
            wal_len(dir.path())
        );
    }
    let store = open(dir.path(), options).unwrap();
    assert_eq!(store.metrics("j1", 0, 0).await.unwrap().len(), 200);
    assert_eq!(store.queue_len("j1").await.unwrap(), 50);
    assert_eq!(store.queue_appended("j1").await.unwrap(), 50);
}

#[tokio::test]
async fn deliveries_survive_a_restart_from_the_log_and_from_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (held, others);
    {
        let store = open(dir.path(), EmbeddedOptions::default()).unwrap();
        for i in 0..5u8 {
            let _ = store.queue_append("j1", vec![i], 10).await.unwrap();
        }
        let taken = store
            .queue_read("j1", "g", "learner", 3, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(store.queue_ack("j1", "g", &[taken[0].id]).await.unwrap(), 1);
        held = [taken[1].id, taken[2].id];
        others = store
            .queue_read("j1", "g", "other", 10, Duration::ZERO)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect::<Vec<_>>();
        // `other` hands its entries back to nobody: they stay pending.
        assert_eq!(others.len(), 2);
    }
    // The first reopen replays the log; the second reads the snapshot the
    // first one wrote (and an empty log).
    for reopen in ["log", "snapshot"] {
        let store = open(dir.path(), EmbeddedOptions::default()).unwrap();
        assert_eq!(store.queue_pending("j1", "g").await.unwrap(), 4, "{reopen}");
        // A consumer that lived through the restart is not handed what it
        // (or another) already holds: nothing is delivered twice.
        let again = store
            .queue_read("j1", "g", "learner", 10, Duration::ZERO)
            .await
            .unwrap();
        assert!(again.is_empty(), "{reopen}: {again:?}");
    }
    let store = open(dir.path(), EmbeddedOptions::default()).unwrap();
    // Its acknowledgements still count, and a claim finds the others.
    assert_eq!(store.queue_ack("j1", "g", &held).await.unwrap(), 2);
    let claimed = store
        .queue_claim_stale("j1", "g", "learner-2", Duration::ZERO, 10)
        .await
        .unwrap();
    let claimed: Vec<_> = claimed.iter().map(|e| e.id).collect();
    assert_eq!(claimed, others);
    drop(store);
    // The claim moved them to learner-2, durably.
    let store = open(dir.path(), EmbeddedOptions::default()).unwrap();
    assert_eq!(store.queue_pending("j1", "g").await.unwrap(), 2);
    assert_eq!(store.queue_ack("j1", "g", &others).await.unwrap(), 2);
    assert_eq!(store.queue_len("j1").await.unwrap(), 0);
    // Every entry was acknowledged; the count of those appended is kept,
    // through the log and through a snapshot.
    assert_eq!(store.queue_appended("j1").await.unwrap(), 5);
    drop(store);
    for reopen in ["log", "snapshot"] {
        let store = open(dir.path(), EmbeddedOptions::default()).unwrap();
        assert_eq!(store.queue_appended("j1").await.unwrap(), 5, "{reopen}");
    }
}

#[tokio::test]
async fn open_picks_the_backend_from_the_uri() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("embedded://{}", dir.path().display());
    let clock = Arc::new(ManualClock::starting_now());
    {
        let store = encore_store::open(&uri, clock.clone()).await.unwrap();
        let _ = store
            .create_job(job("j1", JobState::Pending), "alice", None)
            .await
            .unwrap();
    }
    let store = encore_store::open(&uri, clock.clone()).await.unwrap();
    assert!(store.get_job("j1").await.unwrap().is_some());
    for bad in ["embedded://", "file:///tmp/x", "postgres://db"] {
        let err = encore_store::open(bad, clock.clone()).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidArgument { field: "uri", .. }),
            "{bad}: {err:?}"
        );
    }
}

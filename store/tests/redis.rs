//! What only the Redis backend has: its key layout under a prefix, and
//! recovery from state removed behind its back.

mod support;

use std::sync::Arc;
use std::time::Duration;

use encore_proto::v1::{JobState, Role};
use encore_store::{AppendOutcome, ManualClock, RedisConfig, RedisStore, Store};
use support::{RedisServer, job, manifest, member, metric};

async fn connect(server: &RedisServer, prefix: &str) -> RedisStore {
    let config = RedisConfig::new(server.url()).with_prefix(prefix);
    RedisStore::connect(config, Arc::new(ManualClock::starting_now()))
        .await
        .unwrap()
}

/// Every key in the server, from `KEYS *`.
async fn keys(server: &RedisServer) -> Vec<String> {
    let reply = server.command(&["KEYS", "*"]).await;
    // RESP array of bulk strings: "*n", then "$len" / value pairs.
    reply
        .lines()
        .skip(1)
        .filter(|line| !line.starts_with('$'))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_lives_under_the_prefix_and_prefixes_do_not_mix() {
    let server = RedisServer::start().await;
    let a = connect(&server, "clusterA:").await;
    let b = connect(&server, "clusterB:").await;

    let _ = a
        .create_job(
            job("j1", JobState::Pending),
            "alice",
            support::key("k", "sha"),
        )
        .await
        .unwrap();
    a.append_metric("j1", metric(1)).await.unwrap();
    let _ = a
        .register_member(member("m1", "pod", Role::Actor), Duration::from_secs(10))
        .await
        .unwrap();
    let _ = a.put_manifest(manifest("j1", 0, "sha0")).await.unwrap();
    a.pin("j1", 0, "actor", Duration::from_secs(10))
        .await
        .unwrap();
    let _ = a.queue_append("j1", b"x".to_vec(), 10).await.unwrap();
    let _ = a
        .queue_read("j1", "g", "c", 1, Duration::ZERO)
        .await
        .unwrap();

    let all = keys(&server).await;
    assert!(all.len() >= 10, "{all:?}");
    assert!(all.iter().all(|k| k.starts_with("clusterA:")), "{all:?}");
    assert_eq!(a.queue_key("j1"), "clusterA:queue:j1");
    assert!(all.contains(&a.queue_key("j1")));

    assert!(b.get_job("j1").await.unwrap().is_none());
    assert_eq!(b.queue_len("j1").await.unwrap(), 0);
    assert!(b.list_members(None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_deleted_behind_the_store_is_recreated() {
    let server = RedisServer::start().await;
    let store = connect(&server, "t:").await;
    let _ = store.queue_append("j1", b"a".to_vec(), 10).await.unwrap();
    assert_eq!(
        store
            .queue_read("j1", "g", "c", 10, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        1
    );
    // An operator flushes Redis: the store's cached group is gone.
    assert!(server.command(&["FLUSHALL"]).await.starts_with("+OK"));
    let AppendOutcome::Appended(id) = store.queue_append("j1", b"b".to_vec(), 10).await.unwrap()
    else {
        panic!("queue full");
    };
    let read = store
        .queue_read("j1", "g", "c", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(read.iter().map(|e| e.id).collect::<Vec<_>>(), [id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connects_to_a_redis_uri() {
    let server = RedisServer::start().await;
    let store = encore_store::open(&server.url(), Arc::new(ManualClock::starting_now()))
        .await
        .unwrap();
    let _ = store
        .create_job(job("j1", JobState::Pending), "alice", None)
        .await
        .unwrap();
    let all = keys(&server).await;
    assert!(all.iter().all(|k| k.starts_with("encore:")), "{all:?}");
}

//! RolloutQueueService: the queue of a coordinator on the embedded store,
//! used through [`QueueClient`] exactly as workers use it. Append with the
//! bound, read (also blocked until an append), ack, claim after a crash,
//! stats; the worker token only; bad requests name their field.

mod support;

use std::time::Duration;

use encore_coordinator::member::CoordinatorClient;
use encore_coordinator::queue::{COORDINATOR_QUEUE_URI, open_queue};
use encore_proto::v1::QueueReadRequest;
use encore_proto::v1::rollout_queue_service_client::RolloutQueueServiceClient;
use encore_store::{AppendOutcome, StoreError};
use support::*;
use tonic::Code;

#[tokio::test]
async fn workers_use_an_embedded_coordinators_queue_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded://{}", dir.path().join("state").display());
    let config = test_config(&store, dir.path());
    assert_eq!(config.rollout_queue_uri(), COORDINATOR_QUEUE_URI);
    let c = TestCoordinator::start(config).await;
    let client = CoordinatorClient::new(&c.url(), WORKER, None).unwrap();
    let queue = open_queue(COORDINATOR_QUEUE_URI, &client).await.unwrap();

    // Bounded appends: the third is refused while two are unacknowledged.
    for i in 0..2u8 {
        let outcome = queue.append("job-1", vec![i; 3], 2).await.unwrap();
        assert!(matches!(outcome, AppendOutcome::Appended(_)), "{outcome:?}");
    }
    assert_eq!(
        queue.append("job-1", vec![9], 2).await.unwrap(),
        AppendOutcome::Full { len: 2 }
    );

    // Rank A reads one and "crashes"; rank B reads the other.
    let a = queue
        .read("job-1", "learners", "rank-a", 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].payload, vec![0, 0, 0]);
    let b = queue
        .read("job-1", "learners", "rank-b", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].payload, vec![1, 1, 1]);
    assert_eq!(queue.len("job-1").await.unwrap(), 2);
    assert_eq!(queue.pending("job-1", "learners").await.unwrap(), 2);

    // A blocked read wakes up on the next append, well before its limit.
    let reader = {
        let queue = queue.clone();
        tokio::spawn(async move {
            queue
                .read("job-1", "learners", "rank-b", 1, Duration::from_secs(4))
                .await
        })
    };
    queue.ack("job-1", "learners", &[b[0].id]).await.unwrap();
    let appended = queue.append("job-1", vec![2], 2).await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(3), reader)
        .await
        .expect("the blocked read wakes on the append")
        .unwrap()
        .unwrap();
    assert_eq!(woken.len(), 1);
    assert_eq!(AppendOutcome::Appended(woken[0].id), appended);

    // Rank A's successor claims what A left unacknowledged.
    let claimed = queue
        .claim_stale("job-1", "learners", "rank-a2", Duration::ZERO, 10)
        .await
        .unwrap();
    let ids: Vec<_> = claimed.iter().map(|e| e.id).collect();
    assert!(ids.contains(&a[0].id), "{ids:?}");
    let acknowledged = queue.ack("job-1", "learners", &ids).await.unwrap();
    assert_eq!(acknowledged, ids.len() as u64);
    assert_eq!(queue.len("job-1").await.unwrap(), 2 - acknowledged);

    // Bad requests name their fields; nothing changes.
    let err = queue.append("", Vec::new(), 0).await.unwrap_err();
    let StoreError::InvalidArgument { message, .. } = &err else {
        panic!("{err:?}");
    };
    for field in ["job_id", "payload", "max_len"] {
        assert!(message.contains(field), "{message}");
    }

    // Client tokens are refused: the queue is for workers.
    let mut raw =
        RolloutQueueServiceClient::with_interceptor(channel(&c.url()).await, bearer(ALICE));
    let status = raw
        .read(QueueReadRequest {
            job_id: "job-1".into(),
            group: "learners".into(),
            consumer: "snoop".into(),
            count: 1,
            block_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    c.stop().await;
}

//! RolloutQueueService: the queue of a coordinator on the embedded store,
//! used through [`QueueClient`] exactly as workers use it. Append with the
//! bound, read (also blocked until an append), ack, claim after a crash,
//! stats; each member only for its own job and in its role; bad requests
//! name their field.

mod support;

use std::time::Duration;

use encore_client::member::CoordinatorClient;
use encore_client::queue::{COORDINATOR_QUEUE_URI, open_queue};
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
    let mut alice = c.jobs(ALICE).await;
    let mut cluster = c.cluster().await;
    let (job, [_, learner, actor]) = running_job(&mut alice, &mut cluster, "q").await;
    let as_member = |member: &str| {
        let client = CoordinatorClient::new(&c.url(), &cluster.token(member), None).unwrap();
        async move { open_queue(COORDINATOR_QUEUE_URI, &client).await.unwrap() }
    };
    // The job's actor appends; its learner rank reads, acknowledges and
    // claims.
    let producer = as_member(&actor).await;
    let queue = as_member(&learner).await;
    let job = job.as_str();

    // Bounded appends: the third is refused while two are unacknowledged.
    for i in 0..2u8 {
        let outcome = producer.append(job, vec![i; 3], 2).await.unwrap();
        assert!(matches!(outcome, AppendOutcome::Appended(_)), "{outcome:?}");
    }
    assert_eq!(
        producer.append(job, vec![9], 2).await.unwrap(),
        AppendOutcome::Full { len: 2 }
    );

    // Rank A reads one and "crashes"; rank B reads the other.
    let a = queue
        .read(job, "learners", "rank-a", 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].payload, vec![0, 0, 0]);
    let b = queue
        .read(job, "learners", "rank-b", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].payload, vec![1, 1, 1]);
    assert_eq!(queue.len(job).await.unwrap(), 2);
    assert_eq!(queue.pending(job, "learners").await.unwrap(), 2);

    // A blocked read wakes up on the next append, well before its limit.
    let reader = {
        let queue = queue.clone();
        let job = job.to_owned();
        tokio::spawn(async move {
            queue
                .read(&job, "learners", "rank-b", 1, Duration::from_secs(4))
                .await
        })
    };
    queue.ack(job, "learners", &[b[0].id]).await.unwrap();
    let appended = producer.append(job, vec![2], 2).await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(3), reader)
        .await
        .expect("the blocked read wakes on the append")
        .unwrap()
        .unwrap();
    assert_eq!(woken.len(), 1);
    assert_eq!(AppendOutcome::Appended(woken[0].id), appended);

    // Rank A's successor claims what A left unacknowledged.
    let claimed = queue
        .claim_stale(job, "learners", "rank-a2", Duration::ZERO, 10)
        .await
        .unwrap();
    let ids: Vec<_> = claimed.iter().map(|e| e.id).collect();
    assert!(ids.contains(&a[0].id), "{ids:?}");
    let acknowledged = queue.ack(job, "learners", &ids).await.unwrap();
    assert_eq!(acknowledged, ids.len() as u64);
    assert_eq!(queue.len(job).await.unwrap(), 2 - acknowledged);

    // Bad requests name their fields; nothing changes.
    let err = producer.append("", Vec::new(), 0).await.unwrap_err();
    let StoreError::InvalidArgument { message, .. } = &err else {
        panic!("{err:?}");
    };
    for field in ["job_id", "payload", "max_len"] {
        assert!(message.contains(field), "{message}");
    }

    // Each member does only what its role does with its own job: the
    // actor cannot read, the learner cannot append, and the worker token
    // (good for Register only) and client tokens can do neither.
    let read = |token: &str| {
        let url = c.url();
        let token = token.to_owned();
        async move {
            RolloutQueueServiceClient::with_interceptor(channel(&url).await, bearer(&token))
                .read(QueueReadRequest {
                    job_id: job.into(),
                    group: "learners".into(),
                    consumer: "snoop".into(),
                    count: 1,
                    block_ms: 0,
                })
                .await
                .unwrap_err()
        }
    };
    for (token, code) in [
        (cluster.token(&actor), Code::FailedPrecondition),
        (WORKER.to_owned(), Code::PermissionDenied),
        (ALICE.to_owned(), Code::PermissionDenied),
    ] {
        let status = read(&token).await;
        assert_eq!(status.code(), code, "{status:?}");
    }
    let err = queue.append(job, vec![1], 10).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Backend(m) if m.contains("FailedPrecondition")),
        "{err:?}"
    );
    // And only with its own job: another job's queue is closed to it.
    let other = producer.append("job-of-nobody", vec![1], 10).await;
    assert!(other.is_err(), "{other:?}");
    c.stop().await;
}

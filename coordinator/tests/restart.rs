//! A coordinator process killed with SIGKILL mid-job and started again on
//! the same store carries on: on Redis the same jobs, states, leases,
//! assignments and metric history, with no help from the clients; on the
//! embedded store the rollout queue it serves keeps what each learner
//! holds.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use encore_client::member::CoordinatorClient;
use encore_client::queue::{COORDINATOR_QUEUE_URI, open_queue};
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{
    GetAssignmentRequest, GetJobRequest, HeartbeatRequest, JobState, MetricPoint,
    ReportProgressRequest, WatchJobRequest, job_event,
};
use encore_store::{AppendOutcome, EntryId, Queue};
use encore_testkit::{RedisServer, free_port};
use support::*;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// The coordinator binary, run on a config file.
struct Process {
    child: Child,
    url: String,
}

impl Process {
    /// Starts the binary and waits until its gRPC port answers.
    async fn start(config: &Path, port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_encore-coordinator"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning encore-coordinator");
        let url = format!("http://127.0.0.1:{port}");
        let mut process = Self { child, url };
        process.wait_ready().await;
        process
    }

    /// Polls the gRPC port with a growing back-off until it connects (the
    /// process cannot tell us otherwise), or fails if the process exits.
    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut backoff = Duration::from_millis(5);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("encore-coordinator exited early with {status}");
            }
            if let Ok(endpoint) = Channel::from_shared(self.url.clone())
                && endpoint.connect().await.is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "coordinator not ready"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    fn kill(mut self) {
        // SIGKILL: no drain, no cleanup; whatever is not in Redis is lost.
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping the coordinator");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a config file for the coordinator binary on `store`, on a free
/// port (returned), with files under `dir`.
fn config_file(dir: &Path, store: &str) -> (PathBuf, u16) {
    let port = free_port();
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[coordinator]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\n\
             store = \"{store}\"\nblob_dir = \"{blobs}\"\ncheckpoint_dir = \"{ckpt}\"\n\
             lease_ttl_ms = 30000\n\n[coordinator.auth]\n\
             client_tokens = [\"alice:{ALICE}\"]\nworker_token = \"{WORKER}\"\n",
            admin = free_port(),
            blobs = dir.join("blobs").display(),
            ckpt = dir.join("ckpt").display(),
        ),
    )
    .unwrap();
    (config, port)
}

#[tokio::test]
async fn a_coordinator_killed_mid_job_carries_on_after_a_restart() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, port) = config_file(dir.path(), &redis.url());

    let first = Process::start(&config, port).await;
    let mut jobs = JobServiceClient::with_interceptor(channel(&first.url).await, bearer(ALICE));
    let mut cluster = TestCluster::new(channel(&first.url).await);
    let job_id = submit_job(&mut jobs, "restart", 1).await;
    let members = staff(&mut cluster, "1").await;
    let mut watch = jobs
        .watch(WatchJobRequest {
            job_id: job_id.clone(),
            after_sequence: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    // Submitted, then running.
    for expected in [JobState::Pending, JobState::Running] {
        let event = tokio::time::timeout(PATIENCE, watch.next()).await.unwrap();
        match event.unwrap().unwrap().event {
            Some(job_event::Event::StateChange(c)) => assert_eq!(c.state, expected as i32),
            other => panic!("{other:?}"),
        }
    }
    let point = |step| MetricPoint {
        step,
        combined_reward_mean: step as f64,
        ..MetricPoint::default()
    };
    cluster
        .report_progress(ReportProgressRequest {
            member_id: members[1].clone(),
            job_id: job_id.clone(),
            metrics: vec![point(1), point(2)],
            ..ReportProgressRequest::default()
        })
        .await
        .unwrap();
    let before = cluster
        .get_assignment(GetAssignmentRequest {
            member_id: members[2].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let members_before = cluster.clone();
    drop((jobs, cluster, watch));
    first.kill();

    let second = Process::start(&config, port).await;
    let mut jobs = JobServiceClient::with_interceptor(channel(&second.url).await, bearer(ALICE));
    // The members' tokens outlive the coordinator process.
    let mut cluster = members_before.reconnect(channel(&second.url).await);
    let job = jobs
        .get(GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, JobState::Running as i32);
    assert_eq!(job.step, 2);
    for member_id in &members {
        let beat = cluster
            .heartbeat(HeartbeatRequest {
                member_id: member_id.clone(),
                status: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            beat.lease_valid,
            "{member_id} kept its lease across the restart"
        );
    }
    let after = cluster
        .get_assignment(GetAssignmentRequest {
            member_id: members[2].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after, before,
        "the actor keeps its assignment, generation included"
    );

    // The whole history is still there, and the job goes on from it.
    cluster
        .report_progress(ReportProgressRequest {
            member_id: members[1].clone(),
            job_id: job_id.clone(),
            metrics: vec![point(3)],
            ..ReportProgressRequest::default()
        })
        .await
        .unwrap();
    let mut watch = jobs
        .watch(WatchJobRequest {
            job_id: job_id.clone(),
            after_sequence: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    let mut steps = Vec::new();
    while steps.len() < 3 {
        let event = tokio::time::timeout(PATIENCE, watch.next()).await.unwrap();
        if let Some(job_event::Event::Metrics(p)) = event.unwrap().unwrap().event {
            steps.push(p.step);
        }
    }
    assert_eq!(steps, [1, 2, 3]);
    second.kill();
}

/// On `embedded://` the workers reach the queue through the coordinator's
/// RolloutQueueService. A learner has read entries and not yet
/// acknowledged them (its checkpoint is still to come) when the
/// coordinator is SIGKILLed; the restarted coordinator must not hand those
/// entries out again (the learner would train on them twice), must count
/// the learner's acknowledgements of them, and must still give a crashed
/// rank's entries to a claim. Every entry appended is read exactly once
/// and then acknowledged: produced = consumed + queued.
#[tokio::test]
async fn on_the_embedded_store_a_restart_keeps_what_a_learner_holds() {
    const GROUP: &str = "learners";
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded://{}", dir.path().join("state").display());
    let (config, port) = config_file(dir.path(), &store);
    let first = Process::start(&config, port).await;
    let mut jobs = JobServiceClient::with_interceptor(channel(&first.url).await, bearer(ALICE));
    let mut cluster = TestCluster::new(channel(&first.url).await);
    let (job, [_, learner, actor]) = running_job(&mut jobs, &mut cluster, "held").await;
    let job = job.as_str();
    // The actor appends, the learner reads; their member tokens stay good
    // across the restart.
    let queue_of = |url: &str, member: &str| {
        let client = CoordinatorClient::new(url, &cluster.token(member), None).unwrap();
        async move { open_queue(COORDINATOR_QUEUE_URI, &client).await.unwrap() }
    };
    let producer = queue_of(&first.url, &actor).await;
    let queue = queue_of(&first.url, &learner).await;
    let mut produced = Vec::new();
    for i in 0..6u8 {
        match producer.append(job, vec![i], 100).await.unwrap() {
            AppendOutcome::Appended(id) => produced.push(id),
            full => panic!("{full:?}"),
        }
    }
    let read = |queue: Arc<dyn Queue>, consumer: &'static str, count| async move {
        let entries = queue
            .read(job, GROUP, consumer, count, Duration::ZERO)
            .await
            .unwrap();
        entries.iter().map(|e| e.id).collect::<Vec<EntryId>>()
    };
    // Rank 0 holds three (trained on, not yet checkpointed); rank 1 holds
    // one and will not come back.
    let held = read(queue.clone(), "rank-0", 3).await;
    let lost_rank = read(queue.clone(), "rank-1", 1).await;
    assert_eq!(held, produced[..3]);
    assert_eq!(lost_rank, produced[3..4]);
    drop((queue, producer, jobs));
    first.kill();

    let second = Process::start(&config, port).await;
    let queue = queue_of(&second.url, &learner).await;
    // Rank 0 reads on: only what nobody has read yet.
    let fresh = read(queue.clone(), "rank-0", 10).await;
    assert_eq!(
        fresh,
        produced[4..],
        "entries rank 0 already holds came back"
    );
    assert_eq!(queue.pending(job, GROUP).await.unwrap(), 6);
    // Its checkpoint written, it acknowledges everything it trained on,
    // and every one of them counts.
    let trained: Vec<EntryId> = held.iter().chain(&fresh).copied().collect();
    assert_eq!(
        queue.ack(job, GROUP, &trained).await.unwrap(),
        trained.len() as u64
    );
    // Rank 1's successor claims what rank 1 held.
    let claimed: Vec<EntryId> = queue
        .claim_stale(job, GROUP, "rank-1b", Duration::ZERO, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(claimed, lost_rank);
    assert_eq!(queue.ack(job, GROUP, &claimed).await.unwrap(), 1);

    let mut consumed: Vec<EntryId> = trained.into_iter().chain(claimed).collect();
    consumed.sort();
    let queued = queue.len(job).await.unwrap();
    assert_eq!(
        (consumed, queued),
        (produced, 0),
        "each entry consumed once"
    );
    drop(queue);
    second.kill();
}

//! A coordinator process killed with SIGKILL mid-job and started again on
//! the same Redis carries on: the same jobs, states, leases, assignments
//! and metric history, with no help from the clients.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use encore_proto::v1::cluster_service_client::ClusterServiceClient;
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{
    GetAssignmentRequest, GetJobRequest, HeartbeatRequest, JobState, MetricPoint,
    ReportProgressRequest, WatchJobRequest, job_event,
};
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

#[tokio::test]
async fn a_coordinator_killed_mid_job_carries_on_after_a_restart() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[coordinator]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\n\
             store = \"{store}\"\nblob_dir = \"{blobs}\"\ncheckpoint_dir = \"{ckpt}\"\n\
             lease_ttl_ms = 30000\n\n[coordinator.auth]\n\
             client_tokens = [\"alice:{ALICE}\"]\nworker_token = \"{WORKER}\"\n",
            admin = free_port(),
            store = redis.url(),
            blobs = dir.path().join("blobs").display(),
            ckpt = dir.path().join("ckpt").display(),
        ),
    )
    .unwrap();

    let first = Process::start(&config, port).await;
    let mut jobs = JobServiceClient::with_interceptor(channel(&first.url).await, bearer(ALICE));
    let mut cluster =
        ClusterServiceClient::with_interceptor(channel(&first.url).await, bearer(WORKER));
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
    drop((jobs, cluster, watch));
    first.kill();

    let second = Process::start(&config, port).await;
    let mut jobs = JobServiceClient::with_interceptor(channel(&second.url).await, bearer(ALICE));
    let mut cluster =
        ClusterServiceClient::with_interceptor(channel(&second.url).await, bearer(WORKER));
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

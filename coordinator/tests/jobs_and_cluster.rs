//! JobService and ClusterService end to end over gRPC, against a
//! coordinator on a real Redis: submission and its idempotency, quotas,
//! listing, cancelling and watching; registration, leases, assignment and
//! reassignment after a lease expires; progress reports; authentication
//! and job ownership; and malformed input of every rpc.

mod support;

use std::time::Duration;

use encore_proto::v1::{
    CancelJobRequest, DeregisterRequest, GetAssignmentRequest, GetJobRequest, HeartbeatRequest,
    JobState, ListJobsRequest, MemberStatus, MetricPoint, Page, ReportProgressRequest, Role,
    StopReason, WatchAssignmentRequest, WatchJobRequest, assignment, job_event,
};
use encore_testkit::RedisServer;
use support::*;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

/// A coordinator on its own Redis; the short lease keeps the expiry test
/// quick.
async fn coordinator(lease_ttl_ms: u64) -> (RedisServer, tempfile::TempDir, TestCoordinator) {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&redis.url(), dir.path());
    config.lease_ttl_ms = lease_ttl_ms;
    config.max_active_jobs_per_client = 3;
    let coordinator = TestCoordinator::start(config).await;
    (redis, dir, coordinator)
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

async fn state_of(jobs: &mut JobClient, job_id: &str) -> JobState {
    let job = jobs
        .get(GetJobRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    JobState::try_from(job.state).unwrap()
}

/// Waits on a WatchJob stream for the job to reach `state`.
#[tokio::test]
async fn submit_is_idempotent_per_client_and_refuses_a_reused_key() {
    let (_redis, _dir, c) = coordinator(15_000).await;
    let mut alice = c.jobs(ALICE).await;
    let mut bob = c.jobs(BOB).await;

    let first = alice.submit(submit("k1", 1)).await.unwrap().into_inner();
    assert!(first.created);
    let job = first.job.unwrap();
    assert_eq!(job.state, JobState::Pending as i32);
    let spec = job.spec.as_ref().unwrap();
    assert!(
        spec.seeds.as_ref().unwrap().root.is_some(),
        "seeds are drawn and stored"
    );

    let again = alice.submit(submit("k1", 1)).await.unwrap().into_inner();
    assert!(!again.created);
    assert_eq!(again.job.unwrap().job_id, job.job_id);

    let reused = alice.submit(submit("k1", 2)).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");

    // The same key from another client is another submission.
    let bobs = bob.submit(submit("k1", 1)).await.unwrap().into_inner();
    assert!(bobs.created);
    assert_ne!(bobs.job.unwrap().job_id, job.job_id);

    // validate_only stores nothing.
    let mut dry = submit("k-dry", 1);
    dry.validate_only = true;
    let dry = alice.submit(dry).await.unwrap().into_inner();
    assert!(!dry.created);
    assert!(dry.job.unwrap().job_id.is_empty());
    // Alice lists her own job; Bob's is his.
    for client in [&mut alice, &mut bob] {
        let listed = client
            .list(ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.jobs.len(), 1);
    }

    // Each rpc is counted by method and outcome.
    let exposition = prometheus::TextEncoder::new()
        .encode_to_string(&c.running.registry().gather())
        .unwrap();
    for line in [
        r#"encore_coordinator_rpc_seconds_count{code="OK",method="JobService/Submit"} 4"#,
        r#"encore_coordinator_rpc_seconds_count{code="ALREADY_EXISTS",method="JobService/Submit"} 1"#,
    ] {
        assert!(
            exposition.contains(line),
            "{line} missing from\n{exposition}"
        );
    }
    c.stop().await;
}

#[tokio::test]
async fn a_client_has_a_quota_of_live_jobs() {
    let (_redis, _dir, c) = coordinator(15_000).await;
    let mut alice = c.jobs(ALICE).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = alice.submit(submit(&format!("q{i}"), 1)).await.unwrap();
        ids.push(r.into_inner().job.unwrap().job_id);
    }
    let over = alice.submit(submit("q3", 1)).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert_eq!(reason(&over), "QUOTA_EXCEEDED");
    // Bob's quota is his own.
    c.jobs(BOB).await.submit(submit("q3", 1)).await.unwrap();
    // A cancelled job frees its place.
    alice
        .cancel(CancelJobRequest {
            job_id: ids[0].clone(),
            reason: "make room".into(),
        })
        .await
        .unwrap();
    alice.submit(submit("q3", 1)).await.unwrap();
    c.stop().await;
}

#[tokio::test]
async fn jobs_list_newest_first_by_page_and_state_and_only_the_callers_own() {
    let (_redis, _dir, c) = coordinator(15_000).await;
    let mut alice = c.jobs(ALICE).await;
    let mut bob = c.jobs(BOB).await;
    let mut created = Vec::new();
    for i in 0..6 {
        let client = if i % 2 == 0 { &mut alice } else { &mut bob };
        let job = client.submit(submit(&format!("l{i}"), 1)).await.unwrap();
        created.push(job.into_inner().job.unwrap().job_id);
    }
    // Bob submitted the odd jobs: only he may cancel them.
    bob.cancel(CancelJobRequest {
        job_id: created[1].clone(),
        reason: String::new(),
    })
    .await
    .unwrap();

    async fn all_pages(client: &mut JobClient, states: Vec<i32>) -> Vec<String> {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = client
                .list(ListJobsRequest {
                    page: Some(Page {
                        page_size: 2,
                        page_token: token.clone(),
                    }),
                    states: states.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            seen.extend(page.jobs.into_iter().map(|j| j.job_id));
            if page.next_page_token.is_empty() {
                return seen;
            }
            token = page.next_page_token;
        }
    }
    // Each client sees its own jobs, newest first, and nobody else's.
    let newest_first = |parity: usize| -> Vec<String> {
        created
            .iter()
            .enumerate()
            .rev()
            .filter(|(i, _)| i % 2 == parity)
            .map(|(_, id)| id.clone())
            .collect()
    };
    assert_eq!(all_pages(&mut alice, vec![]).await, newest_first(0));
    assert_eq!(all_pages(&mut bob, vec![]).await, newest_first(1));

    let cancelled = vec![JobState::Cancelled as i32];
    assert_eq!(
        all_pages(&mut bob, cancelled.clone()).await,
        vec![created[1].clone()]
    );
    assert!(all_pages(&mut alice, cancelled).await.is_empty());
    c.stop().await;
}

#[tokio::test]
async fn a_job_runs_once_staffed_and_reports_reach_watchers() {
    let (_redis, _dir, c) = coordinator(15_000).await;
    let mut alice = c.jobs(ALICE).await;
    let mut cluster = c.cluster().await;
    let job_id = submit_job(&mut alice, "run", 1).await;

    let learner = cluster
        .register(register(Role::Learner, "learner-a"))
        .await
        .unwrap()
        .into_inner()
        .member_id;
    let actor = cluster
        .register(register(Role::Actor, "actor-a"))
        .await
        .unwrap()
        .into_inner()
        .member_id;
    // Without a reward server hosting "quality" the job cannot start.
    assert_eq!(state_of(&mut alice, &job_id).await, JobState::Pending);
    cluster
        .register(register(Role::RewardServer, "reward-a"))
        .await
        .unwrap();
    wait_for_state(&mut alice, &job_id, JobState::Running).await;

    // The actor's assignment names the job, its shard and where "quality"
    // is served; the learner's names its rank and peers.
    let mut stream = cluster
        .watch_assignment(WatchAssignmentRequest {
            member_id: actor.clone(),
            after_generation: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let assigned = stream.next().await.unwrap().unwrap();
    assert_eq!(assigned.job_id, job_id);
    assert!(assigned.generation >= 1);
    let Some(assignment::Details::Actor(actor_work)) = assigned.details else {
        panic!("an actor assignment: {assigned:?}");
    };
    assert_eq!(actor_work.stage, "main");
    assert_eq!(actor_work.reward_servers[0].model, "quality");
    assert_eq!(actor_work.reward_servers[0].addresses, ["127.0.0.1:50061"]);
    assert_eq!(actor_work.samples_per_prompt, 2);
    let learner_work = cluster
        .get_assignment(GetAssignmentRequest {
            member_id: learner.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(assignment::Details::Learner(l)) = learner_work.details else {
        panic!("a learner assignment: {learner_work:?}");
    };
    assert_eq!((l.rank, l.world_size), (0, 1));
    assert_eq!(l.peer_addresses, ["127.0.0.1:7001"]);
    assert!(l.checkpoint_dir.ends_with(&job_id));

    // Progress: two steps, then the job stops on max_steps.
    let mut watch = alice
        .watch(WatchJobRequest {
            job_id: job_id.clone(),
            after_sequence: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    let point = |step| MetricPoint {
        step,
        combined_reward_mean: step as f64 * 0.5,
        kl: 0.01,
        ..MetricPoint::default()
    };
    let report = ReportProgressRequest {
        member_id: learner.clone(),
        job_id: job_id.clone(),
        metrics: vec![point(1), point(2)],
        ..ReportProgressRequest::default()
    };
    let answer = cluster
        .report_progress(report.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.step, answer.state), (2, JobState::Running as i32));
    // A retried report changes nothing.
    let answer = cluster.report_progress(report).await.unwrap().into_inner();
    assert_eq!(answer.step, 2);
    // Only rank 0 of the job's learner reports.
    let refused = cluster
        .report_progress(ReportProgressRequest {
            member_id: actor.clone(),
            job_id: job_id.clone(),
            metrics: vec![point(3)],
            ..ReportProgressRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::FailedPrecondition, "NOT_ASSIGNED")
    );
    cluster
        .report_progress(ReportProgressRequest {
            member_id: learner.clone(),
            job_id: job_id.clone(),
            metrics: vec![point(3)],
            stop_reason: StopReason::MaxSteps as i32,
            ..ReportProgressRequest::default()
        })
        .await
        .unwrap();

    // The watch replays the history and ends with the terminal change.
    let mut kinds = Vec::new();
    while let Some(event) = tokio::time::timeout(PATIENCE, watch.next()).await.unwrap() {
        kinds.push(match event.unwrap().event.unwrap() {
            job_event::Event::StateChange(c) => format!("state {}", c.state),
            job_event::Event::Metrics(p) => format!("step {}", p.step),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(
        kinds,
        [
            "state 1", "state 2", "step 1", "step 2", "step 3", "state 3"
        ],
        "submitted, running, three steps, succeeded"
    );
    let job = alice
        .get(GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.stop_reason, StopReason::MaxSteps as i32);
    assert_eq!(job.latest_metrics.unwrap().step, 3);

    // Workers of a finished job are released.
    let idle = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(idle.job_id.is_empty() && idle.details.is_none(), "{idle:?}");
    // Cancelling a finished job is refused.
    let terminal = alice
        .cancel(CancelJobRequest {
            job_id,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (terminal.code(), reason(&terminal).as_str()),
        (Code::FailedPrecondition, "JOB_TERMINAL")
    );
    c.stop().await;
}

#[tokio::test]
async fn an_actor_that_stops_heartbeating_loses_its_lease_and_its_work() {
    const TTL_MS: u64 = 600;
    let (_redis, _dir, c) = coordinator(TTL_MS).await;
    let mut alice = c.jobs(ALICE).await;
    let mut cluster = c.cluster().await;
    let job_id = submit_job(&mut alice, "lease", 1).await;
    let ids = staff(&mut cluster, "1").await;
    let first_actor = ids[2].clone();
    wait_for_state(&mut alice, &job_id, JobState::Running).await;
    let work = cluster
        .get_assignment(GetAssignmentRequest {
            member_id: first_actor.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(work.job_id, job_id);

    // A second actor waits idle; the reward server and the learner keep
    // heart-beating, the first actor goes silent.
    let spare = cluster
        .register(register(Role::Actor, "actor-2"))
        .await
        .unwrap()
        .into_inner()
        .member_id;
    let keep_alive = {
        let mut cluster = cluster.clone();
        let ids = vec![ids[0].clone(), ids[1].clone(), spare.clone()];
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(TTL_MS / 4));
            loop {
                tick.tick().await;
                for id in &ids {
                    let beat = cluster
                        .heartbeat(HeartbeatRequest {
                            member_id: id.clone(),
                            status: Some(MemberStatus::default()),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(beat.lease_valid, "{id} kept its lease");
                }
            }
        })
    };
    let last_beat = cluster
        .heartbeat(HeartbeatRequest {
            member_id: first_actor.clone(),
            status: None,
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = std::time::SystemTime::try_from(last_beat.lease_expire_time.unwrap()).unwrap();
    let promised = std::time::SystemTime::now() + Duration::from_millis(TTL_MS);
    assert!(
        deadline <= promised,
        "the lease ends within the configured TTL"
    );

    // The spare actor is given the silent one's shard.
    let mut stream = cluster
        .watch_assignment(WatchAssignmentRequest {
            member_id: spare.clone(),
            after_generation: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let taken_over = tokio::time::timeout(PATIENCE, async {
        loop {
            let a = stream.next().await.unwrap().unwrap();
            if a.job_id == job_id {
                return a;
            }
        }
    })
    .await
    .expect("the spare actor took over");
    let Some(assignment::Details::Actor(actor)) = taken_over.details else {
        panic!("{taken_over:?}");
    };
    assert_eq!(actor.prompts.unwrap().shard_index, 0);

    // The silent actor's lease is gone for good.
    let beat = cluster
        .heartbeat(HeartbeatRequest {
            member_id: first_actor.clone(),
            status: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!beat.lease_valid);
    let gone = cluster
        .get_assignment(GetAssignmentRequest {
            member_id: first_actor,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (gone.code(), reason(&gone).as_str()),
        (Code::FailedPrecondition, "LEASE_EXPIRED")
    );
    // The job itself ran on.
    assert_eq!(state_of(&mut alice, &job_id).await, JobState::Running);
    keep_alive.abort();
    c.stop().await;
}

#[tokio::test]
async fn deregistering_frees_work_at_once_and_registering_is_idempotent() {
    let (_redis, _dir, c) = coordinator(15_000).await;
    let mut cluster = c.cluster().await;
    let a = cluster
        .register(register(Role::Actor, "same"))
        .await
        .unwrap()
        .into_inner();
    let b = cluster
        .register(register(Role::Actor, "same"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.member_id, b.member_id);
    assert_eq!(a.heartbeat_interval.unwrap().seconds, 5);
    cluster
        .deregister(DeregisterRequest {
            member_id: a.member_id.clone(),
            reason: "shutdown".into(),
        })
        .await
        .unwrap();
    let beat = cluster
        .heartbeat(HeartbeatRequest {
            member_id: a.member_id.clone(),
            status: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!beat.lease_valid);
    // Deregistering again succeeds.
    cluster
        .deregister(DeregisterRequest {
            member_id: a.member_id,
            reason: String::new(),
        })
        .await
        .unwrap();
    c.stop().await;
}

#[tokio::test]
async fn every_service_checks_its_token() {
    let (_redis, _dir, c) = coordinator(15_000).await;
    let status = c
        .jobs("")
        .await
        .list(ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = c
        .jobs("wrong")
        .await
        .list(ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = c
        .jobs(WORKER)
        .await
        .list(ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut as_client =
        encore_proto::v1::cluster_service_client::ClusterServiceClient::with_interceptor(
            channel(&c.url()).await,
            bearer(ALICE),
        );
    let status = as_client
        .register(register(Role::Actor, "x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    c.stop().await;
}

#[tokio::test]
async fn a_client_gets_cancels_watches_and_reads_weights_of_its_own_jobs_only() {
    use encore_proto::v1::weight_service_client::WeightServiceClient;
    use encore_proto::v1::{FetchRequest, GetManifestRequest, ListVersionsRequest};
    let (_redis, _dir, c) = coordinator(15_000).await;
    let mut alice = c.jobs(ALICE).await;
    let mut bob = c.jobs(BOB).await;
    let job_id = submit_job(&mut alice, "mine", 1).await;
    let refused = |status: tonic::Status, rpc: &str| {
        assert_eq!(status.code(), Code::PermissionDenied, "{rpc}: {status:?}");
        assert!(status.message().contains(&job_id), "{rpc}: {status:?}");
    };

    let get = bob.get(GetJobRequest {
        job_id: job_id.clone(),
    });
    refused(get.await.unwrap_err(), "Get");
    let cancel = bob.cancel(CancelJobRequest {
        job_id: job_id.clone(),
        reason: "not mine".into(),
    });
    refused(cancel.await.unwrap_err(), "Cancel");
    for after_sequence in [None, Some(0)] {
        let watch = bob.watch(WatchJobRequest {
            job_id: job_id.clone(),
            after_sequence,
        });
        refused(watch.await.unwrap_err(), "Watch");
    }
    let mut bobs_weights =
        WeightServiceClient::with_interceptor(channel(&c.url()).await, bearer(BOB));
    let manifest = bobs_weights.get_manifest(GetManifestRequest {
        job_id: job_id.clone(),
        version: None,
    });
    refused(manifest.await.unwrap_err(), "GetManifest");
    let versions = bobs_weights.list_versions(ListVersionsRequest {
        job_id: job_id.clone(),
        page: None,
    });
    refused(versions.await.unwrap_err(), "ListVersions");
    let fetch = bobs_weights.fetch(FetchRequest {
        job_id: job_id.clone(),
        ..FetchRequest::default()
    });
    refused(fetch.await.unwrap_err(), "Fetch");

    // Bob's attempt changed nothing, and alice still does all of it; she
    // reads her job's weights up to the missing version, and a job nobody
    // submitted stays NOT_FOUND.
    assert_eq!(state_of(&mut alice, &job_id).await, JobState::Pending);
    let mut alices_weights =
        WeightServiceClient::with_interceptor(channel(&c.url()).await, bearer(ALICE));
    let manifest = alices_weights.get_manifest(GetManifestRequest {
        job_id: job_id.clone(),
        version: None,
    });
    assert_eq!(manifest.await.unwrap_err().code(), Code::NotFound);
    let nobodys = bob.get(GetJobRequest {
        job_id: "job-nobody".into(),
    });
    assert_eq!(nobodys.await.unwrap_err().code(), Code::NotFound);
    let cancelled = alice
        .cancel(CancelJobRequest {
            job_id: job_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    wait_for_state(&mut alice, &job_id, JobState::Cancelled).await;
    c.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_refused_naming_the_field() {
    let (_redis, _dir, c) = coordinator(15_000).await;
    let mut alice = c.jobs(ALICE).await;
    let mut cluster = c.cluster().await;

    let mut bad_spec = submit("bad", 1);
    let spec = bad_spec.spec.as_mut().unwrap();
    spec.rewards[0].weight = f64::NAN;
    spec.algorithm.as_mut().unwrap().samples_per_prompt = 1;
    let status = alice.submit(bad_spec).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert!(
        fields.contains(&"spec.rewards[0].weight".to_owned()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.algorithm.samples_per_prompt".to_owned()),
        "{fields:?}"
    );

    let cases: Vec<(tonic::Status, Code, &str)> = vec![
        (
            alice.submit(submit("", 1)).await.unwrap_err(),
            Code::InvalidArgument,
            "idempotency_key",
        ),
        (
            alice
                .submit(encore_proto::v1::SubmitJobRequest {
                    idempotency_key: "x".into(),
                    spec: None,
                    validate_only: false,
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "spec",
        ),
        (
            alice
                .get(GetJobRequest {
                    job_id: String::new(),
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "job_id",
        ),
        (
            alice
                .get(GetJobRequest {
                    job_id: "no-such-job".into(),
                })
                .await
                .unwrap_err(),
            Code::NotFound,
            "no-such-job",
        ),
        (
            alice
                .list(ListJobsRequest {
                    page: Some(Page {
                        page_size: 1,
                        page_token: "garbage".into(),
                    }),
                    states: vec![],
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "page.page_token",
        ),
        (
            alice
                .list(ListJobsRequest {
                    page: None,
                    states: vec![42],
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "states[0]",
        ),
        (
            alice
                .cancel(CancelJobRequest {
                    job_id: "j".into(),
                    reason: "x".repeat(5000),
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "reason",
        ),
        (
            cluster
                .register(encore_proto::v1::RegisterRequest {
                    role: 0,
                    ..register(Role::Actor, "r")
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "role",
        ),
        (
            cluster
                .register(encore_proto::v1::RegisterRequest {
                    instance_id: "has space".into(),
                    ..register(Role::Actor, "r")
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "instance_id",
        ),
        (
            {
                let mut r = register(Role::RewardServer, "r");
                r.capabilities.as_mut().unwrap().models.clear();
                cluster.register(r).await.unwrap_err()
            },
            Code::InvalidArgument,
            "capabilities.models",
        ),
        (
            {
                let mut r = register(Role::Learner, "r");
                r.capabilities.as_mut().unwrap().address = "nowhere".into();
                cluster.register(r).await.unwrap_err()
            },
            Code::InvalidArgument,
            "capabilities.address",
        ),
        (
            {
                let mut r = register(Role::Actor, "r");
                r.capabilities.as_mut().unwrap().software_version = "encore 9.9.0".into();
                cluster.register(r).await.unwrap_err()
            },
            Code::InvalidArgument,
            "capabilities.software_version",
        ),
        (
            cluster
                .heartbeat(HeartbeatRequest {
                    member_id: "m".into(),
                    status: Some(MemberStatus {
                        nccl_unique_id: Some(vec![0; 3]),
                        ..MemberStatus::default()
                    }),
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "status.nccl_unique_id",
        ),
        (
            cluster
                .report_progress(ReportProgressRequest {
                    member_id: "m".into(),
                    job_id: "j".into(),
                    metrics: vec![MetricPoint {
                        step: 0,
                        ..MetricPoint::default()
                    }],
                    ..ReportProgressRequest::default()
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "metrics[0].step",
        ),
        (
            cluster
                .watch_assignment(WatchAssignmentRequest {
                    member_id: "unknown-member".into(),
                    after_generation: 0,
                })
                .await
                .unwrap_err(),
            Code::FailedPrecondition,
            "unknown-member",
        ),
    ];
    for (status, code, field) in cases {
        assert_eq!(status.code(), code, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    // Nothing was stored by any of them.
    let listed = alice
        .list(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty());
    c.stop().await;
}

//! Random requests to every rpc of JobService and ClusterService, built
//! from a fixed seed: each must be answered with a status a client can act
//! on (never INTERNAL, UNKNOWN or a dropped connection), and the
//! coordinator must still serve valid requests afterwards. WeightService's
//! malformed input is covered in `weights.rs`; JobSpec validation is fuzzed
//! field by field in `spec.rs`'s unit tests.

mod support;

use encore_proto::v1::{
    CancelJobRequest, Capabilities, DeregisterRequest, GetAssignmentRequest, GetJobRequest,
    HeartbeatRequest, JobSpec, ListJobsRequest, MemberStatus, MetricPoint, ModelRef, Page,
    RegisterRequest, ReportProgressRequest, Resources, RewardStats, StageChange, SubmitJobRequest,
    WatchAssignmentRequest, WatchJobRequest,
};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::*;
use tokio_stream::StreamExt;
use tonic::Code;

const ROUNDS: usize = 600;

fn string(rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..9) {
        0 => String::new(),
        1 => "job-1".into(),
        2 => "has space".into(),
        3 => "ключ✓".into(),
        4 => "x".repeat(rng.random_range(100..5000)),
        5 => "\u{0}".into(),
        6 => "127.0.0.1:80".into(),
        7 => "encore 0.1.0".into(),
        _ => (0..rng.random_range(1..20))
            .map(|_| rng.random_range(b'!'..=b'~') as char)
            .collect(),
    }
}

fn int(rng: &mut ChaCha8Rng) -> u64 {
    match rng.random_range(0..5) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => rng.random_range(0..10),
        _ => rng.random(),
    }
}

fn float(rng: &mut ChaCha8Rng) -> f64 {
    match rng.random_range(0..6) {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => -1.0,
        3 => 1e300,
        4 => 0.0,
        _ => rng.random(),
    }
}

fn enum_value(rng: &mut ChaCha8Rng) -> i32 {
    match rng.random_range(0..3) {
        0 => rng.random_range(0..6),
        1 => -1,
        _ => rng.random(),
    }
}

/// A spec: a valid one with random damage, or random bytes decoded as one.
fn job_spec(rng: &mut ChaCha8Rng) -> Option<JobSpec> {
    match rng.random_range(0..4) {
        0 => None,
        1 => {
            let bytes: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            Some(JobSpec::decode(bytes.as_slice()).unwrap_or_default())
        }
        _ => {
            let mut spec = spec(rng.random_range(0..3));
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..8) {
                    0 => spec.name = string(rng),
                    1 => spec.rewards[0].weight = float(rng),
                    2 => spec.algorithm.as_mut().unwrap().batch_size = int(rng) as u32,
                    3 => spec.algorithm.as_mut().unwrap().learning_rate = float(rng),
                    4 => spec.prompts = None,
                    5 => spec.stop = None,
                    6 => {
                        spec.labels.insert(string(rng), string(rng));
                    }
                    _ => spec.resources.as_mut().unwrap().learner_ranks = int(rng) as u32,
                }
            }
            Some(spec)
        }
    }
}

fn acceptable(code: Code) -> bool {
    !matches!(
        code,
        Code::Internal | Code::Unknown | Code::Unimplemented | Code::Unavailable
    )
}

#[tokio::test]
async fn random_requests_never_break_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded://{}", dir.path().join("state").display());
    let c = TestCoordinator::start(test_config(&store, dir.path())).await;
    let mut jobs = c.jobs(ALICE).await;
    let mut cluster = c.cluster().await;
    let mut rng = ChaCha8Rng::seed_from_u64(20261125);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();

    for round in 0..ROUNDS {
        let which = rng.random_range(0..11);
        let status = match which {
            0 => jobs
                .submit(SubmitJobRequest {
                    idempotency_key: string(&mut rng),
                    spec: job_spec(&mut rng),
                    validate_only: rng.random(),
                })
                .await
                .err(),
            1 => jobs
                .get(GetJobRequest {
                    job_id: string(&mut rng),
                })
                .await
                .err(),
            2 => jobs
                .list(ListJobsRequest {
                    page: Some(Page {
                        page_size: int(&mut rng) as u32,
                        page_token: string(&mut rng),
                    }),
                    states: (0..rng.random_range(0..3))
                        .map(|_| enum_value(&mut rng))
                        .collect(),
                })
                .await
                .err(),
            3 => jobs
                .cancel(CancelJobRequest {
                    job_id: string(&mut rng),
                    reason: string(&mut rng),
                })
                .await
                .err(),
            4 => match jobs
                .watch(WatchJobRequest {
                    job_id: string(&mut rng),
                    after_sequence: rng.random::<bool>().then(|| int(&mut rng)),
                })
                .await
            {
                // A stream on an existing job: its first item must come.
                Ok(stream) => stream.into_inner().next().await.and_then(Result::err),
                Err(e) => Some(e),
            },
            5 => cluster
                .register(RegisterRequest {
                    role: enum_value(&mut rng),
                    capabilities: rng.random::<bool>().then(|| Capabilities {
                        resources: Some(Resources {
                            device: enum_value(&mut rng),
                            ..Resources::default()
                        }),
                        models: (0..rng.random_range(0..3))
                            .map(|_| ModelRef {
                                name: string(&mut rng),
                                uri: string(&mut rng),
                                sha256: string(&mut rng),
                            })
                            .collect(),
                        address: string(&mut rng),
                        software_version: string(&mut rng),
                        labels: [(string(&mut rng), string(&mut rng))].into(),
                    }),
                    instance_id: string(&mut rng),
                })
                .await
                .err(),
            6 => cluster
                .heartbeat(HeartbeatRequest {
                    member_id: string(&mut rng),
                    status: Some(MemberStatus {
                        applied_generation: int(&mut rng),
                        nccl_unique_id: rng
                            .random::<bool>()
                            .then(|| vec![0; rng.random_range(0..300)]),
                        ..MemberStatus::default()
                    }),
                })
                .await
                .err(),
            7 => cluster
                .get_assignment(GetAssignmentRequest {
                    member_id: string(&mut rng),
                })
                .await
                .err(),
            8 => cluster
                .watch_assignment(WatchAssignmentRequest {
                    member_id: string(&mut rng),
                    after_generation: int(&mut rng),
                })
                .await
                .err(),
            9 => cluster
                .deregister(DeregisterRequest {
                    member_id: string(&mut rng),
                    reason: string(&mut rng),
                })
                .await
                .err(),
            _ => cluster
                .report_progress(ReportProgressRequest {
                    member_id: string(&mut rng),
                    job_id: string(&mut rng),
                    metrics: (0..rng.random_range(0..4))
                        .map(|_| MetricPoint {
                            step: int(&mut rng),
                            kl: float(&mut rng),
                            rewards: [(
                                string(&mut rng),
                                RewardStats {
                                    mean: float(&mut rng),
                                    std: float(&mut rng),
                                },
                            )]
                            .into(),
                            ..MetricPoint::default()
                        })
                        .collect(),
                    stage_change: rng.random::<bool>().then(|| StageChange {
                        stage_index: int(&mut rng) as u32,
                        stage: string(&mut rng),
                        step: int(&mut rng),
                    }),
                    stop_reason: enum_value(&mut rng),
                    failure_message: string(&mut rng),
                })
                .await
                .err(),
        };
        if let Some(status) = status {
            assert!(
                acceptable(status.code()),
                "round {round}, rpc {which}: {:?} {}",
                status.code(),
                status.message()
            );
            *seen.entry(format!("{:?}", status.code())).or_default() += 1;
        } else {
            *seen.entry("Ok".into()).or_default() += 1;
        }
    }
    // The run exercised refusals and successes both.
    assert!(
        seen.get("InvalidArgument").copied().unwrap_or(0) > ROUNDS / 4,
        "{seen:?}"
    );
    assert!(seen.get("Ok").copied().unwrap_or(0) > 0, "{seen:?}");
    // And the coordinator still works.
    let job = jobs.submit(submit("after-the-fuzz", 1)).await.unwrap();
    assert!(job.into_inner().created);
    c.stop().await;
}

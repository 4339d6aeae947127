//! Encode/decode round trips of the messages that are stored rather than
//! only sent (rollouts sit in the queue, job specs in the store), fully
//! populated so that every field's tag and type is exercised.

use std::collections::HashMap;

use encore_proto::v1::{
    Algorithm, AlgorithmKind, DeviceKind, JobResources, JobSpec, ModelRef, Normalization,
    NormalizationKind, PolicyArchitecture, PolicyVersion, Prompt, PromptList, PromptSource,
    Resources, RewardConfig, Rollout, SamplingParams, Score, ScoredBatch, Seeds, Stage,
    StopCondition, prompt_source,
};
use prost::Message;
use prost_types::{Duration, Struct, Timestamp, Value, value::Kind};

fn prompt() -> Prompt {
    Prompt {
        prompt_id: "p-17".into(),
        caption: "calm solo piano in D minor, slow tempo".into(),
        attributes: HashMap::from([
            ("instrument".into(), "piano".into()),
            ("tempo_bpm".into(), "72".into()),
        ]),
    }
}

fn sampling() -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: 250,
        top_p: 0.95,
        max_new_tokens: 500,
    }
}

fn rollout(sample_index: u32) -> Rollout {
    let details = Struct {
        fields: [(
            "text_norm".to_owned(),
            Value {
                kind: Some(Kind::NumberValue(1.5)),
            },
        )]
        .into(),
    };
    Rollout {
        rollout_id: format!("actor-3-{sample_index}"),
        job_id: "job-1".into(),
        prompt: Some(prompt()),
        group_id: "actor-3-g42".into(),
        sample_index,
        group_size: 2,
        tokens: vec![0, 1, 1023, 4_000_000_000],
        behaviour_log_probs: vec![-0.1, -2.5, -7.25, f32::MIN_POSITIVE.ln()],
        policy_version: Some(PolicyVersion {
            job_id: "job-1".into(),
            version: 12,
            sha256: "ab".repeat(32),
        }),
        sampling: Some(sampling()),
        scores: HashMap::from([
            (
                "adherence".into(),
                Score {
                    value: 0.31,
                    details: Some(details),
                },
            ),
            (
                "quality".into(),
                Score {
                    value: 3.9,
                    details: None,
                },
            ),
        ]),
        actor_id: "actor-3".into(),
        create_time: Some(Timestamp {
            seconds: 1_714_000_000,
            nanos: 5,
        }),
        codebooks: 1,
    }
}

#[test]
fn rollout_round_trips() {
    let original = rollout(1);
    let decoded = Rollout::decode(original.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(decoded, original);
}

#[test]
fn scored_batch_round_trips() {
    let original = ScoredBatch {
        batch_id: "actor-3-b7".into(),
        job_id: "job-1".into(),
        stage: "R".into(),
        actor_id: "actor-3".into(),
        rollouts: vec![rollout(0), rollout(1)],
        create_time: Some(Timestamp {
            seconds: 1_714_000_001,
            nanos: 0,
        }),
    };
    let decoded = ScoredBatch::decode(original.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(decoded, original);
}

fn reward(name: &str, weight: f64) -> RewardConfig {
    RewardConfig {
        model: Some(ModelRef {
            name: name.into(),
            uri: String::new(),
            sha256: "cd".repeat(32),
        }),
        weight,
        normalization: Some(Normalization {
            kind: NormalizationKind::RunningZScore.into(),
            ema_decay: Some(0.99),
            clip: Some(5.0),
        }),
    }
}

fn job_spec() -> JobSpec {
    JobSpec {
        name: "musicrl-ru".into(),
        base_checkpoint: Some(ModelRef {
            name: "base".into(),
            uri: "file:///ckpt/base/model.safetensors".into(),
            sha256: String::new(),
        }),
        prompts: Some(PromptSource {
            source: Some(prompt_source::Source::Inline(PromptList {
                prompts: vec![prompt()],
            })),
        }),
        rewards: vec![],
        algorithm: Some(Algorithm {
            kind: AlgorithmKind::Ppo.into(),
            samples_per_prompt: 4,
            batch_size: 64,
            micro_batch_size: 16,
            learning_rate: 1e-5,
            warmup_steps: 10,
            weight_decay: 0.0,
            kl_coef: 0.05,
            clip_range: Some(0.2),
            // Zero is a real value here, distinct from "unset = default".
            max_staleness: Some(0),
            max_grad_norm: None,
            ppo_epochs: 2,
            sampling: Some(sampling()),
            entropy_coef: Some(0.01),
            kl_estimator: encore_proto::v1::KlEstimator::K2.into(),
        }),
        stages: vec![
            Stage {
                name: "R".into(),
                rewards: vec![reward("adherence", 1.0), reward("quality", 0.5)],
                stop: Some(StopCondition {
                    max_steps: Some(500),
                    target_reward: None,
                    target_window: 0,
                    max_wall_time: None,
                }),
            },
            Stage {
                name: "U".into(),
                rewards: vec![reward("preference", 1.0), reward("adherence", 0.0)],
                stop: Some(StopCondition {
                    max_steps: Some(300),
                    target_reward: Some(1.5),
                    target_window: 20,
                    max_wall_time: Some(Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                }),
            },
        ],
        stop: Some(StopCondition {
            max_steps: None,
            target_reward: None,
            target_window: 0,
            max_wall_time: Some(Duration {
                seconds: 86_400,
                nanos: 0,
            }),
        }),
        resources: Some(JobResources {
            actors: 8,
            learner_ranks: 2,
            actor: Some(Resources {
                device: DeviceKind::Cuda.into(),
                device_count: 1,
                ..Default::default()
            }),
            learner: Some(Resources {
                device: DeviceKind::Cuda.into(),
                device_count: 1,
                device_memory_bytes: 80 << 30,
                host_memory_bytes: 128 << 30,
                cpu_cores: 16,
                device_names: vec!["NVIDIA H100 80GB HBM3".into()],
            }),
        }),
        seeds: Some(Seeds {
            root: Some(7),
            prompt_order: None,
            sampling: Some(0),
        }),
        publish_every_steps: 1,
        checkpoint_every_steps: 50,
        labels: HashMap::from([("team".into(), "audio".into())]),
        architecture: PolicyArchitecture::Musicgen as i32,
    }
}

#[test]
fn job_spec_round_trips() {
    let original = job_spec();
    let decoded = JobSpec::decode(original.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(decoded, original);
}

#[test]
fn optional_fields_keep_presence_of_zero() {
    let algorithm = |max_staleness| Algorithm {
        max_staleness,
        ..Default::default()
    };
    let set = Algorithm::decode(algorithm(Some(0)).encode_to_vec().as_slice()).expect("decodes");
    let unset = Algorithm::decode(algorithm(None).encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(set.max_staleness, Some(0));
    assert_eq!(unset.max_staleness, None);
}

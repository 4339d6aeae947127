use std::collections::HashMap;
use std::io::Write;

use encore_proto::v1::{
    Algorithm, AlgorithmKind, DeviceKind, ErrorReason, JobResources, JobSpec, ModelRef,
    Normalization, NormalizationKind, Prompt, PromptList, PromptSource, Resources, RewardConfig,
    SamplingParams, Seeds, Stage, StopCondition, prompt_source::Source,
};
use prost::Message;
use prost_types::Duration;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn prompt(id: &str, caption: &str) -> Prompt {
    Prompt {
        prompt_id: id.into(),
        caption: caption.into(),
        attributes: HashMap::new(),
    }
}

fn reward(name: &str, weight: f64) -> RewardConfig {
    RewardConfig {
        model: Some(ModelRef {
            name: name.into(),
            uri: String::new(),
            sha256: String::new(),
        }),
        weight,
        normalization: None,
    }
}

fn steps(n: u64) -> Option<StopCondition> {
    Some(StopCondition {
        max_steps: Some(n),
        ..Default::default()
    })
}

/// A small valid job without explicit stages; every default left unset.
fn valid() -> JobSpec {
    JobSpec {
        name: "ru-beta-0.05".into(),
        base_checkpoint: Some(ModelRef {
            name: "base".into(),
            uri: "runs/base/model.safetensors".into(),
            sha256: String::new(),
        }),
        prompts: Some(PromptSource {
            source: Some(Source::Inline(PromptList {
                prompts: vec![
                    prompt("p1", "calm solo piano in D minor, slow tempo"),
                    prompt("p2", "fast punk drums"),
                ],
            })),
        }),
        rewards: vec![reward("adherence", 1.0), reward("quality", 0.5)],
        algorithm: Some(Algorithm {
            samples_per_prompt: 4,
            batch_size: 16,
            learning_rate: 1e-5,
            kl_coef: 0.05,
            sampling: Some(SamplingParams {
                max_new_tokens: 256,
                ..Default::default()
            }),
            ..Default::default()
        }),
        stop: steps(100),
        resources: Some(JobResources {
            actors: 2,
            learner_ranks: 2,
            actor: None,
            learner: None,
        }),
        labels: HashMap::from([("team".to_owned(), "audio".to_owned())]),
        ..Default::default()
    }
}

/// A valid "RU" job: stage R on adherence and quality, then stage U on
/// preference until a target reward.
fn staged() -> JobSpec {
    JobSpec {
        rewards: vec![],
        stop: None,
        stages: vec![
            Stage {
                name: "R".into(),
                rewards: vec![reward("adherence", 1.0), reward("quality", 1.0)],
                stop: steps(50),
            },
            Stage {
                name: "U".into(),
                rewards: vec![reward("preference", 1.0)],
                stop: Some(StopCondition {
                    max_steps: Some(100),
                    target_reward: Some(0.8),
                    ..Default::default()
                }),
            },
        ],
        ..valid()
    }
}

fn alg(s: &mut JobSpec) -> &mut Algorithm {
    s.algorithm.as_mut().unwrap()
}

fn sampling(s: &mut JobSpec) -> &mut SamplingParams {
    alg(s).sampling.as_mut().unwrap()
}

fn res(s: &mut JobSpec) -> &mut JobResources {
    s.resources.as_mut().unwrap()
}

fn inline(s: &mut JobSpec) -> &mut Vec<Prompt> {
    match &mut s.prompts.as_mut().unwrap().source {
        Some(Source::Inline(list)) => &mut list.prompts,
        _ => panic!("not inline"),
    }
}

fn stop(s: &mut JobSpec) -> &mut StopCondition {
    s.stop.as_mut().unwrap()
}

fn norm(r: &mut RewardConfig) -> &mut Normalization {
    r.normalization.get_or_insert_with(Default::default)
}

fn dataset_at(path: &str) -> Option<PromptSource> {
    Some(PromptSource {
        source: Some(Source::DatasetPath(path.into())),
    })
}

fn fields(result: Result<JobPlan, Violations>) -> Vec<(String, ErrorReason)> {
    match result {
        Ok(_) => vec![],
        Err(v) => v
            .listed()
            .iter()
            .map(|v| (v.field.clone(), v.reason))
            .collect(),
    }
}

fn check(spec: &JobSpec) -> Vec<(String, ErrorReason)> {
    fields(validate(spec, &Limits::default()))
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(7)
}

#[test]
fn valid_specs_pass() {
    assert_eq!(check(&valid()), vec![]);
    assert_eq!(check(&staged()), vec![]);
}

#[test]
fn defaults_are_filled() {
    let eff = with_defaults(&valid(), &mut rng());
    let a = eff.algorithm.as_ref().unwrap();
    assert_eq!(a.kind, AlgorithmKind::Ppo as i32);
    assert_eq!(a.clip_range, Some(0.2));
    assert_eq!(a.max_staleness, Some(2));
    assert_eq!(a.max_grad_norm, Some(1.0));
    assert_eq!(a.ppo_epochs, 1);
    assert_eq!(a.micro_batch_size, 0, "0 is a mode (no accumulation), kept");
    let s = a.sampling.as_ref().unwrap();
    assert_eq!(s.temperature, 1.0);
    assert_eq!((s.top_k, s.top_p), (0, 0.0), "0 disables, kept");
    assert_eq!(eff.publish_every_steps, 1);
    assert_eq!(eff.checkpoint_every_steps, 50);

    // The implicit stage, made explicit with the job's rewards and stop.
    assert!(eff.rewards.is_empty());
    assert_eq!(eff.stop, None);
    assert_eq!(eff.stages.len(), 1);
    let main = &eff.stages[0];
    assert_eq!(main.name, "main");
    assert_eq!(main.stop, steps(100));
    let names: Vec<_> = main
        .rewards
        .iter()
        .map(|r| r.model.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["adherence", "quality"]);
    assert_eq!(main.rewards[1].weight, 0.5);
    for r in &main.rewards {
        let n = r.normalization.as_ref().unwrap();
        assert_eq!(n.kind, NormalizationKind::RunningZScore as i32);
        assert_eq!(n.ema_decay, Some(0.99));
        assert_eq!(n.clip, None, "unset clip means no clipping");
    }

    let seeds = eff.seeds.unwrap();
    let root = seeds.root.unwrap();
    assert_eq!(seeds.prompt_order, Some(derive_seed(root, 1)));
    assert_eq!(seeds.sampling, Some(derive_seed(root, 2)));
    assert_ne!(seeds.prompt_order, seeds.sampling);
}

#[test]
fn set_values_are_kept_and_windows_only_go_with_targets() {
    let mut spec = staged();
    alg(&mut spec).kind = AlgorithmKind::Reinforce as i32;
    alg(&mut spec).clip_range = Some(0.1);
    alg(&mut spec).max_staleness = Some(0);
    alg(&mut spec).max_grad_norm = Some(5.0);
    sampling(&mut spec).temperature = 0.7;
    spec.publish_every_steps = 3;
    spec.checkpoint_every_steps = 7;
    *norm(&mut spec.stages[0].rewards[0]) = Normalization {
        kind: NormalizationKind::None as i32,
        ema_decay: None,
        clip: Some(3.0),
    };
    norm(&mut spec.stages[0].rewards[1]).ema_decay = Some(0.5);
    spec.stop = Some(StopCondition {
        max_wall_time: Some(Duration {
            seconds: 60,
            nanos: 0,
        }),
        ..Default::default()
    });
    assert_eq!(check(&spec), vec![]);

    let eff = with_defaults(&spec, &mut rng());
    let a = eff.algorithm.as_ref().unwrap();
    assert_eq!(a.kind, AlgorithmKind::Reinforce as i32);
    assert_eq!(
        (a.clip_range, a.max_staleness, a.max_grad_norm),
        (Some(0.1), Some(0), Some(5.0))
    );
    assert_eq!(a.sampling.as_ref().unwrap().temperature, 0.7);
    assert_eq!(
        (eff.publish_every_steps, eff.checkpoint_every_steps),
        (3, 7)
    );
    let r = &eff.stages[0].rewards;
    assert_eq!(
        r[0].normalization,
        Some(Normalization {
            kind: NormalizationKind::None as i32,
            ema_decay: None,
            clip: Some(3.0)
        })
    );
    let n1 = r[1].normalization.unwrap();
    assert_eq!(
        (n1.kind, n1.ema_decay),
        (NormalizationKind::RunningZScore as i32, Some(0.5))
    );
    // Stage U has a target: its window gets the default; stage R and the job
    // stop have none, so theirs stays 0.
    assert_eq!(eff.stages[1].stop.unwrap().target_window, 10);
    assert_eq!(eff.stages[0].stop.unwrap().target_window, 0);
    assert_eq!(eff.stop.unwrap().target_window, 0);
    assert_eq!(eff.stages.len(), 2, "explicit stages are not touched");
    assert_eq!(stage_names(&eff), ["R", "U"]);
}

#[test]
fn unset_seeds_are_drawn_and_set_ones_kept() {
    let a = with_defaults(&valid(), &mut StdRng::seed_from_u64(1)).seeds;
    let b = with_defaults(&valid(), &mut StdRng::seed_from_u64(2)).seeds;
    let a_again = with_defaults(&valid(), &mut StdRng::seed_from_u64(1)).seeds;
    assert_ne!(a.unwrap().root, b.unwrap().root);
    assert_eq!(a, a_again);

    let mut spec = valid();
    spec.seeds = Some(Seeds {
        root: Some(42),
        prompt_order: None,
        sampling: Some(9),
    });
    let seeds = with_defaults(&spec, &mut rng()).seeds.unwrap();
    assert_eq!(seeds.root, Some(42));
    assert_eq!(
        seeds.prompt_order,
        Some(derive_seed(42, SEED_STREAM_PROMPT_ORDER))
    );
    assert_eq!(seeds.sampling, Some(9));

    spec.seeds = Some(Seeds {
        root: None,
        prompt_order: Some(5),
        sampling: None,
    });
    let seeds = with_defaults(&spec, &mut rng()).seeds.unwrap();
    let root = seeds.root.unwrap();
    assert_eq!(seeds.prompt_order, Some(5));
    assert_eq!(
        seeds.sampling,
        Some(derive_seed(root, SEED_STREAM_SAMPLING))
    );
}

#[test]
fn derived_seeds_are_splitmix64_outputs() {
    // Reference outputs of SplitMix64 (Vigna's splitmix64.c) seeded with 0
    // and 42, computed independently.
    assert_eq!(derive_seed(0, 1), 0xe220_a839_7b1d_cdaf);
    assert_eq!(derive_seed(0, 2), 0x6e78_9e6a_a1b9_65f4);
    assert_eq!(derive_seed(0, 3), 0x06c4_5d18_8009_454f);
    assert_eq!(derive_seed(42, 1), 0xbdd7_3226_2feb_6e95);
    assert_eq!(derive_seed(42, 2), 0x28ef_e333_b266_f103);
}

#[test]
fn effective_specs_validate_and_are_fixed_points() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompts.jsonl");
    std::fs::write(
        &path,
        "{\"promptId\": \"p1\", \"caption\": \"calm piano\"}\n",
    )
    .unwrap();
    let mut from_file = staged();
    from_file.prompts = dataset_at(path.to_str().unwrap());
    for spec in [valid(), staged(), from_file] {
        assert_eq!(check(&spec), vec![]);
        let eff = with_defaults(&spec, &mut rng());
        assert_eq!(check(&eff), vec![]);
        // Seeds are set now, so a different generator changes nothing.
        assert_eq!(with_defaults(&eff, &mut StdRng::seed_from_u64(99)), eff);
        assert_eq!(stages(&eff), eff.stages);
        assert_eq!(stage_names(&eff), stage_names(&spec));
        assert_eq!(reward_models(&eff), reward_models(&spec));
    }
}

#[test]
fn helpers_list_stages_and_reward_models() {
    let spec = valid();
    let implicit = stages(&spec);
    assert_eq!(implicit.len(), 1);
    assert_eq!(implicit[0].name, IMPLICIT_STAGE);
    assert_eq!(implicit[0].rewards, spec.rewards);
    assert_eq!(implicit[0].stop, spec.stop);
    assert_eq!(stage_names(&spec), ["main"]);
    let models: Vec<_> = reward_models(&staged()).into_iter().collect();
    assert_eq!(models, ["adherence", "preference", "quality"]);
    assert!(is_valid_id("Ab.9_-"));
    assert!(!is_valid_id(""));
    assert!(!is_valid_id("a/b"));
    assert!(is_valid_id(&"x".repeat(128)));
    assert!(!is_valid_id(&"x".repeat(129)));
}

/// One rule: a mutation of a valid spec and exactly the violations it must
/// cause, as (path, reason).
struct Case {
    what: &'static str,
    base: fn() -> JobSpec,
    mutate: fn(&mut JobSpec),
    expect: &'static [(&'static str, ErrorReason)],
}

const INVALID: ErrorReason = ErrorReason::InvalidField;
const TOO_LARGE: ErrorReason = ErrorReason::TooLarge;
const NON_FINITE: ErrorReason = ErrorReason::NonFinite;

fn dur(seconds: i64, nanos: i32) -> Option<Duration> {
    Some(Duration { seconds, nanos })
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    macro_rules! case {
        ($what:expr, $base:expr, $mutate:expr, [$(($path:expr, $reason:expr)),* $(,)?]) => {
            Case { what: $what, base: $base, mutate: $mutate, expect: &[$(($path, $reason)),*] }
        };
    }
    vec![
        case!("empty name", valid, |s| s.name.clear(), [("spec.name", INVALID)]),
        case!("long name", valid, |s| s.name = "n".repeat(129), [("spec.name", TOO_LARGE)]),
        case!("no checkpoint", valid, |s| s.base_checkpoint = None, [("spec.base_checkpoint.uri", INVALID)]),
        case!("empty checkpoint uri", valid, |s| s.base_checkpoint.as_mut().unwrap().uri.clear(), [("spec.base_checkpoint.uri", INVALID)]),
        case!("upper-case sha", valid, |s| s.base_checkpoint.as_mut().unwrap().sha256 = SHA.to_uppercase(), [("spec.base_checkpoint.sha256", INVALID)]),
        case!("short sha", valid, |s| s.base_checkpoint.as_mut().unwrap().sha256 = SHA[1..].into(), [("spec.base_checkpoint.sha256", INVALID)]),
        case!("no prompts", valid, |s| s.prompts = None, [("spec.prompts", INVALID)]),
        case!("no prompt source", valid, |s| s.prompts = Some(PromptSource { source: None }), [("spec.prompts", INVALID)]),
        case!("empty inline list", valid, |s| inline(s).clear(), [("spec.prompts.inline.prompts", INVALID)]),
        case!("empty prompt id", valid, |s| inline(s)[1].prompt_id.clear(), [("spec.prompts.inline.prompts[1].prompt_id", INVALID)]),
        case!("bad prompt id", valid, |s| inline(s)[0].prompt_id = "a b".into(), [("spec.prompts.inline.prompts[0].prompt_id", INVALID)]),
        case!("long prompt id", valid, |s| inline(s)[0].prompt_id = "p".repeat(129), [("spec.prompts.inline.prompts[0].prompt_id", INVALID)]),
        case!("duplicate prompt id", valid, |s| inline(s)[1].prompt_id = "p1".into(), [("spec.prompts.inline.prompts[1].prompt_id", INVALID)]),
        case!("empty caption", valid, |s| inline(s)[0].caption.clear(), [("spec.prompts.inline.prompts[0].caption", INVALID)]),
        case!("long caption", valid, |s| inline(s)[0].caption = "c".repeat(4097), [("spec.prompts.inline.prompts[0].caption", TOO_LARGE)]),
        case!("empty dataset path", valid, |s| s.prompts = dataset_at(""), [("spec.prompts.dataset_path", INVALID)]),
        case!("missing dataset", valid, |s| s.prompts = dataset_at("/nonexistent/encore/prompts.jsonl"), [("spec.prompts.dataset_path", INVALID)]),
        case!("dataset is a directory", valid, |s| s.prompts = dataset_at("/"), [("spec.prompts.dataset_path", INVALID)]),
        case!("remote dataset", valid, |s| s.prompts = dataset_at("s3://bucket/prompts.jsonl"), [("spec.prompts.dataset_path", INVALID)]),
        case!("no rewards", valid, |s| s.rewards.clear(), [("spec.rewards", INVALID)]),
        case!("rewards next to stages", staged, |s| s.rewards.push(reward("quality", 1.0)), [("spec.rewards", INVALID)]),
        case!("reward without model", valid, |s| s.rewards[0].model = None, [("spec.rewards[0].model.name", INVALID)]),
        case!("bad reward name", valid, |s| s.rewards[1].model.as_mut().unwrap().name = "my model".into(), [("spec.rewards[1].model.name", INVALID)]),
        case!("duplicate reward", valid, |s| s.rewards[1].model.as_mut().unwrap().name = "adherence".into(), [("spec.rewards[1].model.name", INVALID)]),
        case!("reward uri", valid, |s| s.rewards[0].model.as_mut().unwrap().uri = "file:///m".into(), [("spec.rewards[0].model.uri", INVALID)]),
        case!("reward sha", valid, |s| s.rewards[0].model.as_mut().unwrap().sha256 = "xyz".into(), [("spec.rewards[0].model.sha256", INVALID)]),
        case!("NaN weight", valid, |s| s.rewards[0].weight = f64::NAN, [("spec.rewards[0].weight", NON_FINITE)]),
        case!("infinite weight", valid, |s| s.rewards[1].weight = f64::NEG_INFINITY, [("spec.rewards[1].weight", NON_FINITE)]),
        case!("all weights zero", valid, |s| for r in &mut s.rewards { r.weight = 0.0 }, [("spec.rewards", INVALID)]),
        case!("unknown normalization", valid, |s| norm(&mut s.rewards[0]).kind = 9, [("spec.rewards[0].normalization.kind", INVALID)]),
        case!("ema_decay 1", valid, |s| norm(&mut s.rewards[0]).ema_decay = Some(1.0), [("spec.rewards[0].normalization.ema_decay", INVALID)]),
        case!("negative ema_decay", valid, |s| norm(&mut s.rewards[0]).ema_decay = Some(-0.1), [("spec.rewards[0].normalization.ema_decay", INVALID)]),
        case!("NaN ema_decay", valid, |s| norm(&mut s.rewards[0]).ema_decay = Some(f64::NAN), [("spec.rewards[0].normalization.ema_decay", NON_FINITE)]),
        case!("ema_decay without z-score", valid, |s| *norm(&mut s.rewards[0]) = Normalization { kind: NormalizationKind::None as i32, ema_decay: Some(0.9), clip: None }, [("spec.rewards[0].normalization.ema_decay", INVALID)]),
        case!("zero clip", valid, |s| norm(&mut s.rewards[0]).clip = Some(0.0), [("spec.rewards[0].normalization.clip", INVALID)]),
        case!("infinite clip", valid, |s| norm(&mut s.rewards[0]).clip = Some(f64::INFINITY), [("spec.rewards[0].normalization.clip", NON_FINITE)]),
        case!("empty stage name", staged, |s| s.stages[0].name.clear(), [("spec.stages[0].name", INVALID)]),
        case!("long stage name", staged, |s| s.stages[0].name = "s".repeat(64), [("spec.stages[0].name", INVALID)]),
        case!("bad stage name", staged, |s| s.stages[1].name = "R/U".into(), [("spec.stages[1].name", INVALID)]),
        case!("duplicate stage", staged, |s| s.stages[1].name = "R".into(), [("spec.stages[1].name", INVALID)]),
        case!("stage without rewards", staged, |s| s.stages[1].rewards.clear(), [("spec.stages[1].rewards", INVALID)]),
        case!("stage all zero", staged, |s| s.stages[1].rewards[0].weight = 0.0, [("spec.stages[1].rewards", INVALID)]),
        case!("stage NaN weight", staged, |s| s.stages[1].rewards[0].weight = f64::NAN, [("spec.stages[1].rewards[0].weight", NON_FINITE)]),
        case!("stage duplicate reward", staged, |s| s.stages[0].rewards[1] = reward("adherence", 2.0), [("spec.stages[0].rewards[1].model.name", INVALID)]),
        case!("stage without stop", staged, |s| s.stages[0].stop = None, [("spec.stages[0].stop", INVALID)]),
        case!("stage stop with only a window", staged, |s| s.stages[0].stop = Some(StopCondition { target_window: 5, ..Default::default() }), [("spec.stages[0].stop", INVALID), ("spec.stages[0].stop.target_window", INVALID)]),
        case!("stage zero steps", staged, |s| s.stages[0].stop = steps(0), [("spec.stages[0].stop.max_steps", INVALID)]),
        case!("stage NaN target", staged, |s| s.stages[1].stop.as_mut().unwrap().target_reward = Some(f64::NAN), [("spec.stages[1].stop.target_reward", NON_FINITE)]),
        case!("job target with stages", staged, |s| s.stop = Some(StopCondition { target_reward: Some(1.0), max_steps: Some(10), ..Default::default() }), [("spec.stop.target_reward", INVALID)]),
        case!("unbounded job", valid, |s| s.stop = Some(StopCondition { target_reward: Some(1.0), ..Default::default() }), [("spec.stop", INVALID)]),
        case!("no job stop", valid, |s| s.stop = None, [("spec.stop", INVALID)]),
        case!("unbounded last stage", staged, |s| s.stages[1].stop = Some(StopCondition { target_reward: Some(1.0), ..Default::default() }), [("spec.stop", INVALID)]),
        case!("zero max_steps", valid, |s| stop(s).max_steps = Some(0), [("spec.stop.max_steps", INVALID)]),
        case!("infinite target", valid, |s| stop(s).target_reward = Some(f64::INFINITY), [("spec.stop.target_reward", NON_FINITE)]),
        case!("window without target", valid, |s| stop(s).target_window = 5, [("spec.stop.target_window", INVALID)]),
        case!("negative wall time", valid, |s| stop(s).max_wall_time = dur(-1, 0), [("spec.stop.max_wall_time", INVALID)]),
        case!("negative nanos", valid, |s| stop(s).max_wall_time = dur(1, -1), [("spec.stop.max_wall_time", INVALID)]),
        case!("nanos overflow", valid, |s| stop(s).max_wall_time = dur(1, 1_000_000_000), [("spec.stop.max_wall_time", INVALID)]),
        case!("zero wall time", valid, |s| stop(s).max_wall_time = dur(0, 0), [("spec.stop.max_wall_time", INVALID)]),
        case!("huge wall time", valid, |s| stop(s).max_wall_time = dur(i64::MAX, 0), [("spec.stop.max_wall_time", INVALID)]),
        case!("no algorithm", valid, |s| s.algorithm = None, [
            ("spec.algorithm.samples_per_prompt", INVALID), ("spec.algorithm.batch_size", INVALID),
            ("spec.algorithm.learning_rate", INVALID), ("spec.algorithm.sampling.max_new_tokens", INVALID),
        ]),
        case!("unknown algorithm", valid, |s| alg(s).kind = 3, [("spec.algorithm.kind", INVALID)]),
        case!("negative algorithm", valid, |s| alg(s).kind = -1, [("spec.algorithm.kind", INVALID)]),
        case!("one sample per prompt", valid, |s| alg(s).samples_per_prompt = 1, [("spec.algorithm.samples_per_prompt", INVALID)]),
        case!("zero batch", valid, |s| alg(s).batch_size = 0, [("spec.algorithm.batch_size", INVALID)]),
        case!("batch not a multiple of K", valid, |s| alg(s).batch_size = 18, [("spec.algorithm.batch_size", INVALID)]),
        case!("batch not a multiple of ranks", valid, |s| res(s).learner_ranks = 3, [("spec.algorithm.batch_size", INVALID)]),
        case!("micro batch not dividing", valid, |s| alg(s).micro_batch_size = 3, [("spec.algorithm.micro_batch_size", INVALID)]),
        case!("micro batch above per-rank batch", valid, |s| alg(s).micro_batch_size = 16, [("spec.algorithm.micro_batch_size", INVALID)]),
        case!("zero learning rate", valid, |s| alg(s).learning_rate = 0.0, [("spec.algorithm.learning_rate", INVALID)]),
        case!("negative learning rate", valid, |s| alg(s).learning_rate = -1e-4, [("spec.algorithm.learning_rate", INVALID)]),
        case!("NaN learning rate", valid, |s| alg(s).learning_rate = f64::NAN, [("spec.algorithm.learning_rate", NON_FINITE)]),
        case!("negative weight decay", valid, |s| alg(s).weight_decay = -0.1, [("spec.algorithm.weight_decay", INVALID)]),
        case!("negative kl", valid, |s| alg(s).kl_coef = -0.05, [("spec.algorithm.kl_coef", INVALID)]),
        case!("infinite kl", valid, |s| alg(s).kl_coef = f64::INFINITY, [("spec.algorithm.kl_coef", NON_FINITE)]),
        case!("negative entropy bonus", valid, |s| alg(s).entropy_coef = Some(-0.01), [("spec.algorithm.entropy_coef", INVALID)]),
        case!("unknown kl estimator", valid, |s| alg(s).kl_estimator = 7, [("spec.algorithm.kl_estimator", INVALID)]),
        case!("zero clip range", valid, |s| alg(s).clip_range = Some(0.0), [("spec.algorithm.clip_range", INVALID)]),
        case!("NaN clip range", valid, |s| alg(s).clip_range = Some(f64::NAN), [("spec.algorithm.clip_range", NON_FINITE)]),
        case!("negative grad norm", valid, |s| alg(s).max_grad_norm = Some(-1.0), [("spec.algorithm.max_grad_norm", INVALID)]),
        case!("REINFORCE epochs", valid, |s| { alg(s).kind = AlgorithmKind::Reinforce as i32; alg(s).ppo_epochs = 4 }, [("spec.algorithm.ppo_epochs", INVALID)]),
        case!("no sampling", valid, |s| alg(s).sampling = None, [("spec.algorithm.sampling.max_new_tokens", INVALID)]),
        case!("zero tokens", valid, |s| sampling(s).max_new_tokens = 0, [("spec.algorithm.sampling.max_new_tokens", INVALID)]),
        case!("too many tokens", valid, |s| sampling(s).max_new_tokens = (1 << 16) + 1, [("spec.algorithm.sampling.max_new_tokens", TOO_LARGE)]),
        case!("negative temperature", valid, |s| sampling(s).temperature = -1.0, [("spec.algorithm.sampling.temperature", INVALID)]),
        case!("NaN temperature", valid, |s| sampling(s).temperature = f32::NAN, [("spec.algorithm.sampling.temperature", NON_FINITE)]),
        case!("top_p above 1", valid, |s| sampling(s).top_p = 1.5, [("spec.algorithm.sampling.top_p", INVALID)]),
        case!("negative top_p", valid, |s| sampling(s).top_p = -0.1, [("spec.algorithm.sampling.top_p", INVALID)]),
        case!("infinite top_p", valid, |s| sampling(s).top_p = f32::INFINITY, [("spec.algorithm.sampling.top_p", NON_FINITE)]),
        case!("no resources", valid, |s| s.resources = None, [("spec.resources.actors", INVALID), ("spec.resources.learner_ranks", INVALID)]),
        case!("no actors", valid, |s| res(s).actors = 0, [("spec.resources.actors", INVALID)]),
        case!("too many actors", valid, |s| res(s).actors = 1025, [("spec.resources.actors", TOO_LARGE)]),
        case!("no ranks", valid, |s| res(s).learner_ranks = 0, [("spec.resources.learner_ranks", INVALID)]),
        case!("too many ranks", valid, |s| { res(s).learner_ranks = 512; alg(s).batch_size = 2048 }, [("spec.resources.learner_ranks", TOO_LARGE)]),
        case!("unknown device", valid, |s| res(s).actor = Some(Resources { device: 7, ..Default::default() }), [("spec.resources.actor.device", INVALID)]),
        case!("CPU with GPUs", valid, |s| res(s).actor = Some(Resources { device: DeviceKind::Cpu as i32, device_count: 1, ..Default::default() }), [("spec.resources.actor.device_count", INVALID)]),
        case!("CPU with GPU memory", valid, |s| res(s).learner = Some(Resources { device: DeviceKind::Cpu as i32, device_memory_bytes: 1 << 30, ..Default::default() }), [("spec.resources.learner.device_memory_bytes", INVALID)]),
        case!("empty label key", valid, |s| { s.labels.insert(String::new(), "x".into()); }, [("spec.labels[\"\"]", INVALID)]),
        case!("long label value", valid, |s| { s.labels.insert("team".into(), "v".repeat(64)); }, [("spec.labels[\"team\"]", TOO_LARGE)]),
        case!("quoted label key", valid, |s| { s.labels.insert("a\"b".into(), "v".repeat(64)); }, [("spec.labels[\"a\\\"b\"]", TOO_LARGE)]),
        case!("too many labels", valid, |s| for i in 0..64 { s.labels.insert(format!("k{i}"), String::new()); }, [("spec.labels", TOO_LARGE)]),
    ]
}

#[test]
fn each_rule_names_its_field_and_reason() {
    let mut failures = Vec::new();
    for case in cases() {
        let mut spec = (case.base)();
        (case.mutate)(&mut spec);
        let got = check(&spec);
        let want: Vec<(String, ErrorReason)> = case
            .expect
            .iter()
            .map(|(p, r)| ((*p).to_owned(), *r))
            .collect();
        if got != want {
            failures.push(format!("{}: want {want:?}, got {got:?}", case.what));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn long_label_keys_are_cut_short_in_paths() {
    let mut spec = valid();
    spec.labels.insert("k".repeat(10_000), "v".into());
    let got = check(&spec);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, TOO_LARGE);
    assert!(got[0].0.starts_with("spec.labels[\"kkk"), "{}", got[0].0);
    assert!(got[0].0.len() < 100, "{}", got[0].0);
}

#[test]
fn boundaries_are_accepted() {
    let mut spec = staged();
    spec.name = "é".repeat(64); // 128 bytes
    spec.stages[0].name = "S".repeat(63);
    spec.labels.insert("k".repeat(63), "v".repeat(63));
    spec.labels.insert("empty-value".into(), String::new());
    spec.base_checkpoint.as_mut().unwrap().sha256 = SHA.into();
    spec.stages[0].rewards[0].weight = -3.0;
    spec.stages[0].rewards[1].weight = 0.0;
    *norm(&mut spec.stages[0].rewards[1]) = Normalization {
        kind: NormalizationKind::RunningZScore as i32,
        ema_decay: Some(0.0),
        clip: Some(1e-9),
    };
    spec.stages[0].stop = Some(StopCondition {
        target_reward: Some(-1.0),
        ..Default::default()
    });
    // A target-only last stage is fine when the job as a whole is bounded.
    spec.stages[1].stop = Some(StopCondition {
        target_reward: Some(0.5),
        target_window: 3,
        ..Default::default()
    });
    spec.stop = Some(StopCondition {
        max_wall_time: dur(0, 1),
        ..Default::default()
    });
    inline(&mut spec)[0].caption = "c".repeat(4096);
    inline(&mut spec)[0].prompt_id = "p".repeat(128);
    alg(&mut spec).kl_coef = 0.0;
    alg(&mut spec).weight_decay = 0.0;
    alg(&mut spec).samples_per_prompt = 2;
    alg(&mut spec).batch_size = 2;
    res(&mut spec).learner_ranks = 1;
    alg(&mut spec).micro_batch_size = 2;
    alg(&mut spec).max_staleness = Some(0);
    alg(&mut spec).kind = AlgorithmKind::Reinforce as i32;
    alg(&mut spec).ppo_epochs = 1;
    sampling(&mut spec).top_p = 1.0;
    sampling(&mut spec).top_k = u32::MAX;
    sampling(&mut spec).max_new_tokens = 1 << 16;
    res(&mut spec).actors = 1024;
    res(&mut spec).actor = Some(Resources {
        device: DeviceKind::Cuda as i32,
        device_count: 8,
        device_memory_bytes: 80 << 30,
        ..Default::default()
    });
    for i in 0..61 {
        spec.labels.insert(format!("k{i}"), String::new());
    }
    assert_eq!(spec.labels.len(), 64);
    assert_eq!(check(&spec), vec![]);
    let eff = with_defaults(&spec, &mut rng());
    assert_eq!(check(&eff), vec![]);
    assert_eq!(eff.stages[1].stop.unwrap().target_window, 3);
}

#[test]
fn server_limits_apply() {
    let limits = Limits {
        max_prompts_inline: 1,
        max_caption_bytes: 5,
        max_stages: 1,
        max_rewards_per_stage: 1,
        max_labels: 0,
        max_actors: 1,
        max_learner_ranks: 1,
        max_new_tokens: 100,
        vocab_size: Some(10),
        ..Limits::default()
    };
    let mut spec = staged();
    sampling(&mut spec).top_k = 11;
    let got = fields(validate(&spec, &limits));
    let want: Vec<(String, ErrorReason)> = [
        ("spec.prompts.inline.prompts", TOO_LARGE),
        ("spec.prompts.inline.prompts[0].caption", TOO_LARGE),
        ("spec.prompts.inline.prompts[1].caption", TOO_LARGE),
        ("spec.algorithm.sampling.max_new_tokens", TOO_LARGE),
        ("spec.algorithm.sampling.top_k", INVALID),
        ("spec.stages", TOO_LARGE),
        ("spec.stages[0].rewards", TOO_LARGE),
        ("spec.resources.actors", TOO_LARGE),
        ("spec.resources.learner_ranks", TOO_LARGE),
        ("spec.labels", TOO_LARGE),
    ]
    .into_iter()
    .map(|(p, r)| (p.to_owned(), r))
    .collect();
    assert_eq!(got, want);
    sampling(&mut spec).top_k = 10;
    assert!(
        !fields(validate(&spec, &limits))
            .contains(&("spec.algorithm.sampling.top_k".to_owned(), INVALID))
    );
}

#[test]
fn every_bad_field_is_reported_in_request_order() {
    let got = check(&JobSpec::default());
    let want = [
        "spec.name",
        "spec.base_checkpoint.uri",
        "spec.prompts",
        "spec.rewards",
        "spec.algorithm.samples_per_prompt",
        "spec.algorithm.batch_size",
        "spec.algorithm.learning_rate",
        "spec.algorithm.sampling.max_new_tokens",
        "spec.stop",
        "spec.resources.actors",
        "spec.resources.learner_ranks",
    ];
    let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, want);

    // Many unrelated mistakes in an otherwise valid spec: all of them.
    let mut spec = staged();
    spec.name.clear();
    inline(&mut spec)[1].caption.clear();
    spec.stages[0].rewards[1].weight = f64::NAN;
    spec.stages[1].name = "R".into();
    alg(&mut spec).learning_rate = f64::INFINITY;
    sampling(&mut spec).top_p = 2.0;
    res(&mut spec).actors = 0;
    spec.labels.insert(String::new(), String::new());
    let err = validate(&spec, &Limits::default()).unwrap_err();
    let paths: Vec<&str> = err.listed().iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.name",
            "spec.prompts.inline.prompts[1].caption",
            "spec.algorithm.learning_rate",
            "spec.algorithm.sampling.top_p",
            "spec.stages[0].rewards[1].weight",
            "spec.stages[1].name",
            "spec.resources.actors",
            "spec.labels[\"\"]",
        ]
    );
    assert_eq!(err.total(), 8);
    let message = err.to_status().message().to_owned();
    assert!(message.contains("8 bad fields"), "{message}");
}

/// A named change to a spec.
type Change = (&'static str, fn(&mut JobSpec));

#[test]
fn spec_hash_is_canonical() {
    let mut a = valid();
    let mut b = valid();
    let keys: Vec<String> = (0..40).map(|i| format!("key{i}")).collect();
    a.labels.clear();
    b.labels.clear();
    for k in &keys {
        a.labels.insert(k.clone(), format!("v-{k}"));
    }
    for k in keys.iter().rev() {
        b.labels.insert(k.clone(), format!("v-{k}"));
    }
    for (i, k) in keys.iter().enumerate() {
        inline(&mut a)[0]
            .attributes
            .insert(k.clone(), i.to_string());
    }
    for (i, k) in keys.iter().enumerate().rev() {
        inline(&mut b)[0]
            .attributes
            .insert(k.clone(), i.to_string());
    }
    assert_eq!(a, b);
    assert_eq!(spec_sha256(&a), spec_sha256(&b));
    assert_eq!(spec_sha256(&a).len(), 64);
    // The canonical bytes are the same message.
    let decoded = JobSpec::decode(canonical_encoding(&a).as_slice()).unwrap();
    assert_eq!(decoded, a);

    let base = spec_sha256(&a);
    let changes: [Change; 7] = [
        ("name", |s| s.name.push('x')),
        ("label value", |s| {
            s.labels.insert("key0".into(), "other".into());
        }),
        ("label removed", |s| {
            s.labels.remove("key0");
        }),
        ("attribute", |s| {
            inline(s)[0].attributes.insert("key1".into(), "x".into());
        }),
        ("weight", |s| s.rewards[0].weight = 1.0000001),
        ("explicit default", |s| alg(s).clip_range = Some(0.2)),
        ("prompt order", |s| inline(s).swap(0, 1)),
    ];
    for (what, change) in changes {
        let mut c = a.clone();
        change(&mut c);
        assert_ne!(spec_sha256(&c), base, "{what}");
        let decoded = JobSpec::decode(canonical_encoding(&c).as_slice()).unwrap();
        assert_eq!(decoded, c, "{what}");
    }
    let mut from_file = a.clone();
    from_file.prompts = dataset_at("prompts.jsonl");
    assert_eq!(
        JobSpec::decode(canonical_encoding(&from_file).as_slice()).unwrap(),
        from_file
    );
}

fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    path.to_str().unwrap().to_owned()
}

fn dataset_report(path: &str, limits: &Limits) -> Vec<(ErrorReason, String)> {
    let mut spec = valid();
    spec.prompts = dataset_at(path);
    match validate(&spec, limits) {
        Ok(_) => vec![],
        Err(v) => v
            .listed()
            .iter()
            .inspect(|v| assert_eq!(v.field, "spec.prompts.dataset_path"))
            .map(|v| (v.reason, v.description.clone()))
            .collect(),
    }
}

#[test]
fn dataset_files_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        &dir,
        "good.jsonl",
        concat!(
            "{\"promptId\": \"p1\", \"caption\": \"calm piano\", \"attributes\": {\"mood\": \"calm\"}}\n",
            "\n",
            "{\"prompt_id\": \"p2\", \"caption\": \"loud drums\"}\r\n",
            "  {\"promptId\": \"p3\", \"caption\": \"x\", \"attributes\": null}",
        ),
    );
    let limits = Limits::default();
    assert_eq!(dataset_report(&good, &limits), vec![]);
    assert_eq!(dataset_report(&format!("file://{good}"), &limits), vec![]);

    let bad = write(
        &dir,
        "bad.jsonl",
        concat!(
            "{\"promptId\": \"p1\", \"caption\": \"ok\"}\n",
            "{\"promptId\": \"p1\", \"caption\": \"dup\"}\n",
            "{\"promptId\": \"p 3\", \"caption\": \"\"}\n",
            "not json\n",
            "{\"promptId\": \"p5\", \"captoin\": \"typo\"}\n",
            "[1, 2]\n",
            "{\"promptId\": \"p7\", \"caption\": \"c\", \"attributes\": {\"bpm\": 72}}\n",
            "{\"caption\": \"no id\"}\n",
        ),
    );
    let got = dataset_report(&bad, &limits);
    let lines: Vec<&str> = got
        .iter()
        .map(|(_, d)| d.split([':', ',']).next().unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            "line 2", "line 3", "line 3", "line 4", "line 5", "line 6", "line 7", "line 8"
        ],
        "{got:#?}"
    );
    assert!(
        got[0].1.contains("already the id of line 1"),
        "{}",
        got[0].1
    );
    assert!(got[1].1.starts_with("line 3: promptId:"), "{}", got[1].1);
    assert!(got[2].1.starts_with("line 3: caption:"), "{}", got[2].1);
    assert!(got[4].1.contains("captoin"), "{}", got[4].1);
    assert!(
        got[3].1.starts_with("line 4, column 2: expected ident"),
        "{}",
        got[3].1
    );
    assert!(!got[3].1.contains("line 1"), "{}", got[3].1);

    let caption = write(
        &dir,
        "long.jsonl",
        &format!(
            "{{\"promptId\": \"p\", \"caption\": \"{}\"}}\n",
            "c".repeat(4097)
        ),
    );
    assert_eq!(
        dataset_report(&caption, &limits),
        vec![(
            TOO_LARGE,
            "line 1: caption: 4097 bytes, more than the limit of 4096".to_owned()
        )]
    );

    let empty = write(&dir, "empty.jsonl", "\n  \n");
    let got = dataset_report(&empty, &limits);
    assert_eq!(got, vec![(INVALID, "the file holds no prompts".to_owned())]);
}

#[test]
fn dataset_reports_are_capped_and_sized() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = write(&dir, "garbage.jsonl", &"{\n".repeat(100));
    let got = dataset_report(&garbage, &Limits::default());
    assert_eq!(got.len(), 17, "{got:#?}");
    assert!(got[16].1.starts_with("84 more problems"), "{}", got[16].1);

    let three = write(
        &dir,
        "three.jsonl",
        &(1..=3)
            .map(|i| format!("{{\"promptId\": \"p{i}\", \"caption\": \"c\"}}\n"))
            .collect::<String>(),
    );
    let few = Limits {
        max_dataset_prompts: 2,
        ..Limits::default()
    };
    assert_eq!(dataset_report(&three, &few)[0].0, TOO_LARGE);
    let small = Limits {
        max_dataset_bytes: 10,
        ..Limits::default()
    };
    assert_eq!(dataset_report(&three, &small)[0].0, TOO_LARGE);
    assert_eq!(dataset_report(&three, &Limits::default()), vec![]);

    let mut invalid_utf8 = std::fs::File::create(dir.path().join("bytes.jsonl")).unwrap();
    invalid_utf8
        .write_all(b"{\"promptId\": \"p\", \"caption\": \"\xff\xfe\"}\n")
        .unwrap();
    let got = dataset_report(
        dir.path().join("bytes.jsonl").to_str().unwrap(),
        &Limits::default(),
    );
    assert_eq!(got.len(), 1);
    assert!(got[0].1.starts_with("line 1, column 31:"), "{}", got[0].1);
}

/// Random values that hit edges: NaN, infinities, zero, huge, tiny.
struct Gen {
    rng: StdRng,
    dataset: String,
}

impl Gen {
    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn f64(&mut self) -> f64 {
        let edges = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            0.99,
            2.0,
            1e-300,
            1e308,
            f64::MAX,
            f64::MIN_POSITIVE,
        ];
        match self.rng.random_range(0..edges.len() + 2) {
            i if i < edges.len() => edges[i],
            i if i == edges.len() => self.rng.random(),
            _ => self.rng.random_range(-10.0..10.0),
        }
    }

    fn opt_f64(&mut self) -> Option<f64> {
        self.chance(0.5).then(|| self.f64())
    }

    fn f32(&mut self) -> f32 {
        // Narrowing makes huge values infinite, which is one more edge.
        self.f64() as f32
    }

    fn u32(&mut self) -> u32 {
        let edges = [
            0,
            1,
            2,
            3,
            4,
            8,
            16,
            32,
            63,
            64,
            1024,
            1025,
            65_536,
            65_537,
            u32::MAX,
        ];
        match self.rng.random_range(0..edges.len() + 1) {
            i if i < edges.len() => edges[i],
            _ => self.rng.random(),
        }
    }

    fn small(&mut self) -> u32 {
        self.rng.random_range(0..=16)
    }

    fn u64(&mut self) -> u64 {
        match self.rng.random_range(0..4) {
            0 => 0,
            1 => u64::MAX,
            2 => self.rng.random_range(1..1000),
            _ => self.rng.random(),
        }
    }

    fn enum_i32(&mut self) -> i32 {
        *[-1, 0, 1, 2, 3, 100, i32::MAX, i32::MIN]
            .get(self.rng.random_range(0..8))
            .unwrap_or(&0)
    }

    fn string(&mut self) -> String {
        match self.rng.random_range(0..16) {
            0 => String::new(),
            1 => "a".into(),
            2 => "main".into(),
            3 => "R".into(),
            4 => "adherence".into(),
            5 => "quality".into(),
            6 => "p1".into(),
            7 => "ünïcödé ♪".into(),
            8 => "a b".into(),
            9 => "x".repeat(63),
            10 => "x".repeat(64),
            11 => "y".repeat(128),
            12 => "y".repeat(129),
            13 => "\"q\"\\\0\n".into(),
            14 => "é".repeat(3000),
            _ => {
                let n = self.rng.random_range(1..12);
                (0..n)
                    .map(|_| char::from(self.rng.random_range(b'a'..=b'z')))
                    .collect()
            }
        }
    }

    fn sha(&mut self) -> String {
        match self.rng.random_range(0..4) {
            0 => String::new(),
            1 => SHA.into(),
            2 => SHA.to_uppercase(),
            _ => self.string(),
        }
    }

    fn model(&mut self) -> Option<ModelRef> {
        self.chance(0.9).then(|| ModelRef {
            name: if self.chance(0.5) {
                ["adherence", "quality", "preference"][self.rng.random_range(0..3)].into()
            } else {
                self.string()
            },
            uri: if self.chance(0.8) {
                String::new()
            } else {
                self.string()
            },
            sha256: if self.chance(0.8) {
                String::new()
            } else {
                self.sha()
            },
        })
    }

    fn reward(&mut self) -> RewardConfig {
        RewardConfig {
            model: self.model(),
            weight: if self.chance(0.6) { 1.0 } else { self.f64() },
            normalization: self.chance(0.5).then(|| Normalization {
                kind: if self.chance(0.7) {
                    self.rng.random_range(0..3)
                } else {
                    self.enum_i32()
                },
                ema_decay: self.opt_f64(),
                clip: self.opt_f64(),
            }),
        }
    }

    fn rewards(&mut self) -> Vec<RewardConfig> {
        let n = self.rng.random_range(0..=4) + if self.chance(0.05) { 16 } else { 0 };
        (0..n).map(|_| self.reward()).collect()
    }

    fn duration(&mut self) -> Option<Duration> {
        self.chance(0.5).then(|| Duration {
            seconds: [-1, 0, 1, 3600, i64::MAX, i64::MIN, 315_576_000_001]
                [self.rng.random_range(0..7)],
            nanos: [-1, 0, 1, 999_999_999, 1_000_000_000][self.rng.random_range(0..5)],
        })
    }

    fn stop(&mut self) -> Option<StopCondition> {
        self.chance(0.9).then(|| StopCondition {
            max_steps: self.chance(0.6).then(|| self.u64()),
            target_reward: self.chance(0.3).then(|| self.f64()),
            target_window: if self.chance(0.7) { 0 } else { self.u32() },
            max_wall_time: self.duration(),
        })
    }

    fn stage(&mut self) -> Stage {
        Stage {
            name: if self.chance(0.5) {
                ["R", "U", "S1", "main"][self.rng.random_range(0..4)].into()
            } else {
                self.string()
            },
            rewards: self.rewards(),
            stop: self.stop(),
        }
    }

    fn resources(&mut self) -> Option<Resources> {
        self.chance(0.7).then(|| Resources {
            device: self.enum_i32(),
            device_count: self.small(),
            device_memory_bytes: self.u64(),
            host_memory_bytes: self.u64(),
            cpu_cores: self.u32(),
            device_names: vec![self.string()],
        })
    }

    fn prompt_source(&mut self) -> Option<PromptSource> {
        match self.rng.random_range(0..6) {
            0 => None,
            1 => Some(PromptSource { source: None }),
            2 => dataset_at(&self.dataset.clone()),
            3 => dataset_at(&self.string()),
            _ => {
                let n = self.rng.random_range(0..6);
                let prompts = (0..n)
                    .map(|i| Prompt {
                        prompt_id: if self.chance(0.7) {
                            format!("p{i}")
                        } else {
                            self.string()
                        },
                        caption: if self.chance(0.7) {
                            "calm piano".into()
                        } else {
                            self.string()
                        },
                        attributes: HashMap::from([(self.string(), self.string())]),
                    })
                    .collect();
                Some(PromptSource {
                    source: Some(Source::Inline(PromptList { prompts })),
                })
            }
        }
    }

    /// Changes one random thing of `s`.
    fn mutate(&mut self, s: &mut JobSpec) {
        match self.rng.random_range(0..34) {
            0 => s.name = self.string(),
            1 => s.base_checkpoint = None,
            2 => {
                s.base_checkpoint = Some(ModelRef {
                    name: self.string(),
                    uri: self.string(),
                    sha256: self.sha(),
                })
            }
            3 => s.prompts = self.prompt_source(),
            4 => s.rewards = self.rewards(),
            5 => {
                let n = self.rng.random_range(0..=3) + if self.chance(0.05) { 16 } else { 0 };
                s.stages = (0..n).map(|_| self.stage()).collect();
            }
            6 => {
                if let Some(stage) = s.stages.first_mut() {
                    stage.rewards = self.rewards();
                }
            }
            7 => {
                if let Some(stage) = s.stages.last_mut() {
                    stage.stop = self.stop();
                }
            }
            8 => s.stop = self.stop(),
            9 => s.algorithm = None,
            10 => {
                if let Some(a) = &mut s.algorithm {
                    a.kind = self.enum_i32();
                }
            }
            11 => {
                if let Some(a) = &mut s.algorithm {
                    a.samples_per_prompt = self.u32();
                }
            }
            12 => {
                if let Some(a) = &mut s.algorithm {
                    a.batch_size = if self.chance(0.5) {
                        self.small() * 4
                    } else {
                        self.u32()
                    };
                }
            }
            13 => {
                if let Some(a) = &mut s.algorithm {
                    a.micro_batch_size = if self.chance(0.5) {
                        self.small()
                    } else {
                        self.u32()
                    };
                }
            }
            14 => {
                if let Some(a) = &mut s.algorithm {
                    a.learning_rate = self.f64();
                }
            }
            15 => {
                if let Some(a) = &mut s.algorithm {
                    a.weight_decay = self.f64();
                    a.kl_coef = self.f64();
                }
            }
            16 => {
                if let Some(a) = &mut s.algorithm {
                    a.clip_range = self.opt_f64();
                    a.max_grad_norm = self.opt_f64();
                    a.max_staleness = self.chance(0.5).then(|| self.u32());
                }
            }
            17 => {
                if let Some(a) = &mut s.algorithm {
                    a.ppo_epochs = self.small();
                    a.warmup_steps = self.u32();
                }
            }
            18 => {
                if let Some(a) = &mut s.algorithm {
                    a.sampling = None;
                }
            }
            19 | 20 => {
                if let Some(sp) = s.algorithm.as_mut().and_then(|a| a.sampling.as_mut()) {
                    sp.temperature = self.f32();
                    sp.top_p = self.f32();
                    sp.top_k = self.u32();
                    if self.chance(0.5) {
                        sp.max_new_tokens = self.u32();
                    }
                }
            }
            21 => s.resources = None,
            22 => {
                if let Some(r) = &mut s.resources {
                    r.actors = self.u32();
                }
            }
            23 => {
                if let Some(r) = &mut s.resources {
                    r.learner_ranks = if self.chance(0.5) {
                        self.small()
                    } else {
                        self.u32()
                    };
                }
            }
            24 => {
                if let Some(r) = &mut s.resources {
                    r.actor = self.resources();
                    r.learner = self.resources();
                }
            }
            25 => {
                s.seeds = self.chance(0.7).then(|| Seeds {
                    root: self.chance(0.5).then(|| self.u64()),
                    prompt_order: self.chance(0.5).then(|| self.u64()),
                    sampling: self.chance(0.5).then(|| self.u64()),
                })
            }
            26 => s.publish_every_steps = self.u32(),
            27 => s.checkpoint_every_steps = self.u32(),
            28 => {
                let (k, v) = (self.string(), self.string());
                s.labels.insert(k, v);
            }
            29 => {
                for i in 0..self.rng.random_range(0..100) {
                    s.labels.insert(format!("k{i}"), String::new());
                }
            }
            30 => {
                // Turn a job with stages into one without, or back.
                if s.stages.is_empty() {
                    s.stages = vec![self.stage(), self.stage()];
                    s.rewards.clear();
                } else {
                    s.rewards = std::mem::take(&mut s.stages[0].rewards);
                    s.stop = s.stages[0].stop;
                    s.stages.clear();
                }
            }
            31 => {
                if let Some(stage) = s.stages.first_mut() {
                    stage.name = self.string();
                }
            }
            32 => {
                if let Some(r) = s.rewards.first_mut() {
                    *r = self.reward();
                }
            }
            _ => {
                if let Some(stop) = s.stages.last_mut().and_then(|st| st.stop.as_mut()) {
                    stop.max_wall_time = self.duration();
                    stop.target_window = self.u32();
                }
            }
        }
    }
}

/// Checks what must hold of any spec, valid or not; returns whether it
/// validated.
fn check_properties(spec: &JobSpec, rng: &mut StdRng) -> bool {
    let limits = Limits::default();
    let result = validate(spec, &limits);
    assert_eq!(
        validate(spec, &limits),
        result,
        "validation is deterministic"
    );
    let eff = with_defaults(spec, rng);
    let hash = spec_sha256(spec);
    assert_eq!(spec_sha256(&spec.clone()), hash);
    let canonical = canonical_encoding(spec);
    let decoded = JobSpec::decode(canonical.as_slice()).expect("canonical bytes decode");
    // NaN != NaN, so compare encodings rather than messages.
    assert_eq!(canonical_encoding(&decoded), canonical);
    let _ = (stages(spec), stage_names(spec), reward_models(spec));
    match result {
        Ok(plan) => {
            if let Err(v) = validate(&eff, &limits) {
                panic!("the effective spec of a valid spec fails: {v}\n{eff:?}");
            }
            // The plan a worker reads from the stored spec is the one the
            // submit validated: no default is applied twice or differently.
            match JobPlan::of(&eff) {
                Ok(read) => assert_eq!(read, plan, "the plans differ\n{eff:?}"),
                Err(v) => panic!("the effective spec has no plan: {v}\n{eff:?}"),
            }
            assert_eq!(with_defaults(&eff, rng), eff, "not a fixed point");
            assert_eq!(stage_names(&eff), stage_names(spec));
            assert_eq!(reward_models(&eff), reward_models(spec));
            true
        }
        Err(v) => {
            assert!(v.total() > 0);
            for violation in v.listed() {
                assert!(violation.field.starts_with("spec"), "{}", violation.field);
                assert!(!violation.description.is_empty());
            }
            false
        }
    }
}

#[test]
fn random_specs_never_panic_and_valid_ones_stay_valid() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = write(
        &dir,
        "prompts.jsonl",
        "{\"promptId\": \"p1\", \"caption\": \"calm piano\"}\n",
    );
    let mut g = Gen {
        rng: StdRng::seed_from_u64(0x5eed),
        dataset,
    };
    let mut rng = StdRng::seed_from_u64(1);
    let (mut valid_count, total) = (0, 4000);
    for _ in 0..total {
        let mut spec = if g.chance(0.5) { valid() } else { staged() };
        for _ in 0..g.rng.random_range(0..=4) {
            g.mutate(&mut spec);
        }
        if check_properties(&spec, &mut rng) {
            valid_count += 1;
        }
    }
    // Both branches must be exercised for the test to mean anything.
    assert!(
        valid_count > total / 10 && valid_count < total * 9 / 10,
        "{valid_count} of {total} valid"
    );
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = StdRng::seed_from_u64(0xb17e5);
    let mut check_rng = StdRng::seed_from_u64(2);
    let encoded = staged().encode_to_vec();
    let mut decoded = 0;
    for i in 0..4000 {
        let bytes: Vec<u8> = if i % 2 == 0 {
            let n = rng.random_range(0..128);
            (0..n).map(|_| rng.random()).collect()
        } else {
            // A valid encoding with a few bytes changed decodes far more
            // often, and into deeper messages.
            let mut b = encoded.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..b.len());
                b[at] = rng.random();
            }
            b
        };
        if let Ok(spec) = JobSpec::decode(bytes.as_slice()) {
            decoded += 1;
            check_properties(&spec, &mut check_rng);
        }
    }
    assert!(decoded > 100, "only {decoded} decoded");
}

#[test]
fn limits_have_documented_defaults() {
    let limits = Limits::default();
    assert_eq!(limits.max_caption_bytes, PROTOCOL_MAX_CAPTION_BYTES);
    assert_eq!(limits.max_new_tokens, 65_536);
    // A partial config section fills the rest from the defaults.
    let parsed: Limits = serde_json::from_str("{\"max_stages\": 4}").unwrap();
    assert_eq!(
        parsed,
        Limits {
            max_stages: 4,
            ..Limits::default()
        }
    );
}

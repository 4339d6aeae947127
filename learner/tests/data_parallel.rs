//! Two learner ranks on the CPU ring take the same step as one rank on the
//! same global batch: same reward statistics, advantages, loss, gradient
//! and AdamW update, so the weights agree to float summation order. Ranks
//! that would start from different states refuse to train.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use candle_core::Device;
use candle_nn::ParamsAdamW;
use encore_learner::checkpoint::{self, LearnerCheckpoint};
use encore_learner::collective::{CollectiveConfig, connect};
use encore_learner::loss::{Algorithm, LossConfig};
use encore_learner::normalize::{Normalization, NormalizationKind, RewardSpec};
use encore_learner::optim::named_vars;
use encore_learner::{AdamW, LearnerError, RewardNormalizer, StepReport, Trainer};
use encore_model::{Preset, SamplingParams, TrainablePolicy};
use encore_proto::v1::{CollectiveBackend, Prompt, Rollout, Score};
use rand::{Rng, SeedableRng};

const K: usize = 2;
const GROUPS: usize = 4;
const FRAMES: usize = 12;
const STEPS: usize = 3;

fn specs() -> Vec<RewardSpec> {
    let spec = |model: &str, weight, kind| RewardSpec {
        model: model.into(),
        weight,
        normalization: Normalization {
            kind,
            ema_decay: 0.9,
            clip: Some(5.0),
        },
    };
    vec![
        spec("quality", 1.0, NormalizationKind::RunningZScore),
        spec("adherence", 0.5, NormalizationKind::None),
    ]
}

/// GROUPS groups of K clips sampled from the tiny policy, with random
/// scores; step `n` gets its own batch.
fn batch(policy: &TrainablePolicy, n: u64) -> Vec<Rollout> {
    let captions = ["calm piano", "fast drums", "slow strings", "bright synth"];
    let texts: Vec<&str> = (0..GROUPS * K).map(|i| captions[i / K]).collect();
    let text = encore_model::embed_captions(&texts, &Device::Cpu).unwrap();
    let frozen = policy.frozen().unwrap();
    let samples = encore_model::sample(
        &frozen,
        &text,
        FRAMES,
        &SamplingParams {
            seed: n,
            ..SamplingParams::default()
        },
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(100 + n);
    samples
        .tokens
        .into_iter()
        .zip(samples.log_probs)
        .enumerate()
        .map(|(i, (tokens, log_probs))| Rollout {
            rollout_id: format!("r{n}-{i}"),
            prompt: Some(Prompt {
                prompt_id: format!("p{}", i / K),
                caption: texts[i].into(),
                ..Prompt::default()
            }),
            group_id: format!("g{n}-{}", i / K),
            sample_index: (i % K) as u32,
            group_size: K as u32,
            tokens,
            // A stale behaviour policy: the ratios are not all 1.
            behaviour_log_probs: log_probs.iter().map(|lp| lp - 0.05).collect(),
            scores: HashMap::from([
                (
                    "quality".to_owned(),
                    Score {
                        value: rng.random_range(1.0..5.0),
                        details: None,
                    },
                ),
                (
                    "adherence".to_owned(),
                    Score {
                        value: rng.random_range(-1.0..1.0),
                        details: None,
                    },
                ),
            ]),
            ..Rollout::default()
        })
        .collect()
}

fn trainer() -> Trainer {
    let cfg = Preset::Tiny.config();
    let policy =
        encore_policies::AnyTrainable::from(TrainablePolicy::fresh(&cfg, &Device::Cpu, 1).unwrap());
    let reference = policy.frozen().unwrap();
    let vars = named_vars(&policy.vars);
    let optimizer = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.01,
            ..ParamsAdamW::default()
        },
    )
    .unwrap();
    Trainer {
        policy,
        reference,
        vars,
        optimizer,
        normalizer: RewardNormalizer::new(),
        loss: LossConfig {
            algorithm: Algorithm::Ppo,
            clip_range: 0.2,
            kl_coef: 0.05,
            kl_estimator: encore_learner::KlEstimator::K3,
            entropy_coef: 0.0,
        },
        max_grad_norm: 1.0,
        micro_batch: 3,
        epochs: 2,
    }
}

fn config(rank: usize, world: usize, peers: Vec<String>) -> CollectiveConfig {
    CollectiveConfig {
        backend: CollectiveBackend::TcpRing,
        rank,
        world_size: world,
        peer_addresses: peers,
        tag: "data-parallel-test".into(),
        secret: encore_learner::collective::RingSecret::new(b"data-parallel-test"),
        nccl_unique_id: None,
        device_ordinal: 0,
        timeout: Duration::from_secs(60),
    }
}

/// Runs STEPS steps on rank `rank` of `world`, each on this rank's groups of
/// the step's batch; returns the final weights and the reports.
fn run_rank(
    rank: usize,
    world: usize,
    peers: Vec<String>,
    listener: Option<TcpListener>,
) -> (Vec<Vec<f32>>, Vec<StepReport>) {
    run_on(&config(rank, world, peers), listener)
}

fn run_on(
    config: &CollectiveConfig,
    listener: Option<TcpListener>,
) -> (Vec<Vec<f32>>, Vec<StepReport>) {
    let (rank, world) = (config.rank, config.world_size);
    let mut collective = connect(config, listener).unwrap();
    let mut trainer = trainer();
    let mut reports = Vec::new();
    for n in 0..STEPS as u64 {
        // The data do not depend on the weights being trained: every rank
        // and the single rank see the same global batches.
        let global = batch(
            &TrainablePolicy::fresh(&Preset::Tiny.config(), &Device::Cpu, 1).unwrap(),
            n,
        );
        let share = global.len() / world;
        let mine = &global[rank * share..(rank + 1) * share];
        reports.push(
            trainer
                .step(
                    "R",
                    &specs(),
                    mine,
                    K,
                    &Default::default(),
                    collective.as_mut(),
                )
                .unwrap(),
        );
    }
    let weights = trainer
        .policy
        .named_tensors()
        .into_iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (weights, reports)
}

fn relative_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let mut diff = 0.0f64;
    let mut norm = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            diff += f64::from(p - q).powi(2);
            norm += f64::from(*p).powi(2);
        }
    }
    (diff / norm).sqrt()
}

/// Runs `rank_body(rank, peers, listener)` for ranks 0 and 1 of a ring on
/// loopback, each on a thread; returns their results in rank order.
fn on_two_ranks<T: Send + 'static>(
    rank_body: impl Fn(usize, Vec<String>, TcpListener) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let rank_body = std::sync::Arc::new(rank_body);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (peers, rank_body) = (peers.clone(), rank_body.clone());
            std::thread::spawn(move || rank_body(rank, peers, listener))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn two_ranks_take_the_step_one_rank_takes_on_the_global_batch() {
    let (single, single_reports) = run_rank(0, 1, vec!["127.0.0.1:1".into()], None);

    let ranks = on_two_ranks(|rank, peers, listener| run_rank(rank, 2, peers, Some(listener)));

    // The ranks agree exactly with each other...
    assert_eq!(ranks[0].0, ranks[1].0, "ranks hold identical weights");
    assert_eq!(ranks[0].1, ranks[1].1, "ranks report identical statistics");
    // ...and with the single rank, to float summation order.
    let initial: Vec<Vec<f32>> = trainer()
        .policy
        .named_tensors()
        .into_iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    let moved = relative_difference(&single, &initial);
    assert!(moved > 1e-4, "the steps changed the weights ({moved})");
    let apart = relative_difference(&ranks[0].0, &single);
    assert!(
        apart < 1e-6,
        "2 ranks vs 1 rank: relative weight difference {apart:e}"
    );
    for (step, (two, one)) in ranks[0].1.iter().zip(&single_reports).enumerate() {
        assert_eq!(two.rollouts, one.rollouts);
        // Relative to the values, or to 0.1 for values near 0: the loss of
        // zero-mean advantages is a sum of O(1) terms that cancel, so its
        // own size says nothing about the precision of its parts.
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(0.1);
        assert!(
            close(two.grad_norm, one.grad_norm),
            "{} vs {}",
            two.grad_norm,
            one.grad_norm
        );
        assert!(
            close(two.loss.loss, one.loss.loss),
            "{} vs {}",
            two.loss.loss,
            one.loss.loss
        );
        assert!(
            close(two.combined_reward_mean, one.combined_reward_mean),
            "{} vs {}",
            two.combined_reward_mean,
            one.combined_reward_mean
        );
        // KL is a difference of nearly equal log-probs, whose f32 rounding
        // depends on how rows are batched: 1e-4 relative, not 1e-6.
        assert!(
            (two.loss.kl_seq_mean - one.loss.kl_seq_mean).abs()
                <= 1e-4 * one.loss.kl_seq_mean.abs().max(1e-3),
            "{} vs {}",
            two.loss.kl_seq_mean,
            one.loss.kl_seq_mean
        );
        // Clipping is counted over the global batch's tokens, the same
        // tokens either way.
        assert!(
            close(two.loss.clip_fraction, one.loss.clip_fraction),
            "{} vs {}",
            two.loss.clip_fraction,
            one.loss.clip_fraction
        );
        assert!(close(two.loss.ratio_mean, one.loss.ratio_mean));
        if step == 0 {
            // Before any update the policy is the one that sampled, and the
            // behaviour log-probs are 0.05 below its own: every ratio is
            // e^0.05 = 1.051, inside the clip range of 0.2, so none is
            // clipped.
            assert_eq!(two.loss.clip_fraction, 0.0);
            assert!(
                (two.loss.ratio_mean - 0.05f64.exp()).abs() < 1e-4,
                "{}",
                two.loss.ratio_mean
            );
        }
    }
    // The same comparison on the updates themselves (final minus initial
    // weights), a much stricter yardstick than the weights.
    let update = |w: &[Vec<f32>]| -> Vec<Vec<f32>> {
        w.iter()
            .zip(&initial)
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x - y).collect())
            .collect()
    };
    let update_apart = relative_difference(&update(&ranks[0].0), &update(&single));
    println!(
        "2 ranks vs 1 rank after {STEPS} steps: relative weight difference {apart:e}, \
         relative update difference {update_apart:e}"
    );
    assert!(update_apart < 1e-3, "updates differ by {update_apart:e}");
}

/// One NCCL rank on a real GPU takes exactly the step of one rank without
/// NCCL: the learner's gradient all-reduce, the exact f64 sums and the
/// barrier all go through the library, and a one-rank sum is the identity.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs a CUDA GPU and libnccl (scripts/nccl-check.sh)"]
fn one_nccl_rank_takes_the_step_of_one_plain_rank() {
    let (plain, plain_reports) = run_rank(0, 1, vec!["127.0.0.1:1".into()], None);
    let id = encore_learner::collective::new_nccl_unique_id().expect("an NCCL unique id");
    let nccl = CollectiveConfig {
        backend: CollectiveBackend::Nccl,
        nccl_unique_id: Some(id.to_vec()),
        ..config(0, 1, vec!["127.0.0.1:1".into()])
    };
    let (on_gpu, gpu_reports) = run_on(&nccl, None);
    assert_eq!(on_gpu, plain, "identical weights");
    assert_eq!(gpu_reports, plain_reports, "identical statistics");
}

/// Rank `rank` of two resumes the way a learner rank does, from the latest
/// checkpoint under `root` (if any, else the fresh weights at step 0), and
/// compares its start with the other rank's. Returns its step and weight
/// hash, and the verdict.
fn resume_and_agree(
    rank: usize,
    peers: Vec<String>,
    listener: TcpListener,
    root: &Path,
) -> (u64, String, Result<(), LearnerError>) {
    let mut collective = connect(&config(rank, 2, peers), Some(listener)).unwrap();
    let mut trainer = trainer();
    let step = match checkpoint::latest(root).unwrap() {
        Some((dir, _)) => {
            checkpoint::load(&dir, &trainer.policy, &mut trainer.optimizer)
                .unwrap()
                .step
        }
        None => 0,
    };
    let hash = checkpoint::weights_sha256(&trainer.policy).unwrap();
    let verdict = checkpoint::agree_on_start(collective.as_mut(), step, &hash);
    (step, hash, verdict)
}

/// Both ranks' results of [`resume_and_agree`] on `roots`.
fn two_ranks_resume(roots: [&Path; 2]) -> [(u64, String, Result<(), LearnerError>); 2] {
    let roots = roots.map(Path::to_owned);
    let mut results = on_two_ranks(move |rank, peers, listener| {
        resume_and_agree(rank, peers, listener, &roots[rank])
    })
    .into_iter();
    [results.next().unwrap(), results.next().unwrap()]
}

/// Saves `trainer` as the checkpoint of `step` under `root`.
fn save(root: &Path, step: u64, trainer: &Trainer) {
    let state = LearnerCheckpoint {
        step,
        ..LearnerCheckpoint::default()
    };
    checkpoint::save(root, &state, &trainer.policy, &trainer.optimizer, 2).unwrap();
}

#[test]
fn ranks_that_resume_from_different_checkpoints_refuse_to_train() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, empty, other) = (
        dir.path().join("shared"),
        dir.path().join("empty"),
        dir.path().join("other"),
    );
    // Rank 0's checkpoint of step 2: weights one step away from the base.
    let mut trained = trainer();
    let mut alone = connect(&config(0, 1, vec!["127.0.0.1:1".into()]), None).unwrap();
    let global = batch(
        &TrainablePolicy::fresh(&Preset::Tiny.config(), &Device::Cpu, 1).unwrap(),
        0,
    );
    trained
        .step(
            "R",
            &specs(),
            &global,
            K,
            &Default::default(),
            alone.as_mut(),
        )
        .unwrap();
    save(&shared, 2, &trained);
    // Another checkpoint of the same step with other (the base's) weights.
    save(&other, 2, &trainer());

    // One checkpoint directory for both: they agree.
    let [(step0, hash0, ok0), (step1, hash1, ok1)] = two_ranks_resume([&shared, &shared]);
    assert_eq!((step0, &hash0), (step1, &hash1));
    assert_eq!(step0, 2);
    ok0.unwrap();
    ok1.unwrap();

    // Rank 1 found no checkpoint, or one of the same step with other
    // weights: both ranks refuse, naming both starts.
    for (what, root1, step1) in [("no checkpoint", &empty, 0), ("other weights", &other, 2)] {
        let [(_, a, verdict0), (s1, b, verdict1)] = two_ranks_resume([&shared, root1]);
        assert_eq!((a.as_str(), s1), (hash0.as_str(), step1), "{what}");
        assert_ne!(a, b, "{what}");
        for verdict in [verdict0, verdict1] {
            let err = verdict.expect_err(what).to_string();
            assert!(
                err.contains(&format!("rank 0 from step 2 with weights sha256 {a}"))
                    && err.contains(&format!("rank 1 from step {step1} with weights sha256 {b}")),
                "{what}: {err}"
            );
        }
    }
}

//! `encore quickstart`: MusicRL's method end to end on one machine, with no
//! Redis and no GPU, and a report to look at and listen to.
//!
//! ```text
//!  1 base policy      pretrain the tiny preset on the procedural corpus (cached)
//!  2 raters           simulated raters: captioned clips, 1-5 ratings, pairwise choices
//!  3 reward models    adherence (text-audio), quality (MOS), preference (Bradley-Terry) (cached)
//!  4 local cluster    coordinator (embedded store), reward server, 2 actors, 1 learner:
//!                     `encore serve ...` child processes talking gRPC on loopback
//!  5 RL jobs          RU (stage R: adherence + quality, then stage U: preference), and U alone
//!  6 evaluation       base, R, U and RU on held-out prompts, judged by each reward
//!                     model and by held-out simulated raters no reward model saw
//!  7 report           curves (CSV, PNG), WAV clips, win-rate table, summary.md
//! ```
//!
//! [`Plan`] holds every size; `--scale test` shrinks them to check the
//! plumbing in about a minute (its numbers mean nothing).

mod cluster;
mod eval;
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::{Args, ValueEnum};
use encore_model::Preset;
use encore_model::pretrain::{PretrainConfig, pretrain};
use encore_raters::generate::{self, GenConfig};
use encore_raters::records::write_jsonl;
use encore_reward::ArchConfig;
use encore_reward_train::{self as train, TrainConfig, TrainReport};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// How big a quick start is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// The real thing: about 10 minutes on 2 cores after the build.
    Default,
    /// Every phase at toy size (about a minute): checks the plumbing; the
    /// numbers mean nothing.
    Test,
}

/// Flags of `encore quickstart`.
#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Directory of the run: datasets, cluster state and logs, the policies
    /// it trained, and `report/`.
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// Where the base policy and reward models are cached between runs,
    /// keyed by the settings that made them.
    #[arg(long, default_value = "runs/cache")]
    cache: PathBuf,
    /// Sizes of everything.
    #[arg(long, value_enum, default_value = "default")]
    scale: Scale,
    /// Train the base policy and reward models again even when cached.
    #[arg(long)]
    fresh: bool,
}

/// Every size and setting of a quick start.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The scale it was made for.
    pub scale: Scale,
    /// Base policy pretraining.
    pub pretrain: PretrainPlan,
    /// Simulated rater datasets.
    pub data: DataPlan,
    /// Reward model training.
    pub rewards: RewardPlan,
    /// The RL jobs.
    pub rl: RlPlan,
    /// The evaluation.
    pub eval: EvalPlan,
}

/// Base policy pretraining.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainPlan {
    /// Optimiser steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
}

/// Simulated rater datasets.
#[derive(Debug, Clone, Serialize)]
pub struct DataPlan {
    /// Captioned clips (adherence).
    pub clips: usize,
    /// Rated clips (quality; several raters each).
    pub rated_clips: usize,
    /// Pairwise comparisons of generated candidates (preference).
    pub pairs: usize,
    /// Pairwise comparisons of two clips the base policy sampled for one
    /// training prompt (preference), as MusicRL's users compared two of
    /// MusicLM's clips.
    pub policy_pairs: usize,
    /// Clip lengths, in frames.
    pub frames: (usize, usize),
    /// Share of the captioned clips corrupted like a policy's samples
    /// (`GenConfig::corrupted_clips`).
    pub corrupted_clips: f64,
}

/// Reward model training.
#[derive(Debug, Clone, Serialize)]
pub struct RewardPlan {
    /// Examples per step.
    pub batch_size: usize,
    /// Channels of the audio tower.
    pub channels: usize,
    /// Examples per step of the adherence model: each clip's caption is
    /// told apart from the other `adherence_batch_size - 1` of its batch.
    pub adherence_batch_size: usize,
    /// Epochs of the adherence model.
    pub adherence_epochs: usize,
    /// Epochs of the quality model.
    pub quality_epochs: usize,
    /// Epochs of the preference model (its audio tower starts from the
    /// quality model's).
    pub preference_epochs: usize,
}

/// The RL jobs.
#[derive(Debug, Clone, Serialize)]
pub struct RlPlan {
    /// Steps of stage R (adherence + quality).
    pub r_steps: u64,
    /// Steps of stage U (user preference).
    pub u_steps: u64,
    /// Clips per step.
    pub batch_size: u32,
    /// Samples per prompt.
    pub samples_per_prompt: u32,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// KL coefficient β.
    pub kl_coef: f64,
    /// Weight of the adherence reward in stage R (the quality reward's is
    /// 1).
    pub adherence_weight: f64,
    /// Weight of the entropy bonus (0: none).
    pub entropy_coef: f64,
    /// Training prompts (captions of the corpus' train split).
    pub prompts: usize,
    /// Actor processes.
    pub actors: u32,
}

/// The evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPlan {
    /// Held-out prompts.
    pub prompts: usize,
    /// Clips per prompt and model.
    pub samples: usize,
    /// Held-out simulated raters judging.
    pub raters: u64,
    /// Prompts whose clips are written as WAV files.
    pub wav_prompts: usize,
}

impl Plan {
    /// The settings of `scale`.
    pub fn new(scale: Scale) -> Plan {
        match scale {
            Scale::Default => Plan {
                scale,
                pretrain: PretrainPlan {
                    steps: 300,
                    batch_size: 32,
                    learning_rate: 3e-3,
                },
                data: DataPlan {
                    clips: 24000,
                    rated_clips: 3000,
                    pairs: 4000,
                    policy_pairs: 6000,
                    frames: (40, 64),
                    corrupted_clips: 0.0,
                },
                rewards: RewardPlan {
                    batch_size: 32,
                    channels: 64,
                    adherence_batch_size: 128,
                    adherence_epochs: 3,
                    quality_epochs: 5,
                    preference_epochs: 1,
                },
                rl: RlPlan {
                    r_steps: 40,
                    u_steps: 80,
                    batch_size: 32,
                    samples_per_prompt: 4,
                    learning_rate: 1e-3,
                    kl_coef: 0.2,
                    adherence_weight: 1.0,
                    entropy_coef: 0.01,
                    prompts: 256,
                    actors: 2,
                },
                eval: EvalPlan {
                    prompts: 128,
                    samples: 4,
                    raters: 20,
                    wav_prompts: 4,
                },
            },
            Scale::Test => Plan {
                scale,
                pretrain: PretrainPlan {
                    steps: 8,
                    batch_size: 4,
                    learning_rate: 3e-3,
                },
                data: DataPlan {
                    clips: 48,
                    rated_clips: 32,
                    pairs: 64,
                    policy_pairs: 32,
                    frames: (16, 24),
                    corrupted_clips: 0.0,
                },
                rewards: RewardPlan {
                    batch_size: 8,
                    channels: 8,
                    adherence_batch_size: 8,
                    adherence_epochs: 1,
                    quality_epochs: 1,
                    preference_epochs: 1,
                },
                rl: RlPlan {
                    r_steps: 2,
                    u_steps: 2,
                    batch_size: 8,
                    samples_per_prompt: 2,
                    learning_rate: 1e-3,
                    kl_coef: 0.2,
                    adherence_weight: 1.0,
                    entropy_coef: 0.01,
                    prompts: 16,
                    actors: 2,
                },
                eval: EvalPlan {
                    prompts: 4,
                    samples: 1,
                    raters: 4,
                    wav_prompts: 2,
                },
            },
        }
    }

    /// Frames per clip in the RL jobs and the evaluation: the policy's
    /// whole context at the default scale, short at the test scale.
    fn frames(&self, max_frames: usize) -> usize {
        match self.scale {
            Scale::Default => max_frames,
            Scale::Test => max_frames.min(16),
        }
    }
}

/// A progress bar on a terminal; elsewhere (a log file, CI) a plain line
/// every 15 s, so a long phase is never silent.
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
    label: String,
    last_line: Instant,
}

impl Progress {
    /// A bar of `len` steps labelled `label`.
    pub(crate) fn new(len: u64, label: &str) -> Progress {
        Progress {
            bar: encore_cli::progress_bar(len, label),
            label: label.to_owned(),
            last_line: Instant::now(),
        }
    }

    /// Moves to `position` of `len` with a short status message.
    pub(crate) fn update(&mut self, position: u64, len: u64, message: String) {
        self.bar.set_length(len);
        self.bar.set_position(position);
        if self.bar.is_hidden() {
            if self.last_line.elapsed() >= std::time::Duration::from_secs(15) {
                eprintln!("{} {position}/{len} {message}", self.label);
                self.last_line = Instant::now();
            }
        } else {
            self.bar.set_message(message);
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// One line per phase on stderr, and the seconds each took for the report.
struct Phases {
    total: usize,
    done: usize,
    started: Instant,
    current: Option<(String, Instant)>,
    seconds: Vec<(String, f64)>,
}

impl Phases {
    fn new(total: usize) -> Phases {
        Phases {
            total,
            done: 0,
            started: Instant::now(),
            current: None,
            seconds: Vec::new(),
        }
    }

    fn begin(&mut self, name: &str, what: &str) {
        self.end();
        self.done += 1;
        eprintln!(
            "==> [{}/{}] {name}: {what} ({:.0}s in)",
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        self.current = Some((name.to_owned(), Instant::now()));
    }

    fn end(&mut self) {
        if let Some((name, at)) = self.current.take() {
            self.seconds.push((name, at.elapsed().as_secs_f64()));
        }
    }
}

/// Runs the quick start.
pub fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    let plan = Plan::new(args.scale);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out)?;
    std::fs::create_dir_all(&args.cache)
        .with_context(|| format!("creating {}", args.cache.display()))?;
    let cache = std::fs::canonicalize(&args.cache)?;
    let mut phases = Phases::new(7);

    phases.begin("base policy", "pretraining the tiny preset");
    let base = base_policy(&plan, &cache, args.fresh)?;

    phases.begin("raters", "simulated raters label clips and pairs");
    let frames = plan.frames(encore_model::read_config(&base)?.policy.max_frames);
    let data = out.join("data");
    let (data_notes, datasets) = rater_data(&plan, &data, &cache, &base, frames)?;

    phases.begin("reward models", "adherence, quality, preference");
    let rewards = reward_models(&plan, &cache, &base, &datasets, args.fresh)?;

    phases.begin(
        "local cluster",
        "coordinator, reward server, 2 actors and a learner as processes",
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let mut cluster = runtime.block_on(cluster::Cluster::start(
        &out.join("cluster"),
        &rewards.dir,
        &plan,
    ))?;

    phases.begin("RL jobs", "RU (stage R, then stage U), then U alone");
    let jobs = runtime.block_on(async {
        let ru = cluster
            .run_job(
                "RU",
                &base,
                &[("R", plan.rl.r_steps), ("U", plan.rl.u_steps)],
                frames,
            )
            .await?;
        let u = cluster
            .run_job("U", &base, &[("U", plan.rl.u_steps)], frames)
            .await?;
        anyhow::Ok((ru, u))
    });
    let stopped = runtime.block_on(cluster.stop());
    let (ru, u) = jobs?;
    stopped?;
    let policies_dir = out.join("policies");
    let policies = vec![
        ("base".to_owned(), base.clone()),
        (
            "R".to_owned(),
            ru.export_stage(&policies_dir.join("R"), &base, 0)?,
        ),
        (
            "U".to_owned(),
            u.export_stage(&policies_dir.join("U"), &base, 0)?,
        ),
        (
            "RU".to_owned(),
            ru.export_stage(&policies_dir.join("RU"), &base, 1)?,
        ),
    ];

    phases.begin("evaluation", "held-out prompts, every judge");
    let evaluation = eval::evaluate(&policies, &rewards.dir, &plan.eval, frames)?;

    phases.begin("report", "curves, clips, win rates");
    phases.end();
    let report_dir = out.join("report");
    let summary = report::write(&report::Inputs {
        dir: &report_dir,
        plan: &plan,
        jobs: &[&ru, &u],
        evaluation: &evaluation,
        rewards: &rewards.reports,
        data_notes: &data_notes,
        phases: &phases.seconds,
        total_seconds: phases.started.elapsed().as_secs_f64(),
    })?;
    eprintln!("\n{summary}");
    eprintln!(
        "Report: {} (open summary.md; clips in audio/)",
        report_dir.display()
    );
    Ok(())
}

/// Bump when what a cached artefact holds changes in a way that neither its
/// settings nor the code version show.
const CACHE_SCHEMA: u32 = 1;

/// A short stable key of settings, for cache directory names. It covers
/// the code version and [`CACHE_SCHEMA`] too: another version may read the
/// same settings differently (another corpus, other model code), and must
/// not reuse what this one trained.
fn cache_key(settings: &impl Serialize) -> anyhow::Result<String> {
    versioned_key(env!("CARGO_PKG_VERSION"), settings)
}

/// [`cache_key`] as code version `version` computes it.
fn versioned_key(version: &str, settings: &impl Serialize) -> anyhow::Result<String> {
    let json = serde_json::to_vec(&(CACHE_SCHEMA, version, settings))?;
    Ok(hex::encode(&Sha256::digest(&json)[..6]))
}

/// The pretrained base policy: from the cache when its settings match.
fn base_policy(plan: &Plan, cache: &Path, fresh: bool) -> anyhow::Result<PathBuf> {
    let config = PretrainConfig {
        preset: Preset::Tiny,
        steps: plan.pretrain.steps,
        batch_size: plan.pretrain.batch_size,
        learning_rate: plan.pretrain.learning_rate,
        warmup_steps: (plan.pretrain.steps / 12).max(2),
        eval_every: plan.pretrain.steps,
        eval_examples: 16,
        checkpoint_every: 0,
        ..PretrainConfig::default()
    };
    let dir = cache.join(format!("base-{}", cache_key(&config)?));
    let done = dir.join("quickstart-done");
    if !fresh && done.exists() {
        eprintln!("    cached: {}", dir.display());
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut bar = Progress::new(plan.pretrain.steps as u64, "    pretrain");
    let report = pretrain(&config, &dir, |p| {
        bar.update(p.step as u64, p.steps as u64, format!("loss {:.3}", p.loss));
    })?;
    bar.finish();
    eprintln!(
        "    {} steps, held-out loss {:.3} nats/token (unigram {:.3}), {:.0}s",
        report.steps, report.final_eval_loss, report.unigram_entropy, report.seconds
    );
    std::fs::write(&done, b"")?;
    Ok(dir)
}

/// Where the datasets went.
struct Datasets {
    clips: Vec<encore_raters::records::ClipRecord>,
    ratings: Vec<encore_raters::records::RatingRecord>,
    preferences: Vec<encore_raters::records::PreferenceRecord>,
}

/// How the simulated raters' datasets are generated (`n` aside: each
/// dataset sets its own).
fn data_config(plan: &Plan) -> GenConfig {
    GenConfig {
        seed: 1,
        frames_min: plan.data.frames.0,
        frames_max: plan.data.frames.1,
        ..GenConfig::default()
    }
}

/// The cache key of the reward models: every setting of the data they are
/// trained on (the plan's sizes and `data`, how the datasets are generated,
/// the base policy whose samples were judged) and of their training.
fn rewards_key(plan: &Plan, data: &GenConfig, base: &Path) -> anyhow::Result<String> {
    let training: Vec<TrainConfig> = [
        plan.rewards.adherence_epochs,
        plan.rewards.quality_epochs,
        plan.rewards.preference_epochs,
    ]
    .into_iter()
    .map(|epochs| reward_train_config(plan, epochs, None))
    .collect();
    cache_key(&(&plan.data, data, &plan.rewards, training, cache_name(base)))
}

/// The last component of a cache path: its settings' key.
fn cache_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The training settings of one reward model.
fn reward_train_config(plan: &Plan, epochs: usize, init_audio: Option<PathBuf>) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: plan.rewards.batch_size,
        learning_rate: 2e-3,
        warmup_steps: 30,
        arch: ArchConfig {
            channels: plan.rewards.channels,
            ..ArchConfig::default()
        },
        init_audio,
        ..TrainConfig::default()
    }
}

/// Generates the three datasets (and writes them as JSONL under `dir`);
/// returns lines for the report on what their noise allows.
fn rater_data(
    plan: &Plan,
    dir: &Path,
    cache: &Path,
    base_policy: &Path,
    frames: usize,
) -> anyhow::Result<(Vec<String>, Datasets)> {
    std::fs::create_dir_all(dir)?;
    let base = data_config(plan);
    let clips = generate::clips(&GenConfig {
        n: plan.data.clips,
        corrupted_clips: plan.data.corrupted_clips,
        ..base.clone()
    })?;
    write_jsonl(dir.join("clips.jsonl"), &clips)?;
    let ratings = generate::ratings(&GenConfig {
        n: plan.data.rated_clips,
        ..base.clone()
    })?;
    write_jsonl(dir.join("ratings.jsonl"), &ratings)?;
    let mut preferences = generate::preferences(&GenConfig {
        n: plan.data.pairs,
        ..base.clone()
    })?;
    preferences.extend(judged_policy_pairs(
        cache,
        base_policy,
        &base,
        plan.data.policy_pairs,
        frames,
    )?);
    write_jsonl(dir.join("preferences.jsonl"), &preferences)?;
    let quality = generate::quality_ceiling(&ratings);
    let population = encore_raters::sim::Population::new(base.population_seed);
    let pref = generate::preference_ceiling(&preferences, &population, base.raters);
    let notes = vec![
        format!(
            "{} captioned clips, {} ratings of {} clips, {} pairwise answers ({} pairs of candidates, {} of the base policy's samples) from a pool of {} simulated raters",
            clips.len(),
            ratings.len(),
            plan.data.rated_clips,
            preferences.len(),
            plan.data.pairs,
            plan.data.policy_pairs,
            base.raters
        ),
        format!(
            "rater noise allows at most Spearman {:.3} for quality and {:.1}% pairwise accuracy (inter-rater agreement {:.1}%)",
            quality.spearman,
            100.0 * pref.bayes_accuracy,
            100.0 * pref.inter_rater_agreement
        ),
    ];
    for line in &notes {
        eprintln!("    {line}");
    }
    Ok((
        notes,
        Datasets {
            clips,
            ratings,
            preferences,
        },
    ))
}

/// The raters' answers on [`policy_pairs`], from the cache when the base
/// policy and the settings match (sampling them takes about a minute).
fn judged_policy_pairs(
    cache: &Path,
    base: &Path,
    data: &GenConfig,
    n: usize,
    frames: usize,
) -> anyhow::Result<Vec<encore_raters::PreferenceRecord>> {
    let key = cache_key(&(cache_name(base), data, n, frames))?;
    let file = cache.join(format!("pairs-{key}.jsonl"));
    if file.exists() {
        eprintln!("    base pairs: cached, {}", file.display());
        return Ok(encore_raters::read_valid_jsonl(&file)?);
    }
    let records = generate::judge_pairs(data, policy_pairs(base, data, n, frames)?)?;
    let partial = file.with_extension("partial");
    write_jsonl(&partial, &records)?;
    std::fs::rename(&partial, &file)?;
    Ok(records)
}

/// `n` pairs of clips of `frames` frames that the base policy sampled, two
/// for each of [`generate::pair_prompts`], in batches of 32 prompts.
fn policy_pairs(
    base: &Path,
    data: &GenConfig,
    n: usize,
    frames: usize,
) -> anyhow::Result<Vec<generate::SampledPair>> {
    let device = Device::Cpu;
    let (policy, _) = encore_model::load_frozen(base, &device)?;
    let prompts = generate::pair_prompts(data, n);
    let mut pairs = Vec::with_capacity(n);
    let mut bar = Progress::new(n as u64, "    base pairs");
    for (bi, chunk) in prompts.chunks(32).enumerate() {
        let twice: Vec<&str> = chunk
            .iter()
            .flat_map(|(caption, _)| [caption.as_str(), caption.as_str()])
            .collect();
        let text = encore_model::embed_captions(&twice, &device)?;
        let params = encore_model::SamplingParams {
            seed: data.seed.wrapping_mul(1_000_003).wrapping_add(bi as u64),
            ..Default::default()
        };
        let mut clips = encore_model::sample(&policy, &text, frames, &params)?
            .tokens
            .into_iter();
        for (caption, truth) in chunk {
            let (Some(a), Some(b)) = (clips.next(), clips.next()) else {
                anyhow::bail!("the base policy returned fewer clips than prompts");
            };
            let clip = |tokens| encore_raters::PairClip {
                tokens,
                policy_version: Some("base".to_owned()),
            };
            pairs.push(generate::SampledPair {
                caption: caption.clone(),
                truth: *truth,
                a: clip(a),
                b: clip(b),
            });
        }
        bar.update(pairs.len() as u64, n as u64, String::new());
    }
    bar.finish();
    Ok(pairs)
}

/// The three trained reward models.
pub(crate) struct Rewards {
    /// Directory holding `adherence/`, `quality/` and `preference/`.
    pub dir: PathBuf,
    /// Their training reports, by name.
    pub reports: Vec<(String, TrainReport)>,
}

/// Trains (or takes from the cache) the three reward models.
fn reward_models(
    plan: &Plan,
    cache: &Path,
    base: &Path,
    data: &Datasets,
    fresh: bool,
) -> anyhow::Result<Rewards> {
    let dir = cache.join(format!(
        "rewards-{}",
        rewards_key(plan, &data_config(plan), base)?
    ));
    let config =
        |epochs: usize, init_audio: Option<PathBuf>| reward_train_config(plan, epochs, init_audio);
    let mut reports = Vec::new();
    for name in ["adherence", "quality", "preference"] {
        let model_dir = dir.join(name);
        let report_file = model_dir.join("report.json");
        if !fresh && report_file.exists() {
            let report: TrainReport = serde_json::from_slice(&std::fs::read(&report_file)?)
                .with_context(|| format!("reading {}", report_file.display()))?;
            eprintln!("    {name}: cached, {}", train::describe(&report));
            reports.push((name.to_owned(), report));
            continue;
        }
        let mut bar = Progress::new(1, &format!("    {name:<10}"));
        let mut progress = |p: train::Progress| {
            if let train::Progress::Step { step, total, loss } = p {
                bar.update(step as u64, total as u64, format!("loss {loss:.3}"));
            }
        };
        let device = Device::Cpu;
        let (mut model, report) = match name {
            "adherence" => train::train_adherence(
                &data.clips,
                &TrainConfig {
                    batch_size: plan.rewards.adherence_batch_size,
                    ..config(plan.rewards.adherence_epochs, None)
                },
                &device,
                &mut progress,
            )?,
            "quality" => train::train_quality(
                &data.ratings,
                &config(plan.rewards.quality_epochs, None),
                &device,
                &mut progress,
            )?,
            _ => train::train_preference(
                &data.preferences,
                &config(plan.rewards.preference_epochs, Some(dir.join("quality"))),
                &device,
                &mut progress,
            )?,
        };
        bar.finish();
        model.save(&model_dir)?;
        std::fs::write(&report_file, serde_json::to_vec_pretty(&report)?)?;
        eprintln!(
            "    {name}: {} ({:.0}s)",
            train::describe(&report),
            report.seconds
        );
        reports.push((name.to_owned(), report));
    }
    Ok(Rewards { dir, reports })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_the_code_version() {
        let plan = Plan::new(Scale::Test);
        let here = cache_key(&plan.pretrain).unwrap();
        assert_eq!(
            here,
            versioned_key(env!("CARGO_PKG_VERSION"), &plan.pretrain).unwrap()
        );
        assert_ne!(
            versioned_key("0.0.1-other", &plan.pretrain).unwrap(),
            here,
            "another code version must not reuse this one's artefacts"
        );
    }

    #[test]
    fn the_reward_cache_key_covers_how_the_data_is_generated() {
        let plan = Plan::new(Scale::Test);
        let data = data_config(&plan);
        let base = Path::new("runs/cache/base-000000000000");
        let key = rewards_key(&plan, &data, base).unwrap();
        assert_eq!(
            key,
            rewards_key(&plan, &data.clone(), base).unwrap(),
            "stable"
        );
        let others = [
            GenConfig {
                seed: data.seed + 1,
                ..data.clone()
            },
            GenConfig {
                raters: data.raters + 1,
                ..data.clone()
            },
            GenConfig {
                population_seed: data.population_seed + 1,
                ..data.clone()
            },
            GenConfig {
                violation_rate: data.violation_rate / 2.0,
                ..data.clone()
            },
        ];
        for other in others {
            assert_ne!(rewards_key(&plan, &other, base).unwrap(), key, "{other:?}");
        }
        let mut fewer_pairs = plan.clone();
        fewer_pairs.data.pairs -= 1;
        assert_ne!(rewards_key(&fewer_pairs, &data, base).unwrap(), key);
        let mut fewer_policy_pairs = plan.clone();
        fewer_policy_pairs.data.policy_pairs -= 1;
        assert_ne!(rewards_key(&fewer_policy_pairs, &data, base).unwrap(), key);
        let other_base = Path::new("runs/cache/base-111111111111");
        assert_ne!(
            rewards_key(&plan, &data, other_base).unwrap(),
            key,
            "the base policy's samples are judged: another base, other data"
        );
    }
}

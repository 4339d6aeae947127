//! `encore reward`: make simulated-rater datasets, train the three reward
//! models on them, and serve trained models over gRPC.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use encore_raters::records::{
    ClipRecord, PreferenceRecord, RatingRecord, read_valid_jsonl, write_jsonl,
};
use encore_reward::RewardKind;
use encore_reward_train::{Evaluation, Progress, TrainConfig, TrainReport};
use serde::Serialize;

/// `encore reward ...`.
#[derive(Debug, Args)]
pub struct RewardArgs {
    #[command(subcommand)]
    command: RewardCommand,
}

#[derive(Debug, Subcommand)]
enum RewardCommand {
    /// Write a dataset of simulated raters' judgements as JSONL.
    Data(DataArgs),
    /// Train a reward model on a JSONL dataset and evaluate it on held-out records.
    Train(TrainArgs),
}

/// Which dataset `encore reward data` writes.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DataKind {
    /// Captioned clips for the prompt-adherence model.
    Clips,
    /// 1-5 quality ratings, several raters per clip.
    Ratings,
    /// Pairwise preferences between two clips for one prompt.
    Preferences,
}

#[derive(Debug, Args)]
struct DataArgs {
    /// What to generate.
    kind: DataKind,
    /// JSONL file to write.
    #[arg(long)]
    out: PathBuf,
    /// Records to generate (clips, rated clips or pairs).
    #[arg(long, default_value_t = 4000)]
    n: usize,
    /// Seed of prompts, clips and rater noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seed of the rater population (whose tastes the raters share).
    #[arg(long, default_value_t = 0)]
    population_seed: u64,
    /// Shortest clip, in tokens (25 per second).
    #[arg(long, default_value_t = 100)]
    frames_min: usize,
    /// Longest clip, in tokens.
    #[arg(long, default_value_t = 100)]
    frames_max: usize,
}

fn data(args: DataArgs) -> anyhow::Result<()> {
    use encore_raters::generate::{self, GenConfig};
    let cfg = GenConfig {
        seed: args.seed,
        n: args.n,
        frames_min: args.frames_min,
        frames_max: args.frames_max,
        population_seed: args.population_seed,
        ..GenConfig::default()
    };
    let written = match args.kind {
        DataKind::Clips => {
            let records = generate::clips(&cfg)?;
            write_jsonl(&args.out, &records)?;
            records.len()
        }
        DataKind::Ratings => {
            let records = generate::ratings(&cfg)?;
            write_jsonl(&args.out, &records)?;
            let c = generate::quality_ceiling(&records);
            println!(
                "rater noise allows a quality Spearman of {:.3} (latent quality vs MOS over {} clips)",
                c.spearman, c.n_clips
            );
            records.len()
        }
        DataKind::Preferences => {
            let records = generate::preferences(&cfg)?;
            write_jsonl(&args.out, &records)?;
            let population = encore_raters::sim::Population::new(cfg.population_seed);
            let c = generate::preference_ceiling(&records, &population, cfg.raters);
            println!(
                "rater noise allows a pairwise accuracy of {:.1}% (Bayes ceiling; two raters agree {:.1}%) on {} decided pairs",
                100.0 * c.bayes_accuracy,
                100.0 * c.inter_rater_agreement,
                c.n
            );
            records.len()
        }
    };
    println!("wrote {written} records to {}", args.out.display());
    Ok(())
}

/// Flags of `encore reward train`; unset ones fall back to the config file
/// section `[reward_train]`, `ENCORE_REWARD_TRAIN__*` and the defaults.
#[derive(Debug, Args, Serialize)]
struct TrainArgs {
    /// Which model: adherence, quality or preference.
    #[serde(skip)]
    kind: RewardKind,
    /// JSONL dataset (from `encore reward data` or collected).
    #[arg(long)]
    #[serde(skip)]
    data: PathBuf,
    /// Checkpoint directory to write.
    #[arg(long)]
    #[serde(skip)]
    out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    #[serde(skip)]
    device: String,
    /// Passes over the training split.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    epochs: Option<usize>,
    /// Examples per step.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    learning_rate: Option<f64>,
    /// Fraction of records held out.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_fraction: Option<f64>,
    /// Seed of initialisation, shuffling and the split.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Start the audio tower from another reward checkpoint (e.g. the
    /// quality model's) instead of from scratch.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    init_audio: Option<PathBuf>,
}

fn train(config: Option<&Path>, args: TrainArgs) -> anyhow::Result<()> {
    let cfg: TrainConfig = encore_config::load("reward_train", config, &args)?;
    cfg.validate()?;
    let device = encore_model::device(&args.device)?;
    let bar = crate::progress_bar(0, &format!("train {}", args.kind));
    let mut progress = |p: Progress| match p {
        Progress::Features { done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message("computing log-mel features");
        }
        Progress::Epoch {
            epoch,
            train_loss,
            validation_loss,
        } => {
            tracing::info!(epoch, train_loss, validation_loss, "epoch done");
        }
        Progress::Step { step, total, loss } => {
            bar.set_length(total as u64);
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4}"));
            if step % 50 == 0 || step == total {
                tracing::info!(step, total, loss, "reward training");
            }
        }
    };
    let read = |what: &str| format!("reading {what} from {}", args.data.display());
    let (mut model, report) = match args.kind {
        RewardKind::Adherence => {
            let records: Vec<ClipRecord> =
                read_valid_jsonl(&args.data).with_context(|| read("clips"))?;
            encore_reward_train::train_adherence(&records, &cfg, &device, &mut progress)?
        }
        RewardKind::Quality => {
            let records: Vec<RatingRecord> =
                read_valid_jsonl(&args.data).with_context(|| read("ratings"))?;
            encore_reward_train::train_quality(&records, &cfg, &device, &mut progress)?
        }
        RewardKind::Preference => {
            let records: Vec<PreferenceRecord> =
                read_valid_jsonl(&args.data).with_context(|| read("preferences"))?;
            encore_reward_train::train_preference(&records, &cfg, &device, &mut progress)?
        }
    };
    bar.finish_and_clear();
    model.save(&args.out)?;
    let report_path = args.out.join("report.json");
    std::fs::write(&report_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    print_report(&report);
    println!(
        "checkpoint: {} (sha256 {})",
        args.out.display(),
        model.sha256()
    );
    Ok(())
}

/// Prints the held-out figures next to the bounds the data allows.
fn print_report(report: &TrainReport) {
    println!(
        "trained {} on {} examples ({} steps, {:.0}s), evaluated on {} held out:",
        report.kind, report.train_examples, report.steps, report.seconds, report.eval_examples
    );
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let opt = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map(f).unwrap_or_else(|| "n/a".into());
    match &report.eval {
        Evaluation::Adherence {
            clips,
            recall_at_1,
            recall_at_5,
            chance_at_1,
            chance_at_5,
            oracle_at_1,
            oracle_at_5,
        } => {
            println!(
                "  text-to-audio retrieval among {clips} clips   model   chance   attribute oracle"
            );
            println!(
                "  recall@1                                 {:>7}  {:>7}  {:>7}",
                pct(*recall_at_1),
                pct(*chance_at_1),
                opt(*oracle_at_1, &pct)
            );
            println!(
                "  recall@5                                 {:>7}  {:>7}  {:>7}",
                pct(*recall_at_5),
                pct(*chance_at_5),
                opt(*oracle_at_5, &pct)
            );
        }
        Evaluation::Quality {
            clips,
            spearman,
            pearson,
            mse,
            ceiling_spearman,
        } => {
            println!(
                "  {clips} clips: Spearman {spearman:.3} (rater-noise ceiling {}), Pearson {pearson:.3}, MSE {mse:.3}",
                opt(*ceiling_spearman, &|x| format!("{x:.3}"))
            );
        }
        Evaluation::Preference {
            pairs,
            accuracy,
            bayes_ceiling,
            inter_rater_agreement,
        } => {
            println!(
                "  {pairs} decided pairs: accuracy {} (Bayes ceiling {}, two raters agree {})",
                pct(*accuracy),
                opt(*bayes_ceiling, &pct),
                opt(*inter_rater_agreement, &pct)
            );
        }
    }
}

/// Runs `encore reward ...`.
pub fn run(config: Option<&Path>, args: RewardArgs) -> anyhow::Result<()> {
    match args.command {
        RewardCommand::Data(a) => data(a),
        RewardCommand::Train(a) => train(config, a),
    }
}

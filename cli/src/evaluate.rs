//! `encore evaluate`: how well a checkpoint follows its prompts.

use std::path::PathBuf;

use clap::Args;
use encore_model::follow::FollowReport;
use encore_model::{SamplingParams, follow};

/// Flags of `encore evaluate`.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Number of held-out prompts (one clip each).
    #[arg(long, default_value_t = 256)]
    prompts: usize,
    /// Seed of the prompt set.
    #[arg(long, default_value_t = 1)]
    prompt_seed: u64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvaluateArgs) -> anyhow::Result<()> {
    let device = encore_model::device(&args.device)?;
    let (policy, _) = encore_model::load_frozen(&args.checkpoint, &device)?;
    let params = SamplingParams {
        seed: args.seed,
        ..Default::default()
    };
    let report = follow::prompt_following(&policy, args.prompts, args.prompt_seed, 32, &params)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_follow(&report);
    }
    Ok(())
}

/// Prints a prompt-following report as a small table.
pub fn print_follow(f: &FollowReport) {
    println!("prompt following on {} held-out prompts:", f.prompts);
    println!("  attribute    policy   corpus   chance");
    println!(
        "  instrument   {:>5.1}%   {:>5.1}%   {:>5.1}%",
        100.0 * f.instrument,
        100.0 * f.corpus_instrument,
        100.0 * f.instrument_chance
    );
    println!(
        "  tempo        {:>5.1}%   {:>5.1}%   {:>5.1}%",
        100.0 * f.tempo,
        100.0 * f.corpus_tempo,
        100.0 * f.tempo_chance
    );
}

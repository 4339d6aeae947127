//! The `encore` commands that work on files or talk to a coordinator as a
//! client: pretrain the base policy, sample clips to WAV, check prompt
//! following, benchmark throughput, train reward models, run jobs on a
//! coordinator (`encore job`), export collected preferences. The `encore`
//! binary (package `encore`) adds the commands that host processes
//! (`encore serve`, `encore quickstart`); this crate links no server.
//!
//! Commands that have a configuration read it through `encore-config`:
//! defaults < `--config FILE` section < `ENCORE_<SECTION>__<KEY>` < flags.

use std::path::Path;

use clap::Subcommand;

mod bench;
mod evaluate;
mod job;
pub mod plot;
mod prefs;
mod pretrain;
mod reward;
mod sample;

pub use sample::normalise;

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pretrain the base policy on the procedural corpus.
    Pretrain(pretrain::PretrainArgs),
    /// Generate clips for a prompt and write them as WAV files.
    Sample(sample::SampleArgs),
    /// Check that a policy follows its prompts (instrument, tempo).
    Evaluate(evaluate::EvaluateArgs),
    /// Measure sampling and training throughput against the arithmetic limit.
    Bench(bench::BenchArgs),
    /// Reward models: simulated-rater datasets, training, serving.
    Reward(reward::RewardArgs),
    /// Training jobs on a coordinator: submit, list, get, cancel, watch.
    Job(job::JobArgs),
    /// Collected preferences: export them as a training dataset.
    Prefs(prefs::PrefsArgs),
}

/// Runs a parsed command with the configuration file `config`.
pub fn run(config: Option<&Path>, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Pretrain(args) => pretrain::run(config, args),
        Command::Sample(args) => sample::run(config, args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Reward(args) => reward::run(config, args),
        Command::Job(args) => job::run(args),
        Command::Prefs(args) => prefs::run(args),
    }
}

/// A progress bar that draws on a terminal and stays silent otherwise (logs
/// carry the progress there).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

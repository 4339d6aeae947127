//! The `encore` command line: the whole method on one machine with a report
//! (`encore quickstart`), pretrain the base policy, sample clips to WAV,
//! check prompt following, benchmark throughput, train reward models, run
//! jobs on a coordinator (`encore job`), and run any of the long-running
//! processes (`encore serve`).
//!
//! Commands that have a configuration read it through `encore-config`:
//! defaults < `--config FILE` section < `ENCORE_<SECTION>__<KEY>` < flags.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod bench;
mod evaluate;
mod job;
pub mod local_cluster;
pub mod plot;
mod prefs;
mod pretrain;
mod quickstart;
mod reward;
mod sample;
mod serve;

/// Fine-tune music generation models on human preferences.
#[derive(Debug, Parser)]
#[command(name = "encore", version, about)]
pub struct Cli {
    /// Configuration file (TOML or JSON) with one section per command.
    #[arg(long, global = true, env = "ENCORE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format on stderr: text or json.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: encore_telemetry::LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

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
    /// The whole method on this machine: base policy, simulated raters,
    /// reward models, an RU job on a local cluster, and a report.
    Quickstart(quickstart::QuickstartArgs),
    /// Run a long-running process: coordinator, reward server, actor or
    /// learner rank.
    Serve(serve::ServeArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Pretrain(args) => pretrain::run(config, args),
        Command::Sample(args) => sample::run(config, args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Reward(args) => reward::run(config, args),
        Command::Job(args) => job::run(args),
        Command::Prefs(args) => prefs::run(args),
        Command::Quickstart(args) => quickstart::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

/// A progress bar that draws on a terminal and stays silent otherwise (logs
/// carry the progress there).
fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

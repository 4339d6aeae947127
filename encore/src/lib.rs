//! The `encore` binary: every command of `encore-cli` (jobs, pretraining,
//! sampling, reward models ...) plus the two that host Encore's processes:
//! `encore serve ROLE` runs the coordinator, a reward server, an actor or a
//! learner rank, and `encore quickstart` runs the whole method on one
//! machine, its cluster made of `encore serve` processes, and writes a
//! report. It is the one crate that links both the coordinator and the
//! workers; `encore-cli` and the workers link neither the coordinator nor
//! each other.
//!
//! Commands that have a configuration read it through `encore-config`:
//! defaults < `--config FILE` section < `ENCORE_<SECTION>__<KEY>` < flags.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod local_cluster;
mod quickstart;
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
    /// The commands of `encore-cli`.
    #[command(flatten)]
    Cli(encore_cli::Command),
    /// The whole method on this machine: base policy, simulated raters,
    /// reward models, an RU job on a local cluster, and a report.
    Quickstart(quickstart::QuickstartArgs),
    /// Run a long-running process: coordinator, reward server, actor or
    /// learner rank.
    Serve(serve::ServeArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Cli(command) => encore_cli::run(cli.config.as_deref(), command),
        Command::Quickstart(args) => quickstart::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

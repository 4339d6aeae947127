//! The `encore` command. Parses flags and hands over to the `encore` crate.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // SAFETY: the first statement of `main`; no other thread exists yet.
    unsafe { encore_model::park_idle_cpu_workers() };
    let cli = encore::Cli::parse();
    encore_telemetry::init(cli.log_format, "info");
    encore::run(cli)
}

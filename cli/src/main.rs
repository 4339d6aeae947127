//! The `encore` command. Parses flags and hands over to `encore_cli`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = encore_cli::Cli::parse();
    encore_telemetry::init(cli.log_format, "info");
    encore_cli::run(cli)
}

//! The `encore-coordinator` binary: parses flags and hands over to
//! [`encore_coordinator::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = encore_coordinator::Flags::parse();
    encore_telemetry::init(flags.log_format, "info");
    encore_coordinator::run(flags).await?;
    Ok(())
}

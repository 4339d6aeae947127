//! The `encore-learner` binary: parses flags and hands over to
//! [`encore_learner::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = encore_learner::Flags::parse();
    encore_telemetry::init(flags.log_format, "info");
    encore_learner::run(flags).await?;
    Ok(())
}

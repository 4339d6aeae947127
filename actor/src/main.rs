//! The `encore-actor` binary: parses flags and hands over to
//! [`encore_actor::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = encore_actor::Flags::parse();
    encore_telemetry::init(flags.log_format, "info");
    encore_actor::run(flags).await?;
    Ok(())
}

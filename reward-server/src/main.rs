//! The `encore-reward-server` binary: parses flags and hands over to
//! [`encore_reward_server::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = encore_reward_server::Flags::parse();
    encore_telemetry::init(flags.log_format, "info");
    encore_reward_server::run(flags).await?;
    Ok(())
}

//! The `encore-prefs` binary: parses flags and hands over to
//! [`encore_prefs::server::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = encore_prefs::server::Flags::parse();
    encore_telemetry::init(flags.log_format, "info");
    encore_prefs::server::run(flags).await?;
    Ok(())
}

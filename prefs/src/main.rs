//! The `encore-prefs` binary: parses flags and hands over to
//! [`encore_prefs::server::run`].

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // SAFETY: the first statement of `main`; no other thread exists yet.
    unsafe { encore_model::park_idle_cpu_workers() };
    let flags = encore_prefs::server::Flags::parse();
    encore_telemetry::init(flags.log_format, "info");
    tokio::runtime::Runtime::new()?.block_on(encore_prefs::server::run(flags))?;
    Ok(())
}

//! `encore prefs export`: the comparisons listeners submitted through the
//! preference service, as the JSONL dataset `encore reward train
//! preference` reads.

use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use encore_prefs::export::{Filter, export};
use encore_store::SystemClock;

/// `encore prefs ...`.
#[derive(Debug, Args)]
pub struct PrefsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PrefsCommand,
}

/// The prefs subcommands.
#[derive(Debug, Subcommand)]
pub enum PrefsCommand {
    /// Write stored comparisons as preference records (JSONL).
    Export {
        /// The preference service's store: `embedded://DIR` or `redis://...`.
        #[arg(long, env = "ENCORE_PREFS__STORE")]
        store: String,
        /// Where to write the records.
        #[arg(long)]
        out: PathBuf,
        /// Only comparisons stored at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only comparisons stored before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Only pairs with a clip of this policy version (`N` or `policy@N`).
        #[arg(long)]
        policy_version: Option<String>,
        /// Only pairs whose raters agree at least this much (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        min_agreement: f64,
    },
}

fn millis(flag: &str, value: Option<&str>) -> anyhow::Result<Option<i64>> {
    value
        .map(|v| {
            let t = prost_types::Timestamp::from_str(v)
                .map_err(|e| anyhow::anyhow!("--{flag} {v:?}: not an RFC 3339 time ({e})"))?;
            Ok(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        })
        .transpose()
}

/// Runs `encore prefs ...`.
pub fn run(args: PrefsArgs) -> anyhow::Result<()> {
    let PrefsCommand::Export {
        store,
        out,
        since,
        until,
        policy_version,
        min_agreement,
    } = args.command;
    if !(0.0..=1.0).contains(&min_agreement) {
        anyhow::bail!("--min-agreement {min_agreement}: must be between 0 and 1");
    }
    let filter = Filter {
        since_ms: millis("since", since.as_deref())?,
        until_ms: millis("until", until.as_deref())?,
        policy_version,
        min_agreement,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let exported = runtime.block_on(async {
        let store = encore_store::open(&store, Arc::new(SystemClock))
            .await
            .with_context(|| format!("opening the store {store}"))?;
        let tmp = out.with_extension("jsonl.partial");
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        let exported = export(&*store, &filter, &mut file).await?;
        file.flush()?;
        drop(file);
        std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
        anyhow::Ok(exported)
    })?;
    println!(
        "{}: {} of {} stored comparisons",
        out.display(),
        exported.written,
        exported.read
    );
    Ok(())
}

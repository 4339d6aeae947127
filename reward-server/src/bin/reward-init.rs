//! `reward-init`: writes freshly initialised reward checkpoints, one per
//! kind, into `--out DIR/<kind>` (`adherence/`, `quality/`, `preference/`).
//!
//! They are the real networks at their default size, seeded and untrained:
//! enough to start `encore-reward-server` and exercise the protocol on a
//! fresh clone (as `scripts/python-client.sh` does) without training
//! anything first. Their scores mean nothing; `encore reward train` makes
//! models whose scores do.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Parser;
use encore_reward::{RewardConfig, RewardKind, RewardModel};

/// Writes seeded, untrained reward checkpoints of every kind.
#[derive(Debug, Parser)]
#[command(name = "reward-init")]
struct Args {
    /// Directory to write `<kind>/config.json` and `<kind>/model.safetensors`
    /// into; existing checkpoints there are replaced.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the first kind's weights; each further kind adds one, so the
    /// three models differ.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for (i, kind) in RewardKind::ALL.into_iter().enumerate() {
        let seed = args.seed + i as u64;
        let mut config = RewardConfig::new(kind);
        config.version = format!("untrained-seed-{seed}");
        config.description =
            format!("{kind} reward model, freshly initialised (seed {seed}), untrained");
        let mut model = RewardModel::fresh(config, &Device::Cpu, seed)
            .with_context(|| format!("initialising the {kind} model"))?;
        let dir = args.out.join(kind.name());
        model
            .save(&dir)
            .with_context(|| format!("saving the {kind} model to {}", dir.display()))?;
        println!(
            "{kind:<10} {} parameters, sha256 {}, in {}",
            model.parameters(),
            model.sha256(),
            dir.display()
        );
    }
    Ok(())
}

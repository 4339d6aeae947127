//! `encore pretrain`: fit the base policy on the corpus, then check that it
//! follows its prompts.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use encore_model::pretrain::{PretrainConfig, pretrain};
use encore_model::{Preset, SamplingParams, follow};
use serde::Serialize;

/// Flags of `encore pretrain`; unset ones fall back to the config file,
/// `ENCORE_PRETRAIN__*` variables and then the defaults.
#[derive(Debug, Args, Serialize)]
pub struct PretrainArgs {
    /// Model size: tiny, small, medium, large [default: small].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    preset: Option<Preset>,
    /// Optimiser steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<usize>,
    /// Clips per step.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    learning_rate: Option<f64>,
    /// Steps of linear learning-rate warm-up.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_steps: Option<usize>,
    /// Train the first part of the run on clips cut to this many frames (0: off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    short_frames: Option<usize>,
    /// Fraction of the steps trained on short clips.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    short_fraction: Option<f64>,
    /// Held-out evaluation every N steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_every: Option<usize>,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_every: Option<usize>,
    /// Corpus seed.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    corpus_seed: Option<u64>,
    /// Weight initialisation seed.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    init_seed: Option<u64>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// Checkpoint directory to write.
    #[arg(long, default_value = "runs/base")]
    #[serde(skip)]
    out: PathBuf,
    /// Held-out prompts for the prompt-following check at the end (0: skip).
    #[arg(long, default_value_t = 96)]
    #[serde(skip)]
    follow_prompts: usize,
}

pub fn run(config: Option<&Path>, args: PretrainArgs) -> anyhow::Result<()> {
    let cfg: PretrainConfig = encore_config::load("pretrain", config, &args)?;
    cfg.validate()?;
    let policy_cfg = cfg.preset.config();
    tracing::info!(
        preset = cfg.preset.name(),
        parameters = policy_cfg.parameter_count(),
        steps = cfg.steps,
        batch_size = cfg.batch_size,
        out = %args.out.display(),
        "pretraining the base policy"
    );

    let bar = crate::progress_bar(cfg.steps as u64, "pretrain");
    let mut curve = Vec::new();
    let report = pretrain(&cfg, &args.out, |p| {
        bar.set_position(p.step as u64);
        bar.set_message(format!(
            "loss {:.3} | {:.0} tok/s{}",
            p.loss,
            p.tokens_per_second,
            p.eval_loss
                .map(|l| format!(" | eval {l:.3}"))
                .unwrap_or_default()
        ));
        curve.push((p.step, p.loss, p.eval_loss));
        if let Some(eval) = p.eval_loss {
            tracing::info!(
                step = p.step,
                loss = p.loss,
                eval_loss = eval,
                tokens_per_second = p.tokens_per_second,
                "eval"
            );
        }
    })?;
    bar.finish_and_clear();
    println!(
        "pretrained {} steps in {:.0}s ({:.0} tokens/s): held-out loss {:.3} nats/token, unigram baseline {:.3}",
        report.steps,
        report.seconds,
        report.tokens_per_second,
        report.final_eval_loss,
        report.unigram_entropy
    );

    let follow_report = if args.follow_prompts > 0 {
        let device = encore_model::device(&cfg.device)?;
        let (policy, _) = encore_model::load_frozen(&args.out, &device)?;
        let f = follow::prompt_following(
            &policy,
            args.follow_prompts,
            1,
            32,
            &SamplingParams::default(),
        )?;
        crate::evaluate::print_follow(&f);
        Some(f)
    } else {
        None
    };

    write_curve(&args.out.join("loss.csv"), &curve)?;
    let summary =
        serde_json::json!({ "config": cfg, "report": report, "prompt_following": follow_report });
    std::fs::write(
        args.out.join("pretrain_report.json"),
        serde_json::to_vec_pretty(&summary)?,
    )
    .with_context(|| {
        format!(
            "writing {}",
            args.out.join("pretrain_report.json").display()
        )
    })?;
    println!("checkpoint: {}", args.out.display());
    Ok(())
}

fn write_curve(path: &Path, curve: &[(usize, f64, Option<f64>)]) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    writeln!(f, "step,train_loss,eval_loss")?;
    for (step, loss, eval) in curve {
        writeln!(
            f,
            "{step},{loss},{}",
            eval.map(|e| e.to_string()).unwrap_or_default()
        )?;
    }
    Ok(())
}

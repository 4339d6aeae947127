//! `encore bench`: sampling and training throughput next to the arithmetic
//! limit of this machine.

use clap::Args;
use encore_model::bench::{self, BenchRow};
use encore_model::{Preset, TrainablePolicy};

/// Flags of `encore bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model size.
    #[arg(long, default_value = "small")]
    preset: Preset,
    /// Sampling batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Tokens per sampled clip [default: the preset's clip length].
    #[arg(long)]
    frames: Option<usize>,
    /// Training batch size.
    #[arg(long, default_value_t = 16)]
    train_batch: usize,
    /// Training steps to time.
    #[arg(long, default_value_t = 5)]
    train_steps: usize,
    /// Side of the square matmul that measures the device's rate.
    #[arg(long, default_value_t = 1024)]
    matmul_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the rows as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = encore_model::device(&args.device)?;
    let cfg = args.preset.config();
    let frames = args.frames.unwrap_or(cfg.max_frames).min(cfg.max_frames);
    let rate = bench::matmul_flops(&device, args.matmul_size, 5)?;
    let model = TrainablePolicy::fresh(&cfg, &device, 0)?;
    let mut rows = bench::sampling(&model.frozen()?, &args.batches, frames, rate)?;
    rows.push(bench::training(
        &cfg,
        &device,
        args.train_batch,
        frames,
        args.train_steps,
        rate,
    )?);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "preset": args.preset.name(), "device": args.device, "matmul_flops": rate, "rows": rows,
            }))?
        );
        return Ok(());
    }
    println!(
        "preset {} ({:.2} M parameters, {} frames) on {}; candle matmul {}x{}: {:.1} GFLOP/s",
        args.preset.name(),
        cfg.parameter_count() as f64 / 1e6,
        frames,
        args.device,
        args.matmul_size,
        args.matmul_size,
        rate / 1e9
    );
    print_table(&rows);
    Ok(())
}

fn print_table(rows: &[BenchRow]) {
    println!("| work   | batch | tokens/s  | MFLOP/token | limit tokens/s | of limit |");
    println!("|--------|------:|----------:|------------:|---------------:|---------:|");
    for r in rows {
        println!(
            "| {:<6} | {:>5} | {:>9.0} | {:>11.2} | {:>14.0} | {:>7.1}% |",
            r.work,
            r.batch,
            r.tokens_per_second,
            r.flops_per_token / 1e6,
            r.limit_tokens_per_second,
            100.0 * r.utilisation()
        );
    }
}

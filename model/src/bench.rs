//! Throughput of the policy next to the machine's arithmetic limit, for
//! `encore bench`.
//!
//! The limit is the model's matrix-multiply FLOPs per token divided by the
//! rate candle itself reaches on a large square matrix multiply on this
//! device: a token rate no implementation could beat with candle's kernels.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::{ModelError, Policy, PolicyConfig, SamplingParams, embed_captions, sample};

/// One line of the benchmark table.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// `sample` or `train`.
    pub work: &'static str,
    /// Clips per batch.
    pub batch: usize,
    /// Measured tokens per second.
    pub tokens_per_second: f64,
    /// Matrix-multiply FLOPs the work costs per token.
    pub flops_per_token: f64,
    /// Tokens per second at the measured matmul rate: the arithmetic limit.
    pub limit_tokens_per_second: f64,
}

impl BenchRow {
    /// Fraction of the arithmetic limit reached.
    pub fn utilisation(&self) -> f64 {
        self.tokens_per_second / self.limit_tokens_per_second
    }
}

/// Best-of-`repeats` rate of an `n x n` by `n x n` f32 matrix multiply, in
/// FLOP/s.
pub fn matmul_flops(device: &Device, n: usize, repeats: usize) -> Result<f64, ModelError> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let mut best = f64::INFINITY;
    a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?; // warm-up
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best)
}

/// Sampling throughput of `policy` for `frames`-token clips at each batch size.
pub fn sampling(
    policy: &Policy,
    batches: &[usize],
    frames: usize,
    matmul_rate: f64,
) -> Result<Vec<BenchRow>, ModelError> {
    let cfg = policy.config();
    let flops = average_forward_flops(cfg, frames);
    let mut rows = Vec::new();
    for &batch in batches {
        let captions = vec!["an upbeat flute melody in D major"; batch];
        let text = embed_captions(&captions, policy.device())?;
        sample(policy, &text, frames.min(8), &SamplingParams::default())?; // warm-up
        let start = Instant::now();
        sample(
            policy,
            &text,
            frames,
            &SamplingParams {
                seed: 1,
                ..Default::default()
            },
        )?;
        let tps = (batch * frames) as f64 / start.elapsed().as_secs_f64();
        rows.push(BenchRow {
            work: "sample",
            batch,
            tokens_per_second: tps,
            flops_per_token: flops,
            limit_tokens_per_second: matmul_rate / flops,
        });
    }
    Ok(rows)
}

/// Training throughput (forward, backward, optimiser step) at `batch` clips of
/// `frames` tokens, averaged over `steps` steps.
pub fn training(
    cfg: &PolicyConfig,
    device: &Device,
    batch: usize,
    frames: usize,
    steps: usize,
    matmul_rate: f64,
) -> Result<BenchRow, ModelError> {
    use candle_nn::Optimizer;

    let model = crate::TrainablePolicy::fresh(cfg, device, 0)?;
    let mut opt = candle_nn::AdamW::new_lr(model.vars.all_vars(), 1e-4)?;
    let ids: Vec<u32> = (0..batch * frames)
        .map(|i| 3 + (i * 7919 % 700) as u32)
        .collect();
    let tokens = Tensor::from_vec(ids, (batch, frames), device)?;
    let text = embed_captions(&vec!["a calm piano piece"; batch], device)?;
    let mut run = || -> Result<(), ModelError> {
        let loss = model.policy.loss(&tokens, &text)?;
        opt.step(&loss.backward()?)?;
        Ok(())
    };
    run()?; // warm-up
    let start = Instant::now();
    for _ in 0..steps.max(1) {
        run()?;
    }
    device.synchronize()?;
    let tps = (steps.max(1) * batch * frames) as f64 / start.elapsed().as_secs_f64();
    let flops = 3.0 * average_forward_flops(cfg, frames);
    Ok(BenchRow {
        work: "train",
        batch,
        tokens_per_second: tps,
        flops_per_token: flops,
        limit_tokens_per_second: matmul_rate / flops,
    })
}

/// Forward FLOPs per token averaged over a clip of `frames` tokens.
fn average_forward_flops(cfg: &PolicyConfig, frames: usize) -> f64 {
    let context = cfg.n_prefix + 1 + frames / 2;
    cfg.forward_flops_per_token(context)
}

//! `reward-load`: a load test of the reward server with and without dynamic
//! batching.
//!
//! For each mode it starts an in-process server hosting one model of each
//! kind (loaded from `--models-dir`, or freshly initialised at the default
//! size), drives it with `--clients` concurrent callers for `--duration-s`,
//! each sending one corpus clip per request to every model, and prints a
//! side-by-side table: requests/s, p50 and p99 latency, and the mean batch
//! size the server formed. `--profile` adds where a forward pass spends
//! its time (audio front end vs network) at batch sizes 1, 8 and 64.
//!
//! Run it optimised: `cargo run --release -p encore-reward-server --bin reward-load`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use clap::Parser;
use encore_proto::v1::reward_service_client::RewardServiceClient;
use encore_proto::v1::{ScoreItem, ScoreRequest};
use encore_reward::{RewardConfig, RewardKind, RewardModel, ScoreInput};
use encore_reward_server::{Config, ServerBuilder};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Load test of the reward server: dynamic batching against none.
#[derive(Debug, Parser)]
#[command(name = "reward-load")]
struct Args {
    /// Seconds each mode is driven for.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Concurrent callers, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Tokens per clip (25 per second of audio).
    #[arg(long, default_value_t = 100)]
    frames: usize,
    /// Directory with `adherence/`, `quality/` and `preference/`
    /// checkpoints; without it, fresh models of the default size are used.
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Batch size limit of the batching mode.
    #[arg(long, default_value_t = 64)]
    max_batch_items: usize,
    /// Batching window of the batching mode, in milliseconds.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also time the front end and the network of each model at batch
    /// sizes 1, 8 and 64.
    #[arg(long)]
    profile: bool,
    /// Only run the profile.
    #[arg(long)]
    profile_only: bool,
}

/// What one mode measured.
struct Outcome {
    mode: String,
    requests: usize,
    errors: usize,
    seconds: f64,
    latencies_ms: Vec<f64>,
    mean_batch: f64,
    mean_pass_ms: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    encore_telemetry::init(encore_telemetry::LogFormat::Text, "warn");
    let device = encore_model::device(&args.device)?;
    let clips = Arc::new(encore_reward_server::corpus_items(
        2024,
        args.frames,
        0,
        512,
    ));

    if args.profile || args.profile_only {
        profile(&args, &device, &clips)?;
        if args.profile_only {
            return Ok(());
        }
    }

    let modes = [
        (
            format!(
                "batching ({} items, {} ms)",
                args.max_batch_items, args.max_wait_ms
            ),
            args.max_batch_items,
            args.max_wait_ms,
        ),
        ("no batching (1 item)".to_owned(), 1, 0),
    ];
    let mut outcomes = Vec::new();
    for (mode, max_batch_items, max_wait_ms) in modes {
        eprintln!("driving: {mode}");
        let config = Config {
            listen: "127.0.0.1:0".parse()?,
            admin: "127.0.0.1:0".parse()?,
            max_batch_items,
            max_wait_ms,
            // Every caller's request fits, so nothing is refused.
            queue_capacity: 4 * args.clients.max(256),
            device: args.device.clone(),
            ..Config::default()
        };
        let registry = Registry::new();
        let mut builder = ServerBuilder::new(config).registry(registry.clone());
        for (name, model) in models(&args, &device)? {
            builder = builder.model(name, model);
        }
        let shutdown = CancellationToken::new();
        let server = builder.start(shutdown.clone()).await?;
        let channel = Channel::from_shared(format!("http://{}", server.grpc_addr()))?
            .connect()
            .await?;
        let mut outcome = drive(&args, channel, clips.clone()).await;
        outcome.mode = mode;
        (outcome.mean_batch, outcome.mean_pass_ms) = batch_figures(&registry);
        shutdown.cancel();
        server.wait().await?;
        outcomes.push(outcome);
    }
    print_table(&args, &outcomes);
    Ok(())
}

/// One model per kind, named after the kind.
fn models(args: &Args, device: &Device) -> anyhow::Result<Vec<(String, RewardModel)>> {
    RewardKind::ALL
        .into_iter()
        .enumerate()
        .map(|(seed, kind)| {
            let model = match &args.models_dir {
                Some(dir) => {
                    let path = dir.join(kind.name());
                    RewardModel::load(&path, device)
                        .with_context(|| format!("loading {}", path.display()))?
                }
                None => RewardModel::fresh(RewardConfig::new(kind), device, seed as u64)?,
            };
            Ok((kind.name().to_owned(), model))
        })
        .collect()
}

/// Runs the callers for the configured duration (after a short warm-up).
async fn drive(args: &Args, channel: Channel, clips: Arc<Vec<ScoreItem>>) -> Outcome {
    let client = RewardServiceClient::new(channel);
    // Warm-up: first-touch allocations and thread pools.
    for item in clips.iter().take(4) {
        let request = ScoreRequest {
            items: vec![item.clone()],
            models: Vec::new(),
        };
        let _ = client.clone().score(request).await;
    }
    let duration = Duration::from_secs_f64(args.duration_s);
    let started = Instant::now();
    let end = started + duration;
    let tasks: Vec<_> = (0..args.clients)
        .map(|c| {
            let mut client = client.clone();
            let clips = clips.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0;
                let mut i = c;
                while Instant::now() < end {
                    let request = ScoreRequest {
                        items: vec![clips[i % clips.len()].clone()],
                        models: Vec::new(),
                    };
                    i += 7;
                    let sent = Instant::now();
                    match client.score(request).await {
                        Ok(_) => latencies.push(sent.elapsed().as_secs_f64() * 1e3),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    let mut errors = 0;
    for task in tasks {
        if let Ok((l, e)) = task.await {
            latencies_ms.extend(l);
            errors += e;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Outcome {
        mode: String::new(),
        requests: latencies_ms.len(),
        errors,
        seconds,
        latencies_ms,
        mean_batch: 0.0,
        mean_pass_ms: 0.0,
    }
}

/// Mean items per forward pass and mean time of a pass, over all models,
/// from the server's histograms.
fn batch_figures(registry: &Registry) -> (f64, f64) {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_default();
    let total = |prefix: &str| -> f64 {
        text.lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let passes = total("encore_reward_batch_size_items_count");
    let items = total("encore_reward_batch_size_items_sum");
    let seconds = total("encore_reward_batch_seconds_sum");
    if passes == 0.0 {
        return (0.0, 0.0);
    }
    (items / passes, seconds / passes * 1e3)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn print_table(args: &Args, outcomes: &[Outcome]) {
    println!(
        "\n{} clients, one {}-token clip per request, scored by 3 models (adherence, quality, preference), {} s per mode, device {}",
        args.clients, args.frames, args.duration_s, args.device
    );
    println!(
        "{:<28} {:>10} {:>9} {:>9} {:>11} {:>13} {:>7}",
        "mode", "requests/s", "p50 ms", "p99 ms", "mean batch", "ms per pass", "errors"
    );
    for o in outcomes {
        println!(
            "{:<28} {:>10.1} {:>9.1} {:>9.1} {:>11.1} {:>13.2} {:>7}",
            o.mode,
            o.requests as f64 / o.seconds,
            percentile(&o.latencies_ms, 50.0),
            percentile(&o.latencies_ms, 99.0),
            o.mean_batch,
            o.mean_pass_ms,
            o.errors
        );
    }
}

/// Times the two halves of a forward pass per model at batch sizes 1, 8
/// and 64: the audio front end (codec render + log-mel, in parallel over clips)
/// and everything else (the network, caption features).
fn profile(args: &Args, device: &Device, clips: &[ScoreItem]) -> anyhow::Result<()> {
    println!(
        "\nwhere a forward pass goes ({}-token clips, per clip, median of repeats)",
        args.frames
    );
    println!(
        "{:<12} {:>6} {:>14} {:>14} {:>14}",
        "model", "batch", "front end ms", "network ms", "total ms"
    );
    for (name, model) in models(args, device)? {
        for batch in [1usize, 8, 64] {
            let items = &clips[..batch.min(clips.len())];
            let inputs: Vec<ScoreInput<'_>> = items
                .iter()
                .map(|i| ScoreInput::tokens(&i.caption, &i.tokens))
                .collect();
            let tokens: Vec<&[u32]> = items.iter().map(|i| i.tokens.as_slice()).collect();
            let repeats = (320 / batch).clamp(5, 50);
            let mut front = Vec::new();
            let mut total = Vec::new();
            for _ in 0..repeats {
                let t = Instant::now();
                model.frontend().batch(&tokens)?;
                front.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                model.score(&inputs)?;
                total.push(t.elapsed().as_secs_f64());
            }
            front.sort_by(f64::total_cmp);
            total.sort_by(f64::total_cmp);
            let per = |v: &[f64]| v[v.len() / 2] * 1e3 / batch as f64;
            println!(
                "{:<12} {:>6} {:>14.3} {:>14.3} {:>14.3}",
                name,
                batch,
                per(&front),
                per(&total) - per(&front),
                per(&total)
            );
        }
    }
    Ok(())
}

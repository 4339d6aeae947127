//! `reward-score`: a command-line client of `encore.v1.RewardService`.
//!
//! Reads items from a JSON Lines file, one `{"caption": "...", "tokens":
//! [...]}` per line (with `"codebooks": K` for a MusicGen policy's EnCodec
//! codes, `tokens` row-major `[K][frames]`), sends them in one Score request and prints the scores
//! as JSON on stdout:
//!
//! ```text
//! {"scores": {"<model>": [one score per item, in file order]}, "model_sha256": {"<model>": "..."}}
//! ```
//!
//! `scripts/python-client.sh` compares this output with that of a Python
//! client generated from `proto/`, to show that the protocol, not the Rust
//! bindings, defines what a client gets. `--write-example-items N` writes N
//! corpus clips to the items file instead, so that both clients read the
//! same input.
//!
//! A failed call exits non-zero with the gRPC code, the message, and the
//! `ErrorInfo` and `BadRequest` details the server attached.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use encore_proto::v1::reward_service_client::RewardServiceClient;
use encore_proto::v1::{ScoreItem, ScoreRequest};
use serde::{Deserialize, Serialize};
use tonic_types::StatusExt;

/// Scores a JSON Lines file of items on a reward server.
#[derive(Debug, Parser)]
#[command(name = "reward-score")]
struct Args {
    /// JSON Lines file of items: `{"caption": "...", "tokens": [...]}`.
    #[arg(long)]
    items: PathBuf,
    /// The reward server's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50061")]
    url: String,
    /// Models to score with, comma-separated; every hosted model if unset.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Deadline of the call, in seconds (sent as `grpc-timeout`).
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
    /// Instead of scoring, write N corpus clips to `--items` and exit.
    #[arg(long, value_name = "N")]
    write_example_items: Option<usize>,
    /// Tokens per example clip (25 per second of audio).
    #[arg(long, default_value_t = 100)]
    frames: usize,
    /// Corpus seed of the example clips.
    #[arg(long, default_value_t = 2024)]
    seed: u64,
}

/// One line of the items file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    caption: String,
    tokens: Vec<u32>,
    /// EnCodec codebooks in `tokens` (0 or absent: the embedded codec's
    /// tokens).
    #[serde(default, skip_serializing_if = "is_zero")]
    codebooks: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What is printed: scores by model, each in item order.
#[derive(Debug, Serialize)]
struct Output {
    scores: BTreeMap<String, Vec<f64>>,
    model_sha256: BTreeMap<String, String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line (`{:#}`), without the backtrace
            // anyhow's Debug form adds under RUST_BACKTRACE.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(n) = args.write_example_items {
        write_examples(&args.items, n, args.frames, args.seed)?;
        eprintln!(
            "wrote {n} clips of {} tokens to {}",
            args.frames,
            args.items.display()
        );
        return Ok(());
    }

    let items = read_items(&args.items)?;
    let mut client = RewardServiceClient::connect(args.url.clone())
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let n = items.len();
    let mut request = tonic::Request::new(ScoreRequest {
        items,
        models: args.models.clone(),
    });
    request.set_timeout(Duration::from_secs_f64(args.timeout_s));
    let response = match client.score(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => bail!("Score failed: {}", describe(&status)),
    };

    if response.results.len() != n {
        bail!(
            "the server answered {} results for {n} items",
            response.results.len()
        );
    }
    let mut scores = BTreeMap::new();
    for model in response.model_sha256.keys() {
        let values = response
            .results
            .iter()
            .enumerate()
            .map(|(i, result)| {
                result
                    .scores
                    .get(model)
                    .map(|score| score.value)
                    .with_context(|| format!("item {i} has no score from model {model:?}"))
            })
            .collect::<anyhow::Result<Vec<f64>>>()?;
        scores.insert(model.clone(), values);
    }
    let output = Output {
        scores,
        model_sha256: response.model_sha256.into_iter().collect(),
    };
    println!("{}", serde_json::to_string(&output)?);
    Ok(())
}

/// The code, message and rich details of a failed call, on one line each.
fn describe(status: &tonic::Status) -> String {
    let mut text = format!("code {:?}: {}", status.code(), status.message());
    let details = status.get_error_details();
    if let Some(info) = details.error_info() {
        text.push_str(&format!(
            "\n  ErrorInfo: reason {} domain {}",
            info.reason, info.domain
        ));
    }
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            text.push_str(&format!(
                "\n  BadRequest: {} ({}): {}",
                v.field, v.reason, v.description
            ));
        }
    }
    text
}

fn read_items(path: &Path) -> anyhow::Result<Vec<ScoreItem>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut items = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let item: Item = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not an item", path.display(), i + 1))?;
        items.push(ScoreItem {
            caption: item.caption,
            tokens: item.tokens,
            codebooks: item.codebooks,
        });
    }
    if items.is_empty() {
        bail!("{} holds no items", path.display());
    }
    Ok(items)
}

/// Writes `n` evaluation clips of the synthetic corpus, one JSON object a
/// line.
fn write_examples(path: &Path, n: usize, frames: usize, seed: u64) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for ex in encore_reward_server::corpus_items(seed, frames, 0, n) {
        let item = Item {
            caption: ex.caption,
            tokens: ex.tokens,
            codebooks: ex.codebooks,
        };
        serde_json::to_writer(&mut out, &item)?;
        out.write_all(b"\n")?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

//! Where a reward model's time goes, per clip of 100 tokens (4 s): the
//! audio front end, one training step, and the network at several batch
//! sizes. `cargo run --release -p encore-reward --example train_speed`.

use std::time::Instant;

use candle_core::Device;
use encore_corpus::{Corpus, Split};
use encore_reward::{Features, RewardConfig, RewardKind, RewardModel, ScoreInput};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let corpus = Corpus::new(0, 100);
    let examples = corpus.batch(Split::Train, 0, 64);
    let items: Vec<ScoreInput> = examples
        .iter()
        .map(|e| ScoreInput::tokens(&e.caption, &e.tokens))
        .collect();
    let clips: Vec<&[u32]> = examples.iter().map(|e| e.tokens.as_slice()).collect();
    let captions: Vec<&str> = examples.iter().map(|e| e.caption.as_str()).collect();
    println!("ms per clip      features   train step   network at batch 1 / 4 / 8 / 16 / 64");
    for kind in RewardKind::ALL {
        let model = RewardModel::fresh(RewardConfig::new(kind), &Device::Cpu, 0)?;
        let t = Instant::now();
        let rows = model.frontend().clips(&clips)?;
        let fe = t.elapsed().as_secs_f64() / 64.0;
        let all = Features::stack(
            &rows.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            model.frontend().width(),
        );
        let t = Instant::now();
        let reps = 3;
        for _ in 0..reps {
            let s = model.score_features(&all, &captions)?;
            let _ = s.sum_all()?.backward()?;
        }
        let step = t.elapsed().as_secs_f64() / (reps * 64) as f64;
        let mut net = Vec::new();
        for chunk in [1usize, 4, 8, 16, 64] {
            let t = Instant::now();
            for _ in 0..reps {
                for (c, r) in items.chunks(chunk).zip(rows.chunks(chunk)) {
                    let f = Features::stack(
                        &r.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                        model.frontend().width(),
                    );
                    let caps: Vec<&str> = c.iter().map(|i| i.caption).collect();
                    model.score_features(&f, &caps)?;
                }
            }
            net.push(t.elapsed().as_secs_f64() / (reps * 64) as f64);
        }
        let net: Vec<String> = net.iter().map(|s| format!("{:.2}", 1e3 * s)).collect();
        println!(
            "{kind:>10}      {:>6.2}      {:>6.2}      {}",
            1e3 * fe,
            1e3 * step,
            net.join(" / ")
        );
    }
    Ok(())
}

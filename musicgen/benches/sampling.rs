//! MusicGen sampling throughput: codes per second from a checkpoint
//! directory, at each batch size, with guidance and top-k as MusicGen's own
//! generation config sets them. `scripts/musicgen-bench.sh` runs it next to
//! transformers' `generate` on the same weights and prints the ratio.
//!
//! cargo bench -p encore-musicgen --bench sampling -- DIR [--batches 1,8,32]
//!     [--frames 50] [--repeats 1]
//!
//! Prints one tab-separated line per batch size: batch, frames, seconds to
//! sample (text encoding included), codes/s, seconds to decode the audio.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use encore_model::SamplingParams;
use encore_musicgen::{GenerateParams, Musicgen};

fn main() {
    // As Encore's binaries run: candle's idle element-wise workers sleep.
    // SAFETY: the first statement of `main`; no other thread exists yet.
    unsafe { encore_model::park_idle_cpu_workers() };
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut dir = None;
    let (mut batches, mut frames, mut repeats) = (vec![1usize, 8, 32], 50usize, 1usize);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--batches" => {
                batches = value()
                    .split(',')
                    .map(|b| b.parse().expect("--batches: integers"))
                    .collect()
            }
            "--frames" => frames = value().parse().expect("--frames: an integer"),
            "--repeats" => repeats = value().parse().expect("--repeats: an integer"),
            _ if dir.is_none() => dir = Some(PathBuf::from(&a)),
            _ => panic!("unknown argument {a}"),
        }
    }
    let Some(dir) = dir else {
        eprintln!("usage: sampling CHECKPOINT_DIR [--batches 1,8,32] [--frames 50] [--repeats 1]");
        return;
    };
    let model = Musicgen::load(&dir, &Device::Cpu).expect("checkpoint loads");
    let params = GenerateParams {
        sampling: SamplingParams {
            top_k: Some(250),
            ..Default::default()
        },
        guidance_scale: 3.0,
    };
    let k = model.codebooks();
    println!("batch\tframes\tsample_s\tcodes_per_s\tdecode_s");
    for &b in &batches {
        // The same token ids as the script gives transformers.
        let ids: Vec<Vec<u32>> = (0..b).map(|i| vec![3 + (i % 5) as u32, 4, 5, 1]).collect();
        let mut best = f64::INFINITY;
        let mut decode = f64::INFINITY;
        for r in 0..repeats {
            let start = Instant::now();
            let cond = model.condition_ids(&ids).expect("condition");
            let mut run = params.clone();
            run.sampling.seed = r as u64;
            let out = model.generate(&cond, frames, &run).expect("generate");
            best = best.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            model.decode_audio(&out.codes).expect("decode");
            decode = decode.min(start.elapsed().as_secs_f64());
        }
        let codes = (b * k * frames) as f64;
        println!("{b}\t{frames}\t{best:.3}\t{:.1}\t{decode:.3}", codes / best);
    }
}

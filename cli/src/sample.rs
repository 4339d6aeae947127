//! `encore sample`: generate clips for a prompt and write them as WAV files.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use encore_model::{SamplingParams, embed_captions, sample};
use serde::{Deserialize, Serialize};

/// The `[sample]` configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// Clip length in seconds (at most the checkpoint's clip length).
    pub seconds: Option<f32>,
    /// Sampler settings.
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold.
    pub top_p: Option<f32>,
    /// Sampler seed.
    pub seed: u64,
    /// Number of clips.
    pub count: usize,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// Classifier-free guidance scale of a MusicGen checkpoint (none: its
    /// generation_config.json's, 3.0 in Meta's releases).
    pub guidance_scale: Option<f64>,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            seconds: None,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 0,
            count: 1,
            device: "cpu".into(),
            guidance_scale: None,
        }
    }
}

/// Flags of `encore sample`.
#[derive(Debug, Args, Serialize)]
pub struct SampleArgs {
    /// Checkpoint directory: from `encore pretrain` or a fine-tuning job, or
    /// a Hugging Face MusicGen directory (config.json, model.safetensors,
    /// tokenizer.json) such as a downloaded facebook/musicgen-small.
    #[arg(long)]
    #[serde(skip)]
    checkpoint: PathBuf,
    /// What the music should be, e.g. "a nostalgic tune played by accordion".
    #[arg(long)]
    #[serde(skip)]
    prompt: String,
    /// WAV file to write; with --count N > 1, clips go to NAME-1.wav ... NAME-N.wav.
    #[arg(long, default_value = "clip.wav")]
    #[serde(skip)]
    out: PathBuf,
    /// Clip length in seconds [default: the checkpoint's clip length].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<f32>,
    /// Softmax temperature.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    /// Sampler seed.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Number of clips.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// MusicGen only: classifier-free guidance scale (1 turns it off)
    /// [default: the checkpoint's generation_config.json].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    guidance_scale: Option<f64>,
}

pub fn run(config: Option<&Path>, args: SampleArgs) -> anyhow::Result<()> {
    let cfg: SampleConfig = encore_config::load("sample", config, &args)?;
    if cfg.count == 0 {
        anyhow::bail!("count: must be at least 1");
    }
    let device = encore_model::device(&cfg.device)?;
    let architecture = encore_policies::Architecture::of_checkpoint(&args.checkpoint)?;
    if architecture == encore_policies::Architecture::Musicgen {
        return sample_musicgen(&cfg, &args, &device);
    }
    let (policy, _) = encore_model::load_frozen(&args.checkpoint, &device)
        .with_context(|| format!("loading checkpoint {}", args.checkpoint.display()))?;
    let max = policy.config().max_frames;
    let frames = match cfg.seconds {
        None => max,
        Some(s) if s.is_finite() && s > 0.0 => {
            ((s * encore_codec::FRAME_RATE as f32).round() as usize).clamp(1, max)
        }
        Some(s) => anyhow::bail!("seconds: must be a positive number, got {s}"),
    };
    let params = SamplingParams {
        temperature: cfg.temperature,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
        seed: cfg.seed,
    };
    let text = embed_captions(&vec![args.prompt.as_str(); cfg.count], &device)?;
    let started = std::time::Instant::now();
    let samples = sample(&policy, &text, frames, &params)?;
    tracing::info!(
        clips = cfg.count,
        frames,
        seconds = started.elapsed().as_secs_f64(),
        "sampled"
    );

    for (i, tokens) in samples.tokens.iter().enumerate() {
        let path = if cfg.count == 1 {
            args.out.clone()
        } else {
            numbered(&args.out, i + 1)
        };
        let audio = normalise(encore_codec::render(tokens)?);
        encore_codec::write_wav(&path, &audio)?;
        let a = encore_corpus::analysis::analyze(tokens);
        println!(
            "{}: {:.1}s, {:.1} log-prob/token, heard as {} at {}",
            path.display(),
            frames as f32 / encore_codec::FRAME_RATE as f32,
            samples.log_probs[i].iter().sum::<f32>() / frames as f32,
            a.instrument
                .map(|x| x.name().to_string())
                .unwrap_or_else(|| "silence".into()),
            a.tempo
                .map(|t| format!("{:.0} bpm", t.bpm()))
                .unwrap_or_else(|| "no clear tempo".into()),
        );
    }
    Ok(())
}

/// MusicGen clips from a Hugging Face checkpoint directory: 10 s unless
/// `seconds` says otherwise, written at the codec's sample rate.
fn sample_musicgen(
    cfg: &SampleConfig,
    args: &SampleArgs,
    device: &candle_core::Device,
) -> anyhow::Result<()> {
    use encore_musicgen::{GenerateParams, Musicgen};
    let started = std::time::Instant::now();
    let model = Musicgen::load(&args.checkpoint, device)
        .with_context(|| format!("loading MusicGen checkpoint {}", args.checkpoint.display()))?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "loaded");
    let d = &model.config().decoder;
    let max = d
        .max_position_embeddings
        .saturating_sub(d.num_codebooks)
        .max(1);
    let rate = model.frame_rate() as f32;
    let frames = match cfg.seconds {
        None => ((10.0 * rate) as usize).min(max),
        Some(s) if s.is_finite() && s > 0.0 => ((s * rate).round() as usize).clamp(1, max),
        Some(s) => anyhow::bail!("seconds: must be a positive number, got {s}"),
    };
    let guidance_scale = cfg
        .guidance_scale
        .unwrap_or_else(|| encore_policies::checkpoint_guidance(&args.checkpoint));
    if !(guidance_scale.is_finite() && guidance_scale >= 0.0) {
        anyhow::bail!("guidance_scale: must be a non-negative number, got {guidance_scale}");
    }
    let params = GenerateParams {
        sampling: SamplingParams {
            temperature: cfg.temperature,
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            seed: cfg.seed,
        },
        guidance_scale,
    };
    let cond = model.condition(&vec![args.prompt.as_str(); cfg.count])?;
    let started = std::time::Instant::now();
    let out = model.generate(&cond, frames, &params)?;
    tracing::info!(
        clips = cfg.count,
        frames,
        seconds = started.elapsed().as_secs_f64(),
        "sampled"
    );
    let audio = model.decode_audio(&out.codes)?;
    for (i, clip) in audio.into_iter().enumerate() {
        let path = if cfg.count == 1 {
            args.out.clone()
        } else {
            numbered(&args.out, i + 1)
        };
        encore_codec::write_wav_at(&path, &normalise(clip), model.sample_rate())?;
        let steps = out.log_probs[i].len().max(1);
        println!(
            "{}: {:.1}s at {} Hz, {:.2} log-prob/step (guidance {guidance_scale})",
            path.display(),
            frames as f32 / rate,
            model.sample_rate(),
            out.log_probs[i].iter().sum::<f32>() / steps as f32,
        );
    }
    Ok(())
}

/// Scales a clip so its peak sits at -1 dBFS. The codec leaves headroom for
/// loud notes, which makes single clips quiet to listen to; reward models
/// score the codec's own levels, so only files written for people are scaled.
pub fn normalise(mut audio: Vec<f32>) -> Vec<f32> {
    let peak = audio.iter().fold(0f32, |m, x| m.max(x.abs()));
    if peak > 1e-6 {
        let gain = 0.89 / peak;
        audio.iter_mut().for_each(|x| *x *= gain);
    }
    audio
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "clip".into());
    path.with_file_name(format!("{stem}-{n}.wav"))
}

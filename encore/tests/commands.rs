//! The `encore` commands end to end through the library: pretrain a few
//! steps of the tiny preset, sample a WAV from the checkpoint, evaluate it.

use clap::Parser;
use encore::{Cli, run};

fn encore(args: &[&str]) -> anyhow::Result<()> {
    let argv: Vec<&str> = std::iter::once("encore")
        .chain(args.iter().copied())
        .collect();
    run(Cli::try_parse_from(argv)?)
}

#[test]
fn pretrain_then_sample_writes_a_checkpoint_and_audio() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("base");
    let config = dir.path().join("encore.toml");
    // The file sets the step count; the flag overrides its learning rate.
    std::fs::write(
        &config,
        "[pretrain]\nsteps = 4\neval_every = 2\nbatch_size = 4\nlearning_rate = 1.0\n",
    )
    .unwrap();
    encore(&[
        "--config",
        config.to_str().unwrap(),
        "pretrain",
        "--preset",
        "tiny",
        "--learning-rate",
        "0.003",
        "--follow-prompts",
        "4",
        "--out",
        ckpt.to_str().unwrap(),
    ])
    .unwrap();
    for file in [
        "model.safetensors",
        "config.json",
        "loss.csv",
        "pretrain_report.json",
    ] {
        assert!(ckpt.join(file).exists(), "{file} missing");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("pretrain_report.json")).unwrap()).unwrap();
    assert_eq!(report["config"]["steps"], 4);
    assert_eq!(report["config"]["learning_rate"], 0.003);
    assert_eq!(report["prompt_following"]["prompts"], 4);
    let csv = std::fs::read_to_string(ckpt.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");

    let wav = dir.path().join("clip.wav");
    encore(&[
        "sample",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--prompt",
        "a calm piano piece",
        "--seconds",
        "1",
        "--out",
        wav.to_str().unwrap(),
    ])
    .unwrap();
    let reader = hound::WavReader::open(&wav).unwrap();
    assert_eq!(reader.spec().sample_rate, encore_codec::SAMPLE_RATE);
    assert_eq!(reader.len() as usize, 25 * encore_codec::SAMPLES_PER_FRAME);

    encore(&[
        "evaluate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--prompts",
        "2",
    ])
    .unwrap();
}

#[test]
fn bad_configuration_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("encore.toml");
    std::fs::write(&config, "[pretrain]\nstepz = 4\n").unwrap();
    let err = encore(&[
        "--config",
        config.to_str().unwrap(),
        "pretrain",
        "--out",
        "unused",
    ])
    .unwrap_err();
    assert!(err.to_string().contains("stepz"), "{err}");

    let err = encore(&["pretrain", "--batch-size", "0", "--out", "unused"]).unwrap_err();
    assert!(err.to_string().contains("batch_size"), "{err}");

    let err = encore(&["sample", "--checkpoint", "/nonexistent", "--prompt", "x"]).unwrap_err();
    assert!(format!("{err:#}").contains("/nonexistent"), "{err:#}");
}

#[test]
fn sample_writes_musicgen_audio_from_a_hugging_face_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("musicgen");
    let cfg = encore_musicgen::tiny_config(32, 32, 2, 16);
    encore_musicgen::write_random_checkpoint(&ckpt, &cfg, &["calm", "piano"], 1).unwrap();
    let wav = dir.path().join("mg.wav");
    encore(&[
        "sample",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--prompt",
        "calm piano",
        "--seconds",
        "0.5",
        "--guidance-scale",
        "3",
        "--count",
        "2",
        "--out",
        wav.to_str().unwrap(),
    ])
    .unwrap();
    // 0.5 s at the codec's 50 frames/s and 8 kHz, one file per clip.
    let hop = cfg.audio_encoder.hop_length();
    let mut clips = Vec::new();
    for n in 1..=2 {
        let reader = hound::WavReader::open(dir.path().join(format!("mg-{n}.wav"))).unwrap();
        assert_eq!(reader.spec().sample_rate, cfg.audio_encoder.sampling_rate);
        let samples: Vec<i16> = reader.into_samples().map(Result::unwrap).collect();
        assert_eq!(samples.len(), 25 * hop);
        assert!(samples.iter().any(|&s| s != 0), "clip {n} is not silent");
        clips.push(samples);
    }
    assert_ne!(clips[0], clips[1], "two clips of one prompt differ");
}

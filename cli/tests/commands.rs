//! The `encore` commands end to end through the library: pretrain a few
//! steps of the tiny preset, sample a WAV from the checkpoint, evaluate it.

use clap::Parser;
use encore_cli::{Cli, run};

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

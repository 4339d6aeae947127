//! Both policy kinds behind one type: a random MusicGen checkpoint loads for
//! training and for sampling, and sampling and teacher forcing agree.

use candle_core::Device;
use encore_model::SamplingParams;
use encore_policies::{AnyTrainable, Architecture, load_published};

#[test]
fn a_musicgen_checkpoint_trains_publishes_and_samples_through_one_type() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let cfg = encore_musicgen::tiny_config(32, 32, 2, 32);
    encore_musicgen::write_random_checkpoint(&base, &cfg, &["calm", "piano", "fast", "drums"], 3)
        .unwrap();
    assert_eq!(
        Architecture::of_checkpoint(&base).unwrap(),
        Architecture::Musicgen
    );
    let t0 = std::time::Instant::now();
    let trainable = AnyTrainable::load(&base, &Device::Cpu).unwrap();
    let reference = trainable.frozen().unwrap();
    eprintln!("load {:?}", t0.elapsed());
    // Publish as a learner does, load as an actor does.
    let weights = dir.path().join("v1.safetensors");
    let tensors: std::collections::HashMap<_, _> = trainable.named_tensors().into_iter().collect();
    assert!(
        tensors
            .keys()
            .all(|k| k.starts_with("decoder.") || k.starts_with("enc_to_dec_proj"))
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let actor = load_published(
        &trainable.published_config().unwrap(),
        &weights,
        &Device::Cpu,
    )
    .unwrap();
    let captions: Vec<&str> = (0..32)
        .map(|i| {
            if i % 2 == 0 {
                "calm piano"
            } else {
                "fast drums"
            }
        })
        .collect();
    let t0 = std::time::Instant::now();
    let sampled = actor
        .sample(&captions, 16, &SamplingParams::default())
        .unwrap();
    eprintln!("sample {:?}", t0.elapsed());
    assert_eq!(sampled.codebooks, 4);
    assert!(sampled.tokens.iter().all(|t| t.len() == 64));
    assert!(
        sampled
            .log_probs
            .iter()
            .all(|l| l.len() == actor.steps_for(64) && l.len() == 19)
    );
    let clips: Vec<&[u32]> = sampled.tokens.iter().map(Vec::as_slice).collect();
    let t0 = std::time::Instant::now();
    let learner = trainable.policy().log_probs(&captions, &clips).unwrap();
    let frozen = reference.log_probs(&captions, &clips).unwrap();
    eprintln!("log-probs {:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    let _ = learner.sum_all().unwrap().backward().unwrap();
    eprintln!("backward {:?}", t0.elapsed());
    let (a, b) = (
        learner.to_vec2::<f32>().unwrap(),
        frozen.to_vec2::<f32>().unwrap(),
    );
    for (i, (row, behaviour)) in a.iter().zip(&sampled.log_probs).enumerate() {
        for (t, (x, y)) in row.iter().zip(behaviour).enumerate() {
            assert!(
                (x - y).abs() < 1e-3,
                "clip {i} step {t}: learner {x}, actor {y}"
            );
        }
        assert_eq!(row, &b[i], "the reference starts equal to the policy");
    }
}

//! Sampling and teacher forcing agree, on a random checkpoint written by
//! `write_random_checkpoint` (what the RL tests and benchmarks start from).

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use encore_model::SamplingParams;
use encore_musicgen::{
    GenerateParams, Musicgen, MusicgenConfig, WEIGHTS_FILE, tiny_config, write_random_checkpoint,
};

const WORDS: &[&str] = &["calm", "fast", "piano", "drums", "in", "a", "minor", "key"];

fn checkpoint() -> (tempfile::TempDir, Musicgen) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_random_checkpoint(dir.path(), &tiny_config(32, 32, 2, 16), WORDS, 7).expect("write");
    let model = Musicgen::load(dir.path(), &Device::Cpu).expect("load");
    (dir, model)
}

fn params(seed: u64, guidance_scale: f64) -> GenerateParams {
    GenerateParams {
        sampling: SamplingParams {
            seed,
            ..Default::default()
        },
        guidance_scale,
    }
}

#[test]
fn behaviour_log_probs_equal_teacher_forced_ones_with_and_without_guidance() {
    let (_dir, model) = checkpoint();
    let cond = model
        .condition(&["calm piano", "fast drums in a minor key"])
        .expect("condition");
    for guidance in [1.0, 3.0] {
        let out = model
            .generate(&cond, 6, &params(3, guidance))
            .expect("generate");
        assert_eq!(out.codes.len(), 2);
        assert!(
            out.codes
                .iter()
                .all(|c| c.len() == 4 && c.iter().all(|r| r.len() == 6))
        );
        let forced = model
            .log_probs(&out.codes, &cond, guidance)
            .expect("log-probs");
        let forced = forced.to_vec2::<f32>().expect("2-d");
        for (b, (ours, theirs)) in out.log_probs.iter().zip(&forced).enumerate() {
            assert_eq!(ours.len(), 6 + 4 - 1, "one log-prob per decoder step");
            for (t, (x, y)) in ours.iter().zip(theirs).enumerate() {
                assert!(
                    (x - y).abs() < 1e-4,
                    "guidance {guidance}, clip {b}, step {t}: {x} vs {y}"
                );
            }
            assert!(
                ours.iter().all(|lp| *lp < 0.0),
                "every step samples at least one code"
            );
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_clips_and_prompts_matter() {
    let (_dir, model) = checkpoint();
    let cond = model
        .condition(&["calm piano", "fast drums"])
        .expect("condition");
    let a = model.generate(&cond, 8, &params(5, 3.0)).expect("a");
    let b = model.generate(&cond, 8, &params(5, 3.0)).expect("b");
    let c = model.generate(&cond, 8, &params(6, 3.0)).expect("c");
    assert_eq!(a, b);
    assert_ne!(a.codes, c.codes);
    // Different prompts give different next-code distributions.
    let logits = model.step_logits(&a.codes, &cond, 3.0).expect("logits");
    let a0 = logits
        .get(0)
        .expect("0")
        .flatten_all()
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    let a1 = logits
        .get(1)
        .expect("1")
        .flatten_all()
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    let diff = a0
        .iter()
        .zip(&a1)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff > 1e-3, "prompts change the logits ({diff})");
}

#[test]
fn teacher_forced_log_probs_have_gradients_in_the_decoder() {
    let (dir, frozen) = checkpoint();
    let cfg = MusicgenConfig::load(dir.path()).expect("config");
    let vars = VarMap::new();
    let file = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.path().join(WEIGHTS_FILE)],
            DType::F32,
            &Device::Cpu,
        )
    }
    .expect("mmap");
    let model = Musicgen::new(
        &cfg,
        file,
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        None,
    )
    .expect("trainable");
    let mut loaded = vars.clone();
    loaded
        .load(dir.path().join(WEIGHTS_FILE))
        .expect("load decoder weights");
    let ids = frozen.tokenize(&["calm piano"]).expect("ids");
    let cond = model.condition_ids(&ids).expect("condition");
    let out = frozen
        .generate(&frozen.condition_ids(&ids).expect("c"), 4, &params(1, 3.0))
        .expect("generate");
    let lp = model.log_probs(&out.codes, &cond, 3.0).expect("log-probs");
    let expected = frozen
        .log_probs(&out.codes, &frozen.condition_ids(&ids).expect("c"), 3.0)
        .expect("frozen");
    let gap = (&lp - &expected)
        .expect("d")
        .abs()
        .expect("a")
        .sum_all()
        .expect("s")
        .to_scalar::<f32>()
        .expect("f");
    assert!(gap < 1e-4, "trainable and frozen models agree ({gap})");
    let grads = lp.sum_all().expect("sum").backward().expect("backward");
    let data = vars.data().lock().expect("lock");
    let head = data.get("decoder.lm_heads.0.weight").expect("head var");
    let g = grads.get(head.as_tensor()).expect("gradient for the head");
    assert!(
        g.abs()
            .expect("a")
            .sum_all()
            .expect("s")
            .to_scalar::<f32>()
            .expect("f")
            > 0.0
    );
    assert!(
        !data
            .keys()
            .any(|k| k.starts_with("text_encoder") || k.starts_with("audio_encoder")),
        "only the decoder and the projection are trainable"
    );
}

#[test]
fn a_batch_of_prompts_encodes_each_prompt_as_it_encodes_alone() {
    let (_dir, model) = checkpoint();
    // Two lengths, a repeated prompt, and rows out of length order.
    let ids: Vec<Vec<u32>> = vec![
        vec![3, 4, 5, 1],
        vec![6, 1],
        vec![3, 4, 5, 1],
        vec![7, 8, 9, 10, 1],
        vec![2, 1],
    ];
    let (states, mask) = model.encode_text(&ids).expect("batch");
    assert_eq!(states.dims3().expect("dims"), (5, 5, 32));
    for (i, row) in ids.iter().enumerate() {
        let (alone, _) = model.encode_text(std::slice::from_ref(row)).expect("alone");
        let batched = states
            .get(i)
            .expect("row")
            .narrow(0, 0, row.len())
            .expect("text");
        let gap = (batched - alone.get(0).expect("row"))
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar");
        assert!(gap < 1e-5, "row {i}: batched and alone differ by {gap}");
        let padding = states
            .get(i)
            .expect("row")
            .narrow(0, row.len(), 5 - row.len());
        let padding = padding
            .expect("pad")
            .abs()
            .expect("abs")
            .sum_all()
            .expect("sum");
        assert_eq!(padding.to_scalar::<f32>().expect("scalar"), 0.0, "row {i}");
        let m = mask.get(i).expect("mask").to_vec1::<f32>().expect("mask");
        assert_eq!(m.iter().sum::<f32>() as usize, row.len(), "row {i}");
    }
}

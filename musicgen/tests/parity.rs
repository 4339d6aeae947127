//! Parity with Hugging Face transformers on a tiny random MusicGen: the
//! checkpoint and the expected outputs in `tests/fixtures/tiny` were written
//! by `scripts/musicgen-fixtures.sh` (transformers 5, torch, CPU, f32).
//!
//! Errors are relative: the largest absolute difference over every element
//! divided by the largest absolute reference value.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use encore_model::SamplingParams;
use encore_musicgen::delay::{delay, pattern_mask, undelay};
use encore_musicgen::{EncodecDecoder, GenerateParams, Musicgen};

const TOLERANCE: f32 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

struct Fixture {
    model: Musicgen,
    expected: HashMap<String, Tensor>,
    prompts: Vec<String>,
}

fn fixture() -> Fixture {
    let model = Musicgen::load(&dir(), &Device::Cpu).expect("fixture checkpoint loads");
    let expected = candle_core::safetensors::load(dir().join("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors loads");
    let prompts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("prompts.json")).expect("prompts.json"))
            .expect("json");
    let prompts = prompts["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p.as_str().expect("string").to_string())
        .collect();
    Fixture {
        model,
        expected,
        prompts,
    }
}

impl Fixture {
    fn get(&self, name: &str) -> &Tensor {
        self.expected
            .get(name)
            .unwrap_or_else(|| panic!("{name} in expected.safetensors"))
    }

    /// The prompts' token ids without padding.
    fn text_ids(&self) -> Vec<Vec<u32>> {
        let ids = self.get("text_ids").to_vec2::<i64>().expect("ids");
        let mask = self.get("text_mask").to_vec2::<i64>().expect("mask");
        ids.iter()
            .zip(&mask)
            .map(|(row, m)| {
                row.iter()
                    .zip(m)
                    .filter(|(_, m)| **m == 1)
                    .map(|(&t, _)| t as u32)
                    .collect()
            })
            .collect()
    }

    fn codes(&self, name: &str) -> Vec<Vec<Vec<u32>>> {
        let t = self
            .get(name)
            .to_dtype(DType::F64)
            .expect("cast")
            .to_vec3::<f64>()
            .expect("3-d");
        t.iter()
            .map(|c| {
                c.iter()
                    .map(|r| r.iter().map(|&x| x as u32).collect())
                    .collect()
            })
            .collect()
    }
}

fn max_abs(t: &Tensor) -> f32 {
    let flat = t
        .flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("f32");
    flat.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "shapes");
    max_abs(&(actual - expected).expect("diff")) / max_abs(expected)
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    let err = relative_error(actual, expected);
    eprintln!("{what}: relative error {err:.2e}");
    assert!(
        err <= TOLERANCE,
        "{what}: relative error {err:.2e} > {TOLERANCE:.0e}"
    );
}

#[test]
fn the_tokenizer_gives_transformers_ids() {
    let f = fixture();
    let prompts: Vec<&str> = f.prompts.iter().map(String::as_str).collect();
    assert_eq!(f.model.tokenize(&prompts).expect("tokenize"), f.text_ids());
}

#[test]
fn t5_encoder_states_match() {
    let f = fixture();
    let ids = f.text_ids();
    let (states, mask) = f.model.encode_text(&ids).expect("encode");
    // transformers' states at padding are whatever T5 makes of pad tokens;
    // MusicGen zeroes them before the decoder sees them, so compare the rest.
    let keep = mask.unsqueeze(2).expect("mask");
    let expected = f.get("t5_states").broadcast_mul(&keep).expect("mask");
    let actual = states.broadcast_mul(&keep).expect("mask");
    assert_close("T5 states", &actual, &expected);
}

#[test]
fn delay_pattern_builds_and_reverts_as_transformers_does() {
    let f = fixture();
    let k = f.model.codebooks();
    let pad = f.model.config().decoder.pad_token_id;
    let expected = f.get("delay_pattern").to_vec2::<i64>().expect("pattern");
    let len = expected[0].len();
    let ours = pattern_mask(&vec![vec![pad]; k], pad, len);
    for (b, rows) in expected.chunks(k).enumerate() {
        assert_eq!(ours, rows.to_vec(), "batch row {b}");
    }
    let ids = f.get("decoder_ids").to_vec2::<i64>().expect("ids");
    for rows in ids.chunks(k) {
        let seq: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect();
        assert_eq!(delay(&undelay(&seq), pad, pad), seq);
    }
}

fn decoder_ids(f: &Fixture) -> Tensor {
    let ids = f.get("decoder_ids").to_dtype(DType::U32).expect("u32");
    let (rows, len) = ids.dims2().expect("2-d");
    let k = f.model.codebooks();
    ids.reshape((rows / k, k, len)).expect("reshape")
}

#[test]
fn decoder_logits_match_without_cache() {
    let f = fixture();
    let cond = f.model.condition_ids(&f.text_ids()).expect("condition");
    let logits = f
        .model
        .decoder()
        .forward(&decoder_ids(&f), &cond, None)
        .expect("forward");
    assert_close("decoder logits", &logits, f.get("logits"));
}

#[test]
fn decoder_logits_match_with_the_kv_cache() {
    let f = fixture();
    let cond = f.model.condition_ids(&f.text_ids()).expect("condition");
    let ids = decoder_ids(&f);
    let len = ids.dim(2).expect("len");
    let mut cache = f.model.decoder().cache(&cond).expect("cache");
    // A prefix in one call, then one position per call, as sampling does.
    let mut parts = vec![
        f.model
            .decoder()
            .forward(
                &ids.narrow(2, 0, 5).expect("prefix"),
                &cond,
                Some(&mut cache),
            )
            .expect("prefix"),
    ];
    for t in 5..len {
        parts.push(
            f.model
                .decoder()
                .forward(&ids.narrow(2, t, 1).expect("step"), &cond, Some(&mut cache))
                .expect("step"),
        );
    }
    assert_eq!(cache.len(), len);
    let logits = Tensor::cat(&parts, 2).expect("cat");
    assert_close("decoder logits, KV cache", &logits, f.get("logits"));
}

#[test]
fn encodec_decode_matches() {
    let f = fixture();
    let audio = f
        .model
        .decode_audio(&f.codes("codec_codes"))
        .expect("decode");
    let expected = f.get("codec_audio").i((.., 0, ..)).expect("mono");
    let actual = Tensor::new(audio, &Device::Cpu).expect("tensor");
    assert_close("EnCodec audio", &actual, &expected);
}

#[test]
fn encodec_loaded_alone_matches() {
    // What a reward server loads: only the codec of the checkpoint.
    let f = fixture();
    let codec = EncodecDecoder::load(&dir(), &Device::Cpu).expect("codec loads");
    let config = &f.model.config().audio_encoder;
    assert_eq!(codec.config(), config);
    assert_eq!(codec.codebooks(), config.num_quantizers());
    assert_eq!(codec.codebook_size(), config.codebook_size);
    assert_eq!(codec.frame_rate(), config.frame_rate());
    let codes = f.get("codec_codes").to_dtype(DType::U32).expect("u32");
    let audio = codec.decode(&codes).expect("decode");
    assert_close("EnCodec audio, codec alone", &audio, f.get("codec_audio"));

    let err =
        EncodecDecoder::load(&dir().join("missing"), &Device::Cpu).expect_err("no checkpoint");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn guided_step_logits_match_generate_scores() {
    let f = fixture();
    let cond = f.model.condition_ids(&f.text_ids()).expect("condition");
    let logits = f
        .model
        .step_logits(&f.codes("greedy_codes"), &cond, 3.0)
        .expect("logits");
    assert_close("guided step logits", &logits, f.get("greedy_scores"));
}

#[test]
fn greedy_guided_generation_matches_codes_and_audio() {
    let f = fixture();
    let prompts: Vec<&str> = f.prompts.iter().map(String::as_str).collect();
    let cond = f.model.condition(&prompts).expect("condition");
    let expected = f.codes("greedy_codes");
    let frames = expected[0][0].len();
    let params = GenerateParams {
        sampling: SamplingParams {
            top_k: Some(1),
            ..Default::default()
        },
        guidance_scale: 3.0,
    };
    let out = f.model.generate(&cond, frames, &params).expect("generate");
    assert_eq!(out.codes, expected);
    let audio = f.model.decode_audio(&out.codes).expect("decode");
    let expected_audio = f.get("greedy_audio").i((.., 0, ..)).expect("mono");
    assert_close(
        "generated audio",
        &Tensor::new(audio, &Device::Cpu).expect("t"),
        &expected_audio,
    );
}

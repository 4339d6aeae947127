//! Random MusicGen checkpoints in the Hugging Face layout, for tests and
//! benchmarks: no weights can be downloaded where Encore's CI runs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tokenizers::Tokenizer;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;

use crate::{
    CONFIG_FILE, DecoderConfig, EncodecConfig, Musicgen, MusicgenConfig, MusicgenError, Result,
    TOKENIZER_FILE, WEIGHTS_FILE,
};

/// A MusicGen config small enough for a test on a CPU: 4 codebooks of
/// `vocab` codes, a `width`-wide decoder of `layers` layers, a 2-layer T5
/// over `text_vocab` tokens, and an EnCodec at 8 kHz with 50 frames/s.
pub fn tiny_config(vocab: usize, width: usize, layers: usize, text_vocab: usize) -> MusicgenConfig {
    let t5 = serde_json::json!({
        "vocab_size": text_vocab, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
        "num_decoder_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16, "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0, "feed_forward_proj": "relu", "is_encoder_decoder": false,
        "pad_token_id": 0, "eos_token_id": 1, "model_type": "t5",
    });
    let bits = (vocab as f64).log2();
    MusicgenConfig {
        decoder: DecoderConfig {
            vocab_size: vocab,
            hidden_size: width,
            ffn_dim: 2 * width,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            max_position_embeddings: 512,
            num_codebooks: 4,
            audio_channels: 1,
            pad_token_id: vocab as u32,
            bos_token_id: Some(vocab as u32),
            activation_function: "gelu".into(),
            cross_attention_hidden_size: None,
        },
        text_encoder: t5,
        audio_encoder: EncodecConfig {
            sampling_rate: 8000,
            audio_channels: 1,
            hidden_size: 16,
            num_filters: 4,
            upsampling_ratios: vec![5, 4, 2, 4],
            norm_type: "weight_norm".into(),
            kernel_size: 7,
            last_kernel_size: 7,
            residual_kernel_size: 3,
            dilation_growth_rate: 2,
            num_residual_layers: 1,
            use_causal_conv: false,
            pad_mode: "reflect".into(),
            compress: 2,
            num_lstm_layers: 2,
            trim_right_ratio: 1.0,
            codebook_size: vocab,
            codebook_dim: None,
            use_conv_shortcut: false,
            // Exactly 4 codebooks at 50 frames/s.
            target_bandwidths: vec![4.0 * 50.0 * bits / 1000.0],
        },
        decoder_start_token_id: Some(vocab as u32),
    }
}

/// Writes a checkpoint directory with random weights (the same `seed`, the
/// same weights) for `cfg`, and a word-level tokenizer over `words` (ids 0-2
/// are `<pad>`, `</s>`, `<unk>`; every prompt ends with `</s>`, as T5's).
pub fn write_random_checkpoint(
    dir: &Path,
    cfg: &MusicgenConfig,
    words: &[&str],
    seed: u64,
) -> Result<()> {
    cfg.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| MusicgenError::checkpoint(dir, e))?;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    Musicgen::new(cfg, vb.clone(), vb, None)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    {
        let data = vars
            .data()
            .lock()
            .map_err(|_| MusicgenError::Input("var map lock poisoned".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let value =
                if name.ends_with(".bias") || name.contains("bias_") && name.contains("lstm") {
                    vec![0f32; n]
                } else if name.contains("norm.weight") || name.ends_with("weight_g") {
                    vec![1f32; n]
                } else {
                    let std = if name.contains("embed")
                        || name.contains("shared")
                        || name.contains("relative_attention")
                    {
                        1.0
                    } else {
                        let fan_in: usize = dims[1..].iter().product();
                        1.0 / (fan_in.max(1) as f32).sqrt()
                    };
                    (0..n)
                        .map(|_| {
                            let z: f32 = StandardNormal.sample(&mut rng);
                            z * std
                        })
                        .collect()
                };
            var.set(&Tensor::from_vec(value, dims, &Device::Cpu)?)?;
        }
    }
    let weights = dir.join(WEIGHTS_FILE);
    vars.save(&weights)
        .map_err(|e| MusicgenError::checkpoint(&weights, e))?;
    let config = dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(cfg).map_err(|e| MusicgenError::checkpoint(&config, e))?;
    std::fs::write(&config, json).map_err(|e| MusicgenError::checkpoint(&config, e))?;
    write_word_tokenizer(&dir.join(TOKENIZER_FILE), words)
}

fn write_word_tokenizer(path: &Path, words: &[&str]) -> Result<()> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for special in ["<pad>", "</s>", "<unk>"] {
        let id = vocab.len() as u32;
        vocab.insert(special.into(), id);
    }
    for w in words {
        let w = w.to_lowercase();
        if !vocab.contains_key(&w) {
            let id = vocab.len() as u32;
            vocab.insert(w, id);
        }
    }
    let fail = |e: &dyn std::fmt::Display| MusicgenError::checkpoint(path, e);
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| fail(&e))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(tokenizers::normalizers::Lowercase));
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let post = TemplateProcessing::builder()
        .try_single("$A </s>")
        .map_err(|e| fail(&e))?
        .special_tokens(vec![("</s>", 1)])
        .build()
        .map_err(|e| fail(&e))?;
    tok.with_post_processor(Some(post));
    tok.save(path, false).map_err(|e| fail(&e))
}

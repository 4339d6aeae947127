//! MusicGen in candle, loaded from a Hugging Face checkpoint directory as a
//! user downloads it (`config.json`, `model.safetensors`, `tokenizer.json`):
//! the T5 text encoder (candle-transformers), the delayed-codebook decoder
//! with KV-cached, classifier-free-guided sampling, and EnCodec's decoder.
//!
//! Encore's actors sample with [`Musicgen::generate`], which returns the
//! behaviour log-probs of every decoder step; the learner recomputes them
//! with gradients through [`Musicgen::log_probs`]; reward servers turn codes
//! into audio with [`EncodecDecoder`]. `tests/parity.rs` checks every part
//! against transformers on committed fixtures
//! (`scripts/musicgen-fixtures.sh` regenerates them).

mod config;
mod decoder;
pub mod delay;
mod encodec;
mod error;
mod model;
mod random;

pub use config::{
    CONFIG_FILE, DecoderConfig, EncodecConfig, MusicgenConfig, TOKENIZER_FILE, WEIGHTS_FILE,
    mmap_file, mmap_weights,
};
pub use decoder::{Conditioning, Decoder, DecoderCache, sinusoidal_positions};
pub use encodec::EncodecDecoder;
pub use error::{MusicgenError, Result};
pub use model::{GenerateParams, Generated, Musicgen, load_tokenizer};
pub use random::{tiny_config, write_random_checkpoint};

//! Encore's audio-token codec: the vocabulary the policy speaks and the
//! synthesiser that turns its tokens into sound.
//!
//! In the embedded music world a clip is a sequence of discrete tokens, one
//! per 40 ms frame ([`FRAME_RATE`] = 25 Hz), playing the role of MusicLM's
//! semantic tokens. The corpus (`encore-corpus`) writes clips in this
//! vocabulary, the policy model learns to emit it, and every reward model
//! hears it only after [`render`] has turned it into a waveform at
//! [`SAMPLE_RATE`]; [`write_wav`] and [`wav_bytes`] hand that waveform to
//! people and to services.
//!
//! ```text
//! corpus / policy --tokens--> render --f32 samples--> log-mel --> reward models
//!                                         \--> wav_bytes / write_wav --> listeners
//! ```
//!
//! Rendering is deterministic (same tokens, same samples, bit for bit) and
//! accepts any sequence of in-vocabulary ids, because a policy can emit
//! anything.

#![warn(missing_docs)]

mod synth;
mod vocab;
mod wav;

use std::path::PathBuf;

pub use synth::render;
pub use vocab::{Instrument, Token, Velocity, pitch_hz};
pub use wav::{wav_bytes, write_wav, write_wav_at};

/// Tokens per second of audio: one token per 40 ms frame.
pub const FRAME_RATE: u32 = 25;
/// Samples per second of rendered audio (mono).
pub const SAMPLE_RATE: u32 = 16_000;
/// Samples rendered for each token.
pub const SAMPLES_PER_FRAME: usize = (SAMPLE_RATE / FRAME_RATE) as usize;

/// Lowest playable MIDI pitch (C2).
pub const PITCH_LOW: u8 = 36;
/// Highest playable MIDI pitch (B5), inclusive.
pub const PITCH_HIGH: u8 = 83;
/// Number of playable pitches per instrument.
pub const NUM_PITCHES: usize = (PITCH_HIGH - PITCH_LOW) as usize + 1;
/// Number of instruments in the vocabulary.
pub const NUM_INSTRUMENTS: usize = 8;
/// Number of velocity levels.
pub const NUM_VELOCITIES: usize = 2;

/// Id of the start-of-sequence token (the model's start symbol; renders as silence).
pub const BOS: u32 = 0;
/// Id of the rest token (one frame of silence; ends any sounding note).
pub const REST: u32 = 1;
/// Id of the hold token (the sounding note continues one more frame).
pub const HOLD: u32 = 2;
/// Id of the first note token.
pub const FIRST_NOTE: u32 = 3;
/// Size of the token vocabulary: three control tokens plus one token per
/// (instrument, pitch, velocity).
pub const VOCAB_SIZE: usize = 3 + NUM_INSTRUMENTS * NUM_PITCHES * NUM_VELOCITIES;

const _: () = assert!(SAMPLES_PER_FRAME == 640);
const _: () = assert!(NUM_PITCHES == 48);
const _: () = assert!(VOCAB_SIZE == 771);

/// Errors from the codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A token id outside `0..VOCAB_SIZE`.
    #[error("token id {id} is out of vocabulary (vocabulary size {VOCAB_SIZE})")]
    OutOfVocabulary {
        /// The offending id.
        id: u32,
    },
    /// A note pitch outside `PITCH_LOW..=PITCH_HIGH`.
    #[error("pitch {pitch} is outside the playable range {PITCH_LOW}..={PITCH_HIGH}")]
    PitchOutOfRange {
        /// The offending MIDI pitch.
        pitch: u8,
    },
    /// An instrument index outside `0..NUM_INSTRUMENTS`.
    #[error("instrument index {index} is out of range (there are {NUM_INSTRUMENTS})")]
    InstrumentIndex {
        /// The offending index.
        index: usize,
    },
    /// An instrument name that matches no instrument.
    #[error("unknown instrument {name:?}")]
    UnknownInstrument {
        /// The name that was given.
        name: String,
    },
    /// A NaN or infinite sample handed to the WAV writer.
    #[error("sample {index} is not finite ({value})")]
    NonFiniteSample {
        /// Position of the sample.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// Writing a WAV file failed.
    #[error("writing WAV file {path}: {source}")]
    WavFile {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: hound::Error,
    },
    /// Encoding a WAV in memory failed.
    #[error("encoding WAV: {0}")]
    Wav(#[from] hound::Error),
}

//! The audio codec: turns the EnCodec codes of a MusicGen policy's items
//! into the 16 kHz audio the reward models hear.
//!
//! It sits between validation and the batchers: the service hands it a
//! validated request, it decodes every item with `codebooks` > 1 (items of
//! the same length in one EnCodec batch), resamples the waveforms from the
//! codec's rate to the embedded codec's, and the models' front ends then
//! treat them as [`encore_reward::Clip::Audio`]. Items of the embedded
//! codec pass through as tokens. Decoding happens once per request, however
//! many models score it.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use encore_codec::{SAMPLE_RATE, SAMPLES_PER_FRAME};
use encore_musicgen::EncodecDecoder;
use encore_proto::v1::{AudioCodecInfo, ScoreItem};
use encore_reward::{resample, resampled_len};

use crate::batcher::{Item, OwnedClip};
use crate::error::{Error, Result};

/// Most output samples one EnCodec batch decodes: its activations are some
/// tens of channels of this many samples, so this bounds its memory (about
/// 65 s of 32 kHz audio; a single longer item is decoded on its own).
const BATCH_SAMPLES: usize = 1 << 21;

/// MusicGen's EnCodec decoder, loaded from a checkpoint directory.
pub struct AudioCodec {
    decoder: EncodecDecoder,
    device: Device,
}

impl std::fmt::Debug for AudioCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioCodec")
            .field("codec", self.decoder.config())
            .finish_non_exhaustive()
    }
}

impl AudioCodec {
    /// Loads the EnCodec of the MusicGen checkpoint in `dir` (only its
    /// `audio_encoder` part) onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let decoder = EncodecDecoder::load(dir, device).map_err(|source| Error::LoadCodec {
            path: dir.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(Self {
            decoder,
            device: device.clone(),
        })
    }

    /// Codebooks per frame: what `ScoreItem.codebooks` must say.
    pub fn codebooks(&self) -> usize {
        self.decoder.codebooks()
    }

    /// Codes per codebook.
    pub fn codebook_size(&self) -> usize {
        self.decoder.codebook_size()
    }

    /// Sample rate of the decoded audio, Hz.
    pub fn sample_rate(&self) -> u32 {
        self.decoder.sample_rate()
    }

    /// 40 ms token frames (feature rows) that `frames` code frames make once
    /// decoded and resampled: what the models' length limits apply to.
    pub fn token_frames(&self, frames: usize) -> usize {
        let samples = frames.saturating_mul(self.decoder.hop_length());
        resampled_len(samples, self.sample_rate(), SAMPLE_RATE).div_ceil(SAMPLES_PER_FRAME)
    }

    /// The most code frames whose audio fits in `token_frames`.
    pub fn max_frames(&self, token_frames: usize) -> usize {
        let seconds = token_frames as f64 * SAMPLES_PER_FRAME as f64 / f64::from(SAMPLE_RATE);
        (seconds * self.frame_rate_hz()).ceil() as usize + 1
    }

    /// Code frames per second.
    pub fn frame_rate_hz(&self) -> f64 {
        f64::from(self.sample_rate()) / self.decoder.hop_length() as f64
    }

    /// What DescribeModels says about it.
    pub(crate) fn info(&self) -> AudioCodecInfo {
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        AudioCodecInfo {
            codec: "encodec".into(),
            sample_rate_hz: self.sample_rate(),
            codebooks: to_u32(self.codebooks()),
            codebook_size: to_u32(self.codebook_size()),
            frame_rate_hz: self.frame_rate_hz(),
        }
    }

    /// The items of a validated request as the models take them: items
    /// with `codebooks` > 1 decoded to 16 kHz audio, the others as tokens.
    /// Blocking (candle's kernels): call it off the async runtime.
    pub(crate) fn prepare(&self, items: Vec<ScoreItem>) -> Result<Vec<Item>> {
        let k = self.codebooks();
        // Items of one length share EnCodec batches; BTreeMap keeps the
        // work in a fixed order.
        let mut by_frames: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            if item.codebooks > 1 {
                by_frames.entry(item.tokens.len() / k).or_default().push(i);
            }
        }
        let mut audio: Vec<Option<Vec<f32>>> = vec![None; items.len()];
        let per_batch_frames = (BATCH_SAMPLES / self.decoder.hop_length().max(1)).max(1);
        for (frames, indices) in by_frames {
            let per_batch = (per_batch_frames / frames.max(1)).max(1);
            for batch in indices.chunks(per_batch) {
                let codes: Vec<u32> = batch
                    .iter()
                    .flat_map(|&i| items[i].tokens.iter().copied())
                    .collect();
                for (&i, wave) in batch.iter().zip(self.decode(codes, batch.len(), frames)?) {
                    audio[i] = Some(wave);
                }
            }
        }
        Ok(items
            .into_iter()
            .zip(audio)
            .map(|(item, audio)| Item {
                caption: item.caption,
                clip: match audio {
                    Some(samples) => OwnedClip::Audio(samples),
                    None => OwnedClip::Tokens(item.tokens),
                },
            })
            .collect())
    }

    /// 16 kHz waveforms of `b` clips of `frames` frames, `codes` row-major
    /// `[b][K][frames]`.
    fn decode(&self, codes: Vec<u32>, b: usize, frames: usize) -> Result<Vec<Vec<f32>>> {
        let fail = |e: &dyn std::fmt::Display| Error::Decode(e.to_string());
        let codes = Tensor::from_vec(codes, (b, self.codebooks(), frames), &self.device)
            .map_err(|e| fail(&e))?;
        let waves: Vec<Vec<Vec<f32>>> = self
            .decoder
            .decode(&codes)
            .and_then(|w| Ok(w.to_vec3::<f32>()?))
            .map_err(|e| fail(&e))?;
        waves
            .iter()
            .map(|channels| {
                let mono = channels.first().map_or(&[][..], Vec::as_slice);
                resample(mono, self.sample_rate(), SAMPLE_RATE).map_err(|e| fail(&e))
            })
            .collect()
    }
}

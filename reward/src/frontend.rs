//! The audio front end every reward model listens through: tokens are
//! rendered to a waveform by the codec, turned into a log-mel spectrogram,
//! normalised per mel band, and stacked two mel frames at a time so that one
//! feature row covers exactly one token frame (40 ms).
//!
//! A clip can also arrive as a waveform ([`Clip::Audio`]): the reward server
//! decodes a MusicGen policy's EnCodec codes itself, [`resample`]s them to
//! the embedded codec's sample rate (16 kHz) and pads them to whole 40 ms frames,
//! so the models see the same kind of rows whatever made the music.
//!
//! This is the only door from tokens into a reward model: the networks see
//! spectrograms, never token ids, so they cannot read the symbolic content
//! (instrument ids, pitches) directly and must hear it, as MusicRL's reward
//! models heard MusicLM's audio.

use candle_core::{Device, Tensor};
use encore_codec::{SAMPLES_PER_FRAME, render};
use encore_features::{LogMel, LogMelConfig};
use rayon::prelude::*;
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};
use serde::{Deserialize, Serialize};

use crate::RewardError;

/// One clip as the front end hears it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clip<'a> {
    /// Tokens of the embedded codec, rendered by it: one row per token.
    Tokens(&'a [u32]),
    /// A mono waveform at the embedded codec's
    /// [`SAMPLE_RATE`](encore_codec::SAMPLE_RATE) (16 kHz), for instance a
    /// MusicGen clip decoded by EnCodec and [`resample`]d; padded with
    /// silence to whole token frames: one row per [`SAMPLES_PER_FRAME`]
    /// samples or part of them.
    Audio(&'a [f32]),
}

impl Clip<'_> {
    /// Feature rows (40 ms token frames) the clip gives.
    pub fn frames(&self) -> usize {
        match self {
            Clip::Tokens(tokens) => tokens.len(),
            Clip::Audio(samples) => samples.len().div_ceil(SAMPLES_PER_FRAME),
        }
    }
}

impl<'a> From<&'a [u32]> for Clip<'a> {
    fn from(tokens: &'a [u32]) -> Self {
        Clip::Tokens(tokens)
    }
}

impl<'a> From<&'a Vec<u32>> for Clip<'a> {
    fn from(tokens: &'a Vec<u32>) -> Self {
        Clip::Tokens(tokens)
    }
}

/// Input frames per chunk of the resampler: long enough for a sharp
/// anti-aliasing filter, short enough that its start-up costs little on a
/// clip of a few seconds.
const RESAMPLE_CHUNK: usize = 1024;

/// How many samples [`resample`] makes of `len` samples:
/// `ceil(len * to_hz / from_hz)`, computed as rubato computes it.
pub fn resampled_len(len: usize, from_hz: u32, to_hz: u32) -> usize {
    if from_hz == to_hz {
        return len;
    }
    (f64::from(to_hz) / f64::from(from_hz) * len as f64).ceil() as usize
}

/// `samples` (mono, at `from_hz`) at `to_hz`, with rubato's FFT resampler:
/// [`resampled_len`] samples, aligned with the input (the resampler's delay
/// is trimmed).
pub fn resample(samples: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, RewardError> {
    if from_hz == to_hz || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let fail = |e: &dyn std::fmt::Display| {
        RewardError::Input(format!("resampling {from_hz} Hz to {to_hz} Hz: {e}"))
    };
    let mut resampler = Fft::<f32>::new(
        from_hz as usize,
        to_hz as usize,
        RESAMPLE_CHUNK,
        1,
        FixedSync::Input,
    )
    .map_err(|e| fail(&e))?;
    let input = InterleavedSlice::new(samples, 1, samples.len()).map_err(|e| fail(&e))?;
    let output = resampler
        .process_all(&input, samples.len(), None)
        .map_err(|e| fail(&e))?
        .take_data();
    debug_assert_eq!(output.len(), resampled_len(samples.len(), from_hz, to_hz));
    Ok(output)
}

/// Front-end settings, stored in a reward model's config so that a model is
/// always fed the features it was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontendConfig {
    /// Mel bands per spectrogram frame.
    pub n_mels: usize,
    /// Per-band mean of the log-mel values, measured on training audio.
    pub mean: Vec<f32>,
    /// Per-band standard deviation of the log-mel values.
    pub std: Vec<f32>,
}

impl Default for FrontendConfig {
    /// 128 mel bands (twice the spectrogram default: the finer pitch
    /// resolution lets the models hear wrong notes), with statistics around
    /// the level of quiet music; training replaces them with measured ones
    /// ([`Frontend::measure`]).
    fn default() -> Self {
        let n_mels = 128;
        Self {
            n_mels,
            mean: vec![-6.0; n_mels],
            std: vec![4.0; n_mels],
        }
    }
}

/// Turns token sequences into normalised feature rows.
pub struct Frontend {
    logmel: LogMel,
    cfg: FrontendConfig,
}

/// Features of a batch of clips, zero-padded to the longest one.
#[derive(Debug, Clone)]
pub struct Features {
    /// Row-major `[batch, frames, width]`; rows past a clip's length are 0.
    pub data: Vec<f32>,
    /// Length of each clip, in token frames.
    pub lengths: Vec<usize>,
    /// Longest length in the batch.
    pub frames: usize,
    /// Values per row (`2 * n_mels`).
    pub width: usize,
}

impl Frontend {
    /// A front end with the given normalisation.
    pub fn new(cfg: FrontendConfig) -> Result<Self, RewardError> {
        if cfg.mean.len() != cfg.n_mels || cfg.std.len() != cfg.n_mels {
            return Err(RewardError::Config(format!(
                "frontend: mean and std need {} values (n_mels), got {} and {}",
                cfg.n_mels,
                cfg.mean.len(),
                cfg.std.len()
            )));
        }
        if cfg.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(RewardError::Config(
                "frontend.std: every value must be positive and finite".into(),
            ));
        }
        let logmel = LogMel::new(LogMelConfig {
            n_mels: cfg.n_mels,
            ..LogMelConfig::default()
        })
        .map_err(|e| RewardError::Config(format!("frontend: {e}")))?;
        // Two mel frames per token frame is what makes rows line up with tokens.
        if logmel.config().hop * 2 != SAMPLES_PER_FRAME {
            return Err(RewardError::Config(format!(
                "frontend: the mel hop ({}) must be half a token frame ({SAMPLES_PER_FRAME} samples)",
                logmel.config().hop
            )));
        }
        Ok(Self { logmel, cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &FrontendConfig {
        &self.cfg
    }

    /// Values per feature row.
    pub fn width(&self) -> usize {
        2 * self.cfg.n_mels
    }

    /// Raw log-mel frames of a clip: exactly two per token frame,
    /// `[2 * frames, n_mels]`.
    fn raw(&self, clip: Clip<'_>) -> Result<Vec<f32>, RewardError> {
        let frames = clip.frames();
        let mut audio = match clip {
            Clip::Tokens(tokens) => {
                render(tokens).map_err(|e| RewardError::Input(e.to_string()))?
            }
            Clip::Audio(samples) => {
                if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
                    return Err(RewardError::Input(format!(
                        "audio sample {i} is not finite"
                    )));
                }
                let mut audio = samples.to_vec();
                audio.resize(frames * SAMPLES_PER_FRAME, 0.0);
                audio
            }
        };
        // Pad the tail so that the last window starts at the last hop: the
        // spectrogram then has exactly two frames per token frame.
        let cfg = self.logmel.config();
        audio.resize(audio.len() + cfg.n_fft - cfg.hop, 0.0);
        let mel = self
            .logmel
            .compute(&audio)
            .map_err(|e| RewardError::Input(e.to_string()))?;
        debug_assert_eq!(mel.len(), 2 * frames * self.cfg.n_mels);
        Ok(mel)
    }

    /// Normalised features of one clip, `[frames, 2 * n_mels]` row-major.
    pub fn clip<'c>(&self, clip: impl Into<Clip<'c>>) -> Result<Vec<f32>, RewardError> {
        let clip = clip.into();
        if clip.frames() == 0 {
            return Err(RewardError::Input(
                "a clip needs at least one token frame".into(),
            ));
        }
        let mut mel = self.raw(clip)?;
        let n = self.cfg.n_mels;
        for row in mel.chunks_mut(n) {
            for ((x, m), s) in row.iter_mut().zip(&self.cfg.mean).zip(&self.cfg.std) {
                *x = (*x - m) / s;
            }
        }
        Ok(mel)
    }

    /// Features of many clips (token slices or [`Clip`]s), computed in
    /// parallel, in input order.
    pub fn clips<'c, C>(&self, clips: &[C]) -> Result<Vec<Vec<f32>>, RewardError>
    where
        C: Into<Clip<'c>> + Copy + Sync,
    {
        clips.par_iter().map(|&c| self.clip(c)).collect()
    }

    /// Features of a batch of clips, padded into one block.
    pub fn batch<'c, C>(&self, clips: &[C]) -> Result<Features, RewardError>
    where
        C: Into<Clip<'c>> + Copy + Sync,
    {
        let rows = self.clips(clips)?;
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        Ok(Features::stack(&refs, self.width()))
    }

    /// Per-band mean and standard deviation of the log-mel values of `clips`.
    pub fn measure<'c, C>(n_mels: usize, clips: &[C]) -> Result<FrontendConfig, RewardError>
    where
        C: Into<Clip<'c>> + Copy + Sync,
    {
        let probe = Frontend::new(FrontendConfig {
            n_mels,
            mean: vec![0.0; n_mels],
            std: vec![1.0; n_mels],
        })?;
        let raws: Vec<Vec<f32>> = clips
            .par_iter()
            .map(|&c| probe.raw(c.into()))
            .collect::<Result<_, _>>()?;
        let mut sum = vec![0f64; n_mels];
        let mut sq = vec![0f64; n_mels];
        let mut count = 0f64;
        for raw in &raws {
            for row in raw.chunks(n_mels) {
                for (b, &x) in row.iter().enumerate() {
                    sum[b] += f64::from(x);
                    sq[b] += f64::from(x) * f64::from(x);
                }
                count += 1.0;
            }
        }
        if count == 0.0 {
            return Err(RewardError::Input("no audio to measure".into()));
        }
        let mean: Vec<f32> = sum.iter().map(|s| (s / count) as f32).collect();
        let std = sq
            .iter()
            .zip(&sum)
            .map(|(q, s)| {
                let m = s / count;
                ((q / count - m * m).max(0.0).sqrt() as f32).max(1e-3)
            })
            .collect();
        Ok(FrontendConfig { n_mels, mean, std })
    }
}

impl Features {
    /// Pads per-clip feature rows (`[len_i, width]` each) into one block.
    pub fn stack(clips: &[&[f32]], width: usize) -> Features {
        let lengths: Vec<usize> = clips.iter().map(|c| c.len() / width).collect();
        let frames = lengths.iter().copied().max().unwrap_or(0);
        let mut data = vec![0f32; clips.len() * frames * width];
        for (i, clip) in clips.iter().enumerate() {
            let start = i * frames * width;
            data[start..start + clip.len()].copy_from_slice(clip);
        }
        Features {
            data,
            lengths,
            frames,
            width,
        }
    }

    /// Number of clips.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// The features as `[batch, frames', width]`, `frames'` the longest
    /// length rounded up to a multiple of `stride` (zero rows added), and
    /// the validity mask of groups of `stride` rows as
    /// `[batch, frames' / stride, 1]`: 1 where a group holds any of the
    /// clip, 0 in its padding.
    pub fn tensors(&self, device: &Device, stride: usize) -> Result<(Tensor, Tensor), RewardError> {
        let b = self.len();
        let stride = stride.max(1);
        let frames = self.frames.div_ceil(stride) * stride;
        let x = if frames == self.frames {
            Tensor::from_slice(&self.data, (b, frames, self.width), device)?
        } else {
            let mut data = vec![0f32; b * frames * self.width];
            let row = self.frames * self.width;
            for (i, chunk) in self.data.chunks(row.max(1)).enumerate().take(b) {
                data[i * frames * self.width..][..row].copy_from_slice(chunk);
            }
            Tensor::from_vec(data, (b, frames, self.width), device)?
        };
        let groups = frames / stride;
        let mut mask = vec![0f32; b * groups];
        for (i, &len) in self.lengths.iter().enumerate() {
            mask[i * groups..i * groups + len.div_ceil(stride)].fill(1.0);
        }
        let mask = Tensor::from_vec(mask, (b, groups, 1), device)?;
        Ok((x, mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use encore_corpus::{Corpus, Split};

    #[test]
    fn one_row_per_token_frame() {
        let fe = Frontend::new(FrontendConfig::default()).unwrap();
        let ex = Corpus::new(3, 37).example(Split::Train, 0);
        let f = fe.clip(&ex.tokens).unwrap();
        assert_eq!(f.len(), 37 * fe.width());
        assert!(f.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn measured_statistics_normalise_the_audio() {
        let corpus = Corpus::new(5, 50);
        let examples = corpus.batch(Split::Train, 0, 16);
        let clips: Vec<&[u32]> = examples.iter().map(|e| e.tokens.as_slice()).collect();
        let cfg = Frontend::measure(64, &clips).unwrap();
        let fe = Frontend::new(cfg).unwrap();
        let batch = fe.batch(&clips).unwrap();
        let n = batch.data.len() as f64;
        let mean = batch.data.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = batch
            .data
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var - 1.0).abs() < 1e-2, "variance {var}");
    }

    #[test]
    fn padding_is_zero_and_masked() {
        let fe = Frontend::new(FrontendConfig::default()).unwrap();
        let a = Corpus::new(1, 20).example(Split::Train, 0).tokens;
        let b = Corpus::new(1, 30).example(Split::Train, 1).tokens;
        let batch = fe.batch(&[&a, &b]).unwrap();
        assert_eq!(batch.lengths, vec![20, 30]);
        let w = fe.width();
        assert!(batch.data[20 * w..30 * w].iter().all(|&x| x == 0.0));
        let (x, mask) = batch.tensors(&Device::Cpu, 1).unwrap();
        assert_eq!(x.dims(), &[2, 30, w]);
        let m: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(m.iter().sum::<f32>(), 50.0);
        assert_eq!(m[19], 1.0);
        assert_eq!(m[20], 0.0);
        // Groups of 4 rows: 20 rows fill 5 groups, 30 rows 8 (the last one
        // half padding); the block grows to 32 rows.
        let (x, mask) = batch.tensors(&Device::Cpu, 4).unwrap();
        assert_eq!(x.dims(), &[2, 32, w]);
        let m: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(m, [[1.0; 5].as_slice(), &[0.0; 3], &[1.0; 8]].concat());
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&xs[32 * w..62 * w], &batch.data[30 * w..60 * w]);
    }

    /// The frequency of the largest bin of the spectrum of `x` at `rate`.
    fn peak_hz(x: &[f32], rate: u32) -> f64 {
        let mut input: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let fft = realfft::RealFftPlanner::<f64>::new().plan_fft_forward(input.len());
        let mut spectrum = fft.make_output_vec();
        fft.process(&mut input, &mut spectrum).unwrap();
        let peak = (0..spectrum.len())
            .max_by(|&a, &b| spectrum[a].norm().total_cmp(&spectrum[b].norm()))
            .unwrap();
        peak as f64 * f64::from(rate) / x.len() as f64
    }

    fn sine(hz: f64, rate: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (0.5 * (2.0 * std::f64::consts::PI * hz * i as f64 / f64::from(rate)).sin()) as f32
            })
            .collect()
    }

    #[test]
    fn resampling_keeps_frequency_length_and_timing() {
        let input = sine(440.0, 32_000, 32_000);
        let output = resample(&input, 32_000, 16_000).unwrap();
        assert_eq!(output.len(), 16_000);
        // One second: bins are 1 Hz apart.
        assert_eq!(peak_hz(&input, 32_000), 440.0);
        assert_eq!(peak_hz(&output, 16_000), 440.0);
        // Sample by sample it is the same sine sampled at 16 kHz: no delay,
        // no change of level (away from the clip's edges).
        let expected = sine(440.0, 16_000, 16_000);
        let worst = output[500..15_500]
            .iter()
            .zip(&expected[500..15_500])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "largest difference {worst}");
        // Up, from the tiny EnCodec's 8 kHz: twice the length.
        let up = resample(&sine(440.0, 8_000, 4_001), 8_000, 16_000).unwrap();
        assert_eq!(up.len(), 8_002);
        for (len, from, to) in [
            (32_000, 32_000, 16_000),
            (4_001, 8_000, 16_000),
            (7, 16_000, 16_000),
        ] {
            assert_eq!(
                resample(&sine(440.0, from, len), from, to).unwrap().len(),
                resampled_len(len, from, to)
            );
        }
        assert_eq!(resample(&input[..7], 16_000, 16_000).unwrap(), &input[..7]);
    }

    #[test]
    fn audio_gives_one_row_per_started_token_frame() {
        let fe = Frontend::new(FrontendConfig::default()).unwrap();
        let n = 7;
        for (len, rows) in [(n * 640, n), (n * 640 - 100, n), (n * 640 + 1, n + 1)] {
            let audio = sine(440.0, 16_000, len);
            let f = fe.clip(Clip::Audio(&audio)).unwrap();
            assert_eq!(f.len(), rows * fe.width(), "{len} samples");
            assert_eq!(Clip::Audio(&audio).frames(), rows);
        }
        // The codec's own audio heard as a waveform is heard as its tokens.
        let tokens = Corpus::new(3, 12).example(Split::Train, 0).tokens;
        let audio = render(&tokens).unwrap();
        assert_eq!(
            fe.clip(Clip::Audio(&audio)).unwrap(),
            fe.clip(&tokens).unwrap()
        );
        let batch = fe
            .batch(&[Clip::Audio(&audio[..640 * 5]), Clip::Tokens(&tokens)])
            .unwrap();
        assert_eq!(batch.lengths, vec![5, 12]);
        let mut bad = audio.clone();
        bad[3] = f32::NAN;
        assert!(fe.clip(Clip::Audio(&bad)).is_err());
        assert!(fe.clip(Clip::Audio(&[])).is_err());
    }

    #[test]
    fn rejects_empty_clips_and_bad_statistics() {
        let fe = Frontend::new(FrontendConfig::default()).unwrap();
        assert!(fe.clip(Clip::Tokens(&[])).is_err());
        let mut cfg = FrontendConfig::default();
        cfg.std[3] = 0.0;
        assert!(Frontend::new(cfg).is_err());
    }
}

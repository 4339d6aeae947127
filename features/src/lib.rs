//! Audio features for the reward models: log-mel spectrograms.
//!
//! Data flow: tokens -> `encore_codec::render` -> waveform -> [`LogMel`] ->
//! `[frames, n_mels]` features -> reward networks. Rewards are computed from
//! audio only, never from tokens, so a reward model cannot read the symbolic
//! content directly, as in MusicRL where the rewards score generated audio.
//!
//! The spectrogram is the usual one: Hann-windowed frames, the power spectrum
//! by a real FFT (`realfft`), triangular filters on the HTK mel scale, and
//! `ln(mel + floor)`.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};
use serde::{Deserialize, Serialize};

/// What can go wrong computing features.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// A configuration value is invalid; the message names the key.
    #[error("{0}")]
    Config(String),
    /// The waveform is shorter than one analysis window.
    #[error("waveform: {samples} samples is shorter than one window of {window}")]
    TooShort {
        /// Samples given.
        samples: usize,
        /// Samples needed.
        window: usize,
    },
}

/// Shape of the spectrogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogMelConfig {
    /// Sample rate of the input, Hz.
    pub sample_rate: u32,
    /// FFT (and window) length, samples.
    pub n_fft: usize,
    /// Hop between frames, samples.
    pub hop: usize,
    /// Number of mel bands.
    pub n_mels: usize,
    /// Lowest band edge, Hz.
    pub f_min: f32,
    /// Highest band edge, Hz (at most half the sample rate).
    pub f_max: f32,
    /// Added before the logarithm so silence stays finite.
    pub floor: f32,
}

impl Default for LogMelConfig {
    /// 32 ms windows every 20 ms (two feature frames per 40 ms token) with
    /// 64 bands from 30 Hz to 8 kHz, at the codec's 16 kHz.
    fn default() -> Self {
        Self {
            sample_rate: 16_000,
            n_fft: 512,
            hop: 320,
            n_mels: 64,
            f_min: 30.0,
            f_max: 8_000.0,
            floor: 1e-6,
        }
    }
}

/// A log-mel spectrogram extractor: plan, window and filterbank computed once.
pub struct LogMel {
    cfg: LogMelConfig,
    fft: Arc<dyn RealToComplex<f32>>,
    window: Vec<f32>,
    /// Triangular filters as (first FFT bin, weights of the bins it
    /// covers): each spans a few bins, so storing only those keeps the
    /// filterbank from dominating the cost of a frame.
    filters: Vec<(usize, Vec<f32>)>,
}

/// Hz to HTK mel.
pub fn hz_to_mel(hz: f32) -> f32 {
    2595.0 * (1.0 + hz / 700.0).log10()
}

/// HTK mel to Hz.
pub fn mel_to_hz(mel: f32) -> f32 {
    700.0 * (10f32.powf(mel / 2595.0) - 1.0)
}

impl LogMel {
    /// Builds the extractor; errors name the offending key.
    pub fn new(cfg: LogMelConfig) -> Result<Self, FeatureError> {
        let nyquist = cfg.sample_rate as f32 / 2.0;
        if cfg.n_fft < 2 || cfg.hop == 0 || cfg.n_mels == 0 {
            return Err(FeatureError::Config(
                "n_fft, hop, n_mels: must be positive (n_fft >= 2)".into(),
            ));
        }
        if !(cfg.f_min >= 0.0 && cfg.f_min < cfg.f_max && cfg.f_max <= nyquist) {
            return Err(FeatureError::Config(format!(
                "f_min, f_max: need 0 <= f_min < f_max <= {nyquist}, got {} and {}",
                cfg.f_min, cfg.f_max
            )));
        }
        if !(cfg.floor.is_finite() && cfg.floor > 0.0) {
            return Err(FeatureError::Config("floor: must be positive".into()));
        }
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(cfg.n_fft);
        let n = cfg.n_fft;
        // Periodic Hann window.
        let window = (0..n)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / n as f32).cos())
            .collect();
        let bins = n / 2 + 1;
        let bin_hz = |k: usize| k as f32 * cfg.sample_rate as f32 / n as f32;
        let (lo, hi) = (hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max));
        let edges: Vec<f32> = (0..cfg.n_mels + 2)
            .map(|i| mel_to_hz(lo + (hi - lo) * i as f32 / (cfg.n_mels + 1) as f32))
            .collect();
        let filters = (0..cfg.n_mels)
            .map(|m| {
                let (left, centre, right) = (edges[m], edges[m + 1], edges[m + 2]);
                let dense: Vec<f32> = (0..bins)
                    .map(|k| {
                        let f = bin_hz(k);
                        if f <= left || f >= right {
                            0.0
                        } else if f <= centre {
                            (f - left) / (centre - left)
                        } else {
                            (right - f) / (right - centre)
                        }
                    })
                    .collect();
                let first = dense.iter().position(|&w| w > 0.0).unwrap_or(0);
                let last = dense.iter().rposition(|&w| w > 0.0).unwrap_or(0);
                (first, dense[first..=last.max(first)].to_vec())
            })
            .collect();
        Ok(Self {
            cfg,
            fft,
            window,
            filters,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LogMelConfig {
        &self.cfg
    }

    /// Number of frames for a waveform of `samples` samples (no padding: a
    /// frame is emitted for every full window).
    pub fn frames(&self, samples: usize) -> usize {
        if samples < self.cfg.n_fft {
            0
        } else {
            1 + (samples - self.cfg.n_fft) / self.cfg.hop
        }
    }

    /// The log-mel spectrogram of `audio`, row-major `[frames, n_mels]`.
    pub fn compute(&self, audio: &[f32]) -> Result<Vec<f32>, FeatureError> {
        let frames = self.frames(audio.len());
        if frames == 0 {
            return Err(FeatureError::TooShort {
                samples: audio.len(),
                window: self.cfg.n_fft,
            });
        }
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; spectrum.len()];
        let mut out = Vec::with_capacity(frames * self.cfg.n_mels);
        for f in 0..frames {
            let start = f * self.cfg.hop;
            for ((x, &s), &w) in input
                .iter_mut()
                .zip(&audio[start..start + self.cfg.n_fft])
                .zip(&self.window)
            {
                *x = s * w;
            }
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .map_err(|e| FeatureError::Config(format!("n_fft: {e}")))?;
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.norm_sqr();
            }
            for (first, weights) in &self.filters {
                let energy: f32 = weights
                    .iter()
                    .zip(&power[*first..])
                    .map(|(w, p)| w * p)
                    .sum();
                out.push((energy + self.cfg.floor).ln());
            }
        }
        Ok(out)
    }

    /// Spectrograms of equal-length waveforms, concatenated row-major as
    /// `[batch, frames, n_mels]`.
    pub fn compute_batch(&self, audio: &[&[f32]]) -> Result<Vec<f32>, FeatureError> {
        let mut out = Vec::new();
        for clip in audio {
            out.extend(self.compute(clip)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(hz: f32, seconds: f32, rate: u32) -> Vec<f32> {
        let n = (seconds * rate as f32) as usize;
        (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * hz * i as f32 / rate as f32).sin())
            .collect()
    }

    #[test]
    fn frame_count_follows_window_and_hop() {
        let lm = LogMel::new(LogMelConfig::default()).unwrap();
        // One 40 ms token frame is 640 samples; 250 tokens (10 s) give 499 frames.
        assert_eq!(lm.frames(250 * 640), 1 + (250 * 640 - 512) / 320);
        assert_eq!(lm.frames(511), 0);
        let out = lm.compute(&vec![0.0; 250 * 640]).unwrap();
        assert_eq!(out.len(), lm.frames(250 * 640) * 64);
        // Silence is the floor, finite.
        assert!(out.iter().all(|&x| (x - 1e-6f32.ln()).abs() < 1e-3));
        assert!(matches!(
            lm.compute(&[0.0; 100]),
            Err(FeatureError::TooShort { .. })
        ));
    }

    #[test]
    fn a_sine_lights_the_band_that_contains_it() {
        let cfg = LogMelConfig::default();
        let lm = LogMel::new(cfg.clone()).unwrap();
        for hz in [220.0f32, 1000.0, 3000.0] {
            let out = lm.compute(&sine(hz, 0.5, cfg.sample_rate)).unwrap();
            let row = &out[..cfg.n_mels];
            let best = (0..cfg.n_mels)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            // Band centres on the mel scale, computed independently of the filterbank.
            let (lo, hi) = (hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max));
            let centre =
                |m: usize| mel_to_hz(lo + (hi - lo) * (m + 1) as f32 / (cfg.n_mels + 1) as f32);
            let nearest = (0..cfg.n_mels)
                .min_by(|&a, &b| (centre(a) - hz).abs().total_cmp(&(centre(b) - hz).abs()))
                .unwrap();
            assert!(
                best.abs_diff(nearest) <= 1,
                "{hz} Hz: loudest band {best}, nearest centre {nearest}"
            );
        }
    }

    #[test]
    fn power_scales_with_amplitude_squared() {
        // ln(4 x) = ln x + ln 4: doubling the amplitude adds ln 4 to every
        // band well above the floor.
        let lm = LogMel::new(LogMelConfig::default()).unwrap();
        let a = sine(440.0, 0.2, 16_000);
        let b: Vec<f32> = a.iter().map(|x| 2.0 * x).collect();
        let (fa, fb) = (lm.compute(&a).unwrap(), lm.compute(&b).unwrap());
        for (x, y) in fa.iter().zip(&fb) {
            if *x > 0.0 {
                assert!((y - x - 4f32.ln()).abs() < 1e-3, "{x} {y}");
            }
        }
    }

    #[test]
    fn matches_a_direct_dft() {
        let cfg = LogMelConfig {
            n_fft: 64,
            hop: 32,
            n_mels: 8,
            f_max: 8000.0,
            ..Default::default()
        };
        let lm = LogMel::new(cfg.clone()).unwrap();
        let audio: Vec<f32> = (0..200)
            .map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * 0.3)
            .collect();
        let fast = lm.compute(&audio).unwrap();
        for f in 0..lm.frames(audio.len()) {
            let frame = &audio[f * cfg.hop..f * cfg.hop + cfg.n_fft];
            let power: Vec<f64> = (0..=cfg.n_fft / 2)
                .map(|k| {
                    let (mut re, mut im) = (0f64, 0f64);
                    for (i, &x) in frame.iter().enumerate() {
                        let w = 0.5
                            - 0.5
                                * (2.0 * std::f64::consts::PI * i as f64 / cfg.n_fft as f64).cos();
                        let phase = -2.0 * std::f64::consts::PI * (k * i) as f64 / cfg.n_fft as f64;
                        re += x as f64 * w * phase.cos();
                        im += x as f64 * w * phase.sin();
                    }
                    re * re + im * im
                })
                .collect();
            for (m, (first, filter)) in lm.filters.iter().enumerate() {
                let energy: f64 = filter
                    .iter()
                    .zip(&power[*first..])
                    .map(|(w, p)| *w as f64 * p)
                    .sum();
                let direct = (energy + cfg.floor as f64).ln();
                let got = fast[f * cfg.n_mels + m] as f64;
                assert!(
                    (got - direct).abs() < 1e-3,
                    "frame {f} band {m}: {got} vs {direct}"
                );
            }
        }
    }

    #[test]
    fn mel_scale_round_trips_and_bad_configs_name_keys() {
        for hz in [0.0f32, 100.0, 1000.0, 8000.0] {
            assert!((mel_to_hz(hz_to_mel(hz)) - hz).abs() < 0.05);
        }
        let bad = LogMelConfig {
            f_max: 9000.0,
            ..Default::default()
        };
        assert!(
            LogMel::new(bad)
                .err()
                .unwrap()
                .to_string()
                .contains("f_max")
        );
    }
}

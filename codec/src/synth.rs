//! Token -> waveform synthesis.
//!
//! Each instrument is a small additive patch: one or two band-limited
//! single-cycle wavetables (a "bright" and a "dark" harmonic profile that the
//! patch cross-fades over the life of a note), an attack/decay envelope,
//! optional vibrato, tremolo, a detuned second oscillator, an inharmonic
//! partial and breath noise. Tables are built once per process and read with
//! linear interpolation, which keeps rendering far faster than real time.
//!
//! A note is one voice from its onset through its holds: phase and envelope
//! run on across frames, so holds are seamless and decaying notes keep
//! decaying. When a note ends, its voice fades out over [`RELEASE_SAMPLES`]
//! (overlapping the next frame) so there are no clicks.

use std::f32::consts::PI;
use std::sync::OnceLock;

use crate::vocab::{Instrument, Token, Velocity, pitch_hz};
use crate::{CodecError, NUM_INSTRUMENTS, PITCH_LOW, SAMPLE_RATE, SAMPLES_PER_FRAME};

const TABLE_BITS: u32 = 11;
const TABLE_SIZE: usize = 1 << TABLE_BITS;
/// Octave bands with their own tables, so high notes carry no harmonics above Nyquist.
const BANDS: usize = 4;
/// Highest partial frequency a table may contain (Nyquist is 8 kHz).
const MAX_PARTIAL_HZ: f32 = 7_400.0;
const MAX_HARMONICS: usize = 40;
/// Length of the fade-out after a note ends: 25 ms.
const RELEASE_SAMPLES: usize = 400;
/// Overall level of a loud note, leaving headroom for a release tail to
/// overlap the next onset.
const LOUD_GAIN: f32 = 0.45;
/// Soft notes are 0.4x loud ones: about -8 dB.
const SOFT_GAIN: f32 = 0.45 * 0.4;

// A release tail lasts less than a frame, so at most one voice is ever fading
// while another sounds.
const _: () = assert!(RELEASE_SAMPLES <= SAMPLES_PER_FRAME);

/// Renders tokens to a mono waveform at `SAMPLE_RATE`.
///
/// The result has exactly `tokens.len() * SAMPLES_PER_FRAME` samples, all in
/// `[-1, 1]`. Any sequence of in-vocabulary ids is accepted (a `Hold` with
/// nothing sounding is silence); an out-of-vocabulary id is an error that
/// names it, and nothing is rendered.
pub fn render(tokens: &[u32]) -> Result<Vec<f32>, CodecError> {
    let decoded = Token::decode_all(tokens)?;
    let tables = tables();
    let mut out = vec![0.0f32; tokens.len() * SAMPLES_PER_FRAME];
    let mut active: Option<Voice> = None;
    let mut fading: Option<Voice> = None;
    for (frame, (token, buf)) in decoded
        .iter()
        .zip(out.chunks_exact_mut(SAMPLES_PER_FRAME))
        .enumerate()
    {
        match *token {
            Token::Note {
                instrument,
                pitch,
                velocity,
            } => {
                if let Some(old) = active.take() {
                    fading = Some(old.into_release());
                }
                active = Some(Voice::new(tables, instrument, pitch, velocity, frame));
            }
            Token::Hold => {}
            Token::Rest | Token::Bos => {
                if let Some(old) = active.take() {
                    fading = Some(old.into_release());
                }
            }
        }
        if let Some(voice) = fading.as_mut()
            && voice.render_into(buf)
        {
            fading = None;
        }
        if let Some(voice) = active.as_mut() {
            voice.render_into(buf);
        }
        for s in buf.iter_mut() {
            *s = s.clamp(-1.0, 1.0);
        }
    }
    Ok(out)
}

/// How an instrument sounds.
struct Patch {
    /// Harmonic amplitudes (index 0 = fundamental) of the bright table.
    bright: fn(usize) -> f32,
    /// Harmonic amplitudes of the dark table, if the patch changes colour.
    dark: Option<fn(usize) -> f32>,
    /// Bright-table weight at onset, its final value, and the time constant
    /// (s) between them.
    brightness: (f32, f32, f32),
    /// Linear attack time (s).
    attack: f32,
    /// Decay time constant (s) at middle C, towards `sustain`; shorter for
    /// higher notes when `pitch_scaled_decay`.
    decay: f32,
    /// Envelope level that the decay approaches.
    sustain: f32,
    pitch_scaled_decay: bool,
    /// Vibrato rate (Hz), depth (fraction of frequency), fade-in time (s).
    vibrato: Option<(f32, f32, f32)>,
    /// Tremolo rate (Hz) and depth (fraction of amplitude).
    tremolo: Option<(f32, f32)>,
    /// Frequency ratio of a second, equally loud oscillator.
    detune: Option<f32>,
    /// Inharmonic partial: frequency ratio, relative amplitude, decay (s).
    partial: Option<(f32, f32, f32)>,
    /// Relative level of low-passed breath noise, following the envelope.
    noise: f32,
}

fn patch(instrument: Instrument) -> Patch {
    let plain = Patch {
        bright: saw,
        dark: None,
        brightness: (1.0, 1.0, 1.0),
        attack: 0.005,
        decay: 0.2,
        sustain: 1.0,
        pitch_scaled_decay: false,
        vibrato: None,
        tremolo: None,
        detune: None,
        partial: None,
        noise: 0.0,
    };
    match instrument {
        Instrument::Piano => Patch {
            // Struck a seventh of the way along the string: no seventh harmonic.
            bright: |h| {
                let n = h as f32 + 1.0;
                (PI * n / 7.0).sin().abs() / n
            },
            dark: Some(|h| (h as f32 + 1.0).powf(-3.0)),
            brightness: (1.0, 0.1, 0.35),
            attack: 0.004,
            decay: 0.9,
            sustain: 0.0,
            pitch_scaled_decay: true,
            ..plain
        },
        Instrument::Guitar => Patch {
            // Plucked a fifth of the way along the string: every fifth harmonic is missing.
            bright: |h| {
                let n = h as f32 + 1.0;
                (PI * n * 0.2).sin().abs() / n.powf(0.8)
            },
            dark: Some(|h| (h as f32 + 1.0).powf(-2.5)),
            brightness: (1.0, 0.0, 0.12),
            attack: 0.003,
            decay: 0.35,
            sustain: 0.0,
            pitch_scaled_decay: true,
            ..plain
        },
        Instrument::Violin => Patch {
            // Sawtooth shaped by body resonances: a strong second and third harmonic.
            bright: |h| {
                const BODY: [f32; 8] = [0.55, 1.0, 0.85, 0.45, 0.5, 0.4, 0.22, 0.28];
                BODY.get(h)
                    .copied()
                    .unwrap_or_else(|| 0.8 / (h as f32 + 1.0))
            },
            attack: 0.09,
            decay: 0.25,
            sustain: 0.85,
            vibrato: Some((5.5, 0.006, 0.25)),
            ..plain
        },
        Instrument::Flute => Patch {
            bright: |h| [1.0, 0.3, 0.1, 0.04].get(h).copied().unwrap_or(0.0),
            attack: 0.06,
            decay: 0.15,
            sustain: 0.85,
            vibrato: Some((4.8, 0.002, 0.3)),
            noise: 0.12,
            ..plain
        },
        Instrument::Accordion => Patch {
            // Free reeds: odd harmonics dominate.
            bright: |h| {
                let n = h as f32 + 1.0;
                let odd = if h % 2 == 0 { 1.0 } else { 0.25 };
                odd / n.powf(0.7)
            },
            attack: 0.03,
            tremolo: Some((6.0, 0.12)),
            detune: Some(1.0035),
            ..plain
        },
        Instrument::Marimba => Patch {
            bright: |h| {
                [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03]
                    .get(h)
                    .copied()
                    .unwrap_or(0.0)
            },
            attack: 0.001,
            decay: 0.25,
            sustain: 0.0,
            pitch_scaled_decay: true,
            partial: Some((3.93, 0.6, 0.05)),
            ..plain
        },
        Instrument::Trumpet => Patch {
            // Brass: harmonics peak around the third and fall off slowly, and
            // the tone brightens during the attack.
            bright: |h| {
                let n = h as f32 + 1.0;
                n.powf(1.2) * (-n / 2.8).exp()
            },
            dark: Some(|h| (h as f32 + 1.0).powf(-2.0)),
            brightness: (0.0, 1.0, 0.05),
            attack: 0.035,
            decay: 0.15,
            sustain: 0.8,
            ..plain
        },
        Instrument::Synth => Patch {
            attack: 0.006,
            decay: 0.2,
            sustain: 0.8,
            detune: Some(1.006),
            ..plain
        },
    }
}

fn saw(h: usize) -> f32 {
    1.0 / (h as f32 + 1.0)
}

/// Single-cycle tables, `TABLE_SIZE + 1` samples each (the last repeats the
/// first so interpolation needs no wrap).
struct Tables {
    sine: Vec<f32>,
    patches: Vec<Patch>,
    /// `[instrument][band]`.
    bright: Vec<[Vec<f32>; BANDS]>,
    /// `[instrument][band]`, when the patch has a dark profile.
    dark: Vec<Option<[Vec<f32>; BANDS]>>,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(build_tables)
}

fn build_tables() -> Tables {
    let sine: Vec<f32> = (0..=TABLE_SIZE)
        .map(|i| (2.0 * std::f64::consts::PI * i as f64 / TABLE_SIZE as f64).sin() as f32)
        .collect();
    let patches: Vec<Patch> = Instrument::ALL.iter().map(|&i| patch(i)).collect();
    let banded = |profile: fn(usize) -> f32, detune: Option<f32>| -> [Vec<f32>; BANDS] {
        std::array::from_fn(|band| {
            // The top note of the band, widened by vibrato and detuning.
            let top = pitch_hz(PITCH_LOW + 12 * band as u8 + 11) * detune.unwrap_or(1.0) * 1.01;
            let harmonics = ((MAX_PARTIAL_HZ / top) as usize).clamp(1, MAX_HARMONICS);
            build_table(&sine, profile, harmonics)
        })
    };
    let bright = patches.iter().map(|p| banded(p.bright, p.detune)).collect();
    let dark = patches
        .iter()
        .map(|p| p.dark.map(|d| banded(d, p.detune)))
        .collect();
    Tables {
        sine,
        patches,
        bright,
        dark,
    }
}

/// Sums sine harmonics into one cycle, normalised to a peak of 1.
fn build_table(sine: &[f32], profile: fn(usize) -> f32, harmonics: usize) -> Vec<f32> {
    let mut table = vec![0.0f32; TABLE_SIZE + 1];
    for h in 0..harmonics {
        let amp = profile(h);
        if amp == 0.0 {
            continue;
        }
        let n = h + 1;
        for (i, t) in table.iter_mut().enumerate().take(TABLE_SIZE) {
            *t += amp * sine[(i * n) % TABLE_SIZE];
        }
    }
    let peak = table.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    if peak > 0.0 {
        table.iter_mut().for_each(|x| *x /= peak);
    }
    table[TABLE_SIZE] = table[0];
    table
}

#[inline(always)]
fn lookup(table: &[f32], phase: f32) -> f32 {
    let i = phase as usize;
    let frac = phase - i as f32;
    let a = table[i];
    a + (table[i + 1] - a) * frac
}

#[inline(always)]
fn advance(phase: &mut f32, inc: f32) {
    *phase += inc;
    while *phase >= TABLE_SIZE as f32 {
        *phase -= TABLE_SIZE as f32;
    }
}

/// One sounding note.
struct Voice {
    patch: &'static Patch,
    sine: &'static [f32],
    bright: &'static [f32],
    dark: Option<&'static [f32]>,
    /// Table positions per sample at the nominal pitch.
    inc: f32,
    phase: f32,
    phase2: f32,
    amp: f32,
    /// Samples since onset.
    age: u32,
    attack_len: u32,
    /// Distance of the envelope above sustain, decaying by `decay_coef`.
    env_excess: f32,
    decay_coef: f32,
    /// Bright-table weight minus its final value, decaying by `bright_coef`.
    bright_excess: f32,
    bright_coef: f32,
    lfo_phase: f32,
    lfo_inc: f32,
    partial_phase: f32,
    partial_inc: f32,
    partial_amp: f32,
    partial_coef: f32,
    noise_state: u32,
    noise_lp: f32,
    /// Samples left in the release, when the note has ended.
    release_left: Option<usize>,
}

impl Voice {
    fn new(
        tables: &'static Tables,
        instrument: Instrument,
        pitch: u8,
        velocity: Velocity,
        frame: usize,
    ) -> Voice {
        let i = instrument.index();
        debug_assert!(i < NUM_INSTRUMENTS);
        let patch = &tables.patches[i];
        let band = ((pitch - PITCH_LOW) / 12) as usize;
        let sr = SAMPLE_RATE as f32;
        let hz = pitch_hz(pitch);
        let decay = if patch.pitch_scaled_decay {
            patch.decay * 2f32.powf(-(f32::from(pitch) - 60.0) / 24.0)
        } else {
            patch.decay
        };
        let velocity_gain = match velocity {
            Velocity::Soft => SOFT_GAIN,
            Velocity::Loud => LOUD_GAIN,
        };
        // Keep the sum of all components within the note's peak level.
        let components = 1.0 + patch.partial.map_or(0.0, |p| p.1) + patch.noise;
        let (b0, b_final, b_tau) = patch.brightness;
        let lfo_hz = patch.vibrato.map(|v| v.0).or(patch.tremolo.map(|t| t.0));
        let partial = patch.partial;
        Voice {
            patch,
            sine: &tables.sine,
            bright: &tables.bright[i][band],
            dark: tables.dark[i].as_ref().map(|d| d[band].as_slice()),
            inc: hz * TABLE_SIZE as f32 / sr,
            phase: 0.0,
            phase2: 0.0,
            amp: velocity_gain / components,
            age: 0,
            attack_len: ((patch.attack * sr) as u32).max(16),
            env_excess: 1.0 - patch.sustain,
            decay_coef: (-1.0 / (decay * sr)).exp(),
            bright_excess: b0 - b_final,
            bright_coef: (-1.0 / (b_tau * sr)).exp(),
            lfo_phase: 0.0,
            lfo_inc: lfo_hz.map_or(0.0, |hz| hz * TABLE_SIZE as f32 / sr),
            partial_phase: 0.0,
            partial_inc: partial.map_or(0.0, |p| {
                (hz * p.0 * TABLE_SIZE as f32 / sr).min(TABLE_SIZE as f32 * 0.45)
            }),
            partial_amp: partial.map_or(0.0, |p| p.1),
            partial_coef: partial.map_or(0.0, |p| (-1.0 / (p.2 * sr)).exp()),
            noise_state: seed(frame, pitch, i),
            noise_lp: 0.0,
            release_left: None,
        }
    }

    fn into_release(mut self) -> Voice {
        self.release_left = Some(RELEASE_SAMPLES);
        self
    }

    /// Adds this voice into `buf`; returns true once a release has finished.
    fn render_into(&mut self, buf: &mut [f32]) -> bool {
        let p = self.patch;
        let (_, b_final, _) = p.brightness;
        let sr = SAMPLE_RATE as f32;
        for s in buf.iter_mut() {
            let release_gain = match self.release_left {
                Some(0) => return true,
                Some(left) => {
                    self.release_left = Some(left - 1);
                    left as f32 / RELEASE_SAMPLES as f32
                }
                None => 1.0,
            };
            // Envelope.
            let env = if self.age < self.attack_len {
                self.age as f32 / self.attack_len as f32
            } else {
                self.env_excess *= self.decay_coef;
                p.sustain + self.env_excess
            };
            // Pitch and amplitude modulation.
            let mut inc = self.inc;
            let mut trem = 1.0;
            if self.lfo_inc > 0.0 {
                let lfo = lookup(self.sine, self.lfo_phase);
                advance(&mut self.lfo_phase, self.lfo_inc);
                if let Some((_, depth, fade)) = p.vibrato {
                    let ramp = (self.age as f32 / (fade * sr)).min(1.0);
                    inc *= 1.0 + depth * ramp * lfo;
                }
                if let Some((_, depth)) = p.tremolo {
                    trem = 1.0 - depth * 0.5 * (1.0 + lfo);
                }
            }
            // Oscillators.
            let mut x = lookup(self.bright, self.phase);
            if let Some(dark) = self.dark {
                let w = b_final + self.bright_excess;
                self.bright_excess *= self.bright_coef;
                x = w * x + (1.0 - w) * lookup(dark, self.phase);
            }
            advance(&mut self.phase, inc);
            if let Some(ratio) = p.detune {
                let x2 = lookup(self.bright, self.phase2);
                advance(&mut self.phase2, inc * ratio);
                x = 0.5 * (x + x2);
            }
            if self.partial_amp > 1e-5 {
                x += self.partial_amp * lookup(self.sine, self.partial_phase);
                advance(&mut self.partial_phase, self.partial_inc);
                self.partial_amp *= self.partial_coef;
            }
            if p.noise > 0.0 {
                self.noise_state ^= self.noise_state << 13;
                self.noise_state ^= self.noise_state >> 17;
                self.noise_state ^= self.noise_state << 5;
                let white = (self.noise_state as f32 / u32::MAX as f32) * 2.0 - 1.0;
                self.noise_lp += 0.25 * (white - self.noise_lp);
                // The low-passed noise has a small RMS; scale it back up.
                x += p.noise * 2.5 * self.noise_lp;
            }
            *s += x * env * trem * release_gain * self.amp;
            self.age = self.age.saturating_add(1);
        }
        self.release_left == Some(0)
    }
}

/// A nonzero xorshift seed that depends only on the note's onset frame,
/// pitch and instrument, so noise is reproducible bit for bit.
fn seed(frame: usize, pitch: u8, instrument: usize) -> u32 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for v in [frame as u64, u64::from(pitch), instrument as u64] {
        h ^= v;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 31;
    }
    (h as u32) | 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BOS, HOLD, PITCH_HIGH, REST, VOCAB_SIZE};

    fn note(instrument: Instrument, pitch: u8, velocity: Velocity) -> u32 {
        Token::note(instrument, pitch, velocity).unwrap().id()
    }

    /// A note held for `frames` frames.
    fn held(instrument: Instrument, pitch: u8, velocity: Velocity, frames: usize) -> Vec<u32> {
        let mut t = vec![note(instrument, pitch, velocity)];
        t.resize(frames, HOLD);
        t
    }

    /// Amplitude of the component at `hz` in `x`, by a direct DFT with a Hann window.
    fn dft_amplitude(x: &[f32], hz: f32) -> f32 {
        let n = x.len();
        let (mut re, mut im) = (0.0f64, 0.0f64);
        for (i, &s) in x.iter().enumerate() {
            let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos();
            let ph = 2.0 * std::f64::consts::PI * f64::from(hz) * i as f64 / f64::from(SAMPLE_RATE);
            re += w * f64::from(s) * ph.cos();
            im += w * f64::from(s) * ph.sin();
        }
        ((re * re + im * im).sqrt() / n as f64) as f32
    }

    fn rms(x: &[f32]) -> f32 {
        (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt()
    }

    #[test]
    fn length_is_one_frame_of_samples_per_token() {
        for n in [0, 1, 7, 250] {
            let tokens: Vec<u32> = (0..n).map(|i| (i * 37 % VOCAB_SIZE) as u32).collect();
            assert_eq!(render(&tokens).unwrap().len(), n * SAMPLES_PER_FRAME);
        }
    }

    #[test]
    fn rendering_is_deterministic_bit_for_bit() {
        let tokens: Vec<u32> = (0..300u32)
            .map(|i| (i * 7919 + 13) % VOCAB_SIZE as u32)
            .collect();
        let a = render(&tokens).unwrap();
        let b = render(&tokens).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(rms(&a) > 0.01, "the sequence should make sound");
    }

    #[test]
    fn every_id_renders_finite_samples_within_range() {
        for id in 0..VOCAB_SIZE as u32 {
            // Onset, holds, a rest (release), and a dangling hold.
            let samples = render(&[id, HOLD, HOLD, REST, HOLD]).unwrap();
            assert!(
                samples
                    .iter()
                    .all(|s| s.is_finite() && (-1.0..=1.0).contains(s)),
                "id {id}"
            );
        }
        // Every pair of adjacent notes, loud, back to back, overlapping with release tails.
        let all: Vec<u32> = (3..VOCAB_SIZE as u32).collect();
        let samples = render(&all).unwrap();
        assert!(
            samples
                .iter()
                .all(|s| s.is_finite() && (-1.0..=1.0).contains(s))
        );
    }

    #[test]
    fn out_of_vocabulary_id_is_an_error() {
        let err = render(&[REST, VOCAB_SIZE as u32 + 5]).unwrap_err();
        assert!(matches!(err, CodecError::OutOfVocabulary { id: 776 }));
    }

    #[test]
    fn rests_bos_and_orphan_holds_are_silent() {
        let samples = render(&[BOS, REST, HOLD, HOLD, REST, BOS, HOLD]).unwrap();
        assert!(samples.iter().all(|&s| s == 0.0));
    }

    #[test]
    fn a_rest_after_a_note_is_silent_once_the_release_is_over() {
        let mut tokens = held(Instrument::Synth, 60, Velocity::Loud, 3);
        tokens.extend([REST, REST]);
        let s = render(&tokens).unwrap();
        let rest = &s[3 * SAMPLES_PER_FRAME..];
        assert!(
            rest[..RELEASE_SAMPLES].iter().any(|&x| x != 0.0),
            "release tail"
        );
        assert!(rest[RELEASE_SAMPLES..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn notes_end_without_clicks() {
        // Smooth timbres, where a cut-off would be the largest sample-to-sample step.
        for instrument in [Instrument::Flute, Instrument::Violin, Instrument::Marimba] {
            let mut tokens = held(instrument, 72, Velocity::Loud, 3);
            tokens.extend([REST, REST]);
            let s = render(&tokens).unwrap();
            let max_step = |x: &[f32]| {
                x.windows(2)
                    .map(|w| (w[1] - w[0]).abs())
                    .fold(0.0, f32::max)
            };
            let end = 3 * SAMPLES_PER_FRAME;
            let steady = max_step(&s[end - SAMPLES_PER_FRAME..end]);
            let ending = max_step(&s[end - 1..end + SAMPLES_PER_FRAME]);
            assert!(
                ending <= steady * 1.05 + 1e-4,
                "{instrument}: {ending} vs {steady}"
            );
        }
    }

    #[test]
    fn holds_continue_the_note_and_decaying_notes_keep_decaying() {
        let s = render(&held(Instrument::Piano, 60, Velocity::Loud, 20)).unwrap();
        let frame_rms: Vec<f32> = s.chunks(SAMPLES_PER_FRAME).map(rms).collect();
        assert!(frame_rms.iter().all(|&r| r > 0.0));
        assert!(frame_rms[2] > frame_rms[10] && frame_rms[10] > frame_rms[19]);
        // A sustained instrument holds its level.
        let s = render(&held(Instrument::Accordion, 60, Velocity::Loud, 20)).unwrap();
        let frame_rms: Vec<f32> = s.chunks(SAMPLES_PER_FRAME).map(rms).collect();
        assert!(frame_rms[19] > 0.8 * frame_rms[5]);
    }

    #[test]
    fn hold_is_phase_continuous() {
        // One note held for two frames equals the same note rendered over two frames:
        // there is no restart at the frame boundary.
        let s = render(&held(Instrument::Flute, 69, Velocity::Soft, 2)).unwrap();
        let boundary = SAMPLES_PER_FRAME;
        let step = (s[boundary] - s[boundary - 1]).abs();
        let typical = s[boundary - 50..boundary]
            .windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .fold(0.0, f32::max);
        assert!(step <= typical * 1.5 + 1e-3, "step {step} vs {typical}");
    }

    #[test]
    fn loud_is_louder_than_soft_by_6_to_9_db() {
        for instrument in Instrument::ALL {
            let loud = rms(&render(&held(instrument, 60, Velocity::Loud, 10)).unwrap());
            let soft = rms(&render(&held(instrument, 60, Velocity::Soft, 10)).unwrap());
            let db = 20.0 * (loud / soft).log10();
            assert!((6.0..=9.0).contains(&db), "{instrument}: {db} dB");
        }
    }

    #[test]
    fn rendered_pitch_is_the_note_pitch() {
        // There is energy at the fundamental and none between harmonics.
        for instrument in Instrument::ALL {
            for pitch in [PITCH_LOW, 60, PITCH_HIGH] {
                let s = render(&held(instrument, pitch, Velocity::Loud, 8)).unwrap();
                let seg = &s[SAMPLES_PER_FRAME..6 * SAMPLES_PER_FRAME];
                let f = pitch_hz(pitch);
                let on = dft_amplitude(seg, f);
                // Half an octave away lies no harmonic of the note.
                let off =
                    dft_amplitude(seg, f * 2f32.sqrt()).max(dft_amplitude(seg, f / 2f32.sqrt()));
                assert!(on > 3.0 * off, "{instrument} at {pitch}: {on} vs {off}");
            }
        }
    }

    /// Harmonic profile in dB relative to the fundamental, for harmonics 2..=8.
    fn harmonic_profile(instrument: Instrument) -> Vec<f32> {
        let pitch = 48; // C3: eight harmonics stay well below Nyquist.
        let s = render(&held(instrument, pitch, Velocity::Loud, 10)).unwrap();
        let seg = &s[2 * SAMPLES_PER_FRAME..7 * SAMPLES_PER_FRAME];
        let f = pitch_hz(pitch);
        let fundamental = dft_amplitude(seg, f);
        (2..=8)
            .map(|h| {
                let a = dft_amplitude(seg, f * h as f32);
                20.0 * ((a + 1e-6) / fundamental).log10()
            })
            .collect()
    }

    #[test]
    fn instruments_have_clearly_different_spectra() {
        let profiles: Vec<Vec<f32>> = Instrument::ALL
            .iter()
            .map(|&i| harmonic_profile(i))
            .collect();
        for a in 0..profiles.len() {
            for b in a + 1..profiles.len() {
                // Largest per-harmonic level difference, floored at -60 dB so
                // that two near-empty harmonics don't count as a difference.
                let diff = profiles[a]
                    .iter()
                    .zip(&profiles[b])
                    .map(|(x, y)| (x.max(-60.0) - y.max(-60.0)).abs())
                    .fold(0.0, f32::max);
                assert!(
                    diff > 6.0,
                    "{} vs {}: spectra differ by only {diff} dB\n{:?}\n{:?}",
                    Instrument::ALL[a],
                    Instrument::ALL[b],
                    profiles[a],
                    profiles[b]
                );
            }
        }
    }
}

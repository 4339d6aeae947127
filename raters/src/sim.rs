//! Simulated raters: the latent quality of a clip, and a population of
//! personas whose tastes differ around a shared mean.
//!
//! Everything here reads only tokens (through [`encore_corpus::analyze`] and
//! a few measurements of its own), so it judges corpus clips, corrupted
//! clips and policy samples alike.
//!
//! - [`quality`]: the 1-5 score a perfect listener would give, from audible
//!   defects: wrong notes (out of key, on a stray instrument, reached by a
//!   leap wider than an octave, off any tempo grid), gaps that the rhythm
//!   does not explain, and too much silence.
//! - [`Persona::utility`]: how much one rater likes a clip for a prompt:
//!   prompt adherence + quality + taste. Taste is what MusicRL found
//!   adherence and quality miss: here, the instrument, the register
//!   (brightness), the loudness and the note rate, all easy to hear in a
//!   log-mel spectrogram, so an audio reward model can learn them.
//! - [`Persona::rate`] (quality only, like MOS) and [`Persona::prefer`]
//!   (Bradley-Terry on the utility difference, with ties and skips).
//!
//! The population means and spreads are the constants below; their effect on
//! generated data (ceilings, label mix) is reported in `docs/datasets.md`.

use encore_codec::{Instrument, NUM_INSTRUMENTS, Token};
use encore_corpus::{Analysis, Attributes, Mentioned, Mode, Tempo, analyze};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::records::Choice;
use crate::{normal, stream};

// ---- Quality: quality = 1 + 4 exp(-penalty) ----
//
// A glitch note is usually wrong in several ways at once (stray instrument,
// out of key, a leap, off the beat); scoring each note once, by the union of
// its defects, keeps one glitch from costing four times.

/// How wrong an out-of-key note sounds, in `[0, 1]`.
pub const OUT_OF_KEY_WEIGHT: f32 = 0.7;
/// How wrong a note on a stray instrument (not the clip's main one) sounds.
pub const STRAY_INSTRUMENT_WEIGHT: f32 = 0.8;
/// How wrong a note reached by a leap wider than [`LEAP_LIMIT`] sounds.
pub const LEAP_WEIGHT: f32 = 0.6;
/// How wrong a note off the beat grid sounds.
pub const OFF_GRID_WEIGHT: f32 = 0.5;
/// Penalty per unit of wrong-note fraction: one stray-instrument note in
/// ten costs 0.24, a quality of 4.1 if nothing else is wrong.
pub const WRONG_NOTE_PENALTY: f32 = 3.0;
/// Penalty per unit of frames in gaps (see [`Features::gap_fraction`]).
pub const GAP_PENALTY: f32 = 3.0;
/// Penalty per unit of rest fraction above [`REST_ALLOWANCE`].
pub const REST_PENALTY: f32 = 4.0;
/// Rest fraction that staccato playing explains: up to here silence is
/// articulation, not a defect.
pub const REST_ALLOWANCE: f32 = 0.55;
/// A silence is heard as a gap beyond `GAP_IOI_FACTOR` times the clip's
/// median time between onsets (a staccato note rests at most about half of
/// a long note's span) ...
pub const GAP_IOI_FACTOR: f32 = 1.5;
/// ... and never before [`GAP_MIN_FRAMES`] frames (a third of a second).
pub const GAP_MIN_FRAMES: usize = 8;
/// Widest interval (semitones) between neighbouring notes that is not a
/// glitch: a corpus melody spans an octave (a semitone more with the raised
/// leading tone of a minor key).
pub const LEAP_LIMIT: u8 = 13;

// ---- Utility: population means and per-persona spreads ----

/// Mean weight of prompt adherence (in `[0, 1]`) in the utility.
pub const ADHERENCE_WEIGHT: f32 = 2.0;
/// Mean weight of `(quality - 3) / 2` (in `[-1, 1]`) in the utility.
pub const QUALITY_WEIGHT: f32 = 1.0;
/// Relative (log-normal) spread of a persona's adherence and quality weights.
pub const WEIGHT_SPREAD: f32 = 0.2;
/// Population mean liking of each instrument, in `Instrument::ALL` order:
/// piano, guitar, violin, flute, accordion, marimba, trumpet, synth.
/// Timbre is the easiest thing to hear: the warm, familiar instruments are
/// liked, the reedy accordion and the buzzy synth lead are not.
pub const INSTRUMENT_AFFINITY: [f32; NUM_INSTRUMENTS] = [0.9, 0.5, 0.6, 0.3, -0.9, 0.0, -0.1, -0.8];
/// Spread of a persona's liking of each instrument around the mean.
pub const INSTRUMENT_SPREAD: f32 = 0.3;
/// Weight of the register term: `REGISTER_WEIGHT * bump(median pitch)`.
pub const REGISTER_WEIGHT: f32 = 1.5;
/// Mean preferred median MIDI pitch (E4: between the middle and high
/// registers; the low register, around A2, sounds muddy).
pub const PREFERRED_PITCH: f32 = 64.0;
/// Spread of a persona's preferred pitch, semitones.
pub const PITCH_SPREAD: f32 = 4.0;
/// Width (sd of the Gaussian bump) of the register preference, semitones.
pub const PITCH_WIDTH: f32 = 9.0;
/// Mean utility of all-loud over all-soft playing, per unit loud fraction.
pub const LOUDNESS_WEIGHT: f32 = 0.6;
/// Spread of a persona's loudness preference (some prefer soft playing).
pub const LOUDNESS_SPREAD: f32 = 0.4;
/// Weight of the note-rate term: `RATE_WEIGHT * bump(log2 notes per second)`.
pub const RATE_WEIGHT: f32 = 1.0;
/// Mean preferred note rate, log2 notes per second (3 notes a second; the
/// corpus spans about 0.6 to 10).
pub const PREFERRED_RATE: f32 = 1.585;
/// Spread of a persona's preferred note rate, octaves.
pub const RATE_SPREAD: f32 = 0.4;
/// Width of the note-rate preference, octaves.
pub const RATE_WIDTH: f32 = 1.0;

// ---- Answers ----

/// Mean temperature of the logistic choice, in utility units: a utility
/// difference of one temperature is chosen 73% of the time.
pub const TEMPERATURE: f32 = 0.5;
/// Relative (log-normal) spread of a persona's temperature.
pub const TEMPERATURE_SPREAD: f32 = 0.25;
/// Mean utility difference below which a persona may answer "tie".
pub const TIE_THRESHOLD: f32 = 0.15;
/// Probability of "tie" when the difference is below the threshold.
pub const TIE_PROBABILITY: f64 = 0.5;
/// Probability of "skip": the rater did not listen.
pub const SKIP_PROBABILITY: f64 = 0.05;
/// Spread of a persona's rating bias, in rating points.
pub const RATING_BIAS_SPREAD: f32 = 0.3;
/// Per-rating noise, in rating points.
pub const RATING_NOISE: f32 = 0.6;

/// Stream domains of the persona pools.
const DOMAIN_POOL: u64 = 0x7261_7465_7200_0001;
const DOMAIN_HELD_OUT: u64 = 0x6865_6c64_0000_0002;
const DOMAIN_SHIFTED: u64 = 0x7368_6966_7400_0003;

/// The means a population's personas are drawn around (each persona
/// spreads around them by the `*_SPREAD` constants).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tastes {
    /// Mean weight of prompt adherence.
    pub adherence_weight: f32,
    /// Mean weight of `(quality - 3) / 2`.
    pub quality_weight: f32,
    /// Mean liking of each instrument, in `Instrument::ALL` order.
    pub instrument_affinity: [f32; NUM_INSTRUMENTS],
    /// Mean preferred median MIDI pitch.
    pub preferred_pitch: f32,
    /// Mean utility per unit loud fraction.
    pub loudness: f32,
    /// Mean preferred note rate, log2 notes per second.
    pub preferred_rate: f32,
}

impl Tastes {
    /// The population every dataset is labelled by, and the first
    /// held-out judge: the constants above.
    pub const TRAINING: Tastes = Tastes {
        adherence_weight: ADHERENCE_WEIGHT,
        quality_weight: QUALITY_WEIGHT,
        instrument_affinity: INSTRUMENT_AFFINITY,
        preferred_pitch: PREFERRED_PITCH,
        loudness: LOUDNESS_WEIGHT,
        preferred_rate: PREFERRED_RATE,
    };

    /// Another audience, for a judge that shares none of the training
    /// population's means: it weighs getting what it asked for more
    /// (adherence 3 instead of 2) and polish less (0.7 instead of 1),
    /// likes the instruments the training raters dislike (accordion,
    /// synth, marimba) and is lukewarm on piano, prefers a lower register
    /// (A3 instead of E4), soft playing, and slower lines (2 notes a
    /// second instead of 3).
    pub const SHIFTED: Tastes = Tastes {
        adherence_weight: 3.0,
        quality_weight: 0.7,
        instrument_affinity: [0.1, 0.4, 0.2, 0.0, 0.6, 0.7, 0.2, 0.5],
        preferred_pitch: 57.0,
        loudness: -0.3,
        preferred_rate: 1.0,
    };
}

/// Everything the raters hear in a clip: the attribute analysis plus the
/// defect and taste measurements it lacks. Compute it once per clip and
/// reuse it across personas.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// The attribute analysis of the clip.
    pub analysis: Analysis,
    /// Fraction of onsets per instrument, in `Instrument::ALL` order (all
    /// zero without onsets).
    pub instrument_fractions: [f32; NUM_INSTRUMENTS],
    /// Fraction of onsets in key, for the key that fits best (1 without onsets).
    pub in_key: f32,
    /// Fraction of onsets reached by a leap wider than [`LEAP_LIMIT`]
    /// (a spike out and straight back counts once).
    pub leap_fraction: f32,
    /// Fraction of onsets off the sixteenth-note grid of the tempo and phase
    /// that fits best.
    pub off_grid_fraction: f32,
    /// Mean over onsets of how wrong each sounds, in `[0, 1]`: the union of
    /// its defects (out of key, stray instrument, leap, off grid), weighted
    /// by the `*_WEIGHT` constants.
    pub wrong_note_fraction: f32,
    /// Fraction of frames by which silences overrun what the clip's rhythm
    /// explains ([`GAP_IOI_FACTOR`], [`GAP_MIN_FRAMES`]): dropouts.
    pub gap_fraction: f32,
    /// Onsets per second (25 frames).
    pub notes_per_second: f32,
    /// Latent quality in `[1, 5]`; see [`quality`].
    pub quality: f32,
}

/// One onset as the quality model hears it.
struct Note {
    frame: usize,
    instrument: Instrument,
    pitch: u8,
}

impl Features {
    /// Measures a clip. Any ids are accepted, as by [`analyze`].
    pub fn of(tokens: &[u32]) -> Features {
        let analysis = analyze(tokens);
        let mut notes: Vec<Note> = Vec::new();
        let mut silences: Vec<usize> = Vec::new();
        let (mut sounding, mut silent_run) = (false, 0usize);
        for (frame, &id) in tokens.iter().enumerate() {
            // Silence as `analyze` counts it: rests, Bos, unknown ids, and
            // holds with nothing sounding.
            let silent = match Token::from_id(id) {
                Ok(Token::Note {
                    instrument, pitch, ..
                }) => {
                    notes.push(Note {
                        frame,
                        instrument,
                        pitch,
                    });
                    sounding = true;
                    false
                }
                Ok(Token::Hold) if sounding => false,
                _ => {
                    sounding = false;
                    true
                }
            };
            if silent {
                silent_run += 1;
            } else if silent_run > 0 {
                silences.push(silent_run);
                silent_run = 0;
            }
        }
        if silent_run > 0 {
            silences.push(silent_run);
        }

        let n = notes.len();
        let frames = tokens.len().max(1) as f32;
        let fraction = |count: usize| if n == 0 { 0.0 } else { count as f32 / n as f32 };
        let mut instrument_fractions = [0.0f32; NUM_INSTRUMENTS];
        for note in &notes {
            instrument_fractions[note.instrument.index()] += 1.0 / n as f32;
        }
        let main_instrument = analysis.instrument;
        let out_of_key = out_of_key_flags(&notes);
        let leaps = leap_flags(&notes);
        let off_grid = off_grid_flags(&notes);
        let wrong: f32 = (0..n)
            .map(|i| {
                let fine = [
                    (out_of_key[i], OUT_OF_KEY_WEIGHT),
                    (
                        Some(notes[i].instrument) != main_instrument,
                        STRAY_INSTRUMENT_WEIGHT,
                    ),
                    (leaps[i], LEAP_WEIGHT),
                    (off_grid[i], OFF_GRID_WEIGHT),
                ]
                .iter()
                .filter(|(flag, _)| *flag)
                .map(|(_, w)| 1.0 - w)
                .product::<f32>();
                1.0 - fine
            })
            .sum();
        let count = |flags: &[bool]| flags.iter().filter(|&&f| f).count();

        let mut iois: Vec<usize> = notes.windows(2).map(|w| w[1].frame - w[0].frame).collect();
        iois.sort_unstable();
        let median_ioi = iois.get(iois.len() / 2).copied().unwrap_or(0);
        let allowance = GAP_MIN_FRAMES.max((GAP_IOI_FACTOR * median_ioi as f32).round() as usize);
        let excess: usize = silences.iter().map(|&s| s.saturating_sub(allowance)).sum();

        let mut features = Features {
            instrument_fractions,
            in_key: 1.0 - fraction(count(&out_of_key)),
            leap_fraction: fraction(count(&leaps)),
            off_grid_fraction: fraction(count(&off_grid)),
            wrong_note_fraction: if n == 0 { 0.0 } else { wrong / n as f32 },
            gap_fraction: excess as f32 / frames,
            notes_per_second: n as f32 * encore_codec::FRAME_RATE as f32 / frames,
            quality: 1.0,
            analysis,
        };
        features.quality = features.latent_quality();
        features
    }

    /// Sum of the weighted defects: 0 for a flawless clip.
    pub fn defect_penalty(&self) -> f32 {
        WRONG_NOTE_PENALTY * self.wrong_note_fraction
            + GAP_PENALTY * self.gap_fraction
            + REST_PENALTY * (self.analysis.rest_fraction - REST_ALLOWANCE).max(0.0)
    }

    fn latent_quality(&self) -> f32 {
        if self.analysis.onsets == 0 {
            return 1.0;
        }
        1.0 + 4.0 * (-self.defect_penalty()).exp()
    }
}

/// Per note: out of the key (tonic and mode) that holds the most notes.
fn out_of_key_flags(notes: &[Note]) -> Vec<bool> {
    let mut best: Option<(usize, u8, Mode)> = None;
    for tonic in 0..12u8 {
        for mode in Mode::ALL {
            let in_key = notes
                .iter()
                .filter(|n| mode.in_key((n.pitch % 12 + 12 - tonic) % 12))
                .count();
            if best.is_none_or(|(b, _, _)| in_key > b) {
                best = Some((in_key, tonic, mode));
            }
        }
    }
    let Some((_, tonic, mode)) = best else {
        return Vec::new();
    };
    notes
        .iter()
        .map(|n| !mode.in_key((n.pitch % 12 + 12 - tonic) % 12))
        .collect()
}

/// Per note: reached by a leap wider than [`LEAP_LIMIT`], except the note
/// that returns from a one-note spike (the spike itself is flagged).
fn leap_flags(notes: &[Note]) -> Vec<bool> {
    let leap = |i: usize| notes[i].pitch.abs_diff(notes[i - 1].pitch) > LEAP_LIMIT;
    let mut flags = vec![false; notes.len()];
    for i in 1..notes.len() {
        let returning = i >= 2 && leap(i - 1) && flags[i - 1];
        flags[i] = leap(i) && !returning;
    }
    flags
}

/// Per note: off the sixteenth-note grid of the tempo and phase under which
/// the most onsets fall on the grid (none flagged below 2 notes).
fn off_grid_flags(notes: &[Note]) -> Vec<bool> {
    if notes.len() < 2 {
        return vec![false; notes.len()];
    }
    let mut best: (usize, Vec<bool>) = (0, Vec::new());
    for tempo in Tempo::ALL {
        let beat = tempo.beat_frames();
        let mut on_grid = vec![false; beat];
        for k in 0..4 {
            on_grid[tempo.sixteenth_frame(k) % beat] = true;
        }
        for phase in 0..beat {
            let hits = notes
                .iter()
                .filter(|n| on_grid[(n.frame + beat - phase) % beat])
                .count();
            if hits > best.0 || best.1.is_empty() {
                let flags = notes
                    .iter()
                    .map(|n| !on_grid[(n.frame + beat - phase) % beat])
                    .collect();
                best = (hits, flags);
            }
        }
    }
    best.1
}

/// Latent audio quality of a clip in `[1, 5]`: what a perfect listener
/// would rate it. `1 + 4 exp(-penalty)`, the penalty a weighted sum of
/// audible defects (see [`Features::defect_penalty`]): wrong notes, gaps,
/// too much silence. It falls smoothly from 5 for a clean clip towards 1; a
/// clip without notes is 1.
pub fn quality(tokens: &[u32]) -> f32 {
    Features::of(tokens).quality
}

/// A Gaussian bump: 1 at `centre`, falling with `width`.
fn bump(x: f32, centre: f32, width: f32) -> f32 {
    let z = (x - centre) / width;
    (-0.5 * z * z).exp()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// A persona's utility of one clip, term by term; the terms sum to
/// [`Persona::utility_of`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UtilityParts {
    /// `adherence_weight * adherence`.
    pub adherence: f32,
    /// `quality_weight * (quality - 3) / 2`.
    pub quality: f32,
    /// Liking of the instruments played.
    pub instrument: f32,
    /// Closeness of the median pitch to the preferred one.
    pub register: f32,
    /// Liking of loud or soft playing.
    pub loudness: f32,
    /// Closeness of the note rate to the preferred one.
    pub rate: f32,
}

impl UtilityParts {
    /// The taste terms: instrument, register, loudness and note rate.
    pub fn taste(&self) -> f32 {
        self.instrument + self.register + self.loudness + self.rate
    }

    /// The terms in field order: adherence, quality, instrument, register,
    /// loudness, note rate.
    pub fn terms(&self) -> [f32; 6] {
        [
            self.adherence,
            self.quality,
            self.instrument,
            self.register,
            self.loudness,
            self.rate,
        ]
    }

    /// The whole utility.
    pub fn total(&self) -> f32 {
        self.adherence + self.quality + self.taste()
    }
}

/// One rater's tastes and habits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persona {
    /// Rater id as written in records ("r17"; "h17" for held-out raters).
    pub id: String,
    /// Added to the latent quality before rating (harsh or lenient raters).
    pub rating_bias: f32,
    /// Weight of prompt adherence in the utility.
    pub adherence_weight: f32,
    /// Weight of `(quality - 3) / 2` in the utility.
    pub quality_weight: f32,
    /// Liking of each instrument, in `Instrument::ALL` order.
    pub instrument_affinity: [f32; NUM_INSTRUMENTS],
    /// Preferred median MIDI pitch.
    pub preferred_pitch: f32,
    /// Utility per unit loud fraction (negative: prefers soft playing).
    pub loudness: f32,
    /// Preferred note rate, log2 notes per second.
    pub preferred_rate: f32,
    /// Temperature of the logistic choice, in utility units.
    pub temperature: f32,
    /// Utility difference below which the persona may answer "tie".
    pub tie_threshold: f32,
}

impl Persona {
    /// The persona with exactly the population's mean tastes and no bias.
    pub fn typical() -> Persona {
        Persona {
            id: "typical".into(),
            rating_bias: 0.0,
            adherence_weight: ADHERENCE_WEIGHT,
            quality_weight: QUALITY_WEIGHT,
            instrument_affinity: INSTRUMENT_AFFINITY,
            preferred_pitch: PREFERRED_PITCH,
            loudness: LOUDNESS_WEIGHT,
            preferred_rate: PREFERRED_RATE,
            temperature: TEMPERATURE,
            tie_threshold: TIE_THRESHOLD,
        }
    }

    /// A persona drawn around the means `tastes`.
    fn sample(id: String, tastes: &Tastes, rng: &mut impl Rng) -> Persona {
        let log_normal = |rng: &mut _, mean: f32, spread: f32| mean * (spread * normal(rng)).exp();
        let rating_bias = RATING_BIAS_SPREAD * normal(rng);
        let adherence_weight = log_normal(rng, tastes.adherence_weight, WEIGHT_SPREAD);
        let quality_weight = log_normal(rng, tastes.quality_weight, WEIGHT_SPREAD);
        let mut instrument_affinity = tastes.instrument_affinity;
        for a in &mut instrument_affinity {
            *a += INSTRUMENT_SPREAD * normal(rng);
        }
        Persona {
            id,
            rating_bias,
            adherence_weight,
            quality_weight,
            instrument_affinity,
            preferred_pitch: tastes.preferred_pitch + PITCH_SPREAD * normal(rng),
            loudness: tastes.loudness + LOUDNESS_SPREAD * normal(rng),
            preferred_rate: tastes.preferred_rate + RATE_SPREAD * normal(rng),
            temperature: log_normal(rng, TEMPERATURE, TEMPERATURE_SPREAD),
            tie_threshold: log_normal(rng, TIE_THRESHOLD, 0.3),
        }
    }

    /// How much the persona likes `tokens` as an answer to the prompt
    /// described by `attrs` and `mentioned`:
    /// `w_adh * adherence + w_q * (quality - 3) / 2 + taste`.
    pub fn utility(&self, attrs: &Attributes, mentioned: &Mentioned, tokens: &[u32]) -> f32 {
        self.utility_of(attrs, mentioned, &Features::of(tokens))
    }

    /// [`Persona::utility`] of a clip already measured.
    pub fn utility_of(&self, attrs: &Attributes, mentioned: &Mentioned, clip: &Features) -> f32 {
        self.utility_parts(attrs, mentioned, clip).total()
    }

    /// The part of the utility that neither adherence nor quality explains:
    /// instrument, register, loudness and note rate. 0 without notes.
    pub fn taste(&self, clip: &Features) -> f32 {
        self.taste_terms(clip).taste()
    }

    /// [`Persona::utility_of`] term by term: what a change in utility is
    /// made of.
    pub fn utility_parts(
        &self,
        attrs: &Attributes,
        mentioned: &Mentioned,
        clip: &Features,
    ) -> UtilityParts {
        UtilityParts {
            adherence: self.adherence_weight * clip.analysis.prompt_adherence(attrs, mentioned),
            quality: self.quality_weight * (clip.quality - 3.0) / 2.0,
            ..self.taste_terms(clip)
        }
    }

    /// The taste terms of [`UtilityParts`], the others 0.
    fn taste_terms(&self, clip: &Features) -> UtilityParts {
        let a = &clip.analysis;
        let Some(median) = a.median_pitch else {
            return UtilityParts::default();
        };
        let instrument: f32 = clip
            .instrument_fractions
            .iter()
            .zip(&self.instrument_affinity)
            .map(|(f, w)| f * w)
            .sum();
        let register = REGISTER_WEIGHT * bump(median, self.preferred_pitch, PITCH_WIDTH);
        let loudness = self.loudness * (a.loud_fraction - 0.5);
        let rate = RATE_WEIGHT
            * bump(
                clip.notes_per_second.max(1e-3).log2(),
                self.preferred_rate,
                RATE_WIDTH,
            );
        UtilityParts {
            instrument,
            register,
            loudness,
            rate,
            ..UtilityParts::default()
        }
    }

    /// A 1-5 rating of the clip's quality, like a MOS listening test:
    /// `round(quality + bias + noise)`, clamped. The prompt is not judged
    /// (it is taken for symmetry with [`Persona::prefer`]).
    pub fn rate(
        &self,
        _attrs: &Attributes,
        _mentioned: &Mentioned,
        tokens: &[u32],
        rng: &mut impl Rng,
    ) -> u8 {
        self.rate_quality(quality(tokens), rng)
    }

    /// [`Persona::rate`] of a clip whose latent quality is known.
    pub fn rate_quality(&self, quality: f32, rng: &mut impl Rng) -> u8 {
        let score = quality + self.rating_bias + RATING_NOISE * normal(rng);
        score.round().clamp(1.0, 5.0) as u8
    }

    /// Which of two clips for one prompt the persona prefers.
    pub fn prefer(
        &self,
        attrs: &Attributes,
        mentioned: &Mentioned,
        a: &[u32],
        b: &[u32],
        rng: &mut impl Rng,
    ) -> Choice {
        self.prefer_of(attrs, mentioned, &Features::of(a), &Features::of(b), rng)
    }

    /// [`Persona::prefer`] of clips already measured. Skips with
    /// [`SKIP_PROBABILITY`]; when the utilities differ by less than the tie
    /// threshold, answers "tie" with [`TIE_PROBABILITY`]; otherwise chooses
    /// `a` with probability `sigmoid((u_a - u_b) / temperature)`.
    pub fn prefer_of(
        &self,
        attrs: &Attributes,
        mentioned: &Mentioned,
        a: &Features,
        b: &Features,
        rng: &mut impl Rng,
    ) -> Choice {
        if rng.random_bool(SKIP_PROBABILITY) {
            return Choice::Skip;
        }
        let diff = self.utility_of(attrs, mentioned, a) - self.utility_of(attrs, mentioned, b);
        if diff.abs() < self.tie_threshold && rng.random_bool(TIE_PROBABILITY) {
            return Choice::Tie;
        }
        if rng.random::<f64>() < sigmoid(f64::from(diff / self.temperature)) {
            Choice::A
        } else {
            Choice::B
        }
    }

    /// Probability of a tie and probability of `a` given a non-tie,
    /// non-skip answer, for a utility difference `u_a - u_b`.
    fn answer_probabilities(&self, diff: f32) -> (f64, f64) {
        let tie = if diff.abs() < self.tie_threshold {
            TIE_PROBABILITY
        } else {
            0.0
        };
        (tie, sigmoid(f64::from(diff / self.temperature)))
    }
}

/// A population of raters: an unbounded, randomly accessible set of
/// personas determined by `seed`, plus a disjoint held-out set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Population {
    /// Seed of both persona streams.
    pub seed: u64,
}

impl Population {
    /// The population of `seed`.
    pub fn new(seed: u64) -> Population {
        Population { seed }
    }

    /// Rater `i` ("r{i}"); the same seed and index always give the same persona.
    pub fn persona(&self, i: u64) -> Persona {
        Persona::sample(
            format!("r{i}"),
            &Tastes::TRAINING,
            &mut stream(self.seed, DOMAIN_POOL, i),
        )
    }

    /// Held-out rater `i` ("h{i}"), from a stream disjoint from
    /// [`Population::persona`]'s: a judge no reward model was trained on,
    /// with the same population means.
    pub fn held_out(&self, i: u64) -> Persona {
        Persona::sample(
            format!("h{i}"),
            &Tastes::TRAINING,
            &mut stream(self.seed, DOMAIN_HELD_OUT, i),
        )
    }

    /// Held-out rater `i` of another audience ("s{i}"): drawn around
    /// [`Tastes::SHIFTED`] from a stream of its own, so it shares neither
    /// personas nor population means with the raters behind the data.
    pub fn shifted(&self, i: u64) -> Persona {
        Persona::sample(
            format!("s{i}"),
            &Tastes::SHIFTED,
            &mut stream(self.seed, DOMAIN_SHIFTED, i),
        )
    }

    /// Raters `0..n`.
    pub fn personas(&self, n: usize) -> Vec<Persona> {
        (0..n as u64).map(|i| self.persona(i)).collect()
    }

    /// Probability that a random rater among `0..n_personas` prefers `a`
    /// over `b`, given that the answer is neither a tie nor a skip. Exact
    /// for that pool (so deterministic), a Monte Carlo estimate for the
    /// whole population.
    pub fn preference_probability(
        &self,
        attrs: &Attributes,
        mentioned: &Mentioned,
        a: &[u32],
        b: &[u32],
        n_personas: usize,
    ) -> f64 {
        preference_probability_among(
            &self.personas(n_personas),
            attrs,
            mentioned,
            &Features::of(a),
            &Features::of(b),
        )
    }
}

/// [`Population::preference_probability`] over a given pool of personas
/// and clips already measured: each persona's probability of `a`, weighted
/// by its probability of not answering "tie". 0.5 for an empty pool.
pub fn preference_probability_among(
    personas: &[Persona],
    attrs: &Attributes,
    mentioned: &Mentioned,
    a: &Features,
    b: &Features,
) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for p in personas {
        let diff = p.utility_of(attrs, mentioned, a) - p.utility_of(attrs, mentioned, b);
        let (tie, p_a) = p.answer_probabilities(diff);
        num += (1.0 - tie) * p_a;
        den += 1.0 - tie;
    }
    if den == 0.0 { 0.5 } else { num / den }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Corruption;
    use encore_codec::{HOLD, REST, Velocity};
    use encore_corpus::{Corpus, Density, Mood, Register, Split, compose};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn note(i: Instrument, pitch: u8) -> u32 {
        Token::note(i, pitch, Velocity::Loud).unwrap().id()
    }

    #[test]
    fn corpus_clips_are_near_perfect() {
        for frames in [100, 250] {
            let corpus = Corpus::new(11, frames);
            let qs: Vec<f32> = corpus
                .batch(Split::Train, 0, 300)
                .iter()
                .map(|x| quality(&x.tokens))
                .collect();
            let min = qs.iter().copied().fold(f32::INFINITY, f32::min);
            let mean = qs.iter().sum::<f32>() / qs.len() as f32;
            assert!(min > 4.5, "{frames} frames: min quality {min}");
            assert!(mean > 4.9, "{frames} frames: mean quality {mean}");
        }
    }

    #[test]
    fn each_defect_lowers_quality() {
        let p = Instrument::Piano;
        // A clean scale on the upbeat grid: C major, 12 frames per beat.
        let mut clean = vec![REST; 96];
        for (k, pitch) in [60, 62, 64, 65, 67, 69, 71, 72].iter().enumerate() {
            clean[k * 12] = note(p, *pitch);
            for t in &mut clean[k * 12 + 1..k * 12 + 12] {
                *t = HOLD;
            }
        }
        let q = quality(&clean);
        assert!(q > 4.99, "{q}");
        let edit = |f: &dyn Fn(&mut Vec<u32>)| {
            let mut t = clean.clone();
            f(&mut t);
            quality(&t)
        };
        let out_of_key = edit(&|t| {
            t[12] = note(p, 61);
            t[36] = note(p, 66);
        });
        let other_instrument = edit(&|t| t[24] = note(Instrument::Synth, 64));
        let dropout = edit(&|t| t[30..72].fill(REST));
        let leap = edit(&|t| t[48] = note(p, 83));
        let off_grid = edit(&|t| t[17] = note(p, 62));
        for (what, v) in [
            ("out of key", out_of_key),
            ("instrument", other_instrument),
            ("dropout", dropout),
            ("leap", leap),
            ("off grid", off_grid),
        ] {
            assert!(v < 4.5 && v > 1.5, "{what}: {v}");
        }
        assert_eq!(quality(&[REST; 50]), 1.0);
        assert_eq!(quality(&[]), 1.0);
    }

    #[test]
    fn quality_falls_with_corruption_severity() {
        let corpus = Corpus::new(12, 100);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut means = Vec::new();
        for severity in [0.0, 0.25, 0.5, 1.0] {
            let mut total = 0.0;
            for x in corpus.batch(Split::Train, 0, 200) {
                let c = Corruption::at_severity(severity, &mut rng);
                total += quality(&c.apply(&x.tokens, &mut rng));
            }
            means.push(total / 200.0);
        }
        assert!(means[0] > 4.9, "{means:?}");
        assert!(means.windows(2).all(|w| w[1] < w[0] - 0.2), "{means:?}");
        assert!(means[3] < 2.0, "{means:?}");
    }

    #[test]
    fn personas_are_deterministic_and_differ() {
        let pop = Population::new(5);
        assert_eq!(pop.persona(3), pop.persona(3));
        assert_eq!(pop.persona(3), Population::new(5).persona(3));
        assert_ne!(pop.persona(3), pop.persona(4));
        assert_ne!(pop.persona(3), Population::new(6).persona(3));
        let held = pop.held_out(3);
        assert_eq!(held.id, "h3");
        assert_ne!(held.preferred_pitch, pop.persona(3).preferred_pitch);
        // The pool's mean tastes are the population's.
        let pool = pop.personas(400);
        let mean = |f: &dyn Fn(&Persona) -> f32| pool.iter().map(f).sum::<f32>() / 400.0;
        assert!((mean(&|p| p.preferred_pitch) - PREFERRED_PITCH).abs() < 0.6);
        assert!((mean(&|p| p.instrument_affinity[0]) - INSTRUMENT_AFFINITY[0]).abs() < 0.03);
        assert!(mean(&|p| p.rating_bias).abs() < 0.05);
    }

    #[test]
    fn the_shifted_audience_is_drawn_around_its_own_means() {
        let pop = Population::new(5);
        assert_eq!(pop.shifted(3), pop.shifted(3));
        assert_eq!(pop.shifted(3).id, "s3");
        let shifted: Vec<Persona> = (0..400).map(|i| pop.shifted(i)).collect();
        let held: Vec<Persona> = (0..400).map(|i| pop.held_out(i)).collect();
        let mean = |pool: &[Persona], f: &dyn Fn(&Persona) -> f32| {
            pool.iter().map(f).sum::<f32>() / pool.len() as f32
        };
        let s = Tastes::SHIFTED;
        assert!((mean(&shifted, &|p| p.preferred_pitch) - s.preferred_pitch).abs() < 0.6);
        assert!((mean(&shifted, &|p| p.loudness) - s.loudness).abs() < 0.06);
        let accordion = Instrument::ALL
            .iter()
            .position(|i| *i == Instrument::Accordion)
            .unwrap();
        let a = |p: &Persona| p.instrument_affinity[accordion];
        assert!((mean(&shifted, &a) - s.instrument_affinity[accordion]).abs() < 0.05);
        // Every mean differs from the training population's, which the
        // first held-out judge shares.
        assert!((mean(&held, &a) - INSTRUMENT_AFFINITY[accordion]).abs() < 0.05);
        let t = Tastes::TRAINING;
        assert!(s.adherence_weight > t.adherence_weight && s.quality_weight < t.quality_weight);
        assert!(s.preferred_pitch < t.preferred_pitch - PITCH_SPREAD);
        assert!(s.loudness < 0.0 && t.loudness > 0.0);
        assert!(s.preferred_rate < t.preferred_rate - RATE_SPREAD);
        for (i, (x, y)) in s
            .instrument_affinity
            .iter()
            .zip(&t.instrument_affinity)
            .enumerate()
        {
            assert_ne!(x, y, "instrument {i}");
        }
    }

    /// Two clean clips with the same notes, differing in one taste attribute.
    fn variants(
        attrs: Attributes,
        seed: u64,
        change: impl Fn(&mut Attributes),
    ) -> (Vec<u32>, Vec<u32>) {
        let a = compose(&attrs, 100, &mut ChaCha8Rng::seed_from_u64(seed));
        let mut other = attrs;
        change(&mut other);
        let b = compose(&other, 100, &mut ChaCha8Rng::seed_from_u64(seed));
        (a, b)
    }

    /// Calm piano in D major, moderate in every other attribute.
    fn calm_piano() -> Attributes {
        Attributes {
            instrument: Instrument::Piano,
            tempo: Tempo::Moderate,
            tonic: 2,
            mode: Mode::Major,
            mood: Mood::Calm,
            density: Density::Moderate,
            register: Register::Middle,
        }
    }

    #[test]
    fn taste_decides_between_equally_good_clips() {
        let pop = Population::new(1);
        let attrs = calm_piano();
        // The caption only asks for calm music: instrument and register are free.
        let mentioned = Mentioned {
            mood: true,
            ..Mentioned::default()
        };
        let mut checked = 0;
        for seed in 0..10 {
            let (piano, accordion) =
                variants(attrs, seed, |a| a.instrument = Instrument::Accordion);
            let (middle, low) = variants(attrs, seed, |a| a.register = Register::Low);
            for (liked, disliked) in [(&piano, &accordion), (&middle, &low)] {
                let (fl, fd) = (Features::of(liked), Features::of(disliked));
                assert!(fl.quality > 4.9 && fd.quality > 4.9);
                assert_eq!(
                    fl.analysis.prompt_adherence(&attrs, &mentioned),
                    fd.analysis.prompt_adherence(&attrs, &mentioned)
                );
                let p = pop.preference_probability(&attrs, &mentioned, liked, disliked, 200);
                assert!(p > 0.75, "seed {seed}: p {p}");
                // Symmetric.
                let q = pop.preference_probability(&attrs, &mentioned, disliked, liked, 200);
                assert!((p + q - 1.0).abs() < 1e-9);
                checked += 1;
            }
        }
        assert_eq!(checked, 20);
    }

    #[test]
    fn the_utility_parts_sum_to_the_utility_and_name_what_differs() {
        let attrs = calm_piano();
        let mentioned = Mentioned {
            instrument: true,
            mood: true,
            ..Mentioned::default()
        };
        let persona = Persona::typical();
        let (piano, accordion) = variants(attrs, 3, |a| a.instrument = Instrument::Accordion);
        let (fp, fa) = (Features::of(&piano), Features::of(&accordion));
        for f in [&fp, &fa] {
            let parts = persona.utility_parts(&attrs, &mentioned, f);
            assert_eq!(parts.total(), persona.utility_of(&attrs, &mentioned, f));
            assert_eq!(parts.taste(), persona.taste(f));
        }
        // The accordion misses the instrument the prompt asks for and is
        // liked less; register, loudness and rate are the same clip's.
        let (p, a) = (
            persona.utility_parts(&attrs, &mentioned, &fp),
            persona.utility_parts(&attrs, &mentioned, &fa),
        );
        assert!(p.adherence > a.adherence, "{p:?} {a:?}");
        assert!(p.instrument > a.instrument, "{p:?} {a:?}");
    }

    #[test]
    fn raters_disagree_sometimes_but_follow_the_majority() {
        let pop = Population::new(2);
        let corpus = Corpus::new(13, 100);
        let personas = pop.personas(50);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (mut split_pairs, mut with_majority, mut answers) = (0, 0, 0);
        for i in 0..200 {
            let x = corpus.example(Split::Train, i);
            let y = corpus.example(Split::Train, i + 1000);
            let (fa, fb) = (Features::of(&x.tokens), Features::of(&y.tokens));
            let (attrs, m) = (&x.attributes, &Mentioned::default());
            let p = preference_probability_among(&personas, attrs, m, &fa, &fb);
            // Utility signs of the pool: do all raters order the pair the same way?
            let signs: Vec<bool> = personas
                .iter()
                .map(|q| q.utility_of(attrs, m, &fa) > q.utility_of(attrs, m, &fb))
                .collect();
            if signs.iter().any(|&s| s) && signs.iter().any(|&s| !s) {
                split_pairs += 1;
            }
            for q in &personas[..10] {
                match q.prefer_of(attrs, m, &fa, &fb, &mut rng) {
                    Choice::A => with_majority += usize::from(p > 0.5),
                    Choice::B => with_majority += usize::from(p < 0.5),
                    _ => continue,
                }
                answers += 1;
            }
        }
        assert!(split_pairs > 20, "raters never disagree: {split_pairs}");
        let agree = with_majority as f64 / answers as f64;
        assert!(agree > 0.65 && agree < 0.97, "{agree}");
    }

    #[test]
    fn answers_include_ties_and_skips_and_are_reproducible() {
        let pop = Population::new(3);
        let x = Corpus::new(14, 100).example(Split::Train, 0);
        let (a, m) = (&x.attributes, &x.mentioned);
        let persona = pop.persona(0);
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..400)
                .map(|_| persona.prefer(a, m, &x.tokens, &x.tokens, &mut rng))
                .collect::<Vec<_>>()
        };
        let answers = run(1);
        assert_eq!(answers, run(1));
        let count = |c| answers.iter().filter(|&&x| x == c).count() as f64 / 400.0;
        // Identical clips: half the answers below the threshold are ties.
        assert!((count(Choice::Skip) - 0.05).abs() < 0.03);
        assert!((count(Choice::Tie) - 0.475).abs() < 0.08);
        assert!((count(Choice::A) - count(Choice::B)).abs() < 0.12);
    }

    #[test]
    fn ratings_track_quality_with_noise() {
        let persona = Persona::typical();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for q in [1.0f32, 2.2, 3.0, 4.4, 5.0] {
            let rs: Vec<u8> = (0..2000)
                .map(|_| persona.rate_quality(q, &mut rng))
                .collect();
            assert!(rs.iter().all(|r| (1..=5).contains(r)));
            let mean = rs.iter().map(|&r| f32::from(r)).sum::<f32>() / 2000.0;
            // Clamping pulls the extremes inwards; in the middle the mean is unbiased.
            let tolerance = if q == 3.0 { 0.06 } else { 0.3 };
            assert!((mean - q).abs() < tolerance, "{q}: {mean}");
            assert!(
                rs.iter().any(|&r| f32::from(r) != q.round()),
                "no noise at {q}"
            );
        }
    }
}

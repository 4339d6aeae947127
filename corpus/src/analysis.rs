//! Attribute analysis: recovering a clip's attributes from its tokens alone,
//! to check that generated music follows its prompt.
//!
//! Instrument, register and velocity are read off the note onsets directly.
//! Tempo is the tempo whose sixteenth-note grid best explains where the
//! onsets fall: each tempo defines a distribution over frames (high on beats,
//! lower on eighths and sixteenths, near zero off the grid), normalised over
//! the clip so that a dense grid gains nothing by chance, and the onsets'
//! likelihood is averaged over every phase of the grid. Density is onsets per
//! beat at that tempo; the key is the best Krumhansl-Kessler profile match.
//!
//! Measured on 300 eval examples of `Corpus::new(7, 250)` (the
//! `recovers_corpus_attributes` test): instrument 100%, tempo 100%, register
//! 100%, density 100%, key (tonic and mode) 97%; every clip is 100% in key.
//! On 2000 such examples tempo is still 100%, though a few sparse clips whose
//! onsets all fall on bar lines are nearly ambiguous between tempos.

use encore_codec::{Instrument, Token, Velocity};
use serde::{Deserialize, Serialize};

use crate::attributes::{Articulation, Attributes, Density, Mentioned, Mode, Register, Tempo};

/// Relative likelihood of an onset on a beat, an eighth, a sixteenth and off the grid.
const GRID_WEIGHTS: [f64; 4] = [4.0, 2.0, 1.0, 0.02];
/// Onsets per beat below which a clip is sparse, and below which it is
/// moderate. On the corpus, sparse clips measure 0.5..=1.0, moderate ones
/// 1.2..=1.95 and busy ones 2.55..=3.7.
const DENSITY_THRESHOLDS: (f32, f32) = (1.1, 2.25);
/// Mean sounding fraction of a note's span above which playing is legato.
const LEGATO_THRESHOLD: f32 = 0.8;

/// What the tokens of a clip say about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// Length of the clip in frames.
    pub frames: usize,
    /// Number of note onsets.
    pub onsets: usize,
    /// Ids outside the vocabulary (analysed as rests).
    pub invalid: usize,
    /// Fraction of frames in which nothing sounds.
    pub rest_fraction: f32,
    /// The instrument of most onsets.
    pub instrument: Option<Instrument>,
    /// Fraction of onsets played by [`Analysis::instrument`] (1 for a
    /// single-instrument clip, 0 without onsets).
    pub instrument_consistency: f32,
    /// The tempo whose grid best explains the onsets (needs two onsets).
    pub tempo: Option<Tempo>,
    /// Log-likelihood of the onsets under each tempo's grid, in `Tempo::ALL` order.
    pub tempo_scores: Option<[f64; 4]>,
    /// Onsets per beat at [`Analysis::tempo`], between the first and last onset.
    pub onsets_per_beat: Option<f32>,
    /// Rhythmic density from [`Analysis::onsets_per_beat`].
    pub density: Option<Density>,
    /// Median onset pitch.
    pub median_pitch: Option<f32>,
    /// Register of the median onset pitch.
    pub register: Option<Register>,
    /// Best-matching key: tonic pitch class and mode.
    pub key: Option<(u8, Mode)>,
    /// Onsets per pitch class (0 = C).
    pub pitch_classes: [u32; 12],
    /// Fraction of onsets played loud.
    pub loud_fraction: f32,
    /// Mean fraction of the time to the next onset that a note sounds
    /// (1 for legato, about 0.5 for staccato); the last note is not counted.
    pub sounding_fraction: Option<f32>,
}

/// One note as the analysis sees it.
#[derive(Debug, Clone, Copy)]
struct Onset {
    frame: usize,
    instrument: Instrument,
    pitch: u8,
    velocity: Velocity,
    /// Frames the note sounds (onset plus holds).
    sounding: usize,
}

/// Analyses a clip. Any ids are accepted: `Bos` and out-of-vocabulary ids
/// count as silence, a `Hold` with nothing sounding is silence.
pub fn analyze(tokens: &[u32]) -> Analysis {
    let mut onsets: Vec<Onset> = Vec::new();
    let mut invalid = 0;
    let mut silent = 0;
    let mut sounding = false;
    for (frame, &id) in tokens.iter().enumerate() {
        match Token::from_id(id) {
            Ok(Token::Note {
                instrument,
                pitch,
                velocity,
            }) => {
                onsets.push(Onset {
                    frame,
                    instrument,
                    pitch,
                    velocity,
                    sounding: 1,
                });
                sounding = true;
            }
            Ok(Token::Hold) if sounding => {
                if let Some(last) = onsets.last_mut() {
                    last.sounding += 1;
                }
            }
            other => {
                invalid += usize::from(other.is_err());
                sounding = false;
                silent += 1;
            }
        }
    }
    let frames = tokens.len();
    let n = onsets.len();

    let mut per_instrument = [0usize; encore_codec::NUM_INSTRUMENTS];
    for o in &onsets {
        per_instrument[o.instrument.index()] += 1;
    }
    let (best, &best_count) = per_instrument
        .iter()
        .enumerate()
        .max_by_key(|&(i, c)| (c, std::cmp::Reverse(i)))
        .unwrap_or((0, &0));
    let instrument = (best_count > 0).then(|| Instrument::ALL[best]);

    let frames_of: Vec<usize> = onsets.iter().map(|o| o.frame).collect();
    let tempo_scores =
        (n >= 2).then(|| Tempo::ALL.map(|t| tempo_log_likelihood(&frames_of, frames, t)));
    let tempo = tempo_scores.map(|scores| {
        let best = (0..4)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap_or(0);
        Tempo::ALL[best]
    });
    let onsets_per_beat = tempo.and_then(|t| onset_rate(&frames_of, t));
    let density = onsets_per_beat.map(density_of_rate);

    let mut pitches: Vec<u8> = onsets.iter().map(|o| o.pitch).collect();
    pitches.sort_unstable();
    let median_pitch = match pitches.len() {
        0 => None,
        len if len % 2 == 1 => Some(f32::from(pitches[len / 2])),
        len => Some((f32::from(pitches[len / 2 - 1]) + f32::from(pitches[len / 2])) / 2.0),
    };

    let mut pitch_classes = [0u32; 12];
    let mut weighted = [0.0f64; 12];
    for o in &onsets {
        pitch_classes[usize::from(o.pitch % 12)] += 1;
        weighted[usize::from(o.pitch % 12)] += o.sounding as f64;
    }
    // The last note is usually the tonic: count it extra.
    if let Some(last) = onsets.last() {
        weighted[usize::from(last.pitch % 12)] += 2.0 * last.sounding as f64;
    }

    let spans: Vec<f32> = onsets
        .windows(2)
        .map(|w| w[0].sounding as f32 / (w[1].frame - w[0].frame) as f32)
        .collect();
    let sounding_fraction =
        (!spans.is_empty()).then(|| spans.iter().sum::<f32>() / spans.len() as f32);

    Analysis {
        frames,
        onsets: n,
        invalid,
        rest_fraction: if frames == 0 {
            0.0
        } else {
            silent as f32 / frames as f32
        },
        instrument,
        instrument_consistency: if n == 0 {
            0.0
        } else {
            best_count as f32 / n as f32
        },
        tempo,
        tempo_scores,
        onsets_per_beat,
        density,
        median_pitch,
        register: median_pitch.map(Register::of_pitch),
        key: (n > 0).then(|| estimate_key(&weighted)),
        pitch_classes,
        loud_fraction: if n == 0 {
            0.0
        } else {
            onsets
                .iter()
                .filter(|o| o.velocity == Velocity::Loud)
                .count() as f32
                / n as f32
        },
        sounding_fraction,
    }
}

impl Analysis {
    /// Fraction of onsets whose pitch class is in the key of `tonic` and
    /// `mode` (for minor, the raised seventh counts as in key); `None`
    /// without onsets.
    pub fn in_key_fraction(&self, tonic: u8, mode: Mode) -> Option<f32> {
        let total: u32 = self.pitch_classes.iter().sum();
        if total == 0 {
            return None;
        }
        let in_key: u32 = (0..12u8)
            .filter(|&pc| mode.in_key((pc + 12 - tonic % 12) % 12))
            .map(|pc| self.pitch_classes[usize::from(pc)])
            .sum();
        Some(in_key as f32 / total as f32)
    }

    /// Articulation, from how much of each note's span it sounds.
    pub fn articulation(&self) -> Option<Articulation> {
        self.sounding_fraction.map(|f| {
            if f >= LEGATO_THRESHOLD {
                Articulation::Legato
            } else {
                Articulation::Staccato
            }
        })
    }

    /// How well the clip follows a prompt: the mean, over the attributes the
    /// prompt mentions, of a score in `[0, 1]` per attribute (1 when the
    /// analysed value matches). The key scores its in-key fraction, the mode
    /// alone whether the estimated key has that mode, the mood whether
    /// velocity and articulation fit it. A clip without notes scores 0.
    pub fn prompt_adherence(&self, attrs: &Attributes, mentioned: &Mentioned) -> f32 {
        let scores: Vec<f32> = self
            .adherence_by_attribute(attrs, mentioned)
            .into_iter()
            .flatten()
            .collect();
        if scores.is_empty() {
            // Nothing checkable was asked for: any music will do.
            return if self.onsets > 0 { 1.0 } else { 0.0 };
        }
        scores.iter().sum::<f32>() / scores.len() as f32
    }

    /// The per-attribute scores [`Analysis::prompt_adherence`] averages, in
    /// [`ADHERENCE_ATTRIBUTES`] order: `None` for an attribute the prompt
    /// does not mention (the mode is scored alone only when the key is
    /// not named).
    pub fn adherence_by_attribute(
        &self,
        attrs: &Attributes,
        mentioned: &Mentioned,
    ) -> [Option<f32>; 7] {
        let hit = |found: Option<bool>| if found == Some(true) { 1.0 } else { 0.0 };
        let mood = || {
            let loud = attrs.mood.velocity() == Velocity::Loud;
            let velocity = if self.onsets == 0 {
                0.0
            } else if loud {
                self.loud_fraction
            } else {
                1.0 - self.loud_fraction
            };
            let articulation = hit(self.articulation().map(|a| a == attrs.mood.articulation()));
            0.5 * (velocity + articulation)
        };
        [
            mentioned
                .instrument
                .then(|| hit(self.instrument.map(|i| i == attrs.instrument))),
            mentioned
                .tempo
                .then(|| hit(self.tempo.map(|t| t == attrs.tempo))),
            mentioned
                .density
                .then(|| hit(self.density.map(|d| d == attrs.density))),
            mentioned
                .register
                .then(|| hit(self.register.map(|r| r == attrs.register))),
            mentioned
                .key
                .then(|| self.in_key_fraction(attrs.tonic, attrs.mode).unwrap_or(0.0)),
            (mentioned.mode && !mentioned.key).then(|| hit(self.key.map(|(_, m)| m == attrs.mode))),
            mentioned.mood.then(mood),
        ]
    }
}

/// The attributes of [`Analysis::adherence_by_attribute`], in its order.
pub const ADHERENCE_ATTRIBUTES: [&str; 7] = [
    "instrument",
    "tempo",
    "density",
    "register",
    "key",
    "mode",
    "mood",
];

/// Density class of an onset rate (onsets per beat).
pub fn density_of_rate(rate: f32) -> Density {
    if rate < DENSITY_THRESHOLDS.0 {
        Density::Sparse
    } else if rate < DENSITY_THRESHOLDS.1 {
        Density::Moderate
    } else {
        Density::Busy
    }
}

/// Onsets per beat between the first and the last onset.
fn onset_rate(frames: &[usize], tempo: Tempo) -> Option<f32> {
    let (first, last) = (frames.first()?, frames.last()?);
    if last <= first {
        return None;
    }
    let beats = (last - first) as f32 / tempo.frames_per_beat();
    Some((frames.len() - 1) as f32 / beats)
}

/// Grid level of each frame within one beat of `tempo`: 0 beat, 1 eighth,
/// 2 sixteenth, 3 off the grid.
fn beat_levels(tempo: Tempo) -> Vec<usize> {
    let fpb = tempo.beat_frames();
    let mut levels = vec![3; fpb];
    for k in (0..4).rev() {
        let pos = tempo.sixteenth_frame(k) % fpb;
        levels[pos] = match k {
            0 => 0,
            2 => 1,
            _ => 2,
        };
    }
    levels
}

/// Log-likelihood of the onset frames under `tempo`'s grid, marginalised
/// over the grid's phase (uniform prior over the beat's frames).
fn tempo_log_likelihood(onsets: &[usize], frames: usize, tempo: Tempo) -> f64 {
    let fpb = tempo.beat_frames();
    let levels = beat_levels(tempo);
    let frames = frames.max(onsets.last().map_or(0, |&f| f + 1));
    let per_phase: Vec<f64> = (0..fpb)
        .map(|phase| {
            let weight = |f: usize| GRID_WEIGHTS[levels[(f + fpb - phase) % fpb]];
            let z: f64 = (0..frames).map(weight).sum();
            onsets.iter().map(|&f| (weight(f) / z).ln()).sum()
        })
        .collect();
    let max = per_phase.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + per_phase.iter().map(|s| (s - max).exp()).sum::<f64>().ln() - (fpb as f64).ln()
}

/// Krumhansl-Kessler key profiles (C major, C minor).
const MAJOR_PROFILE: [f64; 12] = [
    6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88,
];
const MINOR_PROFILE: [f64; 12] = [
    6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17,
];

/// The key whose profile correlates best with the pitch-class weights.
fn estimate_key(weights: &[f64; 12]) -> (u8, Mode) {
    let mut best = (0u8, Mode::Major);
    let mut best_r = f64::NEG_INFINITY;
    for mode in Mode::ALL {
        let profile = match mode {
            Mode::Major => &MAJOR_PROFILE,
            Mode::Minor => &MINOR_PROFILE,
        };
        for tonic in 0..12u8 {
            let rotated: Vec<f64> = (0..12)
                .map(|pc| profile[(pc + 12 - usize::from(tonic)) % 12])
                .collect();
            let r = correlation(weights, &rotated);
            if r > best_r {
                best_r = r;
                best = (tonic, mode);
            }
        }
    }
    best
}

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    if saa == 0.0 || sbb == 0.0 {
        0.0
    } else {
        sab / (saa * sbb).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Corpus, Split};
    use encore_codec::{HOLD, REST, VOCAB_SIZE};

    fn note(i: Instrument, pitch: u8, v: Velocity) -> u32 {
        Token::note(i, pitch, v).unwrap().id()
    }

    #[test]
    fn counts_onsets_rests_and_instruments() {
        let p = note(Instrument::Piano, 60, Velocity::Loud);
        let f = note(Instrument::Flute, 64, Velocity::Soft);
        let tokens = [p, HOLD, REST, HOLD, p, f, HOLD, HOLD, VOCAB_SIZE as u32, 0];
        let a = analyze(&tokens);
        assert_eq!(a.frames, 10);
        assert_eq!(a.onsets, 3);
        assert_eq!(a.invalid, 1);
        // Rest, orphan hold, invalid id, Bos.
        assert!((a.rest_fraction - 0.4).abs() < 1e-6);
        assert_eq!(a.instrument, Some(Instrument::Piano));
        assert!((a.instrument_consistency - 2.0 / 3.0).abs() < 1e-6);
        assert!((a.loud_fraction - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(a.median_pitch, Some(60.0));
        // Note spans: 2 of 4 frames, 1 of 1.
        assert!((a.sounding_fraction.unwrap() - 0.75).abs() < 1e-6);
    }

    #[test]
    fn empty_and_silent_clips_have_no_estimates() {
        for tokens in [&[][..], &[REST, HOLD, REST][..]] {
            let a = analyze(tokens);
            assert_eq!(a.onsets, 0);
            assert_eq!(a.instrument, None);
            assert_eq!(a.tempo, None);
            assert_eq!(a.register, None);
            assert_eq!(a.in_key_fraction(0, Mode::Major), None);
        }
    }

    #[test]
    fn beat_levels_follow_the_rounded_sixteenth_grid() {
        // Fast: sixteenths at 0, 2.25, 4.5, 6.75 -> frames 0, 2, 5, 7.
        assert_eq!(beat_levels(Tempo::Fast), vec![0, 3, 2, 3, 3, 1, 3, 2, 3]);
        // Moderate: 0, 3.75, 7.5, 11.25 -> 0, 4, 8, 11.
        let m = beat_levels(Tempo::Moderate);
        assert_eq!((m[0], m[4], m[8], m[11], m[1]), (0, 2, 1, 2, 3));
    }

    #[test]
    fn a_metronome_reveals_its_tempo_at_any_phase() {
        let p = note(Instrument::Marimba, 60, Velocity::Loud);
        for tempo in Tempo::ALL {
            for phase in [0, 3] {
                let mut tokens = vec![REST; 300];
                for f in (phase..300).step_by(tempo.beat_frames()) {
                    tokens[f] = p;
                }
                assert_eq!(
                    analyze(&tokens).tempo,
                    Some(tempo),
                    "{tempo} at phase {phase}"
                );
            }
        }
    }

    #[test]
    fn likelihoods_are_normalised_over_the_clip() {
        // Each tempo's grid is a probability distribution over the clip's
        // frames (for every phase, hence also averaged over phases), so the
        // likelihoods of a single onset in each frame sum to one.
        for tempo in Tempo::ALL {
            let frames = 97;
            let total: f64 = (0..frames)
                .map(|f| (tempo_log_likelihood(&[f], frames, tempo)).exp())
                .sum();
            assert!((total - 1.0).abs() < 1e-9, "{tempo}: {total}");
        }
    }

    #[test]
    fn in_key_fraction_counts_scale_tones() {
        let i = Instrument::Piano;
        let v = Velocity::Soft;
        // C D E F# in G major: all in key; in C major F# is out.
        let tokens: Vec<u32> = [60, 62, 64, 66].iter().map(|&p| note(i, p, v)).collect();
        let a = analyze(&tokens);
        assert_eq!(a.in_key_fraction(7, Mode::Major), Some(1.0));
        assert_eq!(a.in_key_fraction(0, Mode::Major), Some(0.75));
        // A minor with its raised seventh (G#) counts G# as in key.
        let a = analyze(&[note(i, 68, v), note(i, 69, v)]);
        assert_eq!(a.in_key_fraction(9, Mode::Minor), Some(1.0));
    }

    #[test]
    fn key_of_a_scale_and_tonic_arpeggio() {
        let i = Instrument::Piano;
        let v = Velocity::Soft;
        // D major scale, ending long on D.
        let mut tokens: Vec<u32> = [62, 64, 66, 67, 69, 71, 73, 74, 69, 66]
            .iter()
            .map(|&p| note(i, p, v))
            .collect();
        tokens.push(note(i, 62, v));
        tokens.extend([HOLD; 6]);
        assert_eq!(analyze(&tokens).key, Some((2, Mode::Major)));
    }

    #[test]
    fn adherence_drops_when_the_prompt_asks_for_something_else() {
        let corpus = Corpus::new(8, 250);
        let only = |f: fn(&mut Mentioned)| {
            let mut m = Mentioned::default();
            f(&mut m);
            m
        };
        for x in corpus.batch(Split::Eval, 0, 50) {
            let a = analyze(&x.tokens);
            let t = x.attributes;
            let other_instrument = Attributes {
                instrument: Instrument::ALL[(t.instrument.index() + 1) % 8],
                ..t
            };
            let other_tempo = Attributes {
                tempo: Tempo::ALL[(t.tempo.index() + 1) % 4],
                ..t
            };
            let instrument = only(|m| m.instrument = true);
            let tempo = only(|m| m.tempo = true);
            assert_eq!(a.prompt_adherence(&t, &instrument), 1.0);
            assert_eq!(a.prompt_adherence(&other_instrument, &instrument), 0.0);
            assert_eq!(a.prompt_adherence(&t, &tempo), 1.0);
            assert_eq!(a.prompt_adherence(&other_tempo, &tempo), 0.0);
            let both = instrument.union(tempo);
            assert_eq!(a.prompt_adherence(&other_tempo, &both), 0.5);
            let parts = a.adherence_by_attribute(&other_tempo, &both);
            assert_eq!(parts[0], Some(1.0), "instrument");
            assert_eq!(parts[1], Some(0.0), "tempo");
            assert!(parts[2..].iter().all(Option::is_none), "{parts:?}");
        }
        let silence = analyze(&[REST; 10]);
        assert_eq!(
            silence.prompt_adherence(&corpus.example(Split::Eval, 0).attributes, &Mentioned::ALL),
            0.0
        );
    }

    /// Recovery rates of the analyzer on eval examples, reported in the module doc.
    #[test]
    fn recovers_corpus_attributes() {
        let corpus = Corpus::new(7, 250);
        let examples = corpus.batch(Split::Eval, 0, 300);
        let n = examples.len() as f32;
        let (mut instrument, mut tempo, mut register, mut density, mut key) = (0, 0, 0, 0, 0);
        let mut min_in_key: f32 = 1.0;
        let mut min_adherence: f32 = 1.0;
        let mut confusions = Vec::new();
        for x in &examples {
            let a = analyze(&x.tokens);
            let t = &x.attributes;
            instrument += usize::from(a.instrument == Some(t.instrument));
            tempo += usize::from(a.tempo == Some(t.tempo));
            if a.tempo != Some(t.tempo) {
                confusions.push((t.tempo, a.tempo, t.density));
            }
            register += usize::from(a.register == Some(t.register));
            density += usize::from(a.density == Some(t.density));
            key += usize::from(a.key == Some((t.tonic, t.mode)));
            assert_eq!(a.instrument_consistency, 1.0);
            min_in_key = min_in_key.min(a.in_key_fraction(t.tonic, t.mode).unwrap_or(0.0));
            min_adherence = min_adherence.min(a.prompt_adherence(t, &Mentioned::ALL));
        }
        let rate = |c: usize| c as f32 / n;
        eprintln!(
            "instrument {} tempo {} register {} density {} key {} min in-key {min_in_key} min adherence {min_adherence}; tempo misses {confusions:?}",
            rate(instrument),
            rate(tempo),
            rate(register),
            rate(density),
            rate(key)
        );
        assert_eq!(rate(instrument), 1.0);
        assert!(rate(tempo) >= 0.9);
        assert!(rate(register) >= 0.8);
        assert!(rate(density) >= 0.8);
        assert!(min_in_key > 0.85);
        // The corpus follows its own attributes.
        assert!(min_adherence > 0.9, "adherence {min_adherence}");
    }
}

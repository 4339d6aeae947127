//! Procedural composition: from [`Attributes`] to a clip of tokens.
//!
//! A clip is a single-instrument melody over a chord progression (one chord
//! per 4-beat bar), written on the tempo's sixteenth-note grid starting on
//! the downbeat at frame 0. Bars group into phrases (4 bars, or 2 for clips
//! under four bars) that open with a motif, repeat and vary it, and close on
//! a held chord tone; the clip's last phrase closes on the tonic. Strong
//! beats carry chord tones, scale passing tones fill in between. The mood
//! sets velocity, articulation and contour; the density sets the rhythm.

use encore_codec::{HOLD, REST, Token};
use rand::Rng;
use rand::seq::IndexedRandom;

use crate::attributes::{Articulation, Attributes, Contour, Density, Mode};

/// Sixteenth notes per bar of 4 beats.
const BAR: usize = 16;

/// Major-key progressions, as 0-based scale degrees, one chord per bar:
/// I-V-vi-IV, I-IV-V-I, ii-V-I-I, vi-IV-I-V.
const MAJOR_PROGRESSIONS: [[u8; 4]; 4] = [[0, 4, 5, 3], [0, 3, 4, 0], [1, 4, 0, 0], [5, 3, 0, 4]];
/// Minor-key progressions: i-VI-III-VII, i-iv-v-i, i-VII-VI-V (a major V).
const MINOR_PROGRESSIONS: [[u8; 4]; 3] = [[0, 5, 2, 6], [0, 3, 4, 0], [0, 6, 5, 4]];

/// A triad on a scale degree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chord {
    /// 0-based scale degree of the root.
    root: u8,
    /// The third is raised a semitone (the major V of a minor key).
    raised_third: bool,
}

impl Chord {
    fn contains(self, degree: i32) -> bool {
        let d = degree.rem_euclid(7);
        let r = i32::from(self.root);
        d == r || d == (r + 2) % 7 || d == (r + 4) % 7
    }
}

/// One melody note, positioned in sixteenths from the start of the clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Note {
    pub start: usize,
    pub len: usize,
    pub pitch: u8,
    /// Sounds for its whole length whatever the articulation (phrase ends).
    pub held: bool,
}

/// Composes a clip of exactly `frames` tokens for `attrs`.
///
/// The clip contains no `Bos` (that is the model's start symbol), uses a
/// single instrument throughout and is deterministic in the state of `rng`.
pub fn compose(attrs: &Attributes, frames: usize, rng: &mut impl Rng) -> Vec<u32> {
    let notes = compose_notes(attrs, frames, rng);
    write_tokens(attrs, &notes, frames)
}

/// The melody of a clip of `frames` frames, as notes on the sixteenth grid.
pub(crate) fn compose_notes(attrs: &Attributes, frames: usize, rng: &mut impl Rng) -> Vec<Note> {
    if frames == 0 {
        return Vec::new();
    }
    let bar_frames = 4 * attrs.tempo.beat_frames();
    // Whole bars of music; the remainder of the clip is the final note ringing on.
    let bars = (frames / bar_frames).max(1);
    let progression: [u8; 4] = match attrs.mode {
        Mode::Major => *MAJOR_PROGRESSIONS
            .choose(rng)
            .unwrap_or(&MAJOR_PROGRESSIONS[0]),
        Mode::Minor => *MINOR_PROGRESSIONS
            .choose(rng)
            .unwrap_or(&MINOR_PROGRESSIONS[0]),
    };
    let chord_of_bar = |bar: usize| {
        // The last bar resolves to the tonic.
        let root = if bar + 1 == bars {
            0
        } else {
            progression[bar % 4]
        };
        Chord {
            root,
            raised_third: attrs.mode == Mode::Minor && root == 4,
        }
    };
    let mut melody = Melody::new(attrs);
    let mut notes = Vec::new();
    let mut bar = 0;
    for phrase_len in phrase_lengths(bars) {
        let last_phrase = bar + phrase_len == bars;
        melody.start_phrase(chord_of_bar(bar), rng);
        let motif_rhythm = bar_rhythm(attrs.density, rng);
        let mut motif_moves: Vec<i32> = Vec::new();
        for j in 0..phrase_len {
            let chord = chord_of_bar(bar);
            let cadence = j + 1 == phrase_len;
            let reuse = j > 0 && !cadence && (j % 2 == 1 || rng.random_bool(0.5));
            let rhythm = if cadence {
                cadence_rhythm(attrs.density, rng)
            } else if reuse {
                motif_rhythm.clone()
            } else {
                bar_rhythm(attrs.density, rng)
            };
            let mut pos = 0;
            for (k, &len) in rhythm.iter().enumerate() {
                let final_note = cadence && k + 1 == rhythm.len();
                let degree = if final_note {
                    melody.cadence_target(chord, last_phrase)
                } else if j == 0 && k == 0 {
                    melody.s
                } else if k == 0 && reuse {
                    // Sequence: the motif restarts from the chord tone nearest the melody.
                    melody.snap(melody.s, chord, 0)
                } else {
                    let planned = if reuse {
                        motif_moves.get(k).copied()
                    } else {
                        None
                    };
                    let mv = match planned {
                        Some(m) if !rng.random_bool(0.25) => m,
                        _ => melody.propose_move(chord, rng),
                    };
                    if j == 0 {
                        motif_moves.push(mv);
                    }
                    melody.apply(mv, chord, pos % 8 == 0)
                };
                if j == 0 && k == 0 {
                    motif_moves.push(0);
                }
                melody.s = degree;
                notes.push(Note {
                    start: bar * BAR + pos,
                    len,
                    pitch: melody.pitch(degree, chord),
                    held: final_note,
                });
                pos += len;
            }
            bar += 1;
        }
    }
    notes
}

/// Phrase lengths in bars: 4-bar phrases (2-bar ones when the clip is
/// shorter than 4 bars); a single leftover bar joins the phrase before it.
fn phrase_lengths(bars: usize) -> Vec<usize> {
    let unit = if bars >= 4 { 4 } else { 2 };
    let mut lengths = vec![unit; bars / unit];
    match bars % unit {
        0 => {}
        1 if !lengths.is_empty() => {
            if let Some(last) = lengths.last_mut() {
                *last += 1;
            }
        }
        r => lengths.push(r),
    }
    lengths
}

/// Durations (sixteenths) of one bar's notes.
fn bar_rhythm(density: Density, rng: &mut impl Rng) -> Vec<usize> {
    match density {
        Density::Sparse => {
            const PATTERNS: [&[usize]; 6] = [
                &[4, 4, 4, 4],
                &[8, 4, 4],
                &[4, 4, 8],
                &[4, 8, 4],
                &[8, 8],
                &[12, 4],
            ];
            PATTERNS.choose(rng).unwrap_or(&PATTERNS[0]).to_vec()
        }
        Density::Moderate | Density::Busy => beats_rhythm(density, 4, rng),
    }
}

/// Durations for `beats` beats of eighths and quarters (moderate) or
/// sixteenths and eighths (busy), with at least one of the shorter value.
fn beats_rhythm(density: Density, beats: usize, rng: &mut impl Rng) -> Vec<usize> {
    const MODERATE: [(&[usize], u32); 2] = [(&[2, 2], 55), (&[4], 45)];
    const BUSY: [(&[usize], u32); 4] = [
        (&[1, 1, 1, 1], 35),
        (&[2, 1, 1], 20),
        (&[1, 1, 2], 20),
        (&[2, 2], 25),
    ];
    let choices: &[(&[usize], u32)] = match density {
        Density::Busy => &BUSY,
        _ => &MODERATE,
    };
    let mut per_beat: Vec<&[usize]> = (0..beats)
        .map(|_| {
            choices
                .choose_weighted(rng, |c| c.1)
                .map_or(choices[0].0, |c| c.0)
        })
        .collect();
    let short = if density == Density::Busy { 1 } else { 2 };
    if !per_beat.iter().any(|b| b.contains(&short)) {
        let i = rng.random_range(0..beats);
        per_beat[i] = choices[0].0;
    }
    per_beat.concat()
}

/// A bar that ends its phrase: two beats in the clip's rhythm, then a held half note.
fn cadence_rhythm(density: Density, rng: &mut impl Rng) -> Vec<usize> {
    let mut rhythm = match density {
        Density::Sparse => {
            if rng.random_bool(0.5) {
                vec![4, 4]
            } else {
                vec![8]
            }
        }
        _ => beats_rhythm(density, 2, rng),
    };
    rhythm.push(8);
    rhythm
}

/// The melody's position and its rules of motion, in scale-degree space:
/// degree `s` is `s mod 7` of the scale in octave `s div 7` above MIDI `tonic`.
struct Melody {
    tonic: u8,
    mode: Mode,
    contour: Contour,
    ascending: f64,
    lo: i32,
    hi: i32,
    s: i32,
    /// Direction of an arpeggio (+1 or -1).
    dir: i32,
}

impl Melody {
    fn new(attrs: &Attributes) -> Melody {
        let (lo_pitch, hi_pitch) = attrs.register.range();
        let mut m = Melody {
            tonic: attrs.tonic % 12,
            mode: attrs.mode,
            contour: attrs.mood.contour(),
            ascending: attrs.mood.ascending_bias(),
            lo: 0,
            hi: 0,
            s: 0,
            dir: 1,
        };
        let plain = Chord {
            root: 0,
            raised_third: false,
        };
        m.lo = (0..80)
            .find(|&s| m.pitch(s, plain) >= lo_pitch)
            .unwrap_or(0);
        m.hi = (0..80)
            .rev()
            .find(|&s| m.pitch(s, plain) <= hi_pitch)
            .unwrap_or(m.lo);
        m.s = (m.lo + m.hi) / 2;
        m
    }

    /// MIDI pitch of degree `s` over `chord`.
    fn pitch(&self, s: i32, chord: Chord) -> u8 {
        let degree = s.rem_euclid(7);
        let mut p = i32::from(self.tonic)
            + 12 * s.div_euclid(7)
            + i32::from(self.mode.scale()[degree as usize]);
        if chord.raised_third && degree == (i32::from(chord.root) + 2) % 7 {
            p += 1;
        }
        p.clamp(0, 127) as u8
    }

    /// Starts a phrase on a chord tone: low in the range for rising moods,
    /// high for sinking ones.
    fn start_phrase(&mut self, chord: Chord, rng: &mut impl Rng) {
        let span = self.hi - self.lo;
        let base = if self.ascending > 0.55 {
            self.lo + span / 4
        } else if self.ascending < 0.45 {
            self.hi - span / 4
        } else {
            self.lo + span / 2
        };
        let jitter = rng.random_range(-1..=1);
        self.s = self.snap(base + jitter, chord, 0);
        self.dir = if rng.random_bool(self.ascending) {
            1
        } else {
            -1
        };
    }

    /// A melodic move in scale steps, following the mood's contour.
    fn propose_move(&mut self, chord: Chord, rng: &mut impl Rng) -> i32 {
        let size: i32 = match self.contour {
            Contour::Steps => *[(1, 80), (0, 10), (2, 10)]
                .choose_weighted(rng, |c| c.1)
                .map_or(&1, |c| &c.0),
            Contour::Leaps => *[(1, 35), (2, 30), (3, 20), (4, 15)]
                .choose_weighted(rng, |c| c.1)
                .map_or(&2, |c| &c.0),
            Contour::StepsAndLeaps => *[(1, 65), (2, 15), (3, 10), (4, 10)]
                .choose_weighted(rng, |c| c.1)
                .map_or(&1, |c| &c.0),
            Contour::Arpeggio => {
                if rng.random_bool(0.2) {
                    self.dir = -self.dir;
                }
                let next = self.next_chord_tone(self.s, chord, self.dir);
                if next < self.lo || next > self.hi {
                    self.dir = -self.dir;
                }
                return self.next_chord_tone(self.s, chord, self.dir) - self.s;
            }
        };
        if rng.random_bool(self.ascending) {
            size
        } else {
            -size
        }
    }

    /// Applies a move, reflecting off the ends of the range and landing on a
    /// chord tone when `strong`.
    fn apply(&self, mv: i32, chord: Chord, strong: bool) -> i32 {
        let mut s = self.s + mv;
        if s > self.hi || s < self.lo {
            s = self.s - mv;
        }
        s = s.clamp(self.lo, self.hi);
        if strong {
            self.snap(s, chord, mv.signum())
        } else {
            s
        }
    }

    /// The chord tone nearest `s` within range; ties go in direction `prefer`.
    fn snap(&self, s: i32, chord: Chord, prefer: i32) -> i32 {
        let mut best: Option<i32> = None;
        for d in 0..=4 {
            let order = if prefer < 0 {
                [s - d, s + d]
            } else {
                [s + d, s - d]
            };
            for c in order {
                if best.is_none() && (self.lo..=self.hi).contains(&c) && chord.contains(c) {
                    best = Some(c);
                }
            }
        }
        best.unwrap_or(s)
    }

    /// The next chord tone above (`dir > 0`) or below `s`.
    fn next_chord_tone(&self, s: i32, chord: Chord, dir: i32) -> i32 {
        let step = if dir >= 0 { 1 } else { -1 };
        (1..=4)
            .map(|d| s + step * d)
            .find(|&c| chord.contains(c))
            .unwrap_or(s)
    }

    /// Where a phrase comes to rest: the tonic at the end of the clip,
    /// otherwise the chord's root or fifth, whichever is nearer.
    fn cadence_target(&self, chord: Chord, final_phrase: bool) -> i32 {
        let targets: &[i32] = if final_phrase {
            &[0]
        } else {
            &[i32::from(chord.root), (i32::from(chord.root) + 4) % 7]
        };
        (self.lo..=self.hi)
            .filter(|c| targets.contains(&c.rem_euclid(7)))
            .min_by_key(|c| ((c - self.s).abs(), *c))
            .unwrap_or(self.s)
    }
}

/// Lays notes out on the frame grid: an onset token, then holds for as long
/// as the note sounds (about half its length when staccato), rests between.
/// The last note rings on to the end of the clip.
fn write_tokens(attrs: &Attributes, notes: &[Note], frames: usize) -> Vec<u32> {
    let mut tokens = vec![REST; frames];
    let velocity = attrs.mood.velocity();
    let staccato = attrs.mood.articulation() == Articulation::Staccato;
    for (i, note) in notes.iter().enumerate() {
        let start = attrs.tempo.sixteenth_frame(note.start);
        if start >= frames {
            break;
        }
        let end = if i + 1 == notes.len() {
            frames
        } else {
            attrs
                .tempo
                .sixteenth_frame(note.start + note.len)
                .min(frames)
        };
        let len = end - start;
        let sounding = if staccato && !note.held {
            ((len as f32 * 0.5).round() as usize).max(1)
        } else {
            len
        };
        let onset = Token::Note {
            instrument: attrs.instrument,
            pitch: note.pitch,
            velocity,
        };
        tokens[start] = onset.id();
        for t in &mut tokens[start + 1..start + sounding] {
            *t = HOLD;
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attributes::{Mood, Register, Tempo};
    use encore_codec::{Instrument, PITCH_HIGH, PITCH_LOW, VOCAB_SIZE};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn attrs() -> Attributes {
        Attributes {
            instrument: Instrument::Piano,
            tempo: Tempo::Moderate,
            tonic: 0,
            mode: Mode::Major,
            mood: Mood::Calm,
            density: Density::Moderate,
            register: Register::Middle,
        }
    }

    fn all_attributes() -> impl Iterator<Item = Attributes> {
        let mut v = Vec::new();
        for tempo in Tempo::ALL {
            for mode in Mode::ALL {
                for mood in Mood::ALL {
                    for density in Density::ALL {
                        for register in Register::ALL {
                            v.push(Attributes {
                                tempo,
                                mode,
                                mood,
                                density,
                                register,
                                tonic: (v.len() % 12) as u8,
                                instrument: Instrument::ALL[v.len() % 8],
                            });
                        }
                    }
                }
            }
        }
        v.into_iter()
    }

    #[test]
    fn phrases_cover_every_bar() {
        assert_eq!(phrase_lengths(1), vec![1]);
        assert_eq!(phrase_lengths(2), vec![2]);
        assert_eq!(phrase_lengths(3), vec![3]);
        assert_eq!(phrase_lengths(6), vec![4, 2]);
        assert_eq!(phrase_lengths(9), vec![4, 5]);
        for bars in 1..40 {
            assert_eq!(phrase_lengths(bars).iter().sum::<usize>(), bars);
        }
    }

    #[test]
    fn rhythms_fill_their_bars() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            for d in Density::ALL {
                assert_eq!(bar_rhythm(d, &mut rng).iter().sum::<usize>(), BAR);
                let cadence = cadence_rhythm(d, &mut rng);
                assert_eq!(cadence.iter().sum::<usize>(), BAR);
                assert_eq!(cadence.last(), Some(&8));
            }
        }
    }

    #[test]
    fn clips_have_exact_length_and_valid_single_instrument_tokens() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for (n, a) in all_attributes().enumerate() {
            let frames = [1, 7, 50, 250, 333][n % 5];
            let tokens = compose(&a, frames, &mut rng);
            assert_eq!(tokens.len(), frames);
            assert!(tokens[0] >= 3, "clips start with a note on the downbeat");
            for &t in &tokens {
                assert!((t as usize) < VOCAB_SIZE && t != encore_codec::BOS);
                if let Ok(Token::Note {
                    instrument,
                    pitch,
                    velocity,
                }) = Token::from_id(t)
                {
                    assert_eq!(instrument, a.instrument);
                    assert_eq!(velocity, a.mood.velocity());
                    assert!((PITCH_LOW..=PITCH_HIGH).contains(&pitch));
                }
            }
        }
    }

    #[test]
    fn notes_stay_in_register_and_in_key_and_end_on_the_tonic() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for a in all_attributes() {
            let notes = compose_notes(&a, 250, &mut rng);
            let (lo, hi) = a.register.range();
            for n in &notes {
                assert!(
                    n.pitch >= lo && n.pitch <= hi + 1,
                    "{} outside {lo}..{hi}",
                    n.pitch
                );
                let rel = (n.pitch + 12 - a.tonic) % 12;
                assert!(a.mode.in_key(rel), "{} not in {:?}", n.pitch, a);
            }
            let last = notes.last().unwrap();
            assert_eq!((last.pitch + 12 - a.tonic) % 12, 0, "{a:?}");
            assert!(last.held);
            // Onsets never overlap and stay on the sixteenth grid of whole bars.
            for w in notes.windows(2) {
                assert_eq!(w[0].start + w[0].len, w[1].start);
            }
        }
    }

    #[test]
    fn strong_beats_carry_chord_tones() {
        // In C major with I-IV-V-I style progressions the downbeat notes are
        // triad tones of some diatonic chord; check the first bar, which is
        // always I or ii or vi (one of the progressions' first chords).
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..50 {
            let notes = compose_notes(&attrs(), 250, &mut rng);
            let downbeat = notes.iter().find(|n| n.start == 8).map(|n| n.pitch % 12);
            if let Some(pc) = downbeat {
                // Tones of I (C E G), ii (D F A) or vi (A C E).
                assert!([0, 4, 7, 2, 5, 9].contains(&pc), "pc {pc}");
            }
        }
    }

    #[test]
    fn staccato_moods_leave_rests_and_legato_moods_do_not() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let rests = |mood, rng: &mut ChaCha8Rng| {
            let a = Attributes { mood, ..attrs() };
            compose(&a, 250, rng).iter().filter(|&&t| t == REST).count()
        };
        assert_eq!(rests(Mood::Calm, &mut rng), 0);
        assert!(rests(Mood::Energetic, &mut rng) > 50);
    }

    #[test]
    fn onsets_land_on_the_tempo_grid() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for tempo in Tempo::ALL {
            let a = Attributes {
                tempo,
                density: Density::Busy,
                ..attrs()
            };
            let grid: Vec<usize> = (0..400).map(|k| tempo.sixteenth_frame(k)).collect();
            let tokens = compose(&a, 250, &mut rng);
            for (f, &t) in tokens.iter().enumerate() {
                if t >= 3 {
                    assert!(grid.contains(&f), "{tempo}: onset at {f}");
                }
            }
        }
    }

    #[test]
    fn composition_is_deterministic_in_the_rng() {
        let a = attrs();
        let x = compose(&a, 250, &mut ChaCha8Rng::seed_from_u64(9));
        let y = compose(&a, 250, &mut ChaCha8Rng::seed_from_u64(9));
        let z = compose(&a, 250, &mut ChaCha8Rng::seed_from_u64(10));
        assert_eq!(x, y);
        assert_ne!(x, z);
    }
}

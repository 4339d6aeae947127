//! The musical attributes a clip is generated from and a caption describes.

use std::fmt;
use std::str::FromStr;

use encore_codec::{FRAME_RATE, Instrument, Velocity};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::CorpusError;

/// Implements `ALL`, `name()`, `Display` and `FromStr` for a fieldless enum.
macro_rules! attribute_enum {
    ($ty:ident, $kind:literal, [$($variant:ident => $name:literal),+ $(,)?]) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: [$ty; [$($name),+].len()] = [$($ty::$variant),+];

            /// Lowercase name, as in configs and serde.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }

            /// Position in `ALL`.
            pub fn index(self) -> usize {
                self as usize
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = CorpusError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let wanted = s.trim().to_ascii_lowercase();
                $ty::ALL
                    .into_iter()
                    .find(|v| v.name() == wanted)
                    .ok_or_else(|| CorpusError::UnknownValue {
                        attribute: $kind,
                        value: s.to_string(),
                    })
            }
        }
    };
}

/// How fast the beat goes. Beat lengths in frames (20, 15, 12, 9) were chosen
/// so that no tempo's beat is a 2x or 4x multiple of another's, which keeps
/// tempo recoverable from the token grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tempo {
    /// 75 BPM, 20 frames per beat.
    Slow,
    /// 100 BPM, 15 frames per beat.
    Moderate,
    /// 125 BPM, 12 frames per beat.
    Upbeat,
    /// 166.7 BPM, 9 frames per beat.
    Fast,
}

attribute_enum!(Tempo, "tempo", [Slow => "slow", Moderate => "moderate", Upbeat => "upbeat", Fast => "fast"]);

impl Tempo {
    /// Frames (tokens) per beat.
    pub fn frames_per_beat(self) -> f32 {
        self.beat_frames() as f32
    }

    /// Frames per beat as an integer (every tempo's beat is a whole number of frames).
    pub fn beat_frames(self) -> usize {
        match self {
            Tempo::Slow => 20,
            Tempo::Moderate => 15,
            Tempo::Upbeat => 12,
            Tempo::Fast => 9,
        }
    }

    /// Beats per minute.
    pub fn bpm(self) -> f32 {
        60.0 * FRAME_RATE as f32 / self.frames_per_beat()
    }

    /// Frame of the onset at `sixteenth` sixteenth notes from the start:
    /// `round(beat_position * frames_per_beat)`.
    pub fn sixteenth_frame(self, sixteenth: usize) -> usize {
        (sixteenth as f32 * self.frames_per_beat() / 4.0).round() as usize
    }
}

/// Major or minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ionian.
    Major,
    /// Natural minor (aeolian), with a raised leading tone over a major V chord.
    Minor,
}

attribute_enum!(Mode, "mode", [Major => "major", Minor => "minor"]);

impl Mode {
    /// Semitones above the tonic of the seven scale degrees.
    pub fn scale(self) -> [u8; 7] {
        match self {
            Mode::Major => [0, 2, 4, 5, 7, 9, 11],
            Mode::Minor => [0, 2, 3, 5, 7, 8, 10],
        }
    }

    /// Pitch classes (relative to the tonic) that count as in key: the scale,
    /// plus the raised seventh in minor (the leading tone of the V chord).
    pub fn in_key(self, relative_pitch_class: u8) -> bool {
        let pc = relative_pitch_class % 12;
        self.scale().contains(&pc) || (self == Mode::Minor && pc == 11)
    }
}

/// The feeling of a clip. Each mood is audible: it sets velocity,
/// articulation and melodic contour (see [`Mood::velocity`],
/// [`Mood::articulation`], [`Mood::contour`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mood {
    /// Soft, legato, stepwise.
    Calm,
    /// Loud, staccato, leaping upwards.
    Energetic,
    /// Soft, legato, stepwise, sinking.
    Melancholic,
    /// Loud, staccato, steps with some leaps.
    Playful,
    /// Soft, legato, arpeggios.
    Dreamy,
    /// Loud, legato, leaping upwards.
    Triumphant,
}

attribute_enum!(Mood, "mood", [
    Calm => "calm",
    Energetic => "energetic",
    Melancholic => "melancholic",
    Playful => "playful",
    Dreamy => "dreamy",
    Triumphant => "triumphant",
]);

/// How notes are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Articulation {
    /// Notes fill their whole duration.
    Legato,
    /// Notes sound for about half their duration, then rest.
    Staccato,
}

/// The shape of melodic motion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Contour {
    /// Mostly neighbouring scale steps.
    Steps,
    /// Mostly leaps of a third to a fifth.
    Leaps,
    /// Steps with some leaps.
    StepsAndLeaps,
    /// Walking up and down the current chord.
    Arpeggio,
}

impl Mood {
    /// Velocity of every note.
    pub fn velocity(self) -> Velocity {
        match self {
            Mood::Calm | Mood::Melancholic | Mood::Dreamy => Velocity::Soft,
            Mood::Energetic | Mood::Playful | Mood::Triumphant => Velocity::Loud,
        }
    }

    /// Legato or staccato.
    pub fn articulation(self) -> Articulation {
        match self {
            Mood::Energetic | Mood::Playful => Articulation::Staccato,
            _ => Articulation::Legato,
        }
    }

    /// Kind of melodic motion.
    pub fn contour(self) -> Contour {
        match self {
            Mood::Calm | Mood::Melancholic => Contour::Steps,
            Mood::Energetic | Mood::Triumphant => Contour::Leaps,
            Mood::Playful => Contour::StepsAndLeaps,
            Mood::Dreamy => Contour::Arpeggio,
        }
    }

    /// Probability that a melodic move goes up.
    pub fn ascending_bias(self) -> f64 {
        match self {
            Mood::Energetic | Mood::Triumphant => 0.65,
            Mood::Melancholic => 0.3,
            _ => 0.5,
        }
    }
}

/// How many notes per beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Density {
    /// Quarter and half notes.
    Sparse,
    /// Eighth and quarter notes.
    Moderate,
    /// Sixteenth and eighth notes.
    Busy,
}

attribute_enum!(Density, "density", [Sparse => "sparse", Moderate => "moderate", Busy => "busy"]);

/// Where the melody sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    /// Centred on A2 (MIDI 45).
    Low,
    /// Centred on C4 (MIDI 60).
    Middle,
    /// Centred on D5 (MIDI 74).
    High,
}

attribute_enum!(Register, "register", [Low => "low", Middle => "middle", High => "high"]);

impl Register {
    /// MIDI pitch the melody is centred on.
    pub fn centre(self) -> u8 {
        match self {
            Register::Low => 45,
            Register::Middle => 60,
            Register::High => 74,
        }
    }

    /// Lowest and highest MIDI pitch of the melody's range.
    pub fn range(self) -> (u8, u8) {
        (self.centre() - 6, self.centre() + 6)
    }

    /// The register whose range holds `pitch` (boundaries halfway between centres).
    pub fn of_pitch(pitch: f32) -> Register {
        if pitch < 52.5 {
            Register::Low
        } else if pitch < 67.0 {
            Register::Middle
        } else {
            Register::High
        }
    }
}

/// Everything a clip is generated from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attributes {
    /// The single instrument that plays the clip.
    pub instrument: Instrument,
    /// Beat speed.
    pub tempo: Tempo,
    /// Pitch class of the key's tonic, 0 = C .. 11 = B.
    pub tonic: u8,
    /// Major or minor.
    pub mode: Mode,
    /// Velocity, articulation and contour.
    pub mood: Mood,
    /// Notes per beat.
    pub density: Density,
    /// Pitch range of the melody.
    pub register: Register,
}

impl Attributes {
    /// Draws every attribute uniformly at random.
    pub fn sample(rng: &mut impl Rng) -> Attributes {
        Attributes {
            instrument: Instrument::ALL[rng.random_range(0..Instrument::ALL.len())],
            tempo: Tempo::ALL[rng.random_range(0..Tempo::ALL.len())],
            tonic: rng.random_range(0..12),
            mode: Mode::ALL[rng.random_range(0..Mode::ALL.len())],
            mood: Mood::ALL[rng.random_range(0..Mood::ALL.len())],
            density: Density::ALL[rng.random_range(0..Density::ALL.len())],
            register: Register::ALL[rng.random_range(0..Register::ALL.len())],
        }
    }

    /// The key as captions say it, e.g. "E flat major".
    pub fn key_name(&self) -> String {
        key_name(self.tonic, self.mode)
    }
}

/// A key as captions say it: `key_name(3, Mode::Major)` is "E flat major".
/// Tonics are spelled the way the key is usually written (D flat major, but
/// C sharp minor).
pub fn key_name(tonic: u8, mode: Mode) -> String {
    const MAJOR: [&str; 12] = [
        "C", "D flat", "D", "E flat", "E", "F", "F sharp", "G", "A flat", "A", "B flat", "B",
    ];
    const MINOR: [&str; 12] = [
        "C", "C sharp", "D", "E flat", "E", "F", "F sharp", "G", "G sharp", "A", "B flat", "B",
    ];
    let names = match mode {
        Mode::Major => &MAJOR,
        Mode::Minor => &MINOR,
    };
    format!("{} {}", names[usize::from(tonic % 12)], mode.name())
}

/// Which attributes a caption mentions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mentioned {
    /// The instrument is named.
    pub instrument: bool,
    /// The tempo is described.
    pub tempo: bool,
    /// The tonic is named (a key is always named with its mode).
    pub key: bool,
    /// Major or minor is said.
    pub mode: bool,
    /// The mood is described.
    pub mood: bool,
    /// The rhythmic density is described.
    pub density: bool,
    /// The register is described.
    pub register: bool,
}

impl Mentioned {
    /// Every attribute mentioned.
    pub const ALL: Mentioned = Mentioned {
        instrument: true,
        tempo: true,
        key: true,
        mode: true,
        mood: true,
        density: true,
        register: true,
    };

    /// Number of attributes mentioned.
    pub fn count(&self) -> usize {
        [
            self.instrument,
            self.tempo,
            self.key,
            self.mode,
            self.mood,
            self.density,
            self.register,
        ]
        .iter()
        .filter(|&&m| m)
        .count()
    }

    /// Attribute-wise OR.
    pub fn union(self, other: Mentioned) -> Mentioned {
        Mentioned {
            instrument: self.instrument || other.instrument,
            tempo: self.tempo || other.tempo,
            key: self.key || other.key,
            mode: self.mode || other.mode,
            mood: self.mood || other.mood,
            density: self.density || other.density,
            register: self.register || other.register,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tempo_bpm_matches_frames_per_beat() {
        let bpm: Vec<f32> = Tempo::ALL.iter().map(|t| t.bpm()).collect();
        assert_eq!(&bpm[..3], &[75.0, 100.0, 125.0]);
        assert!((bpm[3] - 166.666).abs() < 0.01);
        // No beat is 2x or 4x another (the analyzer relies on it).
        for a in Tempo::ALL {
            for b in Tempo::ALL {
                let (fa, fb) = (a.beat_frames(), b.beat_frames());
                assert!(fa != 2 * fb && fa != 4 * fb);
            }
        }
    }

    #[test]
    fn sixteenth_frames_round_on_the_beat_grid() {
        let f: Vec<usize> = (0..6).map(|k| Tempo::Fast.sixteenth_frame(k)).collect();
        // 0, 2.25, 4.5, 6.75, 9, 11.25
        assert_eq!(f, vec![0, 2, 5, 7, 9, 11]);
        assert_eq!(Tempo::Moderate.sixteenth_frame(4), 15);
    }

    #[test]
    fn key_names_read_like_captions() {
        assert_eq!(key_name(3, Mode::Major), "E flat major");
        assert_eq!(key_name(9, Mode::Minor), "A minor");
        assert_eq!(key_name(1, Mode::Minor), "C sharp minor");
    }

    #[test]
    fn names_parse_back() {
        for m in Mood::ALL {
            assert_eq!(m.name().parse::<Mood>().unwrap(), m);
        }
        assert_eq!("FAST".parse::<Tempo>().unwrap(), Tempo::Fast);
        let err = "grumpy".parse::<Mood>().unwrap_err();
        assert!(err.to_string().contains("grumpy") && err.to_string().contains("mood"));
    }

    #[test]
    fn registers_fit_the_playable_range_and_classify_their_centres() {
        for r in Register::ALL {
            let (lo, hi) = r.range();
            assert!(lo >= encore_codec::PITCH_LOW && hi < encore_codec::PITCH_HIGH);
            assert_eq!(Register::of_pitch(f32::from(r.centre())), r);
            assert_eq!(Register::of_pitch(f32::from(lo)), r);
            assert_eq!(Register::of_pitch(f32::from(hi)), r);
        }
    }

    #[test]
    fn attributes_round_trip_through_json() {
        let a = Attributes {
            instrument: Instrument::Marimba,
            tempo: Tempo::Upbeat,
            tonic: 7,
            mode: Mode::Minor,
            mood: Mood::Dreamy,
            density: Density::Busy,
            register: Register::High,
        };
        let json = serde_json::to_string(&a).unwrap();
        assert!(json.contains("\"marimba\"") && json.contains("\"upbeat\""));
        assert_eq!(serde_json::from_str::<Attributes>(&json).unwrap(), a);
    }
}

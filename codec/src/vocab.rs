//! The token vocabulary: control tokens and (instrument, pitch, velocity) notes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{
    BOS, CodecError, FIRST_NOTE, HOLD, NUM_INSTRUMENTS, NUM_PITCHES, NUM_VELOCITIES, PITCH_HIGH,
    PITCH_LOW, REST, VOCAB_SIZE,
};

/// The instruments of the embedded music world, each with its own timbre.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Instrument {
    /// Struck strings: fast attack, exponential decay.
    Piano,
    /// Plucked acoustic guitar: faster decay than piano.
    Guitar,
    /// Bowed violin: slow attack, sustained, vibrato.
    Violin,
    /// Flute: near-sine with breath noise, soft attack.
    Flute,
    /// Accordion: reedy, odd-heavy spectrum, detuned double reed.
    Accordion,
    /// Marimba: very sharp attack, fast decay, inharmonic overtone.
    Marimba,
    /// Trumpet: bright and brassy, slightly slow attack.
    Trumpet,
    /// Synth lead: sawtooth-like, sustained.
    Synth,
}

impl Instrument {
    /// All instruments in index order.
    pub const ALL: [Instrument; NUM_INSTRUMENTS] = [
        Instrument::Piano,
        Instrument::Guitar,
        Instrument::Violin,
        Instrument::Flute,
        Instrument::Accordion,
        Instrument::Marimba,
        Instrument::Trumpet,
        Instrument::Synth,
    ];

    /// Position of the instrument in [`Instrument::ALL`] (and in token ids).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The instrument at `index` in [`Instrument::ALL`].
    pub fn from_index(index: usize) -> Result<Instrument, CodecError> {
        Instrument::ALL
            .get(index)
            .copied()
            .ok_or(CodecError::InstrumentIndex { index })
    }

    /// Human-readable name, as used in captions ("acoustic guitar").
    pub fn name(self) -> &'static str {
        match self {
            Instrument::Piano => "piano",
            Instrument::Guitar => "acoustic guitar",
            Instrument::Violin => "violin",
            Instrument::Flute => "flute",
            Instrument::Accordion => "accordion",
            Instrument::Marimba => "marimba",
            Instrument::Trumpet => "trumpet",
            Instrument::Synth => "synth lead",
        }
    }

    /// Short identifier, as used by serde ("guitar").
    pub fn key(self) -> &'static str {
        match self {
            Instrument::Piano => "piano",
            Instrument::Guitar => "guitar",
            Instrument::Violin => "violin",
            Instrument::Flute => "flute",
            Instrument::Accordion => "accordion",
            Instrument::Marimba => "marimba",
            Instrument::Trumpet => "trumpet",
            Instrument::Synth => "synth",
        }
    }
}

impl fmt::Display for Instrument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Instrument {
    type Err = CodecError;

    /// Parses either the short key ("guitar") or the full name ("acoustic guitar").
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Instrument::ALL
            .into_iter()
            .find(|i| i.key() == wanted || i.name() == wanted)
            .ok_or_else(|| CodecError::UnknownInstrument {
                name: s.to_string(),
            })
    }
}

/// How hard a note is played.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Velocity {
    /// Quiet.
    Soft,
    /// About 8 dB louder than [`Velocity::Soft`].
    Loud,
}

impl Velocity {
    /// Both velocities in index order.
    pub const ALL: [Velocity; NUM_VELOCITIES] = [Velocity::Soft, Velocity::Loud];

    /// Position in [`Velocity::ALL`] (and in token ids).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One frame's worth of music.
///
/// A [`Token::Note`] starts a note in its frame; [`Token::Hold`] continues the
/// sounding note one more frame (or is silence when nothing sounds);
/// [`Token::Rest`] and [`Token::Bos`] are silence and end any sounding note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Token {
    /// Start of sequence.
    Bos,
    /// Silence.
    Rest,
    /// Continue the previous note.
    Hold,
    /// Start a note. `pitch` is a MIDI pitch in `PITCH_LOW..=PITCH_HIGH`.
    Note {
        /// Who plays it.
        instrument: Instrument,
        /// MIDI pitch.
        pitch: u8,
        /// How hard.
        velocity: Velocity,
    },
}

impl Token {
    /// A note token, checking that the pitch is playable.
    pub fn note(
        instrument: Instrument,
        pitch: u8,
        velocity: Velocity,
    ) -> Result<Token, CodecError> {
        if !(PITCH_LOW..=PITCH_HIGH).contains(&pitch) {
            return Err(CodecError::PitchOutOfRange { pitch });
        }
        Ok(Token::Note {
            instrument,
            pitch,
            velocity,
        })
    }

    /// The token's id in `0..VOCAB_SIZE`.
    ///
    /// A `Note` built by hand with a pitch outside the playable range is
    /// clamped into it; use [`Token::note`] to reject such pitches instead.
    pub fn id(&self) -> u32 {
        match *self {
            Token::Bos => BOS,
            Token::Rest => REST,
            Token::Hold => HOLD,
            Token::Note {
                instrument,
                pitch,
                velocity,
            } => {
                let p = (pitch.clamp(PITCH_LOW, PITCH_HIGH) - PITCH_LOW) as usize;
                let index =
                    (instrument.index() * NUM_PITCHES + p) * NUM_VELOCITIES + velocity.index();
                FIRST_NOTE + index as u32
            }
        }
    }

    /// The token with this id, or an error naming an out-of-vocabulary id.
    pub fn from_id(id: u32) -> Result<Token, CodecError> {
        match id {
            BOS => Ok(Token::Bos),
            REST => Ok(Token::Rest),
            HOLD => Ok(Token::Hold),
            _ if (id as usize) < VOCAB_SIZE => {
                let index = (id - FIRST_NOTE) as usize;
                let velocity = Velocity::ALL[index % NUM_VELOCITIES];
                let rest = index / NUM_VELOCITIES;
                let pitch = PITCH_LOW + (rest % NUM_PITCHES) as u8;
                let instrument = Instrument::ALL[rest / NUM_PITCHES];
                Ok(Token::Note {
                    instrument,
                    pitch,
                    velocity,
                })
            }
            _ => Err(CodecError::OutOfVocabulary { id }),
        }
    }

    /// Decodes a whole sequence, failing on the first out-of-vocabulary id.
    pub fn decode_all(ids: &[u32]) -> Result<Vec<Token>, CodecError> {
        ids.iter().map(|&id| Token::from_id(id)).collect()
    }
}

/// Frequency in Hz of a MIDI pitch (A4 = 69 = 440 Hz, equal temperament).
pub fn pitch_hz(pitch: u8) -> f32 {
    440.0 * 2f32.powf((f32::from(pitch) - 69.0) / 12.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_over_the_whole_vocabulary() {
        for id in 0..VOCAB_SIZE as u32 {
            let token = Token::from_id(id).expect("in vocabulary");
            assert_eq!(token.id(), id);
        }
    }

    #[test]
    fn note_ids_follow_the_documented_formula() {
        let t = Token::note(Instrument::Violin, 60, Velocity::Loud).unwrap();
        // 3 + ((2 * 48 + (60 - 36)) * 2 + 1)
        assert_eq!(t.id(), 3 + (2 * 48 + 24) * 2 + 1);
        assert_eq!(
            Token::note(Instrument::Piano, 36, Velocity::Soft)
                .unwrap()
                .id(),
            3
        );
        assert_eq!(
            Token::note(Instrument::Synth, 83, Velocity::Loud)
                .unwrap()
                .id(),
            VOCAB_SIZE as u32 - 1
        );
    }

    #[test]
    fn out_of_vocabulary_id_is_an_error_naming_it() {
        let err = Token::from_id(VOCAB_SIZE as u32).unwrap_err();
        assert!(matches!(err, CodecError::OutOfVocabulary { id } if id == 771));
        assert!(err.to_string().contains("771"));
        assert!(Token::decode_all(&[0, 1, 5000]).is_err());
    }

    #[test]
    fn unplayable_pitch_is_rejected() {
        assert!(Token::note(Instrument::Piano, 35, Velocity::Soft).is_err());
        assert!(Token::note(Instrument::Piano, 84, Velocity::Soft).is_err());
    }

    #[test]
    fn instrument_names_parse_and_serialize_lowercase() {
        for i in Instrument::ALL {
            assert_eq!(Instrument::from_index(i.index()).unwrap(), i);
            assert_eq!(i.name().parse::<Instrument>().unwrap(), i);
            assert_eq!(i.key().parse::<Instrument>().unwrap(), i);
        }
        assert!(Instrument::from_index(8).is_err());
        assert!("banjo".parse::<Instrument>().is_err());
        let json = serde_json::to_string(&Instrument::Guitar).unwrap();
        assert_eq!(json, "\"guitar\"");
    }

    #[test]
    fn a4_is_440_hz() {
        assert!((pitch_hz(69) - 440.0).abs() < 1e-3);
        assert!((pitch_hz(57) - 220.0).abs() < 1e-3);
    }
}

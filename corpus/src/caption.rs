//! Captions: prompts that describe a random subset of a clip's attributes in
//! varied words, the way people write text-to-music prompts.

use encore_codec::Instrument;
use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};

use crate::attributes::{Attributes, Density, Mentioned, Mode, Mood, Register, Tempo, key_name};

/// Where a phrase goes in a caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Before the noun: "slow", "dreamy".
    Before,
    /// After the noun: "at 75 bpm", "in a low register".
    After,
}

use Slot::{After, Before};

/// Probability that a caption mentions each attribute.
const P_INSTRUMENT: f64 = 0.9;
const P_TEMPO: f64 = 0.7;
/// A key is always named with its mode ("in A minor").
const P_KEY: f64 = 0.4;
/// When the key is not named: probability of saying major or minor alone.
const P_MODE_ONLY: f64 = 0.2;
const P_MOOD: f64 = 0.55;
const P_DENSITY: f64 = 0.45;
const P_REGISTER: f64 = 0.4;

/// Ways to name an instrument.
pub fn instrument_phrases(instrument: Instrument) -> &'static [&'static str] {
    match instrument {
        Instrument::Piano => &["piano", "solo piano", "grand piano"],
        Instrument::Guitar => &["acoustic guitar", "guitar", "fingerpicked guitar"],
        Instrument::Violin => &["violin", "solo violin", "fiddle"],
        Instrument::Flute => &["flute", "solo flute", "wooden flute"],
        Instrument::Accordion => &["accordion", "squeezebox"],
        Instrument::Marimba => &["marimba", "solo marimba"],
        Instrument::Trumpet => &["trumpet", "solo trumpet"],
        Instrument::Synth => &["synth lead", "synthesizer", "analog synth"],
    }
}

fn tempo_phrases(tempo: Tempo) -> &'static [(&'static str, Slot)] {
    match tempo {
        Tempo::Slow => &[
            ("slow", Before),
            ("laid-back", Before),
            ("unhurried", Before),
            ("at 75 bpm", After),
            ("at a slow tempo", After),
        ],
        Tempo::Moderate => &[
            ("mid-tempo", Before),
            ("moderately paced", Before),
            ("at 100 bpm", After),
            ("at a moderate tempo", After),
            ("at a walking pace", After),
        ],
        Tempo::Upbeat => &[
            ("upbeat", Before),
            ("brisk", Before),
            ("up-tempo", Before),
            ("at 125 bpm", After),
        ],
        Tempo::Fast => &[
            ("fast", Before),
            ("driving", Before),
            ("rapid", Before),
            ("at 166 bpm", After),
            ("at a fast tempo", After),
        ],
    }
}

fn mood_phrases(mood: Mood) -> &'static [(&'static str, Slot)] {
    match mood {
        Mood::Calm => &[
            ("calm", Before),
            ("peaceful", Before),
            ("relaxing", Before),
            ("gentle", Before),
            ("with a calm feel", After),
        ],
        Mood::Energetic => &[
            ("energetic", Before),
            ("lively", Before),
            ("high-energy", Before),
            ("exciting", Before),
        ],
        Mood::Melancholic => &[
            ("melancholic", Before),
            ("sad", Before),
            ("wistful", Before),
            ("nostalgic", Before),
            ("with a melancholic feel", After),
        ],
        Mood::Playful => &[
            ("playful", Before),
            ("cheerful", Before),
            ("whimsical", Before),
            ("bouncy", Before),
        ],
        Mood::Dreamy => &[
            ("dreamy", Before),
            ("ethereal", Before),
            ("floating", Before),
            ("hazy", Before),
        ],
        Mood::Triumphant => &[
            ("triumphant", Before),
            ("heroic", Before),
            ("victorious", Before),
            ("majestic", Before),
        ],
    }
}

fn density_phrases(density: Density) -> &'static [(&'static str, Slot)] {
    match density {
        Density::Sparse => &[
            ("sparse", Before),
            ("minimal", Before),
            ("with long notes", After),
            ("with sparse rhythms", After),
            ("with plenty of space", After),
        ],
        Density::Moderate => &[
            ("flowing", Before),
            ("with a steady rhythm", After),
            ("with flowing eighth notes", After),
            ("with an even pulse", After),
        ],
        Density::Busy => &[
            ("busy", Before),
            ("dense", Before),
            ("with busy rhythms", After),
            ("with lots of quick notes", After),
            ("with flurries of sixteenth notes", After),
        ],
    }
}

fn register_phrases(register: Register) -> &'static [(&'static str, Slot)] {
    match register {
        Register::Low => &[
            ("low-pitched", Before),
            ("deep", Before),
            ("in a low register", After),
            ("in the bass range", After),
        ],
        Register::Middle => &[
            ("mid-range", Before),
            ("in the middle register", After),
            ("in a comfortable middle range", After),
        ],
        Register::High => &[
            ("high-pitched", Before),
            ("in a high register", After),
            ("in the upper register", After),
        ],
    }
}

/// Saying major or minor without naming the tonic.
fn mode_phrases(mode: Mode) -> &'static [(&'static str, Slot)] {
    match mode {
        Mode::Major => &[("major-key", Before), ("in major", After)],
        Mode::Minor => &[("minor-key", Before), ("in minor", After)],
    }
}

/// Every phrase a caption may use for each attribute value of `attrs`, for
/// checking captions against what they claim to mention. The key's phrase
/// is its name ("E flat major").
pub fn attribute_phrases(attrs: &Attributes) -> AttributePhrases {
    let words = |list: &[(&str, Slot)]| list.iter().map(|p| p.0.to_string()).collect();
    AttributePhrases {
        instrument: instrument_phrases(attrs.instrument)
            .iter()
            .map(|p| p.to_string())
            .collect(),
        tempo: words(tempo_phrases(attrs.tempo)),
        key: vec![key_name(attrs.tonic, attrs.mode)],
        mode: words(mode_phrases(attrs.mode)),
        mood: words(mood_phrases(attrs.mood)),
        density: words(density_phrases(attrs.density)),
        register: words(register_phrases(attrs.register)),
    }
}

/// The phrases captions use for each attribute of one [`Attributes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributePhrases {
    /// Instrument names.
    pub instrument: Vec<String>,
    /// Tempo descriptions.
    pub tempo: Vec<String>,
    /// The key's name, with its mode.
    pub key: Vec<String>,
    /// Mode without tonic.
    pub mode: Vec<String>,
    /// Mood descriptions.
    pub mood: Vec<String>,
    /// Rhythmic density descriptions.
    pub density: Vec<String>,
    /// Register descriptions.
    pub register: Vec<String>,
}

const NOUNS: [&str; 7] = [
    "melody",
    "tune",
    "piece",
    "song",
    "riff",
    "track",
    "instrumental",
];

/// Writes a caption for `attrs` mentioning a random subset of its attributes.
pub fn caption(attrs: &Attributes, rng: &mut impl Rng) -> (String, Mentioned) {
    caption_mentioning(attrs, Mentioned::default(), rng)
}

/// Like [`caption`], but always mentions at least the attributes in `must`.
pub fn caption_mentioning(
    attrs: &Attributes,
    must: Mentioned,
    rng: &mut impl Rng,
) -> (String, Mentioned) {
    let key = rng.random_bool(P_KEY);
    let mut mentioned = Mentioned {
        instrument: rng.random_bool(P_INSTRUMENT),
        tempo: rng.random_bool(P_TEMPO),
        key,
        mode: key || rng.random_bool(P_MODE_ONLY),
        mood: rng.random_bool(P_MOOD),
        density: rng.random_bool(P_DENSITY),
        register: rng.random_bool(P_REGISTER),
    }
    .union(must);
    // A named key always carries its mode.
    mentioned.mode |= mentioned.key;

    let mut before: Vec<&str> = Vec::new();
    let mut after: Vec<String> = Vec::new();
    let mut place = |options: &[(&'static str, Slot)], rng: &mut _| {
        if let Some(&(text, slot)) = options.choose(rng) {
            match slot {
                Before => before.push(text),
                After => after.push(text.to_string()),
            }
        }
    };
    if mentioned.tempo {
        place(tempo_phrases(attrs.tempo), rng);
    }
    if mentioned.mood {
        place(mood_phrases(attrs.mood), rng);
    }
    if mentioned.density {
        place(density_phrases(attrs.density), rng);
    }
    if mentioned.register {
        place(register_phrases(attrs.register), rng);
    }
    if mentioned.key {
        let key = key_name(attrs.tonic, attrs.mode);
        after.push(if rng.random_bool(0.8) {
            format!("in {key}")
        } else {
            format!("in the key of {key}")
        });
    } else if mentioned.mode {
        place(mode_phrases(attrs.mode), rng);
    }
    before.shuffle(rng);
    after.shuffle(rng);

    let noun = NOUNS.choose(rng).copied().unwrap_or("melody");
    let core = if mentioned.instrument {
        let name = instrument_phrases(attrs.instrument)
            .choose(rng)
            .copied()
            .unwrap_or(attrs.instrument.name());
        match rng.random_range(0..4) {
            0 => format!("{noun} played on {name}"),
            1 => format!("{noun} played by {name}"),
            2 if name.starts_with("solo ") => name.to_string(),
            _ => format!("{name} {noun}"),
        }
    } else {
        noun.to_string()
    };

    let mut text = String::new();
    // "a minor-key tune" would read as the key of A minor: no article there.
    let first = before.first().copied().unwrap_or(core.as_str());
    if rng.random_bool(0.5) && !first.starts_with("major") && !first.starts_with("minor") {
        let vowel = first.starts_with(['a', 'e', 'i', 'o', 'u']);
        text.push_str(if vowel { "an " } else { "a " });
    }
    let separator = if rng.random_bool(0.5) { ", " } else { " " };
    text.push_str(&before.join(separator));
    if !before.is_empty() {
        text.push(' ');
    }
    text.push_str(&core);
    for (i, phrase) in after.iter().enumerate() {
        text.push_str(if i > 0 && rng.random_bool(0.3) {
            ", "
        } else {
            " "
        });
        text.push_str(phrase);
    }
    if rng.random_bool(0.2) {
        let mut chars = text.chars();
        if let Some(c) = chars.next() {
            text = c.to_uppercase().chain(chars).collect();
        }
    }
    (text, mentioned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::words;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Whether the caption's words contain `phrase`'s words, consecutively.
    fn says(caption_words: &[String], phrase: &str) -> bool {
        let p = words(phrase);
        caption_words.windows(p.len()).any(|w| w == p.as_slice())
    }

    /// Whether the caption says any phrase of any of `variants`, as picked by `field`.
    fn says_any(
        caption_words: &[String],
        variants: impl Iterator<Item = Attributes>,
        field: fn(AttributePhrases) -> Vec<String>,
    ) -> bool {
        variants
            .flat_map(|a| field(attribute_phrases(&a)))
            .any(|p| says(caption_words, &p))
    }

    #[test]
    fn captions_say_exactly_what_they_claim_to_mention() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..3000 {
            let a = Attributes::sample(&mut rng);
            let (text, m) = caption(&a, &mut rng);
            let w = words(&text);
            let own = attribute_phrases(&a);
            let checks: [(&str, bool, Vec<String>, bool); 6] = [
                (
                    "instrument",
                    m.instrument,
                    own.instrument,
                    says_any(
                        &w,
                        Instrument::ALL
                            .map(|instrument| Attributes { instrument, ..a })
                            .into_iter(),
                        |p| p.instrument,
                    ),
                ),
                (
                    "tempo",
                    m.tempo,
                    own.tempo,
                    says_any(
                        &w,
                        Tempo::ALL
                            .map(|tempo| Attributes { tempo, ..a })
                            .into_iter(),
                        |p| p.tempo,
                    ),
                ),
                (
                    "mood",
                    m.mood,
                    own.mood,
                    says_any(
                        &w,
                        Mood::ALL.map(|mood| Attributes { mood, ..a }).into_iter(),
                        |p| p.mood,
                    ),
                ),
                (
                    "density",
                    m.density,
                    own.density,
                    says_any(
                        &w,
                        Density::ALL
                            .map(|density| Attributes { density, ..a })
                            .into_iter(),
                        |p| p.density,
                    ),
                ),
                (
                    "register",
                    m.register,
                    own.register,
                    says_any(
                        &w,
                        Register::ALL
                            .map(|register| Attributes { register, ..a })
                            .into_iter(),
                        |p| p.register,
                    ),
                ),
                (
                    "key",
                    m.key,
                    own.key,
                    says_any(
                        &w,
                        (0..12).flat_map(|tonic| {
                            Mode::ALL.map(|mode| Attributes { tonic, mode, ..a })
                        }),
                        |p| p.key,
                    ),
                ),
            ];
            for (what, mentioned, own, any) in checks {
                if mentioned {
                    assert!(
                        own.iter().any(|p| says(&w, p)),
                        "{what} missing from {text:?}"
                    );
                } else {
                    assert!(!any, "{what} not mentioned but said in {text:?}");
                }
            }
            let mode_said = w.iter().any(|x| x == "major" || x == "minor");
            assert_eq!(m.mode, mode_said, "mode in {text:?}");
        }
    }

    #[test]
    fn mention_rates_match_the_design() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let n = 4000;
        let mut counts = [0usize; 7];
        for _ in 0..n {
            let attrs = Attributes::sample(&mut rng);
            let (_, m) = caption(&attrs, &mut rng);
            for (c, flag) in counts.iter_mut().zip([
                m.instrument,
                m.tempo,
                m.key,
                m.mode,
                m.mood,
                m.density,
                m.register,
            ]) {
                *c += usize::from(flag);
            }
        }
        let rate = |i: usize| counts[i] as f64 / n as f64;
        assert!((rate(0) - 0.9).abs() < 0.03);
        assert!((rate(1) - 0.7).abs() < 0.03);
        for i in 2..7 {
            assert!(
                (0.37..=0.63).contains(&rate(i)),
                "attribute {i}: {}",
                rate(i)
            );
        }
    }

    #[test]
    fn forced_mentions_are_honoured() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let must = Mentioned {
            instrument: true,
            tempo: true,
            ..Mentioned::default()
        };
        for _ in 0..200 {
            let attrs = Attributes::sample(&mut rng);
            let (_, m) = caption_mentioning(&attrs, must, &mut rng);
            assert!(m.instrument && m.tempo);
        }
    }

    #[test]
    fn captions_vary() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        let attrs = Attributes::sample(&mut rng);
        let distinct: std::collections::HashSet<String> =
            (0..50).map(|_| caption(&attrs, &mut rng).0).collect();
        assert!(distinct.len() > 30);
    }
}

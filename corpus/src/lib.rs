//! Encore's procedural corpus of captioned music, its caption encoder and
//! the attribute analysis that checks generated music against its prompt.
//!
//! No music dataset can be downloaded where Encore runs, so this crate
//! composes one: every [`Example`] is a caption ("upbeat flute melody in D
//! major") and a clip of audio tokens (the `encore-codec` vocabulary) drawn
//! from the same [`Attributes`] (instrument, tempo, key and mode, mood,
//! density, register). Examples are generated on demand, deterministically
//! from `(seed, split, index)`, so any process can reproduce any example
//! without storing a dataset.
//!
//! ```text
//! Corpus --(caption, tokens)--> pretraining of the base policy
//!    \--> captions --TextEncoder--> text features --> policy / adherence reward
//!    \--> eval_prompts --> RL rollouts --tokens--> analysis::analyze --> "does it follow the prompt?"
//! ```
//!
//! - [`compose`] writes the music, [`caption()`] the prompt;
//! - [`text::TextEncoder`] is the fixed front half of the text tower;
//! - [`analysis::analyze`] recovers attributes from tokens alone.

#![warn(missing_docs)]

pub mod analysis;
mod attributes;
mod caption;
mod compose;
pub mod text;

use encore_codec::VOCAB_SIZE;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use analysis::{Analysis, analyze};
pub use attributes::{
    Articulation, Attributes, Contour, Density, Mentioned, Mode, Mood, Register, Tempo, key_name,
};
pub use caption::{
    AttributePhrases, attribute_phrases, caption, caption_mentioning, instrument_phrases,
};
pub use compose::compose;
pub use encore_codec::Instrument;
pub use text::{TEXT_DIM, TextEncoder};

/// Errors from the corpus.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// A name that matches no value of an attribute.
    #[error("unknown {attribute} {value:?}")]
    UnknownValue {
        /// Which attribute ("tempo", "mood", ...).
        attribute: &'static str,
        /// The name that was given.
        value: String,
    },
}

/// Which stream of examples: training data, or held-out evaluation data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Examples the base policy is pretrained on.
    Train,
    /// Held-out examples, from an independent random stream.
    Eval,
}

/// One captioned clip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Position in its split.
    pub index: u64,
    /// The prompt.
    pub caption: String,
    /// What the clip was composed from.
    pub attributes: Attributes,
    /// Which attributes the caption mentions.
    pub mentioned: Mentioned,
    /// The clip: exactly `frames` token ids, no `Bos`.
    pub tokens: Vec<u32>,
}

/// The corpus: an unbounded, randomly accessible set of examples of
/// `frames` tokens, determined by `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Corpus {
    /// Seed of every random stream.
    pub seed: u64,
    /// Clip length in tokens (25 per second).
    pub frames: usize,
}

/// Stream domains: independent random streams per purpose.
const DOMAIN_TRAIN: u64 = 0x7472_6169_6e00_0001;
const DOMAIN_EVAL: u64 = 0x6576_616c_0000_0002;
const DOMAIN_PROMPTS: u64 = 0x7072_6f6d_7074_0003;

impl Corpus {
    /// A corpus of clips of `frames` tokens.
    pub fn new(seed: u64, frames: usize) -> Corpus {
        Corpus { seed, frames }
    }

    /// Example `index` of `split`; the same `(seed, frames, split, index)`
    /// always gives the same example.
    pub fn example(&self, split: Split, index: u64) -> Example {
        let domain = match split {
            Split::Train => DOMAIN_TRAIN,
            Split::Eval => DOMAIN_EVAL,
        };
        self.draw(domain, index, |attributes, rng| {
            caption::caption(attributes, rng)
        })
    }

    /// Examples `start..start + n` of `split`.
    pub fn batch(&self, split: Split, start: u64, n: usize) -> Vec<Example> {
        (start..start + n as u64)
            .map(|i| self.example(split, i))
            .collect()
    }

    /// `n` held-out prompts whose captions mention at least the instrument
    /// and the tempo, for checking that a trained policy follows its prompt.
    /// Each comes with a reference clip; they are drawn from their own
    /// stream, independent of both splits.
    pub fn eval_prompts(&self, n: usize) -> Vec<Example> {
        let must = Mentioned {
            instrument: true,
            tempo: true,
            ..Mentioned::default()
        };
        (0..n as u64)
            .map(|index| {
                self.draw(DOMAIN_PROMPTS, index, |attributes, rng| {
                    caption::caption_mentioning(attributes, must, rng)
                })
            })
            .collect()
    }

    /// Example `index` of the stream `domain`: attributes, then the caption
    /// written by `write_caption`, then the clip, all from one random stream.
    fn draw(
        &self,
        domain: u64,
        index: u64,
        write_caption: impl FnOnce(&Attributes, &mut ChaCha8Rng) -> (String, Mentioned),
    ) -> Example {
        let mut rng = self.rng(domain, index);
        let attributes = Attributes::sample(&mut rng);
        let (caption, mentioned) = write_caption(&attributes, &mut rng);
        let tokens = compose::compose(&attributes, self.frames, &mut rng);
        Example {
            index,
            caption,
            attributes,
            mentioned,
            tokens,
        }
    }

    /// The random stream of one example: ChaCha8 keyed by the seed and the
    /// domain, with the example's index as the stream number.
    fn rng(&self, domain: u64, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(self.seed ^ splitmix64(domain)));
        rng.set_stream(index);
        rng
    }
}

/// [`Corpus::eval_prompts`] of `Corpus::new(seed, frames)`.
pub fn eval_prompts(seed: u64, frames: usize, n: usize) -> Vec<Example> {
    Corpus::new(seed, frames).eval_prompts(n)
}

/// Entropy, in nats per token, of the empirical unigram distribution of the
/// examples' tokens: the loss of a model that ignores context and prompt,
/// which a pretrained policy must beat. 0 for no tokens.
pub fn unigram_entropy(examples: &[Example]) -> f64 {
    let mut counts = vec![0u64; VOCAB_SIZE];
    let mut total = 0u64;
    for &t in examples.iter().flat_map(|x| &x.tokens) {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1;
            total += 1;
        }
    }
    if total == 0 {
        return 0.0;
    }
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum()
}

/// SplitMix64 finaliser: spreads nearby seeds over the whole key space.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn examples_are_deterministic_in_seed_split_and_index() {
        let a = Corpus::new(1, 100);
        assert_eq!(a.example(Split::Train, 42), a.example(Split::Train, 42));
        assert_eq!(
            a.batch(Split::Eval, 3, 5),
            Corpus::new(1, 100).batch(Split::Eval, 3, 5)
        );
        // Random access agrees with batches.
        assert_eq!(a.batch(Split::Train, 40, 5)[2], a.example(Split::Train, 42));
        let b = Corpus::new(2, 100);
        let differ = (0..20)
            .filter(|&i| a.example(Split::Train, i).tokens != b.example(Split::Train, i).tokens)
            .count();
        assert!(differ >= 18);
        let captions_differ = (0..20)
            .filter(|&i| a.example(Split::Train, i).caption != b.example(Split::Train, i).caption)
            .count();
        assert!(captions_differ >= 18);
    }

    #[test]
    fn train_and_eval_streams_differ() {
        let c = Corpus::new(3, 100);
        let train: HashSet<Vec<u32>> = c
            .batch(Split::Train, 0, 50)
            .into_iter()
            .map(|x| x.tokens)
            .collect();
        let eval: HashSet<Vec<u32>> = c
            .batch(Split::Eval, 0, 50)
            .into_iter()
            .map(|x| x.tokens)
            .collect();
        let prompts: HashSet<Vec<u32>> = c.eval_prompts(50).into_iter().map(|x| x.tokens).collect();
        assert!(train.is_disjoint(&eval));
        assert!(train.is_disjoint(&prompts) && eval.is_disjoint(&prompts));
    }

    #[test]
    fn clips_have_exact_length_and_valid_ids() {
        for frames in [0, 1, 30, 250, 501] {
            let c = Corpus::new(4, frames);
            for x in c.batch(Split::Train, 0, 20) {
                assert_eq!(x.tokens.len(), frames);
                assert!(
                    x.tokens
                        .iter()
                        .all(|&t| (t as usize) < VOCAB_SIZE && t != encore_codec::BOS)
                );
            }
        }
    }

    #[test]
    fn every_clip_has_a_single_instrument_and_stays_in_key() {
        let c = Corpus::new(5, 250);
        for x in c.batch(Split::Train, 0, 200) {
            let a = analyze(&x.tokens);
            assert_eq!(a.instrument, Some(x.attributes.instrument));
            assert_eq!(a.instrument_consistency, 1.0);
            let in_key = a
                .in_key_fraction(x.attributes.tonic, x.attributes.mode)
                .unwrap_or(0.0);
            assert!(in_key > 0.85, "{in_key} for {:?}", x.attributes);
        }
    }

    #[test]
    fn every_value_of_every_attribute_appears() {
        let c = Corpus::new(6, 8);
        let xs = c.batch(Split::Train, 0, 2000);
        let seen = |f: &dyn Fn(&Attributes) -> usize| {
            xs.iter()
                .map(|x| f(&x.attributes))
                .collect::<HashSet<_>>()
                .len()
        };
        assert_eq!(seen(&|a| a.instrument.index()), Instrument::ALL.len());
        assert_eq!(seen(&|a| a.tempo.index()), Tempo::ALL.len());
        assert_eq!(seen(&|a| usize::from(a.tonic)), 12);
        assert_eq!(seen(&|a| a.mode.index()), Mode::ALL.len());
        assert_eq!(seen(&|a| a.mood.index()), Mood::ALL.len());
        assert_eq!(seen(&|a| a.density.index()), Density::ALL.len());
        assert_eq!(seen(&|a| a.register.index()), Register::ALL.len());
    }

    #[test]
    fn eval_prompts_mention_instrument_and_tempo() {
        let prompts = eval_prompts(7, 50, 100);
        assert_eq!(prompts.len(), 100);
        assert!(
            prompts
                .iter()
                .all(|p| p.mentioned.instrument && p.mentioned.tempo)
        );
        assert_eq!(prompts, Corpus::new(7, 50).eval_prompts(100));
        let captions: HashSet<&str> = prompts.iter().map(|p| p.caption.as_str()).collect();
        assert!(captions.len() > 90);
    }

    #[test]
    fn unigram_entropy_matches_hand_computation() {
        let example = |tokens: Vec<u32>| Example {
            index: 0,
            caption: String::new(),
            attributes: Attributes::sample(&mut ChaCha8Rng::seed_from_u64(0)),
            mentioned: Mentioned::default(),
            tokens,
        };
        assert_eq!(unigram_entropy(&[]), 0.0);
        assert_eq!(unigram_entropy(&[example(vec![5, 5, 5])]), 0.0);
        // Two equally likely tokens: ln 2.
        let h = unigram_entropy(&[example(vec![1, 2]), example(vec![2, 1])]);
        assert!((h - std::f64::consts::LN_2).abs() < 1e-12);
        // The corpus is far from uniform over the vocabulary.
        let xs = Corpus::new(8, 250).batch(Split::Train, 0, 100);
        let h = unigram_entropy(&xs);
        assert!(h > 1.0 && h < (VOCAB_SIZE as f64).ln());
    }
}

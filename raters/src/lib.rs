//! Simulated human raters for the embedded music world, and the JSONL
//! dataset records that Encore's reward models train on.
//!
//! MusicRL trains its quality reward on 1-5 ratings (MOS) and its user
//! preference reward on 300,000 A/B comparisons collected from people. No
//! people are at hand where Encore runs, so this crate simulates them: a
//! [`Population`] of [`Persona`]s, each with its own tastes around a shared
//! mean, who rate clips and choose between pairs with human-like noise, ties
//! and skipped answers. The records they write are the same JSONL records
//! that real collected data will use; only the optional [`Truth`] field,
//! the simulator's ground truth, is missing from real data.
//!
//! ```text
//! Corpus prompt --generate::candidate--> two clips (tastes vary where the caption is silent,
//!                                        corrupted at a random severity)
//!     --Persona::prefer / Persona::rate--> PreferenceRecord / RatingRecord --write_jsonl--> *.jsonl
//!     --> reward-model training (encore-reward-train), and ceilings: how well any model could do
//! ```
//!
//! - [`records`]: the record types, JSONL reading and atomic writing, validation;
//! - [`sim`]: latent [`quality`], the personas and their choices;
//! - [`generate`]: deterministic dataset generators, corruption, and the
//!   accuracy ceilings that rater noise allows;
//! - [`stats`]: Pearson and Spearman correlation.
//!
//! The format and the simulation are documented for users in `docs/datasets.md`.

#![warn(missing_docs)]

pub mod generate;
pub mod records;
pub mod sim;
pub mod stats;

pub use generate::{
    Candidate, ChoiceCounts, Corruption, GenConfig, PreferenceCeiling, QualityCeiling, SampledPair,
    candidate, clips, corrupt, judge_pairs, pair_prompts, preference_ceiling, preferences,
    quality_ceiling, ratings,
};
pub use records::{
    Choice, ClipRecord, PairClip, PreferenceRecord, RatingRecord, RecordError, Truth, Validate,
    read_jsonl, read_valid_jsonl, write_jsonl,
};
pub use sim::{Features, Persona, Population, UtilityParts, quality};
pub use stats::{pearson, spearman};

/// SplitMix64 finaliser: spreads nearby seeds over the whole key space.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream `index` of `domain` under `seed`: ChaCha8 keyed by the
/// seed and the domain, with the index as the stream number, so every item
/// of every generator can be drawn on its own, in any order.
pub(crate) fn stream(seed: u64, domain: u64, index: u64) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(splitmix64(seed ^ splitmix64(domain)));
    rng.set_stream(index);
    rng
}

/// A standard normal draw (Box-Muller), so no distribution crate is needed.
pub(crate) fn normal(rng: &mut impl rand::Rng) -> f32 {
    // 1 - u is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_unit_moments() {
        let mut rng = stream(1, 2, 3);
        let xs: Vec<f64> = (0..20_000).map(|_| f64::from(normal(&mut rng))).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        // About 68% within one standard deviation.
        let within = xs.iter().filter(|x| x.abs() < 1.0).count() as f64 / xs.len() as f64;
        assert!((within - 0.6827).abs() < 0.02, "{within}");
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        use rand::Rng;
        let draw = |seed, domain, index| stream(seed, domain, index).random::<u64>();
        assert_eq!(draw(1, 2, 3), draw(1, 2, 3));
        assert_ne!(draw(1, 2, 3), draw(1, 2, 4));
        assert_ne!(draw(1, 2, 3), draw(1, 5, 3));
        assert_ne!(draw(1, 2, 3), draw(6, 2, 3));
    }
}

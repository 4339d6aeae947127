//! Generates a preference set and a rating set with the default
//! configuration and prints their ceilings, label mix and timing (the
//! numbers in `docs/datasets.md`):
//! `cargo run --release -p encore-raters --example ceilings [pairs] [clips]`.

use std::time::Instant;

use encore_raters::{
    ChoiceCounts, GenConfig, Population, preference_ceiling, preferences, quality_ceiling, ratings,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let pairs: usize = args.next().map_or(Ok(4000), |a| a.parse())?;
    let clips: usize = args.next().map_or(Ok(2000), |a| a.parse())?;
    let cfg = GenConfig {
        seed: 1,
        n: pairs,
        ..GenConfig::default()
    };

    let start = Instant::now();
    let prefs = preferences(&cfg)?;
    let gen_prefs = start.elapsed();
    let start = Instant::now();
    let ceiling = preference_ceiling(&prefs, &Population::new(cfg.population_seed), cfg.raters);
    let ceiling_time = start.elapsed();
    let counts = ChoiceCounts::of(&prefs);
    let [a, b, tie, skip] = counts.fractions();
    println!(
        "preferences: {pairs} pairs, {} records in {gen_prefs:.2?} (ceiling in {ceiling_time:.2?})",
        prefs.len()
    );
    println!("  labels: a {a:.3} b {b:.3} tie {tie:.3} skip {skip:.3}");
    println!(
        "  bayes accuracy {:.3}, inter-rater agreement {:.3} (observed {:?} on {} pairs), n {}",
        ceiling.bayes_accuracy,
        ceiling.inter_rater_agreement,
        ceiling.observed_agreement,
        ceiling.n_repeated,
        ceiling.n
    );

    let cfg = GenConfig { n: clips, ..cfg };
    let start = Instant::now();
    let rated = ratings(&cfg)?;
    let gen_ratings = start.elapsed();
    let q = quality_ceiling(&rated);
    let mut hist = [0usize; 5];
    for r in &rated {
        hist[usize::from(r.rating - 1)] += 1;
    }
    println!(
        "ratings: {clips} clips, {} records in {gen_ratings:.2?}; ratings 1..5 {hist:?}",
        rated.len()
    );
    println!(
        "  quality spearman ceiling {:.3} over {} clips",
        q.spearman, q.n_clips
    );
    Ok(())
}

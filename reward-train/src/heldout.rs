//! Held-out evaluation figures for the reward models: retrieval recall for
//! the dual encoder, pairwise accuracy for the preference model, and the
//! attribute oracle that bounds retrieval when several clips fit a caption.

use encore_corpus::{Attributes, Mentioned};

/// Text-to-audio recall@k: the fraction of captions `i` whose own clip `i`
/// ranks among the `k` clips most similar to the caption. `similarity` is
/// row-major `[n captions, n clips]`. A tie with the true clip counts
/// against it, so a constant model scores 0, not 1.
pub fn recall_at_k(similarity: &[f32], n: usize, k: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let hits = (0..n)
        .filter(|&i| {
            let row = &similarity[i * n..(i + 1) * n];
            let own = row[i];
            let better = row
                .iter()
                .enumerate()
                .filter(|&(j, &s)| j != i && s >= own)
                .count();
            better < k
        })
        .count();
    hits as f64 / n as f64
}

/// Whether a clip with attributes `clip` fits a caption written for
/// `prompt` that mentions `mentioned`.
pub fn fits(prompt: &Attributes, mentioned: &Mentioned, clip: &Attributes) -> bool {
    (!mentioned.instrument || prompt.instrument == clip.instrument)
        && (!mentioned.tempo || prompt.tempo == clip.tempo)
        && (!mentioned.key || (prompt.tonic == clip.tonic && prompt.mode == clip.mode))
        && (!mentioned.mode || prompt.mode == clip.mode)
        && (!mentioned.mood || prompt.mood == clip.mood)
        && (!mentioned.density || prompt.density == clip.density)
        && (!mentioned.register || prompt.register == clip.register)
}

/// Recall@k of an oracle that knows every clip's true attributes and, for
/// each caption, ranks the clips that fit it first, in random order: the
/// best any model can do when captions leave attributes open.
pub fn oracle_recall_at_k(truth: &[(Attributes, Mentioned)], k: usize) -> f64 {
    let n = truth.len();
    if n == 0 {
        return 0.0;
    }
    let total: f64 = truth
        .iter()
        .map(|(prompt, mentioned)| {
            let fitting = truth
                .iter()
                .filter(|(clip, _)| fits(prompt, mentioned, clip))
                .count()
                .max(1);
            (k as f64 / fitting as f64).min(1.0)
        })
        .sum();
    total / n as f64
}

/// Fraction of `margins` (score of the preferred clip minus the other's)
/// that are positive.
pub fn pairwise_accuracy(margins: &[f32]) -> f64 {
    if margins.is_empty() {
        return 0.0;
    }
    margins.iter().filter(|&&m| m > 0.0).count() as f64 / margins.len() as f64
}

/// Mean squared error.
pub fn mse(predicted: &[f64], actual: &[f64]) -> f64 {
    if predicted.is_empty() {
        return 0.0;
    }
    predicted
        .iter()
        .zip(actual)
        .map(|(p, a)| (p - a).powi(2))
        .sum::<f64>()
        / predicted.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use encore_corpus::{Corpus, Split};

    #[test]
    fn recall_by_hand() {
        // Caption 0 ranks clip 0 first; caption 1 ranks clip 1 second;
        // caption 2 ranks clip 2 last.
        let sim = [
            0.9, 0.1, 0.2, //
            0.8, 0.5, 0.1, //
            0.3, 0.4, 0.2,
        ];
        assert!((recall_at_k(&sim, 3, 1) - 1.0 / 3.0).abs() < 1e-12);
        assert!((recall_at_k(&sim, 3, 2) - 2.0 / 3.0).abs() < 1e-12);
        assert!((recall_at_k(&sim, 3, 3) - 1.0).abs() < 1e-12);
        // A constant similarity retrieves nothing.
        assert_eq!(recall_at_k(&[0.5; 9], 3, 1), 0.0);
    }

    #[test]
    fn oracle_counts_the_clips_that_fit() {
        let ex = Corpus::new(1, 10).batch(Split::Train, 0, 2);
        let mut a = ex[0].attributes;
        let mut b = ex[1].attributes;
        a.instrument = encore_corpus::Instrument::ALL[0];
        b.instrument = encore_corpus::Instrument::ALL[1];
        let only_instrument = Mentioned {
            instrument: true,
            ..Mentioned::default()
        };
        let nothing = Mentioned::default();
        // Caption 0 names its instrument: one clip fits. Caption 1 names
        // nothing: both fit, so the oracle finds it half the time at k=1.
        let truth = [(a, only_instrument), (b, nothing)];
        assert!((oracle_recall_at_k(&truth, 1) - 0.75).abs() < 1e-12);
        assert!((oracle_recall_at_k(&truth, 2) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn accuracy_and_mse_by_hand() {
        assert_eq!(pairwise_accuracy(&[1.0, -0.5, 0.0, 2.0]), 0.5);
        assert!((mse(&[1.0, 2.0], &[2.0, 4.0]) - 2.5).abs() < 1e-12);
    }
}

//! The fixed front half of the text tower: a feature-hashing caption encoder.
//!
//! Captions become [`TEXT_DIM`]-dimensional vectors with no learned
//! parameters: the caption is lowercased and split on non-alphanumerics
//! (numbers such as "166" stay tokens), each unigram and each bigram is
//! hashed with FNV-1a 64 to a bucket and a sign, and the counts are
//! L2-normalised. The hash is fixed and stable across processes, platforms
//! and releases, so embeddings computed by an actor, a reward server and the
//! learner agree. The learned half of the text tower (the projection that
//! turns these features into a prompt embedding) lives in the models that
//! consume them: the policy's conditioning and the adherence reward's text
//! encoder.

/// Dimension of a caption embedding.
pub const TEXT_DIM: usize = 2048;

/// Weight of a bigram feature relative to a unigram.
const BIGRAM_WEIGHT: f32 = 0.7;

/// Feature-hashing caption encoder. Stateless and cheap to construct.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextEncoder;

impl TextEncoder {
    /// The encoder.
    pub fn new() -> TextEncoder {
        TextEncoder
    }

    /// Output dimension ([`TEXT_DIM`]).
    pub fn dim(&self) -> usize {
        TEXT_DIM
    }

    /// Embeds one caption: a unit vector of length [`TEXT_DIM`], or all zeros
    /// when the caption has no words.
    pub fn embed(&self, caption: &str) -> Vec<f32> {
        let mut v = vec![0.0f32; TEXT_DIM];
        self.embed_into(caption, &mut v);
        v
    }

    /// Embeds captions into one row-major `captions.len() x TEXT_DIM` buffer.
    pub fn embed_batch(&self, captions: &[&str]) -> Vec<f32> {
        let mut out = vec![0.0f32; captions.len() * TEXT_DIM];
        for (caption, row) in captions.iter().zip(out.chunks_exact_mut(TEXT_DIM)) {
            self.embed_into(caption, row);
        }
        out
    }

    fn embed_into(&self, caption: &str, out: &mut [f32]) {
        let w = words(caption);
        for word in &w {
            add_feature(out, &["w", word], 1.0);
        }
        for pair in w.windows(2) {
            add_feature(out, &["b", &pair[0], &pair[1]], BIGRAM_WEIGHT);
        }
        let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            out.iter_mut().for_each(|x| *x /= norm);
        }
    }
}

/// Lowercased alphanumeric runs of `text`: "Laid-back, 75 BPM" gives
/// `["laid", "back", "75", "bpm"]`.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Adds `weight` times a hashed sign to the bucket of the feature whose
/// parts are `parts` (joined by an unambiguous separator).
fn add_feature(out: &mut [f32], parts: &[&str], weight: f32) {
    let mut h = FNV_OFFSET;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h = fnv1a(h, &[0x1f]);
        }
        h = fnv1a(h, part.as_bytes());
    }
    let bucket = (h % TEXT_DIM as u64) as usize;
    let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
    out[bucket] += sign * weight;
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 over `bytes`, continuing from state `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Corpus, Split};

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn fnv1a_matches_published_vectors() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn words_split_on_non_alphanumerics() {
        assert_eq!(
            words("Laid-back, 75 BPM!"),
            vec!["laid", "back", "75", "bpm"]
        );
        assert!(words(" -- ").is_empty());
    }

    #[test]
    fn embedding_is_deterministic_and_unit_norm() {
        let e = TextEncoder::new();
        let a = e.embed("Energetic synth lead riff at 166 bpm with busy rhythms");
        assert_eq!(
            a,
            e.embed("Energetic synth lead riff at 166 bpm with busy rhythms")
        );
        assert_eq!(a.len(), TEXT_DIM);
        assert!((dot(&a, &a) - 1.0).abs() < 1e-5);
        // Case and punctuation do not matter.
        assert_eq!(
            a,
            e.embed("energetic, synth-lead riff at 166 BPM with busy rhythms")
        );
    }

    #[test]
    fn empty_caption_is_the_zero_vector() {
        let v = TextEncoder::new().embed("");
        assert!(v.iter().all(|&x| x == 0.0));
        let v = TextEncoder::new().embed("!!!");
        assert!(v.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn batch_rows_equal_single_embeddings() {
        let e = TextEncoder::new();
        let captions = ["calm solo piano in A minor", "", "fast trumpet tune"];
        let batch = e.embed_batch(&captions);
        assert_eq!(batch.len(), 3 * TEXT_DIM);
        for (row, c) in batch.chunks(TEXT_DIM).zip(captions) {
            assert_eq!(row, e.embed(c).as_slice());
        }
    }

    #[test]
    fn one_word_differs_from_a_different_word_by_its_features() {
        // With one word each, the embedding is a signed one-hot: the same word
        // gives cosine 1, different words cosine 0 unless their buckets collide.
        let e = TextEncoder::new();
        assert!((dot(&e.embed("piano"), &e.embed("PIANO")) - 1.0).abs() < 1e-6);
        assert!(dot(&e.embed("piano"), &e.embed("trumpet")).abs() < 1e-6);
    }

    #[test]
    fn captions_sharing_the_instrument_are_closer() {
        let e = TextEncoder::new();
        let corpus = Corpus::new(5, 10);
        let examples: Vec<_> = corpus
            .batch(Split::Train, 0, 400)
            .into_iter()
            .filter(|x| x.mentioned.instrument)
            .collect();
        let emb: Vec<Vec<f32>> = examples.iter().map(|x| e.embed(&x.caption)).collect();
        let (mut same, mut n_same, mut diff, mut n_diff) = (0.0, 0, 0.0, 0);
        for i in 0..examples.len() {
            for j in i + 1..examples.len() {
                let c = dot(&emb[i], &emb[j]);
                if examples[i].attributes.instrument == examples[j].attributes.instrument {
                    same += c;
                    n_same += 1;
                } else {
                    diff += c;
                    n_diff += 1;
                }
            }
        }
        let (same, diff) = (same / n_same as f32, diff / n_diff as f32);
        assert!(same > diff + 0.05, "same {same} vs different {diff}");
        // And in a hand-picked case.
        let a = e.embed("calm solo piano in A minor");
        assert!(dot(&a, &e.embed("fast piano riff")) > dot(&a, &e.embed("fast trumpet riff")));
    }
}

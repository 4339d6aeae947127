//! Does a policy follow its prompts? Samples clips for held-out captions and
//! compares the attributes recovered from the tokens
//! ([`encore_corpus::analysis`]) with the ones the caption asked for.

use serde::{Deserialize, Serialize};

use crate::{ModelError, Policy, SamplingParams, embed_captions, sample};

/// Agreement between prompts and generated clips.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FollowReport {
    /// Number of prompts (one clip each).
    pub prompts: usize,
    /// Fraction of clips whose majority instrument is the prompted one.
    pub instrument: f64,
    /// Fraction of clips whose recovered tempo is the prompted one.
    pub tempo: f64,
    /// Chance level for the instrument (one over the number of instruments).
    pub instrument_chance: f64,
    /// Chance level for the tempo (one over the number of tempi).
    pub tempo_chance: f64,
    /// The same figures measured on the corpus's own clips for these prompts:
    /// the ceiling the analyser allows.
    pub corpus_instrument: f64,
    /// Corpus ceiling for the tempo.
    pub corpus_tempo: f64,
}

/// Samples one clip for each of `n` held-out prompts (each naming an
/// instrument and a tempo) in batches of `batch`, and scores agreement.
pub fn prompt_following(
    policy: &Policy,
    n: usize,
    prompt_seed: u64,
    batch: usize,
    params: &SamplingParams,
) -> Result<FollowReport, ModelError> {
    use encore_corpus::analysis::analyze;

    let frames = policy.config().max_frames;
    let prompts = encore_corpus::eval_prompts(prompt_seed, frames, n);
    let (mut instrument, mut tempo, mut corpus_instrument, mut corpus_tempo) = (0, 0, 0, 0);
    for (chunk_index, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let captions: Vec<&str> = chunk.iter().map(|e| e.caption.as_str()).collect();
        let text = embed_captions(&captions, policy.device())?;
        let params = SamplingParams {
            seed: params.seed.wrapping_add(chunk_index as u64),
            ..params.clone()
        };
        let samples = sample(policy, &text, frames, &params)?;
        for (example, tokens) in chunk.iter().zip(&samples.tokens) {
            let got = analyze(tokens);
            instrument += usize::from(got.instrument == Some(example.attributes.instrument));
            tempo += usize::from(got.tempo == Some(example.attributes.tempo));
            let reference = analyze(&example.tokens);
            corpus_instrument +=
                usize::from(reference.instrument == Some(example.attributes.instrument));
            corpus_tempo += usize::from(reference.tempo == Some(example.attributes.tempo));
        }
    }
    let frac = |k: usize| k as f64 / prompts.len().max(1) as f64;
    Ok(FollowReport {
        prompts: prompts.len(),
        instrument: frac(instrument),
        tempo: frac(tempo),
        instrument_chance: 1.0 / encore_codec::Instrument::ALL.len() as f64,
        tempo_chance: 1.0 / encore_corpus::Tempo::ALL.len() as f64,
        corpus_instrument: frac(corpus_instrument),
        corpus_tempo: frac(corpus_tempo),
    })
}

//! The quick start's evaluation, in the shape of MusicRL's: every model
//! (base, R, U, RU) against every other on held-out prompts, judged by each
//! reward model and by held-out simulated raters, personas that rated none
//! of the reward models' training data.
//!
//! Each model samples `samples` clips per prompt; comparison `s` of a
//! prompt sets model A's clip `s` against model B's clip `s`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use encore_raters::records::Choice;
use encore_raters::sim::{Features, Persona, Population, preference_probability_among};
use encore_reward::{RewardModel, ScoreInput};
use rand::SeedableRng;

use super::EvalPlan;

/// The reward models, by the names the report uses.
pub(super) const REWARD_MODELS: [&str; 3] = ["adherence", "quality", "preference"];

/// Clips sampled for the evaluation, and how every judge saw them.
pub(super) struct Evaluation {
    /// The held-out prompts' captions.
    pub captions: Vec<String>,
    /// Model names, in order.
    pub models: Vec<String>,
    /// `clips[model][prompt][sample]`: audio tokens.
    pub clips: Vec<Vec<Vec<Vec<u32>>>>,
    /// Mean score of each model by each reward model: `means[model][rm]`.
    pub means: Vec<[f64; 3]>,
    /// Mean utility of each model's clips to the held-out raters.
    pub held_out_utility: Vec<f64>,
    /// The simulator's ground truth, which no judge sees directly: mean
    /// prompt adherence (0-1) and latent quality (1-5) of each model's
    /// clips.
    pub truth: Vec<(f64, f64)>,
    /// Pairwise results, A vs B for each pair of models.
    pub pairs: Vec<PairResult>,
    /// Held-out raters judging.
    pub raters: usize,
}

/// One pair of models compared by every judge.
pub(super) struct PairResult {
    /// Model A.
    pub a: String,
    /// Model B.
    pub b: String,
    /// A's win rate by each reward model: share of comparisons where A's
    /// clip scores higher (ties count half).
    pub by_reward_model: [f64; 3],
    /// The held-out raters' answers: A chosen, B chosen, ties (skips are
    /// left out).
    pub held_out: (u64, u64, u64),
    /// The held-out raters' expected preference for A (their choice
    /// probabilities, averaged): the same figure without sampling noise.
    pub held_out_expected: f64,
}

impl PairResult {
    /// A's win rate among the held-out raters' decided answers.
    pub fn held_out_win_rate(&self) -> f64 {
        let (a, b, _) = self.held_out;
        if a + b == 0 {
            f64::NAN
        } else {
            a as f64 / (a + b) as f64
        }
    }
}

/// A's win rate over comparisons of (A's score, B's score): the share where
/// A's is higher, ties counting half; NaN without comparisons.
fn score_win_rate(duels: impl IntoIterator<Item = (f32, f32)>) -> f64 {
    let (mut wins, mut n) = (0.0, 0u64);
    for (x, y) in duels {
        wins += if x > y {
            1.0
        } else if x == y {
            0.5
        } else {
            0.0
        };
        n += 1;
    }
    if n == 0 { f64::NAN } else { wins / n as f64 }
}

/// Raters' answers on one pair: A chosen, B chosen, ties (skips are left
/// out).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    a: u64,
    b: u64,
    ties: u64,
}

impl Tally {
    fn add(&mut self, choice: Choice) {
        match choice {
            Choice::A => self.a += 1,
            Choice::B => self.b += 1,
            Choice::Tie => self.ties += 1,
            Choice::Skip => {}
        }
    }
}

/// The comparisons the report shows, in the paper's order.
const PAIRS: [(&str, &str); 6] = [
    ("R", "base"),
    ("U", "base"),
    ("RU", "base"),
    ("RU", "R"),
    ("RU", "U"),
    ("U", "R"),
];

/// Samples, scores and judges; `models` are (name, checkpoint dir) pairs.
pub(super) fn evaluate(
    models: &[(String, PathBuf)],
    rewards: &Path,
    plan: &EvalPlan,
    frames: usize,
) -> anyhow::Result<Evaluation> {
    let device = Device::Cpu;
    let prompts = encore_corpus::eval_prompts(2024, frames, plan.prompts);
    let captions: Vec<&str> = prompts.iter().map(|e| e.caption.as_str()).collect();
    let total = (models.len() * plan.samples) as u64;
    let mut bar = super::Progress::new(total, "    sampling");
    let mut clips = Vec::new();
    for (mi, (_, dir)) in models.iter().enumerate() {
        let (policy, _) = encore_model::load_frozen(dir, &device)?;
        let mut per_prompt = vec![Vec::new(); prompts.len()];
        for s in 0..plan.samples {
            for (ci, chunk) in captions.chunks(32).enumerate() {
                let text = encore_model::embed_captions(chunk, &device)?;
                let params = encore_model::SamplingParams {
                    seed: 1000 * s as u64 + 100 * ci as u64 + mi as u64,
                    ..Default::default()
                };
                let out = encore_model::sample(&policy, &text, frames, &params)?;
                for (j, tokens) in out.tokens.into_iter().enumerate() {
                    per_prompt[ci * 32 + j].push(tokens);
                }
            }
            bar.update((mi * plan.samples + s + 1) as u64, total, String::new());
        }
        clips.push(per_prompt);
    }
    bar.finish();

    // scores[rm][model][prompt][sample]
    let mut scores = Vec::new();
    for name in REWARD_MODELS {
        let model = RewardModel::load(&rewards.join(name), &device)?;
        let mut per_model = Vec::new();
        for model_clips in &clips {
            let mut per_prompt = Vec::new();
            for (i, samples) in model_clips.iter().enumerate() {
                let items: Vec<ScoreInput> = samples
                    .iter()
                    .map(|tokens| ScoreInput::tokens(captions[i], tokens))
                    .collect();
                per_prompt.push(model.score(&items)?);
            }
            per_model.push(per_prompt);
        }
        scores.push(per_model);
    }

    let features: Vec<Vec<Vec<Features>>> = clips
        .iter()
        .map(|m| {
            m.iter()
                .map(|s| s.iter().map(|c| Features::of(c)).collect())
                .collect()
        })
        .collect();
    let population = Population::new(0);
    let raters: Vec<Persona> = (0..plan.raters).map(|i| population.held_out(i)).collect();

    let mut means = Vec::new();
    let mut held_out_utility = Vec::new();
    let mut truth = Vec::new();
    for mi in 0..models.len() {
        let mut m = [0.0; 3];
        for (r, rm) in scores.iter().enumerate() {
            let all: Vec<f64> = rm[mi].iter().flatten().map(|x| f64::from(*x)).collect();
            m[r] = all.iter().sum::<f64>() / all.len().max(1) as f64;
        }
        means.push(m);
        let (mut total, mut n) = (0.0, 0.0);
        let (mut adherence, mut quality, mut clips_seen) = (0.0, 0.0, 0.0);
        for (i, e) in prompts.iter().enumerate() {
            for f in &features[mi][i] {
                adherence += f64::from(f.analysis.prompt_adherence(&e.attributes, &e.mentioned));
                quality += f64::from(f.quality);
                clips_seen += 1.0;
                for rater in &raters {
                    total += f64::from(rater.utility_of(&e.attributes, &e.mentioned, f));
                    n += 1.0;
                }
            }
        }
        held_out_utility.push(total / f64::max(n, 1.0));
        let clips_seen = f64::max(clips_seen, 1.0);
        truth.push((adherence / clips_seen, quality / clips_seen));
    }

    let index = |name: &str| models.iter().position(|(m, _)| m == name);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut pairs = Vec::new();
    for (a, b) in PAIRS {
        let (Some(ai), Some(bi)) = (index(a), index(b)) else {
            continue;
        };
        let mut by_reward_model = [0.0; 3];
        for (r, rm) in scores.iter().enumerate() {
            let duels = (0..prompts.len())
                .flat_map(|i| (0..plan.samples).map(move |s| (rm[ai][i][s], rm[bi][i][s])));
            by_reward_model[r] = score_win_rate(duels);
        }
        let mut answers = Tally::default();
        let (mut expected, mut judged) = (0.0, 0.0);
        for (i, e) in prompts.iter().enumerate() {
            // Sample s of A against sample s of B.
            for (fa, fb) in features[ai][i].iter().zip(&features[bi][i]) {
                for rater in &raters {
                    answers.add(rater.prefer_of(&e.attributes, &e.mentioned, fa, fb, &mut rng));
                }
                expected +=
                    preference_probability_among(&raters, &e.attributes, &e.mentioned, fa, fb);
                judged += 1.0;
            }
        }
        pairs.push(PairResult {
            a: a.to_owned(),
            b: b.to_owned(),
            by_reward_model,
            held_out: (answers.a, answers.b, answers.ties),
            held_out_expected: expected / f64::max(judged, 1.0),
        });
    }
    Ok(Evaluation {
        captions: prompts.into_iter().map(|e| e.caption).collect(),
        models: models.iter().map(|(m, _)| m.clone()).collect(),
        clips,
        means,
        held_out_utility,
        truth,
        pairs,
        raters: raters.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reward_models_win_rate_counts_ties_half() {
        // Wins, a tie, a loss: (1 + 1 + 0.5 + 0) / 4.
        let duels = [(0.9, 0.1), (2.0, -1.0), (0.5, 0.5), (0.2, 0.3)];
        assert_eq!(score_win_rate(duels), 0.625);
        assert_eq!(score_win_rate([(1.0, 1.0); 3]), 0.5, "all ties: even");
        assert_eq!(score_win_rate([(0.0, 1.0); 3]), 0.0);
        assert!(score_win_rate([]).is_nan(), "no comparison, no rate");
    }

    #[test]
    fn rater_answers_are_counted_and_skips_left_out() {
        let mut tally = Tally::default();
        for choice in [
            Choice::A,
            Choice::Skip,
            Choice::B,
            Choice::A,
            Choice::Tie,
            Choice::A,
            Choice::Skip,
        ] {
            tally.add(choice);
        }
        assert_eq!(
            tally,
            Tally {
                a: 3,
                b: 1,
                ties: 1
            }
        );
    }

    #[test]
    fn the_held_out_win_rate_is_over_decided_answers() {
        let pair = |held_out| PairResult {
            a: "RU".into(),
            b: "base".into(),
            by_reward_model: [0.5; 3],
            held_out,
            held_out_expected: 0.5,
        };
        // 3 of the 4 decided answers; the 6 ties do not dilute it.
        assert_eq!(pair((3, 1, 6)).held_out_win_rate(), 0.75);
        assert_eq!(pair((0, 2, 0)).held_out_win_rate(), 0.0);
        assert!(pair((0, 0, 5)).held_out_win_rate().is_nan(), "only ties");
    }
}

//! The quick start's evaluation, in the shape of MusicRL's: every model
//! (base, R, U, RU) against every other on held-out prompts, judged by each
//! reward model and by held-out simulated raters, personas that rated none
//! of the reward models' training data.
//!
//! Each model samples `samples` clips per prompt; comparison `s` of a
//! prompt sets model A's clip `s` against model B's clip `s`.
//!
//! Two rater populations judge: the held-out raters share the training
//! raters' population means (other personas, same audience), the shifted
//! raters are another audience
//! ([`encore_raters::sim::Tastes::SHIFTED`]). The evaluation also measures
//! how diverse each model's clips are ([`Diversity`]): a policy that
//! answers every prompt with the same clip can still win comparisons.

use std::path::{Path, PathBuf};

use candle_core::Device;
use encore_codec::Token;
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
    /// The rater populations judging, in column order.
    pub judges: Vec<Judge>,
    /// Mean utility of each model's clips to each judge population:
    /// `utility[model][judge]`.
    pub utility: Vec<Vec<f64>>,
    /// The same utility term by term, in `UtilityParts::terms` order:
    /// `utility_parts[model][judge]`.
    pub utility_parts: Vec<Vec<[f64; 6]>>,
    /// How diverse each model's clips are.
    pub diversity: Vec<Diversity>,
    /// Share of each reward model's score variance that lies between a
    /// prompt's own samples (the rest is between prompts), per model:
    /// `within_prompt_share[model][rm]`. What a per-group baseline leaves
    /// of a reward.
    pub within_prompt_share: Vec<[f64; 3]>,
    /// The simulator's ground truth, which no judge sees directly: mean
    /// prompt adherence (0-1), latent quality (1-5) and notes per second
    /// of each model's clips.
    pub truth: Vec<(f64, f64, f64)>,
    /// True adherence attribute by attribute, per model: the mean score
    /// over the clips whose prompt mentions it, in
    /// `encore_corpus::analysis::ADHERENCE_ATTRIBUTES` order (`None` when
    /// no held-out prompt mentions it).
    pub adherence_by_attribute: Vec<[Option<f64>; 7]>,
    /// How often the adherence and quality reward models order two samples
    /// of one prompt as the truth (prompt adherence, latent quality) does,
    /// per model: `fidelity[model] = [adherence, quality]`. What a
    /// per-prompt advantage can learn from them on the model's own clips.
    pub fidelity: Vec<[f64; 2]>,
    /// Pairwise results, A vs B for each pair of models.
    pub pairs: Vec<PairResult>,
}

/// A population of held-out raters judging the evaluation.
pub(super) struct Judge {
    /// Its name in the report.
    pub name: &'static str,
    /// The personas.
    pub raters: Vec<Persona>,
}

/// The held-out judges: 20 (`n`) personas of the training population's
/// audience that labelled no data, and `n` of a shifted audience.
fn judges(n: u64) -> Vec<Judge> {
    let population = Population::new(0);
    vec![
        Judge {
            name: "held-out raters",
            raters: (0..n).map(|i| population.held_out(i)).collect(),
        },
        Judge {
            name: "shifted raters",
            raters: (0..n).map(|i| population.shifted(i)).collect(),
        },
    ]
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
    /// Each judge population's verdict, in [`Evaluation::judges`] order.
    pub by_judge: Vec<Verdict>,
}

/// A rater population's answers on one pair of models.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Verdict {
    /// A chosen, B chosen, ties (skips are left out).
    pub answers: (u64, u64, u64),
    /// The raters' expected preference for A (their choice probabilities,
    /// averaged): the same figure without sampling noise.
    pub expected: f64,
}

impl Verdict {
    /// A's win rate among the decided answers.
    pub fn win_rate(&self) -> f64 {
        let (a, b, _) = self.answers;
        if a + b == 0 {
            f64::NAN
        } else {
            a as f64 / (a + b) as f64
        }
    }
}

/// How diverse one model's evaluation clips are. Two clips are compared
/// by their notes: their *agreement* is the share of the frames where
/// either starts a note at which both start the same note (instrument,
/// pitch and loudness); frames that only hold or rest in both are left
/// out, since every clip has many. Two clips are *near-identical* when
/// they agree on at least [`NEAR_IDENTICAL`] of their notes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(super) struct Diversity {
    /// Per-step policy entropy, nats: the mean of `-log p` of the sampled
    /// tokens (a Monte-Carlo estimate of the entropy of each step's
    /// distribution, sampled at temperature 1).
    pub entropy: f64,
    /// Distinct clips among all of the model's clips.
    pub distinct: f64,
    /// Share of pairs of one prompt's samples that are identical.
    pub within_identical: f64,
    /// Share of pairs of one prompt's samples that are near-identical.
    pub within_near: f64,
    /// Share of pairs of clips for different prompts (same sample index)
    /// that are identical.
    pub across_identical: f64,
    /// Share of pairs of clips for different prompts that are
    /// near-identical.
    pub across_near: f64,
    /// Mean agreement of two clips for different prompts.
    pub across_agreement: f64,
}

/// Agreement at or above which two clips count as near-identical.
pub(super) const NEAR_IDENTICAL: f64 = 0.9;

/// The share of frames where `a` or `b` starts a note at which both start
/// the same note (1 when neither has a note).
fn agreement(a: &[u32], b: &[u32]) -> f64 {
    let onset = |id: Option<&u32>| {
        id.is_some_and(|&id| matches!(Token::from_id(id), Ok(Token::Note { .. })))
    };
    let (mut notes, mut same) = (0usize, 0usize);
    for t in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(t), b.get(t));
        if onset(x) || onset(y) {
            notes += 1;
            same += usize::from(x == y);
        }
    }
    if notes == 0 {
        1.0
    } else {
        same as f64 / notes as f64
    }
}

/// The diversity of `clips[prompt][sample]`; `entropy` is filled in by
/// the caller, which has the log-probs.
pub(super) fn diversity(clips: &[Vec<Vec<u32>>]) -> Diversity {
    #[derive(Default)]
    struct Tally {
        pairs: f64,
        identical: f64,
        near: f64,
        agreement: f64,
    }
    impl Tally {
        fn add(&mut self, a: &[u32], b: &[u32]) {
            let same = agreement(a, b);
            self.pairs += 1.0;
            self.agreement += same;
            self.identical += f64::from(u8::from(a == b));
            self.near += f64::from(u8::from(same >= NEAR_IDENTICAL));
        }
        fn share(&self, x: f64) -> f64 {
            if self.pairs == 0.0 {
                f64::NAN
            } else {
                x / self.pairs
            }
        }
    }
    let (mut within, mut across) = (Tally::default(), Tally::default());
    for samples in clips {
        for (i, a) in samples.iter().enumerate() {
            for b in &samples[i + 1..] {
                within.add(a, b);
            }
        }
    }
    let samples = clips.iter().map(Vec::len).min().unwrap_or(0);
    for s in 0..samples {
        for (i, a) in clips.iter().enumerate() {
            for b in &clips[i + 1..] {
                across.add(&a[s], &b[s]);
            }
        }
    }
    let all: Vec<&Vec<u32>> = clips.iter().flatten().collect();
    let distinct = all.iter().collect::<std::collections::HashSet<_>>().len();
    Diversity {
        entropy: f64::NAN,
        distinct: if all.is_empty() {
            f64::NAN
        } else {
            distinct as f64 / all.len() as f64
        },
        within_identical: within.share(within.identical),
        within_near: within.share(within.near),
        across_identical: across.share(across.identical),
        across_near: across.share(across.near),
        across_agreement: across.share(across.agreement),
    }
}

/// Share of the variance of `scores[prompt][sample]` that lies within
/// prompts: the mean within-prompt variance over the total variance (NaN
/// without spread).
fn within_prompt_share(scores: &[Vec<f32>]) -> f64 {
    let all: Vec<f64> = scores.iter().flatten().map(|&x| f64::from(x)).collect();
    if all.is_empty() {
        return f64::NAN;
    }
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let total = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>();
    let within: f64 = scores
        .iter()
        .map(|s| {
            let m = s.iter().map(|&x| f64::from(x)).sum::<f64>() / s.len().max(1) as f64;
            s.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>()
        })
        .sum();
    if total > 0.0 {
        within / total
    } else {
        f64::NAN
    }
}

/// A's win rate over comparisons of (A's score, B's score): the share where
/// A's is higher, ties counting half; NaN without comparisons.
/// Of the pairs of one prompt's samples whose truths differ, the share a
/// score orders the same way (a tied score counts half): `scores[prompt]
/// [sample]` against `truth[prompt][sample]`. 0.5 is a score that says
/// nothing about the truth.
fn pair_agreement(scores: &[Vec<f32>], truth: &[Vec<f64>]) -> f64 {
    let (mut agree, mut pairs) = (0.0, 0.0);
    for (s, t) in scores.iter().zip(truth) {
        for i in 0..s.len().min(t.len()) {
            for j in i + 1..s.len().min(t.len()) {
                let truth_says = t[i] - t[j];
                if truth_says == 0.0 {
                    continue;
                }
                let score_says = f64::from(s[i] - s[j]);
                agree += if score_says == 0.0 {
                    0.5
                } else if score_says.signum() == truth_says.signum() {
                    1.0
                } else {
                    0.0
                };
                pairs += 1.0;
            }
        }
    }
    if pairs == 0.0 { 0.5 } else { agree / pairs }
}

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
    let mut entropies = Vec::new();
    for (mi, (_, dir)) in models.iter().enumerate() {
        let (policy, _) = encore_model::load_frozen(dir, &device)?;
        let mut per_prompt = vec![Vec::new(); prompts.len()];
        let (mut neg_log_prob, mut steps) = (0.0, 0.0);
        for s in 0..plan.samples {
            for (ci, chunk) in captions.chunks(32).enumerate() {
                let text = encore_model::embed_captions(chunk, &device)?;
                let params = encore_model::SamplingParams {
                    seed: 1000 * s as u64 + 100 * ci as u64 + mi as u64,
                    ..Default::default()
                };
                let out = encore_model::sample(&policy, &text, frames, &params)?;
                for lp in out.log_probs.iter().flatten() {
                    neg_log_prob -= f64::from(*lp);
                    steps += 1.0;
                }
                for (j, tokens) in out.tokens.into_iter().enumerate() {
                    per_prompt[ci * 32 + j].push(tokens);
                }
            }
            bar.update((mi * plan.samples + s + 1) as u64, total, String::new());
        }
        clips.push(per_prompt);
        entropies.push(neg_log_prob / f64::max(steps, 1.0));
    }
    bar.finish();
    let diversity: Vec<Diversity> = clips
        .iter()
        .zip(&entropies)
        .map(|(c, &entropy)| Diversity {
            entropy,
            ..diversity(c)
        })
        .collect();

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
    let judges = judges(plan.raters);

    let mut means = Vec::new();
    let mut within_share = Vec::new();
    let mut utility = Vec::new();
    let mut utility_parts = Vec::new();
    let mut truth = Vec::new();
    let mut fidelity = Vec::new();
    let mut by_attribute = Vec::new();
    for mi in 0..models.len() {
        let mut m = [0.0; 3];
        let mut within = [0.0; 3];
        for (r, rm) in scores.iter().enumerate() {
            let all: Vec<f64> = rm[mi].iter().flatten().map(|x| f64::from(*x)).collect();
            m[r] = all.iter().sum::<f64>() / all.len().max(1) as f64;
            within[r] = within_prompt_share(&rm[mi]);
        }
        means.push(m);
        within_share.push(within);
        let mut per_judge = Vec::new();
        let mut parts_per_judge = Vec::new();
        for judge in &judges {
            let (mut total, mut parts, mut n) = (0.0, [0.0; 6], 0.0);
            for (i, e) in prompts.iter().enumerate() {
                for f in &features[mi][i] {
                    for rater in &judge.raters {
                        let p = rater.utility_parts(&e.attributes, &e.mentioned, f);
                        total += f64::from(p.total());
                        for (sum, term) in parts.iter_mut().zip(p.terms()) {
                            *sum += f64::from(term);
                        }
                        n += 1.0;
                    }
                }
            }
            let n = f64::max(n, 1.0);
            per_judge.push(total / n);
            parts_per_judge.push(parts.map(|sum| sum / n));
        }
        utility.push(per_judge);
        utility_parts.push(parts_per_judge);
        let (mut adherence, mut quality, mut rate, mut clips_seen) = (0.0, 0.0, 0.0, 0.0);
        for (i, e) in prompts.iter().enumerate() {
            for f in &features[mi][i] {
                adherence += f64::from(f.analysis.prompt_adherence(&e.attributes, &e.mentioned));
                quality += f64::from(f.quality);
                rate += f64::from(f.notes_per_second);
                clips_seen += 1.0;
            }
        }
        let clips_seen = f64::max(clips_seen, 1.0);
        let mut sums = [(0.0, 0.0); 7];
        for (e, fs) in prompts.iter().zip(&features[mi]) {
            for f in fs {
                let scores = f
                    .analysis
                    .adherence_by_attribute(&e.attributes, &e.mentioned);
                for ((sum, n), score) in sums.iter_mut().zip(scores) {
                    if let Some(x) = score {
                        *sum += f64::from(x);
                        *n += 1.0;
                    }
                }
            }
        }
        by_attribute.push(sums.map(|(sum, n)| (n > 0.0).then(|| sum / n)));
        let true_adherence: Vec<Vec<f64>> = prompts
            .iter()
            .zip(&features[mi])
            .map(|(e, fs)| {
                fs.iter()
                    .map(|f| f64::from(f.analysis.prompt_adherence(&e.attributes, &e.mentioned)))
                    .collect()
            })
            .collect();
        let true_quality: Vec<Vec<f64>> = features[mi]
            .iter()
            .map(|fs| fs.iter().map(|f| f64::from(f.quality)).collect())
            .collect();
        fidelity.push([
            pair_agreement(&scores[0][mi], &true_adherence),
            pair_agreement(&scores[1][mi], &true_quality),
        ]);
        truth.push((
            adherence / clips_seen,
            quality / clips_seen,
            rate / clips_seen,
        ));
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
        let mut by_judge = Vec::new();
        for judge in &judges {
            let mut answers = Tally::default();
            let (mut expected, mut judged) = (0.0, 0.0);
            for (i, e) in prompts.iter().enumerate() {
                // Sample s of A against sample s of B.
                for (fa, fb) in features[ai][i].iter().zip(&features[bi][i]) {
                    for rater in &judge.raters {
                        answers.add(rater.prefer_of(&e.attributes, &e.mentioned, fa, fb, &mut rng));
                    }
                    expected += preference_probability_among(
                        &judge.raters,
                        &e.attributes,
                        &e.mentioned,
                        fa,
                        fb,
                    );
                    judged += 1.0;
                }
            }
            by_judge.push(Verdict {
                answers: (answers.a, answers.b, answers.ties),
                expected: expected / f64::max(judged, 1.0),
            });
        }
        pairs.push(PairResult {
            a: a.to_owned(),
            b: b.to_owned(),
            by_reward_model,
            by_judge,
        });
    }
    Ok(Evaluation {
        captions: prompts.into_iter().map(|e| e.caption).collect(),
        models: models.iter().map(|(m, _)| m.clone()).collect(),
        clips,
        means,
        judges,
        utility,
        utility_parts,
        diversity,
        within_prompt_share: within_share,
        truth,
        adherence_by_attribute: by_attribute,
        fidelity,
        pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use encore_codec::{Instrument, Velocity};

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
    fn the_win_rate_is_over_decided_answers() {
        let verdict = |answers| Verdict {
            answers,
            expected: 0.5,
        };
        // 3 of the 4 decided answers; the 6 ties do not dilute it.
        assert_eq!(verdict((3, 1, 6)).win_rate(), 0.75);
        assert_eq!(verdict((0, 2, 0)).win_rate(), 0.0);
        assert!(verdict((0, 0, 5)).win_rate().is_nan(), "only ties");
    }

    fn note(pitch: u8) -> u32 {
        Token::note(Instrument::Piano, pitch, Velocity::Loud)
            .unwrap()
            .id()
    }

    #[test]
    fn agreement_counts_notes_not_holds() {
        let hold = Token::Hold.id();
        let rest = Token::Rest.id();
        // Notes at frames 0 and 3 in both, held in between: the same.
        let a = [note(60), hold, hold, note(62), rest];
        assert_eq!(agreement(&a, &a), 1.0);
        // One note differs: 1 of 2 onset frames agree, however many holds
        // they share.
        let b = [note(60), hold, hold, note(64), rest];
        assert_eq!(agreement(&a, &b), 0.5);
        // An onset in one clip where the other holds counts as a miss.
        let c = [note(60), hold, note(61), note(62), rest];
        assert!((agreement(&a, &c) - 2.0 / 3.0).abs() < 1e-12);
        // Silence against silence: nothing to tell them apart.
        assert_eq!(agreement(&[rest, hold], &[hold, rest]), 1.0);
    }

    #[test]
    fn diversity_counts_identical_and_near_identical_pairs() {
        let base: Vec<u32> = (0..20).map(|i| note(50 + i)).collect();
        let mut near = base.clone();
        near[3] = note(80); // 19 of 20 notes agree: near-identical.
        let mut far = base.clone();
        for x in &mut far[..10] {
            *x = note(81); // half the notes agree
        }
        // Two prompts, two samples each: prompt 0 = [base, base],
        // prompt 1 = [near, far].
        let clips = vec![vec![base.clone(), base.clone()], vec![near, far]];
        let d = diversity(&clips);
        // Within prompts: (base, base) identical, (near, far) neither
        // (agreement 9/20).
        assert_eq!(d.within_identical, 0.5);
        assert_eq!(d.within_near, 0.5);
        // Across prompts, sample 0: (base, near), 19/20; sample 1:
        // (base, far), 10/20.
        assert_eq!(d.across_identical, 0.0);
        assert_eq!(d.across_near, 0.5);
        assert!((d.across_agreement - (0.95 + 0.5) / 2.0).abs() < 1e-12);
        // base, near and far: 3 distinct clips of 4.
        assert_eq!(d.distinct, 0.75);
        // One clip for every prompt: everything identical.
        let collapsed = vec![vec![base.clone()]; 3];
        let d = diversity(&collapsed);
        assert_eq!((d.across_identical, d.across_near), (1.0, 1.0));
        assert!((d.distinct - 1.0 / 3.0).abs() < 1e-12);
        assert!(d.within_identical.is_nan(), "one sample: no pairs");
    }

    #[test]
    fn pair_agreement_counts_the_pairs_a_score_orders_as_the_truth() {
        // Prompt 0: the score orders (0,1) and (0,2) right, (1,2) wrong.
        // Prompt 1: the truth ties, so its pair is left out.
        let scores = vec![vec![3.0, 2.0, 2.5], vec![1.0, 0.0]];
        let truth = vec![vec![1.0, 0.5, 0.0], vec![0.7, 0.7]];
        assert!((pair_agreement(&scores, &truth) - 2.0 / 3.0).abs() < 1e-12);
        // A tied score counts half; a score that says nothing is 0.5.
        assert_eq!(pair_agreement(&[vec![1.0, 1.0]], &[vec![0.0, 1.0]]), 0.5);
        assert_eq!(pair_agreement(&[vec![1.0]], &[vec![0.0]]), 0.5);
        let reversed: Vec<Vec<f64>> = truth
            .iter()
            .map(|t| t.iter().map(|x| -x).collect())
            .collect();
        assert!((pair_agreement(&scores, &reversed) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn the_within_prompt_share_splits_the_variance() {
        // Prompt means 0 and 10, each sample +-1 around them: within
        // variance 1 per sample, total 26 per sample (1 + 25).
        let scores = vec![vec![-1.0, 1.0], vec![9.0, 11.0]];
        assert!((within_prompt_share(&scores) - 1.0 / 26.0).abs() < 1e-12);
        // Same mean everywhere: all of it is within prompts.
        assert_eq!(within_prompt_share(&[vec![0.0, 2.0], vec![2.0, 0.0]]), 1.0);
        assert!(within_prompt_share(&[vec![3.0, 3.0]]).is_nan());
    }
}

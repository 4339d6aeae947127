//! Dataset generators: simulated rating and preference data, deterministic
//! in a seed, and the ceilings that the raters' noise puts on any model
//! trained on it.
//!
//! The stand-in for "two clips a music model generated for a prompt" is
//! [`candidate`]: take a corpus prompt, re-draw every attribute its caption
//! does not mention (so instrument, register, density, tempo and mood vary
//! where the prompt leaves them open: this is where tastes decide), now and
//! then break a mentioned one (an adherence failure), compose the clip, and
//! corrupt it at a random severity (most clips clean or mildly flawed, some
//! badly), so that quality spreads over 1..5.
//!
//! Every item `i` of a generator is drawn from its own random stream keyed
//! by `(seed, generator, i)`, so the same configuration always gives the
//! same records, and datasets generated with different seeds share no pair
//! or clip id (a short clean clip can recur by chance: about 0.5% of clips
//! at 100 frames).
//! The name is `generate` because `gen` is a reserved word in Rust 2024.

use std::collections::HashMap;

use encore_codec::{FIRST_NOTE, FRAME_RATE, Instrument, REST, Token, VOCAB_SIZE};
use encore_corpus::{
    Attributes, Corpus, Density, Mentioned, Mode, Mood, Register, Split, Tempo, compose,
};
use rand::Rng;
use rand::seq::index::sample;
use serde::{Deserialize, Serialize};

use crate::records::{
    Choice, ClipRecord, PairClip, PreferenceRecord, RatingRecord, RecordError, Truth,
};
use crate::sim::{Features, Persona, Population, preference_probability_among};
use crate::stats::spearman;
use crate::{normal, stream};

/// Stream domains of the generators.
const DOMAIN_CLIPS: u64 = 0x636c_6970_0000_0001;
const DOMAIN_RATINGS: u64 = 0x7261_7469_6e67_0002;
const DOMAIN_PREFERENCES: u64 = 0x7072_6566_0000_0003;
const DOMAIN_POLICY_PROMPTS: u64 = 0x7072_6f6d_0000_0004;
const DOMAIN_JUDGED_PAIRS: u64 = 0x6a75_6467_0000_0005;

/// Milliseconds per frame (25 frames a second).
const FRAME_MS: f32 = 1000.0 / FRAME_RATE as f32;

/// Configuration of the generators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenConfig {
    /// Seed of the generated items; different seeds give disjoint datasets
    /// (use one for training data, another for evaluation data).
    pub seed: u64,
    /// Number of items: clips for [`clips`] and [`ratings`], pairs for
    /// [`preferences`].
    pub n: usize,
    /// Shortest clip, in frames (25 per second).
    pub frames_min: usize,
    /// Longest clip, in frames; lengths are drawn uniformly in between.
    pub frames_max: usize,
    /// Seed of the corpus the prompts come from (its train split).
    pub corpus_seed: u64,
    /// Seed of the rater population.
    pub population_seed: u64,
    /// Size of the rater pool: raters are `population.persona(0..raters)`.
    pub raters: usize,
    /// Distinct raters per clip in [`ratings`].
    pub raters_per_clip: usize,
    /// Fraction of pairs judged by a second rater in [`preferences`], to
    /// measure inter-rater agreement.
    pub double_rated: f64,
    /// Probability that a candidate breaks one attribute its caption mentions.
    pub violation_rate: f64,
    /// Share of the captioned clips of [`clips`] corrupted at a
    /// [`sample_severity`] severity, so that an adherence model trained on
    /// them also hears clips with the defects a policy's samples have (0:
    /// every clip as the corpus composed it).
    pub corrupted_clips: f64,
}

impl Default for GenConfig {
    fn default() -> GenConfig {
        GenConfig {
            seed: 0,
            n: 1000,
            frames_min: 100,
            frames_max: 100,
            corpus_seed: 0,
            population_seed: 0,
            raters: 100,
            raters_per_clip: 5,
            double_rated: 0.1,
            violation_rate: 0.15,
            corrupted_clips: 0.0,
        }
    }
}

impl GenConfig {
    /// Checks the ranges, naming the first bad key.
    pub fn validate(&self) -> Result<(), RecordError> {
        let bad = |key, reason: String| Err(RecordError::Config { key, reason });
        if self.frames_min == 0 {
            return bad("frames_min", "must be at least 1".into());
        }
        if self.frames_max < self.frames_min {
            return bad(
                "frames_max",
                format!(
                    "{} is below frames_min {}",
                    self.frames_max, self.frames_min
                ),
            );
        }
        if self.raters == 0 {
            return bad("raters", "must be at least 1".into());
        }
        if self.raters_per_clip == 0 || self.raters_per_clip > self.raters {
            return bad(
                "raters_per_clip",
                format!("{} is not in 1..={}", self.raters_per_clip, self.raters),
            );
        }
        for (key, p) in [
            ("double_rated", self.double_rated),
            ("violation_rate", self.violation_rate),
            ("corrupted_clips", self.corrupted_clips),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(key, format!("{p} is not a probability"));
            }
        }
        if self.double_rated > 0.0 && self.raters < 2 {
            return bad("raters", "a second rater needs a pool of at least 2".into());
        }
        Ok(())
    }

    /// The rater pool.
    pub fn personas(&self) -> Vec<Persona> {
        Population::new(self.population_seed).personas(self.raters)
    }

    fn frames(&self, rng: &mut impl Rng) -> usize {
        rng.random_range(self.frames_min..=self.frames_max)
    }

    /// A prompt from the corpus's train split: caption and truth.
    fn prompt(&self, rng: &mut impl Rng) -> (String, Truth) {
        // Frames do not change captions or attributes; 0 skips composing.
        let x = Corpus::new(self.corpus_seed, 0).example(Split::Train, rng.random::<u32>().into());
        let truth = Truth {
            attributes: x.attributes,
            mentioned: x.mentioned,
        };
        (x.caption, truth)
    }
}

/// Defects applied to a clip, each an intensity in `[0, 1]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Corruption {
    /// Probability that a note's pitch moves a semitone up or down (most
    /// such notes leave the key).
    pub out_of_key: f32,
    /// Probability that a note is played by another, random instrument.
    pub instrument_swaps: f32,
    /// Fraction of frames silenced, in spans of 8 to 30 frames (0.3 to 1.2
    /// s); a silenced note's remaining holds are silent too.
    pub dropouts: f32,
    /// Probability per frame of a glitch: a random note (any instrument,
    /// pitch and velocity) that replaces the frame and takes over its holds.
    pub glitches: f32,
}

impl Corruption {
    /// No defects.
    pub const NONE: Corruption = Corruption {
        out_of_key: 0.0,
        instrument_swaps: 0.0,
        dropouts: 0.0,
        glitches: 0.0,
    };

    /// Intensity of each defect at severity 1.
    pub const MAX: Corruption = Corruption {
        out_of_key: 0.5,
        instrument_swaps: 0.4,
        dropouts: 0.5,
        glitches: 0.04,
    };

    /// A random mix of defects at `severity` (0 clean, 1 heavily
    /// corrupted): each kind at `severity` times a random share (0.2..=1)
    /// of its [`Corruption::MAX`], so clips of one severity differ in what
    /// is wrong with them.
    pub fn at_severity(severity: f32, rng: &mut impl Rng) -> Corruption {
        let s = severity.clamp(0.0, 1.0);
        if s == 0.0 {
            return Corruption::NONE;
        }
        let mut level = |max: f32| s * max * rng.random_range(0.2..=1.0);
        Corruption {
            out_of_key: level(Corruption::MAX.out_of_key),
            instrument_swaps: level(Corruption::MAX.instrument_swaps),
            dropouts: level(Corruption::MAX.dropouts),
            glitches: level(Corruption::MAX.glitches),
        }
    }

    /// The clip with these defects: pitch and instrument changes on notes
    /// first, then dropouts, then glitches. Ids outside the vocabulary are
    /// left as they are.
    pub fn apply(&self, tokens: &[u32], rng: &mut impl Rng) -> Vec<u32> {
        let mut out = tokens.to_vec();
        for t in &mut out {
            let Ok(Token::Note {
                mut instrument,
                mut pitch,
                velocity,
            }) = Token::from_id(*t)
            else {
                continue;
            };
            if rng.random::<f32>() < self.out_of_key {
                pitch = match pitch {
                    encore_codec::PITCH_LOW => pitch + 1,
                    encore_codec::PITCH_HIGH => pitch - 1,
                    _ if rng.random_bool(0.5) => pitch + 1,
                    _ => pitch - 1,
                };
            }
            if rng.random::<f32>() < self.instrument_swaps {
                let other = rng.random_range(1..Instrument::ALL.len());
                instrument = Instrument::ALL[(instrument.index() + other) % Instrument::ALL.len()];
            }
            *t = Token::Note {
                instrument,
                pitch,
                velocity,
            }
            .id();
        }
        // Spans of 8..=30 frames (19 on average), as many as the intensity
        // asks for in expectation, so that a light dropout setting silences
        // a span only now and then rather than always at least one.
        let expected = self.dropouts * out.len() as f32 / 19.0;
        let spans = expected.floor() as usize + usize::from(rng.random::<f32>() < expected.fract());
        for _ in 0..spans {
            if out.is_empty() {
                break;
            }
            let len = rng.random_range(8..=30).min(out.len());
            let start = rng.random_range(0..=out.len() - len);
            out[start..start + len].fill(REST);
        }
        if self.glitches > 0.0 {
            for t in &mut out {
                if rng.random::<f32>() < self.glitches {
                    *t = rng.random_range(FIRST_NOTE..VOCAB_SIZE as u32);
                }
            }
        }
        out
    }
}

/// `tokens` corrupted at `severity`: [`Corruption::at_severity`], applied.
pub fn corrupt(tokens: &[u32], severity: f32, rng: &mut impl Rng) -> Vec<u32> {
    Corruption::at_severity(severity, rng).apply(tokens, rng)
}

/// A severity for a generated candidate: clean with probability 0.25,
/// otherwise `u^2` for `u` uniform in `[0, 1)`, so most corrupted clips are
/// mildly flawed (median severity 0.25) and about one in eight is heavily
/// corrupted (above 0.75).
pub fn sample_severity(rng: &mut impl Rng) -> f32 {
    if rng.random_bool(0.25) {
        return 0.0;
    }
    let u = rng.random::<f32>();
    u * u
}

/// A severity for a clip of a rating set: clean with probability 0.1,
/// otherwise uniform in `[0, 1)`. A listening test spans the whole quality
/// range on purpose: with [`sample_severity`] over half of the clips would
/// be flawless, and their MOS differences pure rater noise.
pub fn rating_severity(rng: &mut impl Rng) -> f32 {
    if rng.random_bool(0.1) {
        return 0.0;
    }
    rng.random::<f32>()
}

/// A generated candidate clip for a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// What the clip was composed from.
    pub attributes: Attributes,
    /// The mentioned attribute that was deliberately broken, if any.
    pub violated: Option<&'static str>,
    /// The defects applied.
    pub corruption: Corruption,
    /// The clip.
    pub tokens: Vec<u32>,
}

/// A candidate of `frames` frames for the prompt `attrs` / `mentioned`:
/// unmentioned attributes re-drawn, one mentioned attribute broken with
/// probability `violation_rate`, composed, then corrupted at a
/// [`sample_severity`] severity.
pub fn candidate(
    attrs: &Attributes,
    mentioned: &Mentioned,
    frames: usize,
    violation_rate: f64,
    rng: &mut impl Rng,
) -> Candidate {
    let severity = sample_severity(rng);
    candidate_at(attrs, mentioned, frames, violation_rate, severity, rng)
}

/// [`candidate`] corrupted at a given `severity`.
pub fn candidate_at(
    attrs: &Attributes,
    mentioned: &Mentioned,
    frames: usize,
    violation_rate: f64,
    severity: f32,
    rng: &mut impl Rng,
) -> Candidate {
    let mut attributes = vary(attrs, mentioned, rng);
    let violated = if rng.random_bool(violation_rate) {
        violate(&mut attributes, mentioned, rng)
    } else {
        None
    };
    let tokens = compose(&attributes, frames, rng);
    let corruption = Corruption::at_severity(severity, rng);
    let tokens = corruption.apply(&tokens, rng);
    Candidate {
        attributes,
        violated,
        corruption,
        tokens,
    }
}

fn pick<T: Copy>(values: &[T], rng: &mut impl Rng) -> T {
    values[rng.random_range(0..values.len())]
}

/// A value of `values` other than `current` (when there is one).
fn pick_other<T: Copy + PartialEq>(values: &[T], current: T, rng: &mut impl Rng) -> T {
    let others: Vec<T> = values.iter().copied().filter(|&v| v != current).collect();
    if others.is_empty() {
        current
    } else {
        pick(&others, rng)
    }
}

/// `attrs` with every attribute the caption leaves open re-drawn uniformly.
fn vary(attrs: &Attributes, mentioned: &Mentioned, rng: &mut impl Rng) -> Attributes {
    let mut a = *attrs;
    if !mentioned.instrument {
        a.instrument = pick(&Instrument::ALL, rng);
    }
    if !mentioned.tempo {
        a.tempo = pick(&Tempo::ALL, rng);
    }
    if !mentioned.key {
        a.tonic = rng.random_range(0..12);
        if !mentioned.mode {
            a.mode = pick(&Mode::ALL, rng);
        }
    }
    if !mentioned.mood {
        a.mood = pick(&Mood::ALL, rng);
    }
    if !mentioned.density {
        a.density = pick(&Density::ALL, rng);
    }
    if !mentioned.register {
        a.register = pick(&Register::ALL, rng);
    }
    a
}

/// Changes one mentioned attribute to another value; returns its name, or
/// `None` when the caption mentions nothing.
fn violate(a: &mut Attributes, mentioned: &Mentioned, rng: &mut impl Rng) -> Option<&'static str> {
    let candidates: Vec<&'static str> = [
        ("instrument", mentioned.instrument),
        ("tempo", mentioned.tempo),
        ("key", mentioned.key),
        ("mode", mentioned.mode && !mentioned.key),
        ("mood", mentioned.mood),
        ("density", mentioned.density),
        ("register", mentioned.register),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    if candidates.is_empty() {
        return None;
    }
    let which = pick(&candidates, rng);
    match which {
        "instrument" => a.instrument = pick_other(&Instrument::ALL, a.instrument, rng),
        "tempo" => a.tempo = pick_other(&Tempo::ALL, a.tempo, rng),
        // A key a tritone away shares the fewest notes.
        "key" => a.tonic = (a.tonic + rng.random_range(5..=7)) % 12,
        "mode" => a.mode = pick_other(&Mode::ALL, a.mode, rng),
        "mood" => a.mood = pick_other(&Mood::ALL, a.mood, rng),
        "density" => a.density = pick_other(&Density::ALL, a.density, rng),
        _ => a.register = pick_other(&Register::ALL, a.register, rng),
    }
    Some(which)
}

/// Milliseconds a rater spends listening to `frames` frames and answering:
/// part of the clip (raters skip ahead) plus a log-normal decision time.
fn listening_ms(frames: usize, decision_ms: f32, rng: &mut impl Rng) -> u64 {
    let listened = frames as f32 * FRAME_MS * rng.random_range(0.6..=1.1);
    (listened + decision_ms * (0.5 * normal(rng)).exp()).round() as u64
}

/// `cfg.n` captioned clips from the corpus's train split (the adherence
/// model's data), each of a length drawn in `frames_min..=frames_max`; a
/// share `cfg.corrupted_clips` of them corrupted (the caption and truth
/// stay those of the clip as composed).
pub fn clips(cfg: &GenConfig) -> Result<Vec<ClipRecord>, RecordError> {
    cfg.validate()?;
    Ok((0..cfg.n as u64)
        .map(|i| {
            let mut rng = stream(cfg.seed, DOMAIN_CLIPS, i);
            let frames = cfg.frames(&mut rng);
            let index = u64::from(rng.random::<u32>());
            let x = Corpus::new(cfg.corpus_seed, frames).example(Split::Train, index);
            // Drawn only when asked for, so that clean datasets stay what
            // they were.
            let tokens = if cfg.corrupted_clips > 0.0 && rng.random_bool(cfg.corrupted_clips) {
                corrupt(&x.tokens, sample_severity(&mut rng), &mut rng)
            } else {
                x.tokens
            };
            ClipRecord {
                caption: x.caption,
                tokens,
                truth: Some(Truth {
                    attributes: x.attributes,
                    mentioned: x.mentioned,
                }),
            }
        })
        .collect())
}

/// `cfg.n` candidate clips corrupted at [`rating_severity`], each rated by `cfg.raters_per_clip` distinct
/// raters of the pool: `n * raters_per_clip` records, grouped by `clip_id`.
pub fn ratings(cfg: &GenConfig) -> Result<Vec<RatingRecord>, RecordError> {
    cfg.validate()?;
    let pool = cfg.personas();
    let mut records = Vec::with_capacity(cfg.n * cfg.raters_per_clip);
    for i in 0..cfg.n as u64 {
        let mut rng = stream(cfg.seed, DOMAIN_RATINGS, i);
        let (caption, truth) = cfg.prompt(&mut rng);
        let frames = cfg.frames(&mut rng);
        let severity = rating_severity(&mut rng);
        let clip = candidate_at(
            &truth.attributes,
            &truth.mentioned,
            frames,
            cfg.violation_rate,
            severity,
            &mut rng,
        );
        let q = crate::sim::quality(&clip.tokens);
        for r in sample(&mut rng, cfg.raters, cfg.raters_per_clip) {
            let rater = &pool[r];
            records.push(RatingRecord {
                clip_id: format!("s{}-c{i}", cfg.seed),
                caption: caption.clone(),
                tokens: clip.tokens.clone(),
                rating: rater.rate_quality(q, &mut rng),
                rater: rater.id.clone(),
                time_ms: listening_ms(frames, 2000.0, &mut rng),
                truth: Some(truth),
            });
        }
    }
    Ok(records)
}

/// `cfg.n` pairs of candidates, each pair for one prompt and judged by one
/// random rater of the pool; a `cfg.double_rated` fraction of pairs is
/// judged again by a second, distinct rater (a second record with the same
/// `pair_id`).
pub fn preferences(cfg: &GenConfig) -> Result<Vec<PreferenceRecord>, RecordError> {
    cfg.validate()?;
    let pool = cfg.personas();
    let mut records = Vec::with_capacity(cfg.n + (cfg.n as f64 * cfg.double_rated) as usize + 1);
    for i in 0..cfg.n as u64 {
        let mut rng = stream(cfg.seed, DOMAIN_PREFERENCES, i);
        let (caption, truth) = cfg.prompt(&mut rng);
        let frames = cfg.frames(&mut rng);
        let (attrs, mentioned) = (&truth.attributes, &truth.mentioned);
        let a = candidate(attrs, mentioned, frames, cfg.violation_rate, &mut rng);
        let b = candidate(attrs, mentioned, frames, cfg.violation_rate, &mut rng);
        let pair = SampledPair {
            caption,
            truth,
            a: PairClip {
                tokens: a.tokens,
                policy_version: None,
            },
            b: PairClip {
                tokens: b.tokens,
                policy_version: None,
            },
        };
        judge(
            cfg,
            &pool,
            &format!("s{}-p{i}", cfg.seed),
            pair,
            &mut rng,
            &mut records,
        );
    }
    Ok(records)
}

/// `n` prompts from the corpus's train split, for a policy to sample the
/// pairs that [`judge_pairs`] judges: the way MusicRL's preference data
/// was collected, two clips of the deployed model for one user prompt.
/// Disjoint from the prompts of [`preferences`] only by chance, like any
/// two draws of the train split.
pub fn pair_prompts(cfg: &GenConfig, n: usize) -> Vec<(String, Truth)> {
    (0..n as u64)
        .map(|i| cfg.prompt(&mut stream(cfg.seed, DOMAIN_POLICY_PROMPTS, i)))
        .collect()
}

/// Two clips sampled for one prompt, to be judged by [`judge_pairs`].
#[derive(Debug, Clone, PartialEq)]
pub struct SampledPair {
    /// The prompt.
    pub caption: String,
    /// What the prompt was written from.
    pub truth: Truth,
    /// The first clip.
    pub a: PairClip,
    /// The second clip.
    pub b: PairClip,
}

/// `pairs` judged as [`preferences`] judges its candidates: pair `i` by one
/// random rater of the pool, a `cfg.double_rated` fraction again by a
/// second; pair ids are `s{seed}-q{i}`, distinct from [`preferences`]'.
pub fn judge_pairs(
    cfg: &GenConfig,
    pairs: Vec<SampledPair>,
) -> Result<Vec<PreferenceRecord>, RecordError> {
    cfg.validate()?;
    let pool = cfg.personas();
    let mut records = Vec::with_capacity(pairs.len() + 1);
    for (i, pair) in pairs.into_iter().enumerate() {
        let mut rng = stream(cfg.seed, DOMAIN_JUDGED_PAIRS, i as u64);
        judge(
            cfg,
            &pool,
            &format!("s{}-q{i}", cfg.seed),
            pair,
            &mut rng,
            &mut records,
        );
    }
    Ok(records)
}

/// One or (with probability `cfg.double_rated`) two distinct raters of
/// `pool` answer which clip of `pair` they prefer; a record each.
fn judge(
    cfg: &GenConfig,
    pool: &[Persona],
    pair_id: &str,
    pair: SampledPair,
    rng: &mut impl Rng,
    records: &mut Vec<PreferenceRecord>,
) {
    let (attrs, mentioned) = (&pair.truth.attributes, &pair.truth.mentioned);
    let (fa, fb) = (Features::of(&pair.a.tokens), Features::of(&pair.b.tokens));
    let frames = pair.a.tokens.len().max(pair.b.tokens.len());
    let judges = if rng.random_bool(cfg.double_rated) {
        2
    } else {
        1
    };
    for r in sample(rng, cfg.raters, judges) {
        let rater = &pool[r];
        let choice = rater.prefer_of(attrs, mentioned, &fa, &fb, rng);
        let time_ms = if choice == Choice::Skip {
            rng.random_range(300..=3000)
        } else {
            listening_ms(2 * frames, 3000.0, rng)
        };
        records.push(PreferenceRecord {
            pair_id: pair_id.to_owned(),
            caption: pair.caption.clone(),
            a: pair.a.clone(),
            b: pair.b.clone(),
            choice,
            rater: rater.id.clone(),
            time_ms,
            truth: Some(pair.truth),
        });
    }
}

/// How many records give each answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoiceCounts {
    /// Answers "a".
    pub a: usize,
    /// Answers "b".
    pub b: usize,
    /// Ties.
    pub tie: usize,
    /// Skips.
    pub skip: usize,
}

impl ChoiceCounts {
    /// Counts the answers of `records`.
    pub fn of(records: &[PreferenceRecord]) -> ChoiceCounts {
        let mut c = ChoiceCounts::default();
        for r in records {
            match r.choice {
                Choice::A => c.a += 1,
                Choice::B => c.b += 1,
                Choice::Tie => c.tie += 1,
                Choice::Skip => c.skip += 1,
            }
        }
        c
    }

    /// All records counted.
    pub fn total(&self) -> usize {
        self.a + self.b + self.tie + self.skip
    }

    /// Fractions of a, b, tie and skip (NaN without records).
    pub fn fractions(&self) -> [f64; 4] {
        let n = self.total() as f64;
        [self.a, self.b, self.tie, self.skip].map(|c| c as f64 / n)
    }
}

/// What the raters' noise allows a preference model to reach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PreferenceCeiling {
    /// Expected accuracy, on these labels, of the best possible predictor
    /// (the population majority): the mean over records of `max(p, 1 - p)`,
    /// `p` the population's probability of "a". NaN without records.
    pub bayes_accuracy: f64,
    /// Expected agreement of two random raters on a pair: the mean of
    /// `p^2 + (1 - p)^2`.
    pub inter_rater_agreement: f64,
    /// Agreement actually observed on pairs answered (not tie, not skip) by
    /// two raters; `None` when no pair was.
    pub observed_agreement: Option<f64>,
    /// Pairs behind [`PreferenceCeiling::observed_agreement`].
    pub n_repeated: usize,
    /// Records counted: those with truth answered "a" or "b".
    pub n: usize,
}

/// The preference ceiling of `records` (those that carry [`Truth`] and
/// answer "a" or "b"), with `p` computed over raters `0..n_personas` of
/// `population`.
pub fn preference_ceiling(
    records: &[PreferenceRecord],
    population: &Population,
    n_personas: usize,
) -> PreferenceCeiling {
    let personas = population.personas(n_personas);
    let mut p_of_pair: HashMap<&str, f64> = HashMap::new();
    let (mut bayes, mut agreement, mut n) = (0.0, 0.0, 0);
    let mut answers: HashMap<&str, Vec<Choice>> = HashMap::new();
    for r in records {
        let Some(truth) = &r.truth else { continue };
        if !matches!(r.choice, Choice::A | Choice::B) {
            continue;
        }
        answers.entry(&r.pair_id).or_default().push(r.choice);
        let p = *p_of_pair.entry(&r.pair_id).or_insert_with(|| {
            preference_probability_among(
                &personas,
                &truth.attributes,
                &truth.mentioned,
                &Features::of(&r.a.tokens),
                &Features::of(&r.b.tokens),
            )
        });
        bayes += p.max(1.0 - p);
        agreement += p * p + (1.0 - p) * (1.0 - p);
        n += 1;
    }
    let repeated: Vec<bool> = answers
        .values()
        .filter(|a| a.len() >= 2)
        .map(|a| a[0] == a[1])
        .collect();
    PreferenceCeiling {
        bayes_accuracy: bayes / n as f64,
        inter_rater_agreement: agreement / n as f64,
        observed_agreement: (!repeated.is_empty())
            .then(|| repeated.iter().filter(|&&x| x).count() as f64 / repeated.len() as f64),
        n_repeated: repeated.len(),
        n,
    }
}

/// What the raters' noise allows a quality model to reach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QualityCeiling {
    /// Spearman correlation between each clip's latent quality and its MOS
    /// (mean rating). NaN when undefined (fewer than two clips, or constant).
    pub spearman: f64,
    /// Clips counted: distinct `clip_id`s among records with truth.
    pub n_clips: usize,
}

/// The quality ceiling of `records` that carry [`Truth`]: how well the
/// mean of their ratings ranks the clips by latent quality.
pub fn quality_ceiling(records: &[RatingRecord]) -> QualityCeiling {
    // clip_id -> (index of its first record, sum of ratings, count).
    let mut clips: HashMap<&str, (usize, f64, usize)> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if r.truth.is_none() {
            continue;
        }
        let e = clips.entry(&r.clip_id).or_insert((i, 0.0, 0));
        e.1 += f64::from(r.rating);
        e.2 += 1;
    }
    let mut rows: Vec<&(usize, f64, usize)> = clips.values().collect();
    rows.sort_by_key(|r| r.0);
    let latent: Vec<f64> = rows
        .iter()
        .map(|r| f64::from(crate::sim::quality(&records[r.0].tokens)))
        .collect();
    let mos: Vec<f64> = rows.iter().map(|r| r.1 / r.2 as f64).collect();
    QualityCeiling {
        spearman: spearman(&latent, &mos).unwrap_or(f64::NAN),
        n_clips: rows.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Validate;
    use crate::sim::quality;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashSet;

    fn cfg(seed: u64, n: usize) -> GenConfig {
        GenConfig {
            seed,
            n,
            ..GenConfig::default()
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let check = |f: fn(&mut GenConfig), key: &str| {
            let mut c = GenConfig::default();
            f(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.to_string().starts_with(key), "{err}");
            assert!(preferences(&c).is_err());
        };
        check(|c| c.frames_min = 0, "frames_min");
        check(|c| c.frames_max = 50, "frames_max");
        check(|c| c.raters_per_clip = 101, "raters_per_clip");
        check(|c| c.double_rated = 1.5, "double_rated");
        check(|c| c.corrupted_clips = 2.0, "corrupted_clips");
        check(|c| c.violation_rate = -0.1, "violation_rate");
        assert!(GenConfig::default().validate().is_ok());
        let parsed: GenConfig = serde_json::from_str(r#"{"seed": 3, "n": 10}"#).unwrap();
        assert_eq!(parsed, cfg(3, 10));
        assert!(serde_json::from_str::<GenConfig>(r#"{"sed": 3}"#).is_err());
    }

    #[test]
    fn corruption_kinds_do_what_they_say() {
        let x = Corpus::new(1, 200).example(Split::Train, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(Corruption::NONE.apply(&x.tokens, &mut rng), x.tokens);
        assert_eq!(corrupt(&x.tokens, 0.0, &mut rng), x.tokens);
        let notes = |t: &[u32]| {
            t.iter()
                .filter_map(|&id| match Token::from_id(id) {
                    Ok(Token::Note {
                        instrument, pitch, ..
                    }) => Some((instrument, pitch)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let only = |c: Corruption| c.apply(&x.tokens, &mut ChaCha8Rng::seed_from_u64(2));
        let clean = notes(&x.tokens);

        let shifted = only(Corruption {
            out_of_key: 1.0,
            ..Corruption::NONE
        });
        let moved = notes(&shifted);
        assert_eq!(moved.len(), clean.len());
        assert!(
            moved
                .iter()
                .zip(&clean)
                .all(|(m, c)| m.0 == c.0 && m.1.abs_diff(c.1) == 1)
        );

        let swapped = notes(&only(Corruption {
            instrument_swaps: 1.0,
            ..Corruption::NONE
        }));
        assert!(
            swapped
                .iter()
                .zip(&clean)
                .all(|(s, c)| s.0 != c.0 && s.1 == c.1)
        );

        let dropped = only(Corruption {
            dropouts: 0.3,
            ..Corruption::NONE
        });
        let rests = |t: &[u32]| t.iter().filter(|&&id| id == REST).count();
        assert!(
            rests(&dropped) >= rests(&x.tokens) + 40,
            "{}",
            rests(&dropped)
        );

        let glitched = only(Corruption {
            glitches: 0.1,
            ..Corruption::NONE
        });
        assert!(notes(&glitched).len() > clean.len() + 5);
        for t in [&shifted, &dropped, &glitched] {
            assert!(t.len() == x.tokens.len() && t.iter().all(|&id| (id as usize) < VOCAB_SIZE));
        }
    }

    #[test]
    fn candidates_vary_only_what_the_caption_leaves_open() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let corpus = Corpus::new(2, 0);
        let (mut violations, mut varied) = (0, 0);
        for i in 0..300 {
            let x = corpus.example(Split::Train, i);
            let c = candidate(&x.attributes, &x.mentioned, 100, 0.15, &mut rng);
            assert_eq!(c.tokens.len(), 100);
            let (a, m) = (&c.attributes, &x.mentioned);
            let kept = [
                (
                    m.instrument,
                    a.instrument == x.attributes.instrument,
                    "instrument",
                ),
                (m.tempo, a.tempo == x.attributes.tempo, "tempo"),
                (m.key, a.tonic == x.attributes.tonic, "key"),
                (m.mood, a.mood == x.attributes.mood, "mood"),
                (m.density, a.density == x.attributes.density, "density"),
                (m.register, a.register == x.attributes.register, "register"),
            ];
            for (mentioned, same, name) in kept {
                if mentioned {
                    assert_eq!(same, c.violated != Some(name), "{name}");
                }
            }
            violations += usize::from(c.violated.is_some());
            varied += usize::from(!m.register && a.register != x.attributes.register);
        }
        assert!((20..=70).contains(&violations), "{violations}");
        assert!(varied > 50, "{varied}");
    }

    #[test]
    fn corrupted_clips_keep_their_captions_and_clean_ones_stay_as_composed() {
        let clean = clips(&cfg(3, 200)).unwrap();
        let corpus_clip = |i: u64| {
            let c = cfg(3, 200);
            let mut rng = stream(c.seed, DOMAIN_CLIPS, i);
            let frames = c.frames(&mut rng);
            let index = u64::from(rng.random::<u32>());
            Corpus::new(c.corpus_seed, frames).example(Split::Train, index)
        };
        for (i, r) in clean.iter().enumerate() {
            assert_eq!(r.tokens, corpus_clip(i as u64).tokens);
        }
        let some = clips(&GenConfig {
            corrupted_clips: 0.5,
            ..cfg(3, 200)
        })
        .unwrap();
        let changed = clean
            .iter()
            .zip(&some)
            .filter(|(a, b)| {
                assert_eq!(a.caption, b.caption);
                assert_eq!(a.truth, b.truth);
                assert_eq!(a.tokens.len(), b.tokens.len());
                a.tokens != b.tokens
            })
            .count();
        // Half are corrupted, a quarter of those at severity 0.
        assert!((50..=110).contains(&changed), "{changed} of 200 changed");
        let quality = |rs: &[ClipRecord]| {
            rs.iter()
                .map(|r| f64::from(crate::sim::quality(&r.tokens)))
                .sum::<f64>()
                / rs.len() as f64
        };
        assert!(quality(&some) < quality(&clean) - 0.2);
    }

    #[test]
    fn generated_records_are_valid_and_deterministic() {
        let c = GenConfig {
            frames_min: 60,
            frames_max: 120,
            ..cfg(7, 40)
        };
        let clips = clips(&c).unwrap();
        let ratings = ratings(&c).unwrap();
        let prefs = preferences(&c).unwrap();
        assert_eq!(clips.len(), 40);
        assert_eq!(ratings.len(), 40 * 5);
        assert!(prefs.len() >= 40);
        assert!(
            clips
                .iter()
                .all(|r| r.validate().is_ok() && r.truth.is_some())
        );
        assert!(ratings.iter().all(|r| r.validate().is_ok()));
        assert!(prefs.iter().all(|r| r.validate().is_ok()));
        assert!(
            clips
                .iter()
                .all(|r| (60..=120).contains(&r.tokens.len()) && quality(&r.tokens) > 4.5)
        );
        assert!(prefs.iter().all(|r| r.a.tokens.len() == r.b.tokens.len()));
        // Each clip has raters_per_clip distinct raters.
        for chunk in ratings.chunks(5) {
            let ids: HashSet<&str> = chunk.iter().map(|r| r.clip_id.as_str()).collect();
            let raters: HashSet<&str> = chunk.iter().map(|r| r.rater.as_str()).collect();
            assert_eq!((ids.len(), raters.len()), (1, 5));
        }
        assert_eq!(super::ratings(&c).unwrap(), ratings);
        assert_eq!(super::preferences(&c).unwrap(), prefs);
        assert_eq!(super::clips(&c).unwrap(), clips);
    }

    #[test]
    fn judged_pairs_keep_their_clips_and_follow_the_raters() {
        let c = cfg(5, 60);
        let prompts = pair_prompts(&c, 60);
        assert_eq!(prompts, pair_prompts(&c, 60), "deterministic");
        assert_ne!(prompts, pair_prompts(&cfg(6, 60), 60), "seeded");
        let mut rng = stream(9, 0, 0);
        let pairs: Vec<SampledPair> = prompts
            .iter()
            .map(|(caption, truth)| {
                let clean =
                    candidate_at(&truth.attributes, &truth.mentioned, 80, 0.0, 0.0, &mut rng);
                let ruined = corrupt(&clean.tokens, 1.0, &mut rng);
                let clip = |tokens| PairClip {
                    tokens,
                    policy_version: Some("base".into()),
                };
                SampledPair {
                    caption: caption.clone(),
                    truth: *truth,
                    a: clip(clean.tokens),
                    b: clip(ruined),
                }
            })
            .collect();
        let records = judge_pairs(&c, pairs.clone()).unwrap();
        assert_eq!(judge_pairs(&c, pairs.clone()).unwrap(), records);
        assert!(records.len() >= pairs.len());
        assert!(records.iter().all(|r| r.validate().is_ok()));
        for r in &records {
            let i: usize = r.pair_id.strip_prefix("s5-q").unwrap().parse().unwrap();
            assert_eq!(
                (&r.a, &r.b, &r.caption),
                (&pairs[i].a, &pairs[i].b, &pairs[i].caption)
            );
        }
        let counts = ChoiceCounts::of(&records);
        assert!(
            counts.a > 4 * counts.b,
            "{counts:?}: the clean clip should win"
        );
    }

    #[test]
    fn different_seeds_give_disjoint_data() {
        let a = preferences(&cfg(1, 300)).unwrap();
        let b = preferences(&cfg(2, 300)).unwrap();
        let ids: HashSet<&str> = a.iter().map(|r| r.pair_id.as_str()).collect();
        assert!(b.iter().all(|r| !ids.contains(r.pair_id.as_str())));
        let pairs: HashSet<(&Vec<u32>, &Vec<u32>)> =
            a.iter().map(|p| (&p.a.tokens, &p.b.tokens)).collect();
        assert!(
            b.iter()
                .all(|p| !pairs.contains(&(&p.a.tokens, &p.b.tokens)))
        );
        // A short, clean clip of a fully specified prompt can recur by chance
        // (about 0.5% of clips at 100 frames); anything more is shared streams.
        let clips_a: HashSet<&Vec<u32>> =
            a.iter().flat_map(|p| [&p.a.tokens, &p.b.tokens]).collect();
        let shared = b
            .iter()
            .flat_map(|p| [&p.a.tokens, &p.b.tokens])
            .filter(|t| clips_a.contains(t))
            .count();
        assert!(shared <= 6, "{shared} clips shared");
        let ca = super::clips(&cfg(1, 300)).unwrap();
        let cb = super::clips(&cfg(2, 300)).unwrap();
        let ta: HashSet<&Vec<u32>> = ca.iter().map(|c| &c.tokens).collect();
        assert!(cb.iter().filter(|c| ta.contains(&c.tokens)).count() <= 3);
    }

    #[test]
    fn quality_spreads_over_the_whole_scale() {
        let ratings = ratings(&cfg(3, 400)).unwrap();
        let qs: Vec<f32> = ratings.chunks(5).map(|c| quality(&c[0].tokens)).collect();
        let share = |lo: f32, hi: f32| {
            qs.iter().filter(|&&q| q >= lo && q < hi).count() as f32 / qs.len() as f32
        };
        // Balanced, as a listening test should be: neither flawless clips
        // (whose MOS differences are only rater noise) nor ruined ones dominate.
        let top = share(4.5, 5.1);
        assert!(top > 0.15 && top < 0.5, "{top}");
        assert!(share(1.0, 2.0) > 0.15, "{}", share(1.0, 2.0));
        assert!(share(2.0, 4.5) > 0.3, "{}", share(2.0, 4.5));
        let rated: HashSet<u8> = ratings.iter().map(|r| r.rating).collect();
        assert_eq!(rated.len(), 5);
    }

    #[test]
    fn ceilings_are_high_but_below_one() {
        let prefs = preferences(&cfg(4, 600)).unwrap();
        let ceiling = preference_ceiling(&prefs, &Population::new(0), 100);
        let counts = ChoiceCounts::of(&prefs);
        assert_eq!(ceiling.n, counts.a + counts.b);
        assert!(
            ceiling.bayes_accuracy > 0.7 && ceiling.bayes_accuracy < 0.9,
            "{ceiling:?}"
        );
        assert!(ceiling.inter_rater_agreement < ceiling.bayes_accuracy);
        assert!(ceiling.inter_rater_agreement > 0.5);
        // Skips about 5%, some ties, a and b balanced.
        let [a, b, tie, skip] = counts.fractions();
        assert!((skip - 0.05).abs() < 0.03, "{counts:?}");
        assert!(tie > 0.01 && tie < 0.2, "{counts:?}");
        assert!((a - b).abs() < 0.1, "{counts:?}");
        // Records without truth are ignored.
        let mut stripped = prefs.clone();
        stripped.iter_mut().for_each(|r| r.truth = None);
        assert_eq!(preference_ceiling(&stripped, &Population::new(0), 10).n, 0);

        let ratings = ratings(&cfg(4, 300)).unwrap();
        let q = quality_ceiling(&ratings);
        assert_eq!(q.n_clips, 300);
        assert!(q.spearman > 0.85 && q.spearman < 1.0, "{q:?}");
    }

    /// The labels follow the population's majority as often as the ceiling
    /// says: empirical accuracy of the Bayes predictor matches its expectation.
    #[test]
    fn bayes_ceiling_matches_the_labels() {
        let prefs = preferences(&cfg(5, 1500)).unwrap();
        let population = Population::new(0);
        let personas = population.personas(100);
        let ceiling = preference_ceiling(&prefs, &population, 100);
        let (mut right, mut n) = (0, 0);
        for r in &prefs {
            let truth = r.truth.as_ref().unwrap();
            let p = preference_probability_among(
                &personas,
                &truth.attributes,
                &truth.mentioned,
                &Features::of(&r.a.tokens),
                &Features::of(&r.b.tokens),
            );
            match r.choice {
                Choice::A => right += usize::from(p >= 0.5),
                Choice::B => right += usize::from(p < 0.5),
                _ => continue,
            }
            n += 1;
        }
        let accuracy = right as f64 / n as f64;
        // Standard error about 0.011 at n ~ 1500.
        assert!(
            (accuracy - ceiling.bayes_accuracy).abs() < 0.04,
            "{accuracy} vs {ceiling:?}"
        );
        let observed = ceiling.observed_agreement.unwrap();
        assert!(ceiling.n_repeated > 50);
        assert!(
            (observed - ceiling.inter_rater_agreement).abs() < 0.12,
            "{observed} vs {ceiling:?}"
        );
    }
}

//! JobSpec rules for JobService.Submit: [`validate`] checks a submitted spec
//! as a whole and names every bad field by its request path
//! (`spec.stages[1].rewards[0].weight`, `spec.labels["team"]`);
//! [`with_defaults`] turns a valid spec into the effective spec that
//! `Job.spec` shows and that learners and actors are handed; [`spec_sha256`]
//! fingerprints a spec as submitted, which is what idempotency keys are
//! compared on.
//!
//! Every rule and default comes from the comments of `job.proto`,
//! `rollout.proto` and `common.proto`; where the protocol leaves a bound to
//! the server (how many prompts, stages, actors...) it is a field of
//! [`Limits`].
//!
//! ```text
//!  SubmitJobRequest.spec ──validate──▶ Violations (INVALID_ARGUMENT), or
//!                        ──spec_sha256──▶ idempotency check
//!                        ──with_defaults──▶ Job.spec (stored, then assigned)
//! ```
//!
//! The effective spec always lists its stages: a job submitted without
//! explicit stages gets the one implicit stage the protocol describes,
//! [`IMPLICIT_STAGE`], holding the job's rewards and stop condition, so
//! downstream code has a single shape to handle.

#![warn(missing_docs)]

mod dataset;
mod plan;
#[cfg(test)]
mod tests;

pub use plan::JobPlan;

use std::collections::{BTreeSet, HashMap};

use encore_proto::status::Violations;
use encore_proto::v1::{
    Algorithm, AlgorithmKind, DeviceKind, ErrorReason, JobResources, JobSpec, ModelRef,
    Normalization, NormalizationKind, PolicyArchitecture, Prompt, PromptSource, RewardConfig,
    SamplingParams, Seeds, Stage, StopCondition, prompt_source,
};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of the one stage of a job submitted without explicit stages
/// (`Job.stage` shows it).
pub const IMPLICIT_STAGE: &str = "main";

/// Longest `JobSpec.name`, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest identifier (prompt ids, reward model names), in bytes; see the
/// identifier rules of `common.proto`.
pub const MAX_ID_BYTES: usize = 128;
/// Longest stage name, in bytes (stage names label metrics).
pub const MAX_STAGE_NAME_BYTES: usize = 63;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_BYTES: usize = 63;
/// Longest caption the protocol allows (`Prompt.caption`), in bytes.
pub const PROTOCOL_MAX_CAPTION_BYTES: usize = 4096;
/// Longest `google.protobuf.Duration` (its own documented range, about
/// 10,000 years), in seconds.
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// `Normalization.ema_decay` when unset (RUNNING_Z_SCORE only).
pub const DEFAULT_EMA_DECAY: f64 = 0.99;
/// `Algorithm.clip_range` when unset.
pub const DEFAULT_CLIP_RANGE: f64 = 0.2;
/// `Algorithm.max_staleness` when unset.
pub const DEFAULT_MAX_STALENESS: u32 = 2;
/// `Algorithm.max_grad_norm` when unset.
pub const DEFAULT_MAX_GRAD_NORM: f64 = 1.0;
/// `Algorithm.ppo_epochs` when 0.
pub const DEFAULT_PPO_EPOCHS: u32 = 1;
/// `SamplingParams.temperature` when 0 in a JobSpec.
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
/// `JobSpec.publish_every_steps` when 0.
pub const DEFAULT_PUBLISH_EVERY_STEPS: u32 = 1;
/// `JobSpec.checkpoint_every_steps` when 0.
pub const DEFAULT_CHECKPOINT_EVERY_STEPS: u32 = 50;
/// `StopCondition.target_window` when 0 (filled only where a
/// target_reward is set, the only place it means anything).
pub const DEFAULT_TARGET_WINDOW: u32 = 10;

/// [`derive_seed`] stream of `Seeds.prompt_order`.
pub const SEED_STREAM_PROMPT_ORDER: u64 = 1;
/// [`derive_seed`] stream of `Seeds.sampling`.
pub const SEED_STREAM_SAMPLING: u64 = 2;

/// Bounds the protocol leaves to the server. Part of the coordinator's
/// configuration, so every field has a default and may be overridden.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most prompts of an inline list. The list is stored with the job and
    /// re-sent by every Get, List and Watch snapshot, so big prompt sets
    /// belong in a dataset file. Default 10,000.
    pub max_prompts_inline: usize,
    /// Most prompts of a dataset file. The coordinator reads the whole file
    /// at Submit and keeps every id in memory while it checks uniqueness.
    /// Default 1,000,000.
    pub max_dataset_prompts: usize,
    /// Largest dataset file, in bytes; Submit reads it through. Default
    /// 256 MiB.
    pub max_dataset_bytes: u64,
    /// Longest caption, in bytes. Default 4096, the protocol's own limit
    /// ([`PROTOCOL_MAX_CAPTION_BYTES`]); raising it only moves the failure
    /// to the reward servers, which enforce the protocol's.
    pub max_caption_bytes: usize,
    /// Most explicit stages. Default 16.
    pub max_stages: usize,
    /// Most rewards in one stage (each is a reward-server call per batch).
    /// Default 16.
    pub max_rewards_per_stage: usize,
    /// Most labels; each becomes a metric label value. Default 64.
    pub max_labels: usize,
    /// Most actors of one job. Default 1024.
    pub max_actors: u32,
    /// Most learner ranks of one job. Default 256.
    pub max_learner_ranks: u32,
    /// Largest `sampling.max_new_tokens`. Default 65,536: about 44 minutes
    /// of audio with the embedded 25 Hz codec, far beyond what a learner
    /// can backpropagate through.
    pub max_new_tokens: u32,
    /// Vocabulary size of the policy, when the operator runs one model
    /// family; `sampling.top_k` may not exceed it. Default unknown (the
    /// coordinator never opens checkpoints), which leaves top_k unbounded.
    pub vocab_size: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompts_inline: 10_000,
            max_dataset_prompts: 1_000_000,
            max_dataset_bytes: 256 << 20,
            max_caption_bytes: PROTOCOL_MAX_CAPTION_BYTES,
            max_stages: 16,
            max_rewards_per_stage: 16,
            max_labels: 64,
            max_actors: 1024,
            max_learner_ranks: 256,
            max_new_tokens: 1 << 16,
            vocab_size: None,
        }
    }
}

/// Checks a submitted spec as a whole and reports every bad field, by its
/// path in SubmitJobRequest (`spec.…`), in field order. Reasons: TOO_LARGE
/// for a size or count over a limit, NON_FINITE for a NaN or infinite
/// number, INVALID_FIELD for the rest.
///
/// The rules, all from the proto comments: name 1..=128 bytes; a base
/// checkpoint uri; sha256s empty or 64 lower-case hex; exactly one prompt
/// source, with unique identifier prompt ids and non-empty captions within
/// the limit (a dataset file is read and checked line by line); job rewards
/// only without stages; each stage (the implicit one included) with 1 to
/// `max_rewards_per_stage` rewards on distinct reward models named by
/// identifier (no uri), finite weights not all zero, a known normalisation
/// kind, ema_decay in [0, 1) and only for RUNNING_Z_SCORE, clip > 0; stage
/// names unique, 1..=63 bytes of `[A-Za-z0-9._-]`; each stage stop sets a
/// condition; no job target_reward next to stages; the job bounded by
/// max_steps or max_wall_time (its own stop or the last stage's);
/// max_steps >= 1, target_window only with a finite target_reward,
/// max_wall_time a valid positive duration; a known algorithm, K >= 2,
/// batch_size a positive multiple of K and of learner_ranks, micro_batch
/// 0 or dividing the per-rank batch, learning_rate > 0, weight_decay and
/// kl_coef >= 0, clip_range and max_grad_norm > 0, ppo_epochs at most 1
/// under REINFORCE; max_new_tokens in 1..=limit, temperature >= 0, top_p in
/// [0, 1], top_k at most the vocabulary when known; 1..=limit actors and
/// learner ranks, known device kinds, no GPU requirement on a CPU device;
/// at most `max_labels` labels with keys 1..=63 and values 0..=63 bytes.
///
/// A dataset file (`prompts.dataset_path`) is opened and read through, so
/// this blocks on file I/O: async callers run it on a blocking thread.
/// On success it returns the spec's [`JobPlan`]: the values the job will
/// run with, its defaults applied.
pub fn validate(spec: &JobSpec, limits: &Limits) -> Result<JobPlan, Violations> {
    let mut c = Check {
        v: Violations::default(),
        limits,
    };
    // In field-number order, so violations come in request order.
    c.name(&spec.name);
    c.base_checkpoint(spec.base_checkpoint.as_ref());
    c.prompts(spec.prompts.as_ref());
    c.job_rewards(spec);
    c.algorithm(spec);
    c.stages(&spec.stages);
    c.job_stop(spec);
    c.resources(spec.resources.as_ref());
    c.labels(&spec.labels);
    if PolicyArchitecture::try_from(spec.architecture).is_err() {
        c.invalid(
            "spec.architecture",
            format!("unknown policy architecture {}", spec.architecture),
        );
    }
    c.v.into_result()?;
    JobPlan::of(&fill_defaults(spec))
}

/// The effective spec of a valid spec: every default the protocol describes
/// filled in, the implicit stage made explicit, and the unset seeds drawn
/// (root from `rng`, the others derived from root by [`derive_seed`]).
///
/// Defaults: normalization kind RUNNING_Z_SCORE with ema_decay 0.99;
/// algorithm kind PPO, clip_range 0.2, max_staleness 2, max_grad_norm 1.0,
/// ppo_epochs 1, sampling temperature 1.0; publish_every_steps 1,
/// checkpoint_every_steps 50; target_window 10 where a target_reward is set.
/// A spec without stages becomes `stages = [main]`, with the job's rewards
/// and stop condition moved into it (its `rewards` and `stop` then unset),
/// which is exactly the job the protocol says it runs.
///
/// The result validates whenever `spec` does, and is a fixed point:
/// `with_defaults(&with_defaults(s, r), r) == with_defaults(s, r)`. On an
/// invalid spec it does its best and never panics.
pub fn with_defaults(spec: &JobSpec, rng: &mut impl Rng) -> JobSpec {
    let mut s = fill_defaults(spec);
    let seeds = s.seeds.get_or_insert_with(Seeds::default);
    let root = *seeds.root.get_or_insert_with(|| rng.random());
    seeds
        .prompt_order
        .get_or_insert_with(|| derive_seed(root, SEED_STREAM_PROMPT_ORDER));
    seeds
        .sampling
        .get_or_insert_with(|| derive_seed(root, SEED_STREAM_SAMPLING));
    s
}

/// [`with_defaults`] but for the seeds: every default of the protocol
/// filled in, the implicit stage made explicit. The one place the defaults
/// are written.
pub fn fill_defaults(spec: &JobSpec) -> JobSpec {
    let mut s = spec.clone();

    if s.stages.is_empty() {
        s.stages.push(Stage {
            name: IMPLICIT_STAGE.to_owned(),
            rewards: std::mem::take(&mut s.rewards),
            stop: s.stop.take(),
        });
    }
    for stage in &mut s.stages {
        for reward in &mut stage.rewards {
            default_normalization(reward.normalization.get_or_insert_with(Default::default));
        }
        if let Some(stop) = &mut stage.stop {
            default_stop(stop);
        }
    }
    // Only an invalid spec keeps job-level rewards next to stages; their
    // normalisation is filled all the same so the effective spec is uniform.
    for reward in &mut s.rewards {
        default_normalization(reward.normalization.get_or_insert_with(Default::default));
    }
    if let Some(stop) = &mut s.stop {
        default_stop(stop);
    }

    let algorithm = s.algorithm.get_or_insert_with(Default::default);
    if algorithm.kind == AlgorithmKind::Unspecified as i32 {
        algorithm.kind = AlgorithmKind::Ppo as i32;
    }
    algorithm.clip_range.get_or_insert(DEFAULT_CLIP_RANGE);
    algorithm.max_staleness.get_or_insert(DEFAULT_MAX_STALENESS);
    algorithm.max_grad_norm.get_or_insert(DEFAULT_MAX_GRAD_NORM);
    if algorithm.ppo_epochs == 0 {
        algorithm.ppo_epochs = DEFAULT_PPO_EPOCHS;
    }
    let sampling = algorithm.sampling.get_or_insert_with(Default::default);
    if sampling.temperature == 0.0 {
        sampling.temperature = DEFAULT_TEMPERATURE;
    }

    if s.publish_every_steps == 0 {
        s.publish_every_steps = DEFAULT_PUBLISH_EVERY_STEPS;
    }
    if s.checkpoint_every_steps == 0 {
        s.checkpoint_every_steps = DEFAULT_CHECKPOINT_EVERY_STEPS;
    }
    s
}

fn default_normalization(n: &mut Normalization) {
    if n.kind == NormalizationKind::Unspecified as i32 {
        n.kind = NormalizationKind::RunningZScore as i32;
    }
    // ema_decay means nothing to NONE, and validate rejects it there.
    if n.kind == NormalizationKind::RunningZScore as i32
        || n.kind == NormalizationKind::GroupZScore as i32
    {
        n.ema_decay.get_or_insert(DEFAULT_EMA_DECAY);
    }
}

fn default_stop(stop: &mut StopCondition) {
    // A window without a target means nothing, and validate rejects it.
    if stop.target_reward.is_some() && stop.target_window == 0 {
        stop.target_window = DEFAULT_TARGET_WINDOW;
    }
}

/// Seed number `stream` derived from `root`: output number `stream` of a
/// SplitMix64 generator seeded with `root` (Steele, Lea and Flood 2014, the
/// generator Java's `SplittableRandom` and the xoshiro authors use to seed
/// from one word). Streams 1, 2... give well-mixed, independent-looking
/// seeds even for roots like 0 and 1; see the `SEED_STREAM_*` constants.
pub fn derive_seed(root: u64, stream: u64) -> u64 {
    let mut z = root.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Lower-case hex sha256 of the canonical encoding of `spec` as given (see
/// [`canonical_encoding`]): equal specs always hash equal, different specs
/// differ.
pub fn spec_sha256(spec: &JobSpec) -> String {
    hex::encode(Sha256::digest(canonical_encoding(spec)))
}

/// A deterministic protobuf encoding of `spec`. prost writes fields in
/// number order, which is canonical, except for map fields (`labels`,
/// `Prompt.attributes`) whose entries come in `HashMap` order; those are
/// written here sorted by key, after the other fields. The result is a
/// valid encoding of the same message (`JobSpec::decode` gives `spec`
/// back), so two specs with the same encoding are equal.
pub fn canonical_encoding(spec: &JobSpec) -> Vec<u8> {
    let mut rest = spec.clone();
    let labels = std::mem::take(&mut rest.labels);
    let inline = match rest.prompts.take() {
        Some(PromptSource {
            source: Some(prompt_source::Source::Inline(list)),
        }) => Some(list),
        other => {
            rest.prompts = other;
            None
        }
    };
    let mut buf = rest.encode_to_vec();
    if let Some(list) = inline {
        let mut list_buf = Vec::new();
        for prompt in &list.prompts {
            // PromptList.prompts = 1.
            length_delimited(1, &canonical_prompt(prompt), &mut list_buf);
        }
        // PromptSource.inline = 1, JobSpec.prompts = 3.
        let mut source_buf = Vec::new();
        length_delimited(1, &list_buf, &mut source_buf);
        length_delimited(3, &source_buf, &mut buf);
    }
    // JobSpec.labels = 12.
    map_entries(12, &labels, &mut buf);
    buf
}

fn canonical_prompt(prompt: &Prompt) -> Vec<u8> {
    let mut buf = Prompt {
        prompt_id: prompt.prompt_id.clone(),
        caption: prompt.caption.clone(),
        attributes: HashMap::new(),
    }
    .encode_to_vec();
    // Prompt.attributes = 3.
    map_entries(3, &prompt.attributes, &mut buf);
    buf
}

/// Appends the entries of a `map<string, string>` field, sorted by key.
fn map_entries(tag: u32, map: &HashMap<String, String>, buf: &mut Vec<u8>) {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort();
    for (key, value) in entries {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, key, &mut entry);
        prost::encoding::string::encode(2, value, &mut entry);
        length_delimited(tag, &entry, buf);
    }
}

fn length_delimited(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

/// The stages a job runs, in order: its explicit stages, or the one
/// implicit stage ([`IMPLICIT_STAGE`], with the job's rewards and stop
/// condition) of a spec without any. Gives the same answer for a submitted
/// spec and its effective spec, up to defaults.
pub fn stages(spec: &JobSpec) -> Vec<Stage> {
    if spec.stages.is_empty() {
        vec![Stage {
            name: IMPLICIT_STAGE.to_owned(),
            rewards: spec.rewards.clone(),
            stop: spec.stop,
        }]
    } else {
        spec.stages.clone()
    }
}

/// Names of the stages a job runs, in order (see [`stages`]).
pub fn stage_names(spec: &JobSpec) -> Vec<String> {
    if spec.stages.is_empty() {
        vec![IMPLICIT_STAGE.to_owned()]
    } else {
        spec.stages.iter().map(|s| s.name.clone()).collect()
    }
}

/// Every reward model a job uses in any stage, by name: the reward servers
/// it needs before it can leave PENDING.
pub fn reward_models(spec: &JobSpec) -> BTreeSet<String> {
    spec.rewards
        .iter()
        .chain(spec.stages.iter().flat_map(|s| &s.rewards))
        .filter_map(|r| r.model.as_ref())
        .map(|m| m.name.clone())
        .collect()
}

/// Whether `s` is an identifier as `common.proto` defines them: 1 to 128
/// bytes of `[A-Za-z0-9._-]`.
pub fn is_valid_id(s: &str) -> bool {
    is_name(s, MAX_ID_BYTES)
}

fn is_name(s: &str, max_bytes: usize) -> bool {
    (1..=max_bytes).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `s` quoted for a message or a path, cut short so that a huge value
/// cannot blow up the error trailer.
fn preview(s: &str) -> String {
    const KEEP: usize = 48;
    if s.len() <= KEEP {
        return format!("{s:?}");
    }
    let mut end = KEEP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// A problem of one prompt, by field: shared by inline lists and dataset
/// files so both enforce the same rules.
struct PromptProblem {
    /// Proto field name: `prompt_id` or `caption`.
    field: &'static str,
    reason: ErrorReason,
    description: String,
}

fn prompt_problems(prompt_id: &str, caption: &str, limits: &Limits) -> Vec<PromptProblem> {
    let mut problems = Vec::new();
    if !is_valid_id(prompt_id) {
        problems.push(PromptProblem {
            field: "prompt_id",
            reason: ErrorReason::InvalidField,
            description: format!(
                "must be 1 to {MAX_ID_BYTES} bytes of [A-Za-z0-9._-], got {}",
                preview(prompt_id)
            ),
        });
    }
    if caption.is_empty() {
        problems.push(PromptProblem {
            field: "caption",
            reason: ErrorReason::InvalidField,
            description: "required: the text that conditions the music".into(),
        });
    } else if caption.len() > limits.max_caption_bytes {
        problems.push(PromptProblem {
            field: "caption",
            reason: ErrorReason::TooLarge,
            description: format!(
                "{} bytes, more than the limit of {}",
                caption.len(),
                limits.max_caption_bytes
            ),
        });
    }
    problems
}

/// One validation pass: the violations found so far and the limits.
struct Check<'a> {
    v: Violations,
    limits: &'a Limits,
}

impl Check<'_> {
    fn invalid(&mut self, path: impl Into<String>, description: impl Into<String>) {
        self.v.invalid(path, description);
    }

    fn too_large(&mut self, path: impl Into<String>, description: impl Into<String>) {
        self.v
            .push(path.into(), ErrorReason::TooLarge, description.into());
    }

    /// Reports a NaN or infinite `x`; true when `x` is finite.
    fn finite(&mut self, path: &str, x: f64) -> bool {
        if !x.is_finite() {
            self.v.push(
                path.to_owned(),
                ErrorReason::NonFinite,
                format!("must be a finite number, got {x}"),
            );
        }
        x.is_finite()
    }

    fn positive(&mut self, path: &str, x: f64) {
        if self.finite(path, x) && x <= 0.0 {
            self.invalid(path, format!("must be > 0, got {x}"));
        }
    }

    fn non_negative(&mut self, path: &str, x: f64) {
        if self.finite(path, x) && x < 0.0 {
            self.invalid(path, format!("must be >= 0, got {x}"));
        }
    }

    fn sha256(&mut self, path: &str, s: &str) {
        if !s.is_empty() && !is_sha256(s) {
            self.invalid(
                path,
                format!(
                    "must be empty or 64 lower-case hex characters, got {}",
                    preview(s)
                ),
            );
        }
    }

    fn name(&mut self, name: &str) {
        if name.is_empty() {
            self.invalid(
                "spec.name",
                format!("required: 1 to {MAX_NAME_BYTES} bytes"),
            );
        } else if name.len() > MAX_NAME_BYTES {
            self.too_large(
                "spec.name",
                format!("{} bytes, more than {MAX_NAME_BYTES}", name.len()),
            );
        }
    }

    fn base_checkpoint(&mut self, model: Option<&ModelRef>) {
        let default = ModelRef::default();
        let model = model.unwrap_or(&default);
        if model.uri.is_empty() {
            self.invalid(
                "spec.base_checkpoint.uri",
                "required: a safetensors file, or a directory holding model.safetensors and \
                 config.json",
            );
        }
        self.sha256("spec.base_checkpoint.sha256", &model.sha256);
    }

    fn prompts(&mut self, prompts: Option<&PromptSource>) {
        match prompts.and_then(|p| p.source.as_ref()) {
            None => self.invalid(
                "spec.prompts",
                "exactly one of inline or dataset_path must be set",
            ),
            Some(prompt_source::Source::Inline(list)) => {
                let path = "spec.prompts.inline.prompts";
                if list.prompts.is_empty() {
                    self.invalid(path, "at least one prompt is required");
                } else if list.prompts.len() > self.limits.max_prompts_inline {
                    self.too_large(
                        path,
                        format!(
                            "{} prompts, more than the inline limit of {}; use a dataset_path",
                            list.prompts.len(),
                            self.limits.max_prompts_inline
                        ),
                    );
                }
                let mut seen: HashMap<&str, usize> = HashMap::new();
                for (i, prompt) in list.prompts.iter().enumerate() {
                    for p in prompt_problems(&prompt.prompt_id, &prompt.caption, self.limits) {
                        self.v
                            .push(format!("{path}[{i}].{}", p.field), p.reason, p.description);
                    }
                    if prompt.prompt_id.is_empty() {
                        continue;
                    }
                    if let Some(first) = seen.insert(&prompt.prompt_id, i) {
                        self.invalid(
                            format!("{path}[{i}].prompt_id"),
                            format!(
                                "{} is already the id of {path}[{first}]",
                                preview(&prompt.prompt_id)
                            ),
                        );
                        // Name the first holder in later reports too.
                        seen.insert(&prompt.prompt_id, first);
                    }
                }
            }
            Some(prompt_source::Source::DatasetPath(uri)) => {
                dataset::check(uri, "spec.prompts.dataset_path", self.limits, &mut self.v);
            }
        }
    }

    fn job_rewards(&mut self, spec: &JobSpec) {
        if spec.stages.is_empty() {
            self.rewards("spec.rewards", &spec.rewards);
        } else if !spec.rewards.is_empty() {
            self.invalid(
                "spec.rewards",
                "must be empty when stages is set: give each stage its own rewards",
            );
        }
    }

    /// The rewards of one stage (explicit, or the job's implicit one).
    fn rewards(&mut self, path: &str, rewards: &[RewardConfig]) {
        if rewards.is_empty() {
            self.invalid(path, "at least one reward is required");
            return;
        }
        if rewards.len() > self.limits.max_rewards_per_stage {
            self.too_large(
                path,
                format!(
                    "{} rewards, more than the limit of {} per stage",
                    rewards.len(),
                    self.limits.max_rewards_per_stage
                ),
            );
        }
        let default_model = ModelRef::default();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, reward) in rewards.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let model = reward.model.as_ref().unwrap_or(&default_model);
            if !is_valid_id(&model.name) {
                self.invalid(
                    format!("{at}.model.name"),
                    format!(
                        "must be the name a reward server advertises, 1 to {MAX_ID_BYTES} bytes \
                         of [A-Za-z0-9._-], got {}",
                        preview(&model.name)
                    ),
                );
            } else if let Some(&first) = seen.get(model.name.as_str()) {
                // Metrics and normalisation statistics are kept per reward
                // model name within a stage, so a second entry would collide.
                self.invalid(
                    format!("{at}.model.name"),
                    format!(
                        "{} is already used by {path}[{first}]; a stage uses each reward \
                         model once",
                        preview(&model.name)
                    ),
                );
            } else {
                seen.insert(&model.name, i);
            }
            if !model.uri.is_empty() {
                self.invalid(
                    format!("{at}.model.uri"),
                    "must be empty: reward models are located by name through the cluster",
                );
            }
            self.sha256(&format!("{at}.model.sha256"), &model.sha256);
            self.finite(&format!("{at}.weight"), reward.weight);
            if let Some(n) = &reward.normalization {
                self.normalization(&format!("{at}.normalization"), n);
            }
        }
        if rewards.iter().all(|r| r.weight == 0.0) {
            self.invalid(path, "at least one reward must have a non-zero weight");
        }
    }

    fn normalization(&mut self, path: &str, n: &Normalization) {
        let kind = NormalizationKind::try_from(n.kind);
        if kind.is_err() {
            self.invalid(
                format!("{path}.kind"),
                format!("unknown normalization kind {}", n.kind),
            );
        }
        if let Some(decay) = n.ema_decay {
            let at = format!("{path}.ema_decay");
            if kind == Ok(NormalizationKind::None) {
                self.invalid(
                    at,
                    "applies only to NORMALIZATION_KIND_RUNNING_Z_SCORE; leave it unset",
                );
            } else if self.finite(&at, decay) && !(0.0..1.0).contains(&decay) {
                self.invalid(at, format!("must be in [0, 1), got {decay}"));
            }
        }
        if let Some(clip) = n.clip {
            self.positive(&format!("{path}.clip"), clip);
        }
    }

    fn algorithm(&mut self, spec: &JobSpec) {
        let default = Algorithm::default();
        let a = spec.algorithm.as_ref().unwrap_or(&default);
        let ranks = spec.resources.as_ref().map_or(0, |r| r.learner_ranks);
        let kind = AlgorithmKind::try_from(a.kind);
        if kind.is_err() {
            self.invalid(
                "spec.algorithm.kind",
                format!("unknown algorithm kind {}", a.kind),
            );
        }
        let k = a.samples_per_prompt;
        if k < 2 {
            self.invalid(
                "spec.algorithm.samples_per_prompt",
                format!("must be at least 2: a sample's baseline comes from its group, got {k}"),
            );
        }
        let mut batch_ok = false;
        if a.batch_size == 0 {
            self.invalid("spec.algorithm.batch_size", "must be at least 1");
        } else {
            let mut wrong = Vec::new();
            if k >= 2 && !a.batch_size.is_multiple_of(k) {
                wrong.push(format!("samples_per_prompt ({k})"));
            }
            if ranks >= 1 && !a.batch_size.is_multiple_of(ranks) {
                wrong.push(format!("resources.learner_ranks ({ranks})"));
            }
            if wrong.is_empty() {
                batch_ok = true;
            } else {
                self.invalid(
                    "spec.algorithm.batch_size",
                    format!(
                        "must be a multiple of {}, got {}",
                        wrong.join(" and of "),
                        a.batch_size
                    ),
                );
            }
        }
        if a.micro_batch_size != 0 && batch_ok && ranks >= 1 {
            let per_rank = a.batch_size / ranks;
            if !per_rank.is_multiple_of(a.micro_batch_size) {
                self.invalid(
                    "spec.algorithm.micro_batch_size",
                    format!(
                        "must divide the per-rank batch (batch_size / learner_ranks = {per_rank}), \
                         or be 0; got {}",
                        a.micro_batch_size
                    ),
                );
            }
        }
        self.positive("spec.algorithm.learning_rate", a.learning_rate);
        self.non_negative("spec.algorithm.weight_decay", a.weight_decay);
        self.non_negative("spec.algorithm.kl_coef", a.kl_coef);
        if let Some(entropy) = a.entropy_coef {
            self.non_negative("spec.algorithm.entropy_coef", entropy);
        }
        if encore_proto::v1::KlEstimator::try_from(a.kl_estimator).is_err() {
            self.invalid(
                "spec.algorithm.kl_estimator",
                format!(
                    "unknown estimator {}: KL_ESTIMATOR_K3 or KL_ESTIMATOR_K2",
                    a.kl_estimator
                ),
            );
        }
        if let Some(clip) = a.clip_range {
            self.positive("spec.algorithm.clip_range", clip);
        }
        if let Some(norm) = a.max_grad_norm {
            self.positive("spec.algorithm.max_grad_norm", norm);
        }
        if a.ppo_epochs > 1 && kind == Ok(AlgorithmKind::Reinforce) {
            self.invalid(
                "spec.algorithm.ppo_epochs",
                format!(
                    "PPO only: REINFORCE takes one gradient step per batch; leave it 0 or 1, \
                     got {}",
                    a.ppo_epochs
                ),
            );
        }
        let default = SamplingParams::default();
        self.sampling(a.sampling.as_ref().unwrap_or(&default));
    }

    fn sampling(&mut self, s: &SamplingParams) {
        if s.max_new_tokens == 0 {
            self.invalid(
                "spec.algorithm.sampling.max_new_tokens",
                "required: at least 1 (it fixes the clip length)",
            );
        } else if s.max_new_tokens > self.limits.max_new_tokens {
            self.too_large(
                "spec.algorithm.sampling.max_new_tokens",
                format!(
                    "{}, more than the limit of {}",
                    s.max_new_tokens, self.limits.max_new_tokens
                ),
            );
        }
        // 0 stands for the default 1.0.
        self.non_negative(
            "spec.algorithm.sampling.temperature",
            f64::from(s.temperature),
        );
        if let Some(vocab) = self.limits.vocab_size
            && s.top_k > vocab
        {
            self.invalid(
                "spec.algorithm.sampling.top_k",
                format!(
                    "must be at most the vocabulary size {vocab} (or 0 to disable), got {}",
                    s.top_k
                ),
            );
        }
        let top_p = f64::from(s.top_p);
        if self.finite("spec.algorithm.sampling.top_p", top_p) && !(0.0..=1.0).contains(&top_p) {
            self.invalid(
                "spec.algorithm.sampling.top_p",
                format!("must be in (0, 1], or 0 to disable, got {top_p}"),
            );
        }
    }

    fn stages(&mut self, stages: &[Stage]) {
        if stages.len() > self.limits.max_stages {
            self.too_large(
                "spec.stages",
                format!(
                    "{} stages, more than the limit of {}",
                    stages.len(),
                    self.limits.max_stages
                ),
            );
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, stage) in stages.iter().enumerate() {
            let at = format!("spec.stages[{i}]");
            if !is_name(&stage.name, MAX_STAGE_NAME_BYTES) {
                self.invalid(
                    format!("{at}.name"),
                    format!(
                        "must be 1 to {MAX_STAGE_NAME_BYTES} bytes of [A-Za-z0-9._-], got {}",
                        preview(&stage.name)
                    ),
                );
            } else if let Some(&first) = seen.get(stage.name.as_str()) {
                self.invalid(
                    format!("{at}.name"),
                    format!(
                        "{} is already the name of spec.stages[{first}]",
                        preview(&stage.name)
                    ),
                );
            } else {
                seen.insert(&stage.name, i);
            }
            self.rewards(&format!("{at}.rewards"), &stage.rewards);
            let stop_at = format!("{at}.stop");
            match &stage.stop {
                Some(stop)
                    if stop.max_steps.is_some()
                        || stop.target_reward.is_some()
                        || stop.max_wall_time.is_some() =>
                {
                    self.stop(&stop_at, stop);
                }
                other => {
                    self.invalid(
                        &stop_at,
                        "must set at least one of max_steps, target_reward and max_wall_time",
                    );
                    if let Some(stop) = other {
                        self.stop(&stop_at, stop);
                    }
                }
            }
        }
    }

    fn job_stop(&mut self, spec: &JobSpec) {
        if let Some(stop) = &spec.stop {
            self.stop("spec.stop", stop);
            if !spec.stages.is_empty() && stop.target_reward.is_some() {
                self.invalid(
                    "spec.stop.target_reward",
                    "must be unset when stages is set: each stage sets its own target",
                );
            }
        }
        let bounds = |stop: Option<&StopCondition>| {
            stop.is_some_and(|s| s.max_steps.is_some() || s.max_wall_time.is_some())
        };
        let last_stage_stop = spec.stages.last().and_then(|s| s.stop.as_ref());
        if !bounds(spec.stop.as_ref()) && !bounds(last_stage_stop) {
            let where_ = if spec.stages.is_empty() {
                "here"
            } else {
                "here or in the last stage's stop"
            };
            self.invalid(
                "spec.stop",
                format!("the job must be bounded: set max_steps or max_wall_time {where_}"),
            );
        }
    }

    fn stop(&mut self, path: &str, stop: &StopCondition) {
        if stop.max_steps == Some(0) {
            self.invalid(format!("{path}.max_steps"), "must be at least 1");
        }
        match stop.target_reward {
            Some(target) => {
                self.finite(&format!("{path}.target_reward"), target);
            }
            None if stop.target_window != 0 => self.invalid(
                format!("{path}.target_window"),
                "applies only with target_reward; leave it 0",
            ),
            None => {}
        }
        if let Some(d) = &stop.max_wall_time {
            let at = format!("{path}.max_wall_time");
            if !(0..=MAX_DURATION_SECONDS).contains(&d.seconds)
                || !(0..1_000_000_000).contains(&d.nanos)
            {
                self.invalid(
                    at,
                    format!(
                        "must be a non-negative duration of at most {MAX_DURATION_SECONDS}s \
                         with nanos in [0, 1e9), got {}s {}ns",
                        d.seconds, d.nanos
                    ),
                );
            } else if d.seconds == 0 && d.nanos == 0 {
                // Like max_steps = 0, a zero limit would end the job at once.
                self.invalid(at, "must be longer than zero; leave it unset for no limit");
            }
        }
    }

    fn resources(&mut self, resources: Option<&JobResources>) {
        let default = JobResources::default();
        let r = resources.unwrap_or(&default);
        let counts = [
            ("actors", r.actors, self.limits.max_actors),
            (
                "learner_ranks",
                r.learner_ranks,
                self.limits.max_learner_ranks,
            ),
        ];
        for (field, n, max) in counts {
            let at = format!("spec.resources.{field}");
            if n == 0 {
                self.invalid(at, "must be at least 1");
            } else if n > max {
                self.too_large(at, format!("{n}, more than the limit of {max}"));
            }
        }
        for (field, req) in [("actor", &r.actor), ("learner", &r.learner)] {
            let Some(req) = req else { continue };
            let at = format!("spec.resources.{field}");
            match DeviceKind::try_from(req.device) {
                Err(_) => self.invalid(
                    format!("{at}.device"),
                    format!("unknown device kind {}", req.device),
                ),
                // No member could ever satisfy these; the job would stay
                // PENDING for good.
                Ok(DeviceKind::Cpu) => {
                    if req.device_count != 0 {
                        self.invalid(
                            format!("{at}.device_count"),
                            "must be 0 when device is DEVICE_KIND_CPU",
                        );
                    }
                    if req.device_memory_bytes != 0 {
                        self.invalid(
                            format!("{at}.device_memory_bytes"),
                            "must be 0 when device is DEVICE_KIND_CPU",
                        );
                    }
                }
                Ok(_) => {}
            }
        }
    }

    fn labels(&mut self, labels: &HashMap<String, String>) {
        if labels.len() > self.limits.max_labels {
            self.too_large(
                "spec.labels",
                format!(
                    "{} labels, more than the limit of {}",
                    labels.len(),
                    self.limits.max_labels
                ),
            );
        }
        // Sorted, so the same spec always gets the same report.
        let mut sorted: Vec<_> = labels.iter().collect();
        sorted.sort();
        for (key, value) in sorted {
            let at = format!("spec.labels[{}]", preview(key));
            if key.is_empty() {
                self.invalid(at, "key must not be empty");
            } else if key.len() > MAX_LABEL_BYTES {
                self.too_large(
                    at,
                    format!("key of {} bytes, more than {MAX_LABEL_BYTES}", key.len()),
                );
            } else if value.len() > MAX_LABEL_BYTES {
                self.too_large(
                    at,
                    format!(
                        "value of {} bytes, more than {MAX_LABEL_BYTES}",
                        value.len()
                    ),
                );
            }
        }
    }
}

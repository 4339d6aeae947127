//! Learner checkpoints: everything a restarted learner needs to carry on as
//! if it had never stopped.
//!
//! Where it sits: at the end of a learner step (every
//! `checkpoint_every_steps`, at the end of a stage and when the job stops),
//! rank 0 writes one; a learner starting up resumes from [`latest`].
//!
//! Layout under the job's checkpoint root:
//!
//! ```text
//! <root>/step-<N>/state.json              LearnerCheckpoint (step, stage, queue position, counters, normaliser)
//! <root>/step-<N>/policy.safetensors      the trainable policy's weights, by parameter name
//! <root>/step-<N>/optimizer.safetensors   AdamW's step count and moments
//! ```
//!
//! A checkpoint is written into a hidden temporary directory, every file
//! fsynced, then renamed to `step-<N>` and the root fsynced: a `step-<N>`
//! directory is complete or absent, also across a power cut. Temporary
//! directories left by a crash are never read, and are removed by the next
//! save. The queue position and the counters are saved together with the
//! weights they produced, so a resumed learner neither re-trains on
//! rollouts it had consumed nor loses any.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use encore_policies::AnyTrainable;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::LearnerError;
use crate::collective::{Collective, all_gather};
use crate::normalize::RewardNormalizer;
use crate::optim::{AdamW, named_vars};

/// The learner's own state, in `state.json`.
pub const STATE_FILE: &str = "state.json";
/// The policy weights.
pub const POLICY_FILE: &str = "policy.safetensors";
/// The optimiser state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Checkpoint directories are named `step-<N>`.
pub const STEP_DIR_PREFIX: &str = "step-";

/// The learner state besides the tensors: where in the job and in the
/// rollout queue the learner is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LearnerCheckpoint {
    /// Learner steps completed since the job started, over all stages.
    pub step: u64,
    /// Index of the stage being trained.
    pub stage_index: u32,
    /// Name of the stage being trained.
    pub stage: String,
    /// Job step at which the current stage began (stage stop conditions
    /// count from it).
    #[serde(default)]
    pub stage_start_step: u64,
    /// When training of the job began, in milliseconds since the Unix
    /// epoch: the job's `max_wall_time` counts from it. 0 (a checkpoint
    /// written before it was kept) means unknown: the resumed rank counts
    /// from its own start.
    #[serde(default)]
    pub job_start_unix_ms: u64,
    /// When the current stage began, likewise: the stage's `max_wall_time`
    /// counts from it.
    #[serde(default)]
    pub stage_start_unix_ms: u64,
    /// Latest published policy version.
    pub policy_version: u64,
    /// Running reward statistics, per stage and reward.
    pub normalizer: RewardNormalizer,
    /// Id of the last rollout-queue entry acknowledged as consumed (or
    /// dropped); `None` before the first.
    pub queue_position: Option<String>,
    /// Rollout-queue entries, of every rank, that the checkpointed steps
    /// used and that were not yet acknowledged when the checkpoint was
    /// written (they are acknowledged right after). A rank resumed from this
    /// checkpoint acknowledges them instead of training on them again, which
    /// closes the window between the checkpoint and the acknowledgement.
    #[serde(default)]
    pub trained_unacknowledged: Vec<String>,
    /// Rollouts consumed by learner steps so far.
    pub rollouts_consumed_total: u64,
    /// Rollouts dropped on purpose so far.
    pub rollouts_dropped_total: u64,
    /// Rollouts dropped so far, by reason ("stale", "invalid", ...).
    pub dropped_by_reason: BTreeMap<String, u64>,
}

/// The directory of the checkpoint of `step` under `root`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{STEP_DIR_PREFIX}{step}"))
}

/// Writes `ckpt`, the policy's weights and the optimiser state as
/// `<root>/step-<ckpt.step>` atomically (replacing a checkpoint of the same
/// step), then removes all but the newest `keep` checkpoints (at least
/// one is always kept). Returns the checkpoint's directory.
pub fn save(
    root: &Path,
    ckpt: &LearnerCheckpoint,
    policy: &AnyTrainable,
    optimizer: &AdamW,
    keep: usize,
) -> Result<PathBuf, LearnerError> {
    std::fs::create_dir_all(root).map_err(|e| LearnerError::io(root, e))?;
    remove_stale_temporaries(root);
    let name = format!("{STEP_DIR_PREFIX}{}", ckpt.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| LearnerError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| LearnerError::io(&tmp, e))?;
    if let Err(e) = write_contents(&tmp, ckpt, policy, optimizer) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }

    let dir = root.join(&name);
    if dir.exists() {
        // A directory cannot be renamed over a non-empty one. Moving the old
        // one aside first leaves a short window with neither; `latest` then
        // finds the previous step, which is consistent, merely older.
        let old = root.join(format!(".{name}.old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&dir, &old).map_err(|e| LearnerError::io(&dir, e))?;
        std::fs::rename(&tmp, &dir).map_err(|e| LearnerError::io(&dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dir).map_err(|e| LearnerError::io(&dir, e))?;
    }
    sync_dir(root)?;
    prune(root, keep.max(1));
    Ok(dir)
}

fn write_contents(
    dir: &Path,
    ckpt: &LearnerCheckpoint,
    policy: &AnyTrainable,
    optimizer: &AdamW,
) -> Result<(), LearnerError> {
    let state = dir.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(ckpt).map_err(|e| LearnerError::checkpoint(&state, e))?;
    write_synced(&state, &json)?;

    let weights: HashMap<String, Tensor> = policy.named_tensors().into_iter().collect();
    save_tensors(&dir.join(POLICY_FILE), &weights)?;
    let opt: HashMap<String, Tensor> = optimizer.state_tensors()?.into_iter().collect();
    save_tensors(&dir.join(OPTIMIZER_FILE), &opt)?;
    sync_dir(dir)
}

/// The newest complete checkpoint under `root`, if any. Directories missing
/// one of the three files are skipped with a warning (a complete one is
/// never written that way, but a copy or a manual edit could leave one);
/// a complete one whose `state.json` cannot be read is an error naming the
/// file, not a silent fall-back to an older checkpoint, since resuming from
/// an older queue position would train on rollouts twice.
pub fn latest(root: &Path) -> Result<Option<(PathBuf, LearnerCheckpoint)>, LearnerError> {
    for (_, dir) in step_dirs(root)?.into_iter().rev() {
        let missing: Vec<&str> = [STATE_FILE, POLICY_FILE, OPTIMIZER_FILE]
            .into_iter()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            tracing::warn!(dir = %dir.display(), ?missing, "skipping incomplete learner checkpoint");
            continue;
        }
        let ckpt = read_state(&dir)?;
        return Ok(Some((dir, ckpt)));
    }
    Ok(None)
}

/// Reads `state.json` of the checkpoint in `dir`.
pub fn read_state(dir: &Path) -> Result<LearnerCheckpoint, LearnerError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read(&path).map_err(|e| LearnerError::io(&path, e))?;
    serde_json::from_slice(&text).map_err(|e| LearnerError::checkpoint(&path, e))
}

/// Restores the checkpoint in `dir` into `policy` (its variables are set in
/// place, so frozen copies and optimisers over them see the new values)
/// and `optimizer`, and returns its state. Everything is read and checked
/// before anything is changed: a checkpoint that does not fit (missing or
/// extra parameters, other shapes) is an error naming the file and the
/// tensor, and leaves `policy` and `optimizer` as they were.
pub fn load(
    dir: &Path,
    policy: &AnyTrainable,
    optimizer: &mut AdamW,
) -> Result<LearnerCheckpoint, LearnerError> {
    let ckpt = read_state(dir)?;
    let device = policy.device();

    let policy_path = dir.join(POLICY_FILE);
    let mut weights = load_tensors(&policy_path, device)?;
    let vars = named_vars(&policy.vars);
    let mut assignments = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let t = weights
            .remove(name)
            .ok_or_else(|| LearnerError::checkpoint(&policy_path, format!("{name}: missing")))?;
        if t.shape() != var.shape() {
            return Err(LearnerError::checkpoint(
                &policy_path,
                format!(
                    "{name}: shape {:?}, the policy has {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        assignments.push((var, t.to_dtype(var.dtype())?));
    }
    if let Some(extra) = weights.keys().min() {
        return Err(LearnerError::checkpoint(
            &policy_path,
            format!("{extra}: not a parameter of the policy"),
        ));
    }

    let opt_path = dir.join(OPTIMIZER_FILE);
    let opt_state = load_tensors(&opt_path, device)?;
    optimizer
        .load_state(&opt_state)
        .map_err(|e| LearnerError::checkpoint(&opt_path, e))?;
    for (var, t) in assignments {
        var.set(&t)?;
    }
    Ok(ckpt)
}

/// SHA-256 (hex) of the policy's weights: each parameter by name, in name
/// order, with its shape and its values as little-endian f32. Two ranks
/// with equal hashes hold the same weights.
pub fn weights_sha256(policy: &AnyTrainable) -> Result<String, LearnerError> {
    let mut tensors = policy.named_tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (name, tensor) in tensors {
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((tensor.rank() as u64).to_le_bytes());
        for dim in tensor.dims() {
            hasher.update((*dim as u64).to_le_bytes());
        }
        let values = tensor
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        for value in values {
            hasher.update(value.to_le_bytes());
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Checks that every rank starts (or resumes) at rank 0's step with rank
/// 0's weights (`weights`: [`weights_sha256`]). Each rank finds its
/// checkpoint on its own, and one that found another (a checkpoint
/// directory that is not shared, a copy behind) would train diverged
/// weights with the others' gradients. Every rank learns every rank's
/// values, so all of them refuse together, each with an error naming rank
/// 0's values and the first rank that differs.
pub fn agree_on_start(
    collective: &mut dyn Collective,
    step: u64,
    weights: &str,
) -> Result<(), LearnerError> {
    let mine = format!("{step} {weights}");
    let all = all_gather(collective, mine.as_bytes())?;
    let describe = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        match text.split_once(' ') {
            Some((step, hash)) => format!("step {step} with weights sha256 {hash}"),
            None => format!("{text:?}"),
        }
    };
    let Some((first, others)) = all.split_first() else {
        return Ok(());
    };
    match others.iter().position(|theirs| theirs != first) {
        None => Ok(()),
        Some(i) => Err(LearnerError::StateMismatch(format!(
            "learner ranks start from different states: rank 0 from {}, rank {} from {}; \
             every rank must resume from the same checkpoint (share the checkpoint \
             directory between the ranks)",
            describe(first),
            i + 1,
            describe(&others[i]),
        ))),
    }
}

/// `step-<N>` directories under `root`, sorted by N. A missing root has
/// none.
fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>, LearnerError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LearnerError::io(root, e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LearnerError::io(root, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(STEP_DIR_PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            dirs.push((step, entry.path()));
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Removes all but the newest `keep` checkpoints. Failing to remove one
/// costs disk space, not correctness, so it is logged rather than returned.
fn prune(root: &Path, keep: usize) {
    let dirs = match step_dirs(root) {
        Ok(dirs) => dirs,
        Err(e) => {
            tracing::warn!(error = %e, "listing learner checkpoints for pruning");
            return;
        }
    };
    let excess = dirs.len().saturating_sub(keep);
    for (_, dir) in dirs.into_iter().take(excess) {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "removing old learner checkpoint");
        }
    }
}

/// Removes temporary directories (`.step-*.tmp-*`, `.step-*.old-*`) left by
/// a writer that crashed. One learner writes a root at a time, so none of
/// them belongs to a write in progress.
fn remove_stale_temporaries(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let hidden_step = name.starts_with(&format!(".{STEP_DIR_PREFIX}"));
        if hidden_step
            && (name.contains(".tmp-") || name.contains(".old-"))
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(dir = %entry.path().display(), error = %e, "removing stale checkpoint temporary");
        }
    }
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), LearnerError> {
    candle_core::safetensors::save(tensors, path).map_err(|e| LearnerError::checkpoint(path, e))?;
    // candle writes through a plain File without syncing it.
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| LearnerError::io(path, e))
}

fn load_tensors(
    path: &Path,
    device: &candle_core::Device,
) -> Result<HashMap<String, Tensor>, LearnerError> {
    if !path.is_file() {
        return Err(LearnerError::checkpoint(path, "missing"));
    }
    candle_core::safetensors::load(path, device).map_err(|e| LearnerError::checkpoint(path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), LearnerError> {
    let mut f = File::create(path).map_err(|e| LearnerError::io(path, e))?;
    f.write_all(bytes).map_err(|e| LearnerError::io(path, e))?;
    f.sync_all().map_err(|e| LearnerError::io(path, e))
}

/// Makes a directory's entries (new files, renames) durable.
fn sync_dir(dir: &Path) -> Result<(), LearnerError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| LearnerError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::ParamsAdamW;
    use encore_model::{Preset, TrainablePolicy};

    use super::*;
    use crate::normalize::{BatchStats, Normalization, RewardSpec};
    use crate::optim::unflatten;

    fn state(step: u64) -> LearnerCheckpoint {
        let mut normalizer = RewardNormalizer::new();
        let spec = RewardSpec {
            model: "quality".into(),
            weight: 1.0,
            normalization: Normalization::default(),
        };
        normalizer.update("R", &spec, &BatchStats::from_scores(&[3.1, 4.2, 2.5]));
        normalizer.update("R", &spec, &BatchStats::from_scores(&[3.3, 4.0]));
        LearnerCheckpoint {
            step,
            stage_index: 1,
            stage: "R".into(),
            stage_start_step: step / 3,
            job_start_unix_ms: 1_712_345_678_901,
            stage_start_unix_ms: 1_712_345_679_901 + step,
            policy_version: step / 2,
            normalizer,
            queue_position: Some(format!("1712345678901-{step}")),
            trained_unacknowledged: vec![format!("1712345678901-{step}")],
            rollouts_consumed_total: 64 * step,
            rollouts_dropped_total: 3,
            dropped_by_reason: BTreeMap::from([("stale".into(), 2), ("invalid".into(), 1)]),
        }
    }

    /// A tiny policy and an optimiser that has taken `steps` steps on
    /// synthetic gradients, so the moments are non-trivial.
    fn trained(seed: u64, steps: usize) -> (AnyTrainable, AdamW) {
        let policy: AnyTrainable =
            TrainablePolicy::fresh(&Preset::Tiny.config(), &Device::Cpu, seed)
                .unwrap()
                .into();
        let vars = named_vars(&policy.vars);
        let mut opt = AdamW::new(vars.clone(), ParamsAdamW::default()).unwrap();
        let total: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        for s in 0..steps {
            let flat: Vec<f32> = (0..total)
                .map(|i| ((i * 7 + s * 13) % 17) as f32 / 17.0 - 0.5)
                .collect();
            opt.step_with(&unflatten(&flat, &vars).unwrap()).unwrap();
        }
        (policy, opt)
    }

    /// Exact bit patterns of every tensor (the i64 step counter converts
    /// to f32 exactly).
    fn bits(named: Vec<(String, Tensor)>) -> Vec<(String, Vec<u32>)> {
        named
            .into_iter()
            .map(|(n, t)| {
                let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                (
                    n,
                    v.to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn save_then_load_round_trips_bit_exactly() {
        let root = tempfile::tempdir().unwrap();
        let (policy, opt) = trained(1, 3);
        let dir = save(root.path(), &state(3), &policy, &opt, 3).unwrap();
        assert_eq!(dir, step_dir(root.path(), 3));

        // Different weights and a fresh optimiser, overwritten by the load.
        let (other, mut other_opt) = trained(2, 0);
        assert_ne!(bits(other.named_tensors()), bits(policy.named_tensors()));
        let (found, ckpt) = latest(root.path()).unwrap().unwrap();
        assert_eq!(found, dir);
        assert_eq!(ckpt, state(3));
        let loaded = load(&found, &other, &mut other_opt).unwrap();
        assert_eq!(loaded, state(3));
        assert_eq!(bits(other.named_tensors()), bits(policy.named_tensors()));
        assert_eq!(other_opt.step_count(), 3);
        assert_eq!(
            bits(other_opt.state_tensors().unwrap()),
            bits(opt.state_tensors().unwrap())
        );
    }

    #[test]
    fn temporaries_and_incomplete_directories_are_ignored_and_old_ones_pruned() {
        let root = tempfile::tempdir().unwrap();
        let (policy, opt) = trained(1, 1);
        for step in 1..=4 {
            save(root.path(), &state(step), &policy, &opt, 2).unwrap();
        }
        let mut left: Vec<u64> = step_dirs(root.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        left.sort();
        assert_eq!(left, vec![3, 4]);

        // A crash mid-write of step 9 (a temporary with half a state file)
        // and a step-7 directory without weights.
        let tmp = root.path().join(".step-9.tmp-4242");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join(STATE_FILE), b"{\"step\": 9, \"sta").unwrap();
        let partial = step_dir(root.path(), 7);
        std::fs::create_dir(&partial).unwrap();
        std::fs::write(
            partial.join(STATE_FILE),
            serde_json::to_vec(&state(7)).unwrap(),
        )
        .unwrap();
        let (dir, ckpt) = latest(root.path()).unwrap().unwrap();
        assert_eq!((dir, ckpt.step), (step_dir(root.path(), 4), 4));

        // The next save clears the temporary away; saving a step again
        // replaces it.
        save(root.path(), &state(4), &policy, &opt, 5).unwrap();
        assert!(!tmp.exists());
        assert_eq!(latest(root.path()).unwrap().unwrap().1, state(4));
    }

    #[test]
    fn corrupt_state_is_an_error_naming_the_file() {
        let root = tempfile::tempdir().unwrap();
        let (policy, mut opt) = trained(1, 1);
        let dir = save(root.path(), &state(5), &policy, &opt, 2).unwrap();
        std::fs::write(dir.join(STATE_FILE), b"{ not json").unwrap();
        let err = latest(root.path()).unwrap_err().to_string();
        let file = dir.join(STATE_FILE).display().to_string();
        assert!(err.contains(&file), "{err}");
        let err = load(&dir, &policy, &mut opt).unwrap_err().to_string();
        assert!(err.contains(&file), "{err}");
    }

    #[test]
    fn mismatched_weights_are_rejected_without_changing_anything() {
        let root = tempfile::tempdir().unwrap();
        let (policy, opt) = trained(1, 2);
        let dir = save(root.path(), &state(2), &policy, &opt, 2).unwrap();
        // A policy of another shape: the load must fail naming the file.
        let small = encore_model::PolicyConfig {
            d_model: 32,
            d_ff: 64,
            ..Preset::Tiny.config()
        };
        let other: AnyTrainable = TrainablePolicy::fresh(&small, &Device::Cpu, 3)
            .unwrap()
            .into();
        let mut other_opt = AdamW::new(named_vars(&other.vars), ParamsAdamW::default()).unwrap();
        let before = bits(other.named_tensors());
        let err = load(&dir, &other, &mut other_opt).unwrap_err().to_string();
        assert!(err.contains(POLICY_FILE) && err.contains("shape"), "{err}");
        assert_eq!(bits(other.named_tensors()), before);
        assert_eq!(other_opt.step_count(), 0);
    }

    #[test]
    fn an_empty_or_missing_root_has_no_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        assert!(latest(root.path()).unwrap().is_none());
        assert!(latest(&root.path().join("nope")).unwrap().is_none());
    }
}

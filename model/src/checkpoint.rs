//! Policy checkpoints: a directory holding `config.json` (the
//! [`PolicyConfig`] plus free-form metadata) and `model.safetensors`.
//!
//! Writes are atomic: everything goes to a sibling temporary directory that
//! is renamed over the target only once complete, so a reader (or a restart
//! after a crash) sees either the old checkpoint or the new one, never half.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr_free::normal;
use serde::{Deserialize, Serialize};

use crate::{ModelError, Policy, PolicyConfig};

/// File name of the weights inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";

/// Contents of `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// The policy's shape.
    pub policy: PolicyConfig,
    /// Anything the writer wants to remember (training step, losses, seeds).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// A policy together with the variables that hold its weights, so it can be
/// trained and saved.
pub struct TrainablePolicy {
    /// The model.
    pub policy: Policy,
    /// Its parameters, by safetensors name.
    pub vars: VarMap,
}

impl TrainablePolicy {
    /// A freshly initialised policy; the same `seed` gives the same weights.
    pub fn fresh(cfg: &PolicyConfig, device: &Device, seed: u64) -> Result<Self, ModelError> {
        let vars = VarMap::new();
        let policy = Policy::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, device))?;
        seeded_init(&vars, cfg, seed)?;
        Ok(Self { policy, vars })
    }

    /// Loads a checkpoint directory written by [`TrainablePolicy::save`].
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, CheckpointConfig), ModelError> {
        let config = read_config(dir)?;
        let vars = VarMap::new();
        let policy = Policy::new(
            &config.policy,
            VarBuilder::from_varmap(&vars, DType::F32, device),
        )?;
        let weights = dir.join(WEIGHTS_FILE);
        let mut loaded = vars.clone();
        loaded.load(&weights).map_err(|e| ModelError::Checkpoint {
            path: weights.clone(),
            reason: e.to_string(),
        })?;
        Ok((Self { policy, vars }, config))
    }

    /// Writes `config.json` and `model.safetensors` into `dir` atomically.
    pub fn save(&self, dir: &Path, metadata: serde_json::Value) -> Result<(), ModelError> {
        let config = CheckpointConfig {
            policy: self.policy.config().clone(),
            metadata,
        };
        write_atomically(dir, |tmp| {
            let json = serde_json::to_vec_pretty(&config).map_err(|e| ModelError::Checkpoint {
                path: tmp.join(CONFIG_FILE),
                reason: e.to_string(),
            })?;
            std::fs::write(tmp.join(CONFIG_FILE), json)
                .map_err(|e| io(tmp.join(CONFIG_FILE), e))?;
            self.vars
                .save(tmp.join(WEIGHTS_FILE))
                .map_err(|e| ModelError::Checkpoint {
                    path: tmp.join(WEIGHTS_FILE),
                    reason: e.to_string(),
                })
        })
    }

    /// A copy of the policy over detached weights: candle records no
    /// backward graph for it, which makes decoding cheaper. Use it for
    /// sampling and for the frozen reference policy; it shares no storage
    /// with `self`, so later training steps do not change it.
    pub fn frozen(&self) -> Result<Policy, ModelError> {
        let tensors = self
            .named_tensors()
            .into_iter()
            .map(|(name, t)| Ok((name, t.detach().copy()?)))
            .collect::<Result<HashMap<_, _>, ModelError>>()?;
        let device = self.policy.device().clone();
        Policy::new(
            self.policy.config(),
            VarBuilder::from_tensors(tensors, DType::F32, &device),
        )
    }

    /// Every parameter by name, in name order (for comparisons and hashing).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        named_tensors(&self.vars)
    }
}

/// Every variable of `vars` by name, in name order.
pub fn named_tensors(vars: &VarMap) -> Vec<(String, Tensor)> {
    let data = vars.data().lock().expect("var map lock poisoned");
    let mut named: Vec<_> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Loads a checkpoint for inference only (sampling, evaluation, the frozen
/// reference): no variables, no backward graph.
pub fn load_frozen(dir: &Path, device: &Device) -> Result<(Policy, CheckpointConfig), ModelError> {
    let config = read_config(dir)?;
    let weights = dir.join(WEIGHTS_FILE);
    let tensors =
        candle_core::safetensors::load(&weights, device).map_err(|e| ModelError::Checkpoint {
            path: weights.clone(),
            reason: e.to_string(),
        })?;
    let policy = Policy::new(
        &config.policy,
        VarBuilder::from_tensors(tensors, DType::F32, device),
    )
    .map_err(|e| match e {
        ModelError::Tensor(e) => ModelError::Checkpoint {
            path: weights.clone(),
            reason: e.to_string(),
        },
        other => other,
    })?;
    Ok((policy, config))
}

/// Loads published weights for inference: a safetensors file and the
/// policy configuration as JSON text (a [`PolicyConfig`], as
/// `WeightManifest.model_config_json` carries it). Errors name the file or
/// the configuration.
pub fn load_frozen_file(
    config_json: &str,
    weights: &Path,
    device: &Device,
) -> Result<Policy, ModelError> {
    let config: PolicyConfig =
        serde_json::from_str(config_json).map_err(|e| ModelError::Checkpoint {
            path: weights.to_owned(),
            reason: format!("model_config_json: {e}"),
        })?;
    config.validate()?;
    let tensors =
        candle_core::safetensors::load(weights, device).map_err(|e| ModelError::Checkpoint {
            path: weights.to_owned(),
            reason: e.to_string(),
        })?;
    Policy::new(
        &config,
        VarBuilder::from_tensors(tensors, DType::F32, device),
    )
    .map_err(|e| match e {
        ModelError::Tensor(e) => ModelError::Checkpoint {
            path: weights.to_owned(),
            reason: e.to_string(),
        },
        other => other,
    })
}

/// Reads and validates `config.json` from a checkpoint directory.
pub fn read_config(dir: &Path) -> Result<CheckpointConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| io(path.clone(), e))?;
    let config: CheckpointConfig =
        serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    config.policy.validate()?;
    Ok(config)
}

/// Runs `write` on a fresh temporary directory next to `dir`, then swaps it
/// into place. The previous contents of `dir`, if any, are removed only after
/// the new ones are complete.
pub fn write_atomically(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| io(parent.clone(), e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(tmp.clone(), e))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // A directory cannot be renamed over a non-empty one, so the old one is
    // moved aside first; both renames are atomic on one filesystem.
    let had_old = dir.exists();
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| io(dir.to_path_buf(), e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io(dir.to_path_buf(), e))?;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

fn io(path: PathBuf, e: std::io::Error) -> ModelError {
    ModelError::Io { path, source: e }
}

/// GPT-2 style initialisation from a seeded stream (candle's CPU generator
/// cannot be seeded): embeddings and projections ~ N(0, 0.02), residual
/// output projections scaled by 1/sqrt(2 * layers), biases zero, layer norms
/// one and zero.
fn seeded_init(vars: &VarMap, cfg: &PolicyConfig, seed: u64) -> Result<(), ModelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = vars.data().lock().expect("var map lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let residual_scale = 1.0 / (2.0 * cfg.n_layers as f32).sqrt();
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let is_norm = name.contains("ln");
        let values: Vec<f32> = if is_norm && name.ends_with("weight") {
            vec![1.0; n]
        } else if name.ends_with("bias") {
            vec![0.0; n]
        } else {
            let std = if name.ends_with("out.weight") || name.ends_with("mlp_out.weight") {
                0.02 * residual_scale
            } else {
                0.02
            };
            (0..n).map(|_| normal(&mut rng) * std).collect()
        };
        var.set(&Tensor::from_vec(values, shape, var.device())?)?;
    }
    Ok(())
}

/// A standard normal draw by Box-Muller, so initialisation depends on nothing
/// but the seed.
mod rand_distr_free {
    use super::Rng;

    pub fn normal(rng: &mut impl Rng) -> f32 {
        let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
        let u2: f32 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

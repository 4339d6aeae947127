//! The three reward models behind one type, [`RewardModel`], and their
//! checkpoints (a directory with `config.json` and `model.safetensors`).
//!
//! - prompt adherence: a dual encoder; the score is the cosine similarity of
//!   the audio and caption embeddings (MuLan's role in MusicRL);
//! - quality: a regressor of the 1-5 mean opinion score from audio alone;
//! - user preference: a Bradley-Terry scorer of one clip for its caption; the
//!   difference of two clips' scores is the log-odds that a listener prefers
//!   the first.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use encore_corpus::{TEXT_DIM, TextEncoder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::RewardError;
use crate::frontend::{Clip, Features, Frontend, FrontendConfig};
use crate::nn::{ArchConfig, AudioTower, Head, TextTower, l2_normalize};

/// File name of the weights inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// Clips per network pass in [`RewardModel::score`] on the CPU.
pub const NET_CHUNK: usize = 8;
/// Codec the models listen through, as `InputConstraints.codec` names it.
pub const CODEC_ID: &str = "encore-codec-v1";

/// What a reward model judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// Agreement of the audio with the caption.
    Adherence,
    /// Audio quality, as a 1-5 rating.
    Quality,
    /// User preference, as a Bradley-Terry logit.
    Preference,
}

impl RewardKind {
    /// Every kind, in the order the paper lists them.
    pub const ALL: [RewardKind; 3] = [
        RewardKind::Adherence,
        RewardKind::Quality,
        RewardKind::Preference,
    ];

    /// The name used on the command line and as a default model name.
    pub fn name(self) -> &'static str {
        match self {
            RewardKind::Adherence => "adherence",
            RewardKind::Quality => "quality",
            RewardKind::Preference => "preference",
        }
    }

    /// Whether the score depends on the caption.
    pub fn uses_caption(self) -> bool {
        !matches!(self, RewardKind::Quality)
    }

    /// Range of the raw score, `(min, max)`, `None` where unbounded.
    pub fn range(self) -> (Option<f64>, Option<f64>) {
        match self {
            RewardKind::Adherence => (Some(-1.0), Some(1.0)),
            RewardKind::Quality => (Some(1.0), Some(5.0)),
            RewardKind::Preference => (None, None),
        }
    }

    /// What a raw score means.
    pub fn meaning(self) -> &'static str {
        match self {
            RewardKind::Adherence => {
                "cosine similarity of audio and caption embeddings, in [-1, 1]"
            }
            RewardKind::Quality => "predicted mean opinion score, 1 to 5",
            RewardKind::Preference => {
                "Bradley-Terry logit; the difference of two scores is the log-odds of preferring the first"
            }
        }
    }
}

impl std::str::FromStr for RewardKind {
    type Err = RewardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RewardKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                RewardError::Config(format!(
                    "reward kind: expected adherence, quality or preference, got {s:?}"
                ))
            })
    }
}

impl std::fmt::Display for RewardKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Contents of a reward checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardConfig {
    /// What the model judges.
    pub kind: RewardKind,
    /// Shape of the network.
    pub arch: ArchConfig,
    /// Features the network was trained on.
    pub frontend: FrontendConfig,
    /// Fewest tokens per clip the model judges.
    pub min_tokens: usize,
    /// Most tokens per clip.
    pub max_tokens: usize,
    /// Human-readable version label.
    pub version: String,
    /// What the model was trained on and how well it does.
    pub description: String,
    /// Training figures and settings, free-form.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

impl RewardConfig {
    /// A config with default shape for `kind`: clips of 1 s (25 tokens) to
    /// 30 s.
    pub fn new(kind: RewardKind) -> Self {
        Self {
            kind,
            arch: ArchConfig::default(),
            frontend: FrontendConfig::default(),
            min_tokens: 25,
            max_tokens: 750,
            version: "untrained".into(),
            description: format!("{kind} reward model"),
            metadata: serde_json::Value::Null,
        }
    }

    /// Checks the values that a hand-edited config could get wrong.
    pub fn validate(&self) -> Result<(), RewardError> {
        let bad = |key: &str, why: &str| Err(RewardError::Config(format!("{key}: {why}")));
        if self.arch.channels == 0 || self.arch.embed_dim == 0 || self.arch.hidden == 0 {
            return bad("arch", "channels, embed_dim and hidden must be positive");
        }
        if self.arch.stride == 0 {
            return bad("arch.stride", "must be at least 1");
        }
        if self.arch.kernel.is_multiple_of(2) {
            return bad("arch.kernel", "must be odd");
        }
        if self.min_tokens == 0 || self.min_tokens > self.max_tokens {
            return bad("min_tokens", "must be at least 1 and at most max_tokens");
        }
        Ok(())
    }
}

/// One clip to score.
#[derive(Debug, Clone, Copy)]
pub struct ScoreInput<'a> {
    /// The prompt caption.
    pub caption: &'a str,
    /// The music: tokens of the embedded codec, or a 16 kHz waveform.
    pub clip: Clip<'a>,
}

impl<'a> ScoreInput<'a> {
    /// Tokens of the embedded codec for `caption`.
    pub fn tokens(caption: &'a str, tokens: &'a [u32]) -> Self {
        Self {
            caption,
            clip: Clip::Tokens(tokens),
        }
    }

    /// A 16 kHz mono waveform for `caption` (see [`Clip::Audio`]).
    pub fn audio(caption: &'a str, samples: &'a [f32]) -> Self {
        Self {
            caption,
            clip: Clip::Audio(samples),
        }
    }
}

/// The trainable parts of a model, by kind.
enum Net {
    Adherence {
        audio: AudioTower,
        text: TextTower,
        logit_scale: Tensor,
    },
    Quality {
        audio: AudioTower,
        head: Head,
    },
    Preference {
        audio: AudioTower,
        text: TextTower,
        head: Head,
    },
}

/// A reward model with its weights, ready to score or to train.
pub struct RewardModel {
    config: RewardConfig,
    frontend: Frontend,
    net: Net,
    vars: VarMap,
    device: Device,
    text_encoder: TextEncoder,
    sha256: String,
}

impl RewardModel {
    /// A freshly initialised model; the same seed gives the same weights.
    pub fn fresh(config: RewardConfig, device: &Device, seed: u64) -> Result<Self, RewardError> {
        config.validate()?;
        let vars = VarMap::new();
        let net = build(&config, VarBuilder::from_varmap(&vars, DType::F32, device))?;
        // candle's initialisers draw from an unseeded generator; re-draw
        // every weight matrix from our own.
        reseed(&vars, seed)?;
        Ok(Self {
            frontend: Frontend::new(config.frontend.clone())?,
            config,
            net,
            vars,
            device: device.clone(),
            text_encoder: TextEncoder::new(),
            sha256: String::new(),
        })
    }

    /// Loads a checkpoint directory written by [`RewardModel::save`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self, RewardError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| RewardError::Io {
            path: config_path.clone(),
            source: e,
        })?;
        let config: RewardConfig =
            serde_json::from_str(&text).map_err(|e| RewardError::Checkpoint {
                path: config_path.clone(),
                reason: e.to_string(),
            })?;
        config.validate()?;
        let vars = VarMap::new();
        let net = build(&config, VarBuilder::from_varmap(&vars, DType::F32, device))?;
        let weights = dir.join(WEIGHTS_FILE);
        let mut loaded = vars.clone();
        loaded.load(&weights).map_err(|e| RewardError::Checkpoint {
            path: weights.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            frontend: Frontend::new(config.frontend.clone())?,
            sha256: file_sha256(&weights)?,
            config,
            net,
            vars,
            device: device.clone(),
            text_encoder: TextEncoder::new(),
        })
    }

    /// Writes the checkpoint into `dir` atomically (a reader sees the old
    /// checkpoint or the new one, never half of one).
    pub fn save(&mut self, dir: &Path) -> Result<(), RewardError> {
        let json =
            serde_json::to_vec_pretty(&self.config).map_err(|e| RewardError::Checkpoint {
                path: dir.join(CONFIG_FILE),
                reason: e.to_string(),
            })?;
        encore_model::write_atomically(dir, |tmp| {
            std::fs::write(tmp.join(CONFIG_FILE), &json).map_err(|e| {
                encore_model::ModelError::Checkpoint {
                    path: tmp.join(CONFIG_FILE),
                    reason: e.to_string(),
                }
            })?;
            self.vars.save(tmp.join(WEIGHTS_FILE)).map_err(|e| {
                encore_model::ModelError::Checkpoint {
                    path: tmp.join(WEIGHTS_FILE),
                    reason: e.to_string(),
                }
            })
        })
        .map_err(|e| RewardError::Checkpoint {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        self.sha256 = file_sha256(&dir.join(WEIGHTS_FILE))?;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &RewardConfig {
        &self.config
    }

    /// Mutable configuration (training records its figures here).
    pub fn config_mut(&mut self) -> &mut RewardConfig {
        &mut self.config
    }

    /// What the model judges.
    pub fn kind(&self) -> RewardKind {
        self.config.kind
    }

    /// sha256 of the weights file it was loaded from or last saved to, 64
    /// hex characters; empty for a model never saved.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The audio front end.
    pub fn frontend(&self) -> &Frontend {
        &self.frontend
    }

    /// Replaces the front-end normalisation (before training).
    pub fn set_frontend(&mut self, cfg: FrontendConfig) -> Result<(), RewardError> {
        self.frontend = Frontend::new(cfg.clone())?;
        self.config.frontend = cfg;
        Ok(())
    }

    /// Copies the audio tower's weights and the front-end statistics of
    /// `source`, a model of the same tower shape (any kind).
    pub fn adopt_audio_tower(&mut self, source: &RewardModel) -> Result<(), RewardError> {
        if source.config.arch != self.config.arch {
            return Err(RewardError::Config(format!(
                "reward_train.init_audio: the source's arch {:?} differs from this model's {:?}",
                source.config.arch, self.config.arch
            )));
        }
        let from = source.vars.data().lock().map_err(|_| poisoned())?;
        let to = self.vars.data().lock().map_err(|_| poisoned())?;
        for (name, var) in to.iter().filter(|(n, _)| n.starts_with("audio.")) {
            let src = from.get(name).ok_or_else(|| {
                RewardError::Config(format!("reward_train.init_audio: the source has no {name}"))
            })?;
            var.set(src.as_tensor())?;
        }
        drop((from, to));
        self.set_frontend(source.config.frontend.clone())
    }

    /// The trainable variables.
    pub fn vars(&self) -> &VarMap {
        &self.vars
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.vars.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Scores clips: one finite score per input, in order.
    ///
    /// The front end runs over the whole batch in parallel; on the CPU the
    /// network then runs [`NET_CHUNK`] clips at a time, which keeps its
    /// activations in the caches (a 64-clip pass costs more per clip than
    /// eight 8-clip ones); on a GPU it runs the whole batch at once.
    pub fn score(&self, items: &[ScoreInput<'_>]) -> Result<Vec<f32>, RewardError> {
        let clips: Vec<Clip<'_>> = items.iter().map(|i| i.clip).collect();
        let rows = self.frontend.clips(&clips)?;
        // An accelerator wants the whole batch in one pass.
        let per_pass = if self.device.is_cpu() {
            NET_CHUNK
        } else {
            items.len().max(1)
        };
        let mut scores = Vec::with_capacity(items.len());
        for (chunk, rows) in items.chunks(per_pass).zip(rows.chunks(per_pass)) {
            let rows: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            let features = Features::stack(&rows, self.frontend.width());
            let captions: Vec<&str> = chunk.iter().map(|i| i.caption).collect();
            let chunk_scores: Vec<f32> = self.score_features(&features, &captions)?.to_vec1()?;
            scores.extend(chunk_scores);
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(RewardError::NonFinite { index: i });
        }
        Ok(scores)
    }

    /// Caption features, `[b, TEXT_DIM]`.
    pub(crate) fn caption_tensor(&self, captions: &[&str]) -> Result<Tensor, RewardError> {
        let data = self.text_encoder.embed_batch(captions);
        Ok(Tensor::from_vec(
            data,
            (captions.len(), TEXT_DIM),
            &self.device,
        )?)
    }

    /// Scores of precomputed features (one caption per clip), `[b]`,
    /// differentiable: the training objectives are built on it.
    pub fn score_features(
        &self,
        features: &Features,
        captions: &[&str],
    ) -> Result<Tensor, RewardError> {
        let (x, mask) = features.tensors(&self.device, self.config.arch.stride)?;
        Ok(match &self.net {
            Net::Adherence { audio, text, .. } => {
                let a = l2_normalize(&audio.forward(&x, &mask)?)?;
                let t = l2_normalize(&text.forward(&self.caption_tensor(captions)?)?)?;
                (a * t)?.sum(1)?
            }
            Net::Quality { audio, head } => {
                let logit = head.forward(&audio.forward(&x, &mask)?)?;
                ((candle_nn::ops::sigmoid(&logit)? * 4.0)? + 1.0)?
            }
            Net::Preference { audio, text, head } => {
                let a = audio.forward(&x, &mask)?;
                let t = text.forward(&self.caption_tensor(captions)?)?;
                let joint = Tensor::cat(&[&a, &t, &(&a * &t)?], 1)?;
                head.forward(&joint)?
            }
        })
    }

    /// Unit audio and caption embeddings and the contrastive logit scale, for
    /// training the adherence model.
    pub fn contrastive(
        &self,
        features: &Features,
        captions: &[&str],
    ) -> Result<(Tensor, Tensor, Tensor), RewardError> {
        let Net::Adherence {
            audio,
            text,
            logit_scale,
        } = &self.net
        else {
            return Err(RewardError::Config(format!(
                "contrastive training needs an adherence model, this is {}",
                self.kind()
            )));
        };
        let (x, mask) = features.tensors(&self.device, self.config.arch.stride)?;
        let a = l2_normalize(&audio.forward(&x, &mask)?)?;
        let t = l2_normalize(&text.forward(&self.caption_tensor(captions)?)?)?;
        // CLIP's cap: a scale above 100 only sharpens noise.
        let scale = logit_scale.clamp(0.0, 100f64.ln())?.exp()?;
        Ok((a, t, scale))
    }
}

fn build(config: &RewardConfig, vb: VarBuilder) -> Result<Net, RewardError> {
    let arch = &config.arch;
    let width = 2 * config.frontend.n_mels;
    let audio = AudioTower::new(arch, width, vb.pp("audio"))?;
    Ok(match config.kind {
        RewardKind::Adherence => Net::Adherence {
            audio,
            text: TextTower::new(arch, TEXT_DIM, vb.pp("text"))?,
            logit_scale: vb.get_with_hints(
                (),
                "logit_scale",
                candle_nn::Init::Const((1.0f64 / 0.07).ln()),
            )?,
        },
        RewardKind::Quality => Net::Quality {
            audio,
            head: Head::new(arch.embed_dim, arch.hidden, vb.pp("head"))?,
        },
        RewardKind::Preference => Net::Preference {
            audio,
            text: TextTower::new(arch, TEXT_DIM, vb.pp("text"))?,
            head: Head::new(3 * arch.embed_dim, arch.hidden, vb.pp("head"))?,
        },
    })
}

/// Re-initialises every weight matrix from a seeded generator with the same
/// scale candle's default initialiser uses (uniform, bound 1/sqrt(fan_in)),
/// so a seed fully determines a fresh model.
fn reseed(vars: &VarMap, seed: u64) -> Result<(), RewardError> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let data = vars.data().lock().map_err(|_| poisoned())?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        // Linear weights are drawn; biases start at zero; gains and scales
        // keep their constant initial values.
        if name.ends_with(".bias") {
            var.set(&var.zeros_like()?)?;
            continue;
        }
        if !name.ends_with(".weight") || var.rank() != 2 {
            continue;
        }
        let (_, fan_in) = var.dims2()?;
        let bound = 1.0 / (fan_in as f32).sqrt();
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    }
    Ok(())
}

fn poisoned() -> RewardError {
    RewardError::Config("the variable map's lock was poisoned by a panic".into())
}

fn file_sha256(path: &Path) -> Result<String, RewardError> {
    let bytes = std::fs::read(path).map_err(|e| RewardError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use encore_corpus::{Corpus, Split};

    fn tiny(kind: RewardKind) -> RewardConfig {
        let mut cfg = RewardConfig::new(kind);
        cfg.arch = ArchConfig::tiny();
        cfg.min_tokens = 1;
        cfg
    }

    #[test]
    fn every_kind_scores_within_its_range_and_alone_as_in_a_batch() {
        let corpus = Corpus::new(2, 40);
        let a = corpus.example(Split::Train, 0);
        let b = Corpus::new(2, 60).example(Split::Train, 1);
        for kind in RewardKind::ALL {
            let model = RewardModel::fresh(tiny(kind), &Device::Cpu, 7).unwrap();
            let items = [
                ScoreInput::tokens(&a.caption, &a.tokens),
                ScoreInput::tokens(&b.caption, &b.tokens),
            ];
            let both = model.score(&items).unwrap();
            let alone = model.score(&items[..1]).unwrap();
            assert!(
                (both[0] - alone[0]).abs() < 1e-5,
                "{kind}: {both:?} vs {alone:?}"
            );
            let (lo, hi) = kind.range();
            for s in both {
                assert!(s >= lo.unwrap_or(f64::MIN) as f32 && s <= hi.unwrap_or(f64::MAX) as f32);
            }
        }
    }

    #[test]
    fn the_seed_fixes_the_weights_and_a_checkpoint_round_trips() {
        let ex = Corpus::new(2, 40).example(Split::Train, 3);
        let items = [ScoreInput::tokens(&ex.caption, &ex.tokens)];
        let mut m1 = RewardModel::fresh(tiny(RewardKind::Preference), &Device::Cpu, 11).unwrap();
        let m2 = RewardModel::fresh(tiny(RewardKind::Preference), &Device::Cpu, 11).unwrap();
        let m3 = RewardModel::fresh(tiny(RewardKind::Preference), &Device::Cpu, 12).unwrap();
        let s1 = m1.score(&items).unwrap();
        assert_eq!(s1, m2.score(&items).unwrap());
        assert_ne!(s1, m3.score(&items).unwrap());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pref");
        m1.save(&path).unwrap();
        assert_eq!(m1.sha256().len(), 64);
        let loaded = RewardModel::load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.sha256(), m1.sha256());
        assert_eq!(loaded.config(), m1.config());
        assert_eq!(loaded.score(&items).unwrap(), s1);
    }

    #[test]
    fn a_preference_model_can_start_from_a_quality_models_audio_tower() {
        let source = RewardModel::fresh(tiny(RewardKind::Quality), &Device::Cpu, 1).unwrap();
        let mut target = RewardModel::fresh(tiny(RewardKind::Preference), &Device::Cpu, 2).unwrap();
        let weight = |m: &RewardModel, name: &str| -> Vec<f32> {
            let data = m.vars().data().lock().unwrap();
            data[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_ne!(
            weight(&source, "audio.stem.weight"),
            weight(&target, "audio.stem.weight")
        );
        let head_before = weight(&target, "head.out.weight");
        target.adopt_audio_tower(&source).unwrap();
        assert_eq!(
            weight(&source, "audio.stem.weight"),
            weight(&target, "audio.stem.weight")
        );
        assert_eq!(
            weight(&source, "audio.proj.weight"),
            weight(&target, "audio.proj.weight")
        );
        // Only the audio tower moves; the head keeps its own weights.
        assert_eq!(head_before, weight(&target, "head.out.weight"));

        let mut wider = tiny(RewardKind::Preference);
        wider.arch.channels = 24;
        let mut other = RewardModel::fresh(wider, &Device::Cpu, 3).unwrap();
        let err = other.adopt_audio_tower(&source).err().unwrap();
        assert!(err.to_string().contains("init_audio"), "{err}");
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_that_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), b"{not json").unwrap();
        let err = RewardModel::load(dir.path(), &Device::Cpu).err().unwrap();
        assert!(err.to_string().contains(CONFIG_FILE), "{err}");
    }
}

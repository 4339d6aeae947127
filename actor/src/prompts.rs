//! The prompts an actor samples for: the job's prompt set (inline, or a
//! JSON Lines dataset file in proto3 JSON form) and this actor's shard of it.
//!
//! Every actor of a job shuffles the whole set with the same seed, once per
//! epoch, and takes the positions congruent to its shard index modulo the
//! shard count (`PromptShard`), so the shards of one epoch are disjoint and
//! together cover the set; each epoch reshuffles with a seed derived from
//! the job's seed and the epoch number.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use encore_proto::v1::{Prompt, PromptShard, prompt_source};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::error::{Error, Result};

/// One line of a dataset file (proto3 JSON of `Prompt`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(default, rename = "promptId", alias = "prompt_id")]
    prompt_id: Option<String>,
    #[serde(default)]
    caption: Option<String>,
    #[serde(default)]
    attributes: Option<HashMap<String, String>>,
}

/// Reads a prompt dataset: one `Prompt` per line in proto3 JSON; blank
/// lines are skipped. The coordinator validated the file at Submit; this
/// still refuses a file that changed into something else since.
pub fn read_dataset(path: &Path) -> Result<Vec<Prompt>> {
    let fail = |message: String| Error::Prompts {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line =
            serde_json::from_str(line).map_err(|e| fail(format!("line {}: {e}", i + 1)))?;
        let prompt = Prompt {
            prompt_id: parsed.prompt_id.unwrap_or_default(),
            caption: parsed.caption.unwrap_or_default(),
            attributes: parsed.attributes.unwrap_or_default(),
        };
        if prompt.prompt_id.is_empty() || prompt.caption.is_empty() {
            return Err(fail(format!(
                "line {}: promptId and caption are required",
                i + 1
            )));
        }
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        return Err(fail("the file holds no prompts".into()));
    }
    Ok(prompts)
}

/// An endless, deterministic stream of this actor's prompts.
#[derive(Debug, Clone)]
pub struct ShardedPrompts {
    prompts: Vec<Prompt>,
    index: u32,
    count: u32,
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
    next: usize,
}

impl ShardedPrompts {
    /// The shard `shard` describes; reads the dataset file if it names one.
    pub fn new(shard: &PromptShard) -> Result<Self> {
        let prompts = match shard.source.as_ref().and_then(|s| s.source.as_ref()) {
            Some(prompt_source::Source::Inline(list)) => list.prompts.clone(),
            Some(prompt_source::Source::DatasetPath(uri)) => {
                let path = PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri));
                read_dataset(&path)?
            }
            None => {
                return Err(Error::Prompts {
                    path: PathBuf::new(),
                    message: "the assignment names no prompt source".into(),
                });
            }
        };
        Self::from_prompts(prompts, shard.shard_index, shard.shard_count, shard.seed)
    }

    /// Shard `index` of `count` of `prompts`, shuffled with `seed`.
    pub fn from_prompts(prompts: Vec<Prompt>, index: u32, count: u32, seed: u64) -> Result<Self> {
        if prompts.is_empty() || count == 0 || index >= count {
            return Err(Error::Prompts {
                path: PathBuf::new(),
                message: format!(
                    "shard {index} of {count} of {} prompts is not a shard",
                    prompts.len()
                ),
            });
        }
        let mut shard = Self {
            prompts,
            index,
            count,
            seed,
            epoch: 0,
            order: Vec::new(),
            next: 0,
        };
        shard.reshuffle();
        Ok(shard)
    }

    /// The next `n` prompts of the shard.
    pub fn take(&mut self, n: usize) -> Vec<Prompt> {
        (0..n).map(|_| self.next_prompt()).collect()
    }

    fn next_prompt(&mut self) -> Prompt {
        if self.next >= self.order.len() {
            self.epoch += 1;
            self.reshuffle();
        }
        let prompt = self.prompts[self.order[self.next]].clone();
        self.next += 1;
        prompt
    }

    /// This epoch's positions of the shard. With more shards than prompts a
    /// shard may be empty for an epoch; it then takes the prompt its index
    /// falls on modulo the set size, so an actor always has work.
    fn reshuffle(&mut self) {
        let mut all: Vec<usize> = (0..self.prompts.len()).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        all.shuffle(&mut rng);
        self.order = all
            .iter()
            .enumerate()
            .filter(|(position, _)| *position as u32 % self.count == self.index)
            .map(|(_, &i)| i)
            .collect();
        if self.order.is_empty() {
            self.order = vec![all[self.index as usize % all.len()]];
        }
        self.next = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts(n: usize) -> Vec<Prompt> {
        (0..n)
            .map(|i| Prompt {
                prompt_id: format!("p{i}"),
                caption: format!("caption {i}"),
                ..Prompt::default()
            })
            .collect()
    }

    #[test]
    fn shards_of_an_epoch_are_disjoint_and_cover_the_set() {
        let mut seen = Vec::new();
        for index in 0..3 {
            let mut shard = ShardedPrompts::from_prompts(prompts(10), index, 3, 7).unwrap();
            let n = shard.order.len();
            seen.extend(shard.take(n).into_iter().map(|p| p.prompt_id));
        }
        seen.sort();
        let mut all: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
        all.sort();
        assert_eq!(seen, all);
    }

    #[test]
    fn the_stream_is_deterministic_and_endless() {
        let mut a = ShardedPrompts::from_prompts(prompts(5), 1, 2, 3).unwrap();
        let mut b = ShardedPrompts::from_prompts(prompts(5), 1, 2, 3).unwrap();
        assert_eq!(a.take(20), b.take(20));
        let mut lonely = ShardedPrompts::from_prompts(prompts(1), 2, 4, 3).unwrap();
        assert_eq!(lonely.take(3).len(), 3);
    }

    #[test]
    fn datasets_are_read_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.jsonl");
        std::fs::write(
            &path,
            "{\"promptId\": \"a\", \"caption\": \"calm piano\"}\n\n{\"prompt_id\": \"b\", \"caption\": \"fast drums\", \"attributes\": {\"tempo\": \"fast\"}}\n",
        )
        .unwrap();
        let read = read_dataset(&path).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].attributes["tempo"], "fast");
        std::fs::write(&path, "{\"promptId\": \"a\", \"captoin\": \"x\"}\n").unwrap();
        let err = read_dataset(&path).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("captoin"), "{err}");
    }
}

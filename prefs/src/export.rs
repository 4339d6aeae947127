//! Stored comparisons as the preference dataset that `encore reward train
//! preference` reads: one `encore_raters::PreferenceRecord` per line
//! (JSONL, `docs/datasets.md`), with filters on time, policy version and
//! rater agreement.

use std::collections::HashMap;
use std::io::Write;

use encore_proto::v1::{Choice, Clip, StoredComparison};
use encore_raters::records::{Choice as RecordChoice, PairClip, PreferenceRecord};
use encore_store::Store;
use prost::Message;

use crate::Error;

/// Which comparisons to export.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only those stored at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Only those stored before this time (ms since the epoch).
    pub until_ms: Option<i64>,
    /// Only pairs with a clip of this policy version (`version` or
    /// `policy@version`).
    pub policy_version: Option<String>,
    /// Only pairs whose raters agree at least this much: the share of a
    /// pair's answers that are its most common answer (a pair answered once
    /// agrees fully). 0 keeps everything.
    pub min_agreement: f64,
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exported {
    /// Comparisons read from the store.
    pub read: usize,
    /// Records written.
    pub written: usize,
}

/// The version label of a clip: `policy@version`.
fn version_label(clip: &Clip) -> String {
    format!("{}@{}", clip.policy, clip.policy_version)
}

/// A stored comparison as a dataset record. The pair id is the two clip
/// ids in order, so that several raters' answers on one pair share it.
pub fn to_record(c: &StoredComparison) -> PreferenceRecord {
    let (a, b) = (
        c.a.clone().unwrap_or_default(),
        c.b.clone().unwrap_or_default(),
    );
    let mut ids = [a.clip_id.as_str(), b.clip_id.as_str()];
    ids.sort_unstable();
    PreferenceRecord {
        pair_id: ids.join("+"),
        caption: c.prompt.clone(),
        a: PairClip {
            tokens: a.tokens.clone(),
            policy_version: Some(version_label(&a)),
        },
        b: PairClip {
            tokens: b.tokens.clone(),
            policy_version: Some(version_label(&b)),
        },
        choice: match Choice::try_from(c.choice).unwrap_or(Choice::Unspecified) {
            Choice::A => RecordChoice::A,
            Choice::B => RecordChoice::B,
            Choice::Neither => RecordChoice::Tie,
            Choice::Unspecified => RecordChoice::Skip,
        },
        rater: c.rater_id.clone(),
        // Collected pairs do not measure listening time.
        time_ms: 0,
        truth: None,
    }
}

/// The answer of `record` as seen from its pair's sorted clip order, so
/// that "A" from one rater and "B" from another who heard the clips the
/// other way round count as the same answer.
fn canonical_answer(c: &StoredComparison) -> &'static str {
    let a = c.a.as_ref().map_or("", |x| x.clip_id.as_str());
    let b = c.b.as_ref().map_or("", |x| x.clip_id.as_str());
    let flipped = a > b;
    match (
        Choice::try_from(c.choice).unwrap_or(Choice::Unspecified),
        flipped,
    ) {
        (Choice::A, false) | (Choice::B, true) => "first",
        (Choice::B, false) | (Choice::A, true) => "second",
        (Choice::Neither, _) => "tie",
        (Choice::Unspecified, _) => "none",
    }
}

fn keep_by_fields(c: &StoredComparison, filter: &Filter) -> bool {
    let ms = c
        .time
        .as_ref()
        .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
    if filter.since_ms.is_some_and(|since| ms < since) {
        return false;
    }
    if filter.until_ms.is_some_and(|until| ms >= until) {
        return false;
    }
    if let Some(wanted) = &filter.policy_version {
        let matches = |clip: &Option<Clip>| {
            clip.as_ref().is_some_and(|clip| {
                version_label(clip) == *wanted || clip.policy_version.to_string() == *wanted
            })
        };
        if !matches(&c.a) && !matches(&c.b) {
            return false;
        }
    }
    true
}

/// Reads every stored comparison, keeps those `filter` admits and writes
/// them to `out` as JSON lines.
pub async fn export(
    store: &dyn Store,
    filter: &Filter,
    out: &mut dyn Write,
) -> Result<Exported, Error> {
    const PAGE: usize = 1000;
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = store.list_preferences(after, PAGE).await?;
        let Some(&(last, _)) = page.last() else { break };
        for (_, bytes) in &page {
            all.push(StoredComparison::decode(bytes.as_slice())?);
        }
        after = last;
        if page.len() < PAGE {
            break;
        }
    }
    let kept: Vec<&StoredComparison> = all.iter().filter(|c| keep_by_fields(c, filter)).collect();
    // Agreement per pair, over the answers the other filters kept.
    let mut answers: HashMap<String, HashMap<&'static str, usize>> = HashMap::new();
    for c in &kept {
        *answers
            .entry(to_record(c).pair_id)
            .or_default()
            .entry(canonical_answer(c))
            .or_default() += 1;
    }
    let agreement = |pair: &str| {
        answers.get(pair).map_or(1.0, |counts| {
            let total: usize = counts.values().sum();
            let top = counts.values().copied().max().unwrap_or(0);
            top as f64 / total.max(1) as f64
        })
    };
    let mut written = 0;
    for c in kept {
        let record = to_record(c);
        if agreement(&record.pair_id) < filter.min_agreement {
            continue;
        }
        let line = serde_json::to_string(&record)
            .map_err(|e| Error::Export(format!("encoding a record: {e}")))?;
        writeln!(out, "{line}").map_err(|e| Error::Export(format!("writing: {e}")))?;
        written += 1;
    }
    Ok(Exported {
        read: all.len(),
        written,
    })
}

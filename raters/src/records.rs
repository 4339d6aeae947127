//! The dataset records reward models train on, one JSON object per line.
//!
//! Simulated raters write these records now; preferences collected from
//! people will be written in the same format later, without the [`Truth`]
//! field. Three kinds, one file per kind:
//!
//! - [`ClipRecord`]: a captioned clip (the adherence model's contrastive pairs);
//! - [`RatingRecord`]: one rater's 1-5 rating of one clip (the quality model;
//!   a clip's MOS is the mean over the records sharing its `clip_id`);
//! - [`PreferenceRecord`]: one rater's choice between two clips for one
//!   prompt (the user-preference model).
//!
//! [`read_jsonl`] names the file and line of a malformed record;
//! [`write_jsonl`] writes atomically (a temporary file in the same folder,
//! then a rename), so a reader never sees half a dataset. [`Validate`] checks
//! what serde's types cannot (ranges, token ids, empty strings) and names the
//! offending field. The format is described for users in `docs/datasets.md`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use encore_codec::VOCAB_SIZE;
use encore_corpus::{Attributes, Mentioned};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Errors of the dataset layer: reading, writing, validating records and
/// configuring generators.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a record of the expected kind.
    #[error("{}:{line}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// serde's description, with the column.
        #[source]
        source: serde_json::Error,
    },
    /// A record that parsed but breaks a rule of the format.
    #[error("{field}: {reason}")]
    Invalid {
        /// Path of the offending field, e.g. `a.tokens[17]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A record of a file that parsed but breaks a rule of the format.
    #[error("{}:{line}: {field}: {reason}", path.display())]
    InvalidLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Path of the offending field within the record.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A record could not be serialised.
    #[error("record {index}: {source}")]
    Serialize {
        /// Position of the record in the slice being written.
        index: usize,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// A generator configuration value out of range.
    #[error("{key}: {reason}")]
    Config {
        /// The configuration key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl RecordError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RecordError {
        RecordError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What the simulator knows and collected data does not: the prompt's
/// attributes and which of them its caption mentions. Enough to recompute
/// every latent utility, hence the accuracy ceilings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truth {
    /// The attributes the prompt was written from.
    pub attributes: Attributes,
    /// Which of them the caption mentions.
    pub mentioned: Mentioned,
}

/// A captioned clip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipRecord {
    /// The text prompt.
    pub caption: String,
    /// The clip's audio tokens (`encore-codec` ids, 25 per second).
    pub tokens: Vec<u32>,
    /// Simulator ground truth; absent in collected data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<Truth>,
}

/// One rater's 1-5 rating of one clip's quality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatingRecord {
    /// Identifies the clip; every rating of a clip shares it, and the clip's
    /// MOS is their mean.
    pub clip_id: String,
    /// The prompt the clip was generated for.
    pub caption: String,
    /// The clip's audio tokens.
    pub tokens: Vec<u32>,
    /// 1 (bad) to 5 (excellent).
    pub rating: u8,
    /// Who rated.
    pub rater: String,
    /// Milliseconds the rater spent on the clip.
    pub time_ms: u64,
    /// Simulator ground truth; absent in collected data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<Truth>,
}

/// One clip of a compared pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairClip {
    /// The clip's audio tokens.
    pub tokens: Vec<u32>,
    /// The policy version that sampled it, when a policy did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
}

/// A rater's answer to "which do you prefer?".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// Clip `a`.
    A,
    /// Clip `b`.
    B,
    /// No preference.
    Tie,
    /// The rater did not answer (did not listen, or could not decide to).
    Skip,
}

impl Choice {
    /// Lowercase name, as serialised.
    pub fn name(self) -> &'static str {
        match self {
            Choice::A => "a",
            Choice::B => "b",
            Choice::Tie => "tie",
            Choice::Skip => "skip",
        }
    }
}

/// One rater's choice between two clips generated for the same prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceRecord {
    /// Identifies the pair; records sharing it are several raters' answers
    /// on the same two clips.
    pub pair_id: String,
    /// The prompt both clips were generated for.
    pub caption: String,
    /// The first clip played.
    pub a: PairClip,
    /// The second clip played.
    pub b: PairClip,
    /// The answer.
    pub choice: Choice,
    /// Who answered.
    pub rater: String,
    /// Milliseconds the rater spent on the pair.
    pub time_ms: u64,
    /// Simulator ground truth; absent in collected data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<Truth>,
}

/// Checks what serde's types cannot: ranges, token ids and empty strings.
pub trait Validate {
    /// `Ok` for a well-formed record, else [`RecordError::Invalid`] naming
    /// the first offending field.
    fn validate(&self) -> Result<(), RecordError>;
}

fn non_empty(field: &str, value: &str) -> Result<(), RecordError> {
    if value.trim().is_empty() {
        return Err(RecordError::invalid(field, "must not be empty"));
    }
    Ok(())
}

fn valid_tokens(field: &str, tokens: &[u32]) -> Result<(), RecordError> {
    if tokens.is_empty() {
        return Err(RecordError::invalid(field, "must not be empty"));
    }
    match tokens.iter().position(|&t| t as usize >= VOCAB_SIZE) {
        Some(i) => Err(RecordError::invalid(
            format!("{field}[{i}]"),
            format!(
                "token {} is outside the vocabulary ({VOCAB_SIZE})",
                tokens[i]
            ),
        )),
        None => Ok(()),
    }
}

fn valid_truth(truth: &Option<Truth>) -> Result<(), RecordError> {
    match truth {
        Some(t) if t.attributes.tonic >= 12 => Err(RecordError::invalid(
            "truth.attributes.tonic",
            format!("pitch class {} is not in 0..12", t.attributes.tonic),
        )),
        _ => Ok(()),
    }
}

impl Validate for ClipRecord {
    fn validate(&self) -> Result<(), RecordError> {
        non_empty("caption", &self.caption)?;
        valid_tokens("tokens", &self.tokens)?;
        valid_truth(&self.truth)
    }
}

impl Validate for RatingRecord {
    fn validate(&self) -> Result<(), RecordError> {
        non_empty("clip_id", &self.clip_id)?;
        non_empty("caption", &self.caption)?;
        valid_tokens("tokens", &self.tokens)?;
        if !(1..=5).contains(&self.rating) {
            return Err(RecordError::invalid(
                "rating",
                format!("{} is not in 1..=5", self.rating),
            ));
        }
        non_empty("rater", &self.rater)?;
        valid_truth(&self.truth)
    }
}

impl Validate for PreferenceRecord {
    fn validate(&self) -> Result<(), RecordError> {
        non_empty("pair_id", &self.pair_id)?;
        non_empty("caption", &self.caption)?;
        valid_tokens("a.tokens", &self.a.tokens)?;
        valid_tokens("b.tokens", &self.b.tokens)?;
        for (field, version) in [
            ("a.policy_version", &self.a.policy_version),
            ("b.policy_version", &self.b.policy_version),
        ] {
            if let Some(v) = version {
                non_empty(field, v)?;
            }
        }
        non_empty("rater", &self.rater)?;
        valid_truth(&self.truth)
    }
}

/// Reads one record per non-blank line of `path`. A line that does not
/// parse is an error naming the file, its 1-based line number and serde's
/// reason; records are not validated (see [`read_valid_jsonl`]).
pub fn read_jsonl<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<Vec<T>, RecordError> {
    Ok(read_lines(path.as_ref())?
        .into_iter()
        .map(|(_, record)| record)
        .collect())
}

/// [`read_jsonl`], then [`Validate::validate`] on every record; an invalid
/// record is an error naming the file, the line and the field.
pub fn read_valid_jsonl<T: DeserializeOwned + Validate>(
    path: impl AsRef<Path>,
) -> Result<Vec<T>, RecordError> {
    let path = path.as_ref();
    read_lines(path)?
        .into_iter()
        .map(|(line, record): (usize, T)| match record.validate() {
            Ok(()) => Ok(record),
            Err(RecordError::Invalid { field, reason }) => Err(RecordError::InvalidLine {
                path: path.to_path_buf(),
                line,
                field,
                reason,
            }),
            Err(other) => Err(other),
        })
        .collect()
}

/// Records of `path` with their 1-based line numbers.
fn read_lines<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>, RecordError> {
    let io = |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    };
    let reader = BufReader::new(File::open(path).map_err(io)?);
    let mut records = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|source| RecordError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        records.push((i + 1, record));
    }
    Ok(records)
}

/// Writes one record per line to `path`, atomically: the records go to a
/// temporary file in the same folder, which is flushed to disk and renamed
/// over `path`. On any error `path` is left as it was.
pub fn write_jsonl<T: Serialize>(path: impl AsRef<Path>, records: &[T]) -> Result<(), RecordError> {
    let path = path.as_ref();
    let io = |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // A dataset is for sharing: readable by all, like any file written with
    // the default umask (temporary files are created private).
    let tmp = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(io)?;
    let mut out = BufWriter::new(tmp);
    for (index, record) in records.iter().enumerate() {
        serde_json::to_writer(&mut out, record)
            .map_err(|source| RecordError::Serialize { index, source })?;
        out.write_all(b"\n").map_err(io)?;
    }
    let tmp = out.into_inner().map_err(|e| io(e.into_error()))?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use encore_corpus::{Corpus, Split};

    fn truth() -> Truth {
        let x = Corpus::new(1, 0).example(Split::Train, 3);
        Truth {
            attributes: x.attributes,
            mentioned: x.mentioned,
        }
    }

    fn preference() -> PreferenceRecord {
        PreferenceRecord {
            pair_id: "p0".into(),
            caption: "calm piano".into(),
            a: PairClip {
                tokens: vec![3, 2, 2, 1],
                policy_version: Some("job-1/v3".into()),
            },
            b: PairClip {
                tokens: vec![5, 2, 1, 1],
                policy_version: None,
            },
            choice: Choice::Tie,
            rater: "r7".into(),
            time_ms: 5400,
            truth: Some(truth()),
        }
    }

    fn rating() -> RatingRecord {
        RatingRecord {
            clip_id: "c0".into(),
            caption: "calm piano".into(),
            tokens: vec![3, 2, 2, 1],
            rating: 4,
            rater: "r1".into(),
            time_ms: 4100,
            truth: None,
        }
    }

    #[test]
    fn records_round_trip_through_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.jsonl");
        let mut second = preference();
        second.truth = None;
        second.choice = Choice::B;
        let prefs = vec![preference(), second];
        write_jsonl(&path, &prefs).unwrap();
        assert_eq!(read_valid_jsonl::<PreferenceRecord>(&path).unwrap(), prefs);

        let clips = vec![ClipRecord {
            caption: "fast trumpet".into(),
            tokens: vec![700, 2, 1],
            truth: Some(truth()),
        }];
        let path = dir.path().join("clips.jsonl");
        write_jsonl(&path, &clips).unwrap();
        assert_eq!(read_jsonl::<ClipRecord>(&path).unwrap(), clips);

        let ratings = vec![rating(), rating()];
        let path = dir.path().join("ratings.jsonl");
        write_jsonl(&path, &ratings).unwrap();
        assert_eq!(read_jsonl::<RatingRecord>(&path).unwrap(), ratings);
        // Overwriting replaces the file and leaves no temporary file behind.
        write_jsonl(&path, &ratings[..1]).unwrap();
        assert_eq!(read_jsonl::<RatingRecord>(&path).unwrap().len(), 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn wire_format_is_lowercase_and_omits_absent_fields() {
        let mut p = preference();
        p.truth = None;
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains(r#""choice":"tie""#), "{json}");
        assert!(!json.contains("truth"), "{json}");
        // b has no policy version: the key is left out, and reads back as None.
        assert_eq!(json.matches("policy_version").count(), 1, "{json}");
        for (choice, name) in [(Choice::A, "a"), (Choice::B, "b"), (Choice::Skip, "skip")] {
            assert_eq!(
                serde_json::to_string(&choice).unwrap(),
                format!("\"{name}\"")
            );
            assert_eq!(choice.name(), name);
        }
        let minimal = r#"{"pair_id":"x","caption":"c","a":{"tokens":[1]},"b":{"tokens":[2]},"choice":"a","rater":"r","time_ms":1}"#;
        let p: PreferenceRecord = serde_json::from_str(minimal).unwrap();
        assert_eq!(p.a.policy_version, None);
        assert_eq!(p.truth, None);
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ratings.jsonl");
        let good = serde_json::to_string(&rating()).unwrap();
        // A blank line is skipped but still counted.
        let text = format!("{good}\n\n{good}\n{{\"clip_id\": \"c1\", \"rating\": 3}}\n");
        std::fs::write(&path, text).unwrap();
        let err = read_jsonl::<RatingRecord>(&path).unwrap_err();
        assert!(matches!(err, RecordError::Parse { line: 4, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("ratings.jsonl:4:"), "{msg}");
        assert!(msg.contains("missing field"), "{msg}");

        let missing = read_jsonl::<RatingRecord>(dir.path().join("nope.jsonl")).unwrap_err();
        assert!(matches!(missing, RecordError::Io { .. }));
        assert!(missing.to_string().contains("nope.jsonl"));
    }

    #[test]
    fn validate_names_the_offending_field() {
        assert!(preference().validate().is_ok());
        assert!(rating().validate().is_ok());

        let mut p = preference();
        p.a.tokens = vec![3; 20];
        p.a.tokens[17] = 900;
        let err = p.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "a.tokens[17]: token 900 is outside the vocabulary (771)"
        );
        let mut p = preference();
        p.b.tokens.clear();
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "b.tokens: must not be empty"
        );
        let mut p = preference();
        p.caption = "  ".into();
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .starts_with("caption:")
        );

        for bad in [0, 6] {
            let mut r = rating();
            r.rating = bad;
            assert_eq!(
                r.validate().unwrap_err().to_string(),
                format!("rating: {bad} is not in 1..=5")
            );
        }
        let mut r = rating();
        r.tokens[2] = VOCAB_SIZE as u32;
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .starts_with("tokens[2]:")
        );

        let mut c = ClipRecord {
            caption: "x".into(),
            tokens: vec![1],
            truth: Some(truth()),
        };
        assert!(c.validate().is_ok());
        if let Some(t) = c.truth.as_mut() {
            t.attributes.tonic = 12;
        }
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("truth.attributes.tonic:")
        );
    }

    #[test]
    fn invalid_record_in_a_file_names_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ratings.jsonl");
        let mut bad = rating();
        bad.rating = 9;
        write_jsonl(&path, &[rating(), bad]).unwrap();
        // Parsing alone accepts it; validation does not.
        assert_eq!(read_jsonl::<RatingRecord>(&path).unwrap().len(), 2);
        let err = read_valid_jsonl::<RatingRecord>(&path).unwrap_err();
        assert!(
            matches!(&err, RecordError::InvalidLine { line: 2, field, .. } if field == "rating"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("ratings.jsonl:2: rating: 9"),
            "{err}"
        );
    }
}

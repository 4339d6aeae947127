//! The prompt dataset of `PromptSource.dataset_path`, checked at Submit: a
//! JSON Lines file, one `Prompt` per line in proto3 JSON form
//! (`{"promptId": "p1", "caption": "...", "attributes": {"mood": "calm"}}`).
//!
//! The coordinator reads it through once so that a typo in the path or a
//! bad line fails the Submit, with its line number, instead of failing
//! every actor later. Prompts follow the same rules as an inline list.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use encore_proto::status::Violations;
use encore_proto::v1::ErrorReason;
use serde::Deserialize;

use super::{Limits, preview, prompt_problems};

/// Bad lines reported one by one; the rest are counted in one more
/// violation, so a wholly wrong file cannot crowd out the spec's other
/// fields.
const MAX_REPORTED_PROBLEMS: usize = 16;

/// One line of the file. Proto3 JSON: camelCase keys (the proto names are
/// accepted too), absent or null fields take their default, unknown keys
/// are an error, so a misspelt "captoin" is caught here.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a Prompt object such as {\"promptId\": \"p1\", \"caption\": \"...\"}"
)]
struct DatasetPrompt {
    #[serde(default, rename = "promptId", alias = "prompt_id")]
    prompt_id: Option<String>,
    #[serde(default)]
    caption: Option<String>,
    // Parsed only to check that it is a map of strings.
    #[serde(default)]
    #[allow(dead_code)]
    attributes: Option<HashMap<String, String>>,
}

/// Checks the dataset at `uri`, reporting every problem on `field`.
pub(super) fn check(uri: &str, field: &str, limits: &Limits, v: &mut Violations) {
    let path = match local_path(uri) {
        Ok(path) => path,
        Err(why) => return v.invalid(field, why),
    };
    // Look before opening: opening a FIFO would block, and /dev/zero never
    // ends.
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) => return v.invalid(field, format!("cannot read {}: {e}", preview(uri))),
    };
    if !meta.is_file() {
        return v.invalid(field, format!("{} is not a regular file", preview(uri)));
    }
    let too_large = |v: &mut Violations| {
        v.push(
            field.to_owned(),
            ErrorReason::TooLarge,
            format!(
                "the file is larger than the limit of {} bytes",
                limits.max_dataset_bytes
            ),
        );
    };
    if meta.len() > limits.max_dataset_bytes {
        return too_large(v);
    }
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) => return v.invalid(field, format!("cannot open {}: {e}", preview(uri))),
    };
    // The file may grow between the look and the read.
    let mut reader = BufReader::new(file.take(limits.max_dataset_bytes.saturating_add(1)));

    let mut first_line_of: HashMap<String, u64> = HashMap::new();
    let mut line = Vec::new();
    let mut line_no = 0u64;
    let mut bytes = 0u64;
    let mut prompts = 0usize;
    let mut problems = 0usize;
    let mut report = |v: &mut Violations, reason: ErrorReason, description: String| {
        problems += 1;
        if problems <= MAX_REPORTED_PROBLEMS {
            v.push(field.to_owned(), reason, description);
        }
    };
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(e) => {
                report(
                    v,
                    ErrorReason::InvalidField,
                    format!("line {}: cannot read: {e}", line_no + 1),
                );
                break;
            }
        }
        line_no += 1;
        if bytes > limits.max_dataset_bytes {
            too_large(v);
            return;
        }
        // Blank lines (a trailing newline, a separator) hold no prompt.
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        prompts += 1;
        if prompts > limits.max_dataset_prompts {
            v.push(
                field.to_owned(),
                ErrorReason::TooLarge,
                format!(
                    "more than the limit of {} prompts",
                    limits.max_dataset_prompts
                ),
            );
            return;
        }
        let prompt: DatasetPrompt = match serde_json::from_slice(&line) {
            Ok(prompt) => prompt,
            Err(e) => {
                // serde_json counts lines and columns within the one line it
                // was given; only the column says anything here.
                let message = e.to_string();
                let position = format!(" at line {} column {}", e.line(), e.column());
                let message = message.strip_suffix(&position).unwrap_or(&message);
                report(
                    v,
                    ErrorReason::InvalidField,
                    format!("line {line_no}, column {}: {message}", e.column()),
                );
                continue;
            }
        };
        let id = prompt.prompt_id.unwrap_or_default();
        let caption = prompt.caption.unwrap_or_default();
        for p in prompt_problems(&id, &caption, limits) {
            let key = if p.field == "prompt_id" {
                "promptId"
            } else {
                p.field
            };
            report(
                v,
                p.reason,
                format!("line {line_no}: {key}: {}", p.description),
            );
        }
        if id.is_empty() {
            continue;
        }
        if let Some(first) = first_line_of.get(&id) {
            report(
                v,
                ErrorReason::InvalidField,
                format!(
                    "line {line_no}: promptId {} is already the id of line {first}",
                    preview(&id)
                ),
            );
        } else {
            first_line_of.insert(id, line_no);
        }
    }
    if problems > MAX_REPORTED_PROBLEMS {
        v.invalid(
            field,
            format!(
                "{} more problems in the file are not listed",
                problems - MAX_REPORTED_PROBLEMS
            ),
        );
    }
    if prompts == 0 {
        v.invalid(field, "the file holds no prompts");
    }
}

/// The local path of a dataset: a plain path, or a `file://` URI. Other
/// schemes name stores the coordinator has no client for.
fn local_path(uri: &str) -> Result<&Path, String> {
    if uri.is_empty() {
        return Err("required: a local path or file:// URI of a JSON Lines file".into());
    }
    if let Some(rest) = uri.strip_prefix("file://") {
        return Ok(Path::new(rest));
    }
    if let Some((scheme, _)) = uri.split_once("://")
        && !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        return Err(format!(
            "the coordinator reads only local paths and file:// URIs, not {scheme}://"
        ));
    }
    Ok(Path::new(uri))
}

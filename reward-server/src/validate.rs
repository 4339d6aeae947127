//! Request validation: the first thing a Score request meets after it is
//! decoded, before anything is queued. It checks the whole request against
//! the rules in `reward.proto`'s file comment and collects every violation,
//! so the caller learns about all its bad fields at once; a request that
//! passes can be scored by every model it names.

use encore_codec::VOCAB_SIZE;
use encore_proto::v1::{ErrorReason, ScoreRequest};

use crate::error::Violations;

/// Request-level limits, the same for every model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most items per request.
    pub max_request_items: usize,
    /// Longest caption, in bytes.
    pub max_caption_bytes: usize,
}

/// What validation needs to know about the audio codec, if the server has
/// one: items sent as codes are checked against it.
pub(crate) trait CodecLimits {
    /// Codebooks per frame.
    fn codebooks(&self) -> usize;
    /// Codes per codebook.
    fn codebook_size(&self) -> usize;
    /// 40 ms token frames the audio of `frames` code frames fills.
    fn token_frames(&self, frames: usize) -> usize;
}

impl CodecLimits for crate::codec::AudioCodec {
    fn codebooks(&self) -> usize {
        self.codebooks()
    }
    fn codebook_size(&self) -> usize {
        self.codebook_size()
    }
    fn token_frames(&self, frames: usize) -> usize {
        self.token_frames(frames)
    }
}

/// What validation needs to know about one hosted model.
#[derive(Debug, Clone)]
pub(crate) struct ModelLimits {
    /// Its name.
    pub name: String,
    /// Fewest tokens per item.
    pub min_tokens: usize,
    /// Most tokens per item.
    pub max_tokens: usize,
}

/// Checks `request` against `limits` and the `hosted` models. Returns the
/// indices into `hosted` of the models to score with (all of them, in
/// order, when the request names none), or every violation.
pub(crate) fn validate(
    request: &ScoreRequest,
    limits: &Limits,
    hosted: &[ModelLimits],
    codec: Option<&dyn CodecLimits>,
) -> Result<Vec<usize>, Violations> {
    let mut bad = Violations::default();

    let used = resolve_models(&request.models, hosted, &mut bad);
    check_items(request, limits, hosted, &used, codec, &mut bad);

    if bad.is_empty() { Ok(used) } else { Err(bad) }
}

/// Resolves model names; unknown and repeated names are violations and are
/// left out of the result.
fn resolve_models(names: &[String], hosted: &[ModelLimits], bad: &mut Violations) -> Vec<usize> {
    if names.is_empty() {
        return (0..hosted.len()).collect();
    }
    let mut used = Vec::with_capacity(names.len());
    for (k, name) in names.iter().enumerate() {
        let field = format!("models[{k}]");
        if let Some(first) = names[..k].iter().position(|n| n == name) {
            bad.push(
                field,
                ErrorReason::InvalidField,
                format!("model {} is already named at models[{first}]", quoted(name)),
            );
            continue;
        }
        match hosted.iter().position(|m| &m.name == name) {
            Some(index) => used.push(index),
            None => {
                let names: Vec<&str> = hosted.iter().map(|m| m.name.as_str()).collect();
                bad.push(
                    field,
                    ErrorReason::UnknownModel,
                    format!(
                        "no model {} is hosted here (hosted: {})",
                        quoted(name),
                        names.join(", ")
                    ),
                );
            }
        }
    }
    used
}

fn check_items(
    request: &ScoreRequest,
    limits: &Limits,
    hosted: &[ModelLimits],
    used: &[usize],
    codec: Option<&dyn CodecLimits>,
    bad: &mut Violations,
) {
    let n = request.items.len();
    if n == 0 {
        bad.push(
            "items".into(),
            ErrorReason::InvalidField,
            "at least one item is needed".into(),
        );
        return;
    }
    if n > limits.max_request_items {
        bad.push(
            "items".into(),
            ErrorReason::TooLarge,
            format!(
                "{n} items, more than the {} a request may hold",
                limits.max_request_items
            ),
        );
        // The items themselves are not looked at: the caller must split the
        // request anyway, and this bounds the work spent on a huge one.
        return;
    }

    // The token limits every used model accepts, with the model that sets
    // each bound, for the message.
    let shortest = used
        .iter()
        .map(|&i| &hosted[i])
        .max_by_key(|m| m.min_tokens);
    let longest = used
        .iter()
        .map(|&i| &hosted[i])
        .min_by_key(|m| m.max_tokens);

    for (i, item) in request.items.iter().enumerate() {
        let caption = item.caption.len();
        if caption == 0 {
            bad.push(
                format!("items[{i}].caption"),
                ErrorReason::InvalidField,
                "the caption is empty".into(),
            );
        } else if caption > limits.max_caption_bytes {
            bad.push(
                format!("items[{i}].caption"),
                ErrorReason::TooLarge,
                format!(
                    "{caption} bytes, more than the {} a caption may hold",
                    limits.max_caption_bytes
                ),
            );
        }

        let field = format!("items[{i}].tokens");
        if item.tokens.is_empty() {
            bad.push(field, ErrorReason::InvalidField, "no tokens".into());
            continue;
        }
        // The item's length in 40 ms token frames (what the models' limits
        // count), how to say it, and the bound on its values.
        let (frames, length, vocab, unit) = if item.codebooks <= 1 {
            let len = item.tokens.len();
            (
                len,
                format!("{len} tokens"),
                VOCAB_SIZE,
                "the vocabulary size",
            )
        } else {
            let k = item.codebooks as usize;
            // INVALID_ARGUMENT (reason INCOMPATIBLE) rather than
            // FAILED_PRECONDITION: like a model this server does not host,
            // the request can never succeed here, whatever the server's
            // state; the caller must send it to a server with this codec.
            let Some(codec) = codec.filter(|c| c.codebooks() == k) else {
                let why = match codec {
                    None => format!(
                        "{k} EnCodec codebooks, but this server has no audio codec and scores \
                         only the embedded codec's tokens (codebooks 0 or 1)"
                    ),
                    Some(c) => format!(
                        "{k} codebooks, but the server's audio codec has {}",
                        c.codebooks()
                    ),
                };
                bad.push(
                    format!("items[{i}].codebooks"),
                    ErrorReason::Incompatible,
                    why,
                );
                continue;
            };
            let len = item.tokens.len();
            if !len.is_multiple_of(k) {
                bad.push(
                    field,
                    ErrorReason::InvalidField,
                    format!("{len} codes are not a whole number of frames of {k} codebooks"),
                );
                continue;
            }
            let frames = codec.token_frames(len / k);
            let length = format!(
                "{} frames of {k} codebooks ({frames} token frames of 40 ms)",
                len / k
            );
            (frames, length, codec.codebook_size(), "the codebook size")
        };
        if let Some(m) = shortest.filter(|m| frames < m.min_tokens) {
            bad.push(
                field,
                ErrorReason::InvalidField,
                format!(
                    "{length}, fewer than the {} model {} needs",
                    m.min_tokens,
                    quoted(&m.name)
                ),
            );
        } else if let Some(m) = longest.filter(|m| frames > m.max_tokens) {
            bad.push(
                field,
                ErrorReason::TooLarge,
                format!(
                    "{length}, more than the {} model {} accepts",
                    m.max_tokens,
                    quoted(&m.name)
                ),
            );
            // Over-long items are not scanned token by token.
            continue;
        }

        // One violation per item, at its first bad token, so that a single
        // garbage item cannot crowd the others out of the report.
        let mut out_of_range = item
            .tokens
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t as usize >= vocab);
        if let Some((j, &token)) = out_of_range.next() {
            let others = out_of_range.count();
            let more = if others > 0 {
                format!(" ({others} more tokens of this item are out of range too)")
            } else {
                String::new()
            };
            bad.push(
                format!("items[{i}].tokens[{j}]"),
                ErrorReason::TokenOutOfRange,
                format!("token {token} is not below {unit} {vocab}{more}"),
            );
        }
    }
}

/// A client-supplied string for a message: quoted, and cut short so a
/// megabyte of model name cannot become a megabyte of error.
fn quoted(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use encore_proto::v1::ScoreItem;

    use super::*;

    const LIMITS: Limits = Limits {
        max_request_items: 4,
        max_caption_bytes: 16,
    };

    fn hosted() -> Vec<ModelLimits> {
        vec![
            ModelLimits {
                name: "adherence".into(),
                min_tokens: 2,
                max_tokens: 10,
            },
            ModelLimits {
                name: "quality".into(),
                min_tokens: 3,
                max_tokens: 8,
            },
        ]
    }

    fn item(caption: &str, tokens: &[u32]) -> ScoreItem {
        ScoreItem {
            caption: caption.into(),
            tokens: tokens.to_vec(),
            codebooks: 0,
        }
    }

    fn request(items: Vec<ScoreItem>, models: &[&str]) -> ScoreRequest {
        ScoreRequest {
            items,
            models: models.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    fn fields(v: &Violations) -> Vec<(&str, ErrorReason)> {
        v.listed()
            .iter()
            .map(|v| (v.field.as_str(), v.reason))
            .collect()
    }

    #[test]
    fn a_good_request_resolves_its_models() {
        let ok = request(vec![item("jazz", &[5, 6, 7])], &[]);
        assert_eq!(validate(&ok, &LIMITS, &hosted(), None).unwrap(), [0, 1]);
        let ok = request(vec![item("jazz", &[5, 6, 7])], &["quality"]);
        assert_eq!(validate(&ok, &LIMITS, &hosted(), None).unwrap(), [1]);
    }

    #[test]
    fn every_bad_field_is_named() {
        let bad_token = VOCAB_SIZE as u32;
        let req = request(
            vec![
                item("", &[5, 6, 7]),
                item("jazz", &[5, 6, 7, bad_token, 1, bad_token]),
                item("a caption that is too long", &[]),
                item("jazz", &[5, 6]),
            ],
            &["quality", "nope", "quality"],
        );
        let err = validate(&req, &LIMITS, &hosted(), None).unwrap_err();
        assert_eq!(
            fields(&err),
            [
                ("models[1]", ErrorReason::UnknownModel),
                ("models[2]", ErrorReason::InvalidField),
                ("items[0].caption", ErrorReason::InvalidField),
                ("items[1].tokens[3]", ErrorReason::TokenOutOfRange),
                ("items[2].caption", ErrorReason::TooLarge),
                ("items[2].tokens", ErrorReason::InvalidField),
                // Two tokens are enough for adherence, not for quality.
                ("items[3].tokens", ErrorReason::InvalidField),
            ]
        );
        let message = err.to_string();
        assert!(message.contains("1 more tokens of this item"), "{message}");
        assert!(message.contains("\"quality\""), "{message}");
    }

    #[test]
    fn the_tightest_limit_of_the_used_models_applies() {
        let nine = [4u32; 9];
        // Only adherence: 9 tokens are fine.
        let req = request(vec![item("x", &nine)], &["adherence"]);
        assert!(validate(&req, &LIMITS, &hosted(), None).is_ok());
        // With quality too, 9 is over its limit of 8.
        let err = validate(
            &request(vec![item("x", &nine)], &[]),
            &LIMITS,
            &hosted(),
            None,
        )
        .unwrap_err();
        assert_eq!(fields(&err), [("items[0].tokens", ErrorReason::TooLarge)]);
        assert!(err.to_string().contains("\"quality\""), "{err}");
    }

    #[test]
    fn empty_and_oversized_requests_are_refused() {
        let err = validate(&request(vec![], &[]), &LIMITS, &hosted(), None).unwrap_err();
        assert_eq!(fields(&err), [("items", ErrorReason::InvalidField)]);
        let five = (0..5).map(|_| item("x", &[4, 4, 4])).collect();
        let err = validate(&request(five, &[]), &LIMITS, &hosted(), None).unwrap_err();
        assert_eq!(fields(&err), [("items", ErrorReason::TooLarge)]);
    }

    /// A codec of 4 codebooks of 32 codes at 50 frames/s.
    struct Codec;

    impl CodecLimits for Codec {
        fn codebooks(&self) -> usize {
            4
        }
        fn codebook_size(&self) -> usize {
            32
        }
        fn token_frames(&self, frames: usize) -> usize {
            frames.div_ceil(2)
        }
    }

    fn codes(caption: &str, codebooks: u32, codes: &[u32]) -> ScoreItem {
        ScoreItem {
            codebooks,
            ..item(caption, codes)
        }
    }

    #[test]
    fn codes_are_checked_against_the_codec() {
        // 6 frames of 4 codebooks: 3 token frames, enough for both models.
        let six = [5u32; 24];
        let ok = request(vec![codes("x", 4, &six), item("y", &[1, 2, 3])], &[]);
        assert!(validate(&ok, &LIMITS, &hosted(), Some(&Codec)).is_ok());
        let err = validate(&ok, &LIMITS, &hosted(), None).unwrap_err();
        assert_eq!(
            fields(&err),
            [("items[0].codebooks", ErrorReason::Incompatible)]
        );
        assert!(err.to_string().contains("no audio codec"), "{err}");
        // Codebook 1 is today's token stream.
        let one = request(vec![codes("x", 1, &[1, 2, 3])], &[]);
        assert!(validate(&one, &LIMITS, &hosted(), None).is_ok());

        let mut wide = six;
        wide[9] = 32;
        let req = request(
            vec![
                codes("x", 2, &six),
                codes("x", 4, &six[..23]),
                codes("x", 4, &wide),
                // 18 frames are 9 token frames, too long for quality.
                codes("x", 4, &[5u32; 72]),
            ],
            &[],
        );
        let err = validate(&req, &LIMITS, &hosted(), Some(&Codec)).unwrap_err();
        assert_eq!(
            fields(&err),
            [
                ("items[0].codebooks", ErrorReason::Incompatible),
                ("items[1].tokens", ErrorReason::InvalidField),
                ("items[2].tokens[9]", ErrorReason::TokenOutOfRange),
                ("items[3].tokens", ErrorReason::TooLarge),
            ]
        );
        let message = err.to_string();
        assert!(message.contains("audio codec has 4"), "{message}");
        assert!(message.contains("codebook size 32"), "{message}");
        assert!(
            message.contains("18 frames of 4 codebooks (9 token frames"),
            "{message}"
        );
        // 4 frames are 2 token frames, too short for quality.
        let short = request(vec![codes("x", 4, &six[..16])], &[]);
        let err = validate(&short, &LIMITS, &hosted(), Some(&Codec)).unwrap_err();
        assert_eq!(
            fields(&err),
            [("items[0].tokens", ErrorReason::InvalidField)]
        );
    }

    #[test]
    fn long_names_are_cut_in_messages() {
        let name = "é".repeat(1000);
        let err = validate(
            &request(vec![item("x", &[4, 4, 4])], &[&name]),
            &LIMITS,
            &hosted(),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }
}

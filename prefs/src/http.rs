//! The listening page and the HTTP API it uses, over the same two calls as
//! the gRPC service:
//!
//! | route | does |
//! | --- | --- |
//! | `GET /` | the page (one HTML file, no build step) |
//! | `GET /api/suggestions` | prompts to offer, as a JSON array |
//! | `POST /api/session` | a new rater session: `{"rater_id"}`, the id every later call sends |
//! | `POST /api/pair` | `{"prompt", "rater_id"}` → a pair: `{"prompt", "a": {"clip_id", "policy", "policy_version", "audio_path"}, "b": ...}` |
//! | `POST /api/comparisons` | `{"comparisons": [{"client_key", "rater_id", "clip_a", "clip_b", "choice": "A"\|"B"\|"NEITHER", "rating_a", "rating_b"}]}` → `{"results": [{"record", "stored"}]}` |
//! | `GET /clips/{clip_id}.wav` | a served clip as `audio/wav` |
//!
//! Errors answer with the gRPC status's HTTP counterpart (400 for invalid
//! fields, 401 for a rater id the service did not issue, 404 for an unknown
//! clip, 429 with `Retry-After` for a rater over its rate) and a JSON body `{"code", "message", "fields"}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use encore_proto::v1::{Choice, Clip, Comparison, GetPairRequest, SubmitComparisonsRequest};
use serde::{Deserialize, Serialize};

use crate::{Error, Preferences};

const PAGE: &str = include_str!("page.html");

/// The routes above, over `service`.
pub fn router(service: Arc<Preferences>) -> axum::Router {
    axum::Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/api/suggestions", get(suggestions))
        .route("/api/session", post(session))
        .route("/api/pair", post(pair))
        .route("/api/comparisons", post(comparisons))
        .route("/clips/{file}", get(clip))
        .with_state(service)
}

#[derive(Debug, Serialize)]
struct SessionJson {
    rater_id: String,
}

async fn session(State(service): State<Arc<Preferences>>) -> Result<Json<SessionJson>, ApiError> {
    Ok(Json(SessionJson {
        rater_id: service.start_session()?,
    }))
}

async fn suggestions(State(service): State<Arc<Preferences>>) -> Json<Vec<String>> {
    Json(service.suggestions().to_vec())
}

#[derive(Debug, Deserialize)]
struct PairBody {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    rater_id: String,
    #[serde(default)]
    policy_a: String,
    #[serde(default)]
    policy_b: String,
}

#[derive(Debug, Serialize)]
struct ClipJson {
    clip_id: String,
    policy: String,
    policy_version: u64,
    audio_path: String,
}

impl From<Clip> for ClipJson {
    fn from(c: Clip) -> Self {
        Self {
            clip_id: c.clip_id,
            policy: c.policy,
            policy_version: c.policy_version,
            audio_path: c.audio_path,
        }
    }
}

#[derive(Debug, Serialize)]
struct PairJson {
    prompt: String,
    a: Option<ClipJson>,
    b: Option<ClipJson>,
}

async fn pair(
    State(service): State<Arc<Preferences>>,
    Json(body): Json<PairBody>,
) -> Result<Json<PairJson>, ApiError> {
    let pair = service
        .get_pair(GetPairRequest {
            prompt: body.prompt,
            rater_id: body.rater_id,
            policy_a: body.policy_a,
            policy_b: body.policy_b,
        })
        .await?;
    Ok(Json(PairJson {
        prompt: pair.prompt,
        a: pair.a.map(Into::into),
        b: pair.b.map(Into::into),
    }))
}

#[derive(Debug, Deserialize)]
struct ComparisonJson {
    #[serde(default)]
    client_key: String,
    #[serde(default)]
    rater_id: String,
    #[serde(default)]
    clip_a: String,
    #[serde(default)]
    clip_b: String,
    /// "A", "B" or "NEITHER"; anything else (or nothing) is refused by name.
    #[serde(default)]
    choice: String,
    #[serde(default)]
    rating_a: u32,
    #[serde(default)]
    rating_b: u32,
}

#[derive(Debug, Deserialize)]
struct ComparisonsBody {
    #[serde(default)]
    comparisons: Vec<ComparisonJson>,
}

#[derive(Debug, Serialize)]
struct ResultJson {
    record: u64,
    stored: bool,
}

#[derive(Debug, Serialize)]
struct ResultsJson {
    results: Vec<ResultJson>,
}

fn choice(name: &str) -> i32 {
    match name.trim().to_ascii_uppercase().as_str() {
        "A" => Choice::A as i32,
        "B" => Choice::B as i32,
        "NEITHER" => Choice::Neither as i32,
        // The service names the field: "required" or an unknown value.
        "" => Choice::Unspecified as i32,
        _ => -1,
    }
}

async fn comparisons(
    State(service): State<Arc<Preferences>>,
    Json(body): Json<ComparisonsBody>,
) -> Result<Json<ResultsJson>, ApiError> {
    let request = SubmitComparisonsRequest {
        comparisons: body
            .comparisons
            .into_iter()
            .map(|c| Comparison {
                choice: choice(&c.choice),
                client_key: c.client_key,
                rater_id: c.rater_id,
                clip_a: c.clip_a,
                clip_b: c.clip_b,
                rating_a: c.rating_a,
                rating_b: c.rating_b,
            })
            .collect(),
    };
    let answer = service.submit(request).await?;
    Ok(Json(ResultsJson {
        results: answer
            .results
            .into_iter()
            .map(|r| ResultJson {
                record: r.record,
                stored: r.stored,
            })
            .collect(),
    }))
}

async fn clip(
    State(service): State<Arc<Preferences>>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let clip_id = file.strip_suffix(".wav").unwrap_or(&file);
    let wav = service.clip_wav(clip_id).await?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("audio/wav")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=3600"),
            ),
        ],
        wav,
    )
        .into_response())
}

/// An [`Error`] as an HTTP answer.
#[derive(Debug)]
pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        Self(err)
    }
}

#[derive(Debug, Serialize)]
struct ErrorJson {
    code: &'static str,
    message: String,
    fields: Vec<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.0.to_string();
        let (status, code, fields, retry) = match &self.0 {
            Error::Invalid(v) => (
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                v.listed().iter().map(|v| v.field.clone()).collect(),
                None,
            ),
            Error::UnknownClip { field, .. } => (
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                vec![field.clone()],
                None,
            ),
            Error::UnknownRater { field } => (
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                vec![field.clone()],
                None,
            ),
            Error::RateLimited { retry_after, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "RESOURCE_EXHAUSTED",
                Vec::new(),
                Some(retry_after.as_secs().max(1)),
            ),
            Error::Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                Vec::new(),
                None,
            ),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                Vec::new(),
                None,
            ),
        };
        let mut response = (
            status,
            Json(ErrorJson {
                code,
                message,
                fields,
            }),
        )
            .into_response();
        if let Some(seconds) = retry
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

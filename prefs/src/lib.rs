//! Encore's preference service: the back end of an A/B listening page.
//!
//! A listener asks for a pair ([`Preferences::get_pair`]): two clips
//! generated for a prompt (a suggested one if none is typed) by the hosted
//! policies. Each clip is kept in the store for the clip lifetime, so that
//! a comparison can name it and the stored record holds it in full. The
//! listener's choice comes back as a comparison
//! ([`Preferences::submit`]); comparisons are validated whole, rate-limited
//! per rater and over all raters together (`limits.rs`), and stored durably
//! and once per rater and client key. Rater ids are the service's own: a
//! listener starts a session ([`Preferences::start_session`]) and every
//! call carries the signed id it got (`sessions.rs`), so that nobody can
//! make up raters to escape the per-rater limits.
//! `encore.v1.PreferenceService` ([`PreferenceServer`]) exposes both calls
//! over gRPC; the HTTP page and API map onto the same two calls.

pub mod export;
pub mod http;
mod limits;
pub mod server;
mod sessions;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use candle_core::Device;
use encore_model::{Policy, SamplingParams};
use encore_proto::status::{Violations, status};
use encore_proto::v1::preference_service_server::PreferenceService;
use encore_proto::v1::{
    Choice, Clip, ClipPair, Comparison, ErrorReason, GetPairRequest, RaterSession,
    StartSessionRequest, StoredComparison, SubmitComparisonsRequest, SubmitComparisonsResponse,
    SubmittedComparison,
};
use encore_store::{RecordPut, Store, StoreError};
use limits::{GlobalLimit, RaterLimits};
use prost::Message;
use sessions::Sessions;
use tonic::{Code, Request, Response, Status};

/// A policy the service generates clips with.
#[derive(Clone)]
pub struct HostedPolicy {
    /// Its name, as requests and records name it.
    pub name: String,
    /// The frozen policy.
    pub policy: Arc<Policy>,
    /// Its version (the job's weight version, 0 for a checkpoint on disk).
    pub version: u64,
}

impl std::fmt::Debug for HostedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedPolicy")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The service's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest prompt, in bytes.
    pub max_prompt_bytes: usize,
    /// Longest rater id and client key, in bytes.
    pub max_id_bytes: usize,
    /// Most comparisons in one submission.
    pub max_batch: usize,
    /// Length of a generated clip, in frames (25 per second).
    pub clip_frames: usize,
    /// How long a served clip can be judged.
    pub clip_ttl: Duration,
    /// Pairs one rater may ask for per minute.
    pub pairs_per_minute: u32,
    /// Comparisons one rater may submit per minute.
    pub comparisons_per_minute: u32,
    /// Pairs all raters together may ask for per minute: what bounds
    /// clients that make up a new rater id per request.
    pub all_pairs_per_minute: u32,
    /// Comparisons all raters together may submit per minute.
    pub all_comparisons_per_minute: u32,
    /// Most raters the per-rater limits track at once; a new rater beyond
    /// it waits until one has been idle for a minute.
    pub max_raters: usize,
    /// Rater sessions all callers together may start per minute.
    pub sessions_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_bytes: 1000,
            max_id_bytes: 128,
            max_batch: 1000,
            clip_frames: 200,
            clip_ttl: Duration::from_secs(3600),
            pairs_per_minute: 30,
            comparisons_per_minute: 120,
            all_pairs_per_minute: 600,
            all_comparisons_per_minute: 2400,
            max_raters: 10_000,
            sessions_per_minute: 120,
        }
    }
}

/// Why a call failed: each maps to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad fields, each named.
    #[error("{0}")]
    Invalid(Violations),
    /// A clip id the service never served, or has forgotten.
    #[error("{field}: no clip {clip_id:?} (never served, or its time to be judged has passed)")]
    UnknownClip {
        /// The field naming it.
        field: String,
        /// The id.
        clip_id: String,
    },
    /// A rater id this service did not issue.
    #[error(
        "{field}: not a rater id this service issued; start a session \
         (PreferenceService.StartSession, or POST /api/session) and send the id it returns"
    )]
    UnknownRater {
        /// The field holding it.
        field: String,
    },
    /// A rater over its rate, all raters together over theirs, or a new
    /// rater while the most raters are tracked ([`limits`]).
    #[error("{reason}")]
    RateLimited {
        /// Which limit, naming the rater where there is one.
        reason: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Generating the clips failed.
    #[error("generating clips: {0}")]
    Model(#[from] encore_model::ModelError),
    /// A stored record does not decode.
    #[error("stored record: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Rendering audio failed.
    #[error("rendering audio: {0}")]
    Codec(#[from] encore_codec::CodecError),
    /// Writing an export failed.
    #[error("export: {0}")]
    Export(String),
}

impl Error {
    /// The gRPC code this error answers with.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid(_) => Code::InvalidArgument,
            Error::UnknownClip { .. } => Code::NotFound,
            Error::UnknownRater { .. } => Code::Unauthenticated,
            Error::RateLimited { .. } => Code::ResourceExhausted,
            Error::Store(_) => Code::Unavailable,
            Error::Model(_) | Error::Decode(_) | Error::Codec(_) | Error::Export(_) => {
                Code::Internal
            }
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::Invalid(v) => v.to_status(),
            Error::UnknownClip { field, clip_id } => status(
                Code::NotFound,
                message,
                ErrorReason::UnknownClip,
                &[("field", field), ("clip_id", clip_id)],
                None,
            ),
            Error::UnknownRater { field } => status(
                Code::Unauthenticated,
                message,
                ErrorReason::Unauthenticated,
                &[("field", field)],
                None,
            ),
            Error::RateLimited { retry_after, .. } => status(
                Code::ResourceExhausted,
                message,
                ErrorReason::RateLimited,
                &[],
                Some(retry_after),
            ),
            Error::Store(_) => Status::unavailable(message),
            Error::Model(_) | Error::Decode(_) | Error::Codec(_) | Error::Export(_) => {
                Status::internal(message)
            }
        }
    }
}

/// Captions offered when a listener types none.
const SUGGESTIONS: usize = 64;

/// The service: hosted policies, the store, the limits.
pub struct Preferences {
    metrics: Option<Metrics>,
    store: Arc<dyn Store>,
    policies: Vec<HostedPolicy>,
    limits: Limits,
    device: Device,
    suggestions: Vec<String>,
    pairs: RaterLimits,
    comparisons: RaterLimits,
    sessions: Sessions,
    new_sessions: GlobalLimit,
    next_seed: AtomicU64,
}

impl std::fmt::Debug for Preferences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preferences")
            .field(
                "policies",
                &self.policies.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Preferences {
    /// A service generating clips with `policies` (the first two are the
    /// default pair; one policy is compared against itself) and keeping
    /// clips and comparisons in `store`.
    pub fn new(store: Arc<dyn Store>, policies: Vec<HostedPolicy>, limits: Limits) -> Self {
        let frames = limits.clip_frames.max(1);
        Self {
            metrics: None,
            store,
            policies,
            pairs: RaterLimits::new(
                "pairs",
                limits.pairs_per_minute,
                limits.all_pairs_per_minute,
                limits.max_raters,
            ),
            comparisons: RaterLimits::new(
                "comparisons",
                limits.comparisons_per_minute,
                limits.all_comparisons_per_minute,
                limits.max_raters,
            ),
            sessions: Sessions::ephemeral(),
            new_sessions: GlobalLimit::new("new rater sessions", limits.sessions_per_minute),
            limits,
            device: Device::Cpu,
            suggestions: encore_corpus::eval_prompts(7, frames, SUGGESTIONS)
                .into_iter()
                .map(|e| e.caption)
                .collect(),
            next_seed: AtomicU64::new(rand::random()),
        }
    }

    /// Signs rater ids with `key` (at least 16 bytes) instead of a key
    /// drawn at start-up, so that sessions outlive the process and hold on
    /// every replica that shares the key.
    pub fn with_rater_key(mut self, key: Vec<u8>) -> Result<Self, String> {
        self.sessions = Sessions::new(key)?;
        Ok(self)
    }

    /// A new rater session: the rater id to send with every call.
    pub fn start_session(&self) -> Result<String, Error> {
        let answer = self.new_sessions.check().map(|()| self.sessions.start());
        if let Err(e) = &answer {
            self.refused("StartSession", e);
        }
        answer
    }

    /// Records the service's metrics on `registry` (see [`Metrics`]).
    pub fn with_metrics(
        mut self,
        registry: &prometheus::Registry,
    ) -> Result<Self, encore_telemetry::Error> {
        self.metrics = Some(Metrics::new(registry)?);
        Ok(self)
    }

    /// Counts a refusal by its gRPC code.
    fn refused(&self, call: &str, err: &Error) {
        if let Some(m) = &self.metrics {
            let code = encore_proto::status::code_name(err.code());
            m.refused.with_label_values(&[call, code]).inc();
        }
    }

    /// Prompts the page offers.
    pub fn suggestions(&self) -> &[String] {
        &self.suggestions
    }

    fn policy(&self, field: &str, name: &str, default: usize) -> Result<&HostedPolicy, Error> {
        if name.is_empty() {
            let index = default.min(self.policies.len().saturating_sub(1));
            return self.policies.get(index).ok_or_else(|| {
                Error::Invalid(Violations::one(field, "the service hosts no policy"))
            });
        }
        self.policies
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                let hosted: Vec<&str> = self.policies.iter().map(|p| p.name.as_str()).collect();
                Error::Invalid(Violations::one(
                    field,
                    format!("no policy {name:?} here (hosted: {})", hosted.join(", ")),
                ))
            })
    }

    /// Two clips for the request's prompt, kept for the clip lifetime.
    pub async fn get_pair(&self, req: GetPairRequest) -> Result<ClipPair, Error> {
        let started = std::time::Instant::now();
        let answer = self.pair_inner(req).await;
        match &answer {
            Ok(_) => {
                if let Some(m) = &self.metrics {
                    m.pairs.inc();
                    m.pair_seconds.observe(started.elapsed().as_secs_f64());
                }
            }
            Err(e) => self.refused("GetPair", e),
        }
        answer
    }

    async fn pair_inner(&self, req: GetPairRequest) -> Result<ClipPair, Error> {
        let mut bad = Violations::default();
        self.check_id(&mut bad, "rater_id", &req.rater_id);
        if req.prompt.len() > self.limits.max_prompt_bytes {
            bad.push(
                "prompt".into(),
                ErrorReason::TooLarge,
                format!(
                    "{} bytes, at most {}",
                    req.prompt.len(),
                    self.limits.max_prompt_bytes
                ),
            );
        }
        bad.into_result().map_err(Error::Invalid)?;
        self.sessions.verify("rater_id", &req.rater_id)?;
        let a = self.policy("policy_a", &req.policy_a, 0)?.clone();
        let b = self.policy("policy_b", &req.policy_b, 1)?.clone();
        self.pairs.check(&req.rater_id, 1)?;
        let prompt = if req.prompt.trim().is_empty() {
            let i = self.next_seed.load(Ordering::Relaxed) as usize % self.suggestions.len().max(1);
            self.suggestions.get(i).cloned().unwrap_or_default()
        } else {
            req.prompt.trim().to_owned()
        };
        let seed = self.next_seed.fetch_add(2, Ordering::Relaxed);
        let (frames, device, text) = (self.limits.clip_frames, self.device.clone(), prompt.clone());
        let (pa, pb) = (a.clone(), b.clone());
        let (ta, tb) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let embedding = encore_model::embed_captions(&[text.as_str()], &device)?;
            let clip = |hosted: &HostedPolicy, seed| -> Result<Vec<u32>, Error> {
                let frames = frames.min(hosted.policy.config().max_frames);
                let params = SamplingParams {
                    seed,
                    ..SamplingParams::default()
                };
                let mut samples =
                    encore_model::sample(&hosted.policy, &embedding, frames, &params)?;
                Ok(samples.tokens.pop().unwrap_or_default())
            };
            Ok((clip(&pa, seed)?, clip(&pb, seed + 1)?))
        })
        .await
        .map_err(|e| {
            Error::Invalid(Violations::one(
                "prompt",
                format!("generation stopped: {e}"),
            ))
        })??;
        let pair = ClipPair {
            prompt: prompt.clone(),
            a: Some(self.keep(&prompt, &a, ta).await?),
            b: Some(self.keep(&prompt, &b, tb).await?),
        };
        Ok(pair)
    }

    /// Stores one served clip under a fresh id.
    async fn keep(
        &self,
        prompt: &str,
        hosted: &HostedPolicy,
        tokens: Vec<u32>,
    ) -> Result<Clip, Error> {
        let clip_id = format!(
            "c{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let clip = Clip {
            audio_path: format!("clips/{clip_id}.wav"),
            clip_id: clip_id.clone(),
            policy: hosted.name.clone(),
            policy_version: hosted.version,
            tokens,
        };
        // Kept as a one-clip pair: the clip and the prompt it was made for.
        let kept = ClipPair {
            prompt: prompt.to_owned(),
            a: Some(clip.clone()),
            b: None,
        };
        self.store
            .put_clip(&clip_id, kept.encode_to_vec(), self.limits.clip_ttl)
            .await?;
        Ok(clip)
    }

    /// A served clip and its prompt, if still kept.
    pub async fn clip(&self, clip_id: &str) -> Result<Option<(String, Clip)>, Error> {
        let Some(bytes) = self.store.get_clip(clip_id).await? else {
            return Ok(None);
        };
        let kept = ClipPair::decode(bytes.as_slice())?;
        Ok(kept.a.map(|clip| (kept.prompt, clip)))
    }

    /// A served clip as a WAV file.
    pub async fn clip_wav(&self, clip_id: &str) -> Result<Vec<u8>, Error> {
        let (_, clip) = self
            .clip(clip_id)
            .await?
            .ok_or_else(|| Error::UnknownClip {
                field: "clip_id".into(),
                clip_id: clip_id.to_owned(),
            })?;
        let samples = encore_codec::render(&clip.tokens)?;
        Ok(encore_codec::wav_bytes(&samples)?)
    }

    fn check_id(&self, bad: &mut Violations, field: &str, value: &str) {
        if value.is_empty() {
            bad.invalid(field, "required");
        } else if value.len() > self.limits.max_id_bytes {
            bad.push(
                field.to_owned(),
                ErrorReason::TooLarge,
                format!(
                    "{} bytes, at most {}",
                    value.len(),
                    self.limits.max_id_bytes
                ),
            );
        }
    }

    fn check_comparison(&self, bad: &mut Violations, path: &str, c: &Comparison) {
        self.check_id(bad, &format!("{path}.client_key"), &c.client_key);
        self.check_id(bad, &format!("{path}.rater_id"), &c.rater_id);
        for (field, id) in [("clip_a", &c.clip_a), ("clip_b", &c.clip_b)] {
            if id.is_empty() {
                bad.invalid(format!("{path}.{field}"), "required");
            }
        }
        if !c.clip_a.is_empty() && c.clip_a == c.clip_b {
            bad.invalid(format!("{path}.clip_b"), "the same clip as clip_a");
        }
        match Choice::try_from(c.choice) {
            Ok(Choice::A | Choice::B | Choice::Neither) => {}
            Ok(Choice::Unspecified) => bad.invalid(
                format!("{path}.choice"),
                "required: CHOICE_A, CHOICE_B or CHOICE_NEITHER",
            ),
            Err(_) => bad.invalid(
                format!("{path}.choice"),
                format!("unknown value {}", c.choice),
            ),
        }
        for (field, rating) in [("rating_a", c.rating_a), ("rating_b", c.rating_b)] {
            if rating > 5 {
                bad.invalid(
                    format!("{path}.{field}"),
                    format!("{rating}: ratings are 1 to 5, or 0 for none"),
                );
            }
        }
    }

    /// Validates every comparison, checks the raters' rates, then stores
    /// each once per rater and client key.
    pub async fn submit(
        &self,
        req: SubmitComparisonsRequest,
    ) -> Result<SubmitComparisonsResponse, Error> {
        let answer = self.submit_inner(req).await;
        match &answer {
            Ok(done) => {
                if let Some(m) = &self.metrics {
                    for r in &done.results {
                        let outcome = if r.stored { "stored" } else { "duplicate" };
                        m.comparisons.with_label_values(&[outcome]).inc();
                    }
                }
            }
            Err(e) => self.refused("SubmitComparisons", e),
        }
        answer
    }

    async fn submit_inner(
        &self,
        req: SubmitComparisonsRequest,
    ) -> Result<SubmitComparisonsResponse, Error> {
        let mut bad = Violations::default();
        if req.comparisons.is_empty() {
            bad.invalid("comparisons", "at least one");
        } else if req.comparisons.len() > self.limits.max_batch {
            bad.push(
                "comparisons".into(),
                ErrorReason::TooLarge,
                format!(
                    "{} comparisons, at most {}",
                    req.comparisons.len(),
                    self.limits.max_batch
                ),
            );
        }
        for (i, c) in req
            .comparisons
            .iter()
            .take(self.limits.max_batch)
            .enumerate()
        {
            self.check_comparison(&mut bad, &format!("comparisons[{i}]"), c);
        }
        bad.into_result().map_err(Error::Invalid)?;
        for (i, c) in req.comparisons.iter().enumerate() {
            self.sessions
                .verify(&format!("comparisons[{i}].rater_id"), &c.rater_id)?;
        }

        // Every clip must have been served, and each pair made for one prompt.
        let mut bad = Violations::default();
        let mut records = Vec::with_capacity(req.comparisons.len());
        let now = prost_types::Timestamp::from(std::time::SystemTime::now());
        for (i, c) in req.comparisons.iter().enumerate() {
            let mut found = Vec::with_capacity(2);
            for (field, id) in [("clip_a", &c.clip_a), ("clip_b", &c.clip_b)] {
                let clip = self.clip(id).await?.ok_or_else(|| Error::UnknownClip {
                    field: format!("comparisons[{i}].{field}"),
                    clip_id: id.clone(),
                })?;
                found.push(clip);
            }
            let (prompt_b, b) = found.pop().unwrap_or_default();
            let (prompt_a, a) = found.pop().unwrap_or_default();
            if prompt_a != prompt_b {
                bad.invalid(
                    format!("comparisons[{i}].clip_b"),
                    "was generated for another prompt than clip_a",
                );
            }
            records.push(StoredComparison {
                prompt: prompt_a,
                a: Some(a),
                b: Some(b),
                choice: c.choice,
                rating_a: c.rating_a,
                rating_b: c.rating_b,
                rater_id: c.rater_id.clone(),
                client_key: c.client_key.clone(),
                time: Some(now),
            });
        }
        bad.into_result().map_err(Error::Invalid)?;

        // Rates per rater, all checked before anything is stored.
        let mut per_rater: std::collections::BTreeMap<&str, usize> = Default::default();
        for c in &req.comparisons {
            *per_rater.entry(c.rater_id.as_str()).or_default() += 1;
        }
        for (rater, n) in per_rater {
            self.comparisons.check(rater, n)?;
        }

        let mut results = Vec::with_capacity(records.len());
        for record in records {
            let put = self
                .store
                .put_preference(&record.rater_id, &record.client_key, record.encode_to_vec())
                .await?;
            results.push(match put {
                RecordPut::Stored(record) => SubmittedComparison {
                    record,
                    stored: true,
                },
                RecordPut::Duplicate(record) => SubmittedComparison {
                    record,
                    stored: false,
                },
            });
        }
        Ok(SubmitComparisonsResponse { results })
    }
}

/// `encore.v1.PreferenceService` over [`Preferences`].
#[derive(Debug, Clone)]
pub struct PreferenceServer(pub Arc<Preferences>);

#[tonic::async_trait]
impl PreferenceService for PreferenceServer {
    async fn start_session(
        &self,
        _request: Request<StartSessionRequest>,
    ) -> Result<Response<RaterSession>, Status> {
        let rater_id = self.0.start_session()?;
        Ok(Response::new(RaterSession { rater_id }))
    }

    async fn get_pair(
        &self,
        request: Request<GetPairRequest>,
    ) -> Result<Response<ClipPair>, Status> {
        Ok(Response::new(self.0.get_pair(request.into_inner()).await?))
    }

    async fn submit_comparisons(
        &self,
        request: Request<SubmitComparisonsRequest>,
    ) -> Result<Response<SubmitComparisonsResponse>, Status> {
        Ok(Response::new(self.0.submit(request.into_inner()).await?))
    }
}

/// The service's Prometheus metrics, under `encore_prefs_*`:
///
/// | metric | type | what |
/// | --- | --- | --- |
/// | `encore_prefs_pairs_total` | counter | pairs served |
/// | `encore_prefs_pair_seconds` | histogram | time to generate and keep a pair |
/// | `encore_prefs_comparisons_total{state}` | counter | comparisons `stored`, or recognised as a `duplicate` retry |
/// | `encore_prefs_refused_total{method,code}` | counter | calls refused, by gRPC code |
#[derive(Debug, Clone)]
pub struct Metrics {
    pairs: prometheus::IntCounter,
    pair_seconds: prometheus::Histogram,
    comparisons: prometheus::IntCounterVec,
    refused: prometheus::IntCounterVec,
}

impl Metrics {
    fn new(registry: &prometheus::Registry) -> Result<Self, encore_telemetry::Error> {
        use encore_telemetry::metrics::{LATENCY_BUCKETS_SECONDS, Label, Subsystem};
        let m = Subsystem::new(registry, "prefs")?;
        Ok(Self {
            pairs: m.counter("pairs_total", "Pairs served.")?,
            pair_seconds: m.histogram(
                "pair_seconds",
                "Time to generate and keep a pair.",
                &LATENCY_BUCKETS_SECONDS,
            )?,
            comparisons: m.counter_vec(
                "comparisons_total",
                "Comparisons stored, or recognised as a duplicate retry.",
                &[Label::State],
            )?,
            refused: m.counter_vec(
                "refused_total",
                "Calls refused, by gRPC code.",
                &[Label::Method, Label::Code],
            )?,
        })
    }
}

//! `encore.v1.RewardService`: the rpc handlers, between the wire and the
//! batchers.
//!
//! A Score request is stamped with its arrival time and deadline as it comes
//! off the connection ([`stamp_arrival`]), validated whole
//! ([`crate::validate`]), its EnCodec codes (if any) decoded to audio once
//! ([`crate::codec`]), fanned out to the batcher of every model it uses,
//! and answered when all of them have replied or its deadline has passed,
//! whichever comes first. DescribeModels answers from a table built once at
//! start-up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use encore_proto::v1::reward_service_server::RewardService;
use encore_proto::v1::{
    DescribeModelsRequest, DescribeModelsResponse, ItemScores, RewardModelInfo, Score,
    ScoreRequest, ScoreResponse,
};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use crate::batcher::{Batcher, Item, Items};
use crate::codec::AudioCodec;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, UNKNOWN_MODEL};
use crate::validate::{CodecLimits, Limits, ModelLimits, validate};

/// How much earlier than the caller's deadline the server gives up. tonic's
/// transport enforces `grpc-timeout` as well, with a timer started a moment
/// before ours, and answers CANCELLED when it fires; answering a little
/// sooner makes the caller see DEADLINE_EXCEEDED, from us, in time.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(1);

/// When a request arrived and when its caller stops waiting, stamped into
/// the request's extensions by [`stamp_arrival`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival {
    /// When the request came off the connection.
    pub at: Instant,
    /// When the server stops working on it: the caller's `grpc-timeout`
    /// less [`DEADLINE_MARGIN`], if it sent one.
    pub deadline: Option<Instant>,
}

impl Arrival {
    fn from_metadata(metadata: &MetadataMap) -> Self {
        let at = Instant::now();
        let deadline = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            // A timeout too far out for the clock means no deadline.
            .and_then(|timeout| at.checked_add(timeout.saturating_sub(DEADLINE_MARGIN)));
        Self { at, deadline }
    }
}

/// A tonic interceptor that stamps each request with its [`Arrival`]. It
/// runs as the request is dispatched, before the body is read, so the
/// deadline counts from the same moment as the transport's; a request whose
/// deadline is already spent is answered here, without waiting for its
/// body (the transport would answer CANCELLED if reading it took longer).
#[allow(clippy::result_large_err)] // tonic's `Interceptor` signature.
pub(crate) fn stamp_arrival(mut request: Request<()>) -> Result<Request<()>, Status> {
    let arrival = Arrival::from_metadata(request.metadata());
    if arrival.deadline.is_some_and(|d| d <= arrival.at) {
        return Err(Error::DeadlineExceeded("before the request was read").into());
    }
    request.extensions_mut().insert(arrival);
    Ok(request)
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit, `H`, `M`,
/// `S`, `m` (milliseconds), `u` (microseconds) or `n` (nanoseconds). An
/// unparsable value is ignored, as tonic's transport ignores it.
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit_at = value.len().checked_sub(1)?;
    if !value.is_char_boundary(unit_at) {
        return None;
    }
    let (digits, unit) = value.split_at(unit_at);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// One hosted model as the handlers see it.
pub(crate) struct Hosted {
    /// What DescribeModels says about it.
    pub info: RewardModelInfo,
    /// What validation checks against.
    pub limits: ModelLimits,
    /// Where its work goes.
    pub batcher: Batcher,
}

/// The RewardService implementation; cheap to clone.
#[derive(Clone)]
pub(crate) struct RewardServer {
    shared: Arc<Shared>,
}

struct Shared {
    /// Sorted by name.
    hosted: Vec<Hosted>,
    /// `hosted[i].limits`, for the validator.
    model_limits: Vec<ModelLimits>,
    limits: Limits,
    /// Decodes items sent as EnCodec codes, if the server has a codec.
    codec: Option<Arc<AudioCodec>>,
    metrics: Metrics,
}

impl RewardServer {
    /// A server for `hosted`, in any order.
    pub(crate) fn new(
        mut hosted: Vec<Hosted>,
        limits: Limits,
        codec: Option<Arc<AudioCodec>>,
        metrics: Metrics,
    ) -> Self {
        hosted.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        let model_limits = hosted.iter().map(|h| h.limits.clone()).collect();
        Self {
            shared: Arc::new(Shared {
                hosted,
                model_limits,
                limits,
                codec,
                metrics,
            }),
        }
    }
}

impl Shared {
    /// Scores a request. Returns the indices of the models it used (for
    /// the metrics), whatever the outcome.
    async fn score(
        &self,
        request: ScoreRequest,
        deadline: Option<Instant>,
    ) -> (Vec<usize>, Result<ScoreResponse>) {
        let codec = self.codec.as_deref().map(|c| c as &dyn CodecLimits);
        let used = match validate(&request, &self.limits, &self.model_limits, codec) {
            Ok(used) => used,
            Err(violations) => {
                // Label the failure with the hosted models the request did
                // name correctly, if any.
                let mut named: Vec<usize> = request
                    .models
                    .iter()
                    .filter_map(|n| self.model_limits.iter().position(|m| &m.name == n))
                    .collect();
                named.sort_unstable();
                named.dedup();
                return (named, Err(Error::InvalidRequest(violations)));
            }
        };
        tracing::Span::current().record(
            "models",
            tracing::field::display(
                used.iter()
                    .map(|&i| self.hosted[i].info.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        );
        let result = self.score_valid(request, &used, deadline).await;
        (used, result)
    }

    /// The items as the models take them: EnCodec codes decoded to audio
    /// off the runtime (the codec's kernels block), within the deadline.
    async fn prepare(
        &self,
        items: Vec<encore_proto::v1::ScoreItem>,
        deadline: Option<Instant>,
    ) -> Result<Items> {
        let codec = match &self.codec {
            Some(codec) if items.iter().any(|i| i.codebooks > 1) => codec.clone(),
            // Validation refuses codes when there is no codec.
            _ => return Ok(items.into_iter().map(Item::from).collect()),
        };
        let coded = items.iter().filter(|i| i.codebooks > 1).count() as u64;
        let started = Instant::now();
        let decode = tokio::task::spawn_blocking(move || codec.prepare(items));
        let decoded = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), decode)
                .await
                .map_err(|_| Error::DeadlineExceeded("while the codes were decoded"))?,
            None => decode.await,
        };
        let items =
            decoded.map_err(|e| Error::Decode(format!("the decoding task failed: {e}")))??;
        self.metrics.decoded_items.inc_by(coded);
        self.metrics
            .decode_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(items.into())
    }

    async fn score_valid(
        &self,
        request: ScoreRequest,
        used: &[usize],
        deadline: Option<Instant>,
    ) -> Result<ScoreResponse> {
        let items = self.prepare(request.items, deadline).await?;
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(Error::DeadlineExceeded("before the request was queued"));
        }
        // Every model's entry is queued before any is awaited, so the
        // models score this request concurrently. If one queue is full the
        // entries already queued are withdrawn when their receivers drop.
        let mut pending = Vec::with_capacity(used.len());
        for &i in used {
            let receiver = self.hosted[i].batcher.submit(items.clone(), deadline)?;
            pending.push((i, receiver));
        }
        let collect = async {
            let mut scores = Vec::with_capacity(pending.len());
            for (i, receiver) in pending {
                let reply = receiver.await.map_err(|_| {
                    Error::Worker(format!(
                        "the worker of model {:?} stopped without answering",
                        self.hosted[i].info.name
                    ))
                })?;
                scores.push((i, reply?));
            }
            Ok::<_, Error>(scores)
        };
        let scores = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), collect)
                .await
                .map_err(|_| Error::DeadlineExceeded("while the request was queued or scored"))??,
            None => collect.await?,
        };

        let mut results: Vec<ItemScores> = (0..items.len())
            .map(|_| ItemScores {
                scores: HashMap::with_capacity(scores.len()),
            })
            .collect();
        let mut model_sha256 = HashMap::with_capacity(scores.len());
        for (i, values) in scores {
            let info = &self.hosted[i].info;
            for (result, value) in results.iter_mut().zip(values) {
                result.scores.insert(
                    info.name.clone(),
                    Score {
                        value: f64::from(value),
                        details: None,
                    },
                );
            }
            model_sha256.insert(info.name.clone(), info.sha256.clone());
        }
        Ok(ScoreResponse {
            results,
            model_sha256,
        })
    }
}

#[tonic::async_trait]
impl RewardService for RewardServer {
    #[tracing::instrument(
        skip_all,
        fields(items = request.get_ref().items.len(), models = tracing::field::Empty)
    )]
    async fn score(
        &self,
        request: Request<ScoreRequest>,
    ) -> Result<Response<ScoreResponse>, Status> {
        let arrival = match request.extensions().get::<Arrival>() {
            Some(arrival) => *arrival,
            // Served without the interceptor (it is always installed by
            // `crate::server`); the deadline then counts from here.
            None => Arrival::from_metadata(request.metadata()),
        };
        let shared = &self.shared;
        let (used, result) = shared.score(request.into_inner(), arrival.deadline).await;

        let code = result.as_ref().map_or_else(Error::code, |_| Code::Ok);
        let seconds = arrival.at.elapsed().as_secs_f64();
        if used.is_empty() {
            shared.metrics.request(UNKNOWN_MODEL, code, seconds);
        }
        for &i in &used {
            shared
                .metrics
                .request(&shared.hosted[i].info.name, code, seconds);
        }
        match result {
            Ok(response) => Ok(Response::new(response)),
            Err(err) => {
                if code == Code::Internal {
                    tracing::error!(error = %err, "score failed");
                } else {
                    tracing::debug!(error = %err, "score refused");
                }
                Err(err.into())
            }
        }
    }

    #[tracing::instrument(skip_all)]
    async fn describe_models(
        &self,
        _request: Request<DescribeModelsRequest>,
    ) -> Result<Response<DescribeModelsResponse>, Status> {
        Ok(Response::new(DescribeModelsResponse {
            models: self.shared.hosted.iter().map(|h| h.info.clone()).collect(),
            audio_codec: self.shared.codec.as_ref().map(|c| c.info()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_like_the_spec_says() {
        assert_eq!(
            parse_grpc_timeout("3H"),
            Some(Duration::from_secs(3 * 3600))
        );
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123", "123456789m", "12x", "-1m", "1.5S", "1é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_deadline_is_the_timeout_less_the_margin() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "100m".parse().unwrap());
        let arrival = Arrival::from_metadata(&metadata);
        let deadline = arrival.deadline.unwrap();
        assert_eq!(
            deadline - arrival.at,
            Duration::from_millis(100) - DEADLINE_MARGIN
        );
        // The largest timeout the header can say does not overflow the clock.
        metadata.insert("grpc-timeout", "99999999H".parse().unwrap());
        let _ = Arrival::from_metadata(&metadata);
        assert!(
            Arrival::from_metadata(&MetadataMap::new())
                .deadline
                .is_none()
        );
    }
}

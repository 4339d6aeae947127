//! Scoring rollouts on the job's reward servers: one Score call per reward
//! model per batch, all models at once, each with a deadline, retried with
//! exponential back-off on errors a retry can fix (the server is down,
//! overloaded, or slow), spreading tries over the model's replicas. Every
//! call carries the worker token, which reward servers require.
//!
//! A reward server that goes away stalls the actor (it keeps retrying,
//! holding its rollouts) instead of crashing it or dropping work; only a
//! refusal no retry can fix (INVALID_ARGUMENT: our bug or a model that does
//! not accept the clips) fails the batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use encore_client::BearerToken;
use encore_proto::v1::reward_service_client::RewardServiceClient;
use encore_proto::v1::{RewardEndpoint, Score, ScoreItem, ScoreRequest};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The replicas of one reward model.
#[derive(Debug, Clone)]
struct Replicas {
    channels: Vec<InterceptedService<Channel, BearerToken>>,
    next: Arc<AtomicUsize>,
}

/// Clients of every reward model a stage uses.
#[derive(Debug, Clone)]
pub struct RewardClients {
    models: BTreeMap<String, Replicas>,
    deadline: Duration,
    max_backoff: Duration,
    metrics: Metrics,
}

impl RewardClients {
    /// Lazily connected clients for `endpoints` (connections are made on
    /// first use, and re-made after a failure, by tonic), presenting the
    /// worker `token` that reward servers require.
    pub fn new(
        endpoints: &[RewardEndpoint],
        token: &BearerToken,
        deadline: Duration,
        max_backoff: Duration,
        metrics: Metrics,
    ) -> Result<Self> {
        let mut models = BTreeMap::new();
        for endpoint in endpoints {
            let mut channels = Vec::with_capacity(endpoint.addresses.len());
            for address in &endpoint.addresses {
                let url = format!("http://{address}");
                let channel = Channel::from_shared(url.clone())
                    .map_err(|e| Error::Config(format!("reward server address {url:?}: {e}")))?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .connect_lazy();
                channels.push(InterceptedService::new(channel, token.clone()));
            }
            models.insert(
                endpoint.model.clone(),
                Replicas {
                    channels,
                    next: Arc::new(AtomicUsize::new(0)),
                },
            );
        }
        Ok(Self {
            models,
            deadline,
            max_backoff,
            metrics,
        })
    }

    /// The model names scored.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Scores `items` with every model, concurrently; returns one map of
    /// scores by model per item. Retries until it succeeds, `cancel` fires
    /// ([`Error::ShuttingDown`]), or a model refuses the items for good.
    pub async fn score(
        &self,
        items: Vec<ScoreItem>,
        cancel: &CancellationToken,
    ) -> Result<Vec<HashMap<String, Score>>> {
        let items = Arc::new(items);
        let mut calls = JoinSet::new();
        for (model, replicas) in &self.models {
            let (model, replicas, items) = (model.clone(), replicas.clone(), items.clone());
            let (deadline, max_backoff, metrics, cancel) = (
                self.deadline,
                self.max_backoff,
                self.metrics.clone(),
                cancel.clone(),
            );
            calls.spawn(async move {
                let scores = score_one(
                    &model,
                    &replicas,
                    &items,
                    deadline,
                    max_backoff,
                    &metrics,
                    &cancel,
                )
                .await?;
                Ok::<_, Error>((model, scores))
            });
        }
        let mut out: Vec<HashMap<String, Score>> = vec![HashMap::new(); items.len()];
        while let Some(joined) = calls.join_next().await {
            let (model, scores) =
                joined.map_err(|e| Error::Config(format!("a scoring task failed: {e}")))??;
            for (slot, score) in out.iter_mut().zip(scores) {
                slot.insert(model.clone(), score);
            }
        }
        Ok(out)
    }
}

/// Whether a failed Score call may succeed if tried again.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
    )
}

async fn score_one(
    model: &str,
    replicas: &Replicas,
    items: &[ScoreItem],
    deadline: Duration,
    max_backoff: Duration,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> Result<Vec<Score>> {
    if replicas.channels.is_empty() {
        return Err(Error::Config(format!(
            "no reward server hosts model {model:?}"
        )));
    }
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        let index = replicas.next.fetch_add(1, Ordering::Relaxed) % replicas.channels.len();
        let mut client = RewardServiceClient::new(replicas.channels[index].clone())
            .max_decoding_message_size(64 << 20);
        let mut request = tonic::Request::new(ScoreRequest {
            items: items.to_vec(),
            models: vec![model.to_owned()],
        });
        request.set_timeout(deadline);
        let started = Instant::now();
        let answer = tokio::select! {
            () = cancel.cancelled() => return Err(Error::ShuttingDown),
            answer = client.score(request) => answer,
        };
        metrics.observe_score(
            model,
            started.elapsed(),
            answer.as_ref().err().map(|s| s.code()),
        );
        match answer {
            Ok(response) => {
                let results = response.into_inner().results;
                if results.len() != items.len() {
                    return Err(Error::rpc(
                        format!("Score({model})"),
                        tonic::Status::internal(format!(
                            "{} results for {} items",
                            results.len(),
                            items.len()
                        )),
                    ));
                }
                let mut scores = Vec::with_capacity(results.len());
                for mut result in results {
                    match result.scores.remove(model) {
                        Some(score) if score.value.is_finite() => scores.push(score),
                        _ => {
                            return Err(Error::rpc(
                                format!("Score({model})"),
                                tonic::Status::internal("a result lacks a finite score"),
                            ));
                        }
                    }
                }
                return Ok(scores);
            }
            Err(status) if retryable(status.code()) => {
                attempt += 1;
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::warn!(
                        model,
                        attempt,
                        code = ?status.code(),
                        message = status.message(),
                        "reward server failed; retrying"
                    );
                }
                tokio::select! {
                    () = cancel.cancelled() => return Err(Error::ShuttingDown),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
            }
            Err(status) => return Err(Error::rpc(format!("Score({model})"), status)),
        }
    }
}

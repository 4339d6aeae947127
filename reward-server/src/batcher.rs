//! Dynamic batching: one [`Batcher`] per hosted model, between the rpc
//! handlers (which [`Batcher::submit`] the items of a request) and the model
//! (which scores many requests' items in one forward pass).
//!
//! ```text
//!  handlers --submit--> Backlog (bounded, counted in items) --> worker thread --> model.score
//!     ^                                                            |
//!     +------------------- oneshot reply per entry ----------------+
//! ```
//!
//! An *entry* is the items of one request for this model, with the reply
//! channel and the request's deadline. The worker takes the first queued
//! entry, then keeps taking entries until the batch holds `max_batch_items`
//! items or `max_wait` has passed since the first entry was queued (entries
//! already waiting are taken without waiting further), scores them
//! together, and replies to each entry with its own slice of the scores.
//!
//! The worker is a dedicated OS thread because candle's CPU kernels are
//! synchronous and long: running them on the async runtime would stall
//! every other request. Admission is all-or-nothing per entry and never
//! blocks the handler: a full queue answers RESOURCE_EXHAUSTED at once.
//!
//! Entries nobody waits for any more (the handler gave up at its deadline,
//! or the client went away) are dropped unscored when the worker reaches
//! them, so a backlog of dead requests costs no model time. A [`Gate`] can
//! hold the workers before their next batch, which is how tests fill a
//! queue deterministically.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use encore_proto::v1::ScoreItem;
use encore_reward::{Clip, RewardError, RewardModel, ScoreInput};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::metrics::ModelMetrics;

/// Anything that scores a batch of items: a [`RewardModel`] in the server,
/// a plain function in this module's tests.
pub(crate) trait Scorer: Send + 'static {
    /// One score per input, in order.
    fn score(&self, items: &[ScoreInput<'_>]) -> Result<Vec<f32>, RewardError>;
}

impl Scorer for RewardModel {
    fn score(&self, items: &[ScoreInput<'_>]) -> Result<Vec<f32>, RewardError> {
        RewardModel::score(self, items)
    }
}

/// How a batcher forms batches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchConfig {
    /// Most items per forward pass.
    pub max_batch_items: usize,
    /// How long a batch waits for company after its first entry was queued.
    pub max_wait: Duration,
    /// Most items queued at once.
    pub queue_capacity: usize,
}

/// The items of one request, shared by the batchers of every model it
/// names.
pub(crate) type Items = Arc<[Item]>;

/// One item as the models take it.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    /// The prompt caption.
    pub caption: String,
    /// Its music.
    pub clip: OwnedClip,
}

/// The music of an item: the embedded codec's tokens, or the 16 kHz audio
/// the audio codec decoded from EnCodec codes.
#[derive(Debug, Clone)]
pub(crate) enum OwnedClip {
    /// Tokens of the embedded codec.
    Tokens(Vec<u32>),
    /// A 16 kHz mono waveform.
    Audio(Vec<f32>),
}

impl Item {
    /// The item as a model's input.
    fn input(&self) -> ScoreInput<'_> {
        ScoreInput {
            caption: &self.caption,
            clip: match &self.clip {
                OwnedClip::Tokens(tokens) => Clip::Tokens(tokens),
                OwnedClip::Audio(samples) => Clip::Audio(samples),
            },
        }
    }
}

impl From<ScoreItem> for Item {
    /// An item of the embedded codec's tokens.
    fn from(item: ScoreItem) -> Self {
        Item {
            caption: item.caption,
            clip: OwnedClip::Tokens(item.tokens),
        }
    }
}

/// What a handler receives for its entry: one score per item, or why not.
pub(crate) type Reply = Result<Vec<f32>>;

/// One request's items waiting for one model.
struct Entry {
    items: Items,
    deadline: Option<Instant>,
    queued_at: Instant,
    reply: oneshot::Sender<Reply>,
}

impl Entry {
    fn len(&self) -> usize {
        self.items.len()
    }
}

/// The backlog between the handlers and the worker: a bounded queue of
/// items waiting to be batched.
struct Backlog {
    state: Mutex<State>,
    /// Signalled when an entry arrives or the queue closes.
    changed: Condvar,
    capacity: usize,
    /// Recent duration of one batch, in microseconds (a moving average),
    /// from which overloaded callers are told when to come back.
    batch_micros: AtomicU64,
}

struct State {
    entries: VecDeque<Entry>,
    /// Items in `entries`.
    items: usize,
    closed: bool,
}

impl Backlog {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the queue consistent (every
        // critical section is a push or pop), so a poisoned lock is usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for the first entry of a batch while the gate is open; `None`
    /// once the queue is closed and empty.
    fn pop_first(&self, gate: &Gate, metrics: &ModelMetrics) -> Option<Entry> {
        let mut state = self.lock();
        loop {
            // Read under the queue's lock, which `Gate::open` takes before
            // notifying, so an opening cannot slip by unnoticed.
            if gate.is_open()
                && let Some(entry) = state.entries.pop_front()
            {
                state.items -= entry.len();
                metrics.queue_depth.set(state.items as f64);
                return Some(entry);
            }
            if state.closed && state.entries.is_empty() {
                return None;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Takes the next entry if it has at most `room` items, waiting for one
    /// until `until`. `None` when the batch is complete: time is up, the next
    /// entry does not fit, or the queue closed.
    fn pop_more(&self, until: Instant, room: usize, metrics: &ModelMetrics) -> Option<Entry> {
        let mut state = self.lock();
        loop {
            match state.entries.front() {
                Some(next) if next.len() <= room => {
                    let entry = state.entries.pop_front()?;
                    state.items -= entry.len();
                    metrics.queue_depth.set(state.items as f64);
                    return Some(entry);
                }
                Some(_) => return None,
                None if state.closed => return None,
                None => {}
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, until - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// How long a caller turned away should wait: the time the queue takes
    /// to drain at the recent pace, within [10 ms, 10 s].
    fn retry_after(&self, queued: usize, max_batch_items: usize) -> Duration {
        let batch = Duration::from_micros(self.batch_micros.load(Ordering::Relaxed));
        let batches = queued.div_ceil(max_batch_items.max(1)).max(1) as u32;
        batch
            .saturating_mul(batches)
            .clamp(Duration::from_millis(10), Duration::from_secs(10))
    }

    fn record_batch(&self, took: Duration) {
        let micros = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.batch_micros.load(Ordering::Relaxed);
        // An exponential moving average over roughly the last 8 batches.
        let new = if old == 0 {
            micros
        } else {
            old - old / 8 + micros / 8
        };
        self.batch_micros.store(new, Ordering::Relaxed);
    }
}

/// Holds the scoring workers while closed: a worker takes no new batch
/// until the gate opens (a batch already being formed or scored carries
/// on). Tests use it to fill queues deterministically. A gate is open
/// unless closed explicitly, and the server opens it when it shuts down so
/// that the workers can drain.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug, Default)]
struct GateInner {
    closed: AtomicBool,
    /// The queues whose workers wait on this gate, to wake when it opens.
    queues: Mutex<Vec<Weak<Backlog>>>,
}

impl Gate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// A closed gate.
    pub fn closed() -> Self {
        let gate = Self::default();
        gate.close();
        gate
    }

    /// Holds the workers before their next batch.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
    }

    /// Lets the workers go on.
    pub fn open(&self) {
        self.inner.closed.store(false, Ordering::SeqCst);
        let queues = self
            .inner
            .queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for queue in queues.iter().filter_map(Weak::upgrade) {
            // Taking the queue's lock orders this wake-up after any worker
            // that saw the gate closed has gone to sleep.
            drop(queue.lock());
            queue.changed.notify_all();
        }
    }

    /// Whether the workers may take new batches.
    pub fn is_open(&self) -> bool {
        !self.inner.closed.load(Ordering::SeqCst)
    }

    fn watch(&self, queue: &Arc<Backlog>) {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Arc::downgrade(queue));
    }
}

/// The handler side of one model's batching: admits entries into the queue
/// that the model's worker thread drains.
pub(crate) struct Batcher {
    model: String,
    queue: Arc<Backlog>,
    config: BatchConfig,
    metrics: ModelMetrics,
}

/// The worker thread of a [`Batcher`], to join at shutdown.
pub(crate) struct Worker {
    model: String,
    queue: Arc<Backlog>,
    thread: JoinHandle<()>,
}

impl Batcher {
    /// Starts the worker thread that scores with `scorer`.
    pub(crate) fn spawn(
        model: &str,
        scorer: impl Scorer,
        config: BatchConfig,
        gate: Gate,
        metrics: ModelMetrics,
    ) -> Result<(Batcher, Worker)> {
        let queue = Arc::new(Backlog {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                items: 0,
                closed: false,
            }),
            changed: Condvar::new(),
            capacity: config.queue_capacity,
            batch_micros: AtomicU64::new(0),
        });
        gate.watch(&queue);
        let thread = std::thread::Builder::new()
            .name(format!("score-{model}"))
            .spawn({
                let queue = queue.clone();
                let metrics = metrics.clone();
                let model = model.to_owned();
                move || work(&model, &queue, &scorer, config, &gate, &metrics)
            })
            .map_err(|e| Error::Worker(format!("starting the worker of model {model:?}: {e}")))?;
        let batcher = Batcher {
            model: model.to_owned(),
            queue: queue.clone(),
            config,
            metrics,
        };
        let worker = Worker {
            model: model.to_owned(),
            queue,
            thread,
        };
        Ok((batcher, worker))
    }

    /// Queues `items` for scoring. Never blocks: a full queue is an
    /// [`Error::Overloaded`] at once. The receiver yields the scores, in
    /// order; dropping it withdraws the entry.
    pub(crate) fn submit(
        &self,
        items: Items,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<Reply>> {
        let (reply, receiver) = oneshot::channel();
        let entry = Entry {
            items,
            deadline,
            queued_at: Instant::now(),
            reply,
        };
        let mut state = self.queue.lock();
        if state.closed {
            return Err(Error::ShuttingDown);
        }
        if state.items + entry.len() > self.queue.capacity {
            let queued = state.items;
            drop(state);
            return Err(Error::Overloaded {
                model: self.model.clone(),
                queued,
                capacity: self.queue.capacity,
                retry_after: self.queue.retry_after(queued, self.config.max_batch_items),
            });
        }
        state.items += entry.len();
        self.metrics.queue_depth.set(state.items as f64);
        state.entries.push_back(entry);
        drop(state);
        self.queue.changed.notify_one();
        Ok(receiver)
    }
}

impl Worker {
    /// Closes the queue to new entries; the worker scores what is queued,
    /// then its thread ends.
    pub(crate) fn close(&self) {
        self.queue.lock().closed = true;
        self.queue.changed.notify_all();
    }

    /// Closes the queue and waits for the thread to end.
    pub(crate) fn join(self) -> Result<()> {
        self.close();
        self.thread
            .join()
            .map_err(|_| Error::Worker(format!("the worker of model {:?} panicked", self.model)))
    }
}

/// The worker loop: form a batch, score it, reply; until the queue closes.
fn work(
    model: &str,
    queue: &Backlog,
    scorer: &dyn Scorer,
    config: BatchConfig,
    gate: &Gate,
    metrics: &ModelMetrics,
) {
    tracing::debug!(model, "scoring worker started");
    loop {
        let Some(first) = queue.pop_first(gate, metrics) else {
            break;
        };
        // Waiting is counted from when the first entry was queued, so a
        // backlog is scored at once rather than waiting max_wait again.
        let close_at = first.queued_at + config.max_wait;
        let mut items = first.len();
        let mut batch = vec![first];
        while items < config.max_batch_items {
            match queue.pop_more(close_at, config.max_batch_items - items, metrics) {
                Some(entry) => {
                    items += entry.len();
                    batch.push(entry);
                }
                None => break,
            }
        }

        let started = Instant::now();
        let batch = live_entries(batch, started, metrics);
        if batch.is_empty() {
            continue;
        }
        score_batch(model, scorer, batch, config.max_batch_items, metrics);
        queue.record_batch(started.elapsed());
    }
    tracing::debug!(model, "scoring worker stopped");
}

/// The entries still worth scoring, each with its time in the queue
/// recorded. Entries whose handler is gone are dropped; entries past their
/// deadline are answered DEADLINE_EXCEEDED (the handler, which stops
/// waiting at the same deadline, may have answered already).
fn live_entries(batch: Vec<Entry>, now: Instant, metrics: &ModelMetrics) -> Vec<Entry> {
    let mut live = Vec::with_capacity(batch.len());
    for entry in batch {
        metrics
            .queue_wait
            .observe(now.duration_since(entry.queued_at).as_secs_f64());
        if entry.reply.is_closed() {
            metrics.skipped_items.inc_by(entry.len() as u64);
        } else if entry.deadline.is_some_and(|d| d <= now) {
            metrics.skipped_items.inc_by(entry.len() as u64);
            let _ = entry
                .reply
                .send(Err(Error::DeadlineExceeded("while the request was queued")));
        } else {
            live.push(entry);
        }
    }
    live
}

/// Scores the entries of a batch together and replies to each. If the
/// batch fails, each entry is scored on its own, so that one request's bad
/// output (a non-finite score, a panic in the model) fails only that
/// request.
fn score_batch(
    model: &str,
    scorer: &dyn Scorer,
    batch: Vec<Entry>,
    max_batch_items: usize,
    metrics: &ModelMetrics,
) {
    let inputs: Vec<ScoreInput<'_>> = batch
        .iter()
        .flat_map(|entry| entry.items.iter())
        .map(Item::input)
        .collect();
    match score_chunks(model, scorer, &inputs, max_batch_items, metrics) {
        Ok(scores) => {
            let mut rest = scores.as_slice();
            for entry in batch {
                let (mine, others) = rest.split_at(entry.len());
                rest = others;
                let _ = entry.reply.send(Ok(mine.to_vec()));
            }
        }
        Err(e) if batch.len() == 1 => {
            if let Some(entry) = batch.into_iter().next() {
                let _ = entry.reply.send(Err(e));
            }
        }
        Err(_) => {
            drop(inputs);
            for entry in batch {
                let inputs: Vec<ScoreInput<'_>> = entry.items.iter().map(Item::input).collect();
                let reply = score_chunks(model, scorer, &inputs, max_batch_items, metrics);
                let _ = entry.reply.send(reply);
            }
        }
    }
}

/// Runs the scorer over `inputs` in forward passes of at most
/// `max_batch_items`. A non-finite score's index is made relative to
/// `inputs`. A panic inside the model fails this call only: the worker
/// lives on to serve the next batch.
fn score_chunks(
    model: &str,
    scorer: &dyn Scorer,
    inputs: &[ScoreInput<'_>],
    max_batch_items: usize,
    metrics: &ModelMetrics,
) -> Result<Vec<f32>> {
    let mut scores = Vec::with_capacity(inputs.len());
    for (c, chunk) in inputs.chunks(max_batch_items.max(1)).enumerate() {
        let offset = c * max_batch_items;
        let started = Instant::now();
        let scored = std::panic::catch_unwind(AssertUnwindSafe(|| scorer.score(chunk))).map_err(
            |panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Error::Worker(format!("model {model:?} panicked while scoring: {why}"))
            },
        )?;
        let chunk_scores = scored.map_err(|e| match e {
            RewardError::NonFinite { index } => Error::NonFinite {
                model: model.to_owned(),
                index: offset + index,
            },
            source => Error::Scoring {
                model: model.to_owned(),
                source: Box::new(source),
            },
        })?;
        if chunk_scores.len() != chunk.len() {
            return Err(Error::Worker(format!(
                "model {model:?} returned {} scores for {} items",
                chunk_scores.len(),
                chunk.len()
            )));
        }
        // Checked here too: the server promises finite scores whatever the
        // scorer does.
        if let Some(index) = chunk_scores.iter().position(|s| !s.is_finite()) {
            return Err(Error::NonFinite {
                model: model.to_owned(),
                index: offset + index,
            });
        }
        metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.batch_size.observe(chunk.len() as f64);
        metrics.items.inc_by(chunk.len() as u64);
        scores.extend(chunk_scores);
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use prometheus::Registry;

    use super::*;
    use crate::metrics::Metrics;

    /// Scores each item as its first token, records the size of every
    /// call, returns NaN for token 666 and panics on token 999.
    struct Recorder {
        calls: Arc<Mutex<Vec<usize>>>,
    }

    /// The first token of a clip (the first sample of an audio clip).
    fn first(input: &ScoreInput<'_>) -> u32 {
        match input.clip {
            Clip::Tokens(tokens) => tokens[0],
            Clip::Audio(samples) => samples[0] as u32,
        }
    }

    impl Scorer for Recorder {
        fn score(&self, items: &[ScoreInput<'_>]) -> Result<Vec<f32>, RewardError> {
            self.calls.lock().unwrap().push(items.len());
            assert!(items.iter().all(|i| first(i) != 999), "token 999");
            Ok(items
                .iter()
                .map(|i| {
                    if first(i) == 666 {
                        f32::NAN
                    } else {
                        first(i) as f32
                    }
                })
                .collect())
        }
    }

    struct Setup {
        batcher: Batcher,
        worker: Worker,
        calls: Arc<Mutex<Vec<usize>>>,
        gate: Gate,
        metrics: ModelMetrics,
    }

    fn setup(max_batch_items: usize, queue_capacity: usize) -> Setup {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let gate = Gate::closed();
        let metrics = Metrics::new(&Registry::new()).unwrap().model("m");
        let config = BatchConfig {
            max_batch_items,
            max_wait: Duration::ZERO,
            queue_capacity,
        };
        let scorer = Recorder {
            calls: calls.clone(),
        };
        let (batcher, worker) =
            Batcher::spawn("m", scorer, config, gate.clone(), metrics.clone()).unwrap();
        Setup {
            batcher,
            worker,
            calls,
            gate,
            metrics,
        }
    }

    /// Items whose scores are their first tokens.
    fn items(first_tokens: &[u32]) -> Items {
        first_tokens
            .iter()
            .map(|&t| Item {
                caption: "c".into(),
                clip: OwnedClip::Tokens(vec![t, 3]),
            })
            .collect::<Vec<_>>()
            .into()
    }

    #[test]
    fn queued_entries_are_scored_in_one_call_and_each_gets_its_own_scores() {
        let s = setup(8, 16);
        let a = s.batcher.submit(items(&[1]), None).unwrap();
        let b = s.batcher.submit(items(&[2, 3]), None).unwrap();
        let c = s.batcher.submit(items(&[4]), None).unwrap();
        assert_eq!(s.metrics.queue_depth.get(), 4.0);
        s.gate.open();
        assert_eq!(a.blocking_recv().unwrap().unwrap(), [1.0]);
        assert_eq!(b.blocking_recv().unwrap().unwrap(), [2.0, 3.0]);
        assert_eq!(c.blocking_recv().unwrap().unwrap(), [4.0]);
        assert_eq!(*s.calls.lock().unwrap(), [4]);
        assert_eq!(s.metrics.items.get(), 4);
        assert_eq!(s.metrics.batch_size.get_sample_sum(), 4.0);
        assert_eq!(s.metrics.queue_depth.get(), 0.0);
        s.worker.join().unwrap();
    }

    #[test]
    fn a_batch_never_exceeds_max_batch_items_and_requests_are_not_split_across_batches() {
        let s = setup(4, 64);
        let receivers: Vec<_> = [
            &[1u32, 2, 3][..],
            &[4, 5, 6],
            &[7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
        ]
        .into_iter()
        .map(|t| s.batcher.submit(items(t), None).unwrap())
        .collect();
        s.gate.open();
        let scores: Vec<Vec<f32>> = receivers
            .into_iter()
            .map(|r| r.blocking_recv().unwrap().unwrap())
            .collect();
        assert_eq!(scores[2], (7..=16).map(|t| t as f32).collect::<Vec<_>>());
        // 3 + 3 does not fit in 4; the 10-item request is scored in passes
        // of at most 4.
        assert_eq!(*s.calls.lock().unwrap(), [3, 3, 4, 4, 2]);
        s.worker.join().unwrap();
    }

    #[test]
    fn a_full_queue_turns_requests_away_with_a_retry_delay() {
        let s = setup(8, 4);
        let a = s.batcher.submit(items(&[1, 2, 3]), None).unwrap();
        match s.batcher.submit(items(&[4, 5]), None) {
            Err(Error::Overloaded {
                queued,
                capacity,
                retry_after,
                ..
            }) => {
                assert_eq!((queued, capacity), (3, 4));
                assert!(retry_after >= Duration::from_millis(10));
            }
            other => panic!("expected Overloaded, got {:?}", other.map(|_| ())),
        }
        // What fits is still taken.
        let b = s.batcher.submit(items(&[6]), None).unwrap();
        s.gate.open();
        assert_eq!(a.blocking_recv().unwrap().unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(b.blocking_recv().unwrap().unwrap(), [6.0]);
        s.worker.join().unwrap();
    }

    #[test]
    fn expired_and_abandoned_entries_are_not_scored() {
        let s = setup(8, 16);
        let expired = s
            .batcher
            .submit(items(&[1, 1]), Some(Instant::now()))
            .unwrap();
        let abandoned = s.batcher.submit(items(&[2]), None).unwrap();
        drop(abandoned);
        let live = s
            .batcher
            .submit(items(&[3]), Some(Instant::now() + Duration::from_secs(60)))
            .unwrap();
        s.gate.open();
        assert_eq!(live.blocking_recv().unwrap().unwrap(), [3.0]);
        assert!(matches!(
            expired.blocking_recv().unwrap(),
            Err(Error::DeadlineExceeded(_))
        ));
        assert_eq!(*s.calls.lock().unwrap(), [1]);
        assert_eq!(s.metrics.skipped_items.get(), 3);
        s.worker.join().unwrap();
    }

    #[test]
    fn a_non_finite_score_fails_only_the_request_it_belongs_to() {
        let s = setup(8, 16);
        let good = s.batcher.submit(items(&[1]), None).unwrap();
        let bad = s.batcher.submit(items(&[2, 666]), None).unwrap();
        let also_good = s.batcher.submit(items(&[3]), None).unwrap();
        s.gate.open();
        assert_eq!(good.blocking_recv().unwrap().unwrap(), [1.0]);
        match bad.blocking_recv().unwrap() {
            Err(Error::NonFinite { model, index }) => assert_eq!((model.as_str(), index), ("m", 1)),
            other => panic!("expected NonFinite, got {other:?}"),
        }
        assert_eq!(also_good.blocking_recv().unwrap().unwrap(), [3.0]);
        // The failed batch of 4, then each request alone.
        assert_eq!(*s.calls.lock().unwrap(), [4, 1, 2, 1]);
        s.worker.join().unwrap();
    }

    #[test]
    fn a_panicking_model_fails_the_batch_and_the_worker_carries_on() {
        let s = setup(8, 16);
        let doomed = s.batcher.submit(items(&[999]), None).unwrap();
        s.gate.open();
        match doomed.blocking_recv().unwrap() {
            Err(Error::Worker(why)) => assert!(why.contains("token 999"), "{why}"),
            other => panic!("expected a worker error, got {other:?}"),
        }
        let fine = s.batcher.submit(items(&[7]), None).unwrap();
        assert_eq!(fine.blocking_recv().unwrap().unwrap(), [7.0]);
        s.worker.join().unwrap();
    }

    #[test]
    fn closing_drains_the_queue_and_refuses_new_work() {
        let s = setup(8, 16);
        let queued = s.batcher.submit(items(&[5]), None).unwrap();
        s.worker.close();
        assert!(matches!(
            s.batcher.submit(items(&[6]), None),
            Err(Error::ShuttingDown)
        ));
        s.gate.open();
        s.worker.join().unwrap();
        assert_eq!(queued.blocking_recv().unwrap().unwrap(), [5.0]);
    }

    #[test]
    fn batches_wait_for_company_until_max_wait() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let metrics = Metrics::new(&Registry::new()).unwrap().model("m");
        let config = BatchConfig {
            max_batch_items: 2,
            // Long enough that the second request always arrives in time;
            // the batch closes as soon as it is full, so the test is fast.
            max_wait: Duration::from_secs(60),
            queue_capacity: 16,
        };
        let scorer = Recorder {
            calls: calls.clone(),
        };
        let (batcher, worker) = Batcher::spawn("m", scorer, config, Gate::new(), metrics).unwrap();
        let a = batcher.submit(items(&[1]), None).unwrap();
        let b = batcher.submit(items(&[2]), None).unwrap();
        assert_eq!(a.blocking_recv().unwrap().unwrap(), [1.0]);
        assert_eq!(b.blocking_recv().unwrap().unwrap(), [2.0]);
        assert_eq!(*calls.lock().unwrap(), [2]);
        worker.join().unwrap();
    }
}

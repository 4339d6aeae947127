//! A job's events as a stream (what the coordinator's `JobService.Watch`
//! forwards), built once for both backends on [`Store::read_events`].
//!
//! The stream reads the stored history, so it cannot miss an event (the
//! terminal state change included): it replays every event after the
//! starting sequence, then waits for new ones with blocking reads. There is
//! no separate notification channel whose messages could be lost.

use std::sync::Arc;
use std::time::Duration;

use encore_proto::v1::JobEvent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Store;
use crate::error::Result;

/// Events of one job, in sequence order. Ends after yielding an error.
pub type EventStream = ReceiverStream<Result<JobEvent>>;

/// How long one blocking read waits before it is renewed; bounds how long a
/// dropped stream keeps its backend call alive.
const READ_WAIT: Duration = Duration::from_secs(10);
/// Events fetched per read.
const READ_BATCH: usize = 256;

/// Streams the events of `job_id` with a sequence above `after_sequence`
/// (0: the whole history), then every new one as it is appended. The stream
/// never ends on its own while the job exists (a caller that wants to stop
/// at the terminal state stops reading); dropping it stops the background
/// task within one read.
///
/// Must be called within a Tokio runtime.
pub fn subscribe(
    store: Arc<dyn Store>,
    job_id: impl Into<String>,
    after_sequence: u64,
) -> EventStream {
    let job_id = job_id.into();
    let (tx, rx) = mpsc::channel(READ_BATCH);
    tokio::spawn(async move {
        let mut after = after_sequence;
        loop {
            let read = tokio::select! {
                _ = tx.closed() => return,
                read = store.read_events(&job_id, after, READ_BATCH, READ_WAIT) => read,
            };
            match read {
                Ok(events) => {
                    for event in events {
                        after = event.sequence;
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(err) => {
                    // The receiver may be gone already; nothing else to do.
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

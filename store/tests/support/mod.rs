//! Test harness shared by the store's integration tests: a store of either
//! backend on a manual clock, a real `redis-server` on a free loopback port
//! (started per test, killed on drop), and builders of the protocol
//! messages the tests store.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use encore_proto::v1::{
    Job, JobEvent, JobSpec, JobState, JobStateChange, MetricPoint, PolicyVersion, Role,
    WeightManifest, job_event,
};
use encore_store::{
    Durability, EmbeddedOptions, EmbeddedStore, IdempotencyKey, ManualClock, Member, RedisConfig,
    RedisStore, Store,
};
pub use encore_testkit::RedisServer;
use tokio::time::Instant;

/// The backend under test and what it needs to be reopened.
pub enum Backend {
    /// An embedded store in a temp dir.
    Embedded {
        dir: tempfile::TempDir,
        store: Option<Arc<EmbeddedStore>>,
    },
    /// A Redis store on its own server.
    Redis { server: RedisServer, prefix: String },
}

/// A store on a manual clock, reopenable.
pub struct Harness {
    /// The backend.
    pub backend: Backend,
    /// The clock every deadline is measured on.
    pub clock: ManualClock,
    store: Option<Arc<dyn Store>>,
}

impl Harness {
    /// An embedded store in a fresh directory, syncing every write.
    pub async fn embedded() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut harness = Self {
            backend: Backend::Embedded { dir, store: None },
            clock: ManualClock::starting_now(),
            store: None,
        };
        harness.open().await;
        harness
    }

    /// A Redis store on a fresh server.
    pub async fn redis() -> Self {
        let server = RedisServer::start().await;
        let mut harness = Self {
            backend: Backend::Redis {
                server,
                prefix: "test:".into(),
            },
            clock: ManualClock::starting_now(),
            store: None,
        };
        harness.open().await;
        harness
    }

    /// Whether this is the embedded backend.
    pub fn is_embedded(&self) -> bool {
        matches!(self.backend, Backend::Embedded { .. })
    }

    async fn open(&mut self) {
        let clock = Arc::new(self.clock.clone());
        let store: Arc<dyn Store> = match &mut self.backend {
            Backend::Embedded { dir, store } => {
                let options = EmbeddedOptions {
                    durability: Durability::Fsync,
                    ..EmbeddedOptions::default()
                };
                let embedded = Arc::new(
                    EmbeddedStore::open(dir.path(), options, clock).expect("opening the store"),
                );
                *store = Some(embedded.clone());
                embedded
            }
            Backend::Redis { server, prefix } => {
                let config = RedisConfig::new(server.url()).with_prefix(prefix.clone());
                Arc::new(
                    RedisStore::connect(config, clock)
                        .await
                        .expect("connecting to redis"),
                )
            }
        };
        self.store = Some(store);
    }

    /// The store.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone().expect("store is open")
    }

    /// Closes the store and opens it again on the same data, as a restarted
    /// process would (the embedded store replays its directory; the Redis
    /// store reconnects to the same server). Every clone of the store handed
    /// out must have been dropped.
    pub async fn reopen(&mut self) {
        self.store = None;
        if let Backend::Embedded { store, .. } = &mut self.backend {
            let embedded = store.take().expect("store is open");
            assert_eq!(
                Arc::strong_count(&embedded),
                1,
                "a test still holds the embedded store"
            );
        }
        self.open().await;
    }

    /// Lets `by` pass for the idle time of queue entries: the manual clock
    /// for the embedded store; real time for Redis, which measures idle
    /// time on its own clock.
    pub async fn let_queue_idle(&self, by: Duration) {
        self.clock.advance(by);
        if !self.is_embedded() {
            tokio::time::sleep(by).await;
        }
    }

    /// Waits until at least one blocking read (of a queue or of job events)
    /// is waiting inside the store, so that what the test does next happens
    /// while it waits.
    pub async fn wait_for_blocked_reader(&self, job_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut backoff = Duration::from_millis(1);
        loop {
            let blocked = match &self.backend {
                Backend::Embedded { store, .. } => {
                    store
                        .as_ref()
                        .expect("store is open")
                        .blocked_readers(job_id)
                        > 0
                }
                Backend::Redis { server, .. } => {
                    let clients = server.command(&["CLIENT", "LIST"]).await;
                    clients.lines().any(|line| {
                        (line.contains("cmd=xreadgroup") || line.contains("cmd=xread"))
                            && line
                                .split(' ')
                                .any(|f| f.starts_with("flags=") && f.contains('b'))
                    })
                }
            };
            if blocked {
                return;
            }
            assert!(Instant::now() < deadline, "no reader blocked within 10 s");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(20));
        }
    }
}

// ----- Message builders -----

/// A job in `state` with a spec named after it.
pub fn job(job_id: &str, state: JobState) -> Job {
    Job {
        job_id: job_id.into(),
        spec: Some(JobSpec {
            name: format!("spec of {job_id}"),
            ..JobSpec::default()
        }),
        state: state as i32,
        stage: "main".into(),
        create_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        ..Job::default()
    }
}

/// An idempotency key.
pub fn key(key: &str, spec_sha256: &str) -> Option<IdempotencyKey> {
    Some(IdempotencyKey {
        key: key.into(),
        spec_sha256: spec_sha256.into(),
    })
}

/// A state-change event.
pub fn state_change(previous: JobState, state: JobState, message: &str) -> JobEvent {
    JobEvent {
        sequence: 0,
        time: Some(prost_types::Timestamp {
            seconds: 1_700_000_100,
            nanos: 0,
        }),
        event: Some(job_event::Event::StateChange(JobStateChange {
            previous: previous as i32,
            state: state as i32,
            message: message.into(),
        })),
    }
}

/// A metric point of `step`.
pub fn metric(step: u64) -> MetricPoint {
    MetricPoint {
        step,
        stage: "main".into(),
        combined_reward_mean: step as f64 * 0.25,
        kl: 0.01 * step as f64,
        ..MetricPoint::default()
    }
}

/// A member.
pub fn member(member_id: &str, instance_id: &str, role: Role) -> Member {
    Member {
        member_id: member_id.into(),
        role: role as i32,
        instance_id: instance_id.into(),
        ..Member::default()
    }
}

/// A weight manifest.
pub fn manifest(job_id: &str, version: u64, sha256: &str) -> WeightManifest {
    WeightManifest {
        version: Some(PolicyVersion {
            job_id: job_id.into(),
            version,
            sha256: sha256.into(),
        }),
        total_size_bytes: 1024 * (version + 1),
        format: 1,
        model_config_json: "{}".into(),
        step: version * 10,
        stage: "main".into(),
        ..WeightManifest::default()
    }
}

/// The state of a stored job.
pub fn state_of(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

//! Test harness shared by the store's integration tests: a store of either
//! backend on a manual clock, a real `redis-server` on a free loopback port
//! (started per test, killed on drop), and builders of the protocol
//! messages the tests store.

#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long a redis-server may take to answer PING after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `redis-server` child process on a free loopback port, without
/// persistence, killed when dropped.
pub struct RedisServer {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING. Panics, with the
    /// install command, if `redis-server` is not on PATH: the Redis half of
    /// the suite must fail, not pass silently, on a machine without it.
    pub async fn start() -> Self {
        let binary = find_on_path("redis-server").unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH; the Redis backend's tests need a real server: \
                 install it with `apt-get install -y redis-server`"
            )
        });
        let mut last_error = String::new();
        // A port found free can be taken by someone else before the server
        // binds it; then the server exits and we try another.
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir for redis-server");
            let mut child = Command::new(&binary)
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawning redis-server");
            match wait_ready(&mut child, port).await {
                Ok(()) => {
                    return Self {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                Err(err) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = err;
                }
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Sends one command in RESP and returns the raw reply text.
    pub async fn command(&self, args: &[&str]) -> String {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .await
            .expect("connecting to redis-server");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut reply = Vec::new();
        let mut buf = [0u8; 65536];
        // Replies used here are small; read until the server pauses.
        loop {
            let n = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
            match n {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("reading from redis-server: {e}"),
            }
            if reply.ends_with(b"\r\n") && !reply.is_empty() {
                break;
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a free port");
    listener.local_addr().expect("local addr").port()
}

/// Polls PING with a growing back-off until the server answers, it exits,
/// or READY_TIMEOUT passes.
async fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut backoff = Duration::from_millis(2);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server on port {port} exited with {status}"));
        }
        if ping(port).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("no PONG on port {port} within {READY_TIMEOUT:?}"));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = stream.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

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

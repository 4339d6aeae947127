//! WeightService end to end: a real tonic server on a loopback port with
//! the coordinator's bearer-token interceptor, over the embedded store and
//! over a real redis-server, driven through the generated client and the
//! crate's own client helpers (`weights::client`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use encore_client::weights::{self as client, FetchError, PublishData, PublishError};
use encore_coordinator::auth::Authenticator;
use encore_coordinator::metrics::Metrics;
use encore_coordinator::weights::{WeightOptions, Weights};
use encore_proto::v1::weight_service_client::WeightServiceClient;
use encore_proto::v1::weight_service_server::WeightServiceServer;
use encore_proto::v1::{ActorAssignment, Assignment, LearnerAssignment, Role, assignment};
use encore_proto::v1::{
    FetchRequest, GetManifestRequest, Job, JobState, ListVersionsRequest, Page, PublishHeader,
    PublishRequest, WeightChunk, WeightFormat, WeightManifest, fetch_response, publish_request,
};
use encore_store::{Member, Registration, Store, SystemClock};
use encore_testkit::RedisServer;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tonic_types::StatusExt;

const MIB: usize = 1 << 20;
const WORKER: &str = "worker-token";
const CLIENT: &str = "client-token";

use encore_client::BearerToken as Bearer;

type Client = WeightServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Embedded,
    Redis,
}

/// A WeightService on a loopback port over a fresh store.
struct Harness {
    store: Arc<dyn Store>,
    weights: Weights,
    metrics: Metrics,
    blob_dir: PathBuf,
    addr: SocketAddr,
    _dirs: tempfile::TempDir,
    _redis: Option<RedisServer>,
}

impl Harness {
    async fn start(backend: Backend, keep_versions: u32) -> Self {
        let dirs = tempfile::tempdir().unwrap();
        let (store, redis) = match backend {
            Backend::Embedded => {
                let uri = format!("embedded://{}", dirs.path().join("store").display());
                (
                    encore_store::open(&uri, Arc::new(SystemClock))
                        .await
                        .unwrap(),
                    None,
                )
            }
            Backend::Redis => {
                let server = RedisServer::start().await;
                let store = encore_store::open(&server.url(), Arc::new(SystemClock))
                    .await
                    .unwrap();
                (store, Some(server))
            }
        };
        let blob_dir = dirs.path().join("blobs");
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let shutdown = CancellationToken::new();
        let mut options = WeightOptions::new(&blob_dir);
        options.keep_versions = keep_versions;
        let weights =
            Weights::new(store.clone(), options, metrics.clone(), shutdown.clone()).unwrap();

        let auth = Authenticator::new([("alice", CLIENT)], WORKER).unwrap();
        let service =
            WeightServiceServer::with_interceptor(weights.clone(), move |r| auth.check(r));
        // Bound before the server task starts: connections made from now on
        // wait in the backlog, so no readiness wait is needed.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = shutdown.clone().cancelled_owned();
        tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop),
        );
        Self {
            store,
            weights,
            metrics,
            blob_dir,
            addr,
            _dirs: dirs,
            _redis: redis,
        }
    }

    async fn client_at(addr: SocketAddr, token: Option<&str>) -> Client {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let bearer = Bearer::new(token.unwrap_or_default()).unwrap();
        WeightServiceClient::with_interceptor(channel, bearer)
    }

    /// A client with the worker token, which only registers members.
    async fn registrar(&self) -> Client {
        Self::client_at(self.addr, Some(WORKER)).await
    }

    /// A client acting as a member of `job_id` with `details` (a learner
    /// rank or an actor), its record made in the store as Register and the
    /// reconciler make it (no reconciler runs here to undo it).
    async fn member(&self, job_id: &str, details: assignment::Details) -> Client {
        self.member_and_id(job_id, details).await.0
    }

    /// [`Harness::member`] and the member's id.
    async fn member_and_id(&self, job_id: &str, details: assignment::Details) -> (Client, String) {
        let role = match details {
            assignment::Details::Actor(_) => Role::Actor,
            assignment::Details::Learner(_) => Role::Learner,
        };
        let member_id = format!("{}-{:08x}", role.as_str_name(), rand::random::<u32>());
        let (token, sha256) = encore_coordinator::auth::member_token(&member_id);
        let member = Member {
            member_id: member_id.clone(),
            role: role as i32,
            instance_id: member_id.clone(),
            token_sha256: sha256.to_vec(),
            ..Member::default()
        };
        let Registration::Registered(record) = self
            .store
            .register_member(member, Duration::from_secs(600))
            .await
            .unwrap()
        else {
            panic!("{member_id} registered twice");
        };
        let mut assigned = record.member.clone();
        assigned.assignment = Some(Assignment {
            member_id,
            generation: 1,
            job_id: job_id.into(),
            details: Some(details),
            rollout_queue: None,
        });
        let id = assigned.member_id.clone();
        self.store
            .update_member(assigned, record.revision)
            .await
            .unwrap();
        (Self::client_at(self.addr, Some(&token)).await, id)
    }

    /// Rank 0 of `job_id`'s learner: the one member that publishes.
    async fn worker_for(&self, job_id: &str) -> Client {
        self.learner(job_id, 0).await
    }

    async fn learner(&self, job_id: &str, rank: u32) -> Client {
        let details = assignment::Details::Learner(LearnerAssignment {
            rank,
            ..LearnerAssignment::default()
        });
        self.member(job_id, details).await
    }

    async fn client(&self) -> Client {
        Self::client_at(self.addr, Some(CLIENT)).await
    }

    async fn job(&self, job_id: &str, state: JobState) {
        let job = Job {
            job_id: job_id.into(),
            state: state as i32,
            ..Default::default()
        };
        let _ = self.store.create_job(job, "alice", None).await.unwrap();
    }

    /// Files under the job's blob directory (staging included).
    fn files(&self, job_id: &str) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.blob_dir.join(job_id), &mut out);
        out.sort();
        out
    }

    fn served_bytes(&self, job_id: &str) -> u64 {
        self.metrics
            .weight_served_bytes
            .with_label_values(&[job_id])
            .get()
    }
}

/// Deterministic incompressible bytes.
fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn header(job_id: &str, version: u64, data: &[u8]) -> PublishHeader {
    PublishHeader {
        job_id: job_id.into(),
        version,
        total_size_bytes: data.len() as u64,
        sha256: sha(data),
        format: WeightFormat::Safetensors as i32,
        model_config_json: r#"{"preset":"tiny"}"#.into(),
        step: version * 10,
        stage: "main".into(),
    }
}

async fn publish(
    client: &mut Client,
    job_id: &str,
    version: u64,
    data: &[u8],
) -> Result<WeightManifest, Status> {
    let data = PublishData::Memory(Arc::new(data.to_vec()));
    match client::publish(client, header(job_id, version, data_ref(&data)), data, MIB).await {
        Ok(manifest) => Ok(manifest),
        Err(PublishError::Status(status)) => Err(*status),
        Err(e) => panic!("publishing from memory cannot fail locally: {e}"),
    }
}

fn data_ref(data: &PublishData) -> &[u8] {
    match data {
        PublishData::Memory(bytes) => bytes,
        PublishData::File(_) => unreachable!("tests publish from memory"),
    }
}

/// Raw publish of the given messages (for malformed streams).
async fn publish_raw(
    client: &mut Client,
    messages: Vec<PublishRequest>,
) -> Result<WeightManifest, Status> {
    client
        .publish(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

fn header_message(header: PublishHeader) -> PublishRequest {
    PublishRequest {
        payload: Some(publish_request::Payload::Header(header)),
    }
}

fn chunk_message(offset: u64, data: &[u8]) -> PublishRequest {
    PublishRequest {
        payload: Some(publish_request::Payload::Chunk(WeightChunk {
            offset,
            data: data.to_vec(),
        })),
    }
}

/// The header and `data` in chunks of `chunk` bytes.
fn publish_messages(header: PublishHeader, data: &[u8], chunk: usize) -> Vec<PublishRequest> {
    let mut messages = vec![header_message(header)];
    for (i, piece) in data.chunks(chunk).enumerate() {
        messages.push(chunk_message((i * chunk) as u64, piece));
    }
    messages
}

fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

fn bad_fields(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    want_reason: &str,
) -> Status {
    let status = result.expect_err("the call should fail");
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (code, want_reason),
        "{status:?}"
    );
    status
}

async fn get_manifest(
    client: &mut Client,
    job_id: &str,
    version: Option<u64>,
) -> Result<WeightManifest, Status> {
    let request = GetManifestRequest {
        job_id: job_id.into(),
        version,
    };
    client.get_manifest(request).await.map(|r| r.into_inner())
}

async fn list_versions(client: &mut Client, job_id: &str) -> Vec<u64> {
    let request = ListVersionsRequest {
        job_id: job_id.into(),
        page: None,
    };
    let response = client.list_versions(request).await.unwrap().into_inner();
    response
        .manifests
        .iter()
        .map(|m| m.version.as_ref().unwrap().version)
        .collect()
}

/// A whole Fetch stream: the manifest and the bytes.
async fn fetch_all(
    client: &mut Client,
    request: FetchRequest,
) -> Result<(WeightManifest, Vec<u8>), Status> {
    let offset = request.offset;
    let mut stream = client.fetch(request).await?.into_inner();
    let Some(fetch_response::Payload::Manifest(manifest)) =
        stream.message().await?.and_then(|m| m.payload)
    else {
        panic!("the first message is not the manifest");
    };
    let mut data = Vec::new();
    while let Some(message) = stream.message().await? {
        let Some(fetch_response::Payload::Chunk(chunk)) = message.payload else {
            panic!("a second manifest");
        };
        assert_eq!(chunk.offset, offset + data.len() as u64);
        data.extend_from_slice(&chunk.data);
    }
    Ok((manifest, data))
}

fn fetch_request(job_id: &str, version: Option<u64>) -> FetchRequest {
    FetchRequest {
        job_id: job_id.into(),
        version,
        offset: 0,
        expected_sha256: String::new(),
    }
}

/// Waits for `done` to hold. Only for effects of a client going away, which
/// the server finishes on its own time with nothing a test could await.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ----- publish, fetch and the version rules -----

async fn publish_fetch_and_version_rules(backend: Backend) {
    let h = Harness::start(backend, 3).await;
    h.job("j1", JobState::Running).await;
    let mut worker = h.worker_for("j1").await;
    let mut reader = h.client().await;

    // Not a multiple of the chunk size, so the last chunk is short.
    let v0 = blob(3 * MIB + 12345, 0);
    let committed = publish(&mut worker, "j1", 0, &v0).await.unwrap();
    let identity = committed.version.clone().unwrap();
    assert_eq!((identity.job_id.as_str(), identity.version), ("j1", 0));
    assert_eq!(identity.sha256, sha(&v0));
    assert_eq!(committed.total_size_bytes, v0.len() as u64);
    assert!(committed.commit_time.is_some());

    // The whole file, through the resumable client, verified by it.
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("policy.safetensors");
    let fetched = client::fetch_to_file(&mut reader, "j1", None, &dest, 3)
        .await
        .unwrap();
    assert_eq!(fetched, committed);
    assert_eq!(sha(&std::fs::read(&dest).unwrap()), sha(&v0));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
    assert_eq!(
        get_manifest(&mut reader, "j1", None).await.unwrap(),
        committed
    );

    // A retry of the same publish changes nothing and answers the same.
    let again = publish(&mut worker, "j1", 0, &v0).await.unwrap();
    assert_eq!(again, committed);
    let versions = h.metrics.weight_versions.with_label_values(&["j1"]).get();
    assert_eq!(versions, 1);

    // Other bytes under a committed version.
    let other = blob(1000, 1);
    assert_status(
        publish(&mut worker, "j1", 0, &other).await,
        Code::AlreadyExists,
        "VERSION_CONFLICT",
    );

    let v2 = blob(MIB, 2);
    publish(&mut worker, "j1", 2, &v2).await.unwrap();
    // Not above the latest, though never used.
    assert_status(
        publish(&mut worker, "j1", 1, &other).await,
        Code::FailedPrecondition,
        "VERSION_NOT_MONOTONIC",
    );
    assert_eq!(list_versions(&mut reader, "j1").await, [2, 0]);
    let latest = h
        .store
        .get_job("j1")
        .await
        .unwrap()
        .unwrap()
        .job
        .latest_version
        .unwrap();
    assert_eq!((latest.version, latest.sha256), (2, sha(&v2)));
    let gauge = h
        .metrics
        .weight_latest_version
        .with_label_values(&["j1"])
        .get();
    assert_eq!(gauge, 2.0);

    // Fetch by version, and its refusals.
    let (manifest, data) = fetch_all(&mut reader, fetch_request("j1", Some(0)))
        .await
        .unwrap();
    assert_eq!((manifest, sha(&data)), (committed.clone(), sha(&v0)));
    let mut wrong_hash = fetch_request("j1", Some(0));
    wrong_hash.expected_sha256 = sha(&v2);
    let status = assert_status(
        fetch_all(&mut reader, wrong_hash).await,
        Code::FailedPrecondition,
        "VERSION_CONFLICT",
    );
    assert!(status.message().contains("expected_sha256"), "{status:?}");
    let mut beyond = fetch_request("j1", Some(2));
    beyond.offset = v2.len() as u64 + 1;
    assert_status(
        fetch_all(&mut reader, beyond).await,
        Code::OutOfRange,
        "OFFSET_OUT_OF_RANGE",
    );
    let mut at_end = fetch_request("j1", Some(2));
    at_end.offset = v2.len() as u64;
    let (manifest, data) = fetch_all(&mut reader, at_end).await.unwrap();
    assert_eq!((manifest.version.unwrap().version, data.len()), (2, 0));
    assert_status(
        fetch_all(&mut reader, fetch_request("j1", Some(1))).await,
        Code::NotFound,
        "VERSION_NOT_FOUND",
    );
    assert_status(
        get_manifest(&mut reader, "j1", Some(1)).await,
        Code::NotFound,
        "VERSION_NOT_FOUND",
    );
    assert_status(
        fetch_all(&mut reader, fetch_request("nope", None)).await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    assert_status(
        get_manifest(&mut reader, "nope", None).await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );

    // Unknown and finished jobs get no versions.
    assert_status(
        publish(&mut worker, "nope", 0, &v0).await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    h.job("done", JobState::Succeeded).await;
    assert_status(
        publish(&mut worker, "done", 0, &v0).await,
        Code::FailedPrecondition,
        "JOB_TERMINAL",
    );
    assert!(h.files("done").is_empty() && h.files("nope").is_empty());
}

#[tokio::test]
async fn embedded_publish_fetch_and_version_rules() {
    publish_fetch_and_version_rules(Backend::Embedded).await;
}

#[tokio::test]
async fn redis_publish_fetch_and_version_rules() {
    publish_fetch_and_version_rules(Backend::Redis).await;
}

// ----- resuming a broken download -----

/// A TCP proxy to `upstream` that cuts its first connection once
/// `cut_after` bytes went from the server to the client; later connections
/// pass through. Returns its address and a count of connections.
async fn cutting_proxy(upstream: SocketAddr, cut_after: u64) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((downstream, _)) = listener.accept().await {
            let limit = if count.fetch_add(1, Ordering::SeqCst) == 0 {
                cut_after
            } else {
                u64::MAX
            };
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = downstream.into_split();
                let (mut server_read, mut server_write) = upstream.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut buf = vec![0; 64 * 1024];
                let mut passed = 0u64;
                while passed < limit {
                    match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            passed += n as u64;
                        }
                    }
                }
                // Dropping every half closes both connections.
                requests.abort();
            });
        }
    });
    (addr, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fetch_cut_off_half_way_resumes_from_its_offset() {
    const SIZE: usize = 100 * 1000 * 1000;
    let h = Harness::start(Backend::Redis, 3).await;
    h.job("big", JobState::Running).await;
    let data = blob(SIZE, 7);
    let committed = publish(&mut h.worker_for("big").await, "big", 0, &data)
        .await
        .unwrap();
    let want = sha(&data);
    let mut reader = h.client().await;

    // By hand: drop the stream after ~50 MB, then resume at the offset
    // reached, naming the version and hash.
    let mut stream = reader
        .fetch(fetch_request("big", None))
        .await
        .unwrap()
        .into_inner();
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    while received < (SIZE / 2) as u64 {
        match stream.message().await.unwrap().and_then(|m| m.payload) {
            Some(fetch_response::Payload::Manifest(m)) => assert_eq!(m, committed),
            Some(fetch_response::Payload::Chunk(chunk)) => {
                assert_eq!(chunk.offset, received);
                hasher.update(&chunk.data);
                received += chunk.data.len() as u64;
            }
            None => panic!("the stream ended early"),
        }
    }
    drop(stream);
    let resume = FetchRequest {
        job_id: "big".into(),
        version: Some(0),
        offset: received,
        expected_sha256: want.clone(),
    };
    let (manifest, rest) = fetch_all(&mut reader, resume).await.unwrap();
    assert_eq!(
        manifest, committed,
        "the manifest comes first also when resuming"
    );
    hasher.update(&rest);
    assert_eq!(received + rest.len() as u64, SIZE as u64);
    assert_eq!(hex::encode(hasher.finalize()), want);

    // Through the client: the connection itself is cut half-way.
    let served_before = h.served_bytes("big");
    let (proxy, connections) = cutting_proxy(h.addr, (SIZE / 2) as u64).await;
    let mut through_proxy = Harness::client_at(proxy, Some(CLIENT)).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("big.safetensors");
    let fetched = client::fetch_to_file(&mut through_proxy, "big", None, &dest, 5)
        .await
        .unwrap();
    assert_eq!(fetched, committed);
    assert_eq!(sha(&std::fs::read(&dest).unwrap()), want);
    assert!(
        connections.load(Ordering::SeqCst) >= 2,
        "the first connection was cut"
    );
    // Resumed, not restarted: only what was in flight at the cut went twice.
    let served = h.served_bytes("big") - served_before;
    assert!(
        (SIZE as u64..SIZE as u64 + 30 * MIB as u64).contains(&served),
        "served {served} bytes for a {SIZE}-byte file"
    );
    // Every fetch released its pin.
    eventually("the fetch pins to be released", async || {
        h.store.pinned_versions("big").await.unwrap().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_download_that_cannot_complete_leaves_nothing_at_its_destination() {
    let h = Harness::start(Backend::Embedded, 3).await;
    h.job("j1", JobState::Running).await;
    let data = blob(2 * MIB, 3);
    publish(&mut h.worker_for("j1").await, "j1", 0, &data)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("w.safetensors");

    // The connection is cut after 100 KB and the caller allows no resume.
    let (proxy, _) = cutting_proxy(h.addr, 100_000).await;
    let mut flaky = Harness::client_at(proxy, Some(CLIENT)).await;
    let err = client::fetch_to_file(&mut flaky, "j1", None, &dest, 0)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Interrupted { .. }), "{err}");
    let err = client::fetch_to_file(&mut h.client().await, "j1", Some(5), &dest, 3)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FetchError::Refused(s) if s.code() == Code::NotFound),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// ----- nothing half-published is ever visible -----

async fn half_published_versions_are_never_visible(backend: Backend) {
    let h = Harness::start(backend, 3).await;
    h.job("j1", JobState::Running).await;
    let mut worker = h.worker_for("j1").await;
    let mut reader = h.client().await;
    let data = blob(4 * MIB, 4);
    let messages = publish_messages(header("j1", 0, &data), &data, MIB);

    // The stream ends half-way.
    let half = messages[..3].to_vec();
    let status = assert_status(
        publish_raw(&mut worker, half).await,
        Code::InvalidArgument,
        "CHECKSUM_MISMATCH",
    );
    assert!(
        status.message().contains("header.total_size_bytes"),
        "{status:?}"
    );
    // Every byte, but not the announced ones.
    let mut lying = header("j1", 0, &data);
    lying.sha256 = sha(b"something else");
    let status = assert_status(
        publish_raw(&mut worker, publish_messages(lying, &data, MIB)).await,
        Code::InvalidArgument,
        "CHECKSUM_MISMATCH",
    );
    assert!(status.message().contains("header.sha256"), "{status:?}");
    // More bytes than announced.
    let mut short = header("j1", 0, &data);
    short.total_size_bytes = 1000;
    assert_status(
        publish_raw(&mut worker, publish_messages(short, &data, MIB)).await,
        Code::InvalidArgument,
        "CHECKSUM_MISMATCH",
    );
    // The publisher goes away mid-stream.
    let received = || {
        h.metrics
            .weight_received_bytes
            .with_label_values(&["j1"])
            .get()
    };
    let before = received();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for message in messages[..3].iter().cloned() {
        tx.send(message).await.unwrap();
    }
    let mut cancelled = h.worker_for("j1").await;
    let call = tokio::spawn(async move {
        let _keep_open = tx;
        cancelled
            .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    eventually("the upload to reach the server", async || {
        received() > before
    })
    .await;
    call.abort();
    eventually("the abandoned upload to be removed", async || {
        h.files("j1").is_empty()
    })
    .await;

    // None of it is visible anywhere.
    assert_status(
        get_manifest(&mut reader, "j1", None).await,
        Code::NotFound,
        "VERSION_NOT_FOUND",
    );
    assert_status(
        get_manifest(&mut reader, "j1", Some(0)).await,
        Code::NotFound,
        "VERSION_NOT_FOUND",
    );
    assert!(list_versions(&mut reader, "j1").await.is_empty());
    assert_status(
        fetch_all(&mut reader, fetch_request("j1", Some(0))).await,
        Code::NotFound,
        "VERSION_NOT_FOUND",
    );
    assert!(h.files("j1").is_empty(), "{:?}", h.files("j1"));
    assert_eq!(
        h.metrics.weight_versions.with_label_values(&["j1"]).get(),
        0
    );

    // And the version is still free.
    publish(&mut worker, "j1", 0, &data).await.unwrap();
    assert_eq!(h.files("j1").len(), 1);
}

#[tokio::test]
async fn embedded_half_published_versions_are_never_visible() {
    half_published_versions_are_never_visible(Backend::Embedded).await;
}

#[tokio::test]
async fn redis_half_published_versions_are_never_visible() {
    half_published_versions_are_never_visible(Backend::Redis).await;
}

// ----- garbage collection -----

async fn gc_keeps_version_zero_and_the_latest_and_never_a_pinned_one(backend: Backend) {
    let h = Harness::start(backend, 2).await;
    h.job("j1", JobState::Running).await;
    let mut worker = h.worker_for("j1").await;
    let mut reader = h.client().await;
    // Versions 2 and 5 are read slowly below: they are larger than what the
    // HTTP/2 windows and the server's queue hold, so their streams cannot
    // finish before the reader reads.
    let size = |v: u64| match v {
        2 | 5 => 16 * MIB,
        _ => 100_000 + v as usize,
    };
    let versions: Vec<Vec<u8>> = (0..6).map(|v| blob(size(v), v)).collect();
    for v in 0..4 {
        publish(&mut worker, "j1", v, &versions[v as usize])
            .await
            .unwrap();
    }
    assert_eq!(list_versions(&mut reader, "j1").await, [3, 2, 0]);
    assert_eq!(h.files("j1").len(), 3);

    // A reader holds version 2 open (the manifest arrived: it is pinned).
    let mut slow = reader
        .fetch(fetch_request("j1", Some(2)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        slow.message().await.unwrap().and_then(|m| m.payload),
        Some(fetch_response::Payload::Manifest(_))
    ));
    publish(&mut worker, "j1", 4, &versions[4]).await.unwrap();
    publish(&mut worker, "j1", 5, &versions[5]).await.unwrap();
    assert_eq!(list_versions(&mut reader, "j1").await, [5, 4, 2, 0]);
    assert_eq!(h.files("j1").len(), 4);

    // The reader gets every byte of what it started.
    let mut data = Vec::new();
    while let Some(message) = slow.message().await.unwrap() {
        if let Some(fetch_response::Payload::Chunk(chunk)) = message.payload {
            data.extend_from_slice(&chunk.data);
        }
    }
    assert_eq!(sha(&data), sha(&versions[2]));

    // Its stream has ended, so its pin is gone, and version 2 goes next.
    assert_eq!(h.weights.collect_garbage("j1").await.unwrap(), 1);
    assert_eq!(list_versions(&mut reader, "j1").await, [5, 4, 0]);
    let mut names: Vec<String> = h
        .files("j1")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = [0u64, 4, 5]
        .iter()
        .map(|&v| format!("{v}-{}.safetensors", sha(&versions[v as usize])))
        .collect();
    want.sort();
    assert_eq!(names, want);
    let deleted = h
        .metrics
        .weight_deleted_versions
        .with_label_values(&["j1"])
        .get();
    assert_eq!(deleted, 3);

    // A reader that goes away mid-stream releases its pin too.
    let mut gone = reader
        .fetch(fetch_request("j1", Some(5)))
        .await
        .unwrap()
        .into_inner();
    assert!(gone.message().await.unwrap().is_some());
    assert!(h.store.pinned_versions("j1").await.unwrap().contains(&5));
    drop(gone);
    eventually("the dropped fetch's pin to be released", async || {
        h.store.pinned_versions("j1").await.unwrap().is_empty()
    })
    .await;
    assert_eq!(h.weights.collect_garbage("j1").await.unwrap(), 0);
}

#[tokio::test]
async fn embedded_gc_keeps_version_zero_and_the_latest_and_never_a_pinned_one() {
    gc_keeps_version_zero_and_the_latest_and_never_a_pinned_one(Backend::Embedded).await;
}

#[tokio::test]
async fn redis_gc_keeps_version_zero_and_the_latest_and_never_a_pinned_one() {
    gc_keeps_version_zero_and_the_latest_and_never_a_pinned_one(Backend::Redis).await;
}

// ----- paging -----

#[tokio::test]
async fn list_versions_pages_newest_first() {
    let h = Harness::start(Backend::Embedded, 10).await;
    h.job("j1", JobState::Running).await;
    h.job("j2", JobState::Running).await;
    let mut worker = h.worker_for("j1").await;
    for v in 0..5u64 {
        publish(&mut worker, "j1", v, &v.to_le_bytes())
            .await
            .unwrap();
    }
    let mut reader = h.client().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let request = ListVersionsRequest {
            job_id: "j1".into(),
            page: Some(Page {
                page_size: 2,
                page_token: token.clone(),
            }),
        };
        let page = reader.list_versions(request).await.unwrap().into_inner();
        assert!(page.manifests.len() <= 2);
        seen.extend(
            page.manifests
                .iter()
                .map(|m| m.version.as_ref().unwrap().version),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        // A token only pages the job it was issued for.
        let request = ListVersionsRequest {
            job_id: "j2".into(),
            page: Some(Page {
                page_size: 2,
                page_token: page.next_page_token.clone(),
            }),
        };
        let status = assert_status(
            reader.list_versions(request).await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
        assert_eq!(bad_fields(&status), ["page.page_token"]);
        token = page.next_page_token;
    }
    assert_eq!(seen, [4, 3, 2, 1, 0]);
    assert!(list_versions(&mut reader, "j2").await.is_empty());
    let request = ListVersionsRequest {
        job_id: "nope".into(),
        page: None,
    };
    assert_status(
        reader.list_versions(request).await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
}

// ----- who may call -----

#[tokio::test]
async fn callers_need_the_right_token() {
    let h = Harness::start(Backend::Embedded, 3).await;
    h.job("j1", JobState::Running).await;
    let data = blob(1000, 9);
    publish(&mut h.worker_for("j1").await, "j1", 0, &data)
        .await
        .unwrap();

    let mut anonymous = Harness::client_at(h.addr, None).await;
    let mut stranger = Harness::client_at(h.addr, Some("not-a-token")).await;
    for client in [&mut anonymous, &mut stranger] {
        assert_status(
            publish(client, "j1", 1, &data).await,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
        assert_status(
            fetch_all(client, fetch_request("j1", None)).await,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
        assert_status(
            get_manifest(client, "j1", None).await,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
        let request = ListVersionsRequest {
            job_id: "j1".into(),
            page: None,
        };
        assert_status(
            client.list_versions(request).await,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
    }

    // A client token reads, but does not publish.
    let mut reader = h.client().await;
    assert_status(
        publish(&mut reader, "j1", 1, &data).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let (_, fetched) = fetch_all(&mut reader, fetch_request("j1", None))
        .await
        .unwrap();
    assert_eq!(fetched, data);
    assert_eq!(list_versions(&mut reader, "j1").await, [0]);
    // The job's members read too: its actors and every learner rank.
    let actor = assignment::Details::Actor(ActorAssignment::default());
    let (mut actor, actor_id) = h.member_and_id("j1", actor).await;
    let mut rank_1 = h.learner("j1", 1).await;
    for member in [&mut actor, &mut rank_1] {
        assert_eq!(
            get_manifest(member, "j1", Some(0))
                .await
                .unwrap()
                .total_size_bytes,
            1000
        );
        // But only rank 0 publishes.
        assert_status(
            publish(member, "j1", 1, &data).await,
            Code::FailedPrecondition,
            "NOT_ASSIGNED",
        );
    }
    // A member of another job neither reads nor publishes this one's.
    h.job("j2", JobState::Running).await;
    let mut elsewhere = h.worker_for("j2").await;
    assert_status(
        get_manifest(&mut elsewhere, "j1", Some(0)).await,
        Code::FailedPrecondition,
        "NOT_ASSIGNED",
    );
    assert_status(
        publish(&mut elsewhere, "j1", 1, &data).await,
        Code::FailedPrecondition,
        "NOT_ASSIGNED",
    );
    // The worker token only registers members.
    let mut registrar = h.registrar().await;
    assert_status(
        get_manifest(&mut registrar, "j1", Some(0)).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_status(
        publish(&mut registrar, "j1", 1, &data).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    // A made-up token is refused: for a real member, as not its token; for
    // a member the store does not have, as a member that is gone.
    for (member_id, code, reason) in [
        (actor_id.as_str(), Code::Unauthenticated, "UNAUTHENTICATED"),
        ("ACTOR-gone", Code::FailedPrecondition, "LEASE_EXPIRED"),
    ] {
        let forged = format!("encore-member.{member_id}.{}", "0".repeat(64));
        let mut forged = Harness::client_at(h.addr, Some(&forged)).await;
        assert_status(get_manifest(&mut forged, "j1", Some(0)).await, code, reason);
    }
}

// ----- malformed requests -----

#[tokio::test]
async fn malformed_requests_name_the_offending_field() {
    let h = Harness::start(Backend::Embedded, 3).await;
    h.job("j1", JobState::Running).await;
    let mut worker = h.worker_for("j1").await;
    let data = blob(3000, 5);
    let good = || header("j1", 0, &data);

    type Edit = fn(&mut PublishHeader);
    let cases: [(Edit, &str); 8] = [
        (|h| h.job_id.clear(), "header.job_id"),
        (|h| h.job_id = "../etc".into(), "header.job_id"),
        (|h| h.total_size_bytes = 0, "header.total_size_bytes"),
        (|h| h.sha256 = "ABC".into(), "header.sha256"),
        (
            |h| h.format = WeightFormat::Unspecified as i32,
            "header.format",
        ),
        (|h| h.format = 42, "header.format"),
        (
            |h| h.model_config_json = "[1, 2]".into(),
            "header.model_config_json",
        ),
        (
            |h| h.model_config_json = "{not json".into(),
            "header.model_config_json",
        ),
    ];
    for (edit, field) in cases {
        let mut bad = good();
        edit(&mut bad);
        let status = assert_status(
            publish_raw(&mut worker, publish_messages(bad, &data, 1000)).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(bad_fields(&status), [field], "{status:?}");
        assert!(status.message().contains(field), "{status:?}");
    }
    // Every bad field at once.
    let mut bad = good();
    bad.total_size_bytes = 0;
    bad.sha256.clear();
    bad.format = 0;
    let status = assert_status(
        publish_raw(&mut worker, vec![header_message(bad)]).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(
        bad_fields(&status),
        ["header.total_size_bytes", "header.sha256", "header.format"]
    );

    let stream_cases: [(Vec<PublishRequest>, &str); 6] = [
        (vec![], "header"),
        (vec![chunk_message(0, &data)], "header"),
        (
            vec![header_message(good()), header_message(good())],
            "header",
        ),
        (
            vec![
                header_message(good()),
                chunk_message(0, &data[..1000]),
                chunk_message(999, &data[1000..]),
            ],
            "chunk.offset",
        ),
        (
            vec![
                header_message(good()),
                chunk_message(0, &[]),
                chunk_message(0, &data),
            ],
            "chunk.data",
        ),
        (vec![PublishRequest { payload: None }], "header"),
    ];
    for (messages, field) in stream_cases {
        let status = assert_status(
            publish_raw(&mut worker, messages).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(bad_fields(&status), [field], "{status:?}");
    }
    // A chunk over the protocol's 1 MiB.
    let big = blob(MIB + 1, 6);
    let status = assert_status(
        publish_raw(
            &mut worker,
            vec![
                header_message(header("j1", 0, &big)),
                chunk_message(0, &big),
            ],
        )
        .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(bad_fields(&status), ["chunk.data"]);

    let mut reader = h.client().await;
    let mut bad_fetch = fetch_request("a/b", None);
    bad_fetch.expected_sha256 = "xyz".into();
    let status = assert_status(
        fetch_all(&mut reader, bad_fetch).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(bad_fields(&status), ["job_id", "expected_sha256"]);
    let status = assert_status(
        get_manifest(&mut reader, "..", None).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(bad_fields(&status), ["job_id"]);
    let request = ListVersionsRequest {
        job_id: "j1".into(),
        page: Some(Page {
            page_size: 0,
            page_token: "garbage".into(),
        }),
    };
    let status = assert_status(
        reader.list_versions(request).await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    assert_eq!(bad_fields(&status), ["page.page_token"]);

    // Nothing of it left a trace.
    assert!(h.files("j1").is_empty(), "{:?}", h.files("j1"));
    assert!(list_versions(&mut reader, "j1").await.is_empty());
}

//! `weight-bench`: how fast the WeightService moves a policy snapshot on
//! loopback, next to what plain TCP does on the same machine in the same
//! run.
//!
//! Starts an in-process WeightService (embedded store and blob dir in a
//! temporary directory, bearer-token interceptor as in production), has one
//! publisher publish a snapshot (100 MB by default), then lets 1, 4 and 8
//! concurrent fetchers fetch it, each over its own connection as separate
//! actors would. Fetchers count the bytes and drop them, so the numbers are
//! the service's (one more row shows the full client path, sha256 and a
//! file on disk included). The TCP rows push the same bytes over 1, 4 and 8
//! tokio `TcpStream`s. Prints a Markdown table.
//!
//! HTTP/2 windows and frame size default to the coordinator's
//! recommendation (`encore_client::endpoint::HTTP2_*`); `--window-mib 0 --frame-kib 0`
//! measures hyper's defaults instead.
//!
//! ```text
//! cargo run --release -p encore-coordinator --bin weight-bench [-- --size-mb 100]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use encore_client::endpoint::{HTTP2_MAX_FRAME_BYTES, HTTP2_STREAM_WINDOW_BYTES};
use encore_client::weights::{self as client, MAX_CHUNK_BYTES, PublishData};
use encore_coordinator::auth::Authenticator;
use encore_coordinator::metrics::Metrics;
use encore_coordinator::weights::{WeightOptions, Weights};
use encore_proto::v1::weight_service_client::WeightServiceClient;
use encore_proto::v1::weight_service_server::WeightServiceServer;
use encore_proto::v1::{
    Assignment, FetchRequest, Job, JobState, LearnerAssignment, PublishHeader, Role, WeightFormat,
    assignment, fetch_response,
};
use encore_store::{Member, Registration, SystemClock};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};

const WORKER_TOKEN: &str = "bench-worker-token";
const JOB: &str = "bench";
const MEMBER: &str = "learner-bench";

/// Measures WeightService throughput on loopback against plain TCP.
#[derive(Parser)]
struct Args {
    /// Size of the snapshot, in MB (10^6 bytes).
    #[arg(long, default_value_t = 100)]
    size_mb: usize,
    /// Concurrent fetcher counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    fetchers: Vec<usize>,
    /// HTTP/2 stream receive window of server and clients, in MiB (the
    /// connection window is twice this); 0 keeps hyper's defaults. The
    /// default is the coordinator's recommendation.
    #[arg(long, default_value_t = HTTP2_STREAM_WINDOW_BYTES >> 20)]
    window_mib: u32,
    /// Largest HTTP/2 frame server and clients accept, in KiB; 0 keeps the
    /// protocol default (16 KiB). The default is the coordinator's
    /// recommendation.
    #[arg(long, default_value_t = HTTP2_MAX_FRAME_BYTES >> 10)]
    frame_kib: u32,
}

/// HTTP/2 settings applied to both ends.
#[derive(Clone, Copy)]
struct H2 {
    stream_window: Option<u32>,
    connection_window: Option<u32>,
    max_frame: Option<u32>,
}

impl H2 {
    fn of(args: &Args) -> Self {
        let window = (args.window_mib > 0).then_some(args.window_mib << 20);
        Self {
            stream_window: window,
            connection_window: window.map(|w| w.saturating_mul(2)),
            max_frame: (args.frame_kib > 0).then_some(args.frame_kib << 10),
        }
    }
}

/// One row of the table.
struct Row {
    what: String,
    streams: usize,
    /// Wall time of the whole row (all streams).
    elapsed: Duration,
    /// Each stream's own time.
    per_stream: Vec<Duration>,
}

type Client = WeightServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.size_mb == 0 || args.fetchers.contains(&0) {
        bail!("--size-mb and every --fetchers count must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("encore-weight-bench-{}", std::process::id()));
    let result = run(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let size = args.size_mb * 1_000_000;
    let mut data = vec![0u8; size];
    rand::rng().fill_bytes(&mut data);
    let data = Arc::new(data);
    let sha256 = hex::encode(Sha256::digest(&data[..]));

    let h2 = H2::of(args);
    let (addr, token, shutdown) = start_service(dir, h2).await?;
    let mut rows = Vec::new();

    let mut publisher = connect(addr, h2, &token).await?;
    let header = PublishHeader {
        job_id: JOB.into(),
        version: 0,
        total_size_bytes: size as u64,
        sha256: sha256.clone(),
        format: WeightFormat::Safetensors as i32,
        model_config_json: "{}".into(),
        step: 0,
        stage: "main".into(),
    };
    let started = Instant::now();
    client::publish(
        &mut publisher,
        header,
        PublishData::Memory(data.clone()),
        MAX_CHUNK_BYTES,
    )
    .await
    .context("publishing")?;
    let elapsed = started.elapsed();
    rows.push(Row {
        what: "Publish (gRPC, commit included)".into(),
        streams: 1,
        elapsed,
        per_stream: vec![elapsed],
    });

    for &n in &args.fetchers {
        rows.push(fetch_row(addr, h2, &token, n, size as u64).await?);
    }

    let file_dir = dir.join("fetched");
    std::fs::create_dir_all(&file_dir)?;
    let mut fetcher = connect(addr, h2, &token).await?;
    let started = Instant::now();
    let manifest = client::fetch_to_file(&mut fetcher, JOB, Some(0), &file_dir.join("w"), 3)
        .await
        .context("fetch_to_file")?;
    let elapsed = started.elapsed();
    if manifest.version.map(|v| v.sha256) != Some(sha256) {
        bail!("fetch_to_file returned another version");
    }
    rows.push(Row {
        what: "fetch_to_file (sha256 + file on disk)".into(),
        streams: 1,
        elapsed,
        per_stream: vec![elapsed],
    });

    for &n in &args.fetchers {
        rows.push(tcp_row(n, data.clone()).await?);
    }
    shutdown.cancel();

    let setting = |v: Option<u32>, unit: u32, default: &str| {
        v.map_or_else(|| default.to_owned(), |v| format!("{} KiB", v / unit))
    };
    println!(
        "{} MB snapshot, {} CPU cores, 1 MiB chunks, loopback; HTTP/2 stream window {}, \
         connection window {}, max frame {}\n",
        args.size_mb,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        setting(h2.stream_window, 1024, "default"),
        setting(h2.connection_window, 1024, "default"),
        setting(h2.max_frame, 1024, "16 KiB (default)"),
    );
    println!(
        "| transfer | streams | aggregate MB/s | per stream MB/s (mean) | slowest stream MB/s | wall time |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for row in &rows {
        let mb = size as f64 / 1e6;
        let aggregate = mb * row.streams as f64 / row.elapsed.as_secs_f64();
        let rates: Vec<f64> = row
            .per_stream
            .iter()
            .map(|t| mb / t.as_secs_f64())
            .collect();
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| {} | {} | {aggregate:.0} | {mean:.0} | {slowest:.0} | {:.2} s |",
            row.what,
            row.streams,
            row.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// Starts the service over an embedded store in `dir`, with one member:
/// rank 0 of the job's learner, which publishes and fetches. Returns its
/// address, the member's token and the service's shutdown.
async fn start_service(
    dir: &std::path::Path,
    h2: H2,
) -> anyhow::Result<(SocketAddr, String, CancellationToken)> {
    let store_uri = format!("embedded://{}", dir.join("store").display());
    let store = encore_store::open(&store_uri, Arc::new(SystemClock)).await?;
    let job = Job {
        job_id: JOB.into(),
        state: JobState::Running as i32,
        ..Default::default()
    };
    let _ = store.create_job(job, "bench", None).await?;
    let (token, sha256) = encore_coordinator::auth::member_token(MEMBER);
    let member = Member {
        member_id: MEMBER.into(),
        role: Role::Learner as i32,
        instance_id: MEMBER.into(),
        token_sha256: sha256.to_vec(),
        ..Member::default()
    };
    let Registration::Registered(record) = store
        .register_member(member, Duration::from_secs(24 * 3600))
        .await?
    else {
        bail!("the bench's store already had a member");
    };
    let mut assigned = record.member;
    assigned.assignment = Some(Assignment {
        member_id: MEMBER.into(),
        generation: 1,
        job_id: JOB.into(),
        details: Some(assignment::Details::Learner(LearnerAssignment::default())),
        rollout_queue: None,
    });
    store.update_member(assigned, record.revision).await?;
    let metrics = Metrics::new(&prometheus::Registry::new())?;
    let shutdown = CancellationToken::new();
    let weights = Weights::new(
        store,
        WeightOptions::new(PathBuf::from(dir).join("blobs")),
        metrics,
        shutdown.clone(),
    )?;
    let auth = Authenticator::new([], WORKER_TOKEN).map_err(anyhow::Error::msg)?;
    let service = WeightServiceServer::with_interceptor(weights, move |r| auth.check(r));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        Server::builder()
            .initial_stream_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .max_frame_size(h2.max_frame)
            .add_service(service)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.clone().cancelled_owned(),
            ),
    );
    Ok((addr, token, shutdown))
}

async fn connect(addr: SocketAddr, h2: H2, token: &str) -> anyhow::Result<Client> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .initial_stream_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_frame_size(h2.max_frame)
        .connect()
        .await?;
    let token = format!("Bearer {token}").parse()?;
    Ok(WeightServiceClient::with_interceptor(
        channel,
        Bearer(token),
    ))
}

/// `n` fetchers at once, each on its own connection, counting bytes.
async fn fetch_row(
    addr: SocketAddr,
    h2: H2,
    token: &str,
    n: usize,
    size: u64,
) -> anyhow::Result<Row> {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(connect(addr, h2, token).await?);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let begun = Instant::now();
                let request = FetchRequest {
                    job_id: JOB.into(),
                    version: Some(0),
                    offset: 0,
                    expected_sha256: String::new(),
                };
                let mut stream = client.fetch(request).await?.into_inner();
                let mut received = 0u64;
                while let Some(message) = stream.message().await? {
                    if let Some(fetch_response::Payload::Chunk(chunk)) = message.payload {
                        received += chunk.data.len() as u64;
                    }
                }
                if received != size {
                    return Err(tonic::Status::data_loss(format!(
                        "received {received} bytes"
                    )));
                }
                Ok(begun.elapsed())
            })
        })
        .collect();
    let mut per_stream = Vec::new();
    for task in tasks {
        per_stream.push(task.await??);
    }
    Ok(Row {
        what: "Fetch (gRPC)".into(),
        streams: n,
        elapsed: started.elapsed(),
        per_stream,
    })
}

/// The same bytes over `n` plain TCP connections, 1 MiB writes.
async fn tcp_row(n: usize, data: Arc<Vec<u8>>) -> anyhow::Result<Row> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let size = data.len() as u64;
    let senders = tokio::spawn(async move {
        let mut sends = Vec::new();
        for _ in 0..n {
            let (mut socket, _) = listener.accept().await?;
            let data = data.clone();
            sends.push(tokio::spawn(async move {
                for piece in data.chunks(MAX_CHUNK_BYTES) {
                    socket.write_all(piece).await?;
                }
                socket.shutdown().await
            }));
        }
        for send in sends {
            send.await??;
        }
        anyhow::Ok(())
    });
    // The sender starts writing as soon as it accepts, so each stream is
    // timed from its connect.
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let begun = Instant::now();
                let mut socket = TcpStream::connect(addr).await?;
                let mut buf = vec![0u8; MAX_CHUNK_BYTES];
                let mut received = 0u64;
                loop {
                    let read = socket.read(&mut buf).await?;
                    if read == 0 {
                        break;
                    }
                    received += read as u64;
                }
                if received != size {
                    return Err(std::io::Error::other(format!("received {received} bytes")));
                }
                Ok(begun.elapsed())
            })
        })
        .collect();
    let mut per_stream = Vec::new();
    for task in tasks {
        per_stream.push(task.await??);
    }
    let elapsed = started.elapsed();
    senders.await??;
    Ok(Row {
        what: "plain TCP (tokio TcpStream)".into(),
        streams: n,
        elapsed,
        per_stream,
    })
}

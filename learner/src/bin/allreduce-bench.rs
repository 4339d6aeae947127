//! Measures the TCP ring all-reduce on loopback and prints a Markdown table.
//!
//! For each buffer size (1, 16, 64 MB of f32) and world size (2, 4) it forms
//! a ring of threads in this process, runs warm-up and timed all-reduces,
//! and reports the median time per all-reduce, the algorithm bandwidth
//! (buffer bytes / time) and the bus bandwidth (`2 (N - 1) / N` x bytes /
//! time, what each rank actually sends, comparable across world sizes).
//! Next to it, a plain loopback TCP copy of the same bytes, measured in the
//! same run, gives the ceiling of this machine's loopback.
//!
//! All ranks share this machine's cores and its one loopback, so the fair
//! comparison with the copy is the traffic of all ranks together (`N` x bus
//! bandwidth): how close the ring gets to moving bytes as fast as a bare
//! copy. On a cluster each rank has its own NIC and the bus bandwidth is
//! the number to compare with the link speed.
//!
//! Usage: `cargo run --release -p encore-learner --bin allreduce-bench
//! [-- --iters N]`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use encore_learner::collective::{Collective, RingSecret, TcpRing};

/// Errors end the benchmark with a message; nothing to recover.
type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MB: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    let iters = parse_iters()?;
    println!(
        "TCP ring all-reduce on loopback ({} cores, median of {iters} after a warm-up)\n",
        thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    );
    println!(
        "| buffer | ranks | time per all-reduce | algorithm bandwidth | bus bandwidth | all ranks' traffic | loopback TCP copy |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for size_mb in [1, 16, 64] {
        let bytes = size_mb * MB;
        let copy = loopback_copy(bytes, iters)?;
        for world in [2, 4] {
            let time = ring_all_reduce(world, bytes / 4, iters)?;
            let secs = time.as_secs_f64();
            let algo = bytes as f64 / secs;
            let bus = algo * 2.0 * (world - 1) as f64 / world as f64;
            println!(
                "| {size_mb} MB | {world} | {:.2} ms | {} | {} | {} | {} |",
                secs * 1e3,
                rate(algo),
                rate(bus),
                rate(bus * world as f64),
                rate(bytes as f64 / copy.as_secs_f64()),
            );
        }
    }
    Ok(())
}

fn parse_iters() -> Result<usize> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(9),
        [flag, n] if flag == "--iters" => {
            let n: usize = n.parse()?;
            if n == 0 {
                return Err("--iters must be positive".into());
            }
            Ok(n)
        }
        _ => Err("usage: allreduce-bench [--iters N]".into()),
    }
}

fn rate(bytes_per_sec: f64) -> String {
    format!("{:.2} GB/s", bytes_per_sec / 1e9)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Median time of an all-reduce of `len` floats over a ring of `world`
/// threads, timed on rank 0 between barriers.
fn ring_all_reduce(world: usize, len: usize, iters: usize) -> Result<Duration> {
    let listeners = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let peers = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let secret = RingSecret::new(b"bench");
    let results = thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, secret) = (&peers, &secret);
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut ring =
                        TcpRing::connect(rank, peers, listener, "bench", secret, TIMEOUT)?;
                    let mut buf: Vec<f32> = (0..len).map(|i| (i % 251) as f32).collect();
                    ring.all_reduce_sum(&mut buf)?;
                    let mut times = Vec::with_capacity(iters);
                    for _ in 0..iters {
                        ring.barrier()?;
                        let start = Instant::now();
                        ring.all_reduce_sum(&mut buf)?;
                        times.push(start.elapsed());
                    }
                    Ok(times)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a rank panicked")?)
            .collect::<Result<Vec<_>>>()
    })?;
    // A rank is done when it has its result; the slowest rank's time is
    // the all-reduce's time.
    let per_iter = (0..iters)
        .map(|i| results.iter().map(|t| t[i]).max().unwrap_or_default())
        .collect();
    Ok(median(per_iter))
}

/// Median time to send `bytes` over one loopback TCP connection and have
/// them all received, in the same segments the ring uses.
fn loopback_copy(bytes: usize, iters: usize) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = thread::spawn(move || -> Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; encore_learner::collective::ring::SEGMENT_BYTES];
        for _ in 0..=iters {
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len());
                stream.read_exact(&mut buf[..n])?;
                left -= n;
            }
            stream.write_all(&[1])?;
        }
        Ok(())
    });
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let data = vec![7u8; bytes];
    let mut times = Vec::with_capacity(iters);
    let mut ack = [0u8];
    for i in 0..=iters {
        let start = Instant::now();
        for segment in data.chunks(encore_learner::collective::ring::SEGMENT_BYTES) {
            stream.write_all(segment)?;
        }
        stream.read_exact(&mut ack)?;
        // The first round warms up the connection.
        if i > 0 {
            times.push(start.elapsed());
        }
    }
    receiver.join().map_err(|_| "the receiver panicked")??;
    Ok(median(times))
}
